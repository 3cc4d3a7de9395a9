"""End-to-end: identity providers and allowed origins, real daemon subprocess, real client.

The identity provider's JWKS endpoint is a threading ``http.server`` on 127.0.0.1 that
serves the JWK Set the test sets (or an error status, or nothing once stopped) and counts
the requests.  Tokens are signed here with RS256 / ES256 keys (tests/test_auth.py makes
them); the daemon fetches the keys, refuses what it must with 401 (403 for an origin)
and logs why.  Every wait is bounded and synchronised on a log line or a reply.
"""

from __future__ import annotations

import http.server
import json
import re
import signal
import subprocess
import sys
import threading
import time

import jwt
import pytest

from conftest import TEST_SECRET, Daemon, default_config, merge_config, write_toml
from test_auth import hs256_with, jwk, pem, private
from tidings.client import HandshakeRefused, open_client

T = 10
ISS, AUD = "https://idp.example", "tidings-e2e"


class JwksServer:
    """A JWKS endpoint at ``url``: serves ``doc`` with ``status``; ``requests`` counts GETs."""

    def __init__(self) -> None:
        self.doc = b'{"keys": []}'
        self.status = 200
        self.requests = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                outer.requests += 1
                body = outer.doc if outer.status == 200 else b"unavailable"
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/.well-known/jwks.json"
        self.running = True

    def serve(self, **members: str) -> None:
        """Serve the keys ``kid=key name`` (names as in test_auth.private)."""
        self.doc = json.dumps({"keys": [jwk(name, kid) for kid, name in members.items()]}).encode()

    def stop(self) -> None:
        if self.running:
            self.running = False
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(10)


@pytest.fixture
def jwks():
    server = JwksServer()
    server.serve(r1="rsa-a", e1="ec-a")
    yield server
    server.stop()


def idp_token(key: str, alg: str, kid: str | None, user: str, **claims) -> str:
    now = int(time.time())
    body = {"sub": user, "iat": now, "exp": now + 600, "iss": ISS, "aud": AUD, **claims}
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, private(key), algorithm=alg, headers={"kid": kid} if kid else None)


async def hello_user(d: Daemon, token: str, **kwargs) -> str:
    async with open_client(d.url, token=token, connect_timeout=T, **kwargs) as c:
        return c.hello["user"]


async def refusal(d: Daemon, token: str, **kwargs) -> tuple[int, str]:
    with pytest.raises(HandshakeRefused) as info:
        async with open_client(d.url, token=token, connect_timeout=T, **kwargs):
            pass
    return info.value.status_code, info.value.reason_text


def rewrite(d: Daemon, **sections) -> int:
    """Merge ``sections`` into the daemon's config file; return the log mark."""
    d.config = merge_config(d.config, sections)
    write_toml(d.config_path, d.config)
    return len(d.logs)


# -- JWKS ------------------------------------------------------------------------------------


async def test_jwks_tokens_accepted_and_bad_ones_refused(start_daemon, jwks, uniq):
    d = start_daemon(auth={"secret": None, "algorithms": ["RS256", "ES256"], "jwks_url": jwks.url,
                          "issuer": ISS, "audience": AUD})
    assert re.search(r"event=jwks_refreshed .*reason=start keys=2 kids=r1,e1", d.log_text())
    alice = uniq("alice")
    assert await hello_user(d, idp_token("rsa-a", "RS256", "r1", alice)) == alice
    assert await hello_user(d, idp_token("ec-a", "ES256", "e1", alice)) == alice
    now = int(time.time())
    cases = [
        (idp_token("rsa-other", "RS256", "nope", alice), "unknown signing key (kid 'nope')"),
        (idp_token("rsa-other", "RS256", "r1", alice), "bad token signature"),
        (idp_token("rsa-a", "RS256", "r1", alice, iss="https://evil.example"), "token issuer is not accepted"),
        (idp_token("rsa-a", "RS256", "r1", alice, aud="someone-else"), "token audience is not accepted"),
        (idp_token("ec-a", "ES256", "e1", alice, exp=now - 60), "token expired"),
        (jwt.encode({"sub": alice, "exp": now + 60, "iss": ISS, "aud": AUD}, None, algorithm="none",
                    headers={"kid": "r1"}), "token algorithm 'none' is not accepted"),
        (hs256_with(pem("rsa-a"), sub=alice, iss=ISS, aud=AUD), "token algorithm 'HS256' is not accepted"),
        (d.token(alice), "token algorithm 'HS256' is not accepted"),  # no HS256 secret here
    ]
    for token, reason in cases:
        assert await refusal(d, token) == (401, reason)
    await d.wait_for_log(r"event=handshake_refused status=401 reason=\"unknown signing key \(kid 'nope'\)\"")
    assert not (d.config_path.parent / "idp1-state" / "secret").exists()  # no HS256: no secret made


