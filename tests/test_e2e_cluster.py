"""End to end, cluster mode: several real daemons (subprocesses) sharing one private
redis-server (tests/redis_fixture.py), as documented in docs/cluster.md.

Every node serves every user; a send is stored once in Redis and published on the
recipient's channel, so it reaches every node holding that user's connections.  In cluster
mode ``ack.delivered`` counts *nodes* subscribed to the recipient (not connections).

Each test gets its own redis-server; every wait is bounded (``trio.fail_after`` or the
client's own timeouts).  ``test_workers_*`` covers ``server.workers`` (SO_REUSEPORT worker
processes under a supervisor) and is kept separate on purpose.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio

from tidings.client import ConnectionClosedError, ServerError, TidingsClient, open_client

from conftest import TEST_SECRET, merge_config, replay_until_resumed, write_toml
from redis_fixture import free_port, redis_server, require_coredis  # noqa: F401

require_coredis()
from tidings.store.redis import user_tag  # (after require_coredis: it imports coredis)

FAST = {"messages_per_second": 100000.0, "burst": 100000}
MSG_ID_RE = re.compile(r"^[0-9a-f]{24}$")
AOF_ALWAYS = {"appendonly": True, "appendfsync": "always"}


# -- helpers ---------------------------------------------------------------------------
def start_node(start_daemon, redis, name: str, *, ttl: float = 15.0,
               node_id: str | None = "", **sections: dict) -> Any:
    """One cluster node on ``redis``.  ``store.backend = "redis"`` is passed explicitly
    (the conftest default is "sqlite", which a cluster node must refuse)."""
    cluster = {"redis_url": redis.url, "presence_ttl_s": ttl}
    if node_id == "":
        node_id = f"{name}-{os.urandom(2).hex()}"
    if node_id:
        cluster["node_id"] = node_id
    base = {"cluster": cluster, "store": {"backend": "redis"}, "limits": dict(FAST)}
    return start_daemon(merge_config(base, sections))


async def collect_until_quiet(seen: list, acked, client, *, quiet: float, limit: float) -> None:
    """Wait until nothing new arrived for ``quiet`` s and every acked msg_id was seen
    (or the client closed); give up after ``limit`` s and let the caller's assertions
    say what is missing."""
    with trio.move_on_after(limit):
        while True:
            n = len(seen)
            await trio.sleep(quiet)
            if len(seen) == n and (set(acked) <= _ids(seen) or client.closed_code):
                return


async def connect(stack: AsyncExitStack, d, user: str, **kw: Any) -> TidingsClient:
    """Open a client on daemon ``d`` inside ``stack`` and consume its initial replay
    up to ``resumed`` (the replayed messages are kept in ``client.replayed``)."""
    c = await stack.enter_async_context(open_client(d.url, token=d.token(user), **kw))
    c.replayed, c.first_resumed = await replay_until_resumed(c)
    return c


async def quiet(client: TidingsClient, seconds: float = 0.3) -> list[dict]:
    """Frames that arrive within ``seconds`` (to prove nothing extra comes)."""
    await trio.sleep(seconds)
    return client.drain()


async def presence_of(client: TidingsClient, user: str) -> dict:
    return (await client.presence([user]))["users"][user]


async def wait_presence(client: TidingsClient, user: str, *, online: bool,
                        connections: int, timeout: float = 3.0) -> float:
    """Poll ``presence`` until ``user`` shows (online, connections); return the time."""
    t0 = time.monotonic()
    last = None
    try:
        with trio.fail_after(timeout):
            while True:
                last = await presence_of(client, user)
                if last["online"] is online and last["connections"] == connections:
                    return time.monotonic() - t0
                await trio.sleep(0.05)
    except trio.TooSlowError:
        raise AssertionError(f"presence of {user} never became online={online} "
                             f"connections={connections} within {timeout}s; last: {last}") from None


async def http_status(port: int, path: str = "/healthz", timeout: float = 8.0) -> int:
    """Status code of a plain ``GET path`` on 127.0.0.1:port."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: t\r\n"
                                  "Connection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
    return int(data.split(b" ", 2)[1])


async def wait_health(d, want: int, timeout: float) -> float:
    t0 = time.monotonic()
    status = None
    try:
        with trio.fail_after(timeout):
            while True:
                try:
                    status = await http_status(d.api_port, timeout=max(0.5, timeout / 2))
                except (OSError, trio.TooSlowError) as exc:
                    status = repr(exc)
                if status == want:
                    return time.monotonic() - t0
                await trio.sleep(0.1)
    except trio.TooSlowError:
        raise AssertionError(f"/healthz of {d.url} never answered {want} within "
                             f"{timeout}s (last: {status})") from None


