"""The sqlite engine's webhook tables: outbox, presence per node, undelivered checks.  Sans-IO.

:class:`WebhookTables` is a mixin of :class:`tidings.store.sqlite_db.SqliteDatabase`
(which owns the connections and transactions, ``_write`` and ``_read``); the contract of
each method is in :mod:`tidings.store.base`.  Like every write of the database, the
writes here run on the event-loop thread (``tidings.store.sqlite``): there is no second
writer connection to wait for.  The tables (``WEBHOOK_SCHEMA``, migration 3):

* ``webhook_outbox``: one row per event; ``pos`` is AUTOINCREMENT, so a position is never
  handed out twice (the sender pages with ``pos > after``);
* ``webhook_nodes`` (node, expires_ms) and ``webhook_presence`` (user, node): a user is
  online while a live node has it; the count of its rows is the user's count of nodes;
* ``webhook_due``: the undelivered checks, by msg_id, indexed by due time.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Collection, Sequence
from typing import Any

import orjson

from tidings.store.records import (
    OutboxEntry, UndeliveredCheck, WebhookEvent, check_page, new_event_id,
)

__all__ = ["WEBHOOK_SCHEMA", "WebhookTables"]

WEBHOOK_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE webhook_outbox (
        pos INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL,
        type TEXT NOT NULL,
        ts INTEGER NOT NULL,
        user TEXT NOT NULL,
        msg_id TEXT,
        sender TEXT,
        seq INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        due_ms INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE webhook_nodes (
        node TEXT PRIMARY KEY,
        expires_ms INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE webhook_presence (
        user TEXT NOT NULL,
        node TEXT NOT NULL,
        PRIMARY KEY (user, node)
    ) WITHOUT ROWID""",
    "CREATE INDEX webhook_presence_node ON webhook_presence (node)",
    """CREATE TABLE webhook_due (
        msg_id TEXT PRIMARY KEY,
        user TEXT NOT NULL,
        seq INTEGER NOT NULL,
        sender TEXT NOT NULL,
        due_ms INTEGER NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX webhook_due_at ON webhook_due (due_ms)",
)

_SQL_ADD = ("INSERT INTO webhook_outbox (id, type, ts, user, msg_id, sender, seq) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)")


def _add(c: sqlite3.Connection, events: Sequence[WebhookEvent]) -> None:
    c.executemany(_SQL_ADD, [tuple(e) for e in events])


def _move(c: sqlite3.Connection, user: str, node: str, online: bool, now_ms: int,
          types: Collection[str], events: list[WebhookEvent]) -> str:
    """Add ``user`` to ``node``'s set (or remove it); on the user's count of nodes going
    0 -> 1 return "online", 1 -> 0 "offline" (adding the event when its type is in
    ``types``), else ""."""
    if online:
        changed = c.execute("INSERT OR IGNORE INTO webhook_presence (user, node) VALUES (?, ?)",
                            (user, node)).rowcount
    else:
        changed = c.execute("DELETE FROM webhook_presence WHERE user = ? AND node = ?",
                            (user, node)).rowcount
    if not changed:
        return ""
    (count,) = c.execute("SELECT COUNT(*) FROM webhook_presence WHERE user = ?", (user,)).fetchone()
    kind = "online" if online and count == 1 else "offline" if not online and count == 0 else ""
    if kind and kind in types:
        events.append(WebhookEvent(new_event_id(), kind, now_ms, user))
    return kind


class WebhookTables:
    """The webhook half of :class:`~tidings.store.sqlite_db.SqliteDatabase`."""

    _write: Callable[[], contextlib.AbstractContextManager[sqlite3.Connection]]
    _read: Callable[[], contextlib.AbstractContextManager[sqlite3.Connection]]

    # ------------------------------------------------------------ the outbox

    def outbox_add(self, events: Sequence[WebhookEvent]) -> None:
        if events:
            with self._write() as c:
                _add(c, events)

    def outbox_read(self, after: str | None, limit: int) -> list[OutboxEntry]:
        check_page(limit)
        with self._read() as c:
            rows = c.execute(
                "SELECT pos, id, type, ts, user, msg_id, sender, seq, attempts, due_ms "
                "FROM webhook_outbox WHERE pos > ? ORDER BY pos LIMIT ?",
                (int(after) if after is not None else 0, limit)).fetchall()
        return [OutboxEntry(str(r[0]), WebhookEvent(*r[1:8]), r[8], r[9]) for r in rows]

    def outbox_retry(self, pos: str, attempts: int, due_ms: int) -> None:
        with self._write() as c:
            c.execute("UPDATE webhook_outbox SET attempts = ?, due_ms = ? WHERE pos = ?",
                      (attempts, due_ms, int(pos)))

    def outbox_done(self, positions: Sequence[str]) -> None:
        if positions:
            with self._write() as c:
                c.execute("DELETE FROM webhook_outbox WHERE pos IN (SELECT value FROM json_each(?))",
                          (orjson.dumps([int(p) for p in positions]),))

    def outbox_depth(self) -> int:
        with self._read() as c:
            return c.execute("SELECT COUNT(*) FROM webhook_outbox").fetchone()[0]

    # ------------------------------------------------------------ presence

    def presence_set(self, node: str, online: Sequence[str], offline: Sequence[str], *,
                     full: bool, now_ms: int, expires_ms: int, types: Collection[str]) -> bool:
        events: list[WebhookEvent] = []
        with self._write() as c:
            row = c.execute("SELECT expires_ms FROM webhook_nodes WHERE node = ?", (node,)).fetchone()
            known = row is not None and row[0] >= now_ms
            c.execute("INSERT INTO webhook_nodes (node, expires_ms) VALUES (?, ?) "
                      "ON CONFLICT (node) DO UPDATE SET expires_ms = excluded.expires_ms",
                      (node, expires_ms))
            if full:
                keep = set(online)
                offline = [u for (u,) in c.execute(
                    "SELECT user FROM webhook_presence WHERE node = ? ORDER BY user", (node,))
                    if u not in keep]
            for user in online:
                _move(c, user, node, True, now_ms, types, events)
            for user in offline:
                _move(c, user, node, False, now_ms, types, events)
            _add(c, events)
        return known

    def presence_reap(self, now_ms: int, types: Collection[str], node: str | None = None) -> int:
        events: list[WebhookEvent] = []
        offline = 0
        with self._write() as c:
            nodes = [n for (n,) in c.execute(
                "SELECT node FROM webhook_nodes WHERE expires_ms < ? OR node = ?", (now_ms, node))]
            for name in nodes:
                users = [u for (u,) in c.execute(
                    "SELECT user FROM webhook_presence WHERE node = ? ORDER BY user", (name,))]
                for user in users:
                    offline += _move(c, user, name, False, now_ms, types, events) == "offline"
                c.execute("DELETE FROM webhook_nodes WHERE node = ?", (name,))
            _add(c, events)
        return offline

    # ------------------------------------------------------------ undelivered checks

    def undelivered_watch(self, checks: Sequence[UndeliveredCheck]) -> None:
        if checks:
            with self._write() as c:
                c.executemany("INSERT OR REPLACE INTO webhook_due (msg_id, user, seq, sender, due_ms) "
                              "VALUES (?, ?, ?, ?, ?)",
                              [(k.msg_id, k.user, k.seq, k.sender, k.due_ms) for k in checks])

    def undelivered_due(self, now_ms: int, limit: int) -> list[UndeliveredCheck]:
        check_page(limit)
        with self._read() as c:
            rows = c.execute("SELECT due_ms, user, seq, msg_id, sender FROM webhook_due "
                             "WHERE due_ms <= ? ORDER BY due_ms, msg_id LIMIT ?",
                             (now_ms, limit)).fetchall()
        return [UndeliveredCheck(*r) for r in rows]

    def acked_by_any_device(self, pairs: Sequence[tuple[str, int]]) -> list[bool]:
        users = list(dict.fromkeys(u for u, _ in pairs))
        with self._read() as c:
            cursors: dict[Any, int] = dict(c.execute(
                "SELECT user, MAX(cursor) FROM devices "
                "WHERE user IN (SELECT value FROM json_each(?)) GROUP BY user",
                (orjson.dumps(users),)))
        return [cursors.get(user, 0) >= seq for user, seq in pairs]

    def undelivered_settle(self, checks: Sequence[UndeliveredCheck],
                           events: Sequence[WebhookEvent | None]) -> int:
        added = []
        with self._write() as c:
            for check, event in zip(checks, events, strict=True):
                gone = c.execute("DELETE FROM webhook_due WHERE msg_id = ?", (check.msg_id,)).rowcount
                if gone and event is not None:
                    added.append(event)
            _add(c, added)
        return len(added)
