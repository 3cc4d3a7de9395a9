"""End to end, issue #3: nothing acknowledged is lost; offline delivery, resume, history,
search, retention, presence, crash safety.  The real daemon runs as a subprocess with the
SQLite store (the default) unless a test says otherwise."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tidings.client import ServerError, open_client

from conftest import TEST_SECRET, replay_until_resumed, write_toml


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
async def test_offline_recipient_gets_everything_in_order_on_connect(start_daemon, uniq, backend):
    d = start_daemon(store={"backend": backend})
    alice, bob = uniq("alice"), uniq("bob")
    async with open_client(d.url, token=d.token(alice)) as a:
        await replay_until_resumed(a)
        acks = [await a.send(bob, {"n": i}) for i in range(5)]
    assert [ack["delivered"] for ack in acks] == [0] * 5
    assert [ack["seq"] for ack in acks] == [1, 2, 3, 4, 5]
    async with open_client(d.url, token=d.token(bob)) as b:
        msgs, resumed = await replay_until_resumed(b)
    assert [m["body"] for m in msgs] == [{"n": i} for i in range(5)]
    assert [m["msg_id"] for m in msgs] == [ack["msg_id"] for ack in acks]
    assert all(m["from"] == alice and m["to"] == bob for m in msgs)
    assert resumed == {"type": "resumed", "since": 0, "last": 5, "complete": True}


async def test_ack_cursor_stops_replay_of_confirmed_messages(daemon, uniq):
    alice, bob = uniq("alice"), uniq("bob")
    async with open_client(daemon.url, token=daemon.token(alice)) as a:
        for i in range(4):
            await a.send(bob, f"m{i}")
    async with open_client(daemon.url, token=daemon.token(bob)) as b:
        msgs, _ = await replay_until_resumed(b)
        assert len(msgs) == 4
        reply = await b.ack(2, wait=True)
        assert reply["type"] == "acked" and reply["seq"] == 2
    async with open_client(daemon.url, token=daemon.token(bob)) as b:
        msgs, resumed = await replay_until_resumed(b)
    assert [m["seq"] for m in msgs] == [3, 4]
    assert resumed["since"] == 2 and resumed["last"] == 4


async def test_resume_since_on_url_and_in_band(daemon, uniq):
    alice, bob = uniq("alice"), uniq("bob")
    async with open_client(daemon.url, token=daemon.token(alice)) as a:
        for i in range(6):
            await a.send(bob, i)
    async with open_client(daemon.url, token=daemon.token(bob), since=4) as b:
        msgs, resumed = await replay_until_resumed(b)
        assert [m["body"] for m in msgs] == [4, 5]
        assert resumed == {"type": "resumed", "since": 4, "last": 6, "complete": True}
        reply = await b.resume(1)
        assert reply["type"] == "resumed" and reply["since"] == 1 and reply["last"] == 6
        replayed = b.drain()
        assert [m["seq"] for m in replayed if m["type"] == "message"] == [2, 3, 4, 5, 6]


async def test_resume_while_messages_keep_arriving_has_no_gap_and_no_duplicate(start_daemon, uniq):
    """Senders keep sending while bob reconnects and resumes: bob's seqs are exactly 1..N."""
    daemon = start_daemon(limits={"messages_per_second": 100000.0, "burst": 100000})
    alice, bob = uniq("alice"), uniq("bob")
    acked: list[int] = []
    stop = trio.Event()

    async def sender(client):
        while not stop.is_set():
            ack = await client.send(bob, "x")
            acked.append(ack["seq"])

    seen: list[int] = []
    async with open_client(daemon.url, token=daemon.token(alice)) as a:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender, a)
            for _round in range(3):  # connect, read a bit, drop, resume from the last seen
                since = seen[-1] if seen else 0
                async with open_client(daemon.url, token=daemon.token(bob), since=since) as b:
                    with trio.move_on_after(0.3):
                        while True:
                            frame = await b.receive()
                            if frame["type"] == "message":
                                seen.append(frame["seq"])
            stop.set()
        final_since = seen[-1] if seen else 0
        last = max(acked)
        async with open_client(daemon.url, token=daemon.token(bob), since=final_since) as b:
            msgs, resumed = await replay_until_resumed(b)
            seen.extend(m["seq"] for m in msgs)
    assert resumed["last"] == last
    assert seen == list(range(1, last + 1)), "a gap or a duplicate across replay/live switches"


