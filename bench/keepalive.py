"""bench/run.py --keepalive: what idle connections cost at scale (a benchmark, not a test).

Per server, per connection count C (--keepalive-conns) and per ping interval X
(--keepalive-intervals), one fresh server process:

1. idle CPU with no connection over --keepalive-baseline s (the daemon's own timers);
2. 50 warm-up connections opened and closed, RSS "before";
3. C connections by the Node generator's connect storm (--connect-concurrency in
   flight); storm = first connect attempt to last hello, and the server CPU it took;
4. wait until the server has gone idle (at most X s: after that its pings keep it busy),
   --idle-settle s, RSS "after" -> KiB per connection;
5. the ping period P as the clients see it (mean gap between two pings on a socket;
   waits up to 2X + 10 s for it), then server CPU over a window of k x P, k =
   max(1, --keepalive-window // P): a whole number of periods holds exactly k pings per
   connection whatever the phase of the ping rounds (a plain 30 s window at X = 20 holds
   one or two rounds depending on when it starts).  The pings are counted by the clients
   (Node `ws` answers each with a pong, which the daemon counts as activity: nobody
   reaches idle_timeout_s);
6. the counters say how many sockets are still open: any close is reported.

From the CPU: the steady-state idle CPU (the window's ping-driven CPU scaled to exactly
one ping per open connection per period: the window can catch one ping burst more or
less), % of a core per 10,000 connections, us per ping round ((CPU - baseline) / pings), and per server a least-squares fit  CPU - baseline = a x C + b x pings/s  over
all its (C, X) points: a = us per connection-second (housekeeping scan), b = us per ping
round; the worst residual says how linear the cost is.  "Connections per core" = C / the
idle CPU at the first interval (the default keepalive; no traffic).
"""

from __future__ import annotations

import argparse
import time

import harness
from harness import IdleClients, Server, fmt, log, med, proc_cpu_s, rss_kib, server_label, split_server

#: issue #10: connect storm of 18,000 <= 10 s; idle CPU per 10,000 connections
STORM_CONNS, STORM_MAX_S = 18000, 10.0
MAX_PCT_PER_10K = {20.0: 3.0, 5.0: 15.0}


def timeouts(srv: Server) -> str:
    """The keepalive settings the server really ran with, for the table."""
    if srv.kind == "reference":
        return f"ping {srv.ping_interval_s:g} s, pong timeout 20 s"
    kv = dict(item.split("=", 1) for item in srv.overrides())
    return f"ping {kv.get('server.ping_interval_s', '20')} s, idle timeout {kv.get('server.idle_timeout_s', '60')} s"


def ping_period(clients: IdleClients, interval: float) -> float | None:
    """The ping period the clients see (mean gap between two pings on a socket), once
    as many gaps were seen as sockets are open (about one per socket: a server whose
    period differs per connection, like tidings' spread, is averaged over all of them,
    not over the few that are pinged first); after 3 x interval + 10 s, the mean so far
    if at least min(open, 50) gaps were seen, else None."""
    deadline = time.monotonic() + 3 * interval + 10
    st: dict = {}
    while time.monotonic() < deadline:
        st = clients.stats()
        if st["ping_gap_n"] and st["ping_gap_n"] >= st["open"]:
            return st["ping_gap_mean_s"]
        if not st["open"]:
            return None
        time.sleep(0.5)
    if st.get("ping_gap_n") and st["ping_gap_n"] >= min(st["open"], 50):
        return st["ping_gap_mean_s"]
    return None


