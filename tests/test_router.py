"""The routing core against a model: session table + router + rooms, and replay.

Both machines drive sans-IO code synchronously (hypothesis stateful tests have no async
support): ``routing.router`` / ``rooms`` / ``sessions``, and ``routing.replay``, whose
decisions the trio connection only executes.  Watches have a table test of their own.
"""

from __future__ import annotations

import itertools
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from tidings.routing.replay import InboxGate, Replay
from tidings.routing.rooms import RoomRefused, RoomTable
from tidings.routing.router import Offer, Routed, Router
from tidings.routing.sessions import Refused, SessionTable
from tidings.routing.watches import WatchRefused, WatchTable
from tidings.store import InboxState, MemoryStore, NewMessage, Progress, StoredMessage

USERS = ["alice", "bob", "carol"]
ROOMS = ["lobby", "games"]
BOUND = 3
PAGE = 3
T = TypeVar("T")


class FakeEndpoint:
    """A connection as the router sees it: a bounded queue, killable."""

    ids = itertools.count()

    def __init__(self, user: str, bound: int) -> None:
        self.conn_id = f"c{next(self.ids)}"
        self.user = user
        self.bound = bound
        self.queue: list[Routed] = []
        self.received: list[Routed] = []  # everything ever queued (for order checks)
        self.killed: int | None = None

    def offer_nowait(self, routed: Routed) -> Offer:
        assert self.killed is None, "offered to a killed connection"
        if len(self.queue) >= self.bound:
            return Offer.FULL
        self.queue.append(routed)
        self.received.append(routed)
        return Offer.QUEUED

    def kill(self, code: int, reason: str) -> None:
        self.killed = code


