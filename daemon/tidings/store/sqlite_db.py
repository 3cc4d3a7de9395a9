"""SqliteDatabase: the sqlite engine's synchronous half (stdlib sqlite3, WAL).  Sans-IO.

Theory of operation
-------------------
Semantics are those of :mod:`tidings.store.records` (read its docstring first); this
module maps them onto one SQLite file (and the full-text index's own).
:class:`tidings.store.sqlite.SqliteStore` calls it from trio (threads, maintenance);
this module never imports trio.

* ``messages``: one row per message, ``id`` INTEGER PRIMARY KEY (never reused: the
  full-text index's rowid; ``pruned_id`` in ``meta`` keeps ids above pruned ones),
  ``msg_id`` UNIQUE, ``(recipient, seq)`` UNIQUE index for inbox reads, and a
  ``conv`` column (the sorted pair of users joined by U+001F; queries also check
  sender/recipient, so a user id containing U+001F cannot make two conversations
  collide).
* ``conversations``: ``(conv, msg_id)``, history's index, filled by ``index_pending``
  (so a commit does not rewrite an index page per conversation it touches); history
  reads the rows above its high-water mark (``fts_indexed_id`` in ``meta``, a name from
  when the full-text index shared it) with a scan of their id range
  (``sqlite_schema.read_history``).
* ``retention``: ``(ts, id)``, retention's index, filled by ``index_pending`` likewise
  (a ``messages (ts)`` index cost a WAL frame per commit: a quarter of a one-message
  commit's pages); ``prune_plan`` reads it, so retention sees indexed rows only.
* Two VIRTUAL generated columns feed full-text search: ``text`` (the body's
  string value if the body JSON is a string, else the raw JSON text) and
  ``owners`` (``u<hex(sender)> u<hex(recipient)>``, so FTS5 itself restricts a
  search to the user's messages instead of ranking everyone's).
* The full-text index is a second file, ``<path>-fts`` (:mod:`tidings.store.sqlite_fts`,
  ``self.fts``; migration 7 dropped ``messages_fts`` from this one): its own connection
  indexes these columns (``index_step``) and merges FTS5 segments without this file's
  write lock; the reader attaches it (as ``side``) and ``read_search`` joins it with
  ``messages`` by rowid.  ``prune_step`` removes rows from it before deleting them here.
* ``users``: per user ``last_seen``, and ``last_seq`` as of the
  last prune of that inbox.  The highest seq ever assigned to a user is
  ``MAX(users.last_seq, MAX(messages.seq))`` (``_LAST_SEQ_OF``): appends do not write
  ``users`` at all (measured: scattered updates of the users B-tree were a large part
  of a group commit's pages); ``prune_step`` saves ``last_seq`` before it deletes, so
  seqs are never reused.  The writer keeps the last seq of recent recipients and the
  next row id in memory (``_last``, ``_next_id``), updated only after a commit.
* ``devices`` (per device cursors and delivered marks) and ``send_keys`` (idempotency
  keys, checked and written in the append transaction of a keyed message): see
  :mod:`tidings.store.sqlite_schema`, which also holds MIGRATIONS and ``_LAST_SEQ_OF``.
* ``webhook_*``: what webhooks keep (:mod:`tidings.store.sqlite_webhooks`).

Concurrency: two connections (plus the index's own) opened with
``check_same_thread=False``, each guarded by a ``threading.Lock``: the writer (every
write, one ``BEGIN IMMEDIATE`` transaction per call, or per batch of at most PRUNE_BATCH rows in
``prune`` so the write lock is never held long) and a ``query_only`` reader
(multi-statement reads run in one read transaction, i.e. one WAL snapshot). WAL
lets the reader proceed while the writer commits. ``synchronous=NORMAL``: a
commit survives a process crash; a power loss may lose the last transactions
but never corrupts the file.

Checkpoints: ``checkpoint()`` runs a PASSIVE checkpoint on a third connection;
call it from a thread other than the writer's so checkpoint fsyncs stay off
the append path.  SQLite's own autocheckpoint runs *inside* a commit (measured
30-40 ms on this box, every ~2,500 commits), so it is only a far backstop
(AUTOCHECKPOINT_PAGES): the engine restarts the WAL itself (see
:mod:`tidings.store.sqlite`).

Schema changes go in MIGRATIONS (append only); ``PRAGMA user_version`` records
how many have been applied. ``open`` applies the missing ones in one write
transaction, which also proves the file is writable.

sqlite3 errors never leak: a duplicate msg_id becomes DuplicateMessage, a
malformed FTS expression BadQuery, anything else StoreUnavailable naming the path.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Sequence
from typing import Any

import orjson

from tidings.store.records import (
    DEFAULT_DEVICE, BadQuery, DeviceState, InboxState, NewMessage, Original,
    Progress, StoredMessage, StoreUnavailable, UnknownMessage, check_page, key_is_live,
    prune_cutoff_ms,
)
from tidings.store.search import parse_query
from tidings.store.sqlite_fts import FtsIndex
from tidings.store.sqlite_schema import (
    _COLS, _IN_PAIR, _LAST_SEQ_OF, MIGRATIONS, SQL_CONV_ADD_RANGE, SQL_CONV_DEL, SQL_INDEXED_ID,
    SQL_RETENTION_ADD_RANGE, SQL_RETENTION_CUTS, SQL_RETENTION_DEL, find_key, forget_keys,
    read_devices, read_history, remember_key, save_progress,
)
from tidings.store.sqlite_txn import Transaction, rollback
from tidings.store.sqlite_webhooks import WebhookTables

__all__ = ["MIGRATIONS", "PRUNE_BATCH", "SqliteDatabase"]

PRUNE_BATCH = 5000
WRITER_CACHE_KIB = 16384
# Backstop only: an autocheckpoint runs in the committing writer and fsyncs (30-40 ms
# here when idle, ~300 ms under load: bpftrace, docs/performance.md, seventh session),
# so callers run checkpoint() from another thread and restart the WAL well before this
# (256 MiB of 4 KiB pages).
AUTOCHECKPOINT_PAGES = 65536
PAGE_BYTES = 4096
_I64 = 2**63 - 1

_SQL_INSERT = ("INSERT INTO messages (id, msg_id, recipient, seq, sender, conv, body, ts) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
# The highest id ever stored: ids are never reused (the side index relies on it).
_SQL_NEXT_ID = ("SELECT MAX((SELECT COALESCE(MAX(id), 0) FROM messages), "
                "(SELECT value FROM meta WHERE key = 'fts_indexed_id'), "
                "COALESCE((SELECT value FROM meta WHERE key = 'pruned_id'), 0))")
_SQL_PRUNED_ID = ("INSERT INTO meta (key, value) VALUES ('pruned_id', ?) ON CONFLICT (key) "
                  "DO UPDATE SET value = MAX(value, excluded.value)")
_SQL_DEL = "DELETE FROM messages WHERE id IN (SELECT value FROM json_each(?))"
_SQL_LAST_SEQS = (f"SELECT value, {_LAST_SEQ_OF.format(u='value')} FROM json_each(?)")
_SQL_KEEP_LAST_SEQ = (f"INSERT INTO users (user, last_seq) SELECT :u, {_LAST_SEQ_OF.format(u=':u')} "
                      "WHERE true ON CONFLICT (user) DO UPDATE SET "
                      "last_seq = MAX(last_seq, excluded.last_seq)")
#: The writer's memory of recipients' last seqs is dropped past this many users.
LAST_SEQ_CACHE = 100_000


def _i64(n: int) -> int:
    return max(-_I64, min(int(n), _I64))


def _conv(a: str, b: str) -> str:
    return f"{a}\x1f{b}" if a <= b else f"{b}\x1f{a}"


class SqliteDatabase(WebhookTables):
    """One SQLite file. Create with :meth:`open`; see :mod:`tidings.store.base` for the
    contract of each method (here synchronous and thread-safe).

    ``max_inbox``: reads see at most the newest ``max_inbox`` messages of each inbox
    (rows pushed out are hidden at once and deleted by the next ``prune``), so every
    engine shows the same thing without a delete in the append transaction.
    ``key_window_ms``: how long an idempotency key names its first message (0: keys
    are ignored)."""

    def __init__(self, path: str, writer: sqlite3.Connection,
                 reader: sqlite3.Connection, fts: FtsIndex, max_inbox: int | None = None,
                 key_window_ms: int = 86_400_000) -> None:
        self.path = path
        self.fts = fts  # the full-text index (its own file and connection)
        self.max_inbox = max_inbox
        self.key_window_ms = key_window_ms
        self._writer: sqlite3.Connection | None = writer
        self._last: dict[str, int] = {}  # recipient -> last seq, as committed (writer only)
        self._next_id: int | None = None  # the last row id used, once known
        self._reader: sqlite3.Connection | None = reader
        self._wlock = threading.Lock()
        self._rlock = threading.Lock()
        self._cplock = threading.Lock()
        # one each, reused: a Transaction keeps state only while it holds its lock
        self._wtx = Transaction(self, self._wlock, "_writer", "BEGIN IMMEDIATE")
        self._rtx = Transaction(self, self._rlock, "_reader", "BEGIN")
        self._checkpointer: sqlite3.Connection | None = None

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike[str], max_inbox: int | None = None,
             key_window_ms: int = 86_400_000) -> SqliteDatabase:
        """Open (creating the file, mode 0600, if needed) and migrate the store.

        The directory must already exist. Raises StoreUnavailable, naming the path
        and the reason, if the file cannot be created, opened or written, or if
        its schema is newer than this code.
        """
        path = os.fsdecode(path)
        try:  # sqlite only says "unable to open database file"; the OS says why
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as e:
            raise StoreUnavailable(f"cannot open store {path}: {e.strerror or e}") from e
        writer = reader = fts = None
        try:
            writer = cls._connect(path)
            mode = writer.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreUnavailable(f"cannot open store {path}: WAL mode unavailable")
            writer.execute("PRAGMA synchronous = NORMAL")
            writer.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
            writer.execute(f"PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT_PAGES}")
            cls._migrate(writer, path)
            fts = FtsIndex.open(path, writer.execute(_SQL_NEXT_ID).fetchone()[0])
            reader = cls._connect(path)
            reader.execute("PRAGMA query_only = 1")
            reader.execute("ATTACH DATABASE ? AS side", (fts.path,))
        except BaseException as e:
            if fts is not None:
                fts.close()
            for conn in (reader, writer):
                if conn is not None:
                    conn.close()
            if isinstance(e, sqlite3.Error):
                raise StoreUnavailable(f"cannot open store {path}: {e}") from e
            raise
        return cls(path, writer, reader, fts, max_inbox, key_window_ms)

    @staticmethod
    def _connect(path: str) -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=5.0, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection, path: str) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise StoreUnavailable(
                    f"{path}: database schema version {version} is newer than "
                    f"this tidings supports ({len(MIGRATIONS)})")
            for statements in MIGRATIONS[version:]:
                for sql in statements:
                    conn.execute(sql)
            # always write: proves at open time that the file is writable
            conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise

    # -------------------------------------------------------- transactions

    def _write(self) -> Transaction:
        """One write transaction on the writer connection (see Transaction: sqlite
        errors become DuplicateMessage or StoreUnavailable, with the path)."""
        return self._wtx

    def _read(self) -> Transaction:
        """One read transaction (a consistent snapshot) on the reader connection."""
        return self._rtx

    # ------------------------------------------------------------ messages

    def append_many(self, msgs: Sequence[NewMessage]) -> list[int | Original]:
        """Store all of ``msgs`` in one transaction (durable on return) and return
        each one's new inbox seq, or the Original its live idempotency key names (that
        one is not stored).  Any duplicate msg_id -> DuplicateMessage, nothing stored."""
        if not msgs:
            return []
        known = self._last
        with self._wtx as c:  # (= self._write(); the loop thread's hottest call)
            last = {}
            missing = [r for r in dict.fromkeys(m.recipient for m in msgs) if r not in known]
            if missing:
                last.update(c.execute(_SQL_LAST_SEQS, (orjson.dumps(missing),)))
            row_id = self._next_id
            if row_id is None:
                # Row ids above everything ever indexed: after a prune removed the newest
                # rows, SQLite would hand their ids out again, below the index high-water.
                (row_id,) = c.execute(_SQL_NEXT_ID).fetchone()
            rows: list[tuple[Any, ...]] = []
            seqs: list[int | Original] = []
            keyed: dict[tuple[str, str, str], tuple[Original, int]] = {}  # this batch's
            window = self.key_window_ms
            for m in msgs:
                r = m.recipient
                if m.key is not None and window:
                    original = self._original(c, keyed, m)
                    if original is not None:
                        seqs.append(original)
                        continue
                seq = (last[r] if r in last else known[r]) + 1
                last[r] = seq
                seqs.append(seq)
                row_id += 1
                rows.append((row_id, m.msg_id, m.recipient, seq, m.sender,
                             _conv(m.sender, m.recipient), m.body, m.ts))
                if m.key is not None and window:
                    keyed[(m.sender, r, m.key)] = (Original(m.msg_id, seq, 0), m.ts)
            if len(rows) == 1:  # (executemany's setup costs ~2 us more for one row)
                c.execute(_SQL_INSERT, rows[0])
            elif rows:
                c.executemany(_SQL_INSERT, rows)
            for (sender, target, key), (original, ts) in keyed.items():
                remember_key(c, sender, target, key, original.msg_id, original.seq, ts)
        if len(known) + len(last) > LAST_SEQ_CACHE:
            known.clear()
        known.update(last)  # committed: now the truth
        self._next_id = row_id
        return seqs

    def _original(self, c: sqlite3.Connection,
                  keyed: dict[tuple[str, str, str], tuple[Original, int]],
                  m: NewMessage) -> Original | None:
        """Inside append_many: the original ``m``'s live key names (an earlier message
        of this batch, else a stored key), or None."""
        assert m.key is not None
        kid = (m.sender, m.recipient, m.key)
        first = keyed.get(kid)
        if first is not None:
            return first[0] if key_is_live(first[1], m.ts, self.key_window_ms) else None
        return find_key(c, *kid, m.ts, self.key_window_ms)

    def claim_key(self, sender: str, target: str, key: str, msg_id: str,
                  ts: int) -> Original | None:
        """The original a live key names (nothing written), else remember the key for
        ``msg_id`` (a message that is not stored: seq NULL) and return None."""
        if not self.key_window_ms:
            return None
        with self._write() as c:
            original = find_key(c, sender, target, key, ts, self.key_window_ms)
            if original is None:
                remember_key(c, sender, target, key, msg_id, None, ts)
        return original

    def index_pending(self, max_rows: int = 20000) -> int:
        """Add up to ``max_rows`` stored-but-unindexed messages to ``conversations`` and
        ``retention``, in one transaction; return how many.  Appends do not index (a
        commit would rewrite an index page per conversation it touches); the engine
        calls this about every second and ``prune`` calls it first, so retention sees
        every stored row.  The full-text index is ``self.fts``'s (``index_all``)."""
        with self._write() as c:
            (done,) = c.execute(SQL_INDEXED_ID).fetchone()
            (top,) = c.execute(
                "SELECT COALESCE(MAX(id), 0) FROM (SELECT id FROM messages WHERE id > ? "
                "ORDER BY id LIMIT ?)", (done, max_rows)).fetchone()
            if top <= done:
                return 0
            (count,) = c.execute("SELECT COUNT(*) FROM messages WHERE id > ? AND id <= ?",
                                 (done, top)).fetchone()
            c.execute(SQL_CONV_ADD_RANGE, (done, top))
            c.execute(SQL_RETENTION_ADD_RANGE, (done, top))
            c.execute("UPDATE meta SET value = ? WHERE key = 'fts_indexed_id'", (top,))
            return count

    def index_all(self) -> None:
        """``index_pending`` and the full-text index's ``catch_up`` until nothing is
        pending: every message stored before the call is in every index."""
        while self.index_pending():
            pass
        self.fts.catch_up()

    def read_inbox(self, user: str, after_seq: int, limit: int) -> list[StoredMessage]:
        """Up to ``limit`` messages of ``user``'s inbox with seq > after_seq, ascending."""
        check_page(limit)
        with self._read() as c:
            if self.max_inbox is not None:
                (last,) = c.execute(f"SELECT {_LAST_SEQ_OF.format(u=':u')}", {"u": user}).fetchone()
                after_seq = max(after_seq, last - self.max_inbox)
            rows = c.execute(f"SELECT {_COLS} FROM messages m WHERE recipient = ? "
                             "AND seq > ? ORDER BY seq LIMIT ?",
                             (user, _i64(after_seq), _i64(limit))).fetchall()
        return [StoredMessage(*r) for r in rows]

    def inbox_state(self, user: str, device: str = DEFAULT_DEVICE) -> InboxState:
        with self._read() as c:
            return self._inbox_state(c, user, device)

    def inbox_states(self, keys: Sequence[tuple[str, str]]) -> list[InboxState]:
        """``inbox_state`` of each (user, device) of ``keys``, in one read transaction."""
        with self._read() as c:
            return [self._inbox_state(c, user, device) for user, device in keys]

    def _inbox_state(self, c: sqlite3.Connection, user: str, device: str) -> InboxState:
        last_seq, cursor, first = c.execute(
            f"SELECT {_LAST_SEQ_OF.format(u=':u')}, "
            "(SELECT cursor FROM devices WHERE user = :u AND device = :d), "
            "(SELECT MIN(seq) FROM messages WHERE recipient = :u)",
            {"u": user, "d": device}).fetchone()
        first = last_seq + 1 if first is None else first
        if self.max_inbox is not None:
            first = max(first, last_seq - self.max_inbox + 1)
        return InboxState(first, last_seq, cursor or 0, new_device=cursor is None)

    def devices(self, user: str) -> dict[str, DeviceState]:
        with self._read() as c:
            return read_devices(c, user)

    def message(self, msg_id: str) -> StoredMessage | None:
        """The visible message ``msg_id`` (None: unknown, pruned or hidden)."""
        with self._read() as c:
            row = c.execute(f"SELECT {_COLS} FROM messages m WHERE msg_id = :id {self._visible()}",
                            {"id": msg_id, "k": self.max_inbox}).fetchone()
        return None if row is None else StoredMessage(*row)

    def save_progress(self, progress: Progress) -> None:
        """In one transaction: device cursors and delivered marks (``max(old, min(seq,
        last_seq))``, registering new devices), last_seen and first answers."""
        if not progress:
            return
        with self._write() as c:
            save_progress(c, progress)

    def forget_keys(self, now_ms: int, budget: int) -> int:
        """Forget up to ``budget`` idempotency keys expired at ``now_ms`` in one
        transaction; return how many (fewer than ``budget``: none are left)."""
        with self._write() as c:
            return forget_keys(c, now_ms, self.key_window_ms, budget)

    def history(self, user: str, peer: str, before_msg_id: str | None,
                limit: int) -> tuple[list[StoredMessage], bool]:
        """Messages between user and peer, newest first, msg_id < before_msg_id;
        plus whether older ones exist. before_msg_id not in this conversation
        (never was, or pruned) -> UnknownMessage."""
        check_page(limit)
        args = {"u": user, "p": peer, "conv": _conv(user, peer),
                "before": before_msg_id, "n": _i64(limit) + 1, "k": self.max_inbox}
        visible = self._visible()
        with self._read() as c:
            if before_msg_id is not None and c.execute(
                    f"SELECT 1 FROM messages m WHERE msg_id = :before AND conv = :conv "
                    f"AND {_IN_PAIR} {visible}", args).fetchone() is None:
                raise UnknownMessage(f"unknown message {before_msg_id!r}")
            rows = read_history(c, args, visible)
        return [StoredMessage(*r) for r in rows[:limit]], len(rows) > limit

    def search(self, user: str, query: str, limit: int,
               offset: int = 0) -> tuple[list[StoredMessage], bool]:
        """Messages user sent or received matching all phrases of ``query`` (see
        tidings.store.parse_query), best bm25 first (ties: newest first); plus
        whether more results follow.  Indexes what is pending first (``index_all``), so
        every stored message is searchable; ``read_search`` is the read alone."""
        parse_query(query)
        check_page(limit, offset)
        self.index_all()
        return self.read_search(user, query, limit, offset)

    def read_search(self, user: str, query: str, limit: int,
                    offset: int = 0) -> tuple[list[StoredMessage], bool]:
        """``search`` without indexing: sees the messages the full-text index holds."""
        phrases = parse_query(query)
        check_page(limit, offset)
        terms = " AND ".join('"' + " ".join(p) + '"' for p in phrases)
        match = f'{{owners}} : "u{user.encode().hex()}" AND {{text}} : ({terms})'
        try:
            with self._read() as c:
                rows = c.execute(
                    f"SELECT {_COLS} FROM messages_fts f JOIN messages m ON m.id = f.rowid "
                    "WHERE messages_fts MATCH :match AND (+m.sender = :u OR +m.recipient = :u) "
                    f"{self._visible()} "
                    "ORDER BY bm25(messages_fts, 1.0, 0.0), m.msg_id DESC LIMIT :n OFFSET :o",
                    {"match": match, "u": user, "n": _i64(limit) + 1, "o": _i64(offset),
                     "k": self.max_inbox}).fetchall()
        except StoreUnavailable as e:  # parse_query should make this unreachable
            if "fts5" in str(e):
                raise BadQuery("malformed query") from e
            raise
        return [StoredMessage(*r) for r in rows[:limit]], len(rows) > limit

    # ------------------------------------------------------------ presence

    def last_seen(self, users: Sequence[str]) -> dict[str, int | None]:
        result: dict[str, int | None] = dict.fromkeys(users)
        with self._read() as c:
            result.update(c.execute("SELECT user, last_seen FROM users WHERE user IN "
                                    "(SELECT value FROM json_each(?))",
                                    (orjson.dumps(list(result)),)))
        return result

    # ---------------------------------------------------------- retention

    def prune(self, now_ms: int, retention_days: float | None) -> int:
        """Delete, per recipient, every message up to the newest one older than the
        retention (ts < now - retention) and all but the newest ``max_inbox`` (which
        reads already hide); always an inbox prefix, so seqs stay contiguous.  Forgets
        expired idempotency keys and indexes pending rows first, then deletes in
        transactions of at most PRUNE_BATCH rows.  Returns the number deleted.  (The
        engine runs the same steps with pauses.)"""
        while self.forget_keys(now_ms, PRUNE_BATCH) == PRUNE_BATCH:
            pass
        while self.index_pending():  # retention plans from indexed rows
            pass
        pending = self.prune_plan(now_ms, retention_days)
        deleted = 0
        while pending:
            deleted += self.prune_step(pending, PRUNE_BATCH)
        return deleted

    def prune_plan(self, now_ms: int, retention_days: float | None) -> list[tuple[str, int]]:
        """What ``prune`` deletes: ``(user, last seq to delete)`` pairs, planned on the
        read connection (never blocks writes).  Call ``index_pending`` until it returns
        0 before deleting, so the index holds every row a step deletes (retention is
        planned from the ``retention`` index, which holds the indexed rows only)."""
        cutoff = prune_cutoff_ms(now_ms, retention_days)
        max_inbox = self.max_inbox
        cuts: dict[str, int] = {}
        with self._read() as c:
            if cutoff is not None:
                cuts.update(c.execute(SQL_RETENTION_CUTS, (_i64(cutoff),)))
            if max_inbox is not None:
                for user, cut in c.execute(
                        "SELECT recipient, MAX(seq) - :k FROM messages GROUP BY recipient "
                        "HAVING MIN(seq) <= MAX(seq) - :k", {"k": _i64(max(max_inbox, 0))}):
                    cuts[user] = max(cut, cuts.get(user, 0))
        return sorted(cuts.items(), reverse=True)

    def prune_step(self, pending: list[tuple[str, int]], budget: int) -> int:
        """Delete up to ``budget`` rows of the plan, popping the users that are done from
        the end of ``pending``; return the count.  ``prune_pick``, then the full-text
        index's ``delete`` (its own file), then ``prune_delete`` (one transaction): a
        crash between leaves rows present but unsearchable until the next prune."""
        picked = self.prune_pick(pending, budget)
        self.fts.delete([i for _, ids in picked for i in ids])
        return self.prune_delete(picked)

    def prune_pick(self, pending: list[tuple[str, int]],
                   budget: int) -> list[tuple[str, list[int]]]:
        """The ids of up to ``budget`` rows of the plan, per user (read connection),
        popping the users they finish from the end of ``pending``.  Only prune deletes
        rows and new rows get higher seqs, so the pick stays valid until deleted."""
        picked: list[tuple[str, list[int]]] = []
        with self._read() as c:
            while pending and budget:
                user, cut = pending[-1]
                ids = [r[0] for r in c.execute(
                    "SELECT id FROM messages WHERE recipient = ? AND seq <= ? "
                    "ORDER BY seq LIMIT ?", (user, cut, budget))]
                if len(ids) < budget:
                    pending.pop()
                picked.append((user, ids))
                budget -= len(ids)
        return picked

    def prune_delete(self, picked: Sequence[tuple[str, list[int]]]) -> int:
        """Delete the ``prune_pick``ed rows (and their history and retention entries) in
        one transaction, saving each user's last seq first; return the count."""
        deleted = 0
        with self._write() as c:
            for user, ids in picked:
                c.execute(_SQL_KEEP_LAST_SEQ, {"u": user})  # before its rows go
                if ids:
                    id_list = orjson.dumps(ids)
                    for sql in (SQL_CONV_DEL, SQL_RETENTION_DEL, _SQL_DEL):  # indexes first
                        c.execute(sql, (id_list,))
                    c.execute(_SQL_PRUNED_ID, (max(ids),))
                deleted += len(ids)
        return deleted

    def _visible(self) -> str:
        """SQL that hides what ``max_inbox`` pushed out (for a query on ``messages m``
        with the parameter ``:k``)."""
        if self.max_inbox is None:
            return ""
        return ("AND m.seq > (SELECT MAX(seq) FROM messages WHERE recipient = m.recipient) - :k")

    def checkpoint(self) -> tuple[int, int]:
        """Copy committed WAL pages into the database file (PASSIVE: never waits for
        and never blocks the writer or readers); return ``(frames in the WAL, frames
        now in the database)``: when equal, the next write starts the WAL over.  A frame
        is one page (``PAGE_BYTES``) plus a 24-byte header.  Meant to be called
        periodically from a thread other than the writer's, which keeps checkpoint
        fsyncs off the append path."""
        with self._cplock:
            if self._writer is None:
                raise StoreUnavailable(f"store {self.path} is closed")
            try:
                if self._checkpointer is None:
                    self._checkpointer = self._connect(self.path)
                busy, log, done = self._checkpointer.execute(
                    "PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as e:
                raise StoreUnavailable(f"store {self.path}: {e}") from e
        return max(log, 0), max(done, 0)

    def wal_bytes(self) -> int:
        """The size of the WAL file (0 when there is none).  A restarted WAL keeps its
        file (cutting a big file costs tens of ms of kernel time on the writer, measured)
        and is written over from the start; what is in use is ``checkpoint()``'s."""
        try:
            return os.path.getsize(self.path + "-wal")
        except OSError:
            return 0

    def close(self) -> None:
        """Close the connections; later calls raise StoreUnavailable. Idempotent."""
        self.fts.close()
        with self._wlock, self._rlock, self._cplock:
            for conn in (self._checkpointer, self._reader, self._writer):
                if conn is not None:
                    conn.close()
            self._checkpointer = self._reader = self._writer = None
