#!/usr/bin/env node
// Tidings load generator (a benchmark tool, not a test).
//
// Modes
//   closed : P sender->receiver pairs, each sender keeps W messages in flight.
//            A message is done when its RECEIVER gets it; the receiver's handler
//            then makes the sender send the next one.  Latency = receive - send.
//   open   : a fixed total rate R msgs/s spread over the P pairs on a timer
//            schedule.  Latency is measured from the SCHEDULED send time, so a
//            stall (in the server or in the generator) is charged to every message
//            that should have been sent during it (no coordinated omission).
//   idle   : open N connections (users <prefix>u0..u<N-1>), wait for every hello,
//            print {"event":"ready","conns":N,"failed_connects":F,"storm_s":S} on stdout
//            (S = first connect attempt to last hello, across workers; a connection that
//            times out or is refused is counted in F, not fatal), hold them --hold
//            seconds, close.
//            While holding, each line "stats" on stdin prints one
//            {"event":"stats","pings":N,"open":N,"ping_gap_mean_s":S,...} line (pings
//            received so far, sockets still open, the ping period the clients see:
//            ping -> next ping on a socket; `ws` answers each ping with a pong);
//            any other line, or --hold seconds passing, closes them and prints the result.
//
// Protocols (--proto)
//   tidings : connect <url>?user=<id>, wait for {"type":"hello"}; senders send
//             {"type":"send","to":<receiver>,"body":"~ts=<us>;xxxx","id":"<n>"};
//             acks on the sender socket are drained; the receiver gets
//             {"type":"message",...,"body":"~ts=<us>;xxxx",...}.
//   echo    : one socket per pair; the echo server returns the frame on the same
//             socket (ceiling of the generator itself).
//
// Sender and receiver of a pair always live in the same worker process, so the
// timestamp embedded in the body (performance.now() in microseconds) is compared
// against the same clock.  --procs N forks N worker processes (pairs/connections
// are split round-robin) so the generator is never the bottleneck; each worker
// reports its own CPU use so the caller can check that.
//
// Source addresses (--source-addrs K, default 64): against a loopback URL, connection i
// is made from 127.0.0.(2 + i % K) instead of 127.0.0.1.  Linux picks a connect()'s
// ephemeral port by scanning the even ports first for a free (source, port, destination)
// tuple: once ~14,000 connections from one address to one server port exist, every
// further connect() scans all of them (~1.1 ms of kernel CPU each here, against ~30 us
// below that), which made the generator, not the server, the limit of an 18,000
// connection storm.  A source address means a bind() before the connect, and bind()
// treats a port in TIME_WAIT on that address as taken: the sockets of the previous
// storms (60 s of TIME_WAIT, on our side since we close first) fill an address's ports
// too.  8 addresses degraded to >1 ms a connect by the fourth storm of 18,000 within a
// minute; 64 stayed at ~30 us with 90,000 sockets in TIME_WAIT.  Bytes on the wire are
// unchanged; only the peer address differs.  K = 0: the kernel picks (127.0.0.1).
//
// Output: one JSON object on stdout (progress/diagnostics on stderr).

import { fork } from 'node:child_process';
import { performance } from 'node:perf_hooks';
import { randomBytes } from 'node:crypto';
import process from 'node:process';
import { Worker } from 'node:worker_threads';
import WebSocket from 'ws';

const TICKER_SRC = `
const { parentPort, workerData } = require('node:worker_threads');
const { performance } = require('node:perf_hooks');
const cell = new Int32Array(new SharedArrayBuffer(4));
const gapMs = workerData.gapUs / 1000;
let next = performance.now() + gapMs;
for (;;) {
  const wait = next - performance.now();
  if (wait > 0) Atomics.wait(cell, 0, 0, wait);
  parentPort.postMessage(0);
  next += gapMs;
  const now = performance.now();
  if (next < now) next = now + gapMs;
}
`;

