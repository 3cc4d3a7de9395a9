"""The cluster's pub/sub on a connection of its own (cluster/wire_pubsub.py): which
reader ``batch_pubsub`` picks, the session it sets up (password, database, client
name), acknowledgements and messages in order, and how a session ends (end of stream,
an error reply, garbage, a hung Redis found by the keepalive, a missing
acknowledgement).  Reconnecting, resubscribing and the resync after a gap are the node's
(tests/test_cluster.py, tests/test_e2e_cluster.py), now on this reader.
"""

from __future__ import annotations

from functools import partial

import pytest
import trio
import trio.testing
from redis_fixture import redis_server, require_coredis  # noqa: F401

require_coredis()
import coredis
from tidings.cluster.pubsub import BatchPubSub, batch_pubsub
from tidings.cluster.wire_pubsub import open_wire_pubsub


def _with_password(redis_server, password: str) -> None:
    import socket
    with socket.create_connection(("127.0.0.1", redis_server.port), timeout=5) as s:
        s.sendall(f"CONFIG SET requirepass {password}\r\n".encode())
        assert s.recv(64).startswith(b"+OK")


def test_a_standalone_redis_without_tls_is_read_on_our_own_connection():
    sink = [].extend
    own = batch_pubsub(coredis.Redis.from_url("redis://127.0.0.1:7"), False, sink, 1.0, 5.0)
    assert not isinstance(own, BatchPubSub) and hasattr(own, "__aenter__")
    theirs = batch_pubsub(coredis.Redis.from_url("rediss://127.0.0.1:7"), False, sink, 1.0, 5.0)
    assert isinstance(theirs, BatchPubSub)
    forced = batch_pubsub(coredis.Redis.from_url("redis://127.0.0.1:7"), False, sink, 1.0, 5.0,
                          own_connection=False)
    assert isinstance(forced, BatchPubSub)


async def test_the_session_has_the_urls_password_database_and_client_name(redis_server):
    """Published messages reach the sink in publish order with the acknowledgements in
    between; pub/sub ignores the database, but SELECT and AUTH must have succeeded."""
    _with_password(redis_server, "s3cret")
    got: list[tuple[str, bytes, object]] = []
    all_in = trio.Event()

    def sink(ms: list[dict]) -> None:
        got.extend((m["type"], m["channel"], m["data"]) for m in ms)
        if len(got) >= 6:
            all_in.set()

    r = coredis.Redis.from_url(f"redis://:s3cret@127.0.0.1:{redis_server.port}/2",
                               client_name="tidings-cluster:n9")
    async with r, batch_pubsub(r, False, sink, 2.0, 5.0) as ps:
        await ps.subscribe("a", "b")
        await ps.subscribe("a")  # twice: acknowledged twice
        assert await r.publish("a", "1") == 1
        assert await r.publish("b", "2") == 1
        names = [c["name"] for c in await r.client_list()]
        assert "tidings-cluster:n9" in names
        await ps.unsubscribe("b")
        with trio.fail_after(5):
            await all_in.wait()  # the unsubscribe's acknowledgement, the sixth reply
    assert got == [("subscribe", b"a", 1), ("subscribe", b"b", 2), ("subscribe", b"a", 2),
                   ("message", b"a", b"1"), ("message", b"b", b"2"), ("unsubscribe", b"b", 1)]
    with pytest.raises(coredis.exceptions.ConnectionError):
        bad = coredis.Redis.from_url(f"redis://:wrong@127.0.0.1:{redis_server.port}/2")
        async with batch_pubsub(bad, False, got.extend, 2.0, 5.0):
            pass  # pragma: no cover


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        assert len(exc.exceptions) == 1
        exc = exc.exceptions[0]
    return exc


@pytest.mark.parametrize("answer", [b"", b"-ERR no\r\n", b"?what\r\n"],
                         ids=["eof", "error reply", "garbage"])
