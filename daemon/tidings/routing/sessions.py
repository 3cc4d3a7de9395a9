"""The session table: which live connections each user has.  Sans-IO.

Theory of operation
-------------------
A connection becomes routable when ``SessionTable.add`` puts its endpoint under its user,
and stops being routable the moment ``remove`` takes it out; nothing else changes the
table.  The table enforces the admission limits (``max_connections`` in total and
``max_connections_per_user``) at ``add`` time, raising ``Refused`` with the HTTP status
the handshake answers with (503 / 429), so a refused connection never becomes visible.

    state of a connection     in table?   receives routed messages?
    ---------------------     ---------   --------------------------
    handshaking               no          no
    registered (add)          yes         yes (while replaying they absorb by seq: replay)
    closing (remove)          no          no

Lookups (``connections(user)``) are plain dict reads and never block, so the router can
fan out without awaiting anything.  All methods are synchronous and atomic with respect
to the trio scheduler (no awaits inside); the hub holds a ``trio.Lock`` only where a
registration must be paired with awaited work (the cluster subscription of the user),
so that pairs of add/remove and their side effects happen in one order.

This module never imports trio: endpoints are duck-typed objects with ``conn_id`` and
``user`` attributes (see ``router.Endpoint``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs

__all__ = ["Refused", "SessionStatistics", "SessionTable"]


class Refused(Exception):
    """Admission refused; ``status`` is the HTTP status for the handshake answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@attrs.frozen
class SessionStatistics:
    connections: int
    users: int
    max_connections: int
    max_connections_per_user: int


class SessionTable:
    """user -> {conn_id: endpoint}.  Endpoints are owned by their connection task."""

    def __init__(self, max_connections: int, max_connections_per_user: int) -> None:
        self.max_connections = max_connections
        self.max_connections_per_user = max_connections_per_user
        self._by_user: dict[str, dict[str, Any]] = {}
        self._count = 0

    def check_admit(self, user: str) -> None:
        """Raise ``Refused`` if ``user`` could not get another connection now."""
        if self._count >= self.max_connections:
            raise Refused(503, "server is at its connection limit")
        conns = self._by_user.get(user)
        if conns is not None and len(conns) >= self.max_connections_per_user:
            raise Refused(429, "too many connections for this user")

    def add(self, endpoint: Any) -> None:
        """Register ``endpoint`` under ``endpoint.user``; raise ``Refused`` over a limit."""
        self.check_admit(endpoint.user)
        conns = self._by_user.setdefault(endpoint.user, {})
        if endpoint.conn_id in conns:
            raise ValueError(f"connection {endpoint.conn_id} is already registered")
        conns[endpoint.conn_id] = endpoint
        self._count += 1

    def remove(self, endpoint: Any) -> bool:
        """Unregister; returns True if this was the user's last connection.  Idempotent."""
        conns = self._by_user.get(endpoint.user)
        if conns is None or conns.pop(endpoint.conn_id, None) is None:
            return False
        self._count -= 1
        if not conns:
            del self._by_user[endpoint.user]
            return True
        return False

    def connections(self, user: str) -> Iterator[Any]:
        """The user's live endpoints (a snapshot: safe to mutate the table meanwhile)."""
        conns = self._by_user.get(user)
        return iter(tuple(conns.values())) if conns else iter(())

    def count(self, user: str) -> int:
        conns = self._by_user.get(user)
        return len(conns) if conns else 0

    def all_endpoints(self) -> list[Any]:
        return [ep for conns in self._by_user.values() for ep in conns.values()]

    def __len__(self) -> int:
        return self._count

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(
            connections=self._count,
            users=len(self._by_user),
            max_connections=self.max_connections,
            max_connections_per_user=self.max_connections_per_user,
        )

    def update_limits(self, max_connections: int, max_connections_per_user: int) -> None:
        """New limits apply to future admissions; existing connections are kept."""
        self.max_connections = max_connections
        self.max_connections_per_user = max_connections_per_user
