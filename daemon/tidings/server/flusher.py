"""One task that writes, once per turn of trio's run loop, what connections queued.

Why: at an even rate of messages (the open loop) nearly every routed message and every
ack is queued on a connection whose writer task is idle, so each one cost a task
wake-up, a linger timeout (a cancel scope with a deadline) and a task switch before its
one ``send`` -- per connection, per message.  With a :class:`Flusher`, a connection on a
plain socket whose writer is not running (``Outbound._enqueue``) only registers itself
(:meth:`Flusher.schedule`); the flusher task, woken once for everything registered in
the same turn, calls each connection's ``_flush``: one non-blocking ``send`` of all it
holds.  What does not fit goes back to the front of that connection's queue and its
writer task takes over (it then writes in order, under backpressure, as before).

Contract: a connection registered with :meth:`schedule` is flushed by the next turn of
the flusher task, in the order registered -- or sooner: between :meth:`hold` and
:meth:`release` nothing wakes the task, and ``release`` flushes everything registered, in
order, in the caller's task (the hub's writer holds the flusher while it answers a
batch, so its acks and routed messages go out without a task switch and a turn of the
run loop: docs/performance.md, ninth session).  ``_flush`` never raises (a connection's
fault ends that connection only) and never blocks.  :meth:`run` runs until cancelled.
"""

from __future__ import annotations

from typing import Any

import trio

__all__ = ["Flusher"]


class Flusher:
    """The task that writes what connections queued (see the module docstring)."""

    __slots__ = ("_held", "_pending", "_wakeup", "flushes")

    def __init__(self) -> None:
        self._pending: list[Any] = []  # connections with something to flush, in order
        self._wakeup: trio.Event | None = None  # exists while the task waits for work
        self.flushes = 0  # turns (and releases) that flushed at least one connection
        self._held = False  # between hold() and release(): the holder flushes

    def schedule(self, conn: Any) -> None:
        """Flush ``conn`` (an ``Outbound``) in the flusher's next turn; never blocks.
        The caller registers a connection at most once until it has been flushed."""
        self._pending.append(conn)
        if self._held:
            return
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()

    def hold(self) -> None:
        """Until :meth:`release`, what is registered waits for the release, which never
        blocks (so neither may the holder in between).  Not nested."""
        self._held = True

    def release(self) -> None:
        """Flush everything registered, in order, now (in the caller's task)."""
        self._held = False
        if self._pending:
            pending, self._pending = self._pending, []
            for conn in pending:
                conn._flush()
            self.flushes += 1

    async def run(self) -> None:
        """Flush registered connections, one batch per turn, until cancelled."""
        while True:
            if self._pending:  # (registered during the last turn's flushes: rare)
                await trio.lowlevel.checkpoint()
            else:
                self._wakeup = wakeup = trio.Event()
                await wakeup.wait()
            pending, self._pending = self._pending, []
            for conn in pending:
                conn._flush()
            self.flushes += 1