// ---------------------------------------------------------------- arguments
function parseArgs(argv) {
  const opts = {
    mode: 'closed',
    url: 'ws://127.0.0.1:8765/ws',
    url2: '',
    proto: 'tidings',
    pairs: 50,
    window: 20,
    size: 100,
    duration: 10,
    warmup: 2,
    rate: 5000,
    conns: 5000,
    hold: 5,
    procs: 1,
    prefix: '',
    clientAck: 0,
    connectConcurrency: 100,
    connectTimeout: 30,
    sourceAddrs: 64,
    drain: 3,
    tickUs: 200,
    slowMs: 0,
    worker: -1,
  };
  const keys = {
    '--mode': ['mode', String], '--url': ['url', String], '--url2': ['url2', String], '--proto': ['proto', String],
    '--pairs': ['pairs', Number], '-P': ['pairs', Number],
    '--window': ['window', Number], '-W': ['window', Number],
    '--size': ['size', Number], '-S': ['size', Number],
    '--duration': ['duration', Number], '-D': ['duration', Number],
    '--warmup': ['warmup', Number], '--rate': ['rate', Number], '-R': ['rate', Number],
    '--conns': ['conns', Number], '-N': ['conns', Number], '--hold': ['hold', Number],
    '--procs': ['procs', Number], '--prefix': ['prefix', String],
    '--client-ack': ['clientAck', Number],
    '--connect-concurrency': ['connectConcurrency', Number],
    '--connect-timeout': ['connectTimeout', Number], '--source-addrs': ['sourceAddrs', Number],
    '--drain': ['drain', Number], '--tick-us': ['tickUs', Number], '--slow-ms': ['slowMs', Number], '--worker': ['worker', Number],
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '-h' || a === '--help') {
      process.stdout.write(USAGE);
      process.exit(0);
    }
    let k = a, v;
    const eq = a.indexOf('=');
    if (a.startsWith('--') && eq > 0) { k = a.slice(0, eq); v = a.slice(eq + 1); }
    const spec = keys[k];
    if (!spec) { process.stderr.write(`unknown argument ${a}\n${USAGE}`); process.exit(2); }
    if (v === undefined) v = argv[++i];
    opts[spec[0]] = spec[1](v);
    if (spec[1] === Number && !Number.isFinite(opts[spec[0]])) {
      process.stderr.write(`bad number for ${k}: ${v}\n`); process.exit(2);
    }
  }
  if (!['closed', 'open', 'idle'].includes(opts.mode)) { process.stderr.write(`bad --mode\n`); process.exit(2); }
  if (!['tidings', 'echo'].includes(opts.proto)) { process.stderr.write(`bad --proto\n`); process.exit(2); }
  if (!opts.prefix) opts.prefix = 'b' + randomBytes(4).toString('hex');
  if (!/^[A-Za-z0-9]+$/.test(opts.prefix)) { process.stderr.write('--prefix must be alphanumeric\n'); process.exit(2); }
  opts.procs = Math.max(1, Math.floor(opts.procs));
  opts.sourceAddrs = Math.max(0, Math.min(250, Math.floor(opts.sourceAddrs)));
  return opts;
}

const USAGE = `usage: node loadgen.mjs --mode closed|open|idle --url ws://127.0.0.1:PORT/ws
  [--proto tidings|echo] [--procs N]
  closed: [-P pairs=50] [-W window=20] [-S size=100] [-D duration=10] [--warmup 2]
  open:   [-R rate=5000] [-P pairs=50] [-S size=100] [-D duration=10] [--warmup 2] [--drain 3] [--tick-us 200]
  idle:   [-N conns=5000] [--hold 5] [--connect-concurrency 100]
          stdin while holding: "stats" -> one {"event":"stats",...} line; any other line -> close
  [--prefix RUNID] (alphanumeric; random by default: user ids are <prefix>s<k>/<prefix>r<k>/<prefix>u<i>)
  [--source-addrs K=64] against a loopback URL, spread connections over 127.0.0.2..127.0.0.(K+1)
               (0 = kernel's choice, 127.0.0.1); see "Source addresses" at the top
  [--slow-ms T] open: also list every in-window message slower than T ms as
               [scheduled send, epoch ms; latency ms] ("slow", at most 100,000)
  [--client-ack K] receivers send {"type":"ack","seq":N} every K messages (0 = never)
  [--url2 URL] tidings closed/open: receivers connect here, senders to --url (pairs split
               across two cluster nodes); default: everything on --url
`;

