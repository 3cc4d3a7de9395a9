"""Event-loop probes shared by bench/looplag.py, bench/nodeprobe.py and bench/degrade_trace.py
(benchmark tools, not tests).

* :class:`LongSteps`: a trio Instrument that reports every task step longer than a
  threshold, with the loop thread's CPU time in it (the rest of the step the thread was
  preempted or blocked) and the task's short name;
* :func:`sleep_lag`: a task that sleeps ``period`` in a loop and reports how late each
  wake-up was;
* :func:`timed`: a function wrapped to report each call's start and end.

What each tool records is up to its callbacks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import trio

__all__ = ["LongSteps", "short_name", "sleep_lag", "timed"]


def short_name(task: trio.lowlevel.Task) -> str:
    """The last two dotted parts of a task's name (e.g. ``Hub._writer``)."""
    return ".".join(task.name.rsplit(".", 2)[-2:])


class LongSteps(trio.abc.Instrument):
    """Calls ``on_long(task, t0, wall_ms, cpu_ms)`` after every task step of more than
    ``threshold_ms`` (``t0``: the step's start, ``time.perf_counter()``)."""

    def __init__(self, on_long: Callable[[trio.lowlevel.Task, float, float, float], None],
                 threshold_ms: float = 2.0) -> None:
        self.on_long = on_long
        self.threshold_ms = threshold_ms
        self.t0 = 0.0
        self.c0 = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.t0 = time.perf_counter()
        self.c0 = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        ms = (time.perf_counter() - self.t0) * 1e3
        if ms > self.threshold_ms:
            self.on_long(task, self.t0, ms, (time.thread_time() - self.c0) * 1e3)


async def sleep_lag(record: Callable[[float, float], None], period: float = 0.001) -> None:
    """Forever: sleep ``period`` and call ``record(t0, lateness_s)`` (``t0``: when the
    sleep began, ``time.perf_counter()``)."""
    while True:
        t0 = time.perf_counter()
        await trio.sleep(period)
        record(t0, time.perf_counter() - t0 - period)


def timed(fn: Callable[..., Any], on_done: Callable[[float, float, dict[str, Any]], None]) -> Callable[..., Any]:
    """``fn`` wrapped: after each call (returned or raised) ``on_done(t0, t1, kwargs)``
    with ``time.perf_counter()`` stamps."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            on_done(t0, time.perf_counter(), kwargs)
    return wrapper
