// The fleet dashboard: one card per model and the Requests table, live through EventSource (/api/events):
// `snapshot` (the fleet and the last requests), `service` (a model changed), `request` (one finished), ...
// Every string that came over the wire is put into the page as text (textContent / attributes),
// never as HTML: a model may name itself "<script>" and it must show as just that.
"use strict";

const CAPS = ["text-generation", "embeddings", "tool-calling", "reasoning", "grammar-constrained"];
const services = new Map(); // model_name -> entry from the monitor
const cards = new Map(); // model_name -> card element
const REQUESTS_MAX = 500; // as the monitor keeps (MONITOR_REQUESTS_MAX)
const STATUSES = ["ok", "cancelled", "rejected", "expired", "failed", "handed_back", "dead_letter"];
let requests = []; // finished requests, oldest first
let clockOffset = 0; // monitor clock minus browser clock, in seconds
const CHART_SPAN = 600; // seconds of history the charts show

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
const num = (x, digits = 2) => (typeof x === "number" ? x.toFixed(digits).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "") : "–");
const ms = (x) => (typeof x !== "number" ? "–" : x < 1000 ? `${Math.round(x)} ms` : `${num(x / 1000, 1)} s`);
const secs = (x) => (typeof x !== "number" ? "–" : x < 60 ? `${num(x, 1)} s` : duration(x));
const pct = (x) => (typeof x !== "number" ? "–" : `${num(x * 100, 1)}%`);
const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });

function params(info) {
  if (typeof info.parameter_count === "string") return info.parameter_count;
  const n = Number(info.parameters || info.parameter_count);
  if (!n) return null;
  return n >= 1e9 ? `${(n / 1e9).toFixed(1)}B` : `${Math.round(n / 1e6)}M`;
}

// A chart of the last CHART_SPAN seconds (or since the first sample, if later): one polyline per series (same
// unit), the x axis in monitor time.
function chart(title, hist, series, current) {
  const times = hist.t || [];
  const w = 300, hgt = 60, t1 = now(), t0 = Math.max(t1 - CHART_SPAN, Math.min(times[0] || t1, t1 - 10));
  const span = t1 - t0;
  const box = h("figure", { class: "chart", "data-chart": title });
  const lines = series.map(([key]) => (hist[key] || []).map((v, i) => [times[i], v])
    .filter(([t, v]) => typeof v === "number" && t >= t0));
  const all = lines.flat().map(([, v]) => v);
  const max = Math.max(...all, 1e-9);
  box.dataset.points = String(Math.max(0, ...lines.map((l) => l.length)));
  box.append(h("figcaption", { class: "chart-label" }, title, h("b", {}, current),
    h("span", { class: "muted chart-max" }, all.length ? `max ${num(max, 1)} · ${duration(span)}` : "no data yet")));
  const pic = svg("svg", { viewBox: `0 0 ${w} ${hgt}`, preserveAspectRatio: "none", class: "chart-svg",
    role: "img", "aria-label": `${title}, last ${duration(span)}` });
  lines.forEach((pts, n) => {
    if (pts.length < 2) return;
    const xy = pts.map(([t, v]) => `${(((t - t0) / span) * w).toFixed(1)},${(hgt - 2 - (v / max) * (hgt - 6)).toFixed(1)}`);
    if (n === 0) pic.append(svg("polygon", { points: `${xy[0].split(",")[0]},${hgt} ${xy.join(" ")} ${xy[xy.length - 1].split(",")[0]},${hgt}`, class: "chart-area" }));
    pic.append(svg("polyline", { points: xy.join(" "), class: `chart-line series-${n}` }));
  });
  box.append(pic);
  if (series.length > 1) {
    box.append(h("div", { class: "chart-legend" }, series.map(([, label], n) => h("span", { class: `series-${n}` }, label))));
  }
  return box;
}

// The bar's full width: the queue's capacity, unless the capacity dwarfs what the queue has held lately; then a
// round number above the largest depth of the last 10 minutes, so a queue of 10 behind a cap of 1000 shows.
function barScale(pending, cap, hist) {
  const peak = Math.max(pending, ...(hist.queue_depth || []));
  if (cap && (peak * 10 >= cap || cap <= 10)) return { scale: cap, note: null, how: `scaled to the queue's capacity (${cap})` };
  let scale = 10;
  for (let k = 10; scale < peak * 1.25; k *= 10) scale = [k, 2 * k, 5 * k, 10 * k].find((x) => x >= peak * 1.25) || 10 * k;
  return { scale, note: `bar 0–${scale}`,
    how: `scaled to ${scale}, above the largest depth of the last 10 minutes (${peak}); ` +
      `the capacity (${cap}) would leave it empty` };
}

