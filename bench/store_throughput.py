#!/usr/bin/env python3
"""Append throughput of a store engine, alone (a benchmark, not a test: pytest never
runs it).

    PYTHONPATH=daemon python bench/store_throughput.py                 # every engine
    PYTHONPATH=daemon python bench/store_throughput.py --engines redis --publish
    PYTHONPATH=daemon python bench/store_throughput.py --redis-url redis://127.0.0.1:6379/0

Appends ``--messages`` messages (``--body`` byte string bodies, ``--senders`` senders,
``--recipients`` recipients) in batches of ``--batch`` through ``Store.append`` and
prints msgs/s per engine (median of ``--reps``) and this process's CPU per message and
per ``append`` call (the store's client side: with ``--batch 4 --publish`` what the
sending node of a cluster pays per script call in the open loop, docs/cluster.md
"sixth session").  sqlite writes a file in a temporary
directory; redis starts a private ``redis-server`` on a free port (no persistence)
unless ``--redis-url`` is given (that server is FLUSHALLed: never point it at data you
keep).  ``max_inbox`` is 10,000, as in the default config.  docs/cluster.md quotes the
redis figure.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import trio

from tidings.store import MemoryStore, NewMessage, StoreLimits

LIMITS = StoreLimits(max_inbox=10_000)


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found on PATH (or pass --redis-url)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="tidings-bench-redis-") as d:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                                 "--dir", d, "--save", "", "--appendonly", "no"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(
                        ("127.0.0.1", port), timeout=0.5) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        break
                if time.monotonic() > deadline or proc.poll() is not None:
                    sys.exit("redis-server did not start")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.kill()
            proc.wait()


@contextlib.asynccontextmanager
async def open_engine(name: str, args: argparse.Namespace, workdir: Path,
                      rep: int) -> AsyncIterator[Any]:
    if name == "memory":
        store: Any = MemoryStore(LIMITS)
    elif name == "sqlite":
        from tidings.store.sqlite import SqliteStore

        store = SqliteStore.open(workdir / f"bench-{rep}.db", LIMITS)
    else:
        import coredis

        from tidings.store.redis import open_redis_store

        async with coredis.Redis.from_url(args.redis_url) as r:
            await r.flushall()
        async with open_redis_store(args.redis_url, limits=LIMITS, node_id="bench",
                                    publish=args.publish) as store:
            yield store
        return
    try:
        yield store
    finally:
        await store.aclose()


async def measure(name: str, args: argparse.Namespace, workdir: Path,
                  rep: int) -> tuple[float, float]:
    """(msgs/s, this process's CPU seconds per message)."""
    body = orjson.dumps("x" * args.body)
    msgs = [NewMessage(f"{rep}-{i:09d}", f"s{i % args.senders}", f"u{i % args.recipients}",
                       body, 1_000 + i) for i in range(args.messages)]
    async with open_engine(name, args, workdir, rep) as store:
        t0, c0 = time.perf_counter(), time.process_time()
        for k in range(0, len(msgs), args.batch):
            results = await store.append(msgs[k:k + args.batch])
            if not all(r.ok for r in results):
                sys.exit(f"{name}: append failed: {next(r.error for r in results if not r.ok)}")
        t1, c1 = time.perf_counter(), time.process_time()
        return len(msgs) / (t1 - t0), (c1 - c0) / len(msgs)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="tidings-bench-store-") as d:
        for name in args.engines.split(","):
            runs = [await measure(name, args, Path(d), rep) for rep in range(args.reps)]
            rates = [r for r, _cpu in runs]
            cpu = statistics.median(c for _r, c in runs) * 1e6
            print(f"{name:7s} append: {statistics.median(rates):9.0f} msgs/s "
                  f"(min {min(rates):.0f}, max {max(rates):.0f}; {args.messages} messages "
                  f"in batches of {args.batch}, {args.recipients} recipients"
                  f"{', publish' if name == 'redis' and args.publish else ''}); "
                  f"CPU {cpu:.1f} us/msg, {cpu * args.batch:.0f} us/call "
                  f"(per rep: {', '.join(f'{c * 1e6:.1f}' for _r, c in runs)})")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default="memory,sqlite,redis")
    p.add_argument("--messages", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--senders", type=int, default=50)
    p.add_argument("--recipients", type=int, default=1000)
    p.add_argument("--body", type=int, default=100, help="body length in characters")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--publish", action="store_true", help="redis: publish, as in a cluster")
    p.add_argument("--redis-url", help="use this server instead of a private one (FLUSHALL!)")
    return p.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if "redis" in arguments.engines.split(",") and not arguments.redis_url:
        with private_redis() as url:
            arguments.redis_url = url
            trio.run(main, arguments)
    else:
        trio.run(main, arguments)
