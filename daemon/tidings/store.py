"""Message storage: records, errors, the store interface and the in-memory store.

Theory of operation
-------------------
A store keeps, per user, an *inbox*: the messages addressed to that user, each
numbered with a per-recipient sequence number ``seq`` (1, 2, 3, ...).  Seqs are
assigned by the store at append time, strictly increasing without gaps, and
never reused: the highest seq ever assigned (``last_seq``) is kept per user
even after the messages themselves are pruned.  Pruning only ever removes a
*prefix* of an inbox (lowest seqs first), so the stored seqs of a user are
always the contiguous range ``first_seq .. last_seq``.  The router uses that for
resume: a client asking for everything after ``since`` gets a complete replay
iff ``since + 1 >= first_seq``.

Every message is stored once (in its recipient's inbox) and is also visible to
its sender through ``history`` (both directions of a conversation, paged by
``msg_id``, which the router makes lexicographically increasing with time) and
``search``.  A user only ever sees messages they sent or received: every query
filters on the user being sender or recipient.

Search accepts a deliberately small syntax (see :func:`parse_query`): plain
words and ``"quoted phrases"``, all of which must match (AND).  The query is
parsed and validated here, once, for both stores, so a malformed query fails
the same way everywhere (:class:`BadQuery`) and SQLite never sees raw user
syntax (:mod:`tidings.store_sqlite` renders every term as a quoted FTS5 string).
The text that is searched is the message body decoded: the string value if the
body JSON is a string, else the raw JSON text (keys included).

Two implementations share these semantics: :class:`MemoryStore` (dicts and
lists, for tests and the ``memory`` backend) and
:class:`tidings.store_sqlite.SqliteStore` (durable).  They differ only in
search ranking: SQLite ranks by bm25, the memory store by number of term hits,
then newest first.  The set of messages a query matches is the same for plain
ASCII text; for exotic Unicode the memory store's tokenizer is an approximation
of FTS5's ``unicode61``.

This module is sans-IO and synchronous: it never imports trio.  All methods
are thread-safe (each store guards its state with a lock); the trio wrapper in
``storage.py`` calls them from worker threads.
"""

from __future__ import annotations

import bisect
import re
import threading
import unicodedata
from collections.abc import Sequence
from typing import Protocol

import attrs
import orjson

__all__ = [
    "BadQuery", "DuplicateMessage", "InboxState", "MemoryStore", "NewMessage",
    "Presence", "SqliteStore", "Store", "StoreError", "StoreUnavailable",
    "StoredMessage", "UnknownMessage", "Unsupported", "indexed_text", "parse_query", "tokenize",
]

MS_PER_DAY = 86_400_000


# --------------------------------------------------------------------- errors

class StoreError(Exception):
    """Base class of every error a store raises on purpose."""


class StoreUnavailable(StoreError):
    """The store cannot be opened, read or written (path, permissions, disk full,
    schema too new, closed store). The message names the path and the reason."""


class DuplicateMessage(StoreError):
    """``append_many`` got a ``msg_id`` that is already stored (nothing was stored)."""


class UnknownMessage(StoreError):
    """``history`` got a ``before_msg_id`` that is not in that conversation."""


class Unsupported(StoreError):
    """The operation is not available with this store (search on Redis)."""


class BadQuery(StoreError):
    """A search query is malformed; ``str(exc)`` is a short reason for the client."""


# -------------------------------------------------------------------- records

@attrs.frozen
class NewMessage:
    """What the router asks to store. ``body`` is the orjson-encoded JSON body,
    stored and returned verbatim; ``ts`` is epoch milliseconds."""
    msg_id: str
    sender: str
    recipient: str
    body: bytes
    ts: int


@attrs.frozen
class StoredMessage:
    msg_id: str
    seq: int
    sender: str
    recipient: str
    body: bytes
    ts: int


@attrs.frozen
class InboxState:
    """``first_seq``: lowest stored seq (``last_seq + 1`` if the inbox is empty);
    ``last_seq``: highest seq ever assigned (0 if never); ``cursor``: acked seq."""
    first_seq: int
    last_seq: int
    cursor: int


@attrs.frozen
class Presence:
    last_seen: int | None


class Store(Protocol):
    """The interface both stores implement (all methods synchronous)."""

    def append_many(self, msgs: Sequence[NewMessage]) -> list[int]: ...
    def read_inbox(self, user: str, after_seq: int, limit: int) -> list[StoredMessage]: ...
    def inbox_state(self, user: str) -> InboxState: ...
    def set_cursor(self, user: str, seq: int) -> int: ...
    def history(self, user: str, peer: str, before_msg_id: str | None,
                limit: int) -> tuple[list[StoredMessage], bool]: ...
    def search(self, user: str, query: str, limit: int,
               offset: int = 0) -> tuple[list[StoredMessage], bool]: ...
    def set_last_seen(self, user: str, ts_ms: int) -> None: ...
    def last_seen(self, users: Sequence[str]) -> dict[str, int | None]: ...
    def prune(self, now_ms: int, retention_days: float | None,
              max_inbox: int | None) -> int: ...
    def close(self) -> None: ...


