"""RedisStore: unit tests and a differential test against MemoryStore.

Every test runs its own redis-server (tests/redis_fixture.py).
"""

from __future__ import annotations

import time

import orjson
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_fixture import redis_cluster, redis_server, require_coredis  # noqa: F401

require_coredis()
import coredis  # noqa: E402

from tidings.store import (
    MS_PER_DAY,
    DuplicateMessage,
    InboxState,
    MemoryStore,
    NewMessage,
    StoredMessage,
    StoreUnavailable,
    UnknownMessage,
)
from tidings.store.redis import (
    Unsupported,
    channel_for,
    decode_envelope,
    envelope_header,
    open_redis_store,
    user_from_channel,
    user_tag,
)


def msg(i: int, sender: str, recipient: str, body: bytes = b'"hi"', ts: int | None = None,
        msg_id: str | None = None) -> NewMessage:
    return NewMessage(msg_id or f"{i:08d}", sender, recipient, body, 1_000 + i if ts is None else ts)


def ids(msgs) -> list[str]:
    return [m.msg_id for m in msgs]


# ------------------------------------------------------------------ pure helpers

@pytest.mark.parametrize("user", ["alice", "a}b", "{x}", "}", "%7D", "%", "a:b", "ü"])
def test_channel_roundtrip_and_tag_is_whole_user(user):
    ch = channel_for(user)
    assert user_from_channel(ch) == user
    assert user_from_channel(ch.encode()) == user
    tag = ch[len("tidings:{"):-len("}:ch")]
    assert tag and "{" not in tag and "}" not in tag  # the hash tag is the whole user


def test_user_tags_are_injective():
    users = ["a}b", "a%7Db", "a%257Db", "%", "%25", "{", "%7B"]
    assert len({user_tag(u) for u in users}) == len(users)


def test_envelope_roundtrip():
    m = NewMessage('id"\n', "se\nnd", "rcpt", b'{"x":"a\nb"}\n\x00', 17)
    data = b"42\n" + envelope_header(m) + b"\n" + m.body
    assert decode_envelope("rcpt", data) == StoredMessage(m.msg_id, 42, m.sender, "rcpt", m.body, 17)
    with pytest.raises(ValueError):
        decode_envelope("u", b"nope")


# ------------------------------------------------------------------ unit tests

async def test_append_read_state_cursor(redis_server):
    async with open_redis_store(redis_server.url, max_inbox=None, node_id="t") as s:
        seqs = await s.append_many([msg(1, "a", "b"), msg(2, "a", "c"), msg(3, "c", "b")])
        assert seqs == [1, 1, 2]
        assert await s.append_many([]) == []
        inbox = await s.read_inbox("b", 0, 10)
        assert [(m.msg_id, m.seq, m.sender, m.recipient, m.body, m.ts) for m in inbox] == [
            ("00000001", 1, "a", "b", b'"hi"', 1001), ("00000003", 2, "c", "b", b'"hi"', 1003)]
        assert ids(await s.read_inbox("b", 1, 10)) == ["00000003"]
        assert await s.read_inbox("b", 0, 0) == []
        assert await s.read_inbox("nobody", 0, 10) == []
        assert await s.inbox_state("b") == InboxState(1, 2, 0)
        assert await s.inbox_state("nobody") == InboxState(1, 0, 0)
        assert await s.set_cursor("b", 1) == 1
        assert await s.set_cursor("b", 0) == 1      # monotonic
        assert await s.set_cursor("b", 99) == 2     # clamped to last_seq
        assert await s.set_cursor("nobody", 5) == 0
        assert (await s.inbox_state("b")).cursor == 2


async def test_history_both_directions_paging_and_unknown(redis_server):
    async with open_redis_store(redis_server.url, max_inbox=None, node_id="t") as s:
        batch = [msg(i, "a" if i % 2 else "b", "b" if i % 2 else "a") for i in range(1, 8)]
        batch.append(msg(50, "a", "c"))
        await s.append_many(batch)
        page, more = await s.history("a", "b", None, 3)
        assert ids(page) == ["00000007", "00000006", "00000005"] and more
        page, more = await s.history("b", "a", "00000005", 3)
        assert ids(page) == ["00000004", "00000003", "00000002"] and more
        page, more = await s.history("a", "b", "00000002", 3)
        assert ids(page) == ["00000001"] and not more
        page, more = await s.history("a", "b", "00000001", 0)
        assert page == [] and not more
        page, more = await s.history("a", "b", None, 0)
        assert page == [] and more
        with pytest.raises(UnknownMessage):
            await s.history("a", "b", "00000050", 3)  # exists, but not in this conversation
        with pytest.raises(UnknownMessage):
            await s.history("a", "b", "nope", 3)
        await s.append_many([msg(60, "z", "z")])
        assert ids((await s.history("z", "z", None, 5))[0]) == ["00000060"]


