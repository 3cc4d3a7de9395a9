"""service/jwks.py: when the JWK Set is fetched (start, unknown kid rate-limited by
jwks_refresh_s, max age, retries, reload), what a failed fetch keeps, the fetch bound;
and http_get against a real HTTP server on 127.0.0.1.

The schedule tests run on trio's MockClock (autojump) with an in-memory identity
provider standing in for the transport; the real HTTP path is http_get's tests here and
tests/test_e2e_auth.py against the daemon.
"""

from __future__ import annotations

import http.server
import socket
import threading
import urllib.error
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from test_auth import ISS, jwk, jwks_doc, signed
from tidings.auth import Authenticator, KeyMaterialError, KeySet, UnknownKey
from tidings.config import structure_config
from tidings.service.jwks import JwksRefresher, http_get

URL = "https://idp.example/jwks"
REFRESH, MAX_AGE, TIMEOUT = 10.0, 100.0, 2.0


def auth_config(**keys):
    base = {"algorithms": ["RS256"], "jwks_url": URL, "jwks_refresh_s": REFRESH, "jwks_max_age_s": MAX_AGE,
            "jwks_timeout_s": TIMEOUT, "issuer": ISS}
    return structure_config({"auth": {**base, **keys}}).auth


class IdP:
    """The fetch function: answers ``docs[location]`` after ``delay`` seconds, or raises
    ConnectionRefusedError while ``down``; records the (trio) time of every fetch."""

    def __init__(self) -> None:
        self.docs = {URL: jwks_doc(jwk("rsa-a", "a"))}
        self.times: list[float] = []
        self.locations: list[str] = []
        self.down = False
        self.delay = 0.0

    async def __call__(self, location: str) -> bytes:
        self.times.append(trio.current_time())
        self.locations.append(location)
        await trio.sleep(self.delay)
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")
        return self.docs[location]


@asynccontextmanager
async def running(idp: IdP, config=None, keys: KeySet = KeySet()):
    config = config or auth_config()
    auth = Authenticator.from_config(config, [], keys)
    refresher = JwksRefresher(auth, config, fetch=idp)
    auth.on_unknown_key = refresher.request
    async with trio.open_nursery() as nursery:
        await nursery.start(refresher.run)
        yield auth, refresher
        nursery.cancel_scope.cancel()


async def at(t: float) -> None:
    """Let the mock clock reach ``t`` and every task run to its next wait."""
    await trio.sleep_until(t)
    await trio.testing.wait_all_tasks_blocked()


def refused(auth: Authenticator, token: str) -> bool:
    try:
        auth.verify(token)
    except UnknownKey:
        return True
    return False


async def test_first_fetch_happens_before_started(autojump_clock):
    idp = IdP()
    t0 = trio.current_time()
    async with running(idp) as (auth, refresher):
        assert idp.times == [t0] and auth.keys.kids() == ["a"]
        assert auth.verify(signed("rsa-a", "RS256", kid="a", aud=None)).user == "alice"
        assert refresher.due() == t0 + MAX_AGE


async def test_unknown_kid_refetches_at_most_once_per_refresh_s(autojump_clock):
    idp = IdP()
    t0 = trio.current_time()
    async with running(idp) as (auth, refresher):
        idp.docs[URL] = jwks_doc(jwk("rsa-a", "a"), jwk("rsa-b", "b"))  # the IdP rotates
        new = signed("rsa-b", "RS256", kid="b", aud=None)
        await at(t0 + 4)
        for _ in range(5):  # five handshakes with the new key: refused now, one fetch later
            assert refused(auth, new)
        await at(t0 + REFRESH - 0.001)
        assert idp.times == [t0]
        await at(t0 + REFRESH)
        assert idp.times == [t0, t0 + REFRESH]
        assert auth.verify(new).user == "alice"
        # Another unknown kid right after: waits a whole refresh_s again.
        assert refused(auth, signed("rsa-b", "RS256", kid="c", aud=None))
        await at(t0 + 2 * REFRESH - 0.001)
        assert len(idp.times) == 2
        await at(t0 + 2 * REFRESH)
        assert idp.times[2] == t0 + 2 * REFRESH
        # A long quiet time later, an unknown kid is fetched at once.
        await at(t0 + 50)
        assert refused(auth, signed("rsa-b", "RS256", kid="d", aud=None))
        await trio.testing.wait_all_tasks_blocked()
        assert idp.times[3] == t0 + 50


