#!/usr/bin/env python3
"""Revoke latency across instances: the time from a revoke call on instance A
to the ACCESS_REVOKED arriving at a member connected to instance B.

Starts a redis-server and two servers (``twistd happyrobot-ws``) sharing it,
all on free loopback ports, connects one member to B, and then, N times:
calls ``POST /projects/bench/revoke`` on A, waits for the member's ERROR
ACCESS_REVOKED, and joins the room again.  Prints each try's milliseconds
as a JSON line on stderr with --verbose, and a summary (median, 90th
percentile, worst) on stdout.  Run from the repository root with the
project's virtualenv:

    .venv/bin/python bench/revoke_latency.py --tries 100

Needs redis-server on the PATH.  Every wait is bounded (--timeout).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import treq  # noqa: E402
from autobahn.twisted.websocket import (  # noqa: E402
    WebSocketClientFactory,
    WebSocketClientProtocol,
)
from twisted.internet.defer import Deferred, DeferredQueue  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint  # noqa: E402
from twisted.internet.protocol import ProcessProtocol  # noqa: E402
from twisted.internet.task import react  # noqa: E402
from twisted.web.client import HTTPConnectionPool  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Child(ProcessProtocol):
    """A child process whose output is searched for lines."""

    def __init__(self) -> None:
        self.output = b""
        self.waiting: list[tuple[bytes, Deferred[bytes]]] = []
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for item in list(self.waiting):
            if item[0] in self.output:
                self.waiting.remove(item)
                item[1].callback(self.output)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    def wait_for(self, needle: bytes) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self.waiting.append((needle, d))
        self.outReceived(b"")
        return d


class Member(WebSocketClientProtocol):
    """The member on instance B: its messages queue up, decoded."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: DeferredQueue[dict[str, Any]] = DeferredQueue()
        self.opened: Deferred[None] = Deferred()

    def onOpen(self) -> None:
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.put(json.loads(payload))

    def send_json(self, message: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(message).encode("utf-8"))

    async def next_of(self, reactor: Any, kind: str, timeout: float) -> dict[str, Any]:
        while True:
            d = self.messages.get()
            d.addTimeout(timeout, reactor)
            message = await d
            if message.get("type") == kind:
                return message


async def run(reactor: Any, opts: argparse.Namespace) -> dict[str, Any]:
    children: list[tuple[Child, Any]] = []

    def spawn(argv: list[str], env: dict[str, str]) -> Child:
        child = Child()
        transport = reactor.spawnProcess(child, argv[0], argv, env=env, path=REPO)
        children.append((child, transport))
        return child

    async def bounded(d: Deferred[Any], what: str) -> Any:
        d.addTimeout(opts.timeout, reactor)
        try:
            return await d
        except Exception:
            raise SystemExit(f"timed out waiting for {what}") from None

    try:
        redis_port = free_port()
        redis = spawn([opts.redis_server, "--port", str(redis_port), "--bind", "127.0.0.1",
                       "--save", "", "--appendonly", "no"], {})
        await bounded(redis.wait_for(b"Ready to accept connections"), "redis-server")
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": REPO,
               "HOME": os.environ.get("HOME", "/tmp"),
               "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "LOG_LEVEL": "warn"}
        ports = []
        for name in ("A", "B"):
            server = spawn([sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                            "-n", "--pidfile=", "happyrobot-ws", "--env-file=",
                            "--port", "tcp:0:interface=127.0.0.1"], env)
            output = await bounded(server.wait_for(b"starting on "), f"server {name}")
            found = re.search(rb"starting on (\d+)", output)
            assert found is not None
            ports.append(int(found.group(1)))
        port_a, port_b = ports

        factory = WebSocketClientFactory(f"ws://127.0.0.1:{port_b}/ws")
        factory.protocol = Member
        member: Member = await TCP4ClientEndpoint(reactor, "127.0.0.1", port_b).connect(factory)
        await bounded(member.opened, "the member's connection")
        member.send_json({"type": "SET_USER", "payload": {"userId": "bench_member"}})

        async def join() -> None:
            member.send_json({"type": "JOIN_PROJECT", "projectId": "bench"})
            await member.next_of(reactor, "USER_PRESENCE", opts.timeout)

        await join()
        pool = HTTPConnectionPool(reactor)  # kept alive, as a back end's client would
        url = f"http://127.0.0.1:{port_a}/projects/bench/revoke"
        body = json.dumps({"userId": "bench_member"}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        times = []
        for i in range(opts.warmup + opts.tries):
            started = time.perf_counter()
            call = treq.post(url, data=body, headers=headers, pool=pool)
            error = await member.next_of(reactor, "ERROR", opts.timeout)
            elapsed = (time.perf_counter() - started) * 1000
            response = await bounded(call, "the revoke reply")
            reply = json.loads(await response.content())
            if error.get("code") != "ACCESS_REVOKED" or reply.get("connections") != 1:
                raise SystemExit(f"unexpected: {error} / {reply}")
            if i >= opts.warmup:
                times.append(elapsed)
                if opts.verbose:
                    print(json.dumps({"try": i - opts.warmup + 1, "ms": round(elapsed, 3)}),
                          file=sys.stderr)
            await join()
        member.sendClose(1000)
        await pool.closeCachedConnections()
        times.sort()
        return {
            "tries": len(times),
            "median_ms": round(statistics.median(times), 3),
            "p90_ms": round(times[int(0.9 * (len(times) - 1))], 3),
            "worst_ms": round(times[-1], 3),
            "best_ms": round(times[0], 3),
        }
    finally:
        for child, transport in children:
            if not child.ended.called:
                transport.signalProcess("TERM")
        for child, _ in children:
            d = child.ended
            d.addTimeout(opts.timeout, reactor)
            try:
                await d
            except Exception:
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5, help="tries not counted (default 5)")
    parser.add_argument("--timeout", type=float, default=10.0, help="longest wait, in seconds")
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    parser.add_argument("--verbose", action="store_true", help="each try's time on stderr")
    opts = parser.parse_args()

    async def go(reactor: Any) -> None:
        print(json.dumps(await run(reactor, opts)))

    react(lambda reactor: Deferred.fromCoroutine(go(reactor)))


if __name__ == "__main__":
    main()
