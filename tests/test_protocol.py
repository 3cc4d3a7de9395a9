"""protocol.py: client frame parsing, server frame encoding, data_frame, MsgIdGenerator."""

from __future__ import annotations

import json
import string

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, TextMessage

from tidings.wire import protocol
from tidings.wire.protocol import (
    MAX_ID_LEN,
    MAX_USER_LEN,
    Ack,
    History,
    MsgIdGenerator,
    Ping,
    Presence,
    ProtocolError,
    Refresh,
    Resume,
    Search,
    Send,
    encode,
    message_frame,
    parse_client_frame,
    data_frame,
    valid_user_id,
)

USER_MSG = f"'{{}}' must be a user id (1-{MAX_USER_LEN} printable characters)"
TO_MSG = USER_MSG.format("to")
WITH_MSG = USER_MSG.format("with")
ID_TYPE_MSG = "'id' must be a string or an integer"
ID_LEN_MSG = f"'id' is longer than {MAX_ID_LEN} characters"
ID_RANGE_MSG = "'id' is out of range"
SEQ_MSG = "'seq' must be an integer >= 0"
SINCE_MSG = "'since' must be an integer >= 0"
LIMIT_MSG = "'limit' must be an integer >= 1"
OFFSET_MSG = "'offset' must be an integer >= 0"
Q_MSG = "'q' must be a non-empty string of at most 512"
USERS_MSG = "'users' must be a list of 1-100 user ids"
TOKEN_MSG = "'token' must be a non-empty string"


def dumps(obj) -> bytes:
    return json.dumps(obj).encode()


# -- valid frames --------------------------------------------------------------------

VALID = [
    # ping, and every accepted id shape
    ({"type": "ping"}, Ping(None)),
    ({"type": "ping", "id": None}, Ping(None)),
    ({"type": "ping", "id": "1"}, Ping("1")),
    ({"type": "ping", "id": ""}, Ping("")),
    ({"type": "ping", "id": "x" * MAX_ID_LEN}, Ping("x" * MAX_ID_LEN)),
    ({"type": "ping", "id": 0}, Ping(0)),
    ({"type": "ping", "id": -7}, Ping(-7)),
    ({"type": "ping", "id": 2**53 - 1}, Ping(2**53 - 1)),
    ({"type": "ping", "id": -(2**53) + 1}, Ping(-(2**53) + 1)),
    ({"type": "ping", "id": "p", "extra": [1, 2]}, Ping("p")),  # unknown fields ignored
    # send
    ({"type": "send", "to": "bob", "body": {"x": 1}, "id": "1"}, Send("1", "bob", b'{"x":1}')),
    ({"type": "send", "to": "bob", "body": None}, Send(None, "bob", b"null")),
    ({"type": "send", "to": "bob", "body": "hi"}, Send(None, "bob", b'"hi"')),
    ({"type": "send", "to": "bob", "body": [1, 2.5, True]}, Send(None, "bob", b"[1,2.5,true]")),
    ({"type": "send", "to": "a" * MAX_USER_LEN, "body": 0}, Send(None, "a" * MAX_USER_LEN, b"0")),
    ({"type": "send", "to": "bob smith", "body": 1}, Send(None, "bob smith", b"1")),
    ({"type": "send", "to": "björn", "body": "é"}, Send(None, "björn", '"é"'.encode())),
    # refresh
    ({"type": "refresh", "token": "abc"}, Refresh(None, "abc")),
    ({"type": "refresh", "token": "abc", "id": 4}, Refresh(4, "abc")),
    # ack
    ({"type": "ack", "seq": 0}, Ack(None, 0)),
    ({"type": "ack", "seq": 17, "id": "a"}, Ack("a", 17)),
    ({"type": "ack", "seq": 2**53 - 1}, Ack(None, 2**53 - 1)),
    # resume
    ({"type": "resume", "since": 0}, Resume(None, 0)),
    ({"type": "resume", "since": 42, "id": "r"}, Resume("r", 42)),
    # history
    ({"type": "history", "with": "bob"}, History(None, "bob", None, None)),
    ({"type": "history", "with": "bob", "before": None, "limit": None}, History(None, "bob", None, None)),
    (
        {"type": "history", "with": "bob", "before": "m" * MAX_ID_LEN, "limit": 1, "id": "h"},
        History("h", "bob", "m" * MAX_ID_LEN, 1),
    ),
    # search
    ({"type": "search", "q": "pizza"}, Search(None, "pizza", None, 0)),
    ({"type": "search", "q": "x" * 512, "limit": 5, "offset": 10, "id": 9}, Search(9, "x" * 512, 5, 10)),
    ({"type": "search", "q": "pizza", "offset": 0}, Search(None, "pizza", None, 0)),
    # presence
    ({"type": "presence", "users": ["bob"]}, Presence(None, ("bob",))),
    (
        {"type": "presence", "users": [f"u{i}" for i in range(100)], "id": "p"},
        Presence("p", tuple(f"u{i}" for i in range(100))),
    ),
]


