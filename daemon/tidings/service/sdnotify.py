"""systemd integration without libsystemd: sd_notify and socket activation.

sd_notify
---------
``Notifier.from_env()`` reads ``NOTIFY_SOCKET`` (a filesystem path, or an abstract
socket name when it starts with ``@``), ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.
``notify("READY=1", "STATUS=...")`` sends one datagram with the lines joined by
newlines.  With ``NOTIFY_SOCKET`` unset every call is a no-op.  A send failure (the
manager went away, the buffer is full) is swallowed and counted: notification is
best effort and must never take the daemon down.  The variables are removed from the
environment so that child processes do not inherit them.

``watchdog_interval`` is half of ``WATCHDOG_USEC`` (seconds), or None when the watchdog
is off or ``WATCHDOG_PID`` names another process.  The caller sends ``WATCHDOG=1`` from a
trio task, so the pings prove that the event loop itself is alive.

Socket activation
-----------------
``activation_sockets()`` returns the stdlib sockets passed by the service manager:
fds 3 .. 3+LISTEN_FDS-1, used only when ``LISTEN_PID`` equals our pid; the variables
(and ``LISTEN_FDNAMES``) are always removed from the environment.  Each fd must be a
listening SOCK_STREAM socket, else ``ActivationError`` names the fd.
``activation_listeners()`` wraps them as ``trio.SocketListener``.
"""

from __future__ import annotations

import os
import socket
from typing import Mapping

__all__ = [
    "SD_LISTEN_FDS_START",
    "ActivationError",
    "Notifier",
    "activation_listeners",
    "activation_sockets",
]

SD_LISTEN_FDS_START = 3


class ActivationError(Exception):
    """The fds passed by the service manager are not usable listening sockets."""


class Notifier:
    """Sends sd_notify datagrams to the service manager (no-op without NOTIFY_SOCKET)."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self.sent = 0
        self.failed = 0
        self._sock: socket.socket | None = None
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, unset: bool = True) -> Notifier:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec_text = env.get("WATCHDOG_USEC", "")
        pid_text = env.get("WATCHDOG_PID", "")
        usec: int | None = None
        if usec_text.isdigit() and int(usec_text) > 0:
            usec = int(usec_text)
            if pid_text and (not pid_text.isdigit() or int(pid_text) != os.getpid()):
                usec = None  # the watchdog is meant for another process
        if unset and environ is None:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half the timeout), or None."""
        if not self.enabled or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2_000_000

    def _target(self) -> str | bytes:
        assert self.address is not None
        if self.address.startswith("@"):
            return b"\0" + self.address[1:].encode()
        return self.address

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` as one datagram; True if it was sent (False: off or failed)."""
        if self._sock is None:
            return False
        data = "\n".join(lines).encode()
        try:
            self._sock.sendto(data, self._target())
        except OSError:
            self.failed += 1
            return False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        return self.notify("RELOADING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def activation_sockets(environ: Mapping[str, str] | None = None, *, unset: bool = True) -> list[socket.socket]:
    """The listening sockets passed by socket activation (empty when not activated)."""
    env = os.environ if environ is None else environ
    pid_text, fds_text = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    if unset and environ is None:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if not pid_text.isdigit() or int(pid_text) != os.getpid():
        return []
    if not fds_text.isdigit() or int(fds_text) == 0:
        return []
    out = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(fds_text)):
        try:
            sock = socket.socket(fileno=fd)  # family and type are read from the fd
        except OSError as exc:
            raise ActivationError(f"LISTEN_FDS: fd {fd} is not a socket: {exc.strerror}") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()
            raise ActivationError(f"LISTEN_FDS: fd {fd} is not a listening stream socket")
        os.set_inheritable(fd, False)
        out.append(sock)
    return out


def activation_listeners(environ: Mapping[str, str] | None = None) -> list:
    """``trio.SocketListener`` for each activation socket (empty when not activated)."""
    import trio

    return [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in activation_sockets(environ)]
