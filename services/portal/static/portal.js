// cadre portal: the live parts of the pages. No framework, no CDN: EventSource for the streams, SVG for charts.
"use strict";

const csrf = () => (document.querySelector('meta[name="csrf"]') || {}).content || "";
const post = (url) => fetch(url, { method: "POST", headers: { "X-CSRF-Token": csrf() }, credentials: "same-origin" });
const el = (tag, attrs = {}, text = "") => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
};
const SVG = "http://www.w3.org/2000/svg";

// --- charts: one line per series, drawn again as points arrive ------------------------------------------------
function drawChart(box, title, series) {
  const w = 420, h = 180, pad = 34;
  const all = series.flatMap((s) => s.values);
  const lo = Math.min(...all), hi = Math.max(...all);
  const span = hi - lo || 1, n = Math.max(2, ...series.map((s) => s.values.length));
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("class", "chart");
  svg.dataset.metric = title;
  svg.dataset.points = String(series.reduce((a, s) => a + s.values.length, 0));
  const text = (x, y, t, cls) => {
    const node = document.createElementNS(SVG, "text");
    node.setAttribute("x", x); node.setAttribute("y", y); node.setAttribute("class", cls || "");
    node.textContent = t; svg.appendChild(node);
  };
  const axis = document.createElementNS(SVG, "rect");
  axis.setAttribute("x", pad); axis.setAttribute("y", 8); axis.setAttribute("width", w - pad - 8);
  axis.setAttribute("height", h - pad - 8); axis.setAttribute("class", "frame"); svg.appendChild(axis);
  text(4, 16, hi.toPrecision(4), "tick"); text(4, h - pad, lo.toPrecision(4), "tick");
  text(pad, h - 8, title, "title");
  series.forEach((s, i) => {
    const pts = s.values.map((v, j) => {
      const x = pad + (j / (n - 1)) * (w - pad - 8);
      const y = 8 + (1 - (v - lo) / span) * (h - pad - 8);
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", pts.join(" ")); line.setAttribute("class", `line c${i % 6}`);
    svg.appendChild(line);
    if (series.length > 1) text(w - 150, 20 + 12 * i, s.label, `legend c${i % 6}`);
  });
  box.replaceChildren(svg);
}

// --- the run page -------------------------------------------------------------------------------------------
function runPage(main) {
  const run = main.dataset.run;
  const log = document.getElementById("log");
  const search = document.getElementById("search");
  const follow = document.getElementById("follow");
  const rankSelect = document.getElementById("rank");
  const status = document.getElementById("status");
  const lines = []; // [rank, text, node]
  let source = null;

  const matches = (text) => !search.value || text.toLowerCase().includes(search.value.toLowerCase());
  search.addEventListener("input", () => {
    for (const [, text, node] of lines) node.hidden = !matches(text);
  });

  const openLogs = () => {
    if (source) source.close();
    log.replaceChildren(); lines.length = 0;
    source = new EventSource(`/runs/${run}/logs/stream?rank=${encodeURIComponent(rankSelect.value)}`);
    source.addEventListener("lines", (msg) => {
      const batch = JSON.parse(msg.data);
      const frag = document.createDocumentFragment();
      batch.lines.forEach(([t, stream, text], i) => {
        const node = el("span", { class: `line ${stream === "e" ? "err" : ""}`, "data-rank": batch.rank,
          "data-line": batch.first + i, "data-printed": t, "data-shown": Date.now() / 1000 },
          (rankSelect.value === "all" ? `[${batch.rank}] ` : "") + text + "\n");
        node.hidden = !matches(text);
        lines.push([batch.rank, text, node]);
        frag.appendChild(node);
      });
      log.appendChild(frag);
      log.dataset.lines = String(lines.length);
      if (follow.checked) log.scrollTop = log.scrollHeight;
    });
  };
  rankSelect.addEventListener("change", openLogs);
  openLogs();

  // State and metrics.
  const series = new Map(); // name -> values
  const tables = new Map(); // name -> {columns -> values}
  const charts = document.getElementById("charts");
  const tags = document.getElementById("tags");
  const live = new EventSource(`/runs/${run}/live`);
  let redraw = null;
  const scheduleDraw = () => {
    if (redraw) return;
    redraw = requestAnimationFrame(() => {
      redraw = null;
      for (const [name, values] of series) {
        let box = charts.querySelector(`[data-series="${CSS.escape(name)}"]`);
        if (!box) { box = el("div", { class: "chart-box", "data-series": name }); charts.appendChild(box); }
        drawChart(box, name, [{ label: name, values }]);
      }
      const tbox = document.getElementById("tables");
      tbox.replaceChildren();
      for (const [name, cols] of tables) {
        const table = el("table", { class: "metric-table" });
        const names = Object.keys(cols);
        table.appendChild(el("caption", {}, name));
        const head = el("tr"); names.forEach((c) => head.appendChild(el("th", {}, c))); table.appendChild(head);
        const rows = Math.max(...names.map((c) => cols[c].length));
        for (let r = 0; r < rows; r++) {
          const tr = el("tr"); names.forEach((c) => tr.appendChild(el("td", {}, String(cols[c][r] ?? ""))));
          table.appendChild(tr);
        }
        tbox.appendChild(table);
      }
    });
  };
  const timeline = document.querySelector("#timeline tbody");
  let lastState = null;
  live.addEventListener("open", () => { // a reconnect replays everything
    series.clear(); tables.clear(); timeline.replaceChildren(); lastState = null;
  });
  live.addEventListener("state", (msg) => {
    const ev = JSON.parse(msg.data);
    status.textContent = ev.state; status.dataset.state = ev.state;
    if (ev.state !== lastState) {
      lastState = ev.state;
      const tr = el("tr");
      tr.appendChild(el("td", {}, new Date(ev.at * 1000).toLocaleString()));
      const td = el("td"); td.appendChild(el("span", { class: `badge s-${ev.state}` }, ev.state)); tr.appendChild(td);
      tr.appendChild(el("td", {}, ev.kind));
      timeline.appendChild(tr);
    }
    if (["Completed", "Failed", "Canceled"].includes(ev.state)) {
      const button = document.getElementById("cancel");
      if (button) button.remove();
    }
    if (ev.error) {
      let p = document.getElementById("error");
      if (!p) { p = el("p", { class: "error", id: "error" }); status.parentNode.after(p); }
      p.textContent = `${ev.error.code}: ${ev.error.message}`;
    }
  });
  live.addEventListener("metrics", (msg) => {
    const data = JSON.parse(msg.data);
    for (const p of data.metrics) {
      if (p.kind === "scalar" && typeof p.value === "number") {
        if (!series.has(p.name)) series.set(p.name, []);
        series.get(p.name).push(p.value);
      } else if (p.kind === "list") {
        series.set(p.name, p.values.filter((v) => typeof v === "number"));
      } else if (p.kind === "row" || p.kind === "table") {
        const cols = tables.get(p.name) || {};
        const add = p.kind === "row" ? Object.fromEntries(Object.entries(p.row).map(([k, v]) => [k, [v]])) : p.table;
        for (const [k, vs] of Object.entries(add)) cols[k] = (cols[k] || []).concat(vs);
        tables.set(p.name, cols);
      } else if (p.kind === "image" && p.path) {
        const images = document.getElementById("images");
        if (!images.querySelector(`[data-path="${CSS.escape(p.path)}"]`)) {
          const fig = el("figure", { "data-path": p.path });
          fig.appendChild(el("img", { src: `/runs/${run}/files/${p.path}`, alt: p.name }));
          fig.appendChild(el("figcaption", {}, p.name));
          images.appendChild(fig);
        }
      }
    }
    for (const [k, v] of Object.entries({ ...data.tags, ...data.properties })) {
      let dd = tags.querySelector(`[data-key="${CSS.escape(k)}"]`);
      if (!dd) { tags.appendChild(el("dt", {}, k)); dd = el("dd", { "data-key": k }); tags.appendChild(dd); }
      dd.textContent = v;
    }
    scheduleDraw();
  });

  const cancel = document.getElementById("cancel");
  if (cancel) cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    const reply = await post(`/runs/${run}/cancel`);
    const body = await reply.json();
    status.textContent = body.state || body.error; status.dataset.state = body.state || "";
  });
}

