// Unit tests of clients/js/tidings.js against a fake WebSocket (node --test; no browser).
import assert from "node:assert/strict";
import { test } from "node:test";
import { TidingsClient, TidingsError } from "../../clients/js/tidings.js";

class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = new URL(url);
    this.sent = [];
    this.closed = null;
    FakeSocket.all.push(this);
  }
  send(data) { this.sent.push(JSON.parse(data)); }
  close(code = 1000, reason = "") { this.closed = { code, reason }; }
  // test side
  frame(obj) { this.onmessage({ data: JSON.stringify(obj) }); }
  drop(code = 1006) { this.onclose({ code, reason: "" }); }
  static last() { return FakeSocket.all[FakeSocket.all.length - 1]; }
}

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));

function client(extra = {}) {
  FakeSocket.all = [];
  const events = { messages: [], statuses: [] };
  const c = new TidingsClient({
    url: "ws://h/ws", token: "T", WebSocket: FakeSocket, baseDelayMs: 10, maxDelayMs: 40,
    ackDelayMs: 5, heartbeatMs: 100000,
    onMessage: (m) => events.messages.push(m), onStatus: (s, d) => events.statuses.push([s, d]),
    ...extra,
  });
  return { c, events };
}

const msg = (seq, text = `m${seq}`) => ({ type: "message", seq, msg_id: `id${seq}`, from: "a", to: "b", body: { text } });

test("connects with the token, resolves sends by id, rejects on error frames", async () => {
  const { c } = client();
  c.connect();
  await tick();
  const ws = FakeSocket.last();
  assert.equal(ws.url.searchParams.get("token"), "T");
  assert.equal(ws.url.searchParams.get("since"), null);
  const early = c.send("bob", "queued before hello");
  ws.frame({ type: "hello", user: "alice", conn: "c1" });
  assert.equal(c.status, "open");
  const { key, ...rest } = ws.sent[0];
  assert.deepEqual(rest, { type: "send", to: "bob", body: "queued before hello", id: "c1" });
  assert.match(key, /^[0-9a-f]{32}$/);
  ws.frame({ type: "ack", id: "c1", seq: 4, msg_id: "x", delivered: 1 });
  assert.equal((await early).seq, 4);
  const bad = c.send("bob", "x");
  ws.frame({ type: "error", id: ws.sent[1].id, code: "rate_limited", message: "slow down" });
  await assert.rejects(bad, (e) => e instanceof TidingsError && e.code === "rate_limited");
  c.close();
});

test("dedups by seq, batches acks, resumes with since= after a drop", async () => {
  const { c, events } = client();
  c.connect();
  await tick();
  let ws = FakeSocket.last();
  ws.frame({ type: "hello", user: "b", conn: "c1" });
  ws.frame(msg(1));
  ws.frame(msg(2));
  ws.frame(msg(2)); // duplicate
  assert.deepEqual(events.messages.map((m) => m.seq), [1, 2]);
  await tick(20);
  assert.deepEqual(ws.sent, [{ type: "ack", seq: 2 }]); // one batched ack
  const inflight = c.send("a", "in flight");
  const sendFrame = ws.sent[ws.sent.length - 1];
  const asked = c.presence(["x"]);
  ws.drop();
  await assert.rejects(asked, (e) => e.code === "disconnected");
  assert.equal(c.status, "reconnecting");
  await tick(60);
  ws = FakeSocket.last();
  assert.equal(FakeSocket.all.length, 2);
  assert.equal(ws.url.searchParams.get("since"), "2");
  ws.frame({ type: "hello", user: "b", conn: "c2" });
  // the send whose ack was lost goes out again, same id and key; its ack settles it
  assert.deepEqual(ws.sent.filter((f) => f.type === "send"), [sendFrame]);
  ws.frame({ type: "ack", id: sendFrame.id, msg_id: "m9", seq: 9, delivered: 0, duplicate: true });
  assert.equal((await inflight).duplicate, true);
  ws.frame(msg(2)); // replayed again by a racing server: not shown twice
  ws.frame(msg(3));
  assert.deepEqual(events.messages.map((m) => m.seq), [1, 2, 3]);
  c.close();
  assert.equal(c.status, "closed");
});

