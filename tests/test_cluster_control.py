"""cluster/control.py: presence transitions cluster-wide, versions, dead and lost
members, disconnect requests, the online-users gauge.

Several Control objects play the nodes, in one trio test, against a private
redis-server (tests/redis_fixture.py).  Waits are bounded and poll Redis or the
recorded callbacks; ``presence_ttl_s`` is short so ticks come every 0.2-0.3 s.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack, asynccontextmanager

import orjson
import pytest
import trio
from redis_fixture import redis_cluster, redis_server, require_coredis  # noqa: F401

require_coredis()
import coredis  # noqa: E402
from coredis.retry import NoRetryPolicy  # noqa: E402

from tidings.cluster.control import Control, open_control  # noqa: E402
from tidings.cluster.control_lua import (  # noqa: E402
    CHANNEL, MEMBERS_KEY, ONLINE_COUNT_KEY, member_key, online_key,
)
from tidings.cluster.node import ClusterUnavailable  # noqa: E402

TTL = 0.9  # a tick every 0.3 s


class Node:
    """What one node's callbacks see; watches every user in ``watching``."""

    def __init__(self, name: str, watching: tuple[str, ...] = ("bob",), conns: int = 0) -> None:
        self.name = name
        self.watching = set(watching)
        self.events: list[tuple[str, bool]] = []
        self.conns = conns  # connections this node "closes" on a disconnect request
        self.disconnects: list[tuple[str, str | None]] = []

    def on_presence(self, user: str, online: bool) -> None:
        self.events.append((user, online))

    def is_watched(self, user: str) -> bool:
        return user in self.watching

    def watched_users(self) -> list[str]:
        return sorted(self.watching)

    def on_disconnect(self, user: str, conn: str | None) -> int:
        self.disconnects.append((user, conn))
        return self.conns

    def callbacks(self) -> dict:
        return dict(on_presence=self.on_presence, is_watched=self.is_watched,
                    watched_users=self.watched_users, on_disconnect=self.on_disconnect)


def control(url: str, node: Node, ttl: float = TTL, **kw):
    return open_control(url, node.name, ttl, **node.callbacks(), **kw)


@asynccontextmanager
async def raw(url: str, cluster: bool = False):
    kwargs = dict(retry_policy=NoRetryPolicy(), connect_timeout=2, stream_timeout=5)
    client = (coredis.RedisCluster.from_url(url, **kwargs) if cluster
              else coredis.Redis.from_url(url, **kwargs))
    async with client:
        yield client


async def until(predicate, timeout: float = 5.0, what: str = "") -> float:
    t0 = time.monotonic()
    try:
        with trio.fail_after(timeout):
            while not await predicate():
                await trio.sleep(0.02)
    except trio.TooSlowError:
        raise AssertionError(f"not within {timeout}s: {what}") from None
    return time.monotonic() - t0


async def joined(*controls: Control) -> None:
    async def ok() -> bool:
        return all(c.healthy and c.member for c in controls)
    await until(ok, what="members joined and subscribed")


async def holders(r, user: str) -> int:
    """Members holding ``user`` (fields of its online hash besides ``v``)."""
    return max(0, await r.hlen(online_key(user)) - 1)


async def test_first_and_last_connection_on_any_node_are_the_transitions(redis_server):
    a, b = Node("A"), Node("B")
    async with raw(redis_server.url) as r, control(redis_server.url, a) as ca, \
            control(redis_server.url, b) as cb:
        await joined(ca, cb)
        ca.local_presence("bob", True)  # bob's first connection anywhere: online
        await until(lambda: _true(a.events and b.events), what="online event on both nodes")
        assert a.events == b.events == [("bob", True)]
        cb.local_presence("bob", True)  # a second node: no event
        await until(lambda: _eq(holders(r, "bob"), 2), what="two holders")
        ca.local_presence("bob", False)  # one of two nodes left (n = 1): still online
        await until(lambda: _eq(holders(r, "bob"), 1), what="one holder")
        ca.local_presence("carol", True)  # (an unwatched user: nobody hears of her)
        await until(lambda: _eq(holders(r, "carol"), 1), what="carol held")
        assert a.events == b.events == [("bob", True)]
        cb.local_presence("bob", False)  # the last one anywhere (n = 0): offline
        await until(lambda: _true(len(a.events) == len(b.events) == 2), what="offline event")
        assert a.events == b.events == [("bob", True), ("bob", False)]
        assert await r.exists([online_key("bob")]) == 0
        # the gauge: carol only
        await until(lambda: _true(ca.online_users == 1 and cb.online_users == 1), what="gauge 1")
        assert int(await r.get(ONLINE_COUNT_KEY)) == 1
        assert ca.statistics().transitions == 2 and cb.statistics().transitions == 1


async def test_a_repeated_report_changes_nothing(redis_server):
    a = Node("A")
    async with raw(redis_server.url) as r, control(redis_server.url, a) as ca:
        await joined(ca)
        for _ in range(3):
            ca.local_presence("bob", True)
        await until(lambda: _true(a.events), what="online")
        for _ in range(3):
            ca.local_presence("bob", False)
        await until(lambda: _true(len(a.events) == 2), what="offline")
        await trio.sleep(0.3)
        assert a.events == [("bob", True), ("bob", False)]
        assert int(await r.get(ONLINE_COUNT_KEY)) == 0


