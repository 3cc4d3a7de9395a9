"""Machinery shared by the benchmark drivers (bench/run.py, bench/cluster_run.py,
bench/memprofile.py): /proc sampling, server processes, code variants, and the Node
load generator (bench/loadgen.mjs).  A benchmark tool, not a test.

Code variants.  A tidings server runs ``python -m tidings`` with ``<DIR>/daemon`` first
on PYTHONPATH, where DIR is the variant's checkout: the current one (the checkout this
file lives in, variant "") unless ``add_variant(NAME, DIR)`` registered another and the
server is named ``<kind>@NAME`` (e.g. ``sqlite@old``).  ``check_variant`` proves, before
anything is measured, that the variant's interpreter really imports tidings from DIR.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import platform
import re
import resource
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
TIDINGS_KINDS = ("memory", "sqlite")
#: variant name -> checkout whose daemon/ goes first on PYTHONPATH ("" = this checkout)
VARIANTS: dict[str, Path] = {"": ROOT}


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
        log(f"warning: RLIMIT_NOFILE hard limit is {hard}; the idle/keepalive scenarios need more fds")


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


# ----------------------------------------------------------------- variants
def split_server(name: str) -> tuple[str, str]:
    """``"sqlite@old"`` -> ``("sqlite", "old")``; ``"memory"`` -> ``("memory", "")``."""
    kind, _, variant = name.partition("@")
    return kind, variant


def server_label(name: str) -> str:
    kind, variant = split_server(name)
    return SERVER_LABELS[kind] + (f" @{variant}" if variant else "")


def add_variant(spec: str) -> str:
    """Register ``NAME=DIR`` (a checkout with daemon/tidings); return NAME."""
    name, sep, d = spec.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"--variant {spec!r}: expected NAME=DIR with NAME in [A-Za-z0-9_.-]")
    path = Path(d).expanduser().resolve()
    if not (path / "daemon" / "tidings" / "__init__.py").is_file():
        raise ValueError(f"--variant {spec!r}: {path}/daemon/tidings/__init__.py does not exist")
    if name in VARIANTS:
        raise ValueError(f"--variant {name} given twice")
    VARIANTS[name] = path
    return name


def variant_env(variant: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(VARIANTS[variant] / "daemon"), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def variant_describe(variant: str) -> str:
    """``<dir> @ <commit> <subject>`` (+ "uncommitted changes in daemon/")."""
    d = VARIANTS[variant]
    r = subprocess.run(["git", "-C", str(d), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    desc = f"{d} @ {r.stdout.strip() or '?'}"
    st = subprocess.run(["git", "-C", str(d), "status", "--porcelain", "--", "daemon"],
                        capture_output=True, text=True).stdout
    return desc + (" + uncommitted changes in daemon/" if st.strip() else "")


def check_variant(variant: str, overrides: list[str]) -> None:
    """Raise SystemExit unless the variant imports tidings from its own checkout and
    accepts the bench config (``tidings check-config``)."""
    d, env = VARIANTS[variant], variant_env(variant)
    r = subprocess.run([sys.executable, "-c", "import tidings, tidings.cli; print(tidings.__file__)"],
                       capture_output=True, text=True, env=env, timeout=120)
    where = r.stdout.strip()
    if r.returncode or not where.startswith(str(d / "daemon") + os.sep):
        raise SystemExit(f"variant {variant or '(current)'}: tidings imports from {where or '?'}, not "
                         f"{d}/daemon: {(r.stderr.strip().splitlines() or [''])[-1]}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "t.toml"
        cfg.write_text(tidings_config("memory", Path(tmp) / "state", overrides))
        r = subprocess.run([*tidings_cmd(), "check-config", str(cfg)], capture_output=True, text=True, env=env)
        if r.returncode:
            raise SystemExit(f"variant {variant or '(current)'}: tidings check-config rejected the bench "
                             f"config:\n{cfg.read_text()}\n{r.stderr}")


# ----------------------------------------------------------------- servers
class Server:
    """One server process: ``name`` is reference | echo | memory | sqlite, the tidings
    kinds optionally ``@VARIANT``.  ``ping_interval_s``: keepalive interval (tidings:
    server.ping_interval_s, with idle_timeout_s raised to max(60, 3x) unless --tidings-set
    sets it; reference: --ping-interval); None = the server's default."""

    def __init__(self, name: str, args: argparse.Namespace, ping_interval_s: float | None = None) -> None:
        self.key = name
        self.kind, self.variant = split_server(name)
        self.args = args
        self.ping_interval_s = ping_interval_s
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.nlines = 0
        self._port_evt = threading.Event()

    def command(self) -> list[str]:
        if self.kind == "reference":
            extra = [] if self.ping_interval_s is None else ["--ping-interval", f"{self.ping_interval_s:g}"]
            return [sys.executable, str(BENCH / "reference_server.py"), "--port", "0", *extra]
        if self.kind == "echo":
            return ["node", str(BENCH / "echo_server.mjs"), "--port", "0", "--acks"]
        self.tmp = tempfile.TemporaryDirectory(prefix=f"tidings-bench-{self.kind}-")
        cfg = Path(self.tmp.name) / "tidings.toml"
        cfg.write_text(tidings_config(self.kind, Path(self.tmp.name) / "state", self.overrides()))
        return [*tidings_cmd(), "serve", "--config", str(cfg)]

    def overrides(self) -> list[str]:
        user = list(getattr(self.args, "tidings_set", []))
        if self.ping_interval_s is None:
            return user
        x = self.ping_interval_s
        out = [item for item in user if not item.startswith("server.ping_interval_s=")]
        out.append(f"server.ping_interval_s={x:g}")
        if not any(item.startswith("server.idle_timeout_s=") for item in user):
            out.append(f"server.idle_timeout_s={max(60.0, 3 * x):g}")
        return out

    def env(self) -> dict[str, str] | None:
        return variant_env(self.variant) if self.kind in TIDINGS_KINDS else None

    def start(self) -> "Server":
        """Start; if it exits before listening (e.g. the daemon is mid-edit), retry
        --start-retries times, --start-retry-wait s apart."""
        for attempt in range(self.args.start_retries + 1):
            try:
                return self._start_once()
            except RuntimeError as e:
                if attempt == self.args.start_retries:
                    raise
                log(f"  {self.key}: failed to start ({str(e).splitlines()[-1][:160]}); "
                    f"retrying in {self.args.start_retry_wait:g}s")
                time.sleep(self.args.start_retry_wait)
                self.lines.clear()
                self.port = None
                self._port_evt = threading.Event()
        raise AssertionError

    def _start_once(self) -> "Server":
        cmd = self.command()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, cwd=str(ROOT), env=self.env(), preexec_fn=renice)
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._port_evt.wait(30) or self.port is None:
            self.stop()
            raise RuntimeError(f"{self.key}: no `event=listening ... port=` line within 30 s; "
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
                log(f"  {self.key}: did not exit 15 s after SIGTERM; killing")
                self.proc.kill()
                rc = self.proc.wait()
        elif self.proc:
            rc = self.proc.returncode
        if self.tmp:
            self.tmp.cleanup()
            self.tmp = None
        return rc


def listening_port(p: subprocess.Popen) -> int:
    """The port a child server (started with text stderr and stdout pipes) logs as
    ``event=listening ... port=N`` within 60 s; its stderr is drained from then on."""
    assert p.stdin and p.stdout and p.stderr
    port = None
    t0 = time.monotonic()
    while port is None and time.monotonic() - t0 < 60:
        line = p.stderr.readline()
        if not line:
            break
        if "event=listening" in line:
            port = int(line.split(" port=")[1].split()[0])
    if port is None:
        raise SystemExit("server did not start")
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()  # drain
    return port


def tidings_cmd() -> list[str]:
    """The daemon's command line; which code it runs is PYTHONPATH's business (``variant_env``)."""
    return [sys.executable, "-m", "tidings"]


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
        # no API listener: its fixed default port would collide with any other daemon on the box
        "api": {"listen": '""'},
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
                  profile_pid: int | None = None, profile: Path | None = None,
                  detail_cpu: dict[str, Callable[[], float]] | None = None,
                  profiles: list[tuple[int, Path]] | None = None) -> dict:
    """Run a closed/open loop; sample CPU over the measurement window: the server's
    (``server_cpu``: seconds used so far), the generator's, each of ``side_cpu`` (e.g.
    redis-server: ``<name>_cores``) and the rest of the box (``bg_cores``).  ``url2``:
    receivers connect there (pairs split across two nodes); ``on_go(box)`` runs when the
    generator starts sending.  ``detail_cpu``: parts of the server's CPU reported apart
    (``<name>_cores``, e.g. each node of a cluster; not subtracted from ``bg_cores``).
    ``profiles``: (pid, path) pairs each sampled by py-spy over the window, like
    ``profile_pid``/``profile``."""
    cmd = ["node", str(LOADGEN), "--url", url, *(["--url2", url2] if url2 else []), *lg_args]
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=str(BENCH), preexec_fn=renice)
    side = side_cpu or {}
    detail = detail_cpu or {}
    to_profile = list(profiles or [])
    if profile is not None and profile_pid is not None:
        to_profile.append((profile_pid, profile))
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
        return (server_cpu(), {k: f() for k, f in (side | detail).items()}, tree_cpu_s(p.pid),
                system_busy_s(), time.monotonic())

    def sampler() -> None:
        # the measurement window starts `warmup` s after the generator's "go" line
        go.wait()
        if on_go is not None:
            on_go(box)
        time.sleep(warmup)
        for pid, path in to_profile:
            # py-spy samples from its own process (~100 Hz): small but non-zero cost, so
            # profiled runs are never counted in the tables
            subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate",
                              os.environ.get("BENCH_PYSPY_RATE", "100"), "--duration",
                              str(max(1, int(duration) - 1)), "--format", "raw", "--nonblocking",
                              "-o", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        s0, x0, g0, b0, t0 = sample()
        time.sleep(max(0.5, duration - 0.3))
        s1, x1, g1, b1, t1 = sample()
        dtw = t1 - t0
        box.update(server_cores=(s1 - s0) / dtw, gen_cores_sampled=(g1 - g0) / dtw,
                   box_cores=(b1 - b0) / dtw)
        for k in (side | detail):
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


