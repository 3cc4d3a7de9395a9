"""Protocol v1: parse and validate client frames, encode server frames.  Sans-IO.

Every client frame is untrusted.  ``parse_client_frame`` turns the text of one complete
WebSocket text message into one command object or raises ``ProtocolError`` carrying the
error code the client will see and the frame's ``id`` (when one could be read), so the
connection can answer with an error frame and stay usable.  Nothing here blocks, nothing
here imports trio; see docs/protocol.md for the wire format.

Server frames are encoded once with orjson.  A routed message is encoded once per message
and the same bytes (and, with ``data_frame``, the same WebSocket frame) are shared by
every recipient connection.
"""

from __future__ import annotations

import base64
import os
import re
import struct
import time
from typing import Any

import attrs
import msgpack
import orjson

__all__ = [
    "DEFAULT_DEVICE",
    "MAX_DEVICE_LEN",
    "MAX_ID_LEN",
    "MAX_KEY_LEN",
    "MAX_USER_LEN",
    "Ack",
    "History",
    "MsgIdGenerator",
    "Ping",
    "Presence",
    "ProtocolError",
    "Refresh",
    "Resume",
    "Search",
    "Send",
    "data_frame",
    "encode",
    "message_frame",
    "parse_client_frame",
    "valid_device",
    "valid_key",
    "valid_user_id",
]

MAX_USER_LEN = 128
MAX_ID_LEN = 128
#: An idempotency ``key`` of a send: 1-128 printable characters chosen by the client.
MAX_KEY_LEN = 128
#: A device name: 1-64 characters of ``[A-Za-z0-9_.-]``; connections without one are
#: the user's ``default`` device.
MAX_DEVICE_LEN = 64
DEFAULT_DEVICE = "default"
_DEVICE_RE = re.compile(r"[A-Za-z0-9_.-]{1,%d}" % MAX_DEVICE_LEN)
MAX_PRESENCE_USERS = 100
MAX_QUERY_LEN = 512


