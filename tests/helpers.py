"""
Test helpers: a real server on a loopback port, real Autobahn WebSocket
clients that hand out received frames as Deferreds, HTTP calls with treq,
and launchers for ``twistd`` processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import replace
from typing import Any, Callable

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue, race
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from happyrobot.config import Config
from happyrobot.tap import build_factory
from happyrobot.web import make_site
from happyrobot.ws import CollabFactory

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORIGIN = "http://localhost:3000"


class Client(WebSocketClientProtocol):
    """A WebSocket client whose received messages queue up as decoded JSON."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: DeferredQueue[Any] = DeferredQueue()
        self.opened: Deferred[Client] = Deferred()
        self.closed: Deferred[int | None] = Deferred()
        self.close_code: int | None = None

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.frames.put(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.close_code = code
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"handshake failed: {reason}"))
        if not self.closed.called:
            self.closed.callback(code)

    def send_json(self, obj: Any) -> None:
        self.sendMessage(json.dumps(obj).encode("utf-8"))

    def next(self) -> Deferred[Any]:
        """The next message received (already received or still to come)."""
        return self.frames.get()

    def next_of(self, kind: str) -> Deferred[dict[str, Any]]:
        """The next message of type C{kind}, skipping any other."""

        async def find() -> dict[str, Any]:
            while True:
                msg = await self.next()
                if msg.get("type") == kind:
                    return msg  # type: ignore[no-any-return]

        return Deferred.fromCoroutine(find())

    def pending(self) -> list[Any]:
        """Messages received and not yet taken."""
        return list(self.frames.pending)


class ServerTestCase(TestCase):
    """A trial case with a real server listening on 127.0.0.1 and real clients."""

    timeout = 10

    def start_server(self, **overrides: Any) -> CollabFactory:
        """Listen on a free loopback port; everything is torn down in cleanup."""
        config = replace(
            Config(presence_window_seconds=0.0, ping_interval_seconds=0.0), **overrides
        )
        self.factory = build_factory(config, reactor)
        self.site = make_site(self.factory)
        self._clients: list[Client] = []
        d = serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(self.site)
        self.port = self.successResultOf(d)
        self.port_number = self.port.getHost().port
        self.addCleanup(self._stop)
        return self.factory

    async def _stop(self) -> None:
        await drop_clients(self._clients)
        await self.factory.when_empty()
        await self.port.stopListening()
        await self.factory.http_pool.closeCachedConnections()
        cancel_txaio_buckets()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port_number}{path}"

    async def connect(
        self,
        origin: str | None = ORIGIN,
        path: str = "/ws",
        expect_open: bool = True,
        headers: dict[str, str] | None = None,
    ) -> Client:
        """A connected client; with C{expect_open}, past CONNECTION_ESTABLISHED."""
        factory = WebSocketClientFactory(
            f"ws://127.0.0.1:{self.port_number}{path}", origin=origin, headers=headers
        )
        factory.protocol = Client
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port_number)
        client: Client = await endpoint.connect(factory)
        self._clients.append(client)
        if expect_open:
            await client.opened
            hello = await client.next()
            assert hello["type"] == "CONNECTION_ESTABLISHED", hello
            client.client_id = hello["clientId"]  # type: ignore[attr-defined]
        return client

    async def joined(self, project_id: str, user_id: str, **user_info: str) -> Client:
        """A client that has set its user and joined C{project_id}."""
        c = await self.connect()
        c.send_json({"type": "SET_USER", "payload": {"userId": user_id, "userInfo": user_info}})
        c.send_json({"type": "JOIN_PROJECT", "projectId": project_id})
        await c.next_of("USER_PRESENCE")
        return c

    async def round_trip(self, client: Client) -> list[Any]:
        """
        Wait until the server has handled everything C{client} sent so far
        (an unknown type is answered after all earlier frames) and return
        the messages that arrived before that answer.
        """
        client.send_json({"type": "SYNC_PROBE"})
        seen = []
        while True:
            msg = await client.next()
            if msg.get("type") == "ERROR" and msg.get("code") == "UNKNOWN_TYPE":
                return seen
            seen.append(msg)

    async def http(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, Any]:
        """Send an HTTP request; return (status, decoded JSON or None, response headers)."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        hdrs = {"content-type": "application/json"} if body is not None else {}
        hdrs.update(headers or {})
        response = await treq.request(
            method, self.url(path), data=data, headers=hdrs,
            pool=HTTPConnectionPool(reactor, persistent=False),
        )
        content = await response.content()
        try:
            decoded = json.loads(content) if content else None
        except ValueError:
            decoded = content
        return response.code, decoded, response.headers


async def drop_clients(clients: list[Client]) -> None:
    """Abort every client connection still open and wait until all are closed."""
    for c in clients:
        if c.state != WebSocketClientProtocol.STATE_CLOSED:
            c.dropConnection(abort=True)
    for c in clients:
        await c.closed


def cancel_txaio_buckets() -> None:
    """
    Autobahn schedules its handshake timeouts through txaio's batched timer,
    whose bucket DelayedCall stays on the reactor after every timer in it
    was cancelled.  Once a test's connections are all closed those buckets
    hold nothing live; cancel them so that trial's dirty-reactor check
    looks at our own calls only.
    """
    for call in reactor.getDelayedCalls():
        if getattr(call.func, "__name__", "") == "_notify_bucket":
            call.cancel()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bind to 0, read, close)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LineCollector(ProcessProtocol):
    """Collects a child's output and fires Deferreds on lines and exit."""

    def __init__(self) -> None:
        self.output = b""
        #: Fires with the exit code (None when a signal ended the process).
        self.ended: Deferred[int | None] = Deferred()
        self.signal: int | None = None
        self._watch: list[tuple[bytes, int, Deferred[bytes]]] = []

    def wait_for(self, needle: bytes, count: int = 1) -> Deferred[bytes]:
        """Fires with the output once C{needle} has appeared C{count} times."""
        d: Deferred[bytes] = Deferred()
        self._watch.append((needle, count, d))
        self._check()
        return d

    def _check(self) -> None:
        for item in list(self._watch):
            needle, count, d = item
            if self.output.count(needle) >= count:
                self._watch.remove(item)
                d.callback(self.output)

    def outReceived(self, data: bytes) -> None:
        self.output += data
        self._check()

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.signal = getattr(reason.value, "signal", None)
        self.ended.callback(getattr(reason.value, "exitCode", None))


