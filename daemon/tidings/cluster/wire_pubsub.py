"""Pub/sub on a connection of our own (standalone Redis over plain TCP or a Unix
socket): one task reads the socket and parses it with hiredis' C ``Reader``, and what
each read brought goes to ``sink`` at once, in one batch.

Why: through coredis 6.9 (:mod:`tidings.cluster.pubsub`) every read of the receiving
node's pub/sub connection went through anyio's stream wrappers inside its own
``fail_after`` scope, coredis' parser and push-message machinery; that was ~8 % of the
receiving node's CPU in the open loop and 12.6 % in the closed loop (docs/cluster.md,
"eighth session" and "ninth session").  Here a read is ``wait_readable`` + ``os.read``
+ the C parser, as the write lane reads its replies (:mod:`tidings.store.redis_wire`).
Redis Cluster (sharded pub/sub per primary) and TLS stay on coredis.

Contract (the same as :func:`tidings.cluster.pubsub.batch_pubsub`'s, which returns this
for a standalone target):

* ``async with open_wire_pubsub(...) as ps``: connects within ``connect_timeout`` and
  prepares the session (``AUTH``, ``SELECT``, ``CLIENT SETNAME``: replies within
  ``command_timeout``) before the block starts; raises
  ``coredis.exceptions.ConnectionError`` (or the error Redis answered) otherwise.
* ``sink(messages)`` is called from the reader task with every reply of one socket
  read, in the order Redis sent them, as coredis' message dicts: ``{"type":
  "message", "pattern": None, "channel": <bytes>, "data": <bytes>}`` for a published
  message, ``"subscribe"`` / ``"unsubscribe"`` (``data`` = the subscription count) for
  the acknowledgements.  ``sink`` must not block and should not raise (an exception
  ends the session).
* ``await ps.subscribe(*channels)`` returns once every channel's ``SUBSCRIBE`` is
  acknowledged; it raises ``TimeoutError`` after ``subscription_timeout``, and
  ``coredis.exceptions.ConnectionError`` at once when the session ends meanwhile.
  ``await ps.unsubscribe(*channels)`` writes the ``UNSUBSCRIBE`` and returns (its
  acknowledgements reach ``sink``).
* Keepalive: after ``max_idle_seconds`` without anything read, a ``PING``; nothing read
  within ``command_timeout`` after it (a hung Redis) ends the session.
* End of stream, a socket error, an error reply or a protocol error ends the session:
  the exception (``coredis.exceptions.ConnectionError``) leaves the ``async with``
  (inside an ExceptionGroup, from its task group).  Leaving the block closes the
  connection (Redis drops its subscriptions); nothing more reaches ``sink`` then.
  Nothing reconnects here: the caller's session loop does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import hiredis
import trio
from coredis.exceptions import ConnectionError as RedisConnectionError

from tidings.store.redis_wire import connect, session_commands

__all__ = ["WirePubSub", "open_wire_pubsub"]

RECEIVE_SIZE = 65536
Sink = Callable[[list[Any]], None]


def _encode(channel: str | bytes) -> bytes:
    return channel if isinstance(channel, bytes) else channel.encode("utf-8")


class WirePubSub:
    """One pub/sub connection (see the module docstring); made by
    :func:`open_wire_pubsub`."""

    def __init__(self, stream: trio.SocketStream, sink: Sink, *, subscription_timeout: float,
                 max_idle_seconds: float, command_timeout: float) -> None:
        self._stream = stream
        self._fd = stream.socket.fileno()
        self._sink = sink
        self._subscription_timeout = subscription_timeout
        self._max_idle = max_idle_seconds
        self._command_timeout = command_timeout
        self._reader = hiredis.Reader()
        self._reads = 0  # socket reads that brought data (the keepalive's check-in)
        self._waiters: dict[bytes, list[trio.Event]] = {}  # SUBSCRIBEs not yet acknowledged
        self._sending = trio.StrictFIFOLock()  # commands are written whole, in order
        self.closed = False

    async def subscribe(self, *channels: str | bytes) -> None:
        names = [_encode(c) for c in channels]
        events = []
        for name in names:
            event = trio.Event()
            self._waiters.setdefault(name, []).append(event)
            events.append(event)
        await self._send(hiredis.pack_command((b"SUBSCRIBE", *names)))
        with trio.move_on_after(self._subscription_timeout) as scope:
            for event in events:
                await event.wait()
        if self.closed:
            raise RedisConnectionError("pub/sub: the session ended before SUBSCRIBE was acknowledged")
        if scope.cancelled_caught:
            raise TimeoutError("pub/sub: no acknowledgement of SUBSCRIBE within "
                               f"{self._subscription_timeout} s")

    async def unsubscribe(self, *channels: str | bytes) -> None:
        await self._send(hiredis.pack_command((b"UNSUBSCRIBE", *[_encode(c) for c in channels])))

    async def _send(self, data: bytes) -> None:
        async with self._sending:
            if self.closed:
                raise RedisConnectionError("pub/sub: the connection is closed")
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(self._fd, view):]
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self._fd)
                except OSError as exc:
                    raise RedisConnectionError(f"pub/sub: connection lost while sending: {exc}") from None

    async def _receive(self) -> None:
        """Wait for the socket and feed what one read brought to the parser; raises
        ``coredis.exceptions.ConnectionError`` on end of stream or a socket error."""
        while True:
            await trio.lowlevel.wait_readable(self._fd)
            try:
                data = os.read(self._fd, RECEIVE_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise RedisConnectionError(f"pub/sub: connection lost while reading: {exc}") from None
            if not data:
                raise RedisConnectionError("pub/sub: Redis closed the connection")
            self._reads += 1
            self._reader.feed(data)
            return

    async def _read_loop(self) -> None:
        reader, sink, waiters = self._reader, self._sink, self._waiters
        while True:
            await self._receive()
            out = []
            try:
                while (reply := reader.gets()) is not False:
                    if type(reply) is list and len(reply) == 3:
                        kind = reply[0]
                        if kind == b"message":
                            out.append({"type": "message", "pattern": None, "channel": reply[1],
                                        "data": reply[2]})
                            continue
                        if kind == b"subscribe":
                            pending = waiters.get(reply[1])
                            if pending:
                                pending.pop(0).set()
                                if not pending:
                                    del waiters[reply[1]]
                        if kind in (b"subscribe", b"unsubscribe"):
                            out.append({"type": kind.decode(), "pattern": None,
                                        "channel": reply[1], "data": reply[2]})
                    elif isinstance(reply, hiredis.ReplyError):
                        raise RedisConnectionError(f"pub/sub: Redis answered an error: {reply}")
                    # else: a PING's answer (only the check-in counts)
            except hiredis.ProtocolError as exc:
                raise RedisConnectionError(f"pub/sub: bad data from Redis: {exc}") from None
            finally:
                if out:
                    sink(out)

    async def _keepalive(self) -> None:
        while True:
            seen = self._reads
            await trio.sleep(self._max_idle)
            if self._reads != seen:
                continue
            await self._send(hiredis.pack_command((b"PING",)))
            await trio.sleep(self._command_timeout)
            if self._reads == seen:
                raise RedisConnectionError(f"pub/sub: no reply to PING within {self._command_timeout} s")

    async def _hello(self, commands: list[tuple[Any, ...]]) -> None:
        await self._send(b"".join(hiredis.pack_command(c) for c in commands))
        replies: list[Any] = []
        with trio.move_on_after(self._command_timeout) as scope:
            while len(replies) < len(commands):
                await self._receive()
                while (reply := self._reader.gets()) is not False:
                    replies.append(reply)
        if scope.cancelled_caught:
            raise RedisConnectionError(f"pub/sub: no reply to the session setup in {self._command_timeout} s")
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise RedisConnectionError(f"pub/sub: session setup failed: {reply}")

    def close(self) -> None:
        """Close the connection (once); a ``subscribe`` still waiting fails at once."""
        if self.closed:
            return
        self.closed = True
        for pending in self._waiters.values():
            for event in pending:
                event.set()
        self._waiters.clear()
        sock = self._stream.socket
        trio.lowlevel.notify_closing(sock)
        sock.close()


@contextlib.asynccontextmanager
async def open_wire_pubsub(target: dict[str, Any], sink: Sink, *, subscription_timeout: float,
                           max_idle_seconds: float, connect_timeout: float,
                           command_timeout: float) -> AsyncIterator[WirePubSub]:
    """A :class:`WirePubSub` to ``target`` (from ``redis_wire.wire_target``) for the
    block (see the module docstring)."""
    stream = await connect(target, connect_timeout, "pub/sub")
    ps = WirePubSub(stream, sink, subscription_timeout=subscription_timeout,
                    max_idle_seconds=max_idle_seconds, command_timeout=command_timeout)
    try:
        hello = session_commands(target)
        if hello:
            await ps._hello(hello)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ps._read_loop, name=f"{__name__}.WirePubSub._read_loop")
            nursery.start_soon(ps._keepalive)
            try:
                yield ps
            finally:
                nursery.cancel_scope.cancel()
    finally:
        ps.close()
