// Chat: one or two models, each with its own conversation, answers streamed from /v1/chat/completions
// (server-sent events, read with fetch and a ReadableStream) and the token usage shown under each.
"use strict";

const panes = [];  // {model, history: [{role, content}], el}

async function loadModels() {
  const models = (await api("/v1/models")).data;
  for (const id of ["model-a", "model-b"]) {
    const select = document.getElementById(id);
    select.replaceChildren(...models.map((m) => el("option", {value: m.id},
      m.base ? m.id : `${m.id} (base)`)));
  }
  // Default: the first adapter beside the base model, if there is one.
  const adapters = models.filter((m) => m.base);
  if (adapters.length) document.getElementById("model-a").value = adapters[0].id;
  document.getElementById("model-b").value = models[0].id;
}

function resetPanes() {
  const two = document.getElementById("two").checked;
  document.getElementById("model-b").disabled = !two;
  const chosen = [document.getElementById("model-a").value];
  if (two) chosen.push(document.getElementById("model-b").value);
  const box = document.getElementById("panes");
  box.replaceChildren();
  panes.length = 0;
  chosen.forEach((model, i) => {
    const log = el("div", {class: "log", "data-testid": `log-${i}`});
    const pane = el("section", {class: "pane card", "data-model": model}, el("h2", {}, model), log);
    box.append(pane);
    panes.push({model, history: [], el: log});
  });
  box.classList.toggle("two", two);
}

function bubble(log, role, text) {
  const node = el("div", {class: `msg ${role}`}, el("div", {class: "text"}, text));
  log.append(node);
  return node;
}

// POST with stream=true and hand each text delta to onText; returns the usage chunk's counts.
async function streamChat(model, messages, onText) {
  const key = localStorage.getItem(KEY_STORAGE);
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: {"Content-Type": "application/json", ...(key ? {Authorization: `Bearer ${key}`} : {})},
    body: JSON.stringify({
      model, messages, stream: true, stream_options: {include_usage: true},
      max_tokens: Number(document.getElementById("max-tokens").value) || undefined,
      temperature: Number(document.getElementById("temperature").value),
    }),
  });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error((body.error && body.error.message) || `HTTP ${response.status}`);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", usage = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return usage;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) onText(delta.content);
      }
    }
  }
  return usage;
}

async function answer(pane) {
  const node = bubble(pane.el, "assistant", "");
  node.classList.add("streaming");
  const text = node.querySelector(".text");
  let answerText = "";
  try {
    const usage = await streamChat(pane.model, pane.history, (piece) => {
      answerText += piece;
      text.textContent = answerText;
    });
    pane.history.push({role: "assistant", content: answerText});
    if (usage) {
      node.append(el("div", {class: "usage muted"},
        `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion = ${usage.total_tokens} tokens`));
    }
  } catch (err) {
    pane.history.pop();  // the user turn that got no answer
    node.classList.add("error");
    text.textContent = err.message;
  } finally {
    node.classList.remove("streaming");
  }
}

async function send(event) {
  event.preventDefault();
  const box = document.getElementById("message");
  const button = document.getElementById("send");
  const message = box.value.trim();
  if (!message || button.disabled) return;  // one message at a time: the answers come in order
  box.value = "";
  showError(null, "chat-error");
  button.disabled = true;
  try {
    await Promise.all(panes.map((pane) => {
      pane.history.push({role: "user", content: message});
      bubble(pane.el, "user", message);
      return answer(pane);
    }));
  } finally {
    button.disabled = false;
    box.focus();
  }
}

async function init() {
  showError(null, "chat-error");
  try {
    await loadModels();
  } catch (err) {
    showError(new Error(`could not list the models: ${err.message}`), "chat-error");
  }
  resetPanes();
}

function main() {
  navBar("Chat");
  for (const id of ["model-a", "model-b", "two"]) document.getElementById(id).addEventListener("change", resetPanes);
  document.getElementById("clear").addEventListener("click", resetPanes);
  document.getElementById("send-form").addEventListener("submit", send);
  document.getElementById("message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) send(e);
  });
  window.addEventListener("tunesmith-key", init);
  init();
}

main();