@pytest.mark.parametrize(("frame", "expected"), VALID, ids=lambda v: str(v)[:60] if isinstance(v, dict) else "")
def test_valid_frames(frame, expected):
    assert parse_client_frame(dumps(frame)) == expected
    assert parse_client_frame(dumps(frame).decode()) == expected  # str input too


# -- invalid frames ------------------------------------------------------------------

# (raw frame text, code, message, frame_id)
INVALID_RAW = [
    (b"", "bad_request", "frame is not valid JSON", None),
    (b"{", "bad_request", "frame is not valid JSON", None),
    (b"not json", "bad_request", "frame is not valid JSON", None),
    (b'{"type":"ping"} trailing', "bad_request", "frame is not valid JSON", None),
    (b"\xff\xfe", "bad_request", "frame is not valid JSON", None),
    (b'{"type":"ping","id":NaN}', "bad_request", "frame is not valid JSON", None),
    (b'{"type":"send","to":"b","body":1e400}', "bad_request", "frame is not valid JSON", None),
    (b'{"type":"send","to":"b","body":"\\ud800"}', "bad_request", "frame is not valid JSON", None),
    (b"[]", "bad_request", "frame must be a JSON object", None),
    (b'[{"type":"ping"}]', "bad_request", "frame must be a JSON object", None),
    (b'"ping"', "bad_request", "frame must be a JSON object", None),
    (b"null", "bad_request", "frame must be a JSON object", None),
    (b"1", "bad_request", "frame must be a JSON object", None),
    (b'{"type":"ping","id":1.0}', "bad_request", ID_TYPE_MSG, None),
]

