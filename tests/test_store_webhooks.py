"""What webhooks keep in the store (tidings.store.base, "Webhooks"), on every engine:
the outbox, presence counted per node, undelivered checks, the sender's lease.

Engines are opened by tests/store_harness.py like in tests/test_store.py (redis: a
private redis-server; skipped without one unless TIDINGS_REQUIRE_ALL=1).
"""

from __future__ import annotations

import pytest
import trio
from redis_fixture import redis_server  # noqa: F401  (requested by the engine fixture)
from store_harness import Engine, engine, msg  # noqa: F401  (engine: a fixture)

from tidings.store import Progress, StoreUnavailable
from tidings.store.records import OutboxEntry, UndeliveredCheck, WebhookEvent

BOTH = ("online", "offline")




def ev(n: int, user: str = "u", kind: str = "online") -> WebhookEvent:
    return WebhookEvent(f"e{n}", kind, 1000 + n, user)


def events(entries: list[OutboxEntry]) -> list[tuple[str, str]]:
    """``(type, user)`` of each entry, in outbox order."""
    return [(e.event.type, e.event.user) for e in entries]


# ------------------------------------------------------------------ the outbox

async def test_outbox_keeps_order_and_pages_after_a_position(engine):
    undelivered = WebhookEvent("x", "undelivered", 5, "bob", "m1", "alice", 7)
    async with engine.open() as s:
        assert await s.outbox_read(None, 10) == [] and await s.outbox_depth() == 0
        await s.outbox_add([])
        await s.outbox_add([ev(1), ev(2, "v", "offline"), undelivered])
        await s.outbox_add([ev(4)])
        got = await s.outbox_read(None, 10)
        assert [e.event for e in got] == [ev(1), ev(2, "v", "offline"), undelivered, ev(4)]
        assert all((e.attempts, e.due_ms) == (0, 0) for e in got)
        assert await s.outbox_depth() == 4
        # paging: limit n and after a position
        assert await s.outbox_read(None, 2) == got[:2]
        assert await s.outbox_read(got[1].pos, 10) == got[2:]
        assert await s.outbox_read(got[1].pos, 1) == got[2:3]
        assert await s.outbox_read(got[3].pos, 10) == []
        assert await s.outbox_read(None, 0) == []
        # a retry is recorded on the entry; done removes; unknown positions are ignored
        await s.outbox_retry(got[0].pos, 3, 12345)
        await s.outbox_done([got[1].pos, got[2].pos])
        await s.outbox_done([got[1].pos])
        await s.outbox_retry(got[1].pos, 1, 1)  # gone: stays gone
        left = await s.outbox_read(None, 10)
        assert left == [got[0]._replace(attempts=3, due_ms=12345), got[3]]
        assert await s.outbox_depth() == 2
        # positions are never handed out again, even after the newest entry went
        await s.outbox_done([got[3].pos])
        await s.outbox_add([ev(5)])
        (newest,) = await s.outbox_read(got[0].pos, 10)
        assert newest.event == ev(5) and newest.pos != got[3].pos
        assert await s.outbox_read(got[3].pos, 10) == [newest]


@pytest.mark.parametrize("engine", ["sqlite", "redis"], indirect=True)
async def test_outbox_and_checks_survive_a_restart(engine):
    engine.make_durable()
    check = UndeliveredCheck(50, "bob", 1, "m1", "alice")
    async with engine.open() as s:
        await s.outbox_add([ev(1), ev(2)])
        first = (await s.outbox_read(None, 1))[0]
        await s.outbox_retry(first.pos, 2, 777)
        await s.undelivered_watch([check])
        assert await s.presence_set("n1", ["carol"], [], full=False, now_ms=10, expires_ms=10_000,
                                    types=BOTH) is False
    engine.restart()
    async with engine.open() as s:
        got = await s.outbox_read(None, 10)
        assert [(e.event, e.attempts, e.due_ms) for e in got] == [
            (ev(1), 2, 777), (ev(2), 0, 0), (got[2].event, 0, 0)]
        assert events(got[2:]) == [("online", "carol")]
        assert await s.undelivered_due(50, 10) == [check]
        assert await s.presence_set("n1", [], [], full=False, now_ms=20, expires_ms=10_000,
                                    types=BOTH) is True


