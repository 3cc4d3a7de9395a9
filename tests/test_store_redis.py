"""The redis engine's own behaviour: layout and envelope (store/redis_lua.py), publish,
Lua-side bookkeeping, faults, AOF, and a Redis Cluster (store/redis.py).

The interface itself is tested on every engine in tests/test_store.py.  Every test here
runs its own redis-server (tests/redis_fixture.py).
"""

from __future__ import annotations

import time

import orjson
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from redis_fixture import redis_cluster, redis_server, require_coredis  # noqa: F401
from store_harness import Engine, ids, msg, outcomes
from store_model import KEY_WINDOW, MAX_INBOX, OPS, check_against_model

require_coredis()
import coredis  # noqa: E402

from tidings.store import (  # noqa: E402
    Appended, DeviceState, DuplicateMessage, InboxState, NewMessage, Progress, StoredMessage,
    StoreLimits, StoreUnavailable,
)
from tidings.store.records import MS_PER_DAY  # noqa: E402
from tidings.store.redis import open_redis_store  # noqa: E402
from tidings.store.redis_lua import (  # noqa: E402
    channel_for, decode_envelopes, envelope_header, user_from_channel, user_tag,
)

NO_LIMITS = StoreLimits()


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
    """The one-message format: room messages, and what nodes before the batch format
    publish (still read, for a mixed cluster's room messages)."""
    m = NewMessage('id"\n', "se\nnd", "rcpt", b'{"x":"a\nb"}\n\x00', 17)
    data = b"42\n" + orjson.dumps([m.msg_id, m.sender, m.ts]) + b"\n" + m.body
    assert decode_envelopes("rcpt", data) == [StoredMessage(m.msg_id, 42, m.sender, "rcpt", m.body, 17)]
    assert user_from_channel("tidings:{a}:inbox") is None
    with pytest.raises(ValueError):
        decode_envelopes("u", b"nope")


def test_batch_envelope_roundtrip():
    """The append script's format: ``*<first seq>``, then header and body per message
    (bodies may hold newlines, NULs, or be empty)."""
    bodies = [b'{"x":"a\nb"}\n\x00', b"", b"\n", b'"*1\n"']
    msgs = [NewMessage(f"id{i}\n", "se\nnd", "rcpt", b, 17 + i) for i, b in enumerate(bodies)]
    data = b"\n".join([b"*41"] + [p for m in msgs for p in (envelope_header(m), m.body)])
    assert decode_envelopes("rcpt", data) == [
        StoredMessage(m.msg_id, 41 + i, m.sender, "rcpt", m.body, m.ts) for i, m in enumerate(msgs)]
    with pytest.raises(ValueError):
        decode_envelopes("rcpt", data[:-1])  # truncated
    with pytest.raises(ValueError):
        decode_envelopes("rcpt", b'*1\n["a","b",1,-3]\nxy\n["a","b",1,0]\n')  # bad size


def test_a_batch_is_decoded_without_the_named_tuples_python_new(monkeypatch):
    """The receiving node decodes every message of every batch: the StoredMessages are
    built by ``tuple.__new__`` (C), not by the named tuple's Python-level ``__new__``
    (about a third of the loop, ~0.4 us per message); they are the same values."""
    msgs = [NewMessage(f"id{i}", "s", "rcpt", b"b%d" % i, 17 + i) for i in range(3)]
    data = b"\n".join([b"*5"] + [p for m in msgs for p in (envelope_header(m), m.body)])
    expected = [StoredMessage(m.msg_id, 5 + i, m.sender, "rcpt", m.body, m.ts)
                for i, m in enumerate(msgs)]
    built = []
    python_new = StoredMessage.__new__

    def counted(cls, *args, **kwargs):
        built.append(args)
        return python_new(cls, *args, **kwargs)
    monkeypatch.setattr(StoredMessage, "__new__", counted)
    got = decode_envelopes("rcpt", data)
    assert built == []
    assert got == expected and all(type(g) is StoredMessage for g in got)
    assert got[1].seq == 6 and got[1].body == b"b1"


# ------------------------------------------------------------------ the engine

