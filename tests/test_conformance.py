"""
Tests for conformance mode (C{CONFORMANCE_ECHO}): the ``/echo`` WebSocket
that the Autobahn|Testsuite drives (``scripts/conformance``).  It must echo
text as text and binary as binary, exist only when the mode is on, and
share ``/ws``'s checks, limits and shutdown.
"""

from __future__ import annotations

from twisted.internet.defer import DeferredQueue
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from happyrobot import logs
from happyrobot.config import Config, load_config
from happyrobot.tap import DrainService, Options, makeService
from happyrobot.ws import EchoProtocol
from tests.helpers import Client, ServerTestCase


def _raw(client: Client) -> DeferredQueue[tuple[bytes, bool]]:
    """
    Queue what C{client} receives as (payload, isBinary) instead of as
    decoded JSON, since an echo returns arbitrary bytes.
    """
    queue: DeferredQueue[tuple[bytes, bool]] = DeferredQueue()
    client.onMessage = lambda payload, isBinary: queue.put((payload, isBinary))  # type: ignore[method-assign]
    return queue


class EchoTests(ServerTestCase):
    """``/echo`` in conformance mode, over loopback with real clients."""

    async def _echo_client(self, **overrides: object) -> tuple[Client, DeferredQueue[tuple[bytes, bool]]]:
        """A server in conformance mode and a client connected to its /echo."""
        self.start_server(conformance_echo=True, **overrides)
        client = await self.connect(path="/echo", expect_open=False)
        received = _raw(client)
        await client.opened
        return client, received

    async def test_text_echoed_as_text(self) -> None:
        """A text message comes back unchanged as a text message, and nothing comes before it."""
        client, received = await self._echo_client()
        payload = '{"type":"NOT_A_TYPE","t":"\u00e9\U0001f600"}'.encode()
        client.sendMessage(payload, isBinary=False)
        self.assertEqual(await received.get(), (payload, False))
        self.assertEqual(received.pending, [])

    async def test_binary_echoed_as_binary(self) -> None:
        """A binary message, not valid UTF-8, comes back unchanged as a binary message."""
        client, received = await self._echo_client()
        payload = bytes(range(256)) * 3
        client.sendMessage(payload, isBinary=True)
        self.assertEqual(await received.get(), (payload, True))

    async def test_every_length_encoding(self) -> None:
        """Lengths around the 7-bit, 16-bit and 64-bit encodings all echo in order."""
        client, received = await self._echo_client()
        sizes = [0, 1, 125, 126, 65535, 65536]
        for i, n in enumerate(sizes):
            client.sendMessage(bytes([i]) * n, isBinary=bool(i % 2))
        for i, n in enumerate(sizes):
            self.assertEqual(await received.get(), (bytes([i]) * n, bool(i % 2)))

    async def test_fragmented_message_echoed_whole(self) -> None:
        """A message sent in several fragments comes back as the whole message."""
        client, received = await self._echo_client()
        client.sendMessage(b"abcdefghij" * 100, fragmentSize=7)
        self.assertEqual(await received.get(), (b"abcdefghij" * 100, False))

    async def test_size_limit_shared(self) -> None:
        """A message over MAX_MESSAGE_BYTES closes /echo with 1009, as on /ws."""
        client, received = await self._echo_client(max_message_bytes=1000)
        client.sendMessage(b"x" * 1001, isBinary=True)
        self.assertEqual(await client.closed, 1009)
        self.assertEqual(received.pending, [])

    async def test_rate_limit_shared(self) -> None:
        """Past its burst an /echo client gets RATE_LIMITED instead of its echo, as on /ws."""
        client, received = await self._echo_client(rate_limit_per_second=0.001, rate_limit_burst=2)
        for word in (b"one", b"two", b"three"):
            client.sendMessage(word)
        self.assertEqual(await received.get(), (b"one", False))
        self.assertEqual(await received.get(), (b"two", False))
        payload, binary = await received.get()
        self.assertFalse(binary)
        self.assertIn(b'"RATE_LIMITED"', payload)

    async def test_shares_connections_and_shutdown(self) -> None:
        """/echo connections count with /ws ones, and the shutdown drain closes them with 1001."""
        client, _ = await self._echo_client()
        ws = await self.connect()
        self.assertEqual(len(self.factory.connections), 2)
        drained = DrainService(self.factory, timeout=10).stopService()
        self.assertEqual(await client.closed, 1001)
        self.assertEqual(await ws.closed, 1001)
        await drained
        self.assertEqual(self.factory.connections, {})

    async def test_disallowed_origin_refused(self) -> None:
        """A browser Origin outside ALLOWED_ORIGINS gets 403 on /echo too, and no connection."""
        self.start_server(conformance_echo=True)
        c = await self.connect(origin="http://evil.example", path="/echo", expect_open=False)
        await self.assertFailure(c.opened, ConnectionError)
        self.assertEqual(self.factory.connections, {})
        status, body, _ = await self.http(
            "GET", "/echo", headers={"Origin": "http://evil.example"}
        )
        self.assertEqual((status, body), (403, {"error": "Origin not allowed"}))

    async def test_draining_refuses_echo(self) -> None:
        """While the server drains, a new /echo handshake is refused with 503."""
        self.start_server(conformance_echo=True)
        self.factory.draining = True
        status, _, _ = await self.http("GET", "/echo")
        self.assertEqual(status, 503)

    async def test_ws_unchanged(self) -> None:
        """In conformance mode /ws still greets with CONNECTION_ESTABLISHED and speaks JSON."""
        self.start_server(conformance_echo=True)
        c = await self.connect()  # asserts the greeting
        c.sendMessage(b"\x00\x01", isBinary=True)
        msg = await c.next()
        self.assertEqual((msg["type"], msg["code"]), ("ERROR", "BINARY_NOT_SUPPORTED"))


