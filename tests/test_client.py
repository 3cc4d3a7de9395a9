"""tidings.client: opening is bounded by ``connect_timeout`` in all, also against a
server that accepts TCP and never answers (a SIGSTOPped node; the chaos soak meets it)."""

from __future__ import annotations

import socket

import pytest
import trio

from tidings.client import open_client


@pytest.mark.parametrize("timeout", [0.3, 1.0])
async def test_a_server_that_never_answers_times_out_at_connect_timeout(timeout):
    with socket.socket() as listener:  # the kernel accepts; nobody ever reads or answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        t0 = trio.current_time()
        with trio.fail_after(timeout + 5):  # (the bug: trio-websocket waited forever)
            with pytest.raises(trio.TooSlowError, match="no hello"):
                async with open_client(f"ws://127.0.0.1:{port}/ws", token="t",
                                       connect_timeout=timeout):
                    pytest.fail("opened a connection to a server that never answered")
        assert trio.current_time() - t0 == pytest.approx(timeout, abs=0.25)
