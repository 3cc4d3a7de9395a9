"""The hub's group-commit writer on a pipelined store (server/writer.py): batches kept
full instead of sent one message at a time (a batch that is not full waits for the one
in flight and is sent at most once per ``LINGER_S``), two in flight only for a full
batch (``store.batch_max``).

The store is a FlakyStore (tests/inprocess.py) with ``append_submit``: it records each
submitted batch (its size and the clock's time) and, while ``gated``, answers a batch
only when the test opens its gate.  Everything runs on a MockClock: the clock moves only
when a test jumps it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import trio
import trio.testing
from inprocess import FlakyStore, make_config, running_hub
from tidings.server.writer import LINGER_S
from tidings.store import NewMessage, PipelinedStore


class PipelinedFlaky(FlakyStore):
    """A FlakyStore whose appends are submitted and answered in two halves."""

    def __init__(self) -> None:
        super().__init__()
        self.submitted: list[tuple[int, float]] = []  # (batch size, clock time)
        self.gates: list[trio.Event] = []
        self.gated = False

    def __getattr__(self, name: str):  # the rest of the Store interface: the memory store's
        return getattr(self.inner, name)

    async def append_submit(self, msgs: Sequence[NewMessage]):
        self.submitted.append((len(msgs), trio.current_time()))
        gate = trio.Event()
        if not self.gated:
            gate.set()
        self.gates.append(gate)

        async def results():
            await gate.wait()
            return await self.append(msgs)  # answered in submit order by the writer
        return results


def send(to: str, body: object, fid: object) -> dict:
    return {"type": "send", "to": to, "body": body, "id": fid}


async def _acks(client, n: int) -> list[tuple[str, int]]:
    out = []
    for _ in range(n):
        ack = await client.receive()
        assert ack["type"] == "ack"
        out.append((ack["id"], ack["seq"]))
    return out


BATCH_MAX = 40  # store.batch_max of the tests that fill a batch


@contextlib.asynccontextmanager
async def one_batch_in_flight(batch_max: int = 512) -> AsyncIterator[tuple[PipelinedFlaky, object]]:
    """A gated store and alice's client, whose first send (``s0``, to bob) is in flight."""
    store = PipelinedFlaky()
    store.gated = True
    async with running_hub(make_config(store={"batch_max": batch_max}), store=store) as h:
        a = await h.connect("user=alice")
        await a.send(send("bob", 0, "s0"))
        await trio.testing.wait_all_tasks_blocked()
        yield store, a


def test_the_test_store_is_pipelined():
    assert isinstance(PipelinedFlaky(), PipelinedStore)


async def test_a_small_batch_waits_for_the_one_in_flight_and_goes_out_whole(mock_clock):
    async with one_batch_in_flight() as (store, a):
        assert [n for n, _t in store.submitted] == [1]  # nothing in flight: at once
        for i in range(1, 4):  # one at a time, as an even rate brings them
            await a.send(send("bob", i, f"s{i}"))
            await trio.testing.wait_all_tasks_blocked()
        assert [n for n, _t in store.submitted] == [1]  # not one call per message
        store.gates[0].set()
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(LINGER_S)
        await trio.testing.wait_all_tasks_blocked()
        assert [n for n, _t in store.submitted] == [1, 3]
        store.gates[1].set()
        assert await _acks(a, 4) == [(f"s{i}", i + 1) for i in range(4)]


async def test_a_small_batch_goes_out_at_most_once_per_linger(mock_clock):
    store = PipelinedFlaky()  # answers at once: only the linger holds a batch back
    async with running_hub(store=store) as h:
        a = await h.connect("user=alice")
        await a.send(send("bob", 0, "s0"))
        assert await _acks(a, 1) == [("s0", 1)]
        t0 = store.submitted[0][1]
        await a.send(send("bob", 1, "s1"))
        await trio.testing.wait_all_tasks_blocked()
        assert len(store.submitted) == 1  # answered, but sent less than LINGER_S ago
        await a.send(send("bob", 2, "s2"))
        mock_clock.jump(LINGER_S / 2)
        await trio.testing.wait_all_tasks_blocked()
        assert len(store.submitted) == 1
        mock_clock.jump(LINGER_S / 2)
        assert await _acks(a, 2) == [("s1", 2), ("s2", 3)]
        assert store.submitted[1] == (2, t0 + LINGER_S)
        mock_clock.jump(10 * LINGER_S)  # quiet for longer than the linger: sent at once
        await a.send(send("bob", 3, "s3"))
        assert await _acks(a, 1) == [("s3", 4)]
        assert store.submitted[2] == (1, t0 + 11 * LINGER_S)


async def test_a_batch_that_is_not_full_waits_for_the_one_in_flight(mock_clock):
    # 39 messages: more than the 32 that went two in flight before, one short of full
    async with one_batch_in_flight(BATCH_MAX) as (store, a):
        await a.send(*[send("bob", i, f"s{i}") for i in range(1, BATCH_MAX)])
        await trio.testing.wait_all_tasks_blocked()
        assert [n for n, _t in store.submitted] == [1]  # one in flight: it waits
        store.gates[0].set()
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(LINGER_S)
        await trio.testing.wait_all_tasks_blocked()
        assert [n for n, _t in store.submitted] == [1, BATCH_MAX - 1]  # whole, once
        store.gates[1].set()
        assert await _acks(a, BATCH_MAX) == [(f"s{i}", i + 1) for i in range(BATCH_MAX)]


async def test_a_full_batch_is_sent_while_another_is_in_flight(mock_clock):
    async with one_batch_in_flight(BATCH_MAX) as (store, a):
        await a.send(*[send("bob", i, f"s{i}") for i in range(1, BATCH_MAX + 1)])
        await trio.testing.wait_all_tasks_blocked()
        assert [n for n, _t in store.submitted] == [1, BATCH_MAX]  # two in flight
        store.gates[1].set()  # the second answered first: still acked after the first
        await trio.testing.wait_all_tasks_blocked()
        store.gates[0].set()
        assert await _acks(a, BATCH_MAX + 1) == [(f"s{i}", i + 1)
                                                 for i in range(BATCH_MAX + 1)]