class EchoOffTests(ServerTestCase):
    """Without conformance mode there is no /echo."""

    async def test_echo_is_404(self) -> None:
        """GET /echo is the JSON 404 and a WebSocket handshake there fails."""
        self.start_server()
        status, body, _ = await self.http("GET", "/echo")
        self.assertEqual((status, body), (404, {"error": "Not found"}))
        c = await self.connect(path="/echo", expect_open=False)
        await self.assertFailure(c.opened, ConnectionError)
        self.assertEqual(self.factory.connections, {})


class EchoEndpointTests(SynchronousTestCase):
    """/echo's protocols come from the main factory, with its options and state."""

    def test_same_protocol_options_and_factory(self) -> None:
        """An echo protocol has every Autobahn option of a /ws one, and the same factory."""
        from twisted.internet.address import IPv4Address

        from happyrobot.tap import build_factory

        config = Config(max_message_bytes=4096, ping_interval_seconds=7.0, conformance_echo=True)
        main = build_factory(config, MemoryReactorClock())
        addr = IPv4Address("TCP", "127.0.0.1", 1)
        echo = main.echo_endpoint().buildProtocol(addr)
        ws = main.buildProtocol(addr)
        self.assertIsInstance(echo, EchoProtocol)
        self.assertNotIsInstance(ws, EchoProtocol)
        self.assertIs(echo.factory, main)
        for name in (
            "autoPingInterval", "autoPingTimeout", "maxMessagePayloadSize",
            "maxFramePayloadSize", "openHandshakeTimeout", "closeHandshakeTimeout",
            "failByDrop", "webStatus", "utf8validateIncoming", "applyMask",
            "perMessageCompressionAccept",
        ):
            self.assertEqual(getattr(echo, name), getattr(ws, name), name)
        self.assertEqual(echo.maxMessagePayloadSize, 4096)
        self.assertEqual(echo.autoPingInterval, 7.0)


class ConformanceSettingTests(SynchronousTestCase):
    """CONFORMANCE_ECHO / --conformance-echo: off unless asked for."""

    def tearDown(self) -> None:
        logs.set_level("info")

    def _config(self, argv: list[str], environ: dict[str, str]) -> Config:
        o = Options(environ=environ)
        o.parseOptions(["--env-file="] + argv)
        return o.config()

    def test_off_by_default(self) -> None:
        """With no flag and no variable, conformance mode is off."""
        self.assertFalse(Config().conformance_echo)
        self.assertFalse(self._config([], {}).conformance_echo)

    def test_flag(self) -> None:
        """The bare flag --conformance-echo turns it on, whatever the environment says."""
        self.assertTrue(self._config(["--conformance-echo"], {}).conformance_echo)
        self.assertTrue(
            self._config(["--conformance-echo"], {"CONFORMANCE_ECHO": "0"}).conformance_echo
        )

    def test_environment(self) -> None:
        """CONFORMANCE_ECHO=1 (or true) turns it on; 0, false or empty leave it off."""
        for value in ("1", "true", "on"):
            self.assertTrue(load_config({}, {"CONFORMANCE_ECHO": value}).conformance_echo, value)
        for value in ("0", "false", ""):
            self.assertFalse(load_config({}, {"CONFORMANCE_ECHO": value}).conformance_echo, value)
        self.assertTrue(self._config([], {"CONFORMANCE_ECHO": "1"}).conformance_echo)

    def test_startup_warning(self) -> None:
        """makeService warns once when conformance mode is on, and not otherwise."""
        with capturedLogs() as captured:
            makeService(Options(environ={}), MemoryReactorClock())
        self.assertFalse(
            [e for e in captured if "CONFORMANCE_ECHO" in e.get("log_format", "")]
        )
        o = Options(environ={})
        o.parseOptions(["--env-file=", "--conformance-echo"])
        with capturedLogs() as captured:
            makeService(o, MemoryReactorClock())
        warnings = [e for e in captured if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn("CONFORMANCE_ECHO", warnings[0]["log_format"])
