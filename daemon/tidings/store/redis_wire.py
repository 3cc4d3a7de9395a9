"""The write lane's own Redis connection (standalone Redis over plain TCP or a Unix
socket): commands packed and written with one non-blocking ``send`` by the caller, the
replies read and parsed by whichever caller is waiting for one, with no task of its own.

Why: through coredis 6.9 every script call of the hub's writer cost a ``Request`` (a
dataclass, a telemetry hook, an anyio ``Event``), a hop through a memory stream to the
connection's writer task (woken, packing, sending through anyio's stream wrappers), a
wake-up of its reader task (each read inside its own ``fail_after``), and a
``move_on_after`` around the wait: ~150-200 us of CPU per call in a micro-benchmark
against ~40 here, and the sending node of a two-node cluster makes ~1,100 calls a
second at 5,000 msgs/s (docs/cluster.md, "sixth session").  The commands are packed by
hiredis' C ``pack_command`` (:func:`pack_commands`): coredis' ``Packer`` was ~10 % of the
sending node's CPU in the closed loop, ~3.4 us per message of an append batch against
~1.6 (docs/cluster.md, "eighth session").  The replies are parsed by hiredis' C
``Reader`` too (:class:`ReplyReader`): coredis' compiled ``Parser`` took ~14 us for an
append reply of 17 messages against ~1.2 (docs/cluster.md, "eleventh session").

Contract (:class:`WireConnection`):

* :func:`wire_target` says whether a client's pool can be reached this way (plain TCP
  or a Unix socket; not TLS: that stays on coredis); :meth:`WireConnection.open`
  connects within ``connect_timeout``, then authenticates (``AUTH``), selects the
  database and names the client in one batch (its replies within ``command_timeout``).
* :meth:`send` writes a batch of commands and returns their :class:`Batch` once all of
  it is on the socket (usually at once: one non-blocking ``send``, no checkpoint).
  Batches are written whole and in the order ``send`` was called (a batch that does not
  fit the socket buffer holds the others back until it is written), so Redis runs them
  in that order.
* :meth:`Batch.replies` waits for the batch's replies, in order: each is the reply or the
  exception Redis answered, of the class coredis' parser gives it (``NOSCRIPT`` as
  :class:`coredis.exceptions.NoScriptError`, ``WRONGTYPE`` as ``WrongTypeError``, any
  other as ``ResponseError`` ...; also inside an array reply).  Values as coredis parses
  them with ``decode=False``: bytes, int, None, lists.  Only one waiter reads the socket at a time; each reply
  resolves the oldest unanswered command, whoever waits for it, and a waiter that
  leaves (cancelled) hands the reading to the next.
* Failure: end of stream, a socket error, a protocol error, or no reply within
  ``command_timeout`` of a waiter starting to wait (a hung Redis) closes the
  connection, and every unanswered command gets that exception
  (:class:`coredis.exceptions.ConnectionError` or :class:`TimeoutError`): its outcome is
  unknown.  A batch cancelled half-written closes it too.  The lane opens a new
  connection for the next batch; nothing is resent here.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from typing import Any

import trio
from coredis._packer import Packer
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.exceptions import RedisError
from coredis.parser import Parser
from hiredis import ProtocolError, Reader, pack_command

__all__ = ["Batch", "ReplyReader", "WireConnection", "connect", "pack_commands",
           "session_commands", "wire_target"]

RECEIVE_SIZE = 65536
_UNSET: Any = object()
_PACKER = Packer("utf-8")


def pack_commands(commands: Sequence[tuple[Any, ...]]) -> bytes:
    """``commands`` (each ``(name, *args)``) in RESP, as one bytes.

    Arguments: ``bytes`` as they are, ``str`` in UTF-8 (a lone surrogate raises
    ``UnicodeEncodeError``), ``int`` in decimal: byte for byte what coredis' ``Packer``
    writes (tests/test_redis_wire.py compares them), through hiredis' C packer.  The
    name is one argument (coredis splits a name with spaces; none of ours has one).  A
    ``float`` is written as its ``repr`` (coredis: ``%.15g``; Redis reads both; the
    daemon sends none).  Anything hiredis refuses (``bool``, ``bytearray`` ...) is packed
    by coredis' ``Packer`` instead, which writes a bool as ``1``/``0`` and raises
    ``TypeError`` for the rest, as before."""
    try:
        return b"".join([pack_command(c) for c in commands])
    except TypeError:
        return b"".join(_PACKER.pack_commands(list(commands)))


class _ReplyError(Exception):
    """An error reply as hiredis' ``Reader`` builds it (its text); replaced by coredis'
    exception for it before anyone sees it.  Counts its instances (:attr:`made`), so a
    reply needs walking for errors only when one was made while it was parsed."""

    made = 0

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        _ReplyError.made += 1


_NO_REPLY: Any = False  # what hiredis' Reader.gets() returns while a reply is incomplete
_ERRORS_OF = Parser()  # only its parse_error: the exception class coredis gives a reply


def _as_coredis(reply: Any) -> Any:
    """``reply`` with every error in it (also inside arrays) as coredis' exception."""
    if isinstance(reply, _ReplyError):
        return _ERRORS_OF.parse_error(str(reply))
    if isinstance(reply, list):
        return [_as_coredis(r) for r in reply]
    return reply