class RoutingMachine(RuleBasedStateMachine):
    conns = Bundle("conns")

    @initialize(policy=st.sampled_from(["disconnect", "drop"]))
    def setup(self, policy: str) -> None:
        self.table = SessionTable(max_connections=6, max_connections_per_user=3)
        self.router = Router(self.table, policy)
        self.rooms = RoomTable(max_rooms_per_connection=2, max_members_per_room=4, history=0)
        self.members: dict[str, set[str]] = {r: set() for r in ROOMS}  # model
        self.policy = policy
        self.live: dict[str, FakeEndpoint] = {}  # model: conn_id -> endpoint
        self.closed: list[FakeEndpoint] = []
        self.counter = itertools.count(1)
        self.expected_fanout = 0
        self.delivered = 0
        self.dropped = 0

    @rule(target=conns, user=st.sampled_from(USERS))
    def connect(self, user: str):
        ep = FakeEndpoint(user, BOUND)
        model_total = len(self.live)
        model_user = sum(1 for e in self.live.values() if e.user == user)
        try:
            self.table.add(ep)
        except Refused as exc:
            assert model_total >= 6 or model_user >= 3
            assert exc.status == (503 if model_total >= 6 else 429)
            self.closed.append(ep)
            return ep
        assert model_total < 6 and model_user < 3
        self.live[ep.conn_id] = ep
        return ep

    @rule(ep=consumes(conns))
    def disconnect(self, ep: FakeEndpoint) -> None:
        self.table.remove(ep)
        self.rooms.leave_all(ep)  # what hub.unregister does
        for members in self.members.values():
            members.discard(ep.conn_id)
        if self.live.pop(ep.conn_id, None) is not None:
            self.closed.append(ep)

    @rule(ep=conns, room=st.sampled_from(ROOMS))
    def join(self, ep: FakeEndpoint, room: str) -> None:
        if ep.conn_id not in self.live:
            return  # a closed connection sends nothing
        mine = sum(1 for m in self.members.values() if ep.conn_id in m)
        already = ep.conn_id in self.members[room]
        try:
            joined = self.rooms.join(ep, room)
        except RoomRefused:
            assert not already and (mine >= 2 or len(self.members[room]) >= 4)
            return
        assert joined is not already
        self.members[room].add(ep.conn_id)

    @rule(ep=conns, room=st.sampled_from(ROOMS))
    def leave(self, ep: FakeEndpoint, room: str) -> None:
        assert self.rooms.leave(ep, room) is (ep.conn_id in self.members[room])
        self.members[room].discard(ep.conn_id)

    @rule(room=st.sampled_from(ROOMS))
    def send_room(self, room: str) -> None:
        n = next(self.counter)
        routed = Routed(f"room {room} #{n}".encode(), None)
        everyone = [*self.live.values(), *self.closed]
        before = {e.conn_id: len(e.received) for e in everyone}
        joined = {cid for cid in self.members[room]}
        room_ok = {cid: len(self.live[cid].queue) < BOUND for cid in joined}
        result = self.router.offer_all(self.rooms.members(room), routed)
        # Exactly the connections joined at send time (with room in their queue).
        for e in everyone:
            got = len(e.received) - before[e.conn_id]
            assert got == (1 if room_ok.get(e.conn_id) else 0), (e.conn_id, room)
        full = [cid for cid, ok in room_ok.items() if not ok]
        assert result.delivered == len(joined) - len(full) and result.dropped == len(full)
        self.expected_fanout += len(joined)
        self.delivered += result.delivered
        self.dropped += result.dropped
        for cid in full:
            e = self.live[cid]
            if self.policy == "disconnect":
                assert e.killed == 1013
                self._killed(e)

    @rule(ep=conns, n=st.integers(1, BOUND))
    def client_reads(self, ep: FakeEndpoint, n: int) -> None:
        del ep.queue[:n]

    @rule(sender=st.sampled_from(USERS), recipient=st.sampled_from(USERS))
    def send(self, sender: str, recipient: str) -> None:
        n = next(self.counter)
        routed = Routed(f"{sender}>{recipient}#{n}".encode(), n)
        targets = [e for e in self.live.values() if e.user == recipient]
        room = {e.conn_id: len(e.queue) < e.bound for e in targets}
        before = {e.conn_id: len(e.received) for e in [*self.live.values(), *self.closed]}
        result = self.router.route(recipient, routed)
        # Exactly the live connections of the recipient at send time, nobody else.
        for e in [*self.live.values(), *self.closed]:
            got = len(e.received) - before[e.conn_id]
            should = e.user == recipient and e.conn_id in room and room[e.conn_id]
            assert got == (1 if should else 0), (e.conn_id, e.user, recipient)
        full = [e for e in targets if not room[e.conn_id]]
        assert result.delivered == len(targets) - len(full)
        assert result.dropped == len(full)
        self.expected_fanout += len(targets)
        self.delivered += result.delivered
        self.dropped += result.dropped
        for e in full:
            if self.policy == "disconnect":
                assert e.killed == 1013
                assert result.disconnected >= 1
                self._killed(e)
            else:
                assert e.killed is None

    def _killed(self, e: FakeEndpoint) -> None:
        """A connection the router closed: it unregisters and leaves its rooms (hub)."""
        self.live.pop(e.conn_id)
        self.closed.append(e)
        self.rooms.leave_all(e)
        for members in self.members.values():
            members.discard(e.conn_id)

    @invariant()
    def queues_bounded(self) -> None:
        for e in self.live.values():
            assert len(e.queue) <= e.bound

    @invariant()
    def table_matches_model(self) -> None:
        for user in USERS:
            model = sorted(e.conn_id for e in self.live.values() if e.user == user)
            assert sorted(e.conn_id for e in self.table.connections(user)) == model
        assert len(self.table) == len(self.live)

    @invariant()
    def order_per_sender_preserved(self) -> None:
        for e in [*self.live.values(), *self.closed]:
            seqs = [r.seq for r in e.received if r.seq is not None]
            assert seqs == sorted(seqs)

    @invariant()
    def rooms_match_model(self) -> None:
        for room in ROOMS:
            assert {e.conn_id for e in self.rooms.members(room)} == self.members[room]
            assert self.members[room] <= set(self.live)  # never a closed connection

    @invariant()
    def fanout_accounted(self) -> None:
        assert self.delivered + self.dropped == self.expected_fanout
        stats = self.router.statistics()
        assert stats.delivered == self.delivered and stats.dropped == self.dropped


TestRouting = RoutingMachine.TestCase
TestRouting.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


