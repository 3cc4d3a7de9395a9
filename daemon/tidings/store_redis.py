"""The Redis store: the message store of a multi-node (cluster) deployment.  Async (trio).

Same semantics as the synchronous :class:`tidings.store.Store` interface (same method
names and return values), but every method is ``async def``: it talks to Redis through
coredis (which runs under ``trio.run``).  Open it with :func:`open_redis_store`.

Data model (``T`` = the user id escaped by :func:`user_tag`, so the ``{T}`` hash tag
keeps all of one user's keys in one Redis Cluster slot)::

    tidings:{T}:u            hash    seq (last seq ever assigned), cursor, seen (last_seen ms)
    tidings:{T}:inbox        stream  one entry per stored message, id "<seq>-0",
                                     fields m=msg_id f=sender b=body t=ts
    tidings:{T}:ids          hash    msg_id -> seq (history lookups, duplicate check)
    tidings:{T}:from:<S>     zset    msg_ids of the messages S sent to T (all scores 0:
                                     lexicographic order = msg_id order)
    tidings:{T}:ch           pub/sub channel of T (see tidings.cluster)

Every message is stored once, in its recipient's slot.  The history of a conversation
(user, peer) is the merge of ``{peer}:from:user`` and ``{user}:from:peer`` -- two
single-slot reads merged here, newest first.

Appends: ``append_many`` groups a batch by recipient and runs ONE Lua script per
recipient (a script may only touch one slot), all pipelined in one round trip.  For each
message the script atomically increments the recipient's seq, XADDs the inbox entry,
indexes it for history, PUBLISHes ``b"<seq>\\n[msg_id, sender, ts]\\n<body>"`` on the
recipient's channel (so "stored" and "published" cannot diverge) and trims the inbox to exactly
``max_inbox`` entries (dropping the index entries of what it trims).

Differences from MemoryStore / SqliteStore (documented in docs/cluster.md):

* ``search`` raises :class:`Unsupported` (there is no full-text index in Redis).
* ``DuplicateMessage`` is detected per recipient (msg_ids are unique by construction;
  this is a safety net), and a batch is atomic per recipient, not as a whole: when the
  connection fails mid-batch some recipients' messages may be stored (and published)
  while the call raises :class:`StoreUnavailable`.  :meth:`RedisStore.append_routed`
  reports the outcome per message.
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
from collections.abc import AsyncIterator, Sequence
from typing import Any

import attrs
import coredis
import orjson
import coredis.exceptions
from coredis.retry import NoRetryPolicy

from tidings.store import (
    DuplicateMessage,
    InboxState,
    NewMessage,
    StoreError,
    StoredMessage,
    StoreUnavailable,
    UnknownMessage,
    Unsupported,
    prune_cutoff_ms,
)

__all__ = [
    "Appended",
    "RedisStore",
    "Unsupported",
    "channel_for",
    "decode_envelope",
    "envelope_header",
    "open_redis_store",
    "single_errors",
    "user_from_channel",
    "user_tag",
]

KEY_PREFIX = "tidings:"
PRUNE_BATCH = 512        # inbox entries examined per prune script call
PRUNE_PIPELINE = 256     # users per pipelined round trip while pruning
CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0




# ------------------------------------------------------------------ keys & channels

def user_tag(user: str) -> str:
    """The user id as it appears inside ``{...}`` in keys and channels.

    ``%``, ``{`` and ``}`` are percent-escaped so the hash tag is always exactly the
    whole (non-empty) user id, whatever characters it contains."""
    return user.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def untag(tag: str) -> str:
    return tag.replace("%7D", "}").replace("%7B", "{").replace("%25", "%")


def _k(user: str, suffix: str) -> str:
    return f"{KEY_PREFIX}{{{user_tag(user)}}}:{suffix}"


def channel_for(user: str) -> str:
    """The pub/sub channel carrying ``user``'s messages: ``tidings:{<user>}:ch``."""
    return _k(user, "ch")