async def next_message(pubsub):
    with trio.fail_after(5):
        while True:
            got = await pubsub.get_message()
            if got is not None:
                return got

async def test_append_publishes_the_stored_message_atomically(redis_server):
    async with open_redis_store(redis_server.url, limits=NO_LIMITS, node_id="t") as s:
        r = coredis.Redis.from_url(redis_server.url)
        async with r, r.pubsub(channels=[channel_for("b{1}")],
                               ignore_subscribe_messages=True) as ps:
            m = msg("a", "b{1}", body={"x": [1, 2]})
            results = await s.append([m, msg("a", "nobody")])
            assert [(x.seq, x.receivers, x.error) for x in results] == [(1, 1, None), (1, 0, None)]
            got = await next_message(ps)
            assert user_from_channel(got["channel"]) == "b{1}"
            got_msgs = decode_envelopes("b{1}", got["data"])
            assert got_msgs == [StoredMessage(m.msg_id, 1, "a", "b{1}", m.body, m.ts)]
            assert (await s.read_inbox("b{1}", 0, 1)) == got_msgs
            # a refused duplicate is not published: the next message is the next one stored
            res = await s.append([m, msg("a", "b{1}")])
            assert [(r.seq, r.receivers) for r in res] == [(None, None), (2, 1)]
            assert type(res[0].error) is DuplicateMessage
            assert [x.seq for x in decode_envelopes("b{1}", (await next_message(ps))["data"])] == [2]


async def test_a_recipients_messages_of_one_call_are_one_publish(redis_server):
    """One envelope per recipient and script call, carrying exactly what was stored (a
    refused duplicate in the middle takes no seq), in seq order; the seq, the history
    and the receiver counts are as with one publish per message."""
    async with open_redis_store(redis_server.url, limits=NO_LIMITS, node_id="t") as s:
        await s.append([msg("a", "b", msg_id="dup")])
        r = coredis.Redis.from_url(redis_server.url)
        async with r, r.pubsub(channels=[channel_for("b")],
                               ignore_subscribe_messages=True) as ps:
            batch = [msg("a", "b"), msg("c", "b"), msg("a", "b", msg_id="dup"),
                     msg("a", "b"), msg("a", "nobody"), msg("c", "b")]
            res = await s.append(batch)
            assert [(x.seq, x.receivers) for x in res] == [
                (2, 1), (3, 1), (None, None), (4, 1), (1, 0), (5, 1)]
            assert type(res[2].error) is DuplicateMessage
            got = decode_envelopes("b", (await next_message(ps))["data"])
            assert got == [m for m in await s.read_inbox("b", 1, 10)]
            assert [m.msg_id for m in got] == [batch[i].msg_id for i in (0, 1, 3, 5)]
            assert await r.hget("tidings:{b}:u", "seq") == b"5"
            assert ids((await s.history("b", "a", None, 10))[0]) == [
                batch[3].msg_id, batch[0].msg_id, "dup"]
            assert ids((await s.history("b", "c", None, 10))[0]) == [
                batch[5].msg_id, batch[1].msg_id]
            await s.append([msg("a", "b", msg_id="dup")])  # all refused: nothing published
            res = await s.append([msg("a", "b", msg_id="twice"), msg("a", "b", msg_id="twice")])
            assert [x.seq for x in res] == [6, None] and type(res[1].error) is DuplicateMessage
            assert [m.seq for m in decode_envelopes("b", (await next_message(ps))["data"])] == [6]


async def test_a_duplicate_msg_id_is_checked_per_recipient(redis_server):
    """Documented difference: memory and sqlite refuse the second (tests/test_store.py)."""
    async with Engine("redis", server=redis_server).open() as s:
        res = await s.append([msg("a", "b", msg_id="x"), msg("a", "c", msg_id="x")])
        assert outcomes(res) == [(1, None), (1, None)]
        assert ids((await s.history("a", "c", None, 5))[0]) == ["x"]


