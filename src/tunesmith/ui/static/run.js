// A run's page: status, live loss curves (metrics.jsonl, polled while the run is going), test metrics,
// the report, data statistics, samples and config. Admins can stop or resume the run from here.
"use strict";

const runName = new URLSearchParams(location.search).get("name") || "";
const LIVE = new Set(["running", "starting"]);
let records = [];
let nextLine = 0;
let lastStatus = null;
let isAdmin = false;

function curveSeries() {
  const train = records.filter((r) => r.loss !== undefined).map((r) => [r.step, r.loss]);
  const val = records.filter((r) => r.val_loss !== undefined).map((r) => [r.step, r.val_loss]);
  return [{ name: "training loss", points: train }, { name: "validation loss", points: val }];
}

function drawCurve() {
  lineChart(document.getElementById("curve"), curveSeries(), { xLabel: "step" });
  const last = records[records.length - 1];
  document.getElementById("curve-note").textContent = last ? `${records.length} records, last at step ${last.step}` : "";
}

function metricsTable(summary) {
  if (!summary || !summary.tuned) return el("p", { class: "muted" }, "when the run finishes");
  const names = [...new Set([...Object.keys(summary.base || {}), ...Object.keys(summary.tuned)])];
  return el("table", {},
    el("tr", {}, el("th", {}, "metric"), el("th", { class: "num" }, "base"), el("th", { class: "num" }, "tuned")),
    names.map((m) => el("tr", {}, el("td", {}, m), el("td", { class: "num" }, fmt((summary.base || {})[m])),
                        el("td", { class: "num" }, fmt(summary.tuned[m])))));
}

// A classifier's report (metrics.json's classification and baselines): per-class figures, the
// averages, AUCs and calibration, the confusion matrix, and the two baselines beside the tuned model.
function classesView(summary) {
  const c = summary && summary.classification;
  if (!c) return null;
  const num = (v) => el("td", { class: "num" }, fmt(v));
  const perClass = el("table", { id: "per-class" },
    el("tr", {}, el("th", {}, "label"), ["precision", "recall", "F1", "support"].map((h) => el("th", { class: "num" }, h))),
    Object.entries(c.per_class).map(([label, v]) => el("tr", {}, el("td", {}, label),
      num(v.precision), num(v.recall), num(v.f1), num(v.support))));
  const figures = el("dl", { class: "kv", id: "class-figures" },
    [["macro-F1", c.macro_f1], ["weighted F1", c.weighted_f1], ["ROC-AUC", c.roc_auc], ["PR-AUC", c.pr_auc],
     ["AUCs of", c.auc_of], [`ECE (${c.ece_bins} bins)`, c.ece]].flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, fmt(v))]));
  const confusion = el("table", { id: "confusion" },
    el("tr", {}, el("th", {}, "true \\ predicted"), c.labels.map((l) => el("th", { class: "num" }, l))),
    c.confusion.map((row, i) => el("tr", {}, el("td", {}, c.labels[i]), row.map(num))));
  const parts = [el("div", { class: "table-wrap" }, perClass), figures, el("h3", {}, "Confusion matrix"),
                 el("div", { class: "table-wrap" }, confusion)];
  const b = summary.baselines;
  if (b) {
    const rows = [["tuned model", summary.tuned], [`majority class (${b.majority.label})`, b.majority],
                  ["TF-IDF + logistic regression", b.tfidf_logistic]];
    parts.push(el("h3", {}, "Against baselines on the same splits"), el("div", { class: "table-wrap" },
      el("table", { id: "baselines" },
        el("tr", {}, el("th", {}, "model"), el("th", { class: "num" }, "accuracy"), el("th", { class: "num" }, "macro-F1")),
        rows.map(([name, v]) => el("tr", {}, el("td", {}, name), num(v.accuracy), num(v.macro_f1))))));
  }
  return el("div", {}, parts);
}

// Data statistics: a table for each per-split section, key/value pairs for the rest.
function statsView(stats) {
  if (!stats) return el("p", { class: "muted" }, "none yet");
  const root = el("div");
  const plain = el("dl", { class: "kv" });
  const isScalar = (v) => v === null || ["number", "string", "boolean"].includes(typeof v);
  for (const [key, value] of Object.entries(stats)) {
    if (isScalar(value)) plain.append(el("dt", {}, key), el("dd", {}, fmt(value)));
    else if (value && !Array.isArray(value) && Object.values(value).every((v) => v && typeof v === "object" && !Array.isArray(v))) {
      const columns = [...new Set(Object.values(value).flatMap((v) => Object.keys(v).filter((k) => isScalar(v[k]))))];
      if (!columns.length) continue;
      root.append(el("h3", {}, key), el("div", { class: "table-wrap" }, el("table", {},
        el("tr", {}, el("th", {}, ""), columns.map((c) => el("th", { class: "num" }, c))),
        Object.entries(value).map(([split, v]) => el("tr", {}, el("td", {}, split),
          columns.map((c) => el("td", { class: "num" }, fmt(v[c]))))))));
    } else if (value && !Array.isArray(value) && Object.values(value).every(isScalar)) {
      plain.append(el("dt", {}, key), el("dd", {}, Object.entries(value).map(([k, v]) => `${k} ${fmt(v)}`).join(", ") || "none"));
    }
  }
  root.prepend(plain);
  return root;
}

