// gpulane's dashboard: one status stream (GET /v1/status/stream) drawn into plain tables, and a
// clicked task's own event stream. No build step, no library, nothing from the internet.
//
// Every value from the API is written with textContent or a DOM property, never as markup:
// task ids, presets and errors come from whoever submitted the task.
//
// Streams are read with fetch() rather than EventSource, which cannot send headers: the key
// goes in the Authorization header, as for every other call, and never into a URL (where
// access logs, proxies and the history would keep it). It is kept in sessionStorage: this tab
// only, gone when the tab closes.
"use strict";

const KEY_ITEM = "gpulane.key";
const RETRY_MS = 2000;
const MAX_EVENT_LINES = 200;
const MAX_EVENT_CHARS = 400;

const state = { status: null, pending: false, stream: null, taskStream: null, taskId: null,
                draws: 0 };

function $(id) { return document.getElementById(id); }

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") node.className = v;
    else if (k === "data") for (const [dk, dv] of Object.entries(v)) node.dataset[dk] = dv;
    else if (k === "onclick") node.addEventListener("click", v);
    else node[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function headers() {
  const key = sessionStorage.getItem(KEY_ITEM);
  return key ? { Authorization: "Bearer " + key } : {};
}

function mib(mb) {
  if (mb === null || mb === undefined) return "n/a";
  return mb >= 1024 ? (mb / 1024).toFixed(1) + " GiB" : mb + " MiB";
}

function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return Math.round(s * 1000) + " ms";
  if (s < 120) return s.toFixed(1) + " s";
  return Math.round(s / 60) + " min";
}

// -- keys --------------------------------------------------------------------------------------

class NeedsKey extends Error {}

function askKey(message) {
  stopStreams();
  $("board").hidden = true;
  $("keyform").hidden = false;
  $("keyerror").textContent = message || "";
  $("forget").hidden = true;
  setConn("locked", "key needed");
  $("key").focus();
}

function useKey(event) {
  event.preventDefault();
  const key = $("key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_ITEM, key);
  $("key").value = "";
  $("keyform").hidden = true;
  $("board").hidden = false;
  $("forget").hidden = false;
  start();
}

function forgetKey() {
  sessionStorage.removeItem(KEY_ITEM);
  askKey("");
}

// -- Server-Sent Events over fetch -------------------------------------------------------------

// Read an SSE response and call onEvent(type, data) for each event; resolves when it ends.
async function readEvents(url, onEvent, signal) {
  const r = await fetch(url, { headers: headers(), signal, cache: "no-store" });
  if (r.status === 401) throw new NeedsKey(sessionStorage.getItem(KEY_ITEM)
    ? "This key is not known to the node (or was revoked): enter another." : "");
  if (!r.ok) throw new Error(url + " answered " + r.status);
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let type = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) type = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(type, data.join("\n"));
    }
  }
}

function setConn(kind, text) {
  const c = $("conn");
  c.dataset.state = kind;
  c.textContent = text;
}

function stopStreams() {
  if (state.stream) state.stream.abort();
  if (state.taskStream) state.taskStream.abort();
  state.stream = state.taskStream = null;
}

async function follow() {
  const ctl = new AbortController();
  state.stream = ctl;
  while (state.stream === ctl) {
    try {
      setConn("connecting", "connecting");
      await readEvents("/v1/status/stream", (type, data) => {
        if (type !== "status") return;
        setConn("live", "live");
        state.status = JSON.parse(data);
        if (!state.pending) {  // draw at most once a frame, however fast events come
          state.pending = true;
          requestAnimationFrame(draw);
        }
      }, ctl.signal);
    } catch (err) {
      if (err instanceof NeedsKey) { askKey(err.message); return; }
      if (ctl.signal.aborted) return;
    }
    if (state.stream !== ctl) return;
    setConn("down", "reconnecting");
    await new Promise((ok) => setTimeout(ok, RETRY_MS));
  }
}

function start() {
  stopStreams();
  follow();
  if (state.taskId) showTask(state.taskId);
}

// -- drawing -----------------------------------------------------------------------------------

function fill(tableId, rows) {
  $(tableId).tBodies[0].replaceChildren(...rows);
}

function cells(...values) {
  return values.map((v) => el("td", {}, v));
}

function draw() {
  state.pending = false;
  const body = state.status;
  if (!body) return;
  const s = body.status;
  // How far the page has come, for tests and bench/dashboard.py: draws so far, and the
  // server time of the status drawn last; the first draw is marked in the performance timeline.
  state.draws += 1;
  $("conn").dataset.draws = state.draws;
  $("conn").dataset.at = body.at;
  if (state.draws === 1) performance.mark("gpulane-first-status");
  $("node").textContent = s.node + (s.draining ? " (draining)" : "") + " · " + s.queued +
    " queued";
  drawGpus(s);
  fill("lanes", s.lanes.map((l) => el("tr", {}, ...cells(
    l.preset, l.lane, l.queued, l.running, seconds(l.oldest_wait_s), l.workers.warm,
    l.workers.loading, l.workers.busy))));
  fill("workers", body.workers.map((w) => {
    const b = w.batch || {};
    return el("tr", { data: { state: w.state } }, ...cells(
      w.id, w.preset, w.device, w.state, w.tasks_done, b.batches ?? "–", b.mean_size ?? "–",
      b.last_size ?? "–"));
  }));
  drawTasks(body);
  drawLeases(body);
  const reasons = Object.entries(s.fallbacks.reasons);
  fill("fallbacks", reasons.length ? reasons.map(([reason, r]) => el("tr", {}, ...cells(
    reason, r.count, r.per_min["1m"], r.per_min["15m"])))
    : [el("tr", {}, el("td", { colSpan: 4, className: "muted" }, "no fallbacks"))]);
  fill("nodes", body.nodes.map((n) => el("tr", {}, ...cells(
    n.name, n.url || "–", seconds(n.heartbeat_age_s) + " ago", n.draining ? "yes" : "no",
    (n.devices || []).length, n.running, (n.warm || []).join(", ")))));
}

