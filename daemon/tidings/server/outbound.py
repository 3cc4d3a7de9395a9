"""The outbound half of a connection: the queue, reply credits, the writer, closing.

``Outbound`` is the base class of ``connection.Connection``; it owns everything that
writes to the peer, so the connection module keeps the reader, the frame handling and
the replay.  All of it runs in the connection's tasks (never blocks the router).

Queue and credits
-----------------
One list (``_out``) carries, in order: routed messages (``Routed``, at most
``outbound_queue`` of them: the router's offers count ``_queued`` against that bound)
and replies (``_Reply``, each holding one of ``max_inflight`` reply credits, plus a
replay's ``resumed`` frame).  Those bounds, not the list, limit its length.  A plain
list and an event made only while the writer waits, rather than a trio memory channel:
an idle connection then holds ~1.7 KiB less (measured with bench/memprofile.py).
``_take_credit`` waits while
no credit is free -- the reader is not reading meanwhile, so a client that floods faster
than it reads is slowed down by TCP -- and the writer gives credits back once the
replies are on the wire.  Control frames (pong, ping) bypass the queue: on a plain
socket with nothing else being written, ``send_control`` writes them at once from the
caller's task (the housekeeper, the reader); otherwise ``queue_control`` puts them first
in the next write.

Plain sockets
-------------
On a plain TCP stream (not TLS) the connection reads with ``read`` straight on the
socket (``_receive``) and writes control frames with one non-blocking ``send``
(``send_control``), bypassing trio's per-call stream wrappers: an idle connection then
holds fewer frames while it waits, and a keepalive round (ping out, pong in) wakes no
writer task (146 -> 30 us of CPU per round, measured in docs/performance.md).  The
writer, the greeting and the close frame write with one non-blocking ``send`` first
(``_send_all``) and use trio's ``send_all`` only for what did not fit.

The flusher and the writer
--------------------------
On a plain socket with no writer running, what is queued is written by the server's
flusher (:mod:`tidings.server.flusher`) at the end of the run loop's turn (or, for
what the hub's writer queued while answering a batch, by the writer itself when it
releases the flusher): one non-blocking ``send`` (``_flush``), no task of this connection
woken.  What does not fit goes first in the queue and the writer takes over.  The writer
is a task that exists only while there is work: it drains everything queued into one
``send_all`` (up to 1,024 items a batch) and exits after ``WRITER_LINGER_S`` without
work; the next queued item starts a new one.  Idle connections hold no writer task.
A writer that wrote only control frames (the keepalive's ping, a pong) exits at once:
the connection is idle, and waiting out the linger cost more than the ping itself
(~65 us of a ~120 us ping round, measured).  Once a batch is written, ``_delivered(seq)``
hears the highest inbox seq it carried (when above every earlier one): the connection
reports it as its device's delivered mark.

Closing
-------
``_close_handshake`` (called by the connection task when it closes: after ``kill`` or
the peer's close frame) lets a running writer finish its batch, writes what is still
queued and the close frame, then reads and drops input until the peer's close frame or
EOF: a socket closed with unread input sends a TCP reset, which can destroy the close
frame and the replies before it.  (After echoing the peer's close there is nothing to
wait for.)
The caller bounds it with ``CLOSE_TIMEOUT``.  A peer that resets TCP is its doing, not a
crash of ours: ``_reset`` logs ``event=connection_closed by=peer`` at info (once a
minute) and nothing more is written.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import trio
from trio.lowlevel import wait_readable
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, TextMessage
from wsproto.utilities import LocalProtocolError

from tidings import log
from tidings.config import LimitsConfig
from tidings.wire.frames import ClientFrames, ForWsproto, Refusal
from tidings.wire.protocol import BINARY, TEXT, data_frame

__all__ = ["CLOSE_TIMEOUT", "RECEIVE_SIZE", "Outbound", "read_nowait"]

RECEIVE_SIZE = 65536
#: A close (ours or the peer's) takes at most this long, then TCP is closed regardless.
CLOSE_TIMEOUT = 2.0
#: How long an idle writer waits for more work before exiting (a new one starts on demand).
WRITER_LINGER_S = 0.25
#: At most this many queued items go into one write.
WRITE_BATCH = 1024
_resets = log.LogOnce(interval=60.0)
_CLOSED_ERRNOS = {errno.EBADF, errno.ENOTSOCK}


def read_nowait(fd: int, size: int) -> bytes | None:
    """One non-blocking ``read`` of at most ``size`` bytes straight on a plain socket:
    the bytes (b"" at EOF), or None when nothing has arrived.  Errors as trio's streams
    raise them: ``ClosedResourceError`` (our socket is closed), ``BrokenResourceError``
    (the peer reset it)."""
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in _CLOSED_ERRNOS:
            raise trio.ClosedResourceError("the socket was already closed") from None
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


def write_nowait(fd: int, data: bytes) -> int:
    """One non-blocking ``send`` of ``data`` straight on a plain socket: how many bytes
    went (0 when the socket would block).  Errors as ``read_nowait``'s."""
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0
    except OSError as exc:
        if exc.errno in _CLOSED_ERRNOS:
            raise trio.ClosedResourceError("the socket was already closed") from None
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


