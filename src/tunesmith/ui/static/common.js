// Shared by every page of tunesmith ui: the API helper, the navigation bar with its key box,
// line charts as inline SVG, and small rendering helpers. No framework, no external assets.
"use strict";

const KEY_STORAGE = "tunesmith-key";

// GET or POST a JSON API route; throws Error(the server's message) on a non-2xx answer.
async function api(path, { method = "GET", body = undefined } = {}) {
  const headers = {};
  const key = localStorage.getItem(KEY_STORAGE);
  if (key) headers["Authorization"] = "Bearer " + key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = { raw: text }; }
  if (!response.ok) {
    const message = (data && data.error && data.error.message) || response.statusText;
    const err = new Error(message);
    err.status = response.status;
    err.data = data;
    throw err;
  }
  return data;
}

// Create an element: el("a", {href: "/x", class: "c"}, "text", child, ...).
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const PAGES = [["Runs", "/ui/"], ["Launch", "/ui/launch"], ["Compare", "/ui/compare"],
               ["Chat", "/ui/chat"], ["Rate", "/ui/rate"]];

// The navigation bar, with the API key box, into <nav id="nav">.
function navBar(active) {
  const nav = document.getElementById("nav");
  nav.replaceChildren(
    el("span", { class: "brand" }, "tunesmith"),
    el("ul", {}, PAGES.map(([name, href]) =>
      el("li", {}, el("a", { href, class: name === active ? "active" : null }, name)))),
    keyBox(),
  );
}

// Enter an API key once; it is kept in this browser's localStorage and sent with every request.
function keyBox() {
  const box = el("form", { class: "keybox", id: "keybox" });
  const input = el("input", { type: "password", id: "api-key", placeholder: "API key", autocomplete: "off",
                              "aria-label": "API key" });
  const who = el("span", { class: "who", id: "who" });
  const render = () => {
    const key = localStorage.getItem(KEY_STORAGE);
    input.value = "";
    input.placeholder = key ? "key set (enter to change)" : "API key";
    api("/ui/api/whoami").then(
      (me) => { who.textContent = me.role + (me.key_id === "local" ? "" : " " + me.key_id); who.className = "who"; },
      (err) => { who.textContent = err.status === 401 ? "no key" : ""; who.className = "who bad"; });
  };
  box.append(input, el("button", { type: "submit" }, "Use key"),
             el("button", { type: "button", onclick: () => { localStorage.removeItem(KEY_STORAGE); render(); } },
                "Forget"), who);
  box.addEventListener("submit", (event) => {
    event.preventDefault();
    if (input.value.trim()) localStorage.setItem(KEY_STORAGE, input.value.trim());
    render();
    window.dispatchEvent(new Event("tunesmith-key"));
  });
  render();
  return box;
}

// Show an error (or clear it with null) in the page's message area.
function showError(err, where = "error") {
  const box = document.getElementById(where);
  if (!box) return;
  box.textContent = err ? (err.message || String(err)) : "";
  box.hidden = !err;
}

const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0a7f8f", "#57606a"];

function svgEl(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== null) node.textContent = text;
  return node;
}

function niceTicks(lo, hi, count = 5) {
  if (hi === lo) { hi = lo + 1; }
  const raw = (hi - lo) / count;
  const step = Math.pow(10, Math.floor(Math.log10(raw)));
  const unit = [1, 2, 5, 10].map((m) => m * step).find((s) => s >= raw) || step * 10;
  const ticks = [];
  for (let t = Math.ceil(lo / unit) * unit; t <= hi + unit * 1e-9; t += unit) ticks.push(+t.toPrecision(12));
  return ticks;
}

