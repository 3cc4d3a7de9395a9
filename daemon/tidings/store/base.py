"""The store interface: one async contract, three engines (memory, sqlite, redis).

Read :mod:`tidings.store.records` first for the semantics every engine shares.

Contract
--------
Every method is a coroutine, called from trio tasks of the daemon, possibly many at
once.  Each engine owns its threading (sqlite: worker threads), batching and
maintenance; callers never know which engine they hold.

* ``append(msgs)`` stores a batch and returns one :class:`Appended` per message, in
  order: its seq, or the error that kept it out, or the original a live idempotency key
  names (checked atomically with the append).  It raises nothing for store failures:
  a batch may partly succeed (Redis, per recipient); a message reported stored is
  durable as far as the engine promises (sqlite: committed; redis: as its AOF says).
* ``claim_key(sender, target, key, msg_id, ts)``: remember a key for a message that is
  not stored (a room message); returns the :class:`Original` of a live key (then nothing
  changed), else None.
* ``save_progress(progress)`` moves device cursors and delivered marks (``max(old,
  min(seq, last_seq))``, registering new devices), records ``last_seen`` and the first
  answers of keyed sends; raises ``StoreError`` when nothing could be written.
* Reads: ``read_inbox``, ``inbox_state`` (of one device), ``devices`` (every registered
  device of a user), ``message`` (one visible message by msg_id, None when unknown or
  pruned), ``history``, ``search`` (``Unsupported`` where there is no index),
  ``last_seen``.
* ``prune(now_ms, retention_days)`` deletes expired messages (and rows ``max_inbox``
  already hid) and forgets expired idempotency keys; ``run()`` prunes every
  ``prune_interval_s`` and does the engine's other maintenance until cancelled.
* ``aclose()``: later calls raise ``StoreUnavailable``.  Idempotent.

``run(task_status=None)`` calls ``task_status.started()`` (when given) once its
maintenance is set up.  Sans-IO: this module only describes; engines bring trio.

Cancellation: a cancelled read returns nothing.  A cancelled ``append``,
``claim_key`` or ``save_progress`` may or may not have written (the caller must treat the outcome as
unknown; the hub never cancels them except at shutdown).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import attrs

from tidings.store.records import (
    DEFAULT_DEVICE, Appended, DeviceState, InboxState, NewMessage, Original, Progress,
    StoredMessage,
)

__all__ = ["Store", "StoreLimits"]


@attrs.frozen
class StoreLimits:
    """What an engine keeps: at most ``max_inbox`` messages per inbox (None: no bound),
    for ``retention_days`` (None or 0: forever), pruned every ``prune_interval_s``;
    idempotency keys for ``key_window_ms`` (0: keys are ignored)."""
    max_inbox: int | None = None
    retention_days: float | None = None
    prune_interval_s: float = 300.0
    key_window_ms: int = 86_400_000


class Store(Protocol):
    """The interface every engine implements (all methods async)."""

    name: str  # "memory", "sqlite" or "redis": for logs and /metrics

    async def run(self, *, task_status: Any = None) -> None: ...
    async def append(self, msgs: Sequence[NewMessage]) -> list[Appended]: ...
    async def claim_key(self, sender: str, target: str, key: str, msg_id: str,
                        ts: int) -> Original | None: ...
    async def save_progress(self, progress: Progress) -> None: ...
    async def read_inbox(self, user: str, after_seq: int, limit: int) -> list[StoredMessage]: ...
    async def inbox_state(self, user: str, device: str = DEFAULT_DEVICE) -> InboxState: ...
    async def devices(self, user: str) -> dict[str, DeviceState]: ...
    async def message(self, msg_id: str) -> StoredMessage | None: ...
    async def history(self, user: str, peer: str, before_msg_id: str | None,
                      limit: int) -> tuple[list[StoredMessage], bool]: ...
    async def search(self, user: str, query: str, limit: int,
                     offset: int = 0) -> tuple[list[StoredMessage], bool]: ...
    async def last_seen(self, users: Sequence[str]) -> dict[str, int | None]: ...
    async def prune(self, now_ms: int, retention_days: float | None) -> int: ...
    async def aclose(self) -> None: ...
