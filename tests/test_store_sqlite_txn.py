"""store/sqlite_txn.py: the transaction every SqliteDatabase read and write runs in
(a plain class since the sixth session; it was a contextlib generator).  Whatever
ends the block, the lock is free afterwards, nothing uncommitted stays, and sqlite3
errors come out as the store's errors."""

from __future__ import annotations

import sqlite3
import threading
from types import SimpleNamespace

import pytest
from tidings.store import DuplicateMessage, StoreUnavailable
from tidings.store.sqlite_txn import Transaction


@pytest.fixture
def owner(tmp_path):
    path = str(tmp_path / "t.db")
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (msg_id TEXT UNIQUE)")
    conn.execute("INSERT INTO t VALUES ('m1')")
    yield SimpleNamespace(path=path, conn=conn, lock=threading.Lock())
    conn.close()


def count(o) -> int:
    return o.conn.execute("SELECT COUNT(*) FROM t").fetchone()[0]


def txn(o, begin: str = "BEGIN IMMEDIATE") -> Transaction:
    return Transaction(o, o.lock, "conn", begin)


def txn_state(t: Transaction):
    """The connection a Transaction holds between enter and exit (None outside)."""
    return t._conn


def test_a_clean_block_commits_and_frees_the_lock(owner):
    with txn(owner) as c:
        assert c is owner.conn and owner.lock.locked() and c.in_transaction
        c.execute("INSERT INTO t VALUES ('m2')")
    assert not owner.lock.locked() and not owner.conn.in_transaction
    other = sqlite3.connect(owner.path)  # committed: another connection sees it
    assert other.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 2
    other.close()


def _dup(c):
    c.execute("INSERT INTO t VALUES ('m1')")


def _broken(c):
    c.execute("SELECT * FROM no_such_table")


def _key(c):
    raise KeyError("x")


def _interrupt(c):
    raise KeyboardInterrupt


@pytest.mark.parametrize(("block", "raised", "text"), [
    (_dup, DuplicateMessage, "duplicate msg_id"),  # the msg_id constraint
    (_broken, StoreUnavailable, "no such table"),  # any other sqlite3 error, with the path
    (_key, KeyError, "x"),  # anything else as it is
    (_interrupt, KeyboardInterrupt, ""),  # BaseException too (cancellation)
])
def test_a_failing_block_rolls_back_frees_the_lock_and_maps_the_error(owner, block, raised, text):
    with pytest.raises(raised) as info, txn(owner) as c:
        c.execute("INSERT INTO t VALUES ('m2')")
        block(c)
    assert text in str(info.value)
    if raised is StoreUnavailable:
        assert owner.path in str(info.value)
    if raised in (DuplicateMessage, StoreUnavailable):
        assert isinstance(info.value.__cause__, sqlite3.Error)
    assert not owner.lock.locked() and not owner.conn.in_transaction
    assert count(owner) == 1  # the block's insert was rolled back


def test_a_failing_commit_rolls_back_and_is_mapped(owner):
    owner.conn.execute("PRAGMA foreign_keys = ON")
    owner.conn.execute("CREATE TABLE child (p TEXT REFERENCES t (msg_id) DEFERRABLE INITIALLY DEFERRED)")
    with pytest.raises(StoreUnavailable, match="FOREIGN KEY"), txn(owner) as c:
        c.execute("INSERT INTO t VALUES ('m2')")
        c.execute("INSERT INTO child VALUES ('nobody')")  # fails at COMMIT only
    assert not owner.lock.locked() and not owner.conn.in_transaction
    assert count(owner) == 1


def test_a_failing_begin_frees_the_lock_and_runs_no_block(owner):
    other = sqlite3.connect(owner.path, isolation_level=None, timeout=0)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock
    owner.conn.execute("PRAGMA busy_timeout = 0")
    ran = []
    t = txn(owner)
    with pytest.raises(StoreUnavailable, match="locked"), t as c:
        ran.append(c)
    assert ran == [] and not owner.lock.locked() and not owner.conn.in_transaction
    assert txn_state(t) is None  # one object serves many uses: nothing left of this one
    other.execute("ROLLBACK")
    other.close()


def test_a_closed_connection_is_store_unavailable(owner):
    owner.conn = None
    with pytest.raises(StoreUnavailable, match="closed"), txn(owner):
        pass
    assert not owner.lock.locked()


def test_the_lock_serialises_transactions(owner):
    # a second transaction entered on another thread waits for the first to end
    order = []
    with txn(owner) as c:
        t = threading.Thread(target=lambda: order.append(txn(owner).__enter__() and "second"))
        t.start()
        c.execute("INSERT INTO t VALUES ('m2')")
        order.append("first")
    t.join()
    assert order == ["first", "second"]
    owner.conn.execute("COMMIT")
    owner.lock.release()
    assert count(owner) == 2


def test_one_transaction_object_serves_many_uses(owner):
    t = txn(owner)
    for name in ("m2", "m3"):
        with t as c:
            c.execute("INSERT INTO t VALUES (?)", (name,))
    with pytest.raises(DuplicateMessage), t as c:
        c.execute("INSERT INTO t VALUES ('m3')")
    with t as c:
        assert c.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 3
    assert not owner.lock.locked()
