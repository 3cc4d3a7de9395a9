#!/usr/bin/env python3
"""Tidings benchmark harness (a benchmark, not a test: pytest never runs it).

In ONE run it starts each server as a subprocess on a free 127.0.0.1 port
(reference = asyncio `websockets` router, tidings with store.backend="memory",
tidings with store.backend="sqlite" in a temp state dir, and a Node echo server for
the generator ceiling), drives them with the Node `ws` load generator
(bench/loadgen.mjs) and prints markdown tables.

    python bench/run.py --all                 # closed, open, idle, ceiling: 3 reps (15-25 min)
    python bench/run.py --closed --reps 3     # closed loop P=50 W=20 S=100, 10 s
    python bench/run.py --open                # open loop 5,000 msgs/s, 10 s
    python bench/run.py --closed --open --rate 5000,half-ref   # + open loop at half the
                                              #   reference's closed-loop msgs/s
    python bench/run.py --idle                # RSS per idle connection at 5,000
    python bench/run.py --ceiling             # generator vs echo server
    python bench/run.py --degrade             # = --open-after-closed 3: open loop on a fresh
                                              #   daemon, 3 closed rounds, open loop again
    python bench/run.py --keepalive           # 18,000 idle connections: connect storm,
                                              #   idle CPU at ping_interval_s 20 and 5
    python bench/run.py --closed --servers reference,memory   # subset
    python bench/run.py --closed --variant old=/work/prof     # A/B: reference, memory@old,
                                              #   memory, sqlite@old, sqlite in one run

Every closed/open/idle measurement starts a FRESH server process (fresh state dir, fresh
user names), the servers are alternated between repetitions (rep k starts at server k),
and the median of the repetitions is reported with the min-max range.  Before each
measurement the harness waits (up to --quiet-wait s) for the box to be quiet
(background CPU < --quiet-threshold cores) and it records, for the measurement
window, the CPU used by the server, by the generator and by everything else
("bg"), so a noisy neighbour shows up in the table instead of silently skewing it.
Every loop table gives the server's CPU per message (us/msg) and both msgs/s and us/msg
as a ratio to the reference.  Raw results go to bench/results/run-<timestamp>.json.

A/B of code versions: `--variant NAME=DIR` (repeatable) registers a checkout DIR whose
daemon/ is put first on PYTHONPATH for the servers named `memory@NAME` / `sqlite@NAME`
in --servers; plain `memory` / `sqlite` run this checkout.  Tables label each server and
give the paired (same repetition) ratio of every variant to the first one listed.

--degrade / --open-after-closed N: per server ONE process: an open-loop round at each
--rate ("fresh"), N closed-loop rounds (fresh user names each round), then the same
open-loop rounds again ("after"): does latency degrade with what the daemon has stored
and seen?  Receivers ack every --client-ack messages (50 if --client-ack is 0).

--keepalive: per server and per ping interval in --keepalive-intervals (tidings:
server.ping_interval_s, idle_timeout_s raised to max(60, 3x) unless --tidings-set gives
it; reference: websockets' ping_interval), a fresh process: idle CPU without
connections, then --keepalive-conns connections by the Node generator's connect storm
(storm = first connect attempt to last hello), RSS per connection, then server CPU over
--keepalive-window s with the pings the clients received in it counted (Node `ws`
answers each with a pong).  Reported: % of a core per 10,000 connections, us per ping
round, a linear fit cost = a x connections + b x pings/s, and connections per core.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import keepalive  # noqa: E402
from harness import (  # noqa: E402
    BENCH, FAILURES, RESULTS, TIDINGS_KINDS, VARIANTS, IdleClients, Server, fmt, log, med, proc_cpu_s,
    rss_kib, run_loadgen, server_label, split_server, wait_quiet,
)

#: issue #10's latency bounds for the open loop, ms (per store)
OPEN_P99_MS = {"memory": 3.0, "sqlite": 5.0}
#: ... replaced by p99 <= OPEN_P99_REF_RATIO x the reference's when the reference's p99 > this
REF_SATURATED_P99_MS = 3.0
OPEN_P99_REF_RATIO = 1.5
CLOSED_MIN_RATIO = {"memory": 1.3, "sqlite": 1.0}
IDLE_MAX_KIB = 8.0  # per idle connection at 5,000 (on SQLite)
HALF_REF = "half-ref"


def rotations(servers: list[str], rep: int) -> list[str]:
    """Repetition ``rep`` starts at server ``rep``: the order alternates."""
    k = rep % len(servers)
    return servers[k:] + servers[:k]


def fail(what: str, e: BaseException) -> None:
    """A crashed server must not lose the other results: record and go on."""
    log(f"  {what} FAILED: {e}")
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [repr(e)]
    FAILURES.append(f"{what}: {lines[0]}" + (f" ... {lines[-1]}" if len(lines) > 1 else ""))


# ----------------------------------------------------------------- loops
def with_ack(a: argparse.Namespace, client_ack: int | None) -> argparse.Namespace:
    return a if client_ack is None else argparse.Namespace(**{**vars(a), "client_ack": client_ack})


def loadgen_args_closed(a: argparse.Namespace, proto: str = "tidings", procs: int | None = None,
                        client_ack: int | None = None) -> list[str]:
    return harness.loadgen_args_closed(with_ack(a, client_ack), proto, procs)


def loadgen_args_open(a: argparse.Namespace, rate: int, proto: str = "tidings", procs: int | None = None,
                      client_ack: int | None = None) -> list[str]:
    return harness.loadgen_args_open(with_ack(a, client_ack), proto, procs, rate=rate)


def log_round(label: str, name: str, res: dict) -> None:
    log(f"  {label:<12} {name:<14} {res['msgs_per_s']:>7} msgs/s  p50 {res['p50_ms']} p99 {res['p99_ms']} "
        f"max {res['max_ms']} ms  srv {res.get('server_cores', 0):.2f} gen {res.get('gen_cores_sampled', 0):.2f} "
        f"bg {res.get('bg_cores', 0):.2f} cores  errors {res['errors']} closes {res['unexpected_closes']}")
    if res["errors"] or res["unexpected_closes"] or res["connect_errors"]:
        log(f"    !! {res.get('last_error_frame') or res.get('last_error')} close={res.get('last_close_code')}")


def measure_loop(name: str, a: argparse.Namespace, lg_args: list[str], label: str) -> dict:
    quiet = wait_quiet(a.quiet_threshold, a.quiet_wait)
    srv = Server(name, a).start()
    try:
        res = run_loadgen(srv, lg_args, a.warmup, a.duration)
    finally:
        alive = srv.alive()
        rc = srv.stop()
    res.update(server=name, pre_quiet_cores=quiet, server_exit=rc, server_alive_at_end=alive,
               server_log_lines=srv.nlines, server_log_tail=list(srv.lines)[-5:])
    log_round(label, name, res)
    return res


def scenario_loop(name: str, servers: list[str], a: argparse.Namespace, make_args) -> list[dict]:
    out = []
    for rep in range(a.reps):
        for srv in rotations(servers, rep):
            try:
                r = measure_loop(srv, a, make_args(a), f"{name}#{rep + 1}")
            except Exception as e:
                fail(f"{name}#{rep + 1} {srv}", e)
                continue
            r["rep"] = rep + 1
            out.append(r)
    return out


def resolve_rates(a: argparse.Namespace, summ: dict) -> list[tuple[str, int]]:
    """--rate tokens -> [(label, msgs/s)]; ``half-ref`` = half the reference's median
    closed-loop msgs/s measured earlier in this run (--closed)."""
    out = []
    for tok in a.rates:
        if tok == HALF_REF:
            ref = summ.get("closed", {}).get("reference", {}).get("msgs_per_s")
            if not ref:
                raise SystemExit("--rate half-ref needs the reference's closed-loop figure: add --closed "
                                 "and keep reference in --servers")
            out.append((HALF_REF, int(ref / 2)))
        else:
            out.append((tok, int(tok)))
    return out


# ----------------------------------------------------------------- degradation
def measure_degrade(name: str, rep: int, a: argparse.Namespace, rates: list[tuple[str, int]]) -> dict:
    """ONE server process: open rounds at each rate, N closed rounds, the open rounds again."""
    ack = a.client_ack or 50
    quiet = wait_quiet(a.quiet_threshold, a.quiet_wait)
    srv = Server(name, a).start()
    row: dict = dict(server=name, rep=rep + 1, pre_quiet_cores=quiet, client_ack=ack, rounds=[])
    tag = f"degrade#{rep + 1}"

    def one(phase: str, lg: list[str], rate: str | None = None) -> None:
        if not srv.alive():
            raise RuntimeError(f"{name} exited (rc={srv.proc.poll() if srv.proc else None}) before the "
                               f"{phase} round: " + " | ".join(list(srv.lines)[-3:]))
        res = run_loadgen(srv, lg, a.warmup, a.duration)
        res.update(phase=phase, rate_label=rate, rss_kib=rss_kib(srv.pid))
        row["rounds"].append(res)
        log_round(f"{tag} {phase}", name, res)
        time.sleep(2.0)

    try:
        for label, rate in rates:
            one("fresh", loadgen_args_open(a, rate, client_ack=ack), label)
        for _ in range(a.open_after_closed):
            one("closed", loadgen_args_closed(a, client_ack=ack))
        for label, rate in rates:
            one("after", loadgen_args_open(a, rate, client_ack=ack), label)
    finally:
        row["server_alive_at_end"] = srv.alive()
        row["server_exit"] = srv.stop()
        row["server_log_tail"] = list(srv.lines)[-5:]
    return row


def scenario_degrade(servers: list[str], a: argparse.Namespace, rates: list[tuple[str, int]]) -> list[dict]:
    out = []
    for rep in range(a.reps):
        for srv in rotations(servers, rep):
            try:
                out.append(measure_degrade(srv, rep, a, rates))
            except Exception as e:
                fail(f"degrade#{rep + 1} {srv}", e)
    return out


# ----------------------------------------------------------------- idle
def measure_idle(name: str, rep: int, a: argparse.Namespace) -> dict:
    wait_quiet(a.quiet_threshold, a.quiet_wait)
    srv = Server(name, a).start()
    clients = None
    try:
        harness.warm_up_connections(srv.url())  # first-use allocations are not counted
        time.sleep(1.0)
        before = rss_kib(srv.pid)
        clients = IdleClients(srv.url(), a.conns, procs=a.procs, concurrency=a.connect_concurrency)
        ready = clients.ready
        # Sample once the server has gone idle: a store may still be doing per-connection
        # work (replay reads) after every hello was sent.  How long that took is reported.
        rss_at_ready = rss_kib(srv.pid)
        busy_after_ready = harness.wait_cpu_idle(srv.pid)
        time.sleep(a.idle_settle)
        after = rss_kib(srv.pid)
        cpu_idle0 = proc_cpu_s(srv.pid)
        time.sleep(1.0)
        idle_cores = proc_cpu_s(srv.pid) - cpu_idle0
        final = clients.close()
    finally:
        if clients is not None:
            clients.kill()
        rc = srv.stop()
    per = (after - before) / ready["conns"]
    r = dict(server=name, rep=rep + 1, conns=ready["conns"], connect_s=ready["connect_s"],
             storm_s=ready.get("storm_s"), rss_before_kib=before, rss_after_kib=after, kib_per_conn=per,
             server_cores_while_idle=idle_cores, rss_at_ready_kib=rss_at_ready,
             busy_after_ready_s=busy_after_ready, failed_connects=ready.get("failed_connects", 0),
             connect_errors=final.get("connect_errors"),
             unexpected_closes=final.get("unexpected_closes"), server_exit=rc)
    log(f"  idle#{rep + 1}    {name:<14} {ready['conns']} conns ({ready.get('failed_connects', 0)} failed) in "
        f"{ready['connect_s']:.1f}s  RSS {before}"
        f" -> {after} KiB  = {per:.2f} KiB/conn  (busy {busy_after_ready:.1f}s after the last hello; "
        f"then idle CPU {idle_cores:.2f} cores)")
    return r


def scenario_idle(servers: list[str], a: argparse.Namespace) -> list[dict]:
    out = []
    for rep in range(a.reps):
        for srv in rotations(servers, rep):
            try:
                out.append(measure_idle(srv, rep, a))
            except Exception as e:
                fail(f"idle#{rep + 1} {srv}", e)
    return out


# ----------------------------------------------------------------- ceiling, profiles
def scenario_ceiling(a: argparse.Namespace, rate: int) -> list[dict]:
    out = []
    for rep in range(a.reps):
        for procs in a.ceiling_procs:
            try:
                r = measure_loop("echo", a, loadgen_args_closed(a, "echo", procs), f"ceil#{rep + 1}/p{procs}")
            except Exception as e:
                fail(f"ceiling#{rep + 1} procs={procs}", e)
                continue
            r.update(rep=rep + 1, scenario="closed")
            out.append(r)
    for rep in range(a.reps):
        try:
            r = measure_loop("echo", a, loadgen_args_open(a, rate, "echo"), f"ceil-open#{rep + 1}")
        except Exception as e:
            fail(f"ceiling-open#{rep + 1}", e)
            continue
        r.update(rep=rep + 1, scenario="open", rate=rate)
        out.append(r)
    return out


def profile_servers(servers: list[str], a: argparse.Namespace) -> str:
    if not shutil.which("py-spy"):
        return "(--profile: py-spy not installed: `pip install py-spy`)\n"
    RESULTS.mkdir(exist_ok=True)
    scenario = a.profile_scenario
    out = [f"### Profiles ({scenario} loop, py-spy, not counted)", ""]
    for name in servers:
        path = RESULTS / f"profile-{name.replace('@', '-')}-{time.strftime('%Y%m%d-%H%M%S')}.raw"
        wait_quiet(a.quiet_threshold, a.quiet_wait)
        srv = Server(name, a).start()
        try:
            args = (loadgen_args_closed(a) if scenario == "closed"
                    else loadgen_args_open(a, a.rate))
            res = run_loadgen(srv, args, a.warmup, a.duration, profile=path)
            time.sleep(2)
        finally:
            srv.stop()
        top = subprocess.run([sys.executable, str(BENCH / "pyspy_top.py"), str(path), "15"],
                             capture_output=True, text=True).stdout
        out += [f"{server_label(name)}: {res['msgs_per_s']:,} msgs/s under the profiler; raw stacks {path}",
                "", "```", top.rstrip(), "```", ""]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------- reporting
def us_per_msg(r: dict) -> float | None:
    if r.get("server_cores") is None or not r.get("msgs_per_s"):
        return None
    return r["server_cores"] * 1e6 / r["msgs_per_s"]


def ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def paired_ratios(by: dict[str, list[dict]], num: str, den: str, value) -> list[float]:
    """value(row_num) / value(row_den) for every repetition both have."""
    den_by_rep = {r["rep"]: value(r) for r in by.get(den, [])}
    out = []
    for r in by.get(num, []):
        v, d = value(r), den_by_rep.get(r["rep"])
        if v is not None and d:
            out.append(round(v / d, 2))
    return out


def ab_lines(by: dict[str, list[dict]], servers: list[str]) -> list[str]:
    """For every store with several variants: each variant / the first one listed."""
    lines = []
    kinds: dict[str, list[str]] = collections.defaultdict(list)
    for s in servers:
        if by.get(s):
            kinds[split_server(s)[0]].append(s)
    for kind, names in kinds.items():
        base = names[0]
        for other in names[1:]:
            parts = []
            for what, value in (("msgs/s", lambda r: r["msgs_per_s"]), ("us/msg", us_per_msg),
                                ("p99", lambda r: r["p99_ms"])):
                rs = paired_ratios(by, other, base, value)
                if rs:
                    parts.append(f"{what} x{statistics.median(rs):.2f} {rs}")
            if parts:
                lines.append(f"A/B {other} / {base} (paired per repetition, median): " + ", ".join(parts) + ".")
    return lines


def loop_table(rows: list[dict], servers: list[str], title: str) -> tuple[str, dict]:
    by = {k: [r for r in rows if r["server"] == k] for k in servers}
    summary = {}
    ref_rows = by.get("reference", [])
    ref = med([r["msgs_per_s"] for r in ref_rows])
    ref_us = med([us_per_msg(r) for r in ref_rows])
    lines = [f"### {title}", "",
             "| server | msgs/s (median) | min-max | msgs/s vs ref | p50 ms | p99 ms | max ms "
             "| server CPU | server us/msg | us/msg vs ref | gen CPU | bg CPU | errors | missing |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in servers:
        rs = by[k]
        if not rs:
            continue
        m = med([r["msgs_per_s"] for r in rs])
        us = med([us_per_msg(r) for r in rs])
        s = dict(msgs_per_s=m, ratio=ratio(m, ref), us_per_msg=us, us_ratio=ratio(us, ref_us),
                 p50=med([r["p50_ms"] for r in rs]), p99=med([r["p99_ms"] for r in rs]),
                 max=med([r["max_ms"] for r in rs]),
                 runs=[r["msgs_per_s"] for r in rs], p99_runs=[r["p99_ms"] for r in rs],
                 server_cores=med([r.get("server_cores") for r in rs]),
                 gen_cores=med([r.get("gen_cores_sampled") for r in rs]),
                 bg_cores=med([r.get("bg_cores") for r in rs]),
                 errors=sum(r["errors"] + r["unexpected_closes"] + r["connect_errors"] for r in rs),
                 missing=sum(r.get("missing", 0) for r in rs))
        summary[k] = s
        lines.append(f"| {server_label(k)} | {m:,.0f} | {min(s['runs']):,}-{max(s['runs']):,} | {fmt(s['ratio'])} "
                     f"| {fmt(s['p50'])} | {fmt(s['p99'])} | {fmt(s['max'])} | {fmt(s['server_cores'])} "
                     f"| {fmt(us, 1)} | {fmt(s['us_ratio'])} | {fmt(s['gen_cores'])} | {fmt(s['bg_cores'])} "
                     f"| {s['errors']} | {s['missing']} |")
    lines.append("")
    paired = []
    for k in summary:
        if k == "reference":
            continue
        rs = paired_ratios(by, k, "reference", lambda r: r["msgs_per_s"])
        us_rs = paired_ratios(by, k, "reference", us_per_msg)
        if rs:
            summary[k].update(paired_ratio=statistics.median(rs), paired_ratios=rs)
            paired.append(f"{k} {statistics.median(rs):.2f} {rs}"
                          + (f" (us/msg {statistics.median(us_rs):.2f} {us_rs})" if us_rs else ""))
    if paired:
        lines += ["Paired ratio vs reference (median over repetitions of msgs/s, and of us/msg, over the "
                  "reference's in the same repetition): " + ", ".join(paired) + ".", ""]
    ab = ab_lines(by, servers)
    if ab:
        lines += [*ab, ""]
    lines.append(f"Median of {max((len(v) for v in by.values()), default=0)} runs; per-run msgs/s: "
                 + "; ".join(f"{k}: {summary[k]['runs']}" for k in summary)
                 + "; per-run p99 ms: " + "; ".join(f"{k}: {summary[k]['p99_runs']}" for k in summary) + ".")
    return "\n".join(lines) + "\n", summary


def degrade_table(rows: list[dict], servers: list[str], rates: list[tuple[str, int]],
                  a: argparse.Namespace) -> tuple[str, dict]:
    n = a.open_after_closed
    lines = [f"### Degradation: open loop on a fresh daemon, {n} closed rounds, the open loop again "
             f"(same process; {a.duration:g} s rounds after {a.warmup:g} s warm-up, receivers ack every "
             f"{a.client_ack or 50})", "",
             "| server | open rate | fresh p50 ms | fresh p99 ms | closed msgs/s (median round) | closed us/msg "
             "| after p50 ms | after p99 ms | after / fresh p99 | after p99 / ref's | open us/msg fresh -> after "
             "| RSS MiB fresh -> after | bg CPU | errors | missing |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    summary: dict = {}
    for label, rate in rates:
        per: dict = {}
        for k in servers:
            rs = [r for r in rows if r["server"] == k]
            if not rs:
                continue

            def pick(r: dict, phase: str) -> list[dict]:
                return [x for x in r["rounds"] if x["phase"] == phase and x.get("rate_label") in (None, label)]

            fresh = [x for r in rs for x in pick(r, "fresh")]
            after = [x for r in rs for x in pick(r, "after")]
            closed = [x for r in rs for x in pick(r, "closed")]
            allr = fresh + after + closed
            per[k] = dict(
                fresh_p50=med([x["p50_ms"] for x in fresh]), fresh_p99=med([x["p99_ms"] for x in fresh]),
                after_p50=med([x["p50_ms"] for x in after]), after_p99=med([x["p99_ms"] for x in after]),
                closed_msgs_per_s=med([x["msgs_per_s"] for x in closed]),
                closed_us=med([us_per_msg(x) for x in closed]),
                fresh_us=med([us_per_msg(x) for x in fresh]), after_us=med([us_per_msg(x) for x in after]),
                fresh_rss=med([x["rss_kib"] / 1024 for x in fresh]), after_rss=med([x["rss_kib"] / 1024 for x in after]),
                bg=med([x.get("bg_cores") for x in allr]),
                errors=sum(x["errors"] + x["unexpected_closes"] + x["connect_errors"] for x in allr),
                missing=sum(x.get("missing", 0) for x in allr), runs=len(rs),
                after_p99_runs=[x["p99_ms"] for x in after], fresh_p99_runs=[x["p99_ms"] for x in fresh])
        ref_after = per.get("reference", {}).get("after_p99")
        for k, s in per.items():
            s["after_vs_fresh"] = ratio(s["after_p99"], s["fresh_p99"])
            s["after_vs_ref"] = ratio(s["after_p99"], ref_after)
            lines.append(
                f"| {server_label(k)} | {rate:,}{' (half-ref)' if label == HALF_REF else ''} | {fmt(s['fresh_p50'])} "
                f"| {fmt(s['fresh_p99'])} | {fmt(s['closed_msgs_per_s'], 0)} | {fmt(s['closed_us'], 1)} "
                f"| {fmt(s['after_p50'])} | {fmt(s['after_p99'])} | {fmt(s['after_vs_fresh'])} | {fmt(s['after_vs_ref'])} "
                f"| {fmt(s['fresh_us'], 1)} -> {fmt(s['after_us'], 1)} | {fmt(s['fresh_rss'], 0)} -> {fmt(s['after_rss'], 0)} "
                f"| {fmt(s['bg'])} | {s['errors']} | {s['missing']} |")
        summary[label] = dict(per, _rate=rate)
    lines.append("")
    lines.append("Median of the repetitions; per-run p99 ms (fresh -> after): " + "; ".join(
        f"{k} at {label}: {s['fresh_p99_runs']} -> {s['after_p99_runs']}"
        for label, per in summary.items() for k, s in per.items() if not k.startswith("_")) + ".")
    return "\n".join(lines) + "\n", summary


def idle_table(rows: list[dict], servers: list[str]) -> tuple[str, dict]:
    lines = ["### Idle connections", "",
             "| server | connections | KiB/conn (median) | min-max | RSS before -> after (KiB, median run) "
             "| connect storm s | failed connects | busy after last hello s | idle CPU (cores) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    summary = {}
    for k in servers:
        rs = [r for r in rows if r["server"] == k]
        if not rs:
            continue
        per = [r["kib_per_conn"] for r in rs]
        m = med(per)
        mid = sorted(rs, key=lambda r: r["kib_per_conn"])[len(rs) // 2]
        summary[k] = dict(kib_per_conn=m, runs=per, conns=mid["conns"])
        lines.append(f"| {server_label(k)} | {mid['conns']:,} | {m:.2f} | {min(per):.2f}-{max(per):.2f} "
                     f"| {mid['rss_before_kib']:,} -> {mid['rss_after_kib']:,} "
                     f"| {fmt(med([r.get('storm_s') for r in rs]), 1)} | {sum(r.get('failed_connects', 0) for r in rs)} "
                     f"| {fmt(med([r['busy_after_ready_s'] for r in rs]), 1)} "
                     f"| {fmt(med([r['server_cores_while_idle'] for r in rs]))} |")
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
                else f"open {rs[0]['rate']:,} msgs/s (send lag p99 {fmt(s['send_lag_p99'])} ms)")
        lines.append(f"| {desc} | {procs} | {s['msgs_per_s']:,.0f} | {min(runs):,}-{max(runs):,} | {fmt(s['p50'])} "
                     f"| {fmt(s['p99'])} | {fmt(s['gen_cores'])} | {fmt(med([r.get('server_cores') for r in rs]))} "
                     f"| {fmt(med([r.get('bg_cores') for r in rs]))} |")
    return "\n".join(lines) + "\n", summary


def latency_target(kind: str, label: str, rate: int, p99: float | None, ref_p99: float | None,
                   missing: int = 0) -> tuple[str, str, bool | None]:
    """(target, measured, met) for an open-loop p99: the absolute bound, or - when the
    reference itself is saturated (p99 > 3 ms), and always at half-ref - p99 <= 1.5x
    the reference's in the same run."""
    bound = OPEN_P99_MS[kind]
    rate_s = f"{rate:,} msgs/s" + (" (half the reference's closed loop)" if label == HALF_REF else "")
    if p99 is None:
        return f"open loop {rate_s} p99", "-", None
    use_ratio = label == HALF_REF or (ref_p99 is not None and ref_p99 > REF_SATURATED_P99_MS)
    if use_ratio and ref_p99:
        r = p99 / ref_p99
        return (f"open loop {rate_s}: p99 <= {OPEN_P99_REF_RATIO}x reference's (reference p99 {ref_p99:.2f} ms)",
                f"{p99:.2f} ms = {r:.2f}x", r <= OPEN_P99_REF_RATIO and not missing)
    return f"open loop {rate_s}: p99 <= {bound:g} ms", f"{p99:.2f} ms", p99 <= bound and not missing


