"""The sqlite engine: :class:`tidings.store.sqlite_db.SqliteDatabase` driven from trio.

Where each call runs (measured, docs/performance.md)
----------------------------------------------------
* **Writes run on the event-loop thread**, in transactions of at most ``WRITE_CHUNK``
  rows (about 0.5 ms each here), yielding to other tasks between chunks.  The hub hands
  over everything queued at once (group commit), so one commit serves many messages.
  A hop to a worker thread per commit cost more than the commit itself: 3-5 ms waiting
  for the thread and the GIL, which was the daemon's median latency.  With
  ``synchronous = NORMAL`` a WAL commit is a write to the page cache, no fsync.
  Every writer of the database file is on this thread (appends, cursors, history and
  retention indexing, pruning), so none ever waits on another's lock.
* **The full-text index** is its own file (:mod:`tidings.store.sqlite_fts`), written
  only in worker threads, one at a time (``_fts_limiter``: maintenance's steps in an
  idle-priority thread, a search's catch-up and a prune's deletes in ``_fts``): its
  inserts and FTS5's segment merges (17-23 ms per step once the index had grown, on the
  loop thread before, docs/performance.md, fifth session) never run on the loop thread
  and never hold the database file's write lock.
* **Reads** run in a worker thread on the read connection (WAL: they never wait for
  the writer, and a slow page read never stalls the loop).  ``inbox_state`` -- one per
  connection opened -- is batched: every call made while the reader is busy joins one
  hop and one read transaction (a connect storm of 18,000 made 18,000 hops, ~40 % of
  its CPU, measured in docs/performance.md).
* **Checkpoints** (the fsyncs) run in a worker thread on their own connection.

Maintenance (``run``)
---------------------
Three schedules, each ``MAINTENANCE_INTERVAL_S`` (checkpoints: ``CHECKPOINT_INTERVAL_S``)
after its own last pass ended, so no one waits for another's backlog:
* **Checkpoints** (``checkpoint_wal``): a PASSIVE checkpoint copies the WAL into the
  database from a thread; four a second keep each one's WAL fsync small (one a second
  queued tens of MB on the disk at 5,000 msgs/s, and the loop's WAL writes waited behind
  it).  At 15,000 msgs/s an indexing pass took seconds, and while
  checkpoints waited behind it the WAL reached SQLite's autocheckpoint: a ~300 ms
  checkpoint inside a commit on the loop thread (bpftrace, docs/performance.md, seventh
  session).
* **History and retention indexing**: rows appended since are added to
  ``conversations`` and ``retention`` in chunks on the loop thread.
* **The full-text index** (``_index_text_steps``): a worker thread of its own at idle
  CPU priority (:mod:`tidings.store.idle_thread`: it gets a core only when the loop and
  everything else on the box leave one free), ``FTS_STEP_ROWS`` per step,
  ``FTS_STEP_GAP_S`` apart; FTS5's automerge merges there.  After a closed-loop burst
  its backlog (~100,000 rows) took seconds to work off, and its steps (11-49 ms each)
  took the second core from the clients at normal priority.  A search's catch-up and
  a prune's deletes still run in trio's threads (someone waits for them).
A checkpoint never runs beside a full-text step or a history/retention chunk
(``_maintenance``, FIFO: each waits for at most one of the others, never for a whole
backlog; side by side they measured a worse open-loop p99, docs/performance.md, seventh
session); a search's full-text catch-up and a prune's delete are not held back by it.
While writes go on a checkpoint never catches up with the end of the WAL, and SQLite
would restart the WAL only from inside a commit (its autocheckpoint: a 30-300 ms stall
of that commit).
So once the WAL exceeds ``WAL_RESTART_BYTES`` the engine runs one more PASSIVE
checkpoint (it copies what was written during the first), then holds new writes for a
last one (it copies only what the second let through) and the next write starts the WAL
over.  Every ``prune_interval_s`` retention and ``max_inbox`` are applied in chunks
likewise (each chunk's rows leave the full-text index first, in the worker).  Each such
transaction (``INDEX_CHUNK`` rows) waits for a moment the loop is idle (at most
``IDLE_WAIT_S``): see ``_Pace``.

A duplicate msg_id (never produced by the hub's id generator) fails only that message:
the chunk is retried one message at a time.  Cancellation: a write that started on the
loop thread always completes (it never awaits inside a transaction).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

import trio
import trio.testing

from tidings import log
from tidings.store.base import StoreLimits
from tidings.store.idle_thread import IdleThread
from tidings.store.maintenance import prune_periodically
from tidings.store.records import (
    DEFAULT_DEVICE, Appended, DeviceState, DuplicateMessage, InboxState, NewMessage, Original,
    OutboxEntry, Progress, StoredMessage, StoreError, UndeliveredCheck, WebhookEvent,
)
from tidings.store.sqlite_db import PAGE_BYTES, SqliteDatabase

__all__ = ["CHECKPOINT_INTERVAL_S", "FTS_STEP_GAP_S", "FTS_STEP_ROWS", "IDLE_WAIT_S", "INDEX_CHUNK",
           "MAINTENANCE_INTERVAL_S", "SqliteStore", "WAL_RESTART_BYTES", "WRITE_CHUNK"]

T = TypeVar("T")
WRITE_CHUNK = 128
#: Rows per maintenance transaction on the loop thread (history and retention indexing,
#: pruning).  Waiting for an idle loop is what keeps a step (~2-3 ms at 256 rows) off the
#: messages' path; with that wait, 64-row steps measured no lower open-loop p99 than
#: 256-row ones but cost twice the CPU per indexed row (12.5 vs 6.6 us, when the full-text
#: index was still indexed here), and after a closed-loop burst they left the open loop's
#: p99 at 8.7-10.7 ms against 3.3-8.2 (docs/performance.md, fourth session, "index step
#: size").
INDEX_CHUNK = 256
IDLE_WAIT_S = 0.01
#: Maintenance adds rows to the full-text index (worker thread) this many per step, with
#: this pause between steps: ~4 ms of a core per step instead of one 30-60 ms burst a
#: second, which on a 2-core box took the core the loop and its clients share.
FTS_STEP_ROWS = 1000
FTS_STEP_GAP_S = 0.01
MAINTENANCE_INTERVAL_S = 1.0
#: PASSIVE checkpoints come this often.  A checkpoint starts with one fsync of the WAL
#: written since the last; at 5,000 msgs/s that was tens of MB a second (3.4 pages a
#: commit), and while its 75-90 ms of writes were queued on the disk a WAL write of the
#: loop thread that had to read a block first waited behind them (11-29 ms: bpftrace,
#: docs/performance.md, eighth session).  A quarter of a second keeps each fsync a
#: quarter as big.
CHECKPOINT_INTERVAL_S = 0.25
#: Past this WAL size the engine restarts the WAL (writes held for one checkpoint).  At
#: 16 MiB, with four checkpoints a second, writes would be held ~3 times a second at
#: 5,000 msgs/s; at 64 MiB about once a second, as with one checkpoint a second before.
WAL_RESTART_BYTES = 64 * 1024 * 1024


class _StateBatch:
    """``inbox_state`` calls read in one hop: their keys, then results (or error)."""

    __slots__ = ("done", "error", "keys", "results")

    def __init__(self, key: tuple[str, str]) -> None:
        self.keys = [key]
        self.done = trio.Event()
        self.results: list[InboxState] = []
        self.error: BaseException | None = None


class _Pace:
    """When each loop-thread transaction of one maintenance pass (indexing, pruning) runs.
    Each waits for a moment the event loop has nothing else to run (no task runnable,
    no I/O ready), so it delays only the messages that arrive while it runs, by one step
    (with a plain ``sleep(0)`` between steps a step ran in every turn of the loop, and a
    message waited for one at each of its hops).  Once the loop stays busy for
    ``IDLE_WAIT_S`` (saturated), the rest of the pass only yields with ``sleep(0)``
    between steps, so maintenance keeps up with any write rate."""

    __slots__ = ("busy",)

    def __init__(self) -> None:
        self.busy = False

    async def step(self) -> None:
        """Wait for this pass's next transaction."""
        if self.busy:
            await trio.sleep(0)
            return
        with trio.move_on_after(IDLE_WAIT_S) as waited:
            await trio.testing.wait_all_tasks_blocked()
        self.busy = waited.cancelled_caught


