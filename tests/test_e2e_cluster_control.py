"""End to end, the cluster's control plane (docs/cluster.md, "Presence events and server
commands"): presence ``watch`` events from every node, ``POST /api/disconnect`` on every
node, and which node answered ``/healthz`` and ``/metrics`` -- real daemons sharing a
private redis-server, real clients.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

import trio

from redis_fixture import redis_server, require_coredis  # noqa: F401

require_coredis()
from tidings.client import TidingsClient  # noqa: E402

from test_api import aapi, metrics  # noqa: E402
from test_e2e_cluster import connect, start_node  # noqa: E402

TTL = 1.2  # presence_ttl_s: a tick every 0.4 s


async def watch(client: TidingsClient, *users: str) -> dict[str, bool]:
    return (await client.request({"type": "watch", "users": list(users)}))["users"]


async def presence_events(client: TidingsClient, n: int, timeout: float = 5.0) -> list[tuple[str, bool]]:
    got = []
    for _ in range(n):
        ev = await client.wait_for("presence", timeout=timeout)
        got.append((ev["user"], ev["online"]))
    return got


async def no_presence_event(client: TidingsClient, seconds: float = 0.6) -> None:
    await trio.sleep(seconds)
    await client.ping()
    assert [f for f in client.drain() if f["type"] == "presence"] == []


async def test_a_watcher_sees_users_come_and_go_on_every_node(redis_server, start_daemon, uniq):
    n1, n2, n3 = (start_node(start_daemon, redis_server, f"n{i}", ttl=TTL) for i in (1, 2, 3))
    alice, bob, carol = uniq("alice"), uniq("bob"), uniq("carol")
    async with AsyncExitStack() as stack:
        a = await connect(stack, n1, alice)
        c = await connect(stack, n3, carol)
        assert await watch(a, bob) == {bob: False}
        async with AsyncExitStack() as bobs:
            await connect(bobs, n2, bob)  # bob's first connection anywhere
            assert await presence_events(a, 1) == [(bob, True)]
            async with AsyncExitStack() as second:
                await connect(second, n3, bob)  # another node: not news
                await connect(second, n1, bob)  # and alice's own node
                await no_presence_event(a)
            await no_presence_event(a)  # two of three left: bob is still online
            # a watcher arriving now is told where things stand, cluster-wide
            assert await watch(c, bob, alice) == {bob: True, alice: True}
        assert await presence_events(a, 1) == [(bob, False)]  # the last one anywhere
        assert await presence_events(c, 1) == [(bob, False)]
        await no_presence_event(a, 0.2)


async def test_a_killed_node_s_users_go_offline_for_watchers(redis_server, start_daemon, uniq):
    n1 = start_node(start_daemon, redis_server, "n1", ttl=TTL)
    n2 = start_node(start_daemon, redis_server, "n2", ttl=TTL)
    alice, bob = uniq("alice"), uniq("bob")
    async with AsyncExitStack() as stack:
        a = await connect(stack, n1, alice)
        await watch(a, bob)
        async with AsyncExitStack() as doomed:
            await connect(doomed, n2, bob)
            assert await presence_events(a, 1) == [(bob, True)]
            n2.kill()  # SIGKILL: n2 never says bob left
            t0 = time.monotonic()
            assert await presence_events(a, 1, timeout=TTL * 3) == [(bob, False)]
            took = time.monotonic() - t0
        # within the lease (presence_ttl_s) plus one tick of the sweeping node
        assert took <= TTL + TTL / 3 + 1.0, f"offline {took:.2f}s after kill -9 (ttl {TTL}s)"


async def test_api_disconnect_closes_the_user_on_every_node(redis_server, start_daemon, uniq):
    n1, n2, n3 = (start_node(start_daemon, redis_server, f"n{i}", ttl=TTL) for i in (1, 2, 3))
    bob, carol = uniq("bob"), uniq("carol")
    async with AsyncExitStack() as stack:
        b1 = await connect(stack, n1, bob)
        b2 = await connect(stack, n2, bob)
        b3 = await connect(stack, n2, bob)
        c = await connect(stack, n2, carol)
        # one connection by id, asked of a node that does not hold it
        status, body = await aapi(n3, "POST", "/api/disconnect", {"user": bob, "conn": b2.conn})
        assert (status, body) == (200, {"closed": 1, "nodes": 3, "silent": []})
        assert await b2.wait_closed() == 1008
        assert (await b1.ping())["type"] == "pong" and (await b3.ping())["type"] == "pong"
        status, body = await aapi(n3, "POST", "/api/disconnect", {"user": bob, "conn": "c-gone"})
        assert (status, body) == (200, {"closed": 0, "nodes": 3, "silent": []})
        # every connection of bob, on n1 and n2, asked of n1
        status, body = await aapi(n1, "POST", "/api/disconnect", {"user": bob})
        assert (status, body) == (200, {"closed": 2, "nodes": 3, "silent": []})
        assert await b1.wait_closed() == 1008 and await b3.wait_closed() == 1008
        assert (await c.ping())["type"] == "pong"  # carol is untouched


async def test_healthz_and_metrics_name_the_node_and_count_everyone(redis_server, start_daemon, uniq):
    n1 = start_node(start_daemon, redis_server, "n1", ttl=TTL, node_id="web-1")
    n2 = start_node(start_daemon, redis_server, "n2", ttl=TTL, node_id="web-2")
    users = [uniq(f"u{i}") for i in range(3)]
    status, body = await aapi(n1, "GET", "/healthz", key=None)
    assert (status, body["node"], body["cluster"]) == (200, "web-1", "ok")
    assert (await aapi(n2, "GET", "/healthz", key=None))[1]["node"] == "web-2"
    async with AsyncExitStack() as stack:
        await connect(stack, n1, users[0])
        await connect(stack, n1, users[1])
        await connect(stack, n2, users[1])  # one user on two nodes counts once
        await connect(stack, n2, users[2])

        async def gauges() -> tuple[float | None, ...]:
            out = []
            for d in (n1, n2):
                m = await trio.to_thread.run_sync(metrics, d)
                out.append(m.get("tidings_cluster_users_online"))
            return tuple(out)

        with trio.fail_after(5):
            while await gauges() != (3, 3):
                await trio.sleep(0.1)
        m1 = await trio.to_thread.run_sync(metrics, n1)
        assert m1["tidings_node_info{node=web-1}"] == 1
        assert m1["tidings_users_online"] == 2  # this node's own
    with trio.fail_after(5):  # every connection closed: nobody online
        while await gauges() != (0, 0):
            await trio.sleep(0.1)
