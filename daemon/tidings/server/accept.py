"""The accept loop of the WebSocket port: ``trio.serve_listeners`` without its per-accept
cost.

``serve(handler, listeners, nursery)`` runs one loop per listener until cancelled (then
closes the listeners), and starts ``handler(stream)`` in ``nursery`` for every accepted
TCP connection, a ``trio.SocketStream`` (TCP_NODELAY set, as trio's).  Unlike trio's
``SocketListener.accept``, which yields to the scheduler after every accept and waits
for readability whenever the backlog is empty, each wake-up here accepts everything
waiting (up to ``ACCEPT_BATCH``) with plain non-blocking ``accept`` calls and then waits
once: a connect storm leaves tens of connections in the backlog.  The handler owns its
stream (it must close it).  Errors as trio's: a connection aborted before it was
accepted is skipped; running out of file descriptors or memory is logged (at most once a
minute) and retried after ``CAPACITY_SLEEP_S`` -- connections wait in the backlog
meanwhile; any other ``OSError`` is raised (a bug, or the listener was closed under us).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable

import trio
from trio.lowlevel import wait_readable

from tidings import log

__all__ = ["ACCEPT_BATCH", "serve"]

#: At most this many connections accepted per wake-up (then the handlers get to run).
ACCEPT_BATCH = 64
CAPACITY_SLEEP_S = 0.1
_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_IGNORABLE_ERRNOS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}
_capacity = log.LogOnce(interval=60.0)


async def serve(handler: Callable[[trio.SocketStream], Awaitable[object]],
                listeners: list[trio.SocketListener], nursery: trio.Nursery) -> None:
    """Accept on every listener until cancelled; the listeners are closed on return."""
    async with trio.open_nursery() as loops:
        for listener in listeners:
            loops.start_soon(_accept_loop, handler, listener, nursery)


async def _accept_loop(handler: Callable[[trio.SocketStream], Awaitable[object]],
                       listener: trio.SocketListener, nursery: trio.Nursery) -> None:
    listening = listener.socket
    # A stdlib socket object on the listener's fd for plain non-blocking accept calls;
    # detached (never closed) at the end: the listener owns the fd.
    view = socket.socket(fileno=listening.fileno())
    try:
        view.setblocking(False)
        while True:
            await wait_readable(listening)
            for _ in range(ACCEPT_BATCH):
                try:
                    sock, _ = view.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _IGNORABLE_ERRNOS:
                        continue
                    if exc.errno not in _CAPACITY_ERRNOS:
                        raise
                    _capacity.log("error", "accept_failed", key=str(exc.errno),
                                  error=errno.errorcode[exc.errno], retry_s=CAPACITY_SLEEP_S)
                    await trio.sleep(CAPACITY_SLEEP_S)
                    break
                nursery.start_soon(handler, trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
    finally:
        view.detach()
        await listener.aclose()
