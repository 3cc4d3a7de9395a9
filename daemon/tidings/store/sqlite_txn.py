"""Transaction: one SQLite transaction on a connection, under its lock.  Sans-IO.

:class:`tidings.store.sqlite_db.SqliteDatabase` wraps every read and write in one
(``_read``, ``_write``), and :class:`tidings.store.sqlite_fts.FtsIndex` every call.  A plain class rather than a ``contextlib.contextmanager``
generator because the writer runs on the event-loop thread once per commit: entering
and leaving the generator form cost ~5.6 us, this class ~1.1 us (CPython 3.11 on the
2-core bench box; docs/performance.md, sixth session, branch commitcost).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from types import TracebackType
from typing import Any

from tidings.store.records import DuplicateMessage, StoreUnavailable

__all__ = ["Transaction", "rollback"]


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back the connection's open transaction, if any; never raises."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


class Transaction:
    """``with Transaction(owner, lock, name, begin) as conn:`` holds ``lock``, runs
    ``begin`` on ``getattr(owner, name)`` (the connection; None means closed:
    StoreUnavailable before anything runs), and on a clean exit runs ``COMMIT``.  If
    the block, the BEGIN or the COMMIT raises, the transaction is rolled back and an
    sqlite3 error becomes DuplicateMessage (a msg_id constraint) or StoreUnavailable
    (naming ``owner.path``); any other exception (cancellation included: nothing here
    awaits) propagates as it is.  The lock is released in every case, last.  One
    object may serve any number of uses, one at a time (its state is set and cleared
    while it holds the lock), and saves building one per commit."""

    __slots__ = ("_begin", "_conn", "_lock", "_name", "_owner")

    def __init__(self, owner: Any, lock: threading.Lock, name: str, begin: str) -> None:
        self._owner = owner
        self._lock = lock
        self._name = name
        self._begin = begin
        self._conn: sqlite3.Connection | None = None

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            conn = getattr(self._owner, self._name)
            if conn is None:
                raise StoreUnavailable(f"store {self._owner.path} is closed")
            try:
                conn.execute(self._begin)
            except BaseException as e:
                self._fail(conn, e)
                raise
        except BaseException:
            self._lock.release()
            raise
        self._conn = conn  # (only once BEGIN ran: a failed enter leaves no state behind)
        return conn

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        conn = self._conn
        assert conn is not None
        try:
            if exc is None:
                try:
                    conn.execute("COMMIT")
                except BaseException as e:
                    self._fail(conn, e)
                    raise
            else:
                self._fail(conn, exc)  # (returns: the block's exception goes on as it is)
        finally:
            self._conn = None
            self._lock.release()

    def _fail(self, conn: sqlite3.Connection, e: BaseException) -> None:
        """Roll back; an sqlite3 error ``e`` is raised as the store's, others return."""
        rollback(conn)
        if isinstance(e, sqlite3.IntegrityError) and "msg_id" in str(e):
            raise DuplicateMessage(f"duplicate msg_id: {e}") from e
        if isinstance(e, sqlite3.Error):
            raise StoreUnavailable(f"store {self._owner.path}: {e}") from e