function segment(kind, mb, total, title) {
  const span = el("span", { className: "seg " + kind, title: title + ": " + mib(mb) });
  span.style.width = (total > 0 ? (100 * Math.max(mb, 0)) / total : 0).toFixed(2) + "%";
  return span;
}

function drawGpus(s) {
  const cards = s.devices.map((d) => {
    const held = d.held_vram_mb || {};
    const outside = d.outside_vram_mb || 0;
    const used = (held.worker || 0) + (held.lease || 0) + (held.clearing || 0) + outside;
    const total = d.total_vram_mb;
    const bar = el("div", { className: "bar" },
      segment("worker", held.worker || 0, total, "workers"),
      segment("lease", held.lease || 0, total, "leases"),
      segment("clearing", held.clearing || 0, total, "clearing"),
      segment("outside", outside, total, "outside use"),
      segment("free", Math.max(total - used, 0), total, "free"));
    return el("div", { className: "card", data: { health: d.health } },
      el("div", { className: "title" }, "GPU " + d.index + " · " + d.name +
        (d.simulated ? " (simulated)" : "") + (d.health !== "ok" ? " · " + d.health : "")),
      bar,
      el("div", { className: "muted" }, mib(used) + " of " + mib(total) + " · workers " +
        mib(held.worker || 0) + " · leases " + mib(held.lease || 0) + " · outside " +
        (d.outside_vram_mb === null ? "n/a" : mib(outside))),
      el("div", { className: "muted" }, d.workers.length ? "on it: " + d.workers.join(", ")
        : "no workers"));
  });
  cards.push(el("div", { className: "card" }, el("div", { className: "title" }, "CPU pool"),
    el("div", { className: "muted" }, s.cpu.in_use + " of " + s.cpu.slots + " slots in use"),
    el("div", { className: "muted" }, s.cpu.workers.length ? "on it: " +
      s.cpu.workers.join(", ") : "no workers")));
  $("gpus").replaceChildren(...cards);
}

function drawTasks(body) {
  if (body.tasks === null) {
    $("tasks-note").textContent = "This key lacks the tasks scope.";
    fill("tasks", []);
    return;
  }
  $("tasks-note").textContent = body.tasks.length ? "Click a task for its events." :
    "No tasks yet.";
  fill("tasks", body.tasks.map((t) => {
    const where = t.placement ? t.placement.device + (t.placement.fallback_reason ?
      " (" + t.placement.fallback_reason + ")" : "") : "–";
    const stateCell = el("td", { className: "state", data: { state: t.state } }, t.state +
      (t.error && t.error.code ? " · " + t.error.code : ""));
    const row = el("tr", { className: t.id === state.taskId ? "chosen" : "",
                           data: { id: t.id }, onclick: () => showTask(t.id) },
      el("td", {}, el("button", { type: "button", className: "link" }, t.id)),
      el("td", {}, t.preset), stateCell, el("td", {}, where), el("td", {}, t.attempts),
      el("td", {}, seconds(body.at - t.created_at)));
    return row;
  }));
}

function drawLeases(body) {
  if (body.leases === null) {
    $("leases-note").textContent = "This key lacks the leases scope.";
    fill("leases", []);
    return;
  }
  $("leases-note").textContent = body.leases.length ? "" : "No leases waiting or held.";
  fill("leases", body.leases.map((l) => el("tr", { data: { state: l.state } }, ...cells(
    l.id, l.holder, l.state, (l.devices || []).join(", ") || "–", mib(l.vram_mb),
    l.priority))));
}

// -- one task's events -------------------------------------------------------------------------

async function showTask(id) {
  if (state.taskStream) state.taskStream.abort();
  const ctl = new AbortController();
  state.taskStream = ctl;
  state.taskId = id;
  $("events").hidden = false;
  $("events-task").textContent = id;
  const list = $("events-list");
  list.replaceChildren();
  for (const row of $("tasks").tBodies[0].rows) {
    row.classList.toggle("chosen", row.dataset.id === id);
  }
  try {
    await readEvents("/v1/tasks/" + encodeURIComponent(id) + "/events", (type, data) => {
      const text = data.length > MAX_EVENT_CHARS ? data.slice(0, MAX_EVENT_CHARS) + "…" : data;
      list.append(el("li", { data: { type } }, el("b", {}, type), " ", text));
      while (list.childElementCount > MAX_EVENT_LINES) list.firstElementChild.remove();
    }, ctl.signal);
  } catch (err) {
    if (err instanceof NeedsKey) askKey(err.message);
    else if (!ctl.signal.aborted) list.append(el("li", { className: "error" }, String(err)));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("keyform").addEventListener("submit", useKey);
  $("forget").addEventListener("click", forgetKey);
  $("forget").hidden = !sessionStorage.getItem(KEY_ITEM);
  start();
});
