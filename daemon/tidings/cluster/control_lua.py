"""The control plane's Redis layout: keys, the channel, the events, the rule that
orders presence states, and the Lua scripts.  Sans-IO (strings and bytes);
:mod:`tidings.cluster.control` runs them.

Keys (``T`` = a user id escaped by ``user_tag``; ``M`` = a member id, one per node
process and incarnation: ``<node id>/<random hex>``)::

    tidings:{T}:online           hash    M -> 1 for every member holding a connection of
                                         T, plus ``v``: the version of T's last
                                         transition (absent = T is offline everywhere)
    tidings:{ctl}:members        set     member ids (dead ones are swept)
    tidings:{ctl}:users-online   string  how many ``online`` hashes exist (the gauge)
    tidings:{ctl:M}:alive        string  member M's lease (TTL ``presence_ttl_s``)
    tidings:{ctl:M}:users        set     users M wrote into ``online`` hashes
    tidings:{ctl:M}:sweep        string  lock of the node sweeping dead member M
    tidings:{ctl}:control        channel the events below (PUBLISH; SPUBLISH on a cluster)

No user key ends in ``:members``, ``:users-online``, ``:alive``, ``:users``,
``:sweep`` or ``:online`` except the ``online`` hash itself, so these never collide
with a user's keys (whose names are ``tidings:{T}:u``, ``inbox``, ``ids``, ``from:S``).

A **version** is Redis' ``TIME`` in microseconds, as a decimal string: an online
transition stores it in ``v``; an offline transition (and a read of an offline user)
reports the current ``TIME``.  A user's key lives on one Redis primary, so its
versions are ordered by that primary's clock: a receiver ignores an event older than
the state it already has.

Events on the channel (JSON objects)::

    {"kind": "presence", "from": M, "changes": [[user, online 0|1, version], ...]}
    {"kind": "disconnect", "from": M, "req": R, "user": U, "conn": C | null}
    {"kind": "disconnected", "from": M, "to": M', "req": R, "closed": N}
"""

from __future__ import annotations

from typing import Any

import orjson

from tidings.store.redis_lua import KEY_PREFIX, key, user_tag

__all__ = [
    "CHANNEL", "MEMBERS_KEY", "ONLINE_COUNT_KEY", "PRESENCE_LUA", "STATE_LUA", "KnownStates",
    "decode_event", "member_key", "new_member_id", "node_of", "online_key",
]

CHANNEL = KEY_PREFIX + "{ctl}:control"
MEMBERS_KEY = KEY_PREFIX + "{ctl}:members"
ONLINE_COUNT_KEY = KEY_PREFIX + "{ctl}:users-online"


def online_key(user: str) -> str:
    return key(user, "online")


def member_key(member: str, suffix: str) -> str:
    """``tidings:{ctl:<member>}:<suffix>``: alive, users or sweep."""
    return f"{KEY_PREFIX}{{ctl:{user_tag(member)}}}:{suffix}"


def new_member_id(node_id: str, nonce: str) -> str:
    return f"{node_id}/{nonce}"


def node_of(member: str) -> str:
    """The node id inside a member id."""
    return member.rsplit("/", 1)[0]


def decode_event(data: bytes | str) -> dict[str, Any] | None:
    """A channel message as a dict with a string ``kind``, or None if it is not one."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("kind"), str):
        return None
    return event


class KnownStates:
    """What a node's watchers were told about each watched user: ``(version, online)``.

    ``apply`` takes a state from an event or a read and returns True when the watchers
    must hear it: it is newer than what they know (or the same version with the other
    state, which only crossed events can produce) and it changes what they were told.
    A read state of a user they know nothing about is only recorded: their ``watching``
    reply carries it.  ``assume`` records what they were told without a version."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[int, bool]] = {}

    def apply(self, user: str, online: bool, version: int, *, event: bool) -> bool:
        known = self._known.get(user)
        if known is not None and (version < known[0] or (version == known[0] and online == known[1])):
            return False
        self._known[user] = (version, online)
        return (known is None and event) or (known is not None and known[1] != online)

    def assume(self, user: str, online: bool) -> None:
        self._known.setdefault(user, (0, online))

    def online(self, user: str) -> bool | None:
        known = self._known.get(user)
        return None if known is None else known[1]

    def users(self) -> list[str]:
        return list(self._known)

    def forget(self, user: str) -> None:
        self._known.pop(user, None)


# KEYS[1] = tidings:{T}:online; on a standalone server only (a script may touch one
# slot of a Redis Cluster) also KEYS[2] = the users-online counter and KEYS[3] = the
# member's lease.  ARGV[1] = member, ARGV[2] = "1" (M holds T) or "0" (M no longer does).
# Returns {online 0|1, version, changed 0|1}: T's state after the call, its version (a
# string), and whether this call made T come online / go offline cluster-wide; or
# {-1, 0, 0} for an add whose lease (KEYS[3]) is gone: the member must rejoin (a swept
# member never writes again, so it cannot leave a field behind).
PRESENCE_LUA = r"""
local k, member, add = KEYS[1], ARGV[1], ARGV[2] == '1'
local function now()
  local t = redis.call('TIME')
  return t[1] .. string.format('%06d', tonumber(t[2]))
end
local exists = redis.call('EXISTS', k) == 1
if add then
  if KEYS[3] and redis.call('EXISTS', KEYS[3]) == 0 then
    return {-1, 0, 0}
  end
  if not exists then
    local v = now()
    redis.call('HSET', k, 'v', v, member, '1')
    if KEYS[2] then redis.call('INCR', KEYS[2]) end
    return {1, v, 1}
  end
  redis.call('HSET', k, member, '1')
  return {1, redis.call('HGET', k, 'v'), 0}
end
if not exists then
  return {0, now(), 0}
end
if redis.call('HDEL', k, member) == 1 and redis.call('HLEN', k) <= 1 then
  redis.call('DEL', k)
  if KEYS[2] then redis.call('DECR', KEYS[2]) end
  return {0, now(), 1}
end
return {1, redis.call('HGET', k, 'v'), 0}
"""

# KEYS[1] = tidings:{T}:online.  Returns {online 0|1, version} (read only).
STATE_LUA = r"""
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {1, redis.call('HGET', KEYS[1], 'v')}
end
local t = redis.call('TIME')
return {0, t[1] .. string.format('%06d', tonumber(t[2]))}
"""