def measure(name: str, conns: int, interval: float, rep: int, a: argparse.Namespace) -> dict:
    quiet = harness.wait_quiet(a.quiet_threshold, a.quiet_wait)
    srv = Server(name, a, ping_interval_s=interval).start()
    clients = None
    try:
        pid = srv.pid
        time.sleep(1.0)
        c0, t0 = proc_cpu_s(pid), time.monotonic()
        time.sleep(a.keepalive_baseline)
        baseline = (proc_cpu_s(pid) - c0) / (time.monotonic() - t0)
        harness.warm_up_connections(srv.url())
        time.sleep(1.0)
        rss_before = rss_kib(pid)
        c_storm = proc_cpu_s(pid)
        clients = IdleClients(srv.url(), conns, procs=a.procs, concurrency=a.connect_concurrency)
        storm_cpu = proc_cpu_s(pid) - c_storm
        busy_after = harness.wait_cpu_idle(pid, max_s=min(60.0, interval))
        time.sleep(a.idle_settle)
        rss_after = rss_kib(pid)
        period = ping_period(clients, interval)
        rounds = max(1, int(a.keepalive_window // period)) if period else None
        if period:
            # ping_period() returns just after a ping burst (tidings pings in 1 s housekeeper
            # ticks): start half a period later so the window's edges fall between bursts
            time.sleep(period / 2)
        s0 = clients.stats()
        c0, g0, b0, t0 = proc_cpu_s(pid), harness.tree_cpu_s(clients.pid), harness.system_busy_s(), time.monotonic()
        time.sleep(rounds * period if period and rounds else a.keepalive_window)
        s1 = clients.stats()
        c1, g1, b1, t1 = proc_cpu_s(pid), harness.tree_cpu_s(clients.pid), harness.system_busy_s(), time.monotonic()
        final = clients.close()
    finally:
        if clients is not None:
            clients.kill()
        settings = timeouts(srv)
        rc = srv.stop()
    dt = t1 - t0
    cores, gen = (c1 - c0) / dt, (g1 - g0) / dt
    pings = s1["pings"] - s0["pings"]
    pps = pings / dt
    n = clients.ready["conns"]
    # steady state: every open connection pinged once per period; the window's pings are
    # counted exactly, so scale the ping-driven CPU by steady / counted pings
    steady_pps = s1["open"] / period if period else None
    steady = baseline + (cores - baseline) * steady_pps / pps if steady_pps and pps else cores
    r = dict(server=name, rep=rep + 1, conns=n, interval_s=interval, settings=settings, pre_quiet_cores=quiet,
             baseline_cores=baseline, storm_s=clients.ready["storm_s"], storm_cpu_ms_per_conn=storm_cpu * 1e3 / n,
             busy_after_ready_s=busy_after, busy_capped=busy_after >= min(60.0, interval) - 0.01,
             rss_before_kib=rss_before, rss_after_kib=rss_after, kib_per_conn=(rss_after - rss_before) / n,
             window_s=dt, server_cores=cores, steady_cores=steady, gen_cores=gen,
             bg_cores=max(0.0, (b1 - b0) / dt - cores - gen), pings=pings, pings_per_s=pps,
             ping_period_s=period, ping_rounds=rounds, pings_per_conn=pings / n,
             pct_core_per_10k=steady * 100 * 10000 / n,
             us_per_ping=(cores - baseline) * 1e6 / pps if pps else None,
             open_at_end=s1["open"], unexpected_closes=s1["unexpected_closes"],
             failed_connects=clients.ready.get("failed_connects", 0),
             last_connect_error=clients.ready.get("last_connect_error"),
             connect_errors=final.get("connect_errors"), last_close_code=s1.get("last_close_code"), server_exit=rc)
    log(f"  keepalive#{rep + 1} {name:<14} {n} conns ping {interval:g}s: storm {r['storm_s']:.1f}s, "
        f"{r['kib_per_conn']:.2f} KiB/conn, idle {cores:.4f} cores (steady {steady:.4f}: "
        f"{r['pct_core_per_10k']:.2f}% per 10k), "
        f"{pings} pings in {dt:.1f}s (period {fmt(period)}s; {fmt(r['us_per_ping'], 1)} us/ping), open {s1['open']}, "
        f"closes {s1['unexpected_closes']}, failed connects {r['failed_connects']}")
    return r


def scenario(servers: list[str], a: argparse.Namespace) -> list[dict]:
    out = []
    for rep in range(a.reps):
        for conns in a.keepalive_conns:
            for interval in a.keepalive_intervals:
                k = rep % len(servers)
                for name in servers[k:] + servers[:k]:
                    try:
                        out.append(measure(name, conns, interval, rep, a))
                    except Exception as e:
                        log(f"  keepalive#{rep + 1} {name} {conns} ping {interval:g} FAILED: {e}")
                        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [repr(e)]
                        harness.FAILURES.append(f"keepalive#{rep + 1} {name} conns={conns} ping={interval:g}: "
                                                + lines[0] + (f" ... {lines[-1]}" if len(lines) > 1 else ""))
    return out


def fit(points: list[dict]) -> dict | None:
    """Least squares, no intercept:  (cores - baseline) x 1e6 = a x conns + b x pings/s,
    over the points where every connection stayed open.  Two points determine a and b
    exactly; only a third one tests linearity (``max_residual``)."""
    xs = [(p["conns"], p["pings_per_s"], (p["server_cores"] - p["baseline_cores"]) * 1e6)
          for p in points if p["closes"] == 0]
    s11 = sum(c * c for c, _, _ in xs)
    s12 = sum(c * q for c, q, _ in xs)
    s22 = sum(q * q for _, q, _ in xs)
    det = s11 * s22 - s12 * s12
    if len(xs) < 2 or det <= 1e-9 * s11 * s22:
        return None
    y1 = sum(c * y for c, _, y in xs)
    y2 = sum(q * y for _, q, y in xs)
    a_ = (y1 * s22 - y2 * s12) / det
    b_ = (s11 * y2 - s12 * y1) / det
    resid = [abs(y - (a_ * c + b_ * q)) / max(abs(y), 1.0) for c, q, y in xs]
    return dict(us_per_conn_s=a_, us_per_ping=b_, points=len(xs),
                max_residual=max(resid) if len(xs) > 2 else None)


def table(rows: list[dict], servers: list[str], a: argparse.Namespace) -> tuple[str, dict]:
    lines = [f"### Keepalive: idle connections at scale ({a.keepalive_window:g} s CPU window; connect storm with "
             f"{a.connect_concurrency} handshakes in flight)", "",
             "| server | keepalive | connections | connect storm s | storm CPU ms/conn | busy after last hello s "
             "| RSS KiB/conn | ping period s | window s | pings per conn | idle CPU cores (window) "
             "| idle CPU cores (steady) | % of a core per 10k conns (steady) "
             "| baseline cores | us per ping | gen CPU | bg CPU | failed connects | open at end | closes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    summary: dict = {}
    for name in servers:
        rs = [r for r in rows if r["server"] == name]
        if not rs:
            continue
        points = []
        for conns in a.keepalive_conns:
            for interval in a.keepalive_intervals:
                g = [r for r in rs if r["conns"] == conns and r["interval_s"] == interval]
                if not g:
                    continue
                p = {k: med([r[k] for r in g]) for k in (
                    "storm_s", "storm_cpu_ms_per_conn", "busy_after_ready_s", "kib_per_conn", "server_cores",
                    "steady_cores",
                    "pct_core_per_10k", "baseline_cores", "pings_per_s", "ping_period_s", "us_per_ping",
                    "gen_cores", "bg_cores", "window_s", "pings_per_conn")}
                p.update(conns=g[0]["conns"], interval_s=interval, settings=g[0]["settings"], runs=len(g),
                         open_at_end=min(r["open_at_end"] for r in g),
                         closes=sum(r["unexpected_closes"] for r in g),
                         failed_connects=sum(r["failed_connects"] for r in g),
                         busy_capped=any(r["busy_capped"] for r in g))
                points.append(p)
                busy = (">= " if p["busy_capped"] else "") + fmt(p["busy_after_ready_s"], 1)
                lines.append(
                    f"| {server_label(name)} | {p['settings']} | {p['conns']:,} | {fmt(p['storm_s'], 1)} "
                    f"| {fmt(p['storm_cpu_ms_per_conn'])} | {busy} | {fmt(p['kib_per_conn'])} "
                    f"| {fmt(p['ping_period_s'])} | {fmt(p['window_s'], 1)} | {fmt(p['pings_per_conn'])} "
                    f"| {fmt(p['server_cores'], 4)} | {fmt(p['steady_cores'], 4)} | {fmt(p['pct_core_per_10k'])} "
                    f"| {fmt(p['baseline_cores'], 4)} "
                    f"| {fmt(p['us_per_ping'], 1)} | {fmt(p['gen_cores'])} "
                    f"| {fmt(p['bg_cores'])} | {p['failed_connects']} | {p['open_at_end']:,} | {p['closes']} |")
        default = [p for p in points if p["interval_s"] == a.keepalive_intervals[0] and p["closes"] == 0]
        sizing = max(default, key=lambda p: p["conns"]) if default else None
        summary[name] = dict(points=points, fit=fit(points), sizing=sizing and dict(
            interval_s=sizing["interval_s"], conns=sizing["conns"],
            conns_per_core=sizing["conns"] / sizing["steady_cores"] if sizing["steady_cores"] else None,
            conns_per_gib=1024 * 1024 / sizing["kib_per_conn"] if sizing["kib_per_conn"] > 0 else None))
    lines.append("")
    for name, s in summary.items():
        f, z = s["fit"], s["sizing"]
        parts = []
        if f:
            parts.append(f"fit over {f['points']} points: CPU - baseline = {f['us_per_conn_s']:.2f} us per "
                         f"connection-second + {f['us_per_ping']:.1f} us per ping round ("
                         + ("exact: a third point (another --keepalive-conns) would test linearity"
                            if f["max_residual"] is None else f"worst residual {100 * f['max_residual']:.0f} %")
                         + ")")
        if z and z["conns_per_core"]:
            parts.append(f"sizing at ping {z['interval_s']:g} s: {z['conns_per_core']:,.0f} idle connections per core "
                         f"(keepalive CPU only, measured at {z['conns']:,})"
                         + (f", {z['conns_per_gib']:,.0f} per GiB of RSS" if z["conns_per_gib"] else ""))
        if parts:
            lines.append(f"- {server_label(name)}: " + "; ".join(parts) + ".")
    lines.append("")
    lines.append("us per ping = (idle CPU - baseline) / pings received by the clients in the window; it includes "
                 "the housekeeping scan, which the fit separates.  Ping period: mean gap between two pings on a "
                 "socket, as the clients saw it; the window is a whole number of periods (pings per conn ~ that "
                 "number, +-1 ping burst: tidings pings in 1 s housekeeper ticks; '-' = no ping seen within 2x "
                 "the interval + 10 s: a plain --keepalive-window).  Steady = baseline + (window - baseline) x "
                 "(open connections / period) / (pings counted / window): the idle CPU with exactly one ping per "
                 "connection per period; the % per 10k, the targets and the sizing use it.  "
                 "A row with closes had connections reaped during the run: its CPU figures are not an idle "
                 "cost, and the fit and the sizing leave it out.")
    return "\n".join(lines) + "\n", summary


def targets(summary: dict) -> list[tuple[str, str, str, bool | None]]:
    """(server, target, measured, met) rows for run.py's targets table (tidings servers)."""
    out = []
    for name, s in summary.items():
        if split_server(name)[0] not in harness.TIDINGS_KINDS:
            continue
        for p in s["points"]:
            at_scale = p["conns"] + p["failed_connects"] >= STORM_CONNS
            if p["interval_s"] == 20.0:
                failed = f", {p['failed_connects']} failed" if p["failed_connects"] else ""
                out.append((name, f"connect storm of {p['conns'] + p['failed_connects']:,} <= {STORM_MAX_S:g} s, "
                                  f"none failing (target at {STORM_CONNS:,})",
                            f"{fmt(p['storm_s'], 1)} s{failed}",
                            p["storm_s"] <= STORM_MAX_S and not p["failed_connects"] if at_scale else None))
            bound = MAX_PCT_PER_10K.get(p["interval_s"])
            if bound is not None:
                out.append((name, f"idle CPU at ping {p['interval_s']:g} s <= {bound:g} % of a core per 10k "
                                  f"connections ({p['conns']:,})", f"{p['pct_core_per_10k']:.2f} %",
                            p["pct_core_per_10k"] <= bound and p["closes"] == 0))
        if s["fit"] and s["fit"]["max_residual"] is not None:
            out.append((name, "keepalive cost linear in connections and pings (worst fit residual)",
                        f"{100 * s['fit']['max_residual']:.0f} %", None))
    return out