# (frame object, code, message, frame_id)
INVALID = [
    # type
    ({}, "bad_request", "'type' must be a string", None),
    ({"id": "a"}, "bad_request", "'type' must be a string", "a"),
    ({"type": None, "id": "a"}, "bad_request", "'type' must be a string", "a"),
    ({"type": 1, "id": 5}, "bad_request", "'type' must be a string", 5),
    ({"type": ["ping"], "id": "a"}, "bad_request", "'type' must be a string", "a"),
    ({"type": {"k": "ping"}}, "bad_request", "'type' must be a string", None),
    ({"type": "nope", "id": 3}, "unknown_type", "unknown frame type 'nope'", 3),
    ({"type": "PING", "id": "a"}, "unknown_type", "unknown frame type 'PING'", "a"),
    ({"type": ""}, "unknown_type", "unknown frame type ''", None),
    ({"type": "x" * 100}, "unknown_type", "unknown frame type '" + "x" * 64 + "'", None),
    ({"type": "message"}, "unknown_type", "unknown frame type 'message'", None),  # server-only
    # id (checked first; a bad id cannot be echoed)
    ({"type": "ping", "id": True}, "bad_request", ID_TYPE_MSG, None),
    ({"type": "ping", "id": False}, "bad_request", ID_TYPE_MSG, None),
    ({"type": "ping", "id": 1.5}, "bad_request", ID_TYPE_MSG, None),
    ({"type": "ping", "id": []}, "bad_request", ID_TYPE_MSG, None),
    ({"type": "ping", "id": ["a"]}, "bad_request", ID_TYPE_MSG, None),
    ({"type": "ping", "id": {"a": 1}}, "bad_request", ID_TYPE_MSG, None),
    ({"type": "ping", "id": 2**64}, "bad_request", ID_TYPE_MSG, None),  # orjson: float
    ({"type": "ping", "id": "x" * (MAX_ID_LEN + 1)}, "bad_request", ID_LEN_MSG, None),
    ({"type": "ping", "id": 2**53}, "bad_request", ID_RANGE_MSG, None),
    ({"type": "ping", "id": -(2**53)}, "bad_request", ID_RANGE_MSG, None),
    ({"type": "nope", "id": True}, "bad_request", ID_TYPE_MSG, None),
    # send
    ({"type": "send", "body": 1, "id": "s"}, "bad_request", TO_MSG, "s"),
    ({"type": "send", "to": "", "body": 1, "id": "s"}, "bad_request", TO_MSG, "s"),
    ({"type": "send", "to": "a" * (MAX_USER_LEN + 1), "body": 1, "id": "s"}, "bad_request", TO_MSG, "s"),
    ({"type": "send", "to": "bob\n", "body": 1, "id": "s"}, "bad_request", TO_MSG, "s"),
    ({"type": "send", "to": "bob\x00", "body": 1, "id": 1}, "bad_request", TO_MSG, 1),
    ({"type": "send", "to": "bob\u200b", "body": 1, "id": 1}, "bad_request", TO_MSG, 1),
    ({"type": "send", "to": "\t", "body": 1, "id": 1}, "bad_request", TO_MSG, 1),
    ({"type": "send", "to": None, "body": 1, "id": 1}, "bad_request", TO_MSG, 1),
    ({"type": "send", "to": 5, "body": 1, "id": 1}, "bad_request", TO_MSG, 1),
    ({"type": "send", "to": True, "body": 1, "id": 1}, "bad_request", TO_MSG, 1),
    ({"type": "send", "to": ["bob"], "body": 1, "id": 1}, "bad_request", TO_MSG, 1),
    ({"type": "send", "to": {"u": "bob"}, "body": 1, "id": 1}, "bad_request", TO_MSG, 1),
    ({"type": "send", "to": "bob", "id": "s"}, "bad_request", "'body' is required", "s"),
    # refresh
    ({"type": "refresh", "id": "r"}, "bad_request", TOKEN_MSG, "r"),
    ({"type": "refresh", "token": "", "id": "r"}, "bad_request", TOKEN_MSG, "r"),
    ({"type": "refresh", "token": 5, "id": "r"}, "bad_request", TOKEN_MSG, "r"),
    ({"type": "refresh", "token": None, "id": "r"}, "bad_request", TOKEN_MSG, "r"),
    # ack
    ({"type": "ack", "id": "a"}, "bad_request", SEQ_MSG, "a"),
    ({"type": "ack", "seq": None, "id": "a"}, "bad_request", SEQ_MSG, "a"),
    ({"type": "ack", "seq": -1, "id": "a"}, "bad_request", SEQ_MSG, "a"),
    ({"type": "ack", "seq": True, "id": "a"}, "bad_request", SEQ_MSG, "a"),
    ({"type": "ack", "seq": False, "id": "a"}, "bad_request", SEQ_MSG, "a"),
    ({"type": "ack", "seq": 1.0, "id": "a"}, "bad_request", SEQ_MSG, "a"),
    ({"type": "ack", "seq": 1.5, "id": "a"}, "bad_request", SEQ_MSG, "a"),
    ({"type": "ack", "seq": "1", "id": "a"}, "bad_request", SEQ_MSG, "a"),
    ({"type": "ack", "seq": [1], "id": "a"}, "bad_request", SEQ_MSG, "a"),
    ({"type": "ack", "seq": 2**53, "id": "a"}, "bad_request", SEQ_MSG, "a"),
    ({"type": "ack", "seq": 2**63, "id": "a"}, "bad_request", SEQ_MSG, "a"),
    ({"type": "ack", "seq": 10**30, "id": "a"}, "bad_request", SEQ_MSG, "a"),
    # resume
    ({"type": "resume", "id": 2}, "bad_request", SINCE_MSG, 2),
    ({"type": "resume", "since": -1, "id": 2}, "bad_request", SINCE_MSG, 2),
    ({"type": "resume", "since": True, "id": 2}, "bad_request", SINCE_MSG, 2),
    ({"type": "resume", "since": 3.0, "id": 2}, "bad_request", SINCE_MSG, 2),
    ({"type": "resume", "since": "3", "id": 2}, "bad_request", SINCE_MSG, 2),
    ({"type": "resume", "since": 2**53, "id": 2}, "bad_request", SINCE_MSG, 2),
    # history
    ({"type": "history", "id": "h"}, "bad_request", WITH_MSG, "h"),
    ({"type": "history", "with": "", "id": "h"}, "bad_request", WITH_MSG, "h"),
    ({"type": "history", "with": 7, "id": "h"}, "bad_request", WITH_MSG, "h"),
    ({"type": "history", "with": "a" * (MAX_USER_LEN + 1), "id": "h"}, "bad_request", WITH_MSG, "h"),
    ({"type": "history", "with": "bob", "before": 5, "id": "h"}, "bad_request", "'before' must be a msg_id", "h"),
    ({"type": "history", "with": "bob", "before": "m" * (MAX_ID_LEN + 1), "id": "h"},
     "bad_request", "'before' must be a msg_id", "h"),
    ({"type": "history", "with": "bob", "limit": 0, "id": "h"}, "bad_request", LIMIT_MSG, "h"),
    ({"type": "history", "with": "bob", "limit": -1, "id": "h"}, "bad_request", LIMIT_MSG, "h"),
    ({"type": "history", "with": "bob", "limit": True, "id": "h"}, "bad_request", LIMIT_MSG, "h"),
    ({"type": "history", "with": "bob", "limit": 1.5, "id": "h"}, "bad_request", LIMIT_MSG, "h"),
    ({"type": "history", "with": "bob", "limit": "5", "id": "h"}, "bad_request", LIMIT_MSG, "h"),
    # search
    ({"type": "search", "id": "q"}, "bad_request", Q_MSG, "q"),
    ({"type": "search", "q": "", "id": "q"}, "bad_request", Q_MSG, "q"),
    ({"type": "search", "q": "   ", "id": "q"}, "bad_request", Q_MSG, "q"),
    ({"type": "search", "q": "x" * 513, "id": "q"}, "bad_request", Q_MSG, "q"),
    ({"type": "search", "q": 5, "id": "q"}, "bad_request", Q_MSG, "q"),
    ({"type": "search", "q": ["a"], "id": "q"}, "bad_request", Q_MSG, "q"),
    ({"type": "search", "q": "a", "limit": 0, "id": "q"}, "bad_request", LIMIT_MSG, "q"),
    ({"type": "search", "q": "a", "limit": False, "id": "q"}, "bad_request", LIMIT_MSG, "q"),
    ({"type": "search", "q": "a", "offset": -1, "id": "q"}, "bad_request", OFFSET_MSG, "q"),
    ({"type": "search", "q": "a", "offset": True, "id": "q"}, "bad_request", OFFSET_MSG, "q"),
    ({"type": "search", "q": "a", "offset": 0.5, "id": "q"}, "bad_request", OFFSET_MSG, "q"),
    # presence
    ({"type": "presence", "id": "p"}, "bad_request", USERS_MSG, "p"),
    ({"type": "presence", "users": [], "id": "p"}, "bad_request", USERS_MSG, "p"),
    ({"type": "presence", "users": "bob", "id": "p"}, "bad_request", USERS_MSG, "p"),
    ({"type": "presence", "users": {"bob": 1}, "id": "p"}, "bad_request", USERS_MSG, "p"),
    ({"type": "presence", "users": ["bob", ""], "id": "p"}, "bad_request", USERS_MSG, "p"),
    ({"type": "presence", "users": [5], "id": "p"}, "bad_request", USERS_MSG, "p"),
    ({"type": "presence", "users": ["bob\n"], "id": "p"}, "bad_request", USERS_MSG, "p"),
    ({"type": "presence", "users": [f"u{i}" for i in range(101)], "id": "p"}, "bad_request", USERS_MSG, "p"),
]


