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

Webhooks (only called while ``[webhooks]`` is on; see :mod:`tidings.webhooks`)
-----------------------------------------------------------------------------
* The **outbox**: ``outbox_add(events)`` stores events durably (sqlite: committed;
  redis: a stream, as its AOF says; memory: in this process only) and raises
  ``StoreError`` when it could not.  ``outbox_read(after, limit)`` returns up to
  ``limit`` entries after position ``after`` (None: from the oldest), in the order they
  were added; ``outbox_retry(pos, attempts, due_ms)`` records a failed attempt;
  ``outbox_done(positions)`` removes entries (sent or dead; unknown ones are ignored);
  ``outbox_depth()`` counts what waits.  ``outbox_lease(owner, ttl_ms)`` is True while
  ``owner`` is the one sender of the whole deployment (acquired or renewed by the call,
  held for ``ttl_ms`` after it; always True on the single-node engines).
* **Presence** counted per node, so a user online on two nodes is online once:
  ``presence_set(node, online, offline, full=, now_ms=, expires_ms=, types=)`` adds
  users to / removes users from ``node``'s set (``full``: ``online`` is the node's whole
  set, everything else in it goes) and keeps the node alive until ``expires_ms``; in
  the same atomic step, a user whose count of nodes goes 0 -> 1 gets an ``online``
  event and 1 -> 0 an ``offline`` event in the outbox, when that type is in ``types``.
  Adding a present user or removing an absent one changes nothing (a retried call is
  harmless).  Returns whether ``node`` was alive before the call (False: the caller
  should send its full set next).  ``presence_reap(now_ms, types, node=None)`` removes
  every node whose ``expires_ms`` passed (and ``node`` itself, whatever its expiry: a
  restarted node starts over), as if each of its users went away; returns how many users
  went offline.
* **Undelivered checks**: ``undelivered_watch(checks)`` records them;
  ``undelivered_due(now_ms, limit)`` returns up to ``limit`` with ``due_ms <= now_ms``,
  earliest first; ``acked_by_any_device(pairs)`` says for each ``(user, seq)`` whether
  a device of the user acked that seq (today: the user's cursor reached it);
  ``undelivered_settle(checks, events)`` removes each check that is still there and,
  for those only, adds its event (None: acked, nothing to add) to the outbox, atomically
  per check: whoever settles a check first adds its event, so two nodes checking the
  same one add it once.  Returns the number of events added.

``run(task_status=None)`` calls ``task_status.started()`` (when given) once its
maintenance is set up.  Sans-IO: this module only describes; engines bring trio.

Cancellation: a cancelled read returns nothing.  A cancelled ``append``,
``claim_key`` or ``save_progress`` may or may not have written (the caller must treat the outcome as
unknown; the hub never cancels them except at shutdown).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs

from tidings.store.records import (
    DEFAULT_DEVICE, Appended, DeviceState, InboxState, NewMessage, Original, OutboxEntry,
    Progress, StoredMessage, UndeliveredCheck, WebhookEvent,
)

__all__ = ["PipelinedStore", "Store", "StoreLimits"]


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

    # webhooks
    async def outbox_add(self, events: Sequence[WebhookEvent]) -> None: ...
    async def outbox_read(self, after: str | None, limit: int) -> list[OutboxEntry]: ...
    async def outbox_retry(self, pos: str, attempts: int, due_ms: int) -> None: ...
    async def outbox_done(self, positions: Sequence[str]) -> None: ...
    async def outbox_depth(self) -> int: ...
    async def outbox_lease(self, owner: str, ttl_ms: int) -> bool: ...
    async def presence_set(self, node: str, online: Sequence[str], offline: Sequence[str], *,
                           full: bool, now_ms: int, expires_ms: int,
                           types: Collection[str]) -> bool: ...
    async def presence_reap(self, now_ms: int, types: Collection[str],
                            node: str | None = None) -> int: ...
    async def undelivered_watch(self, checks: Sequence[UndeliveredCheck]) -> None: ...
    async def undelivered_due(self, now_ms: int, limit: int) -> list[UndeliveredCheck]: ...
    async def acked_by_any_device(self, pairs: Sequence[tuple[str, int]]) -> list[bool]: ...
    async def undelivered_settle(self, checks: Sequence[UndeliveredCheck],
                                 events: Sequence[WebhookEvent | None]) -> int: ...


@runtime_checkable
class PipelinedStore(Store, Protocol):
    """An engine whose append can be split in two halves (redis): ``append_submit`` sends
    the batch and returns once it is queued, so batches submitted one after the other run
    in that order; the callable it returns waits for that batch's results (what
    ``append`` would have returned).  The hub's writer keeps batches in flight this way
    (server/writer.py); with any other engine it awaits ``append`` batch by batch."""

    async def append_submit(self, msgs: Sequence[NewMessage]
                            ) -> Callable[[], Awaitable[list[Appended]]]: ...
