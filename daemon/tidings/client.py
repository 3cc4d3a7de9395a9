"""A small typed async client for the Tidings protocol (trio + trio-websocket).

Contract (see docs/protocol.md for the frames)::

    async with open_client("ws://127.0.0.1:8765/ws", token=jwt, device="laptop") as c:
        c.user, c.conn, c.device, c.unread   # from the server's "hello" frame
        ack = await c.send("bob", {"text": "hi"})   # waits for the matching ack
        msg = await c.receive_message()      # next "message" frame

    # exactly once across a lost connection: resend what was never acknowledged
    async with open_client(url, token=jwt, device="laptop") as c2:
        acks = await c2.resend(c.unacked)    # same keys: "duplicate": true if stored

* ``open_client`` connects, then waits for the ``hello`` frame before yielding.
  A refused handshake (HTTP 401/404/429/503 ...) raises :class:`HandshakeRefused`;
  a connect/hello timeout raises ``trio_websocket.ConnectionTimeout`` /
  ``trio.TooSlowError``.
* One background reader task (in a nursery owned by the context manager) routes
  every incoming frame: a frame whose ``id`` matches a request we are waiting on
  wakes that request; every other frame (message, presence push, error without a
  known id, late replies ...) goes, in arrival order, to the *inbox*: a bounded
  memory channel of ``inbox_size`` (default 10_000) frames. When the inbox is
  full the reader blocks, which stops reading the socket (TCP back-pressure) and
  also delays replies, so consume the inbox (``receive``/``drain``) in long runs.
  Nothing is dropped.
* Every wait takes ``timeout`` (seconds, default 10) and raises
  ``trio.TooSlowError`` when it expires; nothing can hang forever.
* A reply of type ``error`` raises :class:`ServerError` (``.code``, ``.message``).
  If the connection closes while waiting, :class:`ConnectionClosedError`
  (``.code``, ``.reason``) is raised; ``receive`` raises it too once the inbox
  has been drained after a close. ``closed_code`` holds the close code.
* Outgoing frames are JSON text frames (orjson). ``send_frame`` also accepts a
  ``str`` (sent as-is as text) or ``bytes`` (sent as a *binary* frame) for tests.
* Devices and exactly-once sends: ``device=`` names the connection's device (its own
  ack cursor and replay on the server).  ``send`` puts a fresh idempotency ``key`` on
  every message (or the one given).  A send written but not answered (the connection
  closed, or the wait timed out) stays in ``unacked`` (key -> frame); ``resend`` sends
  such frames again, unchanged, on a new connection: the server stores each key once
  and answers a resend of a stored one with its original ack and ``"duplicate": true``.
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections import deque
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Iterable, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

__all__ = [
    "open_client", "TidingsClient", "TidingsError", "HandshakeRefused",
    "ServerError", "ConnectionClosedError", "build_url", "DEFAULT_TIMEOUT",
]

DEFAULT_TIMEOUT = 10.0
INBOX_SIZE = 10_000
Frame = dict[str, Any]


class TidingsError(Exception):
    """Base class of the client's errors."""


class HandshakeRefused(TidingsError):
    """The server answered the upgrade request with a plain HTTP status."""

    def __init__(self, status_code: int, reason_text: str, headers: Iterable = ()):
        super().__init__(status_code, reason_text)
        self.status_code = status_code
        self.reason_text = reason_text
        self.headers = tuple(headers)


class ServerError(TidingsError):
    """The server replied to one of our frames with ``{"type": "error", ...}``."""

    def __init__(self, code: str, message: str, frame: Frame | None = None):
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.frame = frame or {}


class ConnectionClosedError(TidingsError):
    """The WebSocket is closed (``code`` as sent by the server, 1006 if abrupt)."""

    def __init__(self, code: int | None, reason: str | None):
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


