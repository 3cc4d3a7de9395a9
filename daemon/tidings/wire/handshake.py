"""The HTTP side of a connection: the upgrade request and plain HTTP answers.  Sans-IO.

h11 parses the request head; ``check_upgrade`` decides whether it is a valid WebSocket
upgrade for our path from an allowed origin and extracts the credentials;
``accept_response`` and ``http_response`` build the bytes to write.  After a 101 the
h11 state is dropped, so an idle WebSocket keeps no HTTP state.  Never imports trio.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
from wsproto.extensions import PerMessageDeflate
from wsproto.utilities import generate_accept_token

from tidings.wire.protocol import MAX_DEVICE_LEN, valid_device

__all__ = ["HttpError", "Upgrade", "accept_response", "check_upgrade", "http_response", "origin_allowed"]

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    426: b"Upgrade Required",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


class HttpError(Exception):
    """Answer the request with ``status`` and the one-line ``reason`` as the body."""

    def __init__(self, status: int, reason: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or []


@attrs.frozen
class Upgrade:
    key: bytes
    token: str | None
    user: str | None  # ?user= (insecure mode only)
    since: int | None
    binary: bool  # ?encoding=msgpack: pushed frames are MessagePack binary frames
    device: str | None  # ?device=NAME (a token's ``device`` claim wins over it)
    extensions: list[str]  # Sec-WebSocket-Extensions offers, e.g. permessage-deflate


def _headers(request: h11.Request) -> tuple[dict[bytes, bytes], list[bytes], list[bytes]]:
    """In one pass over the request's headers (h11 lower-cases their names): the first
    value of each name, every ``Origin`` and every ``Sec-WebSocket-Extensions`` value."""
    first: dict[bytes, bytes] = {}
    origins: list[bytes] = []
    extensions: list[bytes] = []
    for name, value in request.headers:
        if name not in first:
            first[name] = value
        if name == b"origin":
            origins.append(value)
        elif name == b"sec-websocket-extensions":
            extensions.append(value)
    return first, origins, extensions


def origin_allowed(origin: str, patterns: Sequence[str]) -> bool:
    """Whether a browser's ``Origin`` matches one of the shell-glob ``patterns``
    (``server.allowed_origins``; case-insensitive, as host names are).  No patterns = any."""
    if not patterns:
        return True
    origin = origin.lower()
    return any(fnmatchcase(origin, pattern.lower()) for pattern in patterns)


def check_upgrade(request: h11.Request, path: str, allowed_origins: Sequence[str] = ()) -> Upgrade:
    """Validate a WebSocket upgrade request for ``path``; raise HttpError otherwise.

    With ``allowed_origins``, every ``Origin`` header must match one of them (403 before
    the credentials are looked at); a request without ``Origin`` (not a browser) passes.
    """
    try:
        target = request.target.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "request target is not ASCII") from None
    parts = urlsplit(target)
    if parts.path != path:
        raise HttpError(404, f"no WebSocket endpoint at {parts.path[:100]}; use {path}")
    if request.method != b"GET":
        raise HttpError(405, "the WebSocket endpoint takes GET", [(b"allow", b"GET")])
    headers, origins, extensions = _headers(request)
    upgrade = headers.get(b"upgrade", b"").lower()
    connection = headers.get(b"connection", b"").lower()
    if upgrade != b"websocket" or b"upgrade" not in [t.strip() for t in connection.split(b",")]:
        raise HttpError(426, "this endpoint speaks WebSocket only", [(b"upgrade", b"websocket")])
    if headers.get(b"sec-websocket-version") != b"13":
        raise HttpError(426, "WebSocket version 13 required", [(b"sec-websocket-version", b"13")])
    key = headers.get(b"sec-websocket-key")
    if not key:
        raise HttpError(400, "missing Sec-WebSocket-Key")
    if allowed_origins:
        for value in origins:
            origin = value.decode("latin-1")
            if not origin_allowed(origin, allowed_origins):
                raise HttpError(403, f"origin not allowed: {origin[:100]}")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, max_num_fields=20)
    except ValueError:
        raise HttpError(400, "too many query parameters") from None
    token = _one(query, "token")
    authz = headers.get(b"authorization")
    if not token and authz is not None:
        scheme, _, value = authz.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise HttpError(401, "Authorization header must be 'Bearer <token>'")
        token = value.strip()
    since_text = _one(query, "since")
    since = None
    if since_text is not None:
        if not (since_text.isascii() and since_text.isdigit()) or len(since_text) > 15:
            raise HttpError(400, "?since= must be a non-negative integer")
        since = int(since_text)
    device = _one(query, "device")
    if device is not None and not valid_device(device):
        raise HttpError(400, f"?device= must be 1-{MAX_DEVICE_LEN} characters of A-Z a-z 0-9 _ . -")
    encoding = _one(query, "encoding") or "json"
    if encoding not in ("json", "msgpack"):
        raise HttpError(400, "?encoding= must be json or msgpack")
    offers = [part.strip() for value in extensions for part in value.decode("latin-1").split(",")
              if part.strip()]
    return Upgrade(key=key, token=token or None, user=_one(query, "user"), since=since,
                   binary=encoding == "msgpack", device=device, extensions=offers)


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise HttpError(400, f"?{name}= given more than once")
    return values[0]


def negotiate_deflate(offers: list[str]) -> tuple[PerMessageDeflate, bytes] | None:
    """Accept the first permessage-deflate offer wsproto can honour: (extension, header)."""
    for offer in offers:
        if offer.split(";", 1)[0].strip() != PerMessageDeflate.name:
            continue
        ext = PerMessageDeflate()
        accepted = ext.accept(offer)
        if accepted is None:
            continue
        params = accepted if isinstance(accepted, str) else ""
        header = PerMessageDeflate.name + (f"; {params}" if params else "")
        return ext, header.encode("ascii")
    return None


def accept_response(key: bytes, extensions: bytes | None = None) -> bytes:
    ext = b"Sec-WebSocket-Extensions: " + extensions + b"\r\n" if extensions else b""
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        + ext
        + b"Sec-WebSocket-Accept: " + generate_accept_token(key) + b"\r\n\r\n"
    )


def http_response(
    status: int,
    body: bytes,
    content_type: bytes = b"text/plain; charset=utf-8",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Status"))]
    lines.append(b"Content-Type: " + content_type)
    lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    for name, value in headers or []:
        lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
