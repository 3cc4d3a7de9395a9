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
  assert.deepEqual(ws.sent[0], { type: "send", to: "bob", body: "queued before hello", id: "c1" });
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
  ws.drop();
  await assert.rejects(inflight, (e) => e.code === "disconnected");
  assert.equal(c.status, "reconnecting");
  await tick(60);
  ws = FakeSocket.last();
  assert.equal(FakeSocket.all.length, 2);
  assert.equal(ws.url.searchParams.get("since"), "2");
  ws.frame({ type: "hello", user: "b", conn: "c2" });
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
