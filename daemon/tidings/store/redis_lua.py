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
    "channel_for", "decode_envelopes", "envelope_header", "key", "untag", "user_from_channel",
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
    """A message's header in a published batch: ``[msg_id, sender, ts, len(body)]`` as
    JSON (never contains a raw newline).  The node builds it; the append script only
    copies it into the batch."""
    return orjson.dumps([msg.msg_id, msg.sender, msg.ts, len(msg.body)])


def decode_envelopes(user: str, data: bytes) -> list[StoredMessage]:
    """Parse what the append script publishes on ``user``'s channel into the
    StoredMessages of ``user``'s inbox, in seq order.  The body is the stored form,
    verbatim: the receiving node encodes the frame (JSON or MessagePack).

    Two formats:

    * a batch (the append script since the eighth session): ``b"*<seq>"``, then for
      each message ``b"\n" + header + b"\n" + body`` with the header of
      :func:`envelope_header`; the messages have the seqs ``seq, seq + 1, ...``.
    * one message (room messages, ``Cluster.publish``, and nodes before the batch
      format): ``b"<seq>\n[msg_id, sender, ts]\n<body>"``.

    Raises ValueError (or TypeError) for anything else."""
    if data[:1] != b"*":
        head, sep1, rest = data.partition(b"\n")
        header, sep2, body = rest.partition(b"\n")
        if not (sep1 and sep2):
            raise ValueError("not a tidings envelope")
        msg_id, sender, ts = orjson.loads(header)
        return [StoredMessage(msg_id, int(head), sender, user, bytes(body), int(ts))]
    end = data.index(b"\n")
    seq = int(data[1:end])
    out = []
    n = len(data)
    loads, find, new = orjson.loads, data.index, tuple.__new__
    while end < n:
        start = end + 1
        end = find(b"\n", start)
        msg_id, sender, ts, size = loads(data[start:end])
        start = end + 1
        end = start + size
        if not start <= end <= n:
            raise ValueError("truncated tidings envelope")
        # StoredMessage(...) without its Python-level __new__ (~1/3 of this loop)
        out.append(new(StoredMessage, (msg_id, seq, sender, user, data[start:end], ts)))
        seq += 1
    return out


# --------------------------------------------------------------------- Lua scripts

# A Lua fragment of the append and prune scripts: ``forget(ids, from, entries)`` drops
# the index entries of inbox stream entries (XRANGE replies) about to be trimmed: ONE
# ``HDEL ids`` and one ``ZREM from:<sender>`` per sender for every FORGET_CHUNK entries
# (unpack() is bounded by Lua's C stack; a trim of a lowered max_inbox can be thousands),
# instead of an HDEL and a ZREM per entry.
FORGET_CHUNK = 512
FORGET_ENTRIES_LUA = r"""
local function forget(ids, from, entries)
  local call = redis.call
  local n = #entries
  for c = 1, n, CHUNK do
    local idl, by, senders, ni = {}, {}, {}, 0
    for x = c, math.min(c + CHUNK - 1, n) do
      local f = entries[x][2]
      local id, sender
      for j = 1, #f, 2 do
        local k = f[j]
        if k == 'm' then id = f[j + 1] elseif k == 'f' then sender = f[j + 1] end
      end
      ni = ni + 1
      idl[ni] = id
      local l = by[sender]
      if l then l[#l + 1] = id else by[sender] = {id}; senders[#senders + 1] = sender end
    end
    call('HDEL', ids, unpack(idl, 1, ni))
    for _, sender in ipairs(senders) do
      local l = by[sender]
      call('ZREM', from .. sender, unpack(l, 1, #l))
    end
  end
end
""".replace("CHUNK", str(FORGET_CHUNK))

