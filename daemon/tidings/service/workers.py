"""``server.workers = N``: N worker processes share the port, joined through Redis.

The supervisor (``supervise``) is a plain process loop, not a trio program: it starts
``tidings serve --worker I`` N times, forwards SIGTERM/SIGINT/SIGHUP to every worker,
restarts a worker that dies (with a backoff that resets after a minute of uptime), and
exits 0 once every worker has exited after a stop signal.  Each worker is a complete
node: it binds the WebSocket port (and the API port) with SO_REUSEPORT, so the kernel
spreads new connections over the workers, and it routes through the cluster's Redis
like any other node.  ``reuseport_listeners`` builds those listening sockets.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import trio

from tidings import log

__all__ = ["reuseport_listeners", "supervise"]

RESTART_BACKOFF_MAX = 10.0


async def reuseport_listeners(host: str, port: int, backlog: int = 1024) -> list[trio.SocketListener]:
    """Listening sockets on ``host:port`` with SO_REUSEPORT (shared by the workers)."""
    listeners = []
    for family, kind, proto, _name, addr in await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        sock = trio.socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            await sock.bind(addr)
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
        listeners.append(trio.SocketListener(sock))
    return listeners


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the supervisor dies (even by SIGKILL) -- Linux only."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: an orphaned worker still stops on its own SIGTERM


def supervise(config_path: str | None, workers: int) -> int:
    """Run ``workers`` worker processes until SIGTERM/SIGINT; return the exit code."""
    stopping = False
    procs: dict[int, subprocess.Popen] = {}
    started: dict[int, float] = {}
    backoff: dict[int, float] = {}

    def spawn(i: int) -> None:
        argv = [sys.executable, "-m", "tidings", "serve", "--worker", str(i)]
        if config_path:
            argv += ["--config", config_path]
        procs[i] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        started[i] = time.monotonic()
        log.log("info", "worker_started", worker=i, pid=procs[i].pid)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    log.log("info", "supervisor", workers=workers, pid=os.getpid())
    for i in range(workers):
        spawn(i)
    restart_at: dict[int, float] = {}
    while True:
        time.sleep(0.1)
        now = time.monotonic()
        for i, proc in list(procs.items()):
            if proc.poll() is None or i in restart_at:
                continue
            if stopping:
                continue
            delay = backoff.get(i, 0.5) if now - started[i] < 60 else 0.5
            backoff[i] = min(delay * 2, RESTART_BACKOFF_MAX)
            log.log("warning", "worker_died", worker=i, pid=proc.pid, code=proc.returncode, restart_in=delay)
            restart_at[i] = now + delay
        for i, when in list(restart_at.items()):
            if stopping:
                restart_at.pop(i)
            elif now >= when:
                restart_at.pop(i)
                spawn(i)
        if stopping and all(p.poll() is not None for p in procs.values()):
            codes = [p.returncode for p in procs.values()]
            log.log("info", "supervisor_stopped", codes=",".join(map(str, codes)))
            return 0 if all(c == 0 for c in codes) else 1