// Requests per second: measured by the monitor between heartbeats, else the workers' window rate.
const rate = (s) => (typeof s.requests_per_s === "number" ? s.requests_per_s : s.stats ? s.stats.rate_per_s : null);

function queueBar(s) {
  const q = s.queue_metrics, level = s.backpressure_status.level;
  const cap = q.queue_capacity || 0, pending = q.pending_messages || 0;
  const { scale, note, how } = barScale(pending, cap, s.history || {});
  const fill = h("span", { class: `fill level-${level}` });
  fill.style.width = `${scale ? Math.min(100, (pending / scale) * 100) : 0}%`;
  if (pending > 0) fill.style.minWidth = "3px";
  return h("div", { class: "queue" },
    h("div", { class: "row" }, h("span", { class: "k" }, "queue"),
      h("span", { class: "queue-count" }, `${pending} / ${cap}`),
      h("span", { class: `chip level-${level}` }, level),
      h("span", { class: "muted" }, `${q.active_processing} running`)),
    h("div", { class: "bar", "data-pending": pending, "data-capacity": cap, "data-scale": scale,
      title: `${pending} pending of ${cap} (${num(s.backpressure_status.utilization * 100, 1)}% of capacity); ${how}` },
    fill),
    note ? h("div", { class: "bar-note muted" }, note) : null);
}

