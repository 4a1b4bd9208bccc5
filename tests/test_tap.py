"""
Tests for the twistd plugin's options and service wiring, the plugin
itself, shutdown, and the auto-ping that drops dead peers.
"""

from __future__ import annotations

import os
import re
from typing import Any

import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.service import IServiceMaker, Service
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs
from twisted.plugin import getPlugins
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from happyrobot import StartupError, logs
from happyrobot.config import Config
from happyrobot.tap import Options, build_factory, makeService
from happyrobot.web import make_site
from tests.helpers import ServerTestCase


def options(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Options:
    o = Options(environ=environ or {})
    o.parseOptions(["--env-file="] + (argv or []))
    return o


class PluginTests(SynchronousTestCase):
    """The twistd plugin."""

    def test_plugin_registered(self) -> None:
        """getPlugins(IServiceMaker) offers the tapname happyrobot-ws pointing at our tap."""
        makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("happyrobot-ws", makers)
        self.assertIs(makers["happyrobot-ws"].options, Options)


class OptionsTests(SynchronousTestCase):
    """Options, environment and env file."""

    def tearDown(self) -> None:
        logs.set_level("info")

    def test_flags_override_environment(self) -> None:
        """A flag wins over the environment, which wins over the default."""
        o = options(["--port", "tcp:4000", "--log-level", "debug"],
                    {"PORT": "5000", "ALLOWED_ORIGINS": "https://a.example,https://b.example"})
        config = o.config()
        self.assertEqual(config.port, "tcp:4000")
        self.assertEqual(config.log_level, "debug")
        self.assertEqual(config.allowed_origins, ("https://a.example", "https://b.example"))

    def test_env_file(self) -> None:
        """Variables come from the env file when the environment lacks them."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("PORT=4555\nLOG_LEVEL=warn\n")
        o = Options(environ={"LOG_LEVEL": "error"})
        o.parseOptions(["--env-file", path])
        config = o.config()
        self.assertEqual((config.port, config.log_level), ("tcp:4555", "error"))

    def test_bad_value_stops_with_one_line(self) -> None:
        """A bad PORT stops makeService with a one-line message naming PORT."""
        e = self.assertRaises(SystemExit, makeService, options(environ={"PORT": "abc"}),
                              MemoryReactorClock())
        self.assertIn("PORT", str(e.code))
        self.assertNotIn("\n", str(e.code))
        e = self.assertRaises(SystemExit, makeService,
                              options(["--log-level", "loud"]), MemoryReactorClock())
        self.assertIn("LOG_LEVEL", str(e.code))

    def test_bad_endpoint_stops_with_one_line(self) -> None:
        """A PORT endpoint description Twisted cannot parse stops start-up naming PORT."""
        for value in ("tcp:abc", "foo:bar"):
            e = self.assertRaises(SystemExit, makeService, options(environ={"PORT": value}),
                                  MemoryReactorClock())
            self.assertIn("happyrobot-ws: PORT is not a valid endpoint description", str(e.code))
            self.assertIn(repr(value), str(e.code))
            self.assertNotIn("\n", str(e.code))

    def test_port_in_use_stops_with_one_line(self) -> None:
        """A port that cannot be bound stops start-up with one line naming PORT."""
        from twisted.internet import reactor
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        taken = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        port = taken.getHost().port
        service = makeService(options(environ={"PORT": f"tcp:{port}:interface=127.0.0.1"}), reactor)
        e = self.assertRaises(StartupError, service.privilegedStartService)
        self.assertTrue(str(e.code).startswith("happyrobot-ws: PORT: "), e.code)
        self.assertIn(str(port), str(e.code))
        self.assertIn("Address already in use", str(e.code))
        self.assertNotIn("\n", str(e.code))

    def test_help_lines(self) -> None:
        """
        --help wraps every option's help with single spaces (no docstring
        indentation), and lists the options sorted by name, as config.py's
        comment on SETTINGS says.
        """
        lines = str(Options(environ={})).splitlines()
        start = lines.index("Options:") + 1
        names = []
        for line in lines[start:lines.index("", start)]:  # the long description follows
            match = re.match(r"^ +(?:-\w, )?(--[\w-]+=?)? +(\S.*)$", line)
            assert match is not None, line
            self.assertNotIn("  ", match.group(2), line)
            if match.group(1):
                names.append(match.group(1).rstrip("="))
        self.assertIn("--env-file", names)
        self.assertIn("--port", names)
        self.assertEqual(names, sorted(names))

    def test_named_env_file_must_exist(self) -> None:
        """--env-file naming a missing file is an error; the default .env may be absent."""
        o = Options(environ={})
        o.parseOptions(["--env-file", "/nonexistent/happyrobot.env"])
        e = self.assertRaises(SystemExit, makeService, o, MemoryReactorClock())
        self.assertEqual(str(e.code), "happyrobot-ws: --env-file /nonexistent/happyrobot.env: "
                                      "No such file or directory")
        empty = self.mktemp()
        os.makedirs(empty)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(empty)
        self.assertEqual(Options(environ={}).config().port, "tcp:3001")

    def test_unknown_node_env_warns(self) -> None:
        """A NODE_ENV other than development, production or test is named in a warning."""
        with capturedLogs() as captured:
            makeService(options(environ={"NODE_ENV": "prod"}), MemoryReactorClock())
        warnings = [e for e in captured if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["env"], "prod")
        with capturedLogs() as captured:
            for env in ("development", "test"):
                makeService(options(environ={"NODE_ENV": env}), MemoryReactorClock())
        self.assertEqual([e for e in captured if e["log_level"] == LogLevel.warn], [])

    def test_make_service_listens_on_port_when_started(self) -> None:
        """makeService binds nothing until started, then listens on the configured port."""
        reactor = MemoryReactorClock()
        service = makeService(options(environ={"PORT": "3999"}), reactor)
        self.assertEqual(reactor.tcpServers, [])
        service.startService()
        self.assertEqual(reactor.tcpServers[0][0], 3999)
        service.stopService()

    def test_default_port(self) -> None:
        """With nothing configured the server listens on 3001."""
        reactor = MemoryReactorClock()
        service = makeService(options(), reactor)
        service.startService()
        self.assertEqual(reactor.tcpServers[0][0], 3001)
        service.stopService()

    def test_log_level_applied(self) -> None:
        """LOG_LEVEL=debug turns on our debug logging; warn hides info."""
        makeService(options(environ={"LOG_LEVEL": "debug"}), MemoryReactorClock())
        self.assertTrue(logs.debug_enabled())
        makeService(options(environ={"LOG_LEVEL": "warn"}), MemoryReactorClock())
        self.assertFalse(logs.debug_enabled())
        log = logs.get_logger("happyrobot.test")
        with capturedLogs() as captured:
            log.info("hidden")
            log.warn("shown")
        self.assertEqual([e["log_format"] for e in captured], ["shown"])

    def test_star_in_production_warns(self) -> None:
        """ALLOWED_ORIGINS=* with NODE_ENV=production logs a warning at start-up."""
        with capturedLogs() as captured:
            makeService(options(environ={"ALLOWED_ORIGINS": "*", "NODE_ENV": "production"}),
                        MemoryReactorClock())
        warnings = [e["log_format"] for e in captured if e["log_level"] == LogLevel.warn]
        self.assertEqual(len([w for w in warnings if "ALLOWED_ORIGINS is *" in w]), 1)

    def test_open_production_warns_once(self) -> None:
        """Production without token verification or API token logs one clear warning."""
        with capturedLogs() as captured:
            makeService(options(environ={"NODE_ENV": "production"}), MemoryReactorClock())
        warnings = [e["log_format"] for e in captured if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn("JWT_PUBLIC_KEY", warnings[0])
        with capturedLogs() as captured:
            makeService(options(environ={"NODE_ENV": "production", "API_TOKEN": "t"}),
                        MemoryReactorClock())
        self.assertEqual([e for e in captured if e["log_level"] == LogLevel.warn], [])

    def test_bad_public_key_one_line(self) -> None:
        """A JWT_PUBLIC_KEY that is not a key stops start-up naming the variable."""
        e = self.assertRaises(SystemExit, makeService,
                              options(environ={"JWT_PUBLIC_KEY": "not a key"}),
                              MemoryReactorClock())
        self.assertIn("JWT_PUBLIC_KEY", str(e.code))
        self.assertNotIn("\n", str(e.code))

    def test_missing_public_key_file_named(self) -> None:
        """A JWT_PUBLIC_KEY path that does not exist is reported as a missing file."""
        e = self.assertRaises(SystemExit, makeService,
                              options(environ={"JWT_PUBLIC_KEY": "/nonexistent/key.pem"}),
                              MemoryReactorClock())
        self.assertEqual(str(e.code), "happyrobot-ws: JWT_PUBLIC_KEY is not a PEM public key or "
                                      "its path (no file '/nonexistent/key.pem', and not PEM text "
                                      "(-----BEGIN PUBLIC KEY-----...))")


class StartupErrorTests(SynchronousTestCase):
    """What stops start-up is one error type, which twistd reports with or without -n."""

    def test_system_exit_and_exception(self) -> None:
        """
        A StartupError exits with its one line (a SystemExit's code) and is
        an Exception, which twistd reports to its daemon parent.
        """
        e = StartupError("PORT: *:80: Permission denied")
        self.assertIsInstance(e, SystemExit)
        self.assertIsInstance(e, Exception)
        self.assertEqual(e.code, "happyrobot-ws: PORT: *:80: Permission denied")
        self.assertEqual(str(e), e.code)

    def test_bad_setting(self) -> None:
        """makeService stops with a StartupError."""
        e = self.assertRaises(StartupError, makeService, options(environ={"PORT": "abc"}),
                              MemoryReactorClock())
        self.assertTrue(e.code.startswith("happyrobot-ws: PORT must be"), e.code)

    def test_workers_port(self) -> None:
        """The workers' port that cannot be bound stops start-up with a StartupError too."""
        from twisted.internet import reactor
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        from happyrobot import workers
        from happyrobot.web import make_site

        taken = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        port = taken.getHost().port
        service = workers.ReusePortService(
            reactor, f"tcp:{port}:interface=127.0.0.1", make_site(build_factory(Config(), reactor)))
        e = self.assertRaises(StartupError, service.privilegedStartService)
        self.assertEqual(e.code, f"happyrobot-ws: PORT: 127.0.0.1:{port}: Address already in use")


class SilentClient(WebSocketClientProtocol):
    """A client that never answers pings, like a peer that vanished."""

    def onPing(self, payload: bytes) -> None:
        pass


class InMemoryPair:
    """A server and a SilentClient joined by iosim on a MemoryReactorClock."""

    def __init__(self, test: SynchronousTestCase, config: Config) -> None:
        self.clock = clock = MemoryReactorClock()
        saved = txaio.config.loop
        txaio.config.loop = clock  # Autobahn's timers go through txaio
        test.addCleanup(setattr, txaio.config, "loop", saved)
        self.factory = build_factory(config, clock)
        server = make_site(self.factory).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        client_factory = WebSocketClientFactory("ws://127.0.0.1/ws", reactor=clock)
        client_factory.protocol = SilentClient
        self.client = client_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2))
        self.pump = iosim.connect(server, iosim.makeFakeServer(server),
                                  self.client, iosim.makeFakeClient(self.client))
        self.flush()

    def flush(self) -> None:
        """Deliver everything: frames queued for the end of the turn, then the wire."""
        for _ in range(3):
            self.pump.flush()
            self.clock.advance(0)
        self.pump.flush()


