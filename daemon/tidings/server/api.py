"""The server API: HTTP/1.1 (h11) on its own listener, for backends and operators.

    POST /api/send        {"to", "body", "from"?}         -> 202 {"msg_id","seq","delivered"}
    POST /api/broadcast   {"users": [...], "body", "from"?} -> 202 {"results": [...]}
    POST /api/disconnect  {"user", "conn"?}                 -> 200 {"closed": N}  (1008; every node)
    GET  /api/presence?user=bob&user=carol                  -> 200 {"users": {...}}
    GET  /api/stats       counters, per node and in total    -> 200 (tidings.server.admin)
    GET  /api/users/{user}  presence, unread, connections    -> 200 (tidings.server.admin)
    GET  /api/messages/{msg_id}   delivery status per device -> 200 / 404
    GET  /api/users/{user}/unread unread count per device    -> 200 {"user","devices"}
    GET  /healthz   readiness (store, cluster, shutdown; server.health) -> 200 / 503
    GET  /metrics   Prometheus text format
    GET  /admin     the operator's page (static/admin.*; it asks for the API key)

``/api/*`` needs ``Authorization: Bearer <api key>`` (401 without, 403 with a wrong one;
compared in constant time).  ``/healthz``, ``/metrics`` and the page's static files are
open: the API listens on 127.0.0.1 by default so it is never exposed by accident.  Bodies
are limited to ``api.max_body_bytes`` (413); a request must arrive within
``api.request_timeout_s`` (slowloris); bad JSON is a 400 with the reason.  Keep-alive is
supported.  Every response carries ``Content-Security-Policy: default-src 'self'`` and
``nosniff``; a HEAD request is answered without the body.

A send is stored before the 202, exactly as a WebSocket ``send`` is acked only once
stored: the API waits for the hub's group commit.  If the store refuses, 503.  An
``Idempotency-Key`` header (1-128 printable characters) makes ``/api/send`` and
``/api/broadcast`` idempotent exactly like a WebSocket send's ``key``: a request repeated
within ``store.idempotency_window_s`` stores nothing and gets the first answer again with
``"duplicate": true`` (per result, and at the top when every result is one).
"""

from __future__ import annotations

import functools
import hmac
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import orjson
import trio

from tidings import log
from tidings.auth import state_secret
from tidings.config import Config
from tidings.wire.handshake import http_response
from tidings.server import admin, health
from tidings.server.demo import STATIC_DIR
from tidings.server.hub import Hub
from tidings.server.metrics import CONTENT_TYPE, Metrics
from tidings.wire.protocol import (
    MAX_KEY_LEN, MAX_PRESENCE_USERS, ProtocolError, encode_body, valid_key, valid_user_id,
)
from tidings.service.workers import reuseport_listeners
from tidings.store import StoreError

__all__ = ["load_api_key", "serve_api"]

JSON = b"application/json"
MAX_BROADCAST = 1000
USERS_PREFIX = "/api/users/"
#: The operator's page: path -> (file in static/, content type).  Served without the key.
ADMIN_FILES = {
    "/admin": ("admin.html", b"text/html; charset=utf-8"),
    "/admin/admin.js": ("admin.js", b"text/javascript; charset=utf-8"),
    "/admin/admin.css": ("admin.css", b"text/css; charset=utf-8"),
    "/admin/admin.svg": ("admin.svg", b"image/svg+xml"),
}
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


class _Answer(Exception):
    """End the request with this status and a JSON error body: the caller's fault."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


def load_api_key(config: Config, *, create: bool) -> bytes:
    """``api.key``, ``api.key_file``, or ``<state_dir>/api_key`` (created once, 0600)."""
    if config.api.key:
        return config.api.key.encode()
    if config.api.key_file:
        return Path(config.api.key_file).expanduser().read_bytes().strip()
    return state_secret(config.server.resolved_state_dir() / "api_key", create=create)


class ShutdownFlag(Protocol):
    """The WebSocket server, as far as the API cares (``daemon.Server``)."""

    shutting_down: bool


class _Stored:
    """The hub's origin for an API send (``hub.Origin[None]``): wakes the request."""

    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: dict[str, Any] | None = None

    def on_stored(self, _ctx: None, msg_id: str, seq: int, delivered: int) -> None:
        self.result = {"msg_id": msg_id, "seq": seq, "delivered": delivered}
        self.done.set()

    def on_duplicate(self, _ctx: None, msg_id: str, seq: int, delivered: int) -> None:
        self.result = {"msg_id": msg_id, "seq": seq, "delivered": delivered, "duplicate": True}
        self.done.set()

    def on_store_failed(self, _ctx: None) -> None:
        self.done.set()