// --- the experiment page: overlay a metric of the checked runs ---------------------------------------------
function experimentPage() {
  // Metric columns: each run's last value, read only for the columns asked for, a few runs at a time.
  const cells = [...document.querySelectorAll("span.metric")];
  const byRun = new Map();
  for (const c of cells) { if (!byRun.has(c.dataset.run)) byRun.set(c.dataset.run, []); byRun.get(c.dataset.run).push(c); }
  const queue = [...byRun.keys()];
  const worker = async () => {
    while (queue.length) {
      const run = queue.shift();
      const data = await (await fetch(`/runs/${run}/metrics.json`)).json();
      for (const cell of byRun.get(run)) {
        const values = data.metrics.filter((p) => p.name === cell.dataset.metric && p.value !== null).map((p) => p.value);
        cell.textContent = values.length ? String(values[values.length - 1]) : "-";
      }
    }
  };
  for (let i = 0; i < 6; i++) worker();
  const button = document.getElementById("compare");
  if (!button) return;
  button.addEventListener("click", async () => {
    const metric = document.getElementById("compare-metric").value.trim();
    const ids = [...document.querySelectorAll(".compare:checked")].map((c) => c.value);
    const series = [];
    for (const id of ids) {
      const data = await (await fetch(`/runs/${id}/metrics.json`)).json();
      const values = data.metrics.filter((p) => p.name === metric && typeof p.value === "number").map((p) => p.value);
      if (values.length) series.push({ label: id, values });
    }
    const box = document.getElementById("compare-chart");
    if (series.length) drawChart(box, metric, series);
    else box.textContent = `none of the checked runs logged ${metric}`;
  });
}