class LivenessTests(SynchronousTestCase):
    """Auto-ping drops dead peers; shutdown is bounded in time; on a fake clock."""

    def test_dead_peer_dropped_and_leaves_rooms(self) -> None:
        """A peer that does not answer pings is dropped after interval + timeout."""
        pair = InMemoryPair(self, Config(ping_interval_seconds=30, ping_timeout_seconds=10,
                                         presence_window_seconds=0))
        factory, client, clock = pair.factory, pair.client, pair.clock
        self.assertEqual(len(factory.connections), 1)
        client.sendMessage(b'{"type":"JOIN_PROJECT","projectId":"p1","userId":"u1"}')
        pair.flush()
        self.assertEqual(factory.registry.member_count("p1"), 1)
        clock.advance(30)
        pair.flush()
        self.assertEqual(len(factory.connections), 1)  # ping sent, not yet overdue
        clock.advance(10.5)
        pair.flush()
        clock.advance(6)  # the close handshake times out too
        pair.flush()
        self.assertEqual(factory.connections, {})
        self.assertEqual(factory.registry.member_count("p1"), 0)


    def test_shutdown_bounded_when_peer_never_closes(self) -> None:
        """A peer that never answers the 1001 close is dropped after SHUTDOWN_TIMEOUT."""
        from happyrobot.tap import DrainService

        pair = InMemoryPair(self, Config(ping_interval_seconds=0, shutdown_timeout_seconds=3))
        self.assertEqual(len(pair.factory.connections), 1)
        drain = DrainService(pair.factory, timeout=3)
        drain.startService()
        done = drain.stopService()
        self.assertNoResult(done)
        pair.clock.advance(2.9)
        self.assertNoResult(done)
        pair.clock.advance(0.2)
        pair.flush()
        self.assertEqual(pair.factory.connections, {})
        self.successResultOf(done)


