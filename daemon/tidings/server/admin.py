"""What the operator's page reads: ``GET /api/stats`` and ``GET /api/users/{user}``.

Contract
--------
* ``stats(hub)`` is a snapshot of counters and gauges, computed when asked: the daemon
  keeps no time series and runs no task for the page.  Rates (messages per second) and
  chart history are the reader's business, from successive snapshots: a counter's
  rate is ``(b[k] - a[k]) / (b["at"] - a["at"])`` between two records of one node.
* Per node: this node's record is computed live; in a cluster every other live node's
  is the record it wrote with its last presence write (``cluster.node_stats``), so it is
  up to ``cluster.presence_ttl_s / 3`` seconds old (its ``at`` says when).  A node
  whose record expired is gone.  ``totals`` add the nodes up (``commit_ms``: the worst
  node), except ``users``: distinct users.  In a cluster ``users`` and ``top_users``
  come from every node's presence hash while those hold at most 20,000 entries in all
  (read on request); beyond that ``users`` is the per-node sum (a user counts once per
  node, ``users_distinct`` false) and ``top_users`` are the answering node's
  (``top_users_node`` names it; null when the list covers every node).
* ``warnings`` and a user's ``connections`` are the answering node's.
* ``user_info(hub, user)``: presence and last_seen (cluster-wide), unread count (stored
  messages after the ack cursor of the ``default`` device; ``unread_by_device``: every
  registered device's), devices online, and this node's connections with
  their id, connect time and peer address.  Store or cluster failures raise
  ``StoreError`` (the API answers 503).
Timestamps are unix milliseconds.  Never blocks except on the store and cluster reads.
"""

from __future__ import annotations

import heapq
import socket
import time
from collections import Counter
from typing import Any

import orjson

from tidings import log
from tidings.server.hub import Hub
from tidings.store import DEFAULT_DEVICE, StoreError

__all__ = ["TOP_USERS", "node_name", "node_record", "peer_address", "stats", "user_info"]

#: How many of the most connected users ``stats`` lists.
TOP_USERS = 10
#: Record fields that add up over the nodes in ``totals``.
SUMMED = ("connections", "users", "rooms", "stored", "routed", "delivered", "dropped",
          "slow_disconnects", "rate_limited", "store_errors", "queued")
_STARTED_MS = int(time.time() * 1000)


def _now_ms() -> int:
    return int(time.time() * 1000)


def peer_address(stream: Any) -> str:
    """``"host:port"`` of a TCP stream's peer (under TLS too); ``""`` when unknown."""
    sock = getattr(getattr(stream, "transport_stream", stream), "socket", None)
    try:
        host, port = sock.getpeername()[:2]
    except (AttributeError, OSError, TypeError, ValueError):
        return ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def node_name(hub: Hub) -> str:
    """The cluster node id, or the host name of a single node."""
    return hub.cluster.node_id if hub.cluster is not None else socket.gethostname()


def node_record(hub: Hub) -> dict[str, Any]:
    """This node's counters (monotonic since start) and gauges, now."""
    s = hub.statistics()
    return {
        "node": node_name(hub),
        "at": _now_ms(),
        "started": _STARTED_MS,
        "store": hub.store.name,
        "connections": s.connections,
        "users": s.users,
        "rooms": s.rooms,
        "stored": s.stored,        # messages in (stored sends)
        "routed": s.routed,
        "delivered": s.delivered,  # messages out (copies handed to connections)
        "dropped": s.dropped,
        "slow_disconnects": s.slow_disconnects,
        "rate_limited": s.rate_limited,
        "store_errors": s.store_errors,
        "queued": s.queued,
        "commit_ms": round(s.commit_seconds * 1000, 3),
        "webhook_outbox": webhook_outbox(hub),
    }


def webhook_outbox(hub: Hub) -> int | None:
    """Webhook events waiting (None: webhooks are off).  The outbox is cluster-wide and
    one node sends it all, so that node reports it and the others 0: the total adds up."""
    sender = hub.webhooks.sender if hub.webhooks is not None else None
    if sender is None:
        return None
    s = sender.statistics()
    return s.outbox if s.leader else 0


def node_record_json(hub: Hub) -> bytes:
    """``node_record`` as JSON: what a cluster node writes with its presence."""
    return orjson.dumps(node_record(hub))


def top_users(counts: dict[str, int], n: int = TOP_USERS) -> list[dict[str, Any]]:
    """The ``n`` users with the most connections (ties by user id)."""
    ranked = heapq.nsmallest(n, counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [{"user": user, "connections": count} for user, count in ranked]


async def stats(hub: Hub) -> dict[str, Any]:
    """The ``GET /api/stats`` document (see the module docstring and docs/deploy.md)."""
    own = node_record(hub)
    nodes = [own]
    cluster_error = None
    counts: dict[str, int] | None = None
    if hub.cluster is not None:
        try:
            others, counts = await hub.cluster.node_stats()
        except StoreError as exc:  # Redis is down: this node's view, and say so
            cluster_error = str(exc)
        else:
            for raw in others.values():
                try:
                    record = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue  # a newer or older node's format: leave it out
                if isinstance(record, dict) and isinstance(record.get("node"), str):
                    nodes.append(record)
    nodes.sort(key=lambda r: (r is not own, r["node"]))
    totals: dict[str, Any] = {k: sum(_number(r.get(k)) for r in nodes) for k in SUMMED}
    everyone = counts is not None or hub.cluster is None  # else: this node's users only
    if counts is None:
        counts = Counter(conn.user for conn in hub.sessions.all_endpoints())
    totals["users_distinct"] = everyone
    if everyone:
        totals["users"] = len(counts)
    totals["commit_ms"] = max(_number(r.get("commit_ms")) for r in nodes)
    outboxes = [r["webhook_outbox"] for r in nodes if isinstance(r.get("webhook_outbox"), int)]
    totals["webhook_outbox"] = sum(outboxes) if outboxes else None
    totals["nodes"] = len(nodes)
    return {
        "node": own["node"],
        "at": own["at"],
        "cluster": hub.cluster is not None,
        "cluster_error": cluster_error,
        "totals": totals,
        "nodes": nodes,
        "top_users": top_users(counts),
        "top_users_node": None if everyone else own["node"],
        "warnings": log.recent_warnings(),
    }


def _number(value: Any) -> float | int:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


async def user_info(hub: Hub, user: str) -> dict[str, Any]:
    """The ``GET /api/users/{user}`` document."""
    presence = (await hub.presence((user,)))[user]
    state = await hub.inbox_state(user, DEFAULT_DEVICE)
    unread_by_device = await hub.unread(user)
    node = node_name(hub)
    conns = sorted(hub.sessions.connections(user), key=lambda c: c.connected_at)
    return {
        "user": user,
        "node": node,
        "online": presence["online"],
        "connection_count": presence["connections"],  # every node's
        "last_seen": presence["last_seen"],
        "unread": max(0, state.last_seq - state.cursor),
        "last_seq": state.last_seq,
        "cursor": state.cursor,
        "unread_by_device": unread_by_device,
        "devices": sorted({c.device for c in conns}),  # online here
        "connections": [
            {
                "conn": c.conn_id,
                "node": node,
                "device": c.device,
                "since": int(c.connected_at * 1000),
                "remote": c.remote,
                "rooms": sorted(hub.rooms.rooms_of(c)),
            }
            for c in conns
        ],
    }
