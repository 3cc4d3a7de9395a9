"""The memory engine: dicts and lists, nothing survives ``aclose``.  Sans-IO.

Same contract as every engine (:mod:`tidings.store.base`); used by tests and by
``store.backend = "memory"``.  Every method runs to completion without awaiting
anything, so each call is atomic with respect to other trio tasks and no lock is
needed.  ``max_inbox`` is applied at append time: the oldest messages of an inbox are
deleted as soon as an append pushes them out.

Idempotency keys live in one dict in insertion order, which is ``ts`` order when ``ts``
never decreases (the hub's clock): ``prune`` forgets expired keys from its front; a key
stored again moves to its end.

Webhooks: the outbox, the presence sets and the undelivered checks are plain dicts in
this process, so they are lost with it (``store.backend = "memory"`` promises no
durability); the lease is always this process's.

Search is a linear scan over the messages the user sent or received: all phrases must
occur (case-insensitive, tokens split on non-alphanumerics); ranked by total phrase hits,
then newest (highest msg_id) first.  SQLite ranks by bm25; the set of matches is the
same for plain ASCII text.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Sequence
from typing import Any

import attrs

from tidings.store.records import (
    DEFAULT_DEVICE, Appended, DeviceState, DuplicateMessage, InboxState, NewMessage, Original,
    OutboxEntry, Progress, StoredMessage, StoreUnavailable, UndeliveredCheck, UnknownMessage,
    WebhookEvent, check_page, key_is_live, new_event_id, prune_cutoff_ms,
)
from tidings.store.search import indexed_text, parse_query, phrase_hits, tokenize

__all__ = ["MemoryStore"]


#: A stored message as kept here: ``tuple(StoredMessage)``.  Plain tuples of str, bytes
#: and int are untracked by the cyclic GC, so stored messages never lengthen a collection
#: (a named tuple stays tracked).  Field 1 is the seq.
_Row = tuple
_SEQ = 1
_stored = StoredMessage._make


def _seq_of(row: _Row) -> int:
    return row[_SEQ]


@attrs.define
class _User:
    last_seq: int = 0
    last_seen: int | None = None
    inbox: list[_Row] = attrs.Factory(list)  # ascending, contiguous seqs
    devices: dict[str, list[int]] = attrs.Factory(dict)  # device -> [cursor, delivered]


#: (sender, recipient or room key, key) -> [msg_id, seq, ts, delivered]
_KeyId = tuple[str, str, str]


class MemoryStore:
    """The in-memory engine.  ``limits`` is a :class:`tidings.store.base.StoreLimits`
    (None: keep everything, forever)."""

    name = "memory"

    def __init__(self, limits: Any = None) -> None:
        self._max_inbox: int | None = limits.max_inbox if limits is not None else None
        self._window_ms: int = limits.key_window_ms if limits is not None else 86_400_000
        self._limits = limits
        self._keys: dict[_KeyId, list[Any]] = {}
        self._users: dict[str, _User] = {}
        self._by_id: dict[str, _Row] = {}
        # (sorted pair of users) -> msg_ids ascending
        self._convs: dict[tuple[str, str], list[str]] = {}
        self._closed = False
        # webhooks: pos -> [event, attempts, due_ms] (insertion order = pos order)
        self._outbox: dict[int, list[Any]] = {}
        self._outbox_pos = 0
        self._nodes: dict[str, int] = {}            # node -> expires_ms
        self._node_users: dict[str, set[str]] = {}  # node -> users online there
        self._online: dict[str, int] = {}           # user -> nodes it is online on
        self._checks: dict[str, UndeliveredCheck] = {}  # msg_id -> check

    # -- maintenance -------------------------------------------------------------------

    async def run(self, *, task_status: Any = None) -> None:
        """Prune by retention every ``prune_interval_s`` until cancelled."""
        import trio  # the engine's only trio use: its maintenance loop (store.maintenance)

        from tidings.store.maintenance import prune_periodically

        if task_status is not None:
            task_status.started()
        if self._limits is None:
            await trio.sleep_forever()
        await prune_periodically(self, self._limits)

    async def aclose(self) -> None:
        self._closed = True

    # -- writes --------------------------------------------------------------------------

    async def append(self, msgs: Sequence[NewMessage]) -> list[Appended]:
        """Store each message; a live key answers its original, then a duplicate msg_id
        is refused alone.  Never raises: on a closed store every message gets
        StoreUnavailable."""
        if self._closed:
            error = StoreUnavailable("memory store is closed")
            return [Appended(None, error) for _ in msgs]
        out = []
        for m in msgs:
            if m.key is not None and self._window_ms:  # the key first, then the msg_id
                kid = (m.sender, m.recipient, m.key)
                original = self._live_key(kid, m.ts)
                if original is not None:
                    out.append(Appended(original.seq, original=original))
                    continue
            if m.msg_id in self._by_id:
                out.append(Appended(None, DuplicateMessage(f"duplicate msg_id {m.msg_id!r}")))
                continue
            seq = self._append_one(m)
            if m.key is not None and self._window_ms:
                self._keys[(m.sender, m.recipient, m.key)] = [m.msg_id, seq, m.ts, 0]
            out.append(Appended(seq))
        return out

    def _live_key(self, kid: _KeyId, ts: int) -> Original | None:
        """The original a key names at ``ts``; an expired key is forgotten."""
        record = self._keys.get(kid)
        if record is None:
            return None
        if key_is_live(record[2], ts, self._window_ms):
            return Original(record[0], record[1], record[3])
        del self._keys[kid]  # stored again below: at the end of the dict (ts order)
        return None

    async def claim_key(self, sender: str, target: str, key: str, msg_id: str,
                        ts: int) -> Original | None:
        self._check_open()
        if not self._window_ms:
            return None
        kid = (sender, target, key)
        original = self._live_key(kid, ts)
        if original is None:
            self._keys[kid] = [msg_id, None, ts, 0]
        return original

    def _append_one(self, m: NewMessage) -> int:
        user = self._user(m.recipient)
        user.last_seq += 1
        stored = (m.msg_id, user.last_seq, m.sender, m.recipient, m.body, m.ts)
        user.inbox.append(stored)
        self._by_id[m.msg_id] = stored
        ids = self._convs.setdefault(self._conv(m.sender, m.recipient), [])
        if ids and ids[-1] > m.msg_id:
            bisect.insort(ids, m.msg_id)
        else:
            ids.append(m.msg_id)  # msg_ids grow with time: the usual case
        if self._max_inbox is not None and len(user.inbox) > self._max_inbox:
            self._drop_prefix(user, len(user.inbox) - self._max_inbox)
        return user.last_seq

    async def save_progress(self, progress: Progress) -> None:
        self._check_open()
        for marks, field in ((progress.cursors, 0), (progress.delivered, 1)):
            for (name, device), seq in marks.items():
                u = self._user(name)
                state = u.devices.get(device)
                if state is None:
                    state = u.devices[device] = [0, 0]
                state[field] = max(state[field], min(seq, u.last_seq))
        for name, ts in progress.last_seen.items():
            self._user(name).last_seen = ts
        for kid, delivered in progress.answers.items():
            record = self._keys.get(kid)
            if record is not None:
                record[3] = delivered

    # -- reads ---------------------------------------------------------------------------

    async def read_inbox(self, user: str, after_seq: int, limit: int) -> list[StoredMessage]:
        """Up to ``limit`` messages of ``user``'s inbox with seq > after_seq, ascending."""
        check_page(limit)
        self._check_open()
        u = self._users.get(user)
        if u is None:
            return []
        i = bisect.bisect_right(u.inbox, after_seq, key=_seq_of)
        return [_stored(row) for row in u.inbox[i:i + limit]]

    async def inbox_state(self, user: str, device: str = DEFAULT_DEVICE) -> InboxState:
        self._check_open()
        u = self._users.get(user) or _User()
        first = u.inbox[0][_SEQ] if u.inbox else u.last_seq + 1
        state = u.devices.get(device)
        if state is None:
            return InboxState(first, u.last_seq, 0, new_device=True)
        return InboxState(first, u.last_seq, state[0])

    async def devices(self, user: str) -> dict[str, DeviceState]:
        self._check_open()
        u = self._users.get(user)
        if u is None:
            return {}
        return {name: DeviceState(*state) for name, state in u.devices.items()}

    async def message(self, msg_id: str) -> StoredMessage | None:
        self._check_open()
        row = self._by_id.get(msg_id)
        return None if row is None else _stored(row)

    async def history(self, user: str, peer: str, before_msg_id: str | None,
                      limit: int) -> tuple[list[StoredMessage], bool]:
        """Messages between user and peer, newest first, msg_id < before_msg_id;
        plus whether older ones exist. Unknown before_msg_id -> UnknownMessage."""
        check_page(limit)
        self._check_open()
        ids = self._convs.get(self._conv(user, peer), [])
        if before_msg_id is None:
            end = len(ids)
        else:
            end = bisect.bisect_left(ids, before_msg_id)
            if end == len(ids) or ids[end] != before_msg_id:
                raise UnknownMessage(f"unknown message {before_msg_id!r}")
        start = max(0, end - limit)
        page = [_stored(self._by_id[i]) for i in reversed(ids[start:end])]
        return page, start > 0

    async def search(self, user: str, query: str, limit: int,
                     offset: int = 0) -> tuple[list[StoredMessage], bool]:
        """Messages user sent or received matching all phrases of ``query``, best
        first; plus whether more results follow."""
        phrases = parse_query(query)
        check_page(limit, offset)
        self._check_open()
        scored = []
        for row in self._by_id.values():
            m = _stored(row)
            if user not in (m.sender, m.recipient):
                continue
            tokens = tokenize(indexed_text(m.body))
            hits = [phrase_hits(tokens, p) for p in phrases]
            if all(hits):
                scored.append((-sum(hits), m.msg_id, m))
        scored.sort(key=lambda t: t[1], reverse=True)  # newest first...
        scored.sort(key=lambda t: t[0])                # ...within equal hits (stable)
        page = [t[2] for t in scored[offset:offset + limit]]
        return page, len(scored) > offset + limit

    async def last_seen(self, users: Sequence[str]) -> dict[str, int | None]:
        self._check_open()
        return {u: (self._users[u].last_seen if u in self._users else None) for u in users}

    # -- retention -----------------------------------------------------------------------

    async def prune(self, now_ms: int, retention_days: float | None) -> int:
        """Delete, per recipient, every message up to the newest one older than the
        retention (ts < now - retention); returns the count deleted."""
        self._check_open()
        self._forget_keys(now_ms)
        cutoff = prune_cutoff_ms(now_ms, retention_days)
        if cutoff is None:
            return 0
        deleted = 0
        for u in self._users.values():
            cut = max((_stored(r).seq for r in u.inbox if _stored(r).ts < cutoff), default=0)
            n = bisect.bisect_right(u.inbox, cut, key=_seq_of)
            deleted += self._drop_prefix(u, n)
        return deleted

    def _forget_keys(self, now_ms: int) -> None:
        """Forget the keys expired at ``now_ms`` from the front of the dict (ts order)."""
        keys = self._keys
        while keys:
            kid = next(iter(keys))
            if key_is_live(keys[kid][2], now_ms, self._window_ms):
                return
            del keys[kid]

    # -- webhooks: the outbox --------------------------------------------------------------

    async def outbox_add(self, events: Sequence[WebhookEvent]) -> None:
        self._check_open()
        for event in events:
            self._outbox_pos += 1
            self._outbox[self._outbox_pos] = [event, 0, 0]

    async def outbox_read(self, after: str | None, limit: int) -> list[OutboxEntry]:
        check_page(limit)
        self._check_open()
        start = int(after) if after is not None else 0
        out: list[OutboxEntry] = []
        for pos, (event, attempts, due) in self._outbox.items():  # ascending pos
            if len(out) >= limit:
                break
            if pos > start:
                out.append(OutboxEntry(str(pos), event, attempts, due))
        return out

    async def outbox_retry(self, pos: str, attempts: int, due_ms: int) -> None:
        self._check_open()
        entry = self._outbox.get(int(pos))
        if entry is not None:
            entry[1], entry[2] = attempts, due_ms

    async def outbox_done(self, positions: Sequence[str]) -> None:
        self._check_open()
        for pos in positions:
            self._outbox.pop(int(pos), None)

    async def outbox_depth(self) -> int:
        self._check_open()
        return len(self._outbox)

    async def outbox_lease(self, owner: str, ttl_ms: int) -> bool:
        self._check_open()
        return True

    # -- webhooks: presence ----------------------------------------------------------------

    async def presence_set(self, node: str, online: Sequence[str], offline: Sequence[str], *,
                           full: bool, now_ms: int, expires_ms: int,
                           types: Collection[str]) -> bool:
        self._check_open()
        known = self._nodes.get(node, -1) >= now_ms
        self._nodes[node] = expires_ms
        users = self._node_users.setdefault(node, set())
        gone = (users - set(online)) if full else set(offline)
        events: list[WebhookEvent] = []
        for user in online:
            if user not in users:
                users.add(user)
                self._count(user, +1, now_ms, types, events)
        for user in sorted(gone):
            if user in users:
                users.discard(user)
                self._count(user, -1, now_ms, types, events)
        await self.outbox_add(events)
        return known

    async def presence_reap(self, now_ms: int, types: Collection[str],
                            node: str | None = None) -> int:
        self._check_open()
        events: list[WebhookEvent] = []
        offline = 0
        for name in [n for n, t in self._nodes.items() if t < now_ms or n == node]:
            del self._nodes[name]
            for user in sorted(self._node_users.pop(name, set())):
                offline += self._count(user, -1, now_ms, types, events) == "offline"
        await self.outbox_add(events)
        return offline

    def _count(self, user: str, delta: int, now_ms: int, types: Collection[str],
               events: list[WebhookEvent]) -> str:
        """Move ``user``'s node count by ``delta``; on 0 -> 1 return "online", on 1 -> 0
        "offline" (and add the event when its type is in ``types``), else ""."""
        before = self._online.get(user, 0)
        after = max(before + delta, 0)
        if after:
            self._online[user] = after
        else:
            self._online.pop(user, None)
        kind = "online" if before == 0 < after else "offline" if after == 0 < before else ""
        if kind and kind in types:
            events.append(WebhookEvent(new_event_id(), kind, now_ms, user))
        return kind

    # -- webhooks: undelivered checks ------------------------------------------------------

    async def undelivered_watch(self, checks: Sequence[UndeliveredCheck]) -> None:
        self._check_open()
        for check in checks:
            self._checks[check.msg_id] = check

    async def undelivered_due(self, now_ms: int, limit: int) -> list[UndeliveredCheck]:
        check_page(limit)
        self._check_open()
        due = sorted(c for c in self._checks.values() if c.due_ms <= now_ms)
        return due[:limit]

    async def acked_by_any_device(self, pairs: Sequence[tuple[str, int]]) -> list[bool]:
        self._check_open()
        return [any(cursor >= seq for cursor, _ in self._users[user].devices.values())
                if user in self._users else False for user, seq in pairs]

    async def undelivered_settle(self, checks: Sequence[UndeliveredCheck],
                                 events: Sequence[WebhookEvent | None]) -> int:
        self._check_open()
        added = [event for check, event in zip(checks, events, strict=True)
                 if self._checks.pop(check.msg_id, None) is not None and event is not None]
        await self.outbox_add(added)
        return len(added)

    # -- internals -----------------------------------------------------------------------

    def _drop_prefix(self, u: _User, n: int) -> int:
        for m in map(_stored, u.inbox[:n]):
            del self._by_id[m.msg_id]
            key = self._conv(m.sender, m.recipient)
            ids = self._convs[key]
            del ids[bisect.bisect_left(ids, m.msg_id)]
            if not ids:
                del self._convs[key]
        del u.inbox[:n]
        return n

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
