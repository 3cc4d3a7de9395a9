"""End-to-end tests against the real daemon subprocess (issue #2's list).

Clients are tidings.client; where that cannot produce (or observe) the bytes in
question, a raw TCP socket speaks HTTP / WebSocket by hand (wsproto for framing).
Every wait is bounded; user ids are unique per test (``uniq``) because the store
replays undelivered messages on connect.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import struct
import time

import jwt
import orjson
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (AcceptConnection, CloseConnection, RejectConnection,
                            RejectData, Request, TextMessage)

from tidings.client import (ConnectionClosedError, HandshakeRefused, ServerError,
                            open_client)

T = 10  # default bound for a single wait


# -- raw-socket helpers ------------------------------------------------------------------
async def raw_upgrade(port: int, target: str, headers: dict[str, str] | None = None,
                      timeout: float = 5.0) -> tuple[str, dict[str, str], bytes]:
    """Send a WebSocket upgrade request by hand; return (status line, headers, body)."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = await stream.receive_some(65536)
                assert chunk, f"connection closed before response headers: {buf!r}"
                buf += chunk
            head, _, rest = buf.partition(b"\r\n\r\n")
            status, *hlines = head.decode("latin-1").split("\r\n")
            hdrs = {k.strip().lower(): v.strip()
                    for k, _, v in (h.partition(":") for h in hlines)}
            if " 101 " in status + " ":
                return status, hdrs, b""
            if "content-length" in hdrs:
                n = int(hdrs["content-length"])
                while len(rest) < n:
                    chunk = await stream.receive_some(65536)
                    assert chunk, "connection closed mid-body"
                    rest += chunk
                return status, hdrs, rest[:n]
            if "chunked" in hdrs.get("transfer-encoding", "").lower():
                while not rest.endswith(b"0\r\n\r\n"):
                    chunk = await stream.receive_some(65536)
                    assert chunk, "connection closed mid-chunked-body"
                    rest += chunk
                body, data = b"", rest
                while True:
                    size_line, _, data = data.partition(b"\r\n")
                    size = int(size_line.split(b";")[0], 16)
                    if size == 0:
                        return status, hdrs, body
                    body, data = body + data[:size], data[size + 2:]
            while chunk := await stream.receive_some(65536):  # body until EOF
                rest += chunk
            return status, hdrs, rest


async def assert_raw_refusal(port: int, target: str, code: int,
                             headers: dict[str, str] | None = None) -> str:
    status, _, body = await raw_upgrade(port, target, headers)
    assert re.match(rf"HTTP/1\.[01] {code}\b", status), status
    assert " 101 " not in status + " "
    text = body.decode("utf-8").strip()
    assert text and "\n" not in text, f"want a one-line reason body, got {body!r}"
    return text


