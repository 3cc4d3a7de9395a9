"""The sqlite engine's own behaviour: SqliteDatabase (store/sqlite_db.py, synchronous)
and SqliteStore (store/sqlite.py, trio).  The interface itself is tested on every
engine in tests/test_store.py."""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
import threading
import time
from collections.abc import Callable

import pytest
import trio
import trio.testing
from store_harness import msg

from tidings.store import DeviceState, InboxState, StoreLimits, StoreUnavailable
from tidings.store import sqlite as sqlite_mod
from tidings.store import sqlite_db
from tidings.store.sqlite import SqliteStore
from tidings.store.sqlite_db import MIGRATIONS, SqliteDatabase
from tidings.store.sqlite_fts import INDEX_STEP_ROWS


@pytest.fixture
def db(tmp_path):
    d = SqliteDatabase.open(tmp_path / "t.db")
    yield d
    d.close()


def rows(d: SqliteDatabase, table: str = "messages") -> int:
    with d._read() as c:
        return c.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def fts_integrity_check(d: SqliteDatabase) -> None:
    with d.fts._tx as c:
        c.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")


def fts_matches(d: SqliteDatabase, word: str) -> int:
    with d.fts._tx as c:
        return c.execute("SELECT COUNT(*) FROM messages_fts WHERE messages_fts MATCH ?",
                         (word,)).fetchone()[0]


# ------------------------------------------------------------------ opening

def test_file_is_private_and_reopens(tmp_path):
    path = tmp_path / "t.db"
    d = SqliteDatabase.open(path)
    d.append_many([msg("a", "b") for _ in range(2)])
    d.close()
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
    d = SqliteDatabase.open(str(path))
    assert d.inbox_state("b") == InboxState(1, 2, 0, new_device=True)
    d.close()


def test_open_under_regular_file_is_unavailable(tmp_path):
    (tmp_path / "afile").write_text("x")
    path = tmp_path / "afile" / "tidings.db"
    with pytest.raises(StoreUnavailable, match="Not a directory") as e:
        SqliteDatabase.open(path)
    assert str(path) in str(e.value)


def test_open_missing_dir_is_unavailable(tmp_path):
    path = tmp_path / "nope" / "tidings.db"
    with pytest.raises(StoreUnavailable, match="No such file") as e:
        SqliteStore.open(path)
    assert str(path) in str(e.value)


def test_open_read_only_dir_is_unavailable(read_only_dir):
    path = read_only_dir / "tidings.db"
    with pytest.raises(StoreUnavailable, match="Permission denied|Read-only file system") as e:
        SqliteDatabase.open(path)
    assert str(path) in str(e.value)


def test_open_garbage_file_is_unavailable(tmp_path):
    path = tmp_path / "t.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreUnavailable, match=str(path)):
        SqliteDatabase.open(path)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "t.db"
    SqliteDatabase.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreUnavailable, match=f"schema version {len(MIGRATIONS) + 1} is newer"):
        SqliteDatabase.open(path)