async def test_the_memory_engine_keeps_nothing_across_instances():
    engine = Engine("memory")
    async with engine.open() as s:
        await s.outbox_add([ev(1)])
    async with engine.open() as s:
        assert await s.outbox_depth() == 0


async def test_closed_store_refuses_webhook_calls(engine):
    async with engine.open() as s:
        await s.aclose()
        for call in (s.outbox_add([ev(1)]), s.outbox_read(None, 1), s.outbox_depth(),
                     s.undelivered_due(0, 1)):
            with pytest.raises(StoreUnavailable):
                await call


# ------------------------------------------------------------------ presence

async def test_a_user_on_two_nodes_is_online_once_and_offline_once(engine):
    async with engine.open() as s:
        p = s.presence_set
        assert await p("n1", ["alice"], [], full=False, now_ms=1, expires_ms=100, types=BOTH) is False
        assert await p("n2", ["alice", "bob"], [], full=False, now_ms=2, expires_ms=100, types=BOTH) is False
        assert await p("n1", ["alice"], [], full=False, now_ms=3, expires_ms=100, types=BOTH) is True  # again: nothing
        assert await p("n1", [], ["alice"], full=False, now_ms=4, expires_ms=100, types=BOTH) is True  # n2 has her
        assert await p("n1", [], ["alice"], full=False, now_ms=5, expires_ms=100, types=BOTH) is True  # absent: nothing
        assert await p("n2", [], ["alice", "bob"], full=False, now_ms=6, expires_ms=100, types=BOTH) is True
        got = await s.outbox_read(None, 10)
        assert events(got) == [("online", "alice"), ("online", "bob"), ("offline", "alice"),
                               ("offline", "bob")]
        assert [e.event.ts for e in got] == [1, 2, 6, 6]
        assert len({e.event.id for e in got}) == 4


async def test_only_the_wanted_types_enter_the_outbox_but_counts_always_move(engine):
    async with engine.open() as s:
        await s.presence_set("n1", ["a"], [], full=False, now_ms=1, expires_ms=100, types=["offline"])
        await s.presence_set("n2", ["a"], [], full=False, now_ms=1, expires_ms=100, types=["offline"])
        await s.presence_set("n1", [], ["a"], full=False, now_ms=2, expires_ms=100, types=["offline"])
        assert await s.outbox_read(None, 10) == []
        await s.presence_set("n2", [], ["a"], full=False, now_ms=3, expires_ms=100, types=["offline"])
        assert events(await s.outbox_read(None, 10)) == [("offline", "a")]
        await s.presence_set("n2", ["a"], [], full=False, now_ms=4, expires_ms=100, types=[])
        await s.presence_set("n2", [], ["a"], full=False, now_ms=5, expires_ms=100, types=[])
        assert await s.outbox_depth() == 1


async def test_a_full_set_replaces_the_nodes_users(engine):
    async with engine.open() as s:
        await s.presence_set("n1", ["a", "b", "c"], [], full=False, now_ms=1, expires_ms=100, types=BOTH)
        await s.presence_set("n2", ["c"], [], full=False, now_ms=1, expires_ms=100, types=BOTH)
        await s.outbox_done([e.pos for e in await s.outbox_read(None, 10)])
        await s.presence_set("n1", ["b", "d"], ["b"], full=True, now_ms=2, expires_ms=100, types=BOTH)
        assert events(await s.outbox_read(None, 10)) == [("online", "d"), ("offline", "a")]