async def test_search_is_unsupported(redis_server):
    async with open_redis_store(redis_server.url, max_inbox=None, node_id="t") as s:
        with pytest.raises(Unsupported):
            await s.search("a", "pizza", 10)


async def test_duplicate_msg_id_stores_nothing_for_that_recipient(redis_server):
    async with open_redis_store(redis_server.url, max_inbox=None, node_id="t") as s:
        await s.append_many([msg(1, "a", "b")])
        with pytest.raises(DuplicateMessage):
            await s.append_many([msg(2, "a", "b"), msg(1, "a", "b")])
        with pytest.raises(DuplicateMessage):
            await s.append_many([msg(3, "a", "b"), msg(3, "a", "b")])
        assert await s.inbox_state("b") == InboxState(1, 1, 0)


async def test_max_inbox_trims_exactly_and_drops_history(redis_server):
    async with open_redis_store(redis_server.url, max_inbox=3, node_id="t") as s:
        await s.append_many([msg(i, "a", "b") for i in range(1, 6)])
        await s.append_many([msg(6, "a", "b")])
        assert ids(await s.read_inbox("b", 0, 10)) == ["00000004", "00000005", "00000006"]
        assert await s.inbox_state("b") == InboxState(4, 6, 0)
        page, more = await s.history("a", "b", None, 10)
        assert ids(page) == ["00000006", "00000005", "00000004"] and not more
        with pytest.raises(UnknownMessage):
            await s.history("a", "b", "00000002", 10)
        r = coredis.Redis.from_url(redis_server.url)
        async with r:
            assert await r.hlen("tidings:{b}:ids") == 3
            assert await r.zcard("tidings:{b}:from:a") == 3


async def test_prune_retention_and_max_inbox(redis_server):
    async with open_redis_store(redis_server.url, max_inbox=None, node_id="t") as s:
        day = MS_PER_DAY
        await s.append_many([msg(i, "a", "b", ts=i * day) for i in range(1, 11)]
                            + [msg(100 + i, "b", "c", ts=i * day) for i in range(1, 4)])
        assert await s.prune(12 * day, None, None) == 0
        # retention 5 days at day 12: ts < 7 days expires -> b loses 1..6, c loses all
        assert await s.prune(12 * day, 5, None) == 6 + 3
        assert (await s.inbox_state("b")) == InboxState(7, 10, 0)
        assert await s.inbox_state("c") == InboxState(4, 3, 0)
        assert await s.prune(12 * day, None, 2) == 2
        assert ids(await s.read_inbox("b", 0, 10)) == ["00000009", "00000010"]
        assert ids((await s.history("b", "a", None, 10))[0]) == ["00000010", "00000009"]
        # seqs are never reused after pruning
        assert await s.append_many([msg(200, "a", "c")]) == [4]


async def test_prune_many_users_and_big_inbox_in_batches(redis_server):
    async with open_redis_store(redis_server.url, max_inbox=None, node_id="t") as s:
        batch = [msg(i, "a", f"u{i % 300}") for i in range(3000)]
        batch += [msg(10_000 + i, "a", "big") for i in range(1500)]
        for k in range(0, len(batch), 700):
            await s.append_many(batch[k:k + 700])
        assert await s.prune(10**12, None, 1) == 300 * 9 + 1499
        assert await s.inbox_state("big") == InboxState(1500, 1500, 0)
        assert len([u async for u in s.users()]) == 301


async def test_last_seen(redis_server):
    async with open_redis_store(redis_server.url, max_inbox=None, node_id="t") as s:
        await s.set_last_seen("a", 123)
        assert await s.last_seen(["a", "b"]) == {"a": 123, "b": None}
        assert await s.last_seen([]) == {}
        assert await s.set_cursor("a", 5) == 0  # known user, nothing stored


