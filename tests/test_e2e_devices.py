"""End to end, issue #12: every device exactly once -- idempotent sends, per-device
cursors, delivery status and unread counts -- against the real daemon subprocess with
the real Python client (the two-node cluster case is in tests/test_e2e_cluster.py)."""

from __future__ import annotations

import signal
import urllib.parse

import pytest
import trio

from conftest import replay_until_resumed
from test_api import aapi
from tidings.client import HandshakeRefused, ServerError, open_client

T = 10


async def no_more_messages(c) -> None:
    """A ping round trip, then nothing but the connect's ``resumed`` in the inbox."""
    assert (await c.ping())["type"] == "pong"
    assert [f for f in c.drain() if f["type"] != "resumed"] == []


async def stored(daemon, user: str, device: str = "inspector") -> list[dict]:
    """Everything retained in ``user``'s inbox (a fresh device replays it all)."""
    async with open_client(daemon.url, token=daemon.token(user), device=device) as c:
        msgs, _ = await replay_until_resumed(c)
    return msgs


# -- idempotent sends ------------------------------------------------------------------

async def test_a_resend_after_a_reconnect_is_stored_once(daemon, uniq):
    """The first ack is lost with its connection; the resend with the same key stores
    nothing and answers the original ack, marked duplicate."""
    alice, bob = uniq("alice"), uniq("bob")
    async with open_client(daemon.url, token=daemon.token(alice)) as a:
        await a.send_frame({"type": "send", "to": bob, "body": "once", "key": "k-1", "id": 1})
    # Our close was read after the send was queued: the resend below queues after it.
    async with open_client(daemon.url, token=daemon.token(alice)) as a:
        again = await a.send(bob, "once, resent", key="k-1")
        assert again["duplicate"] is True and again["seq"] == 1
        third = await a.send(bob, "twice?", key="k-1")
        assert (third["msg_id"], third["seq"], third["duplicate"]) == (again["msg_id"], 1, True)
        other = await a.send(bob, "another", key="k-2")
        assert "duplicate" not in other and other["seq"] == 2
        assert a.unacked == {}
    msgs = await stored(daemon, bob)
    assert [(m["body"], m["seq"]) for m in msgs] == [("once", 1), ("another", 2)]
    assert msgs[0]["msg_id"] == again["msg_id"]


async def test_a_resend_after_a_restart_is_stored_once(daemon, uniq):
    alice, bob = uniq("alice"), uniq("bob")
    async with open_client(daemon.url, token=daemon.token(alice)) as a:
        first = await a.send(bob, {"text": "before"}, key="order-17")
    daemon.kill()  # SIGKILL: the append was committed before the ack
    daemon.restart()
    async with open_client(daemon.url, token=daemon.token(alice)) as a:
        again = await a.send(bob, {"text": "before"}, key="order-17")
    assert (again["msg_id"], again["seq"], again["duplicate"]) == (first["msg_id"], 1, True)
    assert [m["body"] for m in await stored(daemon, bob)] == [{"text": "before"}]


async def test_the_client_resends_what_a_stopped_daemon_never_answered(daemon, uniq):
    """Sends written to a daemon that never answers stay in ``unacked``; resent to the
    restarted daemon they are stored (none lost), resent again they are duplicates."""
    alice, bob = uniq("alice"), uniq("bob")
    async with open_client(daemon.url, token=daemon.token(alice)) as a:
        answered = await a.send(bob, "answered")
        daemon.send_signal(signal.SIGSTOP)
        for text in ("lost-1", "lost-2"):
            with pytest.raises(trio.TooSlowError):
                await a.send(bob, text, timeout=0.3)
        pending = dict(a.unacked)
        daemon.kill()
    assert [f["body"] for f in pending.values()] == ["lost-1", "lost-2"]
    daemon.restart()
    async with open_client(daemon.url, token=daemon.token(alice)) as a:
        acks = await a.resend(pending)
        assert [(x["seq"], "duplicate" in x) for x in acks] == [(2, False), (3, False)]
        acks = await a.resend(pending)
        assert [(x["seq"], x["duplicate"]) for x in acks] == [(2, True), (3, True)]
    got = await stored(daemon, bob)
    assert [m["body"] for m in got] == ["answered", "lost-1", "lost-2"]
    assert got[0]["msg_id"] == answered["msg_id"]


async def test_a_duplicate_answers_the_first_delivered_count(daemon, uniq):
    alice, bob = uniq("alice"), uniq("bob")
    async with open_client(daemon.url, token=daemon.token(bob)) as b, \
            open_client(daemon.url, token=daemon.token(alice)) as a:
        first = await a.send(bob, "hi", key="k")
        assert first["delivered"] == 1
        assert (await b.receive_message())["body"] == "hi"
        again = await a.send(bob, "hi", key="k")
        assert {k: v for k, v in again.items() if k != "id"} == \
            {**{k: v for k, v in first.items() if k != "id"}, "duplicate": True}
        await no_more_messages(b)  # no second copy


