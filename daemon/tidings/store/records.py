"""What every store engine takes and returns: records and errors.  Sans-IO.

Semantics shared by every engine (memory, sqlite, redis)
--------------------------------------------------------
A store keeps, per user, an *inbox*: the messages addressed to that user, each
numbered with a per-recipient sequence number ``seq`` (1, 2, 3, ...).  Seqs are
assigned by the store at append time, strictly increasing without gaps, and never
reused: the highest seq ever assigned (``last_seq``) is kept per user even after the
messages themselves are pruned.

Only a *prefix* of an inbox ever goes away, so the visible seqs of a user are always
the contiguous range ``first_seq .. last_seq``.  Two rules remove that prefix:

* ``max_inbox`` (a setting of the engine): at most the newest ``max_inbox`` messages of
  an inbox are visible, from the moment an append pushes an older one out (every
  engine, every read: inbox, state, history).  Engines may delete the rows later.
* retention: ``prune(now_ms, retention_days)`` removes every message up to the newest
  one older than the retention.

The router uses the contiguous range for resume: a client asking for everything after
``since`` gets a complete replay iff ``since + 1 >= first_seq``.

Every message is also visible to its sender through ``history`` (both directions of a
conversation, paged by ``msg_id``, which the hub makes lexicographically increasing
with time) and ``search``.  A user only ever sees messages they sent or received.

Devices
-------
A user reads their inbox from one or more *devices* (``DEFAULT_DEVICE`` unless a
connection names one).  Each device ``(user, device)`` has its own ack ``cursor`` and its
``delivered`` mark (the highest seq written to one of its connections).  Saving either
(:class:`Progress`) registers the device; both only move forward and are capped at the
user's ``last_seq``: ``new = max(old, min(seq, last_seq))``, with ``old = 0`` for a
device seen for the first time.  ``inbox_state(user, device)`` says whether the device is
new (never saved), so the caller can pick its first cursor.

Idempotency keys
----------------
A :class:`NewMessage` may carry a ``key`` (chosen by the client).  Its scope is
``(sender, recipient, key)``: a second message with the same triple whose ``ts`` is less
than ``StoreLimits.key_window_ms`` after the first one's is not stored: the append answers
the first one's :class:`Original` instead (``Appended.original``), atomically with the
append.  Past the window the key is free again (the new message is stored and remembered
in its place; ``prune`` forgets expired keys).  ``claim_key`` does the same for messages
that are not stored (room messages; the recipient is then the room's key).  The delivered
count of the first answer is saved later with the hub's progress (``Progress.answers``).

Errors say what happened, never how the engine spells it: every failure an engine
raises on purpose is a :class:`StoreError`.

Webhooks (:mod:`tidings.webhooks`) keep three more things in the store, only while
they are on: the *outbox* of events waiting to be POSTed (:class:`WebhookEvent`, read
back as :class:`OutboxEntry`), the *undelivered checks* of stored messages
(:class:`UndeliveredCheck`), and which node has which user online (for ``online`` /
``offline`` counted once cluster-wide).  :mod:`tidings.store.base` has the contract.
"""

from __future__ import annotations

import secrets
from typing import NamedTuple

import attrs

from tidings.wire.protocol import DEFAULT_DEVICE

__all__ = [
    "DEFAULT_DEVICE", "MS_PER_DAY", "Appended", "BadQuery", "DeviceState", "DuplicateMessage",
    "InboxState", "NewMessage", "Original", "OutboxEntry", "Progress", "StoreError",
    "StoreUnavailable", "StoredMessage", "UndeliveredCheck", "UnknownMessage", "Unsupported",
    "WebhookEvent", "check_page", "key_is_live", "new_event_id",
    "prune_cutoff_ms",
]

MS_PER_DAY = 86_400_000


# --------------------------------------------------------------------- errors

class StoreError(Exception):
    """Base class of every error a store raises on purpose."""


class StoreUnavailable(StoreError):
    """The store cannot be opened, read or written (path, permissions, disk full,
    Redis down, schema too new, closed store).  The message names the place and the
    reason.  Our fault or the environment's, never the client's."""


class DuplicateMessage(StoreError):
    """An append got a ``msg_id`` that is already stored (that message was not stored)."""


class UnknownMessage(StoreError):
    """``history`` got a ``before_msg_id`` that is not in that conversation."""


class Unsupported(StoreError):
    """The operation is not available with this engine (search on Redis)."""


class BadQuery(StoreError):
    """A search query is malformed; ``str(exc)`` is a short reason for the client."""


# -------------------------------------------------------------------- records

