"""coredis pub/sub, read in batches: what one socket read brought is handed over at once.

coredis 6.9's ``PubSub`` moves each message through two memory streams (the
connection's push buffer -> its consumer task -> ``get_message``), and every
``receive`` is a checkpoint: one message per trip round the trio scheduler, so the hub
routed one message per round and each connection wrote one frame per ``send``.  Here
the consumer task drains the push buffer without waiting (``receive_nowait``) after
each wake-up, parses the messages with coredis' own ``_handle_message`` (subscribe
acknowledgements still reach ``subscribe``'s waiters) and calls ``sink(messages)``
synchronously with the whole batch: no per-message timeout, no second stream.  A
published message (``message``/``smessage``; we register no per-channel handlers) is
turned into coredis' message dict here directly: ``_handle_message``'s enum lookups cost
~6% of a node's CPU under load.

Unchanged from coredis: connecting, resubscribing (we pass ``NoRetryPolicy``: the
caller's session loop reconnects), the keepalive ``PING`` after ``max_idle_seconds``
without traffic (with the command timeout, so a hung Redis ends the session), sharded
pub/sub per primary on Redis Cluster.  A lost connection raises ``ConnectionError``
out of the pub/sub's task group, as coredis' own consumer does.

``sink`` must not block and should not raise (an exception ends the session).  This
module reads two coredis internals (``_push_message_buffer_out``, ``_handle_message``);
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

__all__ = ["BatchPubSub", "BatchShardedPubSub", "Sink", "batch_pubsub"]

Sink = Callable[[list[Any]], None]
_PUBLISHED = frozenset((b"message", b"smessage"))  # we subscribe without handlers


async def _drain(ps: Any, connection: Any, checked_in: Callable[[], None]) -> None:
    rx = connection._push_message_buffer_out
    sink: Sink = ps.sink
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
                kind = response[0]
                if kind in _PUBLISHED and len(response) == 3:  # the hot path, as coredis builds it
                    out.append({"type": kind.decode(), "pattern": None,
                                "channel": response[1], "data": response[2]})
                    continue
                message = await ps._handle_message(response)  # no checkpoint: sync handlers
                if message is not None:
                    out.append(message)
            if out:
                sink(out)
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError) as err:
        raise RedisConnectionError("connection lost while reading pub/sub") from err


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
                 max_idle_seconds: float) -> Any:
    """A batching pub/sub on ``client``'s pool (sharded: Redis Cluster), not retrying by
    itself, with every subscribe acknowledgement reaching ``sink`` too."""
    cls = BatchShardedPubSub if sharded else BatchPubSub
    return cls(client.connection_pool, sink=sink, ignore_subscribe_messages=False,
               retry_policy=NoRetryPolicy(), subscription_timeout=subscription_timeout,
               max_idle_seconds=max_idle_seconds)