def redis_call(port: int, *args: str, timeout: float = 5.0) -> bytes | int | None:
    """One command on the private redis (RESP); a bulk string, an integer or None."""
    req = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(req)
        data = b""
        while not data.endswith(b"\r\n") or (data.startswith(b"$") and data.count(b"\r\n") < 2
                                               and not data.startswith(b"$-1")):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    if data.startswith(b":"):
        return int(data[1:-2])
    if data.startswith(b"$-1"):
        return None
    if data.startswith(b"$"):
        return data.split(b"\r\n", 2)[1]
    raise AssertionError(f"redis answered {data!r} to {args}")


async def wait_stored_cursor(redis, user: str, seq: int, timeout: float = 3.0,
                             device: str = "default") -> None:
    """Wait until the ack cursor of ``user``'s ``device`` is ``seq`` in Redis
    (docs/cluster.md, key ``tidings:{T}:dev`` field ``c:<device>``).  Cursor writes are
    coalesced, so an ``acked`` reply only promises the write is queued; another node
    reads the stored value."""
    key = f"tidings:{{{user_tag(user)}}}:dev"
    value = None
    t0 = time.monotonic()
    try:
        with trio.fail_after(timeout):
            while True:
                value = await trio.to_thread.run_sync(redis_call, redis.port, "HGET", key,
                                                      f"c:{device}")
                if value is not None and int(value) == seq:
                    print(f"cursor {seq} of {user} stored after {time.monotonic() - t0:.3f}s")
                    return
                await trio.sleep(0.02)
    except trio.TooSlowError:
        raise AssertionError(f"cursor of {user} in Redis is {value!r}, not {seq}, "
                             f"{timeout}s after the acked reply") from None


def check_ack(ack: dict, *, delivered: int | None = None, min_delivered: int = 0) -> None:
    assert ack["type"] == "ack", ack
    assert isinstance(ack["seq"], int) and ack["seq"] >= 1, ack
    assert MSG_ID_RE.match(ack["msg_id"]), ack
    if delivered is not None:
        assert ack["delivered"] == delivered, ack
    assert ack["delivered"] >= min_delivered, ack


def seq_anomalies(frames: list[dict]) -> list[str]:
    """Walk what a receiver saw: after a ``resumed`` frame with ``since=S`` the next
    message must be S+1 (an explicit resume point); otherwise each message must be the
    previous seq + 1.  Returns the violations (duplicates, gaps, reordering)."""
    out = []
    expect = None
    highest = 0
    for f in frames:
        if f["type"] == "resumed":
            if f["since"] > highest:
                out.append(f"resumed since={f['since']} skips seqs after {highest}")
            expect = f["since"] + 1
        elif f["type"] == "message":
            if expect is not None and f["seq"] != expect:
                kind = "duplicate" if f["seq"] <= highest else "gap"
                out.append(f"{kind}: seq {f['seq']} where {expect} was due")
            expect = f["seq"] + 1
            highest = max(highest, f["seq"])
    return out


# -- 1. chat across nodes -------------------------------------------------------------
async def test_users_on_different_nodes_chat_both_directions(redis_server, start_daemon, uniq):
    n1 = start_node(start_daemon, redis_server, "n1")
    n2 = start_node(start_daemon, redis_server, "n2")
    alice, bob = uniq("alice"), uniq("bob")
    async with AsyncExitStack() as stack:
        a = await connect(stack, n1, alice)
        b = await connect(stack, n2, bob)
        for i in range(3):
            ack = await a.send(bob, {"n": i, "via": "n1"})
            check_ack(ack, delivered=1)  # one NODE holds bob
            assert ack["seq"] == i + 1
            m = await b.receive_message()
            assert (m["from"], m["to"], m["body"]) == (alice, bob, {"n": i, "via": "n1"})
            assert (m["msg_id"], m["seq"]) == (ack["msg_id"], ack["seq"])
        for i in range(3):
            ack = await b.send(alice, f"back {i}")
            check_ack(ack, delivered=1)
            assert ack["seq"] == i + 1  # alice's own inbox
            m = await a.receive_message()
            assert (m["from"], m["to"], m["body"]) == (bob, alice, f"back {i}")
            assert (m["msg_id"], m["seq"]) == (ack["msg_id"], ack["seq"])
        # the sender's connection gets no copy of its own sends
        assert await quiet(a) + await quiet(b, 0) == []