def build_url(url: str, *, token: str | None = None, user: str | None = None,
              since: int | None = None, device: str | None = None) -> str:
    """Add ``token=`` / ``user=`` (insecure mode) / ``since=`` / ``device=`` to ``url``'s
    query."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    for key, value in (("token", token), ("user", user), ("since", since), ("device", device)):
        if value is not None:
            query.append((key, str(value)))
    return urlunsplit(parts._replace(query=urlencode(query)))


class _Waiter:
    __slots__ = ("event", "frame", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.frame: Frame | None = None
        self.error: BaseException | None = None


class TidingsClient:
    """One connected Tidings session. Create it with :func:`open_client`."""

    def __init__(self, ws: Any, inbox_size: int = INBOX_SIZE) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[Any, _Waiter] = {}
        self._inbox_send, self._inbox = trio.open_memory_channel[Frame](inbox_size)
        self._pushback: deque[Frame] = deque()
        self._closed = trio.Event()
        self._hello = trio.Event()
        self.hello: Frame | None = None
        #: Sends written but not answered, by key (see the module docstring).
        self.unacked: dict[str, Frame] = {}

    # -- state --------------------------------------------------------------
    @property
    def user(self) -> str | None:
        return self.hello.get("user") if self.hello else None

    @property
    def conn(self) -> str | None:
        return self.hello.get("conn") if self.hello else None

    @property
    def device(self) -> str | None:
        return self.hello.get("device") if self.hello else None

    @property
    def unread(self) -> int | None:
        """Messages after this device's cursor when the connection opened."""
        return self.hello.get("unread") if self.hello else None

    @property
    def closed_code(self) -> int | None:
        """Close code once the connection is closed (from ``ConnectionClosed.reason``)."""
        reason = self._ws.closed
        return reason.code if reason is not None else None

    @property
    def closed_reason(self) -> str | None:
        reason = self._ws.closed
        return reason.reason if reason is not None else None

    def _closed_error(self) -> ConnectionClosedError:
        return ConnectionClosedError(self.closed_code, self.closed_reason)

    # -- reader -------------------------------------------------------------
    async def _reader(self) -> None:
        try:
            async with self._inbox_send:
                while True:
                    try:
                        data = await self._ws.get_message()
                    except ConnectionClosed:
                        return
                    try:
                        frame = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        frame = None
                    if not isinstance(frame, dict):
                        frame = {"type": "_invalid", "raw": data}
                    if frame.get("type") == "hello" and not self._hello.is_set():
                        self.hello = frame
                        self._hello.set()
                        continue
                    key = frame.get("id")
                    waiter = self._pending.pop(key, None) if _hashable(key) else None
                    if waiter is not None:
                        waiter.frame = frame
                        waiter.event.set()
                    else:
                        await self._inbox_send.send(frame)
        finally:
            self._closed.set()
            self._hello.set()
            for waiter in self._pending.values():
                waiter.error = self._closed_error()
                waiter.event.set()
            self._pending.clear()

    # -- sending --------------------------------------------------------------
    async def send_frame(self, frame: Mapping[str, Any] | str | bytes,
                         *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Send one raw frame: a dict (JSON text), a str (text) or bytes (binary)."""
        if isinstance(frame, Mapping):
            frame = orjson.dumps(frame).decode()
        with trio.fail_after(timeout):
            try:
                await self._ws.send_message(frame)
            except ConnectionClosed:
                raise self._closed_error() from None

    async def request(self, frame: Mapping[str, Any], *,
                      timeout: float = DEFAULT_TIMEOUT) -> Frame:
        """Send ``frame`` (an ``id`` is added if missing) and return the reply
        carrying the same id; raise :class:`ServerError` if it is an error."""
        frame = dict(frame)
        if frame.get("id") is None:
            frame["id"] = f"c{next(self._ids)}"
        key = frame["id"]
        if self._closed.is_set():
            raise self._closed_error()
        waiter = self._pending[key] = _Waiter()
        try:
            with trio.fail_after(timeout):
                await self.send_frame(frame, timeout=timeout)
                await waiter.event.wait()
        finally:
            if self._pending.get(key) is waiter:
                del self._pending[key]
        if waiter.error is not None:
            raise waiter.error
        reply = waiter.frame or {}
        if reply.get("type") == "error":
            raise ServerError(reply.get("code", ""), reply.get("message", ""), reply)
        return reply

    async def send(self, to: str, body: Any, *, id: Any = None, key: str | None = None,
                   room: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        """Send a message to user ``to`` (or to ``room``) with idempotency ``key`` (a
        fresh one when None); return the ``ack`` (msg_id, seq, delivered; duplicate
        when the key was already stored).  Until answered, the frame is in
        ``unacked``."""
        frame = {"type": "send", "body": body, "id": id, "key": key or uuid.uuid4().hex}
        frame.update({"room": room} if room is not None else {"to": to})
        return await self._send_keyed(frame, timeout)

    async def resend(self, frames: Mapping[str, Frame] | Iterable[Frame], *,
                     timeout: float = DEFAULT_TIMEOUT) -> list[Frame]:
        """Send again, in order and unchanged, sends another connection never got an
        answer to (its ``unacked``); return their acks (``duplicate`` when stored the
        first time)."""
        items = list(frames.values()) if isinstance(frames, Mapping) else list(frames)
        return [await self._send_keyed(dict(frame), timeout) for frame in items]

    async def _send_keyed(self, frame: Frame, timeout: float) -> Frame:
        key = frame["key"]
        if frame.get("id") is None:
            frame["id"] = f"c{next(self._ids)}"
        self.unacked[key] = frame
        try:
            reply = await self.request(frame, timeout=timeout)
        except ServerError:
            del self.unacked[key]  # answered: not stored (the caller may send again)
            raise
        del self.unacked[key]
        return reply

    async def ping(self, *, id: Any = None, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        return await self.request({"type": "ping", "id": id}, timeout=timeout)

    async def ack(self, seq: int, *, wait: bool = False,
                  timeout: float = DEFAULT_TIMEOUT) -> Frame | None:
        """Acknowledge delivery up to ``seq``; with ``wait`` return the ``acked`` reply."""
        if wait:
            return await self.request({"type": "ack", "seq": seq}, timeout=timeout)
        await self.send_frame({"type": "ack", "seq": seq}, timeout=timeout)
        return None

    async def resume(self, since: int, *, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        """Ask for replay after ``since``; return the ``resumed`` frame. The replayed
        ``message`` frames are already in the inbox when this returns."""
        return await self.request({"type": "resume", "since": since}, timeout=timeout)

    async def history(self, with_: str, before: str | None = None,
                      limit: int | None = None, *,
                      timeout: float = DEFAULT_TIMEOUT) -> Frame:
        """One ``history_page`` (newest first) of the conversation with ``with_``."""
        return await self.request(_frame("history", before=before, limit=limit,
                                         **{"with": with_}), timeout=timeout)

    async def search(self, q: str, limit: int | None = None,
                     offset: int | None = None, *,
                     timeout: float = DEFAULT_TIMEOUT) -> Frame:
        """``search_results`` for ``q`` among the user's messages."""
        return await self.request(_frame("search", q=q, limit=limit, offset=offset),
                                  timeout=timeout)

    async def presence(self, users: Iterable[str], *,
                       timeout: float = DEFAULT_TIMEOUT) -> Frame:
        return await self.request({"type": "presence", "users": list(users)},
                                  timeout=timeout)

    async def refresh(self, token: str, *, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        """Replace the session token; return the ``refreshed`` frame (``exp``)."""
        return await self.request({"type": "refresh", "token": token}, timeout=timeout)

    # -- receiving -------------------------------------------------------------
    async def receive(self, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        """Next inbox frame (anything that was not a reply to a pending request)."""
        if self._pushback:
            return self._pushback.popleft()
        with trio.fail_after(timeout):
            try:
                return await self._inbox.receive()
            except trio.EndOfChannel:
                raise self._closed_error() from None

    async def wait_for(self, match: str | Callable[[Frame], bool],
                       timeout: float = DEFAULT_TIMEOUT) -> Frame:
        """First inbox frame of type ``match`` (or satisfying it, if callable).
        Frames skipped on the way stay in the inbox, in order."""
        pred = match if callable(match) else (lambda f: f.get("type") == match)
        skipped: list[Frame] = []
        try:
            with trio.fail_after(timeout):
                while True:
                    frame = await self.receive(timeout=timeout)
                    if pred(frame):
                        return frame
                    skipped.append(frame)
        finally:
            self._pushback.extendleft(reversed(skipped))

    async def receive_message(self, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        """Next ``message`` frame (other frames are kept for ``receive``)."""
        return await self.wait_for("message", timeout=timeout)

    async def messages(self, n: int, timeout: float = DEFAULT_TIMEOUT) -> list[Frame]:
        """The next ``n`` message frames; ``timeout`` bounds the whole wait."""
        with trio.fail_after(timeout):
            return [await self.receive_message(timeout=timeout) for _ in range(n)]

    def drain(self) -> list[Frame]:
        """Every frame already in the inbox, without waiting."""
        out = list(self._pushback)
        self._pushback.clear()
        while True:
            try:
                out.append(self._inbox.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return out

    async def wait_closed(self, timeout: float = DEFAULT_TIMEOUT) -> int | None:
        """Wait until the server closes the connection; return the close code.
        Frames still in the inbox remain readable."""
        with trio.fail_after(timeout):
            await self._closed.wait()
        return self.closed_code

    async def close(self, code: int = 1000, reason: str | None = None,
                    *, timeout: float = 5.0) -> None:
        """Close the WebSocket (bounded: gives up after ``timeout``)."""
        with trio.move_on_after(timeout):
            await self._ws.aclose(code, reason)


def _frame(kind: str, **fields: Any) -> Frame:
    return {"type": kind, **{k: v for k, v in fields.items() if v is not None}}


def _hashable(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool))


def _single(eg: BaseExceptionGroup) -> BaseException | None:
    while isinstance(eg, BaseExceptionGroup) and len(eg.exceptions) == 1:
        eg = eg.exceptions[0]
    return None if isinstance(eg, BaseExceptionGroup) else eg


@asynccontextmanager
async def open_client(url: str, *, token: str | None = None, user: str | None = None,
                      since: int | None = None, device: str | None = None,
                      headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
                      ssl_context: Any = None, connect_timeout: float = DEFAULT_TIMEOUT,
                      close_timeout: float = 5.0, inbox_size: int = INBOX_SIZE,
                      max_message_size: int = 2**22) -> AsyncIterator[TidingsClient]:
    """Connect, wait for ``hello``, yield a :class:`TidingsClient`; close on exit.

    Opening (TCP, the upgrade and ``hello``) takes at most ``connect_timeout`` in all,
    also against a server that accepts TCP but never answers (a stopped process):
    trio-websocket 0.12.2's own ``connect_timeout`` then waits for its reader task
    forever, so a cancel scope of ours bounds the whole opening."""
    items = headers.items() if isinstance(headers, Mapping) else (headers or ())
    extra = [(k.encode(), v.encode()) for k, v in items]
    full_url = build_url(url, token=token, user=user, since=since, device=device)
    with trio.CancelScope(deadline=trio.current_time() + connect_timeout) as opening:
        try:
            async with open_websocket_url(full_url, ssl_context, extra_headers=extra,
                                          connect_timeout=connect_timeout,
                                          disconnect_timeout=close_timeout,
                                          max_message_size=max_message_size) as ws:
                client = TidingsClient(ws, inbox_size)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(client._reader)
                        await client._hello.wait()
                        if client.hello is None:
                            raise client._closed_error()
                        opening.deadline = math.inf  # open: the caller's time from here
                        try:
                            yield client
                        finally:
                            await client.close(timeout=close_timeout)
                            nursery.cancel_scope.cancel()
                except BaseExceptionGroup as eg:
                    inner = _single(eg)
                    if inner is None:
                        raise
                    raise inner from None
        except ConnectionRejected as exc:
            body = (exc.body or b"").decode("utf-8", "replace").strip()
            raise HandshakeRefused(exc.status_code, body, exc.headers) from None
    if opening.cancelled_caught:
        raise trio.TooSlowError(f"no hello from {url} within {connect_timeout:g} s")
