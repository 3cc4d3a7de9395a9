"""The daemon: listeners, one task per connection, the housekeeper, graceful shutdown.

``serve(config, task_status=...)`` opens the store, starts the hub, listens, and reports
``started(port)`` once connections are accepted.  It returns after SIGTERM/SIGINT (or
when its cancel scope is cancelled): it stops accepting, closes every connection with
1001, waits at most ``server.shutdown_grace_s`` for them, drains the store writer, and
closes the store.  Every TCP connection gets its own task in one nursery; a bug in one
connection is logged (``event=connection_crashed``) and never takes the server down,
while a peer that resets or drops TCP is not a crash (``connection.py``).  ``GET
/healthz`` on the WebSocket port answers what the API port's does (``health``).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import signal
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import h11
import orjson
import trio
from trio.lowlevel import wait_readable
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionType

from tidings import log
from tidings.server import accept, demo, health
from tidings.service import sdnotify, tls
from tidings.auth import AuthError, Authenticator, KeyMaterialError, load_keys, load_secret
from tidings.config import Config
from tidings.server.connection import Connection
from tidings.wire.handshake import (
    HttpError,
    accept_response,
    check_upgrade,
    http_response,
    negotiate_deflate,
)
from tidings.server.admin import node_name, node_record_json, peer_address
from tidings.server.api import serve_api
from tidings.server.flusher import Flusher
from tidings.server.housekeeping import PING_FRAME, Housekeeping
from tidings.server.hub import Hub
from tidings.server.metrics import Metrics
from tidings.server.outbound import read_nowait
from tidings.service.lifecycle import Lifecycle, listener_address
from tidings.wire.protocol import DEFAULT_DEVICE
from tidings.routing.sessions import Refused
from tidings.store import StoreError, open_store
from tidings.service.workers import reuseport_listeners
from tidings.webhooks.service import open_webhooks

__all__ = ["PING_FRAME", "StartupError", "Server", "serve"]

HOUSEKEEPING_INTERVAL = 1.0
MAX_REQUEST_HEAD = 16384
HEAD_READ_SIZE = 4096


#: ``Server._read_request``'s answer when the handshake timeout passed.
_TIMED_OUT = object()


async def _receive_head(stream: trio.abc.Stream, deadline: float) -> bytes | None:
    """The client's next bytes of its request head (b"" at EOF), or None once
    ``deadline`` passed.  On a plain TCP stream one non-blocking read straight on the
    socket first: during a connect storm the request has usually arrived by the time
    its task runs, and then no cancel scope, no epoll registration and none of trio's
    stream wrappers are needed.  Errors as trio's streams raise them."""
    sock = stream.socket if type(stream) is trio.SocketStream else None
    if sock is not None:
        data = read_nowait(sock.fileno(), HEAD_READ_SIZE)
        if data is not None:
            return data
    with trio.CancelScope(deadline=deadline):
        if sock is None:
            return await stream.receive_some(HEAD_READ_SIZE)
        while True:
            await wait_readable(sock.fileno())
            data = read_nowait(sock.fileno(), HEAD_READ_SIZE)
            if data is not None:
                return data
    return None


class StartupError(Exception):
    """The daemon cannot start (unwritable state dir, bad secret file, port in use...)."""


async def open_cluster_on(
    config: Config, hub: Hub, stack: contextlib.AsyncExitStack, worker: int | None = None
) -> None:
    """Join the cluster (pub/sub routing, presence) when cluster.redis_url is set."""
    if not config.cluster.redis_url:
        return
    from tidings.cluster import open_cluster

    from tidings.cluster.control import open_control

    cc = config.cluster
    node_id = cc.resolved_node_id(worker)
    hub.cluster = await stack.enter_async_context(
        open_cluster(cc.redis_url, node_id, cc.presence_ttl_s, hub.on_cluster_message,
                     on_resync=hub.on_cluster_resync, cluster=cc.redis_cluster)
    )
    hub.cluster.stats_record = partial(node_record_json, hub)  # for GET /api/stats
    hub.cluster.devices_of = hub.devices_online  # presence's devices, cluster-wide
    # Presence events and POST /api/disconnect for every node (exits first: withdraws).
    hub.control = await stack.enter_async_context(
        open_control(cc.redis_url, node_id, cc.presence_ttl_s,
                     on_presence=hub.on_control_presence, is_watched=hub.watched,
                     watched_users=hub.watches.watched_users, on_disconnect=hub.disconnect_local,
                     cluster=cc.redis_cluster)
    )