def _check_error(text, code, message, frame_id):
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(text)
    err = info.value
    assert (err.code, err.message, err.frame_id) == (code, message, frame_id)
    assert type(err.frame_id) is type(frame_id)  # 1 is not True, "1" is not 1
    assert str(err) == message


@pytest.mark.parametrize(("text", "code", "message", "frame_id"), INVALID_RAW)
def test_invalid_raw_frames(text, code, message, frame_id):
    _check_error(text, code, message, frame_id)


@pytest.mark.parametrize(
    ("frame", "code", "message", "frame_id"), INVALID, ids=lambda v: str(v)[:60] if isinstance(v, dict) else None
)
def test_invalid_frames(frame, code, message, frame_id):
    _check_error(dumps(frame), code, message, frame_id)


# -- fuzzing: nothing but a Command or a ProtocolError ---------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8), children, max_size=5),
    max_leaves=25,
)
FIELDS = ["type", "id", "to", "body", "token", "seq", "since", "with", "before", "limit", "q", "offset", "users"]
TYPES = ["send", "ping", "refresh", "ack", "resume", "history", "search", "presence", "nope"]


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries({"type": st.sampled_from(TYPES) | json_values}).flatmap(
        lambda base: st.dictionaries(st.sampled_from(FIELDS[1:]), json_values, max_size=6).map(
            lambda extra: {**extra, **base}
        )
    )
)
def test_any_frame_parses_or_raises_protocol_error(frame):
    try:
        cmd = parse_client_frame(orjson.dumps(frame))
    except ProtocolError as err:
        assert err.code in ("bad_request", "unknown_type")
        assert err.frame_id is None or err.frame_id == frame.get("id")
    else:
        assert type(cmd) in (Send, Ping, Refresh, Ack, Resume, History, Search, Presence)
        assert cmd.id == frame.get("id")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_parse_or_raise_protocol_error(data):
    try:
        parse_client_frame(data)
    except ProtocolError as err:
        assert err.code in ("bad_request", "unknown_type")


