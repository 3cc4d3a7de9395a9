/**
 * Tidings browser client: a dependency-free ES module (also runs on Node >= 22 or
 * with any WebSocket implementation passed as `WebSocket`).
 *
 *   import { TidingsClient } from "/tidings.js";
 *   const c = new TidingsClient({ url: "wss://chat.example/ws", token, onMessage, onStatus });
 *   c.connect();
 *   const ack = await c.send("bob", { text: "hi" });   // the server's ack frame, once
 *   c.close();
 *
 * Contract
 * - `token`: a string, or a (possibly async) function returning one; it is called
 *   before every (re)connect, so an expiring token can be replaced.  `user` is sent
 *   as ?user= (only accepted by a daemon running with auth.mode = "insecure").
 * - Device: the connection names a device (?device=): `device`, else the name kept
 *   in localStorage under "tidings.device" (made once: "web-" + 8 hex digits), else a
 *   fresh name per client.  The server keeps one ack cursor per device, so a phone and
 *   a laptop of one user each get every message.  `device` / `unread` are the hello's.
 * - Reconnect: any close not asked for by close() schedules a reconnect after
 *   min(maxDelayMs, baseDelayMs * 2^attempt) with equal jitter (half fixed, half
 *   random); `attempt` resets when the server's hello arrives.
 * - Resume: `lastSeq` is the highest inbox seq handed to onMessage.  A reconnect asks
 *   for ?since=lastSeq, and a message with seq <= lastSeq is never delivered twice.
 * - Acks: delivered seqs are acknowledged in batches ({"type":"ack","seq":N} with the
 *   highest N) after ackDelayMs or every ackBatch messages, and when closing.
 * - send(to, body, {key}): a Promise resolved with the matching ack frame (by id),
 *   rejected with a TidingsError carrying the server's error code.  Every send
 *   carries an idempotency `key` (a fresh random one unless given).  A send issued
 *   while disconnected waits in an outbox; a send whose ack did not arrive before the
 *   connection dropped goes out again after the next hello with the same key and id:
 *   the server stores a key once and answers a resend of a stored one with the
 *   original ack plus "duplicate": true.  So each send is stored exactly once, however
 *   the connection comes and goes.  Other requests (presence...) are rejected with
 *   "disconnected" when the connection drops before their reply.
 * - Callbacks: onMessage(frame), onPresence(frame), onStatus(status, detail) with
 *   status "connecting" | "open" | "reconnecting" | "closed", onError(frame) for
 *   error frames that answer no pending request.  A throwing callback is reported
 *   on the console and never breaks the client.
 * - Heartbeat: after heartbeatMs without any frame the client pings; no reply within
 *   heartbeatTimeoutMs closes the socket (and so reconnects).
 */

const DEVICE_KEY = "tidings.device";

