"""tidings.wire.frames: the fast path agrees with wsproto on every frame sequence."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage

from tidings.wire.frames import ClientFrames, ClientPing, ForWsproto, Refusal, pong_frame

LIMIT = 1000


def masked_frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0,
                 mask: bytes = b"\x01\x02\x03\x04", masked: bool = True) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes([0x80 * fin | rsv | opcode, 0x80 * masked | n])
    elif n < 65536:
        head = bytes([0x80 * fin | rsv | opcode, 0x80 * masked | 126]) + struct.pack("!H", n)
    else:
        head = bytes([0x80 * fin | rsv | opcode, 0x80 * masked | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def through_wsproto(data: bytes) -> list:
    """What a plain wsproto server makes of ``data``: whole messages and control events."""
    server = Connection(ConnectionType.SERVER)
    server.receive_data(data)
    return collect(server.events())


def collect(events, parts: list | None = None) -> list:
    """Messages and control events; ``parts`` carries a fragmented message across calls."""
    out = []
    parts = [] if parts is None else parts
    for e in events:
        if isinstance(e, Message):
            parts.append(e.data)
            if e.message_finished:
                out.append(("" if isinstance(e, TextMessage) else b"").join(parts))
                parts.clear()
        elif isinstance(e, Ping):
            out.append(("ping", e.payload))
        elif isinstance(e, CloseConnection):
            out.append(("close", e.code))
    return out


def through_splitter(chunks: list[bytes], limit: int = LIMIT) -> list:
    frames, server, out, parts = ClientFrames(limit), Connection(ConnectionType.SERVER), [], []
    for chunk in chunks:
        for item in frames.feed(chunk):
            if isinstance(item, ForWsproto):
                server.receive_data(bytes(item))
                out += collect(server.events(), parts)
            elif isinstance(item, Refusal):
                out.append(("refused", item.code))
            elif isinstance(item, ClientPing):
                out.append(("ping", bytes(item)))
            else:
                out.append(item)
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


# -- table: one frame each ------------------------------------------------------------------

@pytest.mark.parametrize("frame, expect", [
    (masked_frame(1, "héllo".encode()), ["héllo"]),
    (masked_frame(2, b"\x00\xff"), [b"\x00\xff"]),
    (masked_frame(1, b"x" * LIMIT), ["x" * LIMIT]),                         # exactly the limit
    (masked_frame(1, b"x" * (LIMIT + 1)), [("refused", 1009)]),             # one byte over
    (masked_frame(1, "é".encode() * 300), ["é" * 300]),                     # 600 bytes, 300 chars
    (masked_frame(1, "€".encode() * 334), [("refused", 1009)]),             # 334 chars = 1002 bytes
    (masked_frame(1, b"\xff\xfe"), [("refused", 1007)]),                    # bad UTF-8
    (masked_frame(9, b"p"), [("ping", b"p")]),                              # ping: decoded here
    (masked_frame(10, b"p"), []),                                           # pong: consumed here
    (masked_frame(9, b"p" * 126), [("refused", 1002)]),                     # control too long
    (masked_frame(8, struct.pack("!H", 1000)), [("close", 1000)]),
])
def test_one_frame(frame, expect):
    assert through_splitter([frame]) == expect


def test_frames_wsproto_must_refuse_go_to_wsproto():
    # unmasked and RSV frames are protocol errors: wsproto answers them (a close event
    # with 1002), the fast path never decodes them
    for frame in (masked_frame(1, b"hi", masked=False), masked_frame(1, b"hi", rsv=0x40)):
        frames = ClientFrames(LIMIT)
        assert [type(x) for x in frames.feed(frame)] == [ForWsproto]


def test_oversize_is_refused_from_its_header_alone():
    header = masked_frame(2, b"x" * 70000)[:14]  # 64-bit length, no payload yet
    assert [(r.code) for r in ClientFrames(65536).feed(header)] == [1009]


def test_nothing_is_parsed_after_a_refusal():
    frames = ClientFrames(LIMIT)
    out = frames.feed(masked_frame(1, b"\xff") + masked_frame(1, b"ok"))
    assert [type(x) for x in out] == [Refusal]
    assert frames.feed(masked_frame(1, b"later")) == []


def test_pings_and_pongs_never_need_wsproto():
    frames = ClientFrames(LIMIT)
    out = frames.feed(masked_frame(9, b"abc") + masked_frame(10, b"tidings"))
    assert out == [b"abc"] and type(out[0]) is ClientPing
    # the answer is exactly wsproto's pong
    assert pong_frame(b"abc") == Connection(ConnectionType.SERVER).send(Ping(b"abc").response())


def test_a_fragmented_message_goes_to_wsproto_whole_and_resumes_the_fast_path():
    data = (masked_frame(1, b"he", fin=False) + masked_frame(9, b"p")
            + masked_frame(0, b"llo") + masked_frame(1, b"next"))
    frames = ClientFrames(LIMIT)
    kinds = [type(x) for x in frames.feed(data)]
    assert kinds == [ForWsproto, ClientPing, ForWsproto, str]
    assert through_splitter([data]) == [("ping", b"p"), "hello", "next"]


# -- property: the same meaning as wsproto alone, however the bytes are cut -----------------

payloads = st.one_of(st.text(max_size=300).map(str.encode), st.binary(max_size=300))
frame_specs = st.lists(st.one_of(
    st.tuples(st.just("text"), st.text(max_size=200)),
    st.tuples(st.just("binary"), st.binary(max_size=2000)),
    st.tuples(st.just("ping"), st.binary(max_size=125)),
    st.tuples(st.just("fragments"), st.lists(st.text(max_size=50), min_size=2, max_size=4)),
), max_size=12)


def encode(specs) -> bytes:
    client = Connection(ConnectionType.CLIENT)
    out = b""
    for kind, value in specs:
        if kind == "text":
            out += client.send(TextMessage(value))
        elif kind == "binary":
            out += client.send(BytesMessage(value))
        elif kind == "ping":
            out += client.send(Ping(value))
        else:
            for i, part in enumerate(value):
                out += client.send(TextMessage(part, message_finished=i == len(value) - 1))
    return out


@settings(max_examples=300, deadline=None)
@given(frame_specs, st.lists(st.integers(min_value=0), max_size=8))
def test_agrees_with_wsproto_for_any_cuts(specs, cuts):
    data = encode(specs)
    expect = through_wsproto(data)
    if any(isinstance(m, (str, bytes)) and len(m.encode() if isinstance(m, str) else m) > LIMIT
           for m in expect):
        expect = None  # an oversized message: covered by the table tests
    got = through_splitter(split(data, cuts))
    if expect is not None and not any(x[0] == "refused" for x in got if isinstance(x, tuple)):
        assert got == expect


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(min_value=0), max_size=6))
def test_garbage_never_raises_and_stays_bounded(data, cuts):
    frames = ClientFrames(LIMIT)
    for chunk in split(data, cuts):
        frames.feed(chunk)
        assert len(frames._buf) <= LIMIT + 14


def test_random_masks_round_trip():
    for n in (0, 1, 3, 4, 5, 125, 126, 65535, 65536):
        payload = os.urandom(n)
        frame = masked_frame(2, payload, mask=os.urandom(4))
        assert through_splitter([frame], limit=70000) == [payload]