def test_version_1_database_is_migrated_with_its_rows_indexed(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for sql in MIGRATIONS[0]:
        conn.execute(sql)
    conn.execute("INSERT INTO messages (msg_id, recipient, seq, sender, conv, body, ts) "
                 "VALUES ('m1', 'b', 1, 'a', 'a\x1fb', '\"old pizza\"', 1)")
    conn.execute("INSERT INTO messages_fts (rowid, text, owners) SELECT id, text, owners FROM messages")
    conn.execute("INSERT INTO users (user, last_seq) VALUES ('b', 1)")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    d = SqliteDatabase.open(path)
    assert d.index_pending() == 0  # version 1 indexed at append time: nothing pending
    assert [m.msg_id for m in d.search("a", "pizza", 10, 0)[0]] == ["m1"]
    assert d.append_many([msg("a", "b", "new pizza")]) == [2]
    assert len(d.search("a", "pizza", 10, 0)[0]) == 2
    fts_integrity_check(d)
    d.close()


def test_version_2_cursors_become_the_default_devices(tmp_path):
    """Migration 4: each user's cursor moves to its device "default" (delivered up to it),
    so an upgraded daemon replays nothing twice and treats no old user as a new device."""
    path = tmp_path / "v2.db"
    conn = sqlite3.connect(path)
    for sql in MIGRATIONS[0] + MIGRATIONS[1]:
        conn.execute(sql)
    conn.executemany("INSERT INTO users (user, last_seq, cursor, last_seen) VALUES (?, ?, ?, ?)",
                     [("b", 3, 2, 99), ("c", 1, 0, None)])
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    d = SqliteDatabase.open(path)
    assert d.devices("b") == {"default": DeviceState(2, 2)}
    assert d.inbox_state("b") == InboxState(4, 3, 2)
    assert d.inbox_state("c") == InboxState(2, 1, 0)
    assert d.inbox_state("c", "phone") == InboxState(2, 1, 0, new_device=True)
    assert d.last_seen(["b"]) == {"b": 99}
    d.close()


def test_closed_database_raises_and_close_is_idempotent(db):
    db.close()
    db.close()
    for call in (lambda: db.append_many([msg("a", "b")]), lambda: db.read_inbox("b", 0, 1),
                 db.checkpoint, db.index_pending, lambda: db.prune(0, 1)):
        with pytest.raises(StoreUnavailable, match="is closed"):
            call()


# ------------------------------------------------------------ concurrency

def test_checkpoint_and_concurrent_reader(db):
    errors = []

    def reader():
        try:
            for _ in range(200):
                db.read_inbox("b", 0, 50)
                db.checkpoint()
        except Exception as e:  # pragma: no cover
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(50):
        db.append_many([msg("a", "b") for _ in range(10)])
    t.join()
    assert errors == [] and db.inbox_state("b").last_seq == 500


# ------------------------------------------------------ deferred full-text index

def test_appends_are_indexed_later_but_search_sees_them(db):
    db.append_many([msg("a", "b", f"pizza {i}") for i in range(3)])
    assert fts_matches(db, "pizza") == 0  # the append transaction did not index
    assert len(db.search("a", "pizza", 10, 0)[0]) == 3  # search indexes what is pending
    assert db.index_pending() == 0
    db.append_many([msg("a", "b", "pizza 4")])
    assert db.index_pending() == 1 and db.index_pending() == 0
    fts_integrity_check(db)


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_index_pending_takes_at_most_a_chunk(db, chunk):
    db.append_many([msg("a", "b", "tea") for _ in range(5)])
    done = [db.index_pending(chunk) for _ in range(6)]
    assert sum(done) == 5 and max(done) == chunk and done[-1] == 0
    assert rows(db, "conversations") == rows(db, "retention") == 5
    assert fts_matches(db, "tea") == 0  # the full-text index is the worker's
    steps = [db.fts.index_step(chunk) for _ in range(6)]
    assert sum(steps) == 5 and max(steps) == chunk and steps[-1] == 0
    assert fts_matches(db, "tea") == 5 and db.fts.indexed_id() == 5


def main_tables(path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.close()


def test_the_full_text_index_has_its_own_file(tmp_path):
    """Migration 7: FTS5's inserts and merges must never take the messages file's write
    lock (docs/performance.md, fifth session): the index is in ``<path>-fts``."""
    path = tmp_path / "t.db"
    d = SqliteDatabase.open(path)
    d.append_many([msg("a", "b", "pizza")])
    assert len(d.search("a", "pizza", 10, 0)[0]) == 1
    d.close()
    assert not {t for t in main_tables(path) if "fts" in t}
    assert "messages_fts" in main_tables(str(path) + "-fts")
    assert oct(os.stat(str(path) + "-fts").st_mode & 0o777) == oct(0o600)


def test_an_open_index_step_never_blocks_appends(db):
    """The side connection reads the messages file (attached read-only) in a deferred
    transaction: with an index step open mid-way, the writer appends and checkpoints
    without waiting (busy timeout 0: a lock would fail at once)."""
    db.append_many([msg("a", "b", "tea") for _ in range(3)])
    db._writer.execute("PRAGMA busy_timeout = 0")
    with db.fts._tx as c:
        c.execute("INSERT INTO messages_fts (rowid, text, owners) "
                  "SELECT id, text, owners FROM m.messages WHERE id <= 3")
        c.execute("UPDATE meta SET value = 3 WHERE key = 'indexed_id'")
        assert db.append_many([msg("a", "b", "tea")]) == [4]
        assert db.index_pending() == 4
        db.checkpoint()  # (PASSIVE: it stops short of what the step's snapshot needs)
    assert db.fts.catch_up() == 1
    assert fts_matches(db, "tea") == 4
    fts_integrity_check(db)


def test_version_6_database_migrates_and_search_finds_its_messages(tmp_path):
    path = tmp_path / "v6.db"
    conn = sqlite3.connect(path)
    for statements in MIGRATIONS[:6]:
        for sql in statements:
            conn.execute(sql)
    conn.execute("INSERT INTO messages (msg_id, recipient, seq, sender, conv, body, ts) "
                 "VALUES ('m1', 'b', 1, 'a', 'a\x1fb', '\"old pizza\"', 1)")
    conn.execute("INSERT INTO messages_fts (rowid, text, owners) SELECT id, text, owners FROM messages")
    conn.execute("UPDATE meta SET value = 1 WHERE key = 'fts_indexed_id'")
    conn.execute("PRAGMA user_version = 6")
    conn.commit()
    conn.close()
    d = SqliteDatabase.open(path)
    assert not {t for t in main_tables(path) if "fts" in t}
    assert d.fts.indexed_id() == 0  # re-indexed in the background (here: by search)
    assert d.append_many([msg("a", "b", "new pizza")]) == [2]
    assert sorted(m.seq for m in d.search("a", "pizza", 10, 0)[0]) == [1, 2]
    assert d.fts.indexed_id() == 2
    fts_integrity_check(d)
    d.close()


def test_a_deleted_index_file_is_rebuilt(tmp_path):
    path = tmp_path / "t.db"
    d = SqliteDatabase.open(path)
    d.append_many([msg("a", "b", f"pizza {i}") for i in range(5)])
    assert len(d.search("a", "pizza", 10, 0)[0]) == 5
    d.close()
    for suffix in ("-fts", "-fts-wal", "-fts-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(str(path) + suffix)
    d = SqliteDatabase.open(path)
    assert d.fts.indexed_id() == 0 and fts_matches(d, "pizza") == 0
    assert len(d.search("a", "pizza", 10, 0)[0]) == 5
    fts_integrity_check(d)
    d.close()


def test_an_index_file_ahead_of_the_database_is_emptied(tmp_path):
    """A side file whose mark is above every id the messages file ever held is not this
    file's (e.g. a database restored from an older backup): it would hide new rows
    below its mark and name old texts with their ids, so it starts over."""
    path = tmp_path / "t.db"
    d = SqliteDatabase.open(path)
    d.append_many([msg("a", "b", "old pizza") for _ in range(3)])
    d.search("a", "pizza", 10, 0)
    d.close()
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(str(path) + suffix)
    d = SqliteDatabase.open(path)
    assert d.fts.indexed_id() == 0
    d.append_many([msg("a", "b", "new pizza")])
    assert [m.body for m in d.search("a", "pizza", 10, 0)[0]] == [b'"new pizza"']
    d.close()


def test_prune_unindexes_rows_and_a_replayed_delete_is_harmless(tmp_path):
    d = SqliteDatabase.open(tmp_path / "t.db", max_inbox=2)
    d.append_many([msg("a", "b", f"tea {i}") for i in range(5)])
    assert len(d.search("a", "tea", 10, 0)[0]) == 2
    assert fts_matches(d, "tea") == 5  # hidden by max_inbox, still stored
    assert d.prune(0, None) == 3
    assert fts_matches(d, "tea") == 2
    d.fts.delete([1, 2, 3])  # as after a crash between the side and the main delete
    d.fts.delete([1, 2, 3, 4])  # and a row that is still stored: only the index loses it
    assert fts_matches(d, "tea") == 1
    fts_integrity_check(d)
    d.close()


def test_deleting_unindexed_rows_keeps_them_out_of_the_index(db):
    """Rows deleted above the mark are passed over: no later step indexes them while the
    main transaction deletes them."""
    db.append_many([msg("a", "b", "tea") for _ in range(5)])
    db.fts.delete([3])
    assert db.fts.indexed_id() == 3 and fts_matches(db, "tea") == 2
    assert db.fts.catch_up() == 2
    with db.fts._tx as c:
        assert [r[0] for r in c.execute("SELECT rowid FROM messages_fts")] == [1, 2, 4, 5]


def test_ids_are_not_reused_after_pruning_rows_above_every_mark(tmp_path):
    """Prune can delete rows the history index has not reached (max_inbox); the full-text
    index may hold them: their ids are never handed out again."""
    path = tmp_path / "t.db"
    d = SqliteDatabase.open(path)
    d.append_many([msg("a", "b", "tea") for _ in range(3)])
    d.fts.catch_up()
    assert d.prune_step([("b", 3)], 10) == 3
    d.close()
    d = SqliteDatabase.open(path)
    assert d.fts.indexed_id() == 3
    d.append_many([msg("a", "b", "tea")])
    with d._read() as c:
        assert c.execute("SELECT id FROM messages").fetchall() == [(4,)]
    assert len(d.search("a", "tea", 10, 0)[0]) == 1
    d.close()


def test_prune_indexes_pending_rows_before_deleting_them(tmp_path):
    d = SqliteDatabase.open(tmp_path / "t.db", max_inbox=3)
    d.append_many([msg("a", "b", f"hello {i}") for i in range(10)])  # none indexed yet
    assert d.prune(0, None) == 7
    fts_integrity_check(d)
    assert len(d.search("b", "hello", 10, 0)[0]) == 3
    d.close()


def test_ids_are_not_reused_below_the_index_after_pruning_the_newest(tmp_path):
    d = SqliteDatabase.open(tmp_path / "t.db", max_inbox=0)
    d.append_many([msg("a", "b", "pizza one") for _ in range(3)])
    assert d.index_pending() == 3
    assert d.prune(0, None) == 3  # every row gone: SQLite would reuse ids 1..3
    assert d.append_many([msg("a", "b", "pizza two")]) == [4]
    d.max_inbox = None  # show the row again (it is still there until the next prune)
    assert [m.seq for m in d.search("a", "pizza", 10, 0)[0]] == [4]
    d.max_inbox = 0
    assert d.prune(0, None) == 1
    fts_integrity_check(d)
    d.close()


def _ids(page: tuple[list, bool]) -> tuple[list[str], bool]:
    return [m.msg_id for m in page[0]], page[1]


@pytest.mark.parametrize("indexed", [0, 1, 3, 4, 6])
def test_history_reads_indexed_and_recent_rows_alike(db, indexed):
    """History's index (conversations) is filled with the full-text index, not by the
    append: the rows above its high-water mark are read by id range; the answer is the
    same wherever that mark is."""
    sent = [msg("a", "b", "x"), msg("b", "a", "y"), msg("a", "c", "z"), msg("a", "b", "w"),
            msg("c", "a", "v"), msg("b", "a", "u")]
    db.append_many(sent)
    assert rows(db, "conversations") == 0  # the append did not index
    if indexed:
        assert db.index_pending(indexed) == indexed
    assert rows(db, "conversations") == indexed
    ab = [m.msg_id for m in sent if {m.sender, m.recipient} == {"a", "b"}][::-1]
    assert _ids(db.history("a", "b", None, 10)) == (ab, False)
    assert _ids(db.history("b", "a", None, 2)) == (ab[:2], True)
    assert _ids(db.history("a", "b", ab[1], 10)) == (ab[2:], False)
    assert _ids(db.history("a", "b", ab[0], 1)) == (ab[1:2], True)
    assert _ids(db.history("a", "c", None, 10))[0] == [sent[4].msg_id, sent[2].msg_id]


def test_prune_unindexes_history_rows(tmp_path):
    d = SqliteDatabase.open(tmp_path / "t.db", max_inbox=2)
    d.append_many([msg("a", "b", f"m{i}") for i in range(5)])
    assert d.prune(0, None) == 3
    assert rows(d, "conversations") == rows(d, "retention") == rows(d) == 2
    assert len(d.history("a", "b", None, 10)[0]) == 2
    d.close()


def _indexes_on(d: SqliteDatabase, table: str) -> set[str]:
    with d._read() as c:
        return {r[0] for r in c.execute("SELECT name FROM pragma_index_list(?)", (table,))}


def test_appends_leave_retention_to_index_pending(db):
    """An append writes no ts index (one WAL frame less per commit): retention's index
    is filled with the full-text index, and prune expires the rows it holds."""
    db.append_many([msg("a", "b", "old", ts=1), msg("a", "c", "old", ts=2),
                    msg("a", "b", "new", ts=50)])
    assert _indexes_on(db, "messages") == {"messages_inbox", "sqlite_autoindex_messages_1"}
    assert rows(db, "retention") == 0  # the append did not index
    assert db.prune_plan(10, 1 / 86_400_000) == []  # nothing indexed: nothing to delete
    assert db.index_pending(2) == 2 and rows(db, "retention") == 2
    assert db.prune_plan(10, 1 / 86_400_000) == [("c", 1), ("b", 1)]
    assert db.prune(10, 1 / 86_400_000) == 2  # prune indexes the rest first
    assert [m.body for m in db.read_inbox("b", 0, 10)] == [b'"new"']
    assert rows(db, "retention") == rows(db) == 1
    fts_integrity_check(db)


def test_version_4_database_moves_history_to_conversations(tmp_path):
    """Migration 5: the (conv, msg_id) index on messages is dropped; indexed rows move
    to conversations, unindexed ones are read by id range until index_pending."""
    path = tmp_path / "v4.db"
    conn = sqlite3.connect(path)
    for statements in MIGRATIONS[:4]:
        for sql in statements:
            conn.execute(sql)
    for i, (s, r) in enumerate([("a", "b"), ("b", "a"), ("a", "b")], 1):
        conn.execute("INSERT INTO messages (id, msg_id, recipient, seq, sender, conv, body, ts) "
                     "VALUES (?, ?, ?, ?, ?, 'a\x1fb', '\"hi\"', 1)", (i, f"m{i}", r, i, s))
    conn.execute("UPDATE meta SET value = 2 WHERE key = 'fts_indexed_id'")  # m3 pending
    conn.execute("PRAGMA user_version = 4")
    conn.commit()
    conn.close()
    d = SqliteDatabase.open(path)
    with d._read() as c:
        names = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "messages_conv" not in names
    assert rows(d, "conversations") == 2
    assert _ids(d.history("a", "b", None, 10)) == (["m3", "m2", "m1"], False)
    assert d.index_pending() == 1 and rows(d, "conversations") == 3
    assert _ids(d.history("a", "b", "m3", 10)) == (["m2", "m1"], False)
    d.close()


def test_version_5_database_moves_retention_to_its_own_index(tmp_path):
    """Migration 6: the ts index on messages is dropped; indexed rows go to retention,
    unindexed ones join it with index_pending; prune by retention sees the same rows."""
    path = tmp_path / "v5.db"
    conn = sqlite3.connect(path)
    for statements in MIGRATIONS[:5]:
        for sql in statements:
            conn.execute(sql)
    for i, (r, ts) in enumerate([("b", 1), ("c", 2), ("b", 3), ("b", 90)], 1):
        conn.execute("INSERT INTO messages (id, msg_id, recipient, seq, sender, conv, body, ts) "
                     "VALUES (?, ?, ?, ?, 'a', 'conv', '\"hi\"', ?)",
                     (i, f"m{i}", r, 1 if r == "c" else i - (i > 2), ts))
    conn.execute("INSERT INTO messages_fts (rowid, text, owners) "
                 "SELECT id, text, owners FROM messages WHERE id <= 2")
    conn.execute("UPDATE meta SET value = 2 WHERE key = 'fts_indexed_id'")  # m3, m4 pending
    conn.execute("PRAGMA user_version = 5")
    conn.commit()
    conn.close()
    d = SqliteDatabase.open(path)
    assert "messages_ts" not in _indexes_on(d, "messages")
    assert rows(d, "retention") == 2
    assert d.prune_plan(10, 1 / 86_400_000) == [("c", 1), ("b", 1)]
    assert d.index_pending() == 2 and rows(d, "retention") == 4
    assert d.prune(10, 1 / 86_400_000) == 3
    assert [m.msg_id for m in d.read_inbox("b", 0, 10)] == ["m4"]
    assert rows(d, "retention") == rows(d) == 1
    fts_integrity_check(d)
    d.close()


# ------------------------------------------------------------------ pruning

def test_max_inbox_hides_rows_that_prune_then_deletes(tmp_path):
    d = SqliteDatabase.open(tmp_path / "t.db", max_inbox=2)
    d.append_many([msg("a", "u", "word") for _ in range(5)] + [msg("u", "a", "word")])
    assert rows(d) == 6  # nothing deleted by the appends...
    assert d.inbox_state("u") == InboxState(4, 5, 0, True)  # ...but hidden from every read
    assert [m.seq for m in d.read_inbox("u", 0, 10)] == [4, 5]
    assert len(d.history("a", "u", None, 10)[0]) == 3
    assert len(d.search("a", "word", 10, 0)[0]) == 3
    assert d.prune(0, None) == 3
    assert rows(d) == 3 and d.inbox_state("u") == InboxState(4, 5, 0, True)
    assert d.prune(0, None) == 0
    fts_integrity_check(d)
    d.close()


def test_prune_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_db, "PRUNE_BATCH", 7)
    d = SqliteDatabase.open(tmp_path / "t.db", max_inbox=2)
    d.append_many([msg("a", u, "hello") for u in ("x", "y") for _ in range(20)])
    d.append_many([msg("a", "z", "hello", ts=1), msg("a", "z", "hello", ts=5)])
    assert d.prune(3, 1 / 86_400_000) == 36 + 1  # max_inbox, and z's first by retention
    assert [m.seq for m in d.read_inbox("y", 0, 100)] == [19, 20]
    assert len(d.search("a", "hello", 100, 0)[0]) == 5
    assert rows(d) == 5
    fts_integrity_check(d)
    d.close()


# -------------------------------------------------------------- SqliteStore

def _observe_index_steps(store: SqliteStore, monkeypatch, busy_turns: list[int]) -> list[tuple[int, int]]:
    """Record each index transaction's row limit and how many busy turns came before it."""
    steps: list[tuple[int, int]] = []
    index_pending = store.db.index_pending

    def observed(max_rows: int) -> int:
        steps.append((max_rows, busy_turns[0]))
        return index_pending(max_rows)

    monkeypatch.setattr(store.db, "index_pending", observed)
    return steps


async def test_index_steps_wait_for_an_idle_loop(tmp_path, monkeypatch):
    """Each indexing transaction runs when no other task is runnable, INDEX_CHUNK rows
    at a time: a busy task is not interleaved with index steps (a step in every turn of
    the loop made each message wait for one at each of its hops: the open loop's p99)."""
    store = SqliteStore.open(tmp_path / "t.db", StoreLimits())
    store.db.append_many([msg("a", "b", "tea") for _ in range(3 * sqlite_mod.INDEX_CHUNK)])
    busy_turns = [0]
    steps = _observe_index_steps(store, monkeypatch, busy_turns)

    async def busy() -> None:
        for _ in range(20):
            busy_turns[0] += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(busy)
        nursery.start_soon(store._index_all)
    assert steps == [(sqlite_mod.INDEX_CHUNK, 20)] * 4  # three full chunks, then none left
    assert fts_matches(store.db, "tea") == 3 * sqlite_mod.INDEX_CHUNK
    await store.aclose()


async def test_index_keeps_up_with_a_loop_that_never_idles(tmp_path, monkeypatch):
    """A saturated loop (never idle for IDLE_WAIT_S) does not starve maintenance: the
    pass goes on in INDEX_CHUNK steps, without waiting for an idle moment."""
    store = SqliteStore.open(tmp_path / "t.db", StoreLimits())
    store.db.append_many([msg("a", "b", "tea") for _ in range(2 * sqlite_mod.INDEX_CHUNK)])
    busy_turns = [0]
    steps = _observe_index_steps(store, monkeypatch, busy_turns)
    indexed = trio.Event()

    async def busy() -> None:
        while not indexed.is_set():
            busy_turns[0] += 1
            await trio.lowlevel.checkpoint()

    async def index() -> None:
        await store._index_all()
        indexed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(busy)
        nursery.start_soon(index)
    assert [chunk for chunk, _ in steps] == [sqlite_mod.INDEX_CHUNK] * 3
    assert fts_matches(store.db, "tea") == 2 * sqlite_mod.INDEX_CHUNK
    await store.aclose()


def _observe_text_index(store: SqliteStore, rows: int) -> trio.Event:
    """An event set once an index step leaves the full-text index's mark at ``rows``."""
    reached = trio.Event()
    index_step = store.db.fts.index_step
    token = trio.lowlevel.current_trio_token()  # (maintenance's steps: not a trio thread)

    def observed(*a: int) -> int:  # worker thread
        n = index_step(*a)
        if store.db.fts.indexed_id() >= rows:
            trio.from_thread.run_sync(reached.set, trio_token=token)
        return n

    store.db.fts.index_step = observed
    return reached


def _observe_checkpoints(store: SqliteStore, notify: Callable[[], object]) -> None:
    """Call ``notify`` on the loop after each of the engine's checkpoints."""
    checkpoint = store.db.checkpoint

    def observed_checkpoint() -> tuple[int, int]:  # runs in a worker thread
        frames = checkpoint()
        trio.from_thread.run_sync(notify)
        return frames

    store.db.checkpoint = observed_checkpoint


async def test_run_indexes_and_checkpoints_in_the_background(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_mod, "MAINTENANCE_INTERVAL_S", 0.01)
    monkeypatch.setattr(sqlite_mod, "CHECKPOINT_INTERVAL_S", 0.01, raising=False)
    store = SqliteStore.open(tmp_path / "t.db", StoreLimits())
    checkpointed = trio.Event()
    _observe_checkpoints(store, checkpointed.set)
    indexed = _observe_text_index(store, 3)
    try:
        await store.append([msg("a", "b", "pizza") for _ in range(3)])
        assert fts_matches(store.db, "pizza") == 0
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            with trio.fail_after(10):
                await checkpointed.wait()
                await indexed.wait()  # by the full-text index's own task
            nursery.cancel_scope.cancel()
        assert fts_matches(store.db, "pizza") == 3
    finally:
        await store.aclose()


def _history_mark(path: os.PathLike[str]) -> int:
    """The id up to which ``conversations``/``retention`` are indexed, read on a
    connection of its own (``index_pending`` would index what it counts)."""
    with contextlib.closing(sqlite3.connect(path)) as c:
        return c.execute(sqlite_db.SQL_INDEXED_ID).fetchone()[0]


async def test_a_history_chunk_waits_for_a_running_checkpoint(tmp_path):
    """History/retention indexing never writes beside a checkpoint: a chunk waits while
    the maintenance lock is held (as ``checkpoint_wal`` holds it), then indexes."""
    store = SqliteStore.open(tmp_path / "t.db", StoreLimits())
    try:
        await store.append([msg("a", "b", "tea") for _ in range(3)])
        # the lock (a checkpoint running) is released before the nursery waits
        async with trio.open_nursery() as nursery, store._maintenance:
            nursery.start_soon(store._index_all, sqlite_mod._Pace())
            await trio.testing.wait_all_tasks_blocked()
            assert _history_mark(tmp_path / "t.db") == 0  # nothing indexed meanwhile
        assert _history_mark(tmp_path / "t.db") == 3
    finally:
        await store.aclose()


async def test_checkpoints_do_not_wait_for_a_slow_index_pass(tmp_path, monkeypatch):
    """The WAL is checkpointed on its own schedule: a history/retention indexing pass
    that does not end (at 15,000 msgs/s a pass took seconds) does not keep the WAL from
    being checkpointed and restarted (it grew to SQLite's autocheckpoint, a ~300 ms
    checkpoint inside a commit on the loop thread)."""
    monkeypatch.setattr(sqlite_mod, "MAINTENANCE_INTERVAL_S", 0.01)
    monkeypatch.setattr(sqlite_mod, "CHECKPOINT_INTERVAL_S", 0.01, raising=False)
    store = SqliteStore.open(tmp_path / "t.db", StoreLimits())
    checkpoints = trio.Semaphore(0)
    _observe_checkpoints(store, checkpoints.release)
    index_started = trio.Event()

    async def endless_index_pass(pace: object = None) -> None:
        index_started.set()
        await trio.sleep_forever()

    monkeypatch.setattr(store, "_index_all", endless_index_pass)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            with trio.fail_after(10):
                await index_started.wait()
                for _ in range(2):  # two checkpoints while the index pass still runs
                    await checkpoints.acquire()
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def test_the_wal_is_checkpointed_several_times_a_second(tmp_path, monkeypatch,
                                                              autojump_clock):
    """``run`` checkpoints every ``CHECKPOINT_INTERVAL_S``, not once per maintenance
    interval: at 5,000 msgs/s the fsync of a whole second's WAL (tens of MB) queued so much
    on the disk that a WAL write of the loop thread waited 11-29 ms behind it."""
    store = SqliteStore.open(tmp_path / "t.db", StoreLimits())
    times: list[float] = []

    async def recorded() -> None:
        times.append(trio.current_time())

    async def idle(*args: object) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr(store, "checkpoint_wal", recorded)
    monkeypatch.setattr(store, "_index_all", idle)
    monkeypatch.setattr(store, "_index_text_steps", idle)
    monkeypatch.setattr(sqlite_mod, "prune_periodically", idle)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await trio.sleep(sqlite_mod.MAINTENANCE_INTERVAL_S + 0.01)
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()
    assert len(times) >= 4


async def test_run_checkpoints_while_the_full_text_index_catches_up(tmp_path, monkeypatch):
    """``run``'s passes go on between the full-text index's steps while it works off a
    backlog (as after a burst), instead of waiting for the whole backlog; the index
    still gets every row."""
    monkeypatch.setattr(sqlite_mod, "MAINTENANCE_INTERVAL_S", 0.01)
    monkeypatch.setattr(sqlite_mod, "CHECKPOINT_INTERVAL_S", 0.01, raising=False)
    monkeypatch.setattr(sqlite_mod, "FTS_STEP_ROWS", 1)
    store = SqliteStore.open(tmp_path / "t.db", StoreLimits())
    calls: list[str] = []
    index_step, checkpoint = store.db.fts.index_step, store.db.checkpoint
    store.db.fts.index_step = lambda *a: (calls.append("index"), index_step(*a))[1]
    store.db.checkpoint = lambda: (calls.append("checkpoint"), checkpoint())[1]
    indexed = _observe_text_index(store, 30)
    try:
        await store.append([msg("a", "b", "tea") for _ in range(30)])
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            with trio.fail_after(10):
                await indexed.wait()
            nursery.cancel_scope.cancel()
        assert "checkpoint" in calls[:calls.count("index") - 1]  # before the last steps
        assert fts_matches(store.db, "tea") == 30
    finally:
        await store.aclose()


async def test_a_maintenance_pass_does_not_wait_for_the_full_text_index(tmp_path):
    """The pass (``conversations``, ``retention``, the WAL checkpoint) never waits for
    the full-text index: after a closed-loop burst that index's catch-up took seconds,
    and a pass that waited for it let the WAL and the history backlog pile up into the
    next open round (docs/performance.md, seventh session).  Search still finds every
    stored message."""
    store = SqliteStore.open(tmp_path / "t.db", StoreLimits())
    calls: list[str] = []
    index_step, checkpoint = store.db.fts.index_step, store.db.checkpoint
    store.db.fts.index_step = lambda *a: (calls.append("index"), index_step(*a))[1]
    store.db.checkpoint = lambda: (calls.append("checkpoint"), checkpoint())[1]
    try:
        await store.append([msg("a", "b", "tea") for _ in range(3)])
        await store.checkpoint()
        assert calls == ["checkpoint"]
        assert store.db.index_pending() == 0  # history and retention caught up
        assert len((await store.search("a", "tea", 10))[0]) == 3
        assert store.db.fts.indexed_id() == 3
    finally:
        await store.aclose()


async def test_a_checkpoint_does_not_wait_for_a_search_catch_up(tmp_path):
    """A full-text step waiting for the index's thread (here held by a search's
    catch-up, which took seconds after a burst) does not hold the checkpoints' lock
    meanwhile: a checkpoint goes on; the step and the search then finish."""
    store = SqliteStore.open(tmp_path / "t.db", StoreLimits())
    entered, release = trio.Event(), threading.Event()
    catch_up = store.db.fts.catch_up

    def slow_catch_up() -> int:  # worker thread
        trio.from_thread.run_sync(entered.set)
        release.wait()
        return catch_up()

    store.db.fts.catch_up = slow_catch_up
    try:
        await store.append([msg("a", "b", "tea") for _ in range(3)])
        async with trio.open_nursery() as nursery:
            try:
                nursery.start_soon(store.search, "a", "tea", 10)
                await entered.wait()
                nursery.start_soon(store._index_text_steps)
                await trio.testing.wait_all_tasks_blocked()
                with trio.fail_after(10):
                    await store.checkpoint_wal()
            finally:
                release.set()
        assert fts_matches(store.db, "tea") == 3
    finally:
        await store.aclose()



# -- the engine restarts the WAL itself -------------------------------------------------------

async def test_a_wal_past_the_limit_is_restarted_with_writes_held(tmp_path, monkeypatch):
    limit = 64 * 1024
    monkeypatch.setattr(sqlite_mod, "WAL_RESTART_BYTES", limit)
    store = SqliteStore.open(tmp_path / "t.db", StoreLimits())
    try:
        pages = sqlite_db.PAGE_BYTES + 24
        while store.db.wal_bytes() < 2 * limit:  # grow the WAL past the limit
            await store.append([msg("a", f"u{i}", "x" * 200) for i in range(50)])
        held_during: list[bool] = []
        original = store.db.checkpoint

        def observed() -> tuple[int, int]:  # worker thread: is the engine holding writes?
            held_during.append(store._held is not None)
            return original()

        store.db.checkpoint = observed
        await store.checkpoint()
        # the plain one, a catch-up (writes go on), then the restart with writes held:
        # the held one copies only what the catch-up let through
        assert held_during == [False, False, True]
        assert store._held is None
        await store.append([msg("a", "b")])  # the first write after starts the WAL over
        assert original()[0] * pages < limit
    finally:
        await store.aclose()


async def test_the_full_text_index_is_written_in_a_worker_thread(tmp_path):
    """Maintenance and search index on the index's own connection, off the loop thread;
    search still finds a message appended just before it."""
    store = SqliteStore.open(tmp_path / "t.db", StoreLimits())
    loop_thread = threading.get_ident()
    threads: list[int] = []
    original = store.db.fts.index_step
    store.db.fts.index_step = lambda *a: (threads.append(threading.get_ident()), original(*a))[1]
    try:
        await store.append([msg("a", "b", "tea")])
        await store.checkpoint()
        await store.append([msg("a", "b", "tea")])
        assert len((await store.search("a", "tea", 10))[0]) == 2
        assert threads and loop_thread not in threads
    finally:
        await store.aclose()


async def test_maintenance_indexes_the_full_text_index_in_spaced_steps(tmp_path, monkeypatch):
    """The full-text index's task adds pending rows ``FTS_STEP_ROWS`` per
    worker step with ``FTS_STEP_GAP_S`` between steps (not one burst); search catches
    up at once."""
    monkeypatch.setattr(sqlite_mod, "FTS_STEP_ROWS", 4)
    store = SqliteStore.open(tmp_path / "t.db", StoreLimits())
    steps: list[tuple[int, float]] = []
    original = store.db.fts.index_step

    def observed(max_rows: int = INDEX_STEP_ROWS) -> int:
        steps.append((max_rows, time.monotonic()))
        return original(max_rows)

    store.db.fts.index_step = observed
    try:
        await store.append([msg("a", "b", "tea") for _ in range(10)])
        await store._index_text_steps()
        assert [rows for rows, _ in steps] == [4, 4, 4]  # 4 + 4 + 2: the last is short
        gaps = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(steps)]
        assert all(gap >= sqlite_mod.FTS_STEP_GAP_S for gap in gaps)
        assert store.db.fts.indexed_id() == 10
        steps.clear()
        await store.append([msg("a", "b", "tea") for _ in range(10)])
        assert len((await store.search("a", "tea", 50))[0]) == 20
        assert steps and all(rows == INDEX_STEP_ROWS for rows, _ in steps)  # catch_up
    finally:
        await store.aclose()


async def test_a_small_wal_is_checkpointed_without_holding_writes(tmp_path):
    store = SqliteStore.open(tmp_path / "t.db", StoreLimits())
    try:
        await store.append([msg("a", "b")])
        calls: list[bool] = []
        original = store.db.checkpoint
        store.db.checkpoint = lambda: (calls.append(store._held is not None), original())[1]
        await store.checkpoint()
        assert calls == [False]
    finally:
        await store.aclose()


async def test_writes_wait_while_the_wal_restarts(tmp_path):
    store = SqliteStore.open(tmp_path / "t.db", StoreLimits())
    try:
        store._held = held = trio.Event()
        done = trio.Event()

        async def append() -> None:
            await store.append([msg("a", "b")])
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(append)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set() and store.db.inbox_state("b").last_seq == 0
            store._held = None
            held.set()
        assert store.db.inbox_state("b").last_seq == 1
    finally:
        await store.aclose()


def test_seqs_continue_after_retention_removed_a_whole_inbox_and_a_restart(tmp_path):
    # appends do not write users.last_seq; prune must save it before deleting the rows
    path = tmp_path / "t.db"
    d = SqliteDatabase.open(path)
    assert d.append_many([msg("a", "b", ts=1) for _ in range(3)]) == [1, 2, 3]
    assert d.prune(10**12, 1) == 3  # everything expired: the inbox is empty
    d.close()
    d = SqliteDatabase.open(path)  # a fresh writer: nothing remembered in memory
    try:
        assert d.inbox_state("b") == InboxState(4, 3, 0, new_device=True)
        assert d.append_many([msg("a", "b")]) == [4]
    finally:
        d.close()


# ------------------------------------------------------------------ batched inbox_state

async def test_inbox_states_asked_while_the_reader_is_busy_share_one_read(tmp_path):
    """A connect storm: every inbox_state asked while the read connection is busy joins
    one thread hop (one call of SqliteDatabase.inbox_states), each getting its own
    answer; the next call after it starts a new batch."""
    store = SqliteStore.open(tmp_path / "t.db", StoreLimits())
    try:
        await store.append([msg("a", f"u{i}") for i in range(5) for _ in range(i)])
        calls: list[list] = []
        original = store.db.inbox_states
        store.db.inbox_states = lambda keys: (calls.append(list(keys)), original(keys))[1]
        results: dict[int, InboxState] = {}

        async def ask(i: int) -> None:
            results[i] = await store.inbox_state(f"u{i}", "phone")

        async with trio.open_nursery() as nursery:
            async with store._read_limiter:  # a read in progress
                for i in range(5):
                    nursery.start_soon(ask, i)
                await trio.testing.wait_all_tasks_blocked()
        assert len(calls) == 1 and sorted(calls[0]) == [(f"u{i}", "phone") for i in range(5)]
        assert {i: r.last_seq for i, r in results.items()} == {i: i for i in range(5)}
        assert all(r.new_device for r in results.values())
        assert (await store.inbox_state("u3")).last_seq == 3
        assert len(calls) == 2 and store._states is None
    finally:
        await store.aclose()


async def test_a_failed_batched_read_fails_every_caller(tmp_path):
    store = SqliteStore.open(tmp_path / "t.db", StoreLimits())
    try:
        def fail(keys):
            raise StoreUnavailable("disk on fire")

        store.db.inbox_states = fail
        errors: list[Exception] = []

        async def ask(i: int) -> None:
            try:
                await store.inbox_state(f"u{i}")
            except StoreUnavailable as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            async with store._read_limiter:
                for i in range(3):
                    nursery.start_soon(ask, i)
                await trio.testing.wait_all_tasks_blocked()
        assert len(errors) == 3 and all("disk on fire" in str(e) for e in errors)
        assert store._states is None
    finally:
        await store.aclose()