function randomHex(bytes) {
  const buf = new Uint8Array(bytes);
  if (globalThis.crypto && globalThis.crypto.getRandomValues) globalThis.crypto.getRandomValues(buf);
  else for (let i = 0; i < bytes; i++) buf[i] = Math.floor(Math.random() * 256);
  return Array.from(buf, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** A fresh idempotency key (32 hex digits). */
export function freshKey() {
  return randomHex(16);
}

/** This browser's device name: kept in `storage` (localStorage), made once. */
function storedDevice(storage) {
  let store = storage;
  try {
    if (store === undefined) store = globalThis.localStorage;
  } catch {
    store = null; // localStorage may throw (sandboxed frames, privacy modes)
  }
  try {
    const known = store && store.getItem(DEVICE_KEY);
    if (known) return known;
    const made = `web-${randomHex(4)}`;
    if (store) store.setItem(DEVICE_KEY, made);
    return made;
  } catch {
    return `web-${randomHex(4)}`;
  }
}

export class TidingsError extends Error {
  constructor(code, message, frame = null) {
    super(message || code);
    this.name = "TidingsError";
    this.code = code;
    this.frame = frame;
  }
}

const DEFAULTS = {
  baseDelayMs: 500,
  maxDelayMs: 30000,
  ackDelayMs: 200,
  ackBatch: 64,
  heartbeatMs: 25000,
  heartbeatTimeoutMs: 10000,
};

export class TidingsClient {
  constructor(options) {
    if (!options || !options.url) throw new TypeError("TidingsClient needs {url}");
    this.options = { ...DEFAULTS, ...options };
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    this.status = "idle";
    this.user = null;
    this.conn = null;
    this.device = options.device || storedDevice(options.storage);
    this.unread = null;
    this.lastSeq = options.since || 0;
    this.attempt = 0;
    this.reconnects = 0;
    this._ws = null;
    this._ids = 0;
    this._pending = new Map(); // id -> {resolve, reject, frame}
    this._outbox = []; // frames waiting for a connection (their ids are in _pending)
    this._ackSeq = 0;
    this._ackedSeq = 0;
    this._ackCount = 0;
    this._ackTimer = null;
    this._retryTimer = null;
    this._beatTimer = null;
    this._beatDeadline = null;
    this._closing = false;
  }

  /** Open the connection (idempotent); returns this. */
  connect() {
    this._closing = false;
    if (!this._ws && !this._retryTimer) this._open();
    return this;
  }

  /** Close for good: no reconnect; pending sends are rejected with "closed". */
  close(code = 1000, reason = "") {
    this._closing = true;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._flushAck();
    this._stopHeartbeat();
    const ws = this._ws;
    this._ws = null;
    if (ws) ws.close(code, reason);
    this._failPending("closed", "client closed");
    this._setStatus("closed", { code });
  }

  /** Send `body` to user `to` exactly once (see the contract); resolves with the ack
   * frame.  `extra` may carry a `key` (default: a fresh one) or an `id`. */
  send(to, body, extra = {}) {
    return this.request({ type: "send", to, body, ...extra, key: extra.key || freshKey() });
  }

  /** Ask for the presence of `users`; resolves with the presence frame. */
  presence(users) {
    return this.request({ type: "presence", users });
  }

  /** Send any frame carrying an id; resolves with the reply frame of the same id. */
  request(frame) {
    const id = frame.id !== undefined ? String(frame.id) : `c${++this._ids}`;
    const full = { ...frame, id };
    return new Promise((resolve, reject) => {
      this._pending.set(id, { resolve, reject, frame: full, sent: false });
      if (this.status === "open") this._transmit(id);
      else this._outbox.push(id);
    });
  }

  // -- internals -------------------------------------------------------------------

  _call(name, ...args) {
    const fn = this.options[name];
    if (typeof fn !== "function") return;
    try {
      fn(...args);
    } catch (err) {
      console.error(`TidingsClient ${name} callback failed`, err);
    }
  }

  _setStatus(status, detail = {}) {
    this.status = status;
    this._call("onStatus", status, detail);
  }

  async _buildUrl() {
    const url = new URL(this.options.url);
    let token = this.options.token;
    if (typeof token === "function") token = await token();
    if (token) url.searchParams.set("token", token);
    if (this.options.user) url.searchParams.set("user", this.options.user);
    if (this.device) url.searchParams.set("device", this.device);
    if (this.lastSeq > 0) url.searchParams.set("since", String(this.lastSeq));
    return url.toString();
  }

  async _open() {
    this._setStatus("connecting", { attempt: this.attempt });
    let url;
    try {
      url = await this._buildUrl();
    } catch (err) {
      this._scheduleReconnect({ error: String(err) });
      return;
    }
    if (this._closing) return;
    let ws;
    try {
      ws = new this.WebSocket(url);
    } catch (err) {
      this._scheduleReconnect({ error: String(err) });
      return;
    }
    this._ws = ws;
    ws.onmessage = (ev) => {
      if (ws === this._ws) this._onFrame(ev.data);
    };
    ws.onclose = (ev) => {
      if (ws !== this._ws) return;
      this._ws = null;
      this._onClose(ev.code, ev.reason);
    };
    ws.onerror = () => {}; // a close event always follows
  }

  _onFrame(data) {
    this._heartbeat();
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    switch (frame.type) {
      case "hello":
        this.user = frame.user;
        this.conn = frame.conn;
        if (frame.device) this.device = frame.device;
        this.unread = frame.unread ?? null;
        this.attempt = 0;
        this._setStatus("open", { user: frame.user, conn: frame.conn, lastSeq: this.lastSeq });
        this._drainOutbox();
        this._flushAck(); // an ack the previous connection may not have delivered
        return;
      case "message":
        if (typeof frame.seq === "number") {
          if (frame.seq <= this.lastSeq) return; // already delivered
          this.lastSeq = frame.seq;
          this._queueAck(frame.seq);
        }
        this._call("onMessage", frame);
        return;
      case "presence":
        if (frame.id === undefined || !this._settle(frame)) this._call("onPresence", frame);
        return;
      default:
        if (frame.id !== undefined && frame.id !== null && this._settle(frame)) return;
        if (frame.type === "error") this._call("onError", frame);
    }
  }

  _settle(frame) {
    const id = String(frame.id);
    const waiter = this._pending.get(id);
    if (!waiter) return false;
    this._pending.delete(id);
    if (frame.type === "error") waiter.reject(new TidingsError(frame.code, frame.message, frame));
    else waiter.resolve(frame);
    return true;
  }

  _transmit(id) {
    const waiter = this._pending.get(id);
    if (!waiter) return;
    waiter.sent = true;
    this._ws.send(JSON.stringify(waiter.frame));
  }

  _drainOutbox() {
    const ids = this._outbox;
    this._outbox = [];
    for (const id of ids) this._transmit(id);
  }

  _queueAck(seq) {
    this._ackSeq = Math.max(this._ackSeq, seq);
    if (++this._ackCount >= this.options.ackBatch) this._flushAck();
    else if (!this._ackTimer) this._ackTimer = setTimeout(() => this._flushAck(), this.options.ackDelayMs);
  }

  _flushAck() {
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
    this._ackCount = 0;
    if (this._ackSeq <= this._ackedSeq || !this._ws || this.status !== "open") return;
    this._ws.send(JSON.stringify({ type: "ack", seq: this._ackSeq }));
    this._ackedSeq = this._ackSeq;
  }

  _heartbeat() {
    this._stopHeartbeat();
    if (this._closing) return;
    this._beatTimer = setTimeout(() => {
      if (!this._ws || this.status !== "open") return;
      this._ws.send(JSON.stringify({ type: "ping", id: `hb${++this._ids}` }));
      this._beatDeadline = setTimeout(() => {
        if (this._ws) this._ws.close(4000, "heartbeat timeout");
      }, this.options.heartbeatTimeoutMs);
    }, this.options.heartbeatMs);
  }

  _stopHeartbeat() {
    clearTimeout(this._beatTimer);
    clearTimeout(this._beatDeadline);
    this._beatTimer = this._beatDeadline = null;
  }

  _failPending(code, message) {
    for (const [id, waiter] of this._pending) {
      this._pending.delete(id);
      waiter.reject(new TidingsError(code, message, waiter.frame));
    }
    this._outbox = [];
  }

  _onClose(code, reason) {
    this._stopHeartbeat();
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
    this._ackedSeq = 0; // the server may have missed the last ack: resend it next time
    for (const [id, waiter] of this._pending) {
      if (!waiter.sent) continue;
      if (waiter.frame.type === "send" && waiter.frame.key) {
        waiter.sent = false; // resent with the same key after the next hello
        continue;
      }
      this._pending.delete(id);
      waiter.reject(new TidingsError("disconnected", "connection lost before the reply; the request may or may not have been applied", waiter.frame));
    }
    // Everything still pending goes out after the next hello, in the order asked for.
    this._outbox = [...this._pending.keys()];
    if (this._closing) return;
    this._scheduleReconnect({ code, reason });
  }

  _scheduleReconnect(detail) {
    if (this._closing) return;
    const cap = Math.min(this.options.maxDelayMs, this.options.baseDelayMs * 2 ** this.attempt);
    const delay = Math.round(cap / 2 + Math.random() * (cap / 2));
    this.attempt += 1;
    this.reconnects += 1;
    this._setStatus("reconnecting", { ...detail, delay, attempt: this.attempt });
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      if (!this._closing) this._open();
    }, delay);
  }
}
