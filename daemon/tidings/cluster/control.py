"""The cluster's control plane: presence events and server commands for every node.  Trio.

Theory of operation
-------------------
Every node runs one :class:`Control` (``open_control``) next to its
:class:`~tidings.cluster.node.Cluster`, on its own Redis connections and off the
message path (it sees connections come and go, never messages).  Keys, events and
scripts: :mod:`tidings.cluster.control_lua`.

**Membership.**  A node process joins as a *member* ``<node id>/<nonce>`` with a lease
(``alive``, TTL ``presence_ttl_s``, renewed every ``presence_ttl_s / 3``).  After any
Redis fault -- a failed command, or a renewal that finds the lease gone (the node was
stopped, or Redis lost it) -- the node joins again as a NEW member: it writes every user
it holds under the new id first, then retires the old member.  So a fault never leaves a
half-known state behind: what a member wrote is either fully rewritten or swept.  A
swept member never writes again: on a standalone server the script refuses an add whose
lease is gone; on a Redis Cluster the lease is renewed (when due) before any write.

**First and last connection, cluster-wide.**  The hub reports when a user's first local
connection opens and last one closes (``local_presence``; never blocks).  One writer
task runs the presence script on the user's ``online`` hash (member -> 1): the call
that creates the hash is the user's first connection on any node, the one that deletes
it the last.  Only such a transition is published (``presence`` event, with its
version); every node hands events about users its connections watch to ``on_presence``.
Events are applied only when newer than what the node knows (versions), so two nodes'
events that cross on the channel leave the right final state.

**Dead members.**  Every tick each node checks the other members' leases; a member whose
lease expired (kill -9, SIGSTOP longer than the TTL) is swept by one node (a lock): its
users leave the ``online`` hashes and the resulting states are published.  A killed
node's users therefore go offline within ``presence_ttl_s`` plus one tick
(``presence_ttl_s / 3``), as the presence query's counts do.  A stopped node that wakes
finds its lease gone and rejoins: its users come online again.

**Missed events.**  Pub/sub loses what is published while a subscription is down: each
time the subscription is (re)established, the node re-reads the state of every watched
user and reports what changed.  Rejoins and sweeps publish the full state of every user
they touch, not only transitions, so an event whose script ran but whose reply was lost
in a fault is repaired.

**Commands.**  ``disconnect(user, conn)`` publishes a request that every other live
member answers with how many connections it closed; it waits for the answers of the
members alive when asked, at most ``command_timeout``, and says who stayed silent.

**The gauge.**  ``online_users`` is the number of ``online`` hashes, kept in one counter
(read every tick).  On a standalone server the script moves it atomically; on a Redis
Cluster the node adds each call's transitions afterwards, so a reply lost in a fault can
leave it off by the lost transitions.

Nothing here raises into the caller's nursery.  ``local_presence`` never blocks;
``watch_state`` and ``disconnect`` raise ``ClusterUnavailable`` when Redis cannot answer.
Cancellation: a cancelled call leaves no waiter behind.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import attrs
import coredis
import coredis.exceptions
import trio
from coredis.retry import NoRetryPolicy

from tidings import log
from tidings.cluster.control_lua import CHANNEL, KnownStates, decode_event, new_member_id, node_of
from tidings.cluster.members import BATCH, LeaseLost, MemberStore
from tidings.cluster.node import ClusterUnavailable
from tidings.store.redis import single_errors

__all__ = ["Control", "ControlStatistics", "DisconnectResult", "open_control"]

_ERRORS = (coredis.exceptions.RedisError, OSError, TimeoutError, trio.TooSlowError)


@attrs.frozen
class DisconnectResult:
    closed: int                  # connections closed by the other members that answered
    answered: tuple[str, ...]    # node ids of the members that answered
    silent: tuple[str, ...]      # node ids of live members that did not answer in time


@attrs.frozen
class ControlStatistics:
    member: str
    healthy: bool
    published: int       # events published
    received: int        # events read from the channel
    transitions: int     # users that came online / went offline by this node's calls
    applied: int         # presence changes handed to on_presence
    rejoins: int         # joins after the first (after a fault or a lost lease)
    swept: int           # dead members swept by this node
    failures: int        # failed write rounds
    online_users: int | None


class _Waiter:
    """A disconnect request waiting for the other members' answers."""

    def __init__(self) -> None:
        self.expected: set[str] | None = None  # None until the members were read
        self.replies: dict[str, int] = {}
        self.done = trio.Event()

    def check(self) -> None:
        if self.expected is not None and self.expected <= self.replies.keys():
            self.done.set()


