"""Unit tests: reload planning, the key ring, sd_notify framing, socket activation parsing,
the demo's HTTP answers and TLS config errors (no daemon subprocess here)."""

from __future__ import annotations

import os
import socket
import ssl
import tempfile
import types

import attrs
import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidings.server import demo
from tidings.service import sdnotify, tls
from tidings.auth import AuthError, Authenticator
from tidings.config import Config, structure_config
from tidings.service.reload import LIVE_KEYS, KeyRing, flatten, plan_reload

S1, S2, S3 = (c * 40 for c in "abc")


def cfg(**sections) -> Config:
    return structure_config(sections)


# -- plan_reload ---------------------------------------------------------------------
def test_no_change_is_empty():
    plan = plan_reload(cfg(), cfg())
    assert plan.changed == () and plan.ignored == ()
    assert plan.effective == cfg()


def test_live_and_restart_keys_are_split_and_restart_keys_keep_old_values():
    old = cfg(server={"port": 1000, "log_level": "info"}, limits={"burst": 5}, auth={"secret": S1})
    new = cfg(server={"port": 2000, "path": "/x", "log_level": "debug"},
              limits={"burst": 7, "max_connections": 3}, auth={"secret": S2, "mode": "insecure"},
              store={"backend": "memory"}, http={"demo": True})
    plan = plan_reload(old, new)
    assert set(plan.changed) == {"server.log_level", "limits.burst", "limits.max_connections",
                                 "auth.secret", "http.demo"}
    assert set(plan.ignored) == {"server.port", "server.path", "auth.mode", "store.backend"}
    eff = plan.effective
    assert (eff.server.port, eff.server.path, eff.auth.mode, eff.store.backend) == (1000, "/ws", "jwt", "")  # "" = the default (sqlite)
    assert (eff.server.log_level, eff.limits.burst, eff.limits.max_connections) == ("debug", 7, 3)
    assert eff.auth.secret == S2 and eff.http.demo is True


def test_state_dir_and_every_store_key_need_a_restart():
    for key in flatten(cfg()):
        if key.startswith("store.") or key in ("server.host", "server.port", "server.path", "server.state_dir"):
            assert key not in LIVE_KEYS, key


def test_turning_tls_on_needs_a_restart_but_replacing_the_cert_is_live():
    on = cfg(server={"tls_cert": "/a.pem", "tls_key": "/a.key"})
    plan = plan_reload(cfg(), on)
    assert set(plan.ignored) == {"server.tls_cert", "server.tls_key"} and plan.changed == ()
    plan = plan_reload(on, cfg(server={"tls_cert": "/b.pem", "tls_key": "/b.key"}))
    assert set(plan.changed) == {"server.tls_cert", "server.tls_key"}
    assert plan.effective.server.tls_cert == "/b.pem"


def test_webhook_url_and_secret_are_live_but_turning_webhooks_on_or_off_is_not():
    on = cfg(webhooks={"url": "http://127.0.0.1:9/a", "secret": S1})
    plan = plan_reload(cfg(), on)
    assert set(plan.ignored) == {"webhooks.url", "webhooks.secret"} and plan.changed == ()
    assert plan.effective.webhooks == cfg().webhooks
    moved = cfg(webhooks={"url": "https://hooks.example/b", "secret_file": "/s", "timeout_s": 1,
                          "max_attempts": 3, "events": ["online"], "undelivered_after_s": 5})
    plan = plan_reload(on, moved)
    assert set(plan.changed) == {"webhooks.url", "webhooks.secret", "webhooks.secret_file",
                                 "webhooks.timeout_s", "webhooks.max_attempts"}
    assert set(plan.ignored) == {"webhooks.events", "webhooks.undelivered_after_s"}
    assert plan.effective.webhooks == attrs.evolve(moved.webhooks, events=on.webhooks.events,
                                                   undelivered_after_s=60.0)
    plan = plan_reload(on, cfg())
    assert set(plan.ignored) == {"webhooks.url", "webhooks.secret"} and plan.changed == ()


