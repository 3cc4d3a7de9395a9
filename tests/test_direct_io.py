"""The plain-socket paths of server/outbound.py over real sockets (tests/inprocess.py,
``socket=True``): control frames written straight from the caller's task
(``send_control``: the keepalive's ping, the pong to a client's ping) and reads straight
from the socket (``_receive``).  What must hold: a frame written directly arrives whole
and in order; a socket that would block (or takes only part of a frame) falls back to
the queued path without losing or splitting a frame; the closing handshake stays clean;
a reset is the peer's doing.  (A pong keeping the connection is tested over both
transports in test_keepalive.py.)"""

from __future__ import annotations

import orjson
import pytest
import trio
import trio.testing
from wsproto.events import CloseConnection, Ping, Pong, TextMessage

from inprocess import capture_log, make_config, running_hub
from test_keepalive import config
from tidings import log
from tidings.server import outbound
from tidings.server.daemon import PING_FRAME

async def next_control(client) -> object:
    while True:
        event = await client._next_event()
        if isinstance(event, (Ping, Pong)):
            return event
        assert event is not None and not isinstance(event, CloseConnection), event


async def test_a_ping_is_written_directly_and_arrives_whole(autojump_clock):
    async with running_hub(config()) as h:
        c = await h.connect("user=idle", socket=True)
        conn = h.connection("idle")
        await trio.testing.wait_all_tasks_blocked()
        conn.send_control(PING_FRAME)
        assert not conn._writer_running  # written by the caller: no writer task started
        assert not conn._control
        event = await next_control(c)
        assert isinstance(event, Ping) and event.payload == b"tidings"


async def test_a_client_ping_is_answered_directly(autojump_clock):
    async with running_hub(config()) as h:
        c = await h.connect("user=pinger", socket=True)
        conn = h.connection("pinger")
        await c.stream.send_all(c.ws.send(Ping(b"abc")))
        event = await next_control(c)
        assert isinstance(event, Pong) and event.payload == b"abc"
        await trio.testing.wait_all_tasks_blocked()
        assert not conn._writer_running
        await c.send({"type": "ping", "id": 7})  # data still flows after it
        assert await c.receive() == {"type": "pong", "id": 7}


async def test_a_full_socket_falls_back_to_the_queued_path_and_no_frame_is_split(autojump_clock):
    """The client does not read: direct pings fill the socket buffer until one would
    block (or fits only in part); that one and every later one are queued for the
    writer.  Once the client reads, every ping arrives, whole and in order."""
    async with running_hub(config()) as h:
        c = await h.connect("user=full", socket=True)
        conn = h.connection("full")
        await trio.testing.wait_all_tasks_blocked()
        sent = 0
        while not conn._writer_running:  # the first fallback starts the writer
            conn.send_control(PING_FRAME)
            sent += 1
        assert sent > 1  # some went directly before the buffer filled
        for _ in range(5):  # a writer is busy now: these are queued behind the rest
            conn.send_control(PING_FRAME)
            sent += 1
        await c.send({"type": "ping", "id": 1})  # and a reply after them
        pings = 0
        while True:
            event = await c._next_event()
            if isinstance(event, Ping):
                assert event.payload == b"tidings"
                pings += 1
                continue
            break
        assert pings == sent
        assert event.data == '{"type":"pong","id":1}'


async def test_our_close_handshake_stays_clean(autojump_clock):
    async with running_hub(config()) as h:
        # every queued reply, then the close frame; EOF once the peer answers
        c = await h.connect("user=closed", socket=True)
        await c.send({"type": "ping", "id": 1})
        assert await c.receive() == {"type": "pong", "id": 1}
        h.connection("closed").kill(1008, "policy")
        frames, close = await c.receive_until_close()
        assert frames == [] and close.code == 1008
        await c.answer_close(close)
        await c.expect_eof()
        await c.served.wait()
        # the peer's close is echoed at once: test_connection.py, over both transports


async def test_eof_and_reset_are_the_peers_doing(autojump_clock, monkeypatch):
    monkeypatch.setattr(outbound, "_resets", log.LogOnce())  # a reset logged once a minute
    async with running_hub(config()) as h:
        with capture_log() as buf:
            e = await h.connect("user=eof", socket=True)
            await e.stream.send_eof()
            await e.served.wait()
            r = await h.connect("user=reset", socket=True)
            await r.send({"type": "ping", "id": 1})  # unread by the client: close resets
            await trio.testing.wait_all_tasks_blocked()
            r.stream.socket.close()
            await r.served.wait()
        assert h.hub.sessions.count("eof") == 0 and h.hub.sessions.count("reset") == 0
        assert "connection_crashed" not in buf.getvalue()
        assert "level=info event=connection_closed" in buf.getvalue()  # the reset
        assert "by=peer" in buf.getvalue()


# -- helper tasks in the server's nursery (no nursery per connection) -------------------


