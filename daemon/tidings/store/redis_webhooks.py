"""The redis engine's webhook keys: outbox stream, sender lease, presence per node, checks.

:class:`RedisWebhooks` is a mixin of :class:`tidings.store.redis.RedisStore`; the contract
of each method is in :mod:`tidings.store.base`.  Every key shares the hash tag
``{webhooks}``, so they live in one Redis Cluster slot and one Lua script may touch them
all (a script that also touched a user's keys could not run on a cluster)::

    tidings:{webhooks}:outbox      stream  one entry per event: i=id k=type t=ts u=user
                                           (undelivered also m=msg_id f=sender s=seq);
                                           the entry id is the event's outbox position
    tidings:{webhooks}:retry       hash    position -> "<attempts>:<due_ms>"
    tidings:{webhooks}:lease       string  the node that sends (PX = the lease's ttl)
    tidings:{webhooks}:nodes       zset    node -> expires_ms (its presence is alive until)
    tidings:{webhooks}:on:<node>   set     users with a connection on that node
    tidings:{webhooks}:online      hash    user -> how many nodes have it (absent: 0)
    tidings:{webhooks}:due         zset    undelivered checks, [user, seq, msg_id, sender]
                                           as JSON, scored by due_ms

Why a lease and not a consumer group: events must keep their order per user, and a
consumer group hands consecutive entries to different consumers, so two nodes could send
one user's events out of order.  One node at a time holds the lease and sends
everything; when it dies, another takes the lease within its ttl and reads the outbox
from the start, so what the dead node had not finished is sent again (at least once).
A node counts a user once in its set, whatever its local connections; the ``online``
hash counts nodes, so a user on two nodes is online once.  ``presence_set`` and
``presence_reap`` change a set, the count and the outbox in one script: an event is
added exactly when a count goes 0 -> 1 or 1 -> 0.  Event ids made inside a script are
the caller's random prefix plus ``.<n>``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import orjson
from coredis.tokens import PureToken

from tidings.store.records import (
    OutboxEntry, UndeliveredCheck, WebhookEvent, check_page, new_event_id,
)

__all__ = ["RedisWebhooks", "WEBHOOK_KEY_PREFIX"]

WEBHOOK_KEY_PREFIX = "tidings:{webhooks}:"
OUTBOX = WEBHOOK_KEY_PREFIX + "outbox"
RETRY = WEBHOOK_KEY_PREFIX + "retry"
LEASE = WEBHOOK_KEY_PREFIX + "lease"
NODES = WEBHOOK_KEY_PREFIX + "nodes"
DUE = WEBHOOK_KEY_PREFIX + "due"

# Shared by the presence scripts: move a user in or out of a node's set and keep the
# count of nodes; an event when it goes 0 -> 1 or 1 -> 0 and its type is wanted.
_PRESENCE_HEAD = r"""
local base = 'tidings:{webhooks}:'
local nodes, counts, outbox = base .. 'nodes', base .. 'online', base .. 'outbox'
local n_events, offline = 0, 0
local function event(kind, user, now, prefix, types)
  if string.find(',' .. types .. ',', ',' .. kind .. ',', 1, true) then
    n_events = n_events + 1
    redis.call('XADD', outbox, '*', 'i', prefix .. '.' .. n_events, 'k', kind, 't', now,
               'u', user)
  end
end
local function move(set, user, on, now, prefix, types)
  if on then
    if redis.call('SADD', set, user) == 1 and redis.call('HINCRBY', counts, user, 1) == 1 then
      event('online', user, now, prefix, types)
    end
  elseif redis.call('SREM', set, user) == 1 then
    local c = redis.call('HINCRBY', counts, user, -1)
    if c <= 0 then
      redis.call('HDEL', counts, user)
      if c == 0 then
        offline = offline + 1
        event('offline', user, now, prefix, types)
      end
    end
  end
end
"""

# KEYS: nodes (routing).  ARGV: node, now_ms, expires_ms, id prefix, full (0/1), types
# ("online,offline"), count of online users, online users..., offline users...
# Returns 1 if the node was alive before, else 0.
PRESENCE_SET_LUA = _PRESENCE_HEAD + r"""
local node, now, prefix, types = ARGV[1], ARGV[2], ARGV[4], ARGV[6]
local set = base .. 'on:' .. node
local score = redis.call('ZSCORE', nodes, node)
local known = 0
if score and tonumber(score) >= tonumber(now) then known = 1 end
redis.call('ZADD', nodes, ARGV[3], node)
local n_on = tonumber(ARGV[7])
local want = {}
for i = 8, 7 + n_on do
  want[ARGV[i]] = true
  move(set, ARGV[i], true, now, prefix, types)
