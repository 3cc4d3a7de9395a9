#!/usr/bin/env python3
"""Chaos soak: a Tidings cluster under faults must deliver every acked message to every
device of its recipient exactly once (after de-duplication by msg_id), in seq order.

    PYTHONPATH=$PWD/daemon python bench/soak.py                  # 300 s, 200 users
    PYTHONPATH=$PWD/daemon python bench/soak.py --duration 60 --users 30 --rate 30

Setup: one redis-server (AOF, appendfsync everysec) and ``--nodes`` daemons on it
(presence_ttl_s ``--ttl``).  Every user has 1-3 devices; a device is one WebSocket at a
time, to a random node, that reconnects at random (and whenever a node stops answering
its pings) with ``?since=<last seq it processed>``, and sometimes sends an in-band
``resume`` with that seq.  When the server's ``hello`` carries a ``device`` field the
device also gives ``?device=NAME``, and half of its reconnects give no ``since``: they
rely on the device's own ack cursor (acked every 1.5 s, so a few duplicates).  Senders send at ``--rate`` messages/s, from a
random connected device to a random other user.  Faults, at fixed fractions of the run:

    15%  kill -9 node 1, start it again 2 s later (same port)
    40%  restart Redis (SIGTERM, or SIGKILL with --redis-crash; down 2 s)
    60%  SIGSTOP node 2 for 10 s, then SIGCONT

At 85% sending stops; then every device reconnects if needed and catches up (at most
``--settle`` s).  The report counts sent / acked / delivered / duplicates (frames seen
twice by a device, before de-duplication) / lost (acked messages some device of the
recipient never got) / order violations (a device saw a seq other than last+1 that was
not a repeat) / incomplete replays (``resumed.complete`` false) / daemon crash lines.
``run(settings)`` is what tests/test_soak.py runs (60 s, fewer users).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import jwt
import trio

from tidings.client import ServerError, open_client

SECRET = "soak-secret-0123456789abcdef0123456789abcdef"
CRASH_RE = re.compile(r"event=connection_crashed|event=crash|Traceback \(most recent")


@attrs.define
class Settings:
    duration: float = 300.0
    users: int = 200
    rate: float = 100.0          # messages per second, all senders together
    nodes: int = 3
    ttl: float = 3.0             # cluster.presence_ttl_s
    settle: float = 60.0         # at most this long for every device to catch up
    redis_crash: bool = False    # SIGKILL Redis instead of SIGTERM
    seed: int = 1
    workdir: Path | None = None  # default: a temporary directory
    log: Any = print


# -- processes -----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping_redis(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class Redis:
    """redis-server with AOF (everysec) in ``directory``; restarts keep port and data."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        deadline = time.monotonic() + 15
        while True:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", str(self.dir), "--save", "", "--appendonly", "yes",
                 "--appendfsync", "everysec", "--daemonize", "no",
                 "--logfile", str(self.dir / "redis.log")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while time.monotonic() < deadline and self.proc.poll() is None:
                if _ping_redis(self.port):
                    return
                time.sleep(0.02)
            if time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.1)  # exited (the old socket lingers): again

    def stop(self, crash: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if crash else signal.SIGTERM)
            self.proc.wait(15)

    def kill(self) -> None:
        self.stop(crash=True)