async def test_a_crashing_helper_task_closes_its_connection_only(autojump_clock, monkeypatch):
    """The writer and the replay run in the server's nursery, not in one per
    connection: a bug in one is logged as that connection's crash and ends it (no more
    writes: half a frame may be out), while the server and other connections go on."""
    drain = outbound.Outbound._drain

    def buggy_drain(self, *, closing):
        if self.user == "buggy" and not closing:
            raise RuntimeError("a bug")
        return drain(self, closing=closing)

    monkeypatch.setattr(outbound.Outbound, "_drain", buggy_drain)
    async with running_hub(config()) as h:
        with capture_log() as buf:
            fine = await h.connect("user=fine", socket=True)
            buggy = await h.connect("user=buggy", socket=True)
            await buggy.send({"type": "ping", "id": 1})  # its reply crashes the writer
            assert await buggy.receive() is None  # EOF, nothing written after the crash
            await buggy.served.wait()
            await fine.send({"type": "ping", "id": 2})
            assert await fine.receive() == {"type": "pong", "id": 2}
        assert "event=connection_crashed" in buf.getvalue() and "a bug" in buf.getvalue()
        assert h.hub.sessions.count("buggy") == 0 and h.hub.sessions.count("fine") == 1


async def test_the_stream_is_closed_only_after_the_helper_tasks_finished(autojump_clock):
    """A replay waiting on the store when the peer leaves is cancelled and waited for
    before the connection's stream is closed (what a nursery per connection did)."""
    async with running_hub(config()) as h:
        c = await h.connect("user=replayer", socket=True)
        conn = h.connection("replayer")
        released = h.store.hold("inbox_state")
        await c.send({"type": "resume", "since": 0, "id": 1})
        await h.store.held["inbox_state"].wait()
        assert conn._children == 1
        await c.aclose()
        await c.served.wait()
        assert conn._children == 0 and conn._child_scopes is None
        assert conn.stream.socket.fileno() == -1
        released.set()


async def test_a_write_larger_than_the_socket_buffer_goes_out_whole_and_in_order(autojump_clock):
    """The writer sends what fits with one direct send and the rest with send_all: a
    receiver that reads only after ~1 MB was routed to it gets every message, whole and
    in order."""
    async with running_hub(config()) as h:
        receiver = await h.connect("user=big", socket=True)
        sender = await h.connect("user=sender", socket=True)
        body = "x" * 16000
        n = 64
        for i in range(n):
            await sender.send({"type": "send", "to": "big", "body": f"{i}:{body}", "id": i})
        acks = [await sender.receive() for _ in range(n)]
        assert [a["type"] for a in acks] == ["ack"] * n
        await trio.testing.wait_all_tasks_blocked()
        assert h.connection("big")._writer_running  # blocked in send_all: the rest
        got, parts = [], []
        while len(got) < n:  # big frames arrive in parts: put each message together
            event = await receiver._next_event()
            assert isinstance(event, TextMessage), event
            parts.append(event.data)
            if event.message_finished:
                got.append(orjson.loads("".join(parts)))
                parts = []
        assert [m["body"] for m in got] == [f"{i}:{body}" for i in range(n)]


# -- the request head (server/daemon.py: a read straight on the socket first) ------------

HEAD = (b"GET /ws?user=%s HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


async def read_to_eof(stream) -> bytes:
    out = b""
    while data := await stream.receive_some(65536):
        out += data
    return out


@pytest.mark.parametrize("socket", [False, True], ids=["memory-stream", "socket"])
async def test_a_request_head_in_pieces_is_answered_once_whole(autojump_clock, socket):
    """The first read finds part of the head; the rest is waited for."""
    async with running_hub(config()) as h:
        stream, _ = h.serve(socket=socket)
        head = HEAD % b"pieces"
        for part in (head[:10], head[10:60]):
            await stream.send_all(part)
            await trio.testing.wait_all_tasks_blocked()
            assert h.hub.sessions.count("pieces") == 0  # not answered early
        await stream.send_all(head[60:])
        got = b""
        while b"\r\n\r\n" not in got:
            got += await stream.receive_some(65536)
        assert got.startswith(b"HTTP/1.1 101 ")
        assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in got  # RFC 6455's example key's answer
        assert h.hub.sessions.count("pieces") == 1


@pytest.mark.parametrize("socket", [False, True], ids=["memory-stream", "socket"])
@pytest.mark.parametrize("sent", [b"", HEAD[:30]], ids=["nothing", "part-of-the-head"])
async def test_a_stalled_head_gets_408_at_the_handshake_timeout(autojump_clock, socket, sent):
    async with running_hub(make_config(server={"handshake_timeout_s": 3.0})) as h:
        stream, served = h.serve(socket=socket)
        start = trio.current_time()
        if sent:
            await stream.send_all(sent)
        answer = await read_to_eof(stream)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert 3.0 <= trio.current_time() - start < 3.5
        await served.wait()


@pytest.mark.parametrize("socket", [False, True], ids=["memory-stream", "socket"])
async def test_a_malformed_head_gets_400(autojump_clock, socket):
    async with running_hub(config()) as h:
        stream, served = h.serve(socket=socket)
        await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        assert (await read_to_eof(stream)).startswith(b"HTTP/1.1 400 ")
        await served.wait()
