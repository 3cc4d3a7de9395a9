#!/usr/bin/env python3
"""Tidings benchmark harness (a benchmark, not a test: pytest never runs it).

In ONE run it starts each server as a subprocess on a free 127.0.0.1 port
(reference = asyncio `websockets` router, tidings with store.backend="memory",
tidings with store.backend="sqlite" in a temp state dir, and a Node echo server for
the generator ceiling), drives them with the Node `ws` load generator
(bench/loadgen.mjs) and prints markdown tables.

    python bench/run.py --all                 # everything, 3 reps (15-25 min on a shared box)
    python bench/run.py --closed --reps 3     # closed loop P=50 W=20 S=100, 10 s
    python bench/run.py --open                # open loop 5,000 msgs/s, 10 s
    python bench/run.py --idle                # RSS per idle connection at 5,000
    python bench/run.py --ceiling             # generator vs echo server
    python bench/run.py --closed --servers reference,memory   # subset

Every measurement starts a FRESH server process (fresh state dir, fresh user names),
the servers are alternated between repetitions (rep k starts at server k), and the
median of the repetitions is reported with the min-max range.  Before each
measurement the harness waits (up to --quiet-wait s) for the box to be quiet
(background CPU < --quiet-threshold cores) and it records, for the measurement
window, the CPU used by the server, by the generator and by everything else
("bg"), so a noisy neighbour shows up in the table instead of silently skewing it.
Raw results go to bench/results/run-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LOADGEN = BENCH / "loadgen.mjs"
RESULTS = BENCH / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
FAILURES: list[str] = []

SERVER_LABELS = {
    "reference": "reference (asyncio websockets 17.4)",
    "memory": "tidings (store=memory)",
    "sqlite": "tidings (store=sqlite)",
    "echo": "node ws echo (ceiling)",
}


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


NICE = 0


def renice() -> None:
    """preexec_fn for servers and generators.

    Linux autogroups (kernel.sched_autogroup_enabled=1, the case on this box) share the
    CPU between *sessions* first and apply plain nice only inside a session.  So each
    server/generator gets its own session (setsid -> its own autogroup): otherwise the
    server and the generator would split ONE session's share against every other
    engineer's test session.  --nice N then sets that autogroup's nice (needs root;
    N < 0 puts the measurement ahead of other work, starving it for the duration)."""
    os.setsid()
    if NICE:
        try:
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(NICE))
        except OSError:
            pass
        try:
            os.nice(NICE)
        except PermissionError:
            pass


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < 12000:
        log(f"warning: RLIMIT_NOFILE hard limit is {hard}; the idle scenario needs > 10,000 fds")


# ----------------------------------------------------------------- /proc sampling
def proc_cpu_s(pid: int) -> float:
    """utime+stime of a process (all threads), seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0


def tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children[ppid].append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def tree_cpu_s(root: int) -> float:
    return sum(proc_cpu_s(p) for p in tree_pids(root))


