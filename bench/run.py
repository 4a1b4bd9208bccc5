#!/usr/bin/env python3
"""Benchmark runner: our server against peer servers, side by side, on this machine.

For every scenario and round it starts each server afresh (the order alternates
A B A B ... so that drift on a shared machine hits every server alike), pinned to
one core with taskset, waits for its port, runs bench/loadgen.mjs pinned to
another core, and stops the server again -- only the processes it started, by
PID.  It then writes bench/results/<date>.json (every raw result, the medians and
the ratios to the baseline server), bench/results/<date>.png (deliveries/s per
scenario and a latency CDF) and prints a Markdown table.

    python3 bench/run.py --rounds 3 \\
        --server ours='env PYTHONPATH=. .venv/bin/twistd -n --pidfile= happyrobot-ws --env-file=' \\
        --server node='node bench/peers/node_server.mjs' --baseline node \\
        --scenario fanout-1x200 --scenario latency-1x200

(`bash scripts/serve`, run once, makes .venv; bench/peers/node_server.mjs is
the Node.js reference peer.)  Commands run from the repository root.

A server is a shell command; PORT (and {port} in the command) is its port.  Every
server gets RATE_LIMIT_PER_SECOND=0 and MAX_CONNECTIONS_PER_IP=0 in its
environment: one client address opens thousands of connections and publishes
far above the per-connection rate limit that protects production.

Needs Linux (taskset, /proc), Node.js >= 18 with npm (the load generator's
packages are installed into bench/node_modules when missing) and, for the chart,
matplotlib (installed into bench/.venv when this Python lacks it).  Loopback only.
"""
import argparse
import hashlib
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

CLK_TCK = os.sysconf("SC_CLK_TCK")
BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
LOADGEN = os.path.join(BENCH, "loadgen.mjs")
RESULTS = os.path.join(BENCH, "results")

# name -> (loadgen arguments, the same load in the terms of the other load generator that
# --cross-check runs (a cross-check kit's loadgen.mjs: --projects, --subs per project), or None)
PRESETS = {
    "fanout-1x200": (
        "fanout --rooms 1 --subs 200 --pubs 1 --mode closed --inflight 32 --duration 10 --warmup 3",
        "fanout --projects 1 --subs 200 --pubs 1 --mode closed --inflight 32 --duration 10 --warmup 3"),
    "fanout-1x200-k128": (
        "fanout --rooms 1 --subs 200 --pubs 1 --mode closed --inflight 128 --duration 10 --warmup 3",
        "fanout --projects 1 --subs 200 --pubs 1 --mode closed --inflight 128 --duration 10 --warmup 3"),
    "fanout-50x20": (
        "fanout --rooms 50 --subs 20 --pubs 1 --mode closed --inflight 32 --duration 10 --warmup 3",
        "fanout --projects 50 --subs 1000 --pubs 1 --mode closed --inflight 32 --duration 10 --warmup 3"),
    "latency-1x200": (
        "fanout --rooms 1 --subs 200 --pubs 1 --mode rate --rate 100 --duration 10 --warmup 3",
        "fanout --projects 1 --subs 200 --pubs 1 --mode rate --rate 100 --duration 10 --warmup 3"),
    "connections-5k": (
        "connections --connections 5000 --rooms 250 --hold 3",
        "connections --connections 5000 --projects 250 --hold 3"),
    "handshakes": (
        "handshakes --concurrency 32 --duration 5 --warmup 1",
        "handshakes --concurrency 32 --duration 5 --warmup 1"),
    "joinstorm-200": ("joinstorm --clients 200 --storms 3", None),
    # What permessage-deflate costs: clients offering it, events of ~1 kB.
    # Run one server with PERMESSAGE_DEFLATE=true and one without.
    "fanout-1x200-deflate": (
        "fanout --rooms 1 --subs 200 --pubs 1 --mode closed --inflight 32 --duration 10 --warmup 3"
        " --deflate --size 1024", None),
    "latency-1x200-deflate": (
        "fanout --rooms 1 --subs 200 --pubs 1 --mode rate --rate 100 --duration 10 --warmup 3"
        " --deflate --size 1024", None),
}
DEFAULT_SCENARIOS = ["fanout-1x200", "fanout-50x20", "latency-1x200", "connections-5k", "handshakes",
                     "joinstorm-200"]

