// Compare: pick runs; their cost and quality side by side (tunesmith compare's columns, then every
// test metric, base and tuned) and their loss curves on shared axes.
"use strict";

let picked = new Set((new URLSearchParams(location.search).get("runs") || "").split(",").filter(Boolean));

function pickerView(runs) {
  return runs.map((run) => el("label", { class: "pick-run" },
    el("input", { type: "checkbox", value: run.name, checked: picked.has(run.name) || null,
                  onchange: (event) => { event.target.checked ? picked.add(run.name) : picked.delete(run.name); update(); } }),
    " ", run.name, " ", statusBadge(run.status)));
}

function tableView(data) {
  const runs = data.runs;
  const metricNames = [...new Set(runs.flatMap((r) => Object.keys((r.metrics || {}).tuned || {})))];
  const rows = [
    ["status", runs.map((r) => statusBadge(r.status))],
    ["objective", runs.map((r) => r.objective)],
    ...data.columns.filter((c) => c !== "method" && c !== "test metric")
      .map((c) => [c, runs.map((r) => (r.table || {})[c] ?? "")]),
    ...metricNames.map((m) => ["tuned " + m, runs.map((r) => fmt(((r.metrics || {}).tuned || {})[m]))]),
    ...metricNames.map((m) => ["base " + m, runs.map((r) => fmt(((r.metrics || {}).base || {})[m]))]),
  ];
  return el("table", { id: "compare-table" },
    el("tr", {}, el("th", {}, ""), runs.map((r) => el("th", { class: "num" }, runLink(r.name), el("br"),
                                                      el("span", { class: "muted" }, r.method)))),
    rows.map(([title, cells]) => el("tr", {}, el("th", {}, title), cells.map((c) => el("td", { class: "num" }, c)))));
}

function curves(runs, key) {
  return runs.map((r) => ({ name: r.name,
    points: r.curve.filter((rec) => rec[key] !== undefined).map((rec) => [rec.step, rec[key]]) }));
}

async function update() {
  const names = [...picked];
  history.replaceState(null, "", "/ui/compare" + (names.length ? "?runs=" + names.map(encodeURIComponent).join(",") : ""));
  if (!names.length) {
    document.getElementById("table").replaceChildren(el("p", { class: "muted" }, "pick two or more runs"));
    lineChart(document.getElementById("val-chart"), []);
    lineChart(document.getElementById("train-chart"), []);
    return;
  }
  try {
    const data = await api("/ui/api/compare?names=" + names.map(encodeURIComponent).join(","));
    document.getElementById("table").replaceChildren(tableView(data));
    lineChart(document.getElementById("val-chart"), curves(data.runs, "val_loss"));
    lineChart(document.getElementById("train-chart"), curves(data.runs, "loss"));
    showError(null);
  } catch (err) {
    showError(err);
  }
}

async function load() {
  try {
    const data = await api("/ui/api/runs");
    document.getElementById("picker").replaceChildren(...pickerView(data.runs));
    await update();
  } catch (err) {
    showError(err);
  }
}

navBar("Compare");
window.addEventListener("tunesmith-key", load);
load();