class Node:
    """One ``python -m tidings serve`` on a fixed port; its log goes to a file."""

    def __init__(self, name: str, directory: Path, redis_url: str, ttl: float) -> None:
        self.name = name
        self.port = free_port()
        self.api_port = free_port()
        self.log_path = directory / f"{name}.log"
        state = directory / f"{name}-state"
        state.mkdir(exist_ok=True)
        self.config_path = directory / f"{name}.toml"
        self.config_path.write_text(f"""
[server]
host = "127.0.0.1"
port = {self.port}
state_dir = "{state}"
shutdown_grace_s = 2.0
[auth]
mode = "jwt"
secret = "{SECRET}"
[api]
listen = "127.0.0.1:{self.api_port}"
key = "soak-api-key-0123456789"
[store]
backend = "redis"
[limits]
messages_per_second = 1000.0
burst = 1000
[cluster]
redis_url = "{redis_url}"
presence_ttl_s = {ttl}
node_id = "soak-{name}"
""")
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 20.0) -> None:
        with self.log_path.open("a") as log:
            mark = log.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tidings", "serve", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.log_path.open() as f:
                f.seek(mark)
                if "event=listening" in f.read():
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"node {self.name} did not start:\n{self.log_path.read_text()[-3000:]}")

    def cluster_users_online(self) -> float | None:
        """``tidings_cluster_users_online`` from /metrics (None if unreadable)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/metrics", timeout=3) as r:
                text = r.read().decode()
        except OSError:
            return None
        m = re.search(r"^tidings_cluster_users_online (\S+)$", text, re.M)
        return float(m.group(1)) if m else None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(15)

    def crash_lines(self) -> list[str]:
        return [line for line in self.log_path.read_text(errors="replace").splitlines()
                if CRASH_RE.search(line)]


# -- clients -------------------------------------------------------------------------

def token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 86400}, SECRET, algorithm="HS256")


class Stale(Exception):
    """A node stopped answering pings."""


class Device:
    """One device of a user: what it processed, in order, across its connections."""

    def __init__(self, user: str, name: str) -> None:
        self.user = user
        self.name = name
        self.last = 0                       # highest seq processed (all before it too)
        self.seen: dict[str, int] = {}      # msg_id -> seq
        self.duplicates = 0
        self.violations: list[str] = []
        self.incomplete = 0
        self.client: Any = None
        self.node = ""                      # where the last connection went
        self.state = "new"
        self.connects = 0

    def message(self, frame: dict[str, Any]) -> None:
        msg_id, seq = frame["msg_id"], frame["seq"]
        if msg_id in self.seen:
            self.duplicates += 1
            if self.seen[msg_id] != seq:
                self.violations.append(f"{msg_id} came as seq {seq}, before as {self.seen[msg_id]}")
        elif seq == self.last + 1:
            self.seen[msg_id] = seq
            self.last = seq
        else:  # a gap, or a new msg_id at an old seq: either breaks the contract
            self.violations.append(f"seq {seq} ({msg_id}) after {self.last}")
            raise Stale("out of order: reconnect from the last seq")

    def resumed(self, frame: dict[str, Any]) -> None:
        if frame.get("complete") is False:
            self.incomplete += 1


class Soak:
    def __init__(self, s: Settings, nodes: list[Node]) -> None:
        self.s = s
        self.nodes = nodes
        self.rng = random.Random(s.seed)
        tag = os.urandom(3).hex()
        self.devices: dict[str, list[Device]] = {}
        for i in range(s.users):
            user = f"u{i}-{tag}"
            self.devices[user] = [Device(user, f"d{j}") for j in range(self.rng.randint(1, 3))]
        self.device_param = False
        self.sending = True
        self.settling = False
        self.acked: dict[str, tuple[str, int]] = {}  # msg_id -> (recipient, seq)
        self.count: Counter[str] = Counter()
        self.events: list[tuple[float, str]] = []
        self.watched: dict[str, bool] = {}           # the observer's view of presence
        self.t0 = time.monotonic()

    def note(self, what: str) -> None:
        self.events.append((round(time.monotonic() - self.t0, 1), what))
        self.s.log(f"[{time.monotonic() - self.t0:6.1f}s] {what}")

    async def probe_devices(self) -> None:
        """Does this server know devices (``hello.device``)?  Then use ?device=."""
        user = next(iter(self.devices))
        async with open_client(self.nodes[0].url, token=token(user), device="d0") as c:
            self.device_param = "device" in (c.hello or {})

    # a device's life
    async def device_loop(self, dev: Device) -> None:
        while True:
            node = self.rng.choice(self.nodes)
            device = dev.name if self.device_param else None
            # With devices, half the reconnects rely on the device's own ack cursor
            # (at most dev.last: what it skips again is counted as duplicates).
            since = None if device is not None and self.rng.random() < 0.5 else dev.last
            self.count["connects with the device cursor" if since is None else "connects with since"] += 1
            dev.state = f"connecting to {node.name}"
            try:
                async with open_client(node.url, token=token(dev.user), since=since, device=device,
                                       connect_timeout=3, close_timeout=2) as c:
                    dev.connects += 1
                    dev.client = c
                    dev.node = f"{node.name}:{c.conn} since {dev.last} at {time.monotonic() - self.t0:.1f}s"
                    try:
                        dev.state = "connected"
                        await self.session(dev, c)
                    finally:
                        dev.client = None
                        dev.state = "closing"
            except Exception as exc:  # the peer or a fault, by kind
                self.count[f"session end: {_kind(exc)}"] += 1
            dev.state = "sleeping"
            await trio.sleep(self.rng.uniform(0.05, 0.3))

    async def session(self, dev: Device, c: Any) -> None:
        lifetime = self.rng.expovariate(1 / 12.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.keepalive, dev, c)
            if not self.settling:
                nursery.start_soon(_expire, self, nursery.cancel_scope, lifetime)
                if self.rng.random() < 0.3:
                    nursery.start_soon(self.resume_later, dev, c, self.rng.uniform(0.5, lifetime))
            while True:
                frame = await c.receive(timeout=3600)
                if frame["type"] == "message":
                    dev.message(frame)
                elif frame["type"] == "resumed":
                    dev.resumed(frame)

    async def keepalive(self, dev: Device, c: Any) -> None:
        while True:
            await trio.sleep(1.5)
            try:
                await c.ping(timeout=3)
            except trio.TooSlowError:
                raise Stale("no pong within 3 s") from None
            await c.ack(dev.last)

    async def resume_later(self, dev: Device, c: Any, delay: float) -> None:
        await trio.sleep(delay)
        self.count["in-band resumes"] += 1
        dev.resumed(await c.resume(dev.last, timeout=10))

    # presence, as a watcher on the last node sees it (every user is online at the end)
    async def observer(self) -> None:
        users = list(self.devices)[:100]  # (the per-connection watch limit)
        me = f"observer-{os.urandom(3).hex()}"
        while True:
            try:
                async with open_client(self.nodes[-1].url, token=token(me), connect_timeout=3) as c:
                    reply = await c.request({"type": "watch", "users": users}, timeout=10)
                    self.watched.update(reply["users"])
                    self.count["observer: watch sessions"] += 1
                    while True:
                        frame = await c.receive(timeout=3600)
                        if frame["type"] == "presence":
                            self.watched[frame["user"]] = frame["online"]
                            self.count["observer: presence events"] += 1
            except Exception as exc:
                self.count[f"observer end: {_kind(exc)}"] += 1
            await trio.sleep(0.5)

    async def check_presence(self, limit: float) -> tuple[list[str], list[Any]]:
        """Wait (<= ``limit`` s) until the observer sees every watched user online and
        every node's gauge counts every user (and the observer); what is wrong then."""
        gauges: list[Any] = []
        with trio.move_on_after(limit):
            while True:
                gauges = [await trio.to_thread.run_sync(n.cluster_users_online) for n in self.nodes]
                wrong = [u for u, online in self.watched.items() if not online]
                everyone = len(self.devices) + 1  # (the observer is online too)
                if not wrong and self.watched and all(g == everyone for g in gauges):
                    break
                await trio.sleep(0.25)
        return [u for u, online in self.watched.items() if not online], gauges

    # senders
    async def senders(self) -> None:
        interval = 1 / self.s.rate
        users = list(self.devices)
        async with trio.open_nursery() as nursery:
            next_at = trio.current_time()
            while self.sending:
                next_at += interval
                await trio.sleep_until(next_at)
                sender = self.rng.choice(users)
                conns = [d.client for d in self.devices[sender] if d.client is not None]
                if not conns:
                    self.count["send skipped: sender offline"] += 1
                    continue
                to = self.rng.choice(users)
                while to == sender:
                    to = self.rng.choice(users)
                nursery.start_soon(self.send_one, self.rng.choice(conns), sender, to)

    async def send_one(self, c: Any, sender: str, to: str) -> None:
        self.count["sent"] += 1
        try:
            ack = await c.send(to, {"from": sender, "n": self.count["sent"]}, timeout=10)
        except ServerError as exc:
            self.count[f"send refused: {exc.code}"] += 1
            return
        except Exception as exc:
            self.count[f"send unanswered: {_kind(exc)}"] += 1
            return
        self.acked[ack["msg_id"]] = (to, ack["seq"])

    # faults
    async def faults(self, redis: Redis) -> None:
        d = self.s.duration
        n1, n2 = self.nodes[0], self.nodes[1 % len(self.nodes)]
        await self.at(0.15 * d)
        self.note(f"kill -9 {n1.name}")
        await trio.to_thread.run_sync(n1.kill)
        await trio.sleep(2)
        await trio.to_thread.run_sync(n1.start)
        self.note(f"{n1.name} started again")
        await self.at(0.40 * d)
        self.note("redis " + ("SIGKILL" if self.s.redis_crash else "SIGTERM"))
        await trio.to_thread.run_sync(redis.stop, self.s.redis_crash)
        await trio.sleep(2)
        await trio.to_thread.run_sync(redis.start)
        self.note("redis started again")
        await self.at(0.60 * d)
        self.note(f"SIGSTOP {n2.name}")
        n2.signal(signal.SIGSTOP)
        await trio.sleep(10)
        n2.signal(signal.SIGCONT)
        self.note(f"SIGCONT {n2.name}")

    async def at(self, t: float) -> None:
        await trio.sleep_until(trio.current_time() + max(0.0, t - (time.monotonic() - self.t0)))

    # the end
    def caught_up(self) -> bool:
        for devs in self.devices.values():
            top = max(max((d.last for d in devs), default=0), 0)
            if any(d.client is None or d.last < top for d in devs):
                return False
        want: dict[str, int] = {}
        for to, seq in self.acked.values():
            want[to] = max(want.get(to, 0), seq)
        return all(d.last >= want.get(u, 0) for u, devs in self.devices.items() for d in devs)

    def report(self, crashes: list[str]) -> dict[str, Any]:
        lost, delivered, expected = 0, 0, 0
        lost_examples = []
        for msg_id, (to, seq) in self.acked.items():
            for dev in self.devices[to]:
                expected += 1
                if dev.seen.get(msg_id) == seq:
                    delivered += 1
                else:
                    lost += 1
                    if len(lost_examples) < 10:
                        lost_examples.append(f"{msg_id} seq {seq} to {to}/{dev.name}")
        devs = [d for ds in self.devices.values() for d in ds]
        unacked = {m for d in devs for m in d.seen} - self.acked.keys()
        violations = [f"{d.user}/{d.name}: {v}" for d in devs for v in d.violations]
        want: dict[str, int] = {}
        for to, seq in self.acked.values():
            want[to] = max(want.get(to, 0), seq)
        behind = [f"{d.user}/{d.name} at {d.last} of {want[d.user]} ({d.state}; last {d.node})"
                  for d in devs if d.last < want.get(d.user, 0)]
        return {
            "settings": {k: (str(v) if isinstance(v, Path) else v)
                         for k, v in attrs.asdict(self.s).items() if k != "log"},
            "device_param": self.device_param,
            "users": len(self.devices), "devices": len(devs),
            "sent": self.count["sent"], "acked": len(self.acked),
            "deliveries_expected": expected, "delivered": delivered,
            "duplicates": sum(d.duplicates for d in devs),
            "lost": lost, "lost_examples": lost_examples, "devices_behind": behind[:20],
            "order_violations": len(violations), "violation_examples": violations[:10],
            "incomplete_replays": sum(d.incomplete for d in devs),
            "delivered_but_unacked_msgs": len(unacked),
            "connects": sum(d.connects for d in devs),
            "crash_lines": crashes[:20],
            "counts": dict(sorted(self.count.items())),
            "faults": self.events,
        }


