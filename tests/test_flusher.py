"""server/flusher.py: what connections queue is written once per turn of the run loop
by one task, without a writer task per connection; a socket that takes only part of it
hands the rest to the connection's writer, in order.  Over real sockets
(tests/inprocess.py, ``socket=True``); the Flusher alone with recorded flushes."""

from __future__ import annotations

import trio
import trio.testing

from inprocess import running_hub
from test_keepalive import config
from tidings.server import outbound
from tidings.server.flusher import Flusher


class Recorded:
    def __init__(self, name: str, flushed: list[str]) -> None:
        self.name = name
        self.flushed = flushed

    def _flush(self) -> None:
        self.flushed.append(self.name)


async def test_everything_registered_in_one_turn_is_flushed_in_one_turn_in_order():
    flusher, flushed = Flusher(), []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        await trio.testing.wait_all_tasks_blocked()
        for name in ("a", "b", "c"):
            flusher.schedule(Recorded(name, flushed))
        await trio.testing.wait_all_tasks_blocked()
        assert flushed == ["a", "b", "c"] and flusher.flushes == 1
        flusher.schedule(Recorded("d", flushed))
        await trio.testing.wait_all_tasks_blocked()
        assert flushed == ["a", "b", "c", "d"] and flusher.flushes == 2
        nursery.cancel_scope.cancel()


async def test_routed_messages_and_acks_are_written_without_a_writer_task(autojump_clock, monkeypatch):
    started = []
    async with running_hub(config()) as h:
        alice = await h.connect("user=alice", socket=True)
        bob = await h.connect("user=bob", socket=True)
        await trio.testing.wait_all_tasks_blocked()
        original = outbound.Outbound._start

        def start(self, fn, *args):
            started.append((self.user, fn.__name__))
            original(self, fn, *args)

        monkeypatch.setattr(outbound.Outbound, "_start", start)
        for i in range(3):
            await alice.send({"type": "send", "to": "bob", "body": f"m{i}", "id": i})
        acks = [await alice.receive() for _ in range(3)]
        assert [a["id"] for a in acks] == [0, 1, 2] and all(a["type"] == "ack" for a in acks)
        got = [await bob.receive() for _ in range(3)]
        assert [m["body"] for m in got] == ["m0", "m1", "m2"]
        assert started == []  # neither connection started a writer task
        assert h.server.flusher.flushes >= 1


async def test_a_full_socket_hands_the_rest_to_the_writer_whole_and_in_order(autojump_clock):
    """bob does not read: the flusher's sends fill his socket until one takes only part
    of the queue (or nothing); the rest goes first in bob's queue and his writer task
    writes it.  Once bob reads, every message arrives, whole and in order."""
    async with running_hub(config()) as h:
        alice = await h.connect("user=alice", socket=True)
        bob = await h.connect("user=bob", socket=True)
        conn = h.connection("bob")
        await trio.testing.wait_all_tasks_blocked()
        body = "x" * 4000
        sent = 0
        while not conn._writer_running:
            await alice.send({"type": "send", "to": "bob", "body": f"{sent} {body}"})
            assert (await alice.receive())["type"] == "ack"
            sent += 1
        assert sent > 1  # some went out through the flusher first
        for _ in range(3):  # queued behind the rest, written by the writer
            await alice.send({"type": "send", "to": "bob", "body": f"{sent} {body}"})
            assert (await alice.receive())["type"] == "ack"
            sent += 1
        got = [await bob.receive() for _ in range(sent)]
        assert [int(m["body"].split()[0]) for m in got] == list(range(sent))
        assert all(m["body"].endswith(body) for m in got)


class FlusherSteps(trio.abc.Instrument):
    """Counts the steps of the flusher's task."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("Flusher.run"):
            self.steps += 1


async def test_the_writer_flushes_the_batch_it_answered_without_the_flusher_task(autojump_clock):
    """The hub's writer holds the flusher while it answers a batch and flushes on
    release: acks and routed messages go out with no turn of the flusher's task."""
    async with running_hub(config()) as h:
        alice = await h.connect("user=alice", socket=True)
        bob = await h.connect("user=bob", socket=True)
        await trio.testing.wait_all_tasks_blocked()
        steps = FlusherSteps()
        trio.lowlevel.add_instrument(steps)
        try:
            for i in range(3):
                await alice.send({"type": "send", "to": "bob", "body": f"m{i}", "id": i})
                assert (await alice.receive())["id"] == i
                assert (await bob.receive())["body"] == f"m{i}"
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert steps.steps == 0


async def test_what_is_registered_while_held_is_flushed_by_the_release_in_order():
    flusher, flushed = Flusher(), []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        await trio.testing.wait_all_tasks_blocked()
        flusher.hold()
        for name in ("a", "b"):
            flusher.schedule(Recorded(name, flushed))
        await trio.testing.wait_all_tasks_blocked()
        assert flushed == []  # the task was not woken
        flusher.release()
        assert flushed == ["a", "b"]
        flusher.schedule(Recorded("c", flushed))  # not held: the task's next turn
        await trio.testing.wait_all_tasks_blocked()
        assert flushed == ["a", "b", "c"]
        nursery.cancel_scope.cancel()
