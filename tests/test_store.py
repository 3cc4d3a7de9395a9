"""The store interface (tidings.store.base, records, search), on every engine.

Each test runs against memory, sqlite (a file in tmp_path) and redis (a private
redis-server, tests/redis_fixture.py; skipped when redis-server is missing unless
TIDINGS_REQUIRE_ALL=1), opened by tests/store_harness.py.  The differential test at the
end checks every engine against the model in tests/store_model.py.  Engine specifics:
tests/test_store_sqlite.py, tests/test_store_redis.py.
"""

from __future__ import annotations

import time

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from redis_fixture import redis_server  # noqa: F401  (requested by the engine fixture)
from store_harness import ENGINES, Engine, engine, ids, msg, outcomes  # noqa: F401  (engine: a fixture)
from store_model import KEY_WINDOW, MAX_INBOX, OPS, check_against_model

from tidings.store import (
    Appended, BadQuery, DeviceState, DuplicateMessage, InboxState, Original, PipelinedStore,
    Progress,
    StoreLimits, StoreUnavailable, UnknownMessage, Unsupported,
)
from tidings.store.records import MS_PER_DAY
from tidings.store.search import parse_query

DAY = MS_PER_DAY




# ------------------------------------------------------------------ append / inbox

async def test_append_assigns_per_recipient_seqs(engine):
    async with engine.open() as s:
        assert await s.append([]) == []
        batch = [msg("a", "b"), msg("a", "c"), msg("c", "b"), msg("b", "b")]
        assert await s.append(batch) == [Appended(1), Appended(1), Appended(2), Appended(3)]
        assert await s.append([msg("x", "c")]) == [Appended(2)]
        inbox = await s.read_inbox("b", 0, 10)
        assert [m.seq for m in inbox] == [1, 2, 3]
        assert ids(inbox) == [batch[0].msg_id, batch[2].msg_id, batch[3].msg_id]
        first = inbox[0]
        assert (first.sender, first.recipient, first.body, first.ts) == ("a", "b", b'"hi"', 1000)


async def test_duplicate_msg_id_is_refused_alone(engine):
    async with engine.open() as s:
        m = msg("a", "b")
        await s.append([m])
        res = await s.append([msg("a", "b"), m, msg("a", "c")])
        assert outcomes(res) == [(2, None), (None, DuplicateMessage), (1, None)]
        res = await s.append([msg("a", "b", msg_id="dup"), msg("x", "b", msg_id="dup"),
                              msg("a", "b")])  # a duplicate inside one batch
        assert outcomes(res) == [(3, None), (None, DuplicateMessage), (4, None)]
        assert await s.inbox_state("b") == InboxState(1, 4, 0, new_device=True)
        assert [m.sender for m in await s.read_inbox("b", 2, 10)] == ["a", "a"]
        assert await s.append([msg("a", "b")]) == [Appended(5)]


@pytest.mark.parametrize("engine", ["memory", "sqlite"], indirect=True)
async def test_duplicate_msg_id_for_another_recipient_is_refused(engine):
    """msg_ids are unique across recipients here (redis checks per recipient: see
    tests/test_store_redis.py)."""
    async with engine.open() as s:
        res = await s.append([msg("a", "b", msg_id="x"), msg("a", "c", msg_id="x")])
        assert outcomes(res) == [(1, None), (None, DuplicateMessage)]
        assert await s.inbox_state("c") == InboxState(1, 0, 0, new_device=True)


async def test_concurrent_appends_get_distinct_consecutive_seqs(engine):
    results = []
    async with engine.open() as s:
        async def append_two() -> None:
            results.append(await s.append([msg("a", "u"), msg("b", "u")]))

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(append_two)
        assert sorted(a.seq for r in results for a in r) == list(range(1, 41))
        assert all(second.seq == first.seq + 1 for first, second in results)  # one batch
        assert [m.seq for m in await s.read_inbox("u", 0, 100)] == list(range(1, 41))


@pytest.mark.parametrize("after, limit, expect", [
    (0, 10, [1, 2, 3, 4, 5]), (2, 10, [3, 4, 5]), (0, 2, [1, 2]), (3, 1, [4]),
    (4, 1, [5]), (5, 10, []), (99, 10, []), (-5, 3, [1, 2, 3]), (0, 0, []),
])
async def test_read_inbox(engine, after, limit, expect):
    async with engine.open() as s:
        await s.append([msg("a", "u") for _ in range(5)])
        assert [m.seq for m in await s.read_inbox("u", after, limit)] == expect
        assert await s.read_inbox("nobody", after, limit) == []


