"""Event-loop probes shared by bench/looplag.py, bench/nodeprobe.py, bench/degrade_trace.py
and bench/tailtrace.py (benchmark tools, not tests).

* :class:`LongSteps`: a trio Instrument that reports every task step longer than a
  threshold, with the loop thread's CPU time in it (the rest of the step the thread was
  preempted or blocked) and the task's short name;
* :func:`sleep_lag`: a task that sleeps ``period`` in a loop and reports how late each
  wake-up was;
* :func:`timed`: a function wrapped to report each call's start and end;
* :class:`ProbedChild` / :func:`loadgen_namespace`: the parent's side of a tool that runs
  the probed daemon in a child process and asks it for its events between rounds.

What each tool records is up to its callbacks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import trio

__all__ = ["LongSteps", "ProbedChild", "loadgen_namespace", "short_name", "sleep_lag", "timed"]


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


class ProbedChild:
    """``python script --child config *args`` started with text pipes; returns once the
    daemon in it logs its listening port (``harness.listening_port``: 60 s, else
    ``SystemExit``).  The child answers each ``report`` line on stdin with one JSON line
    on stdout (its events since the last report).  ``env``: the child's environment
    (``None``: this process's).  :meth:`close` terminates it (waits up to 30 s)."""

    def __init__(self, script: str, config: str, args: list[str],
                 env: dict[str, str] | None = None) -> None:
        import harness  # bench/ is on sys.path in the tools' parent processes

        self.proc = subprocess.Popen([sys.executable, script, "--child", config, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.port = harness.listening_port(self.proc)
        self.url = f"ws://127.0.0.1:{self.port}/ws"

    def ask(self) -> Any:
        """The child's report (blocks until it answers; one caller at a time)."""
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write("report\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def loadgen_namespace(a: argparse.Namespace) -> argparse.Namespace:
    """What ``harness.loadgen_args_open`` / ``loadgen_args_closed`` read, for one generator
    process and 100-byte messages, from a tool's ``--pairs --rate --duration --warmup
    --client-ack``."""
    return argparse.Namespace(procs=1, pairs=a.pairs, rate=a.rate, size=100, duration=a.duration,
                              window=20, warmup=a.warmup, client_ack=a.client_ack)
