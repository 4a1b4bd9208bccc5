#!/usr/bin/env python3
"""Paired CPU comparison: two servers on ONE core at the same time.

bench/run.py runs the servers one after another, so a change of a few per cent
drowns in a shared machine's drift (a server's CPU per handshake can move by a
third between runs minutes apart).  This runs two servers at once, pinned to
the same core, each with its own load generator (both on another core), so
that whatever else the machine does hits both alike.  Each round reports the
server CPU per unit of work (handshake, delivery, open+join) of both, read from
/proc, and their ratio; the summary is the median ratio.  A server against
itself (an A/A run) shows the method's own spread: about +-3 % on a 2-core
machine.

To compare the checkout with an earlier commit, check that commit out into a
folder under bench/ (bench/old is ignored by git) and run both from the
repository root with the same virtualenv:

    git worktree add bench/old <commit>
    python3 bench/paired.py --rounds 8 --scenario handshakes \\
        --server new='env PYTHONPATH=. .venv/bin/twistd -n --pidfile= happyrobot-ws --env-file=' \\
        --server old='env PYTHONPATH=bench/old .venv/bin/twistd -n --pidfile= happyrobot-ws --env-file='
    git worktree remove bench/old

The absolute figures are higher than bench/run.py's (two servers share a core
and its caches); only the ratio is the result.  Throughput is not compared:
the two servers take turns on the core.  Needs what bench/run.py needs.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (bench/run.py: presets, process handling)

#: the CPU figure per unit of work, by kind of scenario
UNIT = {
    "handshakes": "server_cpu_us_per_handshake",
    "throughput": "server_cpu_us_per_delivery",
    "latency": "server_cpu_us_per_delivery",
    "connections": "server_cpu_us_per_open",
}


def start(cmd, port, opts, logdir, name):
    env = dict(os.environ, PORT=str(port), **run.SERVER_ENV)
    shell_cmd = cmd.replace("{port}", str(port))
    if not any(c in shell_cmd for c in ";&|()"):
        shell_cmd = "exec " + shell_cmd
    with open(os.path.join(logdir, f"paired-{name}.log"), "ab") as out:
        proc = subprocess.Popen(["taskset", "-c", opts.server_cpu, "sh", "-c", shell_cmd], cwd=run.REPO,
                                env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=run.child_setup)
    deadline = time.time() + opts.start_timeout
    while time.time() < deadline and proc.poll() is None:
        pid = run.listener_pid(proc.pid, port)
        if pid:
            return proc, pid
        time.sleep(0.1)
    run.stop(proc.pid)
    sys.exit(f"paired.py: {name} did not listen on {port} (see {logdir}/paired-{name}.log)")


def one_round(servers, lg_args, opts, logdir):
    procs, loadgens = [], []
    try:
        port = opts.base_port
        for name, cmd in servers:
            port = run.free_port(port + 1)
            proc, pid = start(cmd, port, opts, logdir, name)
            procs.append(proc)
            argv = ["taskset", "-c", opts.loadgen_cpu, "node", run.LOADGEN] + shlex.split(lg_args) + [
                "--url", f"ws://127.0.0.1:{port}/ws", "--server-pid", str(pid), "--label", name]
            loadgens.append(argv)
        time.sleep(opts.settle)
        running = [subprocess.Popen(a, cwd=run.BENCH, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    text=True, preexec_fn=run.raise_nofile) for a in loadgens]
        results = []
        for lg in running:
            out, _ = lg.communicate(timeout=opts.run_timeout)
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            results.append(json.loads(lines[-1]) if lines else {"error": f"load generator exit {lg.returncode}"})
        return results
    finally:
        for proc in procs:
            run.stop(proc.pid)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", action="append", metavar="NAME=CMD", default=[],
                    help="exactly two: NAME='shell command' (PORT and {port} give its port)")
    ap.add_argument("--scenario", default="handshakes",
                    help=f"a preset of bench/run.py ({', '.join(run.PRESETS)}) or loadgen arguments")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--server-cpu", default="0", help="taskset CPU list for both servers (default 0)")
    ap.add_argument("--loadgen-cpu", default="1", help="taskset CPU list for both load generators (default 1)")
    ap.add_argument("--base-port", type=int, default=3700)
    ap.add_argument("--start-timeout", type=float, default=30)
    ap.add_argument("--run-timeout", type=float, default=300)
    ap.add_argument("--settle", type=float, default=0.5)
    ap.add_argument("--out", help="write every round's raw results here (JSON)")
    opts = ap.parse_args()
    if len(opts.server) != 2 or not all("=" in s for s in opts.server):
        ap.error("give exactly two --server NAME=CMD")
    servers = [tuple(s.split("=", 1)) for s in opts.server]
    lg_args = run.PRESETS[opts.scenario][0] if opts.scenario in run.PRESETS else opts.scenario
    unit = UNIT.get(run.kind_of(lg_args))
    if unit is None:
        ap.error(f"no CPU-per-unit figure for {lg_args!r}")
    run.ensure_npm_packages()
    logdir = os.path.join(run.RESULTS, "logs")
    os.makedirs(logdir, exist_ok=True)

    (a, _), (b, _) = servers
    rounds, ratios = [], []
    for r in range(1, opts.rounds + 1):
        order = servers if r % 2 else servers[::-1]  # which one starts (and gets the lower port) alternates
        res = dict(zip((n for n, _ in order), one_round(order, lg_args, opts, logdir)))
        rounds.append(res)
        va, vb = run.dig(res[a], unit), run.dig(res[b], unit)
        if not va or not vb:
            run.log(f"round {r}: no figure ({res[a].get('error') or res[b].get('error')})")
            continue
        ratios.append(va / vb)
        run.log(f"round {r}: {a} {va:.1f}  {b} {vb:.1f}  {unit}  {a}/{b} {va / vb:.3f}")
    if not ratios:
        sys.exit("paired.py: no round gave a figure")
    print(f"{a}/{b} {unit}: median {statistics.median(ratios):.3f} over {len(ratios)} rounds "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump({"servers": dict(servers), "loadgen": lg_args, "unit": unit, "rounds": rounds,
                       "ratios": ratios}, f, indent=1)


if __name__ == "__main__":
    main()
