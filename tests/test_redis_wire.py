"""The write lane's own Redis connection (store/redis_wire.py): what it connects to, the
session it sets up (password, database, client name), batches bigger than the socket
buffer written whole and in order, waiters that leave, a protocol error, and the
packer (hiredis') writing what coredis' Packer wrote for every argument type we send.

Every test runs its own redis-server (tests/redis_fixture.py).  Restarts and a hung
server are covered through the store in tests/test_store_redis.py.
"""

from __future__ import annotations

from functools import partial

import pytest
import trio
import trio.testing
from redis_fixture import redis_server, require_coredis  # noqa: F401
from store_harness import msg

require_coredis()
import coredis
from tidings.store import StoreLimits, StoreUnavailable
from tidings.store.redis import open_redis_store
from tidings.store.redis_lane import Call, Lane
from tidings.store.redis_wire import (
    ReplyReader,
    WireConnection,
    pack_commands,
    wire_target,
)

NO_LIMITS = StoreLimits()


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://127.0.0.1:6400/0", {"host": "127.0.0.1", "port": 6400}),
    ("redis://u:pw@h:7/3", {"host": "h", "port": 7, "username": "u", "password": "pw", "db": 3}),
    ("unix:///run/redis.sock?db=2", {"path": "/run/redis.sock", "db": 2}),
    ("rediss://h:7", None),  # TLS: the lane stays on coredis' connection
])
def test_wire_target(url, expected):
    target = wire_target(coredis.Redis.from_url(url, client_name="n"))
    if expected is None:
        assert target is None
    else:
        assert {k: v for k, v in target.items() if v is not None} == {**expected, "client_name": "n"}


def _coredis_packed(commands) -> bytes:
    from coredis._packer import Packer
    return b"".join(Packer("utf-8").pack_commands(list(commands)))


@pytest.mark.parametrize("commands", [
    [(b"PING",)],
    # an append's arguments: str (ascii, UTF-8, empty), int (0, negative, big), bytes
    # (empty, a body with CRLF and NUL, one over coredis' 6,000-byte chunking)
    [(b"EVALSHA", "a" * 40, 2, "tidings:{bob}:u", "tidings:{ix:20000:a}", -1, "PUBLISH",
      0, 86_400_000, 2**70, "", "éè\u2603\U0001f600", b"", b"{\"t\":\"\r\n\x00\"}",
      1_764_700_000_000, b"x" * 7000, "sender\nkey")],
    [(b"HSET", "k", "f", 1), (b"PEXPIREAT", "k", 1_764_700_000_000), (b"CLIENT", b"SETNAME", "n")],
    [(b"SET", "k", True), (b"SET", "k", False)],  # bool: as coredis (1/0)
])
def test_the_packer_writes_what_coredis_wrote(commands):
    assert pack_commands(commands) == _coredis_packed(commands)


def test_the_packer_refuses_what_coredis_refused():
    with pytest.raises(UnicodeEncodeError):
        pack_commands([(b"SET", "k", "x\udcff")])
    with pytest.raises(TypeError):
        pack_commands([(b"SET", "k", bytearray(b"x"))])


_REPLIES = [
    b"+OK\r\n", b":0\r\n", b":-12\r\n", b"$0\r\n\r\n", b"$-1\r\n", b"*-1\r\n", b"*0\r\n",
    b"$6\r\nx\r\n\x00yz\r\n",
    # an append's reply: seq, receivers, "" or a key's stored value, per message
    b"*6\r\n:7\r\n:1\r\n$0\r\n\r\n:-2\r\n:0\r\n$8\r\nm\n3\n17\n0\r\n",
    b"-NOSCRIPT No matching script. Please use EVAL.\r\n",
    b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
    b"-ERR unknown command 'FOO'\r\n", b"-ERR Error running script\r\n", b"-BUSY x\r\n",
    b"*3\r\n*2\r\n-NOSCRIPT a\r\n:1\r\n-ERR b\r\n*0\r\n",  # errors inside arrays
]


