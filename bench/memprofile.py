#!/usr/bin/env python3
"""Where does the memory of an idle connection go?  (benchmark tool, not a test)

Runs one server (tidings memory/sqlite, or the reference) under tracemalloc, opens
--conns idle connections with the Node load generator, and prints, per connection:
RSS growth, Python-traced growth, and the top allocation sites (file:line) of the
difference.  RSS minus traced = allocator overhead/fragmentation + C allocations
Python does not trace.  tracemalloc itself slows the server and adds its own
overhead, so use the ratios here, not the absolute RSS (that is run.py --idle's job).

    python bench/memprofile.py --server memory --conns 5000 [--frames 1] [--top 25]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def child(argv: list[str]) -> None:
    """Run the server in this process; snapshot on 'before'/'after' lines from stdin."""
    import tracemalloc

    snaps: dict[str, tracemalloc.Snapshot] = {}

    def commands() -> None:
        for line in sys.stdin:
            cmd = line.split()
            if not cmd:
                continue
            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]
            )
            snaps[cmd[0]] = snap
            if cmd[0] == "after":
                n = int(cmd[1])
                top = int(cmd[2])
                group = cmd[3]
                diff = snaps["after"].compare_to(snaps["before"], group)
                total = sum(s.size_diff for s in diff)
                out = {"traced_bytes_per_conn": total / n, "top": []}
                for s in diff[:top]:
                    frames = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in reversed(s.traceback)]
                    out["top"].append({"bytes_per_conn": s.size_diff / n, "count_per_conn": s.count_diff / n,
                                       "where": " <- ".join(frames[:4])})
                print(json.dumps(out), flush=True)

    threading.Thread(target=commands, daemon=True).start()
    if argv[0] == "reference":
        sys.argv = [str(BENCH / "reference_server.py"), "--port", "0"]
        import runpy

        runpy.run_path(str(BENCH / "reference_server.py"), run_name="__main__")
    else:
        from tidings.cli import main

        sys.exit(main(["serve", "--config", argv[1]]))


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError


def parent(a: argparse.Namespace) -> None:
    sys.path.insert(0, str(BENCH))
    import harness

    tmp = tempfile.TemporaryDirectory(prefix="tidings-memprof-")
    if a.server == "reference":
        target = ["reference"]
    else:
        cfg = Path(tmp.name) / "t.toml"
        cfg.write_text(harness.tidings_config(a.server, Path(tmp.name) / "state", []))
        target = ["tidings", str(cfg)]
    harness.raise_nofile()
    p = subprocess.Popen([sys.executable, "-X", f"tracemalloc={a.frames}", __file__, "--child", *target],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    port = harness.listening_port(p)
    url = f"ws://127.0.0.1:{port}/ws"
    loadgen = ["node", str(BENCH / "loadgen.mjs"), "--mode", "idle", "--url", url]
    subprocess.run([*loadgen, "--conns", "50", "--hold", "0"], capture_output=True, cwd=BENCH, timeout=300)
    time.sleep(1)
    rss0 = rss_kib(p.pid)
    p.stdin.write("before\n")
    p.stdin.flush()
    time.sleep(2)  # the snapshot is taken in a thread
    lg = subprocess.Popen([*loadgen, "--conns", str(a.conns), "--hold", "600"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, cwd=BENCH)
    assert lg.stdout and lg.stdin
    ready = json.loads(lg.stdout.readline())
    time.sleep(2)
    rss1 = rss_kib(p.pid)
    p.stdin.write(f"after {ready['conns']} {a.top} {a.group}\n")
    p.stdin.flush()
    report = json.loads(p.stdout.readline())
    n = ready["conns"]
    print(f"server={a.server} conns={n}  RSS/conn {(rss1 - rss0) / n:.2f} KiB (under tracemalloc)  "
          f"traced/conn {report['traced_bytes_per_conn'] / 1024:.2f} KiB")
    print(f"{'B/conn':>8} {'objs/conn':>9}  where")
    for t in report["top"]:
        print(f"{t['bytes_per_conn']:8.0f} {t['count_per_conn']:9.2f}  {t['where']}")
    sys.stdout.flush()
    lg.stdin.write("\n")
    lg.stdin.flush()
    lg.wait(60)
    p.terminate()
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        ap.add_argument("--server", choices=["memory", "sqlite", "reference"], default="memory")
        ap.add_argument("--conns", type=int, default=5000)
        ap.add_argument("--frames", type=int, default=1, help="traceback depth (1 = group by line)")
        ap.add_argument("--group", choices=["lineno", "filename", "traceback"], default="lineno")
        ap.add_argument("--top", type=int, default=25)
        parent(ap.parse_args())