@pytest.mark.parametrize(("known", "event", "told"), [
    ((10, True), (5, False), []),           # older: ignored
    ((10, True), (10, True), []),           # the same state again
    ((10, True), (10, False), [False]),     # same version, other state: the event wins
    ((10, True), (11, True), []),           # newer, same state: nothing to tell
    ((10, True), (11, False), [False]),     # newer, other state: told
])
async def test_events_apply_only_when_newer(redis_server, known, event, told):
    a = Node("A", watching=("bob", "zed"))
    async with raw(redis_server.url) as r, control(redis_server.url, a) as ca:
        await joined(ca)

        base = int((time.time() + 100) * 1e6)  # newer than the states read at start

        async def publish(user: str, version: int, online: bool) -> None:
            data = orjson.dumps({"kind": "presence", "from": "test/0",
                                 "changes": [[user, int(online), base + version]]})
            await r.publish(CHANNEL, data)

        await publish("bob", *known)
        await until(lambda: _true(a.events == [("bob", known[1])]), what="known state")
        await publish("bob", *event)
        await publish("zed", 1, True)  # one channel, in order: after this, bob's is done
        await until(lambda: _true(("zed", True) in a.events), what="the marker")
        assert [e for e in a.events if e[0] == "bob"] == [("bob", known[1])] + [("bob", s) for s in told]


async def test_watch_state_reads_every_node_and_merges(redis_server):
    a, b = Node("A", watching=()), Node("B")
    async with control(redis_server.url, a) as ca, control(redis_server.url, b) as cb:
        await joined(ca, cb)
        cb.local_presence("bob", True)
        await until(lambda: _true(b.events == [("bob", True)]), what="bob online")
        assert await ca.watch_state(["bob", "carol", "bob"]) == {"bob": True, "carol": False}
        assert a.events == []  # nobody on A watches: nothing told
        a.watching.add("carol")
        cb.local_presence("carol", True)
        await until(lambda: _true(a.events == [("carol", True)]), what="carol online on A")
        assert await ca.watch_state(["carol"]) == {"carol": True}
        assert a.events == [("carol", True)]  # the read is not newer news


async def test_a_dead_member_is_swept_within_the_ttl(redis_server):
    """A node killed with -9: its lease expires, another node sweeps it."""
    a, b = Node("A"), Node("B")
    async with raw(redis_server.url) as r, control(redis_server.url, b) as cb:
        client = coredis.Redis.from_url(redis_server.url, retry_policy=NoRetryPolicy())
        async with client, trio.open_nursery() as nursery:  # A, without its withdrawal
            ca = Control(client, node_id="A", presence_ttl_s=TTL, **a.callbacks())
            await nursery.start(ca.run)
            await joined(ca, cb)
            ca.local_presence("bob", True)
            ca.local_presence("dave", True)
            cb.local_presence("dave", True)
            await until(lambda: _eq(holders(r, "dave"), 2), what="dave on both")
            # A must have published bob's online: killed between its write and its
            # publish, nobody would have heard bob go online, nor hear him go offline
            await until(lambda: _true(b.events == [("bob", True)]), what="bob online on B")
            dead = ca.member
            nursery.cancel_scope.cancel()  # "kill -9"
        t0 = time.monotonic()
        await until(lambda: _true(("bob", False) in b.events), timeout=TTL + 2, what="bob offline")
        took = time.monotonic() - t0
        assert took <= TTL + TTL / 3 + 0.5, took
        assert await holders(r, "dave") == 1  # B still holds dave: no offline for him
        assert await r.sismember(MEMBERS_KEY, dead) == 0
        assert await r.exists([member_key(dead, "users")]) == 0
        assert cb.statistics().swept == 1
        await until(lambda: _true(cb.online_users == 1), what="gauge: dave only")


async def test_a_member_that_lost_its_lease_rejoins_without_a_flap(redis_server):
    """The lease vanished (a node stopped past the TTL with nobody to sweep it, or
    Redis lost it): the node joins as a new member before retiring the old one, so its
    users never look offline."""
    a = Node("A")
    async with raw(redis_server.url) as r, control(redis_server.url, a) as ca:
        await joined(ca)
        ca.local_presence("bob", True)
        await until(lambda: _true(a.events == [("bob", True)]), what="bob online")
        old = ca.member
        await r.delete([member_key(old, "alive")])
        await until(lambda: _true(ca.member != old and ca.healthy), what="rejoined")
        await until(lambda: _eq(r.sismember(MEMBERS_KEY, old), 0), what="old member retired")
        fields = {k.decode() for k in await r.hkeys(online_key("bob"))}
        assert fields == {"v", ca.member}
        await trio.sleep(0.3)
        assert a.events == [("bob", True)]
        assert ca.statistics().rejoins == 1


