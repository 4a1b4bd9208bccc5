"""
Security: the pure rules of happyrobot.security, and over loopback the API
token, the rate limit, the room and connection caps and the slow-reader bound.
"""

from __future__ import annotations

import socket
from typing import Any

import txaio
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from happyrobot.security import (
    ConnectionLimiter,
    TokenBucket,
    bearer_matches,
    client_address,
    peer_host,
)
from tests.helpers import ServerTestCase


class BearerTests(SynchronousTestCase):
    """bearer_matches."""

    def test_matches(self) -> None:
        """Only ``Bearer <token>`` with the exact token matches, scheme case aside."""
        self.assertTrue(bearer_matches(b"Bearer s3cret", "s3cret"))
        self.assertTrue(bearer_matches(b"bearer s3cret", "s3cret"))
        for header in (None, b"", b"Bearer", b"Bearer wrong", b"Basic s3cret", b"s3cret",
                       b"Bearer s3cret2"):
            self.assertFalse(bearer_matches(header, "s3cret"), header)


class TokenBucketTests(SynchronousTestCase):
    """TokenBucket with explicit times."""

    def test_burst_then_rate(self) -> None:
        """A full bucket allows a burst, then refills at the rate."""
        bucket = TokenBucket(rate=10, burst=5, now=0.0)
        self.assertEqual([bucket.take(0.0) for _ in range(6)], [True] * 5 + [False])
        self.assertFalse(bucket.take(0.05))
        self.assertTrue(bucket.take(0.15))
        self.assertFalse(bucket.take(0.15))

    def test_abusive_after_burst_refusals(self) -> None:
        """More refusals than the burst since the last accepted message is abuse."""
        bucket = TokenBucket(rate=1, burst=2, now=0.0)
        bucket.take(0.0)
        bucket.take(0.0)
        for _ in range(2):
            self.assertFalse(bucket.take(0.0))
        self.assertFalse(bucket.abusive)
        bucket.take(0.0)
        self.assertTrue(bucket.abusive)
        self.assertTrue(bucket.take(10.0))
        self.assertFalse(bucket.abusive)


class AddressTests(SynchronousTestCase):
    """client_address and peer_host."""

    def test_forwarded_for_only_when_trusted(self) -> None:
        """X-Forwarded-For counts only behind a trusted proxy, and only its last hop."""
        self.assertEqual(client_address("10.0.0.1", b"1.2.3.4", False), "10.0.0.1")
        self.assertEqual(client_address("10.0.0.1", b"6.6.6.6, 1.2.3.4", True), "1.2.3.4")
        self.assertEqual(client_address("10.0.0.1", None, True), "10.0.0.1")
        self.assertEqual(client_address("10.0.0.1", b" , ", True), "10.0.0.1")

    def test_peer_host_without_host(self) -> None:
        """An address without a host (a UNIX socket) still gives a key."""
        self.assertEqual(peer_host(object()), "local")


class ConnectionLimiterTests(SynchronousTestCase):
    """ConnectionLimiter."""

    def test_limits(self) -> None:
        """Per-address and total caps refuse with a reason; closing frees the place."""
        limiter = ConnectionLimiter(max_total=3, max_per_address=2)
        limiter.opened("a")
        limiter.opened("a")
        self.assertIsNotNone(limiter.refusal("a"))
        self.assertIsNone(limiter.refusal("b"))
        limiter.opened("b")
        self.assertIn("connection limit", limiter.refusal("c") or "")
        limiter.closed("a")
        self.assertIsNone(limiter.refusal("a"))
        limiter.closed("a")
        limiter.closed("b")
        self.assertEqual((limiter.total, limiter.count("a")), (0, 0))

    def test_zero_is_unlimited(self) -> None:
        """A limit of 0 never refuses."""
        limiter = ConnectionLimiter(0, 0)
        for _ in range(100):
            limiter.opened("a")
        self.assertIsNone(limiter.refusal("a"))


