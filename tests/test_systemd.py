"""End-to-end: systemd integration of the real daemon subprocess.

sd_notify against an AF_UNIX datagram socket the test binds (READY/STATUS/STOPPING and a
repeating WATCHDOG), socket activation (a listening socket passed as fd 3 through a tiny
exec wrapper so that LISTEN_PID is the daemon's pid), SIGHUP reload (limits, secret
rotation with grace, ignored keys, a bad file), and ``systemd-analyze verify`` of the unit.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import jwt
import pytest
import trio

from conftest import TEST_SECRET, Daemon, default_config, merge_config, require_binary, write_toml
from tidings.client import HandshakeRefused, open_client

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "tidings.service"
SOCKET_UNIT = ROOT / "systemd" / "tidings.socket"
NEW_SECRET = "rotated-secret-abcdefghijklmnopqrstuvwxyz012345"
T = 10


def mint(secret: str, user: str, ttl: int = 3600) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + ttl}, secret, algorithm="HS256")


@pytest.fixture
def make_daemon(tmp_path):
    """Like conftest's start_daemon, plus extra env / a wrapper command / Popen kwargs;
    a ``None`` value in a section removes that key from the defaults."""
    made: list[Daemon] = []

    def make(*, extra_env=None, argv_prefix=None, popen_kwargs=None, **sections) -> Daemon:
        n = len(made) + 1
        state = tmp_path / f"sd{n}-state"
        state.mkdir()
        config = merge_config(default_config(state), sections)
        for table in config.values():  # a None value removes a default key
            for key in [k for k, v in table.items() if v is None]:
                del table[key]
        d = Daemon(config, tmp_path / f"sd{n}.toml")
        d.extra_env = dict(extra_env or {})
        d.argv_prefix = list(argv_prefix or [])
        d.popen_kwargs = dict(popen_kwargs or {})
        made.append(d)
        return d.start()

    yield make
    for i, d in enumerate(made, 1):
        d.kill()
        print(f"----- daemon {i} (exit {d.returncode}) log -----\n{d.log_text()}")


@pytest.fixture
def notify_socket():
    """A bound AF_UNIX datagram socket (short path: sun_path is 108 bytes)."""
    d = tempfile.mkdtemp(prefix="tdn")
    path = os.path.join(d, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    yield path, sock
    sock.close()
    shutil.rmtree(d, ignore_errors=True)


class Datagrams:
    """Collects datagrams; ``wait_for(pred)`` returns the first one matching (bounded)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seen: list[tuple[float, str]] = []

    def wait_for(self, pred, timeout: float = T) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching datagram in {timeout}s; got {self.seen}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536).decode()
            except socket.timeout:
                continue
            self.seen.append((time.monotonic(), data))
            if pred(data):
                return data


async def test_ready_status_stopping(make_daemon, notify_socket, uniq):
    path, sock = notify_socket
    d = make_daemon(extra_env={"NOTIFY_SOCKET": path})
    dg = Datagrams(sock)
    ready = dg.wait_for(lambda m: "READY=1" in m)
    assert "STATUS=connections=0 users=0" in ready
    alice = uniq("alice")
    async with open_client(d.url, token=d.token(alice)):
        status = await trio.to_thread.run_sync(
            lambda: dg.wait_for(lambda m: "STATUS=connections=1 users=1" in m, 5))
        assert status.startswith("STATUS=")
    d.send_signal(signal.SIGTERM)
    stopping = dg.wait_for(lambda m: "STOPPING=1" in m)
    assert "STATUS=stopping" in stopping
    assert d.wait(10) == 0
    assert not any("WATCHDOG=1" in m for _, m in dg.seen), "no WATCHDOG_USEC: no pings"