class SqliteStore:
    """The durable single-node engine.  Open with :meth:`open`."""

    name = "sqlite"

    def __init__(self, db: SqliteDatabase, limits: StoreLimits) -> None:
        self.db = db
        self._limits = limits
        self._read_limiter = trio.CapacityLimiter(1)
        self._fts_limiter = trio.CapacityLimiter(1)  # one full-text index writer at a time
        # Maintenance's full-text steps run here, at idle CPU priority (see _index_text_steps).
        self._idle = IdleThread("tidings-fts-index")
        # A checkpoint never overlaps a full-text step of ``_index_text_steps`` or a
        # history/retention chunk of ``_index_all`` (FIFO: each waits for at most one of
        # the others): side by side they measured a worse open-loop p99
        # (docs/performance.md, seventh session).
        self._maintenance = trio.StrictFIFOLock()
        self._states: _StateBatch | None = None  # the inbox_state batch open for joining
        self._held: trio.Event | None = None  # set while writes wait for a WAL restart
        self._maintenance_errors = log.LogOnce(interval=60.0)

    @classmethod
    def open(cls, path: str | os.PathLike[str], limits: StoreLimits | None = None) -> SqliteStore:
        """Open (creating and migrating) the database at ``path``; its directory must
        exist.  Raises StoreUnavailable naming the path and the reason."""
        limits = limits or StoreLimits()
        db = SqliteDatabase.open(path, max_inbox=limits.max_inbox,
                                 key_window_ms=limits.key_window_ms)
        return cls(db, limits)

    async def _writable(self) -> None:
        while self._held is not None:
            await self._held.wait()

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._read_limiter)

    async def _fts(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a call of the full-text index in its worker thread (never abandoned on
        cancellation: the thread finishes with its connection)."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._fts_limiter)

    # -- writes (loop thread) ------------------------------------------------------------

    async def append(self, msgs: Sequence[NewMessage]) -> list[Appended]:
        await self._writable()
        out: list[Appended] = []
        for start in range(0, len(msgs), WRITE_CHUNK):
            if start:
                await trio.sleep(0)  # let the loop breathe between chunks
            out += self._append_chunk(msgs[start:start + WRITE_CHUNK])
        return out

    def _append_chunk(self, msgs: Sequence[NewMessage]) -> list[Appended]:
        try:
            return [Appended(r) if type(r) is int else Appended(r.seq, original=r)
                    for r in self.db.append_many(msgs)]
        except DuplicateMessage:
            if len(msgs) > 1:
                return [r for m in msgs for r in self._append_chunk([m])]
            return [Appended(None, DuplicateMessage(f"duplicate msg_id {msgs[0].msg_id!r}"))]
        except StoreError as exc:
            return [Appended(None, exc) for _ in msgs]

    async def claim_key(self, sender: str, target: str, key: str, msg_id: str,
                        ts: int) -> Original | None:
        await self._writable()
        return self.db.claim_key(sender, target, key, msg_id, ts)

    async def save_progress(self, progress: Progress) -> None:
        await self._writable()
        self.db.save_progress(progress)

    # -- reads (worker thread) -----------------------------------------------------------

    async def read_inbox(self, user: str, after_seq: int, limit: int) -> list[StoredMessage]:
        return await self._read(self.db.read_inbox, user, after_seq, limit)

    async def inbox_state(self, user: str, device: str = DEFAULT_DEVICE) -> InboxState:
        """Batched (see the module docstring): the first caller leads a batch, waits for
        the read connection and then reads the state of every (user, device) that joined
        meanwhile in one thread hop; the others wait for it.  The leader's wait and read
        are shielded from cancellation (the others depend on it; a read ends anyway).
        A store failure fails every call of the batch."""
        batch = self._states
        if batch is not None:  # a leader is waiting for the read connection: join it
            i = len(batch.keys)
            batch.keys.append((user, device))
            await batch.done.wait()
            if batch.error is not None:
                raise copy.copy(batch.error)
            return batch.results[i]
        batch = self._states = _StateBatch((user, device))
        try:
            with trio.CancelScope(shield=True):
                async with self._read_limiter:
                    self._states = None  # closed: later callers start the next batch
                    batch.results = await trio.to_thread.run_sync(self.db.inbox_states, batch.keys)
        except BaseException as exc:
            batch.error = exc
            raise
        finally:
            if self._states is batch:
                self._states = None
            batch.done.set()
        return batch.results[0]

    async def devices(self, user: str) -> dict[str, DeviceState]:
        return await self._read(self.db.devices, user)

    async def message(self, msg_id: str) -> StoredMessage | None:
        return await self._read(self.db.message, msg_id)

    async def history(self, user: str, peer: str, before_msg_id: str | None,
                      limit: int) -> tuple[list[StoredMessage], bool]:
        return await self._read(self.db.history, user, peer, before_msg_id, limit)

    async def search(self, user: str, query: str, limit: int,
                     offset: int = 0) -> tuple[list[StoredMessage], bool]:
        await self._index_all()  # every stored message is searchable
        return await self._read(self.db.read_search, user, query, limit, offset)

    async def last_seen(self, users: Sequence[str]) -> dict[str, int | None]:
        return await self._read(self.db.last_seen, list(users))

    # -- webhooks (writes on the loop thread, reads in a worker thread) ------------------

    async def outbox_add(self, events: Sequence[WebhookEvent]) -> None:
        await self._writable()
        self.db.outbox_add(events)

    async def outbox_read(self, after: str | None, limit: int) -> list[OutboxEntry]:
        return await self._read(self.db.outbox_read, after, limit)

    async def outbox_retry(self, pos: str, attempts: int, due_ms: int) -> None:
        await self._writable()
        self.db.outbox_retry(pos, attempts, due_ms)

    async def outbox_done(self, positions: Sequence[str]) -> None:
        await self._writable()
        self.db.outbox_done(positions)

    async def outbox_depth(self) -> int:
        return await self._read(self.db.outbox_depth)

    async def outbox_lease(self, owner: str, ttl_ms: int) -> bool:
        return True  # one process per database file

    async def presence_set(self, node: str, online: Sequence[str], offline: Sequence[str], *,
                           full: bool, now_ms: int, expires_ms: int,
                           types: Collection[str]) -> bool:
        await self._writable()
        return self.db.presence_set(node, online, offline, full=full, now_ms=now_ms,
                                    expires_ms=expires_ms, types=types)

    async def presence_reap(self, now_ms: int, types: Collection[str],
                            node: str | None = None) -> int:
        await self._writable()
        return self.db.presence_reap(now_ms, types, node)

    async def undelivered_watch(self, checks: Sequence[UndeliveredCheck]) -> None:
        await self._writable()
        self.db.undelivered_watch(checks)

    async def undelivered_due(self, now_ms: int, limit: int) -> list[UndeliveredCheck]:
        return await self._read(self.db.undelivered_due, now_ms, limit)

    async def acked_by_any_device(self, pairs: Sequence[tuple[str, int]]) -> list[bool]:
        return await self._read(self.db.acked_by_any_device, list(pairs))

    async def undelivered_settle(self, checks: Sequence[UndeliveredCheck],
                                 events: Sequence[WebhookEvent | None]) -> int:
        await self._writable()
        return self.db.undelivered_settle(checks, events)

    # -- maintenance ---------------------------------------------------------------------

    async def _index_all(self, pace: _Pace | None = None) -> None:
        """Index every pending row in ``conversations`` and ``retention``,
        ``INDEX_CHUNK`` rows per transaction on the loop thread (paced: ``_Pace``).
        Without ``pace`` (search) also catch the full-text index up, in its worker
        thread, so every stored message is searchable; maintenance leaves that index to
        ``_index_text_steps``."""
        paced = pace is not None
        pace = pace or _Pace()
        while True:
            await pace.step()
            async with self._maintenance:  # a chunk never runs beside a checkpoint
                await self._writable()
                more = self.db.index_pending(INDEX_CHUNK) >= INDEX_CHUNK
            if not more:
                break
        if not paced:
            await self._fts(self.db.fts.catch_up)

    async def _index_text_steps(self) -> None:
        """Add what is pending to the full-text index in its worker thread,
        ``FTS_STEP_ROWS`` per step and ``FTS_STEP_GAP_S`` between steps, so its CPU is
        spread out instead of taking a core in one burst; a checkpoint may run between
        two steps.  Raises StoreError."""
        while True:
            # The index's thread first, then the lock: a step never holds the lock while
            # it waits for a search's catch-up or a prune's delete (the checkpoint would
            # wait for those too).  The call runs at idle CPU priority (IdleThread): a
            # step (11-49 ms after a burst) then takes no core the loop or its clients
            # want (docs/performance.md, eleventh session).
            async with self._fts_limiter, self._maintenance:
                indexed = await self._idle.run_sync(self.db.fts.index_step, FTS_STEP_ROWS)
            if indexed < FTS_STEP_ROWS:
                return
            await trio.sleep(FTS_STEP_GAP_S)

    async def _periodically(self, job: Callable[[], Any], event: str, key: str,
                            interval: float | None = None) -> None:
        """``await job()`` ``interval`` (default ``MAINTENANCE_INTERVAL_S``) after the
        last one ended, until cancelled; a StoreError is logged (``event``, at most once
        a minute per ``key``) and the job runs again next time."""
        while True:
            await trio.sleep(MAINTENANCE_INTERVAL_S if interval is None else interval)
            try:
                await job()
            except StoreError as exc:
                self._maintenance_errors.log("error", event, key=key, error=str(exc))

    async def prune(self, now_ms: int, retention_days: float | None) -> int:
        pace = _Pace()
        while True:  # expired idempotency keys, INDEX_CHUNK per transaction
            await pace.step()
            await self._writable()
            if self.db.forget_keys(now_ms, INDEX_CHUNK) < INDEX_CHUNK:
                break
        await self._index_all(pace)  # retention plans from indexed rows
        pending = await self._read(self.db.prune_plan, now_ms, retention_days)
        deleted = 0
        while pending:  # prune_step's three parts, each where it belongs
            picked = await self._read(self.db.prune_pick, pending, INDEX_CHUNK)
            await self._fts(self.db.fts.delete, [i for _, ids in picked for i in ids])
            await pace.step()
            await self._writable()
            deleted += self.db.prune_delete(picked)
        return deleted

    async def checkpoint(self) -> None:
        """Index what was appended (``conversations`` and ``retention``; the full-text
        index has its own schedule), then ``checkpoint_wal``.  Raises StoreError."""
        await self._index_all(_Pace())
        await self.checkpoint_wal()

    async def checkpoint_wal(self) -> None:
        """Checkpoint, and restart a WAL that grew too big (see the module docstring);
        indexes nothing.  Waits for a running full-text step or history chunk first
        (and a search's history catch-up waits for a running checkpoint between its
        chunks).  Raises StoreError."""
        async with self._maintenance:
            await self._checkpoint_wal()

    async def _checkpoint_wal(self) -> None:
        frames, _done = await trio.to_thread.run_sync(self.db.checkpoint)
        if frames * (PAGE_BYTES + 24) < WAL_RESTART_BYTES:
            return
        # Catch up first, writes going on: the held checkpoint then copies only what
        # this one's ~50-80 ms let through, not the whole second (held 4-7 ms, measured).
        await trio.to_thread.run_sync(self.db.checkpoint)
        held = self._held = trio.Event()
        began = time.monotonic()
        try:
            frames, done = await trio.to_thread.run_sync(self.db.checkpoint)
        finally:
            self._held = None
            held.set()
        log.log("debug", "wal_restart", frames=frames, complete=frames == done,
                held_ms=round((time.monotonic() - began) * 1000, 1))

    async def run(self, *, task_status: Any = None) -> None:
        """Checkpoint, index and prune until cancelled, each on its own schedule (see
        the module docstring)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(prune_periodically, self, self._limits)
            nursery.start_soon(self._periodically, lambda: self._index_all(_Pace()),
                               "index_failed", "index")
            nursery.start_soon(self._periodically, self._index_text_steps,
                               "text_index_failed", "text_index")
            if task_status is not None:
                task_status.started()
            await self._periodically(self.checkpoint_wal, "checkpoint_failed", "checkpoint",
                                     CHECKPOINT_INTERVAL_S)

    async def aclose(self) -> None:
        self._idle.close()
        await trio.to_thread.run_sync(self.db.close)