// --- the sweep page: the primary metric against the first numeric parameter ---------------------------------
function sweepPage(box) {
  const points = JSON.parse(box.dataset.points), params = JSON.parse(box.dataset.params);
  const name = params.find((p) => points.some((pt) => typeof pt.params[p] === "number"));
  if (!name || !points.length) return;
  const w = 420, h = 200, pad = 34;
  const xs = points.map((p) => p.params[name]), ys = points.map((p) => p.value);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`); svg.setAttribute("class", "chart");
  points.forEach((p) => {
    const c = document.createElementNS(SVG, "circle");
    c.setAttribute("cx", pad + ((p.params[name] - x0) / (x1 - x0 || 1)) * (w - pad - 8));
    c.setAttribute("cy", 8 + (1 - (p.value - y0) / (y1 - y0 || 1)) * (h - pad - 8));
    c.setAttribute("r", 4); c.setAttribute("class", "dot");
    svg.appendChild(c);
  });
  const label = document.createElementNS(SVG, "text");
  label.setAttribute("x", pad); label.setAttribute("y", h - 8); label.textContent = name; label.setAttribute("class", "title");
  svg.appendChild(label);
  box.replaceChildren(svg);
}

document.addEventListener("DOMContentLoaded", () => {
  const logout = document.getElementById("logout");
  if (logout) logout.addEventListener("click", async () => { await post("/logout"); location.href = "/login"; });
  const main = document.querySelector("main");
  if (main && main.dataset.run) runPage(main);
  if (main && main.dataset.experiment) experimentPage();
  const scatter = document.getElementById("scatter");
  if (scatter) sweepPage(scatter);
});
