"""
The outgoing side of a connection: frames queued during a reactor turn and
written once per turn, straight to the socket when nothing is waiting in
Twisted's buffer.

Why: the fan-out hands the same frame to hundreds of connections.  Through
C{transport.write} each recipient costs an ``epoll_ctl`` to start watching
for writability, a second reactor pass to ``send()``, and another
``epoll_ctl`` to stop.  Node's libuv instead tries the ``send()`` at once
and only buffers what the kernel did not take; L{SocketWriter} does the
same, with public Twisted API only: C{transport.getHandle()} for the
socket, C{transport.write} for what is left over, and a pull-producer
registration whose C{resumeProducing} tells us when Twisted's buffer is
empty again (so our bytes never overtake bytes already queued there).

L{TurnFlusher} batches per reactor turn: every frame for a connection
produced while one read is handled (a burst of events, or presence) goes
out in a single ``send()``.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Flushable(Protocol):
    def flush(self) -> int:
        """Write everything queued; how many frames that was."""


class TurnFlusher:
    """
    Calls C{flush()} on every connection that queued frames, once per turn,
    and then tells C{on_turn} (the metrics) how many frames the turn wrote
    and when the events it wrote were received: one call per turn, however
    many recipients.
    """

    #: True while a read that holds one lone event is handled: connections
    #: then write at once (and count it in C{written}) instead of queueing.
    direct = False
    #: Frames written at once this turn, counted into the next flush's total.
    written = 0

    def __init__(
        self, clock: IReactorTime, on_turn: Callable[[int, list[float]], None] | None = None
    ) -> None:
        self._clock = clock
        self._dirty: list[Flushable] = []
        self._received: list[float] = []
        self._call: IDelayedCall | None = None
        self.on_turn = on_turn

    def mark(self, conn: Flushable) -> None:
        """C{conn} has frames queued; flush it at the end of this turn."""
        self._dirty.append(conn)
        if self._call is None:
            self._call = self._clock.callLater(0, self.flush_all)

    def time_event(self, result: Any, received_at: float) -> Any:
        """
        A callback: the event received at C{received_at} (clock seconds) has
        been handed to its recipients, so this turn's flush writes it; the
        end of that flush is the end of its latency.  When this turn writes
        nothing (the event had no local recipients, or with Redis they get
        it in a later turn) there is nothing to time, and no flush is
        scheduled for it: an extra reactor turn per event would cost more
        than the measurement is worth.  Passes C{result} on.
        """
        if self._call is not None or self.written:
            self._received.append(received_at)
        return result

    def flush_all(self) -> None:
        """
        Flush every marked connection now.  Called at the end of the turn,
        or earlier by a connection that has just handled an incoming read
        (so the frames that read produced leave at once, still together).
        """
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        if not self._dirty and not self._received and not self.written:
            return
        dirty, self._dirty = self._dirty, []
        frames, self.written = self.written, 0
        for conn in dirty:
            frames += conn.flush()
        received = self._received
        if received:
            self._received = []
        if self.on_turn is not None:
            self.on_turn(frames, received)


class SocketWriter:
    """
    Writes bytes for one transport, in order, and counts what waits in
    Twisted's buffer so that a reader that stops reading is noticed
    (C{on_overflow} is called once past C{max_buffered} bytes).
    """

    def __init__(
        self, transport: Any, max_buffered: int, on_overflow: Callable[[], None]
    ) -> None:
        self._transport = transport
        # Only a plain TCP or UNIX socket can take our bytes directly: TLS
        # must go through the transport, and so must test transports.
        direct = getattr(transport, "TLS", True) is False and hasattr(transport, "getHandle")
        self._socket = transport.getHandle() if direct else None
        self._max = max_buffered
        self._on_overflow = on_overflow
        transport.registerProducer(self, False)  # calls resumeProducing at once
        # Bytes may still sit in Twisted's buffer from before we were
        # registered (the handshake reply): until it reports empty, write
        # through it.
        self.buffered = 1

    def write(self, data: bytes, bounded: bool = True) -> None:
        """
        Write C{data} after everything written before.  With C{bounded}
        (event frames), nothing is written once more than the bound is
        waiting; the small frames of the protocol itself (close, ping,
        pong) always go.
        """
        if not self.buffered and self._socket is not None:
            try:
                sent = self._socket.send(data)
            except OSError:
                sent = 0  # EAGAIN, or an error Twisted will report when it writes
            if sent == len(data):
                return
            data = data[sent:]
        if bounded and self.buffered > self._max:
            # More than the bound was already waiting: the client is not
            # keeping up.  (Checked before adding, so that one frame larger
            # than the bound does not by itself cut off a healthy client.)
            self._on_overflow()
            return
        self.buffered += len(data)
        self._transport.write(data)

    # IPullProducer: Twisted calls resumeProducing whenever its buffer empties.
    def resumeProducing(self) -> None:
        self.buffered = 0
        if self._transport.disconnecting:
            # A registered producer would keep loseConnection from finishing.
            self._transport.unregisterProducer()

    def stopProducing(self) -> None:
        self._socket = None
