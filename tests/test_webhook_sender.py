"""The webhook sender and recorder (tidings.webhooks.sender, .recorder) on the memory
store, under trio's MockClock: retry times are exact, nothing sleeps for real.

The receiver is ``Receiver``: an in-process ``post`` function (the sender's injectable
transport) answering from a script; tests/test_e2e_webhooks.py does the same over real
HTTP against the real daemon.
"""

from __future__ import annotations

import orjson
import pytest
import trio
import trio.testing

from tidings.config import WebhooksConfig
from tidings.routing.sessions import SessionTable
from tidings.store import MemoryStore, Progress
from tidings.store.records import Appended, NewMessage, WebhookEvent
from tidings.webhooks.recorder import WebhookRecorder
from tidings.webhooks.sender import WebhookSender
from tidings.webhooks.signing import verify

SECRET = b"s" * 32
URL = "http://127.0.0.1:9/hook"


def config(**kw) -> WebhooksConfig:
    return WebhooksConfig(url=URL, secret=SECRET.decode(), **kw)


def now_ms() -> int:
    return int(trio.current_time() * 1000)


class Receiver:
    """Answers each POST with the next status of ``script`` (then 200); None = never
    answers.  Records ``(time, body, headers)`` per attempt."""

    def __init__(self, *script: int | None, secret: bytes = SECRET,
                 per_id: dict[str, list[int]] | None = None) -> None:
        self.script = list(script)
        self.per_id = per_id or {}  # event id -> its own script (then 200)
        self.secret = secret
        self.attempts: list[tuple[float, dict, dict]] = []
        self.changed = trio.Event()

    async def __call__(self, url: str, body: bytes, headers: dict, timeout_s: float) -> int:
        assert url == URL
        self.attempts.append((trio.current_time(), orjson.loads(body), headers))
        assert verify(self.secret, body, headers["Tidings-Signature"], now=trio.current_time())
        self.changed.set()
        self.changed = trio.Event()
        mine = self.per_id.get(orjson.loads(body)["id"])
        script = self.script if mine is None else mine
        status = script.pop(0) if script else 200
        if status is None:
            await trio.sleep_forever()
        return status

    def ids(self) -> list[str]:
        return [body["id"] for _, body, _ in self.attempts]

    async def wait(self, n: int) -> None:
        while len(self.attempts) < n:
            await self.changed.wait()


def sender_on(store, receiver: Receiver, **kw) -> WebhookSender:
    return WebhookSender(store, config(**kw), SECRET, owner="n1", ttl_s=15.0, post=receiver,
                         now_ms=now_ms, unix_time=trio.current_time)


def ev(n: int, user: str = "alice", kind: str = "online") -> WebhookEvent:
    return WebhookEvent(f"e{n}", kind, n, user)