# kind -> [(key path, column label, higher is better)]; the first metric is the headline
METRICS = {
    "throughput": [("deliveries_per_s", "deliveries/s", True),
                   ("server_cpu_us_per_delivery", "server µs/delivery", False),
                   ("latency_ms.p50", "p50 ms", False),
                   ("latency_ms.p99", "p99 ms", False),
                   ("server_cpu_pct", "server CPU %", None),
                   ("presence_settled_ms", "presence settled ms", False)],
    "latency": [("latency_ms.p50", "p50 ms", False),
                ("latency_ms.p90", "p90 ms", False),
                ("latency_ms.p99", "p99 ms", False),
                ("latency_ms.max", "max ms", False),
                ("server_cpu_us_per_delivery", "server µs/delivery", False),
                # Each event reaches all its recipients' sockets within
                # microseconds of each other, and the load generator reads
                # them one by one: when it needs more CPU per delivery than
                # the server, the latencies show its pace, not the server's.
                ("loadgen_cpu_us_per_delivery", "load generator µs/delivery", False)],
    "connections": [("rss_per_conn_kb", "RSS kB/connection", False),
                    ("server_cpu_us_per_open", "server µs/open+join", False),
                    ("open_ms", "open ms", False)],
    "handshakes": [("handshakes_per_s", "handshakes/s", True),
                   ("server_cpu_us_per_handshake", "server µs/handshake", False),
                   ("latency_ms.p99", "p99 ms", False)],
    "joinstorm": [("settle_ms", "ms until all see 200", False),
                  ("presence_msgs", "presence msgs", False),
                  ("presence_mb", "presence MB", False),
                  ("server_cpu_s", "server CPU s", False)],
}
# what the ratio panel of the chart shows, per kind
CHART_METRICS = {
    "throughput": ["deliveries_per_s", "server_cpu_us_per_delivery"],
    "latency": ["latency_ms.p50", "latency_ms.p99"],
    "connections": ["rss_per_conn_kb"],
    "handshakes": ["handshakes_per_s", "server_cpu_us_per_handshake"],
    "joinstorm": ["settle_ms"],
}
SERVER_ENV = {"RATE_LIMIT_PER_SECOND": "0", "MAX_CONNECTIONS_PER_IP": "0", "HOST": "127.0.0.1"}


def kind_of(args):
    a = shlex.split(args)
    if a[0] != "fanout":
        return a[0]
    mode = "closed"
    for i, x in enumerate(a):
        if x == "--mode" and i + 1 < len(a):
            mode = a[i + 1]
        elif x.startswith("--mode="):
            mode = x.split("=", 1)[1]
    return "latency" if mode == "rate" else "throughput"


def dig(d, path):
    for k in path.split("."):
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- setup
def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def child_setup():
    raise_nofile()
    os.setsid()  # its own group: a Ctrl-C on the runner does not hit it first


def ensure_npm_packages():
    if os.path.exists(os.path.join(BENCH, "node_modules", "ws", "package.json")) and \
            os.path.exists(os.path.join(BENCH, "node_modules", "bufferutil", "package.json")):
        return
    if not shutil.which("npm"):
        sys.exit("run.py: npm is needed to install the load generator's packages (apt-get install nodejs npm)")
    log("installing the load generator's packages (npm ci) ...")
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=BENCH, check=True)


def plotting_python():
    """A Python that has matplotlib: this one, or bench/.venv (created on first use)."""
    try:
        import matplotlib  # noqa: F401
        return sys.executable
    except ImportError:
        pass
    venv = os.path.join(BENCH, ".venv")
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        log("creating bench/.venv for matplotlib ...")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    if subprocess.run([py, "-c", "import matplotlib"], capture_output=True).returncode != 0:
        log("installing matplotlib into bench/.venv ...")
        subprocess.run([py, "-m", "pip", "install", "--quiet", "matplotlib"], check=True)
    return py