def make_authenticator(config: Config) -> Authenticator:
    """The verifier: HS256 secret and/or file-based public keys (a JWKS URL's keys come
    later, from the lifecycle's refresher)."""
    if config.auth.mode == "insecure":
        log.log("warning", "insecure_auth", detail="auth.mode=insecure: ?user= is accepted without a token")
    try:
        secrets_ = [load_secret(config, create=True)] if config.auth.accepts_hs256() else []
    except OSError as exc:
        raise StartupError(f"cannot load the token secret: {exc}") from None
    try:
        keys = load_keys(config)
    except KeyMaterialError as exc:
        raise StartupError(f"cannot load the public keys: {exc}") from None
    return Authenticator.from_config(config.auth, secrets_, keys)


class Server:
    """Accepts TCP connections and turns each into a handshake, then a Connection."""

    def __init__(self, config: Config, hub: Hub, auth: Authenticator,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``clock``: the monotonic clock of idle timeouts and rate limits (tests run
        connections under ``trio.current_time`` and a MockClock)."""
        self.config = config
        self.clock = clock
        self.hub = hub
        self.auth = auth
        self.shutting_down = False
        self.active = 0  # connection tasks alive (handshaking or serving)
        self._ids = itertools.count(1)
        self._node = os.urandom(3).hex()
        self._refusals = log.LogOnce(interval=60.0)
        self.metrics = Metrics()  # replaced by serve() with the one /metrics renders
        #: tidings.webhooks.service.Webhooks while webhooks.url is on (reloaded by lifecycle)
        self.webhooks: Any = None
        #: Set when serving wss:// (tidings.tls); swapped by a reload, new connections only.
        self.ssl_context: Any = None
        #: The nursery of the connection tasks: their helper tasks (writer, replay) run
        #: there too (``Connection.run``); None: each connection opens its own.
        self.nursery: trio.Nursery | None = None
        #: Writes what connections queue, once per turn (started next to the housekeeper).
        self.flusher = Flusher()
        hub.flusher = self.flusher  # its writer flushes each answered batch itself
        #: Which connection the housekeeper looks at when (housekeeping.Schedule).
        self.housekeeping = Housekeeping()

    async def handle(self, stream: trio.abc.Stream) -> None:
        """The task of one TCP connection: handshake, then serve; never raises."""
        self.active += 1
        if self.ssl_context is not None:  # TLS handshake on first read, under the timeout
            stream = tls.wrap(stream, self.ssl_context)
        try:
            conn = await self._handshake(stream)
            if conn is not None:  # the handshake's state (h11, request) is garbage now
                await conn.run(self.nursery, self.flusher)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away mid-handshake; nothing to answer
        except Exception as exc:  # a bug of ours: this connection only
            log.log("error", "connection_crashed", error=repr(exc))
        finally:
            self.active -= 1
            await trio.aclose_forcefully(stream)

    async def _handshake(self, stream: trio.abc.Stream) -> Connection | None:
        """Answer the HTTP request; return a registered Connection after a 101, else None."""
        cfg = self.config.server
        request, trailing = await self._read_request(stream, trio.current_time() + cfg.handshake_timeout_s)
        if request is _TIMED_OUT:
            self._refusals.log("info", "handshake_timeout", key="timeout")
            with trio.move_on_after(1):
                await stream.send_all(http_response(408, b"handshake timed out\n"))
            return None
        if request is None:
            return None
        try:
            upgrade = check_upgrade(request, cfg.path, cfg.allowed_origins)
            if self.shutting_down:
                raise HttpError(503, "server is shutting down")
            identity = self.auth.authenticate(upgrade.token, upgrade.user)
        except HttpError as exc:
            await self._refuse(stream, request, exc.status, exc.reason, exc.headers)
            return None
        except AuthError as exc:
            await self._refuse(stream, request, 401, str(exc))
            return None
        deflate = negotiate_deflate(upgrade.extensions) if cfg.compression else None
        extensions = [deflate[0]] if deflate else []
        # Without an extension the wsproto connection is made on first use (Outbound.ws).
        ws = WSConnection(ConnectionType.SERVER, extensions=extensions) if extensions else None
        conn = Connection(
            stream, ws, self.hub, self.auth,
            conn_id=f"c{self._node}-{next(self._ids):x}",
            user=identity.user, exp=identity.exp, since=upgrade.since,
            rooms=identity.rooms, binary=upgrade.binary, deflate=deflate is not None,
            device=identity.device or upgrade.device or DEFAULT_DEVICE, clock=self.clock,
        )
        conn.remote = peer_address(stream)
        try:
            await self.hub.register(conn)
        except Refused as exc:
            await self._refuse(stream, request, exc.status, exc.reason)
            return None
        conn.housekeeping = self.housekeeping
        self.housekeeping.watch(conn, self.clock())
        # The hello (completed with the device's unread count once its inbox state is
        # read) is written by conn.run() after the 101, together with the first `resumed`
        # when nothing is waiting in the inbox (one send, no replay task, no writer task).
        # An uncompressed frame is valid under permessage-deflate.
        conn.hello = {"user": identity.user, "conn": conn.conn_id, "exp": identity.exp}
        conn.greeting = accept_response(upgrade.key, deflate[1] if deflate else None)
        conn.trailing = trailing  # frames that came with the request: read first
        return conn

    async def _read_request(self, stream: trio.abc.Stream, deadline: float) -> tuple[Any, bytes]:
        """Read one request head by ``deadline`` (trio's clock); answer HTTP-level
        garbage here.  (None, b"") = done; (_TIMED_OUT, b"") = the deadline passed."""
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                self._refusals.log("info", "bad_http", key=str(status), status=status)
                with trio.CancelScope(deadline=deadline):  # under the handshake timeout
                    await stream.send_all(http_response(status, b"malformed HTTP request\n"))
                return None, b""
            if event is h11.NEED_DATA:
                data = await _receive_head(stream, deadline)
                if data is None:
                    return _TIMED_OUT, b""
                h.receive_data(data)
                if not data:
                    return None, b""
                continue
            if isinstance(event, h11.Request):
                # An upgrade request pauses h11; anything after the head is WebSocket data.
                if h.next_event() is h11.PAUSED:
                    return event, h.trailing_data[0]
                return event, b""
            return None, b""

    async def _refuse(
        self, stream: trio.abc.Stream, request: h11.Request, status: int, reason: str,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        if request.method == b"GET" and request.target.split(b"?")[0] == b"/healthz":
            code, body = await health.check(self.hub, self.shutting_down)  # as on the API port
            with trio.move_on_after(1):
                await stream.send_all(http_response(code, orjson.dumps(body), b"application/json"))
            return
        page = demo.answer(request, self.config)  # the demo page, when http.demo = true
        if page is not None:
            with trio.move_on_after(5):
                await stream.send_all(page)
            return
        self.metrics.refused(status)
        self._refusals.log("info", "handshake_refused", key=f"{status}:{reason}", status=status, reason=reason)
        with trio.move_on_after(1):
            await stream.send_all(http_response(status, reason.encode() + b"\n", headers=headers))

    async def housekeeper(self) -> None:
        """Once a second: expire tokens (1008), ping quiet peers, reap silent ones --
        among the connections due (``housekeeping``: when and how)."""
        while True:
            await trio.sleep(HOUSEKEEPING_INTERVAL)
            cfg = self.config.server  # re-read: a reload may have changed it
            self.housekeeping.tick(cfg.ping_interval_s, cfg.idle_timeout_s, time.time(),
                                   self.clock(), self.hub.sessions.all_endpoints)

    def kill_all(self, code: int, reason: str) -> None:
        for conn in self.hub.sessions.all_endpoints():
            conn.kill(code, reason)


async def serve(
    config: Config,
    *,
    config_path: str | os.PathLike[str] | None = None,
    worker: int | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until SIGTERM/SIGINT; ``task_status.started(port)`` once listening.

    ``worker``: this process is worker N of ``server.workers`` (tidings.workers): its
    listeners share the ports with SO_REUSEPORT.

    ``config_path`` is re-read on SIGHUP (see tidings.lifecycle).  Listeners come from
    systemd socket activation when LISTEN_FDS/LISTEN_PID say so, else they are bound
    to server.host/port.  READY=1/STOPPING=1 go to NOTIFY_SOCKET when it is set.
    """
    cfg = config.server
    log.configure(cfg.log_level)
    try:
        ssl_context = tls.server_context(cfg)
        listeners = sdnotify.activation_listeners()
    except (tls.TlsConfigError, sdnotify.ActivationError) as exc:
        raise StartupError(str(exc)) from None
    activated = bool(listeners)
    async with contextlib.AsyncExitStack() as stack:
        try:
            store = await stack.enter_async_context(open_store(config, worker))
        except StoreError as exc:
            if config.store_backend() == "redis":
                raise StartupError(f"cannot reach the cluster's Redis: {exc}") from None
            raise StartupError(str(exc)) from None
        auth = make_authenticator(config)
        try:
            if not listeners and worker is not None:
                listeners = await reuseport_listeners(cfg.host, cfg.port)
            listeners = listeners or await trio.open_tcp_listeners(cfg.port, host=cfg.host)
        except OSError as exc:
            raise StartupError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}") from None
        hub = Hub(config, store)
        await open_cluster_on(config, hub, stack, worker)
        try:
            webhooks = open_webhooks(
                config, store, local_users=lambda: [c.user for c in hub.sessions.all_endpoints()],
                node=hub.cluster.node_id if hub.cluster else config.cluster.resolved_node_id(worker))
        except OSError as exc:
            raise StartupError(f"cannot load the webhook secret: {exc}") from None
        metrics = Metrics()
        metrics.hub = hub
        metrics.node = node_name(hub)
        hub.latency = metrics.latency
        server = Server(config, hub, auth)
        server.metrics = metrics
        server.ssl_context = ssl_context
        if webhooks is not None:
            hub.webhooks = webhooks.recorder
            metrics.webhooks = webhooks.sender
            server.webhooks = webhooks
        host, port = listener_address(listeners[0], cfg.host)
        lifecycle = Lifecycle(server, hub, sdnotify.Notifier.from_env(), config_path)
        async with trio.open_nursery() as root:
            await root.start(hub.run)
            webhooks_scope = trio.CancelScope()  # cancelled once the hub is told to drain
            if webhooks is not None:  # before accepting: a restarted node starts over first
                await root.start(_in_scope, webhooks_scope, webhooks.run)
            api_scope = trio.CancelScope()  # cancelled at shutdown, else root never exits
            if config.api.listen:
                try:
                    api = partial(serve_api, config, hub, metrics, server, shared=worker is not None)
                    await root.start(_in_scope, api_scope, api)
                except OSError as exc:
                    raise StartupError(f"cannot serve the API on {config.api.listen}: {exc.strerror or exc}") from None
            await root.start(lifecycle.run)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as conns:
                    server.nursery = conns
                    accept_scope = trio.CancelScope()
                    conns.start_soon(_accept_loop, listeners, server, conns, accept_scope)
                    conns.start_soon(server.housekeeper)
                    conns.start_soon(server.flusher.run)
                    shown = host if ":" not in host else f"[{host}]"
                    scheme = "wss" if ssl_context is not None else "ws"
                    log.log("info", "listening", url=f"{scheme}://{shown}:{port}{cfg.path}",
                            host=host, port=port, store=config.store_backend(),
                            auth=config.auth.mode, pid=os.getpid(), worker=worker,
                            activated=len(listeners) if activated else None)
                    # Everything built so far lives as long as the process: keep it out of
                    # every future garbage collection (a full one paused the loop 12-22 ms).
                    gc.freeze()
                    lifecycle.ready()
                    task_status.started(port)
                    async for signum in signals:
                        log.log("info", "shutdown", signal=signal.Signals(signum).name,
                                connections=len(hub.sessions))
                        break
                    lifecycle.stopping()
                    api_scope.cancel()
                    server.shutting_down = True
                    accept_scope.cancel()
                    server.kill_all(1001, "server shutting down")
                    with trio.move_on_after(cfg.shutdown_grace_s) as grace:
                        while server.active:
                            await trio.sleep(0.05)
                    if grace.cancelled_caught:
                        log.log("warning", "shutdown_grace_expired", connections=len(hub.sessions))
                    conns.cancel_scope.cancel()
            hub.close_intake()
            webhooks_scope.cancel()  # the hub writes the last departures itself
        stats = hub.statistics()
        log.log("info", "stopped", stored=stats.stored, routed=stats.routed)


async def _in_scope(scope: trio.CancelScope, fn: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run ``fn(task_status=...)`` inside ``scope`` (so the caller can stop it alone)."""
    with scope:
        await fn(task_status=task_status)


async def _accept_loop(
    listeners: list[trio.SocketListener], server: Server, conns: trio.Nursery, scope: trio.CancelScope
) -> None:
    with scope:
        await accept.serve(server.handle, listeners, conns)