# -- body round trip -------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(json_values, st.sampled_from(["stdlib", "orjson"]))
def test_body_round_trips_byte_exactly(value, encoder):
    frame = {"type": "send", "to": "bob", "body": value, "id": "m1"}
    text = json.dumps(frame).encode() if encoder == "stdlib" else orjson.dumps(frame)
    cmd = parse_client_frame(text)
    assert cmd == Send("m1", "bob", orjson.dumps(value))
    out = message_frame("0" * 24, 7, "alice", "bob", cmd.body, 1700000000123)
    assert out == (
        b'{"type":"message","msg_id":"000000000000000000000000","seq":7,"from":"alice","to":"bob","body":'
        + orjson.dumps(value)
        + b',"ts":1700000000123}'
    )
    decoded = orjson.loads(out)
    assert decoded["body"] == value
    assert type(decoded["body"]) is type(value)
    assert decoded == {
        "type": "message", "msg_id": "0" * 24, "seq": 7, "from": "alice", "to": "bob",
        "body": value, "ts": 1700000000123,
    }


@pytest.mark.parametrize(
    "value", [None, True, False, 0, -1, 2**63 - 1, 2**64 - 1, 1.5, -0.0, "", "ünï\U0001f600", [], {}, [{"a": [None]}]]
)
def test_body_kinds_round_trip(value):
    cmd = parse_client_frame(dumps({"type": "send", "to": "bob", "body": value}))
    assert orjson.loads(message_frame("m", 1, "a", "bob", cmd.body, 0))["body"] == value


# -- encode ----------------------------------------------------------------------------


def test_encode_drops_none_id_only():
    assert encode("pong", id=None) == b'{"type":"pong"}'
    assert encode("pong", id=0) == b'{"type":"pong","id":0}'
    assert encode("pong", id="") == b'{"type":"pong","id":""}'
    assert encode("hello", user="a", conn="c1", exp=None) == b'{"type":"hello","user":"a","conn":"c1","exp":null}'
    assert encode("ack", id="1", msg_id="m", seq=3, delivered=2) == (
        b'{"type":"ack","id":"1","msg_id":"m","seq":3,"delivered":2}'
    )