@pytest.mark.parametrize("expires_ms, reaped", [(99, True), (100, False)])
async def test_reap_takes_a_node_whose_expiry_passed(engine, expires_ms, reaped):
    """A node alive until ``expires_ms`` is reaped by ``now_ms = 100`` only when
    ``expires_ms < 100`` (the edge: n and n+1)."""
    async with engine.open() as s:
        await s.presence_set("dead", ["a", "b"], [], full=False, now_ms=1, expires_ms=expires_ms, types=BOTH)
        await s.presence_set("live", ["b"], [], full=False, now_ms=1, expires_ms=1000, types=BOTH)
        await s.outbox_done([e.pos for e in await s.outbox_read(None, 10)])
        assert await s.presence_reap(100, BOTH) == (1 if reaped else 0)
        assert events(await s.outbox_read(None, 10)) == ([("offline", "a")] if reaped else [])
        # a reaped node is new again: its next call says so, and its users count afresh
        known = await s.presence_set("dead", ["a"], [], full=False, now_ms=100, expires_ms=200, types=BOTH)
        assert known is not reaped
        assert await s.presence_reap(100, BOTH) == 0


async def test_reap_of_a_named_node_whatever_its_expiry(engine):
    """A restarted node with the same id drops what its previous run left."""
    async with engine.open() as s:
        await s.presence_set("n1", ["a"], [], full=False, now_ms=1, expires_ms=10_000, types=BOTH)
        assert await s.presence_reap(2, BOTH, node="n1") == 1
        assert await s.presence_reap(3, BOTH, node="n1") == 0  # nothing left
        assert events(await s.outbox_read(None, 10)) == [("online", "a"), ("offline", "a")]


# ------------------------------------------------------------------ undelivered checks

async def test_undelivered_checks_are_due_at_their_time_and_settled_once(engine):
    async with engine.open() as s:
        await s.append([msg("alice", "bob"), msg("alice", "bob"), msg("alice", "carol")])
        checks = [UndeliveredCheck(100, "bob", 1, "m-b1", "alice"),
                  UndeliveredCheck(100, "bob", 2, "m-b2", "alice"),
                  UndeliveredCheck(101, "carol", 1, "m-c1", "alice")]
        await s.undelivered_watch(checks)
        assert await s.undelivered_due(99, 10) == []
        assert await s.undelivered_due(100, 10) == checks[:2]
        assert await s.undelivered_due(101, 10) == checks
        assert await s.undelivered_due(101, 1) == checks[:1]
        # bob's phone acked seq 1 (the edge: seq == cursor is acked, cursor + 1 is not);
        # his laptop acked nothing: any one device's ack counts
        await s.save_progress(Progress(cursors={("bob", "phone"): 1, ("bob", "laptop"): 0}))
        pairs = [(c.user, c.seq) for c in checks] + [("nobody", 1)]
        assert await s.acked_by_any_device(pairs) == [True, False, False, False]
        report = [None, WebhookEvent("u2", "undelivered", 100, "bob", "m-b2", "alice", 2),
                  WebhookEvent("u3", "undelivered", 101, "carol", "m-c1", "alice", 1)]
        assert await s.undelivered_settle(checks, report) == 2
        assert await s.undelivered_settle(checks, report) == 0  # another node was later
        assert await s.undelivered_due(10**12, 10) == []
        assert [e.event for e in await s.outbox_read(None, 10)] == report[1:]


# ------------------------------------------------------------------ the lease

@pytest.mark.parametrize("engine", ["memory", "sqlite"], indirect=True)
async def test_the_single_node_engines_always_hold_the_lease(engine):
    async with engine.open() as s:
        assert await s.outbox_lease("a", 1) and await s.outbox_lease("b", 1)


@pytest.mark.parametrize("engine", ["redis"], indirect=True)
async def test_redis_lease_has_one_holder_until_it_expires(engine):
    async with engine.open() as s:
        assert await s.outbox_lease("a", 10_000) is True
        assert await s.outbox_lease("b", 10_000) is False
        assert await s.outbox_lease("a", 150) is True  # renewed, with a short ttl
        assert await s.outbox_lease("b", 10_000) is False
        with trio.fail_after(5):
            while not await s.outbox_lease("b", 10_000):  # a's lease runs out
                await trio.sleep(0.05)
        assert await s.outbox_lease("a", 10_000) is False