end
if ARGV[5] == '1' then
  local members = redis.call('SMEMBERS', set)
  table.sort(members)
  for _, user in ipairs(members) do
    if not want[user] then move(set, user, false, now, prefix, types) end
  end
else
  for i = 8 + n_on, #ARGV do move(set, ARGV[i], false, now, prefix, types) end
end
return known
"""

# KEYS: nodes (routing).  ARGV: now_ms, id prefix, types, node to reap anyway ("" none).
# Removes nodes whose expiry passed (at most 64 per call) and their users; returns
# {users gone offline, nodes reaped}.
PRESENCE_REAP_LUA = _PRESENCE_HEAD + r"""
local now, prefix, types = ARGV[1], ARGV[2], ARGV[3]
local dead = redis.call('ZRANGEBYSCORE', nodes, '-inf', '(' .. now, 'LIMIT', 0, 64)
if ARGV[4] ~= '' then dead[#dead + 1] = ARGV[4] end
local reaped = 0
for _, node in ipairs(dead) do
  local set = base .. 'on:' .. node
  local members = redis.call('SMEMBERS', set)
  table.sort(members)
  for _, user in ipairs(members) do move(set, user, false, now, prefix, types) end
  redis.call('DEL', set)
  reaped = reaped + redis.call('ZREM', nodes, node)
end
return {offline, reaped}
"""

# KEYS: lease.  ARGV: owner, ttl_ms.  1 if owner holds the lease now (taken or renewed).
LEASE_LUA = r"""
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: outbox, retry.  ARGV: position, "<attempts>:<due_ms>".  Only for a live entry.
RETRY_LUA = r"""
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) > 0 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
return 0
"""

# KEYS: due, outbox.  ARGV: per check: member, field count n (0: acked), then n
# field/value args of its event.  Removes each check; adds its event only if this call
# removed it.  Returns the number of events added.
SETTLE_LUA = r"""
local added, i = 0, 1
while i <= #ARGV do
  local member, n = ARGV[i], tonumber(ARGV[i + 1])
  local removed = redis.call('ZREM', KEYS[1], member)
  if removed == 1 and n > 0 then
    redis.call('XADD', KEYS[2], '*', unpack(ARGV, i + 2, i + 1 + n))
    added = added + 1
  end
  i = i + 2 + n
end
return added
"""


def event_fields(e: WebhookEvent) -> dict[str, Any]:
    fields: dict[str, Any] = {"i": e.id, "k": e.type, "t": e.ts, "u": e.user}
    if e.msg_id is not None:
        fields.update(m=e.msg_id, f=e.sender or "", s=e.seq or 0)
    return fields


def _s(v: Any) -> str:
    return v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v)


def _event(fields: dict[bytes, Any]) -> WebhookEvent:
    get = fields.get
    msg_id = get(b"m")
    return WebhookEvent(_s(fields[b"i"]), _s(fields[b"k"]), int(fields[b"t"]), _s(fields[b"u"]),
                        None if msg_id is None else _s(msg_id),
                        None if msg_id is None else _s(get(b"f", b"")),
                        None if msg_id is None else int(get(b"s", 0)))


def _member(check: UndeliveredCheck) -> bytes:
    return orjson.dumps([check.user, check.seq, check.msg_id, check.sender])


