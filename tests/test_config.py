"""config.py: defaults, every key, the exact error lines of bad files, check-config, the example."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import attrs
import pytest

from tidings.config import (
    AuthConfig,
    Config,
    ConfigError,
    LimitsConfig,
    ServerConfig,
    StoreConfig,
    default_state_dir,
    load_config,
    structure_config,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"
#: Every section of Config and its attrs class, read from the code (not hard-coded).
SECTIONS = {f.name: f.default.factory for f in attrs.fields(Config)}
SECRET32 = "s" * 32


# -- defaults ----------------------------------------------------------------------------


#: The documented default of every key (config.example.toml).
DEFAULTS = {
    "server": {
        "host": "127.0.0.1", "port": 8765, "path": "/ws", "state_dir": "", "max_message_bytes": 65536,
        "shutdown_grace_s": 5.0, "handshake_timeout_s": 10.0, "ping_interval_s": 20.0,
        "idle_timeout_s": 60.0, "log_level": "info", "compression": False, "tls_cert": "", "tls_key": "",
        "workers": 1, "allowed_origins": [],
    },
    "auth": {"mode": "jwt", "secret": "", "secret_file": "", "token_ttl_s": 3600,
             "previous_secret_grace_s": 3600.0, "algorithms": ["HS256"], "public_key_file": "",
             "jwks_file": "", "jwks_url": "", "jwks_refresh_s": 60.0, "jwks_max_age_s": 3600.0,
             "jwks_timeout_s": 5.0, "issuer": "", "audience": "", "leeway_s": 0.0},
    "limits": {
        "outbound_queue": 256, "slow_consumer": "disconnect", "max_connections": 10000,
        "max_connections_per_user": 16, "messages_per_second": 100.0, "burst": 200, "max_inflight": 64,
        "rate_limit_close_after": 100,
    },
    "store": {
        "backend": "", "path": "", "retention_days": 30.0, "max_inbox": 10000, "history_limit": 100,
        "batch_max": 512, "queue": 4096, "prune_interval_s": 300.0,
        "idempotency_window_s": 86400.0, "new_device_replay": "all",
    },
    "http": {"demo": False},
    "rooms": {"default_allow": ["*"], "max_rooms_per_connection": 32, "max_members_per_room": 10000,
              "history": 0},
    "api": {"listen": "127.0.0.1:8766", "key": "", "key_file": "", "max_body_bytes": 1048576,
            "request_timeout_s": 10.0},
    "cluster": {"redis_url": "", "node_id": "", "presence_ttl_s": 15.0, "redis_cluster": False},
    "webhooks": {"url": "", "secret": "", "secret_file": "",
                 "events": ["undelivered", "online", "offline"], "undelivered_after_s": 60.0,
                 "timeout_s": 5.0, "max_attempts": 10},
}


def _default(field: attrs.Attribute):
    return field.default.factory() if isinstance(field.default, attrs.Factory) else field.default


def test_defaults():
    c = Config()
    assert set(attrs.asdict(c)) == set(DEFAULTS)
    for section, keys in DEFAULTS.items():
        got = attrs.asdict(getattr(c, section))
        assert got == keys, section
        for key, value in keys.items():
            assert type(got[key]) is type(value), f"{section}.{key}"
    assert load_config(None) == c
    assert structure_config({}) == c
    assert structure_config({name: {} for name in SECTIONS}) == c


def test_default_field_sets_are_the_documented_ones():
    # A new key must be added to the tables here (and to config.example.toml).
    assert set(SECTIONS) == set(EVERY_KEY) == set(DEFAULTS)
    assert SECTIONS["server"] is ServerConfig and SECTIONS["auth"] is AuthConfig
    assert SECTIONS["limits"] is LimitsConfig and SECTIONS["store"] is StoreConfig
    for name, cls in SECTIONS.items():
        assert {f.name for f in attrs.fields(cls)} == set(EVERY_KEY[name]) == set(DEFAULTS[name]), name


def test_state_dir_and_store_path(tmp_path, monkeypatch):
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/a:{tmp_path}/b")
    assert default_state_dir() == tmp_path / "a"
    assert Config().store_path() == tmp_path / "a" / "tidings.db"
    monkeypatch.delenv("STATE_DIRECTORY")
    assert default_state_dir() == Path.home() / ".local" / "state" / "tidings"
    c = structure_config({"server": {"state_dir": str(tmp_path / "s")}})
    assert c.store_path() == tmp_path / "s" / "tidings.db"
    c = structure_config({"server": {"state_dir": str(tmp_path / "s")}, "store": {"path": "/x/y.db"}})
    assert c.store_path() == Path("/x/y.db")


# -- every key accepted with a right-typed (non-default) value ----------------------------

EVERY_KEY = {
    "server": {
        "host": "0.0.0.0", "port": 9000, "path": "/chat", "state_dir": "/var/lib/tidings",
        "max_message_bytes": 1024, "shutdown_grace_s": 1.5, "handshake_timeout_s": 3.0,
        "ping_interval_s": 5.0, "idle_timeout_s": 15.0, "log_level": "debug", "compression": True,
        "tls_cert": "/etc/tidings/cert.pem", "tls_key": "/etc/tidings/key.pem", "workers": 1,
        "allowed_origins": ["https://app.example.com", "https://*.example.com", "null"],
    },
    "auth": {"mode": "insecure", "secret": SECRET32, "secret_file": "", "token_ttl_s": 60,
             "previous_secret_grace_s": 0.0, "algorithms": ["HS256", "RS256", "ES256", "EdDSA"],
             "public_key_file": "", "jwks_file": "", "jwks_url": "https://idp.example/.well-known/jwks.json",
             "jwks_refresh_s": 30.0, "jwks_max_age_s": 600.0, "jwks_timeout_s": 2.0,
             "issuer": "https://idp.example/", "audience": "tidings", "leeway_s": 30.0},
    "limits": {
        "outbound_queue": 8, "slow_consumer": "drop", "max_connections": 5,
        "max_connections_per_user": 2, "messages_per_second": 2.5, "burst": 3,
        "max_inflight": 4, "rate_limit_close_after": 7,
    },
    "store": {
        "backend": "memory", "path": "/tmp/t.db", "retention_days": 0.5, "max_inbox": 10,
        "history_limit": 20, "batch_max": 16, "queue": 32, "prune_interval_s": 60.0,
        "idempotency_window_s": 0.0, "new_device_replay": "none",
    },
    "http": {"demo": True},
    "rooms": {"default_allow": ["team-*", "lobby"], "max_rooms_per_connection": 2, "max_members_per_room": 3,
              "history": 5},
    "api": {"listen": "0.0.0.0:9001", "key": "k" * 20, "key_file": "", "max_body_bytes": 4096,
            "request_timeout_s": 2.5},
    "cluster": {"redis_url": "", "node_id": "node-a", "presence_ttl_s": 5.0, "redis_cluster": True},
    "webhooks": {"url": "https://hooks.example.com/tidings", "secret": SECRET32, "secret_file": "",
                 "events": ["offline"], "undelivered_after_s": 0.5, "timeout_s": 1.5,
                 "max_attempts": 1},
}
#: Keys that are only valid together with another one.
COMPANIONS = {
    ("server", "tls_cert"): {"tls_key": "/k.pem"},
    ("server", "tls_key"): {"tls_cert": "/c.pem"},
    ("auth", "algorithms"): {"jwks_url": "https://idp.example/jwks"},
    ("auth", "jwks_url"): {"algorithms": ["RS256"]},
    ("auth", "public_key_file"): {"algorithms": ["ES256"]},
    ("auth", "jwks_file"): {"algorithms": ["HS256", "EdDSA"]},
    ("webhooks", "url"): {"secret": SECRET32},
}
#: Keys whose EVERY_KEY value is the default because another key excludes them; each
#: is tested alone with these values instead.
ALONE = {("auth", "secret_file"): "/etc/tidings/secret",  # not with secret
         ("auth", "public_key_file"): "/etc/tidings/idp.pem",  # one key source at a time
         ("auth", "jwks_file"): "/etc/tidings/jwks.json",
         ("webhooks", "secret_file"): "/etc/tidings/webhook_secret"}
KEY_CASES = [(s, k, ALONE.get((s, k), v)) for s, keys in EVERY_KEY.items() for k, v in keys.items()]


@pytest.mark.parametrize(("section", "key", "value"), KEY_CASES, ids=[f"{s}.{k}" for s, k, _ in KEY_CASES])
def test_every_key_accepted(section, key, value):
    extra = COMPANIONS.get((section, key), {})
    c = structure_config({section: {key: value, **extra}})
    got = getattr(getattr(c, section), key)
    assert got == value and type(got) is type(value)
    assert getattr(c, section) == attrs.evolve(getattr(Config(), section), **{key: value, **extra})
    for other in SECTIONS:
        if other != section:
            assert getattr(c, other) == getattr(Config(), other)


def _toml(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def test_all_keys_together_from_a_file(tmp_path):
    text = ""
    for section, keys in EVERY_KEY.items():
        text += f"[{section}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items())
    path = tmp_path / "all.toml"
    path.write_text(text)
    c = load_config(path)
    for section, keys in EVERY_KEY.items():
        assert attrs.asdict(getattr(c, section)) == keys


@pytest.mark.parametrize(
    ("section", "key"),
    [("server", "shutdown_grace_s"), ("server", "idle_timeout_s"), ("limits", "messages_per_second"),
     ("store", "retention_days"), ("store", "prune_interval_s")],
)
def test_int_accepted_where_float_wanted(section, key):
    got = getattr(getattr(structure_config({section: {key: 7}}), section), key)
    assert got == 7.0 and type(got) is float


@pytest.mark.parametrize("value", [0, 65535])
def test_port_bounds_accepted(value):
    assert structure_config({"server": {"port": value}}).server.port == value


def test_zero_allowed_where_non_negative():
    c = structure_config({"server": {"shutdown_grace_s": 0}, "store": {"retention_days": 0}})
    assert (c.server.shutdown_grace_s, c.store.retention_days) == (0.0, 0.0)


# -- bad files -> exact ConfigError.lines -----------------------------------------------

BAD = [
    # wrong types
    ("port_str", '[server]\nport = "9000"', ["expected int, got str '9000' @ config.server.port"]),
    ("port_bool", "[server]\nport = true", ["expected int, got bool True @ config.server.port"]),
    ("port_float", "[server]\nport = 9000.0", ["expected int, got float 9000.0 @ config.server.port"]),
    ("inbox_float", "[store]\nmax_inbox = 1.5", ["expected int, got float 1.5 @ config.store.max_inbox"]),
    ("ttl_bool", "[auth]\ntoken_ttl_s = false", ["expected int, got bool False @ config.auth.token_ttl_s"]),
    ("float_bool", "[limits]\nmessages_per_second = true",
     ["expected float, got bool True @ config.limits.messages_per_second"]),
    ("float_str", '[limits]\nmessages_per_second = "1"',
     ["expected float, got str '1' @ config.limits.messages_per_second"]),
    ("host_int", "[server]\nhost = 1", ["expected str, got int 1 @ config.server.host"]),
    ("mode_bool", "[auth]\nmode = true", ["expected str, got bool True @ config.auth.mode"]),
    ("path_list", '[server]\npath = ["/ws"]', ["expected str, got list ['/ws'] @ config.server.path"]),
    ("two_faults", '[server]\nport = "x"\nhost = 1',
     ["expected str, got int 1 @ config.server.host", "expected int, got str 'x' @ config.server.port"]),
    ("two_sections", '[server]\nport = "x"\n[store]\nqueue = 0',
     ["expected int, got str 'x' @ config.server.port", "must be > 0, got 0 @ config.store.queue"]),
    # unknown keys
    ("top_unknown", "bogus = 1", ["extra fields found (bogus) @ config"]),
    ("top_unknown_section", "[bogus]\nx = 1", ["extra fields found (bogus) @ config"]),
    ("section_unknown", "[server]\nbogus = 1", ["extra fields found (bogus) @ config.server"]),
    ("misspelt", "[limits]\noutbound_queu = 1", ["extra fields found (outbound_queu) @ config.limits"]),
    # enums
    ("slow_consumer", '[limits]\nslow_consumer = "nope"',
     ["must be one of 'disconnect', 'drop', got 'nope' @ config.limits.slow_consumer"]),
    ("new_device_replay", '[store]\nnew_device_replay = "some"',
     ["must be one of 'all', 'none', got 'some' @ config.store.new_device_replay"]),
    ("idempotency_window_negative", '[store]\nidempotency_window_s = -1.0',
     ["must be >= 0, got -1.0 @ config.store.idempotency_window_s"]),
    ("auth_mode", '[auth]\nmode = "oauth"', ["must be one of 'jwt', 'insecure', got 'oauth' @ config.auth.mode"]),
    ("backend", '[store]\nbackend = "postgres"',
     ["must be one of '', 'sqlite', 'memory', 'redis', got 'postgres' @ config.store.backend"]),
    ("log_level", '[server]\nlog_level = "trace"',
     ["must be one of 'debug', 'info', 'warning', 'error', got 'trace' @ config.server.log_level"]),
    ("log_level_case", '[server]\nlog_level = "INFO"',
     ["must be one of 'debug', 'info', 'warning', 'error', got 'INFO' @ config.server.log_level"]),
    # ranges
    ("port_high", "[server]\nport = 65536", ["must be a TCP port 0..65535, got 65536 @ config.server.port"]),
    ("port_neg", "[server]\nport = -1", ["must be a TCP port 0..65535, got -1 @ config.server.port"]),
    ("queue_neg", "[limits]\noutbound_queue = -1", ["must be > 0, got -1 @ config.limits.outbound_queue"]),
    ("queue_zero", "[limits]\noutbound_queue = 0", ["must be > 0, got 0 @ config.limits.outbound_queue"]),
    ("rate_neg", "[limits]\nmessages_per_second = -2.5",
     ["must be > 0, got -2.5 @ config.limits.messages_per_second"]),
    ("max_msg_zero", "[server]\nmax_message_bytes = 0", ["must be > 0, got 0 @ config.server.max_message_bytes"]),
    ("grace_neg", "[server]\nshutdown_grace_s = -1", ["must be >= 0, got -1.0 @ config.server.shutdown_grace_s"]),
    ("retention_neg", "[store]\nretention_days = -0.5", ["must be >= 0, got -0.5 @ config.store.retention_days"]),
    ("ttl_neg", "[auth]\ntoken_ttl_s = -60", ["must be > 0, got -60 @ config.auth.token_ttl_s"]),
    # paths
    ("path_relative", '[server]\npath = "ws"',
     ["must be an absolute URL path like '/ws', got 'ws' @ config.server.path"]),
    ("path_query", '[server]\npath = "/ws?x=1"',
     ["must be an absolute URL path like '/ws', got '/ws?x=1' @ config.server.path"]),
    ("path_space", '[server]\npath = "/w s"',
     ["must be an absolute URL path like '/ws', got '/w s' @ config.server.path"]),
    # secrets
    ("short_secret", '[auth]\nsecret = "short"', ["must be at least 32 bytes (HS256 key) @ config.auth.secret"]),
    ("secret_31", f'[auth]\nsecret = "{"s" * 31}"', ["must be at least 32 bytes (HS256 key) @ config.auth.secret"]),
    ("secret_and_file", f'[auth]\nsecret = "{SECRET32}"\nsecret_file = "/etc/secret"',
     ["set secret or secret_file, not both @ config.auth"]),
    ("grace_neg_secret", "[auth]\nprevious_secret_grace_s = -1",
     ["must be >= 0, got -1.0 @ config.auth.previous_secret_grace_s"]),
    # identity providers
    ("alg_unknown", '[auth]\nalgorithms = ["HS256", "RS512"]',
     ["unknown algorithm 'RS512': use 'HS256', 'RS256', 'ES256', 'EdDSA' @ config.auth.algorithms"]),
    ("alg_case", '[auth]\nalgorithms = ["rs256"]',
     ["unknown algorithm 'rs256': use 'HS256', 'RS256', 'ES256', 'EdDSA' @ config.auth.algorithms"]),
    ("alg_none", '[auth]\nalgorithms = ["none"]',
     ["unknown algorithm 'none': use 'HS256', 'RS256', 'ES256', 'EdDSA' @ config.auth.algorithms"]),
    ("alg_empty", "[auth]\nalgorithms = []",
     ["must name at least one of 'HS256', 'RS256', 'ES256', 'EdDSA' @ config.auth.algorithms"]),
    ("alg_twice", '[auth]\nalgorithms = ["HS256", "HS256"]',
     ["lists an algorithm twice: ['HS256', 'HS256'] @ config.auth.algorithms"]),
    ("alg_str", '[auth]\nalgorithms = "RS256"',
     ["expected a list of strings, got str 'RS256' @ config.auth.algorithms"]),
    ("alg_without_keys", '[auth]\nalgorithms = ["HS256", "ES256"]',
     ["algorithms ['ES256'] need public keys: set public_key_file, jwks_file or jwks_url @ config.auth"]),
    ("keys_without_alg", '[auth]\njwks_url = "https://idp.example/jwks"',
     ["jwks_url is set but algorithms has none of 'RS256', 'ES256', 'EdDSA' to use it with @ config.auth"]),
    ("pem_without_alg", '[auth]\npublic_key_file = "/k.pem"',
     ["public_key_file is set but algorithms has none of 'RS256', 'ES256', 'EdDSA' to use it with @ config.auth"]),
    ("two_key_sources", '[auth]\nalgorithms = ["RS256"]\njwks_file = "/j.json"\njwks_url = "https://i/j"',
     ["set one of public_key_file, jwks_file, jwks_url, not jwks_file and jwks_url @ config.auth"]),
    ("secret_without_hs256", f'[auth]\nalgorithms = ["RS256"]\njwks_url = "https://i/j"\nsecret = "{SECRET32}"',
     ["secret / secret_file is set but 'HS256' is not in algorithms @ config.auth"]),
    ("secret_file_without_hs256", '[auth]\nalgorithms = ["EdDSA"]\njwks_url = "https://i/j"\nsecret_file = "/s"',
     ["secret / secret_file is set but 'HS256' is not in algorithms @ config.auth"]),
    ("jwks_url_scheme", '[auth]\nalgorithms = ["RS256"]\njwks_url = "file:///etc/jwks.json"',
     ["must be an http:// or https:// URL (or \"\"), got 'file:///etc/jwks.json' @ config.auth.jwks_url"]),
    ("jwks_url_no_host", '[auth]\nalgorithms = ["RS256"]\njwks_url = "https:///jwks"',
     ["must be an http:// or https:// URL (or \"\"), got 'https:///jwks' @ config.auth.jwks_url"]),
    ("jwks_refresh_zero", "[auth]\njwks_refresh_s = 0", ["must be > 0, got 0.0 @ config.auth.jwks_refresh_s"]),
    ("jwks_max_age_neg", "[auth]\njwks_max_age_s = -1", ["must be > 0, got -1.0 @ config.auth.jwks_max_age_s"]),
    ("jwks_timeout_zero", "[auth]\njwks_timeout_s = 0", ["must be > 0, got 0.0 @ config.auth.jwks_timeout_s"]),
    ("leeway_neg", "[auth]\nleeway_s = -0.5", ["must be >= 0, got -0.5 @ config.auth.leeway_s"]),
    ("issuer_int", "[auth]\nissuer = 1", ["expected str, got int 1 @ config.auth.issuer"]),
    # allowed origins
    ("origin_with_path", '[server]\nallowed_origins = ["https://app.example.com/"]',
     ["must be origins like 'https://app.example.com' or 'https://*.example.com' (scheme://host[:port], "
      "no path), got 'https://app.example.com/' @ config.server.allowed_origins"]),
    ("origin_without_scheme", '[server]\nallowed_origins = ["app.example.com"]',
     ["must be origins like 'https://app.example.com' or 'https://*.example.com' (scheme://host[:port], "
      "no path), got 'app.example.com' @ config.server.allowed_origins"]),
    ("origin_empty", '[server]\nallowed_origins = [""]',
     ["must be origins like 'https://app.example.com' or 'https://*.example.com' (scheme://host[:port], "
      "no path), got '' @ config.server.allowed_origins"]),
    ("origin_space", '[server]\nallowed_origins = ["https://a b"]',
     ["must be origins like 'https://app.example.com' or 'https://*.example.com' (scheme://host[:port], "
      "no path), got 'https://a b' @ config.server.allowed_origins"]),
    ("origins_str", '[server]\nallowed_origins = "*"',
     ["expected a list of strings, got str '*' @ config.server.allowed_origins"]),
    ("origins_int", '[server]\nallowed_origins = ["https://a", 1]',
     ["expected a list of strings, got int 1 in it @ config.server.allowed_origins"]),
    # tls: both or neither
    ("tls_cert_alone", '[server]\ntls_cert = "/c.pem"', ["set both tls_cert and tls_key, or neither @ config.server"]),
    ("tls_key_alone", '[server]\ntls_key = "/k.pem"', ["set both tls_cert and tls_key, or neither @ config.server"]),
    # bools are bools
    ("demo_str", '[http]\ndemo = "yes"', ["expected bool, got str 'yes' @ config.http.demo"]),
    ("demo_int", "[http]\ndemo = 1", ["expected bool, got int 1 @ config.http.demo"]),
    ("http_unknown", "[http]\nport = 80", ["extra fields found (port) @ config.http"]),
    # lists of strings
    ("allow_str", '[rooms]\ndefault_allow = "*"',
     ["expected a list of strings, got str '*' @ config.rooms.default_allow"]),
    ("allow_mixed", '[rooms]\ndefault_allow = ["a", 1]',
     ["expected a list of strings, got int 1 in it @ config.rooms.default_allow"]),
    ("room_history_neg", "[rooms]\nhistory = -1", ["must be >= 0, got -1 @ config.rooms.history"]),
    ("api_listen_no_port", '[api]\nlisten = "localhost"',
     ["must be HOST:PORT (or \"\" to disable), got 'localhost' @ config.api.listen"]),
    ("api_key_and_file", '[api]\nkey = "a"\nkey_file = "/k"', ["set key or key_file, not both @ config.api"]),
    # webhooks
    ("hook_url_scheme", '[webhooks]\nurl = "ftp://h/x"',
     ["must be an http:// or https:// URL (or \"\"), got 'ftp://h/x' @ config.webhooks.url"]),
    ("hook_without_secret", '[webhooks]\nurl = "http://127.0.0.1:9/h"',
     ["url is set: set secret or secret_file (receivers verify the Tidings-Signature header "
      "with it) @ config.webhooks"]),
    ("hook_secret_31", f'[webhooks]\nsecret = "{"s" * 31}"',
     ["must be at least 32 bytes (HMAC key) @ config.webhooks.secret"]),
    ("hook_secret_and_file", f'[webhooks]\nsecret = "{SECRET32}"\nsecret_file = "/s"',
     ["set secret or secret_file, not both @ config.webhooks"]),
    ("hook_event_unknown", '[webhooks]\nevents = ["online", "delivered"]',
     ["unknown event 'delivered': use 'undelivered', 'online', 'offline' @ config.webhooks.events"]),
    ("hook_event_twice", '[webhooks]\nevents = ["online", "online"]',
     ["lists an event twice: ['online', 'online'] @ config.webhooks.events"]),
    ("hook_events_str", '[webhooks]\nevents = "online"',
     ["expected a list of strings, got str 'online' @ config.webhooks.events"]),
    ("hook_after_zero", "[webhooks]\nundelivered_after_s = 0",
     ["must be > 0, got 0.0 @ config.webhooks.undelivered_after_s"]),
    ("hook_timeout_neg", "[webhooks]\ntimeout_s = -1", ["must be > 0, got -1.0 @ config.webhooks.timeout_s"]),
    ("hook_attempts_zero", "[webhooks]\nmax_attempts = 0", ["must be > 0, got 0 @ config.webhooks.max_attempts"]),
    ("hook_attempts_float", "[webhooks]\nmax_attempts = 2.0",
     ["expected int, got float 2.0 @ config.webhooks.max_attempts"]),
    ("cluster_with_sqlite", '[cluster]\nredis_url = "redis://r"\n[store]\nbackend = "sqlite"',
     ["store.backend = 'sqlite' cannot be combined with cluster.redis_url: every node must share one "
      'store (use "redis" or leave it unset) @ config']),
    ("redis_without_url", '[store]\nbackend = "redis"', ['store.backend = "redis" needs cluster.redis_url @ config']),
    ("workers_without_cluster", "[server]\nworkers = 2",
     ["server.workers > 1 needs cluster.redis_url (workers route through Redis) @ config"]),
    ("ttl_zero", "[cluster]\npresence_ttl_s = 0", ["must be > 0, got 0.0 @ config.cluster.presence_ttl_s"]),
    ("rooms_per_conn_zero", "[rooms]\nmax_rooms_per_connection = 0",
     ["must be > 0, got 0 @ config.rooms.max_rooms_per_connection"]),
    # a scalar or array where a table belongs
    ("server_str", 'server = "x"', ["expected a table @ config.server"]),
    ("server_list", "server = [1]", ["expected a table @ config.server"]),
    ("auth_array_of_tables", "[[auth]]\nmode = \"jwt\"", ["expected a table @ config.auth"]),
    ("server_int", "server = 5", ["expected a table @ config.server"]),
]


BAD = [b if hasattr(b, "marks") else pytest.param(*b, id=b[0]) for b in BAD]


@pytest.mark.parametrize(("name", "text", "lines"), BAD)
def test_bad_file_lines(tmp_path, name, text, lines):
    path = tmp_path / f"{name}.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.lines == lines
    assert str(info.value) == "\n".join(lines)


def test_secret_of_32_multibyte_bytes_accepted():
    secret = "é" * 16  # 16 characters, 32 bytes
    assert structure_config({"auth": {"secret": secret}}).auth.secret == secret


def test_invalid_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[server\nport = 1\n")
    try:
        tomllib.loads("[server\nport = 1\n")
    except tomllib.TOMLDecodeError as exc:
        reason = str(exc)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.lines == [f"{path} is not valid TOML: {reason}"]


def test_duplicate_key_is_invalid_toml(tmp_path):
    path = tmp_path / "dup.toml"
    path.write_text("[server]\nport = 1\nport = 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.lines) == 1
    assert info.value.lines[0].startswith(f"{path} is not valid TOML: ")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.lines == [f"cannot read {path}: No such file or directory"]


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.lines == [f"cannot read {tmp_path}: Is a directory"]


# -- tidings check-config ------------------------------------------------------------------


def _check_config(path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tidings", "check-config", str(path)],
        capture_output=True, text=True, timeout=60,
    )


def test_check_config_good(tmp_path):
    path = tmp_path / "good.toml"
    path.write_text('[server]\nport = 9000\n[auth]\nmode = "insecure"\n')
    r = _check_config(path)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{path}: ok\n", "")


def test_check_config_bad(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nport = "9000"\n[limits]\nburst = 0\n')
    r = _check_config(path)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.splitlines() == [
        "tidings: expected int, got str '9000' @ config.server.port",
        "tidings: must be > 0, got 0 @ config.limits.burst",
    ]


def test_check_config_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    r = _check_config(path)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"tidings: cannot read {path}: No such file or directory"]


def test_check_config_example():
    r = _check_config(EXAMPLE)
    assert (r.returncode, r.stdout) == (0, f"{EXAMPLE}: ok\n")


# -- config.example.toml ------------------------------------------------------------------


def test_example_loads_to_the_defaults():
    assert load_config(EXAMPLE) == Config()


def test_example_mentions_every_key():
    data = tomllib.loads(EXAMPLE.read_text())
    assert set(data) == {f.name for f in attrs.fields(Config)}
    for section, cls in SECTIONS.items():
        assert set(data[section]) == {f.name for f in attrs.fields(cls)}, section
        for f in attrs.fields(cls):
            assert data[section][f.name] == DEFAULTS[section][f.name] == _default(f), f"{section}.{f.name}"
            assert type(data[section][f.name]) is type(_default(f)), f"{section}.{f.name}"


def test_example_comments_every_key():
    lines = EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith("#"):
            assert lines[i - 1].lstrip().startswith("#"), f"no comment above {line!r}"