def cursors(marks: dict, **kw) -> Progress:
    """Progress moving the cursors of ``{(user, device): seq}`` (or ``{user: seq}``, the
    default device)."""
    return Progress(cursors={k if isinstance(k, tuple) else (k, "default"): v
                             for k, v in marks.items()}, **kw)


async def test_inbox_state_and_cursors(engine):
    async with engine.open() as s:
        assert await s.inbox_state("u") == InboxState(1, 0, 0, new_device=True)
        await s.save_progress(cursors({"u": 5}))  # registers the device; nothing to ack
        assert await s.inbox_state("u") == InboxState(1, 0, 0)
        await s.append([msg("a", "u") for _ in range(4)])
        assert await s.inbox_state("u") == InboxState(1, 4, 0)
        # monotonic, clamped to last_seq
        for seq, expect in [(2, 2), (1, 2), (3, 3), (99, 4), (-1, 4), (2**70, 4)]:
            await s.save_progress(cursors({"u": seq}))
            assert await s.inbox_state("u") == InboxState(1, 4, expect)
        assert (await s.inbox_state("u")).unread() == 0


async def test_save_progress_of_many_users_with_last_seen(engine):
    async with engine.open() as s:
        await s.append([msg("a", "u"), msg("a", "u"), msg("u", "v")])
        await s.save_progress(cursors({"u": 1, "v": 7, "nobody": 3}, last_seen={"u": 10, "w": 11}))
        assert [(await s.inbox_state(x)).cursor for x in ("u", "v", "nobody", "w")] == [1, 1, 0, 0]
        assert (await s.inbox_state("w")).new_device
        assert await s.last_seen(["u", "w", "v"]) == {"u": 10, "w": 11, "v": None}
        await s.save_progress(Progress())


async def test_every_device_has_its_own_cursor_and_delivered_mark(engine):
    async with engine.open() as s:
        await s.append([msg("a", "u") for _ in range(5)])
        assert await s.devices("u") == {}
        await s.save_progress(Progress(cursors={("u", "phone"): 4, ("u", "laptop"): 0},
                                       delivered={("u", "phone"): 5, ("u", "tablet"): 9}))
        assert await s.devices("u") == {"phone": DeviceState(4, 5), "laptop": DeviceState(0, 0),
                                        "tablet": DeviceState(0, 5)}
        assert await s.inbox_state("u", "phone") == InboxState(1, 5, 4)
        assert await s.inbox_state("u", "laptop") == InboxState(1, 5, 0)
        assert await s.inbox_state("u", "default") == InboxState(1, 5, 0, new_device=True)
        assert [(await s.inbox_state("u", d)).unread() for d in ("phone", "laptop")] == [1, 5]
        await s.save_progress(Progress(cursors={("u", "phone"): 2}, delivered={("u", "phone"): 1}))
        assert (await s.devices("u"))["phone"] == DeviceState(4, 5)  # never backwards
        assert await s.devices("a") == {}


async def test_unread_counts_only_what_is_retained(engine):
    now = 100 * DAY
    async with engine.open() as s:
        await s.append([msg("a", "u", ts=now - 40 * DAY), msg("a", "u", ts=now - 40 * DAY),
                        msg("a", "u", ts=now)])
        await s.prune(now, 30)
        state = await s.inbox_state("u", "phone")
        assert (state.first_seq, state.unread(), state.unread(2), state.unread(3)) == (3, 1, 1, 0)


async def test_message_by_id(engine):
    async with engine.open(StoreLimits(max_inbox=2)) as s:
        sent = [msg("a", "u", i) for i in range(3)]
        await s.append(sent)
        assert await s.message(sent[0].msg_id) is None  # hidden by max_inbox
        got = await s.message(sent[2].msg_id)
        assert (got.seq, got.sender, got.recipient, got.body) == (3, "a", "u", b"2")
        assert await s.message("nope") is None


# ------------------------------------------------------------------ idempotency keys