async def test_history_pages_both_directions_and_isolates_users(daemon, uniq):
    alice, bob, eve = uniq("alice"), uniq("bob"), uniq("eve")
    async with open_client(daemon.url, token=daemon.token(alice)) as a, \
            open_client(daemon.url, token=daemon.token(bob)) as b:
        ids = []
        for i in range(5):
            ids.append((await a.send(bob, f"a{i}"))["msg_id"])
            ids.append((await b.send(alice, f"b{i}"))["msg_id"])
        await a.send(eve, "not part of alice-bob")
        page1 = await a.history(bob, limit=4)
        assert [m["msg_id"] for m in page1["messages"]] == ids[::-1][:4]
        assert page1["more"] is True and page1["with"] == bob
        page2 = await a.history(bob, before=page1["messages"][-1]["msg_id"], limit=100)
        assert [m["msg_id"] for m in page2["messages"]] == ids[::-1][4:]
        assert page2["more"] is False
    async with open_client(daemon.url, token=daemon.token(eve)) as e:
        # eve can only see her own conversation with alice, never alice<->bob.
        assert (await e.history(bob))["messages"] == []
        mine = await e.history(alice)
        assert [m["body"] for m in mine["messages"]] == ["not part of alice-bob"]
        with pytest.raises(ServerError) as exc:
            await e.history(alice, before="no-such-id")
        assert exc.value.code == "bad_request"


async def test_search_own_messages_only_and_malformed_queries(daemon, uniq):
    alice, bob, eve = uniq("alice"), uniq("bob"), uniq("eve")
    async with open_client(daemon.url, token=daemon.token(alice)) as a:
        await a.send(bob, "pizza tonight?")
        await a.send(bob, "or sushi")
        await a.send(eve, "pizza for eve")
        res = await a.search("pizza")
        assert sorted(m["body"] for m in res["messages"]) == ["pizza for eve", "pizza tonight?"]
        for bad in ['"unbalanced', "   "]:
            with pytest.raises(ServerError) as exc:
                await a.search(bad)
            assert exc.value.code == "bad_request"
        assert (await a.ping())["type"] == "pong"  # still usable
    async with open_client(daemon.url, token=daemon.token(bob)) as b:
        res = await b.search("pizza")
        assert [m["body"] for m in res["messages"]] == ["pizza tonight?"]


async def test_presence_reports_online_connections_devices_and_last_seen(daemon, uniq):
    alice, bob = uniq("alice"), uniq("bob")
    async with open_client(daemon.url, token=daemon.token(bob)), \
            open_client(daemon.url, token=daemon.token(bob), device="phone"), \
            open_client(daemon.url, token=daemon.token(bob, device="laptop"), device="phone"):
        async with open_client(daemon.url, token=daemon.token(alice)) as a:
            online = (await a.presence([bob]))["users"][bob]
            assert online == {"online": True, "connections": 3,
                              "devices": ["default", "laptop", "phone"], "last_seen": None}
    # bob's close is complete: the server unregistered him (and noted last_seen) before
    # echoing his close frame, which the client's close waits for.
    async with open_client(daemon.url, token=daemon.token(alice)) as a:
        offline = (await a.presence([bob]))["users"][bob]
    assert offline["online"] is False and offline["connections"] == 0 and offline["devices"] == []
    assert isinstance(offline["last_seen"], int) and offline["last_seen"] > 0


