#!/usr/bin/env python3
"""Intake benchmark: events through the Redis stream (INTAKE_STREAM) against POST /broadcast.

One run starts a redis-server and one server with REDIS_URL and INTAKE_STREAM
(pinned to core 0 with taskset; Redis and this script on core 1), connects
--subs WebSocket subscribers to each of --rooms rooms, and then, round by round:

  * rate (after one phase of each path that is not counted): for each --rate, that many events/s spread over the rooms, first through the stream
    (XADD <stream> * event <json>, pipelined on one connection), then through
    POST /broadcast (HTTP/1.1 keep-alive, pipelined over --http-connections),
    in alternating order; the same JSON body either way.  Reported: events/s
    delivered into the rooms, the time from the XADD or the POST being written
    to the event's arrival at one subscriber per room (p50, p99), loss, and
    the server's CPU per event;
  * drain: the server is frozen (SIGSTOP), --drain entries are appended, the
    server goes on (SIGCONT): entries/s from then until the last one reached
    its room's subscribers, the intake's throughput.

    .venv/bin/python bench/intake.py --rounds 3 \\
        --server 'env PYTHONPATH=. .venv/bin/twistd -n --pidfile= happyrobot-ws --env-file='

(`bash scripts/serve`, run once, makes .venv.)  Commands run from the repository
root.  The server gets PORT, REDIS_URL, INTAKE_STREAM, RATE_LIMIT_PER_SECOND=0,
MAX_CONNECTIONS_PER_IP=0 and PING_INTERVAL=0 in its environment.  Needs Linux
(taskset, /proc) and redis-server on the PATH.  Loopback only.  It stops only the
processes it started, by PID.
"""
import argparse
import base64
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import LoopingCall, deferLater

CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STREAM = b"bench:intake"
ORIGIN = b"http://localhost:3000"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        v = f.read().rsplit(")", 1)[1].split()
    return (int(v[11]) + int(v[12])) / CLK_TCK


def wait_port(port, seconds=30.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"intake.py: nothing listens on port {port} after {seconds} s")


def percentile(values, q):
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def body(room, k, kind):
    return json.dumps({"type": "BENCH", "projectId": room, "operationId": f"{kind}-{k}",
                       "payload": {"t": time.perf_counter()}}, separators=(",", ":")).encode()


class Stats:
    """What the subscribers saw."""

    def __init__(self):
        self.frames = 0  # BENCH frames at every subscriber
        self.probed = 0  # BENCH frames at the probe subscribers (one per room): events
        self.by_phase = {}  # the same, by phase (the operationId's prefix)
        self.latency = []  # seconds, probes only, while recording
        self.recording = False
        self.current = b""  # the phase whose latencies are recorded
        self.joined = 0


class Subscriber(Protocol):
    """A WebSocket client parsing the server's (unmasked) frames itself: cheap per frame."""

    def __init__(self, stats, room, user, probe):
        self.stats, self.room, self.user, self.probe = stats, room, user, probe
        self.buf = b""
        self.open = False
        self.joined = False

    def connectionMade(self):
        key = base64.b64encode(os.urandom(16))
        self.transport.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key +
                             b"\r\nSec-WebSocket-Version: 13\r\nOrigin: " + ORIGIN + b"\r\n\r\n")

    def send(self, obj):
        data = json.dumps(obj).encode()
        n = len(data)
        head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
        self.transport.write(head + b"\0\0\0\0" + data)  # a zero mask leaves the bytes as they are

    def dataReceived(self, data):
        buf = self.buf + data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                raise SystemExit("intake.py: the WebSocket handshake was refused: " + buf[:80].decode())
            self.open = True
            buf = buf[end + 4:]
            self.send({"type": "SET_USER", "payload": {"userId": self.user}})
            self.send({"type": "JOIN_PROJECT", "projectId": self.room})
        pos, n, stats = 0, len(buf), self.stats
        while n - pos >= 2:
            length, head = buf[pos + 1] & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            if n - pos < head + length:
                break
            payload = buf[pos + head:pos + head + length]
            pos += head + length
            if payload.startswith(b'{"type":"BENCH"'):
                stats.frames += 1
                if self.probe:
                    stats.probed += 1
                    at = payload.find(b'"operationId":"') + 15
                    phase = payload[at:payload.find(b"-", at)]
                    stats.by_phase[phase] = stats.by_phase.get(phase, 0) + 1
                    if stats.recording and phase == stats.current:
                        t = json.loads(payload)["payload"]["t"]
                        stats.latency.append(time.perf_counter() - t)
            elif not self.joined and b'"USER_PRESENCE"' in payload:
                self.joined = True
                stats.joined += 1
        self.buf = buf[pos:]