async def test_append_publishes_the_message_frame_atomically(redis_server):
    async with open_redis_store(redis_server.url, max_inbox=None, node_id="t") as s:
        r = coredis.Redis.from_url(redis_server.url)
        async with r, r.pubsub(channels=[channel_for("b{1}")],
                               ignore_subscribe_messages=True) as ps:
            m = msg(1, "a", "b{1}", body=b'{"x":[1,2]}')
            results = await s.append_routed([m, msg(2, "a", "nobody")])
            assert [(x.seq, x.receivers, x.error) for x in results] == [(1, 1, None), (1, 0, None)]
            with trio.fail_after(5):
                got = None
                while got is None:
                    got = await ps.get_message()
            assert user_from_channel(got["channel"]) == "b{1}"
            got_msg = decode_envelope("b{1}", got["data"])
            assert got_msg == StoredMessage(m.msg_id, 1, "a", "b{1}", m.body, m.ts)
            assert (await s.read_inbox("b{1}", 0, 1)) == [got_msg]


async def test_unavailable_fast_and_recovers(redis_server):
    async with open_redis_store(redis_server.url, max_inbox=None, node_id="t",
                                command_timeout=1.0) as s:
        await s.append_many([msg(1, "a", "b")])
        redis_server.stop()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await s.append_many([msg(2, "a", "b")])
        with pytest.raises(StoreUnavailable):
            await s.read_inbox("b", 0, 10)
        with pytest.raises(StoreUnavailable):
            await s.history("a", "b", None, 10)
        assert time.monotonic() - t0 < 5
        redis_server.start()
        with trio.fail_after(10):
            while True:
                try:
                    assert await s.append_many([msg(3, "a", "b")]) == [1]  # no AOF: fresh
                    break
                except StoreUnavailable:
                    await trio.sleep(0.1)


async def test_hung_server_times_out(redis_server):
    async with open_redis_store(redis_server.url, max_inbox=None, node_id="t",
                                command_timeout=0.5) as s:
        await s.append_many([msg(1, "a", "b")])
        redis_server.pause()
        try:
            with trio.fail_after(5):
                with pytest.raises(StoreUnavailable):
                    await s.append_many([msg(2, "a", "b")])
        finally:
            redis_server.resume()


async def test_open_against_nothing_raises_store_unavailable():
    from redis_fixture import free_port
    with trio.fail_after(10):
        with pytest.raises(StoreUnavailable):
            async with open_redis_store(f"redis://127.0.0.1:{free_port()}", max_inbox=None,
                                        node_id="t", connect_timeout=0.5):
                pass  # pragma: no cover


async def test_exceptions_from_the_body_are_not_wrapped(redis_server):
    with pytest.raises(KeyError):
        async with open_redis_store(redis_server.url, max_inbox=None, node_id="t"):
            raise KeyError("mine")


@pytest.mark.parametrize("redis_server", [{"appendonly": True, "appendfsync": "always"}],
                         indirect=True)
async def test_aof_always_survives_kill_9(redis_server):
    async with open_redis_store(redis_server.url, max_inbox=None, node_id="t") as s:
        await s.append_many([msg(i, "a", "b") for i in range(1, 51)])
        await s.set_cursor("b", 7)
    redis_server.kill()
    redis_server.start()
    async with open_redis_store(redis_server.url, max_inbox=None, node_id="t") as s:
        assert await s.inbox_state("b") == InboxState(1, 50, 7)
        assert len(await s.read_inbox("b", 0, 100)) == 50
        assert await s.append_many([msg(99, "a", "b")]) == [51]


async def test_no_aof_restart_loses_everything(redis_server):
    async with open_redis_store(redis_server.url, max_inbox=None, node_id="t") as s:
        await s.append_many([msg(1, "a", "b")])
    redis_server.kill()
    redis_server.start()
    async with open_redis_store(redis_server.url, max_inbox=None, node_id="t") as s:
        assert await s.inbox_state("b") == InboxState(1, 0, 0)


