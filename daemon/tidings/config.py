"""Configuration: frozen attrs classes built by a strict cattrs converter from TOML.

Every key is optional; the defaults are the embedded single-node setup (SQLite in the
state directory, JWT auth with a secret created once there).  A bad file fails at start
with the key path and the reason (``expected int, got str '9000' @ config.server.port``).

This module is sans-IO apart from reading the file it is given; it never imports trio.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn

__all__ = [
    "ALGORITHMS",
    "ASYMMETRIC_ALGORITHMS",
    "ApiConfig",
    "AuthConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "HttpConfig",
    "LimitsConfig",
    "RoomsConfig",
    "ServerConfig",
    "StoreConfig",
    "WEBHOOK_EVENTS",
    "WebhooksConfig",
    "default_state_dir",
    "load_config",
    "structure_config",
]


class ConfigError(Exception):
    """The configuration is unusable.  ``.lines`` holds one "reason @ key.path" per fault."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


class _BadValue(ValueError):
    """Raised by a validator; carries the attribute name so the key path is complete."""

    def __init__(self, attribute: attrs.Attribute, reason: str) -> None:
        super().__init__(reason)
        self.key = attribute.name


def _positive(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
    if value <= 0:
        raise _BadValue(attribute, f"must be > 0, got {value!r}")


def _non_negative(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
    if value < 0:
        raise _BadValue(attribute, f"must be >= 0, got {value!r}")


def _port(_inst: Any, attribute: attrs.Attribute, value: int) -> None:
    if not 0 <= value <= 65535:
        raise _BadValue(attribute, f"must be a TCP port 0..65535, got {value!r}")


def _ws_path(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
    if not value.startswith("/") or "?" in value or " " in value:
        raise _BadValue(attribute, f"must be an absolute URL path like '/ws', got {value!r}")


MIN_SECRET_BYTES = 32


def _min_secret(attribute: attrs.Attribute, value: str, use: str = "HS256 key") -> None:
    if value and len(value.encode()) < MIN_SECRET_BYTES:
        raise _BadValue(attribute, f"must be at least {MIN_SECRET_BYTES} bytes ({use})")


#: JWT algorithms Tidings verifies: HS256 with its own secret; the others with an identity
#: provider's public keys (auth.public_key_file, auth.jwks_file or auth.jwks_url).
ALGORITHMS = ("HS256", "RS256", "ES256", "EdDSA")
ASYMMETRIC_ALGORITHMS = ALGORITHMS[1:]


def _names_from(allowed: tuple[str, ...], what: str, *, required: bool) -> Callable[..., None]:
    """A validator: a list of distinct names from ``allowed`` (at least one if ``required``)."""
    use = ", ".join(map(repr, allowed))

    def check(_inst: Any, attribute: attrs.Attribute, value: list[str]) -> None:
        if required and not value:
            raise _BadValue(attribute, f"must name at least one of {use}")
        for name in value:
            if name not in allowed:
                raise _BadValue(attribute, f"unknown {what} {name!r}: use {use}")
        if len(set(value)) != len(value):
            raise _BadValue(attribute, f"lists an {what} twice: {value!r}")

    return check


def _http_url(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
    parts = urlsplit(value)
    if value and (parts.scheme not in ("http", "https") or not parts.hostname):
        raise _BadValue(attribute, f"must be an http:// or https:// URL (or \"\"), got {value!r}")


def _origins(_inst: Any, attribute: attrs.Attribute, value: list[str]) -> None:
    """Origin patterns: "*", "null", or scheme://host[:port] (globs allowed), never a path."""
    for pattern in value:
        scheme, sep, rest = pattern.partition("://")
        if pattern in ("*", "null"):
            continue
        if not sep or not scheme or not rest or "/" in rest or any(c.isspace() for c in pattern):
            raise _BadValue(attribute, "must be origins like 'https://app.example.com' or "
                            f"'https://*.example.com' (scheme://host[:port], no path), got {pattern!r}")


def _one_of(*choices: str) -> Any:
    def check(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
        if value not in choices:
            raise _BadValue(attribute, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")

    return check


_LOG_LEVELS = ("debug", "info", "warning", "error")


@attrs.frozen(kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = attrs.field(default=8765, validator=_port)
    path: str = attrs.field(default="/ws", validator=_ws_path)
    #: "" means $STATE_DIRECTORY (set by systemd) else ~/.local/state/tidings.
    state_dir: str = ""
    max_message_bytes: int = attrs.field(default=65536, validator=_positive)
    shutdown_grace_s: float = attrs.field(default=5.0, validator=_non_negative)
    handshake_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    #: Send a WebSocket ping after this long without traffic from the peer.
    ping_interval_s: float = attrs.field(default=20.0, validator=_positive)
    #: Close (1001... no: reap) a connection silent for this long, pong included.
    idle_timeout_s: float = attrs.field(default=60.0, validator=_positive)
    log_level: str = attrs.field(default="info", validator=_one_of(*_LOG_LEVELS))
    #: Offer permessage-deflate to clients that ask (costs memory per connection, see
    #: docs/performance.md).
    compression: bool = False
    #: Worker processes sharing the port (SO_REUSEPORT), joined through the cluster's
    #: Redis; 1 = this process serves alone.
    workers: int = attrs.field(default=1, validator=_positive)
    #: PEM certificate chain and private key: both set = serve wss:// (see tidings.tls).
    tls_cert: str = ""
    tls_key: str = ""
    #: Browser origins allowed to open a WebSocket (shell globs matched against the
    #: ``Origin`` header); [] = any.  A request without ``Origin`` is never refused.
    allowed_origins: list[str] = attrs.field(factory=list, validator=_origins)

    def __attrs_post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("set both tls_cert and tls_key, or neither")

    def resolved_state_dir(self) -> Path:
        return Path(self.state_dir).expanduser() if self.state_dir else default_state_dir()


@attrs.frozen(kw_only=True)
class AuthConfig:
    mode: str = attrs.field(default="jwt", validator=_one_of("jwt", "insecure"))
    secret: str = attrs.field(default="", validator=lambda i, a, v: _min_secret(a, v))
    secret_file: str = ""
    #: Lifetime of tokens minted by ``tidings token`` when --ttl is not given.
    token_ttl_s: int = attrs.field(default=3600, validator=_positive)
    #: After a secret rotation (SIGHUP), tokens signed with the old secret still verify
    #: for this long; 0 = drop the old secret at once.
    previous_secret_grace_s: float = attrs.field(default=3600.0, validator=_non_negative)
    #: Accepted JWT algorithms: HS256 (our secret) and/or RS256, ES256, EdDSA (the
    #: public keys of an identity provider, from exactly one of the three sources below).
    algorithms: list[str] = attrs.field(factory=lambda: ["HS256"], validator=_names_from(ALGORITHMS, "algorithm", required=True))
    public_key_file: str = ""
    jwks_file: str = ""
    jwks_url: str = attrs.field(default="", validator=_http_url)
    #: Least time between two JWKS fetches caused by an unknown ``kid`` (or retrying a
    #: failed fetch).
    jwks_refresh_s: float = attrs.field(default=60.0, validator=_positive)
    #: The key set is refetched in the background when it is this old.
    jwks_max_age_s: float = attrs.field(default=3600.0, validator=_positive)
    #: Bound of one JWKS fetch (connect, request, body).
    jwks_timeout_s: float = attrs.field(default=5.0, validator=_positive)
    #: Required ``iss`` / ``aud`` claim values; "" = not checked.
    issuer: str = ""
    audience: str = ""
    #: Clock skew tolerated on ``exp``, ``nbf`` and ``iat``, in seconds.
    leeway_s: float = attrs.field(default=0.0, validator=_non_negative)

    def __attrs_post_init__(self) -> None:
        if self.secret and self.secret_file:
            raise ValueError("set secret or secret_file, not both")
        sources = [k for k in ("public_key_file", "jwks_file", "jwks_url") if getattr(self, k)]
        asymmetric = [a for a in self.algorithms if a in ASYMMETRIC_ALGORITHMS]
        if len(sources) > 1:
            raise ValueError("set one of public_key_file, jwks_file, jwks_url, "
                             f"not {' and '.join(sources)}")
        if asymmetric and not sources:
            raise ValueError(f"algorithms {asymmetric!r} need public keys: "
                             "set public_key_file, jwks_file or jwks_url")
        if sources and not asymmetric:
            raise ValueError(f"{sources[0]} is set but algorithms has none of "
                             f"{', '.join(map(repr, ASYMMETRIC_ALGORITHMS))} to use it with")
        if not self.accepts_hs256() and (self.secret or self.secret_file):
            raise ValueError("secret / secret_file is set but 'HS256' is not in algorithms")

    def accepts_hs256(self) -> bool:
        """Tokens signed with our own secret (``tidings token``) are accepted."""
        return "HS256" in self.algorithms


@attrs.frozen(kw_only=True)
class LimitsConfig:
    #: Bound of each connection's queue of routed messages; a full queue is a slow consumer.
    outbound_queue: int = attrs.field(default=256, validator=_positive)
    slow_consumer: str = attrs.field(default="disconnect", validator=_one_of("disconnect", "drop"))
    max_connections: int = attrs.field(default=10000, validator=_positive)
    max_connections_per_user: int = attrs.field(default=16, validator=_positive)
    #: Token bucket per connection: sustained frames per second and bucket size.
    messages_per_second: float = attrs.field(default=100.0, validator=_positive)
    burst: int = attrs.field(default=200, validator=_positive)
    #: Replies (ack, pong, error) a connection may have queued before it stops reading.
    max_inflight: int = attrs.field(default=64, validator=_positive)
    #: Consecutive rate-limited frames after which the connection is closed with 1008.
    rate_limit_close_after: int = attrs.field(default=100, validator=_positive)


@attrs.frozen(kw_only=True)
class StoreConfig:
    #: "" = "sqlite", or "redis" when cluster.redis_url is set.
    backend: str = attrs.field(default="", validator=_one_of("", "sqlite", "memory", "redis"))
    #: "" means <server.state_dir>/tidings.db
    path: str = ""
    retention_days: float = attrs.field(default=30.0, validator=_non_negative)
    max_inbox: int = attrs.field(default=10000, validator=_positive)
    history_limit: int = attrs.field(default=100, validator=_positive)
    #: Most messages committed in one transaction (group commit).
    batch_max: int = attrs.field(default=512, validator=_positive)
    #: Bound of the writer's input queue; when full, senders wait (backpressure).
    queue: int = attrs.field(default=4096, validator=_positive)
    prune_interval_s: float = attrs.field(default=300.0, validator=_positive)
    #: How long a send's idempotency `key` names its first message (0: keys are ignored).
    idempotency_window_s: float = attrs.field(default=86400.0, validator=_non_negative)
    #: Where a device seen for the first time starts: "all" (every retained message)
    #: or "none" (only messages stored from now on).
    new_device_replay: str = attrs.field(default="all", validator=_one_of("all", "none"))


@attrs.frozen(kw_only=True)
class HttpConfig:
    #: Serve the browser demo page (GET /) and the JS client (GET /tidings.js).
    demo: bool = False


def _listen(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if value and (not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535):
        raise _BadValue(attribute, f"must be HOST:PORT (or \"\" to disable), got {value!r}")


@attrs.frozen(kw_only=True)
class ApiConfig:
    #: HOST:PORT of the server API, /healthz and /metrics; "" disables the listener.
    listen: str = attrs.field(default="127.0.0.1:8766", validator=_listen)
    #: Bearer key for /api/*; "" = key_file, else <state_dir>/api_key (created once, 0600).
    key: str = ""
    key_file: str = ""
    max_body_bytes: int = attrs.field(default=1048576, validator=_positive)
    request_timeout_s: float = attrs.field(default=10.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.key and self.key_file:
            raise ValueError("set key or key_file, not both")


@attrs.frozen(kw_only=True)
class RoomsConfig:
    #: Rooms a token without a ``rooms`` claim may join: names or glob patterns.
    default_allow: list[str] = attrs.field(factory=lambda: ["*"])
    max_rooms_per_connection: int = attrs.field(default=32, validator=_positive)
    max_members_per_room: int = attrs.field(default=10000, validator=_positive)
    #: Keep the last N messages of each room in memory and hand them to joiners (0 = off).
    history: int = attrs.field(default=0, validator=_non_negative)


@attrs.frozen(kw_only=True)
class ClusterConfig:
    #: Redis shared by all nodes (e.g. "redis://10.0.0.5:6379/0"); "" = a single node.
    redis_url: str = ""
    #: This node's name in presence bookkeeping; "" = hostname-pid.
    node_id: str = ""
    #: A node's presence entries expire this long after it stops refreshing (kill -9).
    presence_ttl_s: float = attrs.field(default=15.0, validator=_positive)
    #: The Redis URL points at a Redis Cluster (sharded pub/sub, one slot per user).
    redis_cluster: bool = False

    def resolved_node_id(self, worker: int | None = None) -> str:
        if not self.node_id:
            return f"{socket.gethostname()}-{os.getpid()}"
        return self.node_id if worker is None else f"{self.node_id}-w{worker}"


#: What a webhook may report (config ``webhooks.events``; docs/deploy.md).
WEBHOOK_EVENTS = ("undelivered", "online", "offline")


@attrs.frozen(kw_only=True)
class WebhooksConfig:
    #: Where events are POSTed (http:// or https://); "" = webhooks off.
    url: str = attrs.field(default="", validator=_http_url)
    #: The HMAC-SHA256 key of the Tidings-Signature header (at least 32 bytes), or a
    #: file holding it; one of the two is required when url is set.
    secret: str = attrs.field(default="", validator=lambda i, a, v: _min_secret(a, v, "HMAC key"))
    secret_file: str = ""
    #: Events to send: any of "undelivered", "online", "offline".
    events: list[str] = attrs.field(factory=lambda: list(WEBHOOK_EVENTS),
                                   validator=_names_from(WEBHOOK_EVENTS, "event", required=False))
    #: A stored message no device of its recipient acked within this many seconds is
    #: reported ``undelivered``.
    undelivered_after_s: float = attrs.field(default=60.0, validator=_positive)
    #: Bound of one POST (connect, request, answer).
    timeout_s: float = attrs.field(default=5.0, validator=_positive)
    #: Attempts per event (the first one included); then it is dropped as dead.
    max_attempts: int = attrs.field(default=10, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.secret and self.secret_file:
            raise ValueError("set secret or secret_file, not both")
        if self.url and not (self.secret or self.secret_file):
            raise ValueError("url is set: set secret or secret_file (receivers verify "
                             "the Tidings-Signature header with it)")

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def wants(self, event: str) -> bool:
        """Webhooks are on and ``event`` is one of ``events``."""
        return bool(self.url) and event in self.events


@attrs.frozen(kw_only=True)
class Config:
    server: ServerConfig = attrs.field(factory=ServerConfig)
    auth: AuthConfig = attrs.field(factory=AuthConfig)
    limits: LimitsConfig = attrs.field(factory=LimitsConfig)
    store: StoreConfig = attrs.field(factory=StoreConfig)
    http: HttpConfig = attrs.field(factory=HttpConfig)
    rooms: RoomsConfig = attrs.field(factory=RoomsConfig)
    api: ApiConfig = attrs.field(factory=ApiConfig)
    cluster: ClusterConfig = attrs.field(factory=ClusterConfig)
    webhooks: WebhooksConfig = attrs.field(factory=WebhooksConfig)

    def __attrs_post_init__(self) -> None:
        clustered = bool(self.cluster.redis_url)
        if clustered and self.store.backend in ("sqlite", "memory"):
            raise ValueError(
                f"store.backend = {self.store.backend!r} cannot be combined with "
                "cluster.redis_url: every node must share one store (use \"redis\" or leave it unset)"
            )
        if self.store.backend == "redis" and not clustered:
            raise ValueError('store.backend = "redis" needs cluster.redis_url')
        if self.server.workers > 1 and not clustered:
            raise ValueError("server.workers > 1 needs cluster.redis_url (workers route through Redis)")

    def store_backend(self) -> str:
        """The effective backend: "redis" in a cluster, else the configured one (sqlite)."""
        if self.store.backend:
            return self.store.backend
        return "redis" if self.cluster.redis_url else "sqlite"

    def store_path(self) -> Path:
        if self.store.path:
            return Path(self.store.path).expanduser()
        return self.server.resolved_state_dir() / "tidings.db"


def default_state_dir() -> Path:
    """``$STATE_DIRECTORY`` (first entry) when systemd sets it, else ~/.local/state/tidings."""
    env = os.environ.get("STATE_DIRECTORY", "")
    if env:
        return Path(env.split(":")[0])
    return Path.home() / ".local" / "state" / "tidings"


def _strict(kind: type) -> Any:
    def hook(value: Any, _type: Any) -> Any:
        # bool is an int subclass: refuse it where an int/float is wanted, and vice versa.
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if type(value) is not kind:
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
        return value

    return hook


def _strict_str_list(value: Any, _type: Any) -> list[str]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list of strings, got {type(value).__name__} {value!r}")
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"expected a list of strings, got {type(item).__name__} {item!r} in it")
    return list(value)


def _table(structure: Any) -> Any:
    def hook(value: Any, cls: type) -> Any:
        if not isinstance(value, dict):
            raise TypeError("expected a table")
        return structure(value, cls)

    return hook


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    for kind in (int, float, str, bool):
        conv.register_structure_hook(kind, _strict(kind))
    conv.register_structure_hook_func(lambda t: t == list[str], _strict_str_list)
    for cls in (ServerConfig, AuthConfig, LimitsConfig, StoreConfig, HttpConfig, RoomsConfig, ApiConfig, ClusterConfig,
                WebhooksConfig, Config):
        conv.register_structure_hook(
            cls, _table(make_dict_structure_fn(cls, conv, _cattrs_forbid_extra_keys=True))
        )
    return conv


_converter = _make_converter()


def _describe(exc: BaseException, _type: Any) -> str:
    if isinstance(exc, TypeError | ValueError):
        return str(exc)
    if isinstance(exc, AttributeError):  # a scalar or list where a [table] belongs
        return "expected a table"
    return cattrs.v.format_exception(exc, _type)


def _key_paths(lines: list[str]) -> list[str]:
    """Move a validator's attribute name from the reason into the key path."""
    out = []
    for line in lines:
        reason, _, path = line.rpartition(" @ ")
        name, sep, rest = reason.partition("\x00")
        out.append(f"{rest} @ {path}.{name}" if sep else line)
    return out


def structure_config(data: dict[str, Any]) -> Config:
    """Build a Config from parsed TOML, or raise ConfigError naming every bad key."""
    try:
        return _converter.structure(data, Config)
    except cattrs.ClassValidationError as exc:
        _tag_bad_values(exc)
        lines = cattrs.transform_error(exc, path="config", format_exception=_describe)
        raise ConfigError(_key_paths(lines)) from None


def _tag_bad_values(group: BaseExceptionGroup) -> None:
    for exc in group.exceptions:
        if isinstance(exc, _BadValue):
            exc.args = (f"{exc.key}\x00{exc.args[0]}",)
        elif isinstance(exc, BaseExceptionGroup):
            _tag_bad_values(exc)


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read a TOML file (or the embedded defaults for ``None``)."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError([f"cannot read {os.fspath(path)}: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{os.fspath(path)} is not valid TOML: {exc}"]) from None
    return structure_config(data)