async def listening_twistd(
    test: TestCase, args: list[str], env: dict[str, str] | None = None,
    twistd_args: tuple[str, ...] = (),
) -> tuple[LineCollector, Any, int]:
    """
    A ``twistd happyrobot-ws`` child on a free loopback port, killed in
    cleanup; fires once it listens, with its output collector, its process
    transport and the port it bound.
    """
    proc, transport = spawn_twistd(
        ["--port", "tcp:0:interface=127.0.0.1", "--env-file=", *args], env, twistd_args
    )

    async def kill() -> None:  # and wait until it is gone, its connections with it
        if transport.pid:
            transport.signalProcess("KILL")
        if not proc.ended.called:
            await proc.ended.addTimeout(10, reactor)
        await deferLater(reactor, 0.05)

    test.addCleanup(kill)
    output = await proc.wait_for(b"starting on ")
    match = re.search(rb"starting on (\d+)", output)
    assert match is not None
    return proc, transport, int(match.group(1))


def spawn_twistd(
    args: list[str], env: dict[str, str] | None = None, twistd_args: tuple[str, ...] = ()
) -> tuple[LineCollector, Any]:
    """Start ``twistd -n --pidfile= TWISTD_ARGS happyrobot-ws ARGS`` from the checkout."""
    proto = LineCollector()
    child_env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": REPO_ROOT,
        "HOME": os.environ.get("HOME", "/tmp"),
    }
    child_env.update(env or {})
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", *twistd_args, "happyrobot-ws", *args]
    transport = reactor.spawnProcess(proto, sys.executable, argv, env=child_env, path=REPO_ROOT)
    return proto, transport



async def wait_until(condition: Callable[[], Any], seconds: float = 10.0,
                     what: str = "") -> None:
    """
    Poll C{condition} every 20 ms until it is true, for at most C{seconds}
    (what real servers and processes do takes real time; each wait is bounded).
    """
    for _ in range(max(1, int(seconds / 0.02))):
        if condition():
            return
        await deferLater(reactor, 0.02)
    raise AssertionError(f"timed out after {seconds} s waiting for {what or condition}")


# ---------------------------------------------------------------- Redis


