"""End to end, issue #4: the server API, metrics, rooms, watches, binary frames and
permessage-deflate, against the real daemon subprocess with real HTTP/WebSocket clients."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys

import msgpack
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

from conftest import TEST_API_KEY, write_toml
from tidings.client import ServerError, open_client


def api(d, method: str, path: str, body=None, *, key: str | None = TEST_API_KEY,
        raw: bytes | None = None, headers: dict[str, str] | None = None):
    """One HTTP request to the daemon's API port: (status, parsed JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", d.api_port, timeout=10)
    headers = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    ctype = resp.getheader("content-type", "")
    return resp.status, json.loads(payload) if "json" in ctype else payload.decode()


async def aapi(d, *args, **kwargs):
    return await trio.to_thread.run_sync(lambda: api(d, *args, **kwargs))


def metrics(d) -> dict[str, float]:
    status, text = api(d, "GET", "/metrics", key=None)
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


# -- the server API ----------------------------------------------------------------------


async def test_api_send_reaches_every_device_and_is_stored(daemon, uniq):
    bob = uniq("bob")
    async with open_client(daemon.url, token=daemon.token(bob)) as b1, \
            open_client(daemon.url, token=daemon.token(bob)) as b2:
        status, body = await aapi(daemon, "POST", "/api/send", {"to": bob, "body": {"x": 1}, "from": "billing"})
        assert status == 202
        assert body["delivered"] == 2 and body["seq"] == 1 and body["msg_id"]
        for b in (b1, b2):
            m = await b.receive_message()
            assert (m["from"], m["to"], m["body"], m["msg_id"]) == ("billing", bob, {"x": 1}, body["msg_id"])
    # stored: an offline send is replayed later
    status, body = await aapi(daemon, "POST", "/api/send", {"to": bob, "body": "later"})
    assert status == 202 and body["delivered"] == 0
    async with open_client(daemon.url, token=daemon.token(bob), since=1) as b:
        m = await b.receive_message()
        assert (m["from"], m["body"]) == ("api", "later")


async def test_api_broadcast_and_presence_and_disconnect(daemon, uniq):
    bob, carol, dave = uniq("bob"), uniq("carol"), uniq("dave")
    async with open_client(daemon.url, token=daemon.token(bob)) as b, \
            open_client(daemon.url, token=daemon.token(carol)) as c:
        status, body = await aapi(daemon, "POST", "/api/broadcast", {"users": [bob, carol, dave], "body": "all"})
        assert status == 202
        assert [(r["user"], r["delivered"]) for r in body["results"]] == [(bob, 1), (carol, 1), (dave, 0)]
        assert (await b.receive_message())["body"] == "all"
        assert (await c.receive_message())["body"] == "all"
        status, body = await aapi(daemon, "GET", f"/api/presence?user={bob}&user={dave}")
        assert status == 200
        assert body["users"][bob] == {"online": True, "connections": 1, "devices": ["default"],
                                      "last_seen": None}
        assert body["users"][dave]["online"] is False
        status, body = await aapi(daemon, "POST", "/api/disconnect", {"user": bob})
        assert (status, body) == (200, {"closed": 1})
        assert await b.wait_closed() == 1008
        assert (await c.ping())["type"] == "pong"  # carol is untouched


@pytest.mark.parametrize(
    ("method", "path", "body", "key", "status", "error"),
    [
        ("POST", "/api/send", {"to": "bob", "body": 1}, None, 401, "missing Authorization: Bearer <api key>"),
        ("POST", "/api/send", {"to": "bob", "body": 1}, "wrong", 403, "wrong API key"),
        ("GET", "/api/presence?user=bob", None, "wrong", 403, "wrong API key"),
        ("POST", "/api/send", {"body": 1}, TEST_API_KEY, 400, "'to' must be a user id"),
        ("POST", "/api/send", {"to": "bob"}, TEST_API_KEY, 400, "'body' is required"),
        ("POST", "/api/send", {"to": "bob", "body": 1, "from": ""}, TEST_API_KEY, 400, "'from' must be a user id"),
        ("POST", "/api/send", [1], TEST_API_KEY, 400, "body must be a JSON object"),
        ("POST", "/api/broadcast", {"users": [], "body": 1}, TEST_API_KEY, 400,
         "'users' must be a list of 1-1000 user ids"),
        ("POST", "/api/disconnect", {"user": 5}, TEST_API_KEY, 400, "'user' must be a user id"),
        ("GET", "/api/presence", None, TEST_API_KEY, 400, "give 1-100 ?user= parameters"),
        ("GET", "/api/send", None, TEST_API_KEY, 405, "no GET /api/send"),
        ("GET", "/api/nope", None, TEST_API_KEY, 404, "no GET /api/nope"),
        ("GET", "/nope", None, TEST_API_KEY, 404, "no such endpoint /nope"),
    ],
)
def test_api_refusals(daemon, method, path, body, key, status, error):
    assert api(daemon, method, path, body, key=key) == (status, {"error": error})


