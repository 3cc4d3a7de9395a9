#!/usr/bin/env python3
"""What slows the open loop down after a burst?  (benchmark tool, not a test)

Runs one sqlite daemon in a child process and drives, on that one daemon, what
``run.py --degrade`` does: an open-loop round (``fresh``), ``--closed`` closed-loop rounds,
then ``--after`` open-loop rounds.  For each open round's measurement window it prints
the generator's latency and a trace of the loop: every ``SqliteDatabase`` call (count,
total, p50/p99/max ms; on the loop thread or not), every GC pass (per generation), task
steps over 1 ms, and for each step over 3 ms which database calls / GC passes ran
inside it; plus the times of the checkpoints and of merge steps over 3 ms.

    PYTHONPATH=daemon python bench/degrade_trace.py --after 2
    PYTHONPATH=daemon python bench/degrade_trace.py --no-lag-probe   # no 1 ms timer task

The loop-lag probe (a ``trio.sleep(0.001)`` task) keeps a timer pending at all times;
``--no-lag-probe`` leaves it out (the loop can then be quiet for longer).  Compare runs
of this script with each other, not with run.py's latency.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent


def child(config_path: str, lag_probe: bool) -> None:
    """The daemon, traced; on each stdin line a JSON report of the events since the last."""
    import gc

    import trio
    from loopprobe import LongSteps, short_name, sleep_lag, timed
    from tidings.config import load_config
    from tidings.server.daemon import serve
    from tidings.store import sqlite_db

    lock = threading.Lock()
    events: list[tuple[float, float, str, str, bool]] = []  # (t0, t1, kind, name, on loop thread)
    lags: list[tuple[float, float]] = []
    loop_thread = threading.get_ident()
    gc_start: dict[int, float] = {}

    def on_long_step(task: trio.lowlevel.Task, t0: float, ms: float, cpu_ms: float) -> None:
        events.append((t0, t0 + ms / 1e3, "step", short_name(task), True))

    def on_gc(phase: str, info: dict) -> None:
        tid = threading.get_ident()
        if phase == "start":
            gc_start[tid] = time.perf_counter()
        else:
            t0 = gc_start.get(tid, time.perf_counter())
            events.append((t0, time.perf_counter(), "gc", str(info["generation"]), tid == loop_thread))

    def db_call(name: str) -> Any:
        def on_done(t0: float, t1: float, kwargs: dict[str, Any]) -> None:
            label = name + ("-full" if kwargs.get("full") else "")
            events.append((t0, t1, "db", label, threading.get_ident() == loop_thread))
        return on_done

    for name, fn in list(vars(sqlite_db.SqliteDatabase).items()):
        if type(fn) is type(timed) and not name.startswith("_"):
            setattr(sqlite_db.SqliteDatabase, name, timed(fn, db_call(name)))

    def commands() -> None:
        for line in sys.stdin:
            if line.strip():
                with lock:
                    rep = {"events": list(events), "lags": list(lags)}
                    events.clear()
                    lags.clear()
                print(json.dumps(rep), flush=True)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            if lag_probe:
                nursery.start_soon(sleep_lag, lambda t0, lag: lags.append((t0, lag)))
            await serve(load_config(config_path), config_path=config_path)
            nursery.cancel_scope.cancel()

    gc.callbacks.append(on_gc)
    threading.Thread(target=commands, daemon=True).start()
    trio.run(main, instruments=[LongSteps(on_long_step, threshold_ms=1.0)])


def _ms(xs: list[float]) -> str:
    xs = sorted(xs)
    return (f"n={len(xs):6d} total {sum(xs):8.1f} ms p50 {xs[len(xs) // 2]:.3f} "
            f"p99 {xs[int(len(xs) * 0.99)]:.3f} max {xs[-1]:.2f}")


def analyse(label: str, rep: dict, res: dict) -> None:
    events, lags = rep["events"], rep["lags"]
    lat = res.get("latency_ms") or {}
    print(f"== {label}: p50 {lat.get('p50')} p99 {lat.get('p99')} max {lat.get('max')} ms, "
          f"server {res.get('server_cores', 0):.2f} cores")
    if len(lags) > 1:
        xs = sorted(lag for _, lag in lags)
        print(f"  loop lag p50 {xs[len(xs) // 2] * 1e3:.2f} p99 {xs[int(len(xs) * 0.99)] * 1e3:.2f} "
              f"max {xs[-1] * 1e3:.2f} ms")
    groups: dict[tuple[str, str, bool], list[float]] = {}
    for t0, t1, kind, name, on_loop in events:
        groups.setdefault((kind, name, on_loop), []).append((t1 - t0) * 1e3)
    for (kind, name, on_loop), ds in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        where = "loop" if on_loop else "thread"
        print(f"  {kind:<4} {name:<40} {where:<6} {_ms(ds)}")
    inside: dict[str, list[float]] = {}
    for s0, s1, kind, sname, _ in events:
        if kind != "step" or s1 - s0 <= 0.003:
            continue
        names = sorted({f"{k}:{n}" for t0, t1, k, n, on_loop in events
                        if k in ("db", "gc") and on_loop and t0 < s1 and t1 > s0})
        inside.setdefault(f"{sname} <- {','.join(names) or 'nothing traced'}", []).append((s1 - s0) * 1e3)
    for key, ds in sorted(inside.items(), key=lambda kv: -sum(kv[1]))[:12]:
        print(f"  step > 3 ms: {len(ds):4d} x, {sum(ds):7.1f} ms  {key}")
    t00 = min((e[0] for e in events), default=0.0)
    print("  checkpoints (s into the window, ms):",
          [(round(t0 - t00, 2), round((t1 - t0) * 1e3, 1)) for t0, t1, k, n, _ in events if n == "checkpoint"])
    print("  merge steps > 3 ms (s, ms):",
          [(round(t0 - t00, 2), round((t1 - t0) * 1e3, 1)) for t0, t1, k, n, _ in events
           if n.startswith("merge_index") and t1 - t0 > 0.003])


def parent(a: argparse.Namespace) -> None:
    sys.path.insert(0, str(BENCH))
    import harness
    from loopprobe import ProbedChild, loadgen_namespace

    tmp = tempfile.TemporaryDirectory(prefix="tidings-degrade-")
    cfg = Path(tmp.name) / "t.toml"
    cfg.write_text(harness.tidings_config("sqlite", Path(tmp.name) / "state", a.tidings_set))
    daemon = ProbedChild(__file__, str(cfg), ["1" if a.lag_probe else "0"])
    ns = loadgen_namespace(a)

    def on_go(_box: dict) -> None:  # the window starts `warmup` s after go: cut the trace there
        threading.Thread(target=lambda: (time.sleep(a.warmup), daemon.ask()), daemon=True).start()

    def one_round(label: str, lg_args: list[str], traced: bool) -> None:
        res = harness.drive_loadgen(daemon.url, lambda: harness.proc_cpu_s(daemon.proc.pid),
                                    lg_args, a.warmup, a.duration, on_go=on_go)
        rep = daemon.ask()
        if traced:
            analyse(label, rep, res)
        else:
            lat = res.get("latency_ms") or {}
            print(f"== {label}: {res.get('msgs_per_s')} msgs/s, p99 {lat.get('p99')} ms")
        if a.dump:
            Path(f"{a.dump}-{label}.json").write_text(json.dumps({"trace": rep, "loadgen": res}))
        time.sleep(2.0)  # as run.py --degrade between rounds

    try:
        one_round("fresh", harness.loadgen_args_open(ns), True)
        for i in range(a.closed):
            one_round(f"closed{i + 1}", harness.loadgen_args_closed(ns), False)
        for i in range(a.after):
            one_round(f"after{i + 1}", harness.loadgen_args_open(ns), True)
    finally:
        daemon.close()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3] == "1")
    else:
        ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        ap.add_argument("--rate", type=int, default=5000)
        ap.add_argument("--pairs", type=int, default=50)
        ap.add_argument("--duration", type=float, default=5)
        ap.add_argument("--warmup", type=float, default=1)
        ap.add_argument("--client-ack", type=int, default=50)
        ap.add_argument("--closed", type=int, default=3, help="closed-loop rounds between the open ones")
        ap.add_argument("--after", type=int, default=1, help="open-loop rounds after the closed ones")
        ap.add_argument("--no-lag-probe", dest="lag_probe", action="store_false")
        ap.add_argument("--dump", default="", help="write each round's raw trace to DUMP-<round>.json")
        ap.add_argument("--tidings-set", action="append", default=[], metavar="SECTION.KEY=VALUE")
        parent(ap.parse_args())
