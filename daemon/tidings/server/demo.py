"""Plain HTTP answers on the main listener besides the WebSocket endpoint.  Sans-IO.

``answer(request, config)`` returns the complete HTTP response for a request the
WebSocket handshake refused, or None to let the refusal stand.  Only with
``http.demo = true`` it serves the browser demo:

    GET /            the demo page (static/demo.html, with the WebSocket path and
                     the auth mode filled in)
    GET /tidings.js  the browser client module (clients/js/tidings.js)
    GET /demo.js     the demo page's script

Everything else (and everything with ``http.demo = false``) returns None.  The files
are read once and cached.  A missing file answers 500 naming it (a broken install),
never an exception.  Never imports trio.
"""

from __future__ import annotations

import functools
import html
from pathlib import Path
from typing import Any

from tidings.wire.handshake import http_response

__all__ = ["STATIC_DIR", "answer"]

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

_ROUTES = {
    "/": ("demo.html", b"text/html; charset=utf-8"),
    "/index.html": ("demo.html", b"text/html; charset=utf-8"),
    "/tidings.js": ("tidings.js", b"text/javascript; charset=utf-8"),
    "/demo.js": ("demo.js", b"text/javascript; charset=utf-8"),
}

_HEADERS = [
    (b"cache-control", b"no-cache"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'self'; connect-src 'self' ws: wss:; style-src 'self' 'unsafe-inline'; "
        b"frame-ancestors 'none'",
    ),
]


@functools.cache
def _read(name: str) -> bytes | None:
    try:
        return (STATIC_DIR / name).read_bytes()
    except OSError:
        return None


def answer(request: Any, config: Any) -> bytes | None:
    """The response to ``request`` (an h11.Request) if the demo serves it, else None."""
    if not config.http.demo or request.method not in (b"GET", b"HEAD"):
        return None
    path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
    route = _ROUTES.get(path)
    if route is None:
        return None
    name, content_type = route
    body = _read(name)
    if body is None:
        return http_response(500, f"demo file {name} is missing from {STATIC_DIR}\n".encode())
    if name == "demo.html":
        body = (
            body.replace(b"{{WS_PATH}}", html.escape(config.server.path).encode())
            .replace(b"{{AUTH_MODE}}", html.escape(config.auth.mode).encode())
        )
    response = http_response(200, body, content_type=content_type, headers=_HEADERS)
    if request.method == b"HEAD":
        response = response[: response.index(b"\r\n\r\n") + 4]
    return response