def targets_table(summ: dict, a: argparse.Namespace) -> str:
    rows = []

    def add(server: str, name: str, value: str, ok: bool | None) -> None:
        rows.append(f"| {server_label(server)} | {name} | {value} | {'-' if ok is None else ('MET' if ok else 'NOT MET')} |")

    c = summ.get("closed", {})
    for k, s in c.items():
        kind, variant = split_server(k)
        if kind in CLOSED_MIN_RATIO and s["ratio"] is not None:
            add(k, f"closed-loop msgs/s >= {CLOSED_MIN_RATIO[kind]:g}x reference", f"{s['ratio']:.2f}",
                s["ratio"] >= CLOSED_MIN_RATIO[kind])
        mem = c.get(f"memory@{variant}" if variant else "memory")
        if kind == "sqlite" and mem and mem["msgs_per_s"]:
            r = s["msgs_per_s"] / mem["msgs_per_s"]
            add(k, "closed-loop msgs/s >= 0.7x memory (same code)", f"{r:.2f}", r >= 0.7)
    for section, key, what in (("open", "p99", ""), ("degrade", "after_p99", " after closed rounds")):
        for label, per in summ.get(section, {}).items():
            rate = per.get("_rate")
            ref_p99 = per.get("reference", {}).get(key)
            for k, s in per.items():
                if k.startswith("_") or split_server(k)[0] not in TIDINGS_KINDS:
                    continue
                t, v, ok = latency_target(split_server(k)[0], label, rate, s.get(key), ref_p99, s.get("missing", 0))
                add(k, t + what, v, ok)
    for k, s in summ.get("idle", {}).items():
        if split_server(k)[0] in TIDINGS_KINDS:
            add(k, f"<= {IDLE_MAX_KIB:g} KiB RSS per idle connection at {s['conns']:,} (target stated for SQLite)",
                f"{s['kib_per_conn']:.2f} KiB",
                s["kib_per_conn"] <= IDLE_MAX_KIB if split_server(k)[0] == "sqlite" else None)
    for k, name, value, ok in keepalive.targets(summ.get("keepalive", {})):
        add(k, name, value, ok)
    if not rows:
        return ""
    return "\n".join(["### Targets (issue #10)", "", "| server | target | measured | status |",
                      "|---|---|---:|---|", *rows]) + "\n"