def keyed(sender: str, recipient: str, key: str, ts: int, body: str = "hi"):
    return msg(sender, recipient, body, ts=ts)._replace(key=key)


async def test_a_live_key_answers_its_original(engine):
    async with engine.open(StoreLimits(key_window_ms=1000)) as s:
        first = keyed("a", "u", "k1", 5000)
        assert await s.append([first]) == [Appended(1)]
        again = keyed("a", "u", "k1", 5999, "resent")
        other = [keyed("b", "u", "k1", 5999), keyed("a", "v", "k1", 5999), msg("a", "u")]
        original = Original(first.msg_id, 1, 0)
        assert await s.append([again, *other]) == [Appended(1, original=original),
                                                    Appended(2), Appended(1), Appended(3)]
        assert await s.message(again.msg_id) is None
        await s.save_progress(Progress(answers={("a", "u", "k1"): 2, ("a", "u", "nope"): 1}))
        got = await s.append([keyed("a", "u", "k1", 5500)])
        assert got[0].original == Original(first.msg_id, 1, 2) and got[0].duplicate
        # at the window's edge the key is free again: stored, and it names the new one
        late = keyed("a", "u", "k1", 6000)
        assert await s.append([late, keyed("a", "u", "k1", 6999)]) == [
            Appended(4), Appended(4, original=Original(late.msg_id, 4, 0))]
        assert [m.seq for m in await s.read_inbox("u", 0, 10)] == [1, 2, 3, 4]


async def test_a_key_repeated_in_one_batch_is_stored_once(engine):
    async with engine.open() as s:
        a = keyed("a", "u", "k", 1)
        res = await s.append([a, keyed("a", "u", "k", 2), msg("a", "u")])
        assert res == [Appended(1), Appended(1, original=Original(a.msg_id, 1, 0)), Appended(2)]


async def test_window_zero_ignores_keys(engine):
    async with engine.open(StoreLimits(key_window_ms=0)) as s:
        res = await s.append([keyed("a", "u", "k", 1), keyed("a", "u", "k", 1)])
        assert res == [Appended(1), Appended(2)]
        assert await s.claim_key("a", "room", "k", "m1", 1) is None
        assert await s.claim_key("a", "room", "k", "m2", 1) is None


async def test_claim_key_without_a_message(engine):
    async with engine.open(StoreLimits(key_window_ms=100)) as s:
        assert await s.claim_key("a", "\x1froom\x1flobby", "k", "m1", 1000) is None
        assert await s.claim_key("a", "\x1froom\x1flobby", "k", "m2", 1099) == Original("m1", None, 0)
        await s.save_progress(Progress(answers={("a", "\x1froom\x1flobby", "k"): 3}))
        assert await s.claim_key("a", "\x1froom\x1flobby", "k", "m3", 1050) == Original("m1", None, 3)
        assert await s.claim_key("b", "\x1froom\x1flobby", "k", "m4", 1050) is None
        assert await s.claim_key("a", "\x1froom\x1flobby", "k", "m5", 1100) is None  # expired
        assert await s.claim_key("a", "\x1froom\x1flobby", "k", "m6", 1100) == Original("m5", None, 0)


async def test_prune_forgets_expired_keys(engine):
    async with engine.open(StoreLimits(key_window_ms=1000)) as s:
        first = keyed("a", "u", "k", 1000)
        await s.append([first])
        await s.save_progress(Progress(answers={("a", "u", "k"): 7}))
        assert await s.prune(1999, None) == 0  # still live: kept
        got = await s.append([keyed("a", "u", "k", 1500)])
        assert got == [Appended(1, original=Original(first.msg_id, 1, 7))]
        assert await s.prune(2000, None) == 0
        # A message dated inside the old window finds nothing: the key was forgotten.
        assert await s.append([keyed("a", "u", "k", 1500)]) == [Appended(2)]


# ------------------------------------------------------------------------ history

