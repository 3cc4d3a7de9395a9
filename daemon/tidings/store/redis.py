"""The redis engine: the store of a multi-node (cluster) deployment.

Implements :mod:`tidings.store.base` on Redis through coredis (which runs under
``trio.run``).  Open it with :func:`open_redis_store`.  The keys, channels and Lua
scripts are in :mod:`tidings.store.redis_lua`.

Every message is stored once, in its recipient's slot.  The history of a conversation
(user, peer) is the merge of ``{peer}:from:user`` and ``{user}:from:peer`` -- two
single-slot reads merged here, newest first.

Appends: ``append`` runs ONE Lua script call for the whole batch on a standalone server
(which also writes the message index), one per recipient on a Redis Cluster (a script
may only touch one slot); either way one round trip, sent by
:mod:`tidings.store.redis_lane` (EVALSHA, NOSCRIPT recovery; ``append_submit`` lets the
hub keep two batches in flight, run in submit order).  For each
message the script atomically increments the recipient's seq, XADDs the inbox entry,
indexes it for history; then it PUBLISHes the recipient's stored messages of the call as
one envelope on the recipient's channel (``redis_lua.decode_envelopes``; so "stored" and
"published" cannot diverge) and trims the inbox to exactly
``max_inbox`` entries (dropping the index entries of what it trims).

Differences from MemoryStore / SqliteStore (documented in docs/cluster.md):

* ``search`` raises :class:`Unsupported` (there is no full-text index in Redis).
* ``DuplicateMessage`` is detected per recipient (msg_ids are unique by construction;
  this is a safety net): a msg_id that only another recipient has is stored.  A batch is
  atomic per recipient, not as a whole: when the connection fails mid-batch some
  recipients' messages may be stored (and published) while others are reported failed
  (a group whose outcome is unknown is reported failed).
* Retention pruning removes, per inbox, the longest *prefix* of messages older than the
  cutoff (oldest first, in bounded batches).  The other stores remove everything up to
  the newest expired message; the two agree whenever ``ts`` does not decrease along an
  inbox (one clock); with several nodes' clocks a message can outlive the retention by
  the clock skew.

Errors: connection refused/lost, timeouts and server errors raise
:class:`tidings.store.StoreUnavailable` (never hang: connect and command timeouts are
set); ``history`` with an unknown ``before`` raises ``UnknownMessage``.
"""

from __future__ import annotations

import contextlib
import heapq
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import coredis
import coredis.exceptions
from coredis.retry import NoRetryPolicy

from tidings.store.base import StoreLimits
from tidings.store.maintenance import prune_periodically
from tidings.store.records import (
    Appended,
    DuplicateMessage,
    NewMessage,
    StoreError,
    StoredMessage,
    StoreUnavailable,
    UnknownMessage,
    Unsupported,
    prune_cutoff_ms,
)
from tidings.store.redis_devices import (
    KEY_TTL_EXTRA_MS, RedisDevices, key_field, parse_original,
)
from tidings.store.redis_lane import Call, Lane
from tidings.store.redis_webhooks import RedisWebhooks
from tidings.store.redis_lua import (
    APPEND_LUA,
    HISTORY_LUA,
    KEY_PREFIX,
    PRUNE_LUA,
    envelope_header,
    key as _k,
    untag,
    user_tag,
)

__all__ = ["RedisStore", "open_redis_store", "single_errors"]

PRUNE_BATCH = 512        # inbox entries examined per prune script call
PRUNE_PIPELINE = 256     # users per pipelined round trip while pruning
CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0




# ------------------------------------------------------------------------ the store

def _unavailable(exc: BaseException, what: str) -> StoreUnavailable:
    reason = str(exc) or type(exc).__name__
    return StoreUnavailable(f"redis store: {what}: {reason}")


_TRANSIENT = (
    coredis.exceptions.RedisError,  # connection, protocol, cluster, response errors
    TimeoutError,
    OSError,
)


def _b2s(v: Any) -> str:
    return v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v)


def _entry_to_message(user: str, entry: Any) -> StoredMessage:
    fields = entry.field_values
    ident = _b2s(entry.identifier)
    return StoredMessage(
        _b2s(fields[b"m"]), int(ident.partition("-")[0]), _b2s(fields[b"f"]), user,
        bytes(fields[b"b"]), int(fields[b"t"]),
    )