def __getattr__(name: str):  # lazy re-export, avoids an import cycle
    if name == "SqliteStore":
        from .store_sqlite import SqliteStore
        return SqliteStore
    raise AttributeError(name)


# --------------------------------------------------------------------- search

MAX_QUERY_CHARS = 1000
MAX_QUERY_TOKENS = 32

_TOKEN_RE = re.compile(r"[^\W_]+")  # runs of Unicode letters/digits


def tokenize(text: str) -> list[str]:
    """Split ``text`` into lower-case tokens: runs of letters/digits, diacritics
    removed. Approximates FTS5 ``unicode61 remove_diacritics 2``."""
    decomposed = unicodedata.normalize("NFD", text.casefold())
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return _TOKEN_RE.findall(stripped)


def indexed_text(body: bytes) -> str:
    """The searchable text of a body: the string if the JSON is a string, else the
    raw JSON text. (store_sqlite computes the same thing in SQL.)"""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        value = None
    if isinstance(value, str):
        return value
    return body.decode("utf-8", "replace")


def parse_query(query: str) -> tuple[tuple[str, ...], ...]:
    """Validate a search query and return its phrases (each a tuple of tokens).

    Syntax: plain words and ``"quoted phrases"``; every phrase must match (AND).
    A quoted phrase matches its tokens adjacent and in order. A plain word that
    tokenizes into several tokens (``don't`` -> ``don t``) is a phrase too, as in
    FTS5. There are no operators: ``AND``, ``OR``, ``*``, ``-`` are ordinary text.
    Raises :class:`BadQuery` for an unbalanced quote, a query with no searchable
    words, more than MAX_QUERY_CHARS characters or more than MAX_QUERY_TOKENS tokens.
    """
    if not isinstance(query, str):
        raise BadQuery("query must be a string")
    if len(query) > MAX_QUERY_CHARS:
        raise BadQuery(f"query longer than {MAX_QUERY_CHARS} characters")
    parts = query.split('"')
    if len(parts) % 2 == 0:
        raise BadQuery("unbalanced quote in query")
    phrases: list[tuple[str, ...]] = []
    for i, part in enumerate(parts):
        chunks = [part] if i % 2 else part.split()
        for chunk in chunks:
            tokens = tuple(tokenize(chunk))
            if tokens:
                phrases.append(tokens)
    if not phrases:
        raise BadQuery("query has no searchable words")
    if sum(map(len, phrases)) > MAX_QUERY_TOKENS:
        raise BadQuery(f"query has more than {MAX_QUERY_TOKENS} words")
    return tuple(phrases)


def _phrase_hits(tokens: list[str], phrase: tuple[str, ...]) -> int:
    n = len(phrase)
    return sum(1 for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n]) == phrase)


def _check_page(limit: int, offset: int = 0) -> None:
    if limit < 0 or offset < 0:
        raise ValueError("limit and offset must be >= 0")


def prune_cutoff_ms(now_ms: int, retention_days: float | None) -> int | None:
    """Messages with ``ts`` below the returned value are expired (None: keep all)."""
    if retention_days is None:
        return None
    return now_ms - int(retention_days * MS_PER_DAY)


# --------------------------------------------------------------- MemoryStore

@attrs.define
class _User:
    last_seq: int = 0
    cursor: int = 0
    last_seen: int | None = None
    inbox: list[StoredMessage] = attrs.Factory(list)  # ascending, contiguous seqs


