"""
The incoming fast path (L{happyrobot.ws.CollabProtocol._text_frames}) must
behave exactly as Autobahn's own frame handling does: for any byte stream
a client may send, cut into reads anywhere, the server hands the same
messages to the connection's session and writes the same frames back (answers, pongs,
close codes) with the fast path on as with it off.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import txaio
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from happyrobot.config import Config
from happyrobot.session import Session
from happyrobot.tap import build_factory
from happyrobot.web import make_site
from tests.test_framing import client_frame

LIMIT = 300  # MAX_MESSAGE_BYTES for these tests: "oversize" frames are cheap

_HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def _frames(kind: str, data: bytes) -> bytes:
    """Client bytes of one kind of thing a client may send."""
    if kind == "event":
        return client_frame(b'{"type":"TASK_UPDATE","projectId":"p","payload":{"n":%d}}' % len(data))
    if kind == "text":
        return client_frame(data.decode("latin-1").encode("utf-8")[:LIMIT])
    if kind == "bad-utf8":
        return client_frame(b"{\xff" + data[:10])
    if kind == "binary":
        return client_frame(data, opcode=2)
    if kind == "ping":
        return client_frame(data[:125], opcode=9)
    if kind == "pong":
        return client_frame(data[:125], opcode=10)
    if kind == "fragmented":
        return client_frame(b'{"type":', fin=False) + client_frame(b'"X"}', opcode=0)
    if kind == "ping-inside-fragments":
        return (client_frame(b'{"type":', fin=False) + client_frame(b"p", opcode=9)
                + client_frame(b'"Y"}', opcode=0))
    if kind == "oversize":
        return client_frame(b"x" * (LIMIT + 1 + len(data)))
    if kind == "unmasked":
        return client_frame(b'{"type":"Z"}', mask=None)
    if kind == "rsv":
        return client_frame(b'{"type":"Z"}', rsv=2)
    if kind == "non-minimal":
        return client_frame(b'{"type":"Z"}', length_code=126)
    if kind == "close":
        return client_frame(struct.pack("!H", 1000), opcode=8)
    raise AssertionError(kind)


KINDS = ["event", "event", "text", "bad-utf8", "binary", "ping", "pong", "fragmented",
         "ping-inside-fragments", "oversize", "unmasked", "rsv", "non-minimal", "close"]


class _Raw(Protocol):
    """The client side: writes what it is told, keeps what it receives."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def _server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each frame the server wrote after its 101 reply."""
    data = data[data.index(b"\r\n\r\n") + 4:]
    out, i = [], 0
    while i + 2 <= len(data):
        n, head = data[i + 1] & 0x7F, 2
        if n == 126:
            n, head = struct.unpack("!H", data[i + 2:i + 4])[0], 4
        elif n == 127:
            n, head = struct.unpack("!Q", data[i + 2:i + 10])[0], 10
        out.append((data[i] & 0x0F, data[i + head:i + head + n]))
        i += head + n
    return out


def _run(test: SynchronousTestCase, chunks: list[bytes], fast: bool) -> tuple[Any, ...]:
    """Send C{chunks} as separate reads; what the server did with them."""
    clock = MemoryReactorClock()
    saved = txaio.config.loop
    txaio.config.loop = clock
    test.addCleanup(setattr, txaio.config, "loop", saved)
    config = Config(presence_window_seconds=0, ping_interval_seconds=0,
                    rate_limit_per_second=0, max_message_bytes=LIMIT)
    factory = build_factory(config, clock)
    handled: list[tuple[bytes, bool]] = []

    class Recording(Session):
        def received(self, payload: bytes, is_binary: bool) -> None:
            handled.append((payload, is_binary))
            super().received(payload, is_binary)

    factory.protocol.session_class = Recording
    if not fast:
        factory.protocol._text_frames = lambda self, data: data  # type: ignore[method-assign]
    server = make_site(factory).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    client = _Raw()
    pump = iosim.connect(server, iosim.makeFakeServer(server),
                         client, iosim.makeFakeClient(client), greet=False)
    client.transport.write(_HANDSHAKE)
    pump.flush()
    for chunk in chunks:
        client.transport.write(chunk)
        pump.flush()
        clock.advance(0)
    pump.flush()
    # The first frame is CONNECTION_ESTABLISHED, with a random client id; a
    # close frame's reason is prose (it may be worded differently), its code not.
    frames = [(op, payload[:2] if op == 8 else payload)
              for op, payload in _server_frames(client.received)[1:]]
    return handled, frames, bool(pump.serverIO.disconnecting)  # type: ignore[attr-defined]


class FastPathEquivalenceTests(SynchronousTestCase):
    @settings(max_examples=150, deadline=None)
    @given(
        st.lists(st.tuples(st.sampled_from(KINDS), st.binary(max_size=40)), min_size=1,
                 max_size=8),
        st.lists(st.integers(min_value=1, max_value=4000), max_size=5),
    )
    def test_same_as_autobahn(self, things: list[tuple[str, bytes]], cuts: list[int]) -> None:
        """Any stream, cut into reads anywhere: the same messages handled, the same replies."""
        stream = b"".join(_frames(kind, data) for kind, data in things)
        points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
        chunks = [stream[a:b] for a, b in zip(points, points[1:]) if b > a]
        self.assertEqual(_run(self, chunks, fast=True), _run(self, chunks, fast=False))

    def test_the_fast_path_is_taken(self) -> None:
        """Whole text frames in one read do reach the session without Autobahn's frame machine."""
        chunks = [_frames("event", b"") + _frames("text", b"hello")]
        handled, frames, _ = _run(self, chunks, fast=True)
        self.assertEqual(len(handled), 2)
        self.assertEqual([op for op, _ in frames], [1, 1])  # NOT_IN_PROJECT, INVALID_JSON
        self.assertIn(b"NOT_IN_PROJECT", frames[0][1])

    def test_random_bytes(self) -> None:
        """Garbage after valid frames: the same outcome either way."""
        for seed in range(20):
            stream = _frames("event", b"") + os.urandom(64 + seed)
            self.assertEqual(_run(self, [stream], fast=True), _run(self, [stream], fast=False))