def ws_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame built by hand (lets us send invalid UTF-8 in a text frame)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawWS:
    """A WebSocket client on a bare trio socket; reads only when asked to."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list = []

    @classmethod
    async def connect(cls, port: int, target: str, rcvbuf: int | None = None) -> "RawWS":
        sock = trio.socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        with trio.fail_after(T):
            await sock.connect(("127.0.0.1", port))
            self = cls(trio.SocketStream(sock))
            await self.stream.send_all(self.ws.send(Request(host=f"127.0.0.1:{port}",
                                                            target=target)))
            while True:
                data = await self.stream.receive_some(4096)
                assert data, "closed during handshake"
                self.ws.receive_data(data)
                for ev in self.ws.events():
                    if isinstance(ev, (RejectConnection, RejectData)):
                        raise AssertionError(f"handshake rejected: {ev}")
                    if isinstance(ev, AcceptConnection):
                        self.events.extend(self.ws.events())
                        return self

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def read_until_close(self, timeout: float = T) -> tuple[int | None, list]:
        """Read everything until a close frame or EOF/reset; return (close code, events)."""
        with trio.fail_after(timeout):
            while True:
                for ev in self.ws.events():
                    self.events.append(ev)
                    if isinstance(ev, CloseConnection):
                        return ev.code, self.events
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:  # connection reset
                    return None, self.events
                if not data:
                    return None, self.events
                self.ws.receive_data(data)

    async def aclose(self) -> None:
        await self.stream.aclose()


# -- messaging ---------------------------------------------------------------------------
async def test_two_users_chat(daemon, uniq):
    alice, bob = uniq("alice"), uniq("bob")
    async with open_client(daemon.url, token=daemon.token(alice)) as a, \
            open_client(daemon.url, headers={"Authorization": f"Bearer {daemon.token(bob)}"}) as b:
        assert (a.user, b.user) == (alice, bob)
        assert a.conn and b.conn and a.conn != b.conn
        before = time.time() * 1000
        ack = await a.send(bob, {"text": "hi bob", "n": [1, 2.5, None]}, id="m1")
        assert ack["type"] == "ack" and ack["id"] == "m1"
        assert ack["delivered"] == 1
        assert isinstance(ack["msg_id"], str) and ack["msg_id"]
        assert isinstance(ack["seq"], int)
        msg = await b.receive_message(timeout=T)
        assert msg["from"] == alice and msg["to"] == bob
        assert msg["body"] == {"text": "hi bob", "n": [1, 2.5, None]}
        assert msg["msg_id"] == ack["msg_id"]
        assert isinstance(msg["seq"], int)
        assert before - 60_000 <= msg["ts"] <= time.time() * 1000 + 60_000
        # and back
        ack2 = await b.send(alice, "hello alice")
        assert ack2["delivered"] == 1 and ack2["msg_id"] != ack["msg_id"]
        back = await a.receive_message(timeout=T)
        assert (back["from"], back["to"], back["body"]) == (bob, alice, "hello alice")


async def test_from_cannot_be_spoofed(daemon, uniq):
    alice, bob = uniq("alice"), uniq("bob")
    async with open_client(daemon.url, token=daemon.token(alice)) as a, \
            open_client(daemon.url, token=daemon.token(bob)) as b:
        ack = await a.request({"type": "send", "to": bob, "from": "mallory",
                               "body": "trust me", "id": "s1"})
        assert ack["type"] == "ack"
        msg = await b.receive_message(timeout=T)
        assert msg["from"] == alice and msg["body"] == "trust me"


async def test_multi_device_fan_out(daemon, uniq):
    alice, bob = uniq("alice"), uniq("bob")
    async with open_client(daemon.url, token=daemon.token(alice)) as a, \
            open_client(daemon.url, token=daemon.token(bob)) as b1, \
            open_client(daemon.url, token=daemon.token(bob)) as b2, \
            open_client(daemon.url, token=daemon.token(bob)) as b3:
        assert len({b1.conn, b2.conn, b3.conn}) == 3
        ack1 = await a.send(bob, "one")
        assert ack1["delivered"] == 3
        ack2 = await a.send(bob, "two")
        for dev in (b1, b2, b3):
            # exactly once each: the message after "one" is "two", not a duplicate
            got = await dev.messages(2, timeout=T)
            assert [m["body"] for m in got] == ["one", "two"]
            assert [m["msg_id"] for m in got] == [ack1["msg_id"], ack2["msg_id"]]
            assert [f for f in dev.drain() if f.get("type") == "message"] == []


async def test_offline_recipient(daemon, uniq):
    async with open_client(daemon.url, token=daemon.token(uniq("alice"))) as a:
        ack = await a.send(uniq("nobody"), "are you there?")
        assert ack["delivered"] == 0 and ack["msg_id"]


async def test_ping_pong_echoes_id(daemon, uniq):
    async with open_client(daemon.url, token=daemon.token(uniq("alice"))) as a:
        assert (await a.ping(id="p-42"))["type"] == "pong"
        assert (await a.ping(id="p-42"))["id"] == "p-42"
        assert (await a.ping(id=7))["id"] == 7


# -- handshake refusals --------------------------------------------------------------------
async def _refused(url: str, **kw) -> HandshakeRefused:
    with pytest.raises(HandshakeRefused) as info:
        async with open_client(url, connect_timeout=T, **kw):
            pass
    return info.value


async def test_auth_refusals(daemon, uniq):
    user = uniq("alice")
    forged = jwt.encode({"sub": user, "iat": int(time.time()),
                         "exp": int(time.time()) + 600}, "wrong-secret-" + "x" * 32,
                        algorithm="HS256")
    cases = {
        "no token": None,
        "bad signature": forged,
        "expired": daemon.token(user, ttl=-120),
        "malformed": "not-a.jwt.token",
    }
    for label, token in cases.items():
        err = await _refused(daemon.url, token=token)
        assert err.status_code == 401, label
        assert err.reason_text, label
        target = "/ws" if token is None else f"/ws?token={token}"
        await assert_raw_refusal(daemon.port, target, 401)
    # the Authorization header path is checked too
    await assert_raw_refusal(daemon.port, "/ws", 401, {"Authorization": f"Bearer {forged}"})


async def test_wrong_path_404(daemon, uniq):
    token = daemon.token(uniq("alice"))
    err = await _refused(daemon.url.replace("/ws", "/nope"), token=token)
    assert err.status_code == 404
    await assert_raw_refusal(daemon.port, f"/nope?token={token}", 404)


async def test_connection_limits(start_daemon, uniq):
    d = start_daemon(limits={"max_connections": 4, "max_connections_per_user": 2})
    alice, bob, carol = uniq("alice"), uniq("bob"), uniq("carol")
    async with open_client(d.url, token=d.token(alice)) as a1, \
            open_client(d.url, token=d.token(alice)):
        err = await _refused(d.url, token=d.token(alice))
        assert err.status_code == 429
        await assert_raw_refusal(d.port, f"/ws?token={d.token(alice)}", 429)
        async with open_client(d.url, token=d.token(bob)), \
                open_client(d.url, token=d.token(bob)):
            err = await _refused(d.url, token=d.token(carol))
            assert err.status_code == 503
            await assert_raw_refusal(d.port, f"/ws?token={d.token(carol)}", 503)
            assert (await a1.ping())["type"] == "pong"
        # slots are released when connections close
        with trio.fail_after(T):
            while True:
                try:
                    async with open_client(d.url, token=d.token(carol)) as c:
                        assert c.user == carol
                        break
                except HandshakeRefused as exc:
                    assert exc.status_code == 503
                    await trio.sleep(0.05)


async def test_insecure_mode_user_param(start_daemon, uniq):
    d = start_daemon(auth={"mode": "insecure", "secret": ""})
    user = uniq("dave")
    async with open_client(d.url, user=user) as c:
        assert c.user == user
        assert (await c.ping())["type"] == "pong"


# -- bad frames ---------------------------------------------------------------------------
async def test_bad_frames_get_error_and_connection_stays_usable(daemon, uniq):
    bob = uniq("bob")
    async with open_client(daemon.url, token=daemon.token(uniq("alice"))) as a:
        raw_cases = [
            ("not json", "this is { not json", "bad_request"),
            ("array", "[1, 2, 3]", "bad_request"),
            ("string", '"send"', "bad_request"),
        ]
        for label, data, code in raw_cases:
            await a.send_frame(data)
            err = await a.wait_for(lambda f: f.get("type") in ("error", "_invalid"), timeout=T)
            assert err["type"] == "error", f"{label}: reply is not a JSON text frame: {err}"
            assert err["code"] == code, (label, err)
            assert isinstance(err.get("message"), str), (label, err)
            assert (await a.ping(id=f"after-{label}"))["type"] == "pong", label

        frame_cases = [
            ("unknown type", {"type": "frobnicate"}, "unknown_type"),
            ("missing to", {"type": "send", "body": "x"}, "bad_request"),
            ("to not a string", {"type": "send", "to": 42, "body": "x"}, "bad_request"),
            ("to is a list", {"type": "send", "to": [bob], "body": "x"}, "bad_request"),
            ("missing body", {"type": "send", "to": bob}, "bad_request"),
        ]
        for i, (label, frame, code) in enumerate(frame_cases):
            with pytest.raises(ServerError) as info:
                await a.request({**frame, "id": f"bad-{i}"}, timeout=T)
            assert info.value.code == code, (label, info.value.frame)
            assert info.value.frame.get("id") == f"bad-{i}", label
            assert (await a.ping())["type"] == "pong", label
        assert a.closed_code is None


async def test_binary_frame_is_read_as_messagepack_and_answered_in_binary(daemon, uniq):
    """docs/protocol.md §2: a binary message is a MessagePack envelope, answered in kind;
    JSON bytes in a binary frame are not MessagePack: a binary bad_request error."""
    import msgpack
    from trio_websocket import open_websocket_url

    async with open_websocket_url(f"{daemon.url}?token={daemon.token(uniq('bin'))}") as ws:
        assert orjson.loads(await ws.get_message())["type"] == "hello"  # pushes stay JSON
        assert orjson.loads(await ws.get_message())["type"] == "resumed"
        await ws.send_message(orjson.dumps({"type": "ping", "id": "b1"}))  # bytes: binary frame
        err = msgpack.unpackb(await ws.get_message())
        assert (err["type"], err["code"]) == ("error", "bad_request")
        await ws.send_message(msgpack.packb({"type": "ping", "id": "b2"}))
        assert msgpack.unpackb(await ws.get_message()) == {"type": "pong", "id": "b2"}
        await ws.send_message('{"type":"ping","id":"t3"}')  # and text is still JSON
        assert orjson.loads(await ws.get_message()) == {"type": "pong", "id": "t3"}


async def test_oversize_frame_closes_1009(start_daemon, uniq):
    d = start_daemon(server={"max_message_bytes": 4096})
    bob = uniq("bob")
    async with open_client(d.url, token=d.token(uniq("alice"))) as a, \
            open_client(d.url, token=d.token(bob)) as b:
        ok = await a.send(bob, "x" * 3000)  # under the limit
        assert ok["delivered"] == 1
        await a.send_frame({"type": "send", "to": bob, "body": "x" * 5000})
        assert await a.wait_closed(timeout=T) == 1009
        assert (await b.ping())["type"] == "pong"  # others unaffected


async def test_invalid_utf8_text_frame_closes_1007(daemon, uniq):
    raw = await RawWS.connect(daemon.port, f"/ws?token={daemon.token(uniq('alice'))}")
    try:
        await raw.send_raw(ws_frame(0x1, b'{"type":"ping","id":"\xff\xfe"}'))
        code, events = await raw.read_until_close(timeout=T)
        assert code == 1007, events
    finally:
        await raw.aclose()


async def test_flood_is_rate_limited(start_daemon, uniq):
    # No refill during the test (0.01 token/s): exactly the burst is accepted.
    d = start_daemon(limits={"messages_per_second": 0.01, "burst": 5})
    bob = uniq("bob")
    async with open_client(d.url, token=d.token(uniq("alice"))) as a:
        ids = [f"f{i}" for i in range(30)]
        for fid in ids:
            await a.send_frame({"type": "send", "to": bob, "body": fid, "id": fid})
        # one reply per frame: an ack (once stored, so possibly after later errors) or
        # an error.  Contract: every client frame may carry "id", echoed in the reply --
        # also in rate_limited errors, otherwise a client cannot tell which was refused.
        replies = [await a.wait_for(lambda f: f.get("type") in ("ack", "error"), timeout=T)
                   for _ in ids]
        by_id = {r["id"]: r for r in replies}
        assert sorted(by_id) == sorted(ids) and len(replies) == len(ids)
        assert [by_id[fid]["type"] for fid in ids] == ["ack"] * 5 + ["error"] * 25
        assert {(by_id[fid]["code"], by_id[fid]["message"]) for fid in ids[5:]} == {
            ("rate_limited", "more than 0.01 frames/s; retry later")}
        assert a.closed_code is None  # 25 strikes < rate_limit_close_after (100)


def ping_frames(n: int) -> bytes:
    return b"".join(ws_frame(0x1, b'{"type":"ping","id":%d}' % i) for i in range(n))


async def test_flood_closed_1008_gets_every_reply_then_the_close_frame_then_eof(start_daemon, uniq):
    """Issue #9's repro: 3,000 pings in one write, burst 50.  The daemon closes with
    1008 while the client is still sending; the client must get every reply queued
    before the close, the close frame, then EOF -- never a TCP reset (the daemon reads
    and drops the rest of the input instead of closing with it unread)."""
    d = start_daemon(limits={"burst": 50, "messages_per_second": 0.01})
    raw = await RawWS.connect(d.port, f"/ws?token={d.token(uniq('flood'))}")
    sock = raw.stream.socket
    frames, close, eof = [], None, False
    with trio.fail_after(T):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(raw.send_raw, ping_frames(3000))
            while not eof:
                data = await sock.recv(65536)  # a reset would raise ConnectionResetError
                if not data:
                    eof = True
                    break
                assert close is None, f"data after the close frame: {data[:80]!r}"
                raw.ws.receive_data(data)
                for ev in raw.ws.events():
                    if isinstance(ev, CloseConnection):
                        close = ev
                    elif isinstance(ev, TextMessage):
                        frames.append(orjson.loads(ev.data))
    await raw.aclose()
    assert [f["id"] for f in frames] == list(range(149)), "a reply is missing"
    assert [f["type"] for f in frames] == ["pong"] * 50 + ["error"] * 99  # the 100th strike closes
    assert close is not None and (close.code, close.reason) == (1008, "rate limit exceeded repeatedly")
    assert eof
    assert "event=connection_crashed" not in d.log_text()


def test_websockets_client_sees_the_close_frame_after_every_reply(start_daemon, uniq):
    """The same flood from the `websockets` client: it receives every reply and the
    close frame (not "no close frame received or sent"), then EOF (no reset).

    The flood is written under the client's own lock (``send_context``, the pattern its
    ``send`` uses), so the client cannot handle the daemon's close while the flood is
    still being sent.  With one ``ws.send`` per ping it could: its reader thread,
    paused with 16 unread replies (``max_queue``), then waits for ``recv`` while ``send``
    waits ``close_timeout`` for the reader -- a deadlock inside the client (seen 1 run in
    3: "timed out while closing connection", the daemon's FIN unread in CLOSE-WAIT)."""
    from websockets.exceptions import ConnectionClosedError
    from websockets.sync.client import connect

    d = start_daemon(limits={"burst": 50, "messages_per_second": 0.01})
    with connect(f"{d.url}?token={d.token(uniq('flood'))}", open_timeout=T, close_timeout=T) as ws:
        assert [json_type(ws.recv(timeout=T)) for _ in range(2)] == ["hello", "resumed"]
        with ws.send_context():
            for i in range(3000):
                ws.protocol.send_text(b'{"type":"ping","id":%d}' % i)
        replies = []
        with pytest.raises(ConnectionClosedError) as closed:
            while True:
                replies.append(orjson.loads(ws.recv(timeout=T)))
    assert [r["id"] for r in replies] == list(range(149)), "a reply is missing"
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    # the reader thread ended on EOF: no reset, no close timeout (either is the cause)
    assert closed.value.__cause__ is None, repr(closed.value.__cause__)


def json_type(text: str | bytes) -> str:
    return orjson.loads(text)["type"]


async def test_a_peer_reset_is_a_close_by_the_peer_not_a_crash(daemon, uniq):
    raw = await RawWS.connect(daemon.port, f"/ws?token={daemon.token(uniq('rst'))}")
    sock = raw.stream.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # linger 0: an RST right after the 101
    line = await daemon.wait_for_log(r"event=connection_closed .*by=peer", timeout=T)
    assert "level=info" in line and "error=\"connection reset\"" in line, line
    assert "event=connection_crashed" not in daemon.log_text()


# -- slow consumer ------------------------------------------------------------------------
async def test_slow_consumer_disconnected_others_keep_going(start_daemon, uniq):
    d = start_daemon(limits={"outbound_queue": 8, "messages_per_second": 100000.0,
                             "burst": 100000})
    alice, bob, carol = uniq("alice"), uniq("bob"), uniq("carol")
    body = "y" * 32 * 1024
    async with open_client(d.url, token=d.token(alice)) as a, \
            open_client(d.url, token=d.token(bob)) as bob_fast, \
            open_client(d.url, token=d.token(carol)) as c:
        # bob's second device: a bare socket with a tiny receive buffer that never reads
        slow = await RawWS.connect(d.port, f"/ws?token={d.token(bob)}", rcvbuf=4096)
        try:
            sent = 0
            received_fast = 0
            with trio.fail_after(30):
                while not re.search(r"event=slow_consumer", d.log_text()):
                    assert sent < 600, "no event=slow_consumer after 600 x 32 KiB"
                    ack = await a.send(bob, {"n": sent, "pad": body})
                    assert ack["delivered"] >= 1
                    sent += 1
                    msg = await bob_fast.receive_message(timeout=T)
                    assert msg["body"]["n"] == received_fast
                    received_fast += 1
                    if sent % 20 == 0:
                        await a.send(carol, {"n": sent})
                        assert (await c.receive_message(timeout=T))["body"] == {"n": sent}
            # after the slow device is dropped, everybody else keeps going
            await d.wait_for_log(r"event=slow_consumer", timeout=T)
            for _ in range(10):
                await a.send(bob, {"n": sent, "pad": "z"})
                assert (await bob_fast.receive_message(timeout=T))["body"]["n"] == sent
                sent += 1
            ack = await a.send(carol, "still here")
            assert ack["delivered"] == 1
            assert (await c.receive_message(timeout=T))["body"] == "still here"
            assert (await a.ping())["type"] == "pong"
            # the slow socket: whatever was buffered, then close 1013 (or at least EOF)
            # (a peer that never reads cannot always be sent the close frame: after its
            # close timeout the server drops TCP, so EOF/reset is accepted too)
            code, events = await slow.read_until_close(timeout=T)
            assert code in (1013, None), code
        finally:
            await slow.aclose()


# -- token lifetime -------------------------------------------------------------------------
async def test_token_expiry_closes_1008_unless_refreshed(daemon, uniq):
    alice, bob = uniq("alice"), uniq("bob")
    bob_token = daemon.token(bob, ttl=2)  # minted first: it expires no later than alice's
    async with open_client(daemon.url, token=bob_token) as b, \
            open_client(daemon.url, token=daemon.token(alice, ttl=2)) as a:
        reply = await b.refresh(daemon.token(bob, ttl=60))
        assert reply["type"] == "refreshed"
        assert reply["exp"] >= time.time() + 50
        # The housekeeper closes alice once her exp passed; in that same pass bob's old
        # exp had passed too, so he is still open only because of the refresh.
        assert await a.wait_closed(timeout=6) == 1008
        assert a.closed_reason == "token expired"
        assert b.closed_code is None
        assert (await b.ping())["type"] == "pong"


async def test_refresh_with_other_sub_is_forbidden(daemon, uniq):
    alice = uniq("alice")
    async with open_client(daemon.url, token=daemon.token(alice)) as c:
        with pytest.raises(ServerError) as info:
            await c.refresh(daemon.token(uniq("mallory")))
        assert info.value.code == "forbidden"
        with pytest.raises(ServerError) as info:
            await c.refresh(daemon.token(alice, ttl=-120))  # expired token
        assert info.value.code in ("forbidden", "bad_request")


# -- shutdown ---------------------------------------------------------------------------------
async def test_sigterm_closes_clients_1001_and_exits_0(start_daemon, uniq):
    grace = 2.0
    d = start_daemon(server={"shutdown_grace_s": grace})
    async with open_client(d.url, token=d.token(uniq("alice"))) as a, \
            open_client(d.url, token=d.token(uniq("bob"))) as b:
        start = time.monotonic()
        rc = await d.aterminate(timeout=grace + 5)
        elapsed = time.monotonic() - start
        assert rc == 0, d.log_text()
        assert elapsed < grace + 3, elapsed
        assert await a.wait_closed(timeout=T) == 1001
        assert await b.wait_closed(timeout=T) == 1001
        with pytest.raises(ConnectionClosedError):
            await a.ping()