// ---------------------------------------------------------------- histogram
// Log-linear histogram of microseconds: exact below 256 us, then 128 sub-buckets
// per power of two (< 0.4 % relative error).  Max is tracked exactly.
const HBUCKETS = 256 + 26 * 128;
class Hist {
  constructor() { this.c = new Float64Array(HBUCKETS); this.n = 0; this.max = 0; this.sum = 0; }
  add(us) {
    if (us < 0) us = 0;
    const v = Math.round(us);
    let i;
    if (v < 256) i = v;
    else {
      const e = 31 - Math.clz32(v) - 7;
      i = 256 + (e - 1) * 128 + ((v >>> e) - 128);
      if (i >= HBUCKETS) i = HBUCKETS - 1;
    }
    this.c[i]++; this.n++; this.sum += us;
    if (us > this.max) this.max = us;
  }
  static value(i) {
    if (i < 256) return i;
    const e = Math.floor((i - 256) / 128) + 1;
    const sub = ((i - 256) % 128) + 128;
    return (sub + 0.5) * 2 ** e;
  }
  toJSON() {
    const nz = {};
    for (let i = 0; i < HBUCKETS; i++) if (this.c[i]) nz[i] = this.c[i];
    return { nz, n: this.n, max: this.max, sum: this.sum };
  }
  merge(o) {
    for (const [i, c] of Object.entries(o.nz)) this.c[+i] += c;
    this.n += o.n; this.sum += o.sum; if (o.max > this.max) this.max = o.max;
  }
  quantile(q) {
    if (!this.n) return null;
    const target = Math.max(1, Math.ceil(q * this.n));
    let acc = 0;
    for (let i = 0; i < HBUCKETS; i++) {
      acc += this.c[i];
      if (acc >= target) return Math.min(Hist.value(i), this.max);
    }
    return this.max;
  }
  summaryMs() {
    const r = (x) => (x == null ? null : Math.round(x) / 1000);
    return {
      n: this.n, mean: this.n ? r(this.sum / this.n) : null,
      p50: r(this.quantile(0.5)), p90: r(this.quantile(0.9)), p99: r(this.quantile(0.99)),
      p999: r(this.quantile(0.999)), max: r(this.max),
    };
  }
}

// ---------------------------------------------------------------- helpers
const MARK = Buffer.from('~ts=');
const nowUs = () => performance.now() * 1000;

// Parse the integer after "~ts=" in a frame; -1 if the frame carries no stamp.
function stampOf(buf) {
  const i = buf.indexOf(MARK);
  if (i < 0) return -1;
  let v = 0;
  for (let j = i + 4; j < buf.length; j++) {
    const ch = buf[j];
    if (ch < 48 || ch > 57) break;
    v = v * 10 + (ch - 48);
  }
  return v;
}

const SEQ_RE = /"seq"\s*:\s*(\d+)/;
const ERR_RE = /"type"\s*:\s*"error"/;

function sleep(ms) { return new Promise((r) => setTimeout(r, ms)); }

// The source address of this worker's n-th connection to `url` (see "Source addresses"
// at the top): undefined (the kernel's choice) unless the host is an IPv4 loopback address.
let connectsMade = 0;
function sourceAddress(url, opts) {
  if (!opts.sourceAddrs || !/^127\./.test(new URL(url).hostname)) return undefined;
  return `127.0.0.${2 + (connectsMade++ % opts.sourceAddrs)}`;
}

// Open one socket; resolves once it is ready (hello received, or open for echo).
function openSocket(url, user, opts, stats, onFrame) {
  return new Promise((resolve, reject) => {
    const full = opts.proto === 'tidings' ? `${url}${url.includes('?') ? '&' : '?'}user=${user}` : url;
    const ws = new WebSocket(full, { perMessageDeflate: false, maxPayload: 16 * 1024 * 1024,
      localAddress: sourceAddress(url, opts) });
    let ready = false;
    const timer = setTimeout(() => {
      if (!ready) { stats.connectErrors++; ws.terminate(); reject(new Error(`connect timeout ${user}`)); }
    }, opts.connectTimeout * 1000);
    ws.on('unexpected-response', (req, res) => {
      stats.connectErrors++;
      stats.lastError = `HTTP ${res.statusCode} for ${user}`;
      clearTimeout(timer);
      req.destroy();
      reject(new Error(stats.lastError));
    });
    ws.on('error', (e) => {
      stats.socketErrors++;
      stats.lastError = String(e && e.message);
      if (!ready) { clearTimeout(timer); reject(e); }
    });
    // the ping period as this client sees it: ping -> next ping (after our pong)
    let mark = 0;
    ws.on('ping', () => {
      stats.pings++;
      const t = performance.now();
      if (mark) {
        const gap = t - mark;
        stats.gapN++; stats.gapSum += gap;
        if (gap < stats.gapMin) stats.gapMin = gap;
        if (gap > stats.gapMax) stats.gapMax = gap;
      }
      mark = t;
    });
    ws.on('close', (code) => {
      stats.closed++;
      // a socket that never got its hello is a failed connect (counted by the caller)
      if (!stats.stopping && ready) { stats.unexpectedCloses++; stats.lastClose = code; }
    });
    ws.on('message', (data, isBinary) => {
      if (!ready) {
        // tidings: the first frame is the hello; echo: our echo server also says hello.
        ready = true;
        clearTimeout(timer);
        resolve(ws);
        return;
      }
      onFrame(ws, data);
    });
  });
}