test("backoff grows with jitter, is capped, and resets after hello", async () => {
  const { c, events } = client({ baseDelayMs: 1000, maxDelayMs: 4000 });
  c.connect();
  await tick();
  for (let i = 0; i < 5; i++) {
    FakeSocket.last().drop();
    clearTimeout(c._retryTimer); // drive reconnects by hand
    c._retryTimer = null;
    c._open();
    await tick();
  }
  const delays = events.statuses.filter(([s]) => s === "reconnecting").map(([, d]) => d.delay);
  const caps = [1000, 2000, 4000, 4000, 4000];
  delays.forEach((d, i) => assert.ok(d >= caps[i] / 2 && d <= caps[i], `${d} vs ${caps[i]}`));
  FakeSocket.last().frame({ type: "hello", user: "b", conn: "c9" });
  assert.equal(c.attempt, 0);
  c.close();
});

test("close() stops reconnecting and rejects what is pending", async () => {
  const { c } = client();
  c.connect();
  await tick();
  const p = c.send("bob", "never sent");
  c.close();
  await assert.rejects(p, (e) => e.code === "closed");
  await tick(60);
  assert.equal(FakeSocket.all.length, 1);
});

test("every send has its own key; a resend keeps it; sends go out in order", async () => {
  const { c } = client();
  c.connect();
  await tick();
  let ws = FakeSocket.last();
  ws.frame({ type: "hello", user: "a", conn: "c1" });
  const first = c.send("b", 1);
  const second = c.send("b", 2, { key: "mine" });
  const keys = ws.sent.map((f) => f.key);
  assert.equal(keys[1], "mine");
  assert.notEqual(keys[0], keys[1]);
  ws.drop();
  const third = c.send("b", 3); // while disconnected: waits in the outbox
  await tick(60);
  ws = FakeSocket.last();
  ws.frame({ type: "hello", user: "a", conn: "c2" });
  assert.deepEqual(ws.sent.map((f) => [f.body, f.key]), [[1, keys[0]], [2, "mine"], [3, ws.sent[2].key]]);
  ws.sent.forEach((f, i) => ws.frame({ type: "ack", id: f.id, seq: i + 1, msg_id: `m${i}`, delivered: 1 }));
  assert.deepEqual((await Promise.all([first, second, third])).map((a) => a.seq), [1, 2, 3]);
  c.close();
});

test("the device name: given, else kept in storage, and the hello's wins", async () => {
  const store = new Map();
  const storage = { getItem: (k) => store.get(k) ?? null, setItem: (k, v) => store.set(k, v) };
  let { c } = client({ storage });
  c.connect();
  await tick();
  const made = FakeSocket.last().url.searchParams.get("device");
  assert.match(made, /^web-[0-9a-f]{8}$/);
  assert.equal(store.get("tidings.device"), made);
  c.close();
  ({ c } = client({ storage }));
  c.connect();
  await tick();
  assert.equal(FakeSocket.last().url.searchParams.get("device"), made); // kept
  FakeSocket.last().frame({ type: "hello", user: "a", conn: "c1", device: "from-token", unread: 4 });
  assert.deepEqual([c.device, c.unread], ["from-token", 4]);
  c.close();
  ({ c } = client({ device: "phone", storage }));
  c.connect();
  await tick();
  assert.equal(FakeSocket.last().url.searchParams.get("device"), "phone");
  c.close();
  const broken = { getItem: () => { throw new Error("denied"); }, setItem: () => {} };
  ({ c } = client({ storage: broken }));
  c.connect();
  await tick();
  assert.match(FakeSocket.last().url.searchParams.get("device"), /^web-[0-9a-f]{8}$/);
  c.close();
});
