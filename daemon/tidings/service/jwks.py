"""The identity provider's JWK Set, kept fresh without ever blocking a handshake.

``JwksRefresher(auth, config)`` owns the key set named by ``auth.jwks_url`` (fetched over
HTTP(S)) or ``auth.jwks_file`` (re-read from disk), and after each good fetch hands the
``Authenticator`` a new immutable ``KeySet``.  Started with ``await nursery.start(r.run)``:
it fetches once first (bounded by ``jwks_timeout_s``; a failure is logged and the daemon
starts anyway), reports started, then fetches again:

* when the set is ``jwks_max_age_s`` old (background: picks up added and removed keys);
* on an unknown ``kid`` (``request``, wired to ``Authenticator.on_unknown_key``): at once
  if the previous fetch began ``jwks_refresh_s`` ago or more, else when it has - so at
  most one fetch per ``jwks_refresh_s`` however many tokens name unknown keys;
* after a failed fetch, every ``jwks_refresh_s`` until one succeeds;
* on ``configure(config)`` (SIGHUP): at once.

The token that named the unknown key has already been refused with 401 (a handshake
never waits for the network); a client retrying after the fetch gets in.  A failed fetch
(endpoint down, timeout, HTTP error, not a JWK Set, no usable key) keeps the cached keys,
so connections whose keys are cached are not affected; it is logged at most once a
minute per distinct error (``event=jwks_fetch_failed``).  The HTTP GET is urllib's, run
in a worker thread under ``trio.fail_after(jwks_timeout_s)`` and abandoned on timeout
(its socket has the same timeout), never on the event loop.  Cancelling ``run`` cancels
a fetch in progress; the key set stays as it was.
"""

from __future__ import annotations

import http.client
import math
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from tidings import __version__, log
from tidings.auth import Authenticator, KeyMaterialError, parse_jwks
from tidings.config import AuthConfig

__all__ = ["MAX_JWKS_BYTES", "JwksRefresher", "http_get"]

#: A JWK Set larger than this is refused (a real one is a few KiB).
MAX_JWKS_BYTES = 1 << 20

Fetch = Callable[[str], Awaitable[bytes]]


def http_get(url: str, timeout_s: float, max_bytes: int = MAX_JWKS_BYTES) -> bytes:
    """GET ``url`` (blocking: call it from a worker thread); the body, at most ``max_bytes``.

    Raises OSError (connection, timeout, HTTP status >= 400), http.client.HTTPException
    (a broken response) or KeyMaterialError (too large)."""
    request = urllib.request.Request(url, headers={
        "Accept": "application/jwk-set+json, application/json",
        "User-Agent": f"tidings/{__version__}",
    })
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        body = response.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise KeyMaterialError(f"the response is larger than {max_bytes} bytes")
    return body


def _describe(exc: Exception, timeout_s: float) -> str:
    if isinstance(exc, trio.TooSlowError):
        return f"no answer within {timeout_s} s"
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return str(exc.reason)  # "[Errno 111] Connection refused", not "<urlopen error ...>"
    return str(exc)


def _source(config: AuthConfig) -> tuple[str, str]:
    """(kind, location): ("url", ...), ("file", ...) or ("", "") for no JWK Set."""
    if config.jwks_url:
        return "url", config.jwks_url
    if config.jwks_file:
        return "file", config.jwks_file
    return "", ""


class JwksRefresher:
    """Fetches the JWK Set when it is due (see the module docstring); one fetch at a time.

    ``fetch(location) -> bytes`` replaces the HTTP GET / file read (tests); the
    refresher bounds it with ``jwks_timeout_s`` either way.
    """

    def __init__(self, auth: Authenticator, config: AuthConfig, *, fetch: Fetch | None = None) -> None:
        self._auth = auth
        self._config = config
        self._kind, self._location = _source(config)
        self._fetch = fetch or self._fetch_source
        self._threads = trio.CapacityLimiter(2)  # abandoned fetches never starve the store's threads
        self._errors = log.LogOnce(interval=60.0)
        self._wake = trio.Event()
        self._last_attempt: float | None = None  # trio.current_time() a fetch began
        self._last_success: float | None = None
        self._failed = False
        self._early: str | None = None  # why to fetch before max age: "unknown_kid", "reload"
        #: Fetches begun and failed (for tests and the curious).
        self.fetches = 0
        self.failures = 0

    # -- called from handshakes and the reload ------------------------------------------

    def request(self, kid: str | None) -> None:
        """A token named a key we lack: fetch as soon as ``jwks_refresh_s`` allows.
        Synchronous and non-blocking (it runs inside a handshake)."""
        if self._kind and self._early is None:
            self._early = "unknown_kid"
            self._wake.set()

    def configure(self, config: AuthConfig) -> None:
        """Take a reloaded ``[auth]`` section and fetch at once (a new source, or the
        operator asking for fresh keys).  The caller decides which keys to keep meanwhile."""
        source = _source(config)
        if source != (self._kind, self._location):
            self._last_attempt = self._last_success = None
            self._failed = False
        self._config = config
        self._kind, self._location = source
        self._early = "reload"
        self._wake.set()

    def due(self) -> float:
        """When the next fetch should begin (trio clock); inf = nothing to fetch."""
        if not self._kind:
            return math.inf
        if self._last_attempt is None or self._early == "reload":
            return -math.inf
        if self._failed or self._early is not None:
            return self._last_attempt + self._config.jwks_refresh_s
        assert self._last_success is not None
        return self._last_success + self._config.jwks_max_age_s

    # -- the task ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._kind:
            await self._refresh()
        task_status.started()
        while True:
            self._wake = trio.Event()
            due = self.due()
            if trio.current_time() < due:
                with trio.move_on_at(due):
                    await self._wake.wait()
                continue
            await self._refresh()

    def _reason(self) -> str:
        if self._last_attempt is None:
            return "start"
        if self._early is not None:
            return self._early
        return "retry" if self._failed else "max_age"

    async def _refresh(self) -> None:
        reason, config, kind, location = self._reason(), self._config, self._kind, self._location
        source = f"auth.jwks_{kind} {location}"
        self._early = None
        self._last_attempt = trio.current_time()
        self.fetches += 1
        try:
            with trio.fail_after(config.jwks_timeout_s):
                data = await self._fetch(location)
            keys = parse_jwks(data, config.algorithms, source)
        except (OSError, http.client.HTTPException, KeyMaterialError, trio.TooSlowError) as exc:
            self.failures += 1
            if (kind, location) != (self._kind, self._location):
                return  # reconfigured meanwhile: this source no longer matters
            self._failed = True
            error = _describe(exc, config.jwks_timeout_s).removeprefix(f"{source}: ")
            self._errors.log("warning", "jwks_fetch_failed", key=error, source=source, error=error,
                             reason=reason, cached_keys=len(self._auth.keys.keys),
                             retry_in_s=config.jwks_refresh_s)
            return
        if (kind, location) != (self._kind, self._location):
            return
        self._failed = False
        self._last_success = self._last_attempt
        self._auth.set_keys(keys)
        log.log("info", "jwks_refreshed", source=source, reason=reason, keys=len(keys.keys),
                kids=",".join(keys.kids()), skipped="; ".join(keys.skipped) or None)

    async def _fetch_source(self, location: str) -> bytes:
        if self._kind == "file":
            path = Path(location).expanduser()
            return await trio.to_thread.run_sync(path.read_bytes, abandon_on_cancel=True,
                                                 limiter=self._threads)
        return await trio.to_thread.run_sync(http_get, location, self._config.jwks_timeout_s,
                                             abandon_on_cancel=True, limiter=self._threads)