def system_busy_s() -> float:
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    v = [int(x) for x in parts]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return (sum(v[:8]) - idle) / CLK_TCK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def wait_quiet(threshold: float, max_wait: float) -> float:
    """Wait until the whole box uses < threshold cores (1 s samples); return last sample."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = system_busy_s(), time.monotonic()
        time.sleep(1.0)
        busy = (system_busy_s() - b0) / (time.monotonic() - t0)
        if busy < threshold or time.monotonic() >= deadline:
            if busy >= threshold:
                log(f"  box still busy ({busy:.2f} cores) after {max_wait:.0f}s; measuring anyway")
            return busy
        log(f"  box busy ({busy:.2f} cores used by others), waiting...")


# ----------------------------------------------------------------- servers
class Server:
    def __init__(self, kind: str, args: argparse.Namespace) -> None:
        self.kind = kind
        self.args = args
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.nlines = 0
        self._port_evt = threading.Event()

    def command(self) -> list[str]:
        if self.kind == "reference":
            return [sys.executable, str(BENCH / "reference_server.py"), "--port", "0"]
        if self.kind == "echo":
            return ["node", str(BENCH / "echo_server.mjs"), "--port", "0", "--acks"]
        self.tmp = tempfile.TemporaryDirectory(prefix=f"tidings-bench-{self.kind}-")
        cfg = Path(self.tmp.name) / "tidings.toml"
        cfg.write_text(tidings_config(self.kind, Path(self.tmp.name) / "state", self.args.tidings_set))
        return [*tidings_cmd(), "serve", "--config", str(cfg)]

    def start(self) -> "Server":
        """Start; if it exits before listening (e.g. the daemon is mid-edit), retry
        --start-retries times, --start-retry-wait s apart."""
        for attempt in range(self.args.start_retries + 1):
            try:
                return self._start_once()
            except RuntimeError as e:
                if attempt == self.args.start_retries:
                    raise
                log(f"  {self.kind}: failed to start ({str(e).splitlines()[-1][:160]}); "
                    f"retrying in {self.args.start_retry_wait:g}s")
                time.sleep(self.args.start_retry_wait)
                self.lines.clear()
                self.port = None
                self._port_evt = threading.Event()
        raise AssertionError

    def _start_once(self) -> "Server":
        cmd = self.command()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, cwd=str(ROOT), preexec_fn=renice)
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._port_evt.wait(30) or self.port is None:
            self.stop()
            raise RuntimeError(f"{self.kind}: no `event=listening ... port=` line within 30 s; "
                               f"exit={self.proc.poll()} stderr tail:\n" + "\n".join(list(self.lines)[-20:]))
        return self

    def _drain(self) -> None:
        assert self.proc and self.proc.stderr
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.nlines += 1
            self.lines.append(line)
            if self.port is None and "event=listening" in line:
                for tok in line.split():
                    if tok.startswith("port="):
                        self.port = int(tok[5:])
                        self._port_evt.set()
        self._port_evt.set()

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws" if self.kind != "echo" else f"ws://127.0.0.1:{self.port}/"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        rc = None
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(15)
            except subprocess.TimeoutExpired:
                log(f"  {self.kind}: did not exit 15 s after SIGTERM; killing")
                self.proc.kill()
                rc = self.proc.wait()
        elif self.proc:
            rc = self.proc.returncode
        if self.tmp:
            self.tmp.cleanup()
            self.tmp = None
        return rc


def tidings_cmd() -> list[str]:
    exe = shutil.which("tidings")
    return [exe] if exe else [sys.executable, "-m", "tidings"]


def toml_value(v: str) -> str:
    """--tidings-set values: numbers/booleans stay bare, anything else is quoted."""
    if v in ("true", "false"):
        return v
    try:
        float(v)
        return v
    except ValueError:
        return json.dumps(v)


def tidings_config(backend: str, state_dir: Path, overrides: list[str]) -> str:
    conf: dict[str, dict[str, str]] = {
        "server": {"host": '"127.0.0.1"', "port": "0", "state_dir": json.dumps(str(state_dir)),
                   "log_level": '"info"'},
        "auth": {"mode": '"insecure"'},
        "limits": {"messages_per_second": "1000000.0", "burst": "1000000",
                   "max_connections": "20000", "max_connections_per_user": "16"},
        "store": {"backend": json.dumps(backend)},
    }
    for item in overrides:
        key, _, val = item.partition("=")
        section, _, name = key.partition(".")
        conf.setdefault(section, {})[name] = toml_value(val)
    out = []
    for section, kv in conf.items():
        out.append(f"[{section}]")
        out.extend(f"{k} = {v}" for k, v in kv.items())
        out.append("")
    return "\n".join(out)


def tidings_available() -> tuple[bool, str]:
    try:
        r = subprocess.run([sys.executable, "-c", "import tidings.server.daemon, tidings.cli"],
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return False, "import timed out"
    if r.returncode:
        return False, (r.stderr.strip().splitlines() or ["?"])[-1]
    return True, ""


def check_tidings_config(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "t.toml"
        cfg.write_text(tidings_config("memory", Path(d) / "state", args.tidings_set))
        r = subprocess.run([*tidings_cmd(), "check-config", str(cfg)], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"tidings check-config rejected the bench config:\n{cfg.read_text()}\n{r.stderr}")


# ----------------------------------------------------------------- load generator
def run_loadgen(server: Server, lg_args: list[str], warmup: float, duration: float,
                profile: Path | None = None) -> dict:
    """Run a closed/open loop against one server process (see ``drive_loadgen``)."""
    return drive_loadgen(
        server.url(), lambda: proc_cpu_s(server.pid), lg_args, warmup, duration,
        profile_pid=server.pid if profile is not None else None, profile=profile)


def drive_loadgen(url: str, server_cpu: Callable[[], float], lg_args: list[str], warmup: float,
                  duration: float, *, url2: str | None = None,
                  side_cpu: dict[str, Callable[[], float]] | None = None,
                  on_go: Callable[[dict], None] | None = None,
                  profile_pid: int | None = None, profile: Path | None = None) -> dict:
    """Run a closed/open loop; sample CPU over the measurement window: the server's
    (``server_cpu``: seconds used so far), the generator's, each of ``side_cpu`` (e.g.
    redis-server: ``<name>_cores``) and the rest of the box (``bg_cores``).  ``url2``:
    receivers connect there (pairs split across two nodes); ``on_go(box)`` runs when the
    generator starts sending."""
    cmd = ["node", str(LOADGEN), "--url", url, *(["--url2", url2] if url2 else []), *lg_args]
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=str(BENCH), preexec_fn=renice)
    side = side_cpu or {}
    box: dict = {}
    go = threading.Event()
    out_lines: list[str] = []
    err_chunks: list[str] = []

    def reader() -> None:
        assert p.stdout
        for line in p.stdout:
            out_lines.append(line)
            if line.startswith('{"event":"go"'):
                go.set()
        go.set()

    def err_reader() -> None:
        assert p.stderr
        err_chunks.append(p.stderr.read())

    def sample() -> tuple:
        return (server_cpu(), {k: f() for k, f in side.items()}, tree_cpu_s(p.pid),
                system_busy_s(), time.monotonic())

    def sampler() -> None:
        # the measurement window starts `warmup` s after the generator's "go" line
        go.wait()
        if on_go is not None:
            on_go(box)
        time.sleep(warmup)
        if profile is not None and profile_pid is not None:
            # py-spy samples from its own process (~100 Hz): small but non-zero cost, so
            # profiled runs are never counted in the tables
            subprocess.Popen(["py-spy", "record", "--pid", str(profile_pid), "--duration",
                              str(max(1, int(duration) - 1)), "--format", "raw", "--nonblocking",
                              "-o", str(profile)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        s0, x0, g0, b0, t0 = sample()
        time.sleep(max(0.5, duration - 0.3))
        s1, x1, g1, b1, t1 = sample()
        dtw = t1 - t0
        box.update(server_cores=(s1 - s0) / dtw, gen_cores_sampled=(g1 - g0) / dtw,
                   box_cores=(b1 - b0) / dtw)
        for k in side:
            box[f"{k}_cores"] = (x1[k] - x0[k]) / dtw
        box["bg_cores"] = max(0.0, box["box_cores"] - box["server_cores"] - box["gen_cores_sampled"]
                              - sum(box[f"{k}_cores"] for k in side))

    threads = [threading.Thread(target=f, daemon=True) for f in (reader, err_reader, sampler)]
    for th in threads:
        th.start()
    try:
        p.wait(timeout=warmup + duration + 120)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    except BaseException:
        p.kill()
        raise
    for th in threads:
        th.join(timeout=5)
    out, err = "".join(out_lines), "".join(err_chunks)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        raise RuntimeError(f"loadgen failed rc={p.returncode}\nstdout:{out[-2000:]}\nstderr:{err[-2000:]}")
    res = json.loads(lines[-1])
    res.update(box)
    return res


def loadgen_args_closed(a: argparse.Namespace, proto: str = "tidings", procs: int | None = None) -> list[str]:
    return ["--mode", "closed", "--proto", proto, "--procs", str(procs or a.procs), "--pairs", str(a.pairs),
            "--window", str(a.window), "--size", str(a.size), "--duration", str(a.duration),
            "--warmup", str(a.warmup), "--client-ack", str(a.client_ack)]


def loadgen_args_open(a: argparse.Namespace, proto: str = "tidings", procs: int | None = None) -> list[str]:
    return ["--mode", "open", "--proto", proto, "--procs", str(procs or a.procs), "--pairs", str(a.pairs),
            "--rate", str(a.rate), "--size", str(a.size), "--duration", str(a.duration),
            "--warmup", str(a.warmup), "--client-ack", str(a.client_ack)]


def measure_loop(kind: str, a: argparse.Namespace, lg_args: list[str], label: str) -> dict:
    quiet = wait_quiet(a.quiet_threshold, a.quiet_wait)
    srv = Server(kind, a).start()
    try:
        res = run_loadgen(srv, lg_args, a.warmup, a.duration)
    finally:
        alive = srv.alive()
        rc = srv.stop()
    res.update(server=kind, pre_quiet_cores=quiet, server_exit=rc, server_alive_at_end=alive,
               server_log_lines=srv.nlines, server_log_tail=list(srv.lines)[-5:])
    log(f"  {label:<10} {kind:<9} {res['msgs_per_s']:>7} msgs/s  p50 {res['p50_ms']} p99 {res['p99_ms']} "
        f"max {res['max_ms']} ms  srv {res.get('server_cores', 0):.2f} gen {res.get('gen_cores_sampled', 0):.2f} "
        f"bg {res.get('bg_cores', 0):.2f} cores  errors {res['errors']} closes {res['unexpected_closes']}")
    if res["errors"] or res["unexpected_closes"] or res["connect_errors"]:
        log(f"    !! {res.get('last_error_frame') or res.get('last_error')} close={res.get('last_close_code')}")
    return res


def scenario_loop(name: str, servers: list[str], a: argparse.Namespace, make_args) -> list[dict]:
    out = []
    for rep in range(a.reps):
        order = servers[rep % len(servers):] + servers[: rep % len(servers)]
        for kind in order:
            try:
                r = measure_loop(kind, a, make_args(a), f"{name}#{rep + 1}")
            except Exception as e:  # a crashed server must not lose the other results
                log(f"  {name}#{rep + 1}   {kind:<9} FAILED: {e}")
                FAILURES.append(f"{name}#{rep + 1} {kind}: {str(e).splitlines()[0] if str(e) else repr(e)}")
                continue
            r["rep"] = rep + 1
            out.append(r)
    return out


def scenario_idle(servers: list[str], a: argparse.Namespace) -> list[dict]:
    out = []
    for rep in range(a.reps):
        order = servers[rep % len(servers):] + servers[: rep % len(servers)]
        for kind in order:
            try:
                out.append(measure_idle(kind, rep, a))
            except Exception as e:
                log(f"  idle#{rep + 1}    {kind:<9} FAILED: {e}")
                FAILURES.append(f"idle#{rep + 1} {kind}: {str(e).splitlines()[0] if str(e) else repr(e)}")
    return out


def measure_idle(kind: str, rep: int, a: argparse.Namespace) -> dict:
    wait_quiet(a.quiet_threshold, a.quiet_wait)
    srv = Server(kind, a).start()
    try:
        # warm the code paths (imports, first-connection allocations) before "before"
        subprocess.run(["node", str(LOADGEN), "--mode", "idle", "--url", srv.url(), "--conns", "50",
                        "--hold", "0"], capture_output=True, text=True, cwd=str(BENCH), timeout=120)
        time.sleep(1.0)
        before = rss_kib(srv.pid)
        p = subprocess.Popen(["node", str(LOADGEN), "--mode", "idle", "--url", srv.url(),
                              "--conns", str(a.conns), "--hold", "60", "--procs", str(a.procs),
                              "--connect-concurrency", "100"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=str(BENCH), preexec_fn=renice)
        assert p.stdout and p.stdin
        ready_line = p.stdout.readline()
        if not ready_line.startswith("{"):
            p.kill()
            raise RuntimeError(f"idle loadgen failed: {ready_line}{p.stderr.read() if p.stderr else ''}")
        ready = json.loads(ready_line)
        if "error" in ready:
            raise RuntimeError(f"idle loadgen failed: {ready}")
        # Sample once the server has gone idle: a store may still be doing per-connection
        # work (replay reads) after every hello was sent.  How long that took is reported.
        rss_at_ready = rss_kib(srv.pid)
        t_ready = time.monotonic()
        while time.monotonic() - t_ready < 60:
            c0 = proc_cpu_s(srv.pid)
            time.sleep(0.5)
            if (proc_cpu_s(srv.pid) - c0) / 0.5 < 0.05:
                break
        busy_after_ready = time.monotonic() - t_ready - 0.5
        time.sleep(a.idle_settle)
        after = rss_kib(srv.pid)
        cpu_idle0 = proc_cpu_s(srv.pid)
        time.sleep(1.0)
        idle_cores = proc_cpu_s(srv.pid) - cpu_idle0
        p.stdin.write("\n")
        p.stdin.flush()
        final_out, err = p.communicate(timeout=120)
        final = json.loads([ln for ln in final_out.splitlines() if ln.startswith("{")][-1])
    finally:
        rc = srv.stop()
    per = (after - before) / ready["conns"]
    r = dict(server=kind, rep=rep + 1, conns=ready["conns"], connect_s=ready["connect_s"],
             rss_before_kib=before, rss_after_kib=after, kib_per_conn=per,
             server_cores_while_idle=idle_cores, rss_at_ready_kib=rss_at_ready,
             busy_after_ready_s=busy_after_ready, connect_errors=final.get("connect_errors"),
             unexpected_closes=final.get("unexpected_closes"), server_exit=rc)
    log(f"  idle#{rep + 1}    {kind:<9} {ready['conns']} conns in {ready['connect_s']:.1f}s  RSS {before}"
        f" -> {after} KiB  = {per:.2f} KiB/conn  (busy {busy_after_ready:.1f}s after the last hello; "
        f"then idle CPU {idle_cores:.2f} cores)")
    return r


def scenario_ceiling(a: argparse.Namespace) -> list[dict]:
    out = []
    for rep in range(a.reps):
        for procs in a.ceiling_procs:
            try:
                r = measure_loop("echo", a, loadgen_args_closed(a, "echo", procs), f"ceil#{rep + 1}/p{procs}")
            except Exception as e:
                FAILURES.append(f"ceiling#{rep + 1} procs={procs}: {e}")
                continue
            r.update(rep=rep + 1, scenario="closed")
            out.append(r)
    for rep in range(a.reps):
        try:
            r = measure_loop("echo", a, loadgen_args_open(a, "echo"), f"ceil-open#{rep + 1}")
        except Exception as e:
            FAILURES.append(f"ceiling-open#{rep + 1}: {e}")
            continue
        r.update(rep=rep + 1, scenario="open")
        out.append(r)
    return out


def profile_servers(servers: list[str], a: argparse.Namespace) -> str:
    if not shutil.which("py-spy"):
        return "(--profile: py-spy not installed: `pip install py-spy`)\n"
    RESULTS.mkdir(exist_ok=True)
    out = ["### Profiles (closed loop, py-spy, not counted)", ""]
    for kind in servers:
        path = RESULTS / f"profile-{kind}-{time.strftime('%Y%m%d-%H%M%S')}.raw"
        wait_quiet(a.quiet_threshold, a.quiet_wait)
        srv = Server(kind, a).start()
        try:
            res = run_loadgen(srv, loadgen_args_closed(a), a.warmup, a.duration, profile=path)
            time.sleep(2)
        finally:
            srv.stop()
        top = subprocess.run([sys.executable, str(BENCH / "pyspy_top.py"), str(path), "15"],
                             capture_output=True, text=True).stdout
        out += [f"{SERVER_LABELS[kind]}: {res['msgs_per_s']:,} msgs/s under the profiler; raw stacks {path}",
                "", "```", top.rstrip(), "```", ""]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------- reporting
def med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def loop_table(rows: list[dict], servers: list[str], title: str) -> tuple[str, dict]:
    by = {k: [r for r in rows if r["server"] == k] for k in servers}
    summary = {}
    ref = med([r["msgs_per_s"] for r in by.get("reference", [])])
    lines = [f"### {title}", "",
             "| server | msgs/s (median) | min-max | ratio vs reference | p50 ms | p99 ms | max ms "
             "| server CPU | server us/msg | gen CPU | bg CPU | errors | missing |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in servers:
        rs = by[k]
        if not rs:
            continue
        m = med([r["msgs_per_s"] for r in rs])
        s = dict(msgs_per_s=m, ratio=(m / ref if ref and m is not None else None),
                 p50=med([r["p50_ms"] for r in rs]), p99=med([r["p99_ms"] for r in rs]),
                 max=med([r["max_ms"] for r in rs]),
                 runs=[r["msgs_per_s"] for r in rs], p99_runs=[r["p99_ms"] for r in rs],
                 server_cores=med([r.get("server_cores") for r in rs]),
                 us_per_msg=med([r["server_cores"] * 1e6 / r["msgs_per_s"] for r in rs
                                 if r.get("server_cores") is not None and r["msgs_per_s"]]),
                 gen_cores=med([r.get("gen_cores_sampled") for r in rs]),
                 bg_cores=med([r.get("bg_cores") for r in rs]),
                 errors=sum(r["errors"] + r["unexpected_closes"] + r["connect_errors"] for r in rs),
                 missing=sum(r.get("missing", 0) for r in rs))
        summary[k] = s
        lo, hi = min(s["runs"]), max(s["runs"])
        lines.append(f"| {SERVER_LABELS[k]} | {m:,.0f} | {lo:,}-{hi:,} | {fmt(s['ratio'])} | {fmt(s['p50'])} "
                     f"| {fmt(s['p99'])} | {fmt(s['max'])} | {fmt(s['server_cores'])} | {fmt(s['us_per_msg'], 1)} "
                     f"| {fmt(s['gen_cores'])} | {fmt(s['bg_cores'])} | {s['errors']} | {s['missing']} |")
    lines.append("")
    ref_by_rep = {r["rep"]: r["msgs_per_s"] for r in by.get("reference", [])}
    paired = {}
    for k in summary:
        if k == "reference":
            continue
        rs = [r["msgs_per_s"] / ref_by_rep[r["rep"]] for r in by[k] if ref_by_rep.get(r["rep"])]
        if rs:
            paired[k] = round(statistics.median(rs), 2)
            summary[k]["paired_ratio"] = paired[k]
            summary[k]["paired_ratios"] = [round(x, 2) for x in rs]
    if paired:
        lines.append("Paired ratio (median over repetitions of msgs/s / the reference's msgs/s in the same "
                     "repetition): " + ", ".join(f"{k} {v:.2f} {summary[k]['paired_ratios']}" for k, v in paired.items())
                     + ".")
        lines.append("")
    lines.append(f"Median of {max(len(v) for v in by.values()) if by else 0} runs; per-run msgs/s: "
                 + "; ".join(f"{k}: {summary[k]['runs']}" for k in summary)
                 + "; per-run p99 ms: " + "; ".join(f"{k}: {summary[k]['p99_runs']}" for k in summary) + ".")
    return "\n".join(lines) + "\n", summary


def idle_table(rows: list[dict], servers: list[str]) -> tuple[str, dict]:
    lines = ["### Idle connections", "",
             "| server | connections | KiB/conn (median) | min-max | RSS before -> after (KiB, median run) "
             "| connect time s | busy after last hello s | idle CPU (cores) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    summary = {}
    for k in servers:
        rs = [r for r in rows if r["server"] == k]
        if not rs:
            continue
        per = [r["kib_per_conn"] for r in rs]
        m = med(per)
        mid = sorted(rs, key=lambda r: r["kib_per_conn"])[len(rs) // 2]
        summary[k] = dict(kib_per_conn=m, runs=per)
        lines.append(f"| {SERVER_LABELS[k]} | {mid['conns']:,} | {m:.2f} | {min(per):.2f}-{max(per):.2f} "
                     f"| {mid['rss_before_kib']:,} -> {mid['rss_after_kib']:,} | {fmt(med([r['connect_s'] for r in rs]), 1)} "
                     f"| {fmt(med([r['busy_after_ready_s'] for r in rs]), 1)} | {fmt(med([r['server_cores_while_idle'] for r in rs]))} |")
    return "\n".join(lines) + "\n", summary


def ceiling_table(rows: list[dict], a: argparse.Namespace) -> tuple[str, dict]:
    lines = ["### Generator ceiling (Node `ws` echo server that also sends an ack frame per message)", "",
             "| scenario | loadgen procs | msgs/s (median) | min-max | p50 ms | p99 ms | gen CPU | echo CPU | bg CPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    summary = {}
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for r in rows:
        groups[(r["scenario"], r["procs"])].append(r)
    for (sc, procs), rs in groups.items():
        runs = [r["msgs_per_s"] for r in rs]
        s = dict(msgs_per_s=med(runs), runs=runs, p50=med([r["p50_ms"] for r in rs]),
                 p99=med([r["p99_ms"] for r in rs]), gen_cores=med([r.get("gen_cores_sampled") for r in rs]),
                 send_lag_p99=med([r.get("send_lag_ms", {}).get("p99") for r in rs]))
        summary[f"{sc}/procs={procs}"] = s
        desc = (f"closed P={a.pairs} W={a.window} S={a.size}" if sc == "closed"
                else f"open {a.rate:,} msgs/s (send lag p99 {fmt(s['send_lag_p99'])} ms)")
        lines.append(f"| {desc} | {procs} | {s['msgs_per_s']:,.0f} | {min(runs):,}-{max(runs):,} | {fmt(s['p50'])} "
                     f"| {fmt(s['p99'])} | {fmt(s['gen_cores'])} | {fmt(med([r.get('server_cores') for r in rs]))} "
                     f"| {fmt(med([r.get('bg_cores') for r in rs]))} |")
    return "\n".join(lines) + "\n", summary


def targets_table(summ: dict, a: argparse.Namespace) -> str:
    rows = []

    def add(name: str, value: str, ok: bool | None) -> None:
        rows.append(f"| {name} | {value} | {'-' if ok is None else ('MET' if ok else 'NOT MET')} |")

    c = summ.get("closed", {})
    for k in ("memory", "sqlite"):
        if k in c and c[k]["ratio"] is not None:
            add(f"closed-loop ratio vs reference >= 1.0 ({SERVER_LABELS[k]})", f"{c[k]['ratio']:.2f}",
                c[k]["ratio"] >= 1.0)
    if "memory" in c and "sqlite" in c and c["memory"]["msgs_per_s"]:
        r = c["sqlite"]["msgs_per_s"] / c["memory"]["msgs_per_s"]
        add("SQLite msgs/s >= 0.7x memory", f"{r:.2f}", r >= 0.7)
    o = summ.get("open", {})
    for k in ("memory", "sqlite", "reference"):
        if k in o:
            add(f"open loop {a.rate:,} msgs/s p99 <= 5 ms ({SERVER_LABELS[k]})", f"{o[k]['p99']:.2f} ms",
                o[k]["p99"] <= 5.0 and o[k]["missing"] == 0 if k != "reference" else None)
    i = summ.get("idle", {})
    for k in ("memory", "sqlite", "reference"):
        if k in i:
            add(f"<= 10 KiB RSS per idle connection at {a.conns:,} ({SERVER_LABELS[k]})",
                f"{i[k]['kib_per_conn']:.2f} KiB", i[k]["kib_per_conn"] <= 10.0 if k != "reference" else None)
    if not rows:
        return ""
    return "\n".join(["### Targets", "", "| target | measured | status |", "|---|---:|---|", *rows]) + "\n"


def machine_info() -> dict:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    return dict(date=dt.datetime.now().isoformat(timespec="seconds"), cpus=os.cpu_count(), cpu=cpu,
                kernel=platform.release(), python=platform.python_version(), node=node)


# ----------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description="Tidings benchmark harness", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("--closed", action="store_true", help="closed loop P=50 W=20 S=100")
    ap.add_argument("--open", action="store_true", help="open loop --rate msgs/s")
    ap.add_argument("--idle", action="store_true", help="RSS per idle connection")
    ap.add_argument("--ceiling", action="store_true", help="load generator vs Node echo server")
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--servers", default="reference,memory,sqlite",
                    help="comma list of reference,memory,sqlite (default all three)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--procs", type=int, default=1, help="load generator worker processes (default 1: see docs)")
    ap.add_argument("--ceiling-procs", default="1,2", help="generator procs to try in --ceiling")
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--conns", type=int, default=5000)
    ap.add_argument("--idle-settle", type=float, default=1.0, help="seconds between the server going idle (after all hellos) and the RSS sample")
    ap.add_argument("--client-ack", type=int, default=0,
                    help="receivers ack (cumulative seq) every K messages; 0 = never (default)")
    ap.add_argument("--tidings-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a key of the generated tidings config (repeatable)")
    ap.add_argument("--quiet-threshold", type=float, default=0.3,
                    help="wait until the box uses fewer cores than this before each measurement")
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="max seconds to wait for quiet")
    ap.add_argument("--profile", action="store_true",
                    help="after the scenarios, one extra closed-loop run per server under py-spy "
                         "(not counted); raw stacks in bench/results/, top frames printed")
    ap.add_argument("--nice", type=int, default=0,
                    help="niceness for servers and generators (e.g. -10, needs root): on a shared box "
                         "this keeps other people's work from skewing the numbers; recorded in the output")
    ap.add_argument("--start-retries", type=int, default=0,
                    help="retry a server that exits before listening (useful while the daemon is being edited)")
    ap.add_argument("--start-retry-wait", type=float, default=20.0)
    ap.add_argument("--json-out", default="", help="raw results file (default bench/results/run-<ts>.json)")
    a = ap.parse_args()
    if a.all:
        a.closed = a.open = a.idle = a.ceiling = True
    if not (a.closed or a.open or a.idle or a.ceiling):
        ap.error("choose at least one of --closed --open --idle --ceiling --all")
    a.ceiling_procs = [int(x) for x in a.ceiling_procs.split(",") if x]
    global NICE
    NICE = a.nice
    servers = [s.strip() for s in a.servers.split(",") if s.strip()]
    for s in servers:
        if s not in ("reference", "memory", "sqlite"):
            ap.error(f"unknown server {s}")
    if not (BENCH / "node_modules" / "ws").is_dir():
        raise SystemExit("bench/node_modules/ws missing: run `npm install --prefix bench`")
    raise_nofile()
    if any(s in ("memory", "sqlite") for s in servers):
        ok, why = tidings_available()
        if not ok:
            log(f"tidings is not importable ({why}); benchmarking the reference only")
            servers = [s for s in servers if s == "reference"]
        else:
            check_tidings_config(a)

    info = machine_info()
    log(f"machine: {info}")
    log(f"servers: {servers}  reps={a.reps}  loadgen procs={a.procs}")
    raw: dict = dict(machine=info, args={k: v for k, v in vars(a).items()}, results={})
    summ: dict = {}
    RESULTS.mkdir(exist_ok=True)
    path = Path(a.json_out) if a.json_out else RESULTS / f"run-{time.strftime('%Y%m%d-%H%M%S')}.json"

    def save() -> None:
        raw["failures"] = FAILURES
        path.write_text(json.dumps(raw, indent=1, default=str))

    md: list[str] = [f"Run {info['date']} on {info['cpus']} CPUs ({info['cpu']}), Linux {info['kernel']}, "
                     f"Python {info['python']}, Node {info['node']}; load generator procs: {a.procs}; "
                     f"nice {a.nice}; reps {a.reps}.\n"]
    if a.ceiling:
        log("== ceiling: loadgen vs node echo server")
        rows = scenario_ceiling(a)
        raw["results"]["ceiling"] = rows
        save()
        t, summ["ceiling"] = ceiling_table(rows, a)
        md.append(t)
    if a.closed:
        log(f"== closed loop P={a.pairs} W={a.window} S={a.size} {a.duration:g}s")
        rows = scenario_loop("closed", servers, a, loadgen_args_closed)
        raw["results"]["closed"] = rows
        save()
        t, summ["closed"] = loop_table(rows, servers,
                                       f"Closed loop: P={a.pairs} pairs, W={a.window} in flight, S={a.size} B, "
                                       f"{a.duration:g} s after {a.warmup:g} s warm-up")
        md.append(t)
    if a.open:
        log(f"== open loop {a.rate} msgs/s {a.duration:g}s")
        rows = scenario_loop("open", servers, a, loadgen_args_open)
        raw["results"]["open"] = rows
        save()
        t, summ["open"] = loop_table(rows, servers,
                                     f"Open loop: {a.rate:,} msgs/s over P={a.pairs} pairs, S={a.size} B, "
                                     f"{a.duration:g} s (latency from the scheduled send time)")
        md.append(t)
    if a.idle:
        log(f"== idle: {a.conns} connections")
        rows = scenario_idle(servers, a)
        raw["results"]["idle"] = rows
        save()
        t, summ["idle"] = idle_table(rows, servers)
        md.append(t)
    md.append(targets_table(summ, a))
    if a.profile:
        md.append(profile_servers(servers, a))
    if FAILURES:
        md.append("### Failed measurements\n\n" + "\n".join(f"- {f}" for f in FAILURES) + "\n")
    raw["summary"] = summ
    save()
    print("\n".join(md))
    log(f"raw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
