"""Cluster membership for multi-node Tidings over Redis: channels, presence, health.  Trio.

Theory of operation
-------------------
Every node runs one :class:`Cluster` (``open_cluster``).  It does three things:

1. **Channels.**  A message is stored by the Redis store's append script, which in the
   same atomic step publishes the recipient's messages of that call as one envelope
   (``redis_lua.decode_envelopes``) on the recipient's channel ``tidings:{<user>}:ch`` (see :mod:`tidings.store.redis_lua`).  A node subscribes to a
   user's channel while it has at least one local connection of that user:
   ``await hold(user)`` when a connection registers (refcounted; the first one
   subscribes), ``release(user)`` when it leaves (the last one unsubscribes, in the
   background).  The pub/sub's reader hands over what each socket read brought as one
   batch (:mod:`tidings.cluster.pubsub`) and ``on_message(msg)`` is called synchronously with the
   ``StoredMessage`` (recipient = the user, its inbox seq, the stored body): the hub
   builds the frame (JSON or MessagePack) exactly as for a local append and routes it;
   ``route`` is non-blocking, so the buffer never grows.  Every message,
   including those sent by local senders, reaches local connections through this one
   path, so each user's messages arrive in seq order.

2. **Presence.**  Each node keeps ``tidings:{node:<id>}:presence`` (hash user ->
   local connection count) written as connections come and go and refreshed every
   ``presence_ttl_s / 3`` with a TTL of ``presence_ttl_s``, plus the liveness key
   ``tidings:{node:<id>}:alive`` (same TTL) and membership in the set
   ``tidings:nodes``.  ``presence(users)`` sums the counts of live nodes (and this
   node's own local counts).  A node killed with -9 stops refreshing: its keys expire
   and its users show offline within ``presence_ttl_s``.  A clean shutdown deletes
   them at once.  The same write carries ``tidings:{node:<id>}:stats`` (same TTL):
   the bytes ``stats_record()`` returns, when the server set it, for the operator's
   page (``node_stats()`` reads every other live node's, and everyone's users), and
   ``tidings:{node:<id>}:devices`` (hash user -> the comma-separated names of the
   devices connected here, from ``devices_of(user)`` when the server set it), which
   ``devices(users)`` joins over the live nodes.

3. **Faults.**  Pub/sub is fire-and-forget: messages published while the subscription
   is down are not delivered live (they are stored).  When Redis is unreachable,
   ``healthy`` turns False (for /healthz; the hub answers sends ``unavailable``), the
   subscription is re-established with exponential backoff, every held channel is
   re-subscribed, and ``on_resync(users)`` is called with every held user: their
   local connections must re-read their inbox from the store (a replay from the last
   seq they were sent) because live messages may have been missed.  ``on_resync`` is
   also called for one user when a seq gap is seen on its channel.  Nothing here ever
   raises into the caller's nursery; ``hold``/``release`` never raise either.

The contract for the caller (the hub), per connection:
``await cluster.hold(user)`` BEFORE starting the replay from the store (hold returns
after the SUBSCRIBE is acknowledged, so anything stored after the replay's read is
also published to this node), and ``cluster.release(user)`` after unregistering.
If ``hold`` returns False (Redis down), the connection still works from the store;
``on_resync`` will be called for the user once the channel is live.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import attrs
import coredis
import orjson
import coredis.exceptions
import trio
from coredis.retry import NoRetryPolicy

from tidings import log
from tidings.cluster.devices import devices_key, devices_online, write_devices
from tidings.cluster.pubsub import batch_pubsub
from tidings.routing.rooms import ROOM_KEY_PREFIX
from tidings.store import StoredMessage, StoreUnavailable
from tidings.store.redis import single_errors
from tidings.store.redis_lua import channel_for, decode_envelopes, user_from_channel, user_tag

__all__ = ["Cluster", "ClusterStatistics", "ClusterUnavailable", "open_cluster"]

NODES_KEY = "tidings:nodes"
SUBSCRIBE_CHUNK = 256


class ClusterUnavailable(StoreUnavailable):
    """Redis cannot be reached for a cluster-wide query (``presence``); a
    StoreUnavailable, so callers answer it like any store outage."""


def presence_key(node_id: str) -> str:
    return f"tidings:{{node:{user_tag(node_id)}}}:presence"


def alive_key(node_id: str) -> str:
    return f"tidings:{{node:{user_tag(node_id)}}}:alive"


def stats_key(node_id: str) -> str:
    return f"tidings:{{node:{user_tag(node_id)}}}:stats"


@attrs.frozen
class ClusterStatistics:
    node_id: str
    healthy: bool
    subscribed: bool          # the pub/sub session is up
    presence_ok: bool         # the last presence write succeeded
    held_users: int           # users with local connections (channels wanted)
    local_connections: int
    active_channels: int      # channels confirmed subscribed in this session
    received: int             # pub/sub messages read (an envelope may carry several)
    dispatched: int           # on_message calls
    ignored: int              # for users no longer held, or malformed
    gaps: int                 # seq gaps seen (each triggers on_resync for the user)
    callback_errors: int
    sessions: int             # pub/sub sessions established (1 + reconnects)
    disconnects: int
    presence_writes: int
    presence_failures: int
    last_error: str


class Cluster:
    """One node's view of the cluster.  Create with :func:`open_cluster`."""

    def __init__(self, client: Any, *, node_id: str, presence_ttl_s: float,
                 on_message: Callable[[StoredMessage], None],
                 on_resync: Callable[[list[str]], None] | None = None,
                 sharded: bool = False, subscribe_timeout: float = 2.0,
                 command_timeout: float = 5.0, backoff_min: float = 0.05,
                 backoff_max: float = 5.0) -> None:
        if presence_ttl_s <= 0:
            raise ValueError("presence_ttl_s must be > 0")
        self._r = client
        self.node_id = node_id
        self.presence_ttl_s = presence_ttl_s
        self.on_message = on_message
        self.on_resync = on_resync
        self._sharded = sharded
        self._subscribe_timeout = subscribe_timeout
        self._command_timeout = command_timeout
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._presence_key = presence_key(node_id)
        self._alive_key = alive_key(node_id)
        # local state (the truth; Redis state is rebuilt from it after faults)
        self._held: dict[str, int] = {}
        self._last_seq: dict[str, int] = {}
        # the pub/sub session
        self._ps: Any = None
        self._session_scope: trio.CancelScope | None = None
        self._active: set[str] = set()
        self._pending: dict[str, trio.Event] = {}
        self._to_unsubscribe: set[str] = set()
        self._unsub_inflight: dict[str, int] = {}
        self._unsub_wake = trio.Event()
        # presence
        self._dirty: set[str] = set()
        self._presence_wake = trio.Event()
        self._presence_ok = False
        #: Set by the server: this node's statistics record, written with presence.
        self.stats_record: Callable[[], bytes] | None = None
        #: Set by the server: the device names of a user's connections here.
        self.devices_of: Callable[[str], list[str]] | None = None
        self._errors = log.LogOnce(interval=30.0)
        self._n = dict(received=0, dispatched=0, ignored=0, gaps=0, callback_errors=0,
                       sessions=0, disconnects=0, presence_writes=0, presence_failures=0)
        self._last_error = ""

    # -- public API ------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """The subscription is up and the last presence write succeeded."""
        return self._ps is not None and self._presence_ok

    def connections(self, user: str) -> int:
        """This node's local connection count for ``user`` (its hold count)."""
        return self._held.get(user, 0)

    async def hold(self, user: str) -> bool:
        """Count one more local connection of ``user``; subscribe its channel on the
        first.  Returns True when the channel is live (SUBSCRIBE acknowledged), False
        when Redis is unreachable (``on_resync([user])`` follows once it is live).
        Never raises (except trio.Cancelled)."""
        self._held[user] = self._held.get(user, 0) + 1
        self._mark_dirty(user)
        ps = self._ps
        if ps is None:
            return False
        if user in self._active:
            return True
        event = self._pending.get(user)
        if event is not None:  # another hold of this user is subscribing: wait for it
            with trio.move_on_after(self._subscribe_timeout):
                await event.wait()
            return user in self._active and self._ps is ps
        event = self._pending[user] = trio.Event()
        try:
            with trio.fail_after(self._subscribe_timeout):
                await ps.subscribe(channel_for(user))
            if self._ps is ps:
                self._active.add(user)
        except (Exception, trio.TooSlowError) as exc:
            self._session_failed(ps, exc, "subscribe")
        finally:
            del self._pending[user]
            event.set()
            if self._held.get(user, 0) == 0:  # released meanwhile
                self._queue_unsubscribe(user)
        return user in self._active and self._ps is ps

    async def publish(self, key: str, msg_id: str, sender: str, ts: int, body: bytes) -> int:
        """Publish an unstored message (a room message, seq 0) on ``key``'s channel;
        return how many nodes received it.  Raises ClusterUnavailable."""
        data = b"0\n" + orjson.dumps([msg_id, sender, ts]) + b"\n" + body
        try:
            with trio.fail_after(self._command_timeout):
                if self._sharded:
                    return int(await self._r.spublish(channel_for(key), data))
                return int(await self._r.publish(channel_for(key), data))
        except (coredis.exceptions.RedisError, OSError, trio.TooSlowError) as exc:
            self._note_error("publish", exc)
            raise ClusterUnavailable(f"cannot publish: {_reason(exc)}") from None

    def release(self, user: str) -> None:
        """One local connection of ``user`` left; unsubscribe (in the background) after
        the last.  Never blocks, never raises; extra releases are ignored."""
        n = self._held.get(user, 0)
        if n <= 0:
            return
        if n == 1:
            del self._held[user]
            self._last_seq.pop(user, None)
            self._queue_unsubscribe(user)
        else:
            self._held[user] = n - 1
        self._mark_dirty(user)

    async def presence(self, users: Sequence[str]) -> dict[str, int]:
        """Connections per user over all live nodes (this node's counted locally).
        Raises ClusterUnavailable when Redis cannot be asked."""
        users = list(dict.fromkeys(users))
        counts = {u: self._held.get(u, 0) for u in users}
        if not users:
            return counts
        try:
            with trio.fail_after(self._command_timeout):
                nodes = [_s(n) for n in await self._r.smembers(NODES_KEY)]
                others = [n for n in nodes if n != self.node_id]
                if not others:
                    return counts
                async with self._r.pipeline(transaction=False) as pipe:
                    requests = [(n, pipe.exists([alive_key(n)]),
                                 pipe.hmget(presence_key(n), users)) for n in others]
                dead = []
                for node, alive, values in requests:
                    if not await alive:
                        dead.append(node)
                        continue
                    for user, v in zip(users, await values):
                        if v is not None:
                            counts[user] += int(v)
                if dead:
                    await self._r.srem(NODES_KEY, dead)
        except (Exception, trio.TooSlowError) as exc:
            raise ClusterUnavailable(f"presence: {_reason(exc)}") from None
        return counts

    async def devices(self, users: Sequence[str]) -> dict[str, set[str]]:
        """The names of the devices connected per user over all live nodes (this node's
        from ``devices_of``).  Raises ClusterUnavailable when Redis cannot be asked."""
        try:
            with trio.fail_after(self._command_timeout):
                return await devices_online(self._r, self.node_id, users, self.devices_of)
        except (Exception, trio.TooSlowError) as exc:
            raise ClusterUnavailable(f"devices: {_reason(exc)}") from None

    async def node_stats(self, count_users_up_to: int = 20_000
                         ) -> tuple[dict[str, bytes], dict[str, int] | None]:
        """The last statistics record of every other live node (node id -> bytes; a node
        without one yet is left out), and the connections of every connected user over
        all nodes -- None when the presence hashes hold more than ``count_users_up_to``
        entries (reading them would cost too much).  Raises ClusterUnavailable."""
        try:
            with trio.fail_after(self._command_timeout):
                nodes = sorted(_s(n) for n in await self._r.smembers(NODES_KEY))
                others = [n for n in nodes if n != self.node_id]
                async with self._r.pipeline(transaction=False) as pipe:
                    requests = [(n, pipe.get(stats_key(n)), pipe.hlen(presence_key(n))) for n in others]
                records, sizes = {}, {}
                for n, record, size in requests:
                    if (raw := await record) is not None:
                        records[n], sizes[n] = raw, await size
                if sum(sizes.values()) + len(self._held) > count_users_up_to:
                    return records, None
                counts = dict(self._held)
                if sizes:
                    async with self._r.pipeline(transaction=False) as pipe:
                        hashes = [pipe.hgetall(presence_key(n)) for n in sizes]
                    for h in hashes:
                        for user, n in (await h).items():
                            user = _s(user)
                            counts[user] = counts.get(user, 0) + int(n)
                return records, {u: n for u, n in counts.items() if not u.startswith(ROOM_KEY_PREFIX)}
        except (Exception, trio.TooSlowError) as exc:
            raise ClusterUnavailable(f"node stats: {_reason(exc)}") from None

    def statistics(self) -> ClusterStatistics:
        return ClusterStatistics(
            node_id=self.node_id, healthy=self.healthy, subscribed=self._ps is not None,
            presence_ok=self._presence_ok, held_users=len(self._held),
            local_connections=sum(self._held.values()), active_channels=len(self._active),
            last_error=self._last_error, **self._n,
        )

    # -- the tasks -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the subscription and presence tasks until cancelled.  Never raises."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._presence_loop)
            nursery.start_soon(self._session_loop)
            task_status.started()

    async def _session_loop(self) -> None:
        backoff = self._backoff_min
        while True:
            scope = trio.CancelScope()
            self._session_scope = scope
            sessions = self._n["sessions"]
            try:
                with scope:
                    await self._session()
            except Exception as exc:  # includes ExceptionGroups of coredis' task groups
                self._note_error("pubsub", exc)
            finally:
                if self._ps is not None:
                    self._n["disconnects"] += 1
                self._ps = None
                self._active.clear()
                self._to_unsubscribe.clear()
                self._unsub_inflight.clear()
            if self._n["sessions"] != sessions:  # it was up: start the backoff over
                backoff = self._backoff_min
            await trio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self._backoff_max)

    async def _session(self) -> None:
        """One pub/sub session: subscribe everything held, then consume until an error.
        Messages are dispatched in batches by the pub/sub's reader (``_on_batch``);
        what arrives before the session is live waits until the resync is issued."""
        live = False
        early: list[Any] = []

        def sink(messages: list[Any]) -> None:
            if live:
                self._on_batch(messages)
            elif early is not None:
                early.extend(messages)

        async with batch_pubsub(self._r, self._sharded, sink, self._subscribe_timeout,
                                max(1.0, self.presence_ttl_s / 3)) as ps:
            done: set[str] = set()
            while True:  # holds may arrive while we subscribe: loop until stable
                todo = [u for u in self._held if u not in done]
                if not todo:
                    break
                for i in range(0, len(todo), SUBSCRIBE_CHUNK):
                    chunk = todo[i:i + SUBSCRIBE_CHUNK]
                    with trio.fail_after(self._subscribe_timeout * 2):
                        await ps.subscribe(*[channel_for(u) for u in chunk])
                    done.update(chunk)
            self._active = {u for u in done if u in self._held}
            self._to_unsubscribe = {u for u in done if u not in self._held}
            if self._to_unsubscribe:
                self._unsub_wake.set()
            self._ps = ps
            self._n["sessions"] += 1
            if self._n["sessions"] > 1:
                log.log("info", "cluster_resubscribed", node=self.node_id,
                        channels=len(self._active))
            resync = sorted(self._active)
            self._last_seq.clear()
            if resync and self.on_resync is not None:
                self._call(self.on_resync, resync)
            live = True
            if early:
                self._on_batch(early)
            early.clear()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._unsubscriber, ps)
                    await trio.sleep_forever()
            finally:  # before coredis' cleanup reads the unsubscribe acknowledgements
                live = False
                early = None  # type: ignore[assignment]  # closing: drop what comes now

    def _on_batch(self, messages: list[Any]) -> None:
        for message in messages:
            self._dispatch(message)

    def _dispatch(self, message: Any) -> None:
        kind = message.get("type")
        if kind in ("unsubscribe", "sunsubscribe"):
            self._unsubscribed(message.get("channel"))
            return
        if kind not in ("message", "smessage"):
            return
        self._n["received"] += 1
        user = user_from_channel(message["channel"])
        if user is None or user not in self._held:
            self._n["ignored"] += 1
            return
        try:
            msgs = decode_envelopes(user, message["data"])
        except (ValueError, TypeError):
            self._n["ignored"] += 1
            return
        for msg in msgs:  # one envelope: one recipient's messages, in seq order
            seq = msg.seq
            last = self._last_seq.get(user)
            if last is not None and seq > last + 1:
                self._n["gaps"] += 1
                if self.on_resync is not None:
                    self._call(self.on_resync, [user])
            if last is None or seq > last:
                self._last_seq[user] = seq
            self._n["dispatched"] += 1
            self._call(self.on_message, msg)

    def _unsubscribed(self, channel: Any) -> None:
        """An unsubscribe confirmation: ours, or the server dropping a channel we still
        hold (a Redis Cluster slot migrated).  Then start a new session: it subscribes
        through the current topology and resyncs every held user."""
        user = user_from_channel(channel) if channel is not None else None
        if user is None:
            return
        inflight = self._unsub_inflight.get(user, 0)
        if inflight > 0:
            if inflight == 1:
                del self._unsub_inflight[user]
            else:
                self._unsub_inflight[user] = inflight - 1
            return
        if self._held.get(user, 0) > 0 and self._ps is not None:
            self._session_failed(self._ps, RuntimeError(f"server unsubscribed {user!r}"),
                                 "unsubscribed")

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # the caller's bug must not kill the subscription
            self._n["callback_errors"] += 1
            self._errors.log("error", "cluster_callback_failed", key=getattr(fn, "__name__", ""),
                             error=repr(exc))

    async def _unsubscriber(self, ps: Any) -> None:
        while True:
            await self._unsub_wake.wait()
            self._unsub_wake = trio.Event()
            users = [u for u in self._to_unsubscribe
                     if self._held.get(u, 0) == 0 and u not in self._pending]
            self._to_unsubscribe.difference_update(users)
            if not users:
                continue
            for u in users:
                self._active.discard(u)
                self._unsub_inflight[u] = self._unsub_inflight.get(u, 0) + 1
            try:
                with trio.fail_after(self._subscribe_timeout):
                    await ps.unsubscribe(*[channel_for(u) for u in users])
            except trio.TooSlowError:
                pass  # the acknowledgement is late; the command was sent

    def _queue_unsubscribe(self, user: str) -> None:
        self._to_unsubscribe.add(user)
        self._unsub_wake.set()

    def _session_failed(self, ps: Any, exc: BaseException, what: str) -> None:
        self._note_error(what, exc)
        if self._ps is ps and self._session_scope is not None:
            self._session_scope.cancel()  # reconnect and resubscribe everything

    def _note_error(self, what: str, exc: BaseException) -> None:
        self._last_error = f"{what}: {_reason(exc)}"
        self._errors.log("warning", "cluster_redis_error", key=what, node=self.node_id,
                         error=self._last_error)

    # -- presence --------------------------------------------------------------------

    def _mark_dirty(self, user: str) -> None:
        self._dirty.add(user)
        self._presence_wake.set()

    async def _presence_loop(self) -> None:
        interval = self.presence_ttl_s / 3
        full = True
        backoff = self._backoff_min
        while True:
            try:
                with trio.fail_after(self._command_timeout):
                    await self._write_presence(full)
                self._n["presence_writes"] += 1
                self._presence_ok = True
                full = False
                backoff = self._backoff_min
                with trio.move_on_after(interval):
                    await self._presence_wake.wait()
            except (Exception, trio.TooSlowError) as exc:
                self._n["presence_failures"] += 1
                self._presence_ok = False
                full = True
                self._note_error("presence", exc)
                await trio.sleep(min(backoff, interval))
                backoff = min(backoff * 2, self._backoff_max)

    async def _write_presence(self, full: bool) -> None:
        self._presence_wake = trio.Event()
        dirty, self._dirty = self._dirty, set()
        ttl_ms = max(1, int(self.presence_ttl_s * 1000))
        try:
            # presence hash and alive key share the {node:<id>} slot: one transaction
            async with self._r.pipeline(transaction=True) as pipe:
                if full:
                    pipe.delete([self._presence_key])
                    counts = {u: n for u, n in self._held.items() if n > 0}
                else:
                    counts = {u: self._held[u] for u in dirty if self._held.get(u, 0) > 0}
                    gone = [u for u in dirty if self._held.get(u, 0) <= 0]
                    if gone:
                        pipe.hdel(self._presence_key, gone)
                if counts:
                    pipe.hset(self._presence_key, counts)
                pipe.pexpire(self._presence_key, ttl_ms)
                if self.devices_of is not None:
                    write_devices(pipe, self.node_id, self.devices_of, counts, full, dirty, ttl_ms)
                pipe.set(self._alive_key, "1", px=ttl_ms)
                if self.stats_record is not None:
                    pipe.set(stats_key(self.node_id), self.stats_record(), px=ttl_ms)
            await self._r.sadd(NODES_KEY, [self.node_id])
        except BaseException:
            self._dirty |= dirty  # written again (in full) after the fault
            raise

    async def _withdraw(self) -> None:
        """Best effort on clean shutdown: this node's users go offline at once."""
        with trio.move_on_after(1.0) as scope:
            scope.shield = True
            try:
                await self._r.delete([self._presence_key, self._alive_key, stats_key(self.node_id),
                                      devices_key(self.node_id)])
                await self._r.srem(NODES_KEY, [self.node_id])
            except Exception:
                pass