def test_identity_provider_and_origin_keys_are_live():
    new = cfg(server={"allowed_origins": ["https://app.example.com"]},
              auth={"algorithms": ["RS256", "EdDSA"], "jwks_url": "https://idp.example/jwks", "issuer": "https://idp",
                    "audience": "tidings", "leeway_s": 5, "jwks_refresh_s": 1, "jwks_max_age_s": 2,
                    "jwks_timeout_s": 3, "mode": "insecure"})
    plan = plan_reload(cfg(), new)
    assert set(plan.changed) == {"server.allowed_origins", "auth.algorithms", "auth.jwks_url", "auth.issuer",
                                 "auth.audience", "auth.leeway_s", "auth.jwks_refresh_s", "auth.jwks_max_age_s",
                                 "auth.jwks_timeout_s"}
    assert plan.ignored == ("auth.mode",)
    assert plan.effective.auth == attrs.evolve(new.auth, mode="jwt")
    assert plan.effective.server.allowed_origins == ["https://app.example.com"]
    # and back: from an identity provider to HS256 with a PEM key in between
    pem = cfg(auth={"algorithms": ["HS256", "ES256"], "public_key_file": "/idp.pem"})
    plan = plan_reload(new, pem)
    assert {"auth.algorithms", "auth.public_key_file", "auth.jwks_url"} <= set(plan.changed)
    assert plan.effective.auth.public_key_file == "/idp.pem" and plan.effective.auth.jwks_url == ""


_limits = st.fixed_dictionaries({}, optional={
    "burst": st.integers(1, 500), "max_connections": st.integers(1, 50),
    "slow_consumer": st.sampled_from(["drop", "disconnect"]),
})
_server = st.fixed_dictionaries({}, optional={
    "port": st.integers(0, 65535), "log_level": st.sampled_from(["debug", "info", "warning"]),
    "state_dir": st.sampled_from(["", "/tmp/a", "/tmp/b"]),
})


@given(st.fixed_dictionaries({"server": _server, "limits": _limits}),
       st.fixed_dictionaries({"server": _server, "limits": _limits}))
def test_plan_properties(a, b):
    old, new = cfg(**a), cfg(**b)
    plan = plan_reload(old, new)
    before, after, eff = flatten(old), flatten(new), flatten(plan.effective)
    assert set(plan.changed).isdisjoint(plan.ignored)
    for key in after:
        differs = before[key] != after[key]
        assert differs == (key in plan.changed or key in plan.ignored)
        assert eff[key] == (after[key] if key in LIVE_KEYS else before[key])
    # Reloading the same file again changes nothing live.
    assert plan_reload(plan.effective, new).changed == ()


# -- KeyRing + Authenticator ---------------------------------------------------------
def test_keyring_rotation_and_grace():
    ring = KeyRing(S1.encode())
    assert not ring.rotate(S1.encode(), 0, 10)
    assert ring.rotate(S2.encode(), now=100, grace_s=10)
    assert ring.secrets() == [S2.encode(), S1.encode()] and ring.next_expiry() == 110
    assert ring.rotate(S3.encode(), now=105, grace_s=10)
    assert ring.secrets() == [S3.encode(), S2.encode(), S1.encode()]
    assert ring.expire(109.9) == 0
    assert ring.expire(110) == 1 and ring.secrets() == [S3.encode(), S2.encode()]
    assert ring.expire(115) == 1 and ring.secrets() == [S3.encode()] and ring.next_expiry() is None


def test_keyring_zero_grace_and_rollback():
    ring = KeyRing(b"1" * 32)
    ring.rotate(b"2" * 32, 0, 0)
    assert ring.secrets() == [b"2" * 32]
    ring.rotate(b"3" * 32, 0, 50)
    ring.rotate(b"2" * 32, 1, 50)  # back to a secret still in its grace: no duplicate
    assert ring.secrets() == [b"2" * 32, b"3" * 32]


def test_authenticator_set_secrets_signs_with_first_and_verifies_all():
    auth = Authenticator("jwt", [S1.encode()])
    old_token = auth.mint("alice", 60)
    auth.set_secrets([S2.encode(), S1.encode()])
    new_token = auth.mint("alice", 60)
    assert auth.verify(old_token).user == auth.verify(new_token).user == "alice"
    assert Authenticator("jwt", [S2.encode()]).verify(new_token).user == "alice"
    auth.set_secrets([S2.encode()])
    with pytest.raises(AuthError, match="signature"):
        auth.verify(old_token)