def test_api_bad_json_and_oversize_body(start_daemon):
    d = start_daemon(api={"max_body_bytes": 64})
    status, body = api(d, "POST", "/api/send", raw=b'{"to": "bob", "body":')
    assert status == 400 and body["error"].startswith("body is not valid JSON")
    status, body = api(d, "POST", "/api/send", raw=b'{"to":"bob","body":"' + b"x" * 100 + b'"}')
    assert (status, body) == (413, {"error": "body larger than 64 bytes"})


def test_api_keep_alive_serves_several_requests_on_one_connection(daemon):
    conn = http.client.HTTPConnection("127.0.0.1", daemon.api_port, timeout=10)
    for _ in range(3):
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
    conn.close()


def test_api_slow_request_is_dropped_after_the_timeout(start_daemon):
    d = start_daemon(api={"request_timeout_s": 0.5})
    with socket.create_connection(("127.0.0.1", d.api_port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
        assert s.recv(100) == b""  # closed by the daemon, no answer


def test_healthz_is_the_same_check_on_both_ports(daemon):
    """One /healthz: the WebSocket port answers what the API port answers (failures
    and shutdown are tested in process, tests/test_health.py)."""
    status, body = api(daemon, "GET", "/healthz", key=None)
    assert (status, body) == (200, {"status": "ok", "node": socket.gethostname(), "store": "ok",
                                    "cluster": None, "connections": 0, "shutting_down": False})
    # /metrics names the node too
    assert metrics(daemon)[f"tidings_node_info{{node={socket.gethostname()}}}"] == 1
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    conn.request("GET", "/healthz")
    resp = conn.getresponse()
    assert (resp.status, resp.getheader("content-type")) == (200, "application/json")
    assert json.loads(resp.read()) == body
    conn.close()


def test_cli_send_and_presence_call_the_api(start_daemon, tmp_path):
    d = start_daemon()
    cfg = dict(d.config, api={"listen": f"127.0.0.1:{d.api_port}", "key": TEST_API_KEY})
    path = write_toml(tmp_path / "cli.toml", cfg)
    out = subprocess.run([sys.executable, "-m", "tidings", "send", "zed", "hi zed", "--config", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    sent = json.loads(out.stdout)
    assert sent["seq"] == 1 and sent["delivered"] == 0
    out = subprocess.run([sys.executable, "-m", "tidings", "presence", "zed", "--config", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["users"]["zed"]["online"] is False
    bad = dict(cfg, api={"listen": f"127.0.0.1:{d.api_port}", "key": "wrong-key"})
    path = write_toml(tmp_path / "bad.toml", bad)
    out = subprocess.run([sys.executable, "-m", "tidings", "send", "zed", "x", "--config", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "HTTP 403" in out.stderr


async def test_metrics_follow_the_traffic(start_daemon, uniq):
    d = start_daemon(limits={"outbound_queue": 4})
    alice, bob = uniq("alice"), uniq("bob")
    before = await trio.to_thread.run_sync(metrics, d)
    async with open_client(d.url, token=d.token(alice)) as a, open_client(d.url, token=d.token(bob)) as b:
        for i in range(17):
            await a.send(bob, i)
        await b.messages(17)
        during = await trio.to_thread.run_sync(metrics, d)
    with pytest.raises(Exception):
        async with open_client(d.url, token="not-a-token"):
            pass
    after = await trio.to_thread.run_sync(metrics, d)
    assert during["tidings_connections"] == before["tidings_connections"] + 2
    assert during["tidings_users_online"] == before["tidings_users_online"] + 2
    assert during["tidings_messages_stored_total"] == before["tidings_messages_stored_total"] + 17
    assert during["tidings_deliveries_total"] == before["tidings_deliveries_total"] + 17
    # a fresh daemon observes routed messages 1, 9, 17, ... (one in LATENCY_SAMPLE_EVERY = 8)
    assert during["tidings_send_to_deliver_seconds_count"] == before["tidings_send_to_deliver_seconds_count"] + 3
    assert after["tidings_connections"] == before["tidings_connections"]
    assert after["tidings_handshake_refusals_total{reason=unauthorized}"] == \
        before.get("tidings_handshake_refusals_total{reason=unauthorized}", 0) + 1


# -- rooms and watches --------------------------------------------------------------------


async def test_room_message_reaches_exactly_the_joined_connections(daemon, uniq):
    alice, bob, carol = uniq("alice"), uniq("bob"), uniq("carol")
    room = uniq("lobby")
    async with open_client(daemon.url, token=daemon.token(alice)) as a, \
            open_client(daemon.url, token=daemon.token(bob)) as b, \
            open_client(daemon.url, token=daemon.token(carol)) as c:
        for client in (a, b):
            assert (await client.request({"type": "join", "room": room}))["type"] == "joined"
        ack = await a.request({"type": "send", "room": room, "body": "hi room"})
        assert ack["delivered"] == 2 and ack["room"] == room
        for client in (a, b):
            m = await client.receive_message()
            assert (m["room"], m["from"], m["body"], m["msg_id"]) == (room, alice, "hi room", ack["msg_id"])
            assert "to" not in m and "seq" not in m
        assert (await b.request({"type": "leave", "room": room}))["type"] == "left"
        ack = await a.request({"type": "send", "room": room, "body": "after leave"})
        assert ack["delivered"] == 1
        await c.ping()
        assert [f for f in b.drain() + c.drain() if f["type"] == "message"] == []
        with pytest.raises(ServerError) as exc:  # carol never joined
            await c.request({"type": "send", "room": room, "body": "x"})
        assert exc.value.code == "forbidden"


async def test_room_membership_vanishes_with_the_connection(daemon, uniq):
    alice, bob = uniq("alice"), uniq("bob")
    room = uniq("r")
    async with open_client(daemon.url, token=daemon.token(alice)) as a:
        await a.request({"type": "join", "room": room})
        async with open_client(daemon.url, token=daemon.token(bob)) as b:
            await b.request({"type": "join", "room": room})
        # closed: the server left bob's rooms before echoing his close frame
        ack = await a.request({"type": "send", "room": room, "body": "x"})
        assert ack["delivered"] == 1  # only alice herself


async def test_room_claims_limits_and_history(start_daemon, uniq):
    d = start_daemon(rooms={"default_allow": ["public-*"], "max_rooms_per_connection": 2,
                            "max_members_per_room": 2, "history": 2})
    alice, bob, carol = uniq("alice"), uniq("bob"), uniq("carol")
    async with open_client(d.url, token=d.token(alice, rooms=["team-*"])) as a:
        await a.request({"type": "join", "room": "team-red"})
        with pytest.raises(ServerError) as exc:
            await a.request({"type": "join", "room": "public-1"})  # the claim overrides the default
        assert exc.value.code == "forbidden"
        await a.request({"type": "join", "room": "team-blue"})
        with pytest.raises(ServerError) as exc:
            await a.request({"type": "join", "room": "team-green"})
        assert (exc.value.code, exc.value.message) == ("bad_request", "at most 2 rooms per connection")
        for i in range(3):
            await a.request({"type": "send", "room": "team-red", "body": i})
    async with open_client(d.url, token=d.token(bob)) as b, open_client(d.url, token=d.token(carol)) as c:
        with pytest.raises(ServerError) as exc:
            await b.request({"type": "join", "room": "team-red"})
        assert exc.value.code == "forbidden"
        await b.request({"type": "join", "room": "public-1"})
        await c.request({"type": "join", "room": "public-1"})
        for i in range(3):
            await b.request({"type": "send", "room": "public-1", "body": i})
        async with open_client(d.url, token=d.token(uniq("dave"))) as late:
            with pytest.raises(ServerError) as exc:
                await late.request({"type": "join", "room": "public-1"})
            assert "room is full" in exc.value.message
        await c.request({"type": "leave", "room": "public-1"})
        async with open_client(d.url, token=d.token(uniq("erin"))) as late:
            joined = await late.request({"type": "join", "room": "public-1"})
            assert [m["body"] for m in joined["recent"]] == [1, 2]  # the last `history` messages


async def test_watch_reports_presence_changes(daemon, uniq):
    alice, bob = uniq("alice"), uniq("bob")
    async with open_client(daemon.url, token=daemon.token(alice)) as a:
        reply = await a.request({"type": "watch", "users": [bob]})
        assert reply["users"] == {bob: False}
        async with open_client(daemon.url, token=daemon.token(bob)):
            ev = await a.wait_for("presence")
            assert ev == {"type": "presence", "user": bob, "online": True}
            async with open_client(daemon.url, token=daemon.token(bob)):
                pass  # a second device changes nothing: still online
        ev = await a.wait_for("presence")
        assert ev == {"type": "presence", "user": bob, "online": False}
        await a.request({"type": "unwatch", "users": [bob]})
        async with open_client(daemon.url, token=daemon.token(bob)):
            await a.ping()
        await a.ping()
        assert [f for f in a.drain() if f["type"] == "presence"] == []


# -- binary and compression ----------------------------------------------------------------


async def test_binary_msgpack_round_trip_with_bytes_body(daemon, uniq):
    alice, bob = uniq("alice"), uniq("bob")
    async with open_websocket_url(f"{daemon.url}?token={daemon.token(bob)}&encoding=msgpack") as b, \
            open_client(daemon.url, token=daemon.token(alice)) as text_alice:
        hello = msgpack.unpackb(await b.get_message())
        assert hello["type"] == "hello" and hello["user"] == bob
        assert msgpack.unpackb(await b.get_message())["type"] == "resumed"
        # a binary request is answered in binary, with bytes kept as bytes
        await b.send_message(msgpack.packb({"type": "send", "to": bob, "body": b"\x00\xffraw", "id": 7}))
        frames = [msgpack.unpackb(await b.get_message()) for _ in range(2)]
        by_type = {f["type"]: f for f in frames}
        assert by_type["ack"]["id"] == 7
        assert by_type["message"]["body"] == b"\x00\xffraw"
        # a JSON client's message arrives as MessagePack on the binary connection
        await text_alice.send(bob, {"k": [1, 2]})
        m = msgpack.unpackb(await b.get_message())
        assert (m["from"], m["body"]) == (alice, {"k": [1, 2]})
        # and a JSON client sees a bytes body as base64
        await b.send_message(msgpack.packb({"type": "send", "to": alice, "body": b"\x01\x02", "id": 8}))
        m = await text_alice.receive_message()
        assert (m["body"], m["body_encoding"]) == ("AQI=", "base64")
        assert msgpack.unpackb(await b.get_message())["id"] == 8  # the ack of that send
        await b.send_message(b"\xc1")  # not MessagePack: a binary error frame, still usable
        err = msgpack.unpackb(await b.get_message())
        assert (err["type"], err["code"]) == ("error", "bad_request")
        await b.send_message(msgpack.packb({"type": "ping", "id": 9}))
        assert msgpack.unpackb(await b.get_message()) == {"type": "pong", "id": 9}


def _deflate_client(url: str, token: str, payload: str) -> tuple[str | None, str, str]:
    from websockets.sync.client import connect

    with connect(f"{url}?token={token}", compression="deflate", open_timeout=10) as ws:
        negotiated = ws.response.headers.get("Sec-WebSocket-Extensions")
        hello = json.loads(ws.recv(timeout=10))
        json.loads(ws.recv(timeout=10))  # resumed
        ws.send(json.dumps({"type": "send", "to": hello["user"], "body": payload, "id": "z"}))
        got = {}
        for _ in range(2):
            frame = json.loads(ws.recv(timeout=10))
            got[frame["type"]] = frame
        return negotiated, got["message"]["body"], got["ack"]["id"]


@pytest.mark.parametrize("enabled", [True, False])
def test_permessage_deflate_negotiated_only_when_enabled(start_daemon, uniq, enabled):
    d = start_daemon(server={"compression": enabled})
    user = uniq("zip")
    negotiated, body, ack_id = _deflate_client(d.url, d.token(user), "compress me " * 200)
    assert body == "compress me " * 200 and ack_id == "z"
    if enabled:
        assert negotiated is not None and negotiated.startswith("permessage-deflate")
    else:
        assert negotiated is None
