#!/usr/bin/env python3
"""Run ``python -m tidings ...`` with loop-stall probes (benchmark tool, not a test).

    NODEPROBE_OUT=/tmp/n1.json python bench/nodeprobe.py serve --config t.toml

Same daemon, plus in its trio run (the probes cost a little CPU: compare probed runs
with probed runs only):

* loop lag: a task sleeping 1 ms; every wake-up later than 2 ms is recorded;
* task steps longer than 2 ms (a trio Instrument), by task name, with the loop thread's
  CPU in them (the rest the thread was preempted or blocked);
* garbage collections longer than 1 ms.

Each event carries its wall-clock time (epoch ms), so it lines up with the generator's
per-100 ms latency buckets (``bench/loadgen.mjs``: ``window_start_epoch_ms``,
``buckets_100ms``).  The events are written as JSON to ``$NODEPROBE_OUT`` when the
daemon exits (SIGTERM shuts it down cleanly).  ``bench/cluster_run.py --probe`` uses it.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from typing import Any

import trio
from loopprobe import LongSteps, short_name, sleep_lag


def main() -> int:
    lags: list[list[float]] = []
    steps: list[list[Any]] = []
    gcs: list[list[float]] = []
    gc_t0 = [0.0]

    def on_long_step(task: trio.lowlevel.Task, t0: float, ms: float, cpu_ms: float) -> None:
        steps.append([time.time() * 1e3, round(ms, 2), round(cpu_ms, 2), short_name(task)])

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_t0[0] = time.perf_counter()
        else:
            ms = (time.perf_counter() - gc_t0[0]) * 1e3
            if ms > 1.0:
                gcs.append([time.time() * 1e3, info["generation"], round(ms, 2)])

    def on_lag(t0: float, lag: float) -> None:
        if lag > 0.002:
            lags.append([time.time() * 1e3, round(lag * 1e3, 2)])

    real_run = trio.run

    def probed_run(fn: Any, *args: Any, **kwargs: Any) -> Any:
        async def with_probe() -> Any:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sleep_lag, on_lag)
                result = await fn(*args)
                nursery.cancel_scope.cancel()
            return result
        kwargs["instruments"] = [*kwargs.get("instruments", ()), LongSteps(on_long_step)]
        return real_run(with_probe, **kwargs)

    trio.run = probed_run  # type: ignore[assignment]
    gc.callbacks.append(on_gc)
    from tidings.cli import main as tidings_main
    try:
        return tidings_main(sys.argv[1:])
    finally:
        out = os.environ.get("NODEPROBE_OUT")
        if out:
            with open(out, "w") as f:
                json.dump({"lags": lags, "steps": steps, "gc": gcs}, f)


if __name__ == "__main__":
    sys.exit(main())