class Api:
    def __init__(self, config: Config, hub: Hub, metrics: Metrics, key: bytes, server: ShutdownFlag) -> None:
        self.config = config
        self.hub = hub
        self.metrics = metrics
        self.key = key
        self.server = server
        self._log = log.LogOnce(interval=60.0)

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve requests on one connection until it closes; never raises."""
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
        try:
            while True:
                with trio.move_on_after(self.config.api.request_timeout_s) as timeout:
                    request, body = await self._read(stream, h)
                if timeout.cancelled_caught:
                    return
                if request is None:
                    return
                status, content_type, payload = await self._respond(request, body)
                head = request.method == b"HEAD"
                await stream.send_all(_serialize(h, status, content_type, payload, head=head))
                if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
                    return  # Connection: close, or an unread body
                h.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except _Answer as exc:  # a framing error: answer and hang up
            with trio.move_on_after(1):
                await stream.send_all(http_response(exc.status, orjson.dumps({"error": exc.error}), JSON))
        except Exception as exc:  # a bug of ours: this request only, never the daemon
            log.log("error", "api_crashed", error=repr(exc))
        finally:
            await trio.aclose_forcefully(stream)

    async def _read(self, stream: trio.SocketStream, h: h11.Connection) -> tuple[Any, bytes]:
        request, chunks, size = None, [], 0
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Answer(exc.error_status_hint, "malformed HTTP request") from None
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data and request is None:
                    return None, b""
                h.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.config.api.max_body_bytes:
                    raise _Answer(413, f"body larger than {self.config.api.max_body_bytes} bytes")
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return request, b"".join(chunks)
            else:  # ConnectionClosed or PAUSED
                return None, b""

    async def _respond(self, request: h11.Request, body: bytes) -> tuple[int, bytes, bytes]:
        parts = urlsplit(request.target.decode("latin-1"))
        route = (request.method, parts.path)
        try:
            if route == (b"GET", "/healthz"):
                return _json(*await health.check(self.hub, self.server.shutting_down))
            if route == (b"GET", "/metrics"):
                return 200, CONTENT_TYPE, self.metrics.render()
            if request.method in (b"GET", b"HEAD") and parts.path in ADMIN_FILES:
                return _static(*ADMIN_FILES[parts.path])
            if not parts.path.startswith("/api/"):
                raise _Answer(404, f"no such endpoint {parts.path[:100]}")
            self._authorize(request)
            devices = await self._devices_routes(request, parts.path)  # issue #12's block
            if devices is not None:
                return devices
            if route == (b"POST", "/api/send"):
                return _json(202, await self._send(_object(body), _idempotency_key(request)))
            if route == (b"POST", "/api/broadcast"):
                return _json(202, await self._broadcast(_object(body), _idempotency_key(request)))
            if route == (b"POST", "/api/disconnect"):
                return _json(200, await self._disconnect(_object(body)))
            if route == (b"GET", "/api/presence"):
                return _json(200, await self._presence(parts.query))
            if route == (b"GET", "/api/stats"):
                return _json(200, await admin.stats(self.hub))
            if request.method == b"GET" and parts.path.startswith(USERS_PREFIX):
                return _json(200, await self._user(parts.path[len(USERS_PREFIX):]))
            known = parts.path in _PATHS or parts.path.startswith(USERS_PREFIX)
            raise _Answer(405 if known else 404, f"no {request.method.decode()} {parts.path[:100]}")
        except _Answer as exc:
            self._log.log("info", "api_refused", key=f"{exc.status}", status=exc.status, error=exc.error)
            return _error(exc.status, exc.error)

    def _authorize(self, request: h11.Request) -> None:
        header = dict(request.headers).get(b"authorization")
        if header is None:
            raise _Answer(401, "missing Authorization: Bearer <api key>")
        scheme, _, value = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self.key):
            raise _Answer(403, "wrong API key")

    async def _store(self, sender: str, to: str, body: bytes, key: str | None) -> dict[str, Any]:
        waiter = _Stored()
        await self.hub.send(waiter, sender, to, body, None, key)
        await waiter.done.wait()
        if waiter.result is None:
            raise _Answer(503, "message not stored; retry")
        return waiter.result

    def _message(self, data: dict[str, Any]) -> tuple[str, bytes]:
        sender = data.get("from", "api")
        if not valid_user_id(sender):
            raise _Answer(400, "'from' must be a user id")
        if "body" not in data:
            raise _Answer(400, "'body' is required")
        try:
            return sender, encode_body(data["body"], None)
        except ProtocolError as exc:
            raise _Answer(400, exc.message) from None

    async def _send(self, data: dict[str, Any], key: str | None) -> dict[str, Any]:
        to = data.get("to")
        if not valid_user_id(to):
            raise _Answer(400, "'to' must be a user id")
        sender, body = self._message(data)
        return await self._store(sender, to, body, key)

    async def _broadcast(self, data: dict[str, Any], key: str | None) -> dict[str, Any]:
        users = data.get("users")
        if not isinstance(users, list) or not 0 < len(users) <= MAX_BROADCAST or not all(
            valid_user_id(u) for u in users
        ):
            raise _Answer(400, f"'users' must be a list of 1-{MAX_BROADCAST} user ids")
        sender, body = self._message(data)
        waiters = []
        for user in users:  # queue all first: one group commit, not one per user
            waiter = _Stored()
            await self.hub.send(waiter, sender, user, body, None, key)
            waiters.append((user, waiter))
        results = []
        for user, waiter in waiters:
            await waiter.done.wait()
            if waiter.result is None:
                results.append({"user": user, "error": "unavailable"})
            else:
                results.append({"user": user, **waiter.result})
        if key is not None and all(r.get("duplicate") for r in results):
            return {"results": results, "duplicate": True}
        return {"results": results}

    async def _disconnect(self, data: dict[str, Any]) -> dict[str, Any]:
        """All of the user's connections, or only ``conn`` (an id from ``GET
        /api/users/{user}``; 0 closed when it is gone), on every node of a cluster:
        the other nodes are asked through the control channel and their answers are
        awaited (``nodes`` answered, ``silent``: live nodes that did not answer in time)."""
        user, only = data.get("user"), data.get("conn")
        if not valid_user_id(user):
            raise _Answer(400, "'user' must be a user id")
        if only is not None and not isinstance(only, str):
            raise _Answer(400, "'conn' must be a connection id")
        closed = self.hub.disconnect_local(user, only)
        out: dict[str, Any] = {"closed": closed}
        if self.hub.control is not None:
            try:
                result = await self.hub.control.disconnect(user, only)
            except StoreError as exc:
                log.log("warning", "api_disconnect", user=user, conn=only, connections=closed,
                        error=str(exc))
                raise _Answer(503, f"closed {closed} connection(s) on this node; the other "
                                   f"nodes were not reached ({exc}); retry") from None
            out = {"closed": closed + result.closed, "nodes": 1 + len(result.answered),
                   "silent": list(result.silent)}
        log.log("info", "api_disconnect", user=user, conn=only, connections=out["closed"])
        return out

    async def _user(self, quoted: str) -> dict[str, Any]:
        try:
            user = unquote(quoted, errors="strict")
        except UnicodeDecodeError:
            user = None
        if not valid_user_id(user):
            raise _Answer(400, "GET /api/users/{user}: the path must end in a (percent-encoded) user id")
        try:
            return await admin.user_info(self.hub, user)
        except StoreError as exc:
            raise _Answer(503, f"store unavailable: {exc}") from None

    async def _presence(self, query: str) -> dict[str, Any]:
        users = parse_qs(query).get("user", [])
        if not 0 < len(users) <= MAX_PRESENCE_USERS or not all(valid_user_id(u) for u in users):
            raise _Answer(400, f"give 1-{MAX_PRESENCE_USERS} ?user= parameters")
        return {"users": await self.hub.presence(tuple(users))}


    # -- devices, delivery status, unread (issue #12): one block --------------------

    async def _devices_routes(self, request: h11.Request,
                              path: str) -> tuple[int, bytes, bytes] | None:
        """``GET /api/messages/{msg_id}`` and ``GET /api/users/{user}/unread`` (path
        segments percent-encoded); None for any other path."""
        if path.startswith(MESSAGES_PREFIX):
            name = "/api/messages/{msg_id}"
            segments = [path[len(MESSAGES_PREFIX):]]
        elif path.startswith(USERS_PREFIX) and path.endswith(UNREAD_SUFFIX):
            name = "/api/users/{user}/unread"
            segments = [path[len(USERS_PREFIX):-len(UNREAD_SUFFIX)]]
        else:
            return None
        if request.method != b"GET":
            raise _Answer(405, f"no {request.method.decode()} {name}")
        try:
            value = unquote(segments[0], errors="strict")
        except UnicodeDecodeError:
            value = ""
        try:
            if name == "/api/messages/{msg_id}":
                if not 0 < len(value) <= MAX_KEY_LEN or "/" in segments[0]:
                    raise _Answer(400, f"{name}: the path must end in a msg_id")
                status = await self.hub.message_status(value)
                if status is None:
                    raise _Answer(404, f"no message {value!r} (unknown, or pruned)")
                return _json(200, status)
            if not valid_user_id(value) or "/" in segments[0]:
                raise _Answer(400, f"{name}: {{user}} must be a (percent-encoded) user id")
            return _json(200, {"user": value, "devices": await self.hub.unread(value)})
        except StoreError as exc:
            raise _Answer(503, f"store unavailable: {exc}") from None


MESSAGES_PREFIX = "/api/messages/"
UNREAD_SUFFIX = "/unread"
_PATHS = {"/api/send", "/api/broadcast", "/api/disconnect", "/api/presence", "/api/stats"}


@functools.cache
def _static(name: str, content_type: bytes) -> tuple[int, bytes, bytes]:
    """A file of the operator's page, read once; 500 naming it when the install lacks it."""
    try:
        return 200, content_type, (STATIC_DIR / name).read_bytes()
    except OSError:
        return _error(500, f"{name} is missing from {STATIC_DIR} (a broken install)")


