"""Webhooks in the daemon: the recorder and the sender, started and reloaded together.  Trio.

``open_webhooks(config, store, node=, local_users=)`` returns None when ``webhooks.url``
is "" (then nothing runs and the hub records nothing), else a :class:`Webhooks` whose
``run`` the daemon starts in its root nursery before it accepts connections: it reaps
this node's previous run (``WebhookRecorder.run``), reports started, and runs the
sender.  ``configure`` applies a reload (url, secret, timeout_s, max_attempts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import trio

from tidings.config import MIN_SECRET_BYTES, Config, WebhooksConfig
from tidings.store import Store
from tidings.webhooks.recorder import WebhookRecorder
from tidings.webhooks.sender import WebhookSender

__all__ = ["Webhooks", "load_secret", "open_webhooks"]


def load_secret(config: WebhooksConfig) -> bytes:
    """The HMAC key: ``secret``, or the content of ``secret_file`` (surrounding
    whitespace stripped).  Raises OSError naming the file (unreadable, too short)."""
    if config.secret:
        return config.secret.encode()
    secret = Path(config.secret_file).expanduser().read_bytes().strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise OSError(f"{config.secret_file}: secret is shorter than {MIN_SECRET_BYTES} bytes")
    return secret


class Webhooks:
    """The daemon's recorder (``hub.webhooks``) and sender (``/metrics``)."""

    def __init__(self, recorder: WebhookRecorder, sender: WebhookSender) -> None:
        self.recorder = recorder
        self.sender = sender

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.recorder.run)
            await nursery.start(self.sender.run)
            task_status.started()

    def configure(self, config: WebhooksConfig, secret: bytes) -> bool:
        """Apply a reloaded section; True if the secret changed."""
        changed = secret != self.sender.secret
        self.sender.configure(config, secret)
        return changed


def open_webhooks(config: Config, store: Store, *, node: str,
                  local_users: Callable[[], Iterable[str]]) -> Webhooks | None:
    """Build the webhooks of ``config`` (None when off).  Raises OSError when the
    secret file cannot be read."""
    wc = config.webhooks
    if not wc.enabled:
        return None
    ttl = config.cluster.presence_ttl_s
    sender = WebhookSender(store, wc, load_secret(wc), owner=node, ttl_s=ttl)
    recorder = WebhookRecorder(store, wc, node=node, ttl_s=ttl, local_users=local_users,
                               on_written=sender.wake)
    recorder.sender = sender
    return Webhooks(recorder, sender)
