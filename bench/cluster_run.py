#!/usr/bin/env python3
"""Cluster benchmark: 2 tidings nodes on one private Redis, and server.workers = 2.

Compared in ONE session (setups alternated per repetition, median reported) with the
single-node servers of bench/run.py (store=memory, store=sqlite):

    python bench/cluster_run.py                      # closed + open, 3 reps
    python bench/cluster_run.py --reps 2 --no-open   # closed loop only
    python bench/cluster_run.py --variant before=/tmp/before \
        --setups memory,sqlite,redis1@before,redis1,cluster2@before,cluster2   # before/after

Setups
  memory    one node, store=memory (bench/run.py config)
  sqlite    one node, store=sqlite (bench/run.py config)
  redis1    one node with cluster.redis_url (both ends of every pair on it)
  cluster2  two nodes, one Redis; senders on node 1, receivers on node 2 (loadgen --url2)
  workers2  server.workers = 2 on one fixed port (SO_REUSEPORT), one Redis

Every measurement starts a fresh redis-server (127.0.0.1, free port, temp dir,
`--save "" --appendonly yes --appendfsync everysec`, as production runs it) and fresh tidings processes.  Server CPU = the tidings
processes (both nodes, or the supervisor and its workers); Redis CPU is reported
separately.  Raw results: bench/results/cluster-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as R  # noqa: E402  (bench/harness.py: Server, CPU sampling, helpers)

LABELS = {
    "memory": "single node, store=memory",
    "sqlite": "single node, store=sqlite",
    "redis1": "single node, cluster.redis_url (same-node pairs)",
    "cluster2": "2 nodes, 1 Redis, every pair split across nodes",
    "workers2": "server.workers = 2, 1 Redis, one port",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self, probe: bool = False) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="tidings-bench-redis-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.tmp.name,
             "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no", "--loglevel", "warning",
             *(["--latency-monitor-threshold", "2"] if probe else []),
             *os.environ.get("BENCH_REDIS_ARGS", "").split()],  # diagnostics only, e.g. "--appendonly no"
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=R.renice)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def commandstats(self) -> dict:
        """INFO commandstats: {cmd: {calls, usec, usec_per_call}} (whole run incl. warm-up)."""
        out = subprocess.run(["redis-cli", "-p", str(self.port), "INFO", "commandstats"],
                             capture_output=True, text=True, timeout=10).stdout
        stats = {}
        for line in out.splitlines():
            if line.startswith("cmdstat_"):
                name, _, kv = line.partition(":")
                d = dict(x.split("=", 1) for x in kv.split(","))
                stats[name[8:]] = {k: float(d[k]) for k in ("calls", "usec", "usec_per_call")}
        return stats

    def diagnostics(self) -> dict:
        """What Redis saw of stalls over the run (``--probe``): AOF counters of INFO
        persistence, LATENCY LATEST (events over 2 ms), SLOWLOG (commands over 10 ms)."""
        def cli(*args: str) -> str:
            return subprocess.run(["redis-cli", "-p", str(self.port), *args], check=False,
                                  capture_output=True, text=True, timeout=10).stdout
        keep = ("aof_rewrites", "aof_rewrite_in_progress", "aof_last_rewrite_time_sec", "aof_current_size",
                "aof_base_size", "aof_delayed_fsync", "aof_pending_bio_fsync", "aof_last_write_status")
        info = dict(ln.split(":", 1) for ln in cli("INFO", "persistence").splitlines() if ":" in ln)
        return {"persistence": {k: info.get(k, "").strip() for k in keep},
                "latency_latest": cli("LATENCY", "LATEST").split(),
                "slowlog_len": cli("SLOWLOG", "LEN").strip()}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.tmp.cleanup()


class Node(R.Server):
    """A tidings process with a custom config (cluster node or workers supervisor)."""

    def __init__(self, name: str, a: argparse.Namespace, redis_url: str, port: int = 0,
                 workers: int = 1, variant: str = "") -> None:
        super().__init__("memory@" + variant if variant else "memory", a)
        self.name, self.redis_url, self.fixed_port, self.workers = name, redis_url, port, workers
        self.listen_ports: list[int] = []

    def command(self) -> list[str]:
        self.tmp = tempfile.TemporaryDirectory(prefix=f"tidings-bench-{self.name}-")
        self.probe_out = Path(tempfile.gettempdir()) / f"tidings-nodeprobe-{os.getpid()}-{self.name}.json"
        cfg = Path(self.tmp.name) / "tidings.toml"
        cfg.write_text("\n".join([
            "[server]", 'host = "127.0.0.1"', f"port = {self.fixed_port}",
            f"state_dir = {json.dumps(str(Path(self.tmp.name) / 'state'))}", 'log_level = "info"',
            f"workers = {self.workers}", "",
            "[auth]", 'mode = "insecure"', "",
            "[api]", 'listen = ""', "",
            "[limits]", "messages_per_second = 1000000.0", "burst = 1000000",
            "max_connections = 20000", "max_connections_per_user = 16", "",
            "[cluster]", f"redis_url = {json.dumps(self.redis_url)}", "",
        ]))
        if self.args.probe:  # the same daemon with loop-stall probes (bench/nodeprobe.py)
            return [sys.executable, str(Path(__file__).resolve().parent / "nodeprobe.py"),
                    "serve", "--config", str(cfg)]
        return [*R.tidings_cmd(), "serve", "--config", str(cfg)]

    def env(self) -> dict[str, str] | None:
        env = super().env()
        if self.args.probe:
            env = dict(env or os.environ, NODEPROBE_OUT=str(self.probe_out))
        return env

    def probe_events(self) -> dict | None:
        """bench/nodeprobe.py's events (after stop()), or None."""
        try:
            events = json.loads(self.probe_out.read_text())
            self.probe_out.unlink()
            return events
        except (OSError, ValueError, AttributeError):
            return None

    def _drain(self) -> None:  # like Server._drain, but wait for every worker's listening line
        assert self.proc and self.proc.stderr
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.nlines += 1
            self.lines.append(line)
            if "event=listening" in line:
                for tok in line.split():
                    if tok.startswith("port="):
                        self.listen_ports.append(int(tok[5:]))
                if len(self.listen_ports) >= self.workers and self.port is None:
                    self.port = self.listen_ports[0]
                    self._port_evt.set()
        self._port_evt.set()


