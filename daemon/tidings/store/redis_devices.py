"""The redis engine's devices, idempotency keys and message index.

:class:`RedisDevices` is a mixin of :class:`tidings.store.redis.RedisStore` (its device,
key and lookup methods; the contract of each is in :mod:`tidings.store.base`); the key
check itself runs inside :mod:`tidings.store.redis_lua`'s ``APPEND_LUA``.

Data model (next to :mod:`tidings.store.redis_lua`'s; ``T`` = the escaped user id, or a
room's key for the keys of room sends, so all of it lives in that one slot)::

    tidings:{T}:dev       hash   c:<device> -> ack cursor, d:<device> -> delivered mark;
                                 a device is registered once it has a ``c:`` field
    tidings:{T}:keys      hash   <sender>\\n<key> -> "<msg_id>\\n<seq>\\n<ts>\\n<delivered>"
                                 (seq "" for a room message): the idempotency keys of
                                 the sends to T
    tidings:{T}:keyts     zset   <sender>\\n<key> scored by ts: what ``prune`` forgets
    tidings:{ix:<day>:<h>} hash  msg_id -> recipient: which inbox holds a message (for
                                 ``message(msg_id)``), one hash per day of the msg_id's
                                 clock and last hex digit of its milliseconds

* Keys: the append script (``APPEND_LUA``) checks a message's key before anything else
  and stores it with the message, atomically.  ``keys``/``keyts`` also get a TTL of the window plus a day, renewed
  on each write, so the keys of a room nobody prunes go too.
* Old data: a user's cursor from before devices (the ``cursor`` field of its ``u`` hash)
  is read as the cursor of its ``default`` device until that device is saved.
* The message index is written by the append script on a standalone server (which
  derives the hashes, the fields and the expiry from the msg_ids itself, as
  :meth:`RedisDevices._index_writes` does) and in the append's round trip on a Redis
  Cluster, outside the script (on Redis Cluster a script may touch one slot only): it may name a message that was not stored
  or was pruned since, so a lookup always confirms in the recipient's ``ids``.  Each day
  hash expires with the retention; with ``retention_days = 0`` the index keeps an entry
  (~60 bytes) per message ever stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tidings.store.records import (
    DEFAULT_DEVICE, MS_PER_DAY, DeviceState, InboxState, Original, Progress, StoredMessage,
)
from tidings.store.redis_lane import Call
from tidings.store.redis_lua import KEY_PREFIX, key

__all__ = [
    "KEY_TTL_EXTRA_MS", "RedisDevices", "index_day", "index_key",
    "key_field", "parse_original",
]

#: The keys hashes live this much longer than the window (a backstop for rooms).
KEY_TTL_EXTRA_MS = MS_PER_DAY
FORGET_BATCH = 512     # keys forgotten per script call
FORGET_PIPELINE = 256  # zsets per pipelined round trip
_HEX = "0123456789abcdef"


def key_field(sender: str, key: str) -> str:
    """The field of a key in the recipient's ``keys`` hash (user ids and keys are
    printable: no newline)."""
    return f"{sender}\n{key}"


def parse_original(value: bytes | str) -> Original:
    """A ``keys`` hash value as the Original it names."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    msg_id, seq, _ts, delivered = value.split("\n")
    return Original(msg_id, int(seq) if seq else None, int(delivered))


def index_day(msg_id: str) -> int | None:
    """The day (since the epoch) of a Tidings msg_id's milliseconds (its first 12 hex
    digits); None for any other id."""
    head = msg_id[:12]
    if len(head) == 12 and not head.strip(_HEX):  # only lowercase hex digits
        return int(head, 16) // MS_PER_DAY
    return None


def index_key(msg_id: str) -> str:
    """The index hash that names ``msg_id``'s recipient: by the day of the id's
    milliseconds and their last hex digit; any other id goes to the day-0 hashes
    (which never expire)."""
    day = index_day(msg_id)
    if day is not None:
        return f"tidings:{{ix:{day}:{msg_id[11]}}}"
    return f"tidings:{{ix:0:{msg_id[-1:] or '-'}}}"


# ------------------------------------------------------------------- Lua fragments

