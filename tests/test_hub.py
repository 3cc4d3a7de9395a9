"""server/hub.py in process: store failures, acks and routing through real connections
(tests/inprocess.py), with a store that fails on demand.  Under autojump_clock; every
wait is bounded by a fail_after that fires at once if something hangs."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from inprocess import FlakyStore, capture_log, make_config, running_hub


def send(to: str, body: object, fid: object) -> dict:
    return {"type": "send", "to": to, "body": body, "id": fid}


async def test_append_failure_answers_unavailable_and_the_writer_survives(autojump_clock):
    with trio.fail_after(5):
        async with running_hub() as h:
            a = await h.connect("user=alice")
            h.store.fail("append")
            await a.send(send("bob", 1, "s1"), send("bob", 2, "s2"))
            errors = [await a.receive() for _ in range(2)]
            assert errors == [{"type": "error", "id": f"s{i}", "code": "unavailable",
                               "message": "message not stored; retry"} for i in (1, 2)]
            h.store.heal()
            await a.send(send("bob", 3, "s3"))
            ack = await a.receive()
            assert (ack["type"], ack["id"], ack["seq"], ack["delivered"]) == ("ack", "s3", 1, 0)
            assert h.hub.statistics().store_errors >= 1 and h.hub.statistics().stored == 1


async def test_store_failures_are_logged_once_with_a_count(autojump_clock):
    with trio.fail_after(5), capture_log() as logs:
        async with running_hub() as h:
            a = await h.connect("user=alice")
            h.store.fail("append", "save_progress")
            for i in range(3):  # one store call each: three failures, one line per kind
                await a.send(send("bob", i, i))
                assert (await a.receive())["code"] == "unavailable"
                await a.send({"type": "ack", "seq": 1, "id": f"k{i}"})
                assert await a.receive() == {"type": "error", "id": f"k{i}", "code": "unavailable",
                                             "message": "ack not saved; retry"}
            assert h.store.calls["append"] == 3 and h.store.calls["save_progress"] >= 3
    lines = [line for line in logs.getvalue().splitlines() if "event=store_failed" in line]
    appends = [line for line in lines if "what=append" in line]
    cursors = [line for line in lines if "what=cursors" in line]
    assert len(appends) == 1 and len(cursors) == 1, lines
    assert "failed=1 " in appends[0] + " " and "level=error" in appends[0], appends


async def test_ack_with_id_is_answered_once_the_cursor_is_saved(autojump_clock):
    with trio.fail_after(5):
        async with running_hub() as h:
            a = await h.connect("user=alice")
            await a.send(send("bob", "x", 1))
            assert (await a.receive())["seq"] == 1
            b = await h.connect("user=bob", read_greeting=False)
            assert [(await b.receive())["type"] for _ in range(3)] == ["hello", "message", "resumed"]
            release = h.store.hold("save_progress")
            await b.send({"type": "ack", "seq": 1, "id": "k"})
            await h.store.held["save_progress"].wait()
            await b.send({"type": "ping", "id": "p"})  # answered while the save waits
            assert await b.receive() == {"type": "pong", "id": "p"}
            release.set()
            assert await b.receive() == {"type": "acked", "id": "k", "seq": 1}
            again = await h.connect("user=bob")  # the replay starts after the saved cursor
            assert (again.resumed["since"], again.resumed["last"]) == (1, 1)


async def test_delivered_counts_exactly_the_connections_that_took_the_message(autojump_clock):
    """slow_consumer = "drop": a device whose queue is full is not counted in the ack's
    ``delivered``, is not disconnected, and the message stays stored for it."""
    config = make_config(limits={"outbound_queue": 1, "slow_consumer": "drop"})
    with trio.fail_after(5):
        async with running_hub(config) as h:
            a = await h.connect("user=alice")
            stuck = await h.connect("user=bob", lockstep=True)  # reads nothing from here on
            fine = await h.connect("user=bob")
            await a.send(send("bob", "one", 1))
            assert (await a.receive())["delivered"] == 2
            await trio.testing.wait_all_tasks_blocked()  # stuck's writer holds "one"
            await a.send(send("bob", "two", 2))
            ack = await a.receive()
            assert (ack["id"], ack["seq"], ack["delivered"]) == (2, 2, 1)
            assert [(await fine.receive())["body"] for _ in range(2)] == ["one", "two"]
            assert (await stuck.receive())["body"] == "one"  # then the gap: "two" dropped
            await stuck.send({"type": "resume", "since": 1, "id": "r"})
            replayed = await stuck.receive()
            assert (replayed["body"], replayed["seq"]) == ("two", 2)
            assert (await stuck.receive())["type"] == "resumed"
            assert h.hub.statistics().dropped == 1 and h.hub.statistics().slow_disconnects == 0


@pytest.mark.parametrize("after_read", [False, True])
async def test_a_live_message_during_the_greetings_state_read_arrives_once(autojump_clock, after_read):
    """A message stored and routed while the first replay reads the inbox state is
    absorbed (the connection is registered and replaying), then read by the replay:
    exactly once, before ``resumed`` -- also when the state it read predates it (then
    only the gate's ``live_seq`` says it must be read)."""
    store = FlakyStore()
    with trio.fail_after(5):
        async with running_hub(store=store) as h:
            a = await h.connect("user=alice")
            release = store.hold("inbox_state", after_read=after_read)
            async with trio.open_nursery() as nursery:
                got = {}

                async def connect_bob() -> None:
                    got["bob"] = await h.connect("user=bob", read_greeting=False)

                nursery.start_soon(connect_bob)
                await store.held["inbox_state"].wait()  # bob registered, state read pending
                await a.send(send("bob", "meanwhile", 1))
                ack = await a.receive()
                assert ack["delivered"] == 1  # absorbed: the replay will read it
                release.set()
            b = got["bob"]
            assert (await b.receive())["type"] == "hello"
            message = await b.receive()
            assert (message["type"], message["seq"], message["body"]) == ("message", 1, "meanwhile")
            resumed = await b.receive()
            assert (resumed["type"], resumed["since"], resumed["last"]) == ("resumed", 0, 1)
            await a.send({"type": "ping", "id": "p"})
            assert await a.receive() == {"type": "pong", "id": "p"}
            await b.send({"type": "ping", "id": "p"})
            assert await b.receive() == {"type": "pong", "id": "p"}  # nothing twice


async def test_store_failure_during_a_resume_closes_1011(autojump_clock):
    with trio.fail_after(5):
        async with running_hub() as h:
            b = await h.connect("user=bob")
            h.store.fail("inbox_state")
            await b.send({"type": "resume", "since": 0, "id": "r"})
            frames, close = await b.receive_until_close()
            assert frames == [] and (close.code, close.reason) == (1011, "store unavailable")


async def test_store_failure_at_the_greeting_is_a_503(autojump_clock):
    store = FlakyStore()
    store.fail("inbox_state")
    with trio.fail_after(5):
        async with running_hub(store=store) as h:
            stream, served = h.serve()
            await stream.send_all(b"GET /ws?user=bob HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
                                  b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            data = b""
            while chunk := await stream.receive_some(4096):
                data += chunk
            assert data.startswith(b"HTTP/1.1 503 ") and data.endswith(b"store unavailable; retry\n")
            await served.wait()
            assert h.hub.sessions.count("bob") == 0


async def test_store_read_failures_in_commands_answer_unavailable(autojump_clock):
    with trio.fail_after(5):
        async with running_hub() as h:
            b = await h.connect("user=bob")
            h.store.fail("history", "search", "last_seen")
            await b.send({"type": "history", "with": "alice", "id": 1},
                         {"type": "search", "q": "x", "id": 2},
                         {"type": "presence", "users": ["alice"], "id": 3})
            replies = [await b.receive() for _ in range(3)]
            assert [(r["id"], r["code"]) for r in replies] == [(i, "unavailable") for i in (1, 2, 3)]
            h.store.heal()
            await b.send({"type": "history", "with": "alice", "id": 4})
            assert (await b.receive())["type"] == "history_page"


async def test_delivered_marks_wait_for_the_flush_timer(autojump_clock):
    """A delivered mark wakes no save of its own (one more transaction per message);
    the flush timer saves it within PROGRESS_FLUSH_S, and the hub's reads see it before."""
    from tidings.server.hub import PROGRESS_FLUSH_S

    with trio.fail_after(5):
        async with running_hub() as h:
            a = await h.connect("user=alice")
            b = await h.connect("user=bob&device=phone")
            await trio.testing.wait_all_tasks_blocked()
            saves = h.store.calls["save_progress"]  # the phone's registration was saved
            assert await h.store.inner.devices("bob") == {"phone": (0, 0)}
            await a.send(send("bob", "x", 1))
            ack = await a.receive()
            assert (await b.receive())["seq"] == 1
            await trio.testing.wait_all_tasks_blocked()
            assert h.store.calls["save_progress"] == saves  # nothing saved yet...
            status = await h.hub.message_status(ack["msg_id"])  # ...but the hub knows
            assert status["devices"] == {"phone": {"delivered": True, "acked": False}}
            await trio.sleep(PROGRESS_FLUSH_S)
            await trio.testing.wait_all_tasks_blocked()
            assert h.store.calls["save_progress"] == saves + 1
            assert await h.store.inner.devices("bob") == {"phone": (0, 1)}
            await trio.sleep(PROGRESS_FLUSH_S * 3)  # nothing pending: no more saves
            assert h.store.calls["save_progress"] == saves + 1


async def test_a_key_repeated_in_one_batch_answers_the_first_delivered_count(autojump_clock):
    with trio.fail_after(5):
        async with running_hub() as h:
            a = await h.connect("user=alice")
            b = await h.connect("user=bob")
            keyed = [dict(send("bob", i, i), key="k") for i in range(3)]
            await a.send(*keyed)  # one write: one batch
            acks = [await a.receive() for _ in range(3)]
            assert [(x["seq"], x["delivered"], x.get("duplicate")) for x in acks] == [
                (1, 1, None), (1, 1, True), (1, 1, True)]
            assert len({x["msg_id"] for x in acks}) == 1
            assert (await b.receive())["body"] == 0
            await b.send({"type": "ping", "id": "p"})
            assert await b.receive() == {"type": "pong", "id": "p"}  # one copy only


async def test_a_room_key_the_store_cannot_claim_answers_unavailable(autojump_clock):
    with trio.fail_after(5):
        async with running_hub() as h:
            a = await h.connect("user=alice")
            await a.send({"type": "join", "room": "r", "id": "j"})
            assert (await a.receive())["type"] == "joined"
            h.store.fail("claim_key")
            await a.send({"type": "send", "room": "r", "body": 1, "key": "k", "id": "s"})
            assert await a.receive() == {"type": "error", "id": "s", "code": "unavailable",
                                         "message": "store unavailable; retry"}
            await a.send({"type": "send", "room": "r", "body": 2, "id": "t"})  # no key: fine
            frames = [await a.receive() for _ in range(2)]
            assert {f["type"] for f in frames} == {"message", "ack"}
