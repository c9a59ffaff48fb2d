// The launch form: a command, a config to start from, edits to its fields. The server checks the
// launch with the CLI's own loader; its messages appear beside the edit they are about.
"use strict";

let sourceFields = {};

function editRow(text = "") {
  const [path, ...rest] = text.split("=");
  const row = el("div", { class: "edit" },
    el("input", { class: "edit-path", list: "field-paths", placeholder: "train.lr", value: path.trim(),
                  "aria-label": "field path", autocomplete: "off" }),
    el("span", {}, "="),
    el("input", { class: "edit-value", placeholder: "value", value: rest.join("=").trim(),
                  "aria-label": "value", autocomplete: "off" }),
    el("button", { type: "button", title: "remove this edit", onclick: () => row.remove() }, "✕"),
    el("span", { class: "field-error", hidden: true }));
  // The field's value in the config, as the value box's placeholder.
  row.querySelector(".edit-path").addEventListener("input", (event) => {
    const known = sourceFields[event.target.value.trim()];
    row.querySelector(".edit-value").placeholder = known === undefined ? "value"
      : "now: " + (typeof known === "object" ? JSON.stringify(known) : known);
  });
  document.getElementById("edits").append(row);
  return row;
}

function edits() {
  return [...document.querySelectorAll("#edits .edit")].map((row) => {
    const path = row.querySelector(".edit-path").value.trim();
    const value = row.querySelector(".edit-value").value.trim();
    return path || value ? `${path} = ${value}` : "";
  });
}

function clearErrors() {
  for (const box of document.querySelectorAll(".field-error")) { box.textContent = ""; box.hidden = true; }
  showError(null, "general-errors");
  showError(null);
}

function showProblems(problems) {
  const rows = [...document.querySelectorAll("#edits .edit")].filter((row) => {
    const path = row.querySelector(".edit-path").value.trim();
    return path || row.querySelector(".edit-value").value.trim();
  });
  const general = [];
  for (const problem of problems) {
    let box = null;
    if (problem.field === "name") box = document.getElementById("name-error");
    else if (Number.isInteger(problem.field) && rows[problem.field]) box = rows[problem.field].querySelector(".field-error");
    if (box) {
      box.textContent = box.textContent ? box.textContent + "\n" + problem.message : problem.message;
      box.hidden = false;
    } else {
      general.push(problem.message);
    }
  }
  if (general.length) showError(new Error(general.join("\n")), "general-errors");
}

async function loadSources() {
  const command = document.getElementById("command").value;
  const select = document.getElementById("source");
  const data = await api("/ui/api/launch/sources");
  const options = [];
  if (command !== "retrain") {
    options.push(el("optgroup", { label: "examples" }, data.examples.map((name) => el("option", { value: name }, name))));
  }
  options.push(el("optgroup", { label: command === "retrain" ? "runs to re-train" : "a run's config" },
                  data.runs.map((name) => el("option", { value: "run:" + name }, name))));
  select.replaceChildren(...options);
  document.getElementById("source-label").textContent = command === "retrain" ? "run" : "config";
  document.getElementById("trials-field").hidden = command !== "search";
  const wanted = new URLSearchParams(location.search).get("source");
  if (wanted && [...select.options].some((o) => o.value === wanted)) select.value = wanted;
  await showSource();
}

async function showSource() {
  const source = document.getElementById("source").value;
  if (!source) return;
  const data = await api("/ui/api/launch/source?source=" + encodeURIComponent(source));
  sourceFields = data.fields;
  document.getElementById("source-path").textContent = data.path;
  document.getElementById("source-text").textContent = data.text;
  document.getElementById("field-paths").replaceChildren(
    ...Object.keys(data.fields).map((path) => el("option", { value: path })));
}

async function launch(event) {
  event.preventDefault();
  clearErrors();
  const button = document.getElementById("launch");
  button.disabled = true;
  try {
    const result = await api("/ui/api/launch", { method: "POST", body: {
      command: document.getElementById("command").value,
      source: document.getElementById("source").value,
      name: document.getElementById("name").value.trim(),
      edits: edits(),
      trials: Number(document.getElementById("trials").value || 1),
    } });
    const done = document.getElementById("launched");
    done.replaceChildren("started ", el("code", {}, result.command), " (pid " + result.pid + "): ",
                         runLink(result.name));
    done.hidden = false;
  } catch (err) {
    if (err.data && err.data.error && err.data.error.problems) showProblems(err.data.error.problems);
    else showError(err, "general-errors");
  } finally {
    button.disabled = !isAdmin;
  }
}

let isAdmin = false;

async function checkRole() {
  const note = document.getElementById("role-note");
  const button = document.getElementById("launch");
  try {
    const me = await api("/ui/api/whoami");
    isAdmin = me.role === "admin";
    note.textContent = isAdmin ? "" : `Your key (${me.key_id}) is a rater key: launching, stopping and resuming ` +
      "runs need an admin key.";
  } catch (err) {
    isAdmin = false;
    note.textContent = err.message + ": enter an admin key above to launch runs.";
  }
  note.hidden = isAdmin;
  button.disabled = !isAdmin;
  if (isAdmin) await loadSources().catch(showError);
}

navBar("Launch");
document.getElementById("add-edit").addEventListener("click", () => editRow().querySelector("input").focus());
document.getElementById("command").addEventListener("change", () => loadSources().catch(showError));
document.getElementById("source").addEventListener("change", () => showSource().catch(showError));
document.getElementById("launch-form").addEventListener("submit", launch);
window.addEventListener("tunesmith-key", checkRole);
const initial = new URLSearchParams(location.search);
if (initial.get("command")) document.getElementById("command").value = initial.get("command");
editRow();
checkRole();
