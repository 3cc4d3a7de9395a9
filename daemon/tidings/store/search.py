"""The search query language and tokenizer shared by every engine.  Sans-IO.

Search accepts a deliberately small syntax (see :func:`parse_query`): plain words and
``"quoted phrases"``, all of which must match (AND).  The query is parsed and validated
here, once, for every engine, so a malformed query fails the same way everywhere
(:class:`BadQuery`) and SQLite never sees raw user syntax (the sqlite engine renders
every term as a quoted FTS5 string).  The text that is searched is the message body
decoded: the string value if the body JSON is a string, else the raw JSON text (keys
included).  The memory engine's tokenizer approximates FTS5's ``unicode61
remove_diacritics 2``.
"""

from __future__ import annotations

import re
import unicodedata

import orjson

from tidings.store.records import BadQuery

__all__ = ["MAX_QUERY_CHARS", "MAX_QUERY_TOKENS", "indexed_text", "parse_query", "phrase_hits",
           "tokenize"]

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


def phrase_hits(tokens: list[str], phrase: tuple[str, ...]) -> int:
    n = len(phrase)
    return sum(1 for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n]) == phrase)
