"""
The outgoing writer (happyrobot.writer): direct socket writes, falling back
to the transport's buffer, its accounting and bound, and per-turn batching.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from happyrobot.writer import SocketWriter, TurnFlusher


class FakeTransport:
    """A transport over a real socket pair; write() only buffers, like Twisted's."""

    def __init__(self, sock: socket.socket | None, tls: bool = False) -> None:
        self._sock = sock
        self.TLS = tls
        self.buffer: list[bytes] = []
        self.producer: Any = None
        self.disconnecting = False

    def getHandle(self) -> socket.socket | None:
        return self._sock

    def write(self, data: bytes) -> None:
        self.buffer.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self.producer = None

    def drain(self) -> bytes:
        """What Twisted's doWrite would do: send the buffer, then ask for more."""
        data = b"".join(self.buffer)
        self.buffer.clear()
        if self.producer is not None:
            self.producer.resumeProducing()
        return data


class SocketWriterTests(SynchronousTestCase):
    """SocketWriter."""

    def setUp(self) -> None:
        self.a, self.b = socket.socketpair()
        self.a.setblocking(False)
        self.b.setblocking(False)
        self.addCleanup(self.a.close)
        self.addCleanup(self.b.close)
        self.overflows = 0

    def overflow(self) -> None:
        self.overflows += 1

    def test_first_write_goes_through_transport_then_direct(self) -> None:
        """Until the transport reports empty, writes go through it; then to the socket."""
        t = FakeTransport(self.a)
        w = SocketWriter(t, 1000, self.overflow, TurnFlusher(Clock()))
        w.write(b"hello")
        self.assertEqual(t.buffer, [b"hello"])
        self.assertEqual(t.drain(), b"hello")
        self.assertEqual(w.buffered, 0)
        w.write(b"direct")
        self.assertEqual(t.buffer, [])
        self.assertEqual(self.b.recv(100), b"direct")

    def test_full_socket_falls_back_in_order(self) -> None:
        """What the kernel does not take goes to the transport, and later writes follow it."""
        t = FakeTransport(self.a)
        w = SocketWriter(t, 100 * 1024 * 1024, self.overflow, TurnFlusher(Clock()))
        t.drain()
        big = b"x" * (8 * 1024 * 1024)  # more than a socket pair buffers
        w.write(big)
        self.assertTrue(t.buffer)
        w.write(b"after")
        self.assertEqual(t.buffer[-1], b"after")
        received = b""
        while True:
            try:
                chunk = self.b.recv(1 << 20)
            except BlockingIOError:
                break
            received += chunk
        self.assertEqual(received + b"".join(t.buffer), big + b"after")

    def test_bound(self) -> None:
        """Past the bound event frames are refused and reported; protocol frames still go."""
        t = FakeTransport(None)  # no direct path: everything is buffered
        w = SocketWriter(t, 10, self.overflow, TurnFlusher(Clock()))
        w.write(b"123456789")  # 1 (unknown) + 9 = 10: not over
        self.assertEqual(self.overflows, 0)
        w.write(b"ab")  # 12 waiting now
        w.write(b"cd")  # refused: more than 10 already waiting
        self.assertEqual(self.overflows, 1)
        self.assertNotIn(b"cd", t.buffer)
        w.write(b"close", bounded=False)
        self.assertEqual(t.buffer[-1], b"close")

    def test_one_large_frame_is_not_overflow(self) -> None:
        """A single frame larger than the bound does not by itself cut a client off."""
        t = FakeTransport(None)
        w = SocketWriter(t, 10, self.overflow, TurnFlusher(Clock()))
        t.drain()
        w.write(b"x" * 100)
        self.assertEqual(self.overflows, 0)

    def test_tls_never_direct(self) -> None:
        """A TLS transport always gets the bytes, never the raw socket."""
        t = FakeTransport(self.a, tls=True)
        w = SocketWriter(t, 1000, self.overflow, TurnFlusher(Clock()))
        t.drain()
        w.write(b"secret")
        self.assertEqual(t.buffer, [b"secret"])

    def test_unregisters_when_disconnecting(self) -> None:
        """Once the transport is closing, the writer steps aside so the close can finish."""
        t = FakeTransport(self.a)
        SocketWriter(t, 1000, self.overflow, TurnFlusher(Clock()))
        t.disconnecting = True
        t.drain()
        self.assertIsNone(t.producer)