# -- 2. one user, devices on two nodes; an offline user ----------------------------------
async def test_devices_on_two_nodes_each_get_every_message_once(redis_server, start_daemon, uniq):
    n1 = start_node(start_daemon, redis_server, "n1")
    n2 = start_node(start_daemon, redis_server, "n2")
    n3 = start_node(start_daemon, redis_server, "n3")
    alice, bob, carol = uniq("alice"), uniq("bob"), uniq("carol")
    async with AsyncExitStack() as stack:
        a = await connect(stack, n3, alice)
        b1 = await connect(stack, n1, bob)
        b2 = await connect(stack, n2, bob)
        acks = [await a.send(bob, {"n": i}) for i in range(5)]
        for ack in acks:
            check_ack(ack, delivered=2)  # two NODES hold bob (docs/cluster.md)
        for dev in (b1, b2):
            got = await dev.messages(5)
            assert [m["msg_id"] for m in got] == [ack["msg_id"] for ack in acks]
            assert [m["seq"] for m in got] == [1, 2, 3, 4, 5]
            assert [m["body"] for m in got] == [{"n": i} for i in range(5)]
        assert await quiet(b1) == [] and await quiet(b2, 0) == [], "a device got a copy twice"

        # a second device of bob on n1: still 2 nodes, but 3 devices each get it once
        b3 = await connect(stack, n1, bob, since=5)
        ack = await a.send(bob, "six")
        check_ack(ack, delivered=2)
        for dev in (b1, b2, b3):
            m = await dev.receive_message()
            assert (m["seq"], m["body"]) == (6, "six")
        assert await quiet(b1) + await quiet(b2, 0) + await quiet(b3, 0) == []

        # carol is offline everywhere: delivered 0, stored
        off = await a.send(carol, "while you were out")
        check_ack(off, delivered=0)
        assert off["seq"] == 1

    for node in (n1, n2):  # replayed on connect to either node (no ack in between)
        async with open_client(node.url, token=node.token(carol)) as c:
            msgs, resumed = await replay_until_resumed(c)
        assert [(m["msg_id"], m["seq"], m["body"]) for m in msgs] == \
            [(off["msg_id"], 1, "while you were out")], node.url
        assert resumed == {"type": "resumed", "since": 0, "last": 1, "complete": True}


# -- 3. resume on another node; the ack cursor is cluster-wide ---------------------------
async def test_resume_on_another_node_and_ack_cursor_is_shared(redis_server, start_daemon, uniq):
    n1 = start_node(start_daemon, redis_server, "n1")
    n2 = start_node(start_daemon, redis_server, "n2")
    alice, bob = uniq("alice"), uniq("bob")
    async with AsyncExitStack() as stack:
        a = await connect(stack, n2, alice)
        async with AsyncExitStack() as bstack:
            b = await connect(bstack, n1, bob)
            acks = [await a.send(bob, f"m{i}") for i in range(1, 5)]
            got = await b.messages(4)
            assert [m["seq"] for m in got] == [1, 2, 3, 4]
            reply = await b.ack(2, wait=True)
            assert reply["type"] == "acked" and reply["seq"] == 2
        last_seen = got[-1]["seq"]
        acks += [await a.send(bob, f"m{i}") for i in range(5, 8)]
        assert [ack["seq"] for ack in acks] == list(range(1, 8))
    await wait_stored_cursor(redis_server, bob, 2)

    # ?since=<last seen> on the OTHER node: exactly the rest
    async with open_client(n2.url, token=n2.token(bob), since=last_seen) as b:
        msgs, resumed = await replay_until_resumed(b)
        assert [m["seq"] for m in msgs] == [5, 6, 7]
        assert [m["msg_id"] for m in msgs] == [ack["msg_id"] for ack in acks[4:]]
        assert [m["body"] for m in msgs] == ["m5", "m6", "m7"]
        assert resumed == {"type": "resumed", "since": 4, "last": 7, "complete": True}
        assert await quiet(b) == []

    # no ?since=: the replay starts at the cursor acked on n1
    async with open_client(n2.url, token=n2.token(bob)) as b:
        msgs, resumed = await replay_until_resumed(b)
        assert [m["seq"] for m in msgs] == [3, 4, 5, 6, 7], "ack cursor from n1 not honoured"
        assert resumed == {"type": "resumed", "since": 2, "last": 7, "complete": True}
        # in-band resume on n2 below the cursor reads older messages again
        reply = await b.resume(0)
        assert (reply["since"], reply["last"], reply["complete"]) == (0, 7, True)
        assert [f["seq"] for f in b.drain() if f["type"] == "message"] == list(range(1, 8))
        await b.ack(7, wait=True)
    await wait_stored_cursor(redis_server, bob, 7)
    async with open_client(n1.url, token=n1.token(bob)) as b:  # ...and n2's ack on n1
        msgs, resumed = await replay_until_resumed(b)
    assert msgs == [] and resumed["since"] == 7