class ApiTokenTests(ServerTestCase):
    """API_TOKEN protects the operator endpoints."""

    async def test_token_required(self) -> None:
        """Without the bearer token /broadcast and /stats answer 401 and nothing is sent."""
        self.start_server(api_token="s3cret")
        a = await self.joined("p1", "user_a")
        body = {"type": "TASK_CREATE", "projectId": "p1"}
        for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "s3cret"}):
            code, reply, hdrs = await self.http("POST", "/broadcast", body, headers=headers)
            self.assertEqual(code, 401)
            self.assertIn("error", reply)
            self.assertTrue(hdrs.getRawHeaders("www-authenticate"))
            code, _, _ = await self.http("GET", "/stats", headers=headers)
            self.assertEqual(code, 401)
        self.assertEqual(await self.round_trip(a), [])
        good = {"authorization": "Bearer s3cret"}
        code, reply, _ = await self.http("POST", "/broadcast", body, headers=good)
        self.assertEqual((code, reply["clientCount"]), (200, 1))
        await a.next_of("TASK_CREATE")
        code, _, _ = await self.http("GET", "/stats", headers=good)
        self.assertEqual(code, 200)

    async def test_health_stays_open_without_names(self) -> None:
        """/health needs no token and names no room or user."""
        self.start_server(api_token="s3cret")
        await self.joined("secret-project", "user_secret")
        code, body, _ = await self.http("GET", "/health")
        self.assertEqual(code, 200)
        self.assertNotIn("secret", repr(body))


class LimitTests(ServerTestCase):
    """Per-connection and per-server limits."""

    async def test_rate_limit_then_1008(self) -> None:
        """Past the burst a client gets RATE_LIMITED; one that keeps going is closed with 1008."""
        self.start_server(rate_limit_per_second=0.001, rate_limit_burst=5)
        a = await self.joined("p1", "user_a")  # SET_USER + JOIN used 2 tokens
        other = await self.joined("p1", "user_b")
        for i in range(3):
            a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"i": i}})
        a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"i": 3}})
        err = await a.next_of("ERROR")
        self.assertEqual(err["code"], "RATE_LIMITED")
        got = []
        while len(got) < 3:
            got.append((await other.next_of("TASK_UPDATE"))["payload"]["i"])
        self.assertEqual(got, [0, 1, 2])
        for _ in range(10):
            a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {}})
        self.assertEqual(await a.closed, 1008)

    async def test_ping_flood_then_1008(self) -> None:
        """Pings cost the rate limit too: a client that floods them is closed with 1008."""
        self.start_server(rate_limit_per_second=0.001, rate_limit_burst=5)
        a = await self.joined("p1", "user_a")
        for _ in range(20):
            a.sendPing()
        self.assertEqual(await a.closed, 1008)

    async def test_fragment_flood_then_1008(self) -> None:
        """
        So do the fragments of a message: empty continuation frames that
        never finish a message (and so never reach MAX_MESSAGE_BYTES) are
        closed with 1008.
        """
        self.start_server(rate_limit_per_second=0.001, rate_limit_burst=5)
        a = await self.joined("p1", "user_a")
        a.sendFrame(opcode=1, payload=b"", fin=False)
        for _ in range(20):
            a.sendFrame(opcode=0, payload=b"", fin=False)
        self.assertEqual(await a.closed, 1008)

    async def test_pings_within_the_limit_are_answered(self) -> None:
        """A client that pings now and then gets its pongs and stays connected."""
        self.start_server(rate_limit_per_second=0.001, rate_limit_burst=6)
        a = await self.joined("p1", "user_a")  # SET_USER + JOIN used 2 tokens
        pongs: list[bytes] = []
        a.onPong = pongs.append  # type: ignore[method-assign]
        for i in range(3):
            a.sendPing(b"%d" % i)
        await self.round_trip(a)  # the probe takes the last token; its answer follows the pongs
        self.assertEqual(pongs, [b"0", b"1", b"2"])
        self.assertIsNone(a.close_code)

    async def test_max_rooms(self) -> None:
        """A connection cannot join more rooms than MAX_ROOMS_PER_CONNECTION."""
        self.start_server(max_rooms_per_connection=2)
        a = await self.joined("p1", "user_a")
        a.send_json({"type": "JOIN_PROJECT", "projectId": "p2"})
        await a.next_of("USER_PRESENCE")
        a.send_json({"type": "JOIN_PROJECT", "projectId": "p3"})
        err = await a.next_of("ERROR")
        self.assertEqual(err["code"], "TOO_MANY_ROOMS")
        self.assertNotIn("p3", self.factory.registry)
        a.send_json({"type": "JOIN_PROJECT", "projectId": "p1"})  # rejoining is fine
        await a.next_of("USER_PRESENCE")

    async def test_connections_per_ip(self) -> None:
        """Past MAX_CONNECTIONS_PER_IP a handshake gets 429 before any protocol exists."""
        self.start_server(max_connections_per_ip=2)
        first = await self.connect()
        await self.connect()
        refused = await self.connect(expect_open=False)
        await self.assertFailure(refused.opened, ConnectionError)
        self.assertEqual(len(self.factory.connections), 2)
        first.sendClose(1000)
        await first.closed
        await self.connect()  # the place is free again

    async def test_forwarded_for_counted_when_trusted(self) -> None:
        """With TRUST_PROXY each X-Forwarded-For address has its own allowance."""
        self.start_server(max_connections_per_ip=1, trust_proxy=True)
        await self.connect(headers={"X-Forwarded-For": "1.1.1.1"})
        await self.connect(headers={"X-Forwarded-For": "2.2.2.2"})
        refused = await self.connect(headers={"X-Forwarded-For": "1.1.1.1"},
                                     expect_open=False)
        await self.assertFailure(refused.opened, ConnectionError)

    async def test_total_connections(self) -> None:
        """Past MAX_CONNECTIONS a handshake is refused."""
        self.start_server(max_connections=1)
        await self.connect()
        refused = await self.connect(expect_open=False)
        await self.assertFailure(refused.opened, ConnectionError)
        code, _, _ = await self.http("GET", "/health")
        self.assertEqual(code, 200)