class RedisStore(RedisDevices, RedisWebhooks):
    """Async store on Redis (standalone or Redis Cluster).  See the module docstring;
    the device, idempotency key and lookup methods are :mod:`tidings.store.redis_devices`'s,
    the webhook methods :mod:`tidings.store.redis_webhooks`'s.

    Create with :func:`open_redis_store`; all methods are coroutines and may raise
    ``StoreUnavailable``.  Safe to call from many trio tasks at once.
    """

    name = "redis"

    def __init__(self, client: Any, *, limits: StoreLimits, node_id: str,
                 publish: str = "PUBLISH", cluster: bool = False,
                 connect_timeout: float = CONNECT_TIMEOUT_S,
                 command_timeout: float = COMMAND_TIMEOUT_S) -> None:
        self._r = client
        self._limits = limits
        self.max_inbox = limits.max_inbox
        self.key_window_ms = limits.key_window_ms
        self.node_id = node_id
        #: "PUBLISH" (standalone), "SPUBLISH" (Redis Cluster, sharded) or "" (no publish).
        self.publish = publish
        #: Redis Cluster: one append script per recipient (scripts are single-slot).
        self.cluster = cluster
        self._closed = False
        self._lane = Lane(client, cluster=cluster, connect_timeout=connect_timeout,
                          command_timeout=command_timeout)
        self._append_script = self._lane.script(APPEND_LUA)
        self._history = client.register_script(HISTORY_LUA)
        self._prune = client.register_script(PRUNE_LUA)
        self._scripts = (self._history, self._prune,
                         *self._register_device_scripts(client),
                         *self._register_webhook_scripts(client))

    # -- plumbing --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("redis store is closed")

    @contextlib.contextmanager
    def _errors(self, what: str):
        self._check_open()
        try:
            yield
        except StoreError:
            raise
        except _TRANSIENT as exc:
            raise _unavailable(exc, what) from None

    async def load_scripts(self) -> None:
        """Check the connection and load the Lua scripts (done by open_redis_store)."""
        with self._errors("connect"):
            await self._r.ping()
            for script in self._scripts:
                await self._r.script_load(script.script)
            await self._lane.load()

    # -- writes ----------------------------------------------------------------------

    async def append(self, msgs: Sequence[NewMessage]) -> list[Appended]:
        """Store (and publish) ``msgs``; one result per message, in order.

        Atomic per recipient, all recipients in one round trip.  Never raises
        for store failures: a failed recipient group yields ``Appended(None, error)``
        for each of its messages; when the connection broke, a group's outcome is
        unknown and it is reported as failed (it may still have been stored and
        published).  On a closed store every message gets StoreUnavailable."""
        return await (await self.append_submit(msgs))()

    async def append_submit(self, msgs: Sequence[NewMessage]
                            ) -> Callable[[], Awaitable[list[Appended]]]:
        """``append`` in two halves: this one sends the batch (standalone Redis: it is
        queued on the connection when this returns, so batches submitted one after the
        other run in that order) and returns the other, which waits for the results.
        The hub's writer keeps two batches in flight this way."""
        if self._closed or not msgs:
            error = StoreUnavailable("redis store is closed")
            done = [Appended(None, error) for _ in msgs]

            async def closed() -> list[Appended]:
                return done
            return closed
        groups: dict[str, list[int]] = {}
        for i, m in enumerate(msgs):
            groups.setdefault(m.recipient, []).append(i)
        # standalone: one script call for the whole batch; cluster: one per recipient
        calls = [list(groups.items())] if not self.cluster else [[g] for g in groups.items()]
        window = self.key_window_ms
        retention = self._limits.retention_days
        head = [-1 if self.max_inbox is None else max(self.max_inbox, 0), self.publish,
                window, window + KEY_TTL_EXTRA_MS,
                # the message index: written by the script itself on a standalone server
                "x" if self.cluster else (repr(float(retention)) if retention else "")]
        lane_calls: list[Call] = []
        orders: list[list[list[int]]] = []
        publish = self.publish
        for call in calls:
            args: list[Any] = list(head)
            order: list[list[int]] = []
            for user, idx in call:
                args += [user_tag(user), len(idx)]
                for i in idx:
                    m = msgs[i]
                    header = envelope_header(m) if publish else b""
                    kf = "" if m.key is None else key_field(m.sender, m.key)
                    args += [m.msg_id, m.sender, m.body, m.ts, header, kf]
                order.append(idx)
            lane_calls.append(Call(self._append_script, [_k(call[0][0], "u")], args))
            orders.append(order)
        if self.cluster:  # the index lives in other slots: plain commands, same round trip
            index = self._index_writes([(m.msg_id, m.recipient) for m in msgs], retention)
            lane_calls += [c for ix in index
                           for c in ([Call("HSET", ix.keys, ix.args[1:])]
                                     + ([Call("PEXPIREAT", ix.keys, [ix.args[0]])]
                                        if ix.args[0] != "" else []))]
        pending = await self._lane.submit(lane_calls)

        async def results() -> list[Appended]:
            return self._appended(msgs, orders, await pending.replies())
        return results

    def _appended(self, msgs: Sequence[NewMessage], orders: list[list[list[int]]],
                  replies: list[Any]) -> list[Appended]:
        """The results of the append calls ``orders`` (per call, its groups' message
        indexes) from their replies (APPEND_LUA's: per group last seq, receivers, the
        refused ones)."""
        results: list[Appended | None] = [None] * len(msgs)
        publish = self.publish
        for order, reply in zip(orders, replies):
            if isinstance(reply, BaseException):  # the call's outcome is unknown
                err = _unavailable(reply, "append")
                for idx in order:
                    for i in idx:
                        results[i] = Appended(None, err)
                continue
            at = 0
            for idx in order:
                seq, receivers, n_refused = reply[at], reply[at + 1], reply[at + 2]
                at += 3
                refused: dict[int, tuple[int, Any]] = {}
                for _ in range(n_refused):
                    refused[reply[at] - 1] = (reply[at + 1], reply[at + 2])
                    at += 3
                delivered = receivers if publish else None
                for j, i in enumerate(idx):
                    if refused and j in refused:
                        code, value = refused[j]
                        if code == -2:  # a live key: its original
                            original = parse_original(value)
                            results[i] = Appended(original.seq, original=original)
                        else:
                            results[i] = Appended(None, DuplicateMessage(
                                f"duplicate msg_id {msgs[i].msg_id!r} for {msgs[i].recipient!r}"))
                        continue
                    seq += 1
                    results[i] = Appended(seq, None, delivered)
        return [r if r is not None else Appended(None, StoreUnavailable("lost"))
                for r in results]

    # -- reads -----------------------------------------------------------------------

    async def read_inbox(self, user: str, after_seq: int, limit: int) -> list[StoredMessage]:
        """Up to ``limit`` messages of ``user``'s inbox with seq > after_seq, ascending."""
        if limit < 0:
            raise ValueError("limit and offset must be >= 0")
        self._check_open()
        if limit == 0:
            return []
        start = f"{after_seq + 1}-0" if after_seq >= 0 else "-"
        with self._errors("read_inbox"):
            entries = await self._r.xrange(_k(user, "inbox"), start, "+", count=limit)
        return [_entry_to_message(user, e) for e in entries]

    async def history(self, user: str, peer: str, before_msg_id: str | None,
                      limit: int) -> tuple[list[StoredMessage], bool]:
        """Messages between user and peer, newest first, msg_id < before_msg_id; plus
        whether older ones exist.  Unknown before_msg_id -> UnknownMessage."""
        if limit < 0:
            raise ValueError("limit and offset must be >= 0")
        sides = [(peer, user)] if user == peer else [(peer, user), (user, peer)]
        n = limit + 1
        found = False
        runs: list[list[StoredMessage]] = []
        with self._errors("history"):
            for recipient, sender in sides:
                keys = [_k(recipient, "from:" + sender), _k(recipient, "ids"),
                        _k(recipient, "inbox")]
                reply = await self._history(keys, [before_msg_id or "", n])
                found = found or int(reply[0]) == 1
                run = []
                for j in range(1, len(reply), 5):
                    run.append(StoredMessage(_b2s(reply[j]), int(reply[j + 1]),
                                             _b2s(reply[j + 2]), recipient,
                                             bytes(reply[j + 3]), int(reply[j + 4])))
                runs.append(run)
        if before_msg_id is not None and not found:
            raise UnknownMessage(f"unknown message {before_msg_id!r}")
        merged = list(heapq.merge(*runs, key=lambda m: m.msg_id, reverse=True))
        return merged[:limit], len(merged) > limit

    async def search(self, user: str, query: str, limit: int,
                     offset: int = 0) -> tuple[list[StoredMessage], bool]:
        raise Unsupported("search is not available with the redis store")

    async def last_seen(self, users: Sequence[str]) -> dict[str, int | None]:
        self._check_open()
        if not users:
            return {}
        with self._errors("last_seen"):
            async with self._r.pipeline(transaction=False) as pipe:
                requests = [pipe.hget(_k(u, "u"), "seen") for u in users]
            values = [await r for r in requests]
        return {u: (int(v) if v is not None else None) for u, v in zip(users, values)}

    # -- maintenance -----------------------------------------------------------------

    async def users(self) -> AsyncIterator[str]:
        """Every user with state in Redis (SCAN over all primaries; unordered)."""
        pattern = KEY_PREFIX + "{*}:u"
        async for key in self._r.scan_iter(match=pattern, count=1000, type_="hash"):
            k = _b2s(key)
            yield untag(k[len(KEY_PREFIX) + 1: -len("}:u")])

    async def prune(self, now_ms: int, retention_days: float | None) -> int:
        """Delete, per recipient, the oldest messages older than the retention and all
        but the newest ``max_inbox`` (always an inbox prefix; see the module docstring
        for the retention difference).  Bounded work per Redis call.  Returns the count."""
        cutoff = prune_cutoff_ms(now_ms, retention_days)
        cutoff_arg = "" if cutoff is None else str(cutoff)
        keep_arg = "" if self.max_inbox is None else str(self.max_inbox)
        deleted = 0
        with self._errors("prune"):
            pending: list[str] = []
            async for user in self.users():
                pending.append(user)
                if len(pending) >= PRUNE_PIPELINE:
                    deleted += await self._prune_users(pending, cutoff_arg, keep_arg)
                    pending = []
            if pending:
                deleted += await self._prune_users(pending, cutoff_arg, keep_arg)
            await self.forget_keys(now_ms)
        return deleted

    async def _prune_users(self, users: list[str], cutoff: str, keep: str) -> int:
        deleted = 0
        while users:
            async with self._r.pipeline(transaction=False) as pipe:
                requests = [
                    (u, self._prune([_k(u, "u"), _k(u, "inbox"), _k(u, "ids")],
                                    [_k(u, "from:"), cutoff, keep, PRUNE_BATCH], client=pipe))
                    for u in users
                ]
            again = []
            for user, request in requests:
                n, more = await request
                deleted += int(n)
                if int(more):
                    again.append(user)
            users = again
        return deleted

    def _entry(self, user: str, entry: Any) -> StoredMessage:
        return _entry_to_message(user, entry)

    async def run(self, *, task_status: Any = None) -> None:
        """Prune by retention every ``prune_interval_s`` until cancelled (``max_inbox``
        is applied by every append)."""
        if task_status is not None:
            task_status.started()
        await prune_periodically(self, self._limits)

    async def aclose(self) -> None:
        """Mark closed and close the lane's connection (the client itself is closed by
        open_redis_store's exit)."""
        self._closed = True
        await self._lane.aclose()


