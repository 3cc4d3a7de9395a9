// Drives the daemon's demo page (http.demo = true, auth.mode = "insecure") in headless
// Chromium with two pages, alice and bob.  Run by tests/test_browser.py, which owns the
// daemon: this script prints one JSON object per line on stdout ({"event": ...}) and
// waits for the test's commands ("killed", "restarted") on stdin.
//
// The kill -9 comes in the middle of sends: alice's page is sending BURST messages, 2 ms
// apart, when the test kills the daemon (after 30 of them were acked), and the ack of
// one more ("lost-ack-1", stored before the kill) never reached the client.  After the
// restart the client resends every unacked send with its key: each is stored once.
//
//   node demo.mjs BASE_URL ALICE BOB [CHROMIUM]
import { commands, launch, say } from "./harness.mjs";

const [base, alice, bob, executablePath = "/usr/bin/chromium"] = process.argv.slice(2);
const T = 20000;
const BURST = 100;
async function expectCommand(name) {
  const { value, done } = await commands.next();
  if (done || value.trim() !== name) throw new Error(`expected command ${name}, got ${value}`);
}

const browser = await launch(executablePath);
const problems = [];
const consoleErrors = [];

async function openPage(user) {
  const context = await browser.newContext();
  const page = await context.newPage();
  // Console errors while the daemon is down (refused WebSocket) and the favicon 404 are
  // expected; uncaught exceptions in the page are not.
  page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(`${user}: ${m.text()}`); });
  page.on("pageerror", (e) => problems.push(`${user} page error: ${e.message}`));
  await page.goto(base + "/", { timeout: T });
  await page.fill("#user", user);
  await page.click("#connect");
  await page.waitForSelector('#status[data-status="open"]', { timeout: T });
  return page;
}

async function send(page, to, text) {
  await page.fill("#to", to);
  await page.fill("#body", text);
  await page.click("#send");
}

async function sendAcked(page, to, text) {
  await send(page, to, text);
  await page.waitForSelector(`#messages li.out[data-text="${text}"]`, { timeout: T });
}

const seen = (page, text) =>
  page.waitForSelector(`#messages li.in[data-text="${text}"]`, { timeout: T, state: "attached" });

const received = (page) =>
  page.$$eval("#messages li.in", (lis) => lis.map((li) => ({ text: li.dataset.text, seq: Number(li.dataset.seq), from: li.dataset.from })));

let a = null;
try {
  a = await openPage(alice);
  const b = await openPage(bob);
  say("connected");
  for (const text of ["before-1", "before-2", "before-3"]) await sendAcked(a, bob, text);
  await sendAcked(b, alice, "reply-1");
  for (const text of ["before-1", "before-2", "before-3"]) await seen(b, text);
  await seen(a, "reply-1");
  await a.evaluate(({ to, n }) => {
    const c = window.tidings;
    const run = (window.exactly = { acks: {}, errors: [], lostId: null, lostAckDropped: false, issued: 0 });
    const onFrame = c._onFrame.bind(c);
    c._onFrame = (data) => { // the ack of lost-ack-1 is lost, as if with its connection
      const f = JSON.parse(data);
      if (f.type === "ack" && f.id === run.lostId && !run.lostAckDropped) { run.lostAckDropped = true; return; }
      onFrame(data);
    };
    const send = (text) => c.send(to, { text }).then(
      (ack) => { run.acks[text] = ack; }, (err) => { run.errors.push(`${text}: ${err.code}`); });
    send("lost-ack-1");
    run.lostId = [...c._pending.keys()].pop();
    const timer = setInterval(() => {
      if (run.issued >= n) { clearInterval(timer); return; }
      send(`burst-${run.issued++}`);
    }, 2);
  }, { to: bob, n: BURST });
  await a.waitForFunction(() => window.exactly.lostAckDropped && Object.keys(window.exactly.acks).length >= 30,
                          null, { timeout: T });
  say("ready_for_kill");
  await expectCommand("killed");
  const ackedAtKill = await a.evaluate(() => Object.keys(window.exactly.acks).length);
  for (const p of [a, b]) await p.waitForSelector('#status:not([data-status="open"])', { timeout: T });
  await a.waitForFunction((n) => window.exactly.issued >= n, BURST, { timeout: T });
  // Sent while the daemon is down: waits in the client's outbox, goes out after hello.
  await send(a, bob, "offline-1");
  say("ready_for_restart");
  await expectCommand("restarted");
  const t0 = Date.now();
  for (const p of [a, b]) await p.waitForSelector('#status[data-status="open"]', { timeout: T });
  const reconnectMs = Date.now() - t0;
  await a.waitForSelector('#messages li.out[data-text="offline-1"]', { timeout: T });
  await a.waitForFunction((n) => Object.keys(window.exactly.acks).length === n + 1, BURST, { timeout: T });
  await sendAcked(a, bob, "after-1");
  await seen(b, "offline-1");
  await seen(b, "after-1");
  await b.waitForTimeout(500); // a late duplicate would show up here
  say("result", {
    bob: await received(b),
    alice: await received(a),
    reconnects: { alice: await a.evaluate(() => window.tidings.reconnects),
                  bob: await b.evaluate(() => window.tidings.reconnects) },
    reconnectMs,
    exactly: { ...(await a.evaluate(() => window.exactly)), ackedAtKill },
    problems,
    consoleErrors,
  });
} catch (err) {
  const exactly = a && await a.evaluate(() => window.exactly).catch(() => null);
  say("failed", { error: String(err && err.stack || err), problems, exactly });
  process.exitCode = 1;
} finally {
  await browser.close();
}