async def test_restart_keeps_messages_cursor_and_seq(daemon, uniq):
    alice, bob = uniq("alice"), uniq("bob")
    async with open_client(daemon.url, token=daemon.token(alice)) as a:
        for i in range(3):
            await a.send(bob, i)
    async with open_client(daemon.url, token=daemon.token(bob)) as b:
        await replay_until_resumed(b)
        await b.ack(1, wait=True)
    assert await daemon.aterminate() == 0
    daemon.restart()
    async with open_client(daemon.url, token=daemon.token(alice)) as a:
        assert (await a.send(bob, 3))["seq"] == 4
    async with open_client(daemon.url, token=daemon.token(bob)) as b:
        msgs, _ = await replay_until_resumed(b)
    assert [m["body"] for m in msgs] == [1, 2, 3]


async def test_retention_prunes_and_resume_reports_incomplete(start_daemon, uniq):
    d = start_daemon(store={"max_inbox": 3, "prune_interval_s": 0.2})
    alice, bob = uniq("alice"), uniq("bob")
    async with open_client(d.url, token=d.token(alice)) as a:
        for i in range(8):
            await a.send(bob, i)
    await d.wait_for_log(r"event=pruned", timeout=10)
    async with open_client(d.url, token=d.token(bob), since=0) as b:
        msgs, resumed = await replay_until_resumed(b)
    assert [m["seq"] for m in msgs] == [6, 7, 8]
    assert resumed == {"type": "resumed", "since": 0, "last": 8, "complete": False}


async def test_kill_9_under_load_loses_no_acknowledged_message(start_daemon, uniq):
    d = start_daemon(limits={"messages_per_second": 100000.0, "burst": 100000})
    bob = uniq("bob")
    acked: set[str] = set()

    async def sender(name: str) -> None:
        try:
            async with open_client(d.url, token=d.token(name)) as c:
                while True:
                    ack = await c.send(bob, name)
                    acked.add(ack["msg_id"])
        except Exception:  # the daemon dies under us: that is the point of this test
            return

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(sender, uniq(f"s{i}"))
        with trio.fail_after(20):
            while len(acked) < 300:
                await trio.sleep(0.01)
        os.kill(d.pid, signal.SIGKILL)
    assert len(acked) >= 300
    d.restart()
    async with open_client(d.url, token=d.token(bob)) as b:
        msgs, _ = await replay_until_resumed(b, timeout=30)
    received = {m["msg_id"] for m in msgs}
    lost = acked - received
    assert not lost, f"{len(lost)} acknowledged messages lost after kill -9"
    assert [m["seq"] for m in msgs] == list(range(1, len(msgs) + 1))


def _run_serve(config: dict, tmp_path: Path, preexec=None) -> subprocess.CompletedProcess:
    path = write_toml(tmp_path / "c.toml", config)
    return subprocess.run(
        [sys.executable, "-m", "tidings", "serve", "--config", str(path)],
        capture_output=True, text=True, timeout=30, preexec_fn=preexec,
    )


def test_state_dir_that_is_not_a_directory_fails_loudly(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    r = _run_serve({"server": {"port": 0, "state_dir": str(blocker / "state")},
                    "auth": {"secret": TEST_SECRET}, "api": {"listen": ""}}, tmp_path)
    assert r.returncode == 1
    assert "cannot start" in r.stderr and str(blocker) in r.stderr


def test_read_only_state_dir_fails_loudly(tmp_path, read_only_dir):
    r = _run_serve({"server": {"port": 0, "state_dir": str(read_only_dir)},
                    "auth": {"secret": TEST_SECRET}, "api": {"listen": ""}}, tmp_path)
    assert r.returncode == 1
    assert "cannot start" in r.stderr and str(read_only_dir) in r.stderr


def test_full_disk_at_start_fails_loudly(tmp_path):
    """RLIMIT_FSIZE makes every write past 8 KiB fail with EFBIG, as a full disk would."""
    state = tmp_path / "state"
    state.mkdir()

    def tiny_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    r = _run_serve({"server": {"port": 0, "state_dir": str(state)},
                    "auth": {"secret": TEST_SECRET}, "api": {"listen": ""}}, tmp_path, preexec=tiny_disk)
    assert r.returncode == 1
    assert "cannot start" in r.stderr and "tidings.db" in r.stderr