async def test_background_refetch_at_max_age_drops_removed_keys(autojump_clock):
    idp = IdP()
    t0 = trio.current_time()
    async with running(idp) as (auth, _):
        idp.docs[URL] = jwks_doc(jwk("rsa-b", "b"))  # "a" revoked at the IdP
        await at(t0 + MAX_AGE - 0.001)
        assert auth.keys.kids() == ["a"] and len(idp.times) == 1
        await at(t0 + MAX_AGE)
        assert auth.keys.kids() == ["b"] and idp.times[1] == t0 + MAX_AGE
        await at(t0 + 2 * MAX_AGE)
        assert idp.times[2] == t0 + 2 * MAX_AGE


async def test_failed_fetch_keeps_the_cached_keys_and_retries_every_refresh_s(autojump_clock):
    idp = IdP()
    t0 = trio.current_time()
    async with running(idp) as (auth, refresher):
        idp.down = True
        known = signed("rsa-a", "RS256", kid="a", aud=None)
        assert refused(auth, signed("rsa-a", "RS256", kid="zz", aud=None))
        await at(t0 + REFRESH)
        assert refresher.failures == 1
        assert auth.verify(known).user == "alice"  # cached: still accepted
        await at(t0 + 3 * REFRESH)
        assert idp.times == [t0, t0 + REFRESH, t0 + 2 * REFRESH, t0 + 3 * REFRESH]
        idp.down = False
        await at(t0 + 4 * REFRESH)
        assert refresher.failures == 3 and refresher.fetches == 5
        assert refresher.due() == t0 + 4 * REFRESH + MAX_AGE  # back to the background pace
        assert auth.verify(known).user == "alice"


async def test_idp_down_at_start_does_not_stop_the_start(autojump_clock):
    idp = IdP()
    idp.down = True
    t0 = trio.current_time()
    async with running(idp) as (auth, refresher):
        assert auth.keys == KeySet() and refresher.failures == 1
        idp.down = False
        await at(t0 + REFRESH)
        assert auth.keys.kids() == ["a"]


@pytest.mark.parametrize(("delay", "ok"), [(TIMEOUT - 0.001, True), (TIMEOUT + 0.001, False)])
async def test_a_fetch_is_bounded_by_jwks_timeout_s(autojump_clock, delay, ok):
    idp = IdP()
    idp.delay = delay
    t0 = trio.current_time()
    async with running(idp) as (auth, refresher):
        assert trio.current_time() == pytest.approx(t0 + min(delay, TIMEOUT))
        assert (auth.keys.kids() == ["a"]) is ok and refresher.failures == (0 if ok else 1)


@pytest.mark.parametrize("doc", [b"<html>not json</html>", b'{"keys": []}', b'{"keys": [{"kty": "oct", "k": "eA"}]}'])
async def test_a_bad_document_is_a_failed_fetch(autojump_clock, doc):
    idp = IdP()
    t0 = trio.current_time()
    async with running(idp) as (auth, refresher):
        idp.docs[URL] = doc
        refresher.configure(auth_config())
        await at(t0 + 1)
        assert refresher.failures == 1 and auth.keys.kids() == ["a"]