class ReplyReader:
    """RESP2 replies from bytes, through hiredis' C ``Reader``: :meth:`feed` data, then
    :meth:`get` until it returns :data:`INCOMPLETE`.  A reply is what coredis' ``Parser``
    gives with ``decode=False`` (bytes, int, None, lists; an error reply as the coredis
    exception of its code, also inside an array).  Raises ``ValueError`` for bytes that
    are not RESP (the stream cannot be trusted after it)."""

    __slots__ = ("_made", "_reader")
    INCOMPLETE: Any = _NO_REPLY

    def __init__(self) -> None:
        # notEnoughData: a sentinel no reply can be (a RESP2 reply is never False)
        self._reader = Reader(replyError=_ReplyError, notEnoughData=_NO_REPLY)
        # _ReplyError.made when the reply being parsed began (hiredis may build part of
        # it, an error inside an array included, in a gets() that returns incomplete)
        self._made = _ReplyError.made

    def feed(self, data: bytes) -> None:
        self._reader.feed(data)

    def get(self) -> Any:
        try:
            reply = self._reader.gets()
        except ProtocolError as exc:
            raise ValueError(f"not RESP: {exc}") from None
        if reply is _NO_REPLY:
            return reply
        made, self._made = self._made, _ReplyError.made
        return reply if made == self._made else _as_coredis(reply)


def wire_target(client: Any) -> dict[str, Any] | None:
    """Where and how to connect for a coredis standalone client (``host``/``port`` or
    ``path``, ``username``, ``password``, ``db``, ``client_name``), or None when its
    connections need what this module does not do (TLS)."""
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    location = getattr(pool, "location", None)
    if kwargs is None or location is None or kwargs.get("ssl_context") is not None:
        return None
    target = {k: kwargs.get(k) for k in ("username", "password", "db", "client_name")}
    if hasattr(location, "path"):
        target["path"] = location.path
    elif hasattr(location, "host") and hasattr(location, "port"):
        target["host"], target["port"] = location.host, location.port
    else:
        return None
    return target


async def connect(target: dict[str, Any], connect_timeout: float, who: str) -> trio.SocketStream:
    """A stream to ``target`` (from :func:`wire_target`) within ``connect_timeout``;
    raises ``coredis.exceptions.ConnectionError`` (``who`` names the caller in it)."""
    try:
        with trio.fail_after(connect_timeout):
            if "path" in target:
                return await trio.open_unix_socket(target["path"])
            return await trio.open_tcp_stream(target["host"], int(target["port"]))
    except (OSError, trio.TooSlowError) as exc:
        raise RedisConnectionError(f"{who}: cannot connect: {exc or type(exc).__name__}") from None


def session_commands(target: dict[str, Any]) -> list[tuple[Any, ...]]:
    """What a new connection to ``target`` sends first: ``AUTH``, ``SELECT`` and
    ``CLIENT SETNAME`` as its URL asks (each reply ``OK`` or an error)."""
    hello: list[tuple[Any, ...]] = []
    if target.get("password") is not None:
        user = target.get("username")
        hello.append((b"AUTH", *([user] if user else []), target["password"]))
    if target.get("db"):
        hello.append((b"SELECT", int(target["db"])))
    if target.get("client_name"):
        hello.append((b"CLIENT", b"SETNAME", target["client_name"]))
    return hello


class Batch:
    """Commands written together; :meth:`replies` waits for theirs (see the module
    docstring)."""

    __slots__ = ("_conn", "_replies")

    def __init__(self, conn: WireConnection, replies: list[Any]) -> None:
        self._conn, self._replies = conn, replies

    async def replies(self) -> list[Any]:
        """One reply (or exception) per command, in order."""
        replies = self._replies
        if replies and replies[-1] is _UNSET:  # FIFO: the last one answered = all are
            await self._conn._wait(replies)
        return list(replies)