# ----------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Tidings benchmark harness", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    g = ap.add_argument_group("scenarios (at least one)")
    g.add_argument("--closed", action="store_true", help="closed loop P=50 W=20 S=100")
    g.add_argument("--open", action="store_true", help="open loop at each --rate")
    g.add_argument("--idle", action="store_true", help="RSS per idle connection (--conns)")
    g.add_argument("--ceiling", action="store_true", help="load generator vs Node echo server")
    g.add_argument("--open-after-closed", type=int, default=0, metavar="N",
                   help="degradation: per server ONE process runs open loop(s) at each --rate, N closed rounds "
                        "(fresh user names each), the open loop(s) again; fresh vs after side by side")
    g.add_argument("--degrade", action="store_true", help="same as --open-after-closed 3")
    g.add_argument("--keepalive", action="store_true",
                   help="idle connections at scale: connect storm, idle CPU per ping interval, RSS/conn, "
                        "connections per core (see --keepalive-*)")
    g.add_argument("--all", action="store_true", help="--closed --open --idle --ceiling (not --degrade/--keepalive)")
    ap.add_argument("--servers", default="",
                    help="comma list of reference, memory, sqlite, memory@VARIANT, sqlite@VARIANT (default: "
                         "reference,memory,sqlite, each tidings store also @ every --variant, variants first)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                    help="A/B: a checkout DIR whose daemon/ goes first on PYTHONPATH for servers named "
                         "memory@NAME / sqlite@NAME (repeatable); plain memory/sqlite = this checkout")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per measurement, servers alternated (median)")
    ap.add_argument("--procs", type=int, default=1, help="load generator worker processes (default 1: see docs)")
    ap.add_argument("--ceiling-procs", default="1,2", help="generator procs to try in --ceiling")
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--duration", type=float, default=10.0, help="measurement window of a loop round, s")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--rate", default="5000",
                    help="open-loop msgs/s, comma list; 'half-ref' = half the reference's closed-loop msgs/s "
                         "of this run (needs --closed with reference), e.g. 5000,half-ref")
    ap.add_argument("--conns", type=int, default=5000, help="--idle: connections")
    ap.add_argument("--connect-concurrency", type=int, default=100,
                    help="--idle/--keepalive: handshakes the generator keeps in flight during the connect storm")
    ap.add_argument("--idle-settle", type=float, default=1.0, help="seconds between the server going idle (after all hellos) and the RSS sample")
    ap.add_argument("--keepalive-conns", default="18000",
                    help="--keepalive: connections, comma list (several values test linearity in connections)")
    ap.add_argument("--keepalive-intervals", default="20,5",
                    help="--keepalive: ping intervals, s (tidings server.ping_interval_s; reference "
                         "--ping-interval); the first is the default the sizing line uses")
    ap.add_argument("--keepalive-window", type=float, default=30.0, help="--keepalive: idle CPU window, s")
    ap.add_argument("--keepalive-baseline", type=float, default=5.0,
                    help="--keepalive: seconds of idle CPU sampled before any connection")
    ap.add_argument("--client-ack", type=int, default=0,
                    help="receivers ack (cumulative seq) every K messages; 0 = never (default; --degrade uses 50)")
    ap.add_argument("--tidings-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a key of the generated tidings config (repeatable)")
    ap.add_argument("--quiet-threshold", type=float, default=0.3,
                    help="wait until the box uses fewer cores than this before each measurement")
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="max seconds to wait for quiet")
    ap.add_argument("--profile", action="store_true",
                    help="after the scenarios, one extra closed-loop run per server under py-spy "
                         "(not counted); raw stacks in bench/results/, top frames printed")
    ap.add_argument("--profile-scenario", choices=("closed", "open"), default="closed",
                    help="--profile: the loop profiled (open: at the first --rate)")
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
    if a.degrade and not a.open_after_closed:
        a.open_after_closed = 3
    if not (a.closed or a.open or a.idle or a.ceiling or a.open_after_closed or a.keepalive):
        ap.error("choose at least one of --closed --open --idle --ceiling --degrade/--open-after-closed "
                 "--keepalive --all")
    a.ceiling_procs = [int(x) for x in a.ceiling_procs.split(",") if x]
    a.rates = [x.strip() for x in a.rate.split(",") if x.strip()]
    for tok in a.rates:
        if tok != HALF_REF and not tok.isdigit():
            ap.error(f"--rate: {tok!r} is neither a number nor {HALF_REF}")
    numeric = [int(t) for t in a.rates if t != HALF_REF]
    a.rate = numeric[0] if numeric else 5000  # the ceiling's open loop
    try:
        a.keepalive_conns = [int(x) for x in a.keepalive_conns.split(",") if x]
        a.keepalive_intervals = [float(x) for x in a.keepalive_intervals.split(",") if x]
        variants = [harness.add_variant(v) for v in a.variant]
    except ValueError as e:
        ap.error(str(e))
    if not a.servers:
        a.servers = ",".join(["reference", *(f"{k}@{v}" if v else k for k in TIDINGS_KINDS for v in [*variants, ""])])
    a.server_list = [s.strip() for s in a.servers.split(",") if s.strip()]
    for s in a.server_list:
        kind, variant = split_server(s)
        if kind not in ("reference", *TIDINGS_KINDS) or (variant and kind == "reference"):
            ap.error(f"unknown server {s} (reference, memory, sqlite, memory@VARIANT, sqlite@VARIANT)")
        if variant not in VARIANTS:
            ap.error(f"server {s}: no --variant {variant}=DIR")
    return a