class ProtocolError(Exception):
    """The client sent something we cannot accept: its fault, answered with an error frame.

    ``code`` is one of bad_request, unknown_type, too_large, rate_limited, forbidden;
    ``frame_id`` is the offending frame's ``id`` when it could be read (else None).
    """

    def __init__(self, code: str, message: str, frame_id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.frame_id = frame_id


def valid_user_id(user: Any) -> bool:
    """A user id is a non-empty string of at most 128 printable characters."""
    return (
        isinstance(user, str)
        and 0 < len(user) <= MAX_USER_LEN
        and user.isprintable()
    )


def valid_device(name: Any) -> bool:
    """A device name is 1-64 characters of ``[A-Za-z0-9_.-]``."""
    return isinstance(name, str) and _DEVICE_RE.fullmatch(name) is not None


def valid_key(key: Any) -> bool:
    """An idempotency key is a string of 1-128 printable characters."""
    return isinstance(key, str) and 0 < len(key) <= MAX_KEY_LEN and key.isprintable()


# -- client commands ---------------------------------------------------------------------


@attrs.frozen(slots=True)
class Send:
    id: Any
    to: str | None  # a user, or None when ``room`` is set
    body: bytes  # the stored body: JSON, or BINARY_BODY + raw bytes (msgpack mode)
    room: str | None = None
    key: str | None = None  # idempotency key: a resend with the same key is a duplicate


@attrs.frozen(slots=True)
class Join:
    id: Any
    room: str


@attrs.frozen(slots=True)
class Leave:
    id: Any
    room: str


@attrs.frozen(slots=True)
class Watch:
    id: Any
    users: tuple[str, ...]
    watch: bool  # False for unwatch


@attrs.frozen(slots=True)
class Ping:
    id: Any


@attrs.frozen(slots=True)
class Refresh:
    id: Any
    token: str


@attrs.frozen(slots=True)
class Ack:
    id: Any
    seq: int


@attrs.frozen(slots=True)
class Resume:
    id: Any
    since: int


@attrs.frozen(slots=True)
class History:
    id: Any
    peer: str
    before: str | None
    limit: int | None


@attrs.frozen(slots=True)
class Search:
    id: Any
    q: str
    limit: int | None
    offset: int


@attrs.frozen(slots=True)
class Presence:
    id: Any
    users: tuple[str, ...]


Command = Send | Ping | Refresh | Ack | Resume | History | Search | Presence | Join | Leave | Watch

def compact(data: bytes) -> bytes:
    """An exact-size copy of orjson output.  orjson's bytes keep their ~4 KiB working
    buffer however short the JSON (measured: 4,097 bytes for a 100-byte string), so
    anything kept -- stored bodies, queued frames -- is copied down to its length."""
    return bytes(memoryview(data))


#: A stored body starting with this byte is raw binary (sent from msgpack mode), not JSON.
BINARY_BODY = b"\x00"


def encode_body(body: Any, fid: Any) -> bytes:
    """The stored form of a body: its JSON, or BINARY_BODY + bytes for a bytes body."""
    if isinstance(body, bytes | bytearray):
        return BINARY_BODY + bytes(body)
    try:
        return compact(orjson.dumps(body))
    except orjson.JSONEncodeError:
        raise ProtocolError(
            "bad_request", "'body' must be JSON-representable (bytes only as the whole body)", fid
        ) from None


def decode_body(stored: bytes) -> Any:
    """The body as a Python value (bytes for a binary body)."""
    if stored[:1] == BINARY_BODY:
        return stored[1:]
    return orjson.loads(stored)


def _frame_id(frame: dict[str, Any]) -> Any:
    fid = frame.get("id")
    if fid is None:
        return None
    if isinstance(fid, bool) or not isinstance(fid, str | int):
        raise ProtocolError("bad_request", "'id' must be a string or an integer")
    if isinstance(fid, str) and len(fid) > MAX_ID_LEN:
        raise ProtocolError("bad_request", f"'id' is longer than {MAX_ID_LEN} characters")
    if isinstance(fid, int) and not -(2**53) < fid < 2**53:
        raise ProtocolError("bad_request", "'id' is out of range")
    return fid


def _user(frame: dict[str, Any], key: str, fid: Any) -> str:
    value = frame.get(key)
    if not valid_user_id(value):
        raise ProtocolError(
            "bad_request", f"'{key}' must be a user id (1-{MAX_USER_LEN} printable characters)", fid
        )
    return value


def _int(frame: dict[str, Any], key: str, fid: Any, *, required: bool, minimum: int = 0) -> Any:
    value = frame.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value < 2**53:
        raise ProtocolError("bad_request", f"'{key}' must be an integer >= {minimum}", fid)
    return value


def _send(frame: dict[str, Any], fid: Any) -> Send:
    if "body" not in frame:
        raise ProtocolError("bad_request", "'body' is required", fid)
    key = frame.get("key")
    if key is not None and not valid_key(key):
        raise ProtocolError("bad_request", f"'key' must be 1-{MAX_KEY_LEN} printable characters", fid)
    if "room" in frame:
        if "to" in frame:
            raise ProtocolError("bad_request", "give 'to' or 'room', not both", fid)
        return Send(fid, None, encode_body(frame["body"], fid), _name(frame, "room", fid), key)
    return Send(fid, _user(frame, "to", fid), encode_body(frame["body"], fid), None, key)


def _name(frame: dict[str, Any], key: str, fid: Any) -> str:
    value = frame.get(key)
    if not valid_user_id(value):  # room names follow the user id rule
        raise ProtocolError(
            "bad_request", f"'{key}' must be a name (1-{MAX_USER_LEN} printable characters)", fid
        )
    return value


def _refresh(frame: dict[str, Any], fid: Any) -> Refresh:
    token = frame.get("token")
    if not isinstance(token, str) or not token:
        raise ProtocolError("bad_request", "'token' must be a non-empty string", fid)
    return Refresh(fid, token)


def _history(frame: dict[str, Any], fid: Any) -> History:
    before = frame.get("before")
    if before is not None and (not isinstance(before, str) or len(before) > MAX_ID_LEN):
        raise ProtocolError("bad_request", "'before' must be a msg_id", fid)
    limit = _int(frame, "limit", fid, required=False, minimum=1)
    return History(fid, _user(frame, "with", fid), before, limit)


def _search(frame: dict[str, Any], fid: Any) -> Search:
    q = frame.get("q")
    if not isinstance(q, str) or not q.strip() or len(q) > MAX_QUERY_LEN:
        raise ProtocolError("bad_request", f"'q' must be a non-empty string of at most {MAX_QUERY_LEN}", fid)
    limit = _int(frame, "limit", fid, required=False, minimum=1)
    offset = _int(frame, "offset", fid, required=False) or 0
    return Search(fid, q, limit, offset)


def _users(frame: dict[str, Any], fid: Any) -> tuple[str, ...]:
    users = frame.get("users")
    if (
        not isinstance(users, list)
        or not 0 < len(users) <= MAX_PRESENCE_USERS
        or not all(valid_user_id(u) for u in users)
    ):
        raise ProtocolError(
            "bad_request", f"'users' must be a list of 1-{MAX_PRESENCE_USERS} user ids", fid
        )
    return tuple(users)


_PARSERS = {
    "send": _send,
    "ping": lambda frame, fid: Ping(fid),
    "refresh": _refresh,
    "ack": lambda frame, fid: Ack(fid, _int(frame, "seq", fid, required=True)),
    "resume": lambda frame, fid: Resume(fid, _int(frame, "since", fid, required=True)),
    "history": _history,
    "search": _search,
    "presence": lambda frame, fid: Presence(fid, _users(frame, fid)),
    "join": lambda frame, fid: Join(fid, _name(frame, "room", fid)),
    "leave": lambda frame, fid: Leave(fid, _name(frame, "room", fid)),
    "watch": lambda frame, fid: Watch(fid, _users(frame, fid), True),
    "unwatch": lambda frame, fid: Watch(fid, _users(frame, fid), False),
}


def parse_client_frame(text: str | bytes) -> Command:
    """Parse one complete text message into a command, or raise ProtocolError."""
    try:
        frame = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ProtocolError("bad_request", "frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise ProtocolError("bad_request", "frame must be a JSON object")
    return parse_client_object(frame)


def parse_binary_frame(data: bytes) -> Command:
    """Parse one complete binary message (a MessagePack map) into a command."""
    try:
        frame = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise ProtocolError("bad_request", "binary frame is not valid MessagePack") from None
    if not isinstance(frame, dict):
        raise ProtocolError("bad_request", "frame must be a MessagePack map")
    return parse_client_object(frame)


def parse_client_object(frame: dict[str, Any]) -> Command:
    """Validate a decoded frame (from JSON or MessagePack) into a command."""
    fid = _frame_id(frame)
    kind = frame.get("type")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        if not isinstance(kind, str):
            raise ProtocolError("bad_request", "'type' must be a string", fid)
        raise ProtocolError("unknown_type", f"unknown frame type {kind[:64]!r}", fid)
    return parser(frame, fid)


# -- server frames -----------------------------------------------------------------------


def encode(kind: str, /, **fields: Any) -> bytes:
    """Encode a server frame ``{"type": kind, **fields}``; None-valued ``id`` is left out."""
    if fields.get("id", 0) is None:
        del fields["id"]
    return compact(orjson.dumps({"type": kind, **fields}))


def encode_msgpack(kind: str, /, **fields: Any) -> bytes:
    """``encode`` for binary-mode connections: the same envelope as MessagePack."""
    if fields.get("id", 0) is None:
        del fields["id"]
    return msgpack.packb({"type": kind, **fields}, default=_msgpack_default)


def _msgpack_default(value: Any) -> Any:
    if isinstance(value, orjson.Fragment):
        return orjson.loads(value.contents)
    raise TypeError(f"cannot encode {type(value).__name__}")


def message_fields(
    msg_id: str, seq: int | None, sender: str, recipient: str | None, body: bytes, ts: int,
    room: str | None = None,
) -> dict[str, Any]:
    """The ``message`` frame as a dict whose body is still the stored form."""
    fields: dict[str, Any] = {"type": "message", "msg_id": msg_id}
    if seq is not None:
        fields["seq"] = seq
    fields["from"] = sender
    if recipient is not None:
        fields["to"] = recipient
    if room is not None:
        fields["room"] = room
    fields["body"] = body
    fields["ts"] = ts
    return fields


def message_json(fields: dict[str, Any]) -> bytes:
    """JSON of a message: the stored JSON body spliced in verbatim; a binary body as
    base64 with ``"body_encoding": "base64"``."""
    body = fields["body"]
    if body[:1] == BINARY_BODY:
        out = dict(fields, body=base64.b64encode(body[1:]).decode(), body_encoding="base64")
        return compact(orjson.dumps(out))
    return compact(orjson.dumps(dict(fields, body=orjson.Fragment(body))))


def message_msgpack(fields: dict[str, Any]) -> bytes:
    return msgpack.packb(dict(fields, body=decode_body(fields["body"])))


def message_frame(msg_id: str, seq: int, sender: str, recipient: str, body: bytes, ts: int) -> bytes:
    """The JSON ``message`` frame of an inbox message."""
    return message_json(message_fields(msg_id, seq, sender, recipient, body, ts))


TEXT, BINARY = 0x81, 0x82


def data_frame(payload: bytes, opcode: int = TEXT) -> bytes:
    """A complete, unmasked, unfragmented server->client data frame (RFC 6455 5.2):
    a text frame (``TEXT``, JSON) or a binary one (``BINARY``, MessagePack).

    Built once per routed message and written as-is to every recipient connection that
    negotiated no extension, so fan-out costs one encode, not one per recipient.
    """
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", opcode, n) + payload
    if n < 65536:
        return struct.pack("!BBH", opcode, 126, n) + payload
    return struct.pack("!BBQ", opcode, 127, n) + payload


class MsgIdGenerator:
    """Unique message ids that sort by creation time within a process.

    ``<12 hex ms since epoch><6 hex counter><6 hex node>``: 24 characters, increasing
    string order inside one process (the counter carries over within a millisecond), and
    a random per-process node part so two processes never collide.
    """

    def __init__(self, node: int | None = None, clock: Any = time.time) -> None:
        self._node = (node if node is not None else int.from_bytes(os.urandom(3))) & 0xFFFFFF
        self._clock = clock
        self._last_ms = 0
        self._counter = 0
        # the hex of ``_last_ms`` and of the node, formatted once (not once per id)
        self._head = f"{0:012x}"
        self._tail = f"{self._node:06x}"

    def next(self) -> tuple[str, int]:
        """Return ``(msg_id, ts_ms)``."""
        ms = int(self._clock() * 1000)
        if ms <= self._last_ms:
            ms = self._last_ms
            self._counter += 1
            if self._counter > 0xFFFFFF:  # 16M ids in one ms: borrow the next ms
                ms += 1
                self._counter = 0
                self._last_ms, self._head = ms, f"{ms:012x}"
        else:
            self._counter = 0
            self._last_ms, self._head = ms, f"{ms:012x}"
        return f"{self._head}{self._counter:06x}{self._tail}", ms