def test_watchdog_pings_repeat_on_an_abstract_socket(make_daemon):
    name = f"tidings-wd-{os.getpid()}-{os.urandom(3).hex()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        d = make_daemon(extra_env={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "200000"})
        dg = Datagrams(sock)
        dg.wait_for(lambda m: "READY=1" in m)
        start = time.monotonic()
        pings = [dg.wait_for(lambda m: m == "WATCHDOG=1", 2) for _ in range(8)]
        elapsed = time.monotonic() - start
        assert len(pings) == 8
        # every 100 ms (half of 200 ms): 8 pings take ~0.7-0.8 s, far less than 8 timeouts
        assert 0.5 < elapsed < 1.6, elapsed
        d.terminate()
    finally:
        sock.close()


def test_watchdog_pid_of_another_process_means_no_pings(make_daemon, notify_socket):
    path, sock = notify_socket
    make_daemon(extra_env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    dg = Datagrams(sock)
    dg.wait_for(lambda m: "READY=1" in m)
    with pytest.raises(AssertionError):
        dg.wait_for(lambda m: "WATCHDOG=1" in m, 0.6)


WRAPPER = textwrap.dedent("""\
    # Make the passed fd number 3, announce it the systemd way, and exec the daemon
    # (same pid, so LISTEN_PID is right).
    import os, sys
    fd = int(sys.argv[1])
    if fd != 3:
        os.dup2(fd, 3)
        os.close(fd)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDNAMES"] = "tidings"
    os.execv(sys.argv[2], sys.argv[2:])
""")


async def test_socket_activation_uses_the_passed_socket(make_daemon, tmp_path, uniq):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    # The configured port is taken by another socket: binding it would fail at start.
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    wrapper = tmp_path / "activate.py"
    wrapper.write_text(WRAPPER)
    fd = listener.fileno()
    try:
        d = make_daemon(argv_prefix=[sys.executable, str(wrapper), str(fd)],
                        popen_kwargs={"pass_fds": [fd]},
                        server={"port": blocker.getsockname()[1]})
        line = d.wait_for_log_sync(r"event=listening")
        assert f"port={port}" in line and "activated=1" in line, line
        assert d.port == port
        alice, bob = uniq("alice"), uniq("bob")
        async with open_client(d.url, token=d.token(alice)) as a, \
                open_client(d.url, token=d.token(bob)) as b:
            await a.send(bob, {"text": "via an activated socket"})
            msg = await b.receive_message(timeout=T)
            assert msg["body"] == {"text": "via an activated socket"}
        assert await d.aterminate() == 0
    finally:
        listener.close()
        blocker.close()


def test_systemd_analyze_verify(tmp_path):
    analyze = require_binary("systemd-analyze", "part of systemd (apt-get install systemd)")
    tidings_bin = require_binary("tidings", "pip install -e . puts it on PATH")
    unit = tmp_path / "tidings.service"
    text = UNIT.read_text()
    assert "ExecStart=/opt/tidings/venv/bin/tidings serve --config /etc/tidings/config.toml" in text
    unit.write_text(text.replace("/opt/tidings/venv/bin/tidings", tidings_bin))
    sock_unit = tmp_path / "tidings.socket"
    sock_unit.write_text(SOCKET_UNIT.read_text())
    r = subprocess.run([analyze, "verify", str(unit), str(sock_unit)], capture_output=True,
                       text=True, timeout=60)
    # Lines about other units of this machine are not ours to fix.
    ours = [l for l in (r.stdout + r.stderr).splitlines() if "tidings" in l]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr
    sec = subprocess.run([analyze, "security", "--offline=true", str(unit)], capture_output=True,
                         text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", sec.stdout + sec.stderr)
    assert m, sec.stdout + sec.stderr
    print("systemd-analyze security exposure:", m.group(1))
    assert float(m.group(1)) <= 3.0, sec.stdout


# -- SIGHUP reload ---------------------------------------------------------------------
def rewrite(d: Daemon, **sections) -> int:
    """Merge ``sections`` into the daemon's config file; return the log mark."""
    d.config = merge_config(d.config, sections)
    write_toml(d.config_path, d.config)
    return len(d.logs)


async def test_sighup_reload_limits_secret_rotation_and_ignored_keys(make_daemon, uniq):
    d = make_daemon(limits={"burst": 200, "max_connections_per_user": 4})
    url = d.url  # server.path changes in the file below, but not in the running daemon
    alice, bob = uniq("alice"), uniq("bob")
    old_token = mint(TEST_SECRET, alice)
    mark = rewrite(d, auth={"secret": NEW_SECRET}, limits={"burst": 50, "max_connections_per_user": 1},
                   server={"path": "/elsewhere", "log_level": "debug"})
    d.send_signal(signal.SIGHUP)
    line = await d.wait_for_log(r"event=reloaded", start=mark)
    changed = re.search(r"changed=(\S+)", line).group(1).split(",")
    assert set(changed) == {"auth.secret", "limits.burst", "limits.max_connections_per_user",
                            "server.log_level"}, line
    assert "accepted_secrets=2" in line
    ignored = await d.wait_for_log(r"event=reload_ignored", start=mark)
    assert "keys=server.path" in ignored
    assert NEW_SECRET not in d.log_text() and TEST_SECRET not in d.log_text()
    # The old secret still verifies during the grace; the new one verifies too.
    async with open_client(url, token=old_token) as a, \
            open_client(url, token=mint(NEW_SECRET, bob)) as b:
        ack = await a.send(bob, {"text": "signed by the old secret"})
        assert ack["type"] == "ack"
        assert (await b.receive_message(timeout=T))["body"] == {"text": "signed by the old secret"}
        # The per-user limit changed live: a second connection of alice is refused.
        with pytest.raises(HandshakeRefused) as refused:
            async with open_client(url, token=mint(NEW_SECRET, alice)):
                pass
        assert refused.value.status_code == 429
    # A token signed with neither secret is refused.
    with pytest.raises(HandshakeRefused) as bad:
        async with open_client(url, token=mint("x" * 40, alice)):
            pass
    assert bad.value.status_code == 401
    # A broken file is reported and changes nothing.
    d.config_path.write_text("[limits\nburst = ")
    mark = len(d.logs)
    d.send_signal(signal.SIGHUP)
    failed = await d.wait_for_log(r"event=reload_failed", start=mark)
    assert "unchanged" in failed and "not valid TOML" in failed
    async with open_client(url, token=mint(NEW_SECRET, alice)):
        pass
    assert d.running()


async def test_old_secret_expires_after_the_grace(make_daemon, uniq):
    d = make_daemon(auth={"previous_secret_grace_s": 2.0})
    alice = uniq("alice")
    old_token = mint(TEST_SECRET, alice)
    mark = rewrite(d, auth={"secret": NEW_SECRET})
    d.send_signal(signal.SIGHUP)
    await d.wait_for_log(r"event=reloaded changed=auth.secret\b", start=mark)
    async with open_client(d.url, token=old_token):
        pass
    await d.wait_for_log(r"event=secret_expired", start=mark, timeout=6)
    with pytest.raises(HandshakeRefused) as refused:
        async with open_client(d.url, token=old_token):
            pass
    assert refused.value.status_code == 401
    async with open_client(d.url, token=mint(NEW_SECRET, alice)):
        pass


async def test_secret_file_rotation_is_picked_up(make_daemon, tmp_path, uniq):
    secret_file = tmp_path / "secret"
    secret_file.write_text(TEST_SECRET + "\n")
    secret_file.chmod(0o600)
    d = make_daemon(auth={"secret": None, "secret_file": str(secret_file)})
    mark = len(d.logs)
    secret_file.write_text(NEW_SECRET + "\n")
    d.send_signal(signal.SIGHUP)
    await d.wait_for_log(r"event=reloaded changed=auth.secret", start=mark)
    alice = uniq("alice")
    for token in (mint(TEST_SECRET, alice), mint(NEW_SECRET, alice)):
        async with open_client(d.url, token=token):
            pass
