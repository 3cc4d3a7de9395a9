"""The webhook sender: takes events from the store's outbox and POSTs them.  Trio.

Theory of operation
-------------------
Every node runs one :class:`WebhookSender`; only the holder of the store's lease sends
(``outbox_lease``: always this process on memory/sqlite; in a cluster one node at a time,
renewed every second (``ttl_s / 3`` if shorter) and lost ``ttl_s`` after its holder
stops).  The holder, in a loop:

1. once a second: settles the undelivered checks that are due (those whose message no
   device of the recipient acked, ``acked_by_any_device``, become ``undelivered``
   events in the outbox; ``undelivered_settle`` adds each once, even if two nodes
   race), reaps nodes whose presence expired (``presence_reap``: their users go
   offline) and reads the outbox's depth for /metrics;
2. reads the outbox in order into a window of at most ``WINDOW`` entries, one queue per
   user, and runs one task per user with a due head: it sends that user's events one at
   a time, in order; at most ``MAX_REQUESTS`` requests are in flight in all;
3. waits for ``wake()`` (a local write that may have added events), the next due retry,
   or ``POLL_S`` (events other nodes added).

An attempt is a POST of :func:`tidings.webhooks.events.event_body` with
``Tidings-Signature`` (signed at the time of the attempt), bounded as a whole by
``timeout_s``.  A 2xx answer removes the event (``outbox_done``).  Anything else (timeout,
connection error, another status) is a failed attempt: the n-th waits
``retry_delay_s(n)`` (stored with ``outbox_retry``, so a restart keeps the schedule) and
holds back that user's later events; the ``max_attempts``-th makes the event dead:
logged (``event=webhook_dead``, at most one line a second, the rest counted in
``suppressed``), counted, removed, and the user's next event goes.  Failures are logged
at most once a minute per reason.

A user whose head is being retried holds back only its own events, as long as the
window has room: when ``WINDOW`` events wait behind retried heads, the rest waits too.

Losing the lease (or a store failure while leading) cancels the sends in flight; what
they were sending is still in the outbox and is sent again by the next holder (at least
once: receivers de-duplicate by ``id``).  Message delivery never waits for any of this:
the sender only talks to the store and the receiver from its own tasks.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import attrs
import httpx
import trio

from tidings import __version__, log
from tidings.config import WebhooksConfig
from tidings.store import Store, StoreError
from tidings.store.records import OutboxEntry, WebhookEvent, new_event_id
from tidings.webhooks.events import event_body, retry_delay_s
from tidings.webhooks.signing import SIGNATURE_HEADER, sign

__all__ = ["HttpPoster", "MAX_REQUESTS", "POLL_S", "Post", "SenderStatistics", "WINDOW",
           "WebhookSender"]

WINDOW = 4096
MAX_REQUESTS = 16
POLL_S = 1.0
READ_CHUNK = 512
CHECK_BATCH = 256
#: Answer bytes read (and dropped) before the connection is given up on.
MAX_ANSWER_BYTES = 65536

#: ``post(url, body, headers, timeout_s) -> HTTP status``; raises httpx.HTTPError or
#: OSError when there is no answer.
Post = Callable[[str, bytes, dict[str, str], float], Awaitable[int]]


def wall_ms() -> int:
    return int(time.time() * 1000)


class HttpPoster:
    """POSTs with one httpx client (keep-alive to the receiver); ``aclose`` when done."""

    def __init__(self) -> None:
        self._client = httpx.AsyncClient(follow_redirects=False,
                                         headers={"User-Agent": f"tidings/{__version__}"})

    async def __call__(self, url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
        async with self._client.stream("POST", url, content=body, headers=headers,
                                       timeout=timeout_s) as answer:
            read = 0
            async for chunk in answer.aiter_raw():  # keep the connection reusable
                read += len(chunk)
                if read > MAX_ANSWER_BYTES:
                    break
            return answer.status_code

    async def aclose(self) -> None:
        await self._client.aclose()


@attrs.frozen
class SenderStatistics:
    leader: bool
    sent: int            # events a receiver accepted (2xx)
    failed: int          # failed attempts
    dead: int            # events dropped after max_attempts
    outbox: int          # events waiting in the outbox (as last read; cluster-wide)
    window: int          # events held in memory


def _where(url: str) -> str:
    """The receiver as logged: scheme://host:port (a path may hold a token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


