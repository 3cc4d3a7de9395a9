"""End-to-end: the demo page and clients/js/tidings.js in headless Chromium.

Two pages (alice, bob) on the daemon's demo (http.demo = true, auth.mode = "insecure").
Alice sends, bob's page shows it; the daemon is killed with SIGKILL in the middle of a
burst of sends (one of them stored but its ack lost) and restarted on the same port; both
pages reconnect by themselves, the client resends every unacked send with its
idempotency key, a message typed while the daemon was down and one sent after the
restart arrive, and nothing is lost or stored or shown twice.

Needs node, Debian's chromium and playwright-core installed in tests/browser
(``cd tests/browser && npm ci``); skips with the reason when one is missing, fails
under TIDINGS_REQUIRE_ALL=1.  tests/browser/demo.mjs does the browser side and talks to
this test with JSON lines (stdout) and commands (stdin).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import missing_requirement, require_binary

BROWSER_DIR = Path(__file__).resolve().parent / "browser"
STEP_TIMEOUT = 60.0


def _chromium() -> str:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    missing_requirement("chromium not found (apt-get install -y chromium)")


@pytest.fixture
def browser_tools():
    node = require_binary("node", "Node.js 18+ runs the playwright-core driver script")
    chromium = _chromium()
    if not (BROWSER_DIR / "node_modules" / "playwright-core" / "package.json").exists():
        missing_requirement("playwright-core is not installed: cd tests/browser && npm ci")
    return node, chromium


class Driver:
    """The node script as a subprocess; ``expect(event)`` reads its JSON lines (bounded)."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, cwd=BROWSER_DIR, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append), daemon=True).start()

    @staticmethod
    def _pump(stream, sink) -> None:
        for line in stream:
            sink(line.rstrip("\n"))
        sink(None)

    def expect(self, event: str, timeout: float = STEP_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"browser driver: no {event!r} within {timeout}s; "
                                     f"stderr: {self.stderr[-20:]}") from None
            if line is None:
                raise AssertionError(f"browser driver exited ({self.proc.wait()}) before {event!r}; "
                                     f"stderr: {self.stderr[-20:]}")
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # stray output
            if msg.get("event") == "failed":
                raise AssertionError(f"browser driver failed: {msg}")
            if msg.get("event") == event:
                return msg

    def command(self, name: str) -> None:
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def test_js_client_unit_tests():
    """clients/js/tidings.js against a fake WebSocket (node --test; no browser needed)."""
    node = require_binary("node", "Node.js 18+ runs tests/browser/client.test.mjs")
    r = subprocess.run([node, "--test", "client.test.mjs"], cwd=BROWSER_DIR,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_demo_page_serves_the_module(start_daemon):
    d = start_daemon(http={"demo": True})
    base = f"http://127.0.0.1:{d.port}"
    with urllib.request.urlopen(base + "/", timeout=5) as r:
        page = r.read().decode()
    assert 'content="/ws"' in page and 'content="jwt"' in page and "tidings token" in page
    with urllib.request.urlopen(base + "/tidings.js", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/javascript")
        assert "export class TidingsClient" in r.read().decode()


def test_demo_is_off_by_default(daemon):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/", timeout=5)
    assert err.value.code == 404


def test_two_pages_chat_and_survive_a_kill_9_restart(start_daemon, browser_tools, uniq):
    node, chromium = browser_tools
    d = start_daemon(auth={"mode": "insecure"}, http={"demo": True})
    alice, bob = uniq("alice"), uniq("bob")
    driver = Driver([node, "demo.mjs", f"http://127.0.0.1:{d.port}", alice, bob, chromium])
    try:
        driver.expect("connected")
        driver.expect("ready_for_kill")
        port = d.port
        d.kill()  # SIGKILL: no close frames, no goodbye
        assert d.returncode == -9
        driver.command("killed")
        driver.expect("ready_for_restart")
        d.restart(same_port=True)
        assert d.port == port
        driver.command("restarted")
        result = driver.expect("result")
    finally:
        driver.close()
    burst = [f"burst-{i}" for i in range(100)]
    bob_got = [m["text"] for m in result["bob"]]
    assert bob_got == ["before-1", "before-2", "before-3", "lost-ack-1", *burst, "offline-1",
                       "after-1"], result
    assert [m["from"] for m in result["bob"]] == [alice] * len(bob_got)
    seqs = [m["seq"] for m in result["bob"]]
    assert seqs == list(range(1, len(bob_got) + 1)), f"duplicate, missing or out-of-order seqs: {seqs}"
    exactly = result["exactly"]
    assert exactly["errors"] == [] and exactly["lostAckDropped"], exactly
    lost = exactly["acks"]["lost-ack-1"]
    assert lost["duplicate"] is True and lost["seq"] == 4, lost  # stored before the kill
    assert [exactly["acks"][t]["seq"] for t in burst] == list(range(5, 105))
    assert 30 <= exactly["ackedAtKill"] < 101, exactly["ackedAtKill"]  # killed mid-burst
    assert [m["text"] for m in result["alice"]] == ["reply-1"], result
    assert result["reconnects"]["alice"] >= 1 and result["reconnects"]["bob"] >= 1
    assert not result["problems"], result["problems"]
    resent = sum(1 for t in burst if exactly["acks"][t].get("duplicate"))
    print(f"pages reconnected {result['reconnectMs']} ms after the restart; "
          f"reconnect attempts alice={result['reconnects']['alice']} bob={result['reconnects']['bob']}; "
          f"acked at the kill: {exactly['ackedAtKill']} of 101; burst resends answered "
          f"duplicate: {resent}")
