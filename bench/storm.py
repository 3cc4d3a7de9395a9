#!/usr/bin/env python3
"""The connect storm alone (a benchmark, not a test): per server a fresh process, 50
warm-up connections, then --conns connections by the Node generator's idle mode
(--connect-concurrency in flight); storm = first connect attempt to last hello.

Reports per server the storm seconds, the server's CPU per connection (ms/conn), the
generator's CPU over the storm (its whole process tree, node start-up included: ~0.1 s)
and the rest of the box's busy CPU ("bg").  Servers are alternated between repetitions,
medians are printed.  ``echo`` (bench/echo_server.mjs) answers the handshake with a hello
in Node: the generator's own ceiling.  ``--pyspy OUT`` records the server (not echo)
under py-spy --format raw during each storm (OUT.<server>.<rep>.raw), for
bench/pyspy_top.py.  About 20-40 s per storm of 18,000; `--keepalive` in run.py measures
the same storm among other things in ~2 min per server.

    flock /work/bench.lock python bench/storm.py --servers echo,reference,sqlite,sqlite@new \\
        --variant new=/work/new --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import harness
from harness import IdleClients, Server, log, proc_cpu_s, tree_cpu_s


def one(name: str, a: argparse.Namespace, rep: int) -> dict:
    quiet = harness.wait_quiet(a.quiet_threshold, a.quiet_wait)
    srv = Server(name, a).start()
    spy = None
    clients = None
    try:
        pid = srv.pid
        time.sleep(1.0)
        harness.warm_up_connections(srv.url())
        time.sleep(1.0)
        if a.pyspy and srv.kind != "echo":
            out = f"{a.pyspy}.{name}.{rep}.raw"
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", str(a.pyspy_rate),
                                    "--format", "raw", "-o", out, "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        c0, b0, t0 = proc_cpu_s(pid), harness.system_busy_s(), time.monotonic()
        clients = IdleClients(srv.url(), a.conns, procs=a.procs, concurrency=a.connect_concurrency,
                              source_addrs=a.source_addrs)
        c1, b1, t1 = proc_cpu_s(pid), harness.system_busy_s(), time.monotonic()
        gen = tree_cpu_s(clients.pid)
        n = clients.ready["conns"]
        r = dict(server=name, rep=rep, quiet=quiet, conns=n, storm_s=clients.ready["storm_s"],
                 failed=clients.ready.get("failed_connects", 0), wall_s=t1 - t0,
                 srv_ms_per_conn=(c1 - c0) * 1e3 / n, srv_cores=(c1 - c0) / (t1 - t0),
                 gen_cpu_s=gen, gen_cores=gen / (t1 - t0),
                 bg_cores=max(0.0, (b1 - b0 - (c1 - c0) - gen) / (t1 - t0)))
        log(f"  storm#{rep + 1} {name:<14} {n} conns: {r['storm_s']:.2f} s, server {r['srv_ms_per_conn']:.3f} ms/conn "
            f"({r['srv_cores']:.2f} cores), generator {gen:.1f} s CPU ({r['gen_cores']:.2f} cores), "
            f"bg {r['bg_cores']:.2f}, failed {r['failed']}")
        return r
    finally:
        if spy is not None:
            spy.send_signal(2)
            spy.wait(30)
        if clients is not None:
            clients.kill()
        srv.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="echo,reference,sqlite")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--conns", type=int, default=18000)
    ap.add_argument("--connect-concurrency", type=int, default=100)
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--source-addrs", type=int, default=None, metavar="K",
                    help="the generator's loopback source addresses (loadgen.mjs --source-addrs; "
                         "default its own, 64; 0 = all from 127.0.0.1, as before 2026-12-03 11:00)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--tidings-set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--quiet-threshold", type=float, default=0.3)
    ap.add_argument("--quiet-wait", type=float, default=60.0)
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--start-retries", type=int, default=0)
    ap.add_argument("--start-retry-wait", type=float, default=20.0)
    ap.add_argument("--pyspy", default="", metavar="OUT", help="py-spy raw profile prefix")
    ap.add_argument("--pyspy-rate", type=int, default=250)
    a = ap.parse_args()
    harness.raise_nofile()
    for spec in a.variant:
        harness.add_variant(spec)
    servers = [s for s in a.servers.split(",") if s]
    for s in servers:
        kind, variant = harness.split_server(s)
        if kind in harness.TIDINGS_KINDS:
            harness.check_variant(variant, a.tidings_set)
    rows = []
    for rep in range(a.reps):
        k = rep % len(servers)
        for name in servers[k:] + servers[:k]:
            rows.append(one(name, a, rep))
    print(f"\n| server | conns | storm s | server ms/conn | server cores | generator CPU s | generator cores "
          f"| bg cores | failed |  (median of {a.reps})")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in servers:
        rs = [r for r in rows if r["server"] == name]
        m = {k: statistics.median(r[k] for r in rs) for k in
             ("storm_s", "srv_ms_per_conn", "srv_cores", "gen_cpu_s", "gen_cores", "bg_cores")}
        print(f"| {name} | {rs[0]['conns']:,} | {m['storm_s']:.2f} | {m['srv_ms_per_conn']:.3f} | {m['srv_cores']:.2f} "
              f"| {m['gen_cpu_s']:.1f} | {m['gen_cores']:.2f} | {m['bg_cores']:.2f} | {sum(r['failed'] for r in rs)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