class WebhookSender:
    """See the module docstring.  ``configure`` takes a reloaded section and secret."""

    def __init__(self, store: Store, config: WebhooksConfig, secret: bytes, *, owner: str,
                 ttl_s: float, post: Post | None = None,
                 now_ms: Callable[[], int] = wall_ms,
                 unix_time: Callable[[], float] = time.time) -> None:
        self.store = store
        self.config = config
        self.secret = secret
        self.owner = owner
        self.ttl_s = ttl_s
        self._post = post
        self._now_ms = now_ms
        self._unix_time = unix_time
        self.presence_types = tuple(t for t in ("online", "offline") if t in config.events)
        self.settles_undelivered = "undelivered" in config.events
        self._wake = trio.Event()
        self._requests = trio.CapacityLimiter(MAX_REQUESTS)
        self._queues: dict[str, collections.deque[OutboxEntry]] = {}
        self._busy: set[str] = set()
        self._after: str | None = None
        self._held = 0
        self._leader = False
        self._maintain_at = -math.inf  # next undelivered settle, reap and depth read
        self._depth = 0
        self._n = dict(sent=0, failed=0, dead=0)
        self._errors = log.LogOnce(interval=60.0)
        self._dead_log = log.LogOnce(interval=1.0)

    # -- control ----------------------------------------------------------------------

    def configure(self, config: WebhooksConfig, secret: bytes) -> None:
        """A reload: the next attempt uses the new url, secret, timeout, max_attempts."""
        self.config = attrs.evolve(config, events=self.config.events,
                                   undelivered_after_s=self.config.undelivered_after_s)
        self.secret = secret

    def wake(self) -> None:
        """Events may have been added: look at the outbox now (never blocks)."""
        self._wake.set()

    def statistics(self) -> SenderStatistics:
        return SenderStatistics(leader=self._leader, outbox=self._depth, window=self._held,
                                **self._n)

    # -- the task ---------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Send until cancelled (see the module docstring).  Never raises a store or
        HTTP error."""
        poster = None
        if self._post is None:
            poster = HttpPoster()
            self._post = poster
        try:
            task_status.started()
            while True:
                if await self._lease():
                    async with trio.open_nursery() as nursery:
                        await self._lead(nursery)  # returns when the lease is lost
                        nursery.cancel_scope.cancel()
                    self._reset()
                await self._refresh_depth()
                await self._sleep(min(POLL_S, self.ttl_s / 3))
        finally:
            self._leader = False
            if poster is not None:
                with trio.CancelScope(shield=True):
                    await poster.aclose()

    async def _lease(self) -> bool:
        try:
            self._leader = await self.store.outbox_lease(self.owner, int(self.ttl_s * 1000))
        except StoreError as exc:
            self._store_failed("outbox_lease", exc)
            self._leader = False
        return self._leader

    async def _lead(self, nursery: trio.Nursery) -> None:
        """Hold the lease and send; return when it is lost or the store fails."""
        period = min(POLL_S, self.ttl_s / 3)
        renew_at = trio.current_time() + period
        while True:
            if trio.current_time() >= renew_at:
                if not await self._lease():
                    return
                renew_at = trio.current_time() + period
            try:
                if trio.current_time() >= self._maintain_at:  # at most once a period
                    self._maintain_at = trio.current_time() + period
                    if self.settles_undelivered:
                        await self._settle_undelivered()
                    if self.presence_types:
                        await self.store.presence_reap(self._now_ms(), self.presence_types)
                    self._depth = await self.store.outbox_depth()
                await self._refill()
            except StoreError as exc:
                self._store_failed("outbox", exc)
                return
            for user, queue in self._queues.items():
                if user not in self._busy and queue[0].due_ms <= self._now_ms():
                    self._busy.add(user)
                    nursery.start_soon(self._send_user, user)
            wait = min(renew_at, self._maintain_at) - trio.current_time()
            await self._sleep(min(wait, self._next_due_s()))

    async def _sleep(self, seconds: float) -> None:
        with trio.move_on_after(max(seconds, 0.0)):
            await self._wake.wait()
        self._wake = trio.Event()

    def _next_due_s(self) -> float:
        now = self._now_ms()
        due = min((q[0].due_ms for u, q in self._queues.items() if u not in self._busy),
                  default=math.inf)
        return max(0.0, (due - now) / 1000)

    def _reset(self) -> None:
        self._queues.clear()
        self._busy.clear()
        self._after = None
        self._held = 0

    async def _refresh_depth(self) -> None:
        try:
            self._depth = await self.store.outbox_depth()
        except StoreError as exc:
            self._store_failed("outbox_depth", exc)

    def _store_failed(self, what: str, exc: StoreError) -> None:
        self._errors.log("error", "webhook_store_failed", key=what, what=what, error=str(exc))

    # -- filling the window -----------------------------------------------------------

    async def _settle_undelivered(self) -> None:
        while True:
            due = await self.store.undelivered_due(self._now_ms(), CHECK_BATCH)
            if not due:
                return
            acked = await self.store.acked_by_any_device([(c.user, c.seq) for c in due])
            events = [None if done else WebhookEvent(new_event_id(), "undelivered", c.due_ms, c.user,
                                                     c.msg_id, c.sender, c.seq)
                      for c, done in zip(due, acked, strict=True)]
            await self.store.undelivered_settle(due, events)
            if len(due) < CHECK_BATCH:
                return

    async def _refill(self) -> None:
        while self._held < WINDOW:
            entries = await self.store.outbox_read(self._after, min(READ_CHUNK, WINDOW - self._held))
            for entry in entries:
                self._queues.setdefault(entry.event.user, collections.deque()).append(entry)
                self._after = entry.pos
            self._held += len(entries)
            if len(entries) < READ_CHUNK:
                return

    # -- sending ----------------------------------------------------------------------

    async def _send_user(self, user: str) -> None:
        """Send ``user``'s due events in order; stop at a failure (its retry is due later)."""
        queue = self._queues[user]
        try:
            while queue and queue[0].due_ms <= self._now_ms():
                entry = queue[0]
                error = await self._attempt(entry)
                if error is None:
                    self._n["sent"] += 1
                    await self._done(queue)
                    continue
                self._n["failed"] += 1
                attempts = entry.attempts + 1
                if attempts >= self.config.max_attempts:
                    self._n["dead"] += 1
                    e = entry.event
                    self._dead_log.log("warning", "webhook_dead", key="dead", id=e.id, type=e.type,
                                       user=e.user, attempts=attempts, error=error)
                    await self._done(queue)
                    continue
                due = self._now_ms() + int(retry_delay_s(attempts) * 1000)
                queue[0] = entry._replace(attempts=attempts, due_ms=due)
                await self.store.outbox_retry(entry.pos, attempts, due)
                return
        except StoreError as exc:
            self._store_failed("outbox", exc)
            if queue:  # sent or not, it is tried again after a while (at least once)
                queue[0] = queue[0]._replace(due_ms=self._now_ms() + int(POLL_S * 1000))
        finally:
            self._busy.discard(user)
            if not queue:
                self._queues.pop(user, None)
            self.wake()

    async def _done(self, queue: collections.deque[OutboxEntry]) -> None:
        await self.store.outbox_done([queue[0].pos])
        queue.popleft()
        self._held -= 1

    async def _attempt(self, entry: OutboxEntry) -> str | None:
        """POST one event; None on a 2xx answer, else why it failed."""
        config, secret = self.config, self.secret
        body = event_body(entry.event)
        headers = {"Content-Type": "application/json",
                   SIGNATURE_HEADER: sign(secret, body, int(self._unix_time()))}
        assert self._post is not None
        async with self._requests:
            with trio.move_on_after(config.timeout_s) as scope:
                try:
                    status = await self._post(config.url, body, headers, config.timeout_s)
                except (httpx.HTTPError, OSError) as exc:
                    error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                    return self._failed(config.url, error)
        if scope.cancelled_caught:
            return self._failed(config.url, f"no answer within {config.timeout_s} s")
        if 200 <= status < 300:
            return None
        return self._failed(config.url, f"status {status}")

    def _failed(self, url: str, error: str) -> str:
        self._errors.log("warning", "webhook_failed", key=error, url=_where(url), error=error)
        return error
