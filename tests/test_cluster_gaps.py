"""cluster/node.py's seq-gap check at its exact edge: one missing seq resyncs, none
does not.  A private redis-server (tests/redis_fixture.py) carries the channel."""

from __future__ import annotations

import pytest
import trio
from redis_fixture import redis_server, require_coredis  # noqa: F401

require_coredis()
import coredis  # noqa: E402

from tidings.cluster import open_cluster  # noqa: E402

CHANNEL = "tidings:{alice}:ch"


def envelope(seq: int) -> bytes:
    return b'%d\n["m%d","x",%d]\n"b"' % (seq, seq, seq)


@pytest.mark.parametrize(("seqs", "resyncs"), [
    ([1, 2, 3, 4], []),                    # contiguous: no resync
    ([1, 2, 4], [["alice"]]),              # exactly one seq lost: resync
    ([1, 3, 4, 6], [["alice"], ["alice"]]),  # each single loss: one resync each
    ([1, 2, 2, 3], []),                    # a repeat is not a gap
])
async def test_a_single_missing_seq_resyncs_the_user(redis_server, seqs, resyncs):  # noqa: F811
    got: list[int] = []
    resynced: list[list[str]] = []
    delivered, live = trio.Event(), trio.Event()

    def on_message(msg) -> None:
        got.append(msg.seq)
        if len(got) == len(seqs):
            delivered.set()

    def on_resync(users: list[str]) -> None:
        resynced.append(users)
        live.set()

    async with open_cluster(redis_server.url, "A", 3.0, on_message, on_resync=on_resync) as node:
        with trio.fail_after(10):
            if not await node.hold("alice"):  # not connected yet: resynced once it is live
                await live.wait()
                resynced.clear()
            async with coredis.Redis.from_url(redis_server.url) as r:
                for seq in seqs:
                    await r.publish(CHANNEL, envelope(seq))
            await delivered.wait()
        assert got == seqs
        assert resynced == resyncs
        assert node.statistics().gaps == len(resyncs)
