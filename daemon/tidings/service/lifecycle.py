"""The daemon's service-manager side: sd_notify, the watchdog, SIGHUP reload, key expiry.

``Lifecycle(server, hub, notifier, config_path)`` is started in serve()'s root nursery
with ``await root.start(lifecycle.run)``: once started, SIGHUP is handled (so a SIGHUP
right after ``event=listening`` reloads instead of killing the process).  It runs:

* the watchdog: ``WATCHDOG=1`` every ``WATCHDOG_USEC/2`` from a trio task, so a stuck
  event loop stops the pings and systemd restarts the daemon;
* the status task: ``STATUS=connections=N users=M`` whenever it changed (1 s poll);
* key expiry: a rotated-out JWT secret is dropped once its grace has passed
  (``event=secret_expired``);
* the JWKS refresher (tidings.service.jwks): the identity provider's keys, fetched once
  before ``run`` reports started (bounded by ``auth.jwks_timeout_s``), then kept fresh;
* the reload loop: on SIGHUP re-read ``config_path`` and apply ``reload.plan_reload``:
  ``event=reloaded changed=k1,k2`` (``changed=none`` when nothing live changed) and
  ``event=reload_ignored keys=...`` for keys that need a restart.  A file that does not
  parse or validate, an unreadable secret file, an unusable public key file or JWK Set
  file, or an unusable TLS cert/key logs ``event=reload_failed`` and changes nothing.
  A reload also refetches the JWK Set (``auth.jwks_url``); a changed URL drops the old
  keys at once.  While webhooks are on, their url, secret (``webhooks.secret_file`` is
  re-read), timeout and attempts apply to the next attempt; an unreadable secret file
  fails the reload.

``ready()`` sends READY=1 (after listening); ``stopping()`` sends STOPPING=1 and ends
``run``.  Secrets never reach the log: only key names do.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import trio

from tidings import log
from tidings.service import tls
from tidings.auth import EMPTY_KEYS, KeyMaterialError, KeySet, load_keys, load_secret
from tidings.config import AuthConfig, ConfigError, load_config
from tidings.service.jwks import JwksRefresher
from tidings.service.reload import KeyRing, plan_reload
from tidings.service.sdnotify import Notifier
from tidings.webhooks.service import load_secret as load_webhook_secret

__all__ = ["Lifecycle"]

STATUS_INTERVAL = 1.0
EXPIRY_INTERVAL = 1.0


class Lifecycle:
    def __init__(self, server: Any, hub: Any, notifier: Notifier, config_path: str | os.PathLike | None) -> None:
        self.server = server
        self.hub = hub
        self.notifier = notifier
        self.config_path = config_path
        #: The HS256 secrets; None while HS256 is not in auth.algorithms.
        self.keyring = (KeyRing(load_secret(server.config, create=True))
                        if server.config.auth.accepts_hs256() else None)
        self.jwks = JwksRefresher(server.auth, server.config.auth)
        server.auth.on_unknown_key = self.jwks.request
        self.reloads = 0
        self._scope = trio.CancelScope()
        self._last_status = ""

    # -- notifications -----------------------------------------------------------------

    def status_text(self) -> str:
        s = self.hub.sessions.statistics()
        return f"connections={s.connections} users={s.users}"

    def ready(self) -> None:
        self._last_status = self.status_text()
        self.notifier.ready(self._last_status)

    def stopping(self) -> None:
        self.notifier.stopping(f"stopping; {self.status_text()}")
        self._scope.cancel()

    # -- tasks -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._scope, trio.open_signal_receiver(signal.SIGHUP) as hups:
            async with trio.open_nursery() as nursery:
                if self.notifier.watchdog_interval:
                    nursery.start_soon(self._watchdog, self.notifier.watchdog_interval)
                if self.notifier.enabled:
                    nursery.start_soon(self._status_loop)
                nursery.start_soon(self._expiry_loop)
                await nursery.start(self.jwks.run)
                task_status.started()
                async for _ in hups:
                    self.reload()

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval)

    async def _status_loop(self) -> None:
        while True:
            await trio.sleep(STATUS_INTERVAL)
            text = self.status_text()
            if text != self._last_status:
                self._last_status = text
                self.notifier.status(text)

    async def _expiry_loop(self) -> None:
        while True:
            await trio.sleep(EXPIRY_INTERVAL)
            if self.keyring is not None and self.keyring.expire(time.monotonic()):
                self.server.auth.set_secrets(self.keyring.secrets())
                log.log("info", "secret_expired", accepted=len(self.keyring.secrets()))

    # -- reload ------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the config file and apply what can change live; False if refused."""
        self.notifier.reloading()
        try:
            return self._reload()
        finally:
            self.notifier.ready(self.status_text())

    def _fail(self, reason: str) -> bool:
        log.log("error", "reload_failed", path=str(self.config_path or ""), error=reason,
                detail="the running configuration is unchanged")
        return False

    def _reload(self) -> bool:
        if self.config_path is None:
            log.log("warning", "reload_failed", error="started without --config: nothing to re-read")
            return False
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            return self._fail("; ".join(exc.lines))
        old = self.server.config
        plan = plan_reload(old, new)
        eff = plan.effective
        changed = list(plan.changed)
        # Prepare everything that can fail before changing anything.
        ssl_context = self.server.ssl_context
        if {"server.tls_cert", "server.tls_key"} & set(changed):
            try:
                ssl_context = tls.server_context(eff.server)
            except tls.TlsConfigError as exc:
                return self._fail(str(exc))
        try:
            secret = load_secret(eff, create=True) if eff.auth.accepts_hs256() else None
        except OSError as exc:
            return self._fail(f"cannot load the token secret: {exc}")
        try:
            keys = load_keys(eff)  # public_key_file / jwks_file; jwks_url: the refresher's
        except KeyMaterialError as exc:
            return self._fail(f"cannot load the public keys: {exc}")
        webhooks = self.server.webhooks
        try:
            hook_secret = load_webhook_secret(eff.webhooks) if webhooks is not None else b""
        except OSError as exc:
            return self._fail(f"cannot load the webhook secret: {exc}")
        # Apply.
        self.server.config = eff
        self.hub.config = eff
        self.server.ssl_context = ssl_context
        self.hub.sessions.update_limits(eff.limits.max_connections, eff.limits.max_connections_per_user)
        self.hub.router.slow_consumer = eff.limits.slow_consumer
        self._apply_auth(eff.auth, old.auth, secret, keys, changed)
        if webhooks is not None and webhooks.configure(eff.webhooks, hook_secret):
            if "webhooks.secret" not in changed and "webhooks.secret_file" not in changed:
                changed.append("webhooks.secret_file")  # same path, new content
        self.reloads += 1
        log.log("info", "reloaded", changed=",".join(changed) or "none",
                accepted_secrets=len(self.keyring.secrets()) if self.keyring else 0)
        if plan.ignored:
            log.log("warning", "reload_ignored", keys=",".join(plan.ignored), reason="restart required")
        log.configure(eff.server.log_level)
        return True

    def _apply_auth(
        self, new: AuthConfig, old: AuthConfig, secret: bytes | None, keys: KeySet, changed: list[str]
    ) -> None:
        """Swap the verifier's policy, secrets and keys; note same-path content changes."""
        auth = self.server.auth
        auth.set_policy(new)
        if secret is None:
            self.keyring = None
            auth.set_secrets([])
        elif self.keyring is None:
            self.keyring = KeyRing(secret)
            auth.set_secrets(self.keyring.secrets())
        elif self.keyring.rotate(secret, time.monotonic(), new.previous_secret_grace_s):
            auth.set_secrets(self.keyring.secrets())
            if "auth.secret" not in changed and "auth.secret_file" not in changed:
                changed.append("auth.secret_file")  # same path, new content
        if not new.jwks_url or new.jwks_url != old.jwks_url:
            # File keys, or none: a new (or no) JWKS URL must not keep the old URL's keys.
            if keys != auth.keys and keys is not EMPTY_KEYS:
                for name in ("public_key_file", "jwks_file"):
                    if getattr(new, name) and f"auth.{name}" not in changed:
                        changed.append(f"auth.{name}")  # same path, new content
            auth.set_keys(keys)
        self.jwks.configure(new)  # refetch the JWK Set at once (idle without one)


def listener_address(listener: Any, default_host: str) -> tuple[str, int]:
    """(host, port) a listener is bound to; an AF_UNIX socket gives (path, 0)."""
    name = listener.socket.getsockname()
    if isinstance(name, (str, bytes)):
        return (name.decode(errors="replace") if isinstance(name, bytes) else name), 0
    return name[0] or default_host, name[1]
