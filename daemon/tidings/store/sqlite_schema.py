"""The sqlite engine's schema (MIGRATIONS) and its per-device and idempotency-key
statements.  Sans-IO (stdlib sqlite3 on a connection the caller holds in a transaction).

Tables
------
* ``messages``, ``meta``, ``conversations``, ``retention``: see
  :mod:`tidings.store.sqlite_db`; the full-text index has its own file since migration 7
  (:mod:`tidings.store.sqlite_fts`).
* ``users``: per user ``last_seen`` and ``last_seq`` as of the last prune (see
  ``_LAST_SEQ_OF``).  Its ``cursor`` column is unused since migration 4 (one cursor per
  user before devices existed; migration 4 copied it to each user's ``default`` device).
* ``devices``: per ``(user, device)`` the ack ``cursor`` and the ``delivered`` mark.  A
  row is the device's registration (:mod:`tidings.store.records`, Devices).
* ``send_keys``: per ``(sender, target, key)`` the first message sent with that
  idempotency key (``msg_id``, ``seq``: NULL for a room message, ``ts``, and the first
  answer's ``delivered`` count).  Written in the append transaction that stores the
  message; ``ts`` indexed so ``prune`` forgets expired keys in bounded steps.

Every function here runs inside a write (or read) transaction of the caller's; none
commits.  Schema changes go in MIGRATIONS (append only); ``PRAGMA user_version`` records
how many have been applied.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from tidings.store.records import DEFAULT_DEVICE, DeviceState, Original, Progress
from tidings.store.sqlite_webhooks import WEBHOOK_SCHEMA

__all__ = ["MIGRATIONS", "SQL_CONV_ADD_RANGE", "SQL_CONV_DEL", "SQL_INDEXED_ID", "SQL_RETENTION_ADD_RANGE",
           "SQL_RETENTION_CUTS", "SQL_RETENTION_DEL", "device_cursor", "find_key", "forget_keys",
           "read_devices", "read_history", "remember_key", "save_progress"]

_I64 = 2**63 - 1
_BODY = "CAST(body AS TEXT)"

MIGRATIONS: list[tuple[str, ...]] = [
    # 1: initial schema
    (
        f"""CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            msg_id TEXT NOT NULL UNIQUE,
            recipient TEXT NOT NULL,
            seq INTEGER NOT NULL,
            sender TEXT NOT NULL,
            conv TEXT NOT NULL,
            body BLOB NOT NULL,
            ts INTEGER NOT NULL,
            text TEXT GENERATED ALWAYS AS (CASE
                WHEN NOT json_valid({_BODY}) THEN {_BODY}
                WHEN json_type({_BODY}) = 'text' THEN json_extract({_BODY}, '$')
                ELSE {_BODY} END) VIRTUAL,
            owners TEXT GENERATED ALWAYS AS
                ('u' || hex(sender) || ' u' || hex(recipient)) VIRTUAL
        )""",
        "CREATE UNIQUE INDEX messages_inbox ON messages (recipient, seq)",
        "CREATE INDEX messages_conv ON messages (conv, msg_id)",
        "CREATE INDEX messages_ts ON messages (ts)",
        """CREATE TABLE users (
            user TEXT PRIMARY KEY,
            last_seq INTEGER NOT NULL DEFAULT 0,
            cursor INTEGER NOT NULL DEFAULT 0,
            last_seen INTEGER
        ) WITHOUT ROWID""",
        """CREATE VIRTUAL TABLE messages_fts USING fts5 (
            text, owners, content='messages', content_rowid='id',
            tokenize='unicode61 remove_diacritics 2')""",
    ),
    # 2: full-text indexing moves out of the append transaction (index_pending); the
    #    high-water mark says which rows are indexed (all of them at migration time).
    (
        """CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID""",
        """INSERT INTO meta (key, value)
           SELECT 'fts_indexed_id', COALESCE(MAX(id), 0) FROM messages""",
    ),
    # 3: webhooks: the outbox, presence per node, undelivered checks (sqlite_webhooks)
    WEBHOOK_SCHEMA,
    # 4: devices (a cursor and a delivered mark per device; every known user's cursor
    #    becomes its default device's, so nothing is replayed again, and every inbox
    #    gets a default device, so none is treated as new) and idempotency keys.
    (
        """CREATE TABLE devices (
            user TEXT NOT NULL,
            device TEXT NOT NULL,
            cursor INTEGER NOT NULL DEFAULT 0,
            delivered INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (user, device)
        ) WITHOUT ROWID""",
        f"""INSERT INTO devices (user, device, cursor, delivered)
            SELECT user, '{DEFAULT_DEVICE}', cursor, cursor FROM users""",
        f"""INSERT OR IGNORE INTO devices (user, device)
            SELECT DISTINCT recipient, '{DEFAULT_DEVICE}' FROM messages""",
        """CREATE TABLE send_keys (
            sender TEXT NOT NULL,
            target TEXT NOT NULL,
            key TEXT NOT NULL,
            msg_id TEXT NOT NULL,
            seq INTEGER,
            ts INTEGER NOT NULL,
            delivered INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (sender, target, key)
        ) WITHOUT ROWID""",
        "CREATE INDEX send_keys_ts ON send_keys (ts)",
    ),
    # 5: history's index moves out of the append transaction: ``conversations`` is
    #    filled with the full-text index (same high-water mark), so a commit no longer
    #    rewrites one index page per conversation it touches (measured with
    #    bench/sqlite_append.py: -43 to -54 % WAL bytes, -23 to -28 % CPU per message at
    #    5 and 40 messages per commit, docs/performance.md).
    (
        """CREATE TABLE conversations (
            conv TEXT NOT NULL,
            msg_id TEXT NOT NULL,
            PRIMARY KEY (conv, msg_id)
        ) WITHOUT ROWID""",
        """INSERT INTO conversations (conv, msg_id) SELECT conv, msg_id FROM messages
           WHERE id <= (SELECT value FROM meta WHERE key = 'fts_indexed_id')""",
        "DROP INDEX messages_conv",
    ),
    # 6: retention's index moves out of the append transaction too: ``retention (ts, id)``
    #    is filled with the full-text index (same high-water mark), so a commit no longer
    #    writes a ``messages_ts`` leaf (bench/sqlite_append.py --drop-index messages_ts:
    #    -12 % CPU and -24 % WAL bytes per message at one message per commit,
    #    docs/performance.md).  Prune deletes only indexed rows anyway.
    (
        """CREATE TABLE retention (
            ts INTEGER NOT NULL,
            id INTEGER NOT NULL,
            PRIMARY KEY (ts, id)
        ) WITHOUT ROWID""",
        """INSERT INTO retention (ts, id) SELECT ts, id FROM messages
           WHERE id <= (SELECT value FROM meta WHERE key = 'fts_indexed_id')""",
        "DROP INDEX messages_ts",
    ),
    # 7: the full-text index moves to its own file (sqlite_fts), written by a worker
    #    thread: its merges of a grown index took 17-23 ms of the loop thread per step
    #    (docs/performance.md, fifth session).  The side file re-indexes every message
    #    in the background; ``fts_indexed_id`` now marks ``conversations`` and
    #    ``retention`` only.
    ("DROP TABLE IF EXISTS messages_fts",),
]

#: The highest seq ever assigned to the user ``{u}`` (an SQL expression): appends do not
#: write ``users``; prune saves ``last_seq`` there before it deletes (sqlite_db).
_LAST_SEQ_OF = ("MAX(COALESCE((SELECT last_seq FROM users WHERE user = {u}), 0), "
                "COALESCE((SELECT MAX(seq) FROM messages WHERE recipient = {u}), 0))")
#: The highest message id in ``conversations`` and ``retention`` (the key's name is from
#: when the full-text index shared it; that index keeps its own mark, sqlite_fts).
SQL_INDEXED_ID = "SELECT value FROM meta WHERE key = 'fts_indexed_id'"
#: Index rows ``id > ? AND id <= ?`` for history (index_pending).
SQL_CONV_ADD_RANGE = ("INSERT INTO conversations (conv, msg_id) "
                      "SELECT conv, msg_id FROM messages WHERE id > ? AND id <= ?")
#: Unindex the rows whose ids are in the JSON array ``?`` (before prune deletes them).
SQL_CONV_DEL = ("DELETE FROM conversations WHERE (conv, msg_id) IN (SELECT conv, msg_id "
                "FROM messages WHERE id IN (SELECT value FROM json_each(?)))")
#: Index rows ``id > ? AND id <= ?`` for retention (index_pending).
SQL_RETENTION_ADD_RANGE = ("INSERT INTO retention (ts, id) "
                           "SELECT ts, id FROM messages WHERE id > ? AND id <= ?")
#: Unindex the rows whose ids are in the JSON array ``?`` (before prune deletes them).
SQL_RETENTION_DEL = ("DELETE FROM retention WHERE (ts, id) IN (SELECT ts, id "
                     "FROM messages WHERE id IN (SELECT value FROM json_each(?)))")
#: Per recipient, the highest seq among indexed rows with ``ts < ?`` (prune's plan).
SQL_RETENTION_CUTS = ("SELECT m.recipient, MAX(m.seq) FROM retention r "
                      "JOIN messages m ON m.id = r.id WHERE r.ts < ? GROUP BY m.recipient")
_COLS = "m.msg_id, m.seq, m.sender, m.recipient, m.body, m.ts"
_IN_PAIR = "((+m.sender = :u AND +m.recipient = :p) OR (+m.sender = :p AND +m.recipient = :u))"
_SQL_FIND_KEY = ("SELECT msg_id, seq, ts, delivered FROM send_keys "
                 "WHERE sender = ? AND target = ? AND key = ?")
_SQL_REMEMBER_KEY = ("INSERT OR REPLACE INTO send_keys (sender, target, key, msg_id, seq, ts) "
                     "VALUES (?, ?, ?, ?, ?, ?)")
_SQL_ANSWER = "UPDATE send_keys SET delivered = ? WHERE sender = ? AND target = ? AND key = ?"
# max(old, min(seq, last_seq)); a new device starts from 0.
_CLAMPED = f"MAX(0, MIN(:seq, {_LAST_SEQ_OF.format(u=':u')}))"
_SQL_CURSOR = (f"INSERT INTO devices (user, device, cursor) VALUES (:u, :d, {_CLAMPED}) "
               "ON CONFLICT (user, device) DO UPDATE SET cursor = MAX(cursor, excluded.cursor)")
_SQL_DELIVERED = (f"INSERT INTO devices (user, device, delivered) VALUES (:u, :d, {_CLAMPED}) "
                  "ON CONFLICT (user, device) DO UPDATE SET "
                  "delivered = MAX(delivered, excluded.delivered)")
_SQL_SEEN = ("INSERT INTO users (user, last_seen) VALUES (?, ?) ON CONFLICT (user) "
             "DO UPDATE SET last_seen = excluded.last_seen")
_SQL_FORGET = ("DELETE FROM send_keys WHERE (sender, target, key) IN (SELECT sender, target, key "
               "FROM send_keys INDEXED BY send_keys_ts WHERE ts <= ? LIMIT ?)")


def _i64(n: int) -> int:
    return max(-_I64, min(int(n), _I64))


def find_key(c: sqlite3.Connection, sender: str, target: str, key: str,
             ts: int, window_ms: int) -> Original | None:
    """The original a key names at ``ts`` (None: unknown or expired)."""
    row = c.execute(_SQL_FIND_KEY, (sender, target, key)).fetchone()
    if row is None or ts - row[2] >= window_ms:
        return None
    return Original(row[0], row[1], row[3])


def remember_key(c: sqlite3.Connection, sender: str, target: str, key: str, msg_id: str,
                 seq: int | None, ts: int) -> None:
    """Make the key name this message (replacing an expired one)."""
    c.execute(_SQL_REMEMBER_KEY, (sender, target, key, msg_id, seq, _i64(ts)))


def save_progress(c: sqlite3.Connection, p: Progress) -> None:
    """Cursors and delivered marks (registering devices), last_seen, first answers."""
    if p.cursors:
        c.executemany(_SQL_CURSOR, [{"u": u, "d": d, "seq": _i64(seq)}
                                    for (u, d), seq in p.cursors.items()])
    if p.delivered:
        c.executemany(_SQL_DELIVERED, [{"u": u, "d": d, "seq": _i64(seq)}
                                       for (u, d), seq in p.delivered.items()])
    if p.last_seen:
        c.executemany(_SQL_SEEN, [(u, _i64(ts)) for u, ts in p.last_seen.items()])
    if p.answers:
        c.executemany(_SQL_ANSWER, [(_i64(n), s, t, k) for (s, t, k), n in p.answers.items()])


def read_devices(c: sqlite3.Connection, user: str) -> dict[str, DeviceState]:
    rows = c.execute("SELECT device, cursor, delivered FROM devices WHERE user = ?", (user,))
    return {device: DeviceState(cursor, delivered) for device, cursor, delivered in rows}


def device_cursor(c: sqlite3.Connection, user: str, device: str) -> Any:
    """The device's cursor, or None for a device never saved."""
    row = c.execute("SELECT cursor FROM devices WHERE user = ? AND device = ?",
                    (user, device)).fetchone()
    return None if row is None else row[0]


