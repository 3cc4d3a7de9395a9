"""server/accept.py over real TCP sockets: every connection waiting in the backlog is
handed to the handler as a SocketStream (TCP_NODELAY set), also when more wait than one
batch takes; running out of file descriptors is logged and retried, not fatal; the
listeners are closed when the loop is cancelled."""

from __future__ import annotations

import errno
import socket

import pytest
import trio

from inprocess import capture_log
from tidings.server import accept


async def listen() -> trio.SocketListener:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return trio.SocketListener(sock)


async def accept_all(n: int, *, listeners: int = 1) -> list[tuple[type, tuple, int]]:
    """Connect ``n`` clients (spread over the listeners), all before the loop runs; per
    stream the handler got: its type, its peer's address and its TCP_NODELAY.  The
    listeners must be closed afterwards."""
    ls = [await listen() for _ in range(listeners)]
    ports = [lst.socket.getsockname()[1] for lst in ls]
    clients = []
    for i in range(n):
        c = socket.socket()
        c.connect(("127.0.0.1", ports[i % listeners]))  # completes in the backlog
        clients.append(c)
    got = []
    all_in = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        got.append((type(stream), stream.socket.getpeername(),
                    stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
        stream.socket.close()
        if len(got) == n:
            all_in.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept.serve, handler, ls, nursery)
        with trio.fail_after(10):
            await all_in.wait()
        nursery.cancel_scope.cancel()
    for lst in ls:
        assert lst.socket.fileno() == -1  # closed by the loop
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", ports[0]), timeout=5)
    for c in clients:
        c.close()
    return got


async def test_every_waiting_connection_is_handed_over_as_a_socket_stream():
    got = await accept_all(10)
    assert len(got) == 10
    assert {kind for kind, _, _ in got} == {trio.SocketStream}
    assert len({peer for _, peer, _ in got}) == 10
    assert all(nodelay for _, _, nodelay in got)


async def test_more_than_a_batch_waiting(monkeypatch):
    monkeypatch.setattr(accept, "ACCEPT_BATCH", 3)
    assert len(await accept_all(20, listeners=2)) == 20


async def test_out_of_file_descriptors_is_logged_and_retried(monkeypatch):
    failures = [OSError(errno.EMFILE, "Too many open files")]

    class Flaky(socket.socket):
        def accept(self):
            if failures:
                raise failures.pop()
            return super().accept()

    monkeypatch.setattr(accept.socket, "socket", Flaky)
    with capture_log() as buf:
        got = await accept_all(3)
    assert len(got) == 3
    assert "event=accept_failed" in buf.getvalue() and "EMFILE" in buf.getvalue()
