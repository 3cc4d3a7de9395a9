"""server/housekeeping.py: the housekeeper looks at a connection only when it may be due
(not every connection every second), and still pings, expires and reaps on time --
also when input, a token refresh or a reload moves a deadline."""

from __future__ import annotations

from tidings.server.housekeeping import PING_FRAME, Housekeeping, Schedule

INTERVAL, IDLE = 20.0, 60.0


class Conn:
    def __init__(self, i: int, mono: float, exp: float | None = None) -> None:
        self.conn_id = f"c-{i:x}"
        self.exp = exp
        self.last_activity = mono
        self.pinged = False
        self.check_at = -1
        self.registered = True
        self.pings: list[float] = []
        self.killed: tuple[int, str] | None = None
        self.looked_at = 0

    def kill(self, code: int, reason: str) -> None:
        self.killed = (code, reason)
        self.registered = False

    def send_control(self, frame: bytes) -> None:
        assert frame == PING_FRAME
        self.pings.append(self.now)


class Clock:
    """Ticks once a second; a peer that answers pings answers at once."""

    def __init__(self, conns: list[Conn], answering: bool = True, hk: Housekeeping | None = None) -> None:
        self.hk = hk or Housekeeping()
        self.conns = conns
        self.mono = 0.0
        self.answering = answering
        for c in conns:
            self.hk.watch(c, self.mono)

    def tick(self, interval: float = INTERVAL, idle: float = IDLE) -> None:
        self.mono += 1.0
        for c in self.conns:
            c.now = self.mono
        self.hk.tick(interval, idle, 1e9 + self.mono, self.mono, lambda: [c for c in self.conns if c.registered])
        if self.answering:
            for c in self.conns:
                if c.pinged and c.pings and c.pings[-1] == self.mono:  # the pong
                    c.last_activity, c.pinged = self.mono, False


class CountingSchedule(Schedule):
    """Counts how many connections each tick looks at."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        super().__init__()
        self.counts: list[int] = []

    def pop_due(self, now: float) -> list:
        due = super().pop_due(now)
        self.counts.append(len(due))
        return due


def test_idle_connections_are_pinged_every_interval_and_looked_at_only_when_due():
    conns = [Conn(i, 0.0) for i in range(1000)]
    hk = Housekeeping()
    hk.schedule = CountingSchedule()
    clock = Clock(conns, hk=hk)
    counts = hk.schedule.counts
    for _ in range(200):
        clock.tick()
    for c in conns:
        gaps = [b - a for a, b in zip(c.pings, c.pings[1:])]
        assert c.pings[0] >= 0.875 * INTERVAL and all(0.875 * INTERVAL <= g <= INTERVAL + 1 for g in gaps)
        assert c.killed is None
    # the old housekeeper looked at 1,000 connections a tick (200,000 looks); now about
    # three per ping round (the ping, a look a period later, the next ping)
    pings = sum(len(c.pings) for c in conns)
    assert sum(counts) <= 3 * pings + 1000, (sum(counts), pings)
    assert len({round(c.pings[0]) for c in conns}) > 1  # spread over more than a second


def test_input_postpones_the_ping_and_silence_is_reaped_on_time():
    busy, silent = Conn(1, 0.0), Conn(2, 0.0)
    clock = Clock([busy, silent], answering=False)
    for _ in range(40):
        clock.tick()
        busy.last_activity = clock.mono  # talks every second: never pinged
    assert busy.pings == [] and busy.killed is None
    assert len(silent.pings) == 1 and 0.875 * INTERVAL <= silent.pings[0] <= INTERVAL + 1
    while silent.killed is None:
        clock.tick()
    assert silent.killed == (1001, "idle timeout") and clock.mono <= IDLE + 1


def test_expiry_on_time_also_when_a_refresh_moves_it_earlier():
    a, b = Conn(1, 0.0, exp=1e9 + 30.5), Conn(2, 0.0, exp=1e9 + 50.0)
    clock = Clock([a, b])
    for _ in range(5):
        clock.tick()
    b.exp = 1e9 + 7.5  # refreshed with a shorter-lived token: the connection says so
    clock.hk.soon(b, clock.mono)
    while a.killed is None:
        clock.tick()
        if clock.mono == 8.0:
            assert b.killed == (1008, "token expired")
    assert a.killed == (1008, "token expired") and clock.mono == 31.0


def test_a_reload_looks_at_everyone_on_the_next_tick():
    conns = [Conn(i, 0.0) for i in range(10)]
    clock = Clock(conns)
    for _ in range(3):
        clock.tick()
    clock.tick(interval=2.0)  # ping_interval_s lowered by a reload: due at once
    assert all(c.pings == [4.0] for c in conns)


def test_closed_connections_and_stale_entries_are_dropped():
    s = Schedule()
    a, b = Conn(1, 0.0), Conn(2, 0.0)
    s.add(a, 5.2)
    s.add(a, 3.0)  # moved: the entry at 5 is stale
    s.add(b, 3.9)
    s.add(b, 3.1)  # twice in the same slot: looked at once
    assert s.pop_due(2.9) == []
    assert s.pop_due(3.0) == [a, b]
    assert s.pop_due(9.0) == [] and len(s) == 0