class SlowReaderTests(ServerTestCase):
    """A client that stops reading is cut off; nobody else notices."""

    timeout = 30

    async def test_slow_reader_dropped_others_unaffected(self) -> None:
        """A reader that stalls while its room is flooded is closed; memory stays bounded."""
        self.start_server(max_buffer_bytes=256 * 1024, rate_limit_per_second=0)
        publisher = await self.joined("p1", "user_pub")
        good = await self.joined("p1", "user_good")
        slow = await self.joined("p1", "user_slow")
        slow_proto = self.factory.connections[slow.client_id]
        slow.transport.pauseProducing()  # stop reading from the socket
        chunk = "x" * 60_000
        n = 400  # 24 MB in all: far more than the socket buffers hold
        for i in range(n):
            publisher.send_json({"type": "TASK_UPDATE", "projectId": "p1",
                                 "payload": {"i": i, "blob": chunk}})
        got = []
        while len(got) < n:
            msg = await good.next()
            if msg["type"] == "TASK_UPDATE":
                got.append(msg["payload"]["i"])
        self.assertEqual(got, list(range(n)))
        # Cut off once Twisted held more than the bound for it: at most the
        # bound plus the frames of the turn that crossed it, then nothing.
        assert slow_proto._writer is not None
        self.assertIsNone(slow_proto._writer.queue)
        self.assertGreater(slow_proto._writer.buffered, 256 * 1024)
        self.assertLess(slow_proto._writer.buffered, 256 * 1024 + 1024 * 1024)
        self.assertEqual(self.factory.registry.member_count("p1"), 3)
        slow.transport.resumeProducing()  # it reads its backlog, then the close
        self.assertEqual(await slow.closed, 1013)
        self.assertEqual(self.factory.registry.member_count("p1"), 2)


class PingFloodTests(ServerTestCase):
    """A client that pings without reading is a slow reader like any other."""

    async def test_pongs_bounded_by_max_buffer_bytes(self) -> None:
        """Its pongs are bounded by MAX_BUFFER_BYTES; past it, it is closed with 1013."""
        self.start_server(max_buffer_bytes=16 * 1024, rate_limit_per_second=0)
        pinger = await self.joined("p1", "user_pinger")
        proto = self.factory.connections[pinger.client_id]
        # Small socket buffers, so that pongs pile up in Twisted's buffer soon.
        proto.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        pinger.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer = proto.session.writer
        overflowed: Deferred[None] = Deferred()
        overflow = writer._on_overflow

        def noted() -> None:
            if not overflowed.called:
                overflowed.callback(None)
            overflow()

        writer._on_overflow = noted  # type: ignore[method-assign]
        pinger.transport.pauseProducing()  # stop reading from the socket
        for _ in range(20_000):  # 2.5 MB of pongs to answer
            pinger.sendPing(b"p" * 125)
        await overflowed
        self.assertLess(writer.buffered, 16 * 1024 + 1024)
        pinger.transport.resumeProducing()  # it reads its backlog, then the close
        self.assertEqual(await pinger.closed, 1013)


