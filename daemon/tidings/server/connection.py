"""One WebSocket connection after its handshake: trio I/O around wsproto's frame engine.

Ownership and tasks
-------------------
The connection task (spawned by the server, one per TCP connection) owns the stream and
runs the *reader* inline: it receives up to 64 KiB, feeds wsproto, and handles each
complete frame in place (no per-message task hop).  One *writer* task drains the bounded
outbound memory channel and coalesces everything queued into one ``send_all``.  A replay
task exists only while stored messages are being replayed.

Outbound queue
--------------
The channel holds routed messages (``Routed``, at most ``limits.outbound_queue`` of them)
plus the connection's own replies (ack, pong, error: at most ``limits.max_inflight``).
The router offers messages with ``offer_nowait``; a full message quota is a slow
consumer.  Replies never count as that: before handling a frame, the reader takes a
reply credit, waiting (and so not reading the socket) while none is free, and the writer
gives the credit back once the reply is on the wire.  A client that floods faster than it
reads is slowed down by TCP, not disconnected.  Control frames (pong to a ping, close)
bypass the queue entirely, so a full queue never stalls them.

Replay
------
While replaying stored messages (on connect, or after ``resume``) live messages for the
user are *absorbed*: the replay reads them from the store, so they are not queued twice.
``router.InboxGate`` holds the decision (sans-IO, property-tested): the highest seq handed
to the client, and the highest live seq seen while replaying.  The replay ends only when
a read finds nothing new *and* no live message arrived above what it sent; the switch to
live happens with no await in between, so there is no gap and no duplicate.

Closing
-------
``kill(code, reason)`` (from the router, the housekeeper or a policy check) stops the
reader, lets the writer finish the batch it is writing, then sends the close frame;
after ``CLOSE_TIMEOUT`` the TCP connection is aborted regardless.  Who closed is logged:
``by=server`` (with the code) or ``by=peer``.
"""

from __future__ import annotations

import time
from typing import Any

import trio
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

from tidings import log
from tidings.auth import Authenticator
from tidings.wire.handshake import http_response
from tidings.server.hub import Hub
from tidings.wire.limits import TokenBucket
from tidings.wire.protocol import (
    BINARY,
    TEXT,
    Ack,
    Ping as PingCmd,
    ProtocolError,
    Send,
    encode,
    encode_msgpack,
    message_fields,
    message_json,
    parse_binary_frame,
    parse_client_frame,
    text_frame,
)
from tidings.server.commands import handle_command
from tidings.routing.router import InboxGate, Offer, Routed
from tidings.store import StoreError

__all__ = ["CLOSE_TIMEOUT", "Connection"]

RECEIVE_SIZE = 65536
CLOSE_TIMEOUT = 2.0
#: How long an idle writer waits for more work before exiting (a new one starts on demand).
WRITER_LINGER_S = 0.25
_IDLE = object()
REPLAY_PAGE = 256
_bad_frames = log.LogOnce(interval=60.0)


class _Reply:
    """A reply (ack, pong, error, ...) in the outbound queue: it holds one credit.
    ``binary``: MessagePack in a binary frame (the request was binary), else JSON text."""

    __slots__ = ("binary", "payload")

    def __init__(self, payload: bytes, binary: bool = False) -> None:
        self.payload = payload
        self.binary = binary


