// The operator's page (GET /admin on the API listener).  No dependencies, no build step.
//
// Reads GET /api/stats every INTERVAL_MS while the tab is visible (hidden tab: no
// requests at all) and GET /api/users/{user} for the user shown.  The daemon keeps no
// history: rates are computed here from successive counter snapshots of each node
// (between two records with different `at`), and the charts keep HISTORY_MS of them.
// The API key is asked once and kept in sessionStorage (this tab only).
const INTERVAL_MS = 1500;
const HISTORY_MS = 5 * 60 * 1000;
const KEY_ITEM = "tidings-admin-key";

const $ = (id) => document.getElementById(id);
let key = sessionStorage.getItem(KEY_ITEM);
let timer = null;
let shownUser = null;
let shownUserJson = "";

const prev = new Map();   // node -> its previous record
const rates = new Map();  // node -> {in, out} messages per second
const history = [];       // {t, in, out, connections, slow, limited}

class AuthError extends Error {}

// -- requests ------------------------------------------------------------------------

async function api(method, path, body) {
  const init = { method, headers: { Authorization: `Bearer ${key}` }, cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  let data = null;
  try { data = await r.json(); } catch { /* not JSON: the status says it */ }
  if (r.status === 401 || r.status === 403) throw new AuthError((data && data.error) || `HTTP ${r.status}`);
  if (!r.ok) throw new Error((data && data.error) || `HTTP ${r.status}`);
  return data;
}

// -- formatting ----------------------------------------------------------------------

const nf = new Intl.NumberFormat();
function fmt(n, digits = 0) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  if (digits === 0 || Math.abs(n) >= 100) return nf.format(Math.round(n));
  return n.toFixed(Math.abs(n) >= 10 ? 1 : digits);
}
function ago(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}
const clock = (ms) => new Date(ms).toLocaleTimeString([], { hour12: false });

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "data") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c ?? ""));
  return node;
}

function setValue(id, value, text) {
  const node = $(id);
  node.dataset.value = value === null || value === undefined ? "" : String(value);
  node.textContent = text ?? fmt(value);
}

function setStatus(status, text) {
  const s = $("status");
  s.dataset.status = status;
  s.textContent = text;
}

// -- the key ---------------------------------------------------------------------------

function askKey(message) {
  key = null;
  sessionStorage.removeItem(KEY_ITEM);
  clearTimeout(timer);
  timer = null;
  $("dashboard").hidden = true;
  $("forget").hidden = true;
  $("key-form").hidden = false;
  $("key-error").hidden = !message;
  $("key-error").textContent = message || "";
  setStatus("idle", "not connected");
  $("key").focus();
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  key = $("key").value.trim();
  $("key").value = "";
  sessionStorage.setItem(KEY_ITEM, key);
  start();
});
$("forget").addEventListener("click", () => askKey(""));

function start() {
  $("key-form").hidden = true;
  $("dashboard").hidden = false;
  $("forget").hidden = false;
  clearTimeout(timer);
  timer = null;
  poll();
}

// -- polling ---------------------------------------------------------------------------

let polling = false;  // one poll at a time, whatever wakes it

async function poll() {
  timer = null;
  if (!key || polling) return;
  if (document.hidden) { setStatus("paused", "paused (tab hidden)"); return; }
  polling = true;
  try {
    const stats = await api("GET", "/api/stats");
    render(stats);
    if (shownUser !== null) await refreshUser(false);
    setStatus("live", `live · ${clock(stats.at)}`);
  } catch (e) {
    if (e instanceof AuthError) { askKey(`The daemon refused the key: ${e.message}`); return; }
    setStatus("error", `no answer: ${e.message}`);
  } finally {
    polling = false;
  }
  if (key && timer === null) timer = setTimeout(poll, INTERVAL_MS);
}

document.addEventListener("visibilitychange", () => {
  if (!key) return;
  if (document.hidden) {
    clearTimeout(timer);
    timer = null;
    setStatus("paused", "paused (tab hidden)");
  } else if (timer === null) {
    poll();
  }
});

// -- rendering the stats -----------------------------------------------------------------