def forget_keys(c: sqlite3.Connection, now_ms: int, window_ms: int, budget: int) -> int:
    """Forget up to ``budget`` keys expired at ``now_ms``; return how many."""
    return c.execute(_SQL_FORGET, (_i64(now_ms - window_ms), budget)).rowcount


def read_history(c: sqlite3.Connection, args: dict[str, Any], visible: str) -> list[tuple[Any, ...]]:
    """History rows (``_COLS``) of the conversation ``args["conv"]`` between ``:u`` and
    ``:p``, newest first, at most ``:n``, older than ``:before`` unless it is None, with
    the filter ``visible`` (SQL on ``messages m``).  Rows up to the index's high-water
    mark come from ``conversations``; the rows appended since (about a second's worth)
    from a scan of that id range; both in the caller's read transaction, merged by msg_id."""
    (top,) = c.execute(SQL_INDEXED_ID).fetchone()
    before = args["before"] is not None
    indexed = c.execute(
        f"SELECT {_COLS} FROM conversations cv JOIN messages m ON m.msg_id = cv.msg_id "
        f"WHERE cv.conv = :conv {'AND cv.msg_id < :before' if before else ''} "
        f"AND {_IN_PAIR} {visible} ORDER BY cv.msg_id DESC LIMIT :n", args).fetchall()
    recent = c.execute(  # (the unary +: a scan of that id range, never of an index)
        f"SELECT {_COLS} FROM messages m WHERE m.id > :top AND +m.conv = :conv "
        f"{'AND +m.msg_id < :before' if before else ''} AND {_IN_PAIR} {visible} "
        f"ORDER BY +m.msg_id DESC LIMIT :n", {**args, "top": top}).fetchall()
    if not recent:
        return indexed
    return sorted(indexed + recent, key=lambda r: r[0], reverse=True)[:args["n"]]
