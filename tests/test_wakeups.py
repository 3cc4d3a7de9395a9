"""server/wakeups.py: the loop sleeps a little before blocking only while events come
closer together than the hold (its last wait for I/O was shorter), never while a task
is runnable, never past the wait's timeout.  A fake clock and sleep record it."""

from __future__ import annotations

import trio
from tidings.server.wakeups import WakeCoalescer


class Fake:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def wait(c: WakeCoalescer, fake: Fake, timeout: float, lasted: float) -> None:
    """One turn of trio's run loop: before the wait, the wait itself, after it."""
    c.before_io_wait(timeout)
    fake.now += lasted
    c.after_io_wait(timeout)


def test_it_sleeps_before_blocking_only_while_busy():
    fake = Fake()
    c = WakeCoalescer(0.0005, sleep=fake.sleep, clock=fake.clock)
    wait(c, fake, 86400.0, 5.0)  # idle: the first event after a long wait is not held
    assert fake.slept == []
    wait(c, fake, 86400.0, 0.0001)  # the next event came soon after: busy now
    assert fake.slept == []
    wait(c, fake, 86400.0, 0.0)  # busy: sleeps first; what came meanwhile is served at once
    assert fake.slept == [0.0005]
    wait(c, fake, 0.0002, 0.0)  # never past the wait's own timeout (a timer due sooner)
    assert fake.slept == [0.0005, 0.0002]
    wait(c, fake, 86400.0, 0.0007)  # sparser than the hold: a sleep would not pay
    wait(c, fake, 86400.0, 3.0)
    assert fake.slept == [0.0005, 0.0002, 0.0005]
    assert c.sleeps == 3


def test_it_never_sleeps_while_a_task_is_runnable():
    fake = Fake()
    c = WakeCoalescer(0.0005, sleep=fake.sleep, clock=fake.clock)
    wait(c, fake, 86400.0, 0.0001)
    for _ in range(3):
        wait(c, fake, 0, 0.0)  # timeout 0: tasks are runnable, the loop only polls
    assert fake.slept == []


async def test_trio_calls_it_around_every_blocking_wait():
    """In a real run loop (the fake clock never moves, so every wait looks short: busy):
    each blocking wait but the first is preceded by one sleep of at most the hold."""
    fake = Fake()
    c = WakeCoalescer(0.0005, sleep=fake.sleep, clock=fake.clock)
    trio.lowlevel.add_instrument(c)
    try:
        for _ in range(5):
            await trio.sleep(0.0003)  # each blocks the loop at least once
    finally:
        trio.lowlevel.remove_instrument(c)
    assert c.sleeps >= 4 and all(0 < s <= 0.0005 for s in fake.slept)