class WireConnection:
    """One connection to a standalone Redis (see the module docstring)."""

    def __init__(self, stream: trio.SocketStream, command_timeout: float) -> None:
        self._stream = stream
        self._fd = stream.socket.fileno()
        self._timeout = command_timeout
        self._parser = ReplyReader()
        # (the reply list, index) of every command written and not yet answered, in order
        self._unanswered: collections.deque[tuple[list[Any], int]] = collections.deque()
        self._reading = False  # a waiter reads the socket
        self._turn: trio.Event | None = None  # waiters not reading wait on it
        # held while a batch is written: only awaited when one did not fit the socket
        # buffer (FIFO, so batches go in the order ``send`` was called)
        self._sending = trio.StrictFIFOLock()
        self.error: BaseException | None = None  # set once: the connection is closed

    @classmethod
    async def open(cls, target: dict[str, Any], *, connect_timeout: float,
                   command_timeout: float) -> WireConnection:
        """Connect to ``target`` (from :func:`wire_target`) and prepare the session;
        raises ``coredis.exceptions.ConnectionError``, ``TimeoutError`` or the error Redis
        answered (e.g. a wrong password)."""
        conn = cls(await connect(target, connect_timeout, "lane"), command_timeout)
        hello = session_commands(target)
        if hello:
            try:
                for reply in await (await conn.send(hello)).replies():
                    if isinstance(reply, BaseException):
                        raise reply
            except BaseException:
                conn.close(RedisConnectionError("lane: session setup failed"))
                raise
        return conn

    @property
    def usable(self) -> bool:
        return self.error is None

    async def send(self, commands: Sequence[tuple[Any, ...]]) -> Batch:
        """Write ``commands`` (each ``(name, *args)``) after every batch sent before;
        returns once all of it is on the socket.  Raises the connection's error when it
        is closed (nothing of this batch was written then)."""
        data = pack_commands(commands)
        lock = self._sending
        if lock.locked():  # rare: a batch bigger than the socket buffer is being written
            await lock.acquire()
        else:
            lock.acquire_nowait()
        try:
            if self.error is not None:
                raise self.error
            replies = [_UNSET] * len(commands)
            self._unanswered.extend((replies, i) for i in range(len(replies)))
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.close(RedisConnectionError(f"lane: connection lost while sending: {exc}"))
                raise self.error from None  # type: ignore[misc]
            if sent < len(data):
                await self._send_rest(memoryview(data)[sent:])
        finally:
            lock.release()
        return Batch(self, replies)

    async def _send_rest(self, rest: memoryview) -> None:
        try:
            with trio.move_on_after(self._timeout) as scope:
                while rest and self.error is None:
                    try:
                        await trio.lowlevel.wait_writable(self._fd)
                    except trio.ClosedResourceError:
                        break  # closed by another task (a timeout): its error stands
                    try:
                        rest = rest[os.write(self._fd, rest):]
                    except BlockingIOError:
                        pass
            if scope.cancelled_caught:
                self.close(TimeoutError(f"lane: no room to send for {self._timeout} s"))
        except OSError as exc:
            self.close(RedisConnectionError(f"lane: connection lost while sending: {exc}"))
        except BaseException:  # cancelled half-written: the stream is unusable
            self.close(RedisConnectionError("lane: a send was cancelled half-written"))
            raise
        if self.error is not None:
            raise self.error

    async def _wait(self, replies: list[Any]) -> None:
        """Until ``replies`` is filled (read the socket when nobody else does)."""
        deadline = trio.current_time() + self._timeout
        while replies[-1] is _UNSET:
            if self._reading:
                turn = self._turn
                if turn is None:
                    turn = self._turn = trio.Event()
                with trio.move_on_at(deadline):
                    await turn.wait()
                if trio.current_time() >= deadline and replies[-1] is _UNSET:
                    self.close(TimeoutError(f"lane: no reply in {self._timeout} s"))
                continue
            self._reading = True
            try:
                with trio.move_on_at(deadline) as scope:
                    try:
                        await trio.lowlevel.wait_readable(self._fd)
                    except trio.ClosedResourceError:
                        continue  # closed by another task: the replies hold its error
                if scope.cancelled_caught:
                    self.close(TimeoutError(f"lane: no reply in {self._timeout} s"))
                else:
                    self._read()
            finally:
                self._reading = False
                turn, self._turn = self._turn, None
                if turn is not None:
                    turn.set()  # a reader left: the others look again (one reads next)

    def _read(self) -> None:
        try:
            data = os.read(self._fd, RECEIVE_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(RedisConnectionError(f"lane: connection lost while receiving: {exc}"))
            return
        if not data:
            self.close(RedisConnectionError("lane: Redis closed the connection"))
            return
        parser, unanswered = self._parser, self._unanswered
        parser.feed(data)
        try:
            while True:
                response = parser.get()
                if response is _NO_REPLY:
                    return
                if not unanswered:
                    raise ValueError("a reply nobody asked for")
                replies, i = unanswered.popleft()
                replies[i] = response
                turn, self._turn = self._turn, None
                if turn is not None:
                    turn.set()  # the others look whether theirs came (then wait anew)
        except (RedisError, ValueError, TypeError, IndexError) as exc:  # a protocol error:
            # the stream cannot be trusted
            self.close(RedisConnectionError(f"lane: bad reply from Redis: {exc!r}"))

    def close(self, error: BaseException) -> None:
        """Close the connection (once); every unanswered command gets ``error``."""
        if self.error is not None:
            return
        self.error = error
        while self._unanswered:
            replies, i = self._unanswered.popleft()
            replies[i] = error
        sock = self._stream.socket
        trio.lowlevel.notify_closing(sock)
        sock.close()
        turn, self._turn = self._turn, None
        if turn is not None:
            turn.set()