@pytest.fixture
def clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def test_a_500_then_200_is_retried_one_second_later_with_the_same_id(clock):
    store = MemoryStore()
    receiver = Receiver(500)
    sender = sender_on(store, receiver)
    await store.outbox_add([ev(1)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        t0 = trio.current_time()
        await receiver.wait(2)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    (t1, b1, h1), (t2, b2, h2) = receiver.attempts
    assert b1 == b2 == {"id": "e1", "type": "online", "ts": 1, "user": "alice"}
    assert (t1 - t0, t2 - t1) == (0, 1.0)
    assert h1["Tidings-Signature"] != h2["Tidings-Signature"]  # signed again, later t
    assert await store.outbox_depth() == 0
    s = sender.statistics()
    assert (s.sent, s.failed, s.dead, s.leader) == (1, 1, 0, False)


@pytest.mark.parametrize("max_attempts, failures, dead", [
    (1, 1, True), (2, 1, False),   # the edge: the max_attempts-th failure is the last
    (3, 3, True), (4, 3, False),
])
async def test_an_event_is_dead_at_its_max_attempts_th_failure_and_the_next_one_goes(
        clock, max_attempts, failures, dead):
    store = MemoryStore()
    receiver = Receiver(*[503] * failures)
    sender = sender_on(store, receiver, max_attempts=max_attempts)
    await store.outbox_add([ev(1), ev(2)])
    attempts_of_e1 = failures if dead else failures + 1
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        t0 = trio.current_time()
        await receiver.wait(attempts_of_e1 + 1)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert receiver.ids() == ["e1"] * attempts_of_e1 + ["e2"]
    backoff = [0, 1, 3, 7]  # 1 s, 2 s, 4 s between attempts
    times = [t - t0 for t, _, _ in receiver.attempts]
    assert times == backoff[:attempts_of_e1] + [backoff[attempts_of_e1 - 1]]
    s = sender.statistics()
    assert (s.failed, s.dead, s.sent) == (failures, int(dead), 1 if dead else 2)
    assert await store.outbox_depth() == 0


async def test_order_per_user_while_other_users_go_on(clock):
    store = MemoryStore()
    receiver = Receiver(per_id={"e1": [500]})  # alice's first event fails once
    sender = sender_on(store, receiver)
    await store.outbox_add([ev(1, "alice"), ev(2, "alice", "offline"), ev(3, "bob")])
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        await receiver.wait(4)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    times = {body["id"]: t for t, body, _ in receiver.attempts}
    assert [i for i in receiver.ids() if i != "e3"] == ["e1", "e1", "e2"]  # e2 after e1's success
    assert times["e3"] == 0 and times["e1"] == times["e2"] == 1.0


async def test_a_receiver_that_never_answers_times_out(clock):
    store = MemoryStore()
    receiver = Receiver(None)
    sender = sender_on(store, receiver, timeout_s=2.5)
    await store.outbox_add([ev(1)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        t0 = trio.current_time()
        await receiver.wait(2)
        nursery.cancel_scope.cancel()
    assert [t - t0 for t, _, _ in receiver.attempts] == [0, 3.5]  # 2.5 s timeout + 1 s backoff


async def test_reload_changes_the_url_and_secret_of_the_next_attempt(clock):
    store = MemoryStore()
    new = b"n" * 32
    receiver = Receiver(secret=new)  # verifies with the new secret only
    sender = WebhookSender(store, WebhooksConfig(url="http://old.invalid/", secret=SECRET.decode()),
                           SECRET, owner="n1", ttl_s=15.0, post=receiver, now_ms=now_ms,
                           unix_time=trio.current_time)
    sender.configure(WebhooksConfig(url=URL, secret=new.decode(), events=["online"],
                                    max_attempts=2), new)
    assert sender.config.events == ["undelivered", "online", "offline"]  # needs a restart
    assert (sender.config.url, sender.config.max_attempts) == (URL, 2)
    await store.outbox_add([ev(1)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        await receiver.wait(1)
        nursery.cancel_scope.cancel()
    assert receiver.ids() == ["e1"]


async def test_undelivered_checks_become_events_unless_acked(clock):
    store = MemoryStore()
    receiver = Receiver()
    sender = sender_on(store, receiver, undelivered_after_s=60)
    recorder = WebhookRecorder(store, sender.config, node="n1", ttl_s=15, local_users=list,
                               on_written=sender.wake, now_ms=now_ms)
    msgs = [NewMessage("m1", "alice", "bob", b'"hi"', 0), NewMessage("m2", "alice", "carol", b'"hi"', 0)]
    results = await store.append(msgs)
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        await nursery.start(sender.run)
        t0 = trio.current_time()
        await recorder.watch(msgs + msgs[:1], results + [Appended(None)])
        await store.save_progress(Progress(cursors={("carol", "default"): 1}))  # acked in time
        await receiver.wait(1)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    ((t, body, _),) = receiver.attempts
    assert 60 <= t - t0 <= 61  # checked within a second of the due time
    assert body == {"id": body["id"], "type": "undelivered", "ts": int(t0 * 1000) + 60_000,
                    "user": "bob", "msg_id": "m1", "from": "alice", "to": "bob", "seq": 1}


async def test_presence_online_offline_and_a_killed_node_reaped(clock):
    store = MemoryStore()
    receiver = Receiver()
    sender = sender_on(store, receiver)
    sessions = SessionTable(100, 10)
    recorder = WebhookRecorder(store, sender.config, node="n1", ttl_s=3, now_ms=now_ms,
                               local_users=lambda: [e.user for e in sessions.all_endpoints()],
                               on_written=sender.wake)
    # a previous run of node "n1" left alice online; "n2" was killed with bob and alice on it
    await store.presence_set("n1", ["alice"], [], full=False, now_ms=0, expires_ms=10**9,
                             types=("online", "offline"))
    await store.presence_set("n2", ["alice", "bob"], [], full=False, now_ms=0, expires_ms=2000,
                             types=("online", "offline"))
    await store.outbox_done([e.pos for e in await store.outbox_read(None, 10)])
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)  # reaps n1's previous run: alice still on n2
        await nursery.start(sender.run)
        recorder.connected("carol")
        recorder.disconnected("dave")  # never connected here: nothing
        await receiver.wait(1)
        recorder.connected("erin")
        recorder.disconnected("erin")  # a blip before the write: nothing
        await trio.sleep(2.5)  # n2 expired at 2000 ms: reaped
        await receiver.wait(3)
        recorder.disconnected("carol")
        await receiver.wait(4)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    got = [(body["type"], body["user"]) for _, body, _ in receiver.attempts]
    assert got[0] == ("online", "carol")
    assert sorted(got[1:3]) == [("offline", "alice"), ("offline", "bob")]  # (two users: any order)
    assert got[3:] == [("offline", "carol")]