async def test_a_member_without_a_lease_cannot_add_a_user(redis_server):
    """Its lease expired (it may have been swept already): the script refuses the add,
    so a swept member never leaves a field behind; the node rejoins and writes it."""
    a = Node("A")
    async with raw(redis_server.url) as r, control(redis_server.url, a, ttl=30.0) as ca:
        await joined(ca)  # (ttl 30: no tick renews the lease during the test)
        old = ca.member
        await r.delete([member_key(old, "alive")])
        ca.local_presence("bob", True)
        await until(lambda: _true(a.events == [("bob", True)]), what="bob online")
        fields = {k.decode() for k in await r.hkeys(online_key("bob"))}
        assert ca.member != old and fields == {"v", ca.member}
        assert ca.statistics().rejoins == 1


async def test_disconnect_asks_every_live_member(redis_server):
    a, b, c = Node("A"), Node("B", conns=2), Node("C", conns=1)
    async with raw(redis_server.url) as r, control(redis_server.url, a, command_timeout=1.0) as ca, \
            control(redis_server.url, b) as cb, control(redis_server.url, c) as cc:
        await joined(ca, cb, cc)
        result = await ca.disconnect("bob", None)
        assert (result.closed, result.answered, result.silent) == (3, ("B", "C"), ())
        assert a.disconnects == [] and b.disconnects == c.disconnects == [("bob", None)]
        result = await cb.disconnect("bob", "c1-2")
        assert (result.closed, result.answered) == (1 + 0, ("A", "C"))
        assert c.disconnects[-1] == ("bob", "c1-2")
        # a live member that does not answer (stopped): reported after the timeout
        await r.set(member_key("Z/1", "alive"), "1", px=60_000)
        await r.sadd(MEMBERS_KEY, ["Z/1"])
        t0 = time.monotonic()
        result = await ca.disconnect("bob", None)
        assert time.monotonic() - t0 == pytest.approx(1.0, abs=0.5)
        assert (result.closed, result.answered, result.silent) == (3, ("B", "C"), ("Z",))


async def test_redis_restart_without_persistence_rebuilds_everything(redis_server):
    """Redis comes back empty: every member's writes fail or find the lease gone, so
    each joins anew and writes what it holds; watchers are re-read."""
    a, b = Node("A"), Node("B")
    async with raw(redis_server.url) as r, control(redis_server.url, a) as ca, \
            control(redis_server.url, b) as cb:
        await joined(ca, cb)
        ca.local_presence("bob", True)
        cb.local_presence("carol", True)
        await until(lambda: _true(ca.online_users == 2), what="gauge 2")
        await trio.to_thread.run_sync(redis_server.stop)
        await until(lambda: _true(not ca.healthy and not cb.healthy), what="unhealthy")
        cb.local_presence("carol", False)  # while Redis is down
        cb.local_presence("dave", True)
        await trio.to_thread.run_sync(redis_server.start)
        await until(lambda: _true(ca.healthy and cb.healthy), timeout=15, what="healthy again")
        await until(lambda: _eq(holders(r, "bob"), 1), timeout=5, what="bob rewritten")
        await until(lambda: _eq(holders(r, "dave"), 1), timeout=5, what="dave written")
        await until(lambda: _eq(r.get(ONLINE_COUNT_KEY), b"2"), timeout=5, what="gauge rebuilt")
        assert ca.statistics().rejoins == cb.statistics().rejoins == 1
        assert await r.exists([online_key("carol")]) == 0
        assert ("bob", True) in a.events and a.events[-1] == ("bob", True)


async def test_on_a_redis_cluster_the_gauge_and_events_work_too(redis_cluster):
    a, b = Node("A"), Node("B")
    url = redis_cluster.url
    async with AsyncExitStack() as stack:
        ca = await stack.enter_async_context(control(url, a, cluster=True))
        cb = await stack.enter_async_context(control(url, b, cluster=True))
        await joined(ca, cb)
        for user in ("bob", "carol", "dave"):  # (different slots)
            ca.local_presence(user, True)
        cb.local_presence("bob", True)
        await until(lambda: _true(b.events == [("bob", True)]), what="bob online on B")
        await until(lambda: _true(cb.online_users == 3), what="gauge 3")
        ca.local_presence("bob", False)
        ca.local_presence("carol", False)
        await until(lambda: _true(cb.online_users == 2), what="gauge 2")
        assert b.events == [("bob", True)]
        cb.local_presence("bob", False)
        await until(lambda: _true(a.events == [("bob", True), ("bob", False)]), what="offline")


async def test_watch_state_raises_when_redis_is_unreachable():
    a = Node("A")
    async with open_control("redis://127.0.0.1:1/0", "A", TTL, **a.callbacks(),
                            connect_timeout=0.2, command_timeout=0.5) as ca:
        with pytest.raises(ClusterUnavailable):
            await ca.watch_state(["bob"])
        with pytest.raises(ClusterUnavailable):
            await ca.disconnect("bob", None)
        assert not ca.healthy


async def _true(value) -> bool:
    return bool(value)


async def _eq(awaitable, want) -> bool:
    return (await awaitable) == want