class NewMessage(NamedTuple):
    """What the hub asks to store. ``body`` is the orjson-encoded JSON body, stored and
    returned verbatim; ``ts`` is epoch milliseconds.

    Messages are named tuples: cheap to build, and an engine that keeps many of them
    (memory) can keep them as plain tuples, which the cyclic garbage collector stops
    tracking, so they add nothing to the pause of a full collection (measured: ~49 ms
    per million tracked objects)."""
    msg_id: str
    sender: str
    recipient: str
    body: bytes
    ts: int
    key: str | None = None  # the sender's idempotency key (see the module docstring)


class Original(NamedTuple):
    """What an idempotency key remembers of the first message sent with it: its
    ``msg_id``, its ``seq`` (None for a room message) and the ``delivered`` count of the
    first answer (0 until the hub saved it)."""
    msg_id: str
    seq: int | None
    delivered: int


class DeviceState(NamedTuple):
    """A device's ack ``cursor`` and ``delivered`` mark (see the module docstring)."""
    cursor: int
    delivered: int


class StoredMessage(NamedTuple):
    """A message as stored: ``seq`` is its place in the recipient's inbox."""
    msg_id: str
    seq: int
    sender: str
    recipient: str
    body: bytes
    ts: int


@attrs.frozen
class InboxState:
    """``first_seq``: lowest visible seq (``last_seq + 1`` if the inbox is empty);
    ``last_seq``: highest seq ever assigned (0 if never); ``cursor``: the device's acked
    seq (0 for a new device); ``new_device``: the device was never saved."""
    first_seq: int
    last_seq: int
    cursor: int
    new_device: bool = False

    def unread(self, cursor: int | None = None) -> int:
        """Visible messages after ``cursor`` (default: the device's)."""
        after = self.cursor if cursor is None else cursor
        return max(0, self.last_seq - max(after, self.first_seq - 1))


@attrs.define
class Progress:
    """What the hub saves in one go, coalesced per key since its last save:
    ``cursors`` and ``delivered`` per ``(user, device)`` (registering the device),
    ``last_seen`` per user, and ``answers``: the delivered count of the first answer
    to a keyed send, per ``(sender, recipient, key)`` (ignored for an unknown key)."""
    cursors: dict[tuple[str, str], int] = attrs.Factory(dict)
    delivered: dict[tuple[str, str], int] = attrs.Factory(dict)
    last_seen: dict[str, int] = attrs.Factory(dict)
    answers: dict[tuple[str, str, str], int] = attrs.Factory(dict)

    def __bool__(self) -> bool:
        return bool(self.cursors or self.delivered or self.last_seen or self.answers)


@attrs.frozen
class Appended:
    """The outcome of one message of an append: its inbox ``seq``, or ``error``, or
    ``original``: its key was already used (nothing was stored; ``seq`` is the
    original's).

    ``receivers``: None when the engine does not publish (the hub routes the message to
    local connections itself); else the number of cluster nodes the engine's atomic
    publish reached (the message comes back to this node through the cluster)."""
    seq: int | None
    error: StoreError | None = None
    receivers: int | None = None
    original: Original | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def duplicate(self) -> bool:
        return self.original is not None


class WebhookEvent(NamedTuple):
    """One webhook event.  ``id`` is unique (receivers de-duplicate by it; every retry
    carries the same one); ``type`` is "undelivered", "online" or "offline"; ``ts`` the
    epoch milliseconds it happened; ``user`` whom it is about (for ``undelivered``: the
    recipient, with the message's ``msg_id``, ``sender`` and inbox ``seq``)."""
    id: str
    type: str
    ts: int
    user: str
    msg_id: str | None = None
    sender: str | None = None
    seq: int | None = None


class OutboxEntry(NamedTuple):
    """An outbox event as read back: ``pos`` is its place in the outbox (increasing in
    the order events were added; an opaque string the engine gives back to itself),
    ``attempts`` the failed attempts so far and ``due_ms`` when it may be tried again
    (0: at once)."""
    pos: str
    event: WebhookEvent
    attempts: int = 0
    due_ms: int = 0


class UndeliveredCheck(NamedTuple):
    """A stored message to report ``undelivered`` unless a device of its recipient
    ``user`` acked ``seq`` by ``due_ms`` (epoch ms)."""
    due_ms: int
    user: str
    seq: int
    msg_id: str
    sender: str


def new_event_id() -> str:
    """A fresh webhook event id: 24 random hex digits."""
    return secrets.token_hex(12)


def check_page(limit: int, offset: int = 0) -> None:
    """Raise ValueError for a negative page size or offset (a bug of the caller)."""
    if limit < 0 or offset < 0:
        raise ValueError("limit and offset must be >= 0")


def key_is_live(first_ts: int, ts: int, window_ms: int) -> bool:
    """A key first used at ``first_ts`` still names that message at ``ts``."""
    return ts - first_ts < window_ms


def prune_cutoff_ms(now_ms: int, retention_days: float | None) -> int | None:
    """Messages with ``ts`` below the returned value are expired (None: keep all)."""
    if not retention_days:
        return None
    return now_ms - int(retention_days * MS_PER_DAY)
