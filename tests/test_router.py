"""The routing core against a model: session table + router, and the replay/live gate.

Both machines drive sans-IO code synchronously (hypothesis stateful tests have no async
support); the trio connection is a thin wrapper around exactly these decisions.
"""

from __future__ import annotations

import itertools

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

from tidings.routing.rooms import RoomRefused, RoomTable
from tidings.routing.router import InboxGate, Offer, Routed, Router
from tidings.routing.sessions import Refused, SessionTable
from tidings.store import MemoryStore, NewMessage

USERS = ["alice", "bob", "carol"]
ROOMS = ["lobby", "games"]
BOUND = 3


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


class ReplayMachine(RuleBasedStateMachine):
    """One user's connection switching from replay to live while messages keep arriving.

    The store commits messages (``commit``); the router later routes them in commit
    order (``route``); the connection reads pages and finishes its replay at arbitrary
    points in between (the awaits of the real code).  Whatever the interleaving, the
    client must see every seq after its starting point exactly once, in order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.store = MemoryStore()
        self.gate = InboxGate()
        self.ids = itertools.count(1)
        self.unrouted: list[int] = []  # committed, not yet routed (in commit order)
        self.received: list[int] = []
        self.start = 0
        self.page = 3
        self.phase: str | None = None  # "state" (reading inbox_state), "pages", None = live
        self.since = 0
        self.state = None  # an inbox_state read but not yet handled
        self.snapshot = None  # a page read but not yet handled
        self.begin(0)

    def begin(self, since: int) -> None:
        """A replay (re)starts: from now on live messages are absorbed (start_replay)."""
        self.gate.replaying = True
        self.since = since
        self.phase = "state"
        self.state = self.snapshot = None  # a resume cancels a replay in progress

    @precondition(lambda self: self.phase == "state" and self.state is None)
    @rule()
    def state_read_begins(self) -> None:
        self.state = self.store.inbox_state("bob")

    @precondition(lambda self: self.phase == "state" and self.state is not None)
    @rule()
    def state_read_ends(self) -> None:
        state, self.state = self.state, None
        self.start = min(self.since, state.last_seq)
        self.gate.start(self.start)
        self.received = []
        # connection._replay_pages: nothing stored after start -> no page read needed
        if state.last_seq <= self.start and self.gate.caught_up(0, self.page):
            self.phase = None
        else:
            self.phase = "pages"

    @rule(n=st.integers(1, 4))
    def commit(self, n: int) -> None:
        msgs = [NewMessage(f"m{next(self.ids):08d}", "alice", "bob", b'"x"', 0) for _ in range(n)]
        self.unrouted.extend(self.store.append_many(msgs))

    @precondition(lambda self: self.unrouted)
    @rule()
    def route(self) -> None:
        seq = self.unrouted.pop(0)
        if self.gate.live(seq):
            self.received.append(seq)
            self.gate.sent(seq)

    @precondition(lambda self: self.phase == "pages" and self.snapshot is None)
    @rule()
    def read_begins(self) -> None:
        # The read runs in a worker thread: it sees the store as of now, but the
        # connection only handles the result later, after other tasks have run.
        self.snapshot = self.store.read_inbox("bob", self.gate.sent_seq, self.page)

    @precondition(lambda self: self.snapshot is not None)
    @rule()
    def read_ends(self) -> None:
        msgs, self.snapshot = self.snapshot, None
        for m in self.gate.take(msgs):
            self.received.append(m.seq)
            self.gate.sent(m.seq)
        if self.gate.caught_up(len(msgs), self.page):
            self.phase = None

    @rule(since=st.integers(0, 30))
    def resume(self, since: int) -> None:
        self.begin(since)

    @rule(upto=st.integers(0, 30))
    def ack(self, upto: int) -> None:
        cursor = self.store.set_cursor("bob", upto)
        assert cursor <= self.store.inbox_state("bob").last_seq

    @invariant()
    def no_gap_no_duplicate(self) -> None:
        expected = list(range(self.start + 1, self.start + 1 + len(self.received)))
        assert self.received == expected

    def teardown(self) -> None:
        # Let everything settle: finish routing and the replay; nothing may be missing.
        while self.unrouted or self.phase is not None:
            if self.phase == "state":
                self.state_read_begins()
                self.state_read_ends()
            elif self.phase == "pages":
                self.read_begins()
                self.read_ends()
            if self.unrouted:
                self.route()
        last = self.store.inbox_state("bob").last_seq
        assert self.received == list(range(self.start + 1, last + 1))


TestReplay = ReplayMachine.TestCase
TestReplay.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


def test_gate_absorbs_while_replaying_and_switches_once_caught_up() -> None:
    gate = InboxGate()
    gate.start(5)
    assert gate.live(6) is False  # replaying: the replay reads it
    assert gate.live(4) is False  # already delivered
    assert gate.caught_up(0, 10) is False  # live seq 6 not yet read
    gate.sent(6)
    assert gate.caught_up(0, 10) is True
    assert gate.live(6) is False and gate.live(7) is True


def test_router_rejects_unknown_policy() -> None:
    with pytest.raises(ValueError):
        Router(SessionTable(1, 1), "ignore")
