"""Prometheus metrics, rendered by prometheus-client from a registry of our own.

Gauges and counters are read from the hub's and server's ``statistics()`` at scrape time
by a custom collector (nothing extra on the hot path); the send->deliver latency is a
real ``Histogram`` observed for one routed inbox message in eight (hub.py).  ``render()`` returns the
text exposition format for ``GET /metrics``.  ``tidings_node_info{node=...}`` says which node
answered (``Metrics.node``, set by the daemon); in a cluster ``tidings_cluster_users_online``
counts users online on any node (read by the control plane every ``presence_ttl_s / 3``).
Never imports trio.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

#: Handshake refusals by HTTP status, as the ``reason`` label.
REFUSAL_REASONS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "bad_request",
    408: "timeout",
    426: "bad_request",
    429: "user_limit",
    431: "bad_request",
    503: "unavailable",
}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram(
            "tidings_send_to_deliver_seconds",
            "Time from accepting a send to offering it to the recipient's connections "
            "(includes the store commit); one message in 8 is observed.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
            registry=self.registry,
        )
        self.refusals: Counter[str] = Counter()
        self.hub: Any = None
        self.webhooks: Any = None  # tidings.webhooks.sender.WebhookSender when webhooks are on
        #: The node id (cluster) or host name that answers, for ``tidings_node_info``.
        self.node = ""
        self.registry.register(_Collector(self))

    def refused(self, status: int) -> None:
        self.refusals[REFUSAL_REASONS.get(status, str(status))] += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def describe(self) -> list[Metric]:
        return []  # dynamic: collected at scrape time

    def collect(self) -> Iterator[Metric]:
        hub = self._m.hub
        refusals = CounterMetricFamily(
            "tidings_handshake_refusals", "WebSocket handshakes refused, by reason.", labels=["reason"]
        )
        for reason, n in sorted(self._m.refusals.items()):
            refusals.add_metric([reason], n)
        yield refusals
        sender = self._m.webhooks
        if sender is not None:
            w = sender.statistics()
            yield GaugeMetricFamily("tidings_webhooks_outbox", "Webhook events waiting in the outbox "
                                    "(cluster-wide; as last read, at most 1 s old).", value=w.outbox)
            for name, doc, value in (
                ("tidings_webhooks_sent", "Webhook events a receiver accepted (2xx).", w.sent),
                ("tidings_webhooks_failed_attempts", "Webhook attempts that failed (timeout, "
                 "error, non-2xx).", w.failed),
                ("tidings_webhooks_dead", "Webhook events dropped after webhooks.max_attempts.", w.dead),
            ):
                yield CounterMetricFamily(name, doc, value=value)
        if self._m.node:
            info = GaugeMetricFamily("tidings_node_info", "The node that answered this scrape.",
                                     labels=["node"])
            info.add_metric([self._m.node], 1)
            yield info
        if hub is None:
            return
        control = getattr(hub, "control", None)
        if control is not None and control.online_users is not None:
            yield GaugeMetricFamily(
                "tidings_cluster_users_online",
                "Users with at least one connection on any node of the cluster.",
                value=control.online_users)
        s = hub.statistics()
        for name, doc, value in (
            ("tidings_connections", "Open WebSocket connections.", s.connections),
            ("tidings_users_online", "Users with at least one connection.", s.users),
            ("tidings_rooms", "Rooms with at least one member.", s.rooms),
            ("tidings_store_queue", "Sends waiting for the store writer.", s.queued),
            ("tidings_store_commit_seconds", "Time of one store append (a batch), moving average.",
             s.commit_seconds),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, value in (
            ("tidings_messages_stored", "Messages committed to the store.", s.stored),
            ("tidings_messages_routed", "Messages routed (inbox and room).", s.routed),
            ("tidings_deliveries", "Message copies accepted by live connections.", s.delivered),
            ("tidings_messages_dropped", "Message copies a full connection queue refused.", s.dropped),
            ("tidings_slow_consumer_disconnects", "Connections closed with 1013.", s.slow_disconnects),
            ("tidings_store_errors", "Store failures (messages answered 'unavailable').", s.store_errors),
            ("tidings_rate_limited_frames", "Frames refused by a connection's rate limit.", s.rate_limited),
        ):
            yield CounterMetricFamily(name, doc, value=value)