_CH_HEAD = KEY_PREFIX + "{"
_CH_TAIL = "}:ch"


def user_from_channel(channel: bytes | str) -> str | None:
    """Inverse of :func:`channel_for` (None for a channel that is not a user channel)."""
    if isinstance(channel, bytes):
        channel = channel.decode("utf-8", "surrogateescape")
    if not (channel.startswith(_CH_HEAD) and channel.endswith(_CH_TAIL)):
        return None
    return untag(channel[len(_CH_HEAD):-len(_CH_TAIL)])


def envelope_header(msg: NewMessage) -> bytes:
    """The middle line of a published envelope: ``[msg_id, sender, ts]`` as JSON
    (never contains a raw newline)."""
    return orjson.dumps([msg.msg_id, msg.sender, msg.ts])


def decode_envelope(user: str, data: bytes) -> StoredMessage:
    """Parse a published envelope ``b"<seq>\n[msg_id, sender, ts]\n<body>"`` (built by
    the append script) into the StoredMessage of ``user``'s inbox.  The body is the
    stored form, verbatim: the receiving node encodes the frame (JSON or MessagePack)."""
    head, sep1, rest = data.partition(b"\n")
    header, sep2, body = rest.partition(b"\n")
    if not (sep1 and sep2):
        raise ValueError("not a tidings envelope")
    msg_id, sender, ts = orjson.loads(header)
    return StoredMessage(msg_id, int(head), sender, user, bytes(body), int(ts))


# --------------------------------------------------------------------- Lua scripts

# KEYS: only for routing (Redis Cluster: the `u` key of the single recipient).
# ARGV: max_inbox (0 = no trim), publish command ("" = none), then one group per
# recipient: tag, count, and 5 args per message: msg_id, sender, body, ts, header.
# Every key is derived from the tag, so a standalone server runs a whole batch of many
# recipients in one call; on a cluster each call carries one recipient (one slot).
# Returns {seq1, receivers1, seq2, receivers2, ...} in argument order, or the error
# "DUPLICATE <msg_id>" (then nothing was stored).
APPEND_LUA = r"""
local max_inbox, pub = tonumber(ARGV[1]), ARGV[2]
local groups = {}
local seen = {}
local i = 3
while i <= #ARGV do
  local tag, n = ARGV[i], tonumber(ARGV[i + 1])
  local base = 'tidings:{' .. tag .. '}:'
  local g = {base = base, first = i + 2, n = n}
  groups[#groups + 1] = g
  for k = 0, n - 1 do
    local id = ARGV[g.first + k * 5]
    local key = base .. '\0' .. id
    if seen[key] or redis.call('HEXISTS', base .. 'ids', id) == 1 then
      return redis.error_reply('DUPLICATE ' .. id)
    end
    seen[key] = true
  end
  i = g.first + n * 5
end
local out = {}
for _, g in ipairs(groups) do
  local base = g.base
  local u, inbox, ids, from, channel =
    base .. 'u', base .. 'inbox', base .. 'ids', base .. 'from:', base .. 'ch'
  for k = 0, g.n - 1 do
    local b = g.first + k * 5
    local id, sender, body, ts = ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3]
    local seq = redis.call('HINCRBY', u, 'seq', 1)
    local s = string.format('%d', seq)
    redis.call('XADD', inbox, s .. '-0', 'm', id, 'f', sender, 'b', body, 't', ts)
    redis.call('HSET', ids, id, s)
    redis.call('ZADD', from .. sender, 0, id)
    local receivers = 0
    if pub ~= '' then
      receivers = redis.call(pub, channel, s .. '\n' .. ARGV[b + 4] .. '\n' .. body)
    end
    out[#out + 1] = seq
    out[#out + 1] = receivers
  end
  if max_inbox > 0 then
    local excess = redis.call('XLEN', inbox) - max_inbox
    if excess > 0 then
      local old = redis.call('XRANGE', inbox, '-', '+', 'COUNT', excess)
      local last
      for _, e in ipairs(old) do
        local f = e[2]
        local id, sender
        for j = 1, #f, 2 do
          if f[j] == 'm' then id = f[j + 1] elseif f[j] == 'f' then sender = f[j + 1] end
        end
        redis.call('HDEL', ids, id)
        redis.call('ZREM', from .. sender, id)
        last = e[1]
      end
      if last then
        local lseq = tonumber(string.match(last, '^(%d+)'))
        redis.call('XTRIM', inbox, 'MINID', string.format('%d', lseq + 1))
      end
    end
  end
end
return out
"""

