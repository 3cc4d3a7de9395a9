#!/usr/bin/env python3
"""Which events do the open loop's slowest messages meet?  (benchmark tool, not a test)

Runs one tidings daemon (sqlite by default) in a child process with event probes, drives
``--rounds`` open-loop rounds (a fresh daemon first; ``--closed N`` closed-loop rounds
before the last open round, as ``run.py --degrade`` does), and for each open round
matches the generator's slowest 1 % (every message at or above the round's p99; the
generator's ``--slow-ms`` list: scheduled send time and latency) with what the daemon
was doing while each of them was in flight ([scheduled send, delivery]):

* ``held``: writes held for the WAL restart (``SqliteStore._held`` set);
* ``step:<task>``: event-loop task steps over 1 ms (``loop:<call>`` for the database
  calls inside steps over 3 ms);
* ``fts:<call>`` / ``thread:<call>``: full-text index and other ``SqliteDatabase``
  calls on worker threads (checkpoint, reads);
* ``gc<gen>`` passes (any thread); ``lag``: the 1 ms sleep probe woke over 2 ms late.

For each kind: the share of the slow messages that overlap one, and the share of all
in-window time points whose median-slow-latency window would overlap one (what chance
gives): a kind far above its chance share is a cause.  With ``--dump FILE`` the raw
events and slow list are written for a closer look.

    PYTHONPATH=daemon python bench/tailtrace.py --rate 5000 --duration 5
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent


def child(config_path: str, steps: bool, lag: bool) -> None:
    """The daemon, traced; on each stdin line a JSON list of the events since the last:
    ``[t0, t1, kind, name]`` in epoch seconds."""
    import gc

    import trio
    from loopprobe import LongSteps, short_name, sleep_lag, timed
    from tidings.config import load_config
    from tidings.server.daemon import serve
    from tidings.store import sqlite, sqlite_db, sqlite_fts

    lock = threading.Lock()
    events: list[list[Any]] = []
    loop_thread = threading.get_ident()
    gc_start: dict[int, float] = {}
    off = time.time() - time.perf_counter()  # perf_counter -> epoch

    def add(t0: float, t1: float, kind: str, name: str) -> None:
        with lock:
            events.append([t0 + off, t1 + off, kind, name])

    def on_long_step(task: trio.lowlevel.Task, t0: float, ms: float, cpu_ms: float) -> None:
        add(t0, t0 + ms / 1e3, "step", f"{short_name(task)} cpu={cpu_ms:.1f}")

    def on_gc(phase: str, info: dict) -> None:
        tid = threading.get_ident()
        if phase == "start":
            gc_start[tid] = time.perf_counter()
        else:
            add(gc_start.get(tid, time.perf_counter()), time.perf_counter(), "gc", str(info["generation"]))

    def db_call(prefix: str, name: str) -> Any:
        def on_done(t0: float, t1: float, kwargs: dict[str, Any]) -> None:
            on_loop = threading.get_ident() == loop_thread
            add(t0, t1, "loop" if on_loop else prefix, name)
        return on_done

    for cls, prefix in ((sqlite_db.SqliteDatabase, "thread"), (sqlite_fts.FtsIndex, "fts")):
        for name, fn in list(vars(cls).items()):
            if type(fn) is type(timed) and not name.startswith("_") and name != "open":
                setattr(cls, name, timed(fn, db_call(prefix, name)))

    held_since: dict[int, float] = {}

    def get_held(self: Any) -> Any:
        return self.__dict__.get("_held_v")

    def set_held(self: Any, v: Any) -> None:
        now = time.perf_counter()
        if v is None and id(self) in held_since:
            add(held_since.pop(id(self)), now, "held", "writes")
        elif v is not None:
            held_since[id(self)] = now
        self.__dict__["_held_v"] = v

    sqlite.SqliteStore._held = property(get_held, set_held)  # type: ignore[assignment]

    def on_lag(t0: float, lag: float) -> None:
        if lag > 0.002:
            add(t0 + 0.001, t0 + 0.001 + lag, "lag", "probe")

    def commands() -> None:
        for line in sys.stdin:
            if line.strip():
                with lock:
                    rep = list(events)
                    events.clear()
                print(json.dumps(rep), flush=True)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            if lag:
                nursery.start_soon(sleep_lag, on_lag)
            await serve(load_config(config_path), config_path=config_path)
            nursery.cancel_scope.cancel()

    gc.callbacks.append(on_gc)
    threading.Thread(target=commands, daemon=True).start()
    trio.run(main, instruments=[LongSteps(on_long_step, threshold_ms=1.0)] if steps else [])


def kinds_of(ev: list[Any], events: list[list[Any]]) -> set[str]:
    """The kinds an event counts under (a long step also under the loop calls inside it)."""
    t0, t1, kind, name = ev
    if kind == "step":
        out = {"step:" + name.split()[0]}
        if t1 - t0 > 0.003:
            out |= {f"in-step:{n}" for a, b, k, n in events if k in ("loop", "gc") and a < t1 and b > t0}
        return out
    if kind == "gc":
        return {"gc" + name}
    if kind in ("held", "lag"):
        return {kind}
    return {f"{kind}:{name}"}


def attribute(events: list[list[Any]], slow: list[list[float]], w0: float, w1: float) -> list[tuple]:
    """Per kind: (kind, share of slow messages overlapping one, chance share, events)."""
    if not slow:
        return []
    spans: dict[str, list[tuple[float, float]]] = {}
    for ev in events:
        if ev[1] < w0 - 1 or ev[0] > w1 + 1 or (ev[1] - ev[0] < 0.001 and ev[2] not in ("held",)):
            continue  # only events >= 1 ms (and every held period) can make a message slow
        for k in kinds_of(ev, events):
            spans.setdefault(k, []).append((ev[0], ev[1]))
    lats = sorted(s[1] for s in slow)
    med = lats[len(lats) // 2] / 1e3
    grid = [w0 + i * 0.0005 for i in range(int((w1 - w0) / 0.0005))]
    out = []
    for k, sp in spans.items():
        sp.sort()
        starts = [a for a, _ in sp]
        ends_max = []  # running max of ends, for "any span overlapping [x, y]"
        m = -1.0
        for _, b in sp:
            m = max(m, b)
            ends_max.append(m)

        def hit(x: float, y: float, starts: list = starts, ends_max: list = ends_max) -> bool:
            i = bisect.bisect_left(starts, y)  # spans starting before y
            return i > 0 and ends_max[i - 1] > x
        n = sum(1 for st, lat in slow if hit(st / 1e3, st / 1e3 + lat / 1e3))
        c = sum(1 for g in grid if hit(g, g + med))
        out.append((k, n / len(slow), c / max(1, len(grid)), len(sp)))
    return sorted(out, key=lambda r: -r[1])


def parent(a: argparse.Namespace) -> None:
    sys.path.insert(0, str(BENCH))
    import harness
    from loopprobe import ProbedChild, loadgen_namespace

    tmp = tempfile.TemporaryDirectory(prefix="tidings-tailtrace-")
    cfg = Path(tmp.name) / "t.toml"
    cfg.write_text(harness.tidings_config(a.server, Path(tmp.name) / "state", a.tidings_set))
    env = dict(os.environ)
    if a.code:
        env["PYTHONPATH"] = f"{a.code}:{BENCH}"
    daemon = ProbedChild(__file__, str(cfg), ["1" if a.steps else "0", "1" if a.lag else "0"], env=env)
    ns = loadgen_namespace(a)

    dump: dict[str, Any] = {}
    plan = ["open"] * max(1, a.rounds - 1) + ["closed"] * a.closed + (["open"] if a.rounds > 1 else [])
    try:
        for i, kind in enumerate(plan):
            if kind == "closed":
                res = harness.drive_loadgen(daemon.url, lambda: harness.proc_cpu_s(daemon.proc.pid),
                                            harness.loadgen_args_closed(ns), a.warmup, a.duration)
                daemon.ask()
                print(f"== round {i} closed: {res.get('msgs_per_s')} msgs/s", flush=True)
                time.sleep(2.0)
                continue
            lg = harness.loadgen_args_open(ns) + ["--slow-ms", str(a.slow_ms)]
            res = harness.drive_loadgen(daemon.url, lambda: harness.proc_cpu_s(daemon.proc.pid),
                                        lg, a.warmup, a.duration)
            events = daemon.ask()
            lat = res.get("latency_ms") or {}
            p99 = lat.get("p99") or 0
            slow = [s for s in res.get("slow", []) if s[1] >= p99]
            w0 = res["window_start_epoch_ms"] / 1e3
            print(f"== round {i} open: p50 {lat.get('p50')} p99 {p99} max {lat.get('max')} ms, "
                  f"server {res.get('server_cores', 0):.2f} cores, gen {res.get('gen_cores_sampled', 0):.2f}, "
                  f"bg {res.get('bg_cores', 0):.2f}; {len(slow)} messages >= p99", flush=True)
            print(f"   {'kind':<44} {'slow %':>7} {'chance %':>8} {'events':>7}")
            for k, share, chance, n in attribute(events, slow, w0, w0 + a.duration)[:a.top]:
                print(f"   {k:<44} {share * 100:7.1f} {chance * 100:8.1f} {n:7d}")
            dump[f"round{i}"] = {"events": events, "slow": res.get("slow", []), "p99": p99, "w0": w0,
                                 "buckets": res.get("buckets_100ms")}
            time.sleep(2.0)
    finally:
        daemon.close()
    if a.dump:
        Path(a.dump).write_text(json.dumps(dump))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1")
    else:
        ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        ap.add_argument("--server", choices=["memory", "sqlite"], default="sqlite")
        ap.add_argument("--code", default="", help="daemon package dir to run (default: PYTHONPATH's)")
        ap.add_argument("--rate", type=int, default=5000)
        ap.add_argument("--pairs", type=int, default=50)
        ap.add_argument("--duration", type=float, default=5)
        ap.add_argument("--warmup", type=float, default=1)
        ap.add_argument("--client-ack", type=int, default=50)
        ap.add_argument("--rounds", type=int, default=1, help="open rounds (the last after --closed ones)")
        ap.add_argument("--closed", type=int, default=0)
        ap.add_argument("--slow-ms", type=float, default=2.0, help="generator's slow-list threshold")
        ap.add_argument("--top", type=int, default=25)
        ap.add_argument("--dump", default="")
        ap.add_argument("--no-lag-probe", dest="lag", action="store_false",
                        help="leave out the 1 ms sleep probe (1,000 wake-ups a second)")
        ap.add_argument("--steps", action="store_true",
                        help="also time every task step (a trio Instrument: costs enough CPU at "
                             "5,000 msgs/s to saturate the loop, p50 5 ms)")
        ap.add_argument("--tidings-set", action="append", default=[], metavar="SECTION.KEY=VALUE")
        parent(ap.parse_args())