async def test_max_inbox_trims_the_index_entries_too(redis_server):
    async with Engine("redis", server=redis_server).open(StoreLimits(max_inbox=3)) as s:
        await s.append([msg("a", "b") for _ in range(5)] + [msg("c", "b")])
        await s.append([msg("a", "b")])
        assert await s.inbox_state("b") == InboxState(5, 7, 0, new_device=True)
        r = coredis.Redis.from_url(redis_server.url)
        async with r:
            assert await r.xlen("tidings:{b}:inbox") == 3
            assert await r.hlen("tidings:{b}:ids") == 3
            assert await r.zcard("tidings:{b}:from:a") == 2
            assert await r.zcard("tidings:{b}:from:c") == 1


async def _calls(r) -> dict[str, int]:
    """INFO commandstats as {command: calls}."""
    info = await r.info("commandstats")
    return {k[len("cmdstat_"):]: int(v["calls"]) for k, v in info.items() if k.startswith("cmdstat_")}


async def test_a_full_inbox_is_trimmed_with_one_hdel_and_one_zrem_per_sender(redis_server):  # noqa: F811
    """Steady state of a full inbox: each append trims as many entries as it adds; their
    index entries go with ONE ``HDEL ids`` and one ``ZREM from:<sender>`` per sender of
    the trimmed entries, not one of each per entry (main: 12 and 12)."""
    async with Engine("redis", server=redis_server).open(StoreLimits(max_inbox=4)) as s:
        await s.append([msg(f"s{i % 2}", "b") for i in range(4)])
        r = coredis.Redis.from_url(redis_server.url)
        async with r:
            await r.config_resetstat()
            await s.append([msg("a", "b") for _ in range(12)])
            calls = await _calls(r)
            assert (calls.get("hdel"), calls.get("zrem"), calls.get("xtrim")) == (1, 3, 1)
            assert await r.xlen("tidings:{b}:inbox") == 4
            assert await r.hlen("tidings:{b}:ids") == 4
            assert [await r.zcard(f"tidings:{{b}}:from:{x}") for x in ("s0", "s1", "a")] == [0, 0, 4]
        page, more = await s.history("b", "a", None, 10)
        assert ([m.seq for m in page], more) == ([16, 15, 14, 13], False)
        assert [m.seq for m in await s.read_inbox("b", 0, 10)] == [13, 14, 15, 16]


async def test_a_trim_of_more_than_a_chunk_unpacks_in_chunks(redis_server):  # noqa: F811
    """A lowered max_inbox can trim thousands of entries in one append: the index
    entries go in chunks of FORGET_CHUNK (Lua's unpack() is bounded)."""
    engine = Engine("redis", server=redis_server)
    async with engine.open() as s:
        await s.append([msg(f"s{i % 3}", "b") for i in range(1300)])
    async with engine.open(StoreLimits(max_inbox=2)) as s:
        await s.append([msg("a", "b")])
        r = coredis.Redis.from_url(redis_server.url)
        async with r:
            assert await r.xlen("tidings:{b}:inbox") == 2
            assert await r.hlen("tidings:{b}:ids") == 2
            assert sum([await r.zcard(f"tidings:{{b}}:from:{x}") for x in ("s0", "s1", "s2", "a")]) == 2
        assert [m.seq for m in await s.read_inbox("b", 0, 10)] == [1300, 1301]