async def test_history_pages_both_directions(engine):
    async with engine.open() as s:
        convo = [msg("a", "b"), msg("b", "a"), msg("a", "c"), msg("a", "b"), msg("a", "a"),
                 msg("b", "a")]
        await s.append(convo)
        ab = [convo[5], convo[3], convo[1], convo[0]]  # newest first
        for user, peer in [("a", "b"), ("b", "a")]:
            page, more = await s.history(user, peer, None, 10)
            assert (ids(page), more) == (ids(ab), False)
        page, more = await s.history("a", "b", None, 2)
        assert (ids(page), more) == (ids(ab[:2]), True)
        page, more = await s.history("a", "b", page[-1].msg_id, 2)
        assert (ids(page), more) == (ids(ab[2:]), False)
        assert await s.history("a", "b", ab[-1].msg_id, 2) == ([], False)
        assert await s.history("a", "b", None, 0) == ([], True)
        assert await s.history("a", "b", ab[-1].msg_id, 0) == ([], False)
        assert ids((await s.history("a", "a", None, 5))[0]) == [convo[4].msg_id]
        assert await s.history("c", "b", None, 5) == ([], False)


async def test_history_orders_by_msg_id_not_by_append(engine):
    async with engine.open() as s:
        await s.append([msg("a", "b", msg_id="m3"), msg("b", "a", msg_id="m1"),
                        msg("a", "b", msg_id="m2")])
        assert ids((await s.history("a", "b", None, 10))[0]) == ["m3", "m2", "m1"]
        assert ids((await s.history("b", "a", "m3", 10))[0]) == ["m2", "m1"]


async def test_history_unknown_before(engine):
    async with engine.open() as s:
        await s.append([msg("a", "b", msg_id="m1"), msg("c", "d", msg_id="m2")])
        with pytest.raises(UnknownMessage):
            await s.history("a", "b", "nope", 10)
        with pytest.raises(UnknownMessage):  # exists, but not in this conversation
            await s.history("a", "b", "m2", 10)


async def test_history_separator_in_user_ids_cannot_leak(engine):
    async with engine.open() as s:
        secret = msg("a\x1fb", "c", "secret")
        await s.append([secret])
        assert await s.history("a", "b\x1fc", None, 10) == ([], False)
        with pytest.raises(UnknownMessage):
            await s.history("a", "b\x1fc", secret.msg_id, 10)
        assert ids((await s.history("c", "a\x1fb", None, 10))[0]) == [secret.msg_id]


# ------------------------------------------------------------------------- search

SEARCH_CORPUS = [("a", "b", "Pizza tonight?"), ("b", "a", "pizza pizza PIZZA"),
                 ("c", "d", "pizza for c"), ("a", "c", {"food": "pizza", "n": 1}),
                 ("b", "a", "Café au lait"), ("b", "a", "don't panic, hot dog")]


async def test_search(engine):
    async with engine.open() as s:
        ms = [msg(f, t, body, ts=i) for i, (f, t, body) in enumerate(SEARCH_CORPUS)]
        await s.append(ms)
        if not engine.searchable:
            with pytest.raises(Unsupported):
                await s.search("a", "pizza", 10)
            return
        got, more = await s.search("a", "pizza", 10, 0)
        assert set(ids(got)) == {ms[0].msg_id, ms[1].msg_id, ms[3].msg_id} and not more
        assert got[0].msg_id == ms[1].msg_id  # most hits / best bm25 first
        assert ids((await s.search("d", "PIZZA", 10, 0))[0]) == [ms[2].msg_id]
        assert await s.search("z", "pizza", 10, 0) == ([], False)
        expect = [("food", 3), ("cafe", 4), ("pizza tonight", 0), ('"hot dog"', 5),
                  ("don't", 5)]
        for query, i in expect:  # raw JSON text, diacritics, AND, phrase, a split word
            assert ids((await s.search("a", query, 10, 0))[0]) == [ms[i].msg_id], query
        assert await s.search("a", '"dog hot"', 10, 0) == ([], False)  # phrase order
        assert await s.search("a", "OR AND NOT", 10, 0) == ([], False)  # no operators
        first, more = await s.search("a", "pizza", 2, 0)
        rest, more2 = await s.search("a", "pizza", 2, 2)
        assert (len(first), more, len(rest), more2) == (2, True, 1, False)
        assert set(ids(first + rest)) == set(ids(got))


@pytest.mark.parametrize("query", ['', '   ', '"', 'pizza "hot', '"a" "', '***', '""',
                                   '-', 'x' * 1001, ' '.join(['w'] * 33)])
async def test_malformed_search_raises_bad_query(engine, query):
    async with engine.open() as s:
        await s.append([msg("a", "b", "pizza")])
        with pytest.raises(BadQuery if engine.searchable else Unsupported):
            await s.search("a", query, 10, 0)


