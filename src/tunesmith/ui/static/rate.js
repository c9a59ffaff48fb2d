// Rate: the server issues the next item (a prompt this rater has not rated, answered by the chosen
// models, shown as A and B in an order the server picks); a choice (or a 1-5 score) names the item, and
// the server answers with the models behind A and B.
"use strict";

const state = {
  askName: false,
  item: null,  // {id, index, prompt, recorded}
};

const $ = (id) => document.getElementById(id);

function mode() {
  return $("mode").value;
}

function models() {
  return mode() === "pair" ? [$("model-a").value, $("model-b").value] : [$("model-a").value];
}

function rater() {
  return state.askName ? $("rater").value.trim() : "";
}

function query() {
  const params = new URLSearchParams({mode: mode(), rater: rater()});
  models().forEach((m) => params.append("models", m));
  return params.toString();
}

function option(model) {
  const node = document.createElement("option");
  node.value = model.id;
  node.textContent = model.base ? model.id : `${model.id} (base)`;
  return node;
}

async function loadModels() {
  const list = (await api("/v1/models")).data;
  $("model-a").replaceChildren(...list.map(option));
  $("model-b").replaceChildren(...list.map(option));
  // Default: the first adapter against the base model.
  const adapter = list.find((m) => m.base);
  if (adapter) $("model-a").value = adapter.id;
  $("model-b").value = list[0].id;
}

function setMode() {
  const pair = mode() === "pair";
  $("model-b-label").hidden = !pair;
  $("pane-b").hidden = !pair;
  $("answers").classList.toggle("two", pair);
  $("pair-buttons").hidden = !pair;
  $("score-buttons").hidden = pair;
  $("item").hidden = true;
  $("done").hidden = true;
  state.item = null;
}

function enableVerdicts(on) {
  document.querySelectorAll("#pair-buttons [data-choice], #score-buttons [data-score]")
    .forEach((b) => { b.disabled = !on; });
}

// Ask for the item after prompt `after` that this rater has not rated: the server has the models answer.
async function next(after) {
  showError(null, "rate-error");
  enableVerdicts(false);
  for (const side of ["a", "b"]) {
    $(`answer-${side}`).textContent = "…";
    $(`name-${side}`).textContent = "";
  }
  $("status").textContent = "the models are answering…";
  state.item = null;
  const found = await api("/ui/api/rate/item", {method: "POST", body: {
    models: models(), mode: mode(), after, rater: rater(),
    max_tokens: Number($("max-tokens").value) || undefined,
  }});
  showProgress(found.progress);
  if (found.index === null) {
    $("item").hidden = true;
    $("done").hidden = false;
    $("done").textContent = `Every prompt is rated with ${models().join(" and ")}: export, or pick other models.`;
    state.item = null;
    return;
  }
  $("done").hidden = true;
  $("item").hidden = false;
  $("prompt-number").textContent = `${found.index + 1} of ${found.progress.total}`;
  $("prompt").textContent = found.prompt;
  $("comment").value = "";
  found.answers.forEach((answer, i) => { $(`answer-${"ab"[i]}`).textContent = answer || "(empty answer)"; });
  state.item = {id: found.item, index: found.index, prompt: found.prompt, recorded: false};
  $("status").textContent = mode() === "pair" ? "which answer is better?" : "how good is this answer?";
  enableVerdicts(true);
}

function reveal(models) {
  Object.entries(models).forEach(([side, model]) => { $(`name-${side.toLowerCase()}`).textContent = `(${model})`; });
}

async function record(verdict) {
  const item = state.item;
  if (!item || item.recorded) return;
  item.recorded = true;
  enableVerdicts(false);
  const common = {item: item.id, comment: $("comment").value, rater: rater()};
  try {
    let reply;
    if (mode() === "pair") {
      reply = await api("/ui/api/rate/choice", {method: "POST", body: {...common, choice: verdict}});
      const said = {first: "A better", second: "B better", tie: "a tie"}[verdict];
      $("status").textContent = `recorded: ${said}. Press n for the next prompt.`;
    } else {
      reply = await api("/ui/api/rate/score", {method: "POST", body: {...common, score: verdict}});
      $("status").textContent = `recorded: ${verdict} of 5. Press n for the next prompt.`;
    }
    reveal(reply.models);
    await refresh();
  } catch (err) {
    item.recorded = false;
    enableVerdicts(true);
    showError(err, "rate-error");
  }
}