# -- 4. presence across nodes; a node killed with -9 -------------------------------------
async def test_presence_is_cluster_wide_and_a_killed_node_expires(redis_server, start_daemon, uniq):
    ttl = 1.0
    n1 = start_node(start_daemon, redis_server, "n1", ttl=ttl)
    n2 = start_node(start_daemon, redis_server, "n2", ttl=ttl)
    n3 = start_node(start_daemon, redis_server, "n3", ttl=ttl)
    alice, bob, dave = uniq("alice"), uniq("bob"), uniq("dave")
    async with AsyncExitStack() as stack:
        b = await connect(stack, n3, bob)
        a2 = await connect(stack, n2, alice)
        async with AsyncExitStack() as doomed:  # the connections on n1 die with it
            for _ in range(2):
                await connect(doomed, n1, alice)
            await connect(doomed, n1, dave)
            # counts are summed over nodes, seen from every node
            await wait_presence(b, alice, online=True, connections=3)
            await wait_presence(b, dave, online=True, connections=1)
            await wait_presence(a2, bob, online=True, connections=1)
            await wait_presence(a2, alice, online=True, connections=3)

            check_ack(await b.send(dave, "to n1"), delivered=1)
            check_ack(await b.send(alice, "to n1+n2"), delivered=2)

            n1.kill()  # SIGKILL: no clean withdrawal of its presence keys
            t_kill = time.monotonic()
            await wait_presence(b, dave, online=False, connections=0, timeout=ttl + 3)
            took = time.monotonic() - t_kill
            assert took <= ttl + 1.0, f"dave still online {took:.2f}s after kill -9 (ttl {ttl}s)"
            await wait_presence(b, alice, online=True, connections=1, timeout=1.0)
            bob_seen = await presence_of(a2, bob)
            assert (bob_seen["online"], bob_seen["connections"]) == (True, 1), bob_seen
        # (leaving the block closes n1's dead connections: 1006, no error)

        # the surviving nodes still chat, and only one node holds alice now
        ack = await b.send(alice, "still here?")
        check_ack(ack, delivered=1)
        m = await a2.wait_for(lambda f: f.get("type") == "message" and f["body"] == "still here?")
        assert m["msg_id"] == ack["msg_id"]
        check_ack(await a2.send(bob, "yes"), delivered=1)
        assert (await b.receive_message())["body"] == "yes"
        # dave's message to n1 is not lost: he finds it on another node
        async with open_client(n2.url, token=n2.token(dave)) as d:
            msgs, _ = await replay_until_resumed(d)
        assert [m["body"] for m in msgs] == ["to n1"]


