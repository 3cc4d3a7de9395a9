"""The operator's page (issue #14): ``GET /admin``, ``GET /api/stats``,
``GET /api/users/{user}`` and ``POST /api/disconnect`` with ``conn``, against the real
daemon with real clients; then the page itself in headless Chromium (tests/browser/admin.mjs).

The browser test keeps its screenshot in the test's tmp dir and copies it to
``$TIDINGS_ARTIFACTS_DIR/admin.png`` when that variable is set (CI).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import time
from contextlib import AsyncExitStack
from urllib.parse import quote

import pytest
import trio

from conftest import TEST_API_KEY, write_toml
from redis_fixture import redis_server, require_coredis  # noqa: F401  (a fixture)
from test_api import aapi, api, metrics
from test_browser import Driver, browser_tools  # noqa: F401  (a fixture)
from tidings import log
from tidings.client import ServerError, TidingsError, open_client
from tidings.server.admin import TOP_USERS

T = 10.0


def raw_get(d, path: str, method: str = "GET"):
    """(status, headers, body bytes) of one request to the API port, without a key."""
    conn = http.client.HTTPConnection("127.0.0.1", d.api_port, timeout=10)
    conn.request(method, path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


async def stats(d, key: str = TEST_API_KEY) -> dict:
    status, body = await aapi(d, "GET", "/api/stats", key=key)
    assert status == 200, body
    return body


async def wait_stats(d, ok, what: str, timeout: float = T) -> dict:
    """Poll /api/stats until ``ok(stats)`` (bounded); the last answer in the error."""
    last = None
    try:
        with trio.fail_after(timeout):
            while True:
                last = await stats(d)
                if ok(last):
                    return last
                await trio.sleep(0.05)
    except trio.TooSlowError:
        raise AssertionError(f"/api/stats never showed {what} within {timeout}s; last: {last}") from None


# -- the page's files and the key ----------------------------------------------------------


def test_admin_page_is_static_open_and_locked_down(daemon):
    status, headers, body = raw_get(daemon, "/admin")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert headers["content-security-policy"].startswith("default-src 'self'")
    assert headers["x-content-type-options"] == "nosniff"
    page = body.decode()
    assert 'src="/admin/admin.js"' in page and 'href="/admin/admin.css"' in page
    assert "<script>" not in page and " style=" not in page  # nothing CSP would block
    assert "http://" not in page and "https://" not in page  # no CDN: works offline
    for path, ctype in (("/admin/admin.js", "text/javascript"), ("/admin/admin.css", "text/css")):
        status, headers, body = raw_get(daemon, path)
        assert status == 200 and headers["content-type"].startswith(ctype) and body
        assert b"http://" not in body and b"https://" not in body
    status, headers, body = raw_get(daemon, "/admin", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    assert raw_get(daemon, "/admin/nope.js")[0] == 404


@pytest.mark.parametrize("path", ["/api/stats", "/api/users/bob"])
def test_data_endpoints_need_the_key(daemon, path):
    assert api(daemon, "GET", path, key=None) == (401, {"error": "missing Authorization: Bearer <api key>"})
    assert api(daemon, "GET", path, key="wrong") == (403, {"error": "wrong API key"})
    assert api(daemon, "GET", path)[0] == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("GET", "/api/users/", None, 400, "GET /api/users/{user}: the path must end in a (percent-encoded) user id"),
        ("GET", "/api/users/%FF", None, 400, "GET /api/users/{user}: the path must end in a (percent-encoded) user id"),
        ("GET", "/api/users/a%0Ab", None, 400, "GET /api/users/{user}: the path must end in a (percent-encoded) user id"),
        ("POST", "/api/users/bob", {}, 405, "no POST /api/users/bob"),
        ("POST", "/api/stats", {}, 405, "no POST /api/stats"),
        ("POST", "/api/disconnect", {"user": "bob", "conn": 5}, 400, "'conn' must be a connection id"),
    ],
)
def test_admin_refusals(daemon, method, path, body, status, error):
    assert api(daemon, method, path, body) == (status, {"error": error})


# -- GET /api/stats ---------------------------------------------------------------------


async def test_stats_follow_connections_messages_and_the_store(daemon, uniq):
    alice, bob = uniq("alice"), uniq("bob")
    before = await stats(daemon)
    assert before["cluster"] is False and before["cluster_error"] is None
    assert [n["node"] for n in before["nodes"]] == [before["node"]]
    assert before["nodes"][0]["store"] == "sqlite"
    assert before["totals"]["webhook_outbox"] is None  # no webhooks: the page hides the tile
    async with open_client(daemon.url, token=daemon.token(alice)) as a, \
            open_client(daemon.url, token=daemon.token(bob)) as b1, \
            open_client(daemon.url, token=daemon.token(bob)) as b2:
        for i in range(3):
            await a.send(bob, i)
        for b in (b1, b2):
            await b.messages(3)
        during = await stats(daemon)
    t0, t1 = before["totals"], during["totals"]
    assert (t1["connections"], t1["users"]) == (3, 2)
    assert t1["stored"] - t0["stored"] == 3
    assert t1["delivered"] - t0["delivered"] == 6  # bob's two devices
    assert t1["commit_ms"] > 0 and t1["queued"] == 0
    assert during["nodes"][0]["at"] >= before["nodes"][0]["at"]
    assert during["nodes"][0]["started"] == before["nodes"][0]["started"]
    assert during["top_users"] == [{"user": bob, "connections": 2}, {"user": alice, "connections": 1}]
    assert during["top_users_node"] is None and t1["users_distinct"] is True
    # the totals of one node are that node's record
    assert all(t1[k] == during["nodes"][0][k] for k in ("connections", "stored", "delivered"))
    after = await wait_stats(daemon, lambda s: s["totals"]["connections"] == 0, "the clients gone")
    assert after["top_users"] == []


async def test_top_users_lists_at_most_ten(daemon, uniq):
    users = [uniq(f"u{i:02d}") for i in range(TOP_USERS + 1)]
    async with AsyncExitStack() as stack:
        for user in users[:TOP_USERS]:  # n users: all listed
            await stack.enter_async_context(open_client(daemon.url, token=daemon.token(user)))
        await stack.enter_async_context(open_client(daemon.url, token=daemon.token(users[5])))
        top = (await stats(daemon))["top_users"]
        assert top[0] == {"user": users[5], "connections": 2}
        assert [t["user"] for t in top[1:]] == [u for u in users[:TOP_USERS] if u != users[5]]
        await stack.enter_async_context(open_client(daemon.url, token=daemon.token(users[TOP_USERS])))
        top = (await stats(daemon))["top_users"]  # n+1: the last by (count, id) is left out
        assert len(top) == TOP_USERS and users[TOP_USERS] not in [t["user"] for t in top]


async def test_rate_limited_frames_are_counted_at_the_edge(start_daemon, uniq):
    d = start_daemon(limits={"messages_per_second": 0.01, "burst": 3})
    async with open_client(d.url, token=d.token(uniq("eve"))) as eve:
        for _ in range(3):  # the burst: n frames pass, none counted
            await eve.ping()
        assert (await stats(d))["totals"]["rate_limited"] == 0
        with pytest.raises(ServerError) as err:  # frame n+1 is refused and counted
            await eve.ping()
        assert err.value.code == "rate_limited"
        assert (await stats(d))["totals"]["rate_limited"] == 1
        m = await trio.to_thread.run_sync(metrics, d)
        assert m["tidings_rate_limited_frames_total"] == 1
        assert "tidings_store_commit_seconds" in m


async def test_recent_warnings_are_listed(start_daemon):
    d = start_daemon(auth={"mode": "insecure"})  # logs a warning at start
    warnings = (await stats(d))["warnings"]
    assert [w["event"] for w in warnings] == ["insecure_auth"]
    w = warnings[0]
    assert w["level"] == "warning" and "event=insecure_auth" in w["line"]
    assert abs(w["ts"] / 1000 - time.time()) < 60


def test_warning_ring_keeps_the_last_n_lines(monkeypatch):
    monkeypatch.setattr(log, "_recent", log.deque(maxlen=log.RECENT_WARNINGS))
    monkeypatch.setattr(log, "_stream", open(os.devnull, "w"))
    monkeypatch.setattr(log, "_threshold", log.LEVELS["info"])
    log.log("info", "not_kept")
    assert log.recent_warnings() == []
    for i in range(log.RECENT_WARNINGS):
        log.log("warning", "w", n=i)
    kept = log.recent_warnings()
    assert len(kept) == log.RECENT_WARNINGS and kept[0]["line"].endswith("n=0")
    log.log("error", "e")  # n+1: the oldest goes
    kept = log.recent_warnings()
    assert len(kept) == log.RECENT_WARNINGS
    assert kept[0]["line"].endswith("n=1") and kept[-1]["event"] == "e" and kept[-1]["level"] == "error"
    monkeypatch.setattr(log, "_threshold", log.LEVELS["error"])
    log.log("warning", "not_written")  # below the configured level: not written, not kept
    assert log.recent_warnings()[-1]["event"] == "e"


# -- GET /api/users/{user} and POST /api/disconnect with conn -------------------------------


async def test_user_lookup_shows_presence_unread_and_connections(daemon, uniq):
    alice, bob = uniq("alice"), uniq("bob a/b")  # a space and a slash: percent-encoded
    path = f"/api/users/{quote(bob, safe='')}"
    status, info = await aapi(daemon, "GET", path)
    assert status == 200
    assert info == {"user": bob, "node": info["node"], "online": False, "connection_count": 0,
                    "last_seen": None, "unread": 0, "last_seq": 0, "cursor": 0,
                    "unread_by_device": {}, "devices": [], "connections": []}
    t0 = time.time()
    async with open_client(daemon.url, token=daemon.token(alice)) as a:
        for i in range(3):
            await a.send(bob, i)
        async with open_client(daemon.url, token=daemon.token(bob)) as b1, \
                open_client(daemon.url, token=daemon.token(bob)) as b2:
            for b in (b1, b2):
                await b.messages(3)
            info = (await aapi(daemon, "GET", path))[1]
            assert (info["online"], info["connection_count"]) == (True, 2)
            assert (info["unread"], info["last_seq"], info["cursor"]) == (3, 3, 0)
            assert info["devices"] == ["default"]
            conns = {c["conn"]: c for c in info["connections"]}
            assert set(conns) == {b1.conn, b2.conn}
            for client in (b1, b2):
                c = conns[client.conn]
                assert c["node"] == info["node"] and c["device"] == "default" and c["rooms"] == []
                assert c["remote"] == f"127.0.0.1:{client._ws.local.port}"
                assert t0 - 1 <= c["since"] / 1000 <= time.time() + 1
            await b1.ack(2, wait=True)  # unread follows the saved ack cursor: n, then n-1...
            info = (await aapi(daemon, "GET", path))[1]
            assert (info["unread"], info["cursor"]) == (1, 2)
            assert info["unread_by_device"] == {"default": 1}
            await b1.ack(3, wait=True)
            info = (await aapi(daemon, "GET", path))[1]
            assert info["unread"] == 0
        with trio.fail_after(T):
            while (info := (await aapi(daemon, "GET", path))[1])["online"]:
                await trio.sleep(0.05)
        assert info["connections"] == [] and info["last_seen"] / 1000 >= t0 - 1


async def test_disconnect_one_connection_or_all(daemon, uniq):
    bob = uniq("bob")
    async with open_client(daemon.url, token=daemon.token(bob)) as b1, \
            open_client(daemon.url, token=daemon.token(bob)) as b2, \
            open_client(daemon.url, token=daemon.token(bob)) as b3:
        assert await aapi(daemon, "POST", "/api/disconnect", {"user": bob, "conn": "c-nope"}) == \
            (200, {"closed": 0})
        assert await aapi(daemon, "POST", "/api/disconnect", {"user": bob, "conn": b1.conn}) == \
            (200, {"closed": 1})
        assert await b1.wait_closed() == 1008
        assert (await b2.ping())["type"] == "pong"
        info = (await aapi(daemon, "GET", f"/api/users/{bob}"))[1]
        assert sorted(c["conn"] for c in info["connections"]) == sorted([b2.conn, b3.conn])
        assert await aapi(daemon, "POST", "/api/disconnect", {"user": bob}) == (200, {"closed": 2})
        assert await b2.wait_closed() == 1008 and await b3.wait_closed() == 1008


# -- a cluster: every node's figures ---------------------------------------------------------


def _node(start_daemon, redis, name: str):
    return start_daemon(cluster={"redis_url": redis.url, "presence_ttl_s": 1.5, "node_id": name},
                        store={"backend": "redis"})


async def test_stats_cover_every_node_of_a_cluster(start_daemon, redis_server, uniq):
    require_coredis()
    a = _node(start_daemon, redis_server, uniq("node-a"))
    b = _node(start_daemon, redis_server, uniq("node-b"))
    x, y = uniq("x"), uniq("y")
    async with open_client(a.url, token=a.token(x)) as x1, \
            open_client(a.url, token=a.token(x)) as x2, \
            open_client(b.url, token=b.token(x)) as x3, \
            open_client(b.url, token=b.token(y)) as y1:
        await y1.request({"type": "join", "room": "lobby"})  # held by node b like a user
        s = await wait_stats(a, lambda s: [n["connections"] for n in s["nodes"]] == [2, 2],
                             "both nodes' connections")
        assert s["cluster"] is True and s["cluster_error"] is None
        assert [n["node"] for n in s["nodes"]] == [a.config["cluster"]["node_id"], b.config["cluster"]["node_id"]]
        assert s["node"] == s["nodes"][0]["node"] and s["nodes"][1]["store"] == "redis"
        assert [n["users"] for n in s["nodes"]] == [1, 2]
        assert (s["totals"]["nodes"], s["totals"]["connections"]) == (2, 4)
        assert (s["totals"]["users"], s["totals"]["users_distinct"]) == (2, True)  # x once, y; no room
        assert s["top_users"] == [{"user": x, "connections": 3}, {"user": y, "connections": 1}]
        assert s["top_users_node"] is None  # every node's
        assert s["nodes"][1]["at"] <= s["at"] + 1000  # a record written by node b
        # node b's counters reach node a with b's next presence write
        await y1.send(x, "hi")
        for c in (x1, x2, x3):
            await c.receive_message()
        s = await wait_stats(a, lambda s: s["nodes"][1]["stored"] == 1 and s["nodes"][1]["delivered"] == 1,
                             "node b's stored message")
        assert s["totals"]["stored"] == 1 and s["totals"]["delivered"] == 3  # 2 by node a, 1 by b
        # a user's connections are listed by the node that holds them; the count is everyone's
        for node, mine in ((a, [x1, x2]), (b, [x3])):
            info = (await aapi(node, "GET", f"/api/users/{x}"))[1]
            assert (info["online"], info["connection_count"]) == (True, 3)
            assert sorted(c["conn"] for c in info["connections"]) == sorted(c.conn for c in mine)
            assert {c["node"] for c in info["connections"]} == {node.config["cluster"]["node_id"]}
        assert await b.aterminate() == 0  # a clean stop withdraws its record at once
    s = await wait_stats(a, lambda s: len(s["nodes"]) == 1, "node b gone")
    assert s["totals"]["nodes"] == 1
    redis_server.stop()  # Redis down: this node's own figures, and the reason
    s = await stats(a)
    assert [n["node"] for n in s["nodes"]] == [s["node"]] and s["cluster_error"]
    assert s["top_users_node"] == s["node"] and s["totals"]["users_distinct"] is False


async def test_everyones_users_are_read_up_to_the_bound(redis_server):
    """Cluster.node_stats reads every node's users while the presence hashes hold at
    most ``count_users_up_to`` entries (n: read; n-1: None, the caller sums per node)."""
    require_coredis()
    from tidings.cluster import open_cluster
    from tidings.routing.rooms import ROOM_KEY_PREFIX

    ignore = lambda *_: None  # noqa: E731
    async with open_cluster(redis_server.url, "A", 3.0, ignore) as ca, \
            open_cluster(redis_server.url, "B", 3.0, ignore) as cb:
        cb.stats_record = lambda: b'{"node": "B"}'
        # (B's holds reach its presence hash in order: once u3 is there, so are the others)
        for cluster, key in ((ca, "u1"), (ca, "u2"), (cb, ROOM_KEY_PREFIX + "lobby"), (cb, "u2"), (cb, "u3")):
            await cluster.hold(key)
        everyone = {"u1": 1, "u2": 2, "u3": 1}  # connections over both nodes, not the room
        with trio.fail_after(T):  # B's presence writes carry its record and its users
            while await ca.node_stats() != ({"B": b'{"node": "B"}'}, everyone):
                await trio.sleep(0.02)
        entries = 2 + 3  # A's own two, B's hash: u2, u3 and the room
        assert await ca.node_stats(count_users_up_to=entries) == ({"B": b'{"node": "B"}'}, everyone)
        assert await ca.node_stats(count_users_up_to=entries - 1) == ({"B": b'{"node": "B"}'}, None)


# -- the page in headless Chromium -------------------------------------------------------


async def _drain(client) -> None:
    """Read (and forget) whatever the client is sent, until it is closed."""
    try:
        while True:
            await client.receive(timeout=3600)
    except TidingsError:
        pass


async def test_admin_page_in_chromium(start_daemon, browser_tools, uniq, tmp_path):
    """The page asks for the key, follows connections and traffic, lists the top user
    and a warning, looks a user up and disconnects one device, then all; a hidden tab
    makes no requests.  The screenshot is kept (see the module docstring)."""
    node, chromium = browser_tools
    d = start_daemon(limits={"messages_per_second": 50.0, "burst": 30})
    alice, bob, carol, dave, eve = (uniq(n) for n in ("alice", "bob", "carol", "dave", "eve"))
    shot = tmp_path / "admin.png"
    driver = Driver([node, "admin.mjs", f"http://127.0.0.1:{d.api_port}", TEST_API_KEY, str(shot), chromium])

    async def expect(event: str) -> dict:
        return await trio.to_thread.run_sync(driver.expect, event)

    def command(cmd: str, **fields) -> None:
        driver.command(json.dumps({"cmd": cmd, **fields}))

    try:
        live = await expect("live")
        assert live["csp"].startswith("default-src 'self'")
        assert "refused" in live["refused"] and live["keyStored"] is True
        assert live["connections"] == 0 and live["offline"] == []  # nothing but our own origin
        for i in range(7):  # stored for bob before he connects: 7 unread
            assert (await aapi(d, "POST", "/api/send", {"to": bob, "body": f"welcome {i}"}))[0] == 202
        async with AsyncExitStack() as stack:
            clients = {}
            for name, user in (("a", alice), ("b1", bob), ("b2", bob), ("c", carol), ("d", dave), ("e", eve)):
                clients[name] = await stack.enter_async_context(open_client(d.url, token=d.token(user)))
            async with trio.open_nursery() as nursery:
                for client in clients.values():
                    nursery.start_soon(_drain, client)
                await _admin_page_steps(d, clients, nursery, expect, command)
                nursery.cancel_scope.cancel()
    finally:
        driver.close()
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    artifacts = os.environ.get("TIDINGS_ARTIFACTS_DIR")
    if artifacts:
        os.makedirs(artifacts, exist_ok=True)
        shutil.copyfile(shot, os.path.join(artifacts, "admin.png"))
    print(f"screenshot: {shot}")


async def _traffic(clients) -> None:
    """alice -> carol -> dave -> alice at a changing rate, so the charts have a shape."""
    i = 0
    while True:
        await clients["a"].send(clients["c"].user, {"i": i})
        await clients["c"].send(clients["d"].user, {"i": i})
        if i % 3 == 0:
            await clients["d"].send(clients["a"].user, {"i": i})
        i += 1
        await trio.sleep(0.02 + 0.04 * (1 + ((i // 40) % 3)) / 3)


async def _admin_page_steps(d, clients, nursery, expect, command) -> None:
    bob = clients["b1"].user
    nursery.start_soon(_traffic, clients)
    limited = 0
    for _ in range(40):  # eve floods: past the burst, frames are refused (and counted)
        try:
            await clients["e"].ping()
        except ServerError as exc:
            assert exc.code == "rate_limited"
            limited += 1
    assert limited > 0
    # a warning for the list: a reload that cannot apply a changed port
    mark = len(d.logs)
    write_toml(d.config_path, {**d.config, "server": {**d.config["server"], "port": d.port + 1}})
    d.send_signal(signal.SIGHUP)
    await d.wait_for_log(r"event=reload_ignored", start=mark)

    command("watch", connections=6, users=5, rate_limited=limited, top=bob, warning="reload_ignored")
    counters = await expect("counters")
    assert counters["connections"] == 6 and counters["users"] == 5
    assert counters["in"] > 0 and counters["out"] > 0 and counters["commit"] > 0
    assert counters["limited"] == limited
    await trio.sleep(8)  # let the charts fill a little for the screenshot

    command("lookup", user=bob, connections=2, unread=7)
    looked = await expect("looked_up")
    assert looked["facts"]["online"] == "online" and looked["facts"]["devices"] == ["default"]
    rows = {r["conn"]: r["cells"] for r in looked["rows"]}
    b1, b2 = clients["b1"], clients["b2"]
    assert set(rows) == {b1.conn, b2.conn}
    assert rows[b1.conn][4] == f"127.0.0.1:{b1._ws.local.port}"

    command("disconnect_one", conn=b1.conn)
    one = await expect("disconnected_one")
    assert [r["conn"] for r in one["rows"]] == [b2.conn]
    assert await b1.wait_closed() == 1008
    assert (await b2.ping())["type"] == "pong"

    command("disconnect_all")
    await expect("disconnected_all")
    assert await b2.wait_closed() == 1008
    result = await expect("result")
    assert not result["problems"], result["problems"]
    assert result["requestsWhileHidden"] == 0
