"""In-process test layer: a real Hub, Server and Connection over in-memory streams.

Import explicitly (``from inprocess import ...``).  Everything runs in the test's own
trio loop, so tests can use ``mock_clock`` / ``autojump_clock`` and synchronise on
events (``trio.testing.wait_all_tasks_blocked``), never on sleeps.

* ``make_config(**sections)``: a Config (strict cattrs, like the daemon's) with the
  memory store and insecure auth (``?user=``) merged under the given sections.
* ``FlakyStore``: a MemoryStore whose operations fail on demand (``fail("append")``,
  ``heal()``) or wait on demand (``hold("inbox_state")`` returns an event to release):
  the store faults the hub and the connection must survive.
* ``running_hub(config, store)`` -> ``Harness``: a started Hub (its group-commit writer
  running) and a ``Server`` on top whose clock is ``trio.current_time`` (MockClock-driven);
  ``harness.connect("user=bob")`` opens a ``Client``.
* ``Client``: the peer side, a wsproto client over one end of a stream pair whose other
  end the real ``Server.handle`` serves (the HTTP handshake included).  With
  ``lockstep=True`` the pair is ``lockstep_stream_pair``: a write blocks until the other
  side has read it (TCP backpressure with no buffer), else an unbounded memory pair;
  with ``socket=True`` a pair of real sockets (the server's plain-socket paths).
* ``capture_log()``: the daemon's log lines written meanwhile (logfmt strings).
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import msgpack
import orjson
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Message, Ping,
                            Pong, RejectConnection, RejectData, Request, TextMessage)

from tidings import log
from tidings.auth import Authenticator
from tidings.config import Config, structure_config
from tidings.server.daemon import Server
from tidings.server.hub import Hub
from tidings.store import Appended, MemoryStore, NewMessage, StoreUnavailable

__all__ = ["Client", "FlakyStore", "Harness", "capture_log", "make_config", "running_hub"]


def make_config(**sections: dict[str, Any]) -> Config:
    data: dict[str, dict[str, Any]] = {
        "auth": {"mode": "insecure"},
        "store": {"backend": "memory"},
        "server": {"log_level": "debug"},
    }
    for name, table in sections.items():
        data.setdefault(name, {}).update(table)
    return structure_config(data)


class FlakyStore:
    """A MemoryStore with faults on demand.  ``fail(*ops)``: those operations raise
    StoreUnavailable (``append`` answers every message with that error, as engines do);
    ``heal()`` ends every fault.  ``hold(op)``: the next call of ``op`` waits until the
    returned event is set (``held[op]`` is set once it waits).  ``calls`` counts calls
    per operation."""

    name = "flaky"

    def __init__(self, inner: MemoryStore | None = None) -> None:
        self.inner = inner or MemoryStore()
        self.failing: set[str] = set()
        self.calls: Counter[str] = Counter()
        self.held: dict[str, trio.Event] = {}
        self._release: dict[str, trio.Event] = {}
        self._after_read: dict[str, bool] = {}

    def fail(self, *ops: str) -> None:
        self.failing.update(ops)

    def heal(self) -> None:
        self.failing.clear()

    def hold(self, op: str, *, after_read: bool = False) -> trio.Event:
        """The next call of ``op`` waits until the returned event is set: before it
        touches the store, or with ``after_read`` once it has read (its result is a
        snapshot older than what happens meanwhile, as with a read in a thread)."""
        self.held[op] = trio.Event()
        release = self._release[op] = trio.Event()
        self._after_read[op] = after_read
        return release

    async def _wait(self, op: str, after_read: bool) -> None:
        release = self._release.get(op)
        if release is not None and self._after_read[op] is after_read:
            del self._release[op]
            self.held[op].set()
            await release.wait()

    async def _enter(self, op: str) -> None:
        self.calls[op] += 1
        await self._wait(op, False)
        if op in self.failing:
            raise StoreUnavailable(f"{op} failed (test fault)")

    async def run(self, *, task_status: Any = None) -> None:
        await self.inner.run(task_status=task_status)

    async def append(self, msgs: Sequence[NewMessage]) -> list[Appended]:
        try:
            await self._enter("append")
        except StoreUnavailable as exc:
            return [Appended(None, exc) for _ in msgs]
        return await self.inner.append(msgs)

    async def save_progress(self, progress: Any) -> None:
        await self._enter("save_progress")
        await self.inner.save_progress(progress)

    async def claim_key(self, *args: Any) -> Any:
        await self._enter("claim_key")
        return await self.inner.claim_key(*args)

    async def devices(self, user: str) -> Any:
        await self._enter("devices")
        return await self.inner.devices(user)

    async def message(self, msg_id: str) -> Any:
        await self._enter("message")
        return await self.inner.message(msg_id)

    async def read_inbox(self, user: str, after_seq: int, limit: int) -> Any:
        await self._enter("read_inbox")
        page = await self.inner.read_inbox(user, after_seq, limit)
        await self._wait("read_inbox", True)
        return page

    async def inbox_state(self, user: str, device: str = "default") -> Any:
        await self._enter("inbox_state")
        state = await self.inner.inbox_state(user, device)
        await self._wait("inbox_state", True)
        return state

    async def history(self, user: str, peer: str, before: str | None, limit: int) -> Any:
        await self._enter("history")
        return await self.inner.history(user, peer, before, limit)

    async def search(self, user: str, query: str, limit: int, offset: int = 0) -> Any:
        await self._enter("search")
        return await self.inner.search(user, query, limit, offset)

    async def last_seen(self, users: Sequence[str]) -> Any:
        await self._enter("last_seen")
        return await self.inner.last_seen(users)

    async def prune(self, now_ms: int, retention_days: float | None) -> int:
        return await self.inner.prune(now_ms, retention_days)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Harness:
    """A running hub and server; ``connect`` opens clients served in its nursery."""

    def __init__(self, server: Server, nursery: trio.Nursery) -> None:
        self.server = server
        self.hub = server.hub
        self.store = server.hub.store
        self.nursery = nursery

    async def connect(self, query: str, **kwargs: Any) -> Client:
        return await Client.connect(self, query, **kwargs)

    def serve(self, *, lockstep: bool = False, socket: bool = False) -> tuple[trio.abc.Stream, trio.Event]:
        """A bare stream the real ``Server.handle`` serves, and an event set once the
        handler returned.  ``socket``: a connected pair of real (Unix stream) sockets,
        so the server takes its plain-socket paths (direct reads, direct control
        frames) with the kernel's buffering in between."""
        if socket:
            a, b = trio.socket.socketpair()
            client_end, server_end = trio.SocketStream(a), trio.SocketStream(b)
        else:
            pair = trio.testing.lockstep_stream_pair() if lockstep else trio.testing.memory_stream_pair()
            client_end, server_end = pair
        served = trio.Event()

        async def serve() -> None:
            try:
                await self.server.handle(server_end)
            finally:
                served.set()

        self.nursery.start_soon(serve)
        return client_end, served

    def connection(self, user: str) -> Any:
        """The user's one registered Connection (the server-side object)."""
        (conn,) = self.hub.sessions.connections(user)
        return conn