def loadgen_args_open(a: argparse.Namespace, proto: str = "tidings", procs: int | None = None,
                      rate: int | None = None) -> list[str]:
    return ["--mode", "open", "--proto", proto, "--procs", str(procs or a.procs), "--pairs", str(a.pairs),
            "--rate", str(rate if rate is not None else a.rate), "--size", str(a.size), "--duration", str(a.duration),
            "--warmup", str(a.warmup), "--client-ack", str(a.client_ack)]

class IdleClients:
    """The Node generator's idle mode: ``conns`` connections opened ``concurrency`` at a
    time (a connect storm), held until ``close()``.  ``ready`` is its ready line
    (``conns`` opened, ``failed_connects``, ``storm_s`` = first connect attempt to last
    hello); ``stats()`` asks for {pings received so far, ping period seen, sockets still
    open, unexpected closes}.  Raises RuntimeError if no connection opened at all."""

    def __init__(self, url: str, conns: int, *, procs: int = 1, concurrency: int = 100,
                 hold_s: float = 3600, source_addrs: int | None = None) -> None:
        extra = [] if source_addrs is None else ["--source-addrs", str(source_addrs)]
        self.proc = subprocess.Popen(
            ["node", str(LOADGEN), "--mode", "idle", "--url", url, "--conns", str(conns), "--hold", str(hold_s),
             "--procs", str(procs), "--connect-concurrency", str(concurrency), *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=str(BENCH), preexec_fn=renice)
        self.err: list[str] = []
        assert self.proc.stderr
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()  # type: ignore[arg-type]
        self.ready = self._line()
        if "error" in self.ready or not self.ready.get("conns"):
            self.kill()
            raise RuntimeError(f"idle loadgen failed: {self.ready} {''.join(self.err)[-500:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _line(self) -> dict:
        assert self.proc.stdout
        line = self.proc.stdout.readline()
        if not line.startswith("{"):
            self.kill()
            raise RuntimeError(f"idle loadgen: unexpected output {line!r} {''.join(self.err)[-500:]}")
        return json.loads(line)

    def stats(self) -> dict:
        assert self.proc.stdin
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> dict:
        """Close every connection; return the generator's final counters."""
        assert self.proc.stdin
        self.proc.stdin.write("close\n")
        self.proc.stdin.flush()
        res = self._line()
        self.proc.wait(60)
        return res

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def warm_up_connections(url: str, n: int = 50) -> None:
    """Open and close ``n`` connections so first-use allocations are not counted."""
    subprocess.run(["node", str(LOADGEN), "--mode", "idle", "--url", url, "--conns", str(n), "--hold", "0"],
                   capture_output=True, text=True, cwd=str(BENCH), timeout=120)


def wait_cpu_idle(pid: int, max_s: float = 60.0, threshold: float = 0.05) -> float:
    """Wait until ``pid`` uses < ``threshold`` cores over 0.5 s; return how long it was busy."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < max_s:
        c0 = proc_cpu_s(pid)
        time.sleep(0.5)
        if (proc_cpu_s(pid) - c0) / 0.5 < threshold:
            break
    return max(0.0, time.monotonic() - t0 - 0.5)


# ----------------------------------------------------------------- reporting helpers
def med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


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


