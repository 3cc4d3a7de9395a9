"""Presence watches: which connections want to hear when a user comes online or goes
offline.  Sans-IO.

Theory of operation
-------------------
A watch belongs to a connection (an endpoint with ``conn_id``), not to a user: ``watch``
adds users to what an endpoint watches, ``unwatch`` removes them, and ``forget`` (called
when the connection goes away) removes every watch it had, so watches vanish with their
connection.  ``watchers(user)`` is a snapshot the hub hands to the router when the
user's first connection arrives or last one leaves; it never blocks.

A connection watches at most ``max_per_connection`` users; a watch over that bound is
refused whole (``WatchRefused``, the client's fault: ``bad_request``) and changes
nothing.  Never imports trio.
"""

from __future__ import annotations

from collections.abc import Iterable

from tidings.routing.router import Endpoint

__all__ = ["WatchRefused", "WatchTable"]


class WatchRefused(Exception):
    """A watch the client may not make: over the per-connection bound (``bad_request``)."""

    code = "bad_request"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WatchTable:
    """user -> endpoints watching that user's presence."""

    def __init__(self, max_per_connection: int) -> None:
        self.max_per_connection = max_per_connection
        self._watchers: dict[str, dict[str, Endpoint]] = {}
        self._watched_by: dict[str, set[str]] = {}  # conn_id -> users

    def watch(self, endpoint: Endpoint, users: Iterable[str]) -> None:
        """Watch ``users`` too; raise WatchRefused (nothing changed) over the bound."""
        mine = self._watched_by.setdefault(endpoint.conn_id, set())
        new = [u for u in users if u not in mine]
        if len(mine) + len(new) > self.max_per_connection:
            if not mine:
                del self._watched_by[endpoint.conn_id]
            raise WatchRefused(f"at most {self.max_per_connection} watched users per connection")
        for user in new:
            mine.add(user)
            self._watchers.setdefault(user, {})[endpoint.conn_id] = endpoint

    def unwatch(self, endpoint: Endpoint, users: Iterable[str]) -> None:
        mine = self._watched_by.get(endpoint.conn_id)
        if not mine:
            return
        for user in users:
            if user in mine:
                mine.discard(user)
                watchers = self._watchers[user]
                del watchers[endpoint.conn_id]
                if not watchers:
                    del self._watchers[user]
        if not mine:
            del self._watched_by[endpoint.conn_id]

    def forget(self, endpoint: Endpoint) -> None:
        self.unwatch(endpoint, list(self._watched_by.get(endpoint.conn_id, ())))

    def watched_users(self) -> list[str]:
        """Every user some endpoint watches (a snapshot)."""
        return list(self._watchers)

    def watchers(self, user: str) -> tuple[Endpoint, ...]:
        watchers = self._watchers.get(user)
        return tuple(watchers.values()) if watchers else ()