class JoinStormTests(ServerTestCase):
    """Presence coalescing keeps a join storm from tripping the slow-reader bound."""

    timeout = 30

    async def test_200_joins_all_stay_connected_with_full_presence(self) -> None:
        """200 clients joining one room at once stay connected and all end with 200 users."""
        self.start_server(presence_window_seconds=0.05, max_buffer_bytes=1024 * 1024,
                          max_connections_per_ip=0)
        n = 200
        clients = [await self.connect() for _ in range(n)]
        for i, c in enumerate(clients):
            c.send_json({"type": "JOIN_PROJECT", "projectId": "storm", "userId": f"user_{i}"})
        for c in clients:
            while True:
                msg = await c.next_of("USER_PRESENCE")
                if msg["payload"]["userCount"] == n:
                    break
        self.assertEqual(len(self.factory.connections), n)
        ids = {u["clientId"] for u in msg["payload"]["activeUsers"]}
        self.assertEqual(ids, {c.client_id for c in clients})
        presence_frames = sum(
            1 for c in clients for m in c.pending() if m["type"] == "USER_PRESENCE")
        self.assertEqual(presence_frames, 0)  # nothing after the final list


class HandshakeTimeoutTests(SynchronousTestCase):
    """Half-open sockets cannot pile up: HANDSHAKE_TIMEOUT bounds the opening handshake."""

    def server(self, timeout: float) -> tuple[Any, Any, Any]:
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import MemoryReactorClock, StringTransport

        from happyrobot.config import Config
        from happyrobot.tap import build_factory
        from happyrobot.web import make_site

        clock = MemoryReactorClock()
        saved = txaio.config.loop
        txaio.config.loop = clock  # Autobahn's handshake timer goes through txaio
        self.addCleanup(setattr, txaio.config, "loop", saved)
        factory = build_factory(Config(handshake_timeout_seconds=5, ping_interval_seconds=0),
                                clock)
        proto = make_site(factory).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        proto.makeConnection(transport)
        return clock, proto, transport

    def test_silent_socket_closed(self) -> None:
        """A connection that never sends its request is closed after the timeout."""
        clock, _, transport = self.server(5)
        clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.2)
        self.assertTrue(transport.disconnecting)

    def test_partial_request_closed(self) -> None:
        """A request whose headers never end is closed after the timeout too."""
        clock, proto, transport = self.server(5)
        proto.dataReceived(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        clock.advance(5.1)
        self.assertTrue(transport.disconnecting)

    def test_trickled_request_closed(self) -> None:
        """
        A client that trickles its request a byte at a time (slowloris) is
        cut off at the timeout too, although it is never silent for long.
        """
        clock, proto, transport = self.server(5)
        request = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n" + b"X-Pad: " + b"a" * 100
        for i in range(len(request)):
            if transport.disconnecting:
                break
            proto.dataReceived(request[i:i + 1])
            clock.advance(0.5)
        self.assertEqual(i, 10)  # cut at 5 s, after 10 bytes
        self.assertTrue(transport.disconnected)  # aborted, not waiting on the client

    def test_upgraded_socket_kept(self) -> None:
        """A handshake sent in time becomes a WebSocket that the deadline no longer touches."""
        clock, proto, transport = self.server(5)
        transport.protocol = proto  # as a TCP transport has, for the upgrade to replace
        proto.dataReceived(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.assertIn(b"101 Switching Protocols", transport.value())
        clock.advance(60)
        self.assertFalse(transport.disconnecting)

    def test_pipelined_request_has_its_deadline(self) -> None:
        """
        A request pipelined behind one answered later (here /stats, whose
        answer is asynchronous with Redis; any resource returning
        NOT_DONE_YET) still has to arrive whole in time.
        """
        from twisted.web.resource import Resource
        from twisted.web.server import NOT_DONE_YET

        clock, proto, transport = self.server(5)
        pending: list[Any] = []

        class Later(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> Any:
                pending.append(request)
                return NOT_DONE_YET

        proto.site.resource.putChild(b"later", Later())
        proto.dataReceived(b"GET /later HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\n")
        clock.advance(3)
        pending[0].write(b"done")
        pending[0].finish()  # now the pipelined request is read: its time starts
        for _ in range(9):
            clock.advance(0.5)
            proto.dataReceived(b"X: y\r\n")
        self.assertFalse(transport.disconnecting)
        clock.advance(0.6)
        self.assertTrue(transport.disconnected)

    def test_next_keep_alive_request_has_its_deadline(self) -> None:
        """After a response, the next request on the connection has the same time again."""
        clock, proto, transport = self.server(5)
        clock.advance(4)
        proto.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", transport.value())
        proto.dataReceived(b"GET /health HTTP/1.1\r\n")
        for _ in range(9):
            clock.advance(0.5)
            proto.dataReceived(b"X: y\r\n")
        self.assertFalse(transport.disconnecting)  # 4.5 s into the second request
        clock.advance(0.6)
        self.assertTrue(transport.disconnected)


class BadHandshakeLogTests(SynchronousTestCase):
    """What a refused handshake writes to the log is short, whatever the client sent."""

    server = HandshakeTimeoutTests.server

    def test_quoted_header_cut(self) -> None:
        """Autobahn's warning quotes at most the first 160 characters of the reason."""
        from twisted.logger import LogLevel, capturedLogs, formatEvent

        _, proto, transport = self.server(5)
        transport.protocol = proto
        with capturedLogs() as captured:
            proto.dataReceived(
                b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: " + b"v" * 8000 + b"\r\n\r\n"
            )
        self.assertIn(b"400", transport.value().split(b"\r\n")[0])
        # Autobahn's info line quoting the whole reason is below its log
        # level (warn; logs.set_level), as txaio filters before formatting.
        lines = [formatEvent(e) for e in captured if e["log_level"] >= LogLevel.warn]
        self.assertTrue(any("vvvv" in line for line in lines), lines)
        self.assertLess(max(len(line) for line in lines), 400)


class FloodCutOffTests(SynchronousTestCase):
    """A client closed for flooding is not read any further."""

    server = HandshakeTimeoutTests.server

    def test_no_wait_for_the_close_reply(self) -> None:
        """
        After its 1008 the connection is dropped at once, without waiting
        for a close reply (which a flooder would never send, while its
        flood would be parsed until the close handshake timed out).
        """
        from tests.test_framing import client_frame

        _, proto, transport = self.server(5)
        transport.protocol = proto
        proto.dataReceived(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        ws = transport.protocol  # the WebSocket protocol took the connection over
        transport.clear()
        ws.dataReceived(client_frame(b"", opcode=9) * 500)  # burst 200, then 201 refused
        self.assertTrue(transport.disconnecting)
        out = transport.value()
        close = b"\x88\x15\x03\xf0Rate limit exceeded"
        self.assertTrue(out.endswith(close), out[-40:])  # and nothing after it
        self.assertEqual(out.count(b"\x8a\x00"), 400)  # the pongs of the pings before the cut

    def test_one_warning_for_many_flooders(self) -> None:
        """Flooders that come back again and again make one warning per 10 s, counting them."""
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport
        from twisted.logger import LogLevel, capturedLogs

        from tests.test_framing import client_frame

        clock, proto, _ = self.server(5)
        with capturedLogs() as captured:
            for i in range(3):
                if i == 2:
                    clock.advance(10)
                channel = proto.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1000 + i))
                transport = StringTransport()
                transport.protocol = channel
                channel.makeConnection(transport)
                channel.dataReceived(
                    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n"
                )
                transport.protocol.dataReceived(client_frame(b"", opcode=9) * 500)
                self.assertTrue(transport.disconnecting)
        warned = [e for e in captured if e["log_level"] >= LogLevel.warn]
        self.assertEqual([e.get("n") for e in warned], [1, 2], [e["log_format"] for e in warned])

    def test_cut_off_client_that_does_not_read_is_aborted(self) -> None:
        """If it does not read its close frame either, the socket is aborted after 5 s."""
        from tests.test_framing import client_frame

        clock, proto, transport = self.server(5)
        transport.protocol = proto
        proto.dataReceived(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        transport.protocol.dataReceived(client_frame(b"", opcode=9) * 500)
        self.assertTrue(transport.disconnecting)
        clock.advance(4.9)
        self.assertFalse(transport.disconnected)
        clock.advance(0.2)
        self.assertTrue(transport.disconnected)  # aborted, whatever its buffer holds
