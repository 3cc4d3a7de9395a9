"""The Redis fast path (issue #11): the store's write lane (store/redis_lane.py: EVALSHA
straight out, NOSCRIPT recovery, many messages per script call, submitted batches run in
order) and the batched pub/sub reader (cluster/pubsub.py).

Every test runs its own redis-server (tests/redis_fixture.py).
"""

from __future__ import annotations

import pytest
import trio
from redis_fixture import redis_cluster, redis_server, require_coredis  # noqa: F401
from store_harness import msg

require_coredis()
import coredis  # noqa: E402

from tidings.cluster.pubsub import batch_pubsub  # noqa: E402
from tidings.store import Progress, StoreLimits  # noqa: E402
from tidings.store.redis import open_redis_store  # noqa: E402
from tidings.store.redis_lua import channel_for, decode_envelopes  # noqa: E402

NO_LIMITS = StoreLimits()


@pytest.fixture(params=["wire", "coredis"])
def lane_path(request, monkeypatch):
    """Both ways the standalone lane sends: its own connection (store/redis_wire.py),
    and coredis' multiplexed connection (what it uses over TLS)."""
    if request.param == "coredis":
        import tidings.store.redis_lane as lane

        monkeypatch.setattr(lane, "wire_target", lambda client: None)
    return request.param


async def _calls(r, command: str) -> int:
    stats = await r.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_script_flush_is_recovered_by_reloading_and_resending_once(redis_server, lane_path):
    async with open_redis_store(redis_server.url, limits=NO_LIMITS, node_id="t") as s:
        r = coredis.Redis.from_url(redis_server.url)
        async with r:
            assert [a.seq for a in await s.append([msg("a", "b")])] == [1]
            await r.script_flush()
            got = await s.append([msg("a", "b"), msg("a", "c")])
            assert [(a.seq, a.error) for a in got] == [(1 + 1, None), (1, None)]
            assert s._lane.reloads == 1
            await r.script_flush()  # the progress script goes through the lane too
            await s.save_progress(Progress(cursors={("b", "phone"): 2}))
            assert s._lane.reloads == 2
            assert (await s.inbox_state("b", "phone")).cursor == 2
            # a stored message is never sent twice: exactly 2 + 1 inbox entries
            assert len(await s.read_inbox("b", 0, 10)) == 2


async def test_no_script_exists_before_evalsha(redis_server, lane_path):
    """coredis' pipeline() sent SCRIPT EXISTS before every batch: one more round trip."""
    async with open_redis_store(redis_server.url, limits=NO_LIMITS, node_id="t") as s:
        r = coredis.Redis.from_url(redis_server.url)
        async with r:
            before = await _calls(r, "script|exists")
            for i in range(5):
                await s.append([msg("a", f"u{i}"), msg("b", f"u{i}")])
                await s.save_progress(Progress(cursors={(f"u{i}", "d"): 1}))
            assert await _calls(r, "script|exists") == before


