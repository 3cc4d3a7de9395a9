"""The hub: the trio service joining the session table, the router and the store.

Contract
--------
* ``Hub.send(origin, sender, to, body, ctx)`` stores the message first and routes it
  after the store has accepted it.  One writer task takes everything queued and hands
  it to the store in one ``append`` (group commit), then routes the batch in order; the
  origin hears ``on_stored`` (its ack) only after that.  ``send`` blocks only while the
  writer's bounded input queue is full (the store is behind): backpressure to the
  sender's socket, never a drop.
* Which engine stores is not the hub's business: every engine has the same async
  interface (``tidings.store.base``).  An engine that publishes what it stores (redis,
  in a cluster) says so per message (``Appended.receivers``): the message then reaches
  local connections through the cluster (``on_cluster_message``), like every other
  node's, so each user's messages arrive in seq order.
* Acks of received messages (cursor moves, per device) and ``last_seen`` updates are
  coalesced and saved by the writer after its next batch; they never block a
  connection.  An ack that asked for a reply hears ``on_cursor_saved`` once its cursor
  is saved.  Delivered marks (the highest seq written to a connection of a device) and
  the delivered counts of keyed sends are coalesced too, but wake nobody: they are
  saved with the next cursor save, or within ``PROGRESS_FLUSH_S``.  The hub's reads
  (``inbox_state``, ``unread``, ``message_status``) merge what is not saved yet, so
  this node answers exactly; another node sees it once saved.
* A send with an idempotency ``key`` whose key is still live (the store checks it
  atomically with the append) is neither stored nor routed: the origin hears
  ``on_duplicate`` with the original's msg_id, seq and first delivered count.
* Store failures answer every affected origin (``on_store_failed``) and are logged
  once per interval with a count, never once per message.
* Cancellation: a cancelled ``send`` either queued the message (it will be stored and
  acked if the connection still lives) or did not (nothing stored).
* On shutdown, ``close_intake`` stops new sends; ``run`` drains what is queued, saves
  cursors and last_seen, and returns.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import attrs
import trio

from tidings import log
from tidings.config import Config
from tidings.wire.protocol import (
    MsgIdGenerator,
    encode,
    message_fields,
    message_json,
)
from tidings.routing.rooms import ROOM_KEY_PREFIX, RoomRefused, RoomTable, may_join
from tidings.routing.router import Endpoint, Routed, Router
from tidings.routing.watches import WatchTable
from tidings.routing.sessions import SessionTable
from tidings.server.writer import WAKE, Writer
from tidings.store import (
    InboxState, NewMessage, Progress, Store, StoredMessage, StoreError,
)

if TYPE_CHECKING:
    from prometheus_client import Histogram

    from tidings.cluster import Cluster
    from tidings.cluster.control import Control
    from tidings.webhooks.recorder import WebhookRecorder

__all__ = ["CursorOrigin", "Hub", "HubStatistics", "Member", "Origin"]

#: The latency histogram observes one routed message in this many (an unbiased sample).
LATENCY_SAMPLE_EVERY = 8
#: Store failures are logged at most once per this many seconds (with a count).
STORE_FAILURE_LOG_INTERVAL_S = 10.0
#: Delivered marks and first answers wait at most this long for a save of their own.
PROGRESS_FLUSH_S = 1.0


#: What an origin hands the hub with a request and gets back verbatim in the callback.
Ctx = TypeVar("Ctx")
Ctx_contra = TypeVar("Ctx_contra", contravariant=True)


class Origin(Protocol[Ctx_contra]):
    """Whoever waits for a store result: a connection, or an API request.

    ``ctx`` is what the origin handed to the hub (its frame id...), given back
    verbatim.  The callbacks run in the hub's writer task and must never block."""

    def on_stored(self, ctx: Ctx_contra, msg_id: str, seq: int, delivered: int) -> None: ...

    def on_duplicate(self, ctx: Ctx_contra, msg_id: str, seq: int, delivered: int) -> None:
        """The send's key named an earlier message (``msg_id``, ``seq``, the first
        answer's ``delivered``): nothing was stored or routed."""

    def on_store_failed(self, ctx: Ctx_contra) -> None: ...


class CursorOrigin(Protocol[Ctx_contra]):
    """Whoever waits for an ack's cursor to be saved (an ``ack`` frame with an id)."""

    def on_cursor_saved(self, ctx: Ctx_contra, seq: int) -> None: ...

    def on_cursor_failed(self, ctx: Ctx_contra) -> None: ...