async def test_reload_fetches_at_once_and_a_new_url_starts_afresh(autojump_clock):
    idp = IdP()
    other = "https://other.example/jwks"
    idp.docs[other] = jwks_doc(jwk("ec-a", "e"))
    t0 = trio.current_time()
    async with running(idp) as (auth, refresher):
        await at(t0 + 1)
        refresher.configure(auth_config())  # same URL, within refresh_s: still at once
        await at(t0 + 1)
        assert idp.times == [t0, t0 + 1]
        refresher.configure(auth_config(jwks_url=other, algorithms=["ES256"]))
        await at(t0 + 1)
        assert idp.locations[-1] == other and auth.keys.kids() == ["e"]


async def test_a_fetch_overtaken_by_a_reload_is_discarded(autojump_clock):
    idp = IdP()
    other = "https://other.example/jwks"
    idp.docs[other] = jwks_doc(jwk("rsa-b", "b"))
    t0 = trio.current_time()
    async with running(idp) as (auth, refresher):
        idp.delay = 1.0
        refresher.configure(auth_config())  # a fetch of URL begins ...
        await at(t0 + 0.5)
        idp.docs[URL] = jwks_doc(jwk("rsa-a", "stale"))
        refresher.configure(auth_config(jwks_url=other))  # ... and the source changes under it
        await at(t0 + 1.5)  # the first fetch has ended: its keys were not taken
        assert idp.locations == [URL, URL, other] and auth.keys.kids() == ["a"]
        await at(t0 + 3)
        assert idp.locations == [URL, URL, other]
        assert auth.keys.kids() == ["b"]


async def test_no_jwks_source_means_no_fetch(autojump_clock):
    idp = IdP()
    config = structure_config({"auth": {"algorithms": ["RS256"], "public_key_file": "/idp.pem"}}).auth
    async with running(idp, config) as (_, refresher):
        refresher.request("x")
        await at(trio.current_time() + 10 * MAX_AGE)
        assert idp.times == [] and refresher.due() == float("inf")


async def test_jwks_file_is_reread_on_reload(tmp_path):
    """The real file fetch (a worker thread), on the real clock."""
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks_doc(jwk("rsa-a", "a")))
    config = structure_config({"auth": {"algorithms": ["RS256"], "jwks_file": str(path)}}).auth
    auth = Authenticator.from_config(config, [])
    refresher = JwksRefresher(auth, config)
    async with trio.open_nursery() as nursery:
        await nursery.start(refresher.run)
        assert auth.keys.kids() == ["a"]
        path.write_bytes(jwks_doc(jwk("rsa-a", "a"), jwk("rsa-b", "b")))
        refresher.configure(config)
        with trio.fail_after(10):
            while refresher.fetches < 2 or auth.keys.kids() != ["a", "b"]:
                await trio.sleep(0.01)
        path.unlink()
        refresher.configure(config)
        with trio.fail_after(10):
            while refresher.failures < 1:
                await trio.sleep(0.01)
        assert auth.keys.kids() == ["a", "b"]  # kept
        nursery.cancel_scope.cancel()


# -- http_get -------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path != "/jwks.json":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def web():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Handler
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.mark.parametrize(("size", "ok"), [(100, True), (101, False)])
def test_http_get_bounds_the_body(web, size, ok):
    base, handler = web
    handler.body = b"x" * size
    if ok:
        assert http_get(base + "/jwks.json", 5, max_bytes=100) == b"x" * 100
    else:
        with pytest.raises(KeyMaterialError, match="^the response is larger than 100 bytes$"):
            http_get(base + "/jwks.json", 5, max_bytes=100)


def test_http_get_errors_are_oserrors(web):
    base, _ = web
    with pytest.raises(urllib.error.HTTPError) as info:
        http_get(base + "/missing", 5)
    assert info.value.code == 404 and isinstance(info.value, OSError)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(OSError, match="Connection refused"):
        http_get(f"http://127.0.0.1:{port}/jwks.json", 5)


def test_http_get_times_out_on_a_silent_server():
    with socket.socket() as silent:  # accepts (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        with pytest.raises(OSError, match="timed out"):
            http_get(f"http://127.0.0.1:{silent.getsockname()[1]}/jwks.json", 0.2)
