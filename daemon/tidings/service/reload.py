"""What a configuration reload (SIGHUP) may change, decided without I/O.  Sans-IO.

``plan_reload(old, new)`` compares two ``Config`` objects key by key (``section.key``)
and returns a ``ReloadPlan``:

* ``changed``: keys whose value differs and that the running daemon applies live
  (``LIVE_KEYS``);
* ``ignored``: keys whose value differs but that need a restart (everything else:
  ``server.host/port/path/state_dir``, ``auth.mode``, ``store.*``, TLS or webhooks
  turned on or off, and any key of a section this module does not know) - the daemon
  keeps their old values;
* ``effective``: the config to run with from now on: the new values of the live keys,
  the old values of the others.

``KeyRing`` holds the JWT signing secrets across rotations: newest first; after a
rotation the previous secret still verifies until ``now + grace_s``.

Neither imports trio; times are plain floats from whatever clock the caller uses.
"""

from __future__ import annotations

from typing import Any

import attrs

from tidings.config import Config

__all__ = ["LIVE_KEYS", "KeyRing", "ReloadPlan", "flatten", "plan_reload"]

#: Keys applied without a restart, and how (for the docs and the reviewer):
LIVE_KEYS: frozenset[str] = frozenset({
    "server.log_level",            # log.configure
    "server.max_message_bytes",    # new connections
    "server.handshake_timeout_s",  # next handshake
    "server.ping_interval_s",      # housekeeper, next tick
    "server.idle_timeout_s",       # housekeeper, next tick
    "server.tls_cert",             # new SSL context, new connections (not on<->off)
    "server.tls_key",
    "auth.secret",                 # rotation: the old secret verifies for the grace
    "auth.secret_file",
    "auth.token_ttl_s",
    "auth.previous_secret_grace_s",
    "auth.algorithms",             # next token verified (Authenticator.set_policy)
    "auth.issuer",
    "auth.audience",
    "auth.leeway_s",
    "auth.public_key_file",        # re-read on every reload (path or content)
    "auth.jwks_file",
    "auth.jwks_url",               # refetched on every reload; a new URL drops the old keys
    "auth.jwks_refresh_s",         # the refresher's next wait
    "auth.jwks_max_age_s",
    "auth.jwks_timeout_s",
    "server.allowed_origins",      # next handshake
    "limits.outbound_queue",       # new connections
    "limits.max_inflight",         # new connections
    "limits.messages_per_second",  # connections that have not sent a frame yet
    "limits.burst",
    "limits.rate_limit_close_after",
    "limits.slow_consumer",        # the router's policy
    "limits.max_connections",      # SessionTable.update_limits
    "limits.max_connections_per_user",
    "http.demo",
    "webhooks.url",                # the sender's next attempt (not on<->off: restart)
    "webhooks.secret",             # the next attempt's signature
    "webhooks.secret_file",        # re-read on every reload (path or content)
    "webhooks.timeout_s",          # the next attempt
    "webhooks.max_attempts",       # the next failed attempt
})

#: Keys that are live only while their feature stays on (or off): turning it on or off
#: changes what the daemon sets up at start (TLS: the URL scheme; webhooks: presence
#: tracking and the sender).
_SWITCHES = {
    "server.tls_cert": ("server.tls_cert", "server.tls_key"),
    "webhooks.url": ("webhooks.url", "webhooks.secret", "webhooks.secret_file",
                     "webhooks.timeout_s", "webhooks.max_attempts"),
}


@attrs.frozen
class ReloadPlan:
    effective: Config
    changed: tuple[str, ...]
    ignored: tuple[str, ...]


def flatten(config: Any) -> dict[str, Any]:
    """``{"section.key": value}`` for every key of every attrs section of ``config``."""
    out: dict[str, Any] = {}
    for section in attrs.fields(type(config)):
        table = getattr(config, section.name)
        if not attrs.has(type(table)):
            out[section.name] = table
            continue
        for field in attrs.fields(type(table)):
            out[f"{section.name}.{field.name}"] = getattr(table, field.name)
    return out


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """Split the differences between ``old`` and ``new`` into applied and ignored keys."""
    before, after = flatten(old), flatten(new)
    live_keys = LIVE_KEYS
    for switch, keys in _SWITCHES.items():
        if bool(before[switch]) != bool(after[switch]):
            live_keys = live_keys - set(keys)  # turning it on or off: restart
    changed = tuple(k for k in after if before.get(k) != after[k] and k in live_keys)
    ignored = tuple(k for k in after if before.get(k) != after[k] and k not in live_keys)
    sections: dict[str, Any] = {}
    for section in attrs.fields(type(new)):
        new_table = getattr(new, section.name)
        if not attrs.has(type(new_table)):
            continue
        live = {
            f.name: getattr(new_table, f.name)
            for f in attrs.fields(type(new_table))
            if f"{section.name}.{f.name}" in changed
        }
        # Unknown-to-us sections are never live: start from the old table.
        sections[section.name] = attrs.evolve(getattr(old, section.name), **live) if live else getattr(old, section.name)
    return ReloadPlan(attrs.evolve(old, **sections), changed, ignored)


class KeyRing:
    """Signing secrets, newest first; rotated-out secrets verify until their expiry.

    ``rotate(new, now, grace_s)``: ``new`` becomes the signing secret; the previous one
    expires at ``now + grace_s`` (``grace_s == 0``: dropped at once).  Rotating back to a
    secret that is still in its grace makes it current again (no duplicate).  Secrets
    rotated out earlier keep their own expiry.  ``expire(now)`` drops what has expired
    and returns how many.
    """

    def __init__(self, secret: bytes) -> None:
        self._current = secret
        self._previous: list[tuple[bytes, float]] = []  # newest first

    @property
    def current(self) -> bytes:
        return self._current

    def secrets(self) -> list[bytes]:
        return [self._current] + [s for s, _ in self._previous]

    def rotate(self, new: bytes, now: float, grace_s: float) -> bool:
        """Make ``new`` the signing secret; False if it already was."""
        if new == self._current:
            return False
        previous = [(s, t) for s, t in self._previous if s != new]
        if grace_s > 0:
            previous.insert(0, (self._current, now + grace_s))
        self._current = new
        self._previous = previous
        return True

    def expire(self, now: float) -> int:
        kept = [(s, t) for s, t in self._previous if t > now]
        dropped = len(self._previous) - len(kept)
        self._previous = kept
        return dropped

    def next_expiry(self) -> float | None:
        return min((t for _, t in self._previous), default=None)