class ShutdownTests(ServerTestCase):
    """Stopping the service closes every WebSocket with 1001."""

    async def test_stop_closes_with_1001_and_drains(self) -> None:
        """On stop /health says draining and every client is closed with 1001."""
        from happyrobot.tap import DrainService

        self.start_server()
        a = await self.joined("p1", "user_a")
        b = await self.connect()
        drain = DrainService(self.factory, timeout=5)
        drain.startService()
        done = drain.stopService()
        self.assertTrue(self.factory.draining)
        self.assertEqual(await a.closed, 1001)
        self.assertEqual(await b.closed, 1001)
        await done
        self.assertEqual(self.factory.connections, {})


class _Closing:
    """A connection that records when it was told to close, and closes a moment later."""

    def __init__(self, factory: "_DrainFactory", client_id: str, answers: bool = True) -> None:
        self.factory = factory
        self.client_id = client_id
        self.answers = answers
        self.closed_at: float | None = None
        self.code: int | None = None

    def start_close(self, code: int, reason: str) -> None:
        self.closed_at = self.factory.clock.seconds()
        self.code = code
        if self.answers:  # the client answers the close within 10 ms
            self.factory.clock.callLater(0.01, self.gone)

    def gone(self) -> None:
        if self.factory.connections.pop(self.client_id, None) is not None:
            self.factory.connection_closed()


