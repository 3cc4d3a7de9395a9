"""What the hub tells webhooks: users coming and going on this node, messages stored.  Trio.

:class:`WebhookRecorder` is the hub's side.  The hub calls, synchronously and without
blocking (none of them does I/O):

* ``connected(user)`` / ``disconnected(user)`` on a user's first / last connection to
  THIS node (only while "online" or "offline" is in ``webhooks.events``).

and, only while "undelivered" is in ``webhooks.events``, awaits ``watch(messages,
results)`` after each stored batch and before acknowledging it: one undelivered check
per stored message, due ``undelivered_after_s`` after now, written to the store at once
(``undelivered_watch``: one call per batch), so a message whose ack the sender saw has
its check even if the process is killed right after.  If that write fails the checks
are kept and retried by ``run`` (the messages are stored and acked all the same).

``run`` (started in the daemon's root nursery) writes the presence changes as soon as
they are recorded: ``presence_set`` (this node's users added and removed; the store
counts nodes per user and adds ``online`` / ``offline`` events to the outbox when a
count goes 0 -> 1 / 1 -> 0).  A user who leaves and comes back before the write is neither removed nor added: no
events for a blip of a few milliseconds.  The same call, with nothing to change, is the
node's heartbeat every ``ttl_s / 3``: a node that stops (kill -9) is reaped by the
sender ``ttl_s`` later and its users go offline (unless another node has them).  When
the store says the node was not alive (first call, or reaped while it could not reach
the store), the next call sends the node's whole set of users.

Before ``run`` reports started it reaps this node's own id: a node restarted with the
same ``cluster.node_id`` starts from nothing, so users of the killed run go offline.

A failed write (store unavailable) is kept, merged with what comes next, retried every
second and logged once a minute.  A presence change recorded but not yet written is lost
if the process dies (a window of milliseconds, and the node's users then go offline by
the reaping anyway).  Cancelling
``run`` stops it; nothing is flushed then (the hub flushes at shutdown through
``flush``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import trio

from tidings import log
from tidings.config import WebhooksConfig
from tidings.store import Store, StoreError
from tidings.store.records import Appended, NewMessage, UndeliveredCheck

__all__ = ["WebhookRecorder"]

RETRY_S = 1.0


def wall_ms() -> int:
    return int(time.time() * 1000)


class WebhookRecorder:
    """The hub's side of webhooks (see the module docstring).

    ``local_users()`` lists the users connected to this node now (for a full set);
    ``on_written()`` is called after a write that may have added events (the sender's
    ``wake``)."""

    def __init__(self, store: Store, config: WebhooksConfig, *, node: str, ttl_s: float,
                 local_users: Callable[[], Iterable[str]],
                 on_written: Callable[[], None] = lambda: None,
                 now_ms: Callable[[], int] = wall_ms) -> None:
        self.store = store
        self.node = node
        self.ttl_s = ttl_s
        self.types = tuple(t for t in ("online", "offline") if t in config.events)
        self.tracks_presence = bool(self.types)
        self.tracks_undelivered = "undelivered" in config.events
        self.after_ms = int(config.undelivered_after_s * 1000)
        self._local_users = local_users
        self._on_written = on_written
        self._now_ms = now_ms
        self._on: set[str] = set()
        self._off: set[str] = set()
        self._checks: list[UndeliveredCheck] = []
        self._full = True  # the first write sends the whole set
        self._wake = trio.Event()
        self._lock = trio.Lock()  # one write at a time: a user's on and off stay in order
        self._errors = log.LogOnce(interval=60.0)
        self.writes = 0
        #: The node's WebhookSender (its statistics for the operator's page), when set.
        self.sender: Any = None

    # -- called by the hub (synchronous, never blocks) ----------------------------------

    def connected(self, user: str) -> None:
        self._off.discard(user)
        self._on.add(user)
        self._wake.set()

    def disconnected(self, user: str) -> None:
        self._on.discard(user)
        self._off.add(user)
        self._wake.set()

    async def watch(self, messages: Sequence[NewMessage], results: Sequence[Appended]) -> None:
        """Record (durably, before returning) an undelivered check per stored message.
        Never raises a store error: failed checks are retried by ``run``."""
        due = self._now_ms() + self.after_ms
        checks = [UndeliveredCheck(due, m.recipient, r.seq, m.msg_id, m.sender)
                  for m, r in zip(messages, results)
                  if r.seq is not None and r.original is None]  # a duplicate: not stored
        if not checks:
            return
        try:
            await self.store.undelivered_watch(checks)
        except StoreError as exc:
            self._checks += checks
            self._wake.set()
            self._errors.log("error", "webhook_store_failed", key="watch", what="undelivered_watch",
                             pending=len(self._checks), error=str(exc))

    # -- the task ---------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Reap this node's previous run, report started, then write what is recorded
        (at once) and the heartbeat (every ``ttl_s / 3``) until cancelled."""
        if self.tracks_presence:
            try:
                await self.store.presence_reap(self._now_ms(), self.types, node=self.node)
            except StoreError as exc:
                self._errors.log("error", "webhook_store_failed", key="reap", what="presence_reap",
                                 error=str(exc))
        task_status.started()
        interval = self.ttl_s / 3
        while True:
            ok = await self.flush()
            with trio.move_on_after(interval if ok else min(RETRY_S, interval)):
                await self._wake.wait()

    async def flush(self) -> bool:
        """Write what was recorded (and the heartbeat); False if the store failed (what
        was recorded is kept for the next call)."""
        async with self._lock:
            return await self._flush()

    async def _flush(self) -> bool:
        self._wake = trio.Event()
        ok = True
        if self.tracks_presence:
            ok = await self._write_presence()
        if self._checks:
            checks, self._checks = self._checks, []
            try:
                await self.store.undelivered_watch(checks)
            except StoreError as exc:
                self._checks = checks + self._checks
                self._errors.log("error", "webhook_store_failed", key="watch",
                                 what="undelivered_watch", pending=len(self._checks), error=str(exc))
                ok = False
        self.writes += 1
        return ok

    async def _write_presence(self) -> bool:
        on, off, full = self._on, self._off, self._full
        self._on, self._off = set(), set()
        now = self._now_ms()
        expires = now + int(self.ttl_s * 1000)
        try:
            if full:
                online = sorted(set(self._local_users()))
                await self.store.presence_set(self.node, online, [], full=True, now_ms=now,
                                              expires_ms=expires, types=self.types)
                self._full = False
            else:
                known = await self.store.presence_set(self.node, sorted(on), sorted(off), full=False,
                                                      now_ms=now, expires_ms=expires, types=self.types)
                if not known:  # reaped (or never seen): our whole set, at once
                    self._full = True
                    return await self._write_presence()
        except StoreError as exc:
            # keep what failed, unless something newer says otherwise
            self._on |= {u for u in on if u not in self._off}
            self._off |= {u for u in off if u not in self._on}
            self._errors.log("error", "webhook_store_failed", key="presence", what="presence_set",
                             error=str(exc))
            return False
        if on or off or full:
            self._on_written()
        return True
