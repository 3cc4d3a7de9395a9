"""Which devices of a user are online, cluster-wide: the ``devices`` of presence.  Trio.

Each node writes, with its presence (same transaction, same TTL; see
:mod:`tidings.cluster.node`), ``tidings:{node:<id>}:devices``: a hash user -> the
comma-separated names of the devices connected to that node (device names never hold a
comma).  ``devices_online`` joins the hashes of the live nodes with this node's own
names.  A node killed with -9 stops refreshing: its hash expires with its presence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tidings.store.redis_lua import user_tag

__all__ = ["NODES_KEY", "devices_key", "devices_online", "write_devices"]

NODES_KEY = "tidings:nodes"  # the set of nodes (tidings.cluster.node's)
DevicesOf = Callable[[str], list[str]]


def devices_key(node_id: str) -> str:
    return f"tidings:{{node:{user_tag(node_id)}}}:devices"


def _alive_key(node_id: str) -> str:
    return f"tidings:{{node:{user_tag(node_id)}}}:alive"


def _s(v: Any) -> str:
    return v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v)


def write_devices(pipe: Any, node_id: str, devices_of: DevicesOf, counts: dict[str, int],
                  full: bool, dirty: set[str], ttl_ms: int) -> None:
    """Queue this node's part of a presence write on ``pipe``: the device names of the
    users in ``counts`` (every local user when ``full``, else the dirty ones still here),
    and remove the dirty users gone from here."""
    key = devices_key(node_id)
    if full:
        pipe.delete([key])
    names = {u: v for u in counts if (v := ",".join(devices_of(u)))}
    gone = [] if full else [u for u in dirty if u not in names]
    if gone:
        pipe.hdel(key, gone)
    if names:
        pipe.hset(key, names)
    pipe.pexpire(key, ttl_ms)


async def devices_online(client: Any, node_id: str, users: Sequence[str],
                         devices_of: DevicesOf | None) -> dict[str, set[str]]:
    """Per user, the names of the devices connected to any live node.  Raises what the
    Redis client raises (the caller bounds the time and translates errors)."""
    users = list(dict.fromkeys(users))
    out = {u: set(devices_of(u)) if devices_of is not None else set() for u in users}
    if not users:
        return out
    others = [n for n in map(_s, await client.smembers(NODES_KEY)) if n != node_id]
    if not others:
        return out
    async with client.pipeline(transaction=False) as pipe:
        requests = [(pipe.exists([_alive_key(n)]), pipe.hmget(devices_key(n), users))
                    for n in others]
    for alive, values in requests:
        if await alive:
            for user, v in zip(users, await values):
                if v:
                    out[user].update(_s(v).split(","))
    return out