function updateRates(nodes) {
  const seen = new Set();
  for (const r of nodes) {
    seen.add(r.node);
    const p = prev.get(r.node);
    if (p && p.started === r.started && r.at > p.at) {
      const dt = (r.at - p.at) / 1000;
      rates.set(r.node, { in: (r.stored - p.stored) / dt, out: (r.delivered - p.delivered) / dt });
    } else if (p && p.started !== r.started) {
      rates.delete(r.node);  // the node restarted: its counters started over
    }
    if (!p || r.at !== p.at) prev.set(r.node, r);
  }
  for (const node of [...prev.keys()]) if (!seen.has(node)) { prev.delete(node); rates.delete(node); }
}

function sumRates() {
  if (rates.size === 0) return { in: null, out: null };
  let i = 0, o = 0;
  for (const r of rates.values()) { i += r.in; o += r.out; }
  return { in: i, out: o };
}

function render(s) {
  const t = s.totals;
  updateRates(s.nodes);
  const total = sumRates();
  const now = Date.now();
  history.push({ t: now, in: total.in, out: total.out, connections: t.connections,
                 slow: t.slow_disconnects, limited: t.rate_limited });
  while (history.length && history[0].t < now - HISTORY_MS) history.shift();

  $("where").textContent = s.cluster
    ? `cluster of ${t.nodes} node${t.nodes === 1 ? "" : "s"} · answered by ${s.node} · ${s.nodes[0].store}`
    : `${s.node} · ${s.nodes[0].store} store`;
  setValue("v-connections", t.connections);
  setValue("v-users", t.users);
  $("s-connections").textContent = s.cluster ? "all nodes" : "";
  $("s-users").textContent = !s.cluster ? "" : t.users_distinct ? "all nodes" : "summed over nodes";
  setValue("v-in", total.in, fmt(total.in, 1));
  setValue("v-out", total.out, fmt(total.out, 1));
  $("s-in").textContent = `${fmt(t.stored)} stored`;
  $("s-out").textContent = `${fmt(t.delivered)} delivered`;
  setValue("v-queued", t.queued);
  setValue("v-commit", t.commit_ms, fmt(t.commit_ms, 2));
  setValue("v-errors", t.store_errors);
  counterTile("slow", "v-slow", "s-slow", t.slow_disconnects, "closed since start");
  counterTile("limited", "v-limited", "s-limited", t.rate_limited, "frames since start");
  $("t-errors").classList.toggle("alert", t.store_errors > 0);
  $("t-queued").classList.toggle("alert", t.queued > 0 && t.queued >= (t.connections || 1));
  $("t-webhooks").hidden = typeof t.webhook_outbox !== "number";
  if (typeof t.webhook_outbox === "number") setValue("v-webhooks", t.webhook_outbox);

  renderNodes(s);
  renderTop(s);
  renderWarnings(s);
  drawCharts();
}

function counterTile(field, valueId, subId, value, what) {
  setValue(valueId, value);
  const minuteAgo = history.find((h) => h.t >= Date.now() - 60000);
  const recent = minuteAgo ? value - minuteAgo[field] : 0;
  $(subId).textContent = recent > 0 ? `+${fmt(recent)} in the last minute` : what;
  $(valueId).closest(".tile").classList.toggle("alert", recent > 0);
}

function renderNodes(s) {
  const body = $("nodes").tBodies[0];
  body.replaceChildren(...s.nodes.map((r) => {
    const rate = rates.get(r.node) || { in: null, out: null };
    return el("tr", { class: r.node === s.node ? "self" : "", data: { node: r.node } },
      el("td", {}, r.node),
      el("td", { class: "num" }, fmt(r.connections)),
      el("td", { class: "num" }, fmt(r.users)),
      el("td", { class: "num" }, fmt(rate.in, 1)),
      el("td", { class: "num" }, fmt(rate.out, 1)),
      el("td", { class: "num" }, fmt(r.queued)),
      el("td", { class: "num" }, fmt(r.commit_ms, 2)),
      el("td", { class: "num" }, r.node === s.node ? "now" : ago(s.at - r.at)));
  }));
  $("cluster-error").hidden = !s.cluster_error;
  $("cluster-error").textContent = s.cluster_error ? `Other nodes unknown: ${s.cluster_error}` : "";
}

function renderTop(s) {
  $("top-where").textContent = s.top_users_node ? `on ${s.top_users_node}` : s.cluster ? "all nodes" : "";
  const body = $("top-users").tBodies[0];
  if (!s.top_users.length) {
    body.replaceChildren(el("tr", {}, el("td", { class: "muted", colspan: "2" }, "nobody is connected")));
    return;
  }
  body.replaceChildren(...s.top_users.map((u) => el("tr", { data: { user: u.user } },
    el("td", {}, el("a", { onclick: () => lookUp(u.user) }, u.user)),
    el("td", { class: "num" }, fmt(u.connections)))));
}

