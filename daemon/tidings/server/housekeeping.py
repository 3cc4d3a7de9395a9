"""The housekeeper's schedule: each connection is looked at when it may need something.

Once a second the housekeeper (``daemon.Server.housekeeper``) expires tokens (1008),
pings quiet peers and reaps silent ones (1001).  Looking at every connection every
second cost ~0.7 us per connection-second (py-spy, 18,000 idle connections: 18 % of
the keepalive's CPU); ``Schedule`` keeps each connection in the slot of the whole
second of its next *possible* deadline instead, so a tick touches only the connections
due then -- an idle connection about twice per ping interval.

Deadlines move without telling the schedule: any input moves ``last_activity`` later,
so a connection is only ever looked at too early -- then it is put back at its new
deadline.  A token refresh can move ``exp`` earlier: the connection then asks to be
looked at on the next tick (``soon``).  A reload that changes the keepalive settings
looks at every connection on the next tick (``Housekeeping.tick``).

Each entry is valid only while the connection's ``check_at`` names its slot: a
connection re-added elsewhere leaves a stale entry behind that is dropped when its slot
comes up, so a connection is looked at once per slot it is due in, never twice.
Closed connections are dropped when their slot comes up (``registered`` is False).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

__all__ = ["Housekeeping", "Schedule"]

#: The keepalive ping, built once: a server frame is never masked (RFC 6455 5.1).
PING_FRAME = b"\x89\x07tidings"


class Watched(Protocol):
    conn_id: str
    exp: float | None
    last_activity: float
    pinged: bool
    check_at: int
    registered: bool

    def kill(self, code: int, reason: str) -> None: ...
    def send_control(self, frame: bytes) -> None: ...


class Schedule:
    """Connections by the whole second (of the server's monotonic clock) they are due."""

    __slots__ = ("_slots",)

    def __init__(self) -> None:
        self._slots: dict[int, list[Any]] = {}

    def add(self, conn: Watched, at: float) -> None:
        """Look at ``conn`` on the first tick at or after second ``floor(at)``."""
        key = math.floor(at)
        conn.check_at = key
        slot = self._slots.get(key)
        if slot is None:
            self._slots[key] = [conn]
        else:
            slot.append(conn)

    def pop_due(self, now: float) -> list[Any]:
        """Every connection whose slot is at or before ``now`` (each once)."""
        cur = math.floor(now)
        due: list[Any] = []
        for key in [k for k in self._slots if k <= cur]:
            for conn in self._slots.pop(key):
                if conn.check_at == key:
                    conn.check_at = -1
                    due.append(conn)
        return due

    def __len__(self) -> int:
        return sum(len(s) for s in self._slots.values())


class Housekeeping:
    """What one tick does (``tick``) and where each connection goes next."""

    __slots__ = ("_settings", "schedule")

    def __init__(self) -> None:
        self.schedule = Schedule()
        self._settings: tuple[float, float] | None = None

    def watch(self, conn: Watched, mono: float) -> None:
        """A new connection: looked at on the next tick, then when due."""
        self.schedule.add(conn, mono)

    def soon(self, conn: Watched, mono: float) -> None:
        """``conn``'s deadline may have moved earlier (a token refresh): next tick."""
        if conn.registered:
            self.schedule.add(conn, mono)

    def tick(self, ping_interval_s: float, idle_timeout_s: float, now: float, mono: float,
             everyone: Any) -> None:
        """Expire, ping and reap what is due at ``now`` (wall clock, for ``exp``) /
        ``mono`` (the connections' clock).  A connection is pinged once it has been
        quiet for between 7/8 of ``ping_interval_s`` and all of it (a fixed spread per
        connection: a connect storm's connections are not all pinged in the same
        second, while an idle connection is pinged about every ``ping_interval_s``).
        ``everyone()``: every registered connection, looked at when the settings
        changed (a reload)."""
        settings = (ping_interval_s, idle_timeout_s)
        if settings != self._settings:
            due = list(everyone()) if self._settings is not None else self.schedule.pop_due(mono)
            self._settings = settings
        else:
            due = self.schedule.pop_due(mono)
        ping_after, spread = ping_interval_s * 0.875, ping_interval_s / 8192
        add = self.schedule.add
        for conn in due:
            if not conn.registered:
                continue
            exp = conn.exp
            if exp is not None and now >= exp:
                conn.kill(1008, "token expired")
                continue
            last = conn.last_activity
            idle = mono - last
            if idle >= idle_timeout_s:
                conn.kill(1001, "idle timeout")
                continue
            ping_at = last + ping_after + spread * (hash(conn.conn_id) & 1023)
            if not conn.pinged and mono >= ping_at:
                conn.pinged = True
                conn.send_control(PING_FRAME)
            if conn.pinged:  # the pong (any input) re-arms it: look again a period later
                at = min(last + idle_timeout_s, mono + ping_after)
            else:
                at = min(ping_at, last + idle_timeout_s)
            if exp is not None:
                at = min(at, mono + (exp - now))
            add(conn, at if at > mono else mono + 1.0)