async def test_key_rotation_is_picked_up_on_an_unknown_kid(start_daemon, jwks, uniq):
    d = start_daemon(auth={"algorithms": ["HS256", "RS256"], "jwks_url": jwks.url, "jwks_refresh_s": 0.2})
    alice = uniq("alice")
    jwks.serve(r1="rsa-a", r2="rsa-b")  # the IdP publishes a new key and signs with it at once
    rotated = idp_token("rsa-b", "RS256", "r2", alice, iss=None, aud=None)
    mark = len(d.logs)
    assert await refusal(d, rotated) == (401, "unknown signing key (kid 'r2')")
    await d.wait_for_log(r"event=jwks_refreshed .*reason=unknown_kid keys=2 kids=r1,r2", start=mark)
    assert await hello_user(d, rotated) == alice
    assert await hello_user(d, d.token(alice)) == alice  # HS256 keeps working next to the IdP
    assert jwks.requests == 2


async def test_unknown_kids_are_rate_limited_and_a_reload_refetches(start_daemon, jwks, uniq):
    d = start_daemon(auth={"algorithms": ["HS256", "RS256"], "jwks_url": jwks.url, "jwks_refresh_s": 3600})
    alice = uniq("alice")
    jwks.serve(r1="rsa-a", r2="rsa-b")
    rotated = idp_token("rsa-b", "RS256", "r2", alice, iss=None, aud=None)
    for _ in range(5):
        assert await refusal(d, rotated) == (401, "unknown signing key (kid 'r2')")
    assert jwks.requests == 1  # only the start: the next fetch waits for jwks_refresh_s
    mark = len(d.logs)
    d.send_signal(signal.SIGHUP)
    await d.wait_for_log(r"event=jwks_refreshed .*reason=reload keys=2", start=mark)
    assert await hello_user(d, rotated) == alice
    assert jwks.requests == 2


async def test_cached_keys_outlive_the_jwks_endpoint(start_daemon, jwks, uniq):
    d = start_daemon(auth={"algorithms": ["HS256", "RS256"], "jwks_url": jwks.url, "jwks_refresh_s": 0.2,
                          "jwks_timeout_s": 2.0})
    alice, bob = uniq("alice"), uniq("bob")
    async with open_client(d.url, token=idp_token("rsa-a", "RS256", "r1", alice, iss=None, aud=None)) as a:
        jwks.stop()
        mark = len(d.logs)
        unknown = idp_token("rsa-b", "RS256", "r9", bob, iss=None, aud=None)
        assert await refusal(d, unknown) == (401, "unknown signing key (kid 'r9')")
        failed = await d.wait_for_log(r"event=jwks_fetch_failed", start=mark)
        assert "reason=unknown_kid" in failed and "cached_keys=1" in failed and "Connection refused" in failed
        # A new connection with a cached key, and the open one, both still work.
        async with open_client(d.url, token=idp_token("rsa-a", "RS256", "r1", bob, iss=None, aud=None)) as b:
            assert (await b.send(alice, {"text": "still here"}))["type"] == "ack"
            assert (await a.receive_message(timeout=T))["body"] == {"text": "still here"}


async def test_an_idp_down_at_start_does_not_stop_the_daemon(start_daemon, jwks, uniq):
    jwks.status = 503
    d = start_daemon(auth={"algorithms": ["HS256", "RS256"], "jwks_url": jwks.url, "jwks_refresh_s": 0.2})
    assert re.search(r"event=jwks_fetch_failed .*error=\"HTTP Error 503: Service Unavailable\" .*reason=start",
                     d.log_text())
    alice = uniq("alice")
    token = idp_token("rsa-a", "RS256", "r1", alice, iss=None, aud=None)
    assert await hello_user(d, d.token(alice)) == alice  # HS256 is served meanwhile
    jwks.status = 200
    mark = len(d.logs)
    await d.wait_for_log(r"event=jwks_refreshed .*reason=retry", start=mark)
    assert await hello_user(d, token) == alice