@pytest.mark.parametrize("query, phrases", [
    ('Pizza "Hot  Dog" don\'t', (("pizza",), ("hot", "dog"), ("don", "t"))),
    ("x AND y*", (("x",), ("and",), ("y",))),
    ("x" * 1000, (("x" * 1000,),)),
    (" ".join(["w"] * 32), (("w",),) * 32),
])
def test_parse_query(query, phrases):
    assert parse_query(query) == phrases


# ------------------------------------------------------------------ presence/prune

async def test_last_seen(engine):
    async with engine.open() as s:
        assert await s.last_seen([]) == {}
        assert await s.last_seen(["a", "b"]) == {"a": None, "b": None}
        await s.save_progress(Progress(last_seen={"a": 5}))
        await s.save_progress(Progress(last_seen={"a": 7}))
        await s.append([msg("x", "b")])
        assert await s.last_seen(["a", "b", "a"]) == {"a": 7, "b": None}


async def test_prune_by_retention(engine):
    now = 100 * DAY
    async with engine.open() as s:
        await s.append([msg("a", "u", ts=now - 40 * DAY), msg("a", "u", ts=now - 31 * DAY),
                        msg("a", "u", ts=now - 1), msg("a", "v", ts=now - 29 * DAY)])
        assert await s.prune(now, None) == 0
        assert await s.prune(now, 0) == 0
        assert await s.prune(now, 30) == 2
        assert await s.inbox_state("u") == InboxState(3, 3, 0, new_device=True)
        assert await s.inbox_state("v") == InboxState(1, 1, 0, new_device=True)
        assert ids((await s.history("u", "a", None, 10))[0]) == ids(await s.read_inbox("u", 0, 9))
        assert await s.prune(now, 1 / DAY) == 1  # v's; u's (ts = now - 1) is not older
        assert await s.inbox_state("u") == InboxState(3, 3, 0, new_device=True)
        assert await s.prune(now, 0.5 / DAY) == 1  # 0.5 ms
        assert await s.read_inbox("u", 0, 10) == []
        assert await s.inbox_state("u") == InboxState(4, 3, 0, new_device=True)
        assert await s.append([msg("a", "u", ts=now)]) == [Appended(4)]  # never reused


async def test_prune_by_retention_with_a_clock_going_back(engine):
    """Memory and sqlite remove everything up to the newest expired message; redis the
    longest expired prefix (documented in tidings.store.redis)."""
    now = 100 * DAY
    async with engine.open() as s:
        await s.append([msg("a", "u", ts=now - 40 * DAY), msg("a", "u", ts=now),
                        msg("a", "u", ts=now - 31 * DAY), msg("a", "u", ts=now)])
        expect = 1 if engine.name == "redis" else 3
        assert await s.prune(now, 30) == expect
        assert await s.inbox_state("u") == InboxState(expect + 1, 4, 0, new_device=True)


@pytest.mark.parametrize("n", [0, 1, 3])
async def test_max_inbox_at_the_edge(engine, n):
    """n messages are all visible; the n+1st hides exactly the oldest, from every read
    at once; prune deletes what was hidden (sqlite) and changes nothing visible."""
    async with engine.open(StoreLimits(max_inbox=n)) as s:
        words = [msg("a", "u", f"word{i} common") for i in range(n + 1)]
        assert await s.append(words[:n]) == [Appended(i + 1) for i in range(n)]
        assert await s.inbox_state("u") == InboxState(1, n, 0, new_device=True)
        assert ids(await s.read_inbox("u", 0, 100)) == ids(words[:n])
        assert ids((await s.history("a", "u", None, 100))[0]) == ids(words[:n][::-1])
        if engine.searchable and n:
            assert ids((await s.search("a", "word0", 10))[0]) == [words[0].msg_id]

        assert await s.append([words[n]]) == [Appended(n + 1)]
        hidden, shown = words[0], words[1:]
        for removed in [1 if engine.name == "sqlite" else 0, 0]:
            assert await s.inbox_state("u") == InboxState(2, n + 1, 0, new_device=True)
            assert ids(await s.read_inbox("u", 0, 100)) == ids(shown)
            assert ids(await s.read_inbox("u", -1, 1)) == ids(shown[:1])
            assert ids((await s.history("u", "a", None, 100))[0]) == ids(shown[::-1])
            with pytest.raises(UnknownMessage):
                await s.history("a", "u", hidden.msg_id, 10)
            if engine.searchable:
                assert await s.search("u", "word0", 10) == ([], False)
                assert len((await s.search("a", "common", 100))[0]) == n
            assert await s.prune(0, None) == removed