// Open many sockets with bounded concurrency.  tolerant: a connection that fails
// (timeout, HTTP refusal, reset) is counted in stats.failedConnects and left null
// instead of failing the whole run; stats.lastHello = when the last hello arrived.
async function openMany(specs, opts, stats, tolerant = false) {
  const out = new Array(specs.length);
  let next = 0;
  async function lane() {
    while (next < specs.length) {
      const i = next++;
      const s = specs[i];
      try {
        out[i] = await openSocket(s.url || opts.url, s.user, opts, stats, s.onFrame);
        stats.lastHello = performance.timeOrigin + performance.now();
      } catch (e) {
        if (!tolerant) throw e;
        stats.failedConnects++;
        out[i] = null;
      }
    }
  }
  const lanes = [];
  for (let k = 0; k < Math.min(opts.connectConcurrency, specs.length); k++) lanes.push(lane());
  await Promise.all(lanes);
  return out;
}

// ---------------------------------------------------------------- worker
async function runWorker(opts, wid) {
  const stats = {
    connectErrors: 0, socketErrors: 0, closed: 0, unexpectedCloses: 0, stopping: false, pings: 0, failedConnects: 0, lastHello: 0,
    gapN: 0, gapSum: 0, gapMin: Infinity, gapMax: 0,
    lastError: null, lastClose: null,
    sent: 0, received: 0, acks: 0, errors: 0, other: 0, lastErrorFrame: null,
  };
  const send = (m) => process.send(m);
  const myIdx = [];
  const total = opts.mode === 'idle' ? opts.conns : opts.pairs;
  for (let k = wid; k < total; k += opts.procs) myIdx.push(k);

  if (opts.mode === 'idle') {
    // wall-clock ms (comparable across worker processes) of the first connect attempt
    const firstConnect = performance.timeOrigin + performance.now();
    const specs = myIdx.map((i) => ({ user: `${opts.prefix}u${i}`, onFrame: () => { stats.other++; } }));
    // a storm of thousands: one refused or timed-out connection is reported, not fatal
    const socks = (await openMany(specs, opts, stats, true)).filter((ws) => ws !== null);
    send({ type: 'ready', wid, n: socks.length, failed: stats.failedConnects, firstConnect,
      lastHello: stats.lastHello || firstConnect, lastError: stats.lastError });
    await new Promise((res) => process.on('message', (m) => {
      if (m.cmd === 'close') res();
      else if (m.cmd === 'stats') {
        const open = socks.reduce((a, ws) => a + (ws.readyState === WebSocket.OPEN ? 1 : 0), 0);
        send({ type: 'stats', wid, seq: m.seq, pings: stats.pings, open,
          unexpectedCloses: stats.unexpectedCloses, lastClose: stats.lastClose,
          gapN: stats.gapN, gapSum: stats.gapSum, gapMin: stats.gapN ? stats.gapMin : null, gapMax: stats.gapMax });
      }
    }));
    stats.stopping = true;
    for (const ws of socks) ws.terminate();
    send({ type: 'result', wid, stats });
    return;
  }

  // --- pairs
  const S = opts.size;
  const pad = 'x'.repeat(Math.max(0, S));
  const pairs = myIdx.map((k) => ({
    k, to: `${opts.prefix}r${k}`, sender: null, receiver: null, n: 0, unacked: 0, lastSeq: 0,
  }));
  const lat = new Hist();      // latency (closed: from send; open: from scheduled send)
  const svc = new Hist();      // open loop: latency from the actual send
  const lag = new Hist();      // open loop: actual send - scheduled send (generator lag)
  let measuring = false, running = false, mStart = 0, mEnd = Infinity;
  let measured = 0;            // receipts counted for throughput
  let outstanding = 0;         // open loop: in-window messages not yet received
  // open loop: per 100 ms of scheduled time in the window, [messages, > 5 ms, > 10 ms,
  // max latency us, max send lag us]: when the tail happened (a stall, or spread out)
  const buckets = new Map();
  const slow = [];             // open loop, --slow-ms: [scheduled epoch ms, latency ms]
  function bucket(st) {
    const k = Math.floor((st - mStart) / 1e5);
    let b = buckets.get(k);
    if (!b) { b = [0, 0, 0, 0, 0]; buckets.set(k, b); }
    return b;
  }
  // open loop: scheduled stamp -> actual send time (only needed for svc histogram);
  // we embed both in the body: "~ts=<sched>;<actual>;xxx".
  const open = opts.mode === 'open';

  function body(stampUs, actualUs) {
    const head = open ? `~ts=${stampUs};${actualUs};` : `~ts=${stampUs};`;
    return head.length >= S ? head : head + pad.slice(head.length);
  }
  function sendOne(p, stampUs, actualUs) {
    p.n++;
    const b = body(stampUs, actualUs);
    p.sender.send(`{"type":"send","to":"${p.to}","body":"${b}","id":"${p.n}"}`);
    stats.sent++;
  }

  function onDelivery(p, data) {
    const t = nowUs();
    const st = stampOf(data);
    if (st < 0) return false;
    stats.received++;
    if (open) {
      // data: ...~ts=<sched>;<actual>;...
      const i = data.indexOf(MARK);
      let j = i + 4; while (data[j] !== 59) j++;
      let a = 0; for (j = j + 1; j < data.length; j++) { const ch = data[j]; if (ch < 48 || ch > 57) break; a = a * 10 + (ch - 48); }
      if (st >= mStart && st < mEnd) {
        lat.add(t - st); svc.add(t - a); measured++; outstanding--;
        const b = bucket(st), l = t - st;
        b[0]++; if (l > 5000) b[1]++; if (l > 10000) b[2]++; if (l > b[3]) b[3] = l;
        if (a - st > b[4]) b[4] = a - st;
        if (opts.slowMs > 0 && l > opts.slowMs * 1000 && slow.length < 100000) {
          slow.push([Math.round(performance.timeOrigin * 10 + st / 100) / 10, Math.round(l / 10) / 100]);
        }
      }
    } else {
      if (measuring && t >= mStart && t < mEnd) { lat.add(t - st); measured++; }
      if (running) sendOne(p, Math.round(nowUs()), 0);
    }
    if (opts.clientAck > 0 && opts.proto === 'tidings') {
      const m = SEQ_RE.exec(data.toString('latin1'));
      if (m) {
        p.lastSeq = Number(m[1]);
        if (++p.unacked >= opts.clientAck) {
          p.unacked = 0;
          p.receiver.send(`{"type":"ack","seq":${p.lastSeq}}`);
        }
      }
    }
    return true;
  }
  function onOther(p, data) {
    if (ERR_RE.test(data.toString('latin1'))) {
      stats.errors++;
      if (!stats.lastErrorFrame) stats.lastErrorFrame = data.toString().slice(0, 300);
      // a refused send never reaches the receiver: keep the closed loop's window full
      if (!open && running) sendOne(p, Math.round(nowUs()), 0);
    } else stats.acks++;
  }

  const specs = [];
  if (opts.proto === 'tidings') {
    for (const p of pairs) specs.push({ user: `${opts.prefix}r${p.k}`, p, role: 'r', url: opts.url2 || opts.url,
      onFrame: (ws, d) => { if (!onDelivery(p, d)) onOther(p, d); } });
    for (const p of pairs) specs.push({ user: `${opts.prefix}s${p.k}`, p, role: 's',
      onFrame: (ws, d) => { if (stampOf(d) >= 0) onDelivery(p, d); else onOther(p, d); } });
  } else {
    for (const p of pairs) specs.push({ user: `${opts.prefix}e${p.k}`, p, role: 'e',
      onFrame: (ws, d) => { if (!onDelivery(p, d)) onOther(p, d); } });
  }
  let socks;
  try { socks = await openMany(specs, opts, stats); } catch (e) {
    send({ type: 'fatal', wid, error: String(e.message || e), stats }); return;
  }
  specs.forEach((s, i) => {
    if (s.role === 'r') s.p.receiver = socks[i];
    else if (s.role === 's') s.p.sender = socks[i];
    else { s.p.sender = socks[i]; s.p.receiver = socks[i]; }
  });
  send({ type: 'ready', wid, n: socks.length });
  await new Promise((res) => process.on('message', (m) => { if (m.cmd === 'go') res(); }));

  const t0 = performance.now();
  mStart = (t0 + opts.warmup * 1000) * 1000;         // microseconds
  mEnd = mStart + opts.duration * 1e6;
  running = true;
  let cpuStart = null, cpuEnd = null;
  setTimeout(() => { measuring = true; cpuStart = process.cpuUsage(); }, opts.warmup * 1000);

  if (!open) {
    for (const p of pairs) for (let i = 0; i < opts.window; i++) sendOne(p, Math.round(nowUs()), 0);
    await sleep(opts.warmup * 1000 + opts.duration * 1000);
    cpuEnd = process.cpuUsage(cpuStart);
    running = false; measuring = false;
    await sleep(200);
  } else {
    // every pair sends at rate/pairs, staggered evenly across the interval
    const intervalUs = (1e6 * opts.pairs) / opts.rate;
    const firstUs = t0 * 1000 + 1000;
    for (const p of pairs) p.next = firstUs + (intervalUs * p.k) / opts.pairs;
    const stopUs = mEnd;
    // Node timers are 1 ms granular (libuv loop time is in ms), which alone adds
    // ~1-2 ms of send lag.  A ticker thread sleeps with Atomics.wait (sub-ms precision)
    // and pokes this thread every `gap` us; each poke sends every message now due.
    const gapUs = Math.max(opts.tickUs, 1e6 / (opts.rate * pairs.length / opts.pairs));
    const ticker = new Worker(TICKER_SRC, { eval: true, workerData: { gapUs } });
    await new Promise((resolve) => {
      let done = false;
      function tick() {
        if (done) return;
        const now = nowUs();
        let earliest = Infinity;
        for (const p of pairs) {
          while (p.next <= now && p.next < stopUs) {
            const sched = Math.round(p.next);
            if (sched >= mStart && sched < mEnd) outstanding++;
            const actual = Math.round(nowUs());
            if (sched >= mStart) lag.add(actual - sched);
            sendOne(p, sched, actual);
            p.next += intervalUs;
          }
          if (p.next < earliest) earliest = p.next;
        }
        if (earliest >= stopUs) { done = true; ticker.terminate(); resolve(); }
      }
      ticker.on('message', tick);
      tick();
    });
    cpuEnd = process.cpuUsage(cpuStart);
    running = false;
    const deadline = performance.now() + opts.drain * 1000;
    while (outstanding > 0 && performance.now() < deadline) await sleep(20);
  }
  stats.stopping = true;
  send({
    type: 'result', wid, stats, measured, outstanding: open ? outstanding : 0,
    lat: lat.toJSON(), svc: svc.toJSON(), lag: lag.toJSON(), buckets: [...buckets.entries()],
    windowStartEpochMs: performance.timeOrigin + mStart / 1000, slow,
    cpuMs: cpuEnd ? (cpuEnd.user + cpuEnd.system) / 1000 : null,
  });
  for (const ws of socks) { try { ws.close(1000); } catch { /* ignore */ } }
  await sleep(300);
  for (const ws of socks) ws.terminate();
}

