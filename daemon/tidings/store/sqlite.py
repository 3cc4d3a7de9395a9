"""The sqlite engine: :class:`tidings.store.sqlite_db.SqliteDatabase` driven from trio.

Threads
-------
Every call into SQLite runs in a worker thread (``trio.to_thread``), never on the event
loop: a commit, a page read or a checkpoint may wait on the disk.  Worker threads are
never abandoned on cancel (a shared connection must not be used by a thread the caller
gave up on), so a cancelled call still finishes its transaction.

* Writes of the hot path (``append``, ``save_cursors``) go through one writer limiter:
  one transaction per call, in the order the hub calls them (group commit: the hub
  hands over everything queued at once).
* Reads run on the read connection (WAL: they never wait for the writer).
* Maintenance runs in ``run()``: every second the rows appended since are added to the
  full-text index in transactions of at most ``INDEX_CHUNK`` rows (so an append waits at
  most one chunk for the write lock) and the WAL is checkpointed (PASSIVE) from a thread
  of its own, keeping checkpoint fsyncs off the append path; every
  ``prune_interval_s`` retention and ``max_inbox`` are applied in bounded batches.

A duplicate msg_id (never produced by the hub's id generator) fails only that message:
the batch is retried one message at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import trio

from tidings import log
from tidings.store.base import StoreLimits
from tidings.store.maintenance import prune_periodically
from tidings.store.records import (
    Appended, DuplicateMessage, InboxState, NewMessage, StoredMessage, StoreError,
)
from tidings.store.sqlite_db import SqliteDatabase

__all__ = ["INDEX_CHUNK", "MAINTENANCE_INTERVAL_S", "SqliteStore"]

T = TypeVar("T")
INDEX_CHUNK = 2000
MAINTENANCE_INTERVAL_S = 1.0


class SqliteStore:
    """The durable single-node engine.  Open with :meth:`open`."""

    name = "sqlite"

    def __init__(self, db: SqliteDatabase, limits: StoreLimits) -> None:
        self.db = db
        self._limits = limits
        self._write_limiter = trio.CapacityLimiter(1)
        self._read_limiter = trio.CapacityLimiter(1)
        self._maintenance_errors = log.LogOnce(interval=60.0)

    @classmethod
    def open(cls, path: str | os.PathLike[str], limits: StoreLimits | None = None) -> SqliteStore:
        """Open (creating and migrating) the database at ``path``; its directory must
        exist.  Raises StoreUnavailable naming the path and the reason."""
        limits = limits or StoreLimits()
        return cls(SqliteDatabase.open(path, max_inbox=limits.max_inbox), limits)

    # -- threads -----------------------------------------------------------------------

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._write_limiter)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._read_limiter)

    # -- writes --------------------------------------------------------------------------

    async def append(self, msgs: Sequence[NewMessage]) -> list[Appended]:
        if not msgs:
            return []
        try:
            seqs = await self._write(self.db.append_many, msgs)
        except DuplicateMessage:
            return [await self._append_alone(m) for m in msgs]
        except StoreError as exc:
            return [Appended(None, exc) for _ in msgs]
        return [Appended(seq) for seq in seqs]

    async def _append_alone(self, msg: NewMessage) -> Appended:
        try:
            (seq,) = await self._write(self.db.append_many, [msg])
        except StoreError as exc:
            return Appended(None, exc)
        return Appended(seq)

    async def save_cursors(self, cursors: Mapping[str, int], last_seen: Mapping[str, int]) -> None:
        await self._write(self.db.save_cursors, cursors, last_seen)

    # -- reads ---------------------------------------------------------------------------

    async def read_inbox(self, user: str, after_seq: int, limit: int) -> list[StoredMessage]:
        return await self._read(self.db.read_inbox, user, after_seq, limit)

    async def inbox_state(self, user: str) -> InboxState:
        return await self._read(self.db.inbox_state, user)

    async def history(self, user: str, peer: str, before_msg_id: str | None,
                      limit: int) -> tuple[list[StoredMessage], bool]:
        return await self._read(self.db.history, user, peer, before_msg_id, limit)

    async def search(self, user: str, query: str, limit: int,
                     offset: int = 0) -> tuple[list[StoredMessage], bool]:
        return await self._read(self.db.search, user, query, limit, offset)

    async def last_seen(self, users: Sequence[str]) -> dict[str, int | None]:
        return await self._read(self.db.last_seen, list(users))

    # -- maintenance ---------------------------------------------------------------------

    async def prune(self, now_ms: int, retention_days: float | None) -> int:
        # Not under the writer limiter: the database lock serializes it with appends,
        # one bounded transaction at a time.
        return await trio.to_thread.run_sync(self.db.prune, now_ms, retention_days)

    async def run(self, *, task_status: Any = None) -> None:
        """Index, checkpoint and prune until cancelled (see the module docstring)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(prune_periodically, self, self._limits)
            if task_status is not None:
                task_status.started()
            while True:
                await trio.sleep(MAINTENANCE_INTERVAL_S)
                try:
                    while await trio.to_thread.run_sync(self.db.index_pending, INDEX_CHUNK):
                        pass
                    await trio.to_thread.run_sync(self.db.checkpoint)
                except StoreError as exc:
                    self._maintenance_errors.log("error", "checkpoint_failed", key="checkpoint",
                                                 error=str(exc))

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self.db.close)
