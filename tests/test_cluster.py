"""Cluster: channels with refcounts, presence across nodes, fault handling.

Two (or three) Cluster objects play the nodes of a cluster, in one trio test, against
a private redis-server (tests/redis_fixture.py); a RedisStore publishes like the hub
would.
"""

from __future__ import annotations

import time

import orjson
import pytest
import trio
from redis_fixture import redis_cluster, redis_server, require_coredis  # noqa: F401

require_coredis()
import coredis  # noqa: E402

from tidings.cluster import Cluster, ClusterUnavailable, open_cluster
from tidings.store import NewMessage, StoreLimits
from tidings.store.redis import open_redis_store


class Node:
    """Records what a node's callbacks receive."""

    def __init__(self) -> None:
        self.got: list[tuple[str, int, dict]] = []
        self.resyncs: list[list[str]] = []

    def on_message(self, msg) -> None:
        self.got.append((msg.recipient, msg.seq, msg))

    def on_resync(self, users: list[str]) -> None:
        self.resyncs.append(users)

    async def wait_for(self, n: int, timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            while len(self.got) < n:
                await trio.sleep(0.01)


_n = 0


def new(sender: str, recipient: str) -> NewMessage:
    global _n
    _n += 1
    return NewMessage(f"m{_n:06d}", sender, recipient, orjson.dumps({"n": _n}), 1000 + _n)


async def wait_until(predicate, timeout: float = 5.0, step: float = 0.02) -> float:
    t0 = time.monotonic()
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(step)
    return time.monotonic() - t0


async def test_hold_release_route_only_to_the_holding_node(redis_server):
    a, b = Node(), Node()
    async with (
        open_redis_store(redis_server.url, limits=StoreLimits(), node_id="s") as store,
        open_cluster(redis_server.url, "A", 3.0, a.on_message, on_resync=a.on_resync) as ca,
        open_cluster(redis_server.url, "B", 3.0, b.on_message, on_resync=b.on_resync) as cb,
    ):
        await wait_until(lambda: _true(ca.healthy and cb.healthy))
        assert await ca.hold("alice") is True
        assert await ca.hold("alice") is True   # second connection: refcount only
        assert await cb.hold("bob") is True
        res = await store.append([new("x", "alice"), new("x", "bob"), new("x", "carol")])
        assert [(r.seq, r.receivers) for r in res] == [(1, 1), (1, 1), (1, 0)]
        await a.wait_for(1)
        await b.wait_for(1)
        assert [(u, s) for u, s, _ in a.got] == [("alice", 1)]
        assert [(u, s) for u, s, _ in b.got] == [("bob", 1)]
        m = a.got[0][2]
        assert (m.sender, m.recipient, m.seq) == ("x", "alice", 1)
        assert (await store.read_inbox("alice", 0, 1)) == [m]  # exactly what was stored
        # both nodes hold alice: both get it, in seq order
        assert await cb.hold("alice") is True
        res = await store.append([new("x", "alice"), new("x", "alice")])
        assert [(r.seq, r.receivers) for r in res] == [(2, 2), (3, 2)]
        await a.wait_for(3)
        await b.wait_for(3)
        assert [s for u, s, _ in a.got if u == "alice"] == [1, 2, 3]
        # A's connections leave: one release keeps the channel, the last one drops it
        ca.release("alice")
        res = await store.append([new("x", "alice")])
        assert res[0].receivers == 2
        ca.release("alice")
        ca.release("alice")  # extra releases are ignored
        await wait_until(lambda: _receivers(store, "alice", 1))
        assert a.resyncs == [] and b.resyncs == []
        st = ca.statistics()
        assert st.healthy and st.held_users == 0 and st.gaps == 0


async def _true(value: bool) -> bool:
    return value


async def _receivers(store, user: str, want: int) -> bool:
    res = await store.append([new("x", user)])
    return res[0].receivers == want


async def test_presence_sums_across_nodes_and_updates_promptly(redis_server):
    a, b = Node(), Node()
    async with (
        open_cluster(redis_server.url, "A", 3.0, a.on_message) as ca,
        open_cluster(redis_server.url, "B", 3.0, b.on_message) as cb,
    ):
        await wait_until(lambda: _true(ca.healthy and cb.healthy))
        await ca.hold("alice")
        await ca.hold("alice")
        await cb.hold("alice")
        await cb.hold("bob")

        async def sums(want):
            return (await ca.presence(["alice", "bob", "carol"])) == want

        await wait_until(lambda: sums({"alice": 3, "bob": 1, "carol": 0}), timeout=2)
        assert await cb.presence(["alice", "alice"]) == {"alice": 3}
        cb.release("alice")
        cb.release("bob")
        # much faster than the refresh interval (presence_ttl_s / 3 = 1 s)
        elapsed = await wait_until(lambda: sums({"alice": 2, "bob": 0, "carol": 0}), timeout=2)
        assert elapsed < 0.5
    # clean shutdown withdraws presence at once
    async with open_cluster(redis_server.url, "C", 3.0, Node().on_message) as cc:
        assert await cc.presence(["alice", "bob"]) == {"alice": 0, "bob": 0}


async def test_devices_online_are_joined_across_nodes_and_follow_connections(redis_server):
    on_a = {"alice": ["phone"]}
    on_b = {"alice": ["laptop", "phone"], "bob": ["tv"]}
    async with (
        open_cluster(redis_server.url, "A", 3.0, Node().on_message) as ca,
        open_cluster(redis_server.url, "B", 3.0, Node().on_message) as cb,
    ):
        ca.devices_of = lambda user: on_a.get(user, [])
        cb.devices_of = lambda user: on_b.get(user, [])
        await wait_until(lambda: _true(ca.healthy and cb.healthy))
        await ca.hold("alice")
        for user in ("alice", "bob"):
            await cb.hold(user)

        async def seen(want):
            return (await ca.devices(["alice", "bob", "carol"])) == want

        await wait_until(lambda: seen({"alice": {"phone", "laptop"}, "bob": {"tv"},
                                       "carol": set()}), timeout=2)
        on_b.pop("bob")
        cb.release("bob")  # bob's last connection on B: his devices go with it
        await wait_until(lambda: seen({"alice": {"phone", "laptop"}, "bob": set(),
                                       "carol": set()}), timeout=2)
        assert await cb.devices([]) == {}
    async with open_cluster(redis_server.url, "C", 3.0, Node().on_message) as cc:
        assert await cc.devices(["alice"]) == {"alice": set()}  # withdrawn at shutdown


async def test_a_node_that_stops_refreshing_is_offline_within_the_ttl(redis_server):
    ttl = 1.0
    async with open_cluster(redis_server.url, "A", ttl, Node().on_message) as ca:
        # node B "killed -9": its tasks stop without any cleanup
        client = coredis.Redis.from_url(redis_server.url)
        async with client, trio.open_nursery() as nursery:
            cb = Cluster(client, node_id="B", presence_ttl_s=ttl, on_message=Node().on_message)
            await nursery.start(cb.run)
            await cb.hold("bob")
            await wait_until(lambda: _presence_is(ca, "bob", 1), timeout=2)
            nursery.cancel_scope.cancel()
        killed = time.monotonic()
        await wait_until(lambda: _presence_is(ca, "bob", 0), timeout=ttl + 2)
        assert time.monotonic() - killed <= ttl + 0.25
        r = coredis.Redis.from_url(redis_server.url)
        async with r:
            assert b"B" not in await r.smembers("tidings:nodes")  # dead node swept


async def _presence_is(node, user, n) -> bool:
    return (await node.presence([user]))[user] == n


async def test_redis_restart_unhealthy_then_resubscribes(redis_server):
    a = Node()
    async with open_cluster(redis_server.url, "A", 1.5, a.on_message, on_resync=a.on_resync,
                            command_timeout=1.0, backoff_max=0.5) as ca:
        await wait_until(lambda: _true(ca.healthy))
        assert await ca.hold("alice")
        async with open_redis_store(redis_server.url, limits=StoreLimits(), node_id="s") as store:
            await store.append([new("x", "alice")])
            await a.wait_for(1)
            redis_server.stop()
            await wait_until(lambda: _true(not ca.healthy), timeout=3)
            with pytest.raises(ClusterUnavailable):
                await ca.presence(["alice"])
            assert await ca.hold("bob") is False       # Redis down: not live (yet)
            assert ca.statistics().subscribed is False
            await wait_until(lambda: _true(ca.statistics().presence_ok is False), timeout=5)
            redis_server.start()
            await wait_until(lambda: _true(ca.healthy), timeout=10)
            assert sorted(a.resyncs[-1]) == ["alice", "bob"]  # replay them from the store
            await wait_until(lambda: _receivers(store, "bob", 1), timeout=5)
            await store.append([new("x", "alice")])
            await wait_until(lambda: _true(any(u == "alice" for u, _, _ in a.got[1:])))
            assert (await ca.presence(["alice", "bob"])) == {"alice": 1, "bob": 1}
            st = ca.statistics()
            assert st.sessions >= 2 and st.disconnects >= 1 and st.presence_failures >= 1


async def test_cluster_starts_while_redis_is_down(redis_server):
    redis_server.stop()
    a = Node()
    async with open_cluster(redis_server.url, "A", 1.5, a.on_message, on_resync=a.on_resync,
                            backoff_max=0.3) as ca:
        assert not ca.healthy
        assert await ca.hold("alice") is False
        redis_server.start()
        await wait_until(lambda: _true(ca.healthy), timeout=10)
        assert a.resyncs == [["alice"]]
        async with open_redis_store(redis_server.url, limits=StoreLimits(), node_id="s") as store:
            await store.append([new("x", "alice")])
            await a.wait_for(1)


async def test_seq_gap_triggers_resync_and_callback_errors_are_contained(redis_server):
    a = Node()
    calls = []

    def on_message(msg):
        calls.append(msg.seq)
        if msg.seq == 2:
            raise RuntimeError("router bug")
        a.on_message(msg)

    async with open_cluster(redis_server.url, "A", 3.0, on_message, on_resync=a.on_resync) as ca:
        await wait_until(lambda: _true(ca.healthy))
        await ca.hold("alice")
        r = coredis.Redis.from_url(redis_server.url)
        async with r:
            ch = "tidings:{alice}:ch"
            await r.publish(ch, b'1\n["m1","x",1]\n"a"')
            await r.publish(ch, b'2\n["m2","x",2]\n"b"')
            await r.publish(ch, b'5\n["m5","x",5]\n"e"')   # 3 and 4 were missed
            await r.publish(ch, b"garbage")
            await r.publish("tidings:{nobody}:ch", b'1\n["m","x",1]\n1')
        await wait_until(lambda: _true(len(calls) == 3))
        assert a.resyncs == [["alice"]]
        st = ca.statistics()
        assert st.gaps == 1 and st.callback_errors == 1 and st.ignored == 1
        assert ca.healthy  # the subscription survived the callback's exception


async def test_on_a_redis_cluster_sharded_pubsub_and_presence(redis_cluster):
    a, b = Node(), Node()
    url = redis_cluster.url
    async with (
        open_redis_store(url, limits=StoreLimits(), node_id="s", cluster=True) as store,
        open_cluster(url, "A", 3.0, a.on_message, cluster=True) as ca,
        open_cluster(url, "B", 3.0, b.on_message, cluster=True) as cb,
    ):
        await wait_until(lambda: _true(ca.healthy and cb.healthy), timeout=10)
        users = [f"user{i}" for i in range(12)]  # spread over the three shards
        for u in users[:6]:
            assert await ca.hold(u)
        for u in users[6:]:
            assert await cb.hold(u)
        res = await store.append([new("x", u) for u in users] + [new("x", "nobody")])
        assert [r.receivers for r in res] == [1] * 12 + [0]
        await a.wait_for(6)
        await b.wait_for(6)
        assert sorted(u for u, _, _ in a.got) == sorted(users[:6])
        assert sorted(u for u, _, _ in b.got) == sorted(users[6:])
        await wait_until(lambda: _presence_is(ca, "user7", 1), timeout=2)
        assert (await cb.presence(users))["user0"] == 1


async def test_release_then_hold_again_quickly_keeps_the_channel(redis_server):
    a = Node()
    async with (
        open_redis_store(redis_server.url, limits=StoreLimits(), node_id="s") as store,
        open_cluster(redis_server.url, "A", 3.0, a.on_message, on_resync=a.on_resync) as ca,
    ):
        await wait_until(lambda: _true(ca.healthy))
        for _ in range(20):
            assert await ca.hold("alice")
            ca.release("alice")
            await trio.sleep(0)
        assert await ca.hold("alice")
        await trio.sleep(0.3)  # every unsubscribe acknowledged by now
        await wait_until(lambda: _receivers(store, "alice", 1))
        await a.wait_for(1)
        st = ca.statistics()
        assert st.sessions == 1 and a.resyncs == [] and st.active_channels == 1


async def test_server_side_unsubscribe_restarts_the_session(redis_server):
    # what a Redis Cluster does when a slot migrates: SUNSUBSCRIBE pushed to us
    a = Node()
    async with open_cluster(redis_server.url, "A", 3.0, a.on_message,
                            on_resync=a.on_resync, backoff_max=0.2) as ca:
        await wait_until(lambda: _true(ca.healthy))
        assert await ca.hold("alice")
        ca._dispatch({"type": "sunsubscribe", "channel": b"tidings:{alice}:ch", "data": 0})
        await wait_until(lambda: _true(ca.statistics().sessions == 2 and ca.healthy))
        assert a.resyncs == [["alice"]]