class _DrainFactory:
    """What DrainService uses of CollabFactory, on a Clock."""

    def __init__(self) -> None:
        from twisted.internet.defer import succeed
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.draining = False
        self.connections: dict[str, _Closing] = {}
        self._waiters: list[Any] = []
        self.http_pool = type("Pool", (), {"closeCachedConnections": lambda s: succeed(None)})()

    def add(self, n: int, answers: bool = True) -> list[_Closing]:
        conns = [_Closing(self, f"c{len(self.connections) + i}", answers) for i in range(n)]
        for c in conns:
            self.connections[c.client_id] = c
        return conns

    def when_empty(self) -> Any:
        from twisted.internet.defer import Deferred

        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        self.connection_closed()
        return d

    def connection_closed(self) -> None:
        if not self.connections:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def abort_all(self) -> None:
        for c in list(self.connections.values()):
            c.gone()


class DrainTests(SynchronousTestCase):
    """Rolling restart: closes with 1001 spread over the drain window (issue 5, item 6)."""

    def test_closes_spread_evenly_over_window(self) -> None:
        """n connections are closed with 1001 at 0, w/n, 2w/n, ... seconds, not all at once."""
        from happyrobot.tap import DrainService

        f = _DrainFactory()
        conns = f.add(8)
        drain = DrainService(f, timeout=10, window=4)  # type: ignore[arg-type]
        drain.startService()
        done = drain.stopService()
        self.assertTrue(f.draining)
        self.assertEqual([c.closed_at for c in conns], [0.0] + [None] * 7)
        f.clock.pump([0.125] * 32)
        self.successResultOf(done)
        self.assertEqual([c.closed_at for c in conns],
                         [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5])
        self.assertEqual({c.code for c in conns}, {1001})
        self.assertEqual(f.clock.getDelayedCalls(), [])

    def test_children_stop_after_the_drain(self) -> None:
        """The bus (a child) keeps running until the last connection is gone."""

        from happyrobot.tap import DrainService

        f = _DrainFactory()
        f.add(2)
        drain = DrainService(f, timeout=10, window=2)  # type: ignore[arg-type]
        bus = Service()
        bus.setServiceParent(drain)
        drain.startService()
        done = drain.stopService()
        f.clock.pump([0.5, 0.25])
        self.assertTrue(bus.running)
        f.clock.pump([0.25, 0.25])  # the second close went at 1 s and was answered
        self.assertFalse(bus.running)
        self.successResultOf(done)

    def test_timeout_aborts_the_rest(self) -> None:
        """Connections that never answer are dropped at SHUTDOWN_TIMEOUT after the stop began."""
        from happyrobot.tap import DrainService

        f = _DrainFactory()
        conns = f.add(3, answers=False)
        drain = DrainService(f, timeout=5, window=3)  # type: ignore[arg-type]
        drain.startService()
        done = drain.stopService()
        f.clock.pump([0.25] * 19)
        self.assertNoResult(done)
        self.assertEqual([c.closed_at for c in conns], [0.0, 1.0, 2.0])
        f.clock.advance(0.25)
        self.successResultOf(done)
        self.assertEqual(f.clock.getDelayedCalls(), [])

    def test_no_window_closes_all_at_once(self) -> None:
        """With DRAIN_WINDOW_SECONDS=0 every connection is closed at once, as before."""
        from happyrobot.tap import DrainService

        f = _DrainFactory()
        conns = f.add(5)
        drain = DrainService(f, timeout=5)  # type: ignore[arg-type]
        drain.startService()
        done = drain.stopService()
        self.assertEqual({c.closed_at for c in conns}, {0.0})
        f.clock.advance(0.01)
        self.successResultOf(done)

    def test_make_service_wires_drain_window(self) -> None:
        """makeService's drain uses DRAIN_WINDOW_SECONDS and SHUTDOWN_TIMEOUT."""
        from happyrobot.tap import DrainService

        service = makeService(options(environ={"DRAIN_WINDOW_SECONDS": "7",
                                               "SHUTDOWN_TIMEOUT": "20"}),
                              MemoryReactorClock())
        drains = [s for s in service if isinstance(s, DrainService)]
        self.assertEqual([(d.window, d.timeout) for d in drains], [(7.0, 20.0)])
