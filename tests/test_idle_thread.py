"""The idle-priority worker thread (tidings.store.idle_thread) and the sqlite engine's use
of it for full-text maintenance (docs/performance.md, eleventh session)."""

from __future__ import annotations

import os
import threading

import pytest
import trio
import trio.testing
from store_harness import msg
from tidings.store import StoreLimits
from tidings.store.idle_thread import IdleThread
from tidings.store.sqlite import SqliteStore

needs_sched_idle = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux only")


def _policy() -> int:
    return os.sched_getscheduler(0)


@needs_sched_idle
async def test_calls_run_in_order_in_one_thread_at_idle_priority():
    idle = IdleThread("t")
    seen: list[tuple[int, int, int]] = []
    try:
        for i in range(3):
            assert await idle.run_sync(lambda i=i: seen.append(
                (i, threading.get_ident(), _policy())) or i * 10) == i * 10
    finally:
        idle.close()
    assert [i for i, _, _ in seen] == [0, 1, 2]
    assert len({t for _, t, _ in seen}) == 1 and threading.get_ident() not in {t for _, t, _ in seen}
    assert {p for _, _, p in seen} == {os.SCHED_IDLE}


async def test_an_exception_is_raised_in_the_caller_and_the_thread_goes_on():
    idle = IdleThread("t")
    try:
        with pytest.raises(ZeroDivisionError):
            await idle.run_sync(lambda: 1 / 0)
        assert await idle.run_sync(lambda: "next") == "next"
    finally:
        idle.close()


async def test_close_lets_the_thread_exit_and_a_later_call_starts_another():
    idle = IdleThread("t")
    first = await idle.run_sync(threading.current_thread)
    idle.close()
    await trio.to_thread.run_sync(first.join, 5.0)
    assert not first.is_alive()
    try:
        second = await idle.run_sync(threading.current_thread)
        assert second is not first and second.is_alive()
    finally:
        idle.close()


async def test_a_cancelled_caller_still_waits_for_its_call():
    """Not abandoned (the call owns a connection): the result arrives before the
    cancellation is delivered."""
    idle = IdleThread("t")
    started, release = trio.Event(), threading.Event()
    token = trio.lowlevel.current_trio_token()
    finished: list[str] = []

    def call() -> None:
        trio.from_thread.run_sync(started.set, trio_token=token)
        release.wait()
        finished.append("call")

    async def caller(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await idle.run_sync(call)

    try:
        async with trio.open_nursery() as nursery:
            scope = await nursery.start(caller)
            await started.wait()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()  # the cancel is pending
            assert finished == []
            release.set()
        assert finished == ["call"]
    finally:
        release.set()
        idle.close()


@needs_sched_idle
async def test_maintenance_full_text_steps_run_at_idle_priority_and_reads_do_not(tmp_path):
    """The full-text steps of maintenance (11-49 ms each after a burst) get only CPU
    nobody else wants; trio's worker threads, which reads use, keep their priority."""
    store = SqliteStore.open(tmp_path / "t.db", StoreLimits())
    step_policies: list[int] = []
    read_policies: list[int] = []
    index_step, message = store.db.fts.index_step, store.db.message
    store.db.fts.index_step = lambda *a: (step_policies.append(_policy()), index_step(*a))[1]
    store.db.message = lambda *a: (read_policies.append(_policy()), message(*a))[1]
    try:
        await store.append([msg("a", "b", "tea") for _ in range(3)])
        await store._index_text_steps()
        assert store.db.fts.indexed_id() == 3
        await store.message("nope")
        assert step_policies and set(step_policies) == {os.SCHED_IDLE}
        assert read_policies == [os.SCHED_OTHER]
    finally:
        await store.aclose()