def main() -> int:
    a = parse_args()
    harness.NICE = a.nice
    servers = a.server_list
    if not (BENCH / "node_modules" / "ws").is_dir():
        raise SystemExit("bench/node_modules/ws missing: run `npm install --prefix bench`")
    harness.raise_nofile()
    used = sorted({split_server(s)[1] for s in servers if split_server(s)[0] in TIDINGS_KINDS})
    for v in used:
        harness.check_variant(v, a.tidings_set)
    info = harness.machine_info()
    info["variants"] = {v or "(current)": harness.variant_describe(v) for v in used}
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
    if used:
        md.append("Code: " + "; ".join(f"{'tidings' if not v else '@' + v} = {info['variants'][v or '(current)']}"
                                       for v in used) + ".\n")
    if a.ceiling:
        log("== ceiling: loadgen vs node echo server")
        rows = scenario_ceiling(a, a.rate)
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
    rates = resolve_rates(a, summ) if (a.open or a.open_after_closed) else []
    if a.open:
        summ["open"] = {}
        for label, rate in rates:
            log(f"== open loop {rate} msgs/s {a.duration:g}s")
            rows = scenario_loop(f"open{rate}", servers, a, lambda ns, rate=rate: loadgen_args_open(ns, rate))
            raw["results"].setdefault("open", []).extend(dict(r, rate=rate, rate_label=label) for r in rows)
            save()
            t, s = loop_table(rows, servers,
                              f"Open loop: {rate:,} msgs/s{' (half the reference closed-loop msgs/s)' if label == HALF_REF else ''}"
                              f" over P={a.pairs} pairs, S={a.size} B, {a.duration:g} s (latency from the scheduled send time)")
            summ["open"][label] = dict(s, _rate=rate)
            md.append(t)
    if a.open_after_closed:
        log(f"== degradation: open {[r for _, r in rates]} msgs/s, {a.open_after_closed} closed rounds, open again")
        rows = scenario_degrade(servers, a, rates)
        raw["results"]["degrade"] = rows
        save()
        t, summ["degrade"] = degrade_table(rows, servers, rates, a)
        md.append(t)
    if a.idle:
        log(f"== idle: {a.conns} connections")
        rows = scenario_idle(servers, a)
        raw["results"]["idle"] = rows
        save()
        t, summ["idle"] = idle_table(rows, servers)
        md.append(t)
    if a.keepalive:
        log(f"== keepalive: {a.keepalive_conns} connections, ping intervals {a.keepalive_intervals}")
        rows = keepalive.scenario(servers, a)
        raw["results"]["keepalive"] = rows
        save()
        t, summ["keepalive"] = keepalive.table(rows, servers, a)
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
