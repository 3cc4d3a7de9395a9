"""Tests of tidings.store (MemoryStore) and tidings.store_sqlite (SqliteStore)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile

import orjson
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tidings.store import (
    BadQuery, DuplicateMessage, InboxState, MemoryStore, NewMessage, StoreUnavailable,
    UnknownMessage, parse_query,
)
from tidings.store.sqlite import MIGRATIONS, SqliteStore

DAY = 86_400_000


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    s = MemoryStore() if request.param == "memory" else SqliteStore.open(tmp_path / "t.db")
    yield s
    s.close()


_counter = iter(range(10**9))


def msg(sender, recipient, body="hi", ts=1000, msg_id=None):
    return NewMessage(msg_id or f"m{next(_counter):09d}", sender, recipient,
                      orjson.dumps(body), ts)


def ids(messages):
    return [m.msg_id for m in messages]


# ------------------------------------------------------------------ append / inbox

def test_append_assigns_per_recipient_seqs(store):
    assert store.append_many([]) == []
    batch = [msg("a", "b"), msg("a", "c"), msg("c", "b"), msg("b", "b")]
    assert store.append_many(batch) == [1, 1, 2, 3]
    assert store.append_many([msg("x", "c")]) == [2]
    inbox = store.read_inbox("b", 0, 10)
    assert [m.seq for m in inbox] == [1, 2, 3]
    assert ids(inbox) == [batch[0].msg_id, batch[2].msg_id, batch[3].msg_id]
    first = inbox[0]
    assert (first.sender, first.recipient, first.body, first.ts) == ("a", "b", b'"hi"', 1000)


def test_duplicate_msg_id_stores_nothing(store):
    m = msg("a", "b")
    store.append_many([m])
    with pytest.raises(DuplicateMessage):
        store.append_many([msg("a", "b"), m])
    with pytest.raises(DuplicateMessage):  # duplicate inside one batch
        store.append_many([msg("a", "b", msg_id="dup"), msg("a", "c", msg_id="dup")])
    assert store.inbox_state("b") == InboxState(1, 1, 0)
    assert store.inbox_state("c") == InboxState(1, 0, 0)
    assert store.append_many([msg("a", "b")]) == [2]


@pytest.mark.parametrize("after, limit, expect", [
    (0, 10, [1, 2, 3, 4, 5]), (2, 10, [3, 4, 5]), (0, 2, [1, 2]), (3, 1, [4]),
    (5, 10, []), (99, 10, []), (-5, 3, [1, 2, 3]), (0, 0, []),
])
def test_read_inbox(store, after, limit, expect):
    store.append_many([msg("a", "u") for _ in range(5)])
    assert [m.seq for m in store.read_inbox("u", after, limit)] == expect
    assert store.read_inbox("nobody", after, limit) == []


def test_inbox_state_and_cursor(store):
    assert store.inbox_state("u") == InboxState(1, 0, 0)
    assert store.set_cursor("u", 5) == 0  # unknown user: nothing to ack
    store.append_many([msg("a", "u") for _ in range(4)])
    assert store.inbox_state("u") == InboxState(1, 4, 0)
    for seq, expect in [(2, 2), (1, 2), (3, 3), (99, 4), (-1, 4), (2**70, 4)]:
        assert store.set_cursor("u", seq) == expect
    assert store.inbox_state("u") == InboxState(1, 4, 4)


# ------------------------------------------------------------------------ history

def test_history_pages_both_directions(store):
    convo = [msg("a", "b"), msg("b", "a"), msg("a", "c"), msg("a", "b"), msg("a", "a"),
             msg("b", "a")]
    store.append_many(convo)
    ab = [convo[5], convo[3], convo[1], convo[0]]  # newest first
    for user, peer in [("a", "b"), ("b", "a")]:
        page, more = store.history(user, peer, None, 10)
        assert (ids(page), more) == (ids(ab), False)
    page, more = store.history("a", "b", None, 2)
    assert (ids(page), more) == (ids(ab[:2]), True)
    page, more = store.history("a", "b", page[-1].msg_id, 2)
    assert (ids(page), more) == (ids(ab[2:]), False)
    assert store.history("a", "b", ab[-1].msg_id, 2) == ([], False)
    assert ids(store.history("a", "a", None, 5)[0]) == [convo[4].msg_id]
    assert store.history("c", "b", None, 5) == ([], False)


def test_history_unknown_before(store):
    store.append_many([msg("a", "b", msg_id="m1"), msg("c", "d", msg_id="m2")])
    with pytest.raises(UnknownMessage):
        store.history("a", "b", "nope", 10)
    with pytest.raises(UnknownMessage):  # exists, but not in this conversation
        store.history("a", "b", "m2", 10)


def test_history_separator_in_user_ids_cannot_leak(store):
    store.append_many([msg("a\x1fb", "c", "secret")])
    assert store.history("a", "b\x1fc", None, 10) == ([], False)


# ------------------------------------------------------------------------- search

def test_search(store):
    ms = [msg("a", "b", "Pizza tonight?", ts=1), msg("b", "a", "pizza pizza PIZZA", ts=2),
          msg("c", "d", "pizza for c", ts=3), msg("a", "c", {"food": "pizza", "n": 1}),
          msg("b", "a", "Café au lait"), msg("b", "a", "don't panic, hot dog")]
    store.append_many(ms)
    got, more = store.search("a", "pizza", 10, 0)
    assert set(ids(got)) == {ms[0].msg_id, ms[1].msg_id, ms[3].msg_id} and not more
    assert got[0].msg_id == ms[1].msg_id  # most hits / best bm25 first
    assert ids(store.search("d", "PIZZA", 10, 0)[0]) == [ms[2].msg_id]
    assert store.search("z", "pizza", 10, 0) == ([], False)
    assert ids(store.search("a", "food", 10, 0)[0]) == [ms[3].msg_id]  # raw JSON text
    assert ids(store.search("a", "cafe", 10, 0)[0]) == [ms[4].msg_id]  # diacritics
    assert ids(store.search("a", "pizza tonight", 10, 0)[0]) == [ms[0].msg_id]  # AND
    assert ids(store.search("a", '"hot dog"', 10, 0)[0]) == [ms[5].msg_id]
    assert store.search("a", '"dog hot"', 10, 0) == ([], False)  # phrase order
    assert ids(store.search("a", "don't", 10, 0)[0]) == [ms[5].msg_id]
    assert store.search("a", "OR AND NOT", 10, 0) == ([], False)  # no operators
    first, more = store.search("a", "pizza", 2, 0)
    rest, more2 = store.search("a", "pizza", 2, 2)
    assert (len(first), more, len(rest), more2) == (2, True, 1, False)
    assert set(ids(first + rest)) == set(ids(got))


@pytest.mark.parametrize("query", ['', '   ', '"', 'pizza "hot', '"a" "', '***', '""',
                                   '-', 'x' * 1001, ' '.join(['w'] * 33), 'a_b' * 0])
def test_malformed_search_raises_bad_query(store, query):
    store.append_many([msg("a", "b", "pizza")])
    with pytest.raises(BadQuery):
        store.search("a", query, 10, 0)


def test_parse_query():
    assert parse_query('Pizza "Hot  Dog" don\'t') == (("pizza",), ("hot", "dog"), ("don", "t"))
    assert parse_query('x AND y*') == (("x",), ("and",), ("y",))


# ------------------------------------------------------------------ presence/prune

def test_last_seen(store):
    assert store.last_seen([]) == {}
    assert store.last_seen(["a", "b"]) == {"a": None, "b": None}
    store.set_last_seen("a", 5)
    store.set_last_seen("a", 7)
    store.append_many([msg("x", "b")])
    assert store.last_seen(["a", "b", "a"]) == {"a": 7, "b": None}


def test_prune_max_inbox_keeps_seqs(store):
    store.append_many([msg("a", "u", f"w{i}") for i in range(10)] + [msg("u", "a")])
    assert store.prune(0, None, None) == 0
    assert store.prune(0, None, 3) == 7
    assert store.inbox_state("u") == InboxState(8, 10, 0)
    assert [m.seq for m in store.read_inbox("u", 0, 100)] == [8, 9, 10]
    assert store.search("a", "w1", 10, 0) == ([], False)  # FTS in sync
    assert len(store.search("a", "w9", 10, 0)[0]) == 1
    assert store.prune(0, None, 3) == 0
    assert store.append_many([msg("a", "u")]) == [11]  # never reused
    assert store.prune(0, None, 0) == 5
    assert store.inbox_state("u") == InboxState(12, 11, 0)
    assert store.inbox_state("a") == InboxState(2, 1, 0)


def test_prune_retention(store):
    now = 100 * DAY
    store.append_many([msg("a", "u", ts=now - 40 * DAY), msg("a", "u", ts=now - 31 * DAY),
                       msg("a", "u", ts=now - 1), msg("a", "v", ts=now - 29 * DAY)])
    assert store.prune(now, 30, None) == 2
    assert store.inbox_state("u") == InboxState(3, 3, 0)
    assert store.inbox_state("v") == InboxState(1, 1, 0)
    assert store.prune(now, 0.5 / 24 / 3600 / 1000, 10) == 2  # 0.5 ms
    assert store.read_inbox("u", 0, 10) == []


def test_prune_large_batches(tmp_path, monkeypatch):
    import tidings.store.sqlite as mod
    monkeypatch.setattr(mod, "PRUNE_BATCH", 7)
    s = SqliteStore.open(tmp_path / "t.db")
    s.append_many([msg("a", u, "hello") for u in ("x", "y") for _ in range(20)])
    assert s.prune(0, None, 2) == 36
    assert [m.seq for m in s.read_inbox("y", 0, 100)] == [19, 20]
    assert len(s.search("a", "hello", 100, 0)[0]) == 4
    s._writer.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")
    s.close()


def test_closed_store_raises(store):
    store.close()
    store.close()
    with pytest.raises(StoreUnavailable):
        store.read_inbox("a", 0, 1)
    with pytest.raises(StoreUnavailable):
        store.append_many([msg("a", "b")])


# ------------------------------------------------------------- sqlite specifics

def test_restart_keeps_data_and_seqs(tmp_path):
    path = tmp_path / "t.db"
    s = SqliteStore.open(path)
    s.append_many([msg("a", "b", "persist me") for _ in range(3)])
    s.set_cursor("b", 2)
    s.set_last_seen("a", 42)
    s.prune(0, None, 1)
    s.close()
    s = SqliteStore.open(str(path))
    assert s.inbox_state("b") == InboxState(3, 3, 2)
    assert s.last_seen(["a"]) == {"a": 42}
    assert len(s.search("b", "persist", 10, 0)[0]) == 1
    assert s.append_many([msg("a", "b")]) == [4]
    s.close()
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)


def test_open_under_regular_file_is_unavailable(tmp_path):
    (tmp_path / "afile").write_text("x")
    path = tmp_path / "afile" / "tidings.db"
    with pytest.raises(StoreUnavailable, match="Not a directory") as e:
        SqliteStore.open(path)
    assert str(path) in str(e.value)


def test_open_missing_dir_is_unavailable(tmp_path):
    path = tmp_path / "nope" / "tidings.db"
    with pytest.raises(StoreUnavailable, match="No such file") as e:
        SqliteStore.open(path)
    assert str(path) in str(e.value)


def test_open_read_only_dir_is_unavailable(read_only_dir):
    path = read_only_dir / "tidings.db"
    with pytest.raises(StoreUnavailable, match="Permission denied|Read-only file system") as e:
        SqliteStore.open(path)
    assert str(path) in str(e.value)


def test_open_garbage_file_is_unavailable(tmp_path):
    path = tmp_path / "t.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreUnavailable, match=str(path)):
        SqliteStore.open(path)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "t.db"
    SqliteStore.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreUnavailable, match=f"schema version {len(MIGRATIONS) + 1} is newer"):
        SqliteStore.open(path)


def test_checkpoint_and_concurrent_reader(tmp_path):
    import threading
    s = SqliteStore.open(tmp_path / "t.db")
    errors = []

    def reader():
        try:
            for _ in range(200):
                s.read_inbox("b", 0, 50)
                s.checkpoint()
        except Exception as e:  # pragma: no cover
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(50):
        s.append_many([msg("a", "b") for _ in range(10)])
    t.join()
    assert errors == [] and s.inbox_state("b").last_seq == 500
    s.close()


# ------------------------------------------------------- differential (stateful)

USERS = ["ann", "bob", "cat", "dan"]
WORDS = ["pizza", "hot", "dog", "tea", "café", "x1"]


class StoreComparison(RuleBasedStateMachine):
    """SqliteStore must answer exactly like MemoryStore (search: same result set)."""

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="tidings-store-")
        self.sql = SqliteStore.open(os.path.join(self.dir, "t.db"))
        self.mem = MemoryStore()
        self.n = 0
        self.ts = 1_000_000

    def teardown(self):
        self.sql.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def both(self, method, *args):
        results = []
        for s in (self.mem, self.sql):
            try:
                results.append(("ok", getattr(s, method)(*args)))
            except Exception as e:
                results.append(("raised", type(e)))
        assert results[0] == results[1], (method, args, results)
        return results[0]

    @initialize()
    def start(self):
        pass

    @rule(batch=st.lists(st.tuples(st.sampled_from(USERS), st.sampled_from(USERS),
                                   st.lists(st.sampled_from(WORDS), max_size=4),
                                   st.booleans(), st.integers(0, 3)),
                         min_size=1, max_size=8))
    def append(self, batch):
        msgs = []
        for sender, recipient, words, as_object, dt in batch:
            self.n += 1
            self.ts += dt
            body = {"t": " ".join(words)} if as_object else " ".join(words)
            msgs.append(NewMessage(f"m{self.n:06d}", sender, recipient,
                                   orjson.dumps(body), self.ts))
        self.both("append_many", msgs)

    @rule(i=st.integers(0, 10**6))
    def duplicate(self, i):
        if self.n:
            dup = f"m{i % self.n + 1:06d}"
            self.both("append_many", [NewMessage(dup, "ann", "bob", b'"x"', self.ts)])

    @rule(user=st.sampled_from(USERS), seq=st.integers(-2, 40))
    def cursor(self, user, seq):
        self.both("set_cursor", user, seq)

    @rule(user=st.sampled_from(USERS), after=st.integers(-1, 40), limit=st.integers(0, 10))
    def inbox(self, user, after, limit):
        self.both("read_inbox", user, after, limit)

    @rule(user=st.sampled_from(USERS), peer=st.sampled_from(USERS), limit=st.integers(1, 5))
    def history(self, user, peer, limit):
        before = None
        for _ in range(50):
            _, (page, more) = self.both("history", user, peer, before, limit)
            if not more:
                break
            before = page[-1].msg_id

    @rule(user=st.sampled_from(USERS), i=st.integers(0, 10**6))
    def history_before_any(self, user, i):
        if self.n:
            self.both("history", user, "bob", f"m{i % self.n + 1:06d}", 3)

    @rule(user=st.sampled_from(USERS), words=st.lists(st.sampled_from(WORDS + ['"hot dog"',
          '"', "t"]), min_size=0, max_size=3), limit=st.integers(0, 4), offset=st.integers(0, 3))
    def search(self, user, words, limit, offset):
        q = " ".join(words)
        results = []
        for s in (self.mem, self.sql):
            try:
                everything, _ = s.search(user, q, 1000, 0)
                page, more = s.search(user, q, limit, offset)
                results.append((sorted(ids(everything)), len(page), more))
                assert set(ids(page)) <= set(ids(everything))
            except BadQuery:
                results.append("BadQuery")
        assert results[0] == results[1], (q, results)

    @rule(user=st.sampled_from(USERS), ts=st.integers(0, 10**7))
    def seen(self, user, ts):
        self.both("set_last_seen", user, ts)
        self.both("last_seen", USERS)

    @rule(max_inbox=st.none() | st.integers(0, 6), back=st.none() | st.integers(0, 30))
    def prune(self, max_inbox, back):
        days = None if back is None else back / DAY  # retention of `back` ms
        self.both("prune", self.ts, days, max_inbox)

    @invariant()
    def inboxes_agree_and_are_contiguous(self):
        for user in USERS:
            _, state = self.both("inbox_state", user)
            _, inbox = self.both("read_inbox", user, 0, 1000)
            assert [m.seq for m in inbox] == list(range(state.first_seq, state.last_seq + 1))
            assert 0 <= state.cursor <= state.last_seq


TestStoreComparison = StoreComparison.TestCase
TestStoreComparison.settings = settings(max_examples=50, stateful_step_count=30,
                                        deadline=None)


# ------------------------------------------------------------------ deferred full-text index

def test_appends_are_indexed_later_but_search_sees_them(tmp_path):
    s = SqliteStore.open(tmp_path / "t.db")
    s.append_many([msg("a", "b", f"pizza {i}") for i in range(3)])
    indexed = s._reader.execute("SELECT COUNT(*) FROM messages_fts WHERE messages_fts MATCH 'pizza'")
    assert indexed.fetchone()[0] == 0  # the append transaction did not index
    assert len(s.search("a", "pizza", 10, 0)[0]) == 3  # search indexes what is pending
    assert s.index_pending() == 0
    s.append_many([msg("a", "b", "pizza 4")])
    assert s.index_pending() == 1 and s.index_pending() == 0
    s._writer.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")
    s.close()


def test_prune_indexes_pending_rows_before_deleting_them(tmp_path):
    s = SqliteStore.open(tmp_path / "t.db")
    s.append_many([msg("a", "b", f"hello {i}") for i in range(10)])  # none indexed yet
    assert s.prune(0, None, 3) == 7
    s._writer.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")
    assert [m.body for m in s.search("b", "hello", 10, 0)[0]].__len__() == 3
    s.close()


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
    s = SqliteStore.open(path)
    assert s.index_pending() == 0  # version 1 indexed at append time: nothing pending
    assert [m.msg_id for m in s.search("a", "pizza", 10, 0)[0]] == ["m1"]
    s.append_many([msg("a", "b", "new pizza")])
    assert len(s.search("a", "pizza", 10, 0)[0]) == 2
    s._writer.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")
    s.close()


def test_ids_are_not_reused_below_the_index_after_pruning_the_newest(tmp_path):
    s = SqliteStore.open(tmp_path / "t.db")
    s.append_many([msg("a", "b", "pizza one") for _ in range(3)])
    assert s.index_pending() == 3
    assert s.prune(0, None, 0) == 3  # every row gone: SQLite would reuse ids 1..3
    s.append_many([msg("a", "b", "pizza two")])
    assert [m.seq for m in s.search("a", "pizza", 10, 0)[0]] == [4]
    assert s.prune(0, None, 0) == 1
    s._writer.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")
    s.close()
