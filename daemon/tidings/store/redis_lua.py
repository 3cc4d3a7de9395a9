"""The Redis engine's data layout: keys, pub/sub channels, the published envelope and
the Lua scripts.  Sans-IO (plain strings and bytes); :mod:`tidings.store.redis` runs the
scripts and :mod:`tidings.cluster` reads the channels.

Data model (``T`` = the user id escaped by :func:`user_tag`, so the ``{T}`` hash tag
keeps all of one user's keys in one Redis Cluster slot)::

    tidings:{T}:u            hash    seq (last seq ever assigned), cursor, seen (last_seen ms)
    tidings:{T}:inbox        stream  one entry per stored message, id "<seq>-0",
                                     fields m=msg_id f=sender b=body t=ts
    tidings:{T}:ids          hash    msg_id -> seq (history lookups, duplicate check)
    tidings:{T}:from:<S>     zset    msg_ids of the messages S sent to T (all scores 0:
                                     lexicographic order = msg_id order)
    tidings:{T}:ch           pub/sub channel of T (see tidings.cluster)
    tidings:{T}:dev, :keys, :keyts   devices and idempotency keys (tidings.store.redis_devices)
"""

from __future__ import annotations

import orjson

from tidings.store.records import NewMessage, StoredMessage

__all__ = [
    "APPEND_LUA", "HISTORY_LUA", "KEY_PREFIX", "PRUNE_LUA",
    "channel_for", "decode_envelope", "envelope_header", "key", "untag", "user_from_channel",
    "user_tag",
]

KEY_PREFIX = "tidings:"


# ------------------------------------------------------------------ keys & channels

def user_tag(user: str) -> str:
    """The user id as it appears inside ``{...}`` in keys and channels.

    ``%``, ``{`` and ``}`` are percent-escaped so the hash tag is always exactly the
    whole (non-empty) user id, whatever characters it contains."""
    return user.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def untag(tag: str) -> str:
    return tag.replace("%7D", "}").replace("%7B", "{").replace("%25", "%")


def key(user: str, suffix: str) -> str:
    """The Redis key ``tidings:{<user>}:<suffix>``."""
    return f"{KEY_PREFIX}{{{user_tag(user)}}}:{suffix}"


def channel_for(user: str) -> str:
    """The pub/sub channel carrying ``user``'s messages: ``tidings:{<user>}:ch``."""
    return key(user, "ch")


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

# KEYS: for routing (Redis Cluster: the `u` key of the single recipient), then on a
# standalone server the message index hashes this call writes (see below).
# ARGV: max_inbox (-1 = no limit), publish command ("" = none), the idempotency window
# (ms, 0 = keys off), the keys' TTL (ms), the number of index groups (0 on a cluster:
# there the index is written by separate commands), each: key, PEXPIREAT ms ("" =
# none), field count, field/value pairs; then one group per recipient: tag, count, and
# 6 args per message: msg_id, sender, body, ts, header, key field ("" = no key).
# Every key is derived from the tag, so a standalone server runs a whole batch of many
# recipients in one call; on a cluster each call carries one recipient (one slot).
# Returns {seq1, receivers1, first1, seq2, ...} in argument order: first is "" or, for a
# live key, its stored value (see tidings.store.redis_devices; that message is not
# stored; seq -2); seq -1 marks a msg_id this recipient already has (not stored either).
# A key is checked first, then the msg_id (HSETNX on ids: the check and the write in one
# command).  The recipient's seq is read once per group and written once at its end.
APPEND_LUA = r"""
local max_inbox, pub = tonumber(ARGV[1]), ARGV[2]
local window, key_ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {}
local i = 6
for _ = 1, tonumber(ARGV[5]) do
  local ix, at, nf = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  redis.call('HSET', ix, unpack(ARGV, i + 3, i + 2 + 2 * nf))
  if at ~= '' then redis.call('PEXPIREAT', ix, at) end
  i = i + 3 + 2 * nf
end
while i <= #ARGV do
  local tag, n, first = ARGV[i], tonumber(ARGV[i + 1]), i + 2
  i = first + n * 6
  local base = 'tidings:{' .. tag .. '}:'
  local u, inbox, ids, from, channel =
    base .. 'u', base .. 'inbox', base .. 'ids', base .. 'from:', base .. 'ch'
  local keys, keyts = base .. 'keys', base .. 'keyts'
  local last = tonumber(redis.call('HGET', u, 'seq')) or 0
  local seq = last
  for k = 0, n - 1 do
    local b = first + k * 6
    local id, sender, body, ts = ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3]
    local kf = ARGV[b + 5]
    local live = nil
    if kf ~= '' and window > 0 then
      local v = redis.call('HGET', keys, kf)
      if v and tonumber(ts) - tonumber(string.match(v, '^[^\n]*\n[^\n]*\n(%d+)')) < window then
        live = v
      end
    end
    if live then
      out[#out + 1] = -2
      out[#out + 1] = 0
      out[#out + 1] = live
    elseif redis.call('HSETNX', ids, id, string.format('%d', seq + 1)) == 0 then
      out[#out + 1] = -1
      out[#out + 1] = 0
      out[#out + 1] = ''
    else
      seq = seq + 1
      local s = string.format('%d', seq)
      redis.call('XADD', inbox, s .. '-0', 'm', id, 'f', sender, 'b', body, 't', ts)
      redis.call('ZADD', from .. sender, 0, id)
      local receivers = 0
      if pub ~= '' then
        receivers = redis.call(pub, channel, s .. '\n' .. ARGV[b + 4] .. '\n' .. body)
      end
      if kf ~= '' and window > 0 then
        redis.call('HSET', keys, kf, id .. '\n' .. s .. '\n' .. ts .. '\n0')
        redis.call('ZADD', keyts, ts, kf)
        redis.call('PEXPIRE', keys, key_ttl)
        redis.call('PEXPIRE', keyts, key_ttl)
      end
      out[#out + 1] = seq
      out[#out + 1] = receivers
      out[#out + 1] = ''
    end
  end
  if seq ~= last then redis.call('HSET', u, 'seq', string.format('%d', seq)) end
  if max_inbox >= 0 then
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
