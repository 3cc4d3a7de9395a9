"""IdleThread: one worker thread whose calls get only the CPU nothing else wants.

Why: the sqlite engine's full-text maintenance (FTS5 inserts and segment merges, 11-49 ms
per step once a closed-loop burst has grown the index) ran in trio's worker threads at
the same priority as the event loop and the clients on a 2-core box, so a step that
began as messages arrived took a core from them, and with the loop at ~0.8 of a core a
few ms lost took tens of ms to drain (docs/performance.md, tenth and eleventh sessions).
On Linux this thread runs under ``SCHED_IDLE``: the kernel gives it a core only when no
ordinary thread wants one, and takes it back the moment one wakes up.  Elsewhere (no
``SCHED_IDLE``, or refused) it falls back to nice 19 for this thread, then to nothing.

A dedicated thread, not trio's thread cache: an unprivileged thread may not raise its
priority back (``RLIMIT_NICE``), so a cached thread lowered for one call would run
every later call (reads an open connection waits for) at that priority too.

Contract: :meth:`run_sync` runs ``fn(*args)`` in this thread, one call at a time in the
order submitted, and returns its result or raises its exception.  Like
``trio.to_thread.run_sync`` without ``abandon_on_cancel``, the wait is not cancellable
(the call owns a connection until it returns).  What it calls must not need the loop
to make progress (it may wait a while for an idle core: callers use it only for work
nobody waits on, such as maintenance).  :meth:`close` lets the thread exit after the
calls already submitted; a later :meth:`run_sync` starts a new thread.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

__all__ = ["IdleThread", "lower_this_thread"]

T = TypeVar("T")


def lower_this_thread() -> None:
    """Give the calling thread the lowest CPU priority the OS allows it (see the module
    docstring); never raises."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
        return
    except (AttributeError, OSError):
        pass
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _serve(calls: queue.SimpleQueue[Any]) -> None:
    lower_this_thread()
    while (call := calls.get()) is not None:
        fn, args, token, deliver = call
        result = outcome.capture(fn, *args)
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(deliver, result)


class IdleThread:
    """A worker thread at idle CPU priority (see the module docstring)."""

    __slots__ = ("_calls", "_name", "_thread")

    def __init__(self, name: str) -> None:
        self._name = name
        self._calls: queue.SimpleQueue[Any] | None = None
        self._thread: threading.Thread | None = None

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the thread; its result or its exception (not cancellable)."""
        if self._calls is None:
            self._calls = queue.SimpleQueue()
            self._thread = threading.Thread(target=_serve, args=(self._calls,),
                                            name=self._name, daemon=True)
            self._thread.start()
        done = trio.Event()
        box: list[outcome.Outcome[T]] = []

        def deliver(result: outcome.Outcome[T]) -> None:
            box.append(result)
            done.set()

        self._calls.put((fn, args, trio.lowlevel.current_trio_token(), deliver))
        with trio.CancelScope(shield=True):
            await done.wait()
        return box[0].unwrap()

    def close(self) -> None:
        """Let the thread exit once the calls already submitted have run; idempotent."""
        if self._calls is not None:
            self._calls.put(None)
        self._calls = self._thread = None
