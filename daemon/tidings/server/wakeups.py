"""Fewer wake-ups of the process under a steady load: a short sleep before the run loop
blocks, so what arrives meanwhile is handled in one turn (interrupt moderation).

Why: on the Redis path at an even rate (two nodes, 5,000 msgs/s) nearly every message
arrived on its own and woke the idle process from ``epoll_wait``; the wake-up and the
switch back in were the largest single item of the sending node's profile (trio's
``get_events``, ~15-17 % of its CPU), and on a box where the nodes, Redis and the load
compete for two cores the p99 is the time messages wait for a core (docs/cluster.md,
"ninth session" and "tenth session").  Sleeping ``hold_s`` before blocking lets the
next few arrivals gather; one wake-up then serves them all.

Contract: an ``Instrument`` for ``trio.lowlevel.add_instrument``.  Before the run loop
waits for I/O with a timeout above zero (no task runnable), and only while events come
closer together than ``hold_s`` -- the previous wait for I/O lasted less than that, so a
sleep of ``hold_s`` will find something to serve -- it sleeps ``min(hold_s, timeout)``
on the loop's thread.  Sparser events (a wait longer than ``hold_s``: an idle process,
a few hundred events a second) are served at once, with no sleep, which would only add
a wake-up there.  A steady stream pays at most ``hold_s`` of latency per hop; a timer
due during the sleep fires at most ``hold_s`` late.  It never sleeps while a task is
runnable, never raises, and holds no trio state.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

__all__ = ["HOLD_S", "WakeCoalescer"]

#: How long the loop sleeps before blocking while events come closer together than this.
HOLD_S = 0.0005


class WakeCoalescer(trio.abc.Instrument):
    """See the module docstring.  ``sleep`` and ``clock`` are for tests."""

    def __init__(self, hold_s: float = HOLD_S, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.hold_s = hold_s
        self._sleep = sleep
        self._clock = clock
        self._busy = False  # the last wait for I/O was shorter than hold_s
        self._wait_started = 0.0
        #: Sleeps taken (for statistics and tests).
        self.sleeps = 0

    def before_io_wait(self, timeout: float) -> None:
        if timeout <= 0:
            return
        if self._busy:
            self.sleeps += 1
            self._sleep(min(self.hold_s, timeout))
        self._wait_started = self._clock()

    def after_io_wait(self, timeout: float) -> None:
        if timeout > 0:
            self._busy = self._clock() - self._wait_started < self.hold_s