async def test_an_append_sends_six_arguments_per_message_and_gets_three_per_group(
        redis_server, monkeypatch):  # noqa: F811
    """Standalone: the append's one script call carries 6 arguments per message, 2 per
    recipient group and 5 in all (the script writes the message index itself; main: 2
    more per message and 3 + 1 per index hash), and its reply is 3 elements per group
    with nothing refused (main: 3 per message)."""
    from tidings.store.redis import RedisStore
    from tidings.store.redis_lane import Lane
    sent, answered = [], []
    submit, appended = Lane.submit, RedisStore._appended

    async def spy_submit(self, calls):
        sent.append(list(calls))
        return await submit(self, calls)

    def spy_appended(self, msgs, orders, replies):
        answered.append(replies)
        return appended(self, msgs, orders, replies)
    monkeypatch.setattr(Lane, "submit", spy_submit)
    monkeypatch.setattr(RedisStore, "_appended", spy_appended)
    async with Engine("redis", server=redis_server).open(StoreLimits(retention_days=3)) as s:
        batch = [msg("a", "b") for _ in range(5)] + [msg("c", "d{%}") for _ in range(3)]
        res = await s.append(batch)
        assert [r.seq for r in res] == [1, 2, 3, 4, 5, 1, 2, 3]
        for m in batch:
            assert (await s.message(m.msg_id)).recipient == m.recipient
    [calls] = sent
    assert len(calls) == 1 and len(calls[0].keys) == 1
    assert len(calls[0].args) == 5 + 2 * 2 + 6 * 8
    [[reply]] = answered
    assert list(reply) == [0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("retention", [None, 2, 0.5])
async def test_the_script_writes_the_index_the_node_wrote_before(redis_server, retention):  # noqa: F811
    """The append script's own message index (standalone) is what the node computed and
    sent before (``RedisDevices._index_writes``, still used for a Redis Cluster): the
    same hashes, fields, values and expiry, for ids of two days and two last digits,
    ids that are not Tidings ids, and recipients whose tag is escaped."""
    day = int(time.time() * 1000) // MS_PER_DAY
    hexid = [f"{(day + d) * MS_PER_DAY + ms:012x}{c:06x}abcdef"
             for d in (0, 1) for ms in (5, 0x13) for c in (0, 1)]
    batch = [msg("a", r, msg_id=m) for r, m in zip(["b", "x%7D{y}%", "b", "c"] * 2, hexid)]
    batch += [msg("a", "b", msg_id=m) for m in ("01.00002", "ABCDEF012345x", "zz")]
    async with Engine("redis", server=redis_server).open(StoreLimits(retention_days=retention)) as s:
        assert all(r.seq for r in await s.append(batch))
        expected = s._index_writes([(m.msg_id, m.recipient) for m in batch], retention)
        r = coredis.Redis.from_url(redis_server.url)
        async with r:
            found = {k.decode(): k async for k in r.scan_iter(match="tidings:{ix:*")}
            assert sorted(found) == sorted(c.keys[0] for c in expected)
            for c in expected:
                at, *fields = c.args
                got = await r.hgetall(c.keys[0])
                assert {k.decode(): v.decode() for k, v in got.items()} == dict(
                    zip(fields[::2], fields[1::2]))
                if at == "":
                    assert await r.pttl(c.keys[0]) == -1
                else:
                    expires = await r.pexpiretime(c.keys[0])  # coredis: a datetime
                    assert round(expires.timestamp() * 1000) == at


async def test_progress_reads_and_writes_a_users_devices_once(redis_server):  # noqa: F811
    """One ``save_progress`` of several devices' cursors and delivered marks: one HMGET
    and one HSET of the ``dev`` hash (main: HEXISTS, HSETNX, HGET and maybe HSET per
    mark); registration, max() and min(last seq) as before."""
    async with Engine("redis", server=redis_server).open() as s:
        await s.append([msg("a", "b") for _ in range(6)])
        await s.save_progress(Progress(cursors={("b", "phone"): 2}))
        r = coredis.Redis.from_url(redis_server.url)
        async with r:
            await r.config_resetstat()
            await s.save_progress(Progress(
                cursors={("b", "phone"): 1, ("b", "laptop"): 9, ("b", "tv"): 3},
                delivered={("b", "phone"): 5, ("b", "watch"): 4}))
            calls = await _calls(r)
        assert (calls.get("hmget"), calls.get("hset"), calls.get("hexists"), calls.get("hsetnx")) == (
            1, 1, None, None)
        assert await s.devices("b") == {
            "phone": DeviceState(2, 5), "laptop": DeviceState(6, 0), "tv": DeviceState(3, 0),
            "watch": DeviceState(0, 4)}


async def test_prune_applies_a_lowered_max_inbox_in_batches(redis_server, monkeypatch):
    """Inboxes filled under a higher limit (or none) are cut at the next prune; many
    users and a big inbox take several bounded script calls and round trips."""
    import tidings.store.redis as redis_mod

    monkeypatch.setattr(redis_mod, "PRUNE_BATCH", 64)
    monkeypatch.setattr(redis_mod, "PRUNE_PIPELINE", 32)
    engine = Engine("redis", server=redis_server)
    async with engine.open() as s:
        batch = [msg("a", f"u{i % 100}") for i in range(1000)]
        batch += [msg("a", "big") for _ in range(500)]
        for k in range(0, len(batch), 700):
            await s.append(batch[k:k + 700])
    async with engine.open(StoreLimits(max_inbox=1)) as s:
        assert await s.prune(10**12, None) == 100 * 9 + 499
        assert await s.inbox_state("big") == InboxState(500, 500, 0, new_device=True)
        assert len([u async for u in s.users()]) == 101
        assert await s.prune(10**12, None) == 0


async def test_cursor_of_a_user_known_only_by_last_seen(redis_server):
    async with Engine("redis", server=redis_server).open() as s:
        await s.save_progress(Progress(last_seen={"a": 123}))
        await s.save_progress(Progress(cursors={("a", "default"): 5}))
        assert await s.inbox_state("a") == InboxState(1, 0, 0)
        assert await s.last_seen(["a"]) == {"a": 123}


async def test_a_cursor_from_before_devices_is_the_default_device(redis_server):
    """Old data: the user's cursor in its ``u`` hash is read as the default device's
    until that device is saved; the other devices are new."""
    async with Engine("redis", server=redis_server).open() as s:
        await s.append([msg("a", "b") for _ in range(4)])
        r = coredis.Redis.from_url(redis_server.url)
        async with r:
            await r.hset("tidings:{b}:u", {"cursor": "3"})
        assert await s.inbox_state("b") == InboxState(1, 4, 3)
        assert await s.inbox_state("b", "phone") == InboxState(1, 4, 0, new_device=True)
        assert await s.devices("b") == {"default": DeviceState(3, 0)}
        await s.save_progress(Progress(delivered={("b", "default"): 4}))
        assert await s.devices("b") == {"default": DeviceState(3, 4)}
        await s.save_progress(Progress(cursors={("b", "default"): 2}))  # never backwards
        assert await s.inbox_state("b") == InboxState(1, 4, 3)
        assert await s.acked_by_any_device([("b", 3), ("b", 4)]) == [True, False]


async def test_the_message_index_and_the_keys_expire(redis_server):
    """The msg_id -> recipient index (one hash per day of the id's clock) expires a day
    after the retention; the keys hashes a day after the window (rooms: nobody prunes)."""
    limits = StoreLimits(retention_days=2, key_window_ms=60_000)
    day = int(time.time() * 1000) // MS_PER_DAY  # an expiry in the past would delete at once
    msg_id = f"{day * MS_PER_DAY + 5:012x}000000abcdef"
    async with Engine("redis", server=redis_server).open(limits) as s:
        await s.append([msg("a", "b", msg_id=msg_id)._replace(key="k")])
        assert (await s.message(msg_id)).recipient == "b"
        assert await s.message(msg_id[:-1] + "0") is None
        await s.claim_key("a", "\x1froom\x1flobby", "k", "m1", 1)
        r = coredis.Redis.from_url(redis_server.url)
        async with r:
            index = f"tidings:{{ix:{day}:{msg_id[11]}}}"
            assert await r.hget(index, msg_id) == b"b"
            expires = await r.pexpiretime(index)  # coredis: a datetime
            assert expires.timestamp() * 1000 == (day + 4) * MS_PER_DAY
            for k in ("tidings:{b}:keys", "tidings:{b}:keyts", "tidings:{%s}:keys" % "\x1froom\x1flobby"):
                ttl = await r.pttl(k)
                assert MS_PER_DAY < ttl <= MS_PER_DAY + 60_000, k


# ------------------------------------------------------------------ faults

async def test_unavailable_fast_and_recovers(redis_server):
    async with open_redis_store(redis_server.url, limits=NO_LIMITS, node_id="t",
                                command_timeout=1.0) as s:
        await s.append([msg("a", "b")])
        redis_server.stop()
        t0 = time.monotonic()
        res = await s.append([msg("a", "b"), msg("a", "c")])
        assert [type(r.error) for r in res] == [StoreUnavailable] * 2
        for call in (s.read_inbox("b", 0, 10), s.history("a", "b", None, 10),
                     s.inbox_state("b"), s.save_progress(Progress(cursors={("b", "x"): 1})),
                     s.prune(0, 1), s.devices("b"), s.message("m"),
                     s.claim_key("a", "b", "k", "m", 1)):
            with pytest.raises(StoreUnavailable):
                await call
        assert time.monotonic() - t0 < 5
        redis_server.start()
        with trio.fail_after(10):
            while True:
                res = await s.append([msg("a", "b")])
                if res[0].ok:
                    assert res[0].seq == 1  # no AOF: a fresh server
                    break
                await trio.sleep(0.1)


async def test_hung_server_times_out(redis_server):
    async with open_redis_store(redis_server.url, limits=NO_LIMITS, node_id="t",
                                command_timeout=0.5) as s:
        await s.append([msg("a", "b")])
        redis_server.pause()
        try:
            with trio.fail_after(5):
                res = await s.append([msg("a", "b")])
                assert type(res[0].error) is StoreUnavailable
        finally:
            redis_server.resume()


async def test_open_against_nothing_raises_store_unavailable():
    from redis_fixture import free_port
    with trio.fail_after(10):
        with pytest.raises(StoreUnavailable):
            async with open_redis_store(f"redis://127.0.0.1:{free_port()}", limits=NO_LIMITS,
                                        node_id="t", connect_timeout=0.5):
                pass  # pragma: no cover


async def test_exceptions_from_the_body_are_not_wrapped(redis_server):
    with pytest.raises(KeyError):
        async with open_redis_store(redis_server.url, limits=NO_LIMITS, node_id="t"):
            raise KeyError("mine")


@pytest.mark.parametrize("redis_server", [{"appendonly": True, "appendfsync": "always"}],
                         indirect=True)
async def test_aof_always_survives_kill_9(redis_server):
    async with Engine("redis", server=redis_server).open() as s:
        await s.append([msg("a", "b") for _ in range(50)])
        await s.save_progress(Progress(cursors={("b", "default"): 7}))
    redis_server.kill()
    redis_server.start()
    async with Engine("redis", server=redis_server).open() as s:
        assert await s.inbox_state("b") == InboxState(1, 50, 7)
        assert len(await s.read_inbox("b", 0, 100)) == 50
        assert await s.append([msg("a", "b")]) == [Appended(51)]


async def test_no_aof_restart_loses_everything(redis_server):
    async with Engine("redis", server=redis_server).open() as s:
        await s.append([msg("a", "b")])
    redis_server.kill()
    redis_server.start()
    async with Engine("redis", server=redis_server).open() as s:
        assert await s.inbox_state("b") == InboxState(1, 0, 0, new_device=True)


# ------------------------------------------------------------------ Redis Cluster

@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=OPS, max_inbox=MAX_INBOX, key_window_ms=KEY_WINDOW)
def test_a_redis_cluster_answers_like_the_model(redis_cluster, ops, max_inbox, key_window_ms):
    """tests/store_model.py against a 3-shard Redis Cluster (one append script per
    recipient, history merged across slots, prune over every primary)."""
    redis_cluster.flush()

    def open_store(limits):
        return open_redis_store(redis_cluster.url, limits=limits, node_id="t", cluster=True,
                                publish=False)

    trio.run(lambda: check_against_model(open_store, ops, max_inbox, searchable=False,
                                         prune_deletes_hidden=False, key_window_ms=key_window_ms))


async def test_retention_on_a_cluster_reaches_every_primary(redis_cluster):
    async with open_redis_store(redis_cluster.url, limits=NO_LIMITS, node_id="t",
                                cluster=True, publish=False) as s:
        users = [f"user{i}" for i in range(30)]  # spread over the three shards
        await s.append([msg("a", u, ts=0) for u in users] + [msg("a", u, ts=MS_PER_DAY)
                                                             for u in users])
        assert await s.prune(MS_PER_DAY, 0.5) == 30
        assert {(await s.inbox_state(u)).first_seq for u in users} == {2}
