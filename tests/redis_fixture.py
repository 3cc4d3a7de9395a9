"""A private redis-server per test: the ``redis_server`` fixture.

Import it explicitly in a test module (``pytest_plugins`` is only allowed in the root
conftest)::

    from redis_fixture import redis_server  # noqa: F401

The fixture starts ``redis-server`` on a free loopback port with its own directory and
yields a :class:`RedisServer` with ``.url``, ``.port``, ``.stop()`` (SIGTERM, wait),
``.kill()`` (SIGKILL), ``.start()`` (again on the SAME port and dir; the AOF is kept)
and ``.flush()``.  Parametrize AOF with ``@pytest.mark.parametrize("redis_server",
[{"appendonly": True}], indirect=True)`` (default: no AOF, no RDB snapshots).

If ``redis-server`` is not installed the test is skipped -- or FAILS when
``TIDINGS_REQUIRE_ALL=1`` (CI).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

REQUIRE_ALL = os.environ.get("TIDINGS_REQUIRE_ALL") == "1"
START_TIMEOUT = 10.0


def require_coredis() -> None:
    """Call at import time of a test module: skip it if coredis is not installed
    (``pip install -e .[test]``), or fail under TIDINGS_REQUIRE_ALL=1."""
    try:
        import coredis  # noqa: F401
    except ImportError:
        msg = "coredis is not installed (pip install -e '.[test]')"
        if REQUIRE_ALL:
            raise RuntimeError(msg + " and TIDINGS_REQUIRE_ALL=1") from None
        pytest.skip(msg, allow_module_level=True)


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path:
        return path
    msg = "redis-server not found on PATH (needed for the Redis store/cluster tests)"
    if REQUIRE_ALL:
        pytest.fail(msg + " (TIDINGS_REQUIRE_ALL=1 turns this skip into a failure)",
                    pytrace=False)
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, binary: str, directory: Path, *, appendonly: bool = False,
                 appendfsync: str = "everysec", port: int | None = None) -> None:
        self.binary = binary
        self.dir = directory
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = directory / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.dir), "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--daemonize", "no", "--logfile", str(self.log_path),
        ]

    def start(self, timeout: float = START_TIMEOUT) -> "RedisServer":
        """Start (or restart) on the same port and directory; wait for PING."""
        if self.running():
            return self
        deadline = time.monotonic() + timeout
        while True:  # the old socket may linger briefly after a kill
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while time.monotonic() < deadline and self.proc.poll() is None:
                if _ping(self.port):
                    return self
                time.sleep(0.02)
            if self.proc.poll() is None or time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n"
                                   + self.log_text())
            time.sleep(0.1)  # exited (port busy?): retry until the deadline

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (redis flushes the AOF and exits) and wait."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL: a crash (no AOF flush beyond what fsync already did)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the server hangs (connections stay open, nothing answers)."""
        if self.running():
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running():
            self.proc.send_signal(signal.SIGCONT)

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"FLUSHALL\r\n")
            assert s.recv(64).startswith(b"+OK")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@pytest.fixture
def redis_server(request: Any, tmp_path: Path):
    """A private redis-server (see the module docstring)."""
    binary = redis_binary()
    options = getattr(request, "param", None) or {}
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(binary, directory, **options)
    server.start()
    try:
        yield server
    finally:
        server.resume()
        server.kill()


class RedisClusterServers:
    """A 3-primary Redis Cluster (no replicas) of private redis-servers."""

    def __init__(self, servers: list[RedisServer]) -> None:
        self.servers = servers

    @property
    def url(self) -> str:
        return self.servers[0].url

    def flush(self) -> None:
        for s in self.servers:
            s.flush()


def _cluster_ok(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"CLUSTER INFO\r\n")
            return b"cluster_state:ok" in s.recv(4096)
    except OSError:
        return False


def free_cluster_port() -> int:
    """A free port <= 55535 whose cluster bus port (+10000) is free too."""
    import random
    for _ in range(200):
        port = random.randint(20000, 55000)
        try:
            for p in (port, port + 10000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a redis cluster node")


class _ClusterNode(RedisServer):
    def command(self) -> list[str]:
        return super().command() + ["--cluster-enabled", "yes",
                                    "--cluster-config-file", str(self.dir / "nodes.conf")]


@pytest.fixture
def redis_cluster(tmp_path: Path):
    """A private 3-shard Redis Cluster; ``.url`` points at one node (the client
    discovers the rest), ``.flush()`` empties every shard."""
    binary = redis_binary()
    cli = shutil.which("redis-cli")
    if cli is None:
        msg = "redis-cli not found on PATH (needed to create a Redis Cluster)"
        if REQUIRE_ALL:
            pytest.fail(msg + " (TIDINGS_REQUIRE_ALL=1)", pytrace=False)
        pytest.skip(msg)
    servers = []
    try:
        for i in range(3):
            d = tmp_path / f"redis-cluster-{i}"
            d.mkdir()
            servers.append(_ClusterNode(binary, d, port=free_cluster_port()).start())
        subprocess.run(
            [cli, "--cluster", "create", *[f"127.0.0.1:{s.port}" for s in servers],
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        deadline = time.monotonic() + 15
        while not all(_cluster_ok(s.port) for s in servers):
            if time.monotonic() > deadline:
                raise RuntimeError("redis cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        yield RedisClusterServers(servers)
    finally:
        for s in servers:
            s.kill()