class Member(Endpoint, Protocol):
    """A registered connection as the hub sees it: a router endpoint that can re-read
    its inbox when live messages may have been missed (``server.connection``)."""

    def resync(self) -> None: ...


class _Job(Generic[Ctx]):
    """One queued send."""

    __slots__ = ("accepted", "ctx", "message", "origin")

    def __init__(self, message: NewMessage, origin: Origin[Ctx], ctx: Ctx) -> None:
        self.message = message
        self.origin = origin
        self.ctx = ctx
        self.accepted = time.monotonic()


@attrs.frozen
class HubStatistics:
    connections: int
    users: int
    rooms: int
    stored: int
    routed: int
    delivered: int
    dropped: int
    slow_disconnects: int
    store_errors: int
    queued: int
    rate_limited: int = 0        # frames refused by a connection's rate limit
    commit_seconds: float = 0.0  # store.append time per batch, moving average (alpha 0.2)


class Hub(Writer):
    def __init__(self, config: Config, store: Store) -> None:
        """``store``: any engine.  ``cluster`` (set by the server when
        ``cluster.redis_url`` is set) carries live delivery between nodes."""
        self.config = config
        self.sessions = SessionTable(
            config.limits.max_connections, config.limits.max_connections_per_user
        )
        self.router = Router(self.sessions, config.limits.slow_consumer)
        rc = config.rooms
        self.rooms = RoomTable(rc.max_rooms_per_connection, rc.max_members_per_room, rc.history)
        self.watches = WatchTable(max_per_connection=100)
        self.store = store
        self.ids = MsgIdGenerator()
        self.lock = trio.Lock()
        self.cluster: Cluster | None = None
        #: Set by the server while ``webhooks.url`` is on: told of users' first and last
        #: connection on this node and of each stored batch (never per message when off).
        self.webhooks: WebhookRecorder | None = None
        #: Set with ``cluster``: presence events and server commands for every node.
        self.control: Control | None = None
        self._jobs_tx, self._jobs_rx = trio.open_memory_channel[Any](config.store.queue)
        self._progress = Progress()  # coalesced: saved by the writer (see the docstring)
        self._flush_due = False  # the progress flush timer fired: save even marks alone
        self._cursor_waiters: list[tuple[CursorOrigin[Any], Any, int]] = []
        self._stored = 0
        self._store_errors = 0
        self.rate_limited = 0  # counted by connections
        self._commit_seconds = 0.0
        self._failed_unlogged = 0
        self._failure_log = log.LogOnce(interval=STORE_FAILURE_LOG_INTERVAL_S)
        self._slow_log = log.LogOnce(interval=30.0)
        self.latency: Histogram | None = None  # when metrics are on
        self._latency_countdown = 1
        self.router.on_slow_consumer = self._log_slow

    # -- sessions --------------------------------------------------------------------

    async def register(self, conn: Member) -> None:
        """Make ``conn`` routable; raises ``sessions.Refused`` over a limit.  The user's
        watchers hear ``online`` when this is the user's first connection."""
        async with self.lock:
            self.sessions.add(conn)
            if self.sessions.count(conn.user) == 1:
                self._first_or_last(conn.user, True)
                if self.webhooks is not None and self.webhooks.tracks_presence:
                    self.webhooks.connected(conn.user)
            if self.cluster is not None:
                # Subscribed before the replay reads the store: whatever is stored after
                # that read is also published to us (cluster.hold's contract).
                await self.cluster.hold(conn.user)

    def unregister(self, conn: Member) -> None:
        """Remove ``conn`` (once per connection) with its rooms and watches; on the
        user's last connection record last_seen and tell watchers ``offline`` (the router
        may already have removed a slow consumer from the table)."""
        self.sessions.remove(conn)
        for room in self.rooms.leave_all(conn):
            if self.cluster is not None:
                self.cluster.release(ROOM_KEY_PREFIX + room)
        self.watches.forget(conn)
        if self.cluster is not None:
            self.cluster.release(conn.user)
        if self.sessions.count(conn.user) == 0:
            self._first_or_last(conn.user, False)
            if self.webhooks is not None and self.webhooks.tracks_presence:
                self.webhooks.disconnected(conn.user)
            self._progress.last_seen[conn.user] = int(time.time() * 1000)
            self._wake_writer()

    def _first_or_last(self, user: str, online: bool) -> None:
        """``user``'s first local connection opened or last one closed: watchers hear
        it at once on a single node; in a cluster the control plane decides whether it
        was the first/last on ANY node and tells every node's watchers."""
        if self.control is not None:
            self.control.local_presence(user, online)
        else:
            self._presence_event(user, online)

    def on_control_presence(self, user: str, online: bool) -> None:
        """The control plane: ``user`` came online / went offline cluster-wide."""
        self._presence_event(user, online)

    def watched(self, user: str) -> bool:
        return bool(self.watches.watchers(user))

    def disconnect_local(self, user: str, conn: str | None = None) -> int:
        """Close ``user``'s connections on this node (only ``conn`` when given) with
        1008; how many."""
        conns = [c for c in self.sessions.connections(user) if conn is None or c.conn_id == conn]
        for c in conns:
            c.kill(1008, "disconnected by the server API")
        return len(conns)

    def _presence_event(self, user: str, online: bool) -> None:
        watchers = self.watches.watchers(user)
        if watchers:
            fields = {"type": "presence", "user": user, "online": online}
            self.router.offer_all(watchers, Routed(encode("presence", user=user, online=online), None, fields))

    # -- rooms and watches (in memory, per connection) -------------------------------

    async def join(self, conn: Endpoint, room: str, allowed: tuple[str, ...] | None) -> list[dict[str, Any]]:
        """Join ``room`` if the token (or the config default) allows it; return the
        room's recent messages (``rooms.history``).  Raises RoomRefused.  In a cluster
        the first local member subscribes this node to the room's channel."""
        patterns = allowed if allowed is not None else self.config.rooms.default_allow
        if not may_join(patterns, room):
            raise RoomRefused("forbidden", f"not allowed to join {room!r}")
        if self.rooms.join(conn, room) and self.cluster is not None:
            await self.cluster.hold(ROOM_KEY_PREFIX + room)
        return self.rooms.recent(room)

    def leave(self, conn: Endpoint, room: str) -> None:
        if self.rooms.leave(conn, room) and self.cluster is not None:
            self.cluster.release(ROOM_KEY_PREFIX + room)

    async def send_room(self, conn: Endpoint, room: str, body: bytes,
                        key: str | None = None) -> tuple[str, int, bool]:
        """Offer a room message to every connection in the room now; ``(msg_id,
        delivered, duplicate)``.  Room messages are not stored; the sender must have
        joined.  In a cluster it is published on the room's channel and ``delivered``
        counts nodes.  With ``key``: a key still live names an earlier room message,
        answered instead (``duplicate``); the key is claimed in the store before the
        message goes out, so a crash in between loses that room message (room messages
        are at most once).  Raises StoreError when the key cannot be claimed."""
        if room not in self.rooms.rooms_of(conn):
            raise RoomRefused("forbidden", f"join {room!r} before sending to it")
        msg_id, ts = self.ids.next()
        target = ROOM_KEY_PREFIX + room
        if key is not None:
            original = await self.store.claim_key(conn.user, target, key, msg_id, ts)
            if original is not None:
                kid = (conn.user, target, key)
                return original.msg_id, self._progress.answers.get(kid, original.delivered), True
        if self.cluster is not None:  # comes back through on_cluster_message, like users
            delivered = await self.cluster.publish(target, msg_id, conn.user, ts, body)
        else:
            delivered = self._route_room(room, msg_id, conn.user, body, ts)
        if key is not None:
            self._progress.answers[(conn.user, target, key)] = delivered
        return msg_id, delivered, False

    def _route_room(self, room: str, msg_id: str, sender: str, body: bytes, ts: int) -> int:
        fields = message_fields(msg_id, None, sender, None, body, ts, room=room)
        result = self.router.offer_all(self.rooms.members(room), Routed(message_json(fields), None, fields))
        self.rooms.remember(room, fields)
        return result.delivered

    async def watch(self, conn: Endpoint, users: tuple[str, ...], on: bool) -> dict[str, bool]:
        """(Un)watch users' presence; return who of them is online now (on any node in
        a cluster; this node's view while Redis cannot be asked).  Raises WatchRefused
        (nothing changed) over the per-connection bound."""
        if on:
            self.watches.watch(conn, users)
        else:
            self.watches.unwatch(conn, users)
        if self.control is not None:
            try:
                return await self.control.watch_state(users)
            except StoreError:  # ClusterUnavailable: corrected by the next state read
                local = {user: self.sessions.count(user) > 0 for user in users}
                for user, online in local.items():
                    self.control.assume(user, online)
                return local
        return {user: self.sessions.count(user) > 0 for user in users}

    def _log_slow(self, conn: Endpoint) -> None:
        self._slow_log.log(
            "warning", "slow_consumer", key=conn.user, user=conn.user, conn=conn.conn_id,
            policy=self.router.slow_consumer,
        )

    # -- sends -----------------------------------------------------------------------

    async def send(self, origin: Origin[Ctx], sender: str, to: str, body: bytes, ctx: Ctx,
                   key: str | None = None) -> None:
        """Store then route a message; then call ``origin.on_stored(ctx, msg_id, seq,
        delivered)`` -- or ``origin.on_duplicate(...)`` when ``key`` named an earlier
        message, or ``origin.on_store_failed(ctx)`` if the store refused it.

        Blocks (and yields) only while the writer's queue is full.  A connection origin must hold a
        reply credit for the ack (or error) this produces; the callbacks never block.
        """
        if self.cluster is not None and not self.cluster.healthy:
            origin.on_store_failed(ctx)  # Redis is unreachable: never ack what is not stored
            return
        msg_id, ts = self.ids.next()
        job = _Job(NewMessage(msg_id, sender, to, body, ts, key), origin, ctx)
        try:  # no schedule point while the queue has room: one task switch less per message
            self._jobs_tx.send_nowait(job)
        except trio.WouldBlock:
            await self._jobs_tx.send(job)

    def _route(self, msg_id: str, seq: int, sender: str, recipient: str, body: bytes, ts: int) -> int:
        """Offer a stored message to the recipient's local connections; the count."""
        fields = message_fields(msg_id, seq, sender, recipient, body, ts)
        return self.router.route(recipient, Routed(message_json(fields), seq, fields)).delivered

    def _failed(self, count: int, exc: StoreError, what: str) -> None:
        """Count a store failure; log it at most once per interval, with how many
        messages (or cursor saves) failed since the last line."""
        self._store_errors += 1
        self._failed_unlogged += count
        if self._failure_log.log("error", "store_failed", key=what, store=self.store.name,
                                 what=what, failed=self._failed_unlogged, error=str(exc)):
            self._failed_unlogged = 0

    # -- coalesced writes ------------------------------------------------------------

    def ack_cursor(self, user: str, device: str, seq: int,
                   origin: CursorOrigin[Ctx] | None = None, ctx: Ctx | None = None) -> None:
        """Move the acknowledged cursor of ``user``'s ``device`` to ``seq`` (coalesced;
        never blocks); what a device acked was delivered to it.  With ``origin``, it
        hears ``on_cursor_saved(ctx, seq)`` once the cursor is saved (or
        ``on_cursor_failed(ctx)``)."""
        key = (user, device)
        cursors = self._progress.cursors
        if seq > cursors.get(key, -1):
            cursors[key] = seq
        self.mark_delivered(key, seq)
        if origin is not None:
            self._cursor_waiters.append((origin, ctx, seq))
        self._wake_writer()

    def register_device(self, user: str, device: str, cursor: int) -> None:
        """A device seen for the first time starts at ``cursor`` (saved soon)."""
        key = (user, device)
        cursors = self._progress.cursors
        if cursor > cursors.get(key, -1):
            cursors[key] = cursor
        self._wake_writer()

    def mark_delivered(self, device: tuple[str, str], seq: int) -> None:
        """Messages up to ``seq`` were written to a connection of ``device`` ((user,
        device)): coalesced, saved with the next save (at most PROGRESS_FLUSH_S later)."""
        marks = self._progress.delivered
        if seq > marks.get(device, 0):
            marks[device] = seq

    def _wake_writer(self) -> None:
        try:
            self._jobs_tx.send_nowait(WAKE)
        except (trio.WouldBlock, trio.ClosedResourceError):
            pass  # the writer is busy (it saves them after its batch) or shut down

    # -- the writer ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the store's maintenance and the group-commit writer until
        ``close_intake`` and drained."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.store.run)
            nursery.start_soon(self._flush_timer)
            task_status.started()
            await self._writer()
            nursery.cancel_scope.cancel()

    async def _flush_timer(self) -> None:
        """Every PROGRESS_FLUSH_S: have the writer save marks nobody woke it for."""
        while True:
            await trio.sleep(PROGRESS_FLUSH_S)
            if self._progress.delivered or self._progress.answers:
                self._flush_due = True
                self._wake_writer()

    def close_intake(self) -> None:
        self._jobs_tx.close()

    def on_cluster_message(self, msg: StoredMessage) -> None:
        """A message published by any node (this one included) for a user or a room
        we hold."""
        if msg.recipient.startswith(ROOM_KEY_PREFIX):
            room = msg.recipient[len(ROOM_KEY_PREFIX):]
            self._route_room(room, msg.msg_id, msg.sender, msg.body, msg.ts)
            return
        self._route(msg.msg_id, msg.seq, msg.sender, msg.recipient, msg.body, msg.ts)
        self._observe_latency(max(0.0, time.time() - msg.ts / 1000))

    def _observe_latency(self, seconds: float) -> None:
        """Feed the send->deliver histogram with one routed message in
        LATENCY_SAMPLE_EVERY (a prometheus observation takes a lock: ~1 us each)."""
        self._latency_countdown -= 1
        if self._latency_countdown <= 0 and self.latency is not None:
            self._latency_countdown = LATENCY_SAMPLE_EVERY
            self.latency.observe(seconds)

    def on_cluster_resync(self, users: list[str]) -> None:
        """Live messages may have been missed (Redis reconnect, a seq gap): replay."""
        for user in users:
            for conn in self.sessions.connections(user):
                conn.resync()

    # -- reads -----------------------------------------------------------------------

    async def presence(self, users: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        """Online state, connection count, devices online and last_seen; cluster-wide in
        a cluster."""
        seen = await self.store.last_seen(list(users))
        counts = devices = None
        if self.cluster is not None:  # raises ClusterUnavailable, a StoreUnavailable
            counts = await self.cluster.presence(list(users))
            devices = await self.cluster.devices(list(users))
        out = {}
        for user in users:
            count = counts.get(user, 0) if counts is not None else self.sessions.count(user)
            out[user] = {
                "online": count > 0,
                "connections": count,
                "devices": sorted(devices[user]) if devices is not None else self.devices_online(user),
                "last_seen": self._progress.last_seen.get(user, seen.get(user)),
            }
        return out

    def devices_online(self, user: str) -> list[str]:
        """Names of the devices with a connection on this node, sorted."""
        return sorted({conn.device for conn in self.sessions.connections(user)})

    async def inbox_state(self, user: str, device: str) -> InboxState:
        """The store's state of ``device``'s inbox, with its cursor not saved yet."""
        state = await self.store.inbox_state(user, device)
        pending = self._progress.cursors.get((user, device))
        if pending is None:
            return state
        cursor = max(state.cursor, min(pending, state.last_seq))
        return InboxState(state.first_seq, state.last_seq, cursor)

    async def unread(self, user: str) -> dict[str, int]:
        """Per registered device, the retained messages after its cursor."""
        state = await self.store.inbox_state(user)
        out = {}
        for device, (cursor, _) in (await self.store.devices(user)).items():
            out[device] = state.unread(self._cursor(user, device, cursor, state.last_seq))
        for (u, device), pending in self._progress.cursors.items():  # registered just now
            if u == user and device not in out:
                out[device] = state.unread(min(pending, state.last_seq))
        return dict(sorted(out.items()))

    async def message_status(self, msg_id: str) -> dict[str, Any] | None:
        """A stored message and, per device of its recipient, whether it was written to
        a connection of that device (``delivered``) and acknowledged (``acked``); None
        for an unknown or pruned message."""
        m = await self.store.message(msg_id)
        if m is None:
            return None
        devices = await self.store.devices(m.recipient)
        names = set(devices) | {d for (u, d) in self._progress.cursors if u == m.recipient}
        status = {}
        for name in sorted(names):
            cursor, delivered = devices.get(name, (0, 0))
            pending = self._progress.delivered.get((m.recipient, name), 0)
            status[name] = {
                "delivered": max(delivered, pending) >= m.seq,
                "acked": self._cursor(m.recipient, name, cursor, m.seq) >= m.seq,
            }
        return {"msg_id": m.msg_id, "from": m.sender, "to": m.recipient, "seq": m.seq,
                "ts": m.ts, "devices": status}

    def _cursor(self, user: str, device: str, saved: int, cap: int) -> int:
        """A saved cursor moved by what is not saved yet (capped like a save would)."""
        pending = self._progress.cursors.get((user, device))
        return saved if pending is None else max(saved, min(pending, cap))

    def statistics(self) -> HubStatistics:
        s, r = self.sessions.statistics(), self.router.statistics()
        return HubStatistics(
            connections=s.connections,
            users=s.users,
            rooms=self.rooms.statistics().rooms,
            stored=self._stored,
            routed=r.routed,
            delivered=r.delivered,
            dropped=r.dropped,
            slow_disconnects=r.slow_disconnects,
            store_errors=self._store_errors,
            queued=self._jobs_rx.statistics().current_buffer_used,
            rate_limited=self.rate_limited,
            commit_seconds=self._commit_seconds,
        )