class TurnFlusherTests(SynchronousTestCase):
    """TurnFlusher."""

    def test_flushes_each_marked_once_at_end_of_turn(self) -> None:
        """Marked connections are flushed once, on the next clock turn."""
        clock = Clock()
        flusher = TurnFlusher(clock)
        flushed: list[str] = []

        class Conn:
            def __init__(self, name: str) -> None:
                self.name = name

            def write_queue(self) -> int:
                flushed.append(self.name)
                return 1

        a, b = Conn("a"), Conn("b")
        flusher.mark(a)
        flusher.mark(b)
        self.assertEqual(flushed, [])
        clock.advance(0)
        self.assertEqual(flushed, ["a", "b"])
        clock.advance(0)
        self.assertEqual(flushed, ["a", "b"])

    def test_early_flush_cancels_the_turn_call(self) -> None:
        """Flushing early (after a read) writes at once and leaves no call pending."""
        clock = Clock()
        flusher = TurnFlusher(clock)
        flushed: list[int] = []

        class Conn:
            def write_queue(self) -> int:
                flushed.append(1)
                return 1

        flusher.mark(Conn())
        flusher.write_turn()
        self.assertEqual(flushed, [1])
        self.assertEqual(clock.getDelayedCalls(), [])
        flusher.write_turn()  # nothing marked: nothing to do
        self.assertEqual(flushed, [1])

    def test_direct_writes_are_counted_and_timed(self) -> None:
        """
        Frames a connection wrote at once (C{written}) are added to the
        turn's total, and the event that produced them is timed, though
        nothing was queued.
        """
        clock = Clock()
        turns: list[tuple[int, list[float]]] = []
        flusher = TurnFlusher(clock, lambda frames, received: turns.append((frames, received)))
        flusher.written += 3
        self.assertEqual(flusher.time_event("result", 1.5), "result")
        flusher.write_turn()
        self.assertEqual(turns, [(3, [1.5])])
        self.assertEqual(flusher.written, 0)
        flusher.time_event(None, 2.0)  # nothing written or queued: not timed
        flusher.write_turn()
        self.assertEqual(turns, [(3, [1.5])])