function percent(x) {
  return x === null || x === undefined ? "" : `${Math.round(x * 100)}%`;
}

function fixed(x) {
  return x === null || x === undefined ? "" : x.toFixed(2);
}

function showProgress(p) {
  $("progress").textContent = `${p.rater}: ${p.rated_by_rater} of ${p.total} prompts rated with these models · ` +
    `everyone: ${p.rated_by_anyone} of ${p.total} (${p.raters} rater${p.raters === 1 ? "" : "s"})`;
}

function showAgreement(a) {
  const box = $("agreement");
  if (!a.pairs.length) {
    box.textContent = "No item has been rated by two raters yet.";
    return;
  }
  const table = document.createElement("table");
  table.innerHTML = "<thead><tr><th>raters</th><th>items</th><th>agreement</th><th>Cohen's kappa</th></tr></thead>";
  const body = document.createElement("tbody");
  const row = (cells) => {
    const tr = document.createElement("tr");
    cells.forEach((c) => { const td = document.createElement("td"); td.textContent = c; tr.append(td); });
    body.append(tr);
  };
  a.pairs.forEach((p) => row([p.raters.join(" & "), p.items, percent(p.agreement), fixed(p.kappa)]));
  row(["all pairs (pooled; mean kappa)", a.items, percent(a.agreement), fixed(a.kappa)]);
  table.append(body);
  box.replaceChildren(table);
}

async function refresh() {
  const found = await api(`/ui/api/rate/progress?${query()}`);
  showProgress(found.progress);
  showAgreement(found.agreement);
}

async function exportPairs() {
  const key = localStorage.getItem(KEY_STORAGE);
  const response = await fetch("/ui/api/rate/export", {headers: key ? {Authorization: `Bearer ${key}`} : {}});
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    showError(new Error((body.error && body.error.message) || `HTTP ${response.status}`), "rate-error");
    return;
  }
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = "preference_pairs.jsonl";
  document.body.append(link);
  link.click();
  link.remove();
  $("export-status").textContent = `${response.headers.get("X-Rows")} preference pairs exported`;
}

function guarded(fn) {
  return (...args) => fn(...args).catch((err) => showError(err, "rate-error"));
}

function onKey(event) {
  if (event.target.closest("input, textarea, select") || event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key.toLowerCase();
  if (key === "n" && state.item) {
    guarded(next)(state.item.index);
  } else if (mode() === "pair" && {"1": "first", "2": "second", t: "tie"}[key]) {
    guarded(record)({"1": "first", "2": "second", t: "tie"}[key]);
  } else if (mode() === "score" && /^[1-5]$/.test(key)) {
    guarded(record)(Number(key));
  }
}

async function start() {
  if (state.askName) localStorage.setItem("tunesmith-rater", rater());
  await next(-1);
  await refresh();
}

// Who rates and what with: asked again when the API key changes.
async function init() {
  showError(null, "rate-error");
  const session = await api("/ui/api/rate/session");
  state.askName = session.ask_name;
  $("rater-label").hidden = !session.ask_name;
  await loadModels();
  $("progress").textContent = session.prompts
    ? `${session.prompts} prompts (from the ${session.source}); press Start.`
    : "No prompts to rate: start tunesmith ui with --prompts FILE.";
  setMode();
}

function main() {
  navBar("Rate");
  $("rater").value = localStorage.getItem("tunesmith-rater") || "";
  $("mode").addEventListener("change", setMode);
  $("start").addEventListener("click", guarded(start));
  document.querySelectorAll("[data-choice]").forEach((b) =>
    b.addEventListener("click", () => guarded(record)(b.dataset.choice)));
  document.querySelectorAll("[data-score]").forEach((b) =>
    b.addEventListener("click", () => guarded(record)(Number(b.dataset.score))));
  for (const id of ["next", "next-score"]) {
    $(id).addEventListener("click", () => state.item && guarded(next)(state.item.index));
  }
  $("export").addEventListener("click", guarded(exportPairs));
  document.addEventListener("keydown", onKey);
  window.addEventListener("tunesmith-key", guarded(init));
  guarded(init)();
}

main();
