"""Shared test harness: run the real daemon as a subprocess.

Fixtures
  start_daemon  factory: ``start_daemon(config=None, **sections) -> Daemon``. ``config``
                is a ``{section: {key: value}}`` dict merged over the test defaults;
                each keyword is a section dict merged the same way, e.g.
                ``start_daemon(limits={"outbound_queue": 8})``. Blocks (<= 15 s) until the
                daemon logs ``event=listening``; usable from sync and trio tests.
                Every daemon is SIGKILLed at teardown and its log printed (pytest shows
                it for failing tests); a crash line in its log (CRASH_RE) makes the test
                ERROR at teardown unless ``daemon.allow_crashes = True``.
  daemon        one default daemon (``start_daemon()``).
  uniq          ``uniq("alice") -> "alice-3f2a1c"``: user ids unique per test, so stored
                messages of one test never replay into another.
Helpers
  require_binary(name, reason) -> path: skip when missing, fail when
                TIDINGS_REQUIRE_ALL=1 (CI).
  write_toml(path, dict): tiny TOML writer for the flat 2-level config dict.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio

TEST_SECRET = "test-secret-0123456789abcdef0123456789abcdef"
TEST_API_KEY = "test-api-key-0123456789"
START_TIMEOUT = 15.0
REQUIRE_ALL = os.environ.get("TIDINGS_REQUIRE_ALL") == "1"
# log lines that make a test ERROR at teardown (set ``daemon.allow_crashes = True`` to opt out)
CRASH_RE = re.compile(r"event=connection_crashed|event=crash|Traceback \(most recent")


def require_binary(name: str, reason: str = "") -> str:
    """Path of executable ``name``; skip (or fail under TIDINGS_REQUIRE_ALL=1) if absent."""
    path = shutil.which(name)
    if path:
        return path
    msg = f"required binary {name!r} not found on PATH" + (f": {reason}" if reason else "")
    if REQUIRE_ALL:
        pytest.fail(msg + " (TIDINGS_REQUIRE_ALL=1 turns this skip into a failure)",
                    pytrace=False)
    pytest.skip(msg)


def missing_requirement(msg: str) -> None:
    """Skip with ``msg``, or fail when TIDINGS_REQUIRE_ALL=1."""
    if REQUIRE_ALL:
        pytest.fail(msg + " (TIDINGS_REQUIRE_ALL=1)", pytrace=False)
    pytest.skip(msg)


# -- TOML ------------------------------------------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # JSON string escapes are valid TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(config: dict[str, Any]) -> str:
    top = [f"{k} = {_toml_value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    out = top + ([""] if top else [])
    for section, table in config.items():
        if isinstance(table, dict):
            out.append(f"[{section}]")
            out += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
            out.append("")
    return "\n".join(out)


def write_toml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(dump_toml(config), encoding="utf-8")
    return path


def merge_config(base: dict, *overlays: dict | None) -> dict:
    """``base`` with each overlay's sections merged in; a ``None`` value removes that key
    (e.g. the HS256 secret of a daemon that only takes an identity provider's tokens)."""
    out = copy.deepcopy(base)
    for overlay in overlays:
        for section, table in (overlay or {}).items():
            if isinstance(table, dict):
                merged = out.setdefault(section, {})
                for key, value in table.items():
                    if value is None:
                        merged.pop(key, None)
                    else:
                        merged[key] = value
            else:
                out[section] = table
    return out


# -- the daemon ----------------------------------------------------------------------
class Daemon:
    """A running ``python -m tidings serve --config FILE`` subprocess."""

    #: Hooks for tests that start the daemon differently (set before ``start``):
    #: a wrapper command put before the interpreter, extra environment, Popen kwargs.
    argv_prefix: list[str] = []
    extra_env: dict[str, str] = {}
    popen_kwargs: dict[str, Any] = {}

    def __init__(self, config: dict, config_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.secret = config.get("auth", {}).get("secret", TEST_SECRET)
        self.logs: list[str] = []          # stderr + stdout lines, in arrival order
        self._cond = threading.Condition()
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.returncode: int | None = None
        self.allow_crashes = False

    # lifecycle
    def start(self, timeout: float = START_TIMEOUT) -> "Daemon":
        write_toml(self.config_path, self.config)
        with self._cond:
            self._mark = len(self.logs)
        self.proc = subprocess.Popen(
            [*self.argv_prefix, sys.executable, "-m", "tidings", "serve",
             "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env},
            **self.popen_kwargs)
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=self._drain, args=(stream,), daemon=True).start()
        line = self.wait_for_log_sync(r"event=listening", timeout, start=self._mark)
        m = re.search(r"\bport=(\d+)", line)
        assert m, f"no port= in listening line: {line!r}"
        self.port = int(m.group(1))
        self.api_port = None
        if self.config.get("api", {}).get("listen"):
            api_line = self.wait_for_log_sync(r"event=api_listening", timeout, start=self._mark)
            self.api_port = int(re.search(r"\bport=(\d+)", api_line).group(1))
        return self

    def _drain(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            with self._cond:
                self.logs.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        stream.close()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        path = self.config.get("server", {}).get("path", "/ws")
        return f"ws://127.0.0.1:{self.port}{path}"

    def token(self, user: str, ttl: float = 3600, **claims: Any) -> str:
        """HS256 JWT with the daemon's secret: sub, iat, exp (=now+ttl; may be < now)."""
        now = int(time.time())
        payload = {"sub": user, "iat": now, "exp": int(now + ttl), **claims}
        return jwt.encode(payload, self.secret, algorithm="HS256")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        if self.running():
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> int:
        """Wait (bounded) for exit; returns the exit code (raises on timeout)."""
        self.returncode = self.proc.wait(timeout=timeout)
        return self.returncode

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait (blocking; use ``aterminate`` when clients are connected
        from the same trio loop)."""
        self.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    async def aterminate(self, timeout: float = 10.0) -> int:
        self.send_signal(signal.SIGTERM)
        return await self.await_exit(timeout)

    async def await_exit(self, timeout: float = 10.0) -> int:
        with trio.fail_after(timeout):
            while self.proc.poll() is None:
                await trio.sleep(0.02)
        self.returncode = self.proc.returncode
        return self.returncode

    def kill(self) -> None:
        if self.running():
            self.proc.kill()
        if self.proc is not None:
            try:
                self.returncode = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass

    def restart(self, *, same_port: bool = True, timeout: float = START_TIMEOUT) -> "Daemon":
        """Stop (SIGTERM, then SIGKILL) and start again with the same config and state
        dir; keeps the port by default so ``url`` stays valid."""
        if self.running():
            try:
                self.terminate(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        if same_port and self.port:
            self.config.setdefault("server", {})["port"] = self.port
        return self.start(timeout)

    # logs
    def _find(self, pattern: re.Pattern, start: int) -> str | None:
        for line in self.logs[start:]:
            if pattern.search(line):
                return line
        return None

    def wait_for_log_sync(self, pattern: str, timeout: float = 10.0, start: int = 0) -> str:
        """Block until a log line (index >= start) matches regex ``pattern``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = self._find(rx, start)
                if found is not None:
                    return found
                if self.proc is not None and self.proc.poll() is not None and \
                        self.proc.stderr.closed and self.proc.stdout.closed:
                    raise AssertionError(
                        f"daemon exited ({self.proc.returncode}) before logging "
                        f"{pattern!r}; log:\n" + "\n".join(self.logs))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no log line matching {pattern!r} within "
                                         f"{timeout}s; log:\n" + "\n".join(self.logs))
                self._cond.wait(min(left, 0.2))

    async def wait_for_log(self, pattern: str, timeout: float = 10.0, start: int = 0) -> str:
        rx = re.compile(pattern)
        with trio.fail_after(timeout):
            while True:
                with self._cond:
                    found = self._find(rx, start)
                if found is not None:
                    return found
                await trio.sleep(0.02)

    def log_text(self) -> str:
        with self._cond:
            return "\n".join(self.logs)


def default_config(state_dir: Path) -> dict:
    return {
        "server": {"host": "127.0.0.1", "port": 0, "path": "/ws",
                   "state_dir": str(state_dir), "shutdown_grace_s": 2.0,
                   "log_level": "info"},
        "auth": {"mode": "jwt", "secret": TEST_SECRET},
        "api": {"listen": "127.0.0.1:0", "key": TEST_API_KEY},
        "store": {"backend": "sqlite"},
    }


@pytest.fixture
def start_daemon(tmp_path):
    daemons: list[Daemon] = []
    counter = itertools.count(1)

    def factory(config: dict | None = None, **sections: dict) -> Daemon:
        n = next(counter)
        state = tmp_path / f"daemon{n}-state"
        state.mkdir()
        merged = merge_config(default_config(state), config, sections)
        d = Daemon(merged, tmp_path / f"daemon{n}.toml")
        daemons.append(d)
        return d.start()

    yield factory
    crashes = []
    for i, d in enumerate(daemons, 1):
        d.kill()
        print(f"----- daemon {i} (exit {d.returncode}) log -----\n{d.log_text()}")
        if not d.allow_crashes and d.port is not None:  # (startup failures already raised)
            crashes += [f"daemon {i}: {line}" for line in d.logs if CRASH_RE.search(line)]
    if crashes:
        pytest.fail("daemon crashed while serving the test:\n" + "\n".join(crashes),
                    pytrace=False)


@pytest.fixture
def daemon(start_daemon) -> Daemon:
    return start_daemon()


@pytest.fixture
def uniq():
    tag = uuid.uuid4().hex[:6]
    return lambda name: f"{name}-{tag}"


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may write: chmod 0555, or for root (who ignores permissions)
    a read-only tmpfs mounted on it (skip where mounting is not allowed, fail in CI)."""
    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        missing_requirement(f"running as root and cannot mount a read-only tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


async def replay_until_resumed(client, timeout: float = 10.0) -> tuple[list[dict], dict]:
    """Messages replayed on connect/resume, and the closing ``resumed`` frame."""
    got = []
    with trio.fail_after(timeout):
        while True:
            frame = await client.receive(timeout=timeout)
            if frame["type"] == "resumed":
                return got, frame
            assert frame["type"] == "message", frame
            got.append(frame)