class _Reply:
    """A reply (ack, pong, error, ...) in the outbound queue: it holds one credit.
    ``binary``: MessagePack in a binary frame (the request was binary), else JSON text."""

    __slots__ = ("binary", "payload")

    def __init__(self, payload: bytes, binary: bool = False) -> None:
        self.payload = payload
        self.binary = binary


class Outbound:
    """What a connection writes, and how it stops writing (see the module docstring)."""

    __slots__ = (
        "_binary", "_children", "_children_done", "_child_scopes", "_close", "_closed_by",
        "_control", "_credit_waiter", "_credits", "_deflate", "_flush_pending", "_flusher",
        "_frames", "_more", "_out",
        "_nursery", "_parse_failed", "_peer_gone", "_queue_bound", "_queued", "_reader_scope",
        "_send_broken", "_sock", "_space_waiter", "_writer_exit",
        "_writer_running", "_written_seq", "_ws", "conn_id", "stream", "user",
    )

    def __init__(self, stream: trio.abc.Stream, ws: WSConnection | None, limits: LimitsConfig, *,
                 conn_id: str, user: str, binary: bool, deflate: bool,
                 max_message_bytes: int) -> None:
        self.stream = stream
        # A plain TCP stream's socket: read and (control frames) written directly, see
        # ``_receive`` and ``send_control``; None for TLS and in-memory streams.
        self._sock = stream.socket if type(stream) is trio.SocketStream else None
        self._ws = ws  # made on first use (see ``ws``) unless an extension needs it now
        self._frames = ClientFrames(max_message_bytes)  # the peer's bytes -> frames
        self.conn_id = conn_id
        self.user = user
        self._binary = binary  # pushed frames as MessagePack (?encoding=msgpack)
        self._deflate = deflate  # permessage-deflate: frames go through wsproto
        self._queue_bound = limits.outbound_queue
        self._out: list[Any] = []  # routed messages and replies, in order
        self._more: trio.Event | None = None  # exists while the writer waits for work
        self._nursery: trio.Nursery | None = None  # where helper tasks run (``_start``)
        self._children = 0  # helper tasks started and not yet finished
        self._child_scopes: set[trio.CancelScope] | None = None  # theirs, while any runs
        self._children_done: trio.Event | None = None  # set when the last one finishes
        self._queued = 0  # routed messages in the channel
        self._credits = limits.max_inflight
        self._credit_waiter: trio.Event | None = None
        self._space_waiter: trio.Event | None = None
        self._control: list[bytes] = []
        self._close: tuple[int, str] | None = None  # set once: closing with this code
        self._closed_by = "peer"
        self._peer_gone = False  # EOF or reset from the peer: nothing more to write
        self._parse_failed = False  # wsproto refused the input: never parse it again
        self._reader_scope: trio.CancelScope | None = None
        self._writer_running = False
        self._writer_exit: trio.Event | None = None
        self._send_broken = False  # a send was interrupted: half a frame may be out
        self._written_seq = 0  # the highest inbox seq written (see _delivered)
        self._flusher: Any = None  # a plain socket's server.flusher.Flusher (see ``run``)
        self._flush_pending = False  # registered with the flusher, not yet flushed

    @property
    def ws(self) -> WSConnection:
        """The wsproto connection, made on first use: the control frames, fragments and
        the close, which most connections meet only at the end.  Whole data frames never
        reach it (``wire.frames``), so an idle connection holds none (~1.5 KiB)."""
        ws = self._ws
        if ws is None:
            ws = self._ws = WSConnection(ConnectionType.SERVER)
        return ws

    # -- queueing (sync, never blocks) -----------------------------------------------

    def reply_nowait(self, payload: bytes, binary: bool = False) -> None:
        """Queue a reply for which the caller holds a credit (taken by ``_take_credit``)."""
        if self._close is not None:
            self._give_credits(1)
            return
        self._enqueue(_Reply(payload, binary))

    def _enqueue(self, item: Any) -> None:
        """Append to the outbound list and get it written: by the flusher in its next
        turn (a plain socket, no writer running), else by the writer (woken or started)."""
        self._out.append(item)
        if self._flusher is None or self._writer_running:
            self._wake()
        elif not self._flush_pending:
            self._flush_pending = True
            self._flusher.schedule(self)

    def _flush(self) -> None:
        """The flusher's call: write what is queued with one non-blocking ``send``; what
        does not fit goes back first in the queue and the writer writes it.  When a
        writer runs or the connection is closing, they write it instead.  Never raises
        (a bug of ours ends this connection, as in a helper task), never blocks."""
        self._flush_pending = False
        try:
            self._flush_now()
        except Exception as exc:
            log.log("error", "connection_crashed", error=repr(exc), conn=self.conn_id)
            self._send_broken = True  # half a frame may be out: write nothing more
            self._kill_reader()

    def _flush_now(self) -> None:
        if self._writer_running or self._close is not None or self._nursery is None:
            if self._out or self._control:
                self._wake()
            return
        if self._peer_gone or self._send_broken or not (self._out or self._control):
            return
        data, messages, replies, top = self._drain(closing=False)
        try:
            sent = write_nowait(self._sock.fileno(), data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._reset()
            if self._reader_scope is not None:
                self._reader_scope.cancel()
            return
        if sent < len(data):
            self._control.insert(0, data[sent:])  # whole frames, in order, before all else
        self._written(messages, replies, top)
        if self._out or self._control:
            self._ensure_writer()

    def queue_control(self, data: bytes) -> None:
        """Queue a control frame ahead of all data (pong, ping); never blocks."""
        self._control.append(data)
        self._wake()

    def send_control(self, frame: bytes) -> None:
        """Send a control frame (the keepalive's ping, a pong) now: on a plain socket with
        nothing queued and no write in progress, one non-blocking ``send`` from the
        caller's task -- no writer task is started and the connection task is not woken
        (with the direct reads: 146 -> 30 us per keepalive round, measured).  When the
        socket would block (or only part of the frame fits), or anything else is being
        written, the frame (or its rest) goes the queued way (``queue_control``), which
        writes control frames first: the bytes on the wire stay whole frames, in order."""
        sock = self._sock
        if (sock is not None and not self._writer_running and self._nursery is not None
                and self._close is None and not self._peer_gone and not self._control
                and not self._out):
            try:
                sent = write_nowait(sock.fileno(), frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                sent = 0  # the queued path meets the error and handles it
            if sent == len(frame):
                return
            frame = frame[sent:]
        self.queue_control(frame)

    async def _receive(self, wait_first: bool) -> bytes:
        """The peer's next bytes (at most RECEIVE_SIZE; b"" at EOF), like
        ``stream.receive_some`` -- which it is, except on a plain socket: there one
        ``read`` straight on the socket, without trio's per-call wrappers (an async
        context manager, a conflict detector, error translation: ~1.5 KiB of frames
        held by every idle connection while it waits, and CPU on every pong).
        ``wait_first``: the last read emptied the socket, so wait for input before
        reading (one ``read`` that fails less per wake-up).  Always a checkpoint; errors
        as trio's: ``BrokenResourceError`` (reset), ``ClosedResourceError``."""
        sock = self._sock
        if sock is None:
            return await self.stream.receive_some(RECEIVE_SIZE)
        fd = sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the socket was already closed")
        if wait_first:
            await wait_readable(fd)
        else:
            await trio.lowlevel.checkpoint()
        while True:
            data = read_nowait(fd, RECEIVE_SIZE)
            if data is not None:
                return data
            await wait_readable(fd)

    async def _send_all(self, data: bytes) -> None:
        """``stream.send_all(data)``; on a plain socket first one non-blocking ``send``
        straight on the socket -- the usual case, where all of it fits in the socket
        buffer, then costs no trio wrappers (an async context manager, a conflict
        detector, two checkpoints) -- and ``send_all`` only for a rest.  Errors as
        trio's.  Not a checkpoint when everything fit."""
        sock = self._sock
        if sock is not None:
            sent = write_nowait(sock.fileno(), data)
            if sent == len(data):
                return
            if sent:
                await self.stream.send_all(memoryview(data)[sent:])
                return
        await self.stream.send_all(data)

    def _wake(self) -> None:
        """Wake a lingering writer (or start one)."""
        if self._more is not None:
            self._more.set()
        else:
            self._ensure_writer()

    def _ensure_writer(self) -> None:
        """Start the writer if none runs.  An idle connection has no writer task: it
        exits after WRITER_LINGER_S without work, and the next queued item starts it."""
        if not self._writer_running and self._nursery is not None and self._close is None:
            self._writer_running = True
            self._start(self._writer)

    # -- helper tasks (the writer, a replay) -----------------------------------------

    def _start(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` as a helper task of this connection in ``_nursery`` -- the
        server's nursery of connection tasks, so an idle connection holds no nursery of
        its own (~1.2 KiB: a nursery has a cancel scope, a cancel status and two sets).
        What a per-connection nursery gave is kept by hand: each helper runs in its own
        cancel scope, ``_stop_children`` cancels them and waits for them before the
        stream is closed, and a crash of one is this connection's alone."""
        assert self._nursery is not None
        self._children += 1
        self._nursery.start_soon(self._child, fn, args)

    async def _child(self, fn: Any, args: tuple) -> None:
        scope = trio.CancelScope()
        if self._nursery is None:  # the connection ended before this task started
            scope.cancel()
        scopes = self._child_scopes
        if scopes is None:
            scopes = self._child_scopes = set()
        scopes.add(scope)
        try:
            with scope:
                await fn(*args)
        except Exception as exc:  # a bug of ours: log it, abort this connection only
            log.log("error", "connection_crashed", error=repr(exc), conn=self.conn_id)
            self._send_broken = True  # half a frame may be out: write nothing more
            self._kill_reader()
        finally:
            scopes.discard(scope)
            if not scopes and self._child_scopes is scopes:
                self._child_scopes = None
            self._children -= 1
            if not self._children and self._children_done is not None:
                self._children_done.set()

    def _kill_reader(self) -> None:
        """Stop the reader (the connection task then closes): ``Connection.kill``."""

    async def _stop_children(self) -> None:
        """Cancel the helper tasks and wait until every one has finished (shielded: the
        connection task may itself be cancelled); none starts after this."""
        self._nursery = None
        if not self._children:
            return
        for scope in list(self._child_scopes or ()):
            scope.cancel()
        self._children_done = done = trio.Event()
        with trio.CancelScope(shield=True):
            await done.wait()

    # -- credits and space (awaited by the reader and the replay) -------------------

    async def _take_credit(self) -> None:
        while self._credits == 0:
            self._credit_waiter = trio.Event()
            await self._credit_waiter.wait()
        self._credits -= 1

    def _give_credits(self, n: int) -> None:
        self._credits += n
        if self._credit_waiter is not None:
            self._credit_waiter.set()
            self._credit_waiter = None

    async def _wait_space(self) -> None:
        while self._queued >= self._queue_bound:
            self._space_waiter = trio.Event()
            await self._space_waiter.wait()

    # -- the writer ------------------------------------------------------------------

    def _drain(self, *, closing: bool) -> tuple[bytes, int, int, int]:
        """What is queued (up to ``WRITE_BATCH`` items; all of it when ``closing``) as one
        buffer: control frames first, then replies and messages in order, then (when
        ``closing``) the close frame."""
        batch = self._out
        if closing or len(batch) <= WRITE_BATCH:
            self._out = []
        else:
            batch, self._out = batch[:WRITE_BATCH], batch[WRITE_BATCH:]
        out: list[bytes] = self._control
        self._control = []
        replies = messages = top = 0
        for item in batch:
            if type(item) is _Reply:
                out.append(self._frame(item.payload, item.binary))
                replies += 1
                continue
            seq = item.seq
            if seq is not None and seq > top:
                top = seq
            if self._deflate:
                out.append(self._frame(item.binary_payload if self._binary else item.payload, self._binary))
                messages += 1
            else:  # the frame built once and shared by every recipient
                out.append(item.binary_frame if self._binary else item.frame)
                messages += 1
        if closing and self._close is not None:
            try:
                out.append(self.ws.send(CloseConnection(*self._close)))
            except LocalProtocolError:
                pass  # already closed both ways
        return b"".join(out), messages, replies, top

    def _frame(self, payload: bytes, binary: bool) -> bytes:
        if self._deflate:  # compressed per connection by wsproto
            return self.ws.send(BytesMessage(payload) if binary else TextMessage(payload.decode()))
        return data_frame(payload, BINARY if binary else TEXT)

    async def _writer(self) -> None:
        """Drain the outbound channel, coalescing each batch into one ``send_all``.

        Runs while there is work (lingering WRITER_LINGER_S for more), then exits; it
        stops after its current batch once the connection is closing (the connection
        task writes what is left and the close frame).  Nothing of a written batch stays
        referenced while it waits."""
        try:
            while self._close is None:
                if not self._out and not self._control:
                    self._more = more = trio.Event()
                    with trio.move_on_after(WRITER_LINGER_S):
                        await more.wait()
                    self._more = None
                    if not self._out and not self._control:
                        break  # idle: exit; the next queued item starts a new writer
                    if self._close is not None:
                        break  # closing: the connection task writes the rest
                data, messages, replies, top = self._drain(closing=False)
                if data:
                    self._send_broken = True
                    await self._send_all(data)
                    self._send_broken = False
                    del data
                self._written(messages, replies, top)
                if not (messages or replies) and not self._control and not self._out:
                    break  # only a ping or pong: an idle connection, don't linger for more
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._reset()
            if self._reader_scope is not None:
                self._reader_scope.cancel()
        finally:
            self._writer_running = False
            if self._writer_exit is not None:
                self._writer_exit.set()

    def _delivered(self, seq: int) -> None:
        """Inbox messages up to ``seq`` were written to the peer (a hook: the
        connection reports its device's delivered mark)."""

    def _written(self, messages: int, replies: int, top: int) -> None:
        """A drained batch is on the wire (or first in the queue): free its queue places
        and credits, and report ``top``, its highest inbox seq, when above every earlier."""
        if top > self._written_seq:
            self._written_seq = top
            self._delivered(top)
        self._queued -= messages
        if messages and self._space_waiter is not None:
            self._space_waiter.set()
            self._space_waiter = None
        if replies:
            self._give_credits(replies)

    # -- closing ---------------------------------------------------------------------

    def _reset(self) -> None:
        """The peer reset TCP (or closed it under a write): its doing, not a crash of
        ours.  Nothing more can be written."""
        self._peer_gone = True
        if self._close is None:
            self._closed_by = "peer"
            _resets.log("info", "connection_closed", key="reset", conn=self.conn_id,
                        user=self.user, by="peer", error="connection reset")

    async def _close_handshake(self) -> None:
        """Let a running writer finish its batch, write what is still queued and the
        close frame, then discard input until the peer's close frame or EOF.  The
        caller bounds the time (CLOSE_TIMEOUT) and closes TCP after."""
        if self._close is None:
            self._close = (1000, "")
        if self._writer_running:
            self._writer_exit = trio.Event()
            self._wake()  # a lingering writer is waiting for work: let it see _close now
            await self._writer_exit.wait()
        if self._send_broken or self._peer_gone:
            return  # half a frame is on the wire (or nobody reads): nothing more to say
        data, messages, replies, top = self._drain(closing=True)
        self._send_broken = True
        await self._send_all(data)
        self._send_broken = False
        self._written(messages, replies, top)
        await self._discard_input()

    async def _discard_input(self) -> None:
        """After our close frame: read and drop whatever the peer still sends, until its
        close frame (parsed by wsproto unless the input was unparsable) or EOF.  Input
        goes through the connection's frame splitter (``_frames``), which may hold the
        start of a frame from before the close."""
        if self.ws.state is ConnectionState.CLOSED:
            return  # we echoed the peer's close: the handshake is complete
        parse = not self._parse_failed
        while True:
            if parse:
                for event in self.ws.events():
                    if isinstance(event, CloseConnection):
                        if self.ws.state is ConnectionState.CLOSED:
                            return  # the peer's close frame: the handshake is complete
                        parse = False  # a parse error: only EOF or the timeout ends it
                        break
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                return
            if parse:  # through the same splitter as before the close: frames stay whole
                for item in self._frames.feed(data):
                    if type(item) is ForWsproto:
                        self.ws.receive_data(item)
                    elif type(item) is Refusal:
                        parse = False  # unparsable from here: only EOF or the timeout
                    # data frames the peer still sent: dropped
