"""coredis pub/sub, read in batches: what one socket read brought is handed over at once.

(:func:`batch_pubsub` uses it for a Redis Cluster and over TLS; a standalone Redis over
plain TCP or a Unix socket is read by :mod:`tidings.cluster.wire_pubsub` instead, with
the same contract.)

coredis 6.9's ``PubSub`` moves each message through two memory streams (the
connection's push buffer -> its consumer task -> ``get_message``), and every
``receive`` is a checkpoint: one message per trip round the trio scheduler, so the hub
routed one message per round and each connection wrote one frame per ``send``.  Here a
published message (``message``/``smessage``; we register no per-channel handlers) goes
to ``sink([message])`` straight from coredis' reader task, while it parses the read that
brought it (:class:`_PushTap` stands in for the push buffer's send side): every message
of one read is routed in the same scheduler round, with no hop through the buffer to a
consumer task (that hop was ~11 % of a receiving node's CPU in the open loop,
docs/cluster.md "fourth session").  It is turned into coredis' message dict directly:
``_handle_message``'s enum lookups cost ~6% of a node's CPU under load.  Everything
else (subscribe and unsubscribe acknowledgements) still goes through the buffer: the
consumer task drains it without waiting (``receive_nowait``) after each wake-up, parses
it with coredis' own ``_handle_message`` (so ``subscribe``'s waiters hear their
acknowledgements) and calls ``sink(messages)`` with the batch.  An acknowledgement and
the messages after it in the same read may thus reach the sink in either order; the
node's ``sink`` does not depend on it (it checks what it holds, and a hold returns only
after its acknowledgement).

Unchanged from coredis: connecting, resubscribing (we pass ``NoRetryPolicy``: the
caller's session loop reconnects), the keepalive ``PING`` after ``max_idle_seconds``
without traffic (with the command timeout, so a hung Redis ends the session), sharded
pub/sub per primary on Redis Cluster.  A lost connection raises ``ConnectionError``
out of the pub/sub's task group, as coredis' own consumer does.

``sink`` must not block and should not raise (an exception ends the session).  This
module reads three coredis internals (``_push_message_buffer_in`` / ``_out``,
``_handle_message``);
tests/test_cluster.py pins the behaviour, so a coredis upgrade that moves them fails
there first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.patterns.pubsub import PubSub, ShardedPubSub
from coredis.retry import NoRetryPolicy

from tidings.cluster.wire_pubsub import open_wire_pubsub
from tidings.store.redis_wire import wire_target

__all__ = ["BatchPubSub", "BatchShardedPubSub", "Sink", "batch_pubsub"]

Sink = Callable[[list[Any]], None]
_PUBLISHED = frozenset((b"message", b"smessage"))  # we subscribe without handlers


def _published(response: Any) -> dict[str, Any] | None:
    """coredis' message dict for a published message as coredis' reader builds the
    response (the hot path: no ``_handle_message``), else None."""
    kind = response[0]
    if kind in _PUBLISHED and len(response) == 3:
        return {"type": kind.decode(), "pattern": None, "channel": response[1], "data": response[2]}
    return None


class _PushTap:
    """Stands in for the send side of a coredis connection's push buffer: a published
    message goes to ``sink`` at once, from coredis' reader task, in the read that
    brought it (no hop through the buffer to the consumer task); anything else
    (subscribe and unsubscribe acknowledgements) goes into the buffer as before, for
    :func:`_drain`.  Installed before the first subscribe, so nothing published is
    ever queued behind it."""

    __slots__ = ("_buffer", "_checked_in", "_sink")

    def __init__(self, buffer: Any, sink: Sink, checked_in: Callable[[], None]) -> None:
        self._buffer, self._sink, self._checked_in = buffer, sink, checked_in

    def send_nowait(self, response: Any) -> None:
        message = _published(response)
        if message is not None:
            self._checked_in()
            self._sink([message])
        else:
            self._buffer.send_nowait(response)

    def __getattr__(self, name: str) -> Any:  # statistics(), close(): the buffer's
        return getattr(self._buffer, name)


async def _drain(ps: Any, connection: Any, checked_in: Callable[[], None]) -> None:
    rx = connection._push_message_buffer_out
    sink: Sink = ps.sink
    buffer = connection._push_message_buffer_in
    connection._push_message_buffer_in = _PushTap(buffer, sink, checked_in)
    try:
        while True:
            batch = [await rx.receive()]
            while True:
                try:
                    batch.append(rx.receive_nowait())
                except anyio.WouldBlock:
                    break
            checked_in()
            out = []
            for response in batch:
                message = _published(response)
                if message is None:
                    message = await ps._handle_message(response)  # no checkpoint: sync handlers
                if message is not None:
                    out.append(message)
            if out:
                sink(out)
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError) as err:
        raise RedisConnectionError("connection lost while reading pub/sub") from err
    finally:
        connection._push_message_buffer_in = buffer


class BatchPubSub(PubSub):  # type: ignore[type-arg]
    """Standalone Redis: ``PubSub`` whose messages go to ``sink`` in batches."""

    def __init__(self, connection_pool: Any, *, sink: Sink, **kwargs: Any) -> None:
        super().__init__(connection_pool, **kwargs)
        self.sink = sink

    async def _consume_push_messages(self) -> None:
        def checked_in() -> None:
            self._last_checkin = time.monotonic()
        await _drain(self, self.connection, checked_in)


class BatchShardedPubSub(ShardedPubSub):  # type: ignore[type-arg]
    """Redis Cluster: ``ShardedPubSub`` (one connection per primary), batched likewise."""

    def __init__(self, connection_pool: Any, *, sink: Sink, **kwargs: Any) -> None:
        super().__init__(connection_pool, **kwargs)
        self.sink = sink

    async def _consume_shard_push_messages(self, connection: Any) -> None:
        def checked_in() -> None:
            self._last_checkins[connection.location] = time.monotonic()
        await _drain(self, connection, checked_in)


def batch_pubsub(client: Any, sharded: bool, sink: Sink, subscription_timeout: float,
                 max_idle_seconds: float, *, own_connection: bool = True) -> Any:
    """A batching pub/sub for ``client`` (sharded: Redis Cluster), not retrying by
    itself, with every subscribe acknowledgement reaching ``sink`` too.  A standalone
    Redis over plain TCP or a Unix socket is read on a connection of our own
    (:mod:`tidings.cluster.wire_pubsub`, same contract) unless ``own_connection`` is
    False; otherwise (Redis Cluster, TLS) coredis' pub/sub on ``client``'s pool."""
    target = None if sharded or not own_connection else wire_target(client)
    if target is not None:
        kwargs = client.connection_pool.connection_kwargs
        return open_wire_pubsub(
            target, sink, subscription_timeout=subscription_timeout,
            max_idle_seconds=max_idle_seconds,
            connect_timeout=kwargs.get("connect_timeout") or 2.0,
            command_timeout=kwargs.get("stream_timeout") or 5.0)
    cls = BatchShardedPubSub if sharded else BatchPubSub
    return cls(client.connection_pool, sink=sink, ignore_subscribe_messages=False,
               retry_policy=NoRetryPolicy(), subscription_timeout=subscription_timeout,
               max_idle_seconds=max_idle_seconds)
