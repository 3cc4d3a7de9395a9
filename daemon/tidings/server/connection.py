"""One WebSocket connection after its handshake: trio I/O around wsproto's frame engine.

Ownership and tasks
-------------------
The connection task (spawned by the server, one per TCP connection) owns the stream and
runs the *reader* inline: it receives up to 64 KiB, feeds wsproto, and handles each
complete frame in place (no per-message task hop).  One *writer* task drains the bounded
outbound queue and coalesces everything queued into one ``send_all``.  A replay
task exists only while stored messages are being replayed.  Both are helper tasks in
the server's nursery (``Outbound._start``): an idle connection is one task with one
cancel scope (the reader's), no nursery of its own.

Outbound queue
--------------
``outbound.Outbound`` (the base class) owns what is written: routed messages (at most
``limits.outbound_queue``; the router offers with ``offer_nowait`` and a full quota is
a slow consumer) and replies (ack, pong, error: at most ``limits.max_inflight``).
Before handling a frame the reader takes a reply credit, waiting -- and so not reading
the socket -- while none is free: a client that floods faster than it reads is slowed
down by TCP, not disconnected.  Control frames bypass the queue.

Replay
------
The page loop's decisions live in ``routing.replay`` (sans-IO, property-tested): this
module only does its I/O.  While replaying, live messages for the user are *absorbed*
(the replay reads them from the store); the switch to live happens with no await in
between, so there is no gap and no duplicate.

Closing
-------
``kill(code, reason)`` (from the router, the housekeeper or a policy check) stops the
reader; the connection task then writes everything still queued and the close frame,
and keeps reading -- discarding what arrives -- until the peer's close frame or EOF,
so the peer gets every reply and the close frame, never a TCP reset (closing a socket
with unread input resets it).  All of that is bounded by ``CLOSE_TIMEOUT``; then TCP is
closed regardless.  A close the peer starts is echoed the same way.  Who closed is
logged as ``event=connection_closed``: ``by=server`` (with the code) or ``by=peer``; a
peer that resets TCP is logged at info (once a minute), never as our crash.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import trio
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage

from tidings import log
from tidings.auth import Authenticator
from tidings.routing.replay import InboxGate, Replay
from tidings.routing.router import Offer, Routed
from tidings.server.commands import FrameId, handle_command
from tidings.server.hub import Hub
from tidings.server.outbound import CLOSE_TIMEOUT, RECEIVE_SIZE, Outbound, _Reply
from tidings.store import DEFAULT_DEVICE, Store, StoreError
from tidings.wire.frames import ClientPing, ForWsproto, pong_frame
from tidings.wire.handshake import http_response
from tidings.wire.limits import TokenBucket
from tidings.wire.protocol import (
    BINARY, TEXT, Ack, Ping as PingCmd, ProtocolError, Send, data_frame, encode, encode_msgpack,
    message_fields, message_json, parse_binary_frame, parse_client_frame,
)

__all__ = ["CLOSE_TIMEOUT", "Connection", "SendContext"]

REPLAY_PAGE = 256
_bad_frames = log.LogOnce(interval=60.0)

#: What a connection hands the hub with a send or an ack (given back in the callbacks):
#: the frame's id and whether it came in a binary frame (reply in kind).
SendContext = tuple[FrameId, bool]


_TOO_BIG = object()


class _Fragments:
    """A message wsproto delivers in parts (a fragmented message, or a compressed one):
    the parts so far and their size in bytes, bounded by ``limit``."""

    __slots__ = ("limit", "parts", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str | bytes] = []
        self.size = 0

    def add(self, event: Message) -> Any:
        """The whole message once ``event`` finishes it, None before, ``_TOO_BIG`` when
        the parts pass the limit."""
        n = len(event.data)  # characters for text: count bytes near the limit
        if n * 4 > self.limit - self.size and isinstance(event, TextMessage):
            n = len(event.data.encode())
        self.size += n
        if self.size > self.limit:
            return _TOO_BIG
        if not event.message_finished:
            self.parts.append(event.data)
            return None
        self.size = 0
        if not self.parts:
            return event.data
        self.parts.append(event.data)
        whole = ("" if isinstance(event, TextMessage) else b"").join(self.parts)
        self.parts.clear()
        return whole


class Connection(Outbound):
    """A registered WebSocket connection: the router's endpoint for one device, the
    hub's origin of its sends, and the context commands run in (``commands``).  The
    outbound queue, the writer and the closing handshake are ``Outbound``'s."""

    __slots__ = (
        "_bucket", "_clock", "_device_key", "_exp", "_gate", "_registered", "_replay_scope",
        "_since", "auth", "check_at", "device", "greeting", "hello", "housekeeping", "hub",
        "last_activity", "pinged", "reply_binary", "rooms_allowed", "store", "trailing",
        "connected_at", "remote",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        ws: WSConnection | None,
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
        device: str = DEFAULT_DEVICE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``device``: the device this connection reads for (its cursor, its replay).
        ``clock``: the monotonic clock of ``last_activity`` and the rate limit (the
        housekeeper reads the same one; tests pass ``trio.current_time``)."""
        super().__init__(stream, ws, hub.config.limits, conn_id=conn_id, user=user,
                         binary=binary, deflate=deflate,
                         max_message_bytes=hub.config.server.max_message_bytes)
        self.hub = hub
        self.store: Store = hub.store
        self.auth = auth
        self._exp = exp
        self.housekeeping: Any = None  # server.housekeeping.Housekeeping, set by the server
        self.check_at = -1  # the housekeeper's slot for us (housekeeping.Schedule)
        self.device = device
        self._device_key = (user, device)
        self._clock = clock
        self.last_activity = clock()
        self.connected_at = time.time()  # for the operator's page (GET /api/users/...)
        self.remote = ""  # the peer's "host:port", set by the server
        self.pinged = False
        self._since = since
        self.rooms_allowed = rooms  # the token's `rooms` claim (None: the config default)
        self.reply_binary = False  # the frame being handled was binary: reply in kind
        self._gate = InboxGate()  # replaying from creation: the first replay starts at once
        self._replay_scope: trio.CancelScope | None = None
        self._bucket: TokenBucket | None = None
        self.greeting = b""  # the 101, set by the server, written by run() with the hello
        self.hello: dict[str, Any] = {}  # the hello's fields, set by the server (+ unread)
        self.trailing = b""  # client bytes that came with the handshake, read first
        self._registered = True  # the server registers us right after construction

    @property
    def exp(self) -> float | None:
        """The token's expiry (wall clock); a ``refresh`` moves it, and the housekeeper
        then looks at the connection on its next tick (the expiry may come sooner)."""
        return self._exp

    @exp.setter
    def exp(self, value: float | None) -> None:
        self._exp = value
        if self.housekeeping is not None:
            self.housekeeping.soon(self, self._clock())

    @property
    def registered(self) -> bool:
        """Routable (and watched by the housekeeper) until it starts closing."""
        return self._registered

    # -- router endpoint and hub origin (sync, never block) -------------------------

    def offer_nowait(self, routed: Routed) -> Offer:
        if self._close is not None:
            return Offer.CLOSING
        if routed.seq is not None and not self._gate.live(routed.seq):
            return Offer.ABSORBED
        if self._queued >= self._queue_bound:
            return Offer.FULL
        self._queued += 1
        self._enqueue(routed)
        if routed.seq is not None:
            self._gate.sent(routed.seq)
        return Offer.QUEUED

    def on_stored(self, ctx: SendContext, msg_id: str, seq: int, delivered: int) -> None:
        """The hub stored and routed our send: queue its ack (the send's credit)."""
        fid, binary = ctx
        enc = encode_msgpack if binary else encode
        self.reply_nowait(enc("ack", id=fid, msg_id=msg_id, seq=seq, delivered=delivered), binary)

    def on_duplicate(self, ctx: SendContext, msg_id: str, seq: int, delivered: int) -> None:
        """The send's key named an earlier message: its ack again, marked duplicate."""
        self._answer(ctx, "ack", msg_id=msg_id, seq=seq, delivered=delivered, duplicate=True)

    def on_store_failed(self, ctx: SendContext) -> None:
        self._answer(ctx, "error", code="unavailable", message="message not stored; retry")

    def on_cursor_saved(self, ctx: SendContext, seq: int) -> None:
        """The hub saved the cursor an ``ack`` with an id moved: queue ``acked``."""
        fid, binary = ctx
        self.reply_nowait((encode_msgpack if binary else encode)("acked", id=fid, seq=seq), binary)

    def on_cursor_failed(self, ctx: SendContext) -> None:
        self._answer(ctx, "error", code="unavailable", message="ack not saved; retry")

    def _answer(self, ctx: SendContext, kind: str, **fields: Any) -> None:
        """A reply to a send or ack (off the hot path: the failures)."""
        fid, binary = ctx
        self.reply_nowait((encode_msgpack if binary else encode)(kind, id=fid, **fields), binary)

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

    def _kill_reader(self) -> None:
        self.kill(1011, "internal error")

    def _delivered(self, seq: int) -> None:
        """Outbound's hook: messages up to ``seq`` were written to this device."""
        self.hub.mark_delivered(self._device_key, seq)

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self.hub.unregister(self)

    # -- the connection task ---------------------------------------------------------

    async def run(self, nursery: trio.Nursery | None = None, flusher: Any = None) -> None:
        """Serve until closed, then close the WebSocket (see Closing) and the stream.
        Never raises for what the peer does (EOF, reset).  ``nursery``: where the
        connection's helper tasks (writer, replay) run -- the server passes its nursery
        of connection tasks (see ``Outbound._start``); None: a nursery of its own.
        ``flusher``: the server's :class:`~tidings.server.flusher.Flusher`, which then
        writes what is queued on a plain socket while no writer runs."""
        if nursery is None:
            async with trio.open_nursery() as own:
                await self.run(own)
            return
        self._nursery = nursery
        if self._sock is not None:
            self._flusher = flusher
        try:
            try:
                if await self._greet():
                    if self._close is None:  # kill() may have come during the handshake
                        with trio.CancelScope() as self._reader_scope:
                            await self._reader()
                    self._unregister()  # closing: nothing more is routed here
                    if self._replay_scope is not None:
                        self._replay_scope.cancel()
                    if not self._peer_gone:
                        with trio.move_on_after(CLOSE_TIMEOUT):
                            await self._close_handshake()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._reset()
        finally:
            self._unregister()
            await self._stop_children()
            await trio.aclose_forcefully(self.stream)
            code = self._close[0] if self._close else None
            log.log("debug", "connection_closed", conn=self.conn_id, user=self.user,
                    by=self._closed_by, code=code)

    async def _greet(self) -> bool:
        """Write the 101 (prepared by the server) and ``hello`` (with the device's unread
        count) and start the first replay from the device's ack cursor (or
        ``?since=``).  A device seen for the first time gets its cursor from
        ``store.new_device_replay``, saved by the hub.  When nothing is stored after the
        start -- the usual case -- ``resumed`` goes out in the same write and neither a
        replay task nor a writer task is started.  A store failure answers HTTP 503
        instead (no WebSocket is opened) and returns False."""
        self._writer_running = True  # nothing else may write until the greeting is out
        try:
            replay = Replay(self._gate, self._since, REPLAY_PAGE,
                            self.hub.config.store.new_device_replay)
            try:
                state = await self.hub.inbox_state(self.user, self.device)
            except StoreError as exc:
                log.log("error", "replay_failed", error=str(exc), conn=self.conn_id)
                self._close = (1011, "store unavailable")
                self._closed_by = "server"
                await self.stream.send_all(http_response(503, b"store unavailable; retry\n"))
                return False
            after = replay.begin(state)
            if state.new_device:
                self.hub.register_device(self.user, self.device, replay.cursor)
            hello = dict(self.hello, device=self.device, unread=state.unread(replay.cursor))
            opcode = BINARY if self._binary else TEXT
            greeting = self.greeting + data_frame(
                (encode_msgpack if self._binary else encode)("hello", **hello), opcode)
            self.greeting, self.hello = b"", {}
            if after is None:
                resumed = self._resumed(replay, None)
                await self._send_all(greeting + data_frame(resumed, BINARY if self._binary else TEXT))
            else:
                await self._send_all(greeting)
                self._spawn_replay(replay, after, credit=False, fid=None, announce=True)
        finally:
            self._writer_running = False
        if self._out or self._control:
            self._ensure_writer()  # for whatever was routed here meanwhile
        return True

    async def _reader(self) -> None:
        """Read and handle frames until the peer closes (frame or EOF) or we do (kill).

        Whole masked data frames are decoded by ``wire.frames`` (the common case, ~8 us
        cheaper than wsproto); every other frame goes to wsproto whole, in order.  The
        bytes that arrived with the handshake (``trailing``) are read first."""
        frames = self._frames
        data, self.trailing = self.trailing, b""
        fragments = _Fragments(self.hub.config.server.max_message_bytes)
        while True:
            if data:
                for item in frames.feed(data):
                    kind = type(item)
                    if kind is str or kind is bytes:
                        await self._take_credit()
                        await self._handle_frame(item, kind is bytes)
                    elif kind is ClientPing:
                        self.send_control(pong_frame(item))
                    elif kind is ForWsproto:
                        self.ws.receive_data(item)
                        if await self._wsproto_events(fragments):
                            return
                    else:  # a Refusal: the input cannot be parsed past this point
                        self._parse_failed = True
                        self.kill(item.code, item.reason)
                        return
            data = await self._receive(len(data) < RECEIVE_SIZE)
            if not data:
                self._closed_by = "peer"
                self._peer_gone = True
                return
            self.last_activity = self._clock()
            self.pinged = False

    async def _wsproto_events(self, fragments: _Fragments) -> bool:
        """Handle what wsproto made of the frames it was given; True: stop reading."""
        for event in self.ws.events():
            if isinstance(event, Message):
                whole = fragments.add(event)
                if whole is _TOO_BIG:
                    self.kill(1009, f"message larger than {fragments.limit} bytes")
                    return True
                if whole is not None:
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
                    self._parse_failed = True
                    self.kill(event.code, event.reason or "protocol error")
                return True
            # Pong: only proves liveness, recorded by the reader.
        return False

    # -- frame handling and the command context -------------------------------------

    async def _handle_frame(self, data: str | bytes, binary: bool) -> None:
        """Handle one complete message (JSON text or MessagePack binary); the caller holds
        one reply credit, which the reply uses (or which is given back)."""
        self.reply_binary = binary
        limits = self.hub.config.limits
        now = self._clock()
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
            await self.hub.send(self, self.user, cmd.to, cmd.body, (cmd.id, binary), cmd.key)
        elif type(cmd) is PingCmd:
            self.reply("pong", id=cmd.id)
        elif type(cmd) is Ack:
            if cmd.id is None:
                self.hub.ack_cursor(self.user, self.device, cmd.seq)
                self._give_credits(1)
            else:  # `acked` once the cursor is saved: a reconnect then starts after it
                self.hub.ack_cursor(self.user, self.device, cmd.seq, self, (cmd.id, binary))
        else:
            await handle_command(self, cmd)

    def reply(self, kind: str, **fields: Any) -> None:
        """Queue the reply to the frame being handled (it uses the frame's credit)."""
        if self.reply_binary:
            self.reply_nowait(encode_msgpack(kind, **fields), True)
        else:
            self.reply_nowait(encode(kind, **fields))

    def error(self, fid: FrameId, code: str, message: str) -> None:
        """Answer the frame being handled with an error frame: the client's fault,
        logged once a minute per code."""
        _bad_frames.log("info", "client_error", key=code, user=self.user, conn=self.conn_id,
                        code=code, reason=message)
        self.reply("error", id=fid, code=code, message=message)

    @property
    def history_limit(self) -> int:
        return self.hub.config.store.history_limit

    def resume(self, since: int, fid: FrameId) -> None:
        """A ``resume`` command: restart the replay; its ``resumed`` uses the command's
        credit.  Live messages are absorbed until it has caught up."""
        self._spawn_replay(Replay(self._gate, since, REPLAY_PAGE), None, credit=True, fid=fid, announce=True)

    def resync(self) -> None:
        """Live messages may have been missed (the cluster's Redis link came back):
        re-read the inbox after the last seq sent, quietly (no ``resumed`` frame).  A
        replay already running reads the store to its end anyway."""
        if self._replay_scope is not None or self._close is not None or self._nursery is None:
            return
        replay = Replay(self._gate, self._gate.sent_seq, REPLAY_PAGE)
        self._spawn_replay(replay, None, credit=True, fid=None, announce=False)

    # -- replay (the decisions are routing.replay's) ---------------------------------

    def _spawn_replay(self, replay: Replay, after: int | None, *, credit: bool, fid: FrameId,
                      announce: bool) -> None:
        """Run ``replay`` in a task, cancelling the one running.  ``after``: where the
        first page read starts when ``begin`` already ran (the greeting), else None.
        ``credit``: the caller holds a reply credit for ``resumed``; the first replay on
        connect holds none and borrows the channel's reserved slot."""
        if self._replay_scope is not None:
            self._replay_scope.cancel()
        scope = self._replay_scope = trio.CancelScope()
        self._start(self._replay, replay, after, scope, credit, fid, announce)

    async def _replay(self, replay: Replay, after: int | None, scope: trio.CancelScope,
                      credit: bool, fid: FrameId, announce: bool) -> None:
        """Send stored messages, then go live; with ``announce``, end with ``resumed``.
        Cancelled by a newer replay or by closing; a store failure closes with 1011."""
        if not credit:
            self._credits -= 1  # may go to -1: the channel reserves a slot for it
        sent_resumed = False
        with scope:
            try:
                if after is None:
                    after = replay.begin(await self.store.inbox_state(self.user))
                while after is not None:
                    msgs = await self.store.read_inbox(self.user, after, replay.page)
                    if scope.cancel_called:  # superseded while the read was completing
                        break
                    for m in replay.to_send(msgs):
                        await self._wait_space()
                        fields = message_fields(m.msg_id, m.seq, m.sender, m.recipient, m.body, m.ts)
                        self._queued += 1
                        self._enqueue(Routed(message_json(fields), m.seq, fields))
                        replay.sent(m.seq)
                    after = replay.next_read()  # None: caught up, live from here (no await)
                else:
                    if self._replay_scope is scope:
                        self._replay_scope = None
                    if announce:  # its credit comes back once the writer has written it
                        self._enqueue(_Reply(self._resumed(replay, fid), self._binary))
                        sent_resumed = True
            except StoreError as exc:
                log.log("error", "replay_failed", error=str(exc), conn=self.conn_id)
                self.kill(1011, "store unavailable")
        if announce and not sent_resumed:  # cancelled (a newer resume, or closing), or failed
            self._give_credits(1)

    def _resumed(self, replay: Replay, fid: FrameId) -> bytes:
        """The ``resumed`` frame's payload; MessagePack on binary-mode connections."""
        enc = encode_msgpack if self._binary else encode
        return enc("resumed", id=fid, since=replay.start, last=replay.last, complete=replay.complete)