def done(coro: Coroutine[Any, Any, T]) -> T:
    """Run a MemoryStore coroutine to its end: the engine never awaits (its contract)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the memory store awaited")


class ReplayMachine(RuleBasedStateMachine):
    """One user's connection switching from replay to live while messages keep arriving.

    It drives the real decisions, ``routing.replay.Replay`` and ``InboxGate``, step by
    step as server/connection.py does (``begin`` on the state read, ``to_send`` and
    ``sent`` per message, ``next_read`` after a page; the router's offers through
    ``gate.live``), with the I/O split at every await of the real code: a read
    completes (a snapshot of the store) and is handled later, a page is sent one
    message at a time (the connection may wait for queue space in between).  Meanwhile
    the store commits, the router routes in commit order, and the client resumes, acks,
    or reconnects as another device (or the same one) under either
    ``new_device_replay`` policy.  Whatever the interleaving, the client sees every seq
    after the replay's start exactly once, in order, and a connect without ``since``
    starts at its device's saved cursor (a new device: 0, or the inbox's end under
    ``"none"``, which is then saved as its cursor).
    """

    def __init__(self) -> None:
        super().__init__()
        self.store = MemoryStore()
        self.gate = InboxGate()
        self.ids = itertools.count(1)
        self.unrouted: list[int] = []  # committed, not yet routed (in commit order)
        self.received: list[int] = []
        self.start = 0
        self.device, self.policy = "default", "all"
        self.cursors: dict[str, int] = {}  # model: the devices' saved cursors
        self.begin(0)

    def begin(self, since: int | None) -> None:
        """A replay (re)starts (connect or resume): a running one is abandoned."""
        self.replay = Replay(self.gate, since, PAGE, self.policy)
        self.phase: str | None = "state"  # "state", "pages", None = live
        self.state: InboxState | None = None  # an inbox_state read, not yet handled
        self.snapshot: list[StoredMessage] | None = None  # a page read, not yet handled
        self.sending: list[StoredMessage] = []  # the page being sent
        self.after: int | None = None

    @precondition(lambda self: self.phase == "state" and self.state is None)
    @rule()
    def state_read_begins(self) -> None:
        self.state = done(self.store.inbox_state("bob", self.device))
        self.state_cursors = dict(self.cursors)  # the model when the state was read

    @precondition(lambda self: self.state is not None)
    @rule()
    def state_read_ends(self) -> None:
        state, self.state = self.state, None
        self.after = self.replay.begin(state)
        self.start = self.replay.start
        assert state.new_device is (self.device not in self.state_cursors)
        if self.replay.since is None:  # a connect: from the device's cursor
            first = 0 if self.policy == "all" else state.last_seq
            assert self.start == self.state_cursors.get(self.device, first)
        if state.new_device:  # the connection registers it (Hub.register_device)
            self.save_cursor(self.replay.cursor)
        self.received = []  # the client starts over from the replay's start
        self.phase = None if self.after is None else "pages"

    @rule(n=st.integers(1, 4))
    def commit(self, n: int) -> None:
        msgs = [NewMessage(f"m{next(self.ids):08d}", "alice", "bob", b'"x"', 0) for _ in range(n)]
        self.unrouted.extend(r.seq for r in done(self.store.append(msgs)))

    @precondition(lambda self: self.unrouted)
    @rule()
    def route(self) -> None:
        seq = self.unrouted.pop(0)
        if self.gate.live(seq):  # Connection.offer_nowait: queued live
            self.received.append(seq)
            self.gate.sent(seq)

    @precondition(lambda self: self.phase == "pages" and self.snapshot is None and not self.sending)
    @rule()
    def read_begins(self) -> None:
        assert self.after is not None
        self.snapshot = done(self.store.read_inbox("bob", self.after, PAGE))

    @precondition(lambda self: self.snapshot is not None)
    @rule()
    def read_ends(self) -> None:
        msgs, self.snapshot = self.snapshot, None
        self.sending = self.replay.to_send(msgs)
        if not self.sending:
            self.page_sent()

    @precondition(lambda self: self.sending)
    @rule()
    def send_one(self) -> None:
        m = self.sending.pop(0)
        self.received.append(m.seq)
        self.replay.sent(m.seq)
        if not self.sending:
            self.page_sent()

    def page_sent(self) -> None:
        self.after = self.replay.next_read()
        if self.after is None:
            self.phase = None

    @rule(since=st.integers(0, 30))
    def resume(self, since: int) -> None:
        self.begin(since)

    @rule(upto=st.integers(0, 30))
    def ack(self, upto: int) -> None:
        self.save_cursor(upto)

    def save_cursor(self, seq: int) -> None:
        last = done(self.store.inbox_state("bob")).last_seq
        self.cursors[self.device] = max(self.cursors.get(self.device, 0), min(seq, last))
        done(self.store.save_progress(Progress(cursors={("bob", self.device): seq})))

    @rule(device=st.sampled_from(["default", "phone", "laptop"]),
          policy=st.sampled_from(["all", "none"]))
    def reconnect(self, device: str, policy: str) -> None:
        """The connection closes; a new one (a new gate) connects without ``since``."""
        self.gate = InboxGate()
        self.device, self.policy = device, policy
        self.begin(None)

    @invariant()
    def no_gap_no_duplicate(self) -> None:
        expected = list(range(self.start + 1, self.start + 1 + len(self.received)))
        assert self.received == expected

    def teardown(self) -> None:
        # Let everything settle: finish routing and the replay; nothing may be missing.
        while self.unrouted or self.phase is not None:
            if self.phase == "state":
                if self.state is None:
                    self.state_read_begins()
                self.state_read_ends()
            elif self.phase == "pages":
                while self.sending:
                    self.send_one()
                if self.phase == "pages":
                    if self.snapshot is None:
                        self.read_begins()
                    self.read_ends()
            if self.unrouted:
                self.route()
            self.no_gap_no_duplicate()
        last = done(self.store.inbox_state("bob")).last_seq
        assert self.received == list(range(self.start + 1, last + 1))


TestReplay = ReplayMachine.TestCase
TestReplay.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


def test_replay_reads_what_was_absorbed_while_its_state_read_was_in_flight() -> None:
    """A pinned run of the machine (stateful tests take no ``@example``): the state read
    sees an empty inbox, a message is stored and routed (absorbed) before the read is
    handled, so only the gate's ``live_seq`` says the replay must read it.  A gate whose
    ``start`` forgot ``live_seq`` would switch to live and lose seq 1."""
    machine = ReplayMachine()
    machine.state_read_begins()
    machine.commit(n=1)
    machine.route()
    machine.state_read_ends()
    assert machine.phase == "pages"
    machine.teardown()
    assert machine.received == [1]


def test_gate_absorbs_while_replaying_and_switches_once_caught_up() -> None:
    gate = InboxGate()
    gate.start(5)
    assert gate.live(6) is False  # replaying: the replay reads it
    assert gate.live(4) is False  # already delivered
    assert gate.caught_up(0, 10) is False  # live seq 6 not yet read
    gate.sent(6)
    assert gate.caught_up(0, 10) is True
    assert gate.live(6) is False and gate.live(7) is True


@pytest.mark.parametrize(("last_seq", "cursor", "since", "start", "after", "complete"), [
    (0, 0, None, 0, None, True),    # nothing stored: caught up without a page read
    (5, 5, None, 5, None, True),    # everything acked
    (5, 3, None, 3, 3, True),       # read after the cursor
    (5, 3, 1, 1, 1, True),          # ?since= below the cursor
    (5, 3, 9, 5, None, True),       # ?since= above last_seq: clamped
    (5, 0, 0, 0, 0, False),         # retention dropped seqs 1-2 (first_seq = 3)
])
def test_replay_begin(last_seq, cursor, since, start, after, complete) -> None:
    first_seq = 3 if not complete else 1
    replay = Replay(InboxGate(), since, PAGE)
    assert replay.begin(InboxState(first_seq, last_seq, cursor)) == after
    assert (replay.start, replay.last, replay.complete) == (start, start, complete)


def test_replay_reads_pages_until_a_short_one() -> None:
    gate = InboxGate()
    replay = Replay(gate, 0, 2)
    assert replay.begin(InboxState(1, 3, 0)) == 0
    page = [StoredMessage(f"m{i}", i, "a", "b", b"1", 0) for i in (1, 2)]
    assert replay.to_send(page) == page
    for m in page:
        replay.sent(m.seq)
    assert replay.next_read() == 2 and gate.replaying  # a full page: read on
    last = StoredMessage("m3", 3, "a", "b", b"1", 0)
    assert replay.to_send([page[1], last]) == [last]  # never a seq twice; a full page
    assert replay.next_read() == 2  # (nothing sent yet)
    assert replay.to_send([last]) == [last]  # a short page: the end
    replay.sent(3)
    assert replay.next_read() is None and not gate.replaying and replay.last == 3


def test_router_rejects_unknown_policy() -> None:
    with pytest.raises(ValueError):
        Router(SessionTable(1, 1), "ignore")


def test_watch_bound_is_exact_and_a_refused_watch_changes_nothing() -> None:
    table = WatchTable(max_per_connection=2)
    alice, other = FakeEndpoint("alice", BOUND), FakeEndpoint("alice", BOUND)
    table.watch(alice, ["bob", "carol"])  # exactly the bound
    table.watch(alice, ["bob"])  # already watched: nothing new
    with pytest.raises(WatchRefused) as refused:
        table.watch(alice, ["dave"])  # one over
    assert (refused.value.code, refused.value.reason) == ("bad_request", "at most 2 watched users per connection")
    assert table.watchers("dave") == ()
    with pytest.raises(WatchRefused):
        table.watch(other, ["x", "y", "z"])  # refused whole, even from nothing
    table.watch(other, ["bob"])
    assert set(table.watchers("bob")) == {alice, other}
    table.unwatch(alice, ["bob"])
    assert table.watchers("bob") == (other,) and table.watchers("carol") == (alice,)
    table.forget(alice)
    table.forget(other)
    assert table.watchers("bob") == table.watchers("carol") == ()