class RedisServer:
    """
    A real ``redis-server`` on 127.0.0.1, with no persistence, for one test.
    It can be stopped and started again on the same port, as a Redis
    restart in production would be.
    """

    def __init__(self, port: int, args: tuple[str, ...] = ()) -> None:
        self.port = port
        #: More redis-server arguments (--replicaof, --dir, --sentinel ...).
        self.args = args
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: LineCollector | None = None
        self._transport: Any = None
        #: The server's own working directory, made at the first start
        #: (under trial's, which trial empties at its next run): no server
        #: loads a file another one left.
        self.dir: str | None = None

    async def start(self) -> None:
        """Spawn the server and return once it answers PING with PONG."""
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix=f"redis-{self.port}-", dir=os.getcwd())
        self.process = proto = LineCollector()
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self.dir,
                # A replica loads its master's data from the socket, writing no file.
                "--repl-diskless-load", "swapdb",
                *self.args]
        self._transport = reactor.spawnProcess(
            proto, REDIS_SERVER, argv, env={"PATH": os.environ.get("PATH", "")}, path=self.dir
        )
        ended = Deferred()  # fires if the server dies before it is ready
        proto.ended.addBoth(lambda r: (ended.callback(r), r)[1])
        await race([proto.wait_for(b"Ready to accept connections"), ended])
        if proto.ended.called:
            raise RuntimeError("redis-server exited: " + proto.output.decode(errors="replace"))
        reply = await self.command("PING")
        assert reply == "PONG", reply

    async def stop(self) -> None:
        """Stop the server (SIGTERM) and wait until it has exited."""
        if self.process is not None and not self.process.ended.called:
            self.resume()  # a paused process would not act on the TERM
            self._transport.signalProcess("TERM")
            await self.process.ended

    def pause(self) -> None:
        """
        Freeze the server (SIGSTOP): its connections stay open and the
        kernel still accepts new ones, but nothing is answered, as with a
        hung Redis or a network partition.
        """
        self._transport.signalProcess(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server go on (SIGCONT)."""
        if self.process is not None and not self.process.ended.called:
            self._transport.signalProcess(signal.SIGCONT)

    async def command(self, *args: Any) -> Any:
        """Run one Redis command on a fresh connection and return the reply."""
        import txredisapi

        conn = await txredisapi.Connection("127.0.0.1", self.port, reconnect=False)
        try:
            return await conn.execute_command(*args)
        finally:
            await conn.disconnect()


REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class Node:
    """
    One server instance in the test process: its own registry, RedisBus
    and loopback port.  The client helpers are ServerTestCase's, which only
    need C{port_number} and C{_clients}.
    """

    url = ServerTestCase.url
    connect = ServerTestCase.connect
    joined = ServerTestCase.joined
    round_trip = ServerTestCase.round_trip
    http = ServerTestCase.http

    def __init__(self, factory: CollabFactory, port: Any) -> None:
        self.factory = factory
        self.bus: Any = factory.bus
        self.port = port
        self.port_number = port.getHost().port
        self._clients: list[Client] = []
        self.stopped = False

    def settled(self) -> Deferred[None]:
        """Fires once the Redis link is up and every (un)subscription is answered."""
        return self.bus.when(self.bus.settled)  # type: ignore[no-any-return]

    async def stop(self) -> None:
        """Drop the clients, stop listening and stop the bus (twice is harmless)."""
        if self.stopped:
            return
        self.stopped = True
        await drop_clients(self._clients)
        await self.factory.when_empty()
        stopped = self.port.stopListening()  # None if a test stopped it already
        if stopped is not None:
            await stopped
        await self.factory.http_pool.closeCachedConnections()
        await self.bus.stopService()

    async def join(self, project_id: str, user_id: str, **user_info: str) -> Client:
        """
        A client that has asked to join C{project_id}, without waiting for
        its first USER_PRESENCE (with Redis, that one may already list
        members of other instances).
        """
        c = await self.connect()
        c.send_json({"type": "SET_USER", "payload": {"userId": user_id, "userInfo": user_info}})
        c.send_json({"type": "JOIN_PROJECT", "projectId": project_id})
        return c


class RedisTestCase(TestCase):
    """A real redis-server and several server instances sharing it."""

    timeout = 20

    async def start_redis(self) -> RedisServer:
        """A redis-server on a free port, stopped in cleanup."""
        redis = RedisServer(free_port())
        await redis.start()
        self.addCleanup(redis.stop)
        return redis

    async def start_node(self, redis: RedisServer, **overrides: Any) -> Node:
        """A server instance using C{redis}, listening on a free loopback port."""
        config = replace(
            Config(presence_window_seconds=0.0, ping_interval_seconds=0.0,
                   redis_url=redis.url),
            **overrides,
        )
        factory = build_factory(config, reactor)
        bus = factory.bus
        bus.reconnect_delays = (0.05, 0.25)  # type: ignore[attr-defined]
        bus.startService()  # type: ignore[attr-defined]
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            make_site(factory)
        )
        node = Node(factory, port)
        self.addCleanup(self._stop_node, node)
        await node.settled()
        return node

    async def _stop_node(self, node: Node) -> None:
        await node.stop()
        cancel_txaio_buckets()