# -- sd_notify / socket activation -------------------------------------------------------
def test_notifier_is_a_noop_without_socket():
    n = sdnotify.Notifier.from_env({})
    assert not n.enabled and n.watchdog_interval is None and n.ready() is False


@pytest.mark.parametrize("abstract", [False, True])
def test_notifier_sends_datagrams(abstract):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"tidings-test-{os.getpid()}-{os.urandom(4).hex()}"
        sock.bind("\0" + name)
        address = "@" + name
    else:
        address = os.path.join(tempfile.mkdtemp(prefix="tn"), "n.sock")
        sock.bind(address)
    sock.settimeout(2)
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}
    n = sdnotify.Notifier.from_env(env)
    assert n.watchdog_interval == pytest.approx(0.1)
    assert n.ready("connections=0 users=0")
    assert sock.recv(4096) == b"READY=1\nSTATUS=connections=0 users=0"
    n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    n.close()
    sock.close()


def test_watchdog_for_another_pid_is_ignored():
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    assert sdnotify.Notifier.from_env(env).watchdog_interval is None


def test_notify_failure_is_swallowed():
    n = sdnotify.Notifier("/nonexistent/dir/sock")
    assert n.notify("READY=1") is False and n.failed == 1


def test_activation_needs_our_pid():
    assert sdnotify.activation_sockets({"LISTEN_PID": "1", "LISTEN_FDS": "1"}) == []
    assert sdnotify.activation_sockets({}) == []


# -- the demo's HTTP answers ---------------------------------------------------------------
def _req(target: bytes, method: bytes = b"GET") -> h11.Request:
    return h11.Request(method=method, target=target, headers=[(b"host", b"x")])


def test_demo_off_answers_nothing():
    assert demo.answer(_req(b"/"), cfg()) is None


def test_demo_serves_page_and_module():
    c = cfg(http={"demo": True}, server={"path": "/chat"}, auth={"mode": "insecure"})
    page = demo.answer(_req(b"/"), c)
    assert page.startswith(b"HTTP/1.1 200 ") and b"text/html" in page
    assert b'content="/chat"' in page and b'content="insecure"' in page
    js = demo.answer(_req(b"/tidings.js?v=1"), c)
    assert b"text/javascript" in js and b"export class TidingsClient" in js
    assert demo.answer(_req(b"/demo.js"), c).startswith(b"HTTP/1.1 200 ")
    assert demo.answer(_req(b"/etc/passwd"), c) is None
    assert demo.answer(_req(b"/", b"POST"), c) is None
    head = demo.answer(_req(b"/", b"HEAD"), c)
    assert head.endswith(b"\r\n\r\n") and b"<html" not in head


# -- TLS config errors ---------------------------------------------------------------------
def test_tls_errors_name_the_file(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    good, other = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    good.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    good.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    other.private_key_pem.write_to_path(str(tmp_path / "other.key"))
    (tmp_path / "junk.pem").write_text("junk")
    ns = lambda c, k: types.SimpleNamespace(tls_cert=str(tmp_path / c), tls_key=str(tmp_path / k))
    assert isinstance(tls.server_context(ns("cert.pem", "key.pem")), ssl.SSLContext)
    assert tls.server_context(types.SimpleNamespace(tls_cert="", tls_key="")) is None
    cases = {
        ("cert.pem", "other.key"): "does not match",
        ("missing.pem", "key.pem"): "server.tls_cert .*missing.pem",
        ("cert.pem", "missing.key"): "server.tls_key .*missing.key",
        ("junk.pem", "key.pem"): "server.tls_cert .*junk.pem: not a PEM certificate",
        ("cert.pem", "junk.pem"): "server.tls_key .*junk.pem",
    }
    for (c, k), pattern in cases.items():
        with pytest.raises(tls.TlsConfigError, match=pattern):
            tls.server_context(ns(c, k))


def test_config_requires_both_tls_keys():
    from tidings.config import ConfigError
    with pytest.raises(ConfigError, match="tls_cert and tls_key"):
        cfg(server={"tls_cert": "/x.pem"})
    assert attrs.has(type(cfg().http))
