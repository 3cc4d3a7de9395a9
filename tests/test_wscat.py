"""Interop: the real ``wscat`` (npm package) talks to the daemon through stdin/stdout.

wscat with a non-TTY stdout prints each incoming text frame as one line (possibly
prefixed by its readline prompt "> "), and only sends stdin lines once connected, so
we wait for the server's ``hello`` line before typing. Closing stdin makes it exit.
Skips when wscat is missing; fails instead under TIDINGS_REQUIRE_ALL=1.
"""

from __future__ import annotations

import shutil
import subprocess

import orjson
import pytest
import trio

from conftest import missing_requirement, require_binary
from tidings.client import open_client

T = 15


def wscat_command() -> list[str]:
    path = shutil.which("wscat")
    if path:
        return [path]
    npx = shutil.which("npx")
    if npx:
        try:
            probe = subprocess.run([npx, "--no-install", "wscat", "--version"],
                                   capture_output=True, timeout=30)
            if probe.returncode == 0:
                return [npx, "--no-install", "wscat"]
        except subprocess.TimeoutExpired:
            pass
    require_binary("wscat", "install it with `npm install -g wscat`")
    missing_requirement("wscat not usable")  # pragma: no cover


@pytest.fixture
def wscat_cmd() -> list[str]:
    """Resolved in a sync fixture so the skip keeps its reason (and no daemon starts)."""
    return wscat_command()


class Wscat:
    """One ``wscat -c URL`` process driven line by line."""

    def __init__(self, proc: trio.Process) -> None:  # use Wscat.start
        self.proc = proc
        self.buf = b""
        self.lines: list[str] = []

    @classmethod
    async def start(cls, cmd: list[str], url: str) -> "Wscat":
        proc = await trio.lowlevel.open_process(
            cmd + ["--no-color", "-c", url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return cls(proc)

    async def frame(self, match, timeout: float = T) -> dict:
        """Next JSON frame on stdout satisfying ``match(frame)``."""
        with trio.fail_after(timeout):
            while True:
                while b"\n" in self.buf:
                    raw, _, self.buf = self.buf.partition(b"\n")
                    line = raw.decode("utf-8", "replace")
                    self.lines.append(line)
                    start = line.find("{")
                    if start < 0:
                        continue
                    try:
                        frame = orjson.loads(line[start:])
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(frame, dict) and match(frame):
                        return frame
                chunk = await self.proc.stdout.receive_some(65536)
                if not chunk:
                    raise AssertionError(f"wscat exited; output: {self.lines}")
                self.buf += chunk

    async def type_line(self, frame: dict) -> None:
        await self.proc.stdin.send_all(orjson.dumps(frame) + b"\n")

    async def quit(self) -> int:
        with trio.move_on_after(5):
            await self.proc.stdin.aclose()
            return await self.proc.wait()
        self.proc.kill()
        return await self.proc.wait()


async def test_wscat_chat(wscat_cmd, daemon, uniq):
    alice, bob = uniq("alice"), uniq("bob")
    started: list[Wscat] = []
    async with open_client(daemon.url, token=daemon.token(bob)) as bob_py:
        try:
            a = await Wscat.start(wscat_cmd, f"{daemon.url}?token={daemon.token(alice)}")
            started.append(a)
            b = await Wscat.start(wscat_cmd, f"{daemon.url}?token={daemon.token(bob)}")
            started.append(b)
            hello = await a.frame(lambda f: f.get("type") == "hello")
            assert hello["user"] == alice
            assert (await b.frame(lambda f: f.get("type") == "hello"))["user"] == bob

            await a.type_line({"type": "send", "to": bob, "body": {"text": "hi from wscat"},
                               "id": "w1"})
            ack = await a.frame(lambda f: f.get("id") == "w1")
            assert ack["type"] == "ack" and ack["delivered"] == 2, ack  # bob: python + wscat
            got_py = await bob_py.receive_message(timeout=T)
            got_wscat = await b.frame(lambda f: f.get("type") == "message")
            for got in (got_py, got_wscat):
                assert got["from"] == alice and got["to"] == bob
                assert got["body"] == {"text": "hi from wscat"}
                assert got["msg_id"] == ack["msg_id"]

            # bob answers from wscat, alice's wscat prints the message
            await b.type_line({"type": "send", "to": alice, "body": "hi alice", "id": 2})
            assert (await b.frame(lambda f: f.get("id") == 2))["delivered"] == 1
            back = await a.frame(lambda f: f.get("type") == "message")
            assert (back["from"], back["body"]) == (bob, "hi alice")

            # a bad line typed into wscat gets an error frame, the session survives
            await a.proc.stdin.send_all(b"this is not json\n")
            err = await a.frame(lambda f: f.get("type") == "error")
            assert err["code"] == "bad_request"
            await a.type_line({"type": "ping", "id": "p1"})
            assert (await a.frame(lambda f: f.get("id") == "p1"))["type"] == "pong"
        finally:
            for w in started:
                await w.quit()