@contextlib.asynccontextmanager
async def running_hub(config: Config | None = None, store: Any = None) -> AsyncIterator[Harness]:
    """A Server and its Hub (the group-commit writer running) over ``store`` (default: a
    FlakyStore); everything it serves is cancelled on exit."""
    config = config or make_config()
    hub = Hub(config, store if store is not None else FlakyStore())
    server = Server(config, hub, Authenticator(config.auth.mode, [b"x" * 32]), clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        server.nursery = nursery  # connections' helper tasks run here, as in the daemon
        nursery.start_soon(server.flusher.run)  # as in the daemon
        yield Harness(server, nursery)
        hub.close_intake()
        nursery.cancel_scope.cancel()


class Client:
    """The peer of one in-process connection: wsproto client framing, explicit reads."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[Any] = []  # events parsed, not yet returned
        self.eof = False
        self.served = trio.Event()  # the server's handler returned

    @classmethod
    async def connect(cls, harness: Harness, query: str, *, lockstep: bool = False,
                      socket: bool = False, read_greeting: bool = True) -> Client:
        """Open a connection (``query``: e.g. ``"user=bob"``) served by the harness;
        returns after the 101 and, with ``read_greeting``, the hello and first resumed
        (kept in ``hello`` / ``resumed``)."""
        stream, served = harness.serve(lockstep=lockstep, socket=socket)
        self = cls(stream)
        self.served = served
        await self.stream.send_all(self.ws.send(Request(host="test", target=f"/ws?{query}")))
        while True:
            event = await self._next_event()
            if isinstance(event, (RejectConnection, RejectData)):
                raise AssertionError(f"handshake refused: {event}")
            if isinstance(event, AcceptConnection):
                break
        if read_greeting:
            self.hello = await self.receive()
            assert self.hello["type"] == "hello", self.hello
            self.resumed = await self.receive()
            assert self.resumed["type"] == "resumed", self.resumed
        return self

    async def _next_event(self) -> Any:
        while not self.pending:
            for event in self.ws.events():
                self.pending.append(event)
            if self.pending:
                break
            data = await self.stream.receive_some(65536)
            if not data:
                self.eof = True
                return None
            self.ws.receive_data(data)
        return self.pending.pop(0)

    def frame(self, frame: dict[str, Any] | str | bytes) -> bytes:
        """The masked client frame of a JSON object (text), a str (text) or bytes (binary)."""
        if isinstance(frame, bytes):
            return self.ws.send(BytesMessage(frame))
        text = frame if isinstance(frame, str) else orjson.dumps(frame).decode()
        return self.ws.send(TextMessage(text))

    async def send(self, *frames: dict[str, Any] | str | bytes) -> None:
        """Send the frames in one write."""
        await self.stream.send_all(b"".join(self.frame(f) for f in frames))

    async def receive(self) -> Any:
        """The next data frame (a dict), a ``CloseConnection`` event, or None at EOF.
        Pings and pongs are skipped; a message that arrives in parts is put together."""
        parts: list[Any] = []
        while True:
            event = await self._next_event()
            if event is None or isinstance(event, CloseConnection):
                assert not parts, "the stream ended inside a message"
                return event
            if isinstance(event, (Ping, Pong)):
                continue
            assert isinstance(event, Message), event
            parts.append(event.data)
            if not event.message_finished:
                continue
            if isinstance(event, BytesMessage):
                return msgpack.unpackb(b"".join(parts))
            return orjson.loads("".join(parts))

    async def receive_until_close(self) -> tuple[list[Any], CloseConnection | None]:
        """Every frame up to the close frame (or EOF: None)."""
        frames = []
        while True:
            frame = await self.receive()
            if frame is None or isinstance(frame, CloseConnection):
                return frames, frame
            frames.append(frame)

    async def answer_close(self, close: CloseConnection) -> None:
        """Complete a close the server started (echo its code)."""
        await self.stream.send_all(self.ws.send(close.response()))

    async def expect_eof(self) -> None:
        """Read until the server closes the stream; nothing may arrive meanwhile."""
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                return
            raise AssertionError(f"data after the close frame: {data[:80]!r}")

    async def aclose(self) -> None:
        await self.stream.aclose()


@contextlib.contextmanager
def capture_log(level: str = "debug") -> Iterator[io.StringIO]:
    """Route the daemon's log to a buffer (``.getvalue()``) for the block."""
    buf = io.StringIO()
    previous = (log._threshold, log._stream)
    log.configure(level, buf)
    try:
        yield buf
    finally:
        log._threshold, log._stream = previous