function samplesView(baseEval) {
  const samples = (baseEval && baseEval.samples) || [];
  if (!samples.length) return el("p", { class: "muted" }, "none yet");
  return el("div", {}, samples.map((s) => el("div", { class: "sample" },
    el("pre", {}, s.prompt), el("dl", { class: "kv" }, el("dt", {}, "expected"), el("dd", {}, s.expected ?? ""),
                                 el("dt", {}, "base"), el("dd", {}, s.output ?? "")))));
}

function actions(run) {
  const box = document.getElementById("actions");
  box.replaceChildren();
  if (!isAdmin) return;
  if (LIVE.has(run.status)) {
    box.append(el("button", { class: "danger", id: "stop", onclick: () => act("stop") }, "Stop"));
  }
  if (run.resumable && !LIVE.has(run.status)) {
    box.append(el("button", { class: "primary", id: "resume", onclick: () => act("resume") }, "Resume"));
  }
  if (run.config) {
    box.append(el("a", { href: "/ui/launch?source=" + encodeURIComponent("run:" + run.name) }, "launch from this config"));
  }
}

async function act(what) {
  try {
    await api("/ui/api/launch/" + what, { method: "POST", body: { name: runName } });
    await loadRun();
  } catch (err) {
    showError(err);
  }
}

function facts(run) {
  const items = [["directory", run.path], ["model", run.model], ["started", run.started_at], ["updated", run.updated_at]];
  if (run.parent_name) items.push(["parent", runLink(run.parent_name)]);
  if (run.metrics && run.metrics.reference) items.push(["reference", run.metrics.reference]);
  const gate = run.retrain_decision && run.retrain_decision.decision;
  if (gate) items.push(["gate", `${gate.promote ? "promoted" : "refused"}: ${gate.reason}` +
                                (run.retrain_decision.alias ? ` (alias ${run.retrain_decision.alias})` : "")]);
  if (run.error) items.push(["error", run.error]);
  if (run.metrics && run.metrics.training_length) items.push(["training length", run.metrics.training_length.line]);
  if (run.process) items.push(["process", `pid ${run.process.pid}` +
                                           (run.process.exit_code === null ? ", running" : `, exit ${run.process.exit_code}`)]);
  document.getElementById("facts").replaceChildren(...items.filter(([, v]) => v).flatMap(([k, v]) =>
    [el("dt", {}, k), el("dd", {}, v)]));
}

async function loadRun() {
  const run = await api("/ui/api/run?name=" + encodeURIComponent(runName));
  document.title = run.name + " · tunesmith";
  document.getElementById("title").textContent = run.name;
  document.getElementById("status").replaceChildren(statusBadge(run.status));
  document.getElementById("what").textContent = [run.method, run.objective].filter((x) => x && x !== "?").join(" · ");
  facts(run);
  actions(run);
  document.getElementById("metrics").replaceChildren(metricsTable(run.metrics));
  const classes = classesView(run.metrics);
  document.getElementById("classes-card").hidden = !classes;
  document.getElementById("classes").replaceChildren(...(classes ? [classes] : []));
  document.getElementById("report").replaceChildren(run.report
    ? renderMarkdown(run.report, { image: () => null }) : el("p", { class: "muted" }, "when the run finishes"));
  document.getElementById("data-stats").replaceChildren(statsView(run.data_stats));
  document.getElementById("samples").replaceChildren(samplesView(run.base_eval));
  document.getElementById("config").textContent = run.config_text || "";
  document.getElementById("log-card").hidden = !run.log;
  document.getElementById("log").textContent = run.log || "";
  lastStatus = run.status;
  showError(null);
}

async function poll() {
  try {
    const data = await api(`/ui/api/run/metrics?name=${encodeURIComponent(runName)}&after=${nextLine}`);
    if (data.records.length) {
      records = records.concat(data.records);
      drawCurve();
    }
    nextLine = data.next;
    if (data.status !== lastStatus || LIVE.has(data.status)) await loadRun();
  } catch (err) {
    showError(err);
  }
  setTimeout(poll, LIVE.has(lastStatus) ? 1500 : 10000);
}

async function refresh() {
  try {
    isAdmin = (await api("/ui/api/whoami")).role === "admin";
  } catch (_) {
    isAdmin = false;
  }
  try {
    await loadRun();
  } catch (err) {
    showError(err);
  }
}

navBar("Runs");
window.addEventListener("tunesmith-key", refresh);
refresh().then(() => { drawCurve(); poll(); });