class Connection:
    """A registered WebSocket connection: the router's endpoint for one device."""

    __slots__ = (
        "_binary", "_bucket", "_close", "_closed_by", "_control", "_credit_waiter", "_credits",
        "_deflate", "_gate", "_nursery", "_queue_bound", "_queued", "_reader_scope",
        "_registered", "_replay_scope", "_rx", "_send_broken", "_since", "_space_waiter",
        "_tx", "_wake_queued", "_writer_exit", "_writer_running", "auth", "conn_id", "exp",
        "hub", "last_activity", "pinged", "reply_binary", "rooms_allowed", "greeting", "stream", "user",
        "ws",
        "connected_at", "remote",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        ws: WSConnection,
        hub: Hub,
        auth: Authenticator,
        *,
        conn_id: str,
        user: str,
        exp: float | None,
        since: int | None,
        rooms: tuple[str, ...] | None = None,
        binary: bool = False,
        deflate: bool = False,
    ) -> None:
        limits = hub.config.limits
        self.stream = stream
        self.ws = ws
        self.hub = hub
        self.auth = auth
        self.conn_id = conn_id
        self.user = user
        self.exp = exp
        self.last_activity = time.monotonic()
        self.connected_at = time.time()  # for the operator's page (GET /api/users/...)
        self.remote = ""  # the peer's "host:port", set by the server
        self.pinged = False
        self._since = since
        self.rooms_allowed = rooms  # the token's `rooms` claim (None: the config default)
        self._binary = binary  # pushed frames as MessagePack (?encoding=msgpack)
        self._deflate = deflate  # permessage-deflate: frames go through wsproto
        self.reply_binary = False  # the frame being handled was binary: reply in kind
        self._queue_bound = limits.outbound_queue
        # Room for the message quota, every reply credit, the `resumed` frame of a
        # replay and one wake-up: producers never find it full unexpectedly.
        self._tx, self._rx = trio.open_memory_channel[Any](
            limits.outbound_queue + limits.max_inflight + 2
        )
        self._wake_queued = False
        self._nursery: trio.Nursery | None = None
        self._queued = 0  # routed messages in the channel
        self._credits = limits.max_inflight
        self._credit_waiter: trio.Event | None = None
        self._space_waiter: trio.Event | None = None
        self._control: list[bytes] = []
        self._gate = InboxGate()  # replaying from creation: the first replay starts at once
        self._replay_scope: trio.CancelScope | None = None
        self._bucket: TokenBucket | None = None
        self._close: tuple[int, str] | None = None
        self._closed_by = "peer"
        self._reader_scope: trio.CancelScope | None = None
        self._writer_running = False
        self._writer_exit: trio.Event | None = None
        self._send_broken = False
        self.greeting = b""  # the 101 + hello, set by the server, written by run()
        self._registered = True  # the server registers us right after construction

    # -- router endpoint (sync, never blocks) ---------------------------------------

    def offer_nowait(self, routed: Routed) -> Offer:
        if self._close is not None:
            return Offer.CLOSING
        if routed.seq is not None and not self._gate.live(routed.seq):
            return Offer.ABSORBED
        if self._queued >= self._queue_bound:
            return Offer.FULL
        self._tx.send_nowait(routed)
        self._queued += 1
        self._ensure_writer()
        if routed.seq is not None:
            self._gate.sent(routed.seq)
        return Offer.QUEUED

    def reply_nowait(self, payload: bytes, binary: bool = False) -> None:
        """Queue a reply for which the caller holds a credit (taken by ``_take_credit``)."""
        if self._close is not None:
            self._give_credits(1)
            return
        self._tx.send_nowait(_Reply(payload, binary))
        self._ensure_writer()

    def on_stored(self, ctx: tuple[Any, bool], msg_id: str, seq: int, delivered: int) -> None:
        """The hub stored and routed our send: queue its ack (the send's credit).
        ``ctx`` is what we gave the hub: the frame's id and whether it was binary."""
        fid, binary = ctx
        enc = encode_msgpack if binary else encode
        self.reply_nowait(enc("ack", id=fid, msg_id=msg_id, seq=seq, delivered=delivered), binary)

    def on_cursor_saved(self, ctx: tuple[Any, bool], seq: int) -> None:
        """The hub saved the cursor an ``ack`` with an id moved: queue ``acked``."""
        fid, binary = ctx
        enc = encode_msgpack if binary else encode
        self.reply_nowait(enc("acked", id=fid, seq=seq), binary)

    def on_cursor_failed(self, ctx: tuple[Any, bool]) -> None:
        fid, binary = ctx
        enc = encode_msgpack if binary else encode
        self.reply_nowait(enc("error", id=fid, code="unavailable", message="ack not saved; retry"), binary)

    def on_store_failed(self, ctx: tuple[Any, bool]) -> None:
        fid, binary = ctx
        enc = encode_msgpack if binary else encode
        self.reply_nowait(enc("error", id=fid, code="unavailable", message="message not stored; retry"), binary)

    def kill(self, code: int, reason: str) -> None:
        """Close with ``code`` soon; idempotent, never blocks (the first call wins)."""
        if self._close is not None:
            return
        self._close = (code, reason)
        self._closed_by = "server"
        self._unregister()  # nothing more is routed here
        if self._reader_scope is not None:
            self._reader_scope.cancel()  # the connection task then flushes and closes
        if self._replay_scope is not None:
            self._replay_scope.cancel()
        self._wake()

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self.hub.unregister(self)

    def queue_control(self, data: bytes) -> None:
        """Queue a control frame ahead of all data (pong, ping); never blocks."""
        self._control.append(data)
        self._wake()

    def _wake(self) -> None:
        """Wake a lingering writer (or start one).  At most one wake-up is ever queued
        (a reserved slot)."""
        if not self._wake_queued:
            self._wake_queued = True
            self._tx.send_nowait(None)
        self._ensure_writer()

    def _ensure_writer(self) -> None:
        """Start the writer if none runs.  An idle connection has no writer task: it
        exits after WRITER_LINGER_S without work, and the next queued item starts it."""
        if not self._writer_running and self._nursery is not None and self._close is None:
            self._writer_running = True
            self._nursery.start_soon(self._writer)

    # -- the connection task ---------------------------------------------------------

    async def run(self) -> None:
        """Serve until closed.  Unregisters the connection and closes the stream on exit."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if not await self._greet():
                    return
                peer_gone = False  # stays False when kill() cancels the reader
                if self._close is None:  # kill() may have come during the handshake
                    with trio.CancelScope() as self._reader_scope:
                        peer_gone = await self._reader()
                self._unregister()  # closing: nothing more is routed here
                if self._replay_scope is not None:
                    self._replay_scope.cancel()
                if not peer_gone:
                    if self._close is None:
                        self._close = (1000, "")
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await self._flush_and_close()
                nursery.cancel_scope.cancel()
        finally:
            self._unregister()
            await trio.aclose_forcefully(self.stream)
            code = self._close[0] if self._close else None
            log.log("debug", "closed", conn=self.conn_id, user=self.user, by=self._closed_by, code=code)

    async def _greet(self) -> bool:
        """Write the 101 and ``hello`` (prepared by the server) and start the first
        replay from the ack cursor (or ``?since=``).  When nothing is stored after that
        point -- the usual case -- ``resumed`` goes out in the same write and neither a
        replay task nor a writer task is started.  A store failure answers HTTP 503
        instead (no WebSocket is opened) and returns False."""
        self._writer_running = True  # nothing else may write until the greeting is out
        try:
            try:
                state = await self.hub.store.inbox_state(self.user)
            except StoreError as exc:
                log.log("error", "replay_failed", error=str(exc), conn=self.conn_id)
                self._close = (1011, "store unavailable")
                await self.stream.send_all(http_response(503, b"store unavailable; retry\n"))
                return False
            start = state.cursor if self._since is None else min(self._since, state.last_seq)
            self._gate.start(start)
            greeting, self.greeting = self.greeting, b""
            if state.last_seq <= start and self._gate.caught_up(0, REPLAY_PAGE):
                complete = state.first_seq <= start + 1
                enc = encode_msgpack if self._binary else encode
                resumed = enc("resumed", since=start, last=start, complete=complete)
                await self.stream.send_all(greeting + text_frame(resumed, BINARY if self._binary else TEXT))
            else:
                await self.stream.send_all(greeting)
                self.start_replay(start, credit=False, state=state)
        finally:
            self._writer_running = False
        if self._tx.statistics().current_buffer_used:
            self._ensure_writer()  # for whatever was routed here meanwhile
        return True

    async def _reader(self) -> bool:
        """Read and handle frames; return True when the peer dropped TCP (nothing to send).

        Bytes that arrived with the handshake were given to wsproto at construction."""
        data = b""
        limit = self.hub.config.server.max_message_bytes
        parts: list[str | bytes] = []
        size = 0
        while True:
            if data:
                self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, Message):
                    n = len(event.data)  # characters for text: count bytes near the limit
                    if n * 4 > limit - size and isinstance(event, TextMessage):
                        n = len(event.data.encode())
                    size += n
                    if size > limit:
                        self.kill(1009, f"message larger than {limit} bytes")
                        return False
                    if not event.message_finished:
                        parts.append(event.data)
                        continue
                    if parts:
                        parts.append(event.data)
                        whole: Any = ("" if isinstance(event, TextMessage) else b"").join(parts)
                        parts.clear()
                    else:
                        whole = event.data
                    size = 0
                    await self._take_credit()
                    await self._handle_frame(whole, isinstance(event, BytesMessage))
                elif isinstance(event, Ping):
                    self.queue_control(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if self.ws.state is ConnectionState.REMOTE_CLOSING:
                        self._close = (event.code, "")  # echo the peer's close
                        self._unregister()
                        self._closed_by = "peer"
                    else:  # wsproto could not parse a frame (bad UTF-8: 1007, else 1002)
                        self.kill(event.code, event.reason or "protocol error")
                    return False
                # Pong: only proves liveness, recorded below.
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                self._closed_by = "peer"
                return True
            self.last_activity = time.monotonic()
            self.pinged = False

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

    def reply(self, kind: str, **fields: Any) -> None:
        if self.reply_binary:
            self.reply_nowait(encode_msgpack(kind, **fields), True)
        else:
            self.reply_nowait(encode(kind, **fields))

    def error(self, fid: Any, code: str, message: str) -> None:
        _bad_frames.log("info", "client_error", key=code, user=self.user, conn=self.conn_id,
                        code=code, reason=message)
        self.reply("error", id=fid, code=code, message=message)

    # -- frame handling --------------------------------------------------------------

    async def _handle_frame(self, data: str | bytes, binary: bool) -> None:
        """Handle one complete message (JSON text or MessagePack binary); the caller holds
        one reply credit, which the reply uses (or which is given back)."""
        self.reply_binary = binary
        limits = self.hub.config.limits
        now = time.monotonic()
        if self._bucket is None:
            self._bucket = TokenBucket(limits.messages_per_second, limits.burst, now)
        allowed = self._bucket.take(now)
        try:
            cmd = parse_binary_frame(data) if binary else parse_client_frame(data)
        except ProtocolError as exc:
            cmd, fid, error = None, exc.frame_id, exc
        else:
            fid, error = cmd.id, None
        if not allowed:
            self.hub.rate_limited += 1
            if self._bucket.strikes >= limits.rate_limit_close_after:
                self._give_credits(1)
                self.kill(1008, "rate limit exceeded repeatedly")
                return
            self.error(fid, "rate_limited", f"more than {limits.messages_per_second:g} frames/s; retry later")
            return
        if error is not None:
            self.error(fid, error.code, error.message)
            return
        if type(cmd) is Send and cmd.to is not None:
            await self.hub.send(self, self.user, cmd.to, cmd.body, (cmd.id, binary))
        elif type(cmd) is PingCmd:
            self.reply("pong", id=cmd.id)
        elif type(cmd) is Ack:
            if cmd.id is None:
                self.hub.ack_cursor(self.user, cmd.seq)
                self._give_credits(1)
            else:  # `acked` once the cursor is saved: a reconnect then starts after it
                self.hub.ack_cursor(self.user, cmd.seq, self, (cmd.id, binary))
        else:
            await handle_command(self, cmd)

    # -- replay ----------------------------------------------------------------------

    def start_replay(self, since: int | None, *, credit: bool, fid: Any = None, state: Any = None) -> None:
        """(Re)start the replay; live messages are absorbed until it has caught up.

        ``credit``: the caller holds a reply credit for the ``resumed`` frame (a resume
        command).  The first replay on connect holds none and borrows the reserved slot.
        """
        if self._replay_scope is not None:
            self._replay_scope.cancel()
        self._gate.replaying = True  # absorb live messages from now on: the replay reads them
        self._replay_scope = trio.CancelScope()
        assert self._nursery is not None
        self._nursery.start_soon(self._replay, since, self._replay_scope, credit, fid, True, state)

    def resync(self) -> None:
        """Live messages may have been missed (the cluster's Redis link came back):
        re-read the inbox after the last seq sent, quietly (no ``resumed`` frame).  A
        replay already running reads the store to its end anyway."""
        if self._replay_scope is not None or self._close is not None or self._nursery is None:
            return
        self._gate.replaying = True
        self._replay_scope = trio.CancelScope()
        self._nursery.start_soon(self._replay, self._gate.sent_seq, self._replay_scope, True, None, False, None)

    async def _replay(
        self, since: int | None, scope: trio.CancelScope, credit: bool, fid: Any, announce: bool,
        state: Any,
    ) -> None:
        """Send stored messages after ``since`` (default: the ack cursor), then go live;
        with ``announce``, end with the ``resumed`` frame."""
        if not credit:
            self._credits -= 1  # may go to -1: the channel reserves a slot for it
        sent_resumed = False
        with scope:
            try:
                sent_resumed = await self._replay_pages(since, fid, announce, state)
            except StoreError as exc:
                log.log("error", "replay_failed", error=str(exc), conn=self.conn_id)
                self.kill(1011, "store unavailable")
        if announce and not sent_resumed:  # cancelled (a newer resume, or closing), or failed
            self._give_credits(1)

    async def _replay_pages(self, since: int | None, fid: Any, announce: bool, state: Any) -> bool:
        """``state``: the inbox_state already read by the greeting (else read here)."""
        gate = self._gate
        if state is None:
            state = await self.hub.store.inbox_state(self.user)
        start = state.cursor if since is None else min(since, state.last_seq)
        complete = state.first_seq <= start + 1  # else retention dropped part of the gap
        gate.start(start)
        # Nothing stored after `start` (the usual reconnect): the state read stands for
        # an empty page read, unless a live message came in meanwhile.
        caught_up = state.last_seq <= start and gate.caught_up(0, REPLAY_PAGE)
        while not caught_up:
            msgs = await self.hub.store.read_inbox(self.user, gate.sent_seq, REPLAY_PAGE)
            for m in gate.take(msgs):
                await self._wait_space()
                fields = message_fields(m.msg_id, m.seq, m.sender, m.recipient, m.body, m.ts)
                self._tx.send_nowait(Routed(message_json(fields), m.seq, fields))
                self._queued += 1
                self._ensure_writer()
                gate.sent(m.seq)
            caught_up = gate.caught_up(len(msgs), REPLAY_PAGE)  # no await since the read
        self._replay_scope = None
        if not announce:
            return False
        # The credit taken for this frame comes back when the writer has written it.
        # Binary-mode connections get it in MessagePack, like every pushed frame.
        enc = encode_msgpack if self._binary else encode
        resumed = enc("resumed", id=fid, since=start, last=gate.sent_seq, complete=complete)
        self._tx.send_nowait(_Reply(resumed, self._binary))
        self._ensure_writer()
        return True

    async def _wait_space(self) -> None:
        while self._queued >= self._queue_bound:
            self._space_waiter = trio.Event()
            await self._space_waiter.wait()

    # -- the writer ------------------------------------------------------------------

    def _drain(self, first: Any, *, closing: bool) -> tuple[bytes, int, int]:
        """Everything queued (up to 1024 items; all of it when ``closing``) as one
        buffer: control frames first, then replies and messages in order, then (when
        ``closing``) the close frame."""
        batch = [first]
        rx = self._rx
        while closing or len(batch) < 1024:
            try:
                batch.append(rx.receive_nowait())
            except trio.WouldBlock:
                break
        out: list[bytes] = self._control
        self._control = []
        replies = messages = 0
        for item in batch:
            if item is None:
                self._wake_queued = False
                continue
            if type(item) is _Reply:
                out.append(self._frame(item.payload, item.binary))
                replies += 1
            elif self._deflate:
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
        return b"".join(out), messages, replies

    def _frame(self, payload: bytes, binary: bool) -> bytes:
        if self._deflate:  # compressed per connection by wsproto
            return self.ws.send(BytesMessage(payload) if binary else TextMessage(payload.decode()))
        return text_frame(payload, BINARY if binary else TEXT)

    async def _writer(self) -> None:
        """Drain the outbound channel, coalescing each batch into one ``send_all``.

        Runs while there is work (lingering WRITER_LINGER_S for more), then exits; it
        stops after its current batch once the connection is closing (the connection
        task writes what is left and the close frame).  Nothing of a written batch stays
        referenced while it waits."""
        rx = self._rx
        try:
            while self._close is None:
                first: Any = _IDLE
                try:
                    first = rx.receive_nowait()
                except trio.WouldBlock:
                    with trio.move_on_after(WRITER_LINGER_S):
                        first = await rx.receive()
                if first is _IDLE:
                    break  # idle: exit; the next queued item starts a new writer
                data, messages, replies = self._drain(first, closing=False)
                del first
                if data:
                    self._send_broken = True
                    await self.stream.send_all(data)
                    self._send_broken = False
                    del data
                self._written(messages, replies)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._closed_by = "peer" if self._close is None else self._closed_by
            if self._reader_scope is not None:
                self._reader_scope.cancel()
        finally:
            self._writer_running = False
            if self._writer_exit is not None:
                self._writer_exit.set()

    def _written(self, messages: int, replies: int) -> None:
        self._queued -= messages
        if messages and self._space_waiter is not None:
            self._space_waiter.set()
            self._space_waiter = None
        if replies:
            self._give_credits(replies)

    async def _flush_and_close(self) -> None:
        """Closing: let a running writer finish its batch, then write what is still
        queued and the close frame (unless a cancelled send left half a frame)."""
        if self._writer_running:
            self._writer_exit = trio.Event()
            self._wake()  # a lingering writer is waiting for work: let it see _close now
            await self._writer_exit.wait()
        if self._send_broken:
            return
        data, messages, replies = self._drain(None, closing=True)
        self._send_broken = True
        await self.stream.send_all(data)
        self._send_broken = False
        self._written(messages, replies)