async def test_a_batch_of_many_recipients_is_one_script_call_in_per_recipient_order(redis_server,
                                                                                   lane_path):
    users = ["x", "y{1}", "z"]
    batch = [msg("s", users[i % 3], body=i) for i in range(300)]
    async with open_redis_store(redis_server.url, limits=NO_LIMITS, node_id="t") as s:
        r = coredis.Redis.from_url(redis_server.url)
        async with r, r.pubsub(channels=[channel_for("y{1}")],
                               ignore_subscribe_messages=True) as ps:
            before = await _calls(r, "evalsha")
            got = await s.append(batch)
            assert await _calls(r, "evalsha") == before + 1  # standalone: the whole batch
            for i, a in enumerate(got):
                assert (a.seq, a.error) == (i // 3 + 1, None)
            for u in users:
                inbox = await s.read_inbox(u, 0, 500)
                assert [m.msg_id for m in inbox] == [m.msg_id for m in batch if m.recipient == u]
                assert [m.seq for m in inbox] == list(range(1, 101))
            published = []
            with trio.fail_after(5):
                while len(published) < 100:
                    m = await ps.get_message()
                    if m is not None:
                        published += [x.seq for x in decode_envelopes("y{1}", m["data"])]
            assert published == list(range(1, 101))


async def test_submitted_batches_run_in_submit_order_whoever_waits_first(redis_server, lane_path):
    async with open_redis_store(redis_server.url, limits=NO_LIMITS, node_id="t") as s:
        assert (s._lane._wire is None) == (lane_path == "coredis")
        first = [msg("a", "b", body=i) for i in range(50)]
        second = [msg("a", "b", body=i) for i in range(50, 60)]
        results_1 = await s.append_submit(first)
        results_2 = await s.append_submit(second)
        late = await results_2()  # the second batch's results awaited first
        early = await results_1()
        assert [a.seq for a in early] == list(range(1, 51))
        assert [a.seq for a in late] == list(range(51, 61))


async def test_a_cluster_append_is_one_call_per_recipient(redis_cluster):
    redis_cluster.flush()
    async with open_redis_store(redis_cluster.url, limits=NO_LIMITS, node_id="t",
                                cluster=True) as s:
        batch = [msg("s", f"user{i % 7}", body=i) for i in range(70)]
        got = await s.append(batch)
        assert [a.seq for a in got] == [i // 7 + 1 for i in range(70)]
        r = coredis.RedisCluster.from_url(redis_cluster.url)
        async with r:
            await r.script_flush()
        got = await s.append([msg("s", "user1"), msg("s", "user2")])
        assert [(a.seq, a.error) for a in got] == [(11, None), (11, None)]


@pytest.mark.parametrize("own_connection", [True, False], ids=["own", "coredis"])
@pytest.mark.parametrize("n", [200])
async def test_pubsub_hands_a_burst_over_in_order_in_a_few_scheduler_rounds(redis_server, n,
                                                                            own_connection):
    """What one socket read brought reaches the sink in the same scheduler round (coredis'
    own consumer took one round per message), in publish order, from the task that read
    it: published messages take no hop through the push buffer to the consumer task.
    Both readers: our own connection (cluster/wire_pubsub.py) and coredis'."""
    rounds = 0
    seen: list[tuple[bytes, int]] = []
    acks: list[str] = []
    readers: set[str] = set()
    got = trio.Event()

    async def count_rounds():
        nonlocal rounds
        while True:
            rounds += 1
            await trio.lowlevel.checkpoint()

    def sink(messages):
        for m in messages:
            if m["type"] == "message":
                seen.append((m["data"], rounds))
                readers.add(trio.lowlevel.current_task().name)
            else:
                acks.append(m["type"])
        if len(seen) >= n:
            got.set()

    r = coredis.Redis.from_url(redis_server.url)
    async with (r, batch_pubsub(r, False, sink, 2.0, 5.0, own_connection=own_connection) as ps,
                trio.open_nursery() as nursery):
        await ps.subscribe("ch")
        assert acks == ["subscribe"]  # acknowledgements reach the sink too
        nursery.start_soon(count_rounds)
        async with r.pipeline(transaction=False) as pipe:  # one write: one burst
            for i in range(n):
                pipe.publish("ch", str(i))
        with trio.fail_after(5):
            await got.wait()
        nursery.cancel_scope.cancel()
    assert [data for data, _round in seen] == [str(i).encode() for i in range(n)]
    assert len({round_ for _data, round_ in seen}) <= n // 10
    reader = "WirePubSub._read_loop" if own_connection else "._reader_task"
    assert len(readers) == 1 and readers.pop().endswith(reader)


async def test_a_user_held_on_two_nodes_gets_each_message_once_per_node_in_order(redis_server):
    """A batch of many messages in one script call, published on the user's channel:
    each holding node sees every message exactly once, in seq order, from the batched
    reader; the append says 2 nodes received each."""
    from tidings.cluster import open_cluster

    seen: dict[str, list[int]] = {"A": [], "B": []}
    done = {k: trio.Event() for k in seen}

    def sink(node):
        def on_message(m):
            seen[node].append(m.seq)
            if len(seen[node]) >= 200:
                done[node].set()
        return on_message

    async with (
        open_redis_store(redis_server.url, limits=NO_LIMITS, node_id="s") as s,
        open_cluster(redis_server.url, "A", 3.0, sink("A")) as ca,
        open_cluster(redis_server.url, "B", 3.0, sink("B")) as cb,
    ):
        with trio.fail_after(5):
            while not (await ca.hold("u") and await cb.hold("u")):
                ca.release("u")
                cb.release("u")
                await trio.sleep(0.05)  # not synchronisation: waiting for Redis to be up
        got = await s.append([msg("x", "u", body=i) for i in range(100)])
        got += await s.append([msg("y", "u", body=i) for i in range(100)])
        assert [a.receivers for a in got] == [2] * 200
        with trio.fail_after(5):
            await done["A"].wait()
            await done["B"].wait()
        assert ca.statistics().gaps == cb.statistics().gaps == 0
    assert seen["A"] == seen["B"] == list(range(1, 201))