# KEYS: u, inbox, dev.  ARGV: device.
# Returns {first_seq or -1, last_seq, cursor or -1 for a device never saved}.
STATE_LUA = r"""
local last = tonumber(redis.call('HGET', KEYS[1], 'seq')) or 0
local c = redis.call('HGET', KEYS[3], 'c:' .. ARGV[1])
if not c and ARGV[1] == 'default' then c = redis.call('HGET', KEYS[1], 'cursor') end
local first = -1
local e = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if #e > 0 then first = tonumber(string.match(e[1][1], '^(%d+)')) end
return {first, last, tonumber(c) or -1}
"""

# KEYS: u, dev.  Returns {device, cursor, delivered, device, ...}.
DEVICES_LUA = r"""
local out = {}
local seen = {}
local all = redis.call('HGETALL', KEYS[2])
local marks = {}
for i = 1, #all, 2 do marks[all[i]] = all[i + 1] end
for f, v in pairs(marks) do
  local name = string.match(f, '^c:(.*)$')
  if name then
    seen[name] = true
    out[#out + 1] = name
    out[#out + 1] = tonumber(v)
    out[#out + 1] = tonumber(marks['d:' .. name]) or 0
  end
end
if not seen['default'] then
  local legacy = redis.call('HGET', KEYS[1], 'cursor')
  if legacy then
    out[#out + 1] = 'default'
    out[#out + 1] = tonumber(legacy)
    out[#out + 1] = tonumber(marks['d:default']) or 0
  end
end
return out
"""

# KEYS: u, dev, keys (one owner's slot: a user, or a room's key for answers only).
# ARGV: last_seen ("" = none), n_cursors, n_delivered, n_answers, then device/seq pairs
# for the cursors, device/seq pairs for the delivered marks, field/count pairs for the
# answers.  Each mark = max(old, min(seq, last_seq)) (>= 0); saving one registers the
# device (both fields exist from then on; a device's `c:` starts at 0, `default`'s at
# the legacy `cursor` of `u`).  An answer updates a key that exists.
# Reads and writes are batched: one HMGET of every named device's two fields and one
# HSET of what changed (not 4 commands per mark), one HMGET and one HSET of the answers.
PROGRESS_LUA = r"""
local call = redis.call
local u, dev, keys = KEYS[1], KEYS[2], KEYS[3]
local last = tonumber(call('HGET', u, 'seq')) or 0
if ARGV[1] ~= '' then call('HSET', u, 'seen', ARGV[1]) end
local nc, nd, na = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local names, slot, fields, nf = {}, {}, {}, 0
for x = 5, 4 + 2 * (nc + nd), 2 do
  local name = ARGV[x]
  if not slot[name] then
    names[#names + 1] = name
    slot[name] = nf + 1
    fields[nf + 1], fields[nf + 2] = 'c:' .. name, 'd:' .. name
    nf = nf + 2
  end
end
if nf > 0 then
  local old = call('HMGET', dev, unpack(fields, 1, nf))
  local val, dirty = {}, {}
  for _, name in ipairs(names) do
    local j = slot[name]
    local c, d = old[j], old[j + 1]
    if not c then  -- a new device: register it
      c = 0
      if name == 'default' then c = tonumber(call('HGET', u, 'cursor')) or 0 end
      dirty[j] = true
    end
    if not d then d = 0; dirty[j + 1] = true end
    val[j], val[j + 1] = tonumber(c) or 0, tonumber(d) or 0
  end
  local x = 5
  for m = 0, 1 do  -- 0: the cursors, 1: the delivered marks
    local count = nc
    if m == 1 then count = nd end
    for _ = 1, count do
      local j = slot[ARGV[x]] + m
      local want = math.max(0, math.min(tonumber(ARGV[x + 1]), last))
      x = x + 2
      if want > val[j] then val[j], dirty[j] = want, true end
    end
  end
  local out, no = {}, 0
  for j = 1, nf do
    if dirty[j] then
      out[no + 1], out[no + 2] = fields[j], string.format('%d', val[j])
      no = no + 2
    end
  end
  if no > 0 then call('HSET', dev, unpack(out, 1, no)) end
end
if na > 0 then
  local i = 5 + 2 * (nc + nd)
  local af = {}
  for a = 1, na do af[a] = ARGV[i + 2 * (a - 1)] end
  local vals = call('HMGET', keys, unpack(af, 1, na))
  local set, ns = {}, 0
  for a = 1, na do
    local v = vals[a]
    if v then
      local head = string.match(v, '^(.*\n)[^\n]*$')
      set[ns + 1], set[ns + 2] = af[a], head .. ARGV[i + 2 * (a - 1) + 1]
      ns = ns + 2
    end
  end
  if ns > 0 then call('HSET', keys, unpack(set, 1, ns)) end
end
return 1
"""

