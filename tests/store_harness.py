"""Opening any store engine the same way from tests: :class:`Engine`, and ``msg``.

Not a test module.  ``Engine("memory")``, ``Engine("sqlite", path=...)`` or
``Engine("redis", server=<redis_fixture.RedisServer>)``; then ``async with
engine.open(limits) as store`` gives a fresh :class:`tidings.store.Store` over the
engine's current data (sqlite: the same file; redis: the same server), closed on exit.
The redis store is opened without publishing, so every engine answers
``Appended.receivers = None`` (tests/test_store_redis.py covers publishing).
"""

from __future__ import annotations

import pytest

import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from tidings.store import MemoryStore, NewMessage, Store, StoreLimits

__all__ = ["ENGINES", "Engine", "ids", "msg", "outcomes"]

ENGINES = ("memory", "sqlite", "redis")

_ids = itertools.count()


def msg(sender: str, recipient: str, body: Any = "hi", ts: int = 1000,
        msg_id: str | None = None) -> NewMessage:
    """A message with a fresh msg_id (increasing, as the hub makes them)."""
    return NewMessage(msg_id or f"m{next(_ids):09d}", sender, recipient,
                      orjson.dumps(body), ts)


def ids(messages: Any) -> list[str]:
    return [m.msg_id for m in messages]


def outcomes(appended: Any) -> list[tuple[int | None, type | None]]:
    """``[(seq, error type)]`` of an append's results (receivers must be None)."""
    assert all(a.receivers is None for a in appended)
    return [(a.seq, None if a.error is None else type(a.error)) for a in appended]


class Engine:
    """One engine and where its data lives; ``open`` may be called again to reopen."""

    def __init__(self, name: str, *, path: Path | None = None, server: Any = None) -> None:
        assert name in ENGINES
        self.name = name
        self.path = path          # sqlite: the database file
        self.server = server      # redis: a redis_fixture.RedisServer
        self._fresh = itertools.count()

    @property
    def searchable(self) -> bool:
        return self.name != "redis"

    @contextlib.asynccontextmanager
    async def open(self, limits: StoreLimits | None = None) -> AsyncIterator[Store]:
        limits = limits or StoreLimits()
        if self.name == "redis":
            from tidings.store.redis import open_redis_store

            async with open_redis_store(self.server.url, limits=limits, node_id="test",
                                        publish=False) as store:
                yield store
            return
        if self.name == "memory":
            store: Any = MemoryStore(limits)
        else:
            from tidings.store.sqlite import SqliteStore

            store = SqliteStore.open(self.path, limits)
        try:
            yield store
        finally:
            await store.aclose()

    def reset(self) -> None:
        """Start over with no data (a new sqlite file; FLUSHALL on redis)."""
        if self.name == "sqlite":
            assert self.path is not None
            self.path = self.path.with_name(f"fresh-{next(self._fresh)}.db")
        elif self.name == "redis":
            self.server.flush()

    def make_durable(self) -> None:
        """Redis: restart the (empty) server with an append-only file, so that
        :meth:`restart` keeps the data.  Other engines: nothing to do."""
        if self.name == "redis":
            self.server.stop()
            self.server.appendonly = True
            self.server.start()

    def restart(self) -> None:
        """Redis: stop the server (SIGTERM: the AOF is flushed) and start it again.
        Sqlite: nothing to do (reopening the file is the restart)."""
        if self.name == "redis":
            self.server.stop()
            self.server.start()


@pytest.fixture(params=ENGINES)
def engine(request, tmp_path) -> Engine:
    if request.param == "redis":
        from redis_fixture import require_coredis

        require_coredis()
        return Engine("redis", server=request.getfixturevalue("redis_server"))
    return Engine(request.param, path=tmp_path / "t.db")