// ---------------------------------------------------------------- primary
async function runPrimary(opts) {
  const self = new URL(import.meta.url).pathname;
  const workers = [];
  const msgs = [];
  const waiters = [];
  function waitFor(pred, n) {
    return new Promise((resolve) => {
      const check = () => {
        const got = msgs.filter(pred);
        if (got.length >= n) { resolve(got); return true; }
        return false;
      };
      if (!check()) waiters.push(check);
    });
  }
  let fatal = null;
  for (let w = 0; w < opts.procs; w++) {
    const child = fork(self, ['--worker', String(w)], {
      stdio: ['ignore', 'ignore', 'inherit', 'ipc'],
      env: { ...process.env, LOADGEN_OPTS: JSON.stringify(opts) },
    });
    child.on('message', (m) => {
      if (m.type === 'fatal') {
        fatal = m;
        process.stderr.write(`loadgen worker ${m.wid} failed: ${m.error} ${JSON.stringify(m.stats)}\n`);
        process.stdout.write(JSON.stringify({ error: m.error, mode: opts.mode, stats: m.stats }) + '\n');
        process.exit(1);
      }
      msgs.push(m);
      for (let i = waiters.length - 1; i >= 0; i--) if (waiters[i]()) waiters.splice(i, 1);
    });
    child.on('exit', (code) => {
      if (code && !fatal) { process.stderr.write(`loadgen worker ${w} exited ${code}\n`); }
    });
    workers.push(child);
  }
  const tReady = performance.now();
  const readies = await waitFor((m) => m.type === 'ready', opts.procs);
  const readyMs = performance.now() - tReady;

  if (opts.mode === 'idle') {
    const n = readies.reduce((a, m) => a + m.n, 0);
    const failed = readies.reduce((a, m) => a + m.failed, 0);
    const stormS = (Math.max(...readies.map((m) => m.lastHello)) - Math.min(...readies.map((m) => m.firstConnect))) / 1000;
    process.stdout.write(JSON.stringify({ event: 'ready', conns: n, failed_connects: failed, connect_s: readyMs / 1000,
      storm_s: Math.round(stormS * 1000) / 1000,
      last_connect_error: readies.map((m) => m.lastError).find((e) => e) || undefined }) + '\n');
    // the harness samples the server now; "stats" lines on stdin ask for counters, any
    // other line (or --hold seconds) ends the hold
    let statsSeq = 0;
    await new Promise((resolve) => {
      const t = setTimeout(resolve, opts.hold * 1000);
      let buf = '';
      process.stdin.on('data', async (chunk) => {
        buf += chunk.toString();
        let nl;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, nl).trim();
          buf = buf.slice(nl + 1);
          if (line !== 'stats') { clearTimeout(t); resolve(); return; }
          const seq = ++statsSeq;
          for (const c of workers) c.send({ cmd: 'stats', seq });
          const got = await waitFor((m) => m.type === 'stats' && m.seq === seq, opts.procs);
          const st = { event: 'stats', pings: 0, open: 0, unexpected_closes: 0, t: Date.now() / 1000,
            ping_gap_n: 0, ping_gap_mean_s: null, ping_gap_min_s: null, ping_gap_max_s: null };
          let gapSum = 0;
          for (const m of got) {
            st.pings += m.pings; st.open += m.open; st.unexpected_closes += m.unexpectedCloses;
            if (m.lastClose) st.last_close_code = m.lastClose;
            st.ping_gap_n += m.gapN; gapSum += m.gapSum;
            if (m.gapMin != null) st.ping_gap_min_s = Math.min(st.ping_gap_min_s ?? Infinity, m.gapMin / 1000);
            if (m.gapN) st.ping_gap_max_s = Math.max(st.ping_gap_max_s ?? 0, m.gapMax / 1000);
          }
          if (st.ping_gap_n) st.ping_gap_mean_s = gapSum / st.ping_gap_n / 1000;
          process.stdout.write(JSON.stringify(st) + '\n');
        }
      });
      process.stdin.on('end', () => {});
    });
    process.stdin.pause();
    for (const c of workers) c.send({ cmd: 'close' });
    const res = await waitFor((m) => m.type === 'result', opts.procs);
    const agg = aggStats(res);
    process.stdout.write(JSON.stringify({ mode: 'idle', proto: opts.proto, conns: n, procs: opts.procs,
      connect_s: Math.round(readyMs) / 1000, storm_s: Math.round(stormS * 1000) / 1000, failed_connects: failed,
      prefix: opts.prefix, ...agg }) + '\n');
    for (const c of workers) c.disconnect();
    return;
  }

  for (const c of workers) c.send({ cmd: 'go' });
  process.stdout.write(JSON.stringify({ event: 'go', connect_s: readyMs / 1000 }) + '\n');
  const res = await waitFor((m) => m.type === 'result', opts.procs);
  const lat = new Hist(), svc = new Hist(), lag = new Hist();
  let measured = 0, outstanding = 0, cpuMs = 0;
  const buckets = new Map();
  const slow = [];
  for (const m of res) {
    for (const x of m.slow || []) slow.push(x);
    lat.merge(m.lat); svc.merge(m.svc); lag.merge(m.lag);
    for (const [k, v] of m.buckets || []) {
      const b = buckets.get(k) || [0, 0, 0, 0, 0];
      for (let i = 0; i < 3; i++) b[i] += v[i];
      b[3] = Math.max(b[3], v[3]); b[4] = Math.max(b[4], v[4]);
      buckets.set(k, b);
    }
    measured += m.measured; outstanding += m.outstanding; cpuMs += m.cpuMs || 0;
  }
  const out = {
    mode: opts.mode, proto: opts.proto, url: opts.url, url2: opts.url2 || undefined, procs: opts.procs, pairs: opts.pairs,
    window: opts.mode === 'closed' ? opts.window : undefined,
    rate: opts.mode === 'open' ? opts.rate : undefined,
    size: opts.size, duration_s: opts.duration, warmup_s: opts.warmup, prefix: opts.prefix,
    client_ack: opts.clientAck,
    msgs_per_s: Math.round(measured / opts.duration),
    latency_ms: lat.summaryMs(),
    p50_ms: lat.summaryMs().p50, p99_ms: lat.summaryMs().p99, max_ms: lat.summaryMs().max,
    gen_cpu_cores: Math.round((cpuMs / (opts.duration * 1000)) * 100) / 100,
    ...aggStats(res),
  };
  if (opts.mode === 'open') {
    out.service_latency_ms = svc.summaryMs();  // from the actual send (coordinated omission NOT corrected)
    out.send_lag_ms = lag.summaryMs();         // generator's own lateness vs the schedule
    out.missing = outstanding;                 // in-window messages never received before the drain timeout
    // per 100 ms of the window: [start ms, messages, > 5 ms, > 10 ms, max ms, max send lag ms]
    out.window_start_epoch_ms = res[0].windowStartEpochMs;
    if (opts.slowMs > 0) out.slow = slow.sort((x, y) => x[0] - y[0]);
    out.buckets_100ms = [...buckets.entries()].sort((x, y) => x[0] - y[0])
      .map(([k, b]) => [k * 100, b[0], b[1], b[2], Math.round(b[3] / 100) / 10, Math.round(b[4] / 100) / 10]);
  }
  process.stdout.write(JSON.stringify(out) + '\n');
  for (const c of workers) c.disconnect();
}

