/**
 * Tidings browser client: a dependency-free ES module (also runs on Node >= 22 or
 * with any WebSocket implementation passed as `WebSocket`).
 *
 *   import { TidingsClient } from "/tidings.js";
 *   const c = new TidingsClient({ url: "wss://chat.example/ws", token, onMessage, onStatus });
 *   c.connect();
 *   const ack = await c.send("bob", { text: "hi" });   // the server's ack frame
 *   c.close();
 *
 * Contract
 * - `token`: a string, or a (possibly async) function returning one; it is called
 *   before every (re)connect, so an expiring token can be replaced.  `user` is sent
 *   as ?user= (only accepted by a daemon running with auth.mode = "insecure").
 * - Reconnect: any close not asked for by close() schedules a reconnect after
 *   min(maxDelayMs, baseDelayMs * 2^attempt) with equal jitter (half fixed, half
 *   random); `attempt` resets when the server's hello arrives.
 * - Resume: `lastSeq` is the highest inbox seq handed to onMessage.  A reconnect asks
 *   for ?since=lastSeq, and a message with seq <= lastSeq is never delivered twice.
 * - Acks: delivered seqs are acknowledged in batches ({"type":"ack","seq":N} with the
 *   highest N) after ackDelayMs or every ackBatch messages, and when closing.
 * - send(to, body): a Promise resolved with the matching ack frame (by id), rejected
 *   with a TidingsError: the server's error code, or "disconnected" when the
 *   connection dropped before the ack (the message may or may not have been stored).
 *   A send issued while disconnected waits in an outbox and goes out after the
 *   next hello (it was never on the wire, so it cannot be duplicated).
 * - Callbacks: onMessage(frame), onPresence(frame), onStatus(status, detail) with
 *   status "connecting" | "open" | "reconnecting" | "closed", onError(frame) for
 *   error frames that answer no pending request.  A throwing callback is reported
 *   on the console and never breaks the client.
 * - Heartbeat: after heartbeatMs without any frame the client pings; no reply within
 *   heartbeatTimeoutMs closes the socket (and so reconnects).
 */

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
    this._failPending("closed", "client closed", true);
    this._setStatus("closed", { code });
  }

  /** Send `body` to user `to`; resolves with the ack frame. */
  send(to, body, extra = {}) {
    return this.request({ type: "send", to, body, ...extra });
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

  _failPending(code, message, all) {
    for (const [id, waiter] of this._pending) {
      if (!all && !waiter.sent) continue; // unsent frames wait in the outbox
      this._pending.delete(id);
      waiter.reject(new TidingsError(code, message, waiter.frame));
    }
    if (all) this._outbox = [];
  }

  _onClose(code, reason) {
    this._stopHeartbeat();
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
    this._ackedSeq = 0; // the server may have missed the last ack: resend it next time
    this._failPending("disconnected", "connection lost before the reply; the request may or may not have been applied", false);
    for (const [id, waiter] of this._pending) if (!waiter.sent && !this._outbox.includes(id)) this._outbox.push(id);
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
