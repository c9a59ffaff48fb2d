// The runs table: every run under the runs directory, filtered as you type, refreshed every few seconds.
"use strict";

let allRuns = [];
let keyMetrics = [];

function matches(run, text, status) {
  if (status && run.status !== status) return false;
  const hay = [run.name, run.status, run.method, run.objective, run.model, run.parent_name].join(" ").toLowerCase();
  return text.toLowerCase().split(/\s+/).every((word) => hay.includes(word));
}

function renderRuns() {
  const text = document.getElementById("filter").value.trim();
  const status = document.getElementById("status-filter").value;
  const shown = allRuns.filter((run) => matches(run, text, status));
  document.getElementById("runs-head").replaceChildren(
    el("th", {}, ""), el("th", {}, "run"), el("th", {}, "status"), el("th", {}, "method"),
    el("th", { class: "wide" }, "objective"),
    ...keyMetrics.map((m) => el("th", { class: "num" }, m)),
    el("th", { class: "wide" }, "parent"), el("th", { class: "wide" }, "updated"));
  document.getElementById("runs-body").replaceChildren(...shown.map((run) => el("tr", { "data-run": run.name },
    el("td", {}, el("input", { type: "checkbox", class: "pick", value: run.name, "aria-label": "pick " + run.name,
                               onchange: updateCompareLink })),
    el("td", {}, runLink(run.name)),
    el("td", {}, statusBadge(run.status)),
    el("td", {}, run.method || ""),
    el("td", { class: "wide" }, run.objective || ""),
    keyMetrics.map((m) => el("td", { class: "num" }, fmt((run.tuned || {})[m]))),
    el("td", { class: "wide" }, run.parent_name ? runLink(run.parent_name) : ""),
    el("td", { class: "wide muted" }, (run.updated_at || "").replace("T", " ").slice(0, 19)),
  )));
  document.getElementById("count").textContent = `${shown.length} of ${allRuns.length} runs`;
  updateCompareLink();
}

function updateCompareLink() {
  const picked = [...document.querySelectorAll("input.pick:checked")].map((box) => box.value);
  document.getElementById("compare-link").href = "/ui/compare" +
    (picked.length ? "?runs=" + picked.map(encodeURIComponent).join(",") : "");
}

async function loadRuns() {
  try {
    const picked = new Set([...document.querySelectorAll("input.pick:checked")].map((box) => box.value));
    const data = await api("/ui/api/runs");
    allRuns = data.runs;
    keyMetrics = data.key_metrics;
    document.getElementById("runs-dir").textContent = "runs directory: " + data.runs_dir;
    renderRuns();
    for (const box of document.querySelectorAll("input.pick")) box.checked = picked.has(box.value);
    updateCompareLink();
    showError(null);
  } catch (err) {
    showError(err);
  }
}

navBar("Runs");
const params = new URLSearchParams(location.search);
document.getElementById("filter").value = params.get("q") || "";
document.getElementById("filter").addEventListener("input", renderRuns);
document.getElementById("status-filter").addEventListener("change", renderRuns);
window.addEventListener("tunesmith-key", loadRuns);
loadRuns();
setInterval(loadRuns, 5000);
