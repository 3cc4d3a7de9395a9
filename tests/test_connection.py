"""server/connection.py and server/outbound.py in process: a real Hub, Server and
Connection over in-memory streams (tests/inprocess.py), under trio's MockClock.

Edges are tested exactly (n and n+1): the message size limit in UTF-8 bytes, the
outbound queue bound, the rate limit's burst and strike count, the reply credits.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from wsproto.events import CloseConnection, Request

from inprocess import Client, capture_log, make_config, running_hub
from tidings.routing.router import Offer, Routed
from tidings.server.outbound import CLOSE_TIMEOUT
from tidings.wire.protocol import encode


def ping(i: int) -> dict:
    return {"type": "ping", "id": i}


# -- the closing handshake -------------------------------------------------------------


async def test_flood_close_sends_every_queued_reply_then_close_and_reads_the_rest(autojump_clock):
    """A flood closed with 1008 while the client is still sending: every reply queued
    before the close arrives, then the close frame; the server reads (and drops) all
    the input (the client's blocking write completes), and closes TCP once the client
    answers the close, well before the close timeout."""
    config = make_config(limits={"burst": 5, "messages_per_second": 0.001,
                                 "rate_limit_close_after": 3, "max_inflight": 4})
    async with running_hub(config) as h:
        c = await h.connect("user=flood", lockstep=True)
        sent = trio.Event()

        async def flood() -> None:
            await c.send(*(ping(i) for i in range(3000)))  # one write
            sent.set()

        with trio.fail_after(CLOSE_TIMEOUT / 2):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                frames, close = await c.receive_until_close()
                assert [f["type"] for f in frames] == ["pong"] * 5 + ["error"] * 2
                assert [f["id"] for f in frames] == list(range(7))
                assert {f["code"] for f in frames[5:]} == {"rate_limited"}
                assert isinstance(close, CloseConnection) and close.code == 1008
                await sent.wait()  # the server read all 3,000 frames: none left unread
                await c.answer_close(close)
                await c.expect_eof()
            await c.served.wait()


async def test_close_without_an_answer_ends_after_the_close_timeout(autojump_clock):
    config = make_config(limits={"burst": 1, "messages_per_second": 0.001, "rate_limit_close_after": 1})
    async with running_hub(config) as h:
        c = await h.connect("user=mute")
        await c.send(ping(1), ping(2))
        t0 = trio.current_time()
        frames, close = await c.receive_until_close()
        assert [f["type"] for f in frames] == ["pong"] and close.code == 1008
        await c.expect_eof()  # never answered: the server waits CLOSE_TIMEOUT, then EOF
        assert trio.current_time() - t0 == pytest.approx(CLOSE_TIMEOUT)


@pytest.mark.parametrize("socket", [False, True], ids=["memory-stream", "socket"])
async def test_peer_close_is_echoed_at_once(autojump_clock, socket):
    with trio.fail_after(CLOSE_TIMEOUT / 2):
        async with running_hub() as h:
            c = await h.connect("user=polite", socket=socket)
            await c.stream.send_all(c.ws.send(CloseConnection(1000, "bye")))
            frames, close = await c.receive_until_close()
            assert frames == [] and close.code == 1000
            await c.expect_eof()
            await c.served.wait()
            assert h.hub.sessions.count("polite") == 0


async def test_peer_reset_right_after_the_101_is_logged_as_a_close_by_the_peer(autojump_clock):
    with trio.fail_after(1):
        async with running_hub() as h:
            with capture_log() as logs:
                stream, served = h.serve(lockstep=True)  # a write waits for the peer's read
                await stream.send_all(Client(stream).ws.send(Request(host="t", target="/ws?user=rude")))
                await stream.aclose()  # gone before reading the 101: the greeting's write breaks
                await served.wait()
            text = logs.getvalue()
            assert "connection_crashed" not in text, text
            assert "level=info event=connection_closed" in text and "by=peer" in text, text
            assert h.hub.sessions.count("rude") == 0


# -- limits at their exact edges --------------------------------------------------------


@pytest.mark.parametrize("char", ["a", "\u00e9", "\u20ac", "\U0001f600"])  # 1-4 UTF-8 bytes
async def test_message_size_counts_utf8_bytes_exactly(autojump_clock, char):
    limit = 4096
    with trio.fail_after(1):
        async with running_hub(make_config(server={"max_message_bytes": limit})) as h:
            c = await h.connect("user=big")
            head, tail = '{"type":"ping","id":1,"pad":"', '"}'
            room = limit - len(head) - len(tail)
            width = len(char.encode())
            pad = char * (room // width) + "a" * (room % width)
            at_limit = head + pad + tail
            assert len(at_limit.encode()) == limit
            await c.send(at_limit)
            assert await c.receive() == {"type": "pong", "id": 1}
            await c.send(head + pad + "a" + tail)  # one byte over
            frames, close = await c.receive_until_close()
            assert frames == [] and close.code == 1009


async def test_rate_limit_burst_and_strikes_at_their_edges(mock_clock):
    config = make_config(limits={"burst": 3, "messages_per_second": 2.0, "rate_limit_close_after": 4})
    async with running_hub(config) as h:
        c = await h.connect("user=rate")
        await c.send(*(ping(i) for i in range(3)))  # the burst: all answered
        assert [(await c.receive())["type"] for _ in range(3)] == ["pong"] * 3
        await c.send(*(ping(i) for i in range(3, 6)))  # 3 strikes: refused, still open
        refused = [await c.receive() for _ in range(3)]
        assert [(f["code"], f["id"]) for f in refused] == [("rate_limited", i) for i in range(3, 6)]
        mock_clock.jump(0.5)  # one token back: accepted, the strikes start over
        await c.send(ping(6))
        assert await c.receive() == {"type": "pong", "id": 6}
        await c.send(*(ping(i) for i in range(7, 10)))  # 3 strikes again
        assert [(await c.receive())["code"] for _ in range(3)] == ["rate_limited"] * 3
        await c.send(ping(10))  # the 4th consecutive refusal closes
        frames, close = await c.receive_until_close()
        assert frames == [] and (close.code, close.reason) == (1008, "rate limit exceeded repeatedly")


async def test_outbound_queue_takes_exactly_its_bound(autojump_clock):
    bound = 4
    async with running_hub(make_config(limits={"outbound_queue": bound})) as h:
        c = await h.connect("user=slow", lockstep=True)
        conn = h.connection("slow")
        offers = [conn.offer_nowait(Routed(encode("message", n=i), None)) for i in range(bound + 1)]
        assert offers == [Offer.QUEUED] * bound + [Offer.FULL]


async def test_slow_consumer_closed_1013_after_the_messages_it_took(autojump_clock):
    bound = 3
    with trio.fail_after(1):
        async with running_hub(make_config(limits={"outbound_queue": bound})) as h:
            c = await h.connect("user=slow", lockstep=True)  # reads nothing meanwhile
            for i in range(bound):
                assert h.hub.router.route("slow", Routed(encode("note", n=i), None)).delivered == 1
            await trio.testing.wait_all_tasks_blocked()  # the writer is stuck on its write
            result = h.hub.router.route("slow", Routed(encode("note", n=bound), None))
            assert (result.delivered, result.dropped, result.disconnected) == (0, 1, 1)
            frames, close = await c.receive_until_close()
            assert [f["n"] for f in frames] == list(range(bound)) and close.code == 1013


async def test_a_client_that_sends_without_reading_is_slowed_not_closed(autojump_clock):
    """Reply credits: with ``max_inflight`` replies unwritten the server stops reading,
    so the client's write blocks (TCP backpressure); once it reads, every reply comes,
    in order, and the connection stays open."""
    inflight = 4
    config = make_config(limits={"max_inflight": inflight, "burst": 1000})
    with trio.fail_after(1):
        async with running_hub(config) as h:
            c = await h.connect("user=eager", lockstep=True)
            n = 100  # ~200 KB: more than the server reads at once
            async with trio.open_nursery() as nursery:
                sent = trio.Event()

                async def write() -> None:
                    await c.send(*({"type": "ping", "id": i, "pad": "x" * 2000} for i in range(n)))
                    sent.set()

                nursery.start_soon(write)
                await trio.testing.wait_all_tasks_blocked()
                assert not sent.is_set()  # the server stopped reading: credits exhausted
                assert h.connection("eager")._credits == 0
                got = [await c.receive() for _ in range(n)]
                await sent.wait()
            assert got == [{"type": "pong", "id": i} for i in range(n)]
            await c.send(ping(n))
            assert await c.receive() == {"type": "pong", "id": n}
