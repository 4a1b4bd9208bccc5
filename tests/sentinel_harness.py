"""
A real Redis Sentinel deployment on loopback ports for the failover tests:
one master, two replicas (so that a promoted replica still has one) and
three sentinels (quorum 2), each a real ``redis-server`` process, with
Sentinel timings short enough for a test: the master counts as down after
L{DOWN_AFTER_MS} without an answer.  Everything is torn down in cleanup.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import socket
import tempfile
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, race
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.helpers import REDIS_SERVER, LineCollector, RedisServer, free_port

MASTER_NAME = "mymaster"
#: Sentinel's down-after-milliseconds and failover-timeout for the tests.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000

#: The sentinels' configuration, as docs/operations.md gives it.
SENTINEL_CONF = """\
port {port}
bind 127.0.0.1
dir {dir}
sentinel monitor {name} 127.0.0.1 {master_port} 2
sentinel down-after-milliseconds {name} {down_after}
sentinel failover-timeout {name} {failover_timeout}
sentinel parallel-syncs {name} 2
"""


class Sentinel:
    """One ``redis-server SENTINEL.conf --sentinel`` process."""

    def __init__(self, port: int, conf: str) -> None:
        self.port = port
        self.conf = conf
        self.process: LineCollector | None = None
        self._transport: Any = None

    async def start(self) -> None:
        self.process = proto = LineCollector()
        self._transport = reactor.spawnProcess(
            proto, REDIS_SERVER, ["redis-server", self.conf, "--sentinel"],
            env={"PATH": os.environ.get("PATH", "")}, path="/",
        )
        ended: Deferred[Any] = Deferred()
        proto.ended.addBoth(lambda r: (ended.callback(r), r)[1])
        await race([proto.wait_for(b"+monitor master"), ended])
        if proto.ended.called:
            raise RuntimeError("sentinel exited: " + proto.output.decode(errors="replace"))

    async def stop(self) -> None:
        if self.process is not None and not self.process.ended.called:
            self._transport.signalProcess("KILL")
            await self.process.ended

    async def command(self, *args: Any) -> Any:
        return await RedisServer(self.port).command(*args)


class SentinelDeployment:
    """The master, the two replicas and the three sentinels."""

    def __init__(self, test: TestCase) -> None:
        self._test = test
        self.dir = tempfile.mkdtemp(prefix="happyrobot-sentinel-")
        test.addCleanup(shutil.rmtree, self.dir, True)
        self.redis: list[RedisServer] = []
        self.sentinels: list[Sentinel] = []
        #: The ports of killed servers, held until the sentinels have
        #: stopped (the cleanup below runs after theirs): a sentinel takes a
        #: Redis that appears on a port it knew for its old master and makes
        #: it a replica, which would be another test's server (tests of other
        #: processes, e.g. trial -j, bind free ports too).
        self._held: list[socket.socket] = []
        test.addCleanup(lambda: [s.close() for s in self._held])

    @property
    def sentinel_addresses(self) -> tuple[tuple[str, int], ...]:
        return tuple(("127.0.0.1", s.port) for s in self.sentinels)

    async def start(self) -> None:
        """Start everything; return once the sentinels know both replicas and each other."""
        master = RedisServer(free_port())
        await self._start_redis(master)
        for _ in range(2):
            await self._start_redis(RedisServer(
                free_port(), ("--replicaof", "127.0.0.1", str(master.port))))
        await self.until(lambda: self._replicas_up(master), "replicas in sync")
        for i in range(3):
            port = free_port()
            conf = os.path.join(self.dir, f"sentinel-{i}.conf")
            with open(conf, "w") as f:
                f.write(SENTINEL_CONF.format(
                    port=port, dir=self.dir, name=MASTER_NAME, master_port=master.port,
                    down_after=DOWN_AFTER_MS, failover_timeout=FAILOVER_TIMEOUT_MS))
            sentinel = Sentinel(port, conf)
            await sentinel.start()
            self._test.addCleanup(sentinel.stop)
            self.sentinels.append(sentinel)
        await self.until(self._sentinels_ready, "sentinels seeing each other and both replicas")

    async def _start_redis(self, server: RedisServer) -> None:
        await server.start()
        self._test.addCleanup(self._kill, server)
        self.redis.append(server)

    @staticmethod
    async def _kill(server: RedisServer) -> None:
        if server.process is not None and not server.process.ended.called:
            server.resume()
            server._transport.signalProcess("KILL")
            await server.process.ended

    async def _replicas_up(self, master: RedisServer) -> bool:
        info = await master.command("INFO", "replication")
        return info.count("state=online") == 2

    async def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinels:
            others = await sentinel.command("SENTINEL", "sentinels", MASTER_NAME)
            replicas = await sentinel.command("SENTINEL", "replicas", MASTER_NAME)
            if len(others) != 2 or len(replicas) != 2:
                return False
        return True

    async def until(self, condition: Any, what: str, seconds: float = 15.0) -> None:
        """Poll C{condition} (a coroutine function) every 50 ms, for at most C{seconds}."""
        deadline = time.monotonic() + seconds
        while not await condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await deferLater(reactor, 0.05, lambda: None)

    def switched_at(self) -> float | None:
        """When (time.time()) a sentinel first logged +switch-master, from the logs' ms."""
        times = []
        for sentinel in self.sentinels:
            assert sentinel.process is not None
            for line in sentinel.process.output.decode(errors="replace").splitlines():
                if "+switch-master" in line:
                    stamp = " ".join(line.split()[1:5])  # 06 Dec 2026 07:49:11.123
                    times.append(datetime.datetime.strptime(
                        stamp, "%d %b %Y %H:%M:%S.%f").replace(
                        tzinfo=datetime.timezone.utc).timestamp())
        return min(times, default=None)

    async def master(self) -> RedisServer:
        """The server the sentinels name as master now."""
        host, port = await self.sentinels[0].command(
            "SENTINEL", "get-master-addr-by-name", MASTER_NAME)
        (server,) = [r for r in self.redis if r.port == int(port)]
        return server

    async def kill_master(self) -> RedisServer:
        """SIGKILL the master (no shutdown, no save); return it."""
        master = await self.master()
        master._transport.signalProcess(signal.SIGKILL)
        await master.process.ended  # type: ignore[union-attr]
        held = socket.socket()
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past its TIME_WAITs
        try:
            held.bind(("127.0.0.1", master.port))  # bound, not listening: refused
        except OSError:
            held.close()  # taken already: nothing to hold
        else:
            self._held.append(held)
        return master

    async def failed_over(self, old: RedisServer) -> RedisServer:
        """Wait until the sentinels name another master, and that one says it is."""
        async def promoted() -> bool:
            try:
                new = await self.master()
                role = await new.command("ROLE")
            except Exception:
                return False
            return new is not old and role[0] == "master"

        await self.until(promoted, "the failover", 30.0)
        return await self.master()