@pytest.mark.parametrize(("key", "ok"), [("k" * 128, True), ("k" * 129, False), ("", False),
                                         (7, False), ("tab\there", False), ("ü 😀", True)])
async def test_the_key_is_1_to_128_printable_characters(daemon, uniq, key, ok):
    alice = uniq("alice")
    async with open_client(daemon.url, token=daemon.token(alice)) as a:
        frame = {"type": "send", "to": uniq("bob"), "body": 1, "key": key}
        if ok:
            assert (await a.request(frame))["seq"] == 1
        else:
            with pytest.raises(ServerError) as err:
                await a.request(frame)
            assert (err.value.code, err.value.message) == (
                "bad_request", "'key' must be 1-128 printable characters")


async def test_room_sends_with_a_key_go_out_once(daemon, uniq):
    alice, bob, room = uniq("alice"), uniq("bob"), uniq("room")
    async with open_client(daemon.url, token=daemon.token(alice)) as a, \
            open_client(daemon.url, token=daemon.token(bob)) as b:
        for c in (a, b):
            await c.request({"type": "join", "room": room})
        first = await a.send(None, "hello room", room=room, key="r-1")
        assert first["delivered"] == 2 and "duplicate" not in first
        again = await a.send(None, "hello room", room=room, key="r-1")
        assert (again["msg_id"], again["delivered"], again["duplicate"]) == (first["msg_id"], 2, True)
        assert (await b.receive_message())["body"] == "hello room"
        await no_more_messages(b)


async def test_api_idempotency_key(daemon, uniq):
    bob, carol = uniq("bob"), uniq("carol")
    headers = {"Idempotency-Key": "invoice-42"}
    async with open_client(daemon.url, token=daemon.token(bob)) as b:
        status, first = await aapi(daemon, "POST", "/api/send", {"to": bob, "body": "paid"},
                                   headers=headers)
        assert (status, first["delivered"]) == (202, 1)
        status, again = await aapi(daemon, "POST", "/api/send", {"to": bob, "body": "paid"},
                                   headers=headers)
        assert (status, again) == (202, {**first, "duplicate": True})
        assert (await b.receive_message())["body"] == "paid"
        await no_more_messages(b)
    users, headers = {"users": [bob, carol], "body": "news"}, {"Idempotency-Key": "news-1"}
    status, first = await aapi(daemon, "POST", "/api/broadcast", users, headers=headers)
    assert status == 202 and "duplicate" not in first
    assert not any("duplicate" in r for r in first["results"])
    status, again = await aapi(daemon, "POST", "/api/broadcast", users, headers=headers)
    assert (status, again) == (202, {"results": [{**r, "duplicate": True} for r in first["results"]],
                                     "duplicate": True})
    for bad in ("", "x" * 129):
        status, body = await aapi(daemon, "POST", "/api/send", {"to": bob, "body": 1},
                                  headers={"Idempotency-Key": bad})
        assert (status, body) == (400, {"error": "Idempotency-Key must be 1-128 printable characters"})
    assert [m["body"] for m in await stored(daemon, bob)] == ["paid", "news"]


# -- devices ---------------------------------------------------------------------------

async def test_phone_acks_laptop_gets_everything_phone_gets_nothing(daemon, uniq):
    alice, bob = uniq("alice"), uniq("bob")
    async with open_client(daemon.url, token=daemon.token(alice)) as a:
        for i in range(3):
            await a.send(bob, f"m{i}")
    async with open_client(daemon.url, token=daemon.token(bob), device="phone") as phone:
        assert (phone.device, phone.unread) == ("phone", 3)
        msgs, _ = await replay_until_resumed(phone)
        assert [m["seq"] for m in msgs] == [1, 2, 3]
        assert (await phone.ack(3, wait=True))["seq"] == 3
    async with open_client(daemon.url, token=daemon.token(bob, device="laptop")) as laptop:
        assert (laptop.device, laptop.unread) == ("laptop", 3)
        msgs, _ = await replay_until_resumed(laptop)
        assert [m["body"] for m in msgs] == ["m0", "m1", "m2"]
    async with open_client(daemon.url, token=daemon.token(bob), device="phone") as phone:
        assert phone.unread == 0
        msgs, resumed = await replay_until_resumed(phone)
        assert (msgs, resumed["since"], resumed["last"]) == ([], 3, 3)
    async with open_client(daemon.url, token=daemon.token(bob)) as default:
        assert (default.device, default.unread) == ("default", 3)  # today's behaviour


async def test_the_token_device_claim_wins_over_the_query(daemon, uniq):
    bob = uniq("bob")
    async with open_client(daemon.url, token=daemon.token(bob, device="watch"), device="phone") as c:
        assert c.device == "watch"


