"""``GET /healthz``: one readiness answer, the same on the WebSocket port and the API port.

``check(hub, shutting_down)`` returns ``(status, body)``: 200 when the daemon can serve
-- the store answers a read within ``HEALTH_TIMEOUT``, the cluster's Redis link (when
clustered) is up, and no shutdown has begun -- else 503.  The body says which part
failed::

    {"status": "ok" | "unavailable", "node": "<node id>", "store": "ok" | "unavailable",
     "cluster": null | "ok" | "unavailable", "connections": N, "shutting_down": bool}

``node`` says who answered: the cluster node id, or the host name of a single node.

A failed store read is logged once a minute (``event=health_check_failed``).  The check
never raises: a store that hangs counts as unavailable after the timeout.
"""

from __future__ import annotations

from typing import Any

import trio

from tidings import log
from tidings.server.admin import node_name
from tidings.server.hub import Hub

__all__ = ["HEALTH_TIMEOUT", "check"]

HEALTH_TIMEOUT = 2.0
#: The user whose inbox state is read to prove the store answers (read only).
PROBE_USER = "tidings-health-check"
_failures = log.LogOnce(interval=60.0)


async def check(hub: Hub, shutting_down: bool) -> tuple[int, dict[str, Any]]:
    store_ok = False
    with trio.move_on_after(HEALTH_TIMEOUT) as timeout:
        try:
            await hub.store.inbox_state(PROBE_USER)
            store_ok = True
        except Exception as exc:  # any store failure means not ready; never a crash here
            _failures.log("warning", "health_check_failed", key="store", error=repr(exc))
    if timeout.cancelled_caught:
        _failures.log("warning", "health_check_failed", key="timeout",
                      error=f"the store did not answer within {HEALTH_TIMEOUT:g} s")
    cluster = hub.cluster
    cluster_ok = cluster is None or cluster.healthy
    ok = store_ok and cluster_ok and not shutting_down
    return (200 if ok else 503), {
        "status": "ok" if ok else "unavailable",
        "node": node_name(hub),
        "store": "ok" if store_ok else "unavailable",
        "cluster": None if cluster is None else ("ok" if cluster_ok else "unavailable"),
        "connections": len(hub.sessions),
        "shutting_down": shutting_down,
    }
