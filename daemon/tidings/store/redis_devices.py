"""The Redis engine's devices, idempotency keys and message index: layout and Lua.
Sans-IO (plain strings); :mod:`tidings.store.redis` runs the scripts.

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

* Keys: the append script checks a message's key before anything else and stores it
  with the message, atomically (``KEY_CHECK`` / ``KEY_STORE`` below are spliced into
  ``APPEND_LUA``).  ``keys``/``keyts`` also get a TTL of the window plus a day, renewed
  on each write, so the keys of a room nobody prunes go too.
* Old data: a user's cursor from before devices (the ``cursor`` field of its ``u`` hash)
  is read as the cursor of its ``default`` device until that device is saved.
* The message index is written in the append's pipeline, outside the script (on Redis
  Cluster a script may touch one slot only): it may name a message that was not stored
  or was pruned since, so a lookup always confirms in the recipient's ``ids``.  Each day
  hash expires with the retention; with ``retention_days = 0`` the index keeps an entry
  (~60 bytes) per message ever stored.
"""

from __future__ import annotations

import string

from tidings.store.records import MS_PER_DAY, Original

__all__ = [
    "CLAIM_LUA", "DEVICES_LUA", "FORGET_KEYS_LUA", "KEY_CHECK", "KEY_STORE", "PROGRESS_LUA",
    "STATE_LUA", "KEY_TTL_EXTRA_MS", "index_key", "key_field", "parse_original",
]

#: The keys hashes live this much longer than the window (a backstop for rooms).
KEY_TTL_EXTRA_MS = MS_PER_DAY
_HEX = frozenset(string.hexdigits.lower())


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


def index_key(msg_id: str) -> str:
    """The index hash that names ``msg_id``'s recipient: by the day of the id's
    milliseconds (a Tidings msg_id starts with 12 hex digits of them) and their last
    hex digit; any other id goes to the day-0 hashes."""
    head = msg_id[:12]
    if len(head) == 12 and set(head) <= _HEX:
        ms = int(head, 16)
        return f"tidings:{{ix:{ms // MS_PER_DAY}:{head[-1]}}}"
    return f"tidings:{{ix:0:{msg_id[-1:] or '-'}}}"


# ------------------------------------------------------------------- Lua fragments

# Spliced into APPEND_LUA, inside the per-message loop: with `kf` (the key field, ""
# for none), `ts`, `window`, `keys`/`keyts` (the recipient's) in scope.  Sets `first`
# to the stored value of a live key (the message is then a duplicate).
KEY_CHECK = r"""
local first = nil
if kf ~= '' and window > 0 then
  local v = redis.call('HGET', keys, kf)
  if v then
    local fts = tonumber(string.match(v, '^[^\n]*\n[^\n]*\n(%d+)'))
    if tonumber(ts) - fts < window then first = v end
  end
end
"""

# Spliced into APPEND_LUA once the message is stored with `s` (its seq as a string).
KEY_STORE = r"""
if kf ~= '' and window > 0 then
  redis.call('HSET', keys, kf, id .. '\n' .. s .. '\n' .. ts .. '\n0')
  redis.call('ZADD', keyts, ts, kf)
  redis.call('PEXPIRE', keys, window + key_ttl_extra)
  redis.call('PEXPIRE', keyts, window + key_ttl_extra)
end
"""

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
# device (both fields exist from then on).  An answer updates a key that exists.
PROGRESS_LUA = r"""
local u, dev, keys = KEYS[1], KEYS[2], KEYS[3]
local last = tonumber(redis.call('HGET', u, 'seq')) or 0
if ARGV[1] ~= '' then redis.call('HSET', u, 'seen', ARGV[1]) end
local nc, nd, na = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local i = 5
local function register(name)
  if redis.call('HEXISTS', dev, 'c:' .. name) == 0 then
    local start = 0
    if name == 'default' then start = tonumber(redis.call('HGET', u, 'cursor')) or 0 end
    redis.call('HSET', dev, 'c:' .. name, string.format('%d', start))
  end
  redis.call('HSETNX', dev, 'd:' .. name, '0')
end
local function move(prefix, n)
  for _ = 1, n do
    local name, seq = ARGV[i], tonumber(ARGV[i + 1])
    i = i + 2
    register(name)
    local want = math.max(0, math.min(seq, last))
    local old = tonumber(redis.call('HGET', dev, prefix .. name)) or 0
    if want > old then redis.call('HSET', dev, prefix .. name, string.format('%d', want)) end
  end
end
move('c:', nc)
move('d:', nd)
for _ = 1, na do
  local f, n = ARGV[i], ARGV[i + 1]
  i = i + 2
  local v = redis.call('HGET', keys, f)
  if v then
    local head = string.match(v, '^(.*\n)[^\n]*$')
    redis.call('HSET', keys, f, head .. n)
  end
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