async def _expire(soak: Soak, scope: trio.CancelScope, after: float) -> None:
    await trio.sleep(after)
    if not soak.settling:
        scope.cancel()


def _kind(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "+".join(sorted({_kind(e) for e in exc.exceptions}))
    code = getattr(exc, "code", None) or getattr(exc, "status_code", None)
    return type(exc).__name__ + (f" {code}" if code else "")


async def run(s: Settings) -> dict[str, Any]:
    """Run one soak; the report (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="tidings-soak-") as tmp:
        work = s.workdir or Path(tmp)
        redis = Redis(work)
        await trio.to_thread.run_sync(redis.start)
        nodes = [Node(f"n{i + 1}", work, redis.url, s.ttl) for i in range(s.nodes)]
        try:
            for node in nodes:
                await trio.to_thread.run_sync(node.start)
            soak = Soak(s, nodes)
            await soak.probe_devices()
            soak.note(f"{len(nodes)} nodes up; {sum(map(len, soak.devices.values()))} devices of "
                      f"{s.users} users; ?device= {'used' if soak.device_param else 'not supported'}")
            async with trio.open_nursery() as nursery:
                for devs in soak.devices.values():
                    for dev in devs:
                        nursery.start_soon(soak.device_loop, dev)
                nursery.start_soon(soak.faults, redis)
                nursery.start_soon(soak.observer)
                async with trio.open_nursery() as senders:
                    senders.start_soon(soak.senders)
                    await soak.at(0.85 * s.duration)
                    soak.sending = False
                    soak.note("sending stopped; waiting for answers")
                soak.settling = True
                soak.note(f"{len(soak.acked)} acked of {soak.count['sent']}; settling")
                with trio.move_on_after(s.settle):
                    while not soak.caught_up():
                        await trio.sleep(0.2)
                await trio.sleep(1.0)  # anything still in flight (duplicates, strays)
                soak.note("settled" if soak.caught_up() else "NOT caught up at the settle limit")
                offline, gauges = await soak.check_presence(3 * s.ttl + 5)
                soak.note(f"presence: {len(offline)} watched users wrongly offline; gauges {gauges}")
                nursery.cancel_scope.cancel()
            crashes = [f"{n.name}: {line}" for n in nodes for line in n.crash_lines()]
            report = soak.report(crashes)
            report.update(watched_users=len(soak.watched), watched_wrongly_offline=offline[:20],
                          cluster_users_online=gauges)
            return report
        finally:
            for node in nodes:
                node.signal(signal.SIGCONT)
                node.kill()
            redis.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=300.0)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--ttl", type=float, default=3.0)
    p.add_argument("--settle", type=float, default=60.0)
    p.add_argument("--redis-crash", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the report here too")
    p.add_argument("--workdir", type=Path, help="keep Redis' and the nodes' files and logs here")
    a = p.parse_args()
    s = Settings(duration=a.duration, users=a.users, rate=a.rate, nodes=a.nodes, ttl=a.ttl,
                 settle=a.settle, redis_crash=a.redis_crash, seed=a.seed, workdir=a.workdir)
    result = trio.run(run, s)
    print(json.dumps(result, indent=1))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    ok = (result["lost"] == 0 and result["order_violations"] == 0
          and result["incomplete_replays"] == 0 and not result["crash_lines"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