def _same(a, b) -> bool:
    """Replies equal, exceptions by class and text."""
    if isinstance(a, BaseException) or isinstance(b, BaseException):
        return type(a) is type(b) and a.args == b.args
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("split", [None, 1, 3])
def test_the_reply_reader_gives_what_coredis_parser_gave(split):
    """hiredis' Reader (the lane's parser since the eleventh session) gives every reply
    as coredis' Parser did, whole or fed in pieces (an error inside an array parsed in
    an earlier, incomplete read included)."""
    from coredis.parser import NotEnoughData, Parser
    stream = b"".join(_REPLIES)
    coredis_parser, expected = Parser(), []
    coredis_parser.feed(stream)
    while not isinstance(r := coredis_parser.parse(False, None), NotEnoughData):
        expected.append(r[1])
    reader, got = ReplyReader(), []
    step = split or len(stream)
    for at in range(0, len(stream), step):
        reader.feed(stream[at:at + step])
        while (r := reader.get()) is not ReplyReader.INCOMPLETE:
            got.append(r)
    assert len(got) == len(expected) == len(_REPLIES)
    assert all(_same(g, e) for g, e in zip(got, expected)), (got, expected)
    assert isinstance(got[9], coredis.exceptions.NoScriptError)


def test_the_reply_reader_refuses_what_is_not_resp():
    reader = ReplyReader()
    reader.feed(b"?what\r\n")
    with pytest.raises(ValueError):
        reader.get()


def _with_password(redis_server, password: str) -> None:
    import socket
    with socket.create_connection(("127.0.0.1", redis_server.port), timeout=5) as s:
        s.sendall(f"CONFIG SET requirepass {password}\r\n".encode())
        assert s.recv(64).startswith(b"+OK")


async def test_the_session_has_the_urls_password_database_and_client_name(redis_server):
    _with_password(redis_server, "s3cret")
    url = f"redis://:s3cret@127.0.0.1:{redis_server.port}/2"
    async with open_redis_store(url, limits=NO_LIMITS, node_id="n7") as s:
        assert [a.seq for a in await s.append([msg("a", "b"), msg("a", "b")])] == [1, 2]
        assert [m.seq for m in await s.read_inbox("b", 0, 10)] == [1, 2]  # coredis, db 2
        r = coredis.Redis.from_url(f"redis://:s3cret@127.0.0.1:{redis_server.port}/0")
        async with r:
            assert await r.dbsize() == 0  # nothing went to database 0
            names = [c["name"] for c in await r.client_list()]
            assert names.count("tidings-store:n7") >= 2  # coredis' and the lane's
    with pytest.raises(StoreUnavailable):
        bad = f"redis://:wrong@127.0.0.1:{redis_server.port}/2"
        async with open_redis_store(bad, limits=NO_LIMITS, node_id="n7"):
            pass  # pragma: no cover


async def test_batches_bigger_than_the_socket_buffer_go_whole_in_send_order(redis_server):
    """A batch of ~6 MB does not fit the socket buffer; batches sent meanwhile from other
    tasks wait for it and follow it in order, and every reply reaches its batch."""
    async with open_redis_store(redis_server.url, limits=NO_LIMITS, node_id="t") as s:
        big = [msg("a", "b", body="x" * 60_000) for _ in range(100)]
        results: dict[str, list[int]] = {}
        order: list[str] = []

        async def submit(name: str, batch: list) -> None:
            pending = await s.append_submit(batch)
            order.append(name)
            results[name] = [a.seq for a in await pending()]

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(submit, "big", big)
                await trio.testing.wait_all_tasks_blocked()  # "big" waits for room
                for i in range(3):
                    nursery.start_soon(submit, f"small{i}", [msg("a", "b")])
                    await trio.testing.wait_all_tasks_blocked()
        assert order == ["big", "small0", "small1", "small2"]
        assert results == {"big": list(range(1, 101)), "small0": [101], "small1": [102],
                           "small2": [103]}