async def test_throughput_figure(redis_server):
    """Not a benchmark gate: prints msgs/s for batches of 500 (see docs/cluster.md)."""
    async with open_redis_store(redis_server.url, max_inbox=10_000, node_id="t") as s:
        body = orjson.dumps("x" * 100)
        n = 10_000
        batch = [msg(i, f"s{i % 50}", f"u{i % 1000}", body=body) for i in range(n)]
        t0 = time.perf_counter()
        for k in range(0, n, 500):
            await s.append_many(batch[k:k + 500])
        rate = n / (time.perf_counter() - t0)
        print(f"append_many: {rate:.0f} msgs/s (batches of 500, 1000 recipients)")
        assert (await s.inbox_state("u7")).last_seq == 10


# ------------------------------------------------------------------ differential

USERS = ["a", "b", "c", "d}{", "%7D"]
user = st.sampled_from(USERS)

op = st.one_of(
    st.tuples(st.just("append"),
              st.lists(st.tuples(user, user, st.integers(0, 999), st.binary(max_size=12),
                                 st.integers(0, 5)), max_size=6)),
    st.tuples(st.just("read"), user, st.integers(-1, 12), st.integers(0, 6)),
    st.tuples(st.just("state"), user),
    st.tuples(st.just("cursor"), user, st.integers(-2, 14)),
    st.tuples(st.just("history"), user, user, st.integers(-2, 40), st.integers(0, 6)),
    st.tuples(st.just("prune"), st.integers(0, 40), st.one_of(st.none(), st.integers(0, 30)),
              st.one_of(st.none(), st.integers(0, 6))),
    st.tuples(st.just("seen"), user, st.integers(0, 10**13)),
    st.tuples(st.just("last_seen"), st.lists(user, max_size=3)),
)


async def _run_ops(url: str, ops, append_max_inbox: int | None, cluster: bool = False) -> None:
    model = MemoryStore()
    async with open_redis_store(url, max_inbox=append_max_inbox, node_id="diff",
                                cluster=cluster) as store:
        clock = 0
        counter = 0
        known: list[str] = []

        async def both(name, *args):
            try:
                expected = ("ok", getattr(model, name)(*args))
            except Exception as exc:  # noqa: BLE001 - compare error types
                expected = ("error", type(exc))
            try:
                got = ("ok", await getattr(store, name)(*args))
            except Exception as exc:  # noqa: BLE001
                got = ("error", type(exc))
            assert got == expected, (name, args)
            return got

        for o in ops:
            kind = o[0]
            if kind == "append":
                batch = []
                for sender, recipient, key, body, dt in o[1]:
                    counter += 1
                    clock += dt  # ts never decreases (one clock; see module docstring)
                    mid = f"{key:03d}-{counter:04d}"  # unique, not in append order
                    batch.append(NewMessage(mid, sender, recipient, body, clock))
                    known.append(mid)
                await both("append_many", batch)
                if append_max_inbox is not None:
                    model.prune(0, None, append_max_inbox)
            elif kind == "read":
                await both("read_inbox", o[1], o[2], o[3])
            elif kind == "state":
                await both("inbox_state", o[1])
            elif kind == "cursor":
                await both("set_cursor", o[1], o[2])
            elif kind == "history":
                i = o[3]
                before = None if i == -1 else ("zz-unknown" if i == -2 or not known
                                               else known[i % len(known)])
                await both("history", o[1], o[2], before, o[4])
            elif kind == "prune":
                back, retention, keep = o[1], o[2], o[3]
                days = None if retention is None else retention / MS_PER_DAY
                await both("prune", clock + back, days, keep)
            elif kind == "seen":
                await both("set_last_seen", o[1], o[2])
            elif kind == "last_seen":
                await both("last_seen", o[1])
        for u in USERS:  # final full comparison
            await both("inbox_state", u)
            await both("read_inbox", u, 0, 1000)
            for peer in USERS:
                await both("history", u, peer, None, 1000)


@pytest.mark.parametrize("append_max_inbox", [None, 3])
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=25))
def test_differential_against_memory_store(redis_server, append_max_inbox, ops):
    redis_server.flush()
    trio.run(_run_ops, redis_server.url, ops, append_max_inbox)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=25))
def test_differential_on_a_redis_cluster(redis_cluster, ops):
    """Same as above against a 3-shard Redis Cluster (one script per recipient/slot)."""
    redis_cluster.flush()
    trio.run(_run_ops, redis_cluster.url, ops, 3, True)