# KEYS: u, inbox.  Returns {first_seq or -1, last_seq, cursor}.
STATE_LUA = r"""
local v = redis.call('HMGET', KEYS[1], 'seq', 'cursor')
local last = tonumber(v[1]) or 0
local cursor = tonumber(v[2]) or 0
local first = -1
local e = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if #e > 0 then first = tonumber(string.match(e[1][1], '^(%d+)')) end
return {first, last, cursor}
"""

# KEYS: u.  ARGV: seq.  cursor = max(cursor, min(seq, last_seq)); unknown user -> 0.
CURSOR_LUA = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local v = redis.call('HMGET', KEYS[1], 'seq', 'cursor')
local last = tonumber(v[1]) or 0
local cursor = tonumber(v[2]) or 0
local want = math.min(tonumber(ARGV[1]), last)
if want > cursor then
  cursor = want
  redis.call('HSET', KEYS[1], 'cursor', string.format('%d', cursor))
end
return cursor
"""

# KEYS: from-zset, ids, inbox.  ARGV: before ("" = newest), n.
# Returns {found(0/1), id, seq, sender, body, ts, id, seq, ...}: the n newest messages
# of the zset with msg_id < before; found says whether before is in this zset.
HISTORY_LUA = r"""
local zset, ids, inbox = KEYS[1], KEYS[2], KEYS[3]
local before, n = ARGV[1], tonumber(ARGV[2])
local found = 1
local max = '+'
if before ~= '' then
  max = '(' .. before
  if not redis.call('ZSCORE', zset, before) then found = 0 end