function renderWarnings(s) {
  $("warn-where").textContent = s.cluster ? `on ${s.node}` : "";
  const list = $("warnings");
  if (!s.warnings.length) {
    list.replaceChildren(el("li", { class: "none" }, "no warnings since start"));
    return;
  }
  list.replaceChildren(...s.warnings.slice().reverse().map((w) => el("li", { class: w.level },
    el("span", { class: "when", title: new Date(w.ts).toLocaleString() }, clock(w.ts)),
    el("span", { class: "lvl" }, w.level), w.event,
    el("code", { title: w.line }, w.line))));
}

// -- charts (canvas; no library) ---------------------------------------------------------

// A round step for about four grid lines up to at least `v` (1, 2 or 5 times a power of 10).
function niceStep(v, integer) {
  if (!(v > 0)) return 1;
  const raw = v / 4, p = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * p).find((s) => s >= raw);
  return integer ? Math.max(1, Math.round(step)) : step;
}

// The time axis: from the first sample to now, at least 30 s, at most HISTORY_MS.
function timeWindow(now) {
  const first = history.length ? history[0].t : now;
  return Math.min(HISTORY_MS, Math.max(30000, now - first));
}

function axisLabel(ms) {
  if (ms === 0) return "now";
  return ms % 60000 === 0 ? `-${ms / 60000} min` : `-${Math.round(ms / 1000)} s`;
}

function drawChart(canvas, series, integer) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (!w || !h) return;
  if (canvas.width !== Math.round(w * dpr)) { canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr); }
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const left = 44, right = 18, top = 8, bottom = 20;
  const pw = w - left - right, ph = h - top - bottom;
  const now = Date.now(), span = timeWindow(now), t0 = now - span;
  let peak = 0;
  for (const s of series) for (const p of history) if (p[s.field] !== null) peak = Math.max(peak, p[s.field]);
  const step = niceStep(peak, integer);
  const lines = Math.max(1, Math.ceil(peak / step));
  const max = step * lines;
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = "#6b7385";
  g.strokeStyle = "#e3e6eb";
  g.lineWidth = 1;
  g.textAlign = "right";
  g.textBaseline = "middle";
  for (let i = 0; i <= lines; i++) {
    const y = Math.round(top + ph - (ph * i) / lines) + 0.5;
    g.beginPath(); g.moveTo(left, y); g.lineTo(left + pw, y); g.stroke();
    g.fillText(fmt(step * i, step < 1 ? 1 : 0), left - 6, y);
  }
  g.textAlign = "center";
  g.textBaseline = "top";
  const tick = span > 120000 ? 60000 : span > 60000 ? 30000 : 10000;
  for (let ago = 0; ago <= span; ago += tick) g.fillText(axisLabel(ago), left + pw - (pw * ago) / span, top + ph + 5);
  const x = (t) => left + ((t - t0) / span) * pw;
  const y = (v) => top + ph - (v / max) * ph;
  for (const s of series) {
    const pts = history.filter((p) => p[s.field] !== null && p[s.field] !== undefined && p.t >= t0);
    if (!pts.length) continue;
    g.beginPath();
    pts.forEach((p, i) => (i ? g.lineTo(x(p.t), y(p[s.field])) : g.moveTo(x(p.t), y(p[s.field]))));
    g.strokeStyle = s.color; g.lineWidth = 2; g.lineJoin = "round";
    g.setLineDash(s.dash || []);
    g.stroke();
    g.setLineDash([]);
    if (s.fill === false) continue;
    g.lineTo(x(pts[pts.length - 1].t), top + ph); g.lineTo(x(pts[0].t), top + ph); g.closePath();
    g.globalAlpha = 0.08; g.fillStyle = s.color; g.fill(); g.globalAlpha = 1;
  }
}

function drawCharts() {
  const css = getComputedStyle(document.documentElement);
  drawChart($("chart-messages"), [  // "in" dashed on top: visible where the lines coincide
    { field: "out", color: css.getPropertyValue("--out").trim() },
    { field: "in", color: css.getPropertyValue("--in").trim(), dash: [6, 4], fill: false },
  ], false);
  drawChart($("chart-connections"), [{ field: "connections", color: "#7b5cd6" }], true);
}
window.addEventListener("resize", drawCharts);