# KEYS: keys, keyts (the target's).  ARGV: field, msg_id, ts, window, ttl.
# Returns the stored value of a live key (nothing written), else remembers the key for
# msg_id (seq "": not stored) and returns false.
CLAIM_LUA = r"""
local keys, keyts = KEYS[1], KEYS[2]
local f, id, ts, window = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local v = redis.call('HGET', keys, f)
if v then
  local fts = tonumber(string.match(v, '^[^\n]*\n[^\n]*\n(%d+)'))
  if tonumber(ts) - fts < window then return v end
end
redis.call('HSET', keys, f, id .. '\n\n' .. ts .. '\n0')
redis.call('ZADD', keyts, ts, f)
redis.call('PEXPIRE', keys, ARGV[5])
redis.call('PEXPIRE', keyts, ARGV[5])
return false
"""

# KEYS: keys, keyts.  ARGV: cutoff (keys with ts <= cutoff are expired), batch.
# Returns {forgotten, more(0/1)}.
FORGET_KEYS_LUA = r"""
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #expired == 0 then return {0, 0} end
redis.call('HDEL', KEYS[1], unpack(expired))
redis.call('ZREM', KEYS[2], unpack(expired))
local more = 0
if #expired == tonumber(ARGV[2]) then more = 1 end
return {#expired, more}
"""


def _s(v: Any) -> str:
    return v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v)


class _Owner:
    """What one slot's owner (a user, or a room's key) gets from one ``save_progress``."""

    __slots__ = ("answers", "cursors", "delivered", "seen")

    def __init__(self) -> None:
        self.seen = ""
        self.cursors: list[Any] = []
        self.delivered: list[Any] = []
        self.answers: list[Any] = []


