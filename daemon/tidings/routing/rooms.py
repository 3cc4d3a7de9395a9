"""Rooms: topics multiplexed on one connection.  Sans-IO.

Theory of operation
-------------------
Room membership belongs to a connection, not to a user: ``join`` puts an endpoint in a
room, ``leave`` takes it out, and ``leave_all`` (called when the connection goes away)
removes every membership it had, so membership vanishes with its connection.  A room
message reaches exactly the endpoints that are members at send time: ``members`` is a
snapshot taken by the router, which offers without awaiting (see router.py).  Room
messages are ephemeral (not stored in inboxes); with ``history = N`` the last N messages
of each room are kept in memory and handed to a connection when it joins.

Who may join is decided by ``may_join``: the token's ``rooms`` claim (a list of names or
shell-style glob patterns) when present, else the configured ``default_allow`` list.

Presence watches have the same shape and live in ``watches``.  Never imports trio.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any

import attrs

from tidings.routing.router import Endpoint

__all__ = ["ROOM_KEY_PREFIX", "RoomRefused", "RoomStatistics", "RoomTable", "may_join"]

#: In a cluster a room travels on the channel of this pseudo-user; user ids are printable,
#: so no user id can collide with it.
ROOM_KEY_PREFIX = "\x1froom\x1f"


class RoomRefused(Exception):
    """A join the client may not make (``forbidden``) or a limit (``bad_request``)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def may_join(allowed: Sequence[str], room: str) -> bool:
    """True when ``room`` matches one of the names or glob patterns in ``allowed``."""
    return any(fnmatchcase(room, pattern) for pattern in allowed)


@attrs.frozen
class RoomStatistics:
    rooms: int
    memberships: int


class RoomTable:
    def __init__(self, max_rooms_per_connection: int, max_members_per_room: int, history: int) -> None:
        self.max_rooms_per_connection = max_rooms_per_connection
        self.max_members_per_room = max_members_per_room
        self.history = history
        self._members: dict[str, dict[str, Endpoint]] = {}  # room -> {conn_id: endpoint}
        self._rooms_of: dict[str, set[str]] = {}  # conn_id -> rooms
        self._recent: dict[str, deque[Any]] = {}
        self._memberships = 0

    def join(self, endpoint: Endpoint, room: str) -> bool:
        """Add ``endpoint`` to ``room``; False if already a member; RoomRefused over a limit."""
        mine = self._rooms_of.get(endpoint.conn_id)
        if mine is not None and room in mine:
            return False
        if mine is not None and len(mine) >= self.max_rooms_per_connection:
            raise RoomRefused("bad_request", f"at most {self.max_rooms_per_connection} rooms per connection")
        members = self._members.get(room)
        if members is not None and len(members) >= self.max_members_per_room:
            raise RoomRefused("bad_request", f"room is full ({self.max_members_per_room} members)")
        self._members.setdefault(room, {})[endpoint.conn_id] = endpoint
        self._rooms_of.setdefault(endpoint.conn_id, set()).add(room)
        self._memberships += 1
        return True

    def leave(self, endpoint: Endpoint, room: str) -> bool:
        mine = self._rooms_of.get(endpoint.conn_id)
        if mine is None or room not in mine:
            return False
        mine.discard(room)
        if not mine:
            del self._rooms_of[endpoint.conn_id]
        members = self._members[room]
        del members[endpoint.conn_id]
        if not members:
            del self._members[room]
            self._recent.pop(room, None)
        self._memberships -= 1
        return True

    def leave_all(self, endpoint: Endpoint) -> list[str]:
        rooms = sorted(self._rooms_of.get(endpoint.conn_id, ()))
        for room in rooms:
            self.leave(endpoint, room)
        return rooms

    def members(self, room: str) -> tuple[Endpoint, ...]:
        members = self._members.get(room)
        return tuple(members.values()) if members else ()

    def rooms_of(self, endpoint: Endpoint) -> frozenset[str]:
        return frozenset(self._rooms_of.get(endpoint.conn_id, ()))

    def remember(self, room: str, message: Any) -> None:
        """Keep ``message`` among the room's last ``history`` messages (if enabled)."""
        if self.history and room in self._members:
            recent = self._recent.get(room)
            if recent is None:
                recent = self._recent[room] = deque(maxlen=self.history)
            recent.append(message)

    def recent(self, room: str) -> list[Any]:
        return list(self._recent.get(room, ()))

    def statistics(self) -> RoomStatistics:
        return RoomStatistics(rooms=len(self._members), memberships=self._memberships)