async def test_a_new_device_starts_after_the_inbox_when_configured(start_daemon, uniq):
    d = start_daemon(store={"new_device_replay": "none"})
    alice, bob = uniq("alice"), uniq("bob")
    async with open_client(d.url, token=d.token(alice)) as a:
        for i in range(2):
            await a.send(bob, f"old{i}")
        async with open_client(d.url, token=d.token(bob), device="tablet") as tablet:
            assert tablet.unread == 0
            assert await replay_until_resumed(tablet) == ([], {"type": "resumed", "since": 2,
                                                               "last": 2, "complete": True})
            await a.send(bob, "new")
            assert (await tablet.receive_message())["body"] == "new"
    async with open_client(d.url, token=d.token(bob), device="tablet") as tablet:
        assert tablet.unread == 1  # its cursor started at 2, and seq 3 is not acked
        assert [m["body"] for m in (await replay_until_resumed(tablet))[0]] == ["new"]
    async with open_client(d.url, token=d.token(bob), since=0, device="tv") as tv:
        assert [m["seq"] for m in (await replay_until_resumed(tv))[0]] == [1, 2, 3]


@pytest.mark.parametrize(("device", "ok"), [("a" * 64, True), ("a" * 65, False), ("A-z_0.9", True),
                                            ("no space", False), ("é", False), ("", False)])
async def test_the_device_name_in_the_query(daemon, uniq, device, ok):
    url = f"{daemon.url}?device={urllib.parse.quote(device)}"
    if ok:
        async with open_client(url, token=daemon.token(uniq("bob"))) as c:
            assert c.device == device
        return
    with pytest.raises(HandshakeRefused) as refused:
        async with open_client(url, token=daemon.token(uniq("bob"))):
            pass
    assert (refused.value.status_code, refused.value.reason_text) == (
        400, "?device= must be 1-64 characters of A-Z a-z 0-9 _ . -")


async def test_a_bad_device_claim_is_refused(daemon, uniq):
    with pytest.raises(HandshakeRefused) as refused:
        async with open_client(daemon.url, token=daemon.token(uniq("bob"), device="a/b")):
            pass
    assert (refused.value.status_code, refused.value.reason_text) == (
        401, "token 'device' claim must be 1-64 characters of A-Z a-z 0-9 _ . -")


# -- delivery status and unread ----------------------------------------------------------

async def test_delivery_status_and_unread(daemon, uniq):
    alice, bob = uniq("alice"), uniq("bob")
    async with open_client(daemon.url, token=daemon.token(bob), device="phone"):
        pass  # the phone is registered, then offline
    async with open_client(daemon.url, token=daemon.token(bob), device="laptop") as laptop, \
            open_client(daemon.url, token=daemon.token(alice)) as a:
        ack = await a.send(bob, "status?")
        got = await laptop.receive_message()
        status, body = await aapi(daemon, "GET", f"/api/messages/{ack['msg_id']}")
        assert (status, body) == (200, {
            "msg_id": ack["msg_id"], "from": alice, "to": bob, "seq": 1, "ts": got["ts"],
            "devices": {"laptop": {"delivered": True, "acked": False},
                        "phone": {"delivered": False, "acked": False}}})
        assert await aapi(daemon, "GET", f"/api/users/{bob}/unread") == (
            200, {"user": bob, "devices": {"laptop": 1, "phone": 1}})
        await laptop.ack(1, wait=True)
        status, body = await aapi(daemon, "GET", f"/api/messages/{ack['msg_id']}")
        assert body["devices"]["laptop"] == {"delivered": True, "acked": True}
        assert await aapi(daemon, "GET", f"/api/users/{bob}/unread") == (
            200, {"user": bob, "devices": {"laptop": 0, "phone": 1}})
    async with open_client(daemon.url, token=daemon.token(bob), device="phone") as phone:
        await replay_until_resumed(phone)
        await phone.ping()  # the replay is written: its delivered mark is set
        status, body = await aapi(daemon, "GET", f"/api/messages/{ack['msg_id']}")
        assert body["devices"]["phone"] == {"delivered": True, "acked": False}
    # saved with the cursors at shutdown: the same after a restart
    await daemon.aterminate()
    daemon.restart()
    status, body = await aapi(daemon, "GET", f"/api/messages/{ack['msg_id']}")
    assert body["devices"] == {"laptop": {"delivered": True, "acked": True},
                               "phone": {"delivered": True, "acked": False}}


async def test_status_and_unread_errors(daemon, uniq):
    assert await aapi(daemon, "GET", "/api/messages/0123456789abcdef01234567") == (
        404, {"error": "no message '0123456789abcdef01234567' (unknown, or pruned)"})
    assert (await aapi(daemon, "GET", "/api/messages/x", key=None))[0] == 401
    assert await aapi(daemon, "POST", "/api/messages/x") == (
        405, {"error": "no POST /api/messages/{msg_id}"})
    assert (await aapi(daemon, "GET", "/api/messages/"))[0] == 400
    nobody = uniq("nobody")
    assert await aapi(daemon, "GET", f"/api/users/{nobody}/unread") == (
        200, {"user": nobody, "devices": {}})
    odd = "a/b c"  # a user id with a slash and a space, percent-encoded
    assert await aapi(daemon, "GET", f"/api/users/{urllib.parse.quote(odd, safe='')}/unread") == (
        200, {"user": odd, "devices": {}})
    assert (await aapi(daemon, "GET", "/api/users/%ff/unread"))[0] == 400
