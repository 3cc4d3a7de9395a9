#!/usr/bin/env python3
"""RSS per idle connection when connections arrive one after another (benchmark tool).

    python -m tidings serve --config bench-idle.toml &     # auth.mode = "insecure"
    python bench/idle_sequential.py --port PORT --pid PID --conns 5000

Opens ``--conns`` plain-socket WebSocket handshakes (``?user=idleN``) without reading
the answers, measures the server's VmRSS after the first 200 (allocator warm-up) and
again ``--settle`` seconds after the last one, and prints the growth per connection.
Compare with ``run.py --idle``, where the Node generator opens thousands at once.
"""

from __future__ import annotations

import argparse
import resource
import socket
import time


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True, help="the tidings server's pid")
    ap.add_argument("--conns", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--settle", type=float, default=3.0)
    args = ap.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, (args.conns + 100, args.conns + 100))
    socks, before = [], 0
    for i in range(args.conns):
        s = socket.create_connection(("127.0.0.1", args.port))
        s.sendall(
            f"GET /ws?user=idle{i} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        socks.append(s)
        if i + 1 == args.warmup:
            time.sleep(1.0)
            before = rss_kib(args.pid)
    time.sleep(args.settle)
    after = rss_kib(args.pid)
    n = args.conns - args.warmup
    print(f"conns={args.conns} rss {before} -> {after} KiB: {(after - before) / n:.2f} KiB/conn")


if __name__ == "__main__":
    main()