async def test_end_of_stream_an_error_or_garbage_ends_the_session(answer):
    """The messages read before it still reach the sink; the session's block ends with
    a ConnectionError (the node's session loop then reconnects and resyncs)."""
    async def fake_redis(stream):
        await stream.receive_some(1024)  # SUBSCRIBE
        await stream.send_all(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n"
                              b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nx\r\n" + answer)
        if answer:
            await trio.sleep_forever()
        await stream.aclose()

    got: list = []
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, fake_redis, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        with pytest.raises(BaseException) as info, trio.fail_after(5):
            async with open_wire_pubsub({"host": "127.0.0.1", "port": port}, got.extend,
                                        subscription_timeout=2, max_idle_seconds=5,
                                        connect_timeout=2, command_timeout=2) as ps:
                await ps.subscribe("c")
                await trio.sleep_forever()
        assert isinstance(_leaf(info.value), coredis.exceptions.ConnectionError)
        assert [(m["type"], m["data"]) for m in got] == [("subscribe", 1), ("message", b"x")]
        nursery.cancel_scope.cancel()


async def test_a_hung_redis_is_found_by_the_keepalive_ping(autojump_clock):
    """Idle for max_idle_seconds: a PING; nothing read within command_timeout after it
    ends the session.  A Redis that answers the PING keeps it."""
    pings: list[str] = []

    async def fake_redis(answer_pings: bool, stream):
        while data := await stream.receive_some(1024):
            if b"PING" in data:
                pings.append("answered" if answer_pings else "ignored")
                if answer_pings:
                    await stream.send_all(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")

    async with trio.open_nursery() as nursery:
        listeners = {}
        for answer in (True, False):
            (listeners[answer],) = await nursery.start(
                partial(trio.serve_tcp, partial(fake_redis, answer), 0, host="127.0.0.1"))

        def target(answer):
            return {"host": "127.0.0.1", "port": listeners[answer].socket.getsockname()[1]}

        kwargs = {"subscription_timeout": 1, "max_idle_seconds": 10, "connect_timeout": 1,
                  "command_timeout": 3}
        started = trio.current_time()
        with pytest.raises(BaseException) as info:
            async with open_wire_pubsub(target(False), [].extend, **kwargs):
                await trio.sleep_forever()
        assert isinstance(_leaf(info.value), coredis.exceptions.ConnectionError)
        assert 13 <= trio.current_time() - started < 14
        assert pings == ["ignored"]
        with trio.move_on_after(100):
            async with open_wire_pubsub(target(True), [].extend, **kwargs):
                await trio.sleep_forever()
        assert pings[1:] == ["answered"] * 7  # every 10 + 3 s (idle, then the wait for it)
        nursery.cancel_scope.cancel()


async def test_a_subscribe_without_its_acknowledgement_times_out(autojump_clock):
    async def fake_redis(stream):
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, fake_redis, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        async with open_wire_pubsub({"host": "127.0.0.1", "port": port}, [].extend,
                                    subscription_timeout=2, max_idle_seconds=5,
                                    connect_timeout=2, command_timeout=2) as ps:
            with pytest.raises(TimeoutError):
                await ps.subscribe("c")
        nursery.cancel_scope.cancel()


async def test_a_subscribe_waiting_when_the_session_ends_fails_at_once(autojump_clock):
    """Its connection is gone: it raises ConnectionError at once, not after the
    subscription timeout (a hold then returns False and the next session resyncs)."""
    async def fake_redis(stream):
        await stream.receive_some(1024)  # SUBSCRIBE, never acknowledged
        await stream.aclose()

    outcome: list[BaseException] = []

    async def subscribe(ps):
        try:
            await ps.subscribe("c")
        except (coredis.exceptions.ConnectionError, TimeoutError) as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, fake_redis, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        started = trio.current_time()
        with pytest.raises(BaseException) as info:
            async with trio.open_nursery() as waiters, open_wire_pubsub(
                    {"host": "127.0.0.1", "port": port}, [].extend, subscription_timeout=60,
                    max_idle_seconds=100, connect_timeout=2, command_timeout=2) as ps:
                waiters.start_soon(subscribe, ps)
                await trio.sleep_forever()
        assert isinstance(_leaf(info.value), coredis.exceptions.ConnectionError)
        assert trio.current_time() - started < 1
        assert len(outcome) == 1 and isinstance(outcome[0], coredis.exceptions.ConnectionError)
        nursery.cancel_scope.cancel()