class RedisWebhooks:
    """The webhook half of :class:`~tidings.store.redis.RedisStore` (see the module
    docstring).  Errors become StoreUnavailable through the store's ``_errors``."""

    _r: Any
    _errors: Any

    def _register_webhook_scripts(self, client: Any) -> tuple[Any, ...]:
        self._presence_set = client.register_script(PRESENCE_SET_LUA)
        self._presence_reap = client.register_script(PRESENCE_REAP_LUA)
        self._lease = client.register_script(LEASE_LUA)
        self._retry = client.register_script(RETRY_LUA)
        self._settle = client.register_script(SETTLE_LUA)
        return (self._presence_set, self._presence_reap, self._lease, self._retry, self._settle)

    # ------------------------------------------------------------ the outbox

    async def outbox_add(self, events: Sequence[WebhookEvent]) -> None:
        if not events:
            return
        with self._errors("outbox_add"):
            async with self._r.pipeline(transaction=True) as pipe:
                for e in events:
                    pipe.xadd(OUTBOX, event_fields(e))

    async def outbox_read(self, after: str | None, limit: int) -> list[OutboxEntry]:
        check_page(limit)
        if limit == 0:
            return []
        with self._errors("outbox_read"):
            entries = await self._r.xrange(OUTBOX, "-" if after is None else f"({after}", "+",
                                           count=limit)
            if not entries:
                return []
            ids = [_s(e.identifier) for e in entries]
            retries = await self._r.hmget(RETRY, ids)
        out = []
        for pos, entry, retry in zip(ids, entries, retries):
            attempts, due = (0, 0) if retry is None else map(int, _s(retry).split(":"))
            out.append(OutboxEntry(pos, _event(entry.field_values), attempts, due))
        return out

    async def outbox_retry(self, pos: str, attempts: int, due_ms: int) -> None:
        with self._errors("outbox_retry"):
            await self._retry([OUTBOX, RETRY], [pos, f"{int(attempts)}:{int(due_ms)}"])

    async def outbox_done(self, positions: Sequence[str]) -> None:
        if not positions:
            return
        with self._errors("outbox_done"):
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.xdel(OUTBOX, list(positions))
                pipe.hdel(RETRY, list(positions))

    async def outbox_depth(self) -> int:
        with self._errors("outbox_depth"):
            return int(await self._r.xlen(OUTBOX))

    async def outbox_lease(self, owner: str, ttl_ms: int) -> bool:
        with self._errors("outbox_lease"):
            return int(await self._lease([LEASE], [owner, max(1, int(ttl_ms))])) == 1

    # ------------------------------------------------------------ presence

    async def presence_set(self, node: str, online: Sequence[str], offline: Sequence[str], *,
                           full: bool, now_ms: int, expires_ms: int,
                           types: Collection[str]) -> bool:
        args: list[Any] = [node, int(now_ms), int(expires_ms), new_event_id(), int(full),
                           ",".join(types), len(online), *online]
        if not full:
            args += list(offline)
        with self._errors("presence_set"):
            return int(await self._presence_set([NODES], args)) == 1

    async def presence_reap(self, now_ms: int, types: Collection[str],
                            node: str | None = None) -> int:
        offline = 0
        with self._errors("presence_reap"):
            while True:  # at most 64 expired nodes per script call
                gone, reaped = await self._presence_reap(
                    [NODES], [int(now_ms), new_event_id(), ",".join(types), node or ""])
                offline += int(gone)
                if int(reaped) < 64:
                    return offline
                node = None

    # ------------------------------------------------------------ undelivered checks

    async def undelivered_watch(self, checks: Sequence[UndeliveredCheck]) -> None:
        if not checks:
            return
        with self._errors("undelivered_watch"):
            await self._r.zadd(DUE, {_member(c): c.due_ms for c in checks})

    async def undelivered_due(self, now_ms: int, limit: int) -> list[UndeliveredCheck]:
        check_page(limit)
        if limit == 0:
            return []
        with self._errors("undelivered_due"):
            found = await self._r.zrange(DUE, "-inf", int(now_ms), sortby=PureToken.BYSCORE,
                                         offset=0, count=limit, withscores=True)
        out = []
        for member, score in found:
            user, seq, msg_id, sender = orjson.loads(member)
            out.append(UndeliveredCheck(int(score), user, seq, msg_id, sender))
        return out

    # acked_by_any_device: tidings.store.redis_devices (every device's cursor)

    async def undelivered_settle(self, checks: Sequence[UndeliveredCheck],
                                 events: Sequence[WebhookEvent | None]) -> int:
        if not checks:
            return 0
        args: list[Any] = []
        for check, event in zip(checks, events, strict=True):
            fields = [] if event is None else [x for kv in event_fields(event).items() for x in kv]
            args += [_member(check), len(fields), *fields]
        with self._errors("undelivered_settle"):
            return int(await self._settle([DUE, OUTBOX], args))
