#!/usr/bin/env python3
"""What stalls the event loop under the open loop?  (benchmark tool, not a test)

Runs one tidings daemon (store memory or sqlite) *in this script's child process* with
three probes in the same trio run, then drives the Node generator's open loop at
--rate msgs/s against it and prints, for the measurement window:

* loop lag: how late ``trio.sleep(0.001)`` wakes (p50/p99/max, and how often > 5 / 20 ms):
  what every message that arrives meanwhile waits on top of its own work;
* the longest task steps (a trio Instrument timing each step of each task, by task
  name): who held the loop when it was late;
* garbage collections (gc callbacks): count and longest pause per generation;
* with --trace-db, every ``SqliteDatabase`` call over 2 ms (on the loop or a thread).

The probes cost a little CPU themselves; compare runs of this script, not its latency
with run.py's.

    python bench/looplag.py --server sqlite --rate 5000 --duration 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent


def child(config_path: str) -> None:
    """The daemon plus the probes; a JSON report on stdout for each 'report' line."""
    import gc

    import trio
    from loopprobe import LongSteps, short_name, sleep_lag, timed
    from tidings.config import load_config
    from tidings.server.daemon import serve

    lags: list[float] = []
    steps: dict[str, list[float]] = {}  # task name -> [count > 2 ms, max ms, total ms > 2 ms]
    gcs: dict[int, list[float]] = {}
    gc_t0 = [0.0]
    lock = threading.Lock()

    def on_long_step(task: trio.lowlevel.Task, t0: float, ms: float, cpu_ms: float) -> None:
        s = steps.setdefault(short_name(task), [0, 0.0, 0.0, 0.0])
        s[0] += 1
        s[1] = max(s[1], ms)
        s[2] += ms
        s[3] += cpu_ms  # CPU of the loop thread

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_t0[0] = time.perf_counter()
        else:
            g = gcs.setdefault(info["generation"], [0, 0.0])
            g[0] += 1
            g[1] = max(g[1], (time.perf_counter() - gc_t0[0]) * 1e3)

    def commands() -> None:
        for line in sys.stdin:
            if not line.strip():
                continue
            with lock:
                xs = sorted(lags)
                n = len(xs)
                rep = {"samples": n,
                       "lag_p50_ms": xs[n // 2] * 1e3 if n else None,
                       "lag_p99_ms": xs[int(n * 0.99)] * 1e3 if n else None,
                       "lag_max_ms": xs[-1] * 1e3 if n else None,
                       "lag_over_5ms": sum(1 for x in xs if x > 0.005),
                       "lag_over_20ms": sum(1 for x in xs if x > 0.020),
                       "steps_over_2ms": sorted(([k, *v] for k, v in steps.items() if k != "db:"),
                                                key=lambda r: -r[3])[:12],
                       "db_calls_over_2ms": sorted(([k, *v] for k, v in calls.items()), key=lambda r: -r[3]),
                       "gc": {str(k): v for k, v in sorted(gcs.items())}}
                lags.clear()
                steps.clear()
                calls.clear()
                steps["db:"] = calls  # type: ignore[assignment]
                gcs.clear()
            print(json.dumps(rep), flush=True)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sleep_lag, lambda t0, lag: lags.append(lag))
            await serve(load_config(config_path), config_path=config_path)
            nursery.cancel_scope.cancel()

    calls: dict[str, list[float]] = {}  # SqliteDatabase method -> [count > 2 ms, max ms, total ms > 2 ms]

    def db_call(name: str) -> Any:
        def on_done(t0: float, t1: float, kwargs: dict[str, Any]) -> None:
            ms = (t1 - t0) * 1e3
            if ms > 2.0:
                c = calls.setdefault(name, [0, 0.0, 0.0])
                c[0] += 1
                c[1] = max(c[1], ms)
                c[2] += ms
        return on_done

    if os.environ.get("LOOPLAG_TRACE_DB"):
        from tidings.store import sqlite_db
        for name, fn in list(vars(sqlite_db.SqliteDatabase).items()):
            if type(fn) is type(db_call) and not name.startswith("__") and name not in ("_read", "_write", "_transaction"):
                setattr(sqlite_db.SqliteDatabase, name, timed(fn, db_call(name)))
    steps["db:"] = calls  # type: ignore[assignment]
    gc.callbacks.append(on_gc)
    threading.Thread(target=commands, daemon=True).start()
    trio.run(main, instruments=[LongSteps(on_long_step)])


def parent(a: argparse.Namespace) -> None:
    sys.path.insert(0, str(BENCH))
    import harness

    tmp = tempfile.TemporaryDirectory(prefix="tidings-looplag-")
    cfg = Path(tmp.name) / "t.toml"
    cfg.write_text(harness.tidings_config(a.server, Path(tmp.name) / "state", a.tidings_set))
    env = dict(os.environ, LOOPLAG_TRACE_DB="1") if a.trace_db else None
    p = subprocess.Popen([sys.executable, __file__, "--child", str(cfg)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    port = harness.listening_port(p)
    ns = argparse.Namespace(procs=1, pairs=a.pairs, rate=a.rate, size=a.size, duration=a.duration,
                            warmup=a.warmup, client_ack=a.client_ack)

    def on_go(_box: dict) -> None:  # the window starts `warmup` s after go: reset the probes then
        def reset() -> None:
            time.sleep(a.warmup)
            p.stdin.write("report\n")
            p.stdin.flush()
        threading.Thread(target=reset, daemon=True).start()

    try:
        res = harness.drive_loadgen(f"ws://127.0.0.1:{port}/ws", lambda: harness.proc_cpu_s(p.pid),
                                    harness.loadgen_args_open(ns), a.warmup, a.duration, on_go=on_go)
        p.stdout.readline()  # the warm-up's report
        p.stdin.write("report\n")
        p.stdin.flush()
        rep = json.loads(p.stdout.readline())
    finally:
        p.terminate()
        p.wait(30)
    lat = res.get("latency_ms") or {}
    print(f"server={a.server} rate={a.rate}: delivered {res.get('msgs_per_s', res.get('received'))}, "
          f"p50 {lat.get('p50')} p99 {lat.get('p99')} ms, server {res.get('server_cores', 0):.2f} cores")
    print(f"loop lag (sleep 1 ms, {rep['samples']} samples after warm-up): p50 {rep['lag_p50_ms']:.2f} "
          f"p99 {rep['lag_p99_ms']:.2f} max {rep['lag_max_ms']:.2f} ms; > 5 ms: {rep['lag_over_5ms']}, "
          f"> 20 ms: {rep['lag_over_20ms']}")
    print("task steps > 2 ms (task, count, max ms, total ms, of which the loop thread's CPU ms:"
          " the rest it was preempted or blocked -- I/O, GIL):")
    for name, n, mx, tot, cpu in rep["steps_over_2ms"]:
        print(f"  {name:<40} {n:6d} {mx:8.1f} {tot:9.1f} {cpu:9.1f}")
    if a.trace_db:
        print("SqliteDatabase calls > 2 ms (method, count, max ms, total ms; any thread):")
        for name, n, mx, tot in rep["db_calls_over_2ms"]:
            print(f"  {name:<40} {n:6d} {mx:8.1f} {tot:9.1f}")
    print("gc (generation: count, max pause ms):", rep["gc"])
    if a.json:
        print(json.dumps({"loadgen": res, "probe": rep}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        ap.add_argument("--server", choices=["memory", "sqlite"], default="sqlite")
        ap.add_argument("--rate", type=int, default=5000)
        ap.add_argument("--pairs", type=int, default=100)
        ap.add_argument("--size", type=int, default=100)
        ap.add_argument("--duration", type=float, default=10)
        ap.add_argument("--warmup", type=float, default=2)
        ap.add_argument("--client-ack", type=int, default=50)
        ap.add_argument("--tidings-set", action="append", default=[], metavar="SECTION.KEY=VALUE")
        ap.add_argument("--json", action="store_true", help="also print the raw results")
        ap.add_argument("--trace-db", action="store_true",
                        help="also time every SqliteDatabase call (calls over 2 ms, any thread)")
        parent(ap.parse_args())