@pytest.mark.parametrize(
    ("user", "ok"),
    [("bob", True), ("a" * 128, True), ("a" * 129, False), ("", False), ("b\nob", False),
     ("bob smith", True), (None, False), (5, False), (b"bob", False), ("日本", True)],
)
def test_valid_user_id(user, ok):
    assert valid_user_id(user) is ok


@pytest.mark.parametrize(
    ("device", "ok"),
    [("phone", True), ("a" * 64, True), ("a" * 65, False), ("", False), ("A-z_0.9", True),
     ("a b", False), ("a/b", False), ("é", False), (None, False), (5, False), ("x\n", False)],
)
def test_valid_device(device, ok):
    assert protocol.valid_device(device) is ok

# -- data_frame against wsproto's client-side parser -------------------------------------


def _payload(n: int, multibyte: bool) -> bytes:
    if not multibyte:
        return (string.ascii_letters * (n // 52 + 1))[:n].encode()
    return ("é" * (n // 2) + "a" * (n % 2)).encode()  # 2-byte UTF-8 sequences


@pytest.mark.parametrize("multibyte", [False, True], ids=["ascii", "utf8"])
@pytest.mark.parametrize(
    ("size", "header"), [(0, 2), (1, 2), (125, 2), (126, 4), (127, 4), (65535, 4), (65536, 10), (70000, 10)]
)
def test_data_frame_parsed_by_wsproto_client(size, header, multibyte):
    payload = _payload(size, multibyte)
    assert len(payload) == size
    frame = data_frame(payload)
    assert len(frame) == header + size
    assert frame[0] == 0x81  # FIN + text
    assert frame[1] & 0x80 == 0  # server frames are unmasked
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(frame)
    events = list(client.events())
    assert len(events) == 1
    (event,) = events
    assert isinstance(event, TextMessage)
    assert event.data == payload.decode()
    assert event.frame_finished and event.message_finished


def test_data_frames_back_to_back():
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(data_frame(b"one") + data_frame(b"x" * 200) + data_frame(b""))
    assert [e.data for e in client.events()] == ["one", "x" * 200, ""]


# -- MsgIdGenerator ------------------------------------------------------------------------


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


HEX = set("0123456789abcdef")


def _check_ids(ids: list[tuple[str, int]], node: int) -> None:
    for msg_id, ts in ids:
        assert len(msg_id) == 24
        assert set(msg_id) <= HEX
        assert int(msg_id[:12], 16) == ts
        assert msg_id[18:] == f"{node:06x}"
    strs = [i for i, _ in ids]
    assert len(set(strs)) == len(strs)
    assert all(a < b for a, b in zip(strs, strs[1:], strict=False)), "ids must strictly increase"


def test_msg_ids_clock_standing_still():
    clock = FakeClock(1_700_000_000.0)
    gen = MsgIdGenerator(node=0xABCDEF, clock=clock)
    ids = [gen.next() for _ in range(1000)]
    _check_ids(ids, 0xABCDEF)
    assert ids[0] == ("018bcfe56800" "000000" "abcdef", 1_700_000_000_000)
    assert ids[999] == ("018bcfe56800" "0003e7" "abcdef", 1_700_000_000_000)


def test_msg_ids_clock_going_backwards():
    clock = FakeClock(1_700_000_000.5)
    gen = MsgIdGenerator(node=1, clock=clock)
    first = gen.next()
    clock.t -= 3600  # NTP step back an hour
    second = gen.next()
    third = gen.next()
    assert first == ("018bcfe569f4000000000001", 1_700_000_000_500)
    assert second == ("018bcfe569f4000001000001", 1_700_000_000_500)
    assert third == ("018bcfe569f4000002000001", 1_700_000_000_500)
    clock.t += 3600 + 0.001  # clock catches up and passes: counter resets
    assert gen.next() == ("018bcfe569f5000000000001", 1_700_000_000_501)


def test_msg_ids_counter_overflow_borrows_next_ms():
    clock = FakeClock(1_700_000_000.0)
    gen = MsgIdGenerator(node=2, clock=clock)
    ids = [gen.next()]
    gen._counter = 0xFFFFFD  # as if 16M ids were minted in this millisecond
    ids += [gen.next() for _ in range(4)]
    _check_ids(ids, 2)
    assert [i[0][12:18] for i in ids] == ["000000", "fffffe", "ffffff", "000000", "000001"]
    assert [i[1] for i in ids] == [1_700_000_000_000] * 3 + [1_700_000_000_001] * 2


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(st.just(0.0), st.floats(min_value=-10, max_value=10), st.sampled_from([0.0005, -0.0005, 0.001])),
        min_size=1,
        max_size=200,
    ),
    st.integers(min_value=0, max_value=0xFFFFFF),
)
def test_msg_ids_strictly_increase_under_any_clock(steps, node):
    clock = FakeClock(1_700_000_000.0)
    gen = MsgIdGenerator(node=node, clock=clock)
    ids = []
    for step in steps:
        clock.t += step
        msg_id, ts = gen.next()
        assert ts >= int(clock.t * 1000)  # never before the clock
        ids.append((msg_id, ts))
    _check_ids(ids, node)
    assert all(a[1] <= b[1] for a, b in zip(ids, ids[1:], strict=False))


def test_msg_ids_two_generators_never_collide():
    clock = FakeClock(1_700_000_000.0)
    a = MsgIdGenerator(node=1, clock=clock)
    b = MsgIdGenerator(node=2, clock=clock)
    ids_a = {a.next()[0] for _ in range(100)}
    ids_b = {b.next()[0] for _ in range(100)}
    assert not ids_a & ids_b


def test_msg_ids_real_clock():
    gen = MsgIdGenerator()
    ids = [gen.next()[0] for _ in range(5000)]
    assert ids == sorted(set(ids))
    assert all(len(i) == 24 for i in ids)


# -- rooms and presence watches (join/leave/watch/unwatch, send to a room) -------------------

NAME_MSG = "'room' must be a name (1-128 printable characters)"
ROOM_FRAMES = [
    ({"type": "join", "room": "lobby", "id": 1}, protocol.Join(1, "lobby")),
    ({"type": "leave", "room": "lobby"}, protocol.Leave(None, "lobby")),
    ({"type": "watch", "users": ["bob", "carol"]}, protocol.Watch(None, ("bob", "carol"), True)),
    ({"type": "unwatch", "users": ["bob"], "id": "u"}, protocol.Watch("u", ("bob",), False)),
    ({"type": "send", "room": "lobby", "body": {"t": 1}, "id": "s"}, Send("s", None, b'{"t":1}', "lobby")),
    ({"type": "send", "to": "bob", "body": 1}, Send(None, "bob", b"1", None)),
    ({"type": "send", "room": "lobby", "body": 1, "key": "k"}, Send(None, None, b"1", "lobby", "k")),
    ({"type": "send", "to": "bob", "body": 1, "key": "k" * 128}, Send(None, "bob", b"1", None, "k" * 128)),
    ({"type": "send", "to": "bob", "body": 1, "key": "é 😀"}, Send(None, "bob", b"1", None, "é 😀")),
    ({"type": "send", "to": "bob", "body": 1, "key": None}, Send(None, "bob", b"1", None, None)),
]


@pytest.mark.parametrize(("frame", "expected"), ROOM_FRAMES, ids=lambda v: str(v)[:50] if isinstance(v, dict) else "")
def test_room_and_watch_frames(frame, expected):
    assert parse_client_frame(dumps(frame)) == expected


KEY_MSG = "'key' must be 1-128 printable characters"
ROOM_INVALID = [
    ({"type": "join", "id": 1}, NAME_MSG, 1),
    ({"type": "join", "room": "", "id": 1}, NAME_MSG, 1),
    ({"type": "join", "room": "r" * 129, "id": 1}, NAME_MSG, 1),
    ({"type": "leave", "room": 5, "id": 1}, NAME_MSG, 1),
    ({"type": "leave", "room": "a\nb", "id": 1}, NAME_MSG, 1),
    ({"type": "watch", "users": [], "id": "w"}, USERS_MSG, "w"),
    ({"type": "unwatch", "users": "bob", "id": "w"}, USERS_MSG, "w"),
    ({"type": "send", "room": "lobby", "to": "bob", "body": 1, "id": 2}, "give 'to' or 'room', not both", 2),
    ({"type": "send", "room": 5, "body": 1, "id": 2}, NAME_MSG, 2),
    ({"type": "send", "room": "lobby", "id": 2}, "'body' is required", 2),
    ({"type": "send", "to": "bob", "body": 1, "key": "k" * 129, "id": 3}, KEY_MSG, 3),
    ({"type": "send", "to": "bob", "body": 1, "key": "", "id": 3}, KEY_MSG, 3),
    ({"type": "send", "room": "lobby", "body": 1, "key": 5, "id": 3}, KEY_MSG, 3),
    ({"type": "send", "to": "bob", "body": 1, "key": "a\nb", "id": 3}, KEY_MSG, 3),
    ({"type": "send", "to": "bob", "body": 1, "key": ["k"], "id": 3}, KEY_MSG, 3),
]


@pytest.mark.parametrize(("frame", "message", "frame_id"), ROOM_INVALID, ids=lambda v: str(v)[:50] if isinstance(v, dict) else None)
def test_room_and_watch_frames_invalid(frame, message, frame_id):
    _check_error(dumps(frame), "bad_request", message, frame_id)


# -- binary bodies (MessagePack mode) --------------------------------------------------------


def test_binary_body_stored_and_rendered():
    stored = protocol.encode_body(b"\x01\xff", None)
    assert stored == protocol.BINARY_BODY + b"\x01\xff"
    assert protocol.decode_body(stored) == b"\x01\xff"
    assert protocol.decode_body(b'{"a":[1]}') == {"a": [1]}
    fields = protocol.message_fields("m", 3, "alice", "bob", stored, 5)
    assert protocol.message_json(fields) == (
        b'{"type":"message","msg_id":"m","seq":3,"from":"alice","to":"bob","body":"Af8=","ts":5,'
        b'"body_encoding":"base64"}'
    )
    import msgpack

    assert msgpack.unpackb(protocol.message_msgpack(fields)) == {
        "type": "message", "msg_id": "m", "seq": 3, "from": "alice", "to": "bob", "body": b"\x01\xff", "ts": 5,
    }


def test_room_message_json_has_no_seq_or_to():
    fields = protocol.message_fields("m", None, "alice", None, b'{"x":1}', 5, room="lobby")
    assert protocol.message_json(fields) == b'{"type":"message","msg_id":"m","from":"alice","room":"lobby","body":{"x":1},"ts":5}'


def test_nested_bytes_body_refused():
    with pytest.raises(ProtocolError) as info:
        protocol.encode_body({"a": b"x"}, "f")
    assert (info.value.code, info.value.message, info.value.frame_id) == (
        "bad_request", "'body' must be JSON-representable (bytes only as the whole body)", "f",
    )


def test_parse_binary_frame():
    import msgpack

    assert protocol.parse_binary_frame(msgpack.packb({"type": "send", "to": "bob", "body": b"\x01", "id": 1})) == (
        Send(1, "bob", protocol.BINARY_BODY + b"\x01")
    )
    assert protocol.parse_binary_frame(msgpack.packb({"type": "ping", "id": "p"})) == Ping("p")
    for data, message in [
        (b"\xc1", "binary frame is not valid MessagePack"),
        (msgpack.packb({"type": "ping"}) + b"x", "binary frame is not valid MessagePack"),
        (msgpack.packb([1]), "frame must be a MessagePack map"),
    ]:
        with pytest.raises(ProtocolError) as info:
            protocol.parse_binary_frame(data)
        assert (info.value.code, info.value.message) == ("bad_request", message)


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_binary_frame_parsed_by_wsproto_client(size):
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(data_frame(payload, protocol.BINARY))
    (event,) = list(client.events())
    assert isinstance(event, BytesMessage)
    assert event.data == payload and event.message_finished