def _idempotency_key(request: h11.Request) -> str | None:
    """The ``Idempotency-Key`` header (400 when not 1-128 printable characters)."""
    values = [v for k, v in request.headers if k == b"idempotency-key"]
    if not values:
        return None
    if len(values) > 1:
        raise _Answer(400, "Idempotency-Key given more than once")
    try:
        key = values[0].decode("utf-8")
    except UnicodeDecodeError:
        key = ""
    if not valid_key(key):
        raise _Answer(400, f"Idempotency-Key must be 1-{MAX_KEY_LEN} printable characters")
    return key


def _object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _Answer(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _Answer(400, "body must be a JSON object")
    return data


def _json(status: int, data: Any) -> tuple[int, bytes, bytes]:
    return status, JSON, orjson.dumps(data)


def _error(status: int, error: str) -> tuple[int, bytes, bytes]:
    return _json(status, {"error": error})


def _serialize(h: h11.Connection, status: int, content_type: bytes, payload: bytes,
               *, head: bool = False) -> bytes:
    """The response through h11, so keep-alive and Connection: close follow the request.
    ``head``: the answer to a HEAD request (headers only)."""
    headers = [(b"content-type", content_type), (b"content-length", str(len(payload)).encode()),
               *SECURITY_HEADERS]
    return b"".join((
        h.send(h11.Response(status_code=status, headers=headers)) or b"",
        b"" if head else h.send(h11.Data(data=payload)) or b"",
        h.send(h11.EndOfMessage()) or b"",
    ))


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"api.listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


async def serve_api(
    config: Config, hub: Hub, metrics: Metrics, server: ShutdownFlag,
    *, shared: bool = False, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``api.listen`` and serve until cancelled; ``started(port)``.
    ``shared``: workers share the port (SO_REUSEPORT); each answers for its own process
    (``/metrics`` is per worker; sends and presence are cluster-wide)."""
    host, port = parse_listen(config.api.listen)
    key = load_api_key(config, create=True)
    api = Api(config, hub, metrics, key, server)
    if shared:
        listeners = await reuseport_listeners(host, port)
    else:
        listeners = await trio.open_tcp_listeners(port, host=host)
    actual = listeners[0].socket.getsockname()[1]
    log.log("info", "api_listening", url=f"http://{host}:{actual}", port=actual)
    task_status.started(actual)
    await trio.serve_listeners(api.handle, listeners)