def _s(v: Any) -> str:
    return v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        leaves = []
        stack = [exc]
        while stack:
            e = stack.pop()
            if isinstance(e, BaseExceptionGroup):
                stack.extend(e.exceptions)
            else:
                leaves.append(e)
        return "; ".join(_reason(e) for e in leaves) or repr(exc)
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@contextlib.asynccontextmanager
async def open_cluster(url: str, node_id: str, presence_ttl_s: float,
                       on_message: Callable[[StoredMessage], None], *,
                       on_resync: Callable[[list[str]], None] | None = None,
                       cluster: bool = False, connect_timeout: float = 2.0,
                       command_timeout: float = 5.0, backoff_max: float = 5.0,
                       ) -> AsyncIterator[Cluster]:
    """Run a :class:`Cluster` for the duration of the ``async with`` block.

    Does not wait for Redis: if it is down at start, ``healthy`` stays False until it
    comes up (``hold`` returns False meanwhile).  ``cluster=True`` talks to a Redis
    Cluster with sharded pub/sub (SSUBSCRIBE); otherwise a standalone server with
    SUBSCRIBE.  On exit the node's presence is withdrawn (best effort, <= 1 s)."""
    kwargs = dict(connect_timeout=connect_timeout, stream_timeout=command_timeout,
                  retry_policy=NoRetryPolicy(), client_name=f"tidings-cluster:{node_id}")
    client = (coredis.RedisCluster.from_url(url, **kwargs) if cluster
              else coredis.Redis.from_url(url, **kwargs))
    node = Cluster(client, node_id=node_id, presence_ttl_s=presence_ttl_s,
                   on_message=on_message, on_resync=on_resync, sharded=cluster,
                   command_timeout=command_timeout, backoff_max=backoff_max)
    async with single_errors(), client, trio.open_nursery() as nursery:
        await nursery.start(node.run)
        try:
            yield node
        finally:
            nursery.cancel_scope.cancel()
            await node._withdraw()