# -- 5. Redis stops and comes back while traffic flows -----------------------------------
@pytest.mark.parametrize("redis_server", [AOF_ALWAYS], indirect=True)
async def test_redis_restart_mid_traffic_loses_no_acked_message(redis_server, start_daemon, uniq):
    n1 = start_node(start_daemon, redis_server, "n1", ttl=1.5)
    n2 = start_node(start_daemon, redis_server, "n2", ttl=1.5)
    alice, bob = uniq("alice"), uniq("bob")
    await wait_health(n1, 200, 5)
    await wait_health(n2, 200, 5)

    acked: dict[str, int] = {}         # msg_id -> seq
    ack_order: list[str] = []
    errors: list[str] = []             # error codes answered to sends
    seen: list[dict] = []              # every frame bob's connection received, in order
    phase = {"name": "before"}
    per_phase: dict[str, list[int]] = {"before": [0, 0], "outage": [0, 0], "after": [0, 0]}
    missed_live: list[int] = []        # seqs acked after the restart with delivered == 0
    stop = trio.Event()

    async def sender(a: TidingsClient) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                ack = await a.send(bob, {"i": i}, timeout=15)
            except ServerError as exc:
                errors.append(exc.code)
                per_phase[phase["name"]][1] += 1
                await trio.sleep(0.05)
                continue
            except ConnectionClosedError:
                return  # asserted below (nodes must keep local connections open)
            check_ack(ack)
            assert ack["msg_id"] not in acked
            acked[ack["msg_id"]] = ack["seq"]
            ack_order.append(ack["msg_id"])
            per_phase[phase["name"]][0] += 1
            if phase["name"] == "after" and ack["delivered"] == 0:
                missed_live.append(ack["seq"])  # bob's node not resubscribed yet: resync
            await trio.sleep(0.01)

    async def receiver(b: TidingsClient) -> None:
        while True:
            try:
                frame = await b.receive(timeout=60)
            except ConnectionClosedError:
                return  # asserted below
            seen.append(frame)

    async def wait_acks(n: int, timeout: float) -> None:
        target = len(acked) + n
        with trio.fail_after(timeout):
            while len(acked) < target:
                await trio.sleep(0.02)

    async with AsyncExitStack() as stack:
        a = await connect(stack, n1, alice)
        b = await connect(stack, n2, bob)
        seen.append(b.first_resumed)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver, b)
            nursery.start_soon(sender, a)
            await wait_acks(20, 10)

            phase["name"] = "outage"
            t_down = time.monotonic()
            await trio.to_thread.run_sync(redis_server.stop)
            await wait_health(n1, 503, 10)
            await wait_health(n2, 503, 10)
            with trio.fail_after(10):  # the sender keeps trying: answered `unavailable`
                while per_phase["outage"][1] < 5:
                    await trio.sleep(0.02)
            # stay down long enough for the nodes' reconnect backoff to grow (~1.6 s)
            await trio.sleep(max(0.0, 1.5 - (time.monotonic() - t_down)))

            await trio.to_thread.run_sync(redis_server.start)
            phase["name"] = "after"
            await wait_health(n1, 200, 15)
            await wait_health(n2, 200, 15)
            await wait_acks(20, 15)
            stop.set()

            await collect_until_quiet(seen, acked, b, quiet=1.5, limit=15)
            nursery.cancel_scope.cancel()
        assert b.closed_code is None, f"bob's connection was closed ({b.closed_code})"
        assert a.closed_code is None, f"alice's connection was closed ({a.closed_code})"

    resumes = [f for f in seen if f["type"] == "resumed"]
    print(f"[acks, errors] per phase: {per_phase}; acked while bob's node was not "
          f"resubscribed: {missed_live}; resumed frames seen: {resumes}")
    assert set(errors) == {"unavailable"}, errors
    assert all(f["type"] in ("message", "resumed") for f in seen), \
        [f for f in seen if f["type"] not in ("message", "resumed")][:5]
    assert per_phase["outage"][1] >= 5 and per_phase["after"][0] >= 20, per_phase
    missing = set(acked) - _ids(seen)
    assert not missing, f"{len(missing)} acked messages never reached the live receiver"
    anomalies = seq_anomalies(seen)
    assert not anomalies, f"receiver saw duplicates/gaps: {anomalies[:10]}"

    # the inbox, read back from the other node: every acked message, at its acked seq
    async with open_client(n1.url, token=n1.token(bob), since=0) as b:
        inbox, resumed = await replay_until_resumed(b, timeout=20)
    assert [m["seq"] for m in inbox] == list(range(1, len(inbox) + 1))
    stored = {m["msg_id"]: m["seq"] for m in inbox}
    assert {mid: stored.get(mid) for mid in acked} == acked, "acked message lost or moved"
    # a send answered with an error may (rarely: reply lost) still be stored, never more
    assert len(acked) <= len(inbox) <= len(acked) + len(errors)
    assert _ids(seen) == set(stored), "live receiver and inbox disagree"
    assert resumed["complete"] is True


def _ids(frames: list[dict]) -> set[str]:
    return {f["msg_id"] for f in frames if f.get("type") == "message"}