async def test_closed_store(engine):
    async with engine.open() as s:
        await s.append([msg("a", "b")])
        await s.aclose()
        await s.aclose()  # idempotent
        res = await s.append([msg("a", "b"), msg("a", "c")])  # never raises
        assert [type(a.error) for a in res] == [StoreUnavailable] * 2
        calls = [s.read_inbox("b", 0, 1), s.inbox_state("b"), s.history("a", "b", None, 1),
                 s.last_seen(["a"]), s.save_progress(cursors({"b": 1}, last_seen={"a": 1})),
                 s.prune(0, 1), s.devices("b"), s.message("x"),
                 s.claim_key("a", "r", "k", "m", 1)]
        if engine.searchable:
            calls.append(s.search("a", "hi", 1))
        for call in calls:
            with pytest.raises(StoreUnavailable):
                await call


@pytest.mark.parametrize("engine", ["sqlite", "redis"], indirect=True)
async def test_restart_keeps_data_and_seqs(engine):
    engine.make_durable()
    limits = StoreLimits(max_inbox=2)
    async with engine.open(limits) as s:
        await s.append([msg("a", "b", "persist me") for _ in range(3)])
        first = keyed("a", "b", "k", 1000)
        await s.append([first])
        await s.save_progress(Progress(cursors={("b", "default"): 2, ("b", "phone"): 3},
                                       delivered={("b", "phone"): 4}, last_seen={"a": 42},
                                       answers={("a", "b", "k"): 1}))
    engine.restart()
    async with engine.open(limits) as s:
        assert await s.inbox_state("b") == InboxState(3, 4, 2)
        assert await s.devices("b") == {"default": DeviceState(2, 0), "phone": DeviceState(3, 4)}
        assert await s.append([keyed("a", "b", "k", 1001)]) == [
            Appended(4, original=Original(first.msg_id, 4, 1))]
        assert [m.seq for m in await s.read_inbox("b", 0, 10)] == [3, 4]
        assert await s.last_seen(["a"]) == {"a": 42}
        if engine.searchable:
            assert len((await s.search("b", "persist", 10, 0))[0]) == 1
        assert await s.append([msg("a", "b")]) == [Appended(5)]


async def test_run_prunes_every_interval_until_cancelled(engine):
    limits = StoreLimits(retention_days=1, prune_interval_s=0.01)
    now = int(time.time() * 1000)
    async with engine.open(limits) as s:
        await s.append([msg("a", "u", ts=now - 2 * DAY), msg("a", "u", ts=now)])
        pruned = trio.Event()
        prune = s.prune

        async def observed_prune(now_ms: int, retention_days: float | None) -> int:
            n = await prune(now_ms, retention_days)
            assert retention_days == 1
            if n:
                pruned.set()
            return n

        s.prune = observed_prune
        async with trio.open_nursery() as nursery:
            await nursery.start(s.run)
            with trio.fail_after(10):
                await pruned.wait()
            nursery.cancel_scope.cancel()
        assert await s.inbox_state("u") == InboxState(2, 2, 0, new_device=True)


# ------------------------------------------------------------- differential (model)

@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=OPS, max_inbox=MAX_INBOX, key_window_ms=KEY_WINDOW)
def test_every_engine_answers_like_the_model(engine, ops, max_inbox, key_window_ms):
    """See tests/store_model.py: each example opens an empty store of this engine."""
    engine.reset()
    trio.run(lambda: check_against_model(
        engine.open, ops, max_inbox, searchable=engine.searchable,
        prune_deletes_hidden=engine.name == "sqlite", key_window_ms=key_window_ms))


async def test_only_redis_pipelines_its_appends(engine):
    """The hub's writer keeps batches in flight only on a PipelinedStore (server/writer.py):
    redis declares it; memory and SQLite append batch by batch."""
    async with engine.open() as s:
        assert isinstance(s, PipelinedStore) == (s.name == "redis")