class RedisDevices:
    """Devices, idempotency keys and lookups by msg_id (a mixin of ``RedisStore``, which
    provides ``_r``, ``_errors``, ``key_window_ms`` and ``_entry``)."""

    _r: Any
    key_window_ms: int

    def _register_device_scripts(self, client: Any) -> tuple[Any, ...]:
        self._state = client.register_script(STATE_LUA)
        self._devices = client.register_script(DEVICES_LUA)
        self._progress = client.register_script(PROGRESS_LUA)
        self._progress_script = self._lane.script(PROGRESS_LUA)  # type: ignore[attr-defined]
        self._claim = client.register_script(CLAIM_LUA)
        self._forget_keys = client.register_script(FORGET_KEYS_LUA)
        return (self._state, self._devices, self._progress, self._claim, self._forget_keys)

    async def inbox_state(self, user: str, device: str = DEFAULT_DEVICE) -> InboxState:
        with self._errors("inbox_state"):  # type: ignore[attr-defined]
            first, last, cursor = await self._state(
                [key(user, "u"), key(user, "inbox"), key(user, "dev")], [device])
        first, last, cursor = int(first), int(last), int(cursor)
        return InboxState(first if first >= 0 else last + 1, last, max(cursor, 0),
                          new_device=cursor < 0)

    async def devices(self, user: str) -> dict[str, DeviceState]:
        with self._errors("devices"):  # type: ignore[attr-defined]
            reply = await self._devices([key(user, "u"), key(user, "dev")], [])
        return {_s(reply[i]): DeviceState(int(reply[i + 1]), int(reply[i + 2]))
                for i in range(0, len(reply), 3)}

    async def save_progress(self, progress: Progress) -> None:
        """One script per slot owner (cursors, delivered marks and last_seen per user;
        first answers per recipient or room), pipelined in one round trip."""
        self._check_open()  # type: ignore[attr-defined]
        if not progress:
            return
        owners: dict[str, _Owner] = {}

        def owner(name: str) -> _Owner:
            found = owners.get(name)
            if found is None:
                found = owners[name] = _Owner()
            return found

        for (user, device), seq in progress.cursors.items():
            owner(user).cursors += [device, int(seq)]
        for (user, device), seq in progress.delivered.items():
            owner(user).delivered += [device, int(seq)]
        for user, ts in progress.last_seen.items():
            owner(user).seen = str(int(ts))
        for (sender, target, k), n in progress.answers.items():
            owner(target).answers += [key_field(sender, k), int(n)]
        calls = [Call(self._progress_script,
                      [key(name, "u"), key(name, "dev"), key(name, "keys")],
                      [o.seen, len(o.cursors) // 2, len(o.delivered) // 2, len(o.answers) // 2,
                       *o.cursors, *o.delivered, *o.answers])
                 for name, o in owners.items()]
        with self._errors("save_progress"):  # type: ignore[attr-defined]
            for reply in await self._lane.run(calls):  # type: ignore[attr-defined]
                if isinstance(reply, BaseException):
                    raise reply

    async def claim_key(self, sender: str, target: str, k: str, msg_id: str,
                        ts: int) -> Original | None:
        self._check_open()  # type: ignore[attr-defined]
        window = self.key_window_ms
        if not window:
            return None
        with self._errors("claim_key"):  # type: ignore[attr-defined]
            value = await self._claim(
                [key(target, "keys"), key(target, "keyts")],
                [key_field(sender, k), msg_id, int(ts), window, window + KEY_TTL_EXTRA_MS])
        return None if value is None else parse_original(value)

    async def message(self, msg_id: str) -> StoredMessage | None:
        """The index names the recipient; its ``ids`` confirm the message is still there
        (max_inbox trims them with the inbox; prune too)."""
        with self._errors("message"):  # type: ignore[attr-defined]
            recipient = await self._r.hget(index_key(msg_id), msg_id)
            if recipient is None:
                return None
            user = _s(recipient)
            seq = await self._r.hget(key(user, "ids"), msg_id)
            if seq is None:
                return None
            entry = f"{_s(seq)}-0"
            entries = await self._r.xrange(key(user, "inbox"), entry, entry)
        return self._entry(user, entries[0]) if entries else None  # type: ignore[attr-defined]

    def _index_writes(self, placed: Sequence[tuple[str, str]],
                      retention_days: float | None) -> list[Call]:
        """The message index's writes for ``(msg_id, recipient)`` pairs: one call per
        index hash, ``Call("HSET", [hash], [expire_at_ms or "", field, value, ...])``;
        each hash expires a day after the retention of its day.  A Redis Cluster's append
        sends them as HSET + PEXPIREAT in its round trip; on a standalone server
        APPEND_LUA computes the same writes itself (tests/test_store_redis.py compares)."""
        shards: dict[str, list[Any]] = {}
        for msg_id, recipient in placed:
            shard = index_key(msg_id)
            fields = shards.get(shard)
            if fields is None:
                day = index_day(msg_id)
                at = (int((day + 2 + retention_days) * MS_PER_DAY)
                      if retention_days and day is not None else "")
                fields = shards[shard] = [at]
            fields += (msg_id, recipient)
        return [Call("HSET", [shard], fields) for shard, fields in shards.items()]

    async def forget_keys(self, now_ms: int) -> None:
        """Forget the idempotency keys expired at ``now_ms`` (``prune`` calls it): every
        ``keyts`` zset (users' and rooms'), in bounded steps."""
        if not self.key_window_ms:
            return
        cutoff = now_ms - self.key_window_ms
        pending: list[str] = []
        async for k in self._r.scan_iter(match=KEY_PREFIX + "{*}:keyts", count=1000, type_="zset"):
            pending.append(_s(k))
            if len(pending) >= FORGET_PIPELINE:
                await self._forget(pending, cutoff)
                pending = []
        if pending:
            await self._forget(pending, cutoff)

    async def _forget(self, zsets: list[str], cutoff: int) -> None:
        while zsets:
            async with self._r.pipeline(transaction=False) as pipe:
                requests = [(z, self._forget_keys([z[:-len("keyts")] + "keys", z], [cutoff, FORGET_BATCH],
                                                  client=pipe)) for z in zsets]
            zsets = [z for z, request in requests if int((await request)[1])]

    async def acked_by_any_device(self, pairs: Sequence[tuple[str, int]]) -> list[bool]:
        if not pairs:
            return []
        users = list(dict.fromkeys(u for u, _ in pairs))
        with self._errors("acked_by_any_device"):  # type: ignore[attr-defined]
            async with self._r.pipeline(transaction=False) as pipe:
                requests = [self._devices([key(u, "u"), key(u, "dev")], [], client=pipe)
                            for u in users]
            best = {}
            for user, request in zip(users, requests):
                reply = await request
                best[user] = max((int(reply[i + 1]) for i in range(0, len(reply), 3)), default=0)
        return [best[user] >= seq for user, seq in pairs]
