"""The hub's group-commit writer (a mixin of :class:`tidings.server.hub.Hub`).

One task takes everything queued (up to ``store.batch_max``), hands it to the store in
one ``append``, then routes and answers the batch in order, and saves the coalesced
progress (cursors, last_seen, delivered marks) after it (see the hub's docstring).

Two batches in flight: a :class:`~tidings.store.PipelinedStore` (redis) lets the writer
send batch k+1 while batch k's round trip is still out, so Redis and the node work at
the same time instead of taking turns.  Order is kept: batches are submitted one after
the other by this one task (Redis runs them in that order), and each batch is answered
only after the one before it (``_finish`` waits for its predecessor), so the acks, the
local routing and the idempotency answers come in the same order as with one in flight.
At most ``PIPELINE_DEPTH`` batches are out; the progress save due after a batch runs in
the background then (one at a time; a save swaps the pending progress out before it
awaits anything, so what arrives meanwhile goes with the next one).  On shutdown the
writer waits for all of them before its last progress save.

Batches are kept full (pipelined store only).  At an even rate (thousands of
messages a second, one at a time) every batch held one or two messages, and each batch
costs the same round trip whatever its size: a script call and its reply on both ends,
a publish read on every subscribed node, and in the append script the per-recipient
work (the seq read and write, the inbox length) that a bigger batch shares between
more messages (docs/cluster.md, "fourth session" and "seventh session").  So a batch
that is not full (fewer than ``store.batch_max`` messages) is not sent while another is
in flight (it waits for that one's answer), nor sooner than ``LINGER_S`` after the batch
before it; what was queued meanwhile joins it.  A message therefore waits at most one
round trip plus ``LINGER_S`` longer than it would alone; the first message after a
quiet ``LINGER_S`` goes out at once.  A second batch goes out while one is in flight
only when a full batch is waiting: the queue is then growing, and Redis should not
idle while the node answers the first.

With any other store (sqlite, memory) each batch goes at once, and the writer answers
it with the server's flusher held (``_answer``): the acks and routed messages it queued
on plain sockets are written by this task when it lets go, without a turn of the
flusher's task (docs/performance.md, ninth session).  (A commit linger for sqlite, as
above, cut its CPU per message at 5,000 msgs/s by ~19 % but raised the median by ~1 ms
and did not lower the p99 there: not kept; same place.)
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from tidings.store import Appended, NewMessage, PipelinedStore, Progress, StoreError

__all__ = ["PIPELINE_DEPTH", "WAKE", "Writer"]

#: Put on the hub's job channel to wake the writer without a job (e.g. a progress save is due).
WAKE = object()
#: Batches a PipelinedStore may have in flight at once.
PIPELINE_DEPTH = 2
#: A batch that is not full is sent at most this long after the batch before it (and
#: not while another is in flight; see the module docstring).  2 ms, not 1: 20-35 %
#: fewer script calls at 5,000 msgs/s, x0.84-0.91 server+Redis CPU per message there and
#: x0.85 in the two-node closed loop (docs/cluster.md, "eighth session").
LINGER_S = 0.002


def _take(jobs: list[Any], rx: Any, batch_max: int) -> list[Any]:
    """``jobs`` plus what is queued on ``rx`` without waiting, up to ``batch_max``
    (wake-ups dropped)."""
    while len(jobs) < batch_max:
        try:
            job = rx.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            break
        if job is not WAKE:
            jobs.append(job)
    return jobs


class Writer:
    """The writer half of the hub; the hub owns the state it uses (``_jobs_rx``,
    ``_progress``, ``_cursor_waiters``, ``store``, ``webhooks`` ...)."""

    _jobs_rx: Any
    _progress: Progress
    _cursor_waiters: list[Any]
    _flush_due: bool
    _commit_seconds: float
    _stored: int
    _saving = False  # a progress save runs in the background (pipelined writer)
    #: The server's Flusher (server.flusher), set by the server; None: none held.
    flusher: Any = None
    store: Any
    webhooks: Any
    config: Any
    _route: Callable[..., int]
    _observe_latency: Callable[[float], None]
    _failed: Callable[[int, StoreError, str], None]

    async def _writer(self) -> None:
        batch_max = self.config.store.batch_max
        rx = self._jobs_rx
        submit = self.store.append_submit if isinstance(self.store, PipelinedStore) else None
        slots = trio.Semaphore(PIPELINE_DEPTH)
        prev: trio.Event | None = None
        last_submit = -LINGER_S
        async with trio.open_nursery() as inflight:
            async for first in rx:
                jobs = _take([] if first is WAKE else [first], rx, batch_max)
                if jobs and submit is None:
                    await self._append(jobs)
                elif jobs:
                    if len(jobs) < batch_max:
                        if prev is not None and not prev.is_set():
                            await prev.wait()  # not full: waits for the one in flight
                        if trio.current_time() < last_submit + LINGER_S:
                            await trio.sleep_until(last_submit + LINGER_S)
                        jobs = _take(jobs, rx, batch_max)  # what came meanwhile joins it
                    last_submit = trio.current_time()
                    await slots.acquire()
                    started = time.monotonic()
                    messages = [j.message for j in jobs]
                    results = await submit(messages)  # queued: Redis runs batches in order
                    done = trio.Event()
                    inflight.start_soon(self._finish, jobs, messages, results, started,
                                        prev, done, slots)
                    prev = done
                if not self._save_due():
                    continue
                if submit is None:
                    await self._save_progress()
                elif not self._saving:  # in the background: the next batch need not wait
                    self._saving = True
                    inflight.start_soon(self._save_in_background)
        if self._progress or self._cursor_waiters:
            await self._save_progress()
        if self.webhooks is not None:  # users who left and messages stored at shutdown
            await self.webhooks.flush()

    def _save_due(self) -> bool:
        """Cursors and last_seen are saved after every batch; delivered marks and first
        answers ride along, or go alone when the flush timer says so."""
        p = self._progress
        return bool(p.cursors or p.last_seen or self._cursor_waiters
                    or (self._flush_due and (p.delivered or p.answers)))

    async def _append(self, jobs: list[Any]) -> None:
        """Store a batch; route and answer each message in order."""
        started = time.monotonic()
        messages = [j.message for j in jobs]
        await self._answer(jobs, messages, await self.store.append(messages), started,
                           self.flusher)

    async def _save_in_background(self) -> None:
        try:
            await self._save_progress()
        finally:
            self._saving = False

    async def _finish(self, jobs: list[Any], messages: list[NewMessage],
                      results: Callable[[], Awaitable[list[Appended]]], started: float,
                      prev: trio.Event | None, done: trio.Event, slots: trio.Semaphore) -> None:
        """A submitted batch: after the one before it is answered, wait for its results
        and answer them (so batches are answered in submit order)."""
        try:
            if prev is not None:
                await prev.wait()
            await self._answer(jobs, messages, await results(), started)
        finally:
            done.set()
            slots.release()

    async def _answer(self, jobs: list[Any], messages: list[NewMessage],
                      results: list[Appended], started: float, flusher: Any = None) -> None:
        """Route and answer a stored batch in order.  ``flusher`` (the server's, for a
        store that is not pipelined): held while the batch is answered and released
        after, so what it queued on plain sockets is written here, in this task."""
        self._commit_seconds += (time.monotonic() - started - self._commit_seconds) * 0.2
        if self.webhooks is not None and self.webhooks.tracks_undelivered:
            await self.webhooks.watch(messages, results)  # before the acks: see recorder
        if flusher is None:
            self._answer_each(jobs, results)
            return
        flusher.hold()
        try:
            self._answer_each(jobs, results)
        finally:
            flusher.release()

    def _answer_each(self, jobs: list[Any], results: list[Appended]) -> None:
        failed: StoreError | None = None
        n_failed = 0
        for job, result in zip(jobs, results, strict=True):
            if result.error is not None:
                failed, n_failed = result.error, n_failed + 1
                job.origin.on_store_failed(job.ctx)
                continue
            m = job.message
            if result.original is not None:  # the key named an earlier message
                first = result.original
                kid = (m.sender, m.recipient, m.key)
                job.origin.on_duplicate(job.ctx, first.msg_id, result.seq,
                                        self._progress.answers.get(kid, first.delivered))
                continue
            self._stored += 1
            if result.receivers is None:  # ours to route; else it comes back via the cluster
                delivered = self._route(m.msg_id, result.seq, m.sender, m.recipient, m.body, m.ts)
                self._observe_latency(time.monotonic() - job.accepted)
            else:
                delivered = result.receivers
            if m.key is not None:  # a duplicate answers what this answer says
                self._progress.answers[(m.sender, m.recipient, m.key)] = delivered
            job.origin.on_stored(job.ctx, m.msg_id, result.seq, delivered)
        if failed is not None:
            self._failed(n_failed, failed, "append")

    async def _save_progress(self) -> None:
        progress, waiters = self._progress, self._cursor_waiters
        self._progress, self._cursor_waiters, self._flush_due = Progress(), [], False
        try:
            await self.store.save_progress(progress)
        except StoreError as exc:
            self._failed(len(progress.cursors) + len(progress.last_seen), exc, "cursors")
            for origin, ctx, _seq in waiters:
                origin.on_cursor_failed(ctx)
            return
        for origin, ctx, seq in waiters:
            origin.on_cursor_saved(ctx, seq)