def _client(url: str, *, cluster: bool, connect_timeout: float, command_timeout: float,
            client_name: str) -> Any:
    kwargs = dict(connect_timeout=connect_timeout, stream_timeout=command_timeout,
                  retry_policy=NoRetryPolicy(), client_name=client_name)
    if cluster:
        return coredis.RedisCluster.from_url(url, **kwargs)
    return coredis.Redis.from_url(url, **kwargs)


@contextlib.asynccontextmanager
async def open_redis_store(url: str, *, limits: StoreLimits, node_id: str,
                           cluster: bool = False, publish: bool = True,
                           connect_timeout: float = CONNECT_TIMEOUT_S,
                           command_timeout: float = COMMAND_TIMEOUT_S,
                           ) -> AsyncIterator[RedisStore]:
    """Connect to Redis at ``url`` and yield a :class:`RedisStore`.

    ``cluster=True`` uses a Redis Cluster client and sharded publish (SPUBLISH);
    otherwise a standalone server and PUBLISH.  ``publish=False`` stores without
    publishing (single node with a Redis store).  Raises ``StoreUnavailable`` if Redis
    cannot be reached now; later outages surface as ``StoreUnavailable`` per call and
    the client reconnects by itself.  Writes are never retried blindly (a retried
    append could be stored twice)."""
    try:
        client = _client(url, cluster=cluster, connect_timeout=connect_timeout,
                         command_timeout=command_timeout, client_name=f"tidings-store:{node_id}")
    except (ValueError, *_TRANSIENT) as exc:
        raise _unavailable(exc, f"bad url {url!r}") from None
    pub = ("SPUBLISH" if cluster else "PUBLISH") if publish else ""
    async with single_errors(), contextlib.AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(client)
            store = RedisStore(client, limits=limits, node_id=node_id, publish=pub,
                               cluster=cluster, connect_timeout=connect_timeout,
                               command_timeout=command_timeout)
            await store.load_scripts()
        except _TRANSIENT as exc:
            raise _unavailable(exc, "connect") from None
        stack.push_async_callback(store.aclose)
        yield store


@contextlib.asynccontextmanager
async def single_errors() -> AsyncIterator[None]:
    """Unwrap an exception group holding exactly one exception.

    coredis' connection pool runs a task group: anything raised inside ``async with
    client`` leaves it wrapped in an ExceptionGroup.  Callers of ``open_redis_store`` /
    ``open_cluster`` see the exception they raised (or StoreUnavailable) instead."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out