async def test_lost_subscription_is_resynced_from_the_inbox(redis_server, start_daemon, uniq):
    """Redis drops only the nodes' pub/sub connections (CLIENT KILL TYPE pubsub): the
    store keeps working, so messages are stored and acked with delivered=0 while bob's
    node re-subscribes; its resync must replay them: no gap, no duplicate."""
    n1 = start_node(start_daemon, redis_server, "n1")
    n2 = start_node(start_daemon, redis_server, "n2")
    alice, bob = uniq("alice"), uniq("bob")
    acked: dict[str, int] = {}
    missed_live: list[int] = []
    errors: list[str] = []
    seen: list[dict] = []
    stop = trio.Event()

    async def sender(a: TidingsClient) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                ack = await a.send(bob, i)
            except ServerError as exc:  # refused while the node's cluster link is down
                errors.append(exc.code)
                await trio.sleep(0.01)
                continue
            check_ack(ack)
            acked[ack["msg_id"]] = ack["seq"]
            if ack["delivered"] == 0:
                missed_live.append(ack["seq"])
            await trio.sleep(0.002)

    async def receiver(b: TidingsClient) -> None:
        while True:
            try:
                seen.append(await b.receive(timeout=60))
            except ConnectionClosedError:
                return

    async with AsyncExitStack() as stack:
        a = await connect(stack, n1, alice)
        b = await connect(stack, n2, bob)
        seen.append(b.first_resumed)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver, b)
            nursery.start_soon(sender, a)
            kills = 0
            with trio.fail_after(15):
                while len(missed_live) < 1 or kills < 2:
                    await trio.sleep(0.3)
                    killed = await trio.to_thread.run_sync(
                        redis_call, redis_server.port, "CLIENT", "KILL", "TYPE", "pubsub")
                    assert killed >= 2, f"expected both nodes' pub/sub connections, killed {killed}"
                    kills += 1
                await trio.sleep(0.3)
            stop.set()
            await collect_until_quiet(seen, acked, b, quiet=1.0, limit=10)
            nursery.cancel_scope.cancel()
        assert b.closed_code is None, f"bob's connection was closed ({b.closed_code})"
    print(f"{len(acked)} acked, {len(errors)} refused over {kills} pub/sub kills; "
          f"delivered=0: {missed_live}")
    assert set(errors) <= {"unavailable"}, errors
    missing = set(acked) - _ids(seen)
    assert not missing, (f"{len(missing)} acked messages never reached bob (not resynced); "
                         f"seqs {sorted(acked[m] for m in missing)[:20]}")
    anomalies = seq_anomalies(seen)
    assert not anomalies, f"receiver saw duplicates/gaps: {anomalies[:10]}"
    assert sorted(acked.values()) == list(range(1, len(acked) + 1))


# -- 6. search unsupported; history across nodes -----------------------------------------
async def test_search_is_unsupported_and_history_spans_nodes(redis_server, start_daemon, uniq):
    n1 = start_node(start_daemon, redis_server, "n1")
    n2 = start_node(start_daemon, redis_server, "n2")
    alice, bob, eve = uniq("alice"), uniq("bob"), uniq("eve")
    async with AsyncExitStack() as stack:
        a = await connect(stack, n1, alice)
        b = await connect(stack, n2, bob)
        ids, sent = [], {}
        for i in range(4):
            ids.append((await a.send(bob, f"a{i}"))["msg_id"])
            sent[ids[-1]] = (alice, bob, f"a{i}", i + 1)
            ids.append((await b.send(alice, f"b{i}"))["msg_id"])
            sent[ids[-1]] = (bob, alice, f"b{i}", i + 1)
        await a.send(eve, "not in alice-bob")

        with pytest.raises(ServerError) as exc:
            await a.search("a1")
        assert exc.value.code == "unsupported"
        with pytest.raises(ServerError) as exc:
            await b.search("pizza", limit=5)
        assert exc.value.code == "unsupported"
        assert (await a.ping())["type"] == "pong"  # the connection stays usable

        # history is in msg_id order; ids of two nodes made in the same millisecond
        # compare by their node part, not by which was sent first
        newest_first = sorted(ids, reverse=True)
        for client, peer in ((a, bob), (b, alice)):  # both sides, from both nodes
            page1 = await client.history(peer, limit=3)
            assert [m["msg_id"] for m in page1["messages"]] == newest_first[:3]
            assert page1["more"] is True and page1["with"] == peer
            page2 = await client.history(peer, before=page1["messages"][-1]["msg_id"])
            assert [m["msg_id"] for m in page2["messages"]] == newest_first[3:]
            assert page2["more"] is False
            m = page2["messages"][-1]
            assert (m["from"], m["to"], m["body"], m["seq"]) == sent[newest_first[-1]]
        with pytest.raises(ServerError) as exc:
            await a.history(bob, before="f" * 24)
        assert exc.value.code == "bad_request"

    async with open_client(n2.url, token=n2.token(alice)) as a:  # alice on the other node
        page = await a.history(bob)
        assert [m["msg_id"] for m in page["messages"]] == sorted(ids, reverse=True)
    async with open_client(n1.url, token=n1.token(eve)) as e:
        assert (await e.history(bob))["messages"] == []
        assert [m["body"] for m in (await e.history(alice))["messages"]] == ["not in alice-bob"]