def conn_spread(port: int, pids: list[int]) -> dict[int, int]:
    """Established client connections on `port` per tidings process (ss -p)."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True).stdout
    counts: collections.Counter[int] = collections.Counter()
    for line in out.splitlines():
        for pid in re.findall(r"pid=(\d+)", line):
            if int(pid) in pids:
                counts[int(pid)] += 1
    return dict(counts)


def run_lg(urls: tuple[str, str | None], server_root_pids: list[int], redis_pid: int | None,
           lg_args: list[str], a: argparse.Namespace, spread_port: int | None = None,
           profile_tag: str = "") -> dict:
    """run.py's load generator driver with the nodes' CPU summed over their process
    trees (and each node's apart: ``node<i>_cores``), redis-server's CPU apart, and the
    connection spread over workers.  ``profile_tag``: py-spy every node process
    (bench/results/profile-cluster-<tag>-node<i>-<time>.raw; see ``--profile``)."""
    def srv_cpu() -> float:
        return sum(R.tree_cpu_s(pid) for pid in server_root_pids)

    def spread(box: dict) -> None:
        if spread_port is not None:
            kids = [q for root in server_root_pids for q in R.tree_pids(root)]
            box["conn_spread"] = conn_spread(spread_port, kids)

    side = {"redis": lambda: R.proc_cpu_s(redis_pid)} if redis_pid else {}
    detail = ({f"node{i + 1}": (lambda pid=pid: R.tree_cpu_s(pid)) for i, pid in enumerate(server_root_pids)}
              if len(server_root_pids) > 1 else {})
    stamp = time.strftime("%Y%m%d-%H%M%S")
    profiles = [(pid, R.RESULTS / f"profile-cluster-{profile_tag}-node{i + 1}-{stamp}.raw")
                for i, pid in enumerate(server_root_pids)] if profile_tag else []
    res = R.drive_loadgen(urls[0], srv_cpu, lg_args, a.warmup, a.duration, url2=urls[1],
                          side_cpu=side, on_go=spread, detail_cpu=detail, profiles=profiles)
    if profiles:
        time.sleep(2)  # py-spy writes its file when its --duration is over
        res["profiles"] = [str(path) for _pid, path in profiles]
    res.setdefault("redis_cores", 0.0)
    return res


def measure(setup: str, mode: str, a: argparse.Namespace) -> dict:
    quiet = R.wait_quiet(a.quiet_threshold, a.quiet_wait)
    lg = (R.loadgen_args_closed(a) if mode == "closed" else R.loadgen_args_open(a))
    redis = None
    nodes: list[R.Server] = []
    spread_port = None
    try:
        kind, variant = R.split_server(setup)
        if kind in ("memory", "sqlite"):
            nodes = [R.Server(setup, a).start()]
            urls = (nodes[0].url(), None)
        else:
            redis = Redis(probe=a.probe)
            if kind == "redis1":
                nodes = [Node("n1", a, redis.url, variant=variant).start()]
                urls = (nodes[0].url(), None)
            elif kind == "cluster2":
                nodes = [Node("n1", a, redis.url, variant=variant).start(),
                         Node("n2", a, redis.url, variant=variant).start()]
                urls = (nodes[0].url(), nodes[1].url())
            elif kind == "workers2":
                port = free_port()
                nodes = [Node("w", a, redis.url, port=port, workers=2, variant=variant).start()]
                urls = (nodes[0].url(), None)
                spread_port = port
            else:
                raise ValueError(setup)
        tag = f"{mode}-{setup.replace('@', '-')}" if a.profile else ""
        res = run_lg(urls, [n.pid for n in nodes], redis.pid if redis else None, lg, a, spread_port, tag)
    finally:
        alive = all(n.alive() for n in nodes)
        rcs = [n.stop() for n in nodes]
        cstats = None
        if redis:
            try:
                cstats = redis.commandstats()
                res["redis_diagnostics"] = redis.diagnostics()
            except Exception as e:  # noqa: BLE001
                R.log(f"  commandstats failed: {e}")
            redis.stop()
    if a.probe:
        res["node_probes"] = [n.probe_events() for n in nodes if isinstance(n, Node)]
        stalls(res)
    if cstats:
        res["redis_commandstats"] = cstats
        ev = sum(v["calls"] for k, v in cstats.items() if k in ("evalsha", "eval", "fcall"))
        if ev:
            res["redis_script_calls"] = ev
            res["msgs_per_script_call"] = res["sent"] / ev
    res.update(setup=setup, mode=mode, pre_quiet_cores=quiet, server_exit=rcs, server_alive_at_end=alive,
               server_log_tail=[ln for n in nodes for ln in list(n.lines)[-3:]])
    svc, lag = res.get("service_latency_ms") or {}, res.get("send_lag_ms") or {}
    res["disturbed"] = disturbed(res, a)
    rd = res.get("redis_diagnostics") or {}
    if rd.get("latency_latest"):  # event, time, latest ms, max ms (latency-monitor-threshold)
        ll = rd["latency_latest"]
        R.log("    redis latency max ms: " + ", ".join(f"{ll[i]} {ll[i + 3]}" for i in range(0, len(ll) - 3, 4))
              + f"; aof_delayed_fsync {rd['persistence'].get('aof_delayed_fsync')}")
    R.log(f"  {mode:<6} {setup:<9} {res['msgs_per_s']:>7} msgs/s  p50 {res['p50_ms']} p99 {res['p99_ms']} ms  "
          f"(from the actual send p99 {svc.get('p99')}; send lag p99 {lag.get('p99')} max {lag.get('max')}; "
          f"max {res.get('max_ms')}; 100 ms slices with > 10 ms: "
          f"{sum(1 for b in res.get('buckets_100ms', []) if b[3])}) "
          f"srv {res.get('server_cores', 0):.2f} redis {res.get('redis_cores', 0):.2f} "
          f"gen {res.get('gen_cores_sampled', 0):.2f} bg {res.get('bg_cores', 0):.2f} "
          + "".join(f"{k[:-6]} {v:.2f} " for k, v in res.items() if k.startswith("node") and k.endswith("_cores"))
          + f" errors {res['errors']} "
          f"closes {res['unexpected_closes']} missing {res.get('missing', 0)} spread {res.get('conn_spread')} "
          f"msgs/script {res.get('msgs_per_script_call', 0):.1f}"
          + (f"  DISTURBED: {res['disturbed']}" if res["disturbed"] else ""))
    if res["errors"] or res["unexpected_closes"] or res["connect_errors"]:
        R.log(f"    !! {res.get('last_error_frame') or res.get('last_error')}")
    return res


def disturbed(res: dict, a: argparse.Namespace) -> str:
    """Why this repetition measured the box rather than the servers, or "".

    Open loop only.  The generator sends on a schedule; when it is itself more than
    ``--disturbed-lag-ms`` late (send lag max), it was off the CPU that long, and so was
    everything else on the box (its receipts are late too): a stall of the box.  More
    than ``--disturbed-bg`` cores used by processes outside the run (``bg_cores``, e.g.
    another engineer's tests) is foreign load.  On this 2-core box either one put a 5 s
    window's p99 over 10 ms in 12 of 13 repetitions, whatever the servers did
    (docs/cluster.md, "fifth session")."""
    if res.get("mode") != "open" and "send_lag_ms" not in res:
        return ""
    why = []
    lag_max = (res.get("send_lag_ms") or {}).get("max") or 0
    if lag_max > a.disturbed_lag_ms:
        why.append(f"generator {lag_max:.0f} ms late")
    if res.get("bg_cores", 0) > a.disturbed_bg:
        why.append(f"other load {res['bg_cores']:.2f} cores")
    return ", ".join(why)


def stalls(res: dict) -> None:
    """--probe: print, for each 100 ms of the window holding messages over 10 ms, what
    the nodes' probes (loop lag, long task steps, gc) and the generator saw then."""
    t0 = res.get("window_start_epoch_ms")
    if t0 is None:
        return
    R.log(f"    redis: {res.get('redis_diagnostics')}")
    for i, ev in enumerate(res.get("node_probes") or []):
        if not ev:
            continue
        inwin = [x for x in ev["lags"] if t0 <= x[0] < t0 + res["duration_s"] * 1e3]
        R.log(f"    node{i + 1}: loop lag > 2 ms in the window: {len(inwin)}, max "
              f"{max((x[1] for x in inwin), default=0):.1f} ms; gc > 1 ms: "
              f"{[(g[1], g[2]) for g in ev['gc'] if t0 <= g[0] < t0 + res['duration_s'] * 1e3]}")
    for start, n, over5, over10, mx, lagmx in res.get("buckets_100ms", []):
        if not over10:
            continue
        lo, hi = t0 + start - 30, t0 + start + 130  # a stall can precede the slice it hurts
        seen = []
        for i, ev in enumerate(res.get("node_probes") or []):
            if not ev:
                continue
            lg = [x[1] for x in ev["lags"] if lo <= x[0] < hi]
            st = [f"{x[3]} {x[1]}/{x[2]}cpu" for x in ev["steps"] if lo <= x[0] < hi]
            gcs = [f"gen{x[1]} {x[2]}" for x in ev["gc"] if lo <= x[0] < hi]
            seen.append(f"node{i + 1} lag max {max(lg, default=0):.1f} steps {st[:3]} gc {gcs}")
        R.log(f"    t+{start / 1e3:.1f}s: {n} msgs, >5 ms {over5}, >10 ms {over10}, max {mx} ms, "
              f"send lag max {lagmx} ms | " + " | ".join(seen))


def label(setup: str) -> str:
    kind, variant = R.split_server(setup)
    return LABELS[kind] + (f" @{variant}" if variant else "")


def table(rows: list[dict], setups: list[str], title: str) -> str:
    med, fmt = R.med, R.fmt
    by = {s: [r for r in rows if r["setup"] == s] for s in setups}
    base = {k: med([r["msgs_per_s"] for r in by.get(k, [])]) for k in ("memory", "sqlite")}
    out = [f"### {title}", "",
           "| setup | msgs/s (median) | min-max | vs memory | vs sqlite | p50 ms | p99 ms | server CPU (cores) "
           "| redis-server CPU | server+redis us/msg | gen CPU | bg CPU | errors | missing |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in setups:
        rs = by[s]
        if not rs:
            continue
        m = med([r["msgs_per_s"] for r in rs])
        runs = [r["msgs_per_s"] for r in rs]
        us = med([(r["server_cores"] + r["redis_cores"]) * 1e6 / r["msgs_per_s"] for r in rs if r["msgs_per_s"]])
        out.append(
            f"| {label(s)} | {m:,.0f} | {min(runs):,}-{max(runs):,} "
            f"| {fmt(m / base['memory'] if base['memory'] else None)} | {fmt(m / base['sqlite'] if base['sqlite'] else None)} "
            f"| {fmt(med([r['p50_ms'] for r in rs]))} | {fmt(med([r['p99_ms'] for r in rs]))} "
            f"| {fmt(med([r['server_cores'] for r in rs]))} | {fmt(med([r['redis_cores'] for r in rs]))} "
            f"| {fmt(us, 1)} | {fmt(med([r['gen_cores_sampled'] for r in rs]))} | {fmt(med([r['bg_cores'] for r in rs]))} "
            f"| {sum(r['errors'] + r['unexpected_closes'] + r['connect_errors'] for r in rs)} "
            f"| {sum(r.get('missing', 0) for r in rs)} |")
    out.append("")
    out.append("Per-run msgs/s: " + "; ".join(f"{s}: {[r['msgs_per_s'] for r in by[s]]}" for s in setups if by[s]))
    if any("send_lag_ms" in r for r in rows):
        out.append("")
        out.append("p99 ms per repetition (* = disturbed: the generator stalled or other load, see "
                   "`disturbed()`), and the median of the undisturbed ones:")
        for s in setups:
            if by[s]:
                clean = [r["p99_ms"] for r in by[s] if not r.get("disturbed")]
                out.append(f"- {s}: " + " / ".join(f"{r['p99_ms']:.1f}{'*' if r.get('disturbed') else ''}"
                                                     for r in by[s])
                           + f"; undisturbed median {fmt(med(clean)) if clean else '-'} ({len(clean)} of {len(by[s])})")
    mps = {s: R.med([r.get("msgs_per_script_call") for r in by[s]]) for s in setups if by[s]}
    mps = {s: v for s, v in mps.items() if v}
    if mps:
        out.append("")
        out.append("Messages per append-script call (Redis INFO commandstats, whole run): "
                   + "; ".join(f"{s}: {v:.1f}" for s, v in mps.items()))
    sp = [r.get("conn_spread") for r in rows if r.get("conn_spread")]
    if sp:
        out.append("")
        out.append("server.workers connection spread (established WebSocket connections per worker pid, "
                   "100 per run): " + "; ".join(str(sorted(x.values())) for x in sp))
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", default="memory,sqlite,redis1,cluster2,workers2")
    ap.add_argument("--open-setups", default="memory,cluster2")
    ap.add_argument("--no-open", action="store_true")
    ap.add_argument("--no-closed", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--client-ack", type=int, default=0)
    ap.add_argument("--quiet-threshold", type=float, default=0.3)
    ap.add_argument("--quiet-wait", type=float, default=30.0)
    ap.add_argument("--start-retries", type=int, default=0)
    ap.add_argument("--start-retry-wait", type=float, default=5.0)
    ap.add_argument("--profile", action="store_true",
                    help="py-spy every node process of every run (rate: BENCH_PYSPY_RATE, default 100 Hz) "
                         "and print bench/pyspy_top.py of each; profiled figures are not comparable with "
                         "unprofiled ones")
    ap.add_argument("--disturbed-lag-ms", type=float, default=10.0,
                    help="open loop: a repetition whose generator was more than this late sending is "
                         "marked disturbed (a stall of the box)")
    ap.add_argument("--disturbed-bg", type=float, default=0.1,
                    help="open loop: ... or that had more than this many cores of other load")
    ap.add_argument("--probe", action="store_true",
                    help="run the nodes under bench/nodeprobe.py (loop lag, long task steps, gc), turn "
                         "on Redis' latency monitor, and print what they saw in each 100 ms of the "
                         "window that held messages over 10 ms; probed figures are not comparable "
                         "with unprobed ones")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                    help="another checkout (its daemon/ first on PYTHONPATH): name setups "
                         "<setup>@NAME, e.g. redis1@before (before/after in one run)")
    a = ap.parse_args()
    a.tidings_set = []
    for spec in a.variant:
        R.check_variant(R.add_variant(spec), [])
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server not found")
    R.raise_nofile()
    info = R.machine_info()
    R.log(f"machine: {info}")
    raw: dict = dict(machine=info, args=vars(a), results={})
    R.RESULTS.mkdir(exist_ok=True)
    path = R.RESULTS / f"cluster-{time.strftime('%Y%m%d-%H%M%S')}.json"
    md = [f"Run {info['date']} on {info['cpus']} CPUs ({info['cpu']}), Python {info['python']}, "
          f"Node {info['node']}; loadgen procs {a.procs}; reps {a.reps}.\n"]
    for mode, setups in (("closed", a.setups), ("open", a.open_setups)):
        if (mode == "closed" and a.no_closed) or (mode == "open" and a.no_open):
            continue
        setups_l = [s for s in setups.split(",") if s]
        rows = []
        for rep in range(a.reps):
            order = setups_l[rep % len(setups_l):] + setups_l[: rep % len(setups_l)]
            for s in order:
                try:
                    r = measure(s, mode, a)
                except Exception as e:
                    R.log(f"  {mode} {s} FAILED: {e}")
                    continue
                r["rep"] = rep + 1
                rows.append(r)
                for prof in r.get("profiles", []):
                    top = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "pyspy_top.py"),
                                          prof, "25"], check=False, capture_output=True, text=True).stdout
                    md.append(f"py-spy {prof} ({s}, rep {rep + 1}):\n```\n{top}```\n")
                raw["results"][mode] = rows
                path.write_text(json.dumps(raw, indent=1, default=str))
        title = (f"Closed loop P={a.pairs} W={a.window} S={a.size}, {a.duration:g} s after {a.warmup:g} s warm-up"
                 if mode == "closed" else f"Open loop {a.rate:,} msgs/s, P={a.pairs}, S={a.size}, {a.duration:g} s")
        md.append(table(rows, setups_l, title))
    print("\n".join(md))
    R.log(f"raw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