end
local out = {found}
local page = redis.call('ZREVRANGEBYLEX', zset, max, '-', 'LIMIT', 0, n)
for _, id in ipairs(page) do
  local seq = redis.call('HGET', ids, id)
  if seq then
    local e = redis.call('XRANGE', inbox, seq .. '-0', seq .. '-0')
    if #e > 0 then
      local f = e[1][2]
      local sender, body, ts
      for j = 1, #f, 2 do
        local k = f[j]
        if k == 'f' then sender = f[j + 1]
        elseif k == 'b' then body = f[j + 1]
        elseif k == 't' then ts = f[j + 1] end
      end
      out[#out + 1] = id
      out[#out + 1] = seq
      out[#out + 1] = sender
      out[#out + 1] = body
      out[#out + 1] = ts
    end
  end
end
return out
"""

# KEYS: u, inbox, ids.  ARGV: from_prefix, cutoff ("" = none), max_inbox ("" = none),
# batch.  Deletes the inbox prefix of entries with seq <= last_seq - max_inbox or
# ts < cutoff, at most `batch` entries; returns {deleted, more(0/1)}.
PRUNE_LUA = r"""
local u, inbox, ids = KEYS[1], KEYS[2], KEYS[3]
local from = ARGV[1]
local cutoff = tonumber(ARGV[2])
local batch = tonumber(ARGV[4])
local cut = 0
if ARGV[3] ~= '' then
  cut = (tonumber(redis.call('HGET', u, 'seq')) or 0) - math.max(tonumber(ARGV[3]), 0)
end
local entries = redis.call('XRANGE', inbox, '-', '+', 'COUNT', batch)
local deleted, last = 0, nil
for _, e in ipairs(entries) do
  local seq = tonumber(string.match(e[1], '^(%d+)'))
  local f = e[2]
  local id, sender, ts
  for j = 1, #f, 2 do
    local k = f[j]
    if k == 'm' then id = f[j + 1]
    elseif k == 'f' then sender = f[j + 1]
    elseif k == 't' then ts = tonumber(f[j + 1]) end
  end
  if seq <= cut or (cutoff and ts < cutoff) then
    redis.call('HDEL', ids, id)
    redis.call('ZREM', from .. sender, id)
    deleted = deleted + 1
    last = seq
  else
    break
  end
end
if last then
  redis.call('XTRIM', inbox, 'MINID', string.format('%d', last + 1))
end
local more = 0
if deleted == batch then more = 1 end
return {deleted, more}
"""


# ------------------------------------------------------------------------ the store

@attrs.frozen
class Appended:
    """Outcome of one message of :meth:`RedisStore.append_routed`: its inbox seq and
    the number of subscribers (Tidings nodes) its publish reached; or ``error``."""
    seq: int | None
    receivers: int
    error: StoreError | None = None


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


class RedisStore:
    """Async store on Redis (standalone or Redis Cluster).  See the module docstring.

    Create with :func:`open_redis_store`; all methods are coroutines and may raise
    ``StoreUnavailable``.  Safe to call from many trio tasks at once.
    """

    def __init__(self, client: Any, *, max_inbox: int | None, node_id: str,
                 publish: str = "PUBLISH", cluster: bool = False) -> None:
        self._r = client
        self.max_inbox = max_inbox
        self.node_id = node_id
        #: "PUBLISH" (standalone), "SPUBLISH" (Redis Cluster, sharded) or "" (no publish).
        self.publish = publish
        #: Redis Cluster: one append script per recipient (scripts are single-slot).
        self.cluster = cluster
        self._closed = False
        self._append = client.register_script(APPEND_LUA)
        self._state = client.register_script(STATE_LUA)
        self._cursor = client.register_script(CURSOR_LUA)
        self._history = client.register_script(HISTORY_LUA)
        self._prune = client.register_script(PRUNE_LUA)
        self._scripts = (self._append, self._state, self._cursor, self._history, self._prune)

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
        except coredis.exceptions.ResponseError as exc:
            if str(exc).startswith("DUPLICATE"):
                raise DuplicateMessage(f"duplicate msg_id in append_many: {exc}") from None
            raise _unavailable(exc, what) from None
        except _TRANSIENT as exc:
            raise _unavailable(exc, what) from None

    async def load_scripts(self) -> None:
        """Check the connection and load the Lua scripts (done by open_redis_store)."""
        with self._errors("connect"):
            await self._r.ping()
            for script in self._scripts:
                await self._r.script_load(script.script)

    # -- writes ----------------------------------------------------------------------

    async def append_routed(self, msgs: Sequence[NewMessage]) -> list[Appended]:
        """Store (and publish) ``msgs``; one result per message, in order.

        Atomic per recipient (one script each), all recipients pipelined in one round
        trip.  A failed recipient group yields ``Appended(None, 0, error)`` for each of
        its messages; when the connection broke, a group's outcome is unknown and it is
        reported as failed (it may still have been stored and published)."""
        self._check_open()
        if not msgs:
            return []
        groups: dict[str, list[int]] = {}
        for i, m in enumerate(msgs):
            groups.setdefault(m.recipient, []).append(i)
        # standalone: one script call for the whole batch; cluster: one per recipient
        calls = [list(groups.items())] if not self.cluster else [[g] for g in groups.items()]
        results: list[Appended | None] = [None] * len(msgs)
        head = [max(self.max_inbox or 0, 0), self.publish]
        requests = []
        try:
            async with self._r.pipeline(transaction=False, raise_on_error=False) as pipe:
                for call in calls:
                    args: list[Any] = list(head)
                    order: list[int] = []
                    for user, idx in call:
                        args += [user_tag(user), len(idx)]
                        for i in idx:
                            m = msgs[i]
                            header = envelope_header(m) if self.publish else b""
                            args += [m.msg_id, m.sender, m.body, m.ts, header]
                        order += idx
                    keys = [_k(call[0][0], "u")]
                    requests.append((order, self._append(keys, args, client=pipe)))
        except _TRANSIENT as exc:
            err = _unavailable(exc, "append")
            return [Appended(None, 0, err) for _ in msgs]
        for idx, request in requests:
            try:
                reply = await request
            except coredis.exceptions.ResponseError as exc:
                err: StoreError = (DuplicateMessage(f"duplicate msg_id: {exc}")
                                   if str(exc).startswith("DUPLICATE")
                                   else _unavailable(exc, "append"))
                for i in idx:
                    results[i] = Appended(None, 0, err)
                continue
            except (*_TRANSIENT, RuntimeError) as exc:  # RuntimeError: never executed
                err = _unavailable(exc, "append")
                for i in idx:
                    results[i] = Appended(None, 0, err)
                continue
            for j, i in enumerate(idx):
                results[i] = Appended(int(reply[2 * j]), int(reply[2 * j + 1]))
        return [r if r is not None else Appended(None, 0, StoreUnavailable("lost"))
                for r in results]

    async def append_many(self, msgs: Sequence[NewMessage]) -> list[int]:
        """Store all of ``msgs``; return each one's new inbox seq (the interface method).

        Raises the first error if any message failed (see :meth:`append_routed` for
        per-message outcomes: a failure here does not mean nothing was stored)."""
        results = await self.append_routed(msgs)
        for r in results:
            if r.error is not None:
                raise r.error
        return [r.seq for r in results]  # type: ignore[misc]

    async def set_cursor(self, user: str, seq: int) -> int:
        """cursor = max(old, min(seq, last_seq)); returns the new cursor."""
        with self._errors("set_cursor"):
            return int(await self._cursor([_k(user, "u")], [int(seq)]))

    async def set_last_seen(self, user: str, ts_ms: int) -> None:
        with self._errors("set_last_seen"):
            await self._r.hset(_k(user, "u"), {"seen": int(ts_ms)})

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

    async def inbox_state(self, user: str) -> InboxState:
        with self._errors("inbox_state"):
            first, last, cursor = await self._state([_k(user, "u"), _k(user, "inbox")], [])
        first, last, cursor = int(first), int(last), int(cursor)
        return InboxState(first if first >= 0 else last + 1, last, cursor)

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

    async def prune(self, now_ms: int, retention_days: float | None,
                    max_inbox: int | None) -> int:
        """Delete, per recipient, the oldest messages older than the retention and all
        but the newest ``max_inbox`` (always an inbox prefix; see the module docstring
        for the retention difference).  Bounded work per Redis call.  Returns the count."""
        cutoff = prune_cutoff_ms(now_ms, retention_days)
        cutoff_arg = "" if cutoff is None else str(cutoff)
        keep_arg = "" if max_inbox is None else str(max_inbox)
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

    async def aclose(self) -> None:
        """Mark closed (the client itself is closed by open_redis_store's exit)."""
        self._closed = True


def _client(url: str, *, cluster: bool, connect_timeout: float, command_timeout: float,
            client_name: str) -> Any:
    kwargs = dict(connect_timeout=connect_timeout, stream_timeout=command_timeout,
                  retry_policy=NoRetryPolicy(), client_name=client_name)
    if cluster:
        return coredis.RedisCluster.from_url(url, **kwargs)
    return coredis.Redis.from_url(url, **kwargs)


@contextlib.asynccontextmanager
async def open_redis_store(url: str, *, max_inbox: int | None, node_id: str,
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
            store = RedisStore(client, max_inbox=max_inbox, node_id=node_id, publish=pub,
                               cluster=cluster)
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
