"""The router: fan a stored message out to the live connections of its recipient.  Sans-IO.

Theory of operation
-------------------
A message reaches the router only after the store has accepted it and given it the
recipient's next inbox ``seq``; the router is called in commit order, so for each
recipient it sees seqs strictly increasing.  ``route`` looks the recipient up in the
session table and offers the message to each endpoint with ``offer_nowait``, which never
blocks.  Each endpoint answers with one of four outcomes:

    outcome      meaning                                          router does
    -------      -------                                          -----------
    QUEUED       put on the connection's bounded outbound queue    count delivered
    ABSORBED     the connection is replaying from the store and   count delivered
                 will read this seq there (no gap, no duplicate;
                 see replay.py)
    FULL         the queue is at its bound: a slow consumer        policy "disconnect":
                                                                  kill(1013), count;
                                                                  policy "drop": count
    CLOSING      the connection is closing (it unregisters itself  nothing: not delivered
                 at once; seen only within one fan-out)           and not a slow consumer

The router never awaits a recipient: one slow connection costs the sender and every
other connection nothing.  A dropped or disconnected slow consumer loses nothing stored:
its messages stay in the inbox and are replayed when it resumes.  ``delivered`` counts
live connections that accepted the message (QUEUED or ABSORBED), which is what the
sender's ack reports: a dropped (FULL) or closing connection is not counted.

The payload is encoded once per message (``Routed``) and its WebSocket frame is built at
most once and shared by every recipient connection.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import attrs

import msgpack

from tidings.wire.protocol import BINARY, data_frame, message_msgpack
from tidings.routing.sessions import SessionTable

__all__ = [
    "Endpoint",
    "Offer",
    "RouteResult",
    "Routed",
    "Router",
    "RouterStatistics",
]

CLOSE_SLOW_CONSUMER = 1013


class Offer(enum.Enum):
    QUEUED = "queued"
    ABSORBED = "absorbed"
    FULL = "full"
    CLOSING = "closing"


class Routed:
    """One routed frame: its JSON payload, its inbox seq (None for room messages and
    presence events, which bypass the replay gate), and lazily built wire frames shared
    by every recipient: the JSON text frame, and for binary-mode connections the
    MessagePack one (built from ``fields``, the frame as a dict)."""

    __slots__ = ("_binary", "_frame", "fields", "payload", "seq")

    def __init__(self, payload: bytes, seq: int | None, fields: dict[str, Any] | None = None) -> None:
        self.payload = payload
        self.seq = seq
        self.fields = fields
        self._frame: bytes | None = None
        self._binary: bytes | None = None

    @property
    def frame(self) -> bytes:
        if self._frame is None:
            self._frame = data_frame(self.payload)
        return self._frame

    @property
    def binary_payload(self) -> bytes:
        assert self.fields is not None, "binary form needs the frame's fields"
        if self.fields.get("type") == "message":
            return message_msgpack(self.fields)
        return msgpack.packb(self.fields)

    @property
    def binary_frame(self) -> bytes:
        if self._binary is None:
            self._binary = data_frame(self.binary_payload, BINARY)
        return self._binary


class Endpoint(Protocol):
    conn_id: str
    user: str

    def offer_nowait(self, routed: Routed) -> Offer: ...

    def kill(self, code: int, reason: str) -> None: ...


@attrs.frozen
class RouteResult:
    delivered: int
    dropped: int
    disconnected: int


@attrs.frozen
class RouterStatistics:
    routed: int
    delivered: int
    dropped: int
    slow_disconnects: int


class Router:
    def __init__(self, sessions: SessionTable, slow_consumer: str = "disconnect") -> None:
        if slow_consumer not in ("disconnect", "drop"):
            raise ValueError(f"unknown slow_consumer policy {slow_consumer!r}")
        self.sessions = sessions
        self.slow_consumer = slow_consumer
        self.on_slow_consumer: Callable[[Endpoint], None] | None = None  # e.g. log once
        self._routed = 0
        self._delivered = 0
        self._dropped = 0
        self._slow_disconnects = 0

    def route(self, recipient: str, routed: Routed) -> RouteResult:
        """Offer ``routed`` to every live connection of ``recipient``.  Never blocks."""
        return self.offer_all(self.sessions.connections(recipient), routed)

    def offer_all(self, endpoints: Iterable[Endpoint], routed: Routed) -> RouteResult:
        """Offer ``routed`` to each endpoint (a room's members, a user's watchers...)."""
        delivered = dropped = disconnected = 0
        for endpoint in endpoints:
            outcome = endpoint.offer_nowait(routed)
            if outcome is not Offer.FULL:
                if outcome is not Offer.CLOSING:
                    delivered += 1
                continue
            dropped += 1
            if self.slow_consumer == "disconnect":
                # Unregister now so no later message is offered to a dying connection.
                self.sessions.remove(endpoint)
                endpoint.kill(CLOSE_SLOW_CONSUMER, "slow consumer")
                disconnected += 1
            if self.on_slow_consumer is not None:
                self.on_slow_consumer(endpoint)
        self._routed += 1
        self._delivered += delivered
        self._dropped += dropped
        self._slow_disconnects += disconnected
        return RouteResult(delivered, dropped, disconnected)

    def statistics(self) -> RouterStatistics:
        return RouterStatistics(
            routed=self._routed,
            delivered=self._delivered,
            dropped=self._dropped,
            slow_disconnects=self._slow_disconnects,
        )