function aggStats(res) {
  const s = { sent: 0, received: 0, acks: 0, errors: 0, connect_errors: 0, socket_errors: 0,
    unexpected_closes: 0, pings: 0 };
  let lastError = null, lastErrorFrame = null, lastClose = null;
  for (const m of res) {
    const t = m.stats;
    s.sent += t.sent; s.received += t.received; s.acks += t.acks; s.errors += t.errors;
    s.connect_errors += t.connectErrors; s.socket_errors += t.socketErrors;
    s.unexpected_closes += t.unexpectedCloses; s.pings += t.pings;
    lastError = lastError || t.lastError; lastErrorFrame = lastErrorFrame || t.lastErrorFrame;
    lastClose = lastClose || t.lastClose;
  }
  if (lastError) s.last_error = lastError;
  if (lastErrorFrame) s.last_error_frame = lastErrorFrame;
  if (lastClose) s.last_close_code = lastClose;
  return s;
}

let opts = parseArgs(process.argv.slice(2));
if (opts.worker >= 0) {
  opts = { ...JSON.parse(process.env.LOADGEN_OPTS), worker: opts.worker };
  runWorker(opts, opts.worker).then(() => process.exit(0), (e) => {
    process.stderr.write(`worker ${opts.worker}: ${e && e.stack}\n`);
    process.exit(1);
  });
} else {
  runPrimary(opts).catch((e) => { process.stderr.write(`${e && e.stack}\n`); process.exit(1); });
}
