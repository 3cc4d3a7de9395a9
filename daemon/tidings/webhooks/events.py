"""Webhook events as sent, and the retry schedule.  Sans-IO.

The POST body is JSON, keys in this order::

    {"id": "<unique>", "type": "online" | "offline" | "undelivered", "ts": <epoch ms>,
     "user": "<user id>"}
    undelivered adds: "msg_id", "from", "to" (= user, the recipient), "seq"

``id`` is the same on every retry of an event (receivers de-duplicate by it).

Retries: after the n-th failed attempt (a timeout, an error, or a status outside
200-299) the event waits :func:`retry_delay_s` ``(n)`` = ``RETRY_FIRST_S * 2 ** (n - 1)``
seconds, at most ``RETRY_MAX_S``, then is tried again; the ``max_attempts``-th failure
makes it dead.
"""

from __future__ import annotations

from typing import Any

import orjson

from tidings.store.records import WebhookEvent

__all__ = ["RETRY_FIRST_S", "RETRY_MAX_S", "event_body", "event_dict", "retry_delay_s"]

RETRY_FIRST_S = 1.0
RETRY_MAX_S = 300.0


def event_dict(event: WebhookEvent) -> dict[str, Any]:
    out: dict[str, Any] = {"id": event.id, "type": event.type, "ts": event.ts, "user": event.user}
    if event.type == "undelivered":
        out.update({"msg_id": event.msg_id, "from": event.sender, "to": event.user,
                    "seq": event.seq})
    return out


def event_body(event: WebhookEvent) -> bytes:
    """The exact bytes POSTed (and signed) for ``event``."""
    return orjson.dumps(event_dict(event))


def retry_delay_s(failures: int) -> float:
    """Seconds to wait after the ``failures``-th failed attempt (1, 2, 3, ...)."""
    if failures < 1:
        raise ValueError("failures must be >= 1")
    return min(RETRY_FIRST_S * 2.0 ** min(failures - 1, 64), RETRY_MAX_S)
