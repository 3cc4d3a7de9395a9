"""Client frames, split and (for the common case) decoded without wsproto.  Sans-IO.

Why
---
Parsing a 120-byte masked text frame through wsproto costs ~8 us; the header arithmetic
and an unmask in C cost ~0.3 us (measured, docs/performance.md).  Nearly every frame a
client sends is a whole (FIN), masked, uncompressed text or binary frame: those are
decoded here, and so are pings and pongs (the keepalive's traffic: an idle connection
then never needs a wsproto object at all).  Every other frame -- close frames,
fragments, compressed or malformed frames -- is handed to wsproto *whole*, in order, so
wsproto's own state machine decides what they mean and no frame is ever half in one
parser and half in the other.

Contract
--------
``ClientFrames(max_message_bytes).feed(data)`` consumes bytes from the socket and
returns what they completed, in order, as a list of:

* ``str`` / ``bytes`` - a whole text / binary message decoded here (text is valid
  UTF-8; at most ``max_message_bytes`` bytes);
* :class:`ClientPing` - a ping: answer it with :func:`pong_frame` (a client's pong is
  consumed here and yields nothing: any input already proves the peer alive);
* :class:`ForWsproto` - the bytes of one or more whole frames for
  ``wsproto.Connection.receive_data`` (its events follow);
* :class:`Refusal` - the client broke the protocol: close with ``code`` (1009 message too
  big, 1007 invalid UTF-8, 1002 protocol error).  Nothing after it is parsed.

Bounds: a frame is buffered only up to its declared length, and a declared length over
``max_message_bytes`` (data) or 125 (control) is refused as soon as its header arrives,
so the buffer never holds more than one frame of at most ``max_message_bytes`` plus a
14-byte header.  A fragmented message goes to wsproto frame by frame (the caller counts
its size across fragments).  RFC 6455 rules enforced here for the frames decoded here:
client frames must be masked, reserved bits clear, text valid UTF-8, a data frame
outside a fragmented message.
"""

from __future__ import annotations

try:  # websockets' C unmask (0.2 us for 120 bytes, 1.5 us for 64 KiB)
    from websockets.speedups import apply_mask as _unmask
except ImportError:  # pragma: no cover - pure-Python fallback of the same library
    from websockets.utils import apply_mask as _unmask

__all__ = ["ClientFrames", "ClientPing", "ForWsproto", "Refusal", "pong_frame"]

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x9, 0xA
MAX_CONTROL_PAYLOAD = 125


class ForWsproto(bytes):
    """Whole frames for wsproto (``receive_data``), in arrival order."""

    __slots__ = ()


class ClientPing(bytes):
    """A ping's payload (at most 125 bytes): answer with ``pong_frame(payload)``."""

    __slots__ = ()


def pong_frame(payload: bytes) -> bytes:
    """The server's pong to a ping with ``payload`` (server frames are never masked)."""
    return bytes((0x80 | OP_PONG, len(payload))) + payload


class Refusal:
    """The client broke the protocol (its fault): close with ``code`` and ``reason``."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason

    def __repr__(self) -> str:
        return f"Refusal({self.code}, {self.reason!r})"


class ClientFrames:
    """Splits a client's byte stream into frames; see the module docstring."""

    __slots__ = ("_buf", "_fragmented", "_refused", "max_message_bytes")

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._buf = b""
        self._fragmented = False  # a fragmented data message is open (in wsproto)
        self._refused = False

    def feed(self, data: bytes) -> list[str | bytes | ForWsproto | Refusal]:
        """Consume ``data``; return what it completed (see the module docstring)."""
        if self._refused:
            return []
        buf = self._buf + data if self._buf else data
        out: list[str | bytes | ForWsproto | Refusal] = []
        raw_from = -1  # start of a run of frames for wsproto
        pos, end = 0, len(buf)
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 4], "big")
                head = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                head = 10
            masked = b1 & 0x80
            if masked:
                head += 4
            opcode = b0 & 0x0F
            if opcode >= 0x8:
                if length > MAX_CONTROL_PAYLOAD:
                    return self._refuse(out, buf, raw_from, pos, 1002, "control frame too long")
            elif length > self.max_message_bytes:
                return self._refuse(out, buf, raw_from, pos, 1009,
                                    f"message larger than {self.max_message_bytes} bytes")
            stop = pos + head + length
            if stop > end:
                break
            fast = (b0 & 0xF0) == 0x80 and masked and (
                opcode == OP_PING or opcode == OP_PONG
                or (not self._fragmented and (opcode == OP_TEXT or opcode == OP_BINARY)))
            if not fast:
                if opcode < 0x8 and (b0 & 0x70) == 0:  # track fragmentation for wsproto
                    if opcode != OP_CONTINUATION and not b0 & 0x80:
                        self._fragmented = True
                    elif opcode == OP_CONTINUATION and b0 & 0x80:
                        self._fragmented = False
                if raw_from < 0:
                    raw_from = pos
                pos = stop
                continue
            if raw_from >= 0:
                out.append(ForWsproto(buf[raw_from:pos]))
                raw_from = -1
            payload = _unmask(buf[pos + head:stop], buf[pos + head - 4:pos + head])
            if opcode >= OP_PING:
                if opcode == OP_PING:
                    out.append(ClientPing(payload))
            elif opcode == OP_TEXT:
                try:
                    out.append(payload.decode("utf-8"))
                except UnicodeDecodeError:
                    return self._refuse(out, buf, -1, stop, 1007, "invalid UTF-8 in a text message")
            else:
                out.append(payload)
            pos = stop
        if raw_from >= 0:
            out.append(ForWsproto(buf[raw_from:pos]))
        self._buf = buf[pos:]
        return out

    def _refuse(self, out: list, buf: bytes, raw_from: int, pos: int, code: int,
                reason: str) -> list:
        if raw_from >= 0:  # frames before the bad one still count, in order
            out.append(ForWsproto(buf[raw_from:pos]))
        out.append(Refusal(code, reason))
        self._refused = True
        self._buf = b""
        return out
