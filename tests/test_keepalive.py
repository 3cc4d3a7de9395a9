"""The housekeeper's keepalive (server/daemon.py) and the writer after a ping, in process
with a mock clock: when a quiet peer is pinged, that a pong keeps it, that a silent one
is reaped, and that an idle connection keeps no writer task after its ping."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from wsproto.events import CloseConnection, Ping

from inprocess import make_config, running_hub
from tidings.server.daemon import PING_FRAME

INTERVAL = 20.0
IDLE_TIMEOUT = 60.0


def config():
    return make_config(server={"ping_interval_s": INTERVAL, "idle_timeout_s": IDLE_TIMEOUT})


async def next_ping(client) -> float:
    """Wait for the server's ping; the mock time it arrived."""
    while True:
        event = await client._next_event()
        if isinstance(event, Ping):
            return trio.current_time()
        assert event is not None and not isinstance(event, CloseConnection), event


async def test_a_quiet_peer_is_pinged_in_the_last_eighth_of_the_interval(autojump_clock):
    async with running_hub(config()) as h:
        h.nursery.start_soon(h.server.housekeeper)
        clients = [await h.connect(f"user=u{i}") for i in range(16)]
        start = trio.current_time()
        pinged: list[float] = []

        async def record(client) -> None:  # each reads on its own: the time it arrived
            pinged.append(await next_ping(client) - start)

        async with trio.open_nursery() as nursery:
            for c in clients:
                nursery.start_soon(record, c)
        # checked once a second: between 7/8 of the interval and the interval, plus a tick
        assert all(0.875 * INTERVAL <= t <= INTERVAL + 1.0 for t in pinged), pinged
        assert len({round(t) for t in pinged}) > 1, "every connection pinged in the same second"


@pytest.mark.parametrize("socket", [False, True], ids=["memory-stream", "socket"])
async def test_a_pong_keeps_the_connection_and_a_silent_peer_is_reaped(autojump_clock, socket):
    """Over a real socket pings are written directly: no writer task is started for one."""
    async with running_hub(config()) as h:
        h.nursery.start_soon(h.server.housekeeper)
        answering = await h.connect("user=answers", socket=socket)
        silent = await h.connect("user=silent", socket=socket)
        conn = h.connection("answers")
        start = trio.current_time()
        for _ in range(4):  # 4 pings answered: well past the idle timeout
            await next_ping(answering)
            assert not (socket and conn._writer_running)
            await answering.stream.send_all(answering.ws.send(Ping(b"tidings").response()))
        assert trio.current_time() - start > IDLE_TIMEOUT
        assert h.hub.sessions.count("answers") == 1
        frames, close = await silent.receive_until_close()
        assert isinstance(close, CloseConnection) and close.code == 1001
        assert h.hub.sessions.count("silent") == 0


async def test_the_writer_does_not_linger_after_a_ping(autojump_clock):
    async with running_hub(config()) as h:
        c = await h.connect("user=idle")
        conn = h.connection("idle")
        await trio.testing.wait_all_tasks_blocked()
        conn.queue_control(PING_FRAME)
        await next_ping(c)
        await trio.testing.wait_all_tasks_blocked()  # no clock advance: no linger timeout ran
        assert not conn._writer_running


async def test_the_writer_lingers_after_data():
    # the linger is for traffic: after a reply the writer waits for more (real clock,
    # checked right after the reply arrives)
    async with running_hub(config()) as h:
        c = await h.connect("user=busy")
        conn = h.connection("busy")
        await c.send({"type": "ping", "id": 1})
        assert (await c.receive())["type"] == "pong"
        await trio.testing.wait_all_tasks_blocked()
        assert conn._writer_running


async def test_an_expiry_moved_earlier_is_seen_on_the_next_tick(autojump_clock):
    # the housekeeper looks at a connection only when it may be due: a refresh that
    # moves `exp` earlier must say so (Connection.exp's setter), or it would be seen
    # only at the next ping
    import time

    async with running_hub(config()) as h:
        h.nursery.start_soon(h.server.housekeeper)
        c = await h.connect("user=refreshed")
        await trio.sleep(3.5)
        start = trio.current_time()
        h.connection("refreshed").exp = time.time() - 1.0  # as `refresh` sets it
        frames, close = await c.receive_until_close()
        assert close is not None and close.code == 1008
        assert trio.current_time() - start <= 1.0