class Control:
    """One node's control plane.  Create with :func:`open_control`."""

    def __init__(self, client: Any, *, node_id: str, presence_ttl_s: float,
                 on_presence: Callable[[str, bool], None],
                 is_watched: Callable[[str], bool],
                 watched_users: Callable[[], Iterable[str]],
                 on_disconnect: Callable[[str, str | None], int],
                 sharded: bool = False, command_timeout: float = 5.0,
                 backoff_min: float = 0.05, backoff_max: float = 5.0) -> None:
        """``on_presence(user, online)``: tell this node's watchers (never blocks).
        ``is_watched(user)`` / ``watched_users()``: which users this node's connections
        watch.  ``on_disconnect(user, conn)``: close that user's connections here
        (only ``conn`` when given); the count."""
        if presence_ttl_s <= 0:
            raise ValueError("presence_ttl_s must be > 0")
        self._r = client
        self.node_id = node_id
        self.presence_ttl_s = presence_ttl_s
        self.on_presence = on_presence
        self.is_watched = is_watched
        self.watched_users = watched_users
        self.on_disconnect = on_disconnect
        self._sharded = sharded
        self._command_timeout = command_timeout
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._store = MemberStore(client, ttl_s=presence_ttl_s, sharded=sharded)
        self.member = ""                 # "" until the first join succeeds
        self._joined = False             # the current member's writes are trusted
        self._retired: list[tuple[str, set[str]]] = []  # old members to clean up
        self._held: set[str] = set()     # users with local connections (the truth)
        self._written: set[str] = set()  # users written under the current member
        self._dirty: set[str] = set()
        self._wake = trio.Event()
        self._refresh_watched = False
        self._tick_now = False
        self._known = KnownStates()  # what this node's watchers were told
        self._waiting: dict[str, _Waiter] = {}         # disconnect requests
        self._answers: list[dict[str, Any]] = []       # disconnect answers to publish
        self._subscribed = False
        self._writer_ok = False
        self.online_users: int | None = None
        self._errors = log.LogOnce(interval=30.0)
        self._n = dict(received=0, applied=0, rejoins=0, swept=0, failures=0)

    # -- public API ------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Subscribed to the channel, and the last write round succeeded."""
        return self._subscribed and self._writer_ok

    def local_presence(self, user: str, online: bool) -> None:
        """``user``'s first local connection opened (True) or last one closed (False).
        Written in the background; never blocks, never raises."""
        if online:
            self._held.add(user)
        else:
            self._held.discard(user)
        self._dirty.add(user)
        self._wake.set()

    async def watch_state(self, users: Sequence[str]) -> dict[str, bool]:
        """Whether each user is online on any node, read now; watched users' states
        are merged with the events already seen (the newer wins, and a change is
        reported to ``on_presence``).  Raises ClusterUnavailable."""
        users = list(dict.fromkeys(users))
        try:
            with trio.fail_after(self._command_timeout):
                states = await self._store.states(users)
        except _ERRORS as exc:
            raise ClusterUnavailable(f"presence state: {_reason(exc)}") from None
        out = {}
        for user, (online, version) in zip(users, states):
            self._apply(user, online, version)
            known = self._known.online(user)
            out[user] = online if known is None else known
        return out

    async def disconnect(self, user: str, conn: str | None) -> DisconnectResult:
        """Ask every other live member to close ``user``'s connections (only ``conn``);
        wait for their answers (at most ``command_timeout``).  This node's own
        connections are the caller's business.  Raises ClusterUnavailable."""
        req = os.urandom(8).hex()
        waiter = _Waiter()
        self._waiting[req] = waiter
        try:
            try:
                with trio.fail_after(self._command_timeout):
                    members = await self._store.members()
                    waiter.expected = {m for m, alive in members.items() if alive} - {self.member}
                    await self._store.publish({"kind": "disconnect", "from": self.member,
                                               "req": req, "user": user, "conn": conn})
            except _ERRORS as exc:
                raise ClusterUnavailable(f"disconnect: {_reason(exc)}") from None
            waiter.check()
            with trio.move_on_after(self._command_timeout):
                await waiter.done.wait()
        finally:
            del self._waiting[req]
        replies, expected = waiter.replies, waiter.expected or set()
        return DisconnectResult(
            closed=sum(replies.values()),
            answered=tuple(sorted(node_of(m) for m in replies)),
            silent=tuple(sorted(node_of(m) for m in expected - replies.keys())))

    def statistics(self) -> ControlStatistics:
        return ControlStatistics(member=self.member, healthy=self.healthy,
                                 online_users=self.online_users, published=self._store.published,
                                 transitions=self._store.transitions, **self._n)

    # -- receiving -------------------------------------------------------------------

    def assume(self, user: str, online: bool) -> None:
        """Watchers of ``user`` were told ``online`` without asking Redis (it was
        unreachable): the first state read afterwards corrects them if it differs."""
        self._known.assume(user, online)

    def _apply(self, user: str, online: bool, version: int, *, event: bool = False) -> None:
        """A state of ``user`` from an ``event`` or a read (``KnownStates.apply``)."""
        if self.is_watched(user) and self._known.apply(user, online, version, event=event):
            self._n["applied"] += 1
            self._call(self.on_presence, user, online)

    def _dispatch(self, data: Any) -> None:
        event = decode_event(data)
        if event is None:
            return
        self._n["received"] += 1
        kind, sender = event["kind"], event.get("from")
        if kind == "presence":
            for change in event.get("changes", ()):
                try:
                    user, online, version = change
                    self._apply(str(user), bool(online), int(version), event=True)
                except (TypeError, ValueError):
                    continue
        elif kind == "disconnect" and sender != self.member and isinstance(event.get("user"), str):
            conn = event.get("conn")
            closed = self._call(self.on_disconnect, event["user"], conn if isinstance(conn, str) else None)
            self._answers.append({"kind": "disconnected", "from": self.member, "to": sender,
                                  "req": event.get("req"), "closed": closed or 0})
            self._wake.set()
        elif kind == "disconnected" and event.get("to") == self.member:
            waiter = self._waiting.get(str(event.get("req")))
            if waiter is not None and isinstance(sender, str):
                closed = event.get("closed")
                waiter.replies[sender] = closed if isinstance(closed, int) else 0
                waiter.check()

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # the caller's bug must not kill the control plane
            self._errors.log("error", "control_callback_failed", key=getattr(fn, "__name__", ""),
                             error=repr(exc))
            return None

    # -- the tasks -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the subscriber and the writer until cancelled.  Never raises."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._subscriber)
            nursery.start_soon(self._writer)
            task_status.started()

    async def _subscriber(self) -> None:
        backoff = self._backoff_min
        while True:
            try:
                async with self._pubsub() as ps:
                    with trio.fail_after(self._command_timeout):
                        await ps.subscribe(CHANNEL)
                    self._subscribed = True
                    backoff = self._backoff_min
                    self._refresh_watched = True  # events may have been missed meanwhile
                    self._tick_now = True         # and Redis may have restarted: check the lease
                    self._wake.set()
                    while True:
                        message = await ps.get_message()
                        if message is None:
                            continue
                        kind = message.get("type")
                        if kind in ("message", "smessage"):
                            self._dispatch(message["data"])
                        elif kind in ("unsubscribe", "sunsubscribe"):
                            raise RuntimeError("the server dropped the control channel")
            except (Exception, trio.TooSlowError) as exc:  # ExceptionGroups of coredis too
                self._note_error("subscribe", exc)
            finally:
                self._subscribed = False
            await trio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self._backoff_max)

    def _pubsub(self) -> Any:
        kwargs = dict(ignore_subscribe_messages=False, retry_policy=NoRetryPolicy(),
                      subscription_timeout=self._command_timeout,
                      max_idle_seconds=max(1.0, self.presence_ttl_s / 3))
        if self._sharded:
            return self._r.sharded_pubsub(**kwargs)
        return self._r.pubsub(**kwargs)

    async def _writer(self) -> None:
        """The one task that writes: joins, local transitions, answers, ticks."""
        interval = self.presence_ttl_s / 3
        backoff = self._backoff_min
        next_tick = trio.current_time()
        while True:
            self._wake = trio.Event()
            try:  # (a hung Redis: each command times out after command_timeout)
                if not self._joined:
                    await self._join()
                if self._tick_now or trio.current_time() >= next_tick:
                    # first: a node that slept past its lease learns it before writing
                    self._tick_now = True
                    await self._tick()
                    self._tick_now = False
                    next_tick = trio.current_time() + interval
                await self._flush()
                while self._answers:
                    await self._store.publish(self._answers[0])
                    self._answers.pop(0)
                if self._refresh_watched:
                    self._refresh_watched = False
                    try:
                        await self._refresh()
                    except BaseException:
                        self._refresh_watched = True
                        raise
                self._writer_ok = True
                backoff = self._backoff_min
            except (Exception, trio.TooSlowError) as exc:
                self._n["failures"] += 1
                self._writer_ok = False
                self._note_error("write", exc)
                if self._joined:
                    self._retire_current()
                await trio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, self._backoff_max)
                continue
            with trio.move_on_at(next_tick):
                await self._wake.wait()

    # -- membership ------------------------------------------------------------------

    def _retire_current(self) -> None:
        """After a fault: the current member's state is unknown; join anew."""
        self._retired.append((self.member, set(self._written)))
        self._joined = False
        self._written = set()
        self._dirty |= self._held

    async def _join(self) -> None:
        """Join as a new member: lease, membership, every held user; then clean up
        retired members (whose users not held any more go offline)."""
        member = new_member_id(self.node_id, os.urandom(4).hex())
        await self._store.join(member)
        if self.member:
            self._n["rejoins"] += 1
            log.log("info", "cluster_control_rejoined", node=self.node_id, member=member)
        self.member = member
        held = set(self._held)
        self._dirty.difference_update(held)
        try:
            await self._write(sorted(held), (), all_states=True)
        except BaseException:  # half joined: retired like any member after a fault
            self._joined = True
            self._retire_current()
            raise
        self._joined = True
        while self._retired:
            old, users = self._retired[-1]
            await self._store.publish_changes(self.member, await self._store.sweep(old, users))
            self._retired.pop()

    async def _flush(self) -> None:
        pending, self._dirty = list(self._dirty), set()
        for i in range(0, len(pending), BATCH * 4):
            batch = pending[i:i + BATCH * 4]
            adds = [u for u in batch if u in self._held and u not in self._written]
            removes = [u for u in batch if u not in self._held and u in self._written]
            try:
                await self._write(adds, removes, all_states=False)
            except BaseException:
                self._dirty.update(pending[i:])
                raise

    async def _write(self, adds: Sequence[str], removes: Sequence[str], *, all_states: bool) -> None:
        """Write under this member and publish what changed (every state: all_states)."""
        changes = await self._store.write(self.member, adds, removes, all_states=all_states)
        self._written.update(adds)
        self._written.difference_update(removes)
        await self._store.publish_changes(self.member, changes)

    async def _tick(self) -> None:
        """Renew the lease (rejoin when it was lost), sweep dead members, read the
        gauge, forget states nobody here watches."""
        if not await self._store.renew(self.member):
            self._note_error("lease", LeaseLost(f"the lease of {self.member} was lost"))
            self._retire_current()
            await self._join()
        retired = {m for m, _ in self._retired}
        for m, alive in sorted((await self._store.members()).items()):
            if alive or m == self.member or m in retired:
                continue
            if await self._store.lock_sweep(m, self.member):
                await self._store.publish_changes(self.member, await self._store.sweep(m))
                await self._store.unlock_sweep(m)
                self._n["swept"] += 1
                log.log("info", "cluster_member_swept", node=self.node_id, member=m)
        self.online_users = await self._store.online_users()
        for user in self._known.users():
            if not self.is_watched(user):
                self._known.forget(user)

    async def _refresh(self) -> None:
        """Re-read every watched user's state (after the subscription was down)."""
        users = sorted(set(self.watched_users()) | set(self._known.users()))
        for user, (online, version) in zip(users, await self._store.states(users)):
            self._apply(user, online, version)

    async def _withdraw(self) -> None:
        """Best effort on clean shutdown: this node's users leave at once."""
        with trio.move_on_after(2.0) as scope:
            scope.shield = True
            try:
                if self.member:
                    changes = await self._store.sweep(self.member, self._written)
                    await self._store.publish_changes(self.member, changes)
            except _ERRORS:
                pass

    def _note_error(self, what: str, exc: BaseException) -> None:
        self._errors.log("warning", "cluster_control_error", key=what, node=self.node_id,
                         error=f"{what}: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_reason(e) for e in exc.exceptions) or repr(exc)
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@contextlib.asynccontextmanager
async def open_control(url: str, node_id: str, presence_ttl_s: float, *,
                       on_presence: Callable[[str, bool], None],
                       is_watched: Callable[[str], bool],
                       watched_users: Callable[[], Iterable[str]],
                       on_disconnect: Callable[[str, str | None], int],
                       cluster: bool = False, connect_timeout: float = 2.0,
                       command_timeout: float = 5.0) -> AsyncIterator[Control]:
    """Run a :class:`Control` for the ``async with`` block, on its own Redis client.
    Does not wait for Redis; on exit this member's users are withdrawn (<= 2 s)."""
    kwargs = dict(connect_timeout=connect_timeout, stream_timeout=command_timeout,
                  retry_policy=NoRetryPolicy(), client_name=f"tidings-control:{node_id}")
    client = (coredis.RedisCluster.from_url(url, **kwargs) if cluster
              else coredis.Redis.from_url(url, **kwargs))
    control = Control(client, node_id=node_id, presence_ttl_s=presence_ttl_s,
                      on_presence=on_presence, is_watched=is_watched,
                      watched_users=watched_users, on_disconnect=on_disconnect,
                      sharded=cluster, command_timeout=command_timeout)
    async with single_errors(), client, trio.open_nursery() as nursery:
        await nursery.start(control.run)
        try:
            yield control
        finally:
            nursery.cancel_scope.cancel()
            await control._withdraw()