// The window stats users watch (last STATS_WINDOW_S): a model's combined or one instance's; a dash from older workers.
function statsRow(st, wait, cls) {
  const cell = (k, v, title) => h("span", { class: "stat", "data-stat": k, title }, h("span", { class: "k" }, k), v);
  return h("div", { class: `stats ${cls}`, "data-window": st ? st.window_s : null },
    cell("rate", st ? `${num(st.rate_per_s)}/s` : "–", st ? `${st.requests} requests in the last ${num(st.window_s, 0)} s` : "not reported"),
    cell("p50", st ? ms(st.latency_p50_ms) : "–", "median latency, taken by a worker -> answered"),
    cell("p95", st ? ms(st.latency_p95_ms) : "–", "95th percentile latency"),
    cell("tok/s", st ? num(st.tokens_per_s, 1) : "–", "tokens generated per second"),
    cell("wait", secs(wait), "expected wait of a new request"),
    cell("err", st ? pct(st.error_rate) : "–", st ? `${st.errors} of ${st.requests} requests` : "not reported"));
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

function hostText(host) {
  if (!host) return null;
  const gpus = (host.gpus || []).map((g) => `${g.name || "GPU"} ${num(g.utilization, 0)}%`);
  return h("span", { class: "host muted", title: `${num(host.memory_used_mb, 0)} of ${num(host.memory_total_mb, 0)} MB used; ` +
    `worker ${num(host.process_rss_mb, 0)} MB` }, [`cpu ${num(host.cpu_percent, 0)}%`, `mem ${num(host.memory_percent, 0)}%`,
    `rss ${num(host.process_rss_mb, 0)} MB`, ...gpus].join(" · "));
}

// What each slot is doing, as llama-server's /slots: request, state, tokens, elapsed.
function slotList(list) {
  if (!list || !list.length) return null;
  return h("ul", { class: "slot-list" }, list.map((r) =>
    h("li", { class: `slot-req state-${r.state}`, "data-req": r.req_id },
      h("span", { class: "slot-no" }, r.slot === null || r.slot === undefined ? "…" : `#${r.slot}`),
      h("span", { class: "slot-state" }, r.state),
      h("code", { class: "slot-id", title: r.req_id }, r.req_id),
      h("span", { class: "muted" }, `${r.tokens_in} in · ${r.tokens_out} out · ${secs(r.elapsed_ms / 1000)}`))));
}

function instanceRow(i) {
  return h("li", { class: `inst st-${i.status}`, "data-worker": i.worker_id },
    h("span", { class: "dot" }),
    h("span", { class: "wid", title: i.worker_id }, i.worker_id),
    h("span", { class: "ist" }, i.status),
    h("span", { class: "muted seen" }, `seen ${ago(i.last_seen)}`),
    h("span", { class: "muted up", "data-uptime": i.uptime }, `up ${duration(i.uptime)}`),
    slotUsage(i.slots), // a line of its own under the worker id: the first line has no room left
    statsRow(i.stats, i.backpressure_status.expected_wait_s, "inst-stats"),
    hostText(i.host),
    slotList(i.slot_requests));
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
  const hist = s.history || {};
  const st = s.stats;
  return [
    h("div", { class: "card-head" },
      h("h2", { class: "name", title: s.model_name }, s.model_name),
      h("span", { class: `pill st-${s.status}` }, s.status)),
    h("div", { class: "facts" }, facts.join(" · ")),
    alerts(s.alerts),
    capabilityMatrix(s.capabilities || []),
    queueBar(s),
    statsRow(st, s.backpressure_status.expected_wait_s, "model-stats"),
    h("div", { class: "charts" },
      chart("throughput req/s", hist, [["requests_per_s", "req/s"]], num(rate(s))),
      chart("latency ms", hist, [["latency_p50_ms", "p50"], ["latency_p95_ms", "p95"]],
        st ? `${ms(st.latency_p50_ms)} / ${ms(st.latency_p95_ms)}` : "–"),
      chart("queue depth", hist, [["queue_depth", "depth"]], s.queue_metrics.pending_messages)),
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
  let inst = 0, live = 0, queued = 0, rps = 0, tps = 0, warned = 0;
  for (const s of services.values()) {
    inst += s.instance_count; live += s.online_count; queued += s.queue_metrics.pending_messages;
    rps += rate(s) || 0; tps += (s.stats && s.stats.tokens_per_s) || 0; warned += (s.alerts || []).length;
  }
  document.getElementById("summary").replaceChildren(...[
    h("span", {}, h("b", {}, services.size), " models"),
    h("span", {}, h("b", {}, `${live}/${inst}`), " instances live"),
    h("span", {}, h("b", {}, queued), " queued"),
    h("span", {}, h("b", {}, num(rps)), " req/s"),
    h("span", {}, h("b", {}, num(tps, 1)), " tok/s"),
    warned ? h("span", { class: "level-warning", id: "alert-count" }, h("b", {}, warned), " alerts") : null,
  ].filter(Boolean));
}

// --- the Requests view (as Flower's task list): newest first, filtered by model and status ---------------------

function options(select, values, all) {
  const want = select.value;
  const have = [...select.options].map((o) => o.value);
  const next = ["", ...values];
  if (have.join("\n") !== next.join("\n")) {
    select.replaceChildren(...next.map((v) => h("option", { value: v }, v || all)));
    select.value = next.includes(want) ? want : "";
  }
}

function requestRow(r) {
  const tokens = r.kind === "embedding" ? `${r.tokens_in} in` : `${r.tokens_in} / ${r.tokens_out}`;
  return h("tr", { "data-req": r.req_id, "data-model": r.model_name, "data-status": r.status },
    h("td", { class: "t", title: new Date(r.ts * 1000).toISOString() }, clock(r.ts)),
    h("td", { class: "model", title: `${r.model_name} · ${r.worker_id}` }, r.model_name),
    h("td", { class: "worker", title: r.worker_id }, r.worker_id),
    h("td", {}, h("span", { class: `rstatus rs-${r.status}`, title: r.req_id }, r.status)),
    h("td", { class: "num", title: `queued ${ms(r.queue_ms)}, first token ${ms(r.ttft_ms)}` }, ms(r.latency_ms)),
    h("td", { class: "num" }, tokens),
    h("td", { class: "code", title: r.error || "" }, r.error_code || (r.error ? "error" : "")));
}

let requestsDue = false;
function renderRequests() {
  requestsDue = false;
  const model = document.getElementById("f-model"), status = document.getElementById("f-status");
  options(model, [...new Set([...services.keys(), ...requests.map((r) => r.model_name)])].sort(), "all models");
  options(status, [...new Set([...STATUSES, ...requests.map((r) => r.status)])], "all statuses");
  const shown = requests.filter((r) => (!model.value || r.model_name === model.value) &&
    (!status.value || r.status === status.value)).reverse();
  document.getElementById("req-rows").replaceChildren(...shown.map(requestRow));
  document.getElementById("req-count").textContent =
    `${shown.length} of the last ${requests.length} finished requests`;
  document.getElementById("req-empty").hidden = shown.length > 0;
}

function requestsSoon() { // many events in one frame: one redraw
  if (!requestsDue) { requestsDue = true; requestAnimationFrame(renderRequests); }
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
    requests = d.requests || [];
    renderRequests();
    setConn(d.nats_connected ? "ok" : "bad", d.nats_connected ? "live" : "NATS unreachable");
  });
  on("service", (s) => services.set(s.model_name, s));
  on("removed", (d) => services.delete(d.model_name));
  on("status", () => {});
  es.addEventListener("request", (ev) => {
    requests.push(JSON.parse(ev.data));
    if (requests.length > REQUESTS_MAX) requests.splice(0, requests.length - REQUESTS_MAX);
    requestsSoon();
  });
  on("nats", (d) => setConn(d.connected ? "ok" : "bad", d.connected ? "live" : "NATS unreachable"));
  es.onerror = () => setConn("wait", "reconnecting…");
}

document.addEventListener("DOMContentLoaded", () => {
  for (const id of ["f-model", "f-status"]) document.getElementById(id).addEventListener("change", renderRequests);
  connect();
  setInterval(render, 1000); // keeps "seen 3s ago" honest between events
});