// -- the user lookup -----------------------------------------------------------------------

$("lookup-form").addEventListener("submit", (e) => {
  e.preventDefault();
  lookUp($("lookup-user").value.trim());
});

function lookUp(user) {
  if (!user) return;
  $("lookup-user").value = user;
  shownUser = user;
  shownUserJson = "";
  refreshUser(true);
}

async function refreshUser(showErrors) {
  const user = shownUser;
  try {
    const info = await api("GET", `/api/users/${encodeURIComponent(user)}`);
    if (user !== shownUser) return;
    $("lookup-error").hidden = true;
    const json = JSON.stringify(info);
    if (json !== shownUserJson) { shownUserJson = json; renderUser(info); }
  } catch (e) {
    if (e instanceof AuthError) { askKey(`The daemon refused the key: ${e.message}`); return; }
    if (showErrors || user === shownUser) {
      $("lookup-error").hidden = false;
      $("lookup-error").textContent = `${user}: ${e.message}`;
    }
  }
}

// Whatever shape `devices` has (a list of names today; richer objects later, issue #12).
function renderAny(value) {
  if (value === null || value === undefined) return el("span", { class: "muted" }, "–");
  if (Array.isArray(value)) {
    if (!value.length) return el("span", { class: "muted" }, "none");
    if (value.every((v) => v === null || typeof v !== "object")) {
      return el("span", {}, ...value.map((v) => el("span", { class: "chip" }, v)));
    }
    const cols = [...new Set(value.flatMap((v) => (v && typeof v === "object" ? Object.keys(v) : [])))];
    return el("table", {}, el("thead", {}, el("tr", {}, ...cols.map((c) => el("th", {}, c)))),
      el("tbody", {}, ...value.map((v) => el("tr", {}, ...cols.map((c) => el("td", {}, renderAny(v?.[c])))))));
  }
  if (typeof value === "object") {
    const entries = Object.entries(value);
    if (!entries.length) return el("span", { class: "muted" }, "none");
    return el("dl", { class: "facts" }, ...entries.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, renderAny(v))]));
  }
  return el("span", {}, String(value));
}

function renderUser(u) {
  $("user").hidden = false;
  $("user").dataset.user = u.user;
  $("u-name").textContent = u.user;
  $("u-online").textContent = u.online ? "online" : "offline";
  $("u-online").classList.toggle("online", u.online);
  setValue("u-count", u.connection_count,
    `${fmt(u.connection_count)}${u.connection_count !== u.connections.length ? ` (${u.connections.length} on ${u.node})` : ""}`);
  setValue("u-unread", u.unread, `${fmt(u.unread)}  (last seq ${fmt(u.last_seq)}, acked ${fmt(u.cursor)})`);
  $("u-seen").textContent = u.online ? "now" : (u.last_seen ? `${ago(Date.now() - u.last_seen)} (${new Date(u.last_seen).toLocaleString()})` : "never");
  $("u-devices").replaceChildren(renderAny(u.devices));
  $("disconnect-all").disabled = u.connections.length === 0;
  const body = $("u-conns").tBodies[0];
  if (!u.connections.length) {
    body.replaceChildren(el("tr", {}, el("td", { class: "muted", colspan: "6" }, `no connections on ${u.node}`)));
    return;
  }
  body.replaceChildren(...u.connections.map((c) => el("tr", { data: { conn: c.conn } },
    el("td", {}, el("code", {}, c.conn)),
    el("td", {}, c.node),
    el("td", {}, c.device),
    el("td", { title: new Date(c.since).toLocaleString() }, ago(Date.now() - c.since)),
    el("td", {}, el("code", {}, c.remote || "?")),
    el("td", {}, el("button", { type: "button", class: "danger disconnect",
      onclick: () => disconnect(u.user, c.conn) }, "disconnect")))));
}

async function disconnect(user, conn) {
  try {
    await api("POST", "/api/disconnect", conn === undefined ? { user } : { user, conn });
  } catch (e) {
    if (e instanceof AuthError) { askKey(`The daemon refused the key: ${e.message}`); return; }
    $("lookup-error").hidden = false;
    $("lookup-error").textContent = `disconnect failed: ${e.message}`;
  }
  shownUserJson = "";
  await refreshUser(true);
}
$("disconnect-all").addEventListener("click", () => { if (shownUser) disconnect(shownUser); });

// -- go ------------------------------------------------------------------------------------

if (key) start(); else askKey("");