class MemoryStore:
    """The in-memory store: same contract as SqliteStore, nothing survives close.

    Search is a linear scan over the messages the user sent or received: all
    phrases must occur (case-insensitive, tokens split on non-alphanumerics);
    ranked by total phrase hits, then newest (highest msg_id) first.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: dict[str, _User] = {}
        self._by_id: dict[str, StoredMessage] = {}
        # (sorted pair of users) -> msg_ids ascending
        self._convs: dict[tuple[str, str], list[str]] = {}
        self._closed = False

    def _user(self, name: str) -> _User:
        user = self._users.get(name)
        if user is None:
            user = self._users[name] = _User()
        return user

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("memory store is closed")

    @staticmethod
    def _conv(a: str, b: str) -> tuple[str, str]:
        return (a, b) if a <= b else (b, a)

    def append_many(self, msgs: Sequence[NewMessage]) -> list[int]:
        """Store all of ``msgs`` atomically; return each one's new inbox seq."""
        with self._lock:
            self._check_open()
            if len(msgs) == 1:  # the common case (memory mode appends one by one)
                if msgs[0].msg_id in self._by_id:
                    raise DuplicateMessage("duplicate msg_id in append_many")
            else:
                ids = [m.msg_id for m in msgs]
                if len(set(ids)) != len(ids) or any(i in self._by_id for i in ids):
                    raise DuplicateMessage("duplicate msg_id in append_many")
            seqs = []
            for m in msgs:
                user = self._user(m.recipient)
                user.last_seq += 1
                stored = StoredMessage(m.msg_id, user.last_seq, m.sender, m.recipient,
                                       m.body, m.ts)
                user.inbox.append(stored)
                self._by_id[m.msg_id] = stored
                bisect.insort(self._convs.setdefault(self._conv(m.sender, m.recipient), []),
                              m.msg_id)
                seqs.append(user.last_seq)
            return seqs

    def read_inbox(self, user: str, after_seq: int, limit: int) -> list[StoredMessage]:
        """Up to ``limit`` messages of ``user``'s inbox with seq > after_seq, ascending."""
        _check_page(limit)
        with self._lock:
            self._check_open()
            u = self._users.get(user)
            if u is None:
                return []
            i = bisect.bisect_right(u.inbox, after_seq, key=lambda m: m.seq)
            return u.inbox[i:i + limit]

    def inbox_state(self, user: str) -> InboxState:
        with self._lock:
            self._check_open()
            u = self._users.get(user) or _User()
            first = u.inbox[0].seq if u.inbox else u.last_seq + 1
            return InboxState(first, u.last_seq, u.cursor)

    def set_cursor(self, user: str, seq: int) -> int:
        """cursor = max(old, min(seq, last_seq)); returns the new cursor."""
        with self._lock:
            self._check_open()
            u = self._users.get(user)
            if u is None:
                return 0
            u.cursor = max(u.cursor, min(seq, u.last_seq))
            return u.cursor

    def history(self, user: str, peer: str, before_msg_id: str | None,
                limit: int) -> tuple[list[StoredMessage], bool]:
        """Messages between user and peer, newest first, msg_id < before_msg_id;
        plus whether older ones exist. Unknown before_msg_id -> UnknownMessage."""
        _check_page(limit)
        with self._lock:
            self._check_open()
            ids = self._convs.get(self._conv(user, peer), [])
            if before_msg_id is None:
                end = len(ids)
            else:
                end = bisect.bisect_left(ids, before_msg_id)
                if end == len(ids) or ids[end] != before_msg_id:
                    raise UnknownMessage(f"unknown message {before_msg_id!r}")
            start = max(0, end - limit)
            page = [self._by_id[i] for i in reversed(ids[start:end])]
            return page, start > 0

    def search(self, user: str, query: str, limit: int,
               offset: int = 0) -> tuple[list[StoredMessage], bool]:
        """Messages user sent or received matching all phrases of ``query``
        (see parse_query), best first; plus whether more results follow."""
        phrases = parse_query(query)
        _check_page(limit, offset)
        with self._lock:
            self._check_open()
            scored = []
            for m in self._by_id.values():
                if user not in (m.sender, m.recipient):
                    continue
                tokens = tokenize(indexed_text(m.body))
                hits = [_phrase_hits(tokens, p) for p in phrases]
                if all(hits):
                    scored.append((-sum(hits), m.msg_id, m))
        scored.sort(key=lambda t: t[1], reverse=True)  # newest first...
        scored.sort(key=lambda t: t[0])                # ...within equal hits (stable)
        page = [t[2] for t in scored[offset:offset + limit]]
        return page, len(scored) > offset + limit

    def set_last_seen(self, user: str, ts_ms: int) -> None:
        with self._lock:
            self._check_open()
            self._user(user).last_seen = ts_ms

    def last_seen(self, users: Sequence[str]) -> dict[str, int | None]:
        with self._lock:
            self._check_open()
            return {u: (self._users[u].last_seen if u in self._users else None)
                    for u in users}

    def prune(self, now_ms: int, retention_days: float | None,
              max_inbox: int | None) -> int:
        """Delete, per recipient, every message up to the newest one older than the
        retention (ts < now - retention) and all but the newest ``max_inbox``;
        always an inbox prefix, so seqs stay contiguous. Returns the count deleted."""
        cutoff = prune_cutoff_ms(now_ms, retention_days)
        deleted = 0
        with self._lock:
            self._check_open()
            for u in self._users.values():
                cut = 0
                if cutoff is not None:
                    cut = max((m.seq for m in u.inbox if m.ts < cutoff), default=0)
                if max_inbox is not None:
                    cut = max(cut, u.last_seq - max(max_inbox, 0))
                n = bisect.bisect_right(u.inbox, cut, key=lambda m: m.seq)
                for m in u.inbox[:n]:
                    del self._by_id[m.msg_id]
                    key = self._conv(m.sender, m.recipient)
                    ids = self._convs[key]
                    del ids[bisect.bisect_left(ids, m.msg_id)]
                    if not ids:
                        del self._convs[key]
                del u.inbox[:n]
                deleted += n
        return deleted

    def close(self) -> None:
        with self._lock:
            self._closed = True
