"""FtsIndex: the sqlite engine's full-text index, in its own file.  Sans-IO.

The index lives in ``<database path>-fts`` (its own WAL), written only by this module's
connection, which :class:`tidings.store.sqlite.SqliteStore` uses from one worker thread
at a time.  So FTS5's inserts and segment merges never run on the event-loop thread and
never hold the messages file's write lock (WAL allows one writer per file; this
connection only reads the messages file, attached read-only as ``m``).  Measured: a
merge step of a grown index wrote a common term's whole doclist (17-23 ms) on the loop
thread (docs/performance.md, fifth session).

Schema of the side file
-----------------------
* ``messages_fts``: a contentful FTS5 table (``text``, ``owners``; rowid = the message's
  ``id`` in ``messages``), same tokenizer and columns as the table it replaces in the
  messages file, so bm25 weights and results stay.  Contentful, so it keeps its own
  copy of the text (the disk cost: about the bodies' text once more): a delete is
  ``DELETE ... WHERE rowid IN (...)``, idempotent (an external-content or contentless
  'delete' of a row that is not indexed as given corrupts the index, and an
  external-content table must live in the same file as its content).
* ``meta (key, value)``: ``indexed_id``, the high-water mark: every message with
  ``id <= indexed_id`` that still exists is indexed.  Written in the same transaction as
  the rows it covers.  Message ids are never reused (``SqliteDatabase`` hands out ids
  above every id ever stored), so the mark never hides a newer message.

The file is derived data: missing (new install, deleted, after migration 7 dropped the
old table from the messages file) or stale (its mark above every id the messages file
ever held, e.g. the messages file restored from an older backup), it is created empty
with its mark 0 and ``index_step`` re-indexes everything.  FTS5's automerge stays on
here: its merges run inside ``index_step``'s transactions, which are off the loop.

Every method takes this index's lock; sqlite3 releases the GIL while a statement runs,
so one ``INSERT ... SELECT`` step costs the loop thread nothing but the core it shares.
sqlite3 errors become StoreUnavailable naming the path.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Sequence

import orjson

from tidings.store.records import StoreUnavailable
from tidings.store.sqlite_txn import Transaction

__all__ = ["FTS_SUFFIX", "INDEX_STEP_ROWS", "FtsIndex"]

FTS_SUFFIX = "-fts"
#: Rows per ``index_step`` transaction (one segment each; larger steps, fewer merges).
INDEX_STEP_ROWS = 10_000

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)
       WITHOUT ROWID""",
    "INSERT OR IGNORE INTO meta (key, value) VALUES ('indexed_id', 0)",
    """CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5 (
        text, owners, tokenize='unicode61 remove_diacritics 2')""",
)
_SQL_MARK = "SELECT value FROM meta WHERE key = 'indexed_id'"
_SQL_SET_MARK = "UPDATE meta SET value = ? WHERE key = 'indexed_id'"
_SQL_TOP = ("SELECT COALESCE(MAX(id), 0) FROM (SELECT id FROM m.messages WHERE id > ? "
            "ORDER BY id LIMIT ?)")
_SQL_ADD = ("INSERT INTO messages_fts (rowid, text, owners) SELECT id, text, owners "
            "FROM m.messages WHERE id > ? AND id <= ? "
            "AND id NOT IN (SELECT value FROM json_each(?))")
_SQL_DEL = "DELETE FROM messages_fts WHERE rowid IN (SELECT value FROM json_each(?))"


def fts_path(main_path: str) -> str:
    """The side file of the messages database at ``main_path``."""
    return main_path + FTS_SUFFIX


def _uri(path: str, query: str = "") -> str:
    return "file:" + urllib.parse.quote(os.path.abspath(path)) + query


class FtsIndex:
    """The full-text index of the messages database ``main_path``.  Open with :meth:`open`."""

    def __init__(self, path: str, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()
        # One deferred transaction at a time: it write-locks the side file at its first
        # write and only ever reads ``m`` (a BEGIN IMMEDIATE would write-lock every
        # attached file).  Sqlite errors become StoreUnavailable naming this file.
        self._tx = Transaction(self, self._lock, "_conn", "BEGIN")

    @classmethod
    def open(cls, main_path: str, highest_id: int) -> FtsIndex:
        """Open (creating it, mode 0600, if needed) the side file of ``main_path`` and
        attach the messages file read-only.  ``highest_id``: the highest message id the
        messages file ever held; a mark above it means the index is not this file's, and
        it is emptied.  Raises StoreUnavailable naming the side file."""
        path = fts_path(main_path)
        conn = None
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            conn = sqlite3.connect(_uri(path), timeout=5.0, isolation_level=None,
                                   check_same_thread=False, uri=True)
            conn.execute("PRAGMA busy_timeout = 5000")
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise StoreUnavailable(f"cannot open store {path}: WAL mode unavailable")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("BEGIN IMMEDIATE")  # before the ATTACH: it would lock m too
            for sql in _SCHEMA:
                conn.execute(sql)
            (mark,) = conn.execute(_SQL_MARK).fetchone()
            if mark > highest_id:  # another file's index: start over
                conn.execute("DELETE FROM messages_fts")
                conn.execute(_SQL_SET_MARK, (0,))
            conn.execute("COMMIT")
            conn.execute("ATTACH DATABASE ? AS m", (_uri(main_path, "?mode=ro"),))
        except BaseException as e:
            if conn is not None:
                conn.close()
            if isinstance(e, OSError):
                raise StoreUnavailable(f"cannot open store {path}: {e.strerror or e}") from e
            if isinstance(e, sqlite3.Error):
                raise StoreUnavailable(f"cannot open store {path}: {e}") from e
            raise
        return cls(path, conn)

    def indexed_id(self) -> int:
        """The high-water mark (see the module docstring)."""
        with self._tx as c:
            return c.execute(_SQL_MARK).fetchone()[0]

    def index_step(self, max_rows: int = INDEX_STEP_ROWS) -> int:
        """Index up to ``max_rows`` messages above the mark in one transaction (one
        INSERT ... SELECT, plus FTS5's automerge); return how many."""
        with self._tx as c:
            (mark,) = c.execute(_SQL_MARK).fetchone()
            (top,) = c.execute(_SQL_TOP, (mark, max_rows)).fetchone()
            if top <= mark:
                return 0
            count = c.execute(_SQL_ADD, (mark, top, "[]")).rowcount
            c.execute(_SQL_SET_MARK, (top,))
            return count

    def catch_up(self) -> int:
        """``index_step`` until nothing is pending: every message committed before the
        call is then searchable.  Returns how many rows were indexed."""
        total = 0
        while n := self.index_step():
            total += n
        return total

    def delete(self, ids: Sequence[int]) -> None:
        """Remove the messages ``ids`` from the index (idempotent), before they are
        deleted from ``messages``.  Ids above the mark are first passed over: the mark
        is raised past them (indexing the rest of that range), so no later step indexes
        a message while it is being deleted."""
        if not ids:
            return
        id_list = orjson.dumps(list(ids))
        with self._tx as c:
            (mark,) = c.execute(_SQL_MARK).fetchone()
            top = max(ids)
            if top > mark:
                c.execute(_SQL_ADD, (mark, top, id_list))
                c.execute(_SQL_SET_MARK, (top,))
            c.execute(_SQL_DEL, (id_list,))

    def close(self) -> None:
        """Close the connection; later calls raise StoreUnavailable.  Idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