class FanOutTests(SynchronousTestCase):
    """TurnFlusher.fan_out: how a room's frame reaches its members' writers."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.turns: list[tuple[int, list[float]]] = []
        self.flusher = TurnFlusher(self.clock, lambda frames, received: self.turns.append((frames, received)))
        self.peers: dict[str, socket.socket] = {}
        self.transports: dict[str, FakeTransport] = {}

    def writer(self, name: str, transform: Any = None, tls: bool = False) -> SocketWriter:
        """A writer over a real socket pair whose transport buffer is empty."""
        a, b = socket.socketpair()
        for s in (a, b):
            s.setblocking(False)
            self.addCleanup(s.close)
        self.peers[name] = b
        t = self.transports[name] = FakeTransport(a, tls=tls)
        w = SocketWriter(t, 64 << 20, self.fail, self.flusher, transform)
        t.drain()
        return w

    def received(self, name: str) -> bytes:
        """What the peer of C{name} has received so far, and what its transport holds."""
        try:
            data = self.peers[name].recv(1 << 20)
        except BlockingIOError:
            data = b""
        return data + b"|" + b"".join(self.transports[name].buffer)

    def test_lone_event_goes_straight_to_each_socket(self) -> None:
        """Direct: each writer but the excluded one gets the frame in one send, counted."""
        writers = {name: self.writer(name) for name in ("a", "b", "c")}
        self.flusher.direct = True
        self.assertEqual(self.flusher.fan_out(writers, b"EV", exclude="b"), 2)
        self.assertEqual(self.received("a"), b"EV|")
        self.assertEqual(self.received("b"), b"|")
        self.assertEqual(self.received("c"), b"EV|")
        self.assertEqual(self.clock.getDelayedCalls(), [])  # nothing queued for later
        self.flusher.write_turn()
        self.assertEqual(self.turns, [(2, [])])

    def test_burst_is_queued_and_written_once(self) -> None:
        """Not direct: frames are queued and each writer is written once at the flush."""
        writers = {name: self.writer(name) for name in ("a", "b")}
        self.assertEqual(self.flusher.fan_out(writers, b"E1", exclude=None), 2)
        self.assertEqual(self.flusher.fan_out(writers, b"E2", exclude=None), 2)
        self.assertEqual(self.received("a"), b"|")
        self.clock.advance(0)
        self.assertEqual(self.received("a"), b"E1E2|")
        self.assertEqual(self.received("b"), b"E1E2|")
        self.assertEqual(self.turns, [(4, [])])

    def test_order_is_kept_behind_queued_and_buffered_bytes(self) -> None:
        """
        A writer with frames queued this turn, or bytes waiting in Twisted's
        buffer, gets the lone event after them, not straight away.
        """
        queued, waiting = self.writer("queued"), self.writer("waiting")
        queued.send(b"Q")  # queued this turn (not direct)
        waiting.write(b"x" * (8 * 1024 * 1024))  # more than the socket takes
        self.assertTrue(self.transports["waiting"].buffer)
        self.flusher.direct = True
        self.flusher.fan_out({"queued": queued, "waiting": waiting}, b"EV", exclude=None)
        self.assertEqual(self.received("queued"), b"|")  # still queued behind Q
        self.assertEqual(self.transports["waiting"].buffer[-1], b"EV")
        self.flusher.direct = False
        self.flusher.write_turn()
        self.assertEqual(self.received("queued"), b"QEV|")

    def test_partial_send_leaves_the_rest_in_order(self) -> None:
        """What the kernel does not take of the frame waits in the transport, then later frames."""
        w = self.writer("a")
        big = b"y" * (8 * 1024 * 1024)
        self.flusher.direct = True
        self.flusher.fan_out({"a": w}, big, exclude=None)
        self.flusher.fan_out({"a": w}, b"NEXT", exclude=None)
        got = b""
        while True:
            try:
                chunk = self.peers["a"].recv(1 << 20)
            except BlockingIOError:
                break
            got += chunk
        self.assertEqual(got + b"".join(self.transports["a"].buffer), big + b"NEXT")

    def test_transformed_and_tls_writers_take_the_slow_path(self) -> None:
        """A per-connection transform (deflate) is applied; TLS goes through the transport."""
        deflated = self.writer("z", transform=lambda frame: b"z(" + frame + b")")
        tls = self.writer("tls", tls=True)
        self.assertIsNone(deflated.send_now)
        self.assertIsNone(tls.send_now)
        self.flusher.direct = True
        self.flusher.fan_out({"z": deflated, "tls": tls}, b"EV", exclude=None)
        self.assertEqual(self.received("z"), b"z(EV)|")
        self.assertEqual(self.received("tls"), b"|EV")
        self.flusher.write_turn()
        self.assertEqual(self.turns, [(2, [])])

    def test_closed_writer_gets_nothing(self) -> None:
        """After close() (the close frame went), events are dropped, direct or queued."""
        w = self.writer("a")
        w.close()
        self.flusher.direct = True
        self.flusher.fan_out({"a": w}, b"EV", exclude=None)
        self.flusher.direct = False
        self.flusher.fan_out({"a": w}, b"EV", exclude=None)
        self.clock.advance(0)
        self.assertEqual(self.received("a"), b"|")
        self.assertEqual(w.write_queue(), 0)

    def test_send_error_leaves_the_frame_to_twisted(self) -> None:
        """A send() that fails (the peer is gone) hands the frame to the transport, which reports it."""
        w = self.writer("gone")
        self.peers["gone"].close()
        self.flusher.direct = True
        self.assertEqual(self.flusher.fan_out({"gone": w}, b"EV", exclude=None), 1)
        self.assertEqual(self.transports["gone"].buffer, [b"EV"])
