"""Message storage: one async interface (``base.Store``), three engines.

* :mod:`~tidings.store.records` - records, errors and the semantics every engine shares;
* :mod:`~tidings.store.base` - the interface and ``StoreLimits``;
* :mod:`~tidings.store.search` - the query language and tokenizer;
* engines: :mod:`~tidings.store.memory`, :mod:`~tidings.store.sqlite` (over the
  synchronous :mod:`~tidings.store.sqlite_db`) and :mod:`~tidings.store.redis` (over the
  layout in :mod:`~tidings.store.redis_lua`);
* :func:`open_store` - the engine a config asks for.

Importing this package does not import trio (the records, the interface and the memory
engine are sans-IO); the trio engines are imported when opened.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from tidings.store.base import PipelinedStore, Store, StoreLimits
from tidings.store.memory import MemoryStore
from tidings.store.records import (
    DEFAULT_DEVICE, Appended, BadQuery, DeviceState, DuplicateMessage, InboxState, NewMessage,
    Original, Progress, StoredMessage, StoreError, StoreUnavailable, UnknownMessage, Unsupported,
)

__all__ = [
    "DEFAULT_DEVICE", "Appended", "BadQuery", "DeviceState", "DuplicateMessage", "InboxState",
    "MemoryStore", "NewMessage", "Original", "PipelinedStore", "Progress", "Store", "StoreError", "StoreLimits",
    "StoreUnavailable", "StoredMessage", "UnknownMessage", "Unsupported", "limits_of",
    "open_store",
]


def limits_of(config: Any) -> StoreLimits:
    """The ``[store]`` settings every engine applies."""
    sc = config.store
    return StoreLimits(max_inbox=sc.max_inbox, retention_days=sc.retention_days or None,
                       prune_interval_s=sc.prune_interval_s,
                       key_window_ms=int(sc.idempotency_window_s * 1000))


@contextlib.asynccontextmanager
async def open_store(config: Any, worker: int | None = None) -> AsyncIterator[Store]:
    """Open the engine ``config`` asks for and close it on exit.

    Raises ``StoreUnavailable`` naming the path or URL and the reason (state directory
    not creatable, file not writable, Redis unreachable...)."""
    limits = limits_of(config)
    backend = config.store_backend()
    if backend == "memory":
        store: Any = MemoryStore(limits)
        try:
            yield store
        finally:
            await store.aclose()
    elif backend == "redis":
        from tidings.store.redis import open_redis_store

        cc = config.cluster
        async with open_redis_store(cc.redis_url, limits=limits, node_id=cc.resolved_node_id(worker),
                                    cluster=cc.redis_cluster) as store:
            yield store
    else:
        from tidings.store.sqlite import SqliteStore

        path = config.store_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create state directory {path.parent}: {exc.strerror}") from None
        store = SqliteStore.open(path, limits)
        try:
            yield store
        finally:
            await store.aclose()
