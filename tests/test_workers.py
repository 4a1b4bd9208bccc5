"""
``--workers N``: option checks, and two real worker processes sharing one
port and their rooms through a real redis-server.
"""

from __future__ import annotations

import json
import signal
from typing import Any

import treq
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import HTTPConnectionPool

from happyrobot import workers
from happyrobot.config import load_config
from happyrobot.tap import Options, makeService
from tests.helpers import ORIGIN, Client, RedisTestCase, free_port, spawn_twistd


def options(environ: dict[str, str]) -> Options:
    o = Options(environ=environ)
    o.parseOptions(["--env-file="])
    return o


class WorkerOptionTests(SynchronousTestCase):
    """The WORKERS setting and its checks."""

    def test_workers_need_redis(self) -> None:
        """More than one worker without REDIS_URL stops start-up with a clear line."""
        e = self.assertRaises(SystemExit, makeService, options({"WORKERS": "2"}),
                              MemoryReactorClock())
        self.assertIn("WORKERS above 1 needs REDIS_URL", str(e.code))

    def test_fixed_tcp_port_needed(self) -> None:
        """Workers need a fixed TCP port."""
        for port in ("0", "unix:/tmp/x.sock"):
            e = self.assertRaises(
                SystemExit, makeService,
                options({"WORKERS": "2", "REDIS_URL": "redis://127.0.0.1:1/0", "PORT": port}),
                MemoryReactorClock())
            self.assertIn("PORT", str(e.code))

    def test_auto_is_one_per_core(self) -> None:
        """WORKERS=auto means one worker per core."""
        import os

        self.assertEqual(load_config({}, {"WORKERS": "auto"}).workers, os.cpu_count() or 1)
        self.assertEqual(load_config({}, {}).workers, 1)

    def test_tcp_address(self) -> None:
        """tcp endpoint descriptions give (interface, port); others are refused."""
        self.assertEqual(workers.tcp_address("tcp:3001"), ("", 3001))
        self.assertEqual(workers.tcp_address("tcp:3001:interface=127.0.0.1"),
                         ("127.0.0.1", 3001))
        for bad in ("ssl:3001", "tcp:abc", "tcp:3001:foo=1"):
            self.assertRaises(ValueError, workers.tcp_address, bad)

    def test_child_argv(self) -> None:
        """A child worker runs in the foreground without a pidfile, with the same options."""
        argv = workers.child_argv(["twistd", "--pidfile=x.pid", "happyrobot-ws", "--port",
                                   "tcp:1", "--workers", "2"])
        self.assertEqual(argv[-6:], ["--pidfile=", "happyrobot-ws", "--port", "tcp:1",
                                     "--workers", "2"])
        self.assertIn("-n", argv)
        self.assertNotIn("--logger", argv)

    def test_child_argv_keeps_the_logger(self) -> None:
        """The parent's --logger (either spelling) is the child's too."""
        for given, kept in ((["--logger", "happyrobot.logs.observer"],
                             ["--logger", "happyrobot.logs.observer"]),
                            (["--logger=happyrobot.logs.observer"],
                             ["--logger=happyrobot.logs.observer"])):
            argv = workers.child_argv(["twistd", "-n", *given, "happyrobot-ws", "--workers", "2"])
            self.assertEqual(argv[-3:], ["happyrobot-ws", "--workers", "2"])
            self.assertEqual(argv[argv.index("happyrobot-ws") - len(kept):argv.index("happyrobot-ws")],
                             kept)


class ParentWatchTests(SynchronousTestCase):
    """A child worker stops when worker 0 is gone."""

    def test_stops_when_parent_changes(self) -> None:
        """Once the parent pid is no longer ours the reactor is stopped; not before."""
        import os

        reactor = MemoryReactorClock()
        reactor.hasStopped = False  # Twisted before 26.4 starts it at True
        watch = workers.ParentWatch(reactor, parent_pid=os.getppid())
        watch.startService()
        reactor.advance(5)
        self.assertFalse(reactor.hasStopped)
        watch._parent = -1  # as if we had been re-parented after a SIGKILL
        reactor.advance(1)
        self.assertTrue(reactor.hasStopped)
        watch.stopService()


class WorkerProcessTests(RedisTestCase):
    """Two worker processes on one port."""

    timeout = 60

    async def close_all(self, clients: list[Client]) -> None:
        for c in clients:
            if not c.closed.called:
                c.dropConnection(abort=True)
            await c.closed

    async def get_json(self, url: str) -> Any:
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(url, pool=pool)
        return json.loads(await response.content())

    async def test_two_workers_share_port_and_rooms(self) -> None:
        """Connections spread over both workers, events cross, and SIGTERM stops both."""
        redis = await self.start_redis()
        port = free_port()
        proc, transport = spawn_twistd(
            ["--port", f"tcp:{port}:interface=127.0.0.1", "--env-file=",
             "--redis-url", redis.url, "--workers", "2", "--presence-window-ms", "0",
             "--instance-ttl", "0.6"])
        self.addCleanup(lambda: transport.signalProcess("KILL") if transport.pid else None)
        await proc.wait_for(b"started worker 1")
        await proc.wait_for(b"listening on port", count=2)
        await proc.wait_for(b"Redis link up", count=2)
        clients: list[Client] = []
        self.addCleanup(self.close_all, clients)
        for i in range(16):
            factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/ws", origin=ORIGIN)
            factory.protocol = Client
            c: Client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
            await c.opened
            await c.next_of("CONNECTION_ESTABLISHED")
            c.send_json({"type": "JOIN_PROJECT", "projectId": "w", "userId": f"user_{i}"})
            clients.append(c)
        for c in clients:
            while (await c.next_of("USER_PRESENCE"))["payload"]["userCount"] < len(clients):
                pass
        # The other worker's figures are as of its last heartbeat (every 0.2 s).
        for _ in range(50):
            stats = await self.get_json(f"http://127.0.0.1:{port}/stats")
            if stats["totalClients"] == 16:
                break
            await deferLater(reactor, 0.1)
        per_instance = sorted(i["clients"] for i in stats["instances"].values())
        self.assertEqual(len(per_instance), 2)
        self.assertGreater(per_instance[0], 0)  # the kernel spread the connections
        self.assertEqual(sum(per_instance), 16)
        clients[0].send_json({"type": "TASK_UPDATE", "projectId": "w", "payload": {"x": 1}})
        for c in clients[1:]:
            msg = await c.next_of("TASK_UPDATE")
            self.assertEqual(msg["payload"], {"x": 1})

        transport.signalProcess(signal.SIGTERM)
        for c in clients:
            self.assertEqual(await c.closed, 1001)
        await proc.ended
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/ws")
        await self.assertFailure(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory),
            ConnectionRefusedError)
