"""End to end, issue #13: webhooks from the real daemon to a real HTTP receiver.

``Receiver`` is a small threading ``http.server`` on 127.0.0.1 that records every POST
and answers from a script; it can be stopped and started again on the same port (a
receiver that is down).  Signatures are checked here with hmac directly, as a receiver
written without Tidings would (docs/deploy.md).  Every wait is bounded.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import re
import threading
import time
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio

from tidings.client import open_client

from conftest import replay_until_resumed
from redis_fixture import free_port, redis_server, require_coredis  # noqa: F401
from test_admin import stats as admin_stats
from test_api import metrics

SECRET = "webhook-secret-0123456789abcdef0123456789"


class Receiver:
    """Records ``(time, headers, body bytes)`` per POST; answers ``script`` statuses in
    order, then 200."""

    def __init__(self, *script: int, port: int | None = None, hang: threading.Event | None = None) -> None:
        self.port = port or free_port()
        self.script = list(script)
        self.hang = hang  # while not set, every POST waits before it answers
        self.posts: list[tuple[float, dict[str, str], bytes]] = []
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/tidings"

    def start(self) -> "Receiver":
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._lock:
                    receiver.posts.append((time.monotonic(), dict(self.headers), body))
                    status = receiver.script.pop(0) if receiver.script else 200
                if receiver.hang is not None:
                    receiver.hang.wait(30)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def events(self) -> list[dict]:
        with self._lock:
            return [json.loads(body) for _, _, body in self.posts]

    async def wait_for(self, predicate, timeout: float = 15.0) -> list[dict]:
        """Poll (bounded) until ``predicate(events)`` holds; return the events."""
        try:
            with trio.fail_after(timeout):
                while not predicate(events := self.events()):
                    await trio.sleep(0.02)
        except trio.TooSlowError:
            raise AssertionError(f"the receiver never saw what was awaited; got {self.events()}") from None
        return events


@pytest.fixture
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


def hook(url: str, **kw) -> dict:
    return {"url": url, "secret": SECRET, **kw}


def of(events: list[dict], user: str) -> list[str]:
    return [e["type"] for e in events if e["user"] == user]


def distinct(events: list[dict]) -> list[dict]:
    """What a receiver acts on: each event once, by ``id``, in the order first seen.

    Delivery is at least once: a sender killed between a 2xx and removing the event from
    the outbox leaves it to the next lease holder, which posts it again with the same id.
    """
    seen: set[str] = set()
    return [e for e in events if not (e["id"] in seen or seen.add(e["id"]))]


def check_signature(headers: dict[str, str], body: bytes) -> None:
    """What a receiver does: t and v1 from the header, HMAC over "<t>.<raw body>"."""
    fields = dict(part.split("=", 1) for part in headers["Tidings-Signature"].split(","))
    expected = hmac.new(SECRET.encode(), fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(fields["v1"], expected)
    assert abs(time.time() - int(fields["t"])) < 60


async def wait_metrics(d, timeout: float = 10.0, **want: Any) -> dict[str, float]:
    """Poll /metrics (bounded) until each ``tidings_webhooks_<name>`` has its value (or
    passes it, a predicate): the receiver has an event a moment before the sender counts
    its answer, and the outbox depth is read once a second."""
    m: dict[str, float] = {}
    try:
        with trio.fail_after(timeout):
            while True:
                m = await trio.to_thread.run_sync(metrics, d)
                if all(v(m[f"tidings_webhooks_{k}"]) if callable(v) else m[f"tidings_webhooks_{k}"] == v
                       for k, v in want.items()):
                    return m
                await trio.sleep(0.05)
    except trio.TooSlowError:
        raise AssertionError(f"/metrics never showed {want}: {m}") from None


# -- signature, online / offline ---------------------------------------------------------

async def test_online_and_offline_are_signed_posts(start_daemon, receiver, uniq):
    d = start_daemon(webhooks=hook(receiver.url, events=["online", "offline"]))
    alice = uniq("alice")
    async with open_client(d.url, token=d.token(alice)):
        async with open_client(d.url, token=d.token(alice)):  # a second device: still once
            await receiver.wait_for(lambda ev: of(ev, alice) == ["online"])
    events = await receiver.wait_for(lambda ev: "offline" in of(ev, alice))
    assert of(events, alice) == ["online", "offline"]  # in order per user: no duplicate before
    for (_, headers, body), event in zip(receiver.posts, events):
        assert headers["Content-Type"] == "application/json"
        check_signature(headers, body)
        assert set(event) == {"id", "type", "ts", "user"}
        assert abs(event["ts"] - time.time() * 1000) < 60_000
    assert events[0]["id"] != events[1]["id"]
    await wait_metrics(d, sent_total=2, dead_total=0, failed_attempts_total=0, outbox=0)


async def test_a_500_then_200_is_retried_with_the_same_id(start_daemon, uniq):
    receiver = Receiver(500).start()
    try:
        d = start_daemon(webhooks=hook(receiver.url, events=["online"]))
        alice = uniq("alice")
        async with open_client(d.url, token=d.token(alice)):
            await receiver.wait_for(lambda ev: len(ev) == 2)
        (t1, h1, b1), (t2, h2, b2) = receiver.posts
        assert b1 == b2 and json.loads(b1)["type"] == "online"
        assert t2 - t1 >= 0.9  # the first retry waits 1 s
        check_signature(h2, b2)
        await wait_metrics(d, failed_attempts_total=1, sent_total=1)
    finally:
        receiver.stop()


async def test_dead_after_max_attempts_is_logged_once_and_counted(start_daemon, uniq):
    receiver = Receiver(500, 502, 500).start()
    try:
        d = start_daemon(webhooks=hook(receiver.url, events=["online"], max_attempts=2))
        alice, bob = uniq("alice"), uniq("bob")
        async with open_client(d.url, token=d.token(alice)):
            await receiver.wait_for(lambda ev: len(ev) == 2)
            line = await d.wait_for_log(r"event=webhook_dead")
            assert f"user={alice}" in line and "attempts=2" in line and 'error="status 502"' in line
            async with open_client(d.url, token=d.token(bob)):  # the next event: 500, then 200
                await receiver.wait_for(lambda ev: of(ev, bob) == ["online", "online"])
        await wait_metrics(d, dead_total=1, sent_total=1, failed_attempts_total=3)
        assert len(re.findall(r"event=webhook_dead", d.log_text())) == 1
    finally:
        receiver.stop()


# -- undelivered -----------------------------------------------------------------------

async def test_undelivered_fires_for_an_offline_recipient_not_for_one_that_acked(
        start_daemon, receiver, uniq):
    d = start_daemon(webhooks=hook(receiver.url, events=["undelivered"], undelivered_after_s=0.5))
    alice, bob, carol = uniq("alice"), uniq("bob"), uniq("carol")
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_client(d.url, token=d.token(alice)))
        c = await stack.enter_async_context(open_client(d.url, token=d.token(carol)))
        await replay_until_resumed(c)
        to_carol = await a.send(carol, "read me")
        m = await c.receive_message()
        await c.ack(m["seq"], wait=True)
        t_sent = time.monotonic()
        to_bob = await a.send(bob, "you are away")
        events = await receiver.wait_for(lambda ev: len(ev) >= 1)
        assert time.monotonic() - t_sent >= 0.5
        await wait_metrics(d, outbox=0, sent_total=1)
    events = receiver.events()
    assert events == [{"id": events[0]["id"], "type": "undelivered", "ts": events[0]["ts"],
                       "user": bob, "msg_id": to_bob["msg_id"], "from": alice, "to": bob,
                       "seq": to_bob["seq"]}], f"carol acked {to_carol['msg_id']}"


async def test_a_receiver_that_hangs_never_slows_message_delivery(start_daemon, uniq):
    release = threading.Event()
    receiver = Receiver(hang=release).start()
    try:
        d = start_daemon(webhooks=hook(receiver.url, timeout_s=30.0, undelivered_after_s=0.1),
                         limits={"messages_per_second": 10000.0, "burst": 10000})
        alice, bob = uniq("alice"), uniq("bob")
        async with open_client(d.url, token=d.token(alice)) as a, \
                open_client(d.url, token=d.token(bob)) as b:
            await receiver.wait_for(lambda ev: len(ev) >= 1)  # a POST is hanging now
            await replay_until_resumed(b)
            t0 = time.monotonic()
            with trio.fail_after(5):
                for i in range(200):
                    ack = await a.send(bob, i)
                    assert ack["type"] == "ack"
                got = await b.messages(200)
            took = time.monotonic() - t0
            assert [m["body"] for m in got] == list(range(200))
            assert took < 3.0, f"200 sends took {took:.2f}s behind a hanging receiver"
            m = await wait_metrics(d, outbox=lambda n: n >= 200)  # undelivered, queued
            assert m["tidings_webhooks_sent_total"] == 0
            page = await admin_stats(d)  # the operator's page shows the same outbox
            assert page["totals"]["webhook_outbox"] == page["nodes"][0]["webhook_outbox"] >= 200
    finally:
        release.set()
        receiver.stop()


# -- durability ------------------------------------------------------------------------

async def test_a_receiver_down_across_a_kill_9_restart_gets_every_event(start_daemon, uniq):
    receiver = Receiver()  # not started: connection refused
    d = start_daemon(webhooks=hook(receiver.url, undelivered_after_s=0.2),
                     cluster={"presence_ttl_s": 1.0})
    alice, bob = uniq("alice"), uniq("bob")
    async with open_client(d.url, token=d.token(bob)):
        pass  # online, offline
    async with open_client(d.url, token=d.token(alice)) as a:
        sent = await a.send(bob, "while bob is away")  # acked: its check is stored
        await d.wait_for_log(r"event=webhook_failed")  # the receiver is down: retrying
        # online and offline of bob, online of alice (and maybe the undelivered already)
        await wait_metrics(d, outbox=lambda n: n >= 3)
        d.kill()  # SIGKILL with alice connected: her connection dies with the process
    d.start()
    receiver.start()
    try:
        events = await receiver.wait_for(
            lambda ev: "offline" in of(ev, alice) and "undelivered" in of(ev, bob), timeout=20)
        assert of(events, bob) == ["online", "offline", "undelivered"]
        assert of(events, alice) == ["online", "offline"]  # her offline: the killed node reaped
        (undelivered,) = [e for e in events if e["type"] == "undelivered"]
        assert (undelivered["msg_id"], undelivered["from"], undelivered["seq"]) == (sent["msg_id"], alice, 1)
        assert len({e["id"] for e in events}) == len(events) == 5
    finally:
        receiver.stop()


# -- reload ----------------------------------------------------------------------------

async def test_sighup_moves_the_url_and_secret(start_daemon, receiver, tmp_path, uniq):
    import signal

    d = start_daemon(webhooks=hook(receiver.url, events=["online"]))
    other = Receiver().start()
    try:
        secret_file = tmp_path / "hook-secret"
        secret_file.write_text("\n" + SECRET[::-1] + "\n")
        d.config["webhooks"] = {"url": other.url, "secret_file": str(secret_file), "events": ["online"]}
        mark = len(d.logs)
        from conftest import write_toml

        write_toml(d.config_path, d.config)
        d.send_signal(signal.SIGHUP)
        line = await d.wait_for_log(r"event=reloaded", start=mark)
        assert "webhooks.url" in line and "webhooks.secret_file" in line
        alice = uniq("alice")
        async with open_client(d.url, token=d.token(alice)):
            (event,) = await other.wait_for(lambda ev: len(ev) == 1)
        assert receiver.events() == [] and event["user"] == alice
        (_, headers, body), = other.posts
        fields = dict(p.split("=", 1) for p in headers["Tidings-Signature"].split(","))
        assert fields["v1"] == hmac.new(SECRET[::-1].encode(), fields["t"].encode() + b"." + body,
                                        hashlib.sha256).hexdigest()
    finally:
        other.stop()


# -- cluster ---------------------------------------------------------------------------

async def test_online_and_offline_once_each_on_a_two_node_cluster(redis_server, start_daemon,
                                                                  receiver, uniq):
    require_coredis()
    from test_e2e_cluster import start_node

    hooks = hook(receiver.url, events=["online", "offline"])
    n1 = start_node(start_daemon, redis_server, "n1", ttl=2.0, webhooks=hooks)
    n2 = start_node(start_daemon, redis_server, "n2", ttl=2.0, webhooks=hooks)
    alice = uniq("alice")
    async with open_client(n1.url, token=n1.token(alice)):
        await receiver.wait_for(lambda ev: of(ev, alice) == ["online"])
        async with open_client(n2.url, token=n2.token(alice)):
            async with open_client(n2.url, token=n2.token(alice)):
                pass
        # n2 had her and let go; n1 still has her: nothing
    events = await receiver.wait_for(lambda ev: "offline" in of(ev, alice))
    assert of(events, alice) == ["online", "offline"]  # in order: no duplicate can follow
    # exactly one node sent each (the lease): the other counted none
    with trio.fail_after(10):
        while True:
            sent = [(await trio.to_thread.run_sync(metrics, n))["tidings_webhooks_sent_total"]
                    for n in (n1, n2)]
            if sum(sent) == 2:
                break
            await trio.sleep(0.05)
    assert sorted(sent) == [0, 2]


async def test_a_node_killed_with_9_takes_its_users_offline_after_the_ttl(redis_server, start_daemon,
                                                                         receiver, uniq):
    """Whichever node held the lease, the survivor reaps the dead one and sends."""
    require_coredis()
    from test_e2e_cluster import start_node

    hooks = hook(receiver.url, events=["online", "offline"])
    n1 = start_node(start_daemon, redis_server, "n1", ttl=1.0, webhooks=hooks)
    n2 = start_node(start_daemon, redis_server, "n2", ttl=1.0, webhooks=hooks)
    alice, bob = uniq("alice"), uniq("bob")
    async with open_client(n2.url, token=n2.token(bob)):
        async with open_client(n1.url, token=n1.token(alice)):
            await receiver.wait_for(lambda ev: of(ev, alice) == ["online"] and of(ev, bob) == ["online"])
            n1.kill()
            t_kill = time.monotonic()
            events = await receiver.wait_for(lambda ev: "offline" in of(ev, alice), timeout=10)
        took = time.monotonic() - t_kill
        assert took <= 1.0 + 3.0, f"alice went offline {took:.1f}s after kill -9 (ttl 1 s)"
        # n1 may have held the lease and died between a 2xx and outbox_done: n2 then posts
        # that event again, same id (at least once); a receiver de-duplicating sees each once
        events = distinct(events)
        assert of(events, alice) == ["online", "offline"] and of(events, bob) == ["online"]
