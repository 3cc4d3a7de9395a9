"""The control plane's Redis operations: presence scripts under a member id, leases,
sweeps, state reads and publishing.  Trio (coredis).

:class:`MemberStore` does what one call says and nothing on its own: it keeps no
schedule and decides no policy (:mod:`tidings.cluster.control` does).  Every method
may raise coredis' errors, ``OSError``, ``TimeoutError`` or :class:`LeaseLost`; all
work is batched ``BATCH`` users per pipelined round trip.  Layout and scripts:
:mod:`tidings.cluster.control_lua`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import coredis
import orjson

from tidings.cluster.control_lua import (
    CHANNEL, MEMBERS_KEY, ONLINE_COUNT_KEY, PRESENCE_LUA, STATE_LUA, member_key, online_key,
)

__all__ = ["BATCH", "LeaseLost", "MemberStore"]

#: Users per pipelined round trip (writes, sweeps, state reads) and per event.
BATCH = 256
SWEEP_LOCK_MS = 30_000

#: A presence change as published: [user, online 0|1, version].
Change = list[Any]


class LeaseLost(Exception):
    """A member's lease expired (it was swept, or Redis lost it): it must rejoin."""


class MemberStore:
    def __init__(self, client: Any, *, ttl_s: float, sharded: bool) -> None:
        """``sharded``: a Redis Cluster (one slot per script; SPUBLISH)."""
        self._r = client
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._sharded = sharded
        self._presence = client.register_script(PRESENCE_LUA)
        self._state = client.register_script(STATE_LUA)
        self.published = 0
        self.transitions = 0  # users that came online / went offline by our calls

    # -- leases ------------------------------------------------------------------------

    async def join(self, member: str) -> None:
        """Lease first, then membership: a member listed is always findable dead."""
        await self._r.set(member_key(member, "alive"), "1", px=self._ttl_ms)
        await self._r.sadd(MEMBERS_KEY, [member])

    async def renew(self, member: str) -> bool:
        """Extend ``member``'s lease; False when it was already gone."""
        return bool(await self._r.set(member_key(member, "alive"), "1", px=self._ttl_ms,
                                      condition=coredis.PureToken.XX))

    async def members(self) -> dict[str, bool]:
        """Every listed member -> whether its lease is alive."""
        members = [_s(m) for m in await self._r.smembers(MEMBERS_KEY)]
        if not members:
            return {}
        async with self._r.pipeline(transaction=False) as pipe:
            alive = [(m, pipe.exists([member_key(m, "alive")])) for m in members]
        return {m: bool(await request) for m, request in alive}

    async def lock_sweep(self, dead: str, by: str) -> bool:
        return bool(await self._r.set(member_key(dead, "sweep"), by, px=SWEEP_LOCK_MS,
                                      condition=coredis.PureToken.NX))

    async def unlock_sweep(self, dead: str) -> None:
        await self._r.delete([member_key(dead, "sweep")])

    # -- presence ------------------------------------------------------------------------

    async def write(self, member: str, adds: Sequence[str], removes: Sequence[str], *,
                    all_states: bool) -> list[Change]:
        """Add and remove users under ``member`` (its users set is a superset of the
        hashes' fields at every step); the transitions, or every resulting state with
        ``all_states``.  Raises LeaseLost (standalone only) for an add without lease."""
        users_key = member_key(member, "users")
        for i in range(0, len(adds), BATCH):
            await self._r.sadd(users_key, adds[i:i + BATCH])
        changes = await self._run(member, [(u, True) for u in adds] + [(u, False) for u in removes],
                                  all_states)
        for i in range(0, len(removes), BATCH):
            await self._r.srem(users_key, removes[i:i + BATCH])
        return changes

    async def sweep(self, member: str, extra: Iterable[str] = ()) -> list[Change]:
        """Remove ``member`` (dead or retired) from every user it wrote (its users set,
        plus ``extra``) and delete its keys; every resulting state."""
        users_key = member_key(member, "users")
        users = set(extra)
        async for u in self._r.sscan_iter(users_key, count=1000):
            users.add(_s(u))
        changes = await self._run(member, [(u, False) for u in sorted(users)], True)
        await self._r.delete([users_key, member_key(member, "alive")])
        await self._r.srem(MEMBERS_KEY, [member])
        return changes

    async def _run(self, member: str, calls: Sequence[tuple[str, bool]],
                   all_states: bool) -> list[Change]:
        changes: list[Change] = []
        delta = 0
        for i in range(0, len(calls), BATCH):
            chunk = calls[i:i + BATCH]
            async with self._r.pipeline(transaction=False) as pipe:
                requests = [self._presence(self._keys(user, member), [member, "1" if add else "0"],
                                           client=pipe) for user, add in chunk]
            lost = False
            for (user, _add), request in zip(chunk, requests):
                online, version, changed = (int(v) for v in await request)
                if online < 0:
                    lost = True
                    continue
                if changed:
                    self.transitions += 1
                    delta += 1 if online else -1
                if changed or all_states:
                    changes.append([user, online, version])
            if lost:
                await self.publish_changes(member, changes)
                raise LeaseLost(f"the lease of {member} is gone")
        if self._sharded and delta:  # (standalone: the script counted)
            await self._r.incrby(ONLINE_COUNT_KEY, delta)
        return changes

    def _keys(self, user: str, member: str) -> list[str]:
        if self._sharded:  # one slot per script on a Redis Cluster: counted afterwards
            return [online_key(user)]
        return [online_key(user), ONLINE_COUNT_KEY, member_key(member, "alive")]

    async def states(self, users: Sequence[str]) -> list[tuple[bool, int]]:
        """``(online, version)`` of each user, read now."""
        out: list[tuple[bool, int]] = []
        for i in range(0, len(users), BATCH):
            async with self._r.pipeline(transaction=False) as pipe:
                requests = [self._state([online_key(u)], [], client=pipe) for u in users[i:i + BATCH]]
            for request in requests:
                online, version = await request
                out.append((bool(int(online)), int(version)))
        return out

    async def online_users(self) -> int:
        count = await self._r.get(ONLINE_COUNT_KEY)
        return max(0, int(count)) if count is not None else 0

    # -- the channel ------------------------------------------------------------------

    async def publish_changes(self, member: str, changes: list[Change]) -> None:
        for i in range(0, len(changes), BATCH):
            await self.publish({"kind": "presence", "from": member, "changes": changes[i:i + BATCH]})

    async def publish(self, event: dict[str, Any]) -> None:
        data = orjson.dumps(event)
        if self._sharded:
            await self._r.spublish(CHANNEL, data)
        else:
            await self._r.publish(CHANNEL, data)
        self.published += 1


def _s(v: Any) -> str:
    return v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v)
