"""The hub: the trio service joining the session table, the router and the store.

Contract
--------
* ``Hub.send(conn, cmd)`` stores the message first and routes it after the store has
  committed it.  With the SQLite store a single writer task takes everything queued into
  one transaction (group commit, one thread hop per batch) and then routes the batch in
  commit order; the sender's ``ack`` is queued to its connection only after that commit.
  ``send`` blocks only while the writer's bounded input queue is full (the disk is behind):
  that is backpressure to the sender's socket, never a drop.  With the memory store the
  append is synchronous and the ack is queued before ``send`` returns.
* Acks of received messages (cursor moves) and ``last_seen`` updates are coalesced per
  user and flushed by the writer with its next batch; they never block a connection.
* Reads (replay, history, search, presence) run in a worker thread on a separate SQLite
  read connection, so they never wait for the writer.
* Cancellation: a cancelled ``send`` either queued the message (it will be stored and
  acked if the connection still lives) or did not (nothing stored).  The writer never
  abandons a running transaction: worker threads are not abandoned on cancel.
* On shutdown, ``close_intake`` stops new sends; ``run`` drains what is queued, flushes
  cursors and last_seen, and returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import trio

from tidings import log
from tidings.config import Config
from tidings.protocol import (
    MsgIdGenerator,
    encode,
    message_fields,
    message_json,
)
from tidings.rooms import ROOM_KEY_PREFIX, RoomRefused, RoomTable, WatchTable, may_join
from tidings.router import Routed, Router
from tidings.sessions import SessionTable
from tidings.store import NewMessage, StoreError

__all__ = ["Hub", "HubStatistics"]

T = TypeVar("T")
_WAKE = object()


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


class Hub:
    def __init__(self, config: Config, store: Any, *, mode: str) -> None:
        """``mode``: "inline" (a synchronous in-memory store, called directly),
        "threaded" (SQLite: calls run in worker threads) or "async" (Redis: awaited).
        In async mode ``cluster`` (set by the server) carries live delivery."""
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
        if mode not in ("inline", "threaded", "async"):
            raise ValueError(f"unknown store mode {mode!r}")
        self._mode = mode
        self._threaded = mode != "inline"  # sends go through the writer task
        self.cluster: Any = None
        self._jobs_tx, self._jobs_rx = trio.open_memory_channel[Any](config.store.queue)
        self._write_limiter = trio.CapacityLimiter(1)
        self._read_limiter = trio.CapacityLimiter(1)
        self._cursors: dict[str, int] = {}
        self._last_seen: dict[str, int] = {}
        self._stored = 0
        self._store_errors = 0
        self._slow_log = log.LogOnce(interval=30.0)
        self.latency: Any = None  # a prometheus Histogram, when metrics are on
        self.router.on_slow_consumer = self._log_slow

    # -- sessions --------------------------------------------------------------------

    async def register(self, conn: Any) -> None:
        """Make ``conn`` routable; raises ``sessions.Refused`` over a limit.  The user's
        watchers hear ``online`` when this is the user's first connection."""
        async with self.lock:
            self.sessions.add(conn)
            if self.sessions.count(conn.user) == 1:
                self._presence_event(conn.user, True)
            if self.cluster is not None:
                # Subscribed before the replay reads the store: whatever is stored after
                # that read is also published to us (cluster.hold's contract).
                await self.cluster.hold(conn.user)

    def unregister(self, conn: Any) -> None:
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
            self._presence_event(conn.user, False)
            self._last_seen[conn.user] = int(time.time() * 1000)
            if not self._threaded:
                self._flush_coalesced()
            else:
                self._wake_writer()

    def _presence_event(self, user: str, online: bool) -> None:
        watchers = self.watches.watchers(user)
        if watchers:
            fields = {"type": "presence", "user": user, "online": online}
            self.router.offer_all(watchers, Routed(encode("presence", user=user, online=online), None, fields))

    # -- rooms and watches (in memory, per connection) -------------------------------

    async def join(self, conn: Any, room: str, allowed: tuple[str, ...] | None) -> list[dict[str, Any]]:
        """Join ``room`` if the token (or the config default) allows it; return the
        room's recent messages (``rooms.history``).  Raises RoomRefused.  In a cluster
        the first local member subscribes this node to the room's channel."""
        patterns = allowed if allowed is not None else self.config.rooms.default_allow
        if not may_join(patterns, room):
            raise RoomRefused("forbidden", f"not allowed to join {room!r}")
        if self.rooms.join(conn, room) and self.cluster is not None:
            await self.cluster.hold(ROOM_KEY_PREFIX + room)
        return self.rooms.recent(room)

    def leave(self, conn: Any, room: str) -> None:
        if self.rooms.leave(conn, room) and self.cluster is not None:
            self.cluster.release(ROOM_KEY_PREFIX + room)

    async def send_room(self, conn: Any, room: str, body: bytes) -> tuple[str, int]:
        """Offer a room message to every connection in the room now; ``(msg_id,
        delivered)``.  Room messages are not stored; the sender must have joined.  In a
        cluster it is published on the room's channel and ``delivered`` counts nodes."""
        if room not in self.rooms.rooms_of(conn):
            raise RoomRefused("forbidden", f"join {room!r} before sending to it")
        msg_id, ts = self.ids.next()
        if self.cluster is not None:  # comes back through on_cluster_message, like users
            return msg_id, await self.cluster.publish(ROOM_KEY_PREFIX + room, msg_id, conn.user, ts, body)
        return msg_id, self._route_room(room, msg_id, conn.user, body, ts)

    def _route_room(self, room: str, msg_id: str, sender: str, body: bytes, ts: int) -> int:
        fields = message_fields(msg_id, None, sender, None, body, ts, room=room)
        result = self.router.offer_all(self.rooms.members(room), Routed(message_json(fields), None, fields))
        self.rooms.remember(room, fields)
        return result.delivered

    def watch(self, conn: Any, users: tuple[str, ...], on: bool) -> dict[str, bool]:
        """(Un)watch users' presence; return who of them is online now."""
        if on:
            self.watches.watch(conn, users)
        else:
            self.watches.unwatch(conn, users)
        return {user: self.sessions.count(user) > 0 for user in users}

    def _log_slow(self, conn: Any) -> None:
        self._slow_log.log(
            "warning", "slow_consumer", key=conn.user, user=conn.user, conn=conn.conn_id,
            policy=self.router.slow_consumer,
        )

    # -- sends -----------------------------------------------------------------------

    async def send(self, origin: Any, sender: str, to: str, body: bytes, fid: Any = None) -> None:
        """Store then route a message; then call ``origin.on_stored(fid, msg_id, seq,
        delivered)`` -- or ``origin.on_store_failed(fid)`` if the store refused it.

        Blocks only while the store's queue is full.  A connection origin must hold a
        reply credit for the ack (or error) this produces; the callbacks never block.
        """
        if self.cluster is not None and not self.cluster.healthy:
            origin.on_store_failed(fid)  # Redis is unreachable: never ack what is not stored
            return
        msg_id, ts = self.ids.next()
        job = (NewMessage(msg_id, sender, to, body, ts), origin, fid, time.monotonic())
        if self._threaded:
            await self._jobs_tx.send(job)
            return
        try:
            seq = self.store.append_many([job[0]])[0]
        except StoreError as exc:
            self._fail([job], exc)
            return
        self._stored += 1
        self._deliver(job, seq)

    def _deliver(self, job: tuple[NewMessage, Any, Any, float], seq: int) -> None:
        new, origin, fid, accepted = job
        fields = message_fields(new.msg_id, seq, new.sender, new.recipient, new.body, new.ts)
        result = self.router.route(new.recipient, Routed(message_json(fields), seq, fields))
        if self.latency is not None:
            self.latency.observe(time.monotonic() - accepted)
        origin.on_stored(fid, new.msg_id, seq, result.delivered)

    def _fail(self, jobs: list[tuple[NewMessage, Any, Any, float]], exc: Exception) -> None:
        self._store_errors += 1
        log.log("error", "store_failed", error=str(exc), messages=len(jobs))
        for _new, origin, fid, _accepted in jobs:
            origin.on_store_failed(fid)

    # -- coalesced writes ------------------------------------------------------------

    def ack_cursor(self, user: str, seq: int) -> None:
        """Move ``user``'s acknowledged cursor to ``seq`` (coalesced; never blocks)."""
        if seq > self._cursors.get(user, -1):
            self._cursors[user] = seq
        if self._threaded:
            self._wake_writer()
        else:
            self._flush_coalesced()

    def _wake_writer(self) -> None:
        try:
            self._jobs_tx.send_nowait(_WAKE)
        except (trio.WouldBlock, trio.ClosedResourceError):
            pass  # the writer is busy (it flushes with its next batch) or shut down

    def _take_coalesced(self) -> tuple[dict[str, int], dict[str, int]]:
        cursors, seen = self._cursors, self._last_seen
        self._cursors, self._last_seen = {}, {}
        return cursors, seen

    def _flush_coalesced(self) -> None:
        cursors, seen = self._take_coalesced()
        self._write_coalesced(cursors, seen)

    def _write_coalesced(self, cursors: dict[str, int], seen: dict[str, int]) -> None:
        for user, seq in cursors.items():
            self.store.set_cursor(user, seq)
        for user, ts in seen.items():
            self.store.set_last_seen(user, ts)

    # -- the writer ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the group-commit writer and the pruner until ``close_intake`` and drained."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._prune_loop)
            if self._mode == "threaded" and hasattr(self.store, "checkpoint"):
                nursery.start_soon(self._checkpoint_loop)
            task_status.started()
            await self._writer()
            nursery.cancel_scope.cancel()

    def close_intake(self) -> None:
        self._jobs_tx.close()

    async def _writer(self) -> None:
        batch_max = self.config.store.batch_max
        async for first in self._jobs_rx:
            batch = [first]
            while len(batch) < batch_max:
                try:
                    batch.append(self._jobs_rx.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            jobs = [j for j in batch if j is not _WAKE]
            cursors, seen = self._take_coalesced()
            if not jobs and not cursors and not seen:
                continue
            await self._commit(jobs, cursors, seen)
        cursors, seen = self._take_coalesced()
        if cursors or seen:
            await self._commit([], cursors, seen)

    async def _commit_async(self, jobs: list, cursors: dict[str, int], seen: dict[str, int]) -> None:
        """Redis: append (and publish, atomically) the batch; live delivery comes back
        through ``on_cluster_message``, for local recipients too (one path, seq order)."""
        if jobs:
            try:
                results = await self.store.append_routed([j[0] for j in jobs])
            except StoreError as exc:
                self._fail(jobs, exc)
                results = []
            for job, result in zip(jobs, results, strict=True):
                if result.error is not None:
                    self._fail([job], result.error)
                    continue
                self._stored += 1
                new, origin, fid, _accepted = job
                origin.on_stored(fid, new.msg_id, result.seq, result.receivers)
        try:
            for user, seq in cursors.items():
                await self.store.set_cursor(user, seq)
            for user, ts in seen.items():
                await self.store.set_last_seen(user, ts)
        except StoreError as exc:
            log.log("error", "store_failed", error=str(exc), what="cursors")

    def on_cluster_message(self, msg: Any) -> None:
        """A message published by any node (this one included) for a user or a room
        we hold."""
        if msg.recipient.startswith(ROOM_KEY_PREFIX):
            room = msg.recipient[len(ROOM_KEY_PREFIX):]
            self._route_room(room, msg.msg_id, msg.sender, msg.body, msg.ts)
            return
        fields = message_fields(msg.msg_id, msg.seq, msg.sender, msg.recipient, msg.body, msg.ts)
        self.router.route(msg.recipient, Routed(message_json(fields), msg.seq, fields))
        if self.latency is not None:
            self.latency.observe(max(0.0, time.time() - msg.ts / 1000))

    def on_cluster_resync(self, users: Any) -> None:
        """Live messages may have been missed (Redis reconnect, a seq gap): replay."""
        for user in users:
            for conn in self.sessions.connections(user):
                conn.resync()

    async def _commit(self, jobs: list, cursors: dict[str, int], seen: dict[str, int]) -> None:
        if self._mode == "async":
            await self._commit_async(jobs, cursors, seen)
            return
        def work() -> list[int]:
            seqs = self.store.append_many([j[0] for j in jobs]) if jobs else []
            self._write_coalesced(cursors, seen)
            return seqs

        try:
            seqs = await trio.to_thread.run_sync(work, limiter=self._write_limiter)
        except StoreError as exc:
            self._fail(jobs, exc)
            return
        self._stored += len(jobs)
        for job, seq in zip(jobs, seqs, strict=True):
            self._deliver(job, seq)

    async def _checkpoint_loop(self) -> None:
        """Every second: index what was stored since (full-text search, off the append
        path, serialized with the group commits), then copy the WAL into the database
        from a thread of its own, so the checkpoint's fsyncs stay off the group-commit
        path (SQLite PASSIVE checkpoint)."""
        while True:
            await trio.sleep(1.0)
            try:
                if hasattr(self.store, "index_pending"):
                    await self.write(self.store.index_pending)
                await trio.to_thread.run_sync(self.store.checkpoint)
            except StoreError as exc:
                log.log("error", "checkpoint_failed", error=str(exc))

    async def _prune_loop(self) -> None:
        cfg = self.config.store
        while True:
            await trio.sleep(cfg.prune_interval_s)
            now = int(time.time() * 1000)
            try:
                removed = await self.write(self.store.prune, now, cfg.retention_days or None, cfg.max_inbox)
            except StoreError as exc:
                log.log("error", "prune_failed", error=str(exc))
                continue
            if removed:
                log.log("info", "pruned", messages=removed)

    # -- reads -----------------------------------------------------------------------

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a store read off the trio thread (SQLite), inline (memory) or awaited (Redis)."""
        if self._mode == "async":
            return await fn(*args)
        if not self._threaded:
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args, limiter=self._read_limiter)

    async def write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run an occasional store write (prune) serialized with the group commits."""
        if self._mode == "async":
            return await fn(*args)
        if not self._threaded:
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args, limiter=self._write_limiter)

    async def presence(self, users: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        """Online state, connection count and last_seen; cluster-wide in a cluster."""
        seen = await self.read(self.store.last_seen, list(users))
        counts = None
        if self.cluster is not None:  # raises ClusterUnavailable, a StoreUnavailable
            counts = await self.cluster.presence(list(users))
        out = {}
        for user in users:
            count = counts.get(user, 0) if counts is not None else self.sessions.count(user)
            out[user] = {
                "online": count > 0,
                "connections": count,
                "last_seen": self._last_seen.get(user, seen.get(user)),
            }
        return out

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
        )