async def test_a_waiter_that_leaves_hands_the_reading_over(redis_server):
    async with open_redis_store(redis_server.url, limits=NO_LIMITS, node_id="t") as s:
        wire = s._lane._wire
        # the first command holds the connection until the list gets a value: its waiter
        # starts reading and is cancelled while it reads
        first = await wire.send([(b"BLPOP", b"hand-over", b"0")])
        second = await wire.send([(b"PING",), (b"ECHO", b"x")])
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first.replies)
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
            await s._r.rpush("hand-over", ["v"])  # (another connection: unblocks BLPOP)
            assert await second.replies() == [b"PONG", b"x"]
            assert await first.replies() == [[b"hand-over", b"v"]]  # read by the second's waiter
        assert wire.usable


async def test_two_waiters_each_get_their_replies_whoever_reads(redis_server):
    async with open_redis_store(redis_server.url, limits=NO_LIMITS, node_id="t") as s:
        wire = s._lane._wire
        got: dict[int, list] = {}

        async def wait(i, batch):
            got[i] = await batch.replies()

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                batches = [await wire.send([(b"ECHO", str(i).encode()), (b"PING",)])
                           for i in range(4)]
                for i in (3, 1, 0, 2):  # the latest batch's waiter reads first
                    nursery.start_soon(wait, i, batches[i])
        assert got == {i: [str(i).encode(), b"PONG"] for i in range(4)}


@pytest.mark.parametrize("answer", [b"?what\r\n", b"+OK\r\n+OK\r\n", b""])
async def test_a_bad_reply_or_eof_fails_the_unanswered_and_closes(answer):
    """Garbage, a reply nobody asked for, or the end of the stream: every unanswered
    command gets a ConnectionError (its outcome is unknown) and nothing more is sent."""
    async def fake_redis(stream):
        await stream.receive_some(1024)
        if answer:
            await stream.send_all(answer)
            await trio.sleep_forever()
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, fake_redis, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        wire = await WireConnection.open({"host": "127.0.0.1", "port": port},
                                         connect_timeout=2, command_timeout=2)
        with trio.fail_after(5):
            (reply,) = await (await wire.send([(b"PING",)])).replies()
        if answer.count(b"+OK") == 2:
            assert reply == b"OK"  # the first is its own; the second is nobody's
        else:
            assert isinstance(reply, coredis.exceptions.ConnectionError)
        assert not wire.usable
        with pytest.raises(coredis.exceptions.ConnectionError):
            await wire.send([(b"PING",)])
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("when", ["before the call", "while the call opens a connection"])
async def test_a_closed_lane_fails_its_calls_and_keeps_no_connection(redis_server, monkeypatch, when):
    """After ``Lane.aclose`` a call gets ConnectionError and runs nothing: the lane opens
    no connection of its own again, and one being opened when aclose ran is closed
    (nothing else would close it)."""
    r = coredis.Redis.from_url(redis_server.url)
    async with r:
        lane = Lane(r, cluster=False)
        await lane.load()
        lane._wire.close(coredis.exceptions.ConnectionError("gone"))  # the next call opens one
        opened = []
        real_open = WireConnection.open

        async def open_then_close_the_lane(*args, **kwargs):
            opened.append(await real_open(*args, **kwargs))
            await lane.aclose()
            return opened[-1]

        if when == "before the call":
            await lane.aclose()
        else:
            monkeypatch.setattr(WireConnection, "open", open_then_close_the_lane)
        (reply,) = await lane.run([Call("HSET", ["k"], ["f", "v"])])
        assert isinstance(reply, coredis.exceptions.ConnectionError)
        assert await r.exists(["k"]) == 0
        assert not any(w.usable for w in opened)