// Draw line series into an <svg>: series = [{name, points: [[x, y], ...]}]. Axes, ticks and a legend.
function lineChart(svg, series, { xLabel = "step", yLabel = "" } = {}) {
  const width = 640, height = 300, left = 56, right = 12, top = 12, bottom = 44;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "xMidYMid meet");
  svg.classList.add("chart");
  svg.replaceChildren();
  const drawn = series.filter((s) => s.points.length > 0);
  const all = drawn.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  if (all.length === 0) {
    svg.append(svgEl("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" },
                     "no points yet"));
    return;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05;
  y0 -= pad; y1 += pad;
  const sx = (x) => left + (x - x0) / (x1 - x0) * (width - left - right);
  const sy = (y) => top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom);
  const axes = svgEl("g", { class: "axes" });
  for (const t of niceTicks(y0, y1)) {
    axes.append(svgEl("line", { x1: left, x2: width - right, y1: sy(t), y2: sy(t), class: "grid" }));
    axes.append(svgEl("text", { x: left - 6, y: sy(t) + 4, "text-anchor": "end" }, +t.toPrecision(4)));
  }
  for (const t of niceTicks(x0, x1, 6)) {
    axes.append(svgEl("text", { x: sx(t), y: height - bottom + 16, "text-anchor": "middle" }, +t.toPrecision(6)));
  }
  axes.append(svgEl("line", { x1: left, x2: width - right, y1: height - bottom, y2: height - bottom, class: "axis" }));
  axes.append(svgEl("line", { x1: left, x2: left, y1: top, y2: height - bottom, class: "axis" }));
  axes.append(svgEl("text", { x: (left + width - right) / 2, y: height - 6, "text-anchor": "middle" }, xLabel));
  if (yLabel) axes.append(svgEl("text", { x: 12, y: top + 4, "text-anchor": "start" }, yLabel));
  svg.append(axes);
  drawn.forEach((s, i) => {
    const color = s.color || COLORS[i % COLORS.length];
    const points = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    const d = points.map(([x, y], j) => `${j ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
    svg.append(svgEl("path", { d, fill: "none", stroke: color, "stroke-width": 2, class: "series",
                               "data-name": s.name, "data-points": points.length }));
    if (points.length === 1) {
      svg.append(svgEl("circle", { cx: sx(points[0][0]), cy: sy(points[0][1]), r: 3, fill: color }));
    }
    svg.append(svgEl("text", { x: width - right - 4, y: top + 14 + 16 * i, "text-anchor": "end",
                               style: `fill: ${color}`, class: "legend" }, s.name));
  });
}

// A number for a table cell: 4 significant decimals, thousands for big ones, "" for none.
function fmt(value) {
  if (value === undefined || value === null || value === "") return "";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en");
  return Math.abs(value) >= 1000 ? Math.round(value).toLocaleString("en") : value.toFixed(4);
}

function statusBadge(status) {
  return el("span", { class: "status status-" + status }, status);
}

function runLink(name) {
  return el("a", { href: "/ui/run?name=" + encodeURIComponent(name) }, name);
}

// A small, safe Markdown subset for reports (text goes in as text nodes, never as HTML): headings,
// paragraphs, lists, tables, code, bold, images (``image(src)`` gives the URL, or null to leave one out).
function renderMarkdown(text, { image = (src) => src } = {}) {
  const root = el("div", { class: "markdown" });
  const inline = (line) => {
    const span = el("span");
    const pattern = /(`[^`]+`|\*\*[^*]+\*\*|!\[[^\]]*\]\([^)]+\))/g;
    let last = 0;
    for (const m of line.matchAll(pattern)) {
      span.append(line.slice(last, m.index));
      const token = m[0];
      if (token.startsWith("`")) span.append(el("code", {}, token.slice(1, -1)));
      else if (token.startsWith("**")) span.append(el("strong", {}, token.slice(2, -2)));
      else {
        const [, alt, src] = token.match(/!\[([^\]]*)\]\(([^)]+)\)/);
        const shown = image(src);  // null: leave the image out
        if (shown) span.append(el("img", { src: shown, alt }));
      }
      last = m.index + token.length;
    }
    span.append(line.slice(last));
    return span;
  };
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (line.startsWith("```")) {
      const body = [];
      for (i++; i < lines.length && !lines[i].startsWith("```"); i++) body.push(lines[i]);
      root.append(el("pre", {}, body.join("\n")));
    } else if (/^#{1,6} /.test(line)) {
      const level = line.match(/^#+/)[0].length;
      root.append(el("h" + Math.min(level + 1, 6), {}, inline(line.slice(level + 1))));
    } else if (line.startsWith("|")) {
      const rows = [];
      for (; i < lines.length && lines[i].startsWith("|"); i++) rows.push(lines[i]);
      i--;
      const cells = (row) => row.replace(/^\||\|$/g, "").split("|").map((c) => c.trim());
      const table = el("table", {});
      rows.forEach((row, j) => {
        if (/^\|[\s:|-]+\|$/.test(row)) return;
        table.append(el("tr", {}, cells(row).map((c) => el(j === 0 ? "th" : "td", {}, inline(c)))));
      });
      root.append(el("div", { class: "table-wrap" }, table));
    } else if (/^[-*] /.test(line)) {
      const list = el("ul");
      for (; i < lines.length && /^[-*] /.test(lines[i]); i++) list.append(el("li", {}, inline(lines[i].slice(2))));
      i--;
      root.append(list);
    } else if (line.trim()) {
      root.append(el("p", {}, inline(line)));
    }
  }
  return root;
}