# -- 7. a cluster with a node-local store is refused at start ----------------------------
@pytest.mark.parametrize("backend", ["sqlite", "memory"])
def test_cluster_with_a_local_store_backend_refuses_to_start(tmp_path, redis_server, backend):
    config = {
        "server": {"host": "127.0.0.1", "port": 0, "state_dir": str(tmp_path / "state")},
        "auth": {"secret": TEST_SECRET},
        "store": {"backend": backend},
        "cluster": {"redis_url": redis_server.url},
    }
    path = write_toml(tmp_path / "c.toml", config)
    r = subprocess.run([sys.executable, "-m", "tidings", "serve", "--config", str(path)],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 2, (r.returncode, r.stderr)  # 2: a configuration error (cli.py)
    assert "cluster" in r.stderr and backend in r.stderr, r.stderr
    assert "@ config" in r.stderr  # the same message `tidings check-config` gives
    assert "event=listening" not in r.stderr + r.stdout


# -- 8. server.workers: SO_REUSEPORT worker processes under a supervisor -----------------
LISTEN_PID_RE = re.compile(r"event=listening\b.*\bpid=(\d+)")


def _listening_pids(d, start: int = 0) -> list[int]:
    """Worker pids from ``event=listening ... pid=`` lines (not the supervisor's own)."""
    with d._cond:
        lines = list(d.logs[start:])
    return [pid for line in lines if (m := LISTEN_PID_RE.search(line))
            and (pid := int(m.group(1))) != d.pid]


async def _wait_pids(d, n: int, timeout: float, start: int = 0) -> list[int]:
    try:
        with trio.fail_after(timeout):
            while len(set(pids := _listening_pids(d, start))) < n:
                await trio.sleep(0.05)
    except trio.TooSlowError:
        raise AssertionError(f"wanted {n} listening lines with distinct pid= within "
                             f"{timeout}s; log:\n{d.log_text()}") from None
    return list(dict.fromkeys(pids))


async def _all_pairs_exchange(clients: dict[str, TidingsClient], tag: str) -> None:
    users = list(clients)
    for s in users:
        for r in users:
            if s != r:
                check_ack(await clients[s].send(r, {"from": s, "tag": tag}), min_delivered=1)
    for r in users:
        got = await clients[r].messages(len(users) - 1, timeout=10)
        assert sorted(m["from"] for m in got) == sorted(u for u in users if u != r)
        assert all(m["body"] == {"from": m["from"], "tag": tag} for m in got), got


async def _cross_worker_presence(clients: dict[str, TidingsClient],
                                 prefixes: dict[str, str]) -> None:
    """A user on one worker is online (1 connection) when asked from the other."""
    one = {}
    for u, pre in prefixes.items():
        one.setdefault(pre, u)
    (_, ua), (_, ub) = list(one.items())[:2]
    await wait_presence(clients[ua], ub, online=True, connections=1)
    await wait_presence(clients[ub], ua, online=True, connections=1)


async def test_workers_share_the_port_and_a_dead_worker_is_restarted(redis_server, start_daemon,
                                                                     uniq):
    port = free_port()  # workers cannot share port 0
    d = start_node(start_daemon, redis_server, "w", node_id=None,  # node ids must differ
                   server={"port": port, "workers": 2}, api={"listen": ""})
    assert d.port == port
    pids = await _wait_pids(d, 2, 15)
    assert len(pids) == 2, pids
    for pid in pids:  # children of the supervisor
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert ppid == d.pid, (pid, ppid, d.pid)

    async with AsyncExitStack() as stack:
        clients: dict[str, TidingsClient] = {}
        prefixes: dict[str, str] = {}   # user -> per-process conn id prefix
        # connect until they spread over both workers (each connect is bounded by the
        # client's timeouts; no cancel scope around stack entries)
        while len(clients) < 6 or len(set(prefixes.values())) < 2:
            assert len(clients) < 24, f"24 clients all landed on one worker: {prefixes}"
            user = uniq(f"u{len(clients)}")
            clients[user] = await connect(stack, d, user)
            prefixes[user] = clients[user].conn.rsplit("-", 1)[0]
        await _all_pairs_exchange(clients, "before")
        await _cross_worker_presence(clients, prefixes)

        victim = pids[0]
        mark = len(d.logs)
        os.kill(victim, signal.SIGKILL)
        new_pids = await _wait_pids(d, 1, 15, start=mark)
        assert victim not in new_pids and pids[1] not in new_pids, (pids, new_pids)
        assert d.running(), "the supervisor died with its worker"

        # the victim's clients were dropped; the other worker's stayed up
        with trio.fail_after(10):
            while not any(c.closed_code is not None for c in clients.values()):
                await trio.sleep(0.05)
        # every client of the dead worker (same conn id prefix) sees its close
        dead = {prefixes[u] for u, c in clients.items() if c.closed_code is not None}
        assert len(dead) == 1, dead
        dropped = [u for u in clients if prefixes[u] in dead]
        with trio.fail_after(10):
            while any(clients[u].closed_code is None for u in dropped):
                await trio.sleep(0.05)
        alive = [u for u in clients if u not in dropped]
        assert alive and all(clients[u].closed_code is None for u in alive)
        for u in dropped:  # reconnect: may land on either worker
            clients[u] = await connect(stack, d, u)
        await _all_pairs_exchange(clients, "after")
    # (the start_daemon teardown fails the test on any crash line in the log)


async def test_workers_with_an_explicit_node_id_see_each_other(redis_server, start_daemon, uniq):
    """cluster.node_id set + server.workers = 2: each worker needs its own presence id
    (config.resolved_node_id(worker) gives "<id>-w<N>"), else every worker skips the
    other's entries as its own and users on the other worker look offline."""
    d = start_node(start_daemon, redis_server, "w", node_id="web1",
                   server={"port": free_port(), "workers": 2}, api={"listen": ""})
    await _wait_pids(d, 2, 15)
    async with AsyncExitStack() as stack:
        clients: dict[str, TidingsClient] = {}
        prefixes: dict[str, str] = {}
        while len(set(prefixes.values())) < 2:
            assert len(clients) < 24, f"24 clients all landed on one worker: {prefixes}"
            user = uniq(f"u{len(clients)}")
            clients[user] = await connect(stack, d, user)
            prefixes[user] = clients[user].conn.rsplit("-", 1)[0]
        await _cross_worker_presence(clients, prefixes)


# -- devices, idempotent sends, status and unread across nodes (issue #12) ------------------
async def test_devices_keys_status_and_unread_across_two_nodes(redis_server, start_daemon, uniq):
    """A device on node A, its status and unread asked on node B; a resend with the same
    key on the other node is a duplicate; cursors are per device cluster-wide; presence
    names the devices of every node."""
    from test_api import aapi

    na = start_node(start_daemon, redis_server, "na")
    nb = start_node(start_daemon, redis_server, "nb")
    alice, bob = uniq("alice"), uniq("bob")
    async with AsyncExitStack() as stack:
        a = await connect(stack, na, alice)
        phone = await connect(stack, na, bob, device="phone")
        laptop = await connect(stack, nb, bob, device="laptop")
        assert (phone.device, laptop.device) == ("phone", "laptop")
        first = await a.send(bob, "once", key="k-17")
        assert "duplicate" not in first
        for dev in (phone, laptop):
            assert (await dev.receive_message())["msg_id"] == first["msg_id"]
        async with open_client(nb.url, token=nb.token(alice)) as a_on_b:  # the resend
            again = await a_on_b.send(bob, "once", key="k-17")
        assert (again["msg_id"], again["seq"], again["duplicate"]) == (first["msg_id"], 1, True)
        assert await quiet(phone) + await quiet(laptop, 0) == []  # delivered once each
        await phone.ack(1, wait=True)
        await phone.ping()  # the mark is set on na; saved within a second

        want = {"phone": {"delivered": True, "acked": True},
                "laptop": {"delivered": True, "acked": False}}
        with trio.fail_after(5):
            while True:  # asked on nb: what na saved (coalesced) is there within ~1 s
                status, body = await aapi(nb, "GET", f"/api/messages/{first['msg_id']}")
                assert status == 200, body
                if body["devices"] == want:
                    break
                await trio.sleep(0.1)
        assert {k: body[k] for k in ("msg_id", "from", "to", "seq")} == {
            "msg_id": first["msg_id"], "from": alice, "to": bob, "seq": 1}
        assert await aapi(nb, "GET", f"/api/users/{bob}/unread") == (
            200, {"user": bob, "devices": {"laptop": 1, "phone": 0}})
        with trio.fail_after(5):
            while sorted((await presence_of(a, bob))["devices"]) != ["laptop", "phone"]:
                await trio.sleep(0.05)
    await wait_stored_cursor(redis_server, bob, 1, device="phone")
    # the phone acked on na: on nb it gets nothing again, the laptop gets everything
    async with open_client(nb.url, token=nb.token(bob), device="phone") as p:
        assert p.unread == 0 and (await replay_until_resumed(p))[0] == []
    async with open_client(na.url, token=na.token(bob), device="laptop") as lt:
        assert lt.unread == 1
        assert [m["body"] for m in (await replay_until_resumed(lt))[0]] == ["once"]
    assert (await aapi(na, "GET", "/api/messages/0123456789abcdef01234567"))[0] == 404
