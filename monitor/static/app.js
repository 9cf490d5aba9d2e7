// The fleet dashboard: one card per model, live through EventSource (/api/events).
// Every string that came over the wire is put into the page as text (textContent / attributes),
// never as HTML: a model may name itself "<script>" and it must show as just that.
"use strict";

const CAPS = ["text-generation", "embeddings", "tool-calling", "reasoning", "grammar-constrained"];
const services = new Map(); // model_name -> entry from the monitor
const cards = new Map(); // model_name -> card element
let clockOffset = 0; // monitor clock minus browser clock, in seconds

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) el.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

const now = () => Date.now() / 1000 + clockOffset;

function duration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

const ago = (t) => (t ? `${duration(now() - t)} ago` : "never");
const num = (x, digits = 2) => (typeof x === "number" ? x.toFixed(digits).replace(/\.?0+$/, "") : "–");

function params(info) {
  if (typeof info.parameter_count === "string") return info.parameter_count;
  const n = Number(info.parameters || info.parameter_count);
  if (!n) return null;
  return n >= 1e9 ? `${(n / 1e9).toFixed(1)}B` : `${Math.round(n / 1e6)}M`;
}

function sparkline(values, label, current) {
  const w = 150, hgt = 34;
  const box = h("div", { class: "spark" });
  box.append(h("div", { class: "spark-label" }, label, h("b", {}, num(current))));
  const pic = svg("svg", { viewBox: `0 0 ${w} ${hgt}`, preserveAspectRatio: "none", class: "spark-svg" });
  if (values.length > 1) {
    const max = Math.max(...values, 1e-9);
    const pts = values.map((v, i) => `${(i / (values.length - 1)) * w},${hgt - 2 - (v / max) * (hgt - 4)}`);
    pic.append(svg("polygon", { points: `0,${hgt} ${pts.join(" ")} ${w},${hgt}`, class: "spark-area" }));
    pic.append(svg("polyline", { points: pts.join(" "), class: "spark-line" }));
  }
  box.append(pic);
  return box;
}

function queueBar(s) {
  const q = s.queue_metrics, level = s.backpressure_status.level;
  const cap = q.queue_capacity || 0, pending = q.pending_messages || 0;
  const fill = h("span", { class: `fill level-${level}` });
  fill.style.width = `${cap ? Math.min(100, (pending / cap) * 100) : 0}%`;
  if (pending > 0) fill.style.minWidth = "3px";
  return h("div", { class: "queue" },
    h("div", { class: "row" }, h("span", { class: "k" }, "queue"),
      h("span", { class: "queue-count" }, `${pending} / ${cap}`),
      h("span", { class: `chip level-${level}` }, level),
      h("span", { class: "muted" }, `${q.active_processing} running`)),
    h("div", { class: "bar", "data-pending": pending, "data-capacity": cap,
      title: `${pending} pending of ${cap} (${num(s.backpressure_status.utilization * 100, 1)}%)` }, fill));
}

function capabilityMatrix(caps) {
  const all = CAPS.concat(caps.filter((c) => !CAPS.includes(c)));
  return h("div", { class: "caps" }, all.map((c) => {
    const on = caps.includes(c);
    return h("span", { class: on ? "cap on" : "cap", title: on ? `${c}: yes` : `${c}: no` }, on ? "✓ " : "· ", c);
  }));
}

// An instance's slots (busy/total, +waiting) and, from the batched engine, how full its KV cache is: reserved by
// running requests (solid) and kept from finished ones for prefix reuse (pale: given up when room is needed).
function slotUsage(u) {
  if (!u) return h("span", { class: "slots", title: "not reported (older worker, or model loading)" }, "slots –");
  const kv = typeof u.kv_used === "number", pct = `${Math.round((u.kv_used || 0) * 100)}%`;
  const part = (cls, x) => {
    const el = h("span", { class: cls });
    el.style.width = `${Math.min(100, Math.max(0, ((x || 0) / u.kv_tokens) * 100))}%`;
    if (x > 0) el.style.minWidth = "2px"; // a few tokens still show
    return el;
  };
  const title = [`${u.busy} of ${u.slots} slots busy`, u.waiting ? `${u.waiting} waiting for a slot or KV room` : null,
    kv ? `KV cache ${pct}: ${u.kv_reserved} tokens reserved + ${u.kv_kept} kept of ${u.kv_tokens}` : null];
  return h("span", { class: "slots", title: title.filter(Boolean).join(" · "), "data-busy": u.busy,
    "data-slots": u.slots, "data-kv": kv ? u.kv_used : null },
    h("b", {}, `${u.busy}/${u.slots}`), " slots",
    u.waiting ? h("span", { class: "level-warning" }, ` +${u.waiting} waiting`) : null,
    kv ? [" · ", h("span", { class: "kv-bar" }, part("kv-reserved", u.kv_reserved), part("kv-kept", u.kv_kept)),
      `KV ${pct}`] : null);
}