# KEYS: for routing only (Redis Cluster: the `u` key of the single recipient).
# ARGV: max_inbox (-1 = no limit), publish command ("" = none), the idempotency window
# (ms, 0 = keys off), the keys' TTL (ms), the message index: "x" = not written here (a
# Redis Cluster: there the index is written by separate commands, other slots), else
# the retention in days ("" = none: the index hashes never expire); then one group per
# recipient: tag, count, and 6 args per message: msg_id, sender, body, ts, header
# (envelope_header), key field ("" = no key).
# Every key is derived from the tag, so a standalone server runs a whole batch of many
# recipients in one call; on a cluster each call carries one recipient (one slot).
# The message index (standalone): every message of the call, stored or not, goes into
# its hash msg_id -> recipient (redis_devices.index_key: the key from the msg_id's first
# 12 hex digits, the day of its clock and the last digit of its ms; any other id: a
# day-0 hash), ONE HSET per hash and call, and with a retention ONE PEXPIREAT per hash
# at (day + 2 + retention days) days, as RedisDevices._index_writes computes them for a
# Redis Cluster.  (Before the eleventh session the node computed them and passed them in
# KEYS/ARGV: 2 more arguments per message; nodes of either version can share a Redis.)
# Returns, per group in argument order: {last, receivers, refused, then 3 per refused
# message: its position in the group (1-based), -1 or -2, "" or the stored value}: the
# group's stored messages have the seqs last + 1, last + 2, ... in argument order, all
# with the same receivers count (0: nobody, or no publish); -2 = a live key (its stored
# value is the original, see tidings.store.redis_devices; that message is not stored);
# -1 = a msg_id this recipient already has (not stored either).
# A key is checked first, then the msg_id (a group of one: HSETNX on ids, the check and
# the write in one command; a larger group: one HMGET on ids, and the group's earlier
# messages, so a msg_id twice in one call is stored once).
# Per group (not per message): the seq is reserved with one HINCRBY by the group's size
# and written back only when a message was not stored (their seqs stay consecutive);
# a larger group's stored msg_ids go into ids with one HSET;
# the group's stored messages are published as ONE batch envelope (decode_envelopes),
# so every message of a group has the same receiver count; consecutive messages of one
# sender share one ZADD; XLEN runs only once the seq exceeds max_inbox (the inbox holds
# entries of distinct seqs 1..seq, so it cannot be longer before).
APPEND_LUA = FORGET_ENTRIES_LUA + r"""
local call, A = redis.call, ARGV
local max_inbox, pub = tonumber(A[1]), A[2]
local window, key_ttl = tonumber(A[3]), tonumber(A[4])
local ixon, ixret = A[5] ~= 'x', tonumber(A[5])
local out, no = {}, 0
local batch, zargs, idl, hargs, seen, g = {}, {}, {}, {}, {}, 0
local sub, find, fmt = string.sub, string.find, string.format
-- the index: key per msg_id head (12 chars), field/value pairs and expiry per key
local ixof, ixf, ixat, ixn, ixorder = {}, {}, {}, {}, {}
local function ixkey(id)
  local head = sub(id, 1, 12)
  local k = ixof[head]
  if k then return k end
  local at = nil
  if #head == 12 and not find(head, '[^0-9a-f]') then
    local day = math.floor(tonumber(head, 16) / 86400000)
    k = 'tidings:{ix:' .. fmt('%d', day) .. ':' .. sub(id, 12, 12) .. '}'
    ixof[head] = k
    if ixret and ixret ~= 0 then at = fmt('%d', (day + 2 + ixret) * 86400000) end
  else
    local last = sub(id, -1)
    if last == '' then last = '-' end
    k = 'tidings:{ix:0:' .. last .. '}'
  end
  if not ixf[k] then
    ixf[k], ixn[k], ixat[k] = {}, 0, at
    ixorder[#ixorder + 1] = k
  end
  return k
end
local nargs = #A
local i = 6
if ixon then  -- the index first (as when the node sent its HSETs ahead of the groups)
  while i <= nargs do
    local tag, n = A[i], tonumber(A[i + 1])
    local user = tag
    if find(tag, '%', 1, true) then  -- redis_lua.untag
      user = tag:gsub('%%7D', '}'):gsub('%%7B', '{'):gsub('%%25', '%%')
    end
    for b = i + 2, i + 1 + n * 6, 6 do
      local id = A[b]
      local k = ixkey(id)
      local f, m = ixf[k], ixn[k]
      f[m + 1], f[m + 2] = id, user
      ixn[k] = m + 2
    end
    i = i + 2 + n * 6
  end
  for _, k in ipairs(ixorder) do
    call('HSET', k, unpack(ixf[k], 1, ixn[k]))
    if ixat[k] then call('PEXPIREAT', k, ixat[k]) end
  end
  i = 6
end
while i <= nargs do
  local tag, ns, first = A[i], A[i + 1], i + 2
  local n = tonumber(ns)
  i = first + n * 6
  g = g + 1
  local base = 'tidings:{' .. tag .. '}:'
  local inbox, ids, from = base .. 'inbox', base .. 'ids', base .. 'from:'
  local top = call('HINCRBY', base .. 'u', 'seq', ns)
  local last = top - n
  local seq = last
  local gout = no + 1
  out[no + 1], out[no + 2], out[no + 3] = last, 0, 0
  no = no + 3
  local have = nil
  if n > 1 then
    for k = 1, n do idl[k] = A[first + (k - 1) * 6] end
    have = call('HMGET', ids, unpack(idl, 1, n))
  end
  local nb, zn, hn, zsender, k = 1, 0, 0, nil, 0
  for b = first, first + n * 6 - 1, 6 do
    k = k + 1
    local id, sender, body, ts, kf = A[b], A[b + 1], A[b + 2], A[b + 3], A[b + 5]
    local live = nil
    if kf ~= '' and window > 0 then
      local v = call('HGET', base .. 'keys', kf)
      if v and tonumber(ts) - tonumber(string.match(v, '^[^\n]*\n[^\n]*\n(%d+)')) < window then
        live = v
      end
    end
    local s, dup = fmt('%d', seq + 1), true
    if live then
      out[no + 1], out[no + 2], out[no + 3] = k, -2, live
    elseif have then
      dup = have[k] or seen[id] == g
      if dup then out[no + 1], out[no + 2], out[no + 3] = k, -1, '' end
    else
      dup = call('HSETNX', ids, id, s) == 0
      if dup then out[no + 1], out[no + 2], out[no + 3] = k, -1, '' end
    end
    if dup then
      no = no + 3
      out[gout + 2] = out[gout + 2] + 1
    else
      seq = seq + 1
      if have then
        seen[id] = g
        hargs[hn + 1], hargs[hn + 2] = id, s
        hn = hn + 2
      end
      call('XADD', inbox, s .. '-0', 'm', id, 'f', sender, 'b', body, 't', ts)
      if sender ~= zsender then
        if zn > 0 then call('ZADD', from .. zsender, unpack(zargs, 1, zn)) end
        zsender, zn = sender, 0
      end
      zargs[zn + 1], zargs[zn + 2] = '0', id  -- a string: Redis formats a Lua number with snprintf
      zn = zn + 2
      batch[nb + 1], batch[nb + 2] = A[b + 4], body
      nb = nb + 2
      if kf ~= '' and window > 0 then
        local keys, keyts = base .. 'keys', base .. 'keyts'
        call('HSET', keys, kf, id .. '\n' .. s .. '\n' .. ts .. '\n0')
        call('ZADD', keyts, ts, kf)
        call('PEXPIRE', keys, key_ttl)
        call('PEXPIRE', keyts, key_ttl)
      end
    end
  end
  if hn > 0 then call('HSET', ids, unpack(hargs, 1, hn)) end
  if zn > 0 then call('ZADD', from .. zsender, unpack(zargs, 1, zn)) end
  if seq ~= top then call('HSET', base .. 'u', 'seq', fmt('%d', seq)) end
  if seq ~= last and pub ~= '' then
    batch[1] = '*' .. fmt('%d', last + 1)
    out[gout + 1] = call(pub, base .. 'ch', table.concat(batch, '\n', 1, nb))
  end
  if max_inbox >= 0 and seq > max_inbox then
    local excess = call('XLEN', inbox) - max_inbox
    if excess > 0 then
      local old = call('XRANGE', inbox, '-', '+', 'COUNT', excess)
      local n_old = #old
      if n_old > 0 then
        forget(ids, from, old)
        local lseq = tonumber(string.match(old[n_old][1], '^(%d+)'))
        call('XTRIM', inbox, 'MINID', string.format('%d', lseq + 1))
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
PRUNE_LUA = FORGET_ENTRIES_LUA + r"""
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
  local ts
  for j = 1, #f, 2 do
    if f[j] == 't' then ts = tonumber(f[j + 1]) end
  end
  if seq <= cut or (cutoff and ts < cutoff) then
    deleted = deleted + 1
    last = seq
  else
    break
  end
end
if last then
  for x = #entries, deleted + 1, -1 do entries[x] = nil end
  forget(ids, from, entries)
  redis.call('XTRIM', inbox, 'MINID', string.format('%d', last + 1))
end
local more = 0
if deleted == batch then more = 1 end
return {deleted, more}
"""