class Sink(Protocol):
    """A publisher's connection: counts replies (RESP or HTTP) and errors."""

    def __init__(self, marker, error):
        self.marker, self.error = marker, error
        self.replies = self.errors = 0
        self.tail = b""

    def dataReceived(self, data):
        data = self.tail + data
        self.replies += data.count(self.marker)
        self.errors += data.count(self.error)
        self.tail = data[-16:]
        # A marker split across reads is counted once the rest arrives;
        # one wholly in the tail would be counted twice: drop it.
        self.replies -= self.tail.count(self.marker)
        self.errors -= self.tail.count(self.error)


async def connect(port, proto):
    factory = ClientFactory()
    factory.protocol = lambda: proto
    done = Deferred()
    proto.connectionMade = (lambda made: lambda: (made(), done.callback(proto)))(proto.connectionMade)
    reactor.connectTCP("127.0.0.1", port, factory)
    return await done


def xadd(data):
    return b"*5\r\n$4\r\nXADD\r\n$%d\r\n%s\r\n$1\r\n*\r\n$5\r\nevent\r\n$%d\r\n%s\r\n" % (
        len(STREAM), STREAM, len(data), data)


def post(data):
    return (b"POST /broadcast HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(data), data))


class Bench:
    def __init__(self, opts, server_pid, port, redis_port):
        self.opts, self.server_pid, self.port, self.redis_port = opts, server_pid, port, redis_port
        self.rooms = [f"bench-{i}" for i in range(opts.rooms)]
        self.stats = Stats()
        self.k = 0
        self.phase = 0
        self.xadds = 0  # XADDs written (each answered with two CRLFs)

    async def setup(self):
        for r in self.rooms:
            for s in range(self.opts.subs):
                await connect(self.port, Subscriber(self.stats, r, f"sub-{r}-{s}", s == 0))
        want = len(self.rooms) * self.opts.subs
        for _ in range(600):
            if self.stats.joined >= want:
                break
            await deferLater(reactor, 0.05, lambda: None)
        else:
            raise SystemExit(f"intake.py: only {self.stats.joined} of {want} subscribers joined")
        self.redis = await connect(self.redis_port, Sink(b"\r\n", b"-ERR"))
        self.http_errors = 0
        await deferLater(reactor, 1.0, lambda: None)  # the intake has its lease

    async def rate(self, kind, rate):
        """Open loop at C{rate} for warm-up + duration; figures of the measured window."""
        o, st = self.opts, self.stats
        self.phase += 1
        tag = f"{kind}{self.phase}"
        first_k = self.k
        rooms, n_rooms = self.rooms, len(self.rooms)
        http = []
        if kind == "broadcast":  # fresh: the server closes idle HTTP connections
            http = [await connect(self.port, Sink(b"HTTP/1.1 ", b"HTTP/1.1 5"))
                    for _ in range(o.http_connections)]
        n_http = len(http)
        start = time.perf_counter()
        sent = [0]

        def tick():
            due = int(rate * (time.perf_counter() - start)) - sent[0]
            for _ in range(due):
                k = self.k
                self.k += 1
                data = body(rooms[k % n_rooms], k, tag)
                if kind == "intake":
                    self.xadds += 1
                    self.redis.transport.write(xadd(data))
                else:
                    http[k % n_http].transport.write(post(data))
            sent[0] += due

        loop = LoopingCall(tick)
        loop.start(0.001)
        await deferLater(reactor, o.warmup, lambda: None)
        key = tag.encode()
        st.recording, st.latency, st.current = True, [], key
        probed0, frames0, sent0 = st.by_phase.get(key, 0), st.frames, sent[0]
        cpu0, t0 = cpu_seconds(self.server_pid), time.perf_counter()
        await deferLater(reactor, o.duration, lambda: None)
        cpu1, t1 = cpu_seconds(self.server_pid), time.perf_counter()
        probed1, frames1, sent1 = st.by_phase.get(key, 0), st.frames, sent[0]
        st.recording = False
        loop.stop()
        for _ in range(200):  # up to 10 s for the stragglers
            if st.by_phase.get(tag.encode(), 0) >= self.k - first_k:
                break
            await deferLater(reactor, 0.05, lambda: None)
        late = self.k - first_k - st.by_phase.get(tag.encode(), 0)
        for h in http:
            self.http_errors += h.errors
            h.transport.loseConnection()
        events = probed1 - probed0
        wall = t1 - t0
        return {
            "kind": kind, "rate": rate, "offered_per_s": round((sent1 - sent0) / wall),
            "events_per_s": round(events / wall), "frames_per_s": round((frames1 - frames0) / wall),
            "p50_ms": ms(percentile(st.latency, 0.5)), "p99_ms": ms(percentile(st.latency, 0.99)),
            "not_delivered_10s_after": late,
            "server_cpu_us_per_event": round((cpu1 - cpu0) / max(1, events) * 1e6, 1),
            "server_cpu_pct": round(100 * (cpu1 - cpu0) / wall, 1),
        }

    async def drain(self):
        """Freeze the server, append --drain entries, let it go: its entries/s."""
        o, st = self.opts, self.stats
        self.phase += 1
        tag = f"drain{self.phase}"
        os.kill(self.server_pid, signal.SIGSTOP)
        try:
            first = self.k
            for chunk in range(0, o.drain, 1000):
                parts = []
                for k in range(first + chunk, first + min(o.drain, chunk + 1000)):
                    parts.append(xadd(body(self.rooms[k % len(self.rooms)], k, tag)))
                self.redis.transport.write(b"".join(parts))
                await deferLater(reactor, 0, lambda: None)
            self.k = first + o.drain
            self.xadds += o.drain
            for _ in range(600):  # every XADD answered (the entries are in the stream)
                if self.redis.replies >= 2 * self.xadds:
                    break
                await deferLater(reactor, 0.02, lambda: None)
        finally:
            os.kill(self.server_pid, signal.SIGCONT)
        start, cpu0 = time.perf_counter(), cpu_seconds(self.server_pid)
        for _ in range(12000):  # up to 120 s
            if st.by_phase.get(tag.encode(), 0) >= o.drain:
                break
            await deferLater(reactor, 0.01, lambda: None)
        wall = time.perf_counter() - start
        done = st.by_phase.get(tag.encode(), 0)
        return {"kind": "drain", "entries": o.drain, "delivered": done,
                "entries_per_s": round(done / wall), "seconds": round(wall, 3),
                "server_cpu_us_per_event": round((cpu_seconds(self.server_pid) - cpu0)
                                                 / max(1, done) * 1e6, 1)}


def ms(seconds):
    return None if seconds is None else round(seconds * 1000, 3)


async def run(opts, server_pid, port, redis_port):
    bench = Bench(opts, server_pid, port, redis_port)
    await bench.setup()
    for kind in [k for k in ("intake", "broadcast") if k in opts.paths]:
        log(f"warming up {kind} (not counted)")
        await bench.rate(kind, opts.rate[0])
    results = []
    for r in range(opts.rounds):
        order = ["intake", "broadcast"] if r % 2 == 0 else ["broadcast", "intake"]
        for rate in opts.rate:
            for kind in [k for k in order if k in opts.paths]:
                res = await bench.rate(kind, rate)
                res["round"] = r
                log(json.dumps(res))
                results.append(res)
        if opts.drain:
            res = await bench.drain()
            res["round"] = r
            log(json.dumps(res))
            results.append(res)
    errors = bench.redis.errors + bench.http_errors
    return results, errors


def table(results, opts):
    lines = [f"{opts.rooms} rooms x {opts.subs} subscribers, median of {opts.rounds} rounds:", "",
             "| offered events/s | path | events/s into rooms | deliveries/s | p50 ms | p99 ms | late "
             "| server µs/event | server CPU % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rate, kind, label in [(rate, kind, label) for rate in opts.rate for kind, label in
                              (("intake", "XADD to the intake stream"),
                               ("broadcast", "POST /broadcast"))]:
        rs = [r for r in results if r["kind"] == kind and r["rate"] == rate]
        if not rs:
            continue

        def med(key):
            vals = [r[key] for r in rs if r[key] is not None]
            return round(statistics.median(vals), 3) if vals else None

        lines.append(f"| {rate} | {label} | {med('events_per_s')} | {med('frames_per_s')} | {med('p50_ms')} | "
                     f"{med('p99_ms')} | {sum(r['not_delivered_10s_after'] for r in rs)} | "
                     f"{med('server_cpu_us_per_event')} | {med('server_cpu_pct')} |")
    drains = [r for r in results if r["kind"] == "drain"]
    if drains:
        lines += ["", f"Drain of {opts.drain} entries (server frozen while they are appended): "
                  f"median {statistics.median(r['entries_per_s'] for r in drains):.0f} entries/s "
                  f"into the rooms, {statistics.median(r['server_cpu_us_per_event'] for r in drains)} "
                  "server µs/entry"]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--server", default="env PYTHONPATH=. .venv/bin/twistd -n --pidfile= "
                   "happyrobot-ws --env-file=", help="the server's command (run from the repository root)")
    p.add_argument("--rooms", type=int, default=10)
    p.add_argument("--subs", type=int, default=5, help="subscribers per room")
    p.add_argument("--rate", type=int, nargs="+", default=[1000, 2000],
                   help="events/s offered in the rate phases (one phase per value and path)")
    p.add_argument("--paths", nargs="+", choices=["intake", "broadcast"],
                   default=["intake", "broadcast"], help="the paths of the rate phases")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--drain", type=int, default=100000, help="entries of the drain phase (0: none)")
    p.add_argument("--http-connections", type=int, default=64,
                   help="keep-alive connections POST /broadcast is spread over")
    p.add_argument("--json", default=None, help="also write every result to this file")
    opts = p.parse_args()
    redis_server = shutil.which("redis-server")
    if not redis_server or not shutil.which("taskset"):
        sys.exit("intake.py: needs redis-server and taskset on the PATH")
    redis_port, port = free_port(), free_port()
    procs = []
    try:
        procs.append(subprocess.Popen(
            ["taskset", "-c", "1", redis_server, "--port", str(redis_port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL))
        wait_port(redis_port)
        env = dict(os.environ, PORT=str(port), REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
                   INTAKE_STREAM=STREAM.decode(), RATE_LIMIT_PER_SECOND="0",
                   MAX_CONNECTIONS_PER_IP="0", PING_INTERVAL="0", INSTANCE_TTL="30",
                   LOG_LEVEL="warn")
        server = subprocess.Popen(["taskset", "-c", "0", "sh", "-c", "exec " + opts.server],
                                  cwd=REPO, env=env, start_new_session=True)
        procs.append(server)
        wait_port(port)
        os.sched_setaffinity(0, {1})
        out = {}

        def go():
            d = ensureDeferred(run(opts, server.pid, port, redis_port))
            d.addBoth(lambda r: (out.setdefault("r", r), reactor.stop()))

        reactor.callWhenRunning(go)
        reactor.run()
        result = out.get("r")
        if not isinstance(result, tuple):
            print(result, file=sys.stderr)
            sys.exit(1)
        results, errors = result
        if opts.json:
            with open(opts.json, "w") as f:
                json.dump({"options": vars(opts), "results": results, "errors": errors}, f, indent=1)
        print(table(results, opts))
        if errors:
            print(f"\n{errors} error replies (Redis -ERR or HTTP 5xx)")
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    main()