function instanceRow(i) {
  return h("li", { class: `inst st-${i.status}` },
    h("span", { class: "dot" }),
    h("span", { class: "wid", title: i.worker_id }, i.worker_id),
    h("span", { class: "ist" }, i.status),
    h("span", { class: "muted" }, `seen ${ago(i.last_seen)}`),
    h("span", { class: "muted" }, `up ${duration(i.uptime)}`),
    slotUsage(i.slots)); // a line of its own under the worker id: the first line has no room left
}

// A worker's recent warnings (stream recreated, a request that crashed workers): newest last, the last three.
function alerts(list) {
  if (!list || !list.length) return null;
  return h("ul", { class: "alerts" }, list.slice(-3).map((a) =>
    h("li", { class: `alert level-${a.level}`, "data-kind": a.kind, title: a.message },
      h("span", { class: "alert-kind" }, `⚠ ${a.kind}`),
      h("span", { class: "muted" }, `${a.worker_id} · ${ago(a.ts)}`),
      h("span", { class: "alert-msg" }, a.message))));
}

function card(s) {
  const info = s.model_info || {};
  const facts = [s.kind, info.architecture, params(info), info.quantization,
    info.context_size ? `ctx ${info.context_size}` : null,
    s.kind === "embedding" && info.embedding_size ? `dim ${info.embedding_size}` : null].filter(Boolean);
  const hist = s.history || { queue_depth: [], requests_per_s: [] };
  return [
    h("div", { class: "card-head" },
      h("h2", { class: "name", title: s.model_name }, s.model_name),
      h("span", { class: `pill st-${s.status}` }, s.status)),
    h("div", { class: "facts" }, facts.join(" · ")),
    alerts(s.alerts),
    capabilityMatrix(s.capabilities || []),
    queueBar(s),
    h("div", { class: "sparks" },
      sparkline(hist.requests_per_s, "req/s", s.requests_per_s),
      sparkline(hist.queue_depth, "queue", s.queue_metrics.pending_messages)),
    h("div", { class: "where" },
      h("div", {}, h("span", { class: "k" }, "NATS"), h("code", {}, s.nats_topic || "–")),
      h("div", {}, h("span", { class: "k" }, "HTTP"), h("code", {}, s.endpoint || "–"))),
    h("div", { class: "k inst-head" }, `instances ${s.online_count} / ${s.instance_count} live`),
    h("ul", { class: "insts" }, (s.instances || []).map(instanceRow)),
    h("div", { class: "foot muted" },
      `last seen ${ago(s.last_seen)} · up ${duration(s.uptime)} · processed ${s.queue_metrics.total_processed}` +
      ` · failed ${s.queue_metrics.total_failed}`),
  ];
}

function render() {
  const grid = document.getElementById("grid");
  const names = [...services.keys()].sort();
  for (const [name, el] of cards) {
    if (!services.has(name)) { el.remove(); cards.delete(name); }
  }
  names.forEach((name, idx) => {
    const s = services.get(name);
    let el = cards.get(name);
    if (!el) {
      el = h("section", { class: "card" });
      el.dataset.model = name;
      cards.set(name, el);
    }
    el.className = `card st-${s.status}`;
    el.replaceChildren(...card(s).filter(Boolean)); // replaceChildren would show a null as "null"
    if (grid.children[idx] !== el) grid.insertBefore(el, grid.children[idx] || null);
  });
  document.getElementById("empty").hidden = services.size > 0;
  let inst = 0, live = 0, queued = 0, rps = 0, warned = 0;
  for (const s of services.values()) {
    inst += s.instance_count; live += s.online_count; queued += s.queue_metrics.pending_messages;
    rps += s.requests_per_s || 0; warned += (s.alerts || []).length;
  }
  document.getElementById("summary").replaceChildren(...[
    h("span", {}, h("b", {}, services.size), " models"),
    h("span", {}, h("b", {}, `${live}/${inst}`), " instances live"),
    h("span", {}, h("b", {}, queued), " queued"),
    h("span", {}, h("b", {}, num(rps)), " req/s"),
    warned ? h("span", { class: "level-warning", id: "alert-count" }, h("b", {}, warned), " alerts") : null,
  ].filter(Boolean));
}

function setConn(state, text) {
  const el = document.getElementById("conn");
  el.className = `conn conn-${state}`;
  el.textContent = text;
}

function connect() {
  const es = new EventSource("/api/events");
  const on = (name, fn) => es.addEventListener(name, (ev) => { fn(JSON.parse(ev.data)); render(); });
  on("snapshot", (d) => {
    clockOffset = d.at - Date.now() / 1000;
    services.clear();
    for (const s of d.services) services.set(s.model_name, s);
    setConn(d.nats_connected ? "ok" : "bad", d.nats_connected ? "live" : "NATS unreachable");
  });
  on("service", (s) => services.set(s.model_name, s));
  on("removed", (d) => services.delete(d.model_name));
  on("status", () => {});
  on("nats", (d) => setConn(d.connected ? "ok" : "bad", d.connected ? "live" : "NATS unreachable"));
  es.onerror = () => setConn("wait", "reconnecting…");
}

document.addEventListener("DOMContentLoaded", () => {
  connect();
  setInterval(render, 1000); // keeps "seen 3s ago" honest between events
});
