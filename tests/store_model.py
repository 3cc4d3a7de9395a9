"""The store contract as a small pure-Python model, and a differential runner.

Not a test module.  :class:`StoreModel` is the specification of
:mod:`tidings.store.records` and :mod:`tidings.store.base` written as plainly as
possible (lists and dicts, no indexes, no engine code); ``OPS`` generates lists of
operations and :func:`check_against_model` runs one list against an engine, comparing
every answer with the model's, and every inbox after every operation.

What the generated operations stay away from, because the contract leaves it open or
an engine documents a difference:

* a ``msg_id`` stored twice for different recipients (redis checks per recipient);
  duplicates here are of a *visible* message, to its own recipient, first in their
  batch, or a message repeated right after itself (not with ``max_inbox`` 0: whether a
  message hidden the moment it was stored is "already stored" is not specified);
* ``ts`` decreasing along an inbox (redis prunes by retention the longest expired
  prefix, the others up to the newest expired message; one clock makes them agree);
* search ranking (bm25 vs hit count): only the set of matches and page sizes count.

Devices and idempotency keys are part of every operation list: progress saves name
devices of every user (known or not), sends carry keys from a small set (so they repeat,
within the window and past it), and room-like targets claim keys without a message.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import attrs
import orjson
from hypothesis import event, strategies as st

from tidings.store import (
    BadQuery, DeviceState, DuplicateMessage, InboxState, NewMessage, Original, Progress, Store,
    StoredMessage, StoreLimits, UnknownMessage, Unsupported,
)
from tidings.store.records import MS_PER_DAY, prune_cutoff_ms
from tidings.store.search import indexed_text, parse_query, phrase_hits, tokenize

__all__ = ["KEY_WINDOW", "OPS", "StoreModel", "check_against_model"]

# "a\x1fb"+"c" and "a"+"b\x1fc" are the same pair once joined by U+001F; the last one
# has the characters the redis hash tag escapes, and some that are not ASCII.
USERS = ("a", "c", "a\x1fb", "b\x1fc", "ü{%7D}😀")
WORDS = ("pizza", "Hot", "dog", "café", "x1")
DEVICES = ("default", "phone", "a.b_c-9")
KEYS = (None, None, "k1", "k2", "ü😀 k")
TARGETS = ("\x1froom\x1flobby", "a")  # claim_key: a room's key, or a user's


@attrs.define
class _Inbox:
    last_seq: int = 0
    messages: list[StoredMessage] = attrs.Factory(list)  # visible, ascending seq
    devices: dict[str, list[int]] = attrs.Factory(dict)  # device -> [cursor, delivered]


class StoreModel:
    """What every engine must answer, given ``max_inbox`` and ``key_window_ms``."""

    def __init__(self, max_inbox: int | None, key_window_ms: int = 86_400_000) -> None:
        self.max_inbox = max_inbox
        self.window = key_window_ms
        self.inboxes: dict[str, _Inbox] = {}
        self.seen: dict[str, int] = {}
        self.keys: dict[tuple[str, str, str], list[Any]] = {}  # -> [msg_id, seq, ts, delivered]
        self.hidden_unpruned = 0  # pushed out by max_inbox since the last prune

    def _inbox(self, user: str) -> _Inbox:
        return self.inboxes.setdefault(user, _Inbox())

    def visible(self) -> list[StoredMessage]:
        return [m for box in self.inboxes.values() for m in box.messages]

    def _live_key(self, kid: tuple[str, str, str], ts: int) -> Original | None:
        record = self.keys.get(kid)
        if not self.window or record is None or ts - record[2] >= self.window:
            return None
        return Original(record[0], record[1], record[3])

    def append(self, msgs: Sequence[NewMessage]) -> list[tuple[Any, ...]]:
        """Per message ``(seq, error type, original)``."""
        out: list[tuple[Any, ...]] = []
        for m in msgs:
            kid = (m.sender, m.recipient, m.key)
            original = None if m.key is None else self._live_key(kid, m.ts)
            if original is not None:  # a live key first, then a duplicate msg_id
                out.append((original.seq, None, original))
                continue
            if m.msg_id in {v.msg_id for v in self.visible()}:
                out.append((None, DuplicateMessage, None))
                continue
            box = self._inbox(m.recipient)
            box.last_seq += 1
            box.messages.append(StoredMessage(m.msg_id, box.last_seq, m.sender, m.recipient,
                                              m.body, m.ts))
            if self.max_inbox is not None and len(box.messages) > self.max_inbox:
                self.hidden_unpruned += 1
                del box.messages[0]
            if m.key is not None and self.window:
                self.keys[kid] = [m.msg_id, box.last_seq, m.ts, 0]
            out.append((box.last_seq, None, None))
        return out

    def claim_key(self, sender: str, target: str, key: str, msg_id: str,
                  ts: int) -> Original | None:
        original = self._live_key((sender, target, key), ts)
        if original is None and self.window:
            self.keys[(sender, target, key)] = [msg_id, None, ts, 0]
        return original

    def save_progress(self, progress: Progress) -> None:
        for marks, field in ((progress.cursors, 0), (progress.delivered, 1)):
            for (user, device), seq in marks.items():
                box = self._inbox(user)
                state = box.devices.setdefault(device, [0, 0])
                state[field] = max(state[field], min(seq, box.last_seq))
        self.seen.update(progress.last_seen)
        for kid, delivered in progress.answers.items():
            if kid in self.keys:
                self.keys[kid][3] = delivered

    def read_inbox(self, user: str, after_seq: int, limit: int) -> list[StoredMessage]:
        box = self.inboxes.get(user, _Inbox())
        return [m for m in box.messages if m.seq > after_seq][:limit]

    def inbox_state(self, user: str, device: str) -> InboxState:
        box = self.inboxes.get(user, _Inbox())
        first = box.messages[0].seq if box.messages else box.last_seq + 1
        state = box.devices.get(device)
        return InboxState(first, box.last_seq, state[0] if state else 0, new_device=state is None)

    def devices(self, user: str) -> dict[str, DeviceState]:
        box = self.inboxes.get(user, _Inbox())
        return {d: DeviceState(*state) for d, state in box.devices.items()}

    def message(self, msg_id: str) -> StoredMessage | None:
        return next((m for m in self.visible() if m.msg_id == msg_id), None)

    def history(self, user: str, peer: str, before: str | None,
                limit: int) -> tuple[list[StoredMessage], bool]:
        conv = sorted((m for m in self.visible() if sorted((m.sender, m.recipient))
                       == sorted((user, peer))), key=lambda m: m.msg_id, reverse=True)
        if before is not None:
            if before not in [m.msg_id for m in conv]:
                raise UnknownMessage(before)
            conv = [m for m in conv if m.msg_id < before]
        return conv[:limit], len(conv) > limit

    def search(self, user: str, query: str) -> set[str]:
        """Every match (engines rank them their own way)."""
        phrases = parse_query(query)
        return {m.msg_id for m in self.visible() if user in (m.sender, m.recipient)
                and all(phrase_hits(tokenize(indexed_text(m.body)), p) for p in phrases)}

    def last_seen(self, users: Sequence[str]) -> dict[str, int | None]:
        return {u: self.seen.get(u) for u in users}

    def prune(self, now_ms: int, retention_days: float | None) -> int:
        """Visible messages removed (what hides rows also deletes them now)."""
        self.hidden_unpruned = 0
        self.keys = {kid: r for kid, r in self.keys.items() if now_ms - r[2] < self.window}
        cutoff = prune_cutoff_ms(now_ms, retention_days)
        if cutoff is None:
            return 0
        removed = 0
        for box in self.inboxes.values():
            cut = max((i + 1 for i, m in enumerate(box.messages) if m.ts < cutoff), default=0)
            del box.messages[:cut]
            removed += cut
        return removed


# ------------------------------------------------------------------------ operations

user = st.sampled_from(USERS)
recipient = st.sampled_from(USERS[:2]) | user  # fuller inboxes: more for max_inbox to hide
words = st.lists(st.sampled_from(WORDS), max_size=3)
device = st.sampled_from(DEVICES)
# (sender, recipient, words, body is a JSON object, clock step, id prefix, repeat it, key)
item = st.tuples(user, recipient, words, st.booleans(), st.integers(0, 3),
                 st.integers(0, 99), st.booleans(), st.sampled_from(KEYS))
append = st.tuples(st.just("append"), st.lists(item, min_size=1, max_size=6))
marks = st.dictionaries(st.tuples(user, device), st.integers(-2, 30), max_size=3)
OPS = st.lists(st.one_of(
    append, append, append,  # a third of the operations: something to read and prune
    st.tuples(st.just("duplicate"), st.integers(0, 10**6), st.lists(item, max_size=3)),
    st.tuples(st.just("save_progress"), marks, marks,
              st.dictionaries(user, st.integers(0, 10**13), max_size=2),
              st.lists(st.tuples(user, recipient, st.sampled_from(KEYS[2:]), st.integers(0, 9)),
                       max_size=2)),
    st.tuples(st.just("claim_key"), user, st.sampled_from(TARGETS), st.sampled_from(KEYS[2:]),
              st.integers(0, 3)),
    st.tuples(st.just("message"), st.integers(-1, 10**6)),
    st.tuples(st.just("read_inbox"), user, st.integers(-1, 30), st.integers(0, 8)),
    st.tuples(st.just("history"), user, user, st.none() | st.integers(-1, 10**6),
              st.integers(0, 5)),
    st.tuples(st.just("history_walk"), user, user, st.integers(1, 4)),
    st.tuples(st.just("last_seen"), st.lists(user, max_size=3)),
    st.tuples(st.just("prune"), st.integers(0, 40), st.none() | st.integers(0, 30)),
    st.tuples(st.just("search"), user,
              st.lists(st.sampled_from(WORDS + ('"hot dog"', '"', "AND")), max_size=3),
              st.integers(0, 4), st.integers(0, 3)),
), min_size=8, max_size=30)
MAX_INBOX = st.none() | st.integers(0, 4)
#: Idempotency windows (ms of the operations' clock, which steps 0-3 ms per message):
#: none (keys ignored), a few messages long, and the default day.
KEY_WINDOW = st.sampled_from([0, 4, 86_400_000])


async def _answer(call: Any) -> tuple[str, Any]:
    try:
        return "ok", await call
    except Exception as exc:  # noqa: BLE001 - the error's type is the answer
        return "error", type(exc)


def _model_answer(fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except Exception as exc:  # noqa: BLE001
        return "error", type(exc)


class _Run:
    def __init__(self, store: Store, model: StoreModel, *, searchable: bool,
                 prune_deletes_hidden: bool) -> None:
        self.store, self.model = store, model
        self.searchable = searchable
        self.prune_deletes_hidden = prune_deletes_hidden
        self.clock = 1_000_000
        self.counter = itertools.count()
        self.appended: list[str] = []  # every msg_id ever appended

    async def same(self, name: str, *args: Any) -> Any:
        want = _model_answer(getattr(self.model, name), *args)
        if name == "history":
            event(f"history: {want[1].__name__ if want[0] == 'error' else 'a page'}")
        got = await _answer(getattr(self.store, name)(*args))
        assert got == want, (name, args)
        return got[1]

    def fresh(self, items: Sequence[tuple]) -> list[NewMessage]:
        out = []
        for sender, recipient, ws, as_object, step, prefix, repeat, key in items:
            self.clock += step
            text = " ".join(ws)
            body = orjson.dumps({"t": text} if as_object else text)
            # unique, and not in append order: history sorts by msg_id
            m = NewMessage(f"{prefix:02d}.{next(self.counter):05d}", sender, recipient,
                           body, self.clock, key)
            out.append(m)
            if repeat and self.model.max_inbox != 0:
                out.append(m)
            self.appended.append(m.msg_id)
        return out

    async def append(self, msgs: list[NewMessage]) -> None:
        hidden = self.model.hidden_unpruned
        want = self.model.append(msgs)
        if (None, DuplicateMessage, None) in want:
            event("append: a duplicate refused")
        if self.model.hidden_unpruned > hidden:
            event("append: max_inbox hid messages")
        if any(w[2] is not None for w in want):
            event("append: a live key answered its original")
        got = await self.store.append(msgs)
        assert all(a.receivers is None for a in got)
        assert [(a.seq, None if a.ok else type(a.error), a.original) for a in got] == want, msgs

    async def apply(self, op: tuple) -> None:
        kind, *args = op
        if kind == "append":
            await self.append(self.fresh(args[0]))
        elif kind == "duplicate":
            visible = sorted(self.model.visible(), key=lambda m: m.msg_id)
            dup = []
            if visible:
                v = visible[args[0] % len(visible)]
                dup = [NewMessage(v.msg_id, "c", v.recipient, b'"again"', self.clock)]
            await self.append(dup + self.fresh(args[1]))
        elif kind == "save_progress":
            cursors, delivered, seen, answered = args
            answers = {(s, r, k): n for s, r, k, n in answered}
            if any(kid in self.model.keys for kid in answers):
                event("save_progress: an answer recorded")
            await self.same("save_progress", Progress(cursors, delivered, seen, answers))
        elif kind == "claim_key":
            sender, target, key, step = args
            self.clock += step
            msg_id = f"room.{next(self.counter):05d}"
            if await self.same("claim_key", sender, target, key, msg_id, self.clock):
                event("claim_key: a live key")
        elif kind == "message":
            pick = args[0]
            msg_id = ("zz-unknown" if pick < 0 or not self.appended
                      else self.appended[pick % len(self.appended)])
            await self.same("message", msg_id)
        elif kind == "read_inbox":
            await self.same("read_inbox", *args)
        elif kind == "history":
            who, peer, pick, limit = args
            before = (None if pick is None else "zz-unknown" if pick < 0 or not self.appended
                      else self.appended[pick % len(self.appended)])
            await self.same("history", who, peer, before, limit)
        elif kind == "history_walk":
            await self.walk_history(*args)
        elif kind == "last_seen":
            await self.same("last_seen", args[0])
        elif kind == "prune":
            await self.prune(*args)
        elif kind == "search":
            who, ws, limit, offset = args
            await self.search(who, " ".join(ws), limit, offset)
        else:  # pragma: no cover
            raise AssertionError(kind)

    async def walk_history(self, who: str, peer: str, limit: int) -> None:
        before = None
        for _ in range(100):
            page, more = await self.same("history", who, peer, before, limit)
            if not more:
                return
            before = page[-1].msg_id
        raise AssertionError("history did not end")

    async def prune(self, back_ms: int, retention_ms: int | None) -> None:
        days = None if retention_ms is None else retention_ms / MS_PER_DAY
        hidden = self.model.hidden_unpruned
        want = self.model.prune(self.clock + back_ms, days)
        event(f"prune: removed {'some' if want else 'none'}")
        if self.prune_deletes_hidden:  # sqlite: the rows max_inbox hid go now
            want += hidden
        assert await self.store.prune(self.clock + back_ms, days) == want

    async def search(self, who: str, query: str, limit: int, offset: int) -> None:
        if not self.searchable:
            assert await _answer(self.store.search(who, query, limit, offset)) == (
                "error", Unsupported)
            return
        want = _model_answer(self.model.search, who, query)
        event(f"search: {'BadQuery' if want[0] == 'error' else 'matches' if want[1] else 'none'}")
        got = await _answer(self.store.search(who, query, 10_000))
        if want[0] == "error":
            assert got == want == ("error", BadQuery)
            return
        everything, more = got[1]
        assert (set(ids(everything)), more) == (want[1], False), query
        page, more = await self.store.search(who, query, limit, offset)
        assert set(ids(page)) <= want[1]
        assert len(page) == len(everything[offset:offset + limit])
        assert more == (len(want[1]) > offset + limit)

    async def inboxes_agree(self) -> None:
        for u in USERS:
            for d in DEVICES:
                await self.same("inbox_state", u, d)
            await self.same("devices", u)
            await self.same("read_inbox", u, 0, 1000)

    async def everything_agrees(self) -> None:
        await self.inboxes_agree()
        for u in USERS:
            for peer in USERS:
                await self.same("history", u, peer, None, 1000)
        await self.same("last_seen", list(USERS))
        for msg_id in self.appended:
            await self.same("message", msg_id)


def ids(messages: Sequence[StoredMessage]) -> list[str]:
    return [m.msg_id for m in messages]


async def check_against_model(
    open_store: Callable[[StoreLimits], AbstractAsyncContextManager[Store]],
    ops: Sequence[tuple], max_inbox: int | None, *, searchable: bool,
    prune_deletes_hidden: bool, key_window_ms: int = 86_400_000,
) -> None:
    """Open an EMPTY store with ``max_inbox`` and ``key_window_ms`` and run ``ops`` on it
    and on the model; every answer and, after every op, every inbox and device must
    agree.  ``prune_deletes_hidden``: the engine deletes at prune time the rows
    ``max_inbox`` hid (its prune count includes them)."""
    model = StoreModel(max_inbox, key_window_ms)
    limits = StoreLimits(max_inbox=max_inbox, key_window_ms=key_window_ms)
    async with open_store(limits) as store:
        run = _Run(store, model, searchable=searchable,
                   prune_deletes_hidden=prune_deletes_hidden)
        for op in ops:
            await run.apply(op)
            await run.inboxes_agree()
        await run.everything_agrees()
