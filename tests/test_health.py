"""server/health.py: one /healthz on the WebSocket port and the API port, in process
(tests/inprocess.py): the store, the cluster link and shutdown each make it 503."""

from __future__ import annotations

import json
import socket

import pytest
import trio

from inprocess import capture_log, running_hub
from tidings.server.api import Api
from tidings.server.metrics import Metrics

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


class _Link:
    """A cluster link as /healthz sees it."""

    def __init__(self, healthy: bool) -> None:
        self.healthy = healthy
        self.node_id = "node-7"


async def _get(stream: trio.abc.Stream) -> tuple[int, str, dict]:
    await stream.send_all(REQUEST)
    data = b""
    while chunk := await stream.receive_some(4096):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    ctype = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                 if line.lower().startswith(b"content-type:"))
    return status, ctype.decode(), json.loads(body)


async def healthz_on_both_ports(h) -> tuple[int, dict]:
    """GET /healthz on the WebSocket port and on the API port; both must agree."""
    ws_stream, served = h.serve()
    ws = await _get(ws_stream)
    await served.wait()
    api = Api(h.server.config, h.hub, Metrics(), b"key", h.server)
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(api.handle, server)
        api_answer = await _get(client)
    assert ws == api_answer, (ws, api_answer)
    status, ctype, body = ws
    assert ctype == "application/json"
    return status, body


@pytest.mark.parametrize(("fault", "status", "body"), [
    (None, 200, {"status": "ok", "store": "ok", "cluster": None}),
    ("store", 503, {"status": "unavailable", "store": "unavailable", "cluster": None}),
    ("cluster", 503, {"status": "unavailable", "store": "ok", "cluster": "unavailable"}),
    ("shutdown", 503, {"status": "unavailable", "store": "ok", "cluster": None,
                       "shutting_down": True}),
])
async def test_healthz_checks_store_cluster_and_shutdown_on_both_ports(autojump_clock, fault, status, body):
    with trio.fail_after(5), capture_log():
        async with running_hub() as h:
            if fault == "store":
                h.store.fail("inbox_state")
            elif fault == "cluster":
                h.hub.cluster = _Link(healthy=False)  # type: ignore[assignment]
            elif fault == "shutdown":
                h.server.shutting_down = True
            got_status, got = await healthz_on_both_ports(h)
    assert got_status == status
    node = "node-7" if fault == "cluster" else socket.gethostname()  # who answered
    assert got == {"connections": 0, "shutting_down": False, "node": node, **body}


async def test_healthz_with_a_healthy_cluster_link(autojump_clock):
    with trio.fail_after(5):
        async with running_hub() as h:
            await h.connect("user=bob")
            h.hub.cluster = _Link(healthy=True)  # type: ignore[assignment]
            status, body = await healthz_on_both_ports(h)
            h.hub.cluster = None  # (bob's close would release his channel)
    assert (status, body) == (200, {"status": "ok", "node": "node-7", "store": "ok", "cluster": "ok",
                                    "connections": 1, "shutting_down": False})


async def test_a_store_that_hangs_is_unavailable_after_the_timeout(autojump_clock):
    from tidings.server.health import HEALTH_TIMEOUT

    with trio.fail_after(5 * HEALTH_TIMEOUT), capture_log() as logs:
        async with running_hub() as h:
            h.store.hold("inbox_state")  # never released
            ws_stream, served = h.serve()
            t0 = trio.current_time()
            status, _, body = await _get(ws_stream)
            assert trio.current_time() - t0 == pytest.approx(HEALTH_TIMEOUT)
    assert (status, body["store"]) == (503, "unavailable")
    assert "event=health_check_failed" in logs.getvalue()