def code_fingerprint():
    """Hash of happyrobot/*.py: shows whether our server's code changed during a run."""
    h = hashlib.sha256()
    pkg = os.path.join(REPO, "happyrobot")
    for name in sorted(os.listdir(pkg)) if os.path.isdir(pkg) else []:
        if name.endswith(".py"):
            with open(os.path.join(pkg, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:12]


def machine_info():
    info = {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["node"] = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    try:
        info["git"] = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"],
                                     capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return info


# ---------------------------------------------------------------------------- processes
def proc_children(pid):
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def proc_tree(pid):
    out, todo = [pid], [pid]
    while todo:
        for kid in proc_children(todo.pop()):
            if kid not in out:
                out.append(kid)
                todo.append(kid)
    return out


def running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def listening_inodes(port):
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    col = line.split()
                    if col[3] == "0A" and int(col[1].rsplit(":", 1)[1], 16) == port:
                        found.add(f"socket:[{col[9]}]")
        except OSError:
            pass
    return found


def listener_pid(root, port):
    """The process of our tree that holds the listening socket of `port`, or None."""
    inodes = listening_inodes(port)
    if not inodes:
        return None
    for pid in proc_tree(root):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        return pid
                except OSError:
                    pass
        except OSError:
            pass
    return None


def free_port(start):
    for port in range(start, start + 500):
        if listening_inodes(port):
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def stop(root, grace=10.0):
    """SIGTERM, then SIGKILL after `grace` seconds, to the processes we started, by PID."""
    pids = [p for p in proc_tree(root) if running(p)]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        until = time.time() + wait
        while time.time() < until and any(running(p) for p in pids):
            time.sleep(0.05)
        if not any(running(p) for p in pids):
            return


def cores_busy(seconds=1.0):
    """Busy % of each core over `seconds`, from /proc/stat."""
    def snap():
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3].isdigit():
                    v = [int(x) for x in line.split()[1:9]]
                    out[int(line[3:line.index(" ")])] = (sum(v) - v[3] - v[4], sum(v))
        return out
    a = snap()
    time.sleep(seconds)
    b = snap()
    return {c: round(100.0 * (b[c][0] - a[c][0]) / max(1, b[c][1] - a[c][1]), 1) for c in b if c in a}


def cpu_by_process():
    """pid -> CPU seconds of every live process (short-lived ones can be missed)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                v = f.read().rsplit(")", 1)[1].split()
            out[int(d)] = (int(v[11]) + int(v[12])) / CLK_TCK  # utime + stime
            # (not cutime/cstime: a reaped child's whole life would land in one run)
        except (OSError, IndexError, ValueError):
            pass
    return out


def other_cpu_pct(before, after, ours, wall):
    """CPU % used during a run by processes that are not the runner, its server or its load generator."""
    used = 0.0
    for pid, t in after.items():
        if pid not in ours:
            used += max(0.0, t - before.get(pid, 0.0))
    return round(100.0 * used / wall, 1)


def wait_for_quiet(opts):
    """Before a run (none of our processes alive): wait until the cores we use are
    nearly idle, so that other work on a shared machine does not land in a result."""
    cpus = {int(c) for c in (opts.server_cpu + "," + opts.loadgen_cpu).split(",") if c.strip().isdigit()}
    t0 = time.time()
    warned = False
    while True:
        busy = cores_busy()
        worst = max((busy.get(c, 0.0) for c in cpus), default=0.0)
        if worst <= opts.max_background or time.time() - t0 >= opts.quiet_wait:
            return {"background_busy_pct": worst, "waited_s": round(time.time() - t0, 1)}
        if not warned:
            log(f"  waiting for the machine to be quiet (cores {sorted(cpus)} {worst}% busy with other work) ...")
            warned = True
        time.sleep(2)


# ---------------------------------------------------------------------------- one run
def run_once(name, cmd, scenario, lg_args, loadgen, opts, seq, logdir):
    port = free_port(opts.base_port)
    env = dict(os.environ, PORT=str(port), **SERVER_ENV)
    shell_cmd = cmd.replace("{port}", str(port))
    if not any(c in shell_cmd for c in ";&|()"):
        shell_cmd = "exec " + shell_cmd  # the server becomes the process we started
    logfile = os.path.join(logdir, f"{seq:03d}-{scenario}-{name}.log")
    rec = {"server": name, "scenario": scenario, "loadgen": loadgen, "port": port, "code": code_fingerprint()}
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(["taskset", "-c", opts.server_cpu, "sh", "-c", shell_cmd], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, preexec_fn=child_setup)
    try:
        deadline = time.time() + opts.start_timeout
        pid = None
        while time.time() < deadline and proc.poll() is None:
            pid = listener_pid(proc.pid, port)
            if pid:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    pass
            time.sleep(0.1)
        else:
            rec["error"] = f"server did not listen on {port} (see {logfile})"
            return rec
        rec["server_pid"] = pid
        time.sleep(opts.settle)
        script = LOADGEN if loadgen == "bench" else loadgen
        argv = ["taskset", "-c", opts.loadgen_cpu, "node", script] + shlex.split(lg_args) + [
            "--url", f"ws://127.0.0.1:{port}/ws", "--server-pid", str(pid), "--label", name]
        if loadgen != "bench":
            argv.append("--quiet")
        rec["loadgen_argv"] = " ".join(shlex.quote(a) for a in argv)
        cpu0, t0 = cpu_by_process(), time.time()
        lg = subprocess.Popen(argv, cwd=BENCH, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=raise_nofile)
        try:
            stdout, stderr = lg.communicate(timeout=opts.run_timeout)
        except subprocess.TimeoutExpired:
            lg.kill()
            lg.communicate()
            rec["error"] = "load generator timed out"
            return rec
        except BaseException:
            lg.kill()  # interrupted: ours, so we end it
            lg.wait()
            raise
        # CPU that other processes on this machine used meanwhile: a shared machine's noise
        ours = set(proc_tree(proc.pid)) | {os.getpid(), lg.pid}
        rec["other_cpu_pct"] = other_cpu_pct(cpu0, cpu_by_process(), ours, time.time() - t0)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        if not lines:
            rec["error"] = f"load generator exit {lg.returncode}: {stderr[-400:]}"
            return rec
        result = json.loads(lines[-1])
        rec["result"] = result
        if "error" in result:
            rec["error"] = str(result["error"])[:400]
        rec["server_survived"] = running(pid)
        return rec
    finally:
        stop(proc.pid)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


# ---------------------------------------------------------------------------- summary
def summarise(data):
    """Medians per (scenario, server, loadgen) and paired ratios to the baseline."""
    base = data["baseline"]
    out = {}
    for sc, sc_args in data["scenarios"].items():
        metrics = METRICS[kind_of(sc_args)]
        out[sc] = {}
        for lg in data["loadgens"]:
            ok = [r for r in data["records"] if r["scenario"] == sc and r["loadgen"] == lg
                  and "result" in r and "error" not in r and "discarded" not in r]
            if not ok:
                continue
            for srv in data["servers"]:
                mine = [r for r in ok if r["server"] == srv]
                if not mine:
                    continue
                entry = {"runs": len(mine), "median": {}, "min": {}, "max": {}, "ratio": {}}
                for key, _, _ in metrics:
                    vals = [dig(r["result"], key) for r in mine if dig(r["result"], key) is not None]
                    entry["median"][key] = statistics.median(vals) if vals else None
                    entry["min"][key] = min(vals) if vals else None
                    entry["max"][key] = max(vals) if vals else None
                    # ratio to the baseline run of the same round (adjacent in time), then the median
                    pairs = []
                    for r in mine:
                        b = [x for x in ok if x["server"] == base and x["round"] == r["round"]]
                        if b and dig(b[0]["result"], key) and dig(r["result"], key) is not None:
                            pairs.append(dig(r["result"], key) / dig(b[0]["result"], key))
                    entry["ratio"][key] = statistics.median(pairs) if pairs else None
                lgc = [r["result"].get("loadgen_cpu_pct") for r in mine if r["result"].get("loadgen_cpu_pct") is not None]
                core = [dig(r["result"], "core_busy_pct") for r in mine]
                lcore = int(data["options"]["loadgen_cpu"].split(",")[0])
                core = [c[lcore] for c in core if isinstance(c, list) and len(c) > lcore and c[lcore] is not None]
                entry["loadgen_cpu_pct_max"] = max(lgc) if lgc else None
                entry["loadgen_core_busy_pct_max"] = max(core) if core else None
                entry["lost_deliveries"] = sum(r["result"].get("lost_deliveries") or 0 for r in mine)
                entry["errors"] = [r["error"] for r in data["records"] if r["scenario"] == sc and r["server"] == srv
                                   and r["loadgen"] == lg and "error" in r]
                entry["discarded_runs"] = sum(1 for r in data["records"] if r["scenario"] == sc and r["server"] == srv
                                              and r["loadgen"] == lg and "discarded" in r)
                oc = [r.get("other_cpu_pct") for r in mine if r.get("other_cpu_pct") is not None]
                entry["other_cpu_pct_max"] = max(oc) if oc else None
                out[sc].setdefault(lg, {})[srv] = entry
    return out


def fmt(v):
    if v is None:
        return "–"
    if isinstance(v, float) and abs(v) < 10:
        return f"{v:.3g}"
    if isinstance(v, (int, float)) and abs(v) >= 1000:
        return f"{v/1000:.3g}k" if abs(v) < 1e6 else f"{v/1e6:.3g}M"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(data, summary):
    base = data["baseline"]
    servers = list(data["servers"])
    others = [s for s in servers if s != base]
    lines = []
    head = "| scenario | metric | " + " | ".join(servers) + " | " + " | ".join(f"{s} / {base}" for s in others) + " |"
    lines += [head, "|" + "---|" * (2 + len(servers) + len(others))]
    for sc, sc_args in data["scenarios"].items():
        per = summary.get(sc, {}).get("bench", {})
        if not per:
            lines.append(f"| {sc} | (no result) |" + " |" * (len(servers) + len(others)))
            continue
        for i, (key, label, better) in enumerate(METRICS[kind_of(sc_args)]):
            row = [sc if i == 0 else "", label + (" ↑" if better else " ↓" if better is False else "")]
            # (.get: results written before a metric existed lack it)
            row += [fmt(per[s]["median"].get(key)) if s in per else "–" for s in servers]
            row += [(f"**{per[s]['ratio'][key]:.2f}×**" if i == 0 else f"{per[s]['ratio'][key]:.2f}×")
                    if s in per and per[s]["ratio"].get(key) is not None else "–" for s in others]
            lines.append("| " + " | ".join(row) + " |")
        lg_row = [""] * 2
        lg_row[1] = "loadgen CPU % / its core busy % / other processes % (max)"
        for s in servers:
            e = per.get(s)
            lg_row.append(f"{fmt(e['loadgen_cpu_pct_max'])} / {fmt(e['loadgen_core_busy_pct_max'])} / "
                          f"{fmt(e['other_cpu_pct_max'])}" if e else "–")
        lg_row += [""] * len(others)
        lines.append("| " + " | ".join(lg_row) + " |")
    return "\n".join(lines)


def crosscheck_markdown(data, summary):
    ref = [lg for lg in data["loadgens"] if lg != "bench"]
    if not ref:
        return ""
    ref = ref[0]
    lines = ["| scenario | server | metric | bench/loadgen.mjs | reference loadgen | bench / reference |",
             "|---|---|---|---|---|---|"]
    for sc, sc_args in data["scenarios"].items():
        for srv in data["servers"]:
            a = summary.get(sc, {}).get("bench", {}).get(srv)
            b = summary.get(sc, {}).get(ref, {}).get(srv)
            if not a or not b:
                continue
            for key, label, _ in METRICS[kind_of(sc_args)][:4] + [("loadgen_cpu_pct", "loadgen CPU %", None)]:
                va = a["median"].get(key) if key != "loadgen_cpu_pct" else a["loadgen_cpu_pct_max"]
                vb = b["median"].get(key) if key != "loadgen_cpu_pct" else b["loadgen_cpu_pct_max"]
                r = f"{va / vb:.2f}" if va is not None and vb else "–"
                lines.append(f"| {sc} | {srv} | {label} | {fmt(va)} | {fmt(vb)} | {r} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- chart
def draw_chart(data, summary, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    servers = list(data["servers"])
    base = data["baseline"]
    colours = {s: c for s, c in zip(servers, ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"])}
    thr = [sc for sc, a in data["scenarios"].items() if kind_of(a) == "throughput" and summary.get(sc, {}).get("bench")]
    lat = [sc for sc, a in data["scenarios"].items() if kind_of(a) == "latency" and summary.get(sc, {}).get("bench")]
    fig = plt.figure(figsize=(14, 10))
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.1])
    axes = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])]
    fig.suptitle(f"Happy Robot server benchmark, {data['date'].split(' ')[0]} ({data['machine'].get('cpus')} cores; server on core "
                 f"{data['options']['server_cpu']}, load generator on core {data['options']['loadgen_cpu']}; "
                 f"medians of {data['rounds']} rounds, whiskers min–max)", fontsize=10)

    ax = axes[0]
    width = 0.8 / max(1, len(servers))
    for i, srv in enumerate(servers):
        xs, ys, lo, hi = [], [], [], []
        for j, sc in enumerate(thr):
            e = summary[sc]["bench"].get(srv)
            if not e or e["median"]["deliveries_per_s"] is None:
                continue
            m = e["median"]["deliveries_per_s"]
            xs.append(j + (i - (len(servers) - 1) / 2) * width)
            ys.append(m / 1000)
            lo.append((m - e["min"]["deliveries_per_s"]) / 1000)
            hi.append((e["max"]["deliveries_per_s"] - m) / 1000)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=srv, color=colours[srv])
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.0f}k", (x, y), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(thr)))
    ax.set_xticklabels(thr, fontsize=9)
    ax.set_ylabel("deliveries/s (thousands)")
    ax.set_title("fan-out throughput, closed loop (higher is better)", fontsize=10)
    ax.legend(fontsize=9)

    ax = axes[1]
    for sc in lat[:1]:
        for srv in servers:
            runs = [r for r in data["records"] if r["scenario"] == sc and r["server"] == srv and r["loadgen"] == "bench"
                    and "error" not in r and "discarded" not in r and r.get("result", {}).get("latency_cdf_ms")]
            if not runs:
                continue
            runs.sort(key=lambda r: r["result"]["latency_ms"]["p50"])
            for k, r in enumerate(runs):
                pts = r["result"]["latency_cdf_ms"]
                mid = k == len(runs) // 2
                ax.plot([p[1] for p in pts], [p[0] for p in pts], color=colours[srv], lw=2 if mid else 0.8,
                        alpha=1 if mid else 0.35, label=f"{srv}" if mid else None)
        ax.set_title(f"latency CDF, {sc}: {data['scenarios'][sc].split('--rate ')[1].split()[0]} events/s "
                     f"(bold: median run)", fontsize=10)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("delivery latency, ms (publisher send → subscriber read)")
    ax.set_ylabel("fraction of deliveries")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9, loc="lower right")

    ax = axes[2]
    labels, vals, cols = [], [], []
    for sc, sc_args in data["scenarios"].items():
        per = summary.get(sc, {}).get("bench", {})
        for key, label, better in METRICS[kind_of(sc_args)]:
            if key not in CHART_METRICS[kind_of(sc_args)]:
                continue
            for srv in servers:
                if srv == base or srv not in per or per[srv]["ratio"][key] is None:
                    continue
                labels.append(f"{sc}: {label} {'↑' if better else '↓'}" + (f" ({srv})" if len(servers) > 2 else ""))
                vals.append(per[srv]["ratio"][key])
                cols.append(colours[srv])
    y = range(len(labels))[::-1]
    ax.barh(list(y), vals, color=cols)
    for yy, v in zip(y, vals):
        ax.annotate(f"{v:.2f}×", (v, yy), va="center", fontsize=8, xytext=(3, 0), textcoords="offset points")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(list(y))
    ax.set_yticklabels(labels, fontsize=8)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.set_title(f"ratio to {base}, paired by round (↑ higher is better, ↓ lower is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def render(json_path, png_path):
    with open(json_path) as f:
        data = json.load(f)
    py = plotting_python()
    if py == sys.executable:
        draw_chart(data, data["summary"], png_path)
    else:
        subprocess.run([py, os.path.abspath(__file__), "--chart", json_path, "--png", png_path], check=True)


# ---------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", action="append", metavar="NAME=CMD", default=[],
                    help="a server: NAME='shell command' (repeat; PORT and {port} give its port)")
    ap.add_argument("--baseline", help="server the ratios are computed against (default: the first)")
    ap.add_argument("--scenario", action="append", metavar="PRESET|NAME=ARGS", default=[],
                    help=f"a preset ({', '.join(PRESETS)}) or NAME='loadgen arguments' (repeat); "
                         f"default: {' '.join(DEFAULT_SCENARIOS)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cross-check", metavar="LOADGEN",
                    help="also run another load generator (e.g. a cross-check kit's loadgen.mjs) on the presets it "
                         "supports, alternating with ours, and compare their figures")
    ap.add_argument("--server-cpu", default="0", help="taskset CPU list for the servers (default 0)")
    ap.add_argument("--loadgen-cpu", default="1", help="taskset CPU list for the load generator (default 1)")
    ap.add_argument("--base-port", type=int, default=3700)
    ap.add_argument("--start-timeout", type=float, default=30)
    ap.add_argument("--run-timeout", type=float, default=300)
    ap.add_argument("--settle", type=float, default=0.5, help="seconds between the port opening and the load")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between runs")
    ap.add_argument("--max-background", type=float, default=10.0,
                    help="before each run, wait until the cores used are at most this %% busy (default 10)")
    ap.add_argument("--quiet-wait", type=float, default=600,
                    help="...but at most this many seconds, then run anyway (default 600)")
    ap.add_argument("--max-noise", type=float, default=15.0,
                    help="a run during which other processes used more than this %% of a core is repeated")
    ap.add_argument("--retries", type=int, default=2, help="...at most this many times (default 2)")
    ap.add_argument("--out", help="results file (default bench/results/<date>.json; the chart goes beside it)")
    ap.add_argument("--chart", metavar="JSON", help="only draw the chart of an earlier results file")
    ap.add_argument("--png", help="with --chart: where to write it")
    ap.add_argument("--table", metavar="JSON", help="only print the tables of an earlier results file")
    opts = ap.parse_args()

    if opts.chart:
        render(opts.chart, opts.png or opts.chart[:-5] + ".png")
        return
    if opts.table:
        with open(opts.table) as f:
            data = json.load(f)
        summary = summarise(data)  # from the raw records: metrics added since are shown too
        print(markdown(data, summary))
        cc = crosscheck_markdown(data, summary)
        if cc:
            print("\nCross-check of the load generators:\n\n" + cc)
        return

    if sys.platform != "linux" or not shutil.which("taskset"):
        sys.exit("run.py: needs Linux with taskset (util-linux)")
    if not shutil.which("node"):
        sys.exit("run.py: needs Node.js >= 18 (node) for the load generator")
    servers = {}
    for spec in opts.server:
        name, eq, cmd = spec.partition("=")
        if not eq or not cmd.strip() or not name:
            ap.error(f"--server wants NAME=COMMAND, got {spec!r}")
        servers[name] = cmd
    if not servers:
        twistd = os.path.join(REPO, ".venv", "bin", "twistd")
        if not os.path.exists(twistd):
            ap.error("give --server ours='...' (or run `bash scripts/serve` once, which creates .venv)")
        servers["ours"] = f"env PYTHONPATH={shlex.quote(REPO)} {shlex.quote(twistd)} -n --pidfile= happyrobot-ws --env-file="
    baseline = opts.baseline or next(iter(servers))
    if baseline not in servers:
        ap.error(f"--baseline {baseline} is not one of the servers")
    scenarios, ref_args = {}, {}
    for spec in opts.scenario or DEFAULT_SCENARIOS:
        name, eq, args = spec.partition("=")
        if eq:
            scenarios[name] = args
        elif name in PRESETS:
            scenarios[name], ref_args[name] = PRESETS[name]
        else:
            ap.error(f"unknown scenario preset {name!r}")
    loadgens = ["bench"]
    if opts.cross_check:
        if not os.path.exists(opts.cross_check):
            ap.error(f"--cross-check: no such file {opts.cross_check}")
        loadgens.append(os.path.abspath(opts.cross_check))

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also when started in the background, where SIGINT is ignored
    raise_nofile()
    ensure_npm_packages()
    os.makedirs(RESULTS, exist_ok=True)
    started = datetime.now(timezone.utc)
    stamp = started.strftime("%Y-%m-%d-%H%M%S")
    out = opts.out or os.path.join(RESULTS, f"{stamp}.json")
    logdir = os.path.join(RESULTS, f"{stamp}-logs")
    os.makedirs(logdir, exist_ok=True)
    data = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "command": " ".join(shlex.quote(a) for a in sys.argv),
            "machine": machine_info(), "servers": servers, "baseline": baseline, "scenarios": scenarios,
            "loadgens": loadgens, "rounds": opts.rounds, "server_env": SERVER_ENV,
            "options": {"server_cpu": opts.server_cpu, "loadgen_cpu": opts.loadgen_cpu,
                        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0]},
            "records": []}
    log(f"# {data['date']}: {len(servers)} server(s) x {len(scenarios)} scenario(s) x {opts.rounds} round(s); "
        f"servers on CPU {opts.server_cpu}, load generator on CPU {opts.loadgen_cpu}; results -> {out}")
    seq = 0
    try:
        for sc, sc_args in scenarios.items():
            for rnd in range(opts.rounds):
                for lg in loadgens:
                    args = sc_args if lg == "bench" else ref_args.get(sc)
                    if args is None:
                        continue
                    for name, cmd in servers.items():
                        for attempt in range(1 + opts.retries):
                            seq += 1
                            quiet = wait_for_quiet(opts)
                            rec = run_once(name, cmd, sc, args, lg, opts, seq, logdir)
                            rec.update(quiet)
                            rec["round"] = rnd
                            data["records"].append(rec)
                            noisy = (rec.get("other_cpu_pct") or 0) > opts.max_noise
                            if noisy and attempt < opts.retries:
                                rec["discarded"] = f"other processes used {rec['other_cpu_pct']}% CPU during the run"
                                log(f"[{sc} round {rnd + 1} {name}] discarded and repeated: {rec['discarded']}")
                                time.sleep(opts.pause)
                                continue
                            break
                        r = rec.get("result", {})
                        head = METRICS[kind_of(sc_args)][0][0]
                        log(f"[{sc} round {rnd + 1} {name}{'' if lg == 'bench' else ' (reference loadgen)'}] "
                            f"{head}={dig(r, head)} server_cpu%={r.get('server_cpu_pct')} "
                            f"loadgen_cpu%={r.get('loadgen_cpu_pct')} cores%={r.get('core_busy_pct')} "
                            f"other processes={rec.get('other_cpu_pct')}%"
                            + (f"  ERROR: {rec['error']}" if "error" in rec else ""))
                        time.sleep(opts.pause)
    except KeyboardInterrupt:
        log("interrupted: writing what was measured")
    codes = sorted({r["code"] for r in data["records"]})
    data["code_fingerprints"] = codes
    data["summary"] = summarise(data)
    with open(out, "w") as f:
        json.dump(data, f, indent=1)
    png = out[:-5] + ".png" if out.endswith(".json") else out + ".png"
    try:
        render(out, png)
        log(f"chart: {png}")
    except Exception as e:  # noqa: BLE001 -- the numbers matter more than the picture
        log(f"chart failed: {e}")
    print(f"## {data['date']}\n\n`{data['command']}`\n")
    print(markdown(data, data["summary"]))
    cc = crosscheck_markdown(data, data["summary"])
    if cc:
        print("\nCross-check of the load generators:\n\n" + cc)
    if len(codes) > 1:
        print(f"\nNOTE: happyrobot/*.py changed during the run ({len(codes)} versions: {', '.join(codes)}); "
              "see each record's \"code\".")
    print(f"\nresults: {out}\nchart: {png}")


if __name__ == "__main__":
    main()
