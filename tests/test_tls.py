"""End-to-end: wss:// with server.tls_cert / server.tls_key on the real daemon subprocess.

Certificates come from ``trustme`` (a throwaway CA; in the test extras).
"""

from __future__ import annotations

import signal
import ssl
import subprocess
import sys

import pytest
import trio

from conftest import missing_requirement, write_toml
from tidings.client import open_client

try:
    import trustme
except ImportError:  # pragma: no cover - exercised only where trustme is absent
    trustme = None

T = 10


def _write_cert(ca, directory, stem: str):
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_path), append=True)
    cert.private_key_pem.write_to_path(str(key_path))
    return str(cert_path), str(key_path)


@pytest.fixture
def pki(tmp_path):
    if trustme is None:
        missing_requirement("trustme is not installed (pip install -e '.[test]')")
    ca = trustme.CA()
    cert, key = _write_cert(ca, tmp_path, "server")
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return {"ca": ca, "cert": cert, "key": key, "client": client_ctx, "dir": tmp_path}


def wss_url(d) -> str:
    return f"wss://127.0.0.1:{d.port}/ws"


async def test_wss_chat_with_a_trusted_ca(start_daemon, pki, uniq):
    d = start_daemon(server={"tls_cert": pki["cert"], "tls_key": pki["key"]})
    assert f"url=wss://127.0.0.1:{d.port}/ws" in d.wait_for_log_sync("event=listening")
    alice, bob = uniq("alice"), uniq("bob")
    async with open_client(wss_url(d), token=d.token(alice), ssl_context=pki["client"]) as a, \
            open_client(wss_url(d), token=d.token(bob), ssl_context=pki["client"]) as b:
        ack = await a.send(bob, {"text": "over TLS"})
        assert ack["delivered"] == 1
        assert (await b.receive_message(timeout=T))["body"] == {"text": "over TLS"}
        await b.send(alice, "back")
        assert (await a.receive_message(timeout=T))["body"] == "back"


async def test_failed_or_stalled_handshakes_do_not_affect_others(start_daemon, pki, uniq):
    d = start_daemon(server={"tls_cert": pki["cert"], "tls_key": pki["key"],
                             "handshake_timeout_s": 1.0})
    alice = uniq("alice")
    async with open_client(wss_url(d), token=d.token(alice), ssl_context=pki["client"]) as a:
        # A client that does not trust our CA fails its own handshake, at once.  (Raw TLS:
        # trio-websocket 0.12 turns that failure into its connect timeout instead.)
        with trio.fail_after(5):
            untrusting = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", d.port, ssl_context=ssl.create_default_context())
            with pytest.raises(trio.BrokenResourceError) as failed:
                await untrusting.do_handshake()
        assert isinstance(failed.value.__cause__, ssl.SSLCertVerificationError)
        await trio.aclose_forcefully(untrusting)
        # Plain ws:// against the TLS port: refused, nothing else disturbed.
        with pytest.raises(Exception):
            async with open_client(f"ws://127.0.0.1:{d.port}/ws", token=d.token(alice),
                                   connect_timeout=2):
                pass
        # A peer that connects and never starts TLS is dropped within the handshake bound.
        stalled = await trio.open_tcp_stream("127.0.0.1", d.port)
        start = trio.current_time()
        with trio.fail_after(5):
            while await stalled.receive_some(4096):
                pass  # ignore whatever arrives; wait for EOF
        elapsed = trio.current_time() - start
        assert elapsed < 3.5, elapsed  # handshake_timeout_s + at most 1 s to give up
        await stalled.aclose()
        # Meanwhile the established client is unaffected.
        assert (await a.ping(timeout=T))["type"] == "pong"
        ack = await a.send(alice, "still here")
        assert ack["type"] == "ack"


def _serve_once(tmp_path, server: dict) -> subprocess.CompletedProcess:
    cfg = tmp_path / "bad.toml"
    write_toml(cfg, {"server": {"port": 0, "state_dir": str(tmp_path / "state"), **server},
                     "auth": {"secret": "s" * 40}, "store": {"backend": "memory"}})
    return subprocess.run([sys.executable, "-m", "tidings", "serve", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=30)


def test_mismatched_key_fails_at_start_naming_the_file(pki, tmp_path):
    other_cert, other_key = _write_cert(pki["ca"], tmp_path, "other")
    r = _serve_once(tmp_path, {"tls_cert": pki["cert"], "tls_key": other_key})
    assert r.returncode == 1, r.stderr
    assert f"server.tls_key {other_key} does not match" in r.stderr
    assert pki["cert"] in r.stderr
    assert "event=listening" not in r.stderr


def test_missing_cert_file_fails_at_start_naming_it(pki, tmp_path):
    missing = str(tmp_path / "nope.pem")
    r = _serve_once(tmp_path, {"tls_cert": missing, "tls_key": pki["key"]})
    assert r.returncode == 1
    assert f"server.tls_cert {missing}: No such file or directory" in r.stderr


async def test_certificate_replaced_on_sighup(start_daemon, pki, uniq):
    d = start_daemon(server={"tls_cert": pki["cert"], "tls_key": pki["key"]})
    ca2 = trustme.CA()
    cert2, key2 = _write_cert(ca2, pki["dir"], "renewed")
    trusts_ca2 = ssl.create_default_context()
    ca2.configure_trust(trusts_ca2)
    d.config["server"].update(tls_cert=cert2, tls_key=key2)
    write_toml(d.config_path, d.config)
    mark = len(d.logs)
    d.send_signal(signal.SIGHUP)
    line = await d.wait_for_log(r"event=reloaded", start=mark)
    assert "server.tls_cert" in line and "server.tls_key" in line
    async with open_client(wss_url(d), token=d.token(uniq("a")), ssl_context=trusts_ca2):
        pass
    # A client trusting only the old CA now fails the TLS handshake.
    with trio.fail_after(5):
        stale = await trio.open_ssl_over_tcp_stream("127.0.0.1", d.port, ssl_context=pki["client"])
        with pytest.raises(trio.BrokenResourceError):
            await stale.do_handshake()
    await trio.aclose_forcefully(stale)