# -- PEM -------------------------------------------------------------------------------------


async def test_pem_keys_rs256_then_es256_after_a_reload(start_daemon, tmp_path, uniq):
    key_file = tmp_path / "idp.pem"
    key_file.write_bytes(pem("rsa-a"))
    d = start_daemon(auth={"algorithms": ["HS256", "RS256", "ES256"], "public_key_file": str(key_file),
                          "issuer": ISS, "audience": AUD})
    alice = uniq("alice")
    rs256 = idp_token("rsa-a", "RS256", None, alice)
    es256 = idp_token("ec-a", "ES256", "any-kid", alice)
    assert await hello_user(d, rs256) == alice
    assert await hello_user(d, idp_token("rsa-a", "RS256", "whatever", alice)) == alice  # kid not consulted
    assert await hello_user(d, d.token(alice)) == alice
    assert await refusal(d, es256) == (401, "no ES256 key is configured")
    assert await refusal(d, hs256_with(pem("rsa-a"), sub=alice)) == (401, "bad token signature")
    assert await refusal(d, idp_token("rsa-a", "RS256", None, alice, aud="x")) == (401, "token audience is not accepted")
    # Same path, new content: the reload reads it.
    key_file.write_bytes(pem("ec-a"))
    mark = len(d.logs)
    d.send_signal(signal.SIGHUP)
    await d.wait_for_log(r"event=reloaded changed=auth.public_key_file\b", start=mark)
    assert await hello_user(d, es256) == alice
    assert await refusal(d, rs256) == (401, "no RS256 key is configured")
    # An unusable key file is refused by the reload; the running keys stay.
    key_file.write_bytes(b"not a key")
    mark = len(d.logs)
    d.send_signal(signal.SIGHUP)
    failed = await d.wait_for_log(r"event=reload_failed", start=mark)
    assert "not a PEM public key or certificate" in failed
    assert await hello_user(d, es256) == alice


def test_an_unusable_key_file_stops_the_start(tmp_path):
    path = write_toml(tmp_path / "t.toml", merge_config(default_config(tmp_path / "state"), {
        "auth": {"algorithms": ["HS256", "RS256"], "public_key_file": str(tmp_path / "missing.pem")}}))
    r = subprocess.run([sys.executable, "-m", "tidings", "serve", "--config", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert (f"tidings: cannot start: cannot load the public keys: auth.public_key_file "
            f"{tmp_path / 'missing.pem'}: No such file or directory\n") in r.stderr


# -- allowed origins -------------------------------------------------------------------------


async def test_allowed_origins_and_their_reload(start_daemon, uniq):
    d = start_daemon(server={"allowed_origins": ["https://app.example.com", "http://localhost:*"]})
    alice = uniq("alice")
    token = d.token(alice)
    evil, app = {"Origin": "https://evil.example"}, {"Origin": "https://app.example.com"}
    assert await refusal(d, token, headers=evil) == (403, "origin not allowed: https://evil.example")
    assert await refusal(d, "not-a-token", headers=evil) == (403, "origin not allowed: https://evil.example")
    assert await hello_user(d, token, headers=app) == alice
    assert await hello_user(d, token, headers={"Origin": "http://localhost:5173"}) == alice
    assert await hello_user(d, token) == alice  # no Origin: not a browser, not refused
    await d.wait_for_log(r'event=handshake_refused status=403 reason="origin not allowed: https://evil.example"')
    mark = rewrite(d, server={"allowed_origins": ["https://evil.example"]})
    d.send_signal(signal.SIGHUP)
    await d.wait_for_log(r"event=reloaded changed=server.allowed_origins\b", start=mark)
    assert await hello_user(d, token, headers=evil) == alice
    assert await refusal(d, token, headers=app) == (403, "origin not allowed: https://app.example.com")
    mark = rewrite(d, server={"allowed_origins": []})
    d.send_signal(signal.SIGHUP)
    await d.wait_for_log(r"event=reloaded changed=server.allowed_origins\b", start=mark)
    assert await hello_user(d, token, headers=app) == alice
    assert TEST_SECRET not in d.log_text()
