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
    def flush(self) -> None:
        """Write everything queued."""


class TurnFlusher:
    """Calls C{flush()} on every connection that queued frames, once per turn."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._dirty: list[Flushable] = []
        self._call: IDelayedCall | None = None

    def mark(self, conn: Flushable) -> None:
        """C{conn} has frames queued; flush it at the end of this turn."""
        self._dirty.append(conn)
        if self._call is None:
            self._call = self._clock.callLater(0, self.flush_all)

    def flush_all(self) -> None:
        self._call = None
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.flush()


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

    def write(self, data: bytes) -> None:
        if not self.buffered and self._socket is not None:
            try:
                sent = self._socket.send(data)
            except OSError:
                sent = 0  # EAGAIN, or an error Twisted will report when it writes
            if sent == len(data):
                return
            data = data[sent:]
        self.buffered += len(data)
        self._transport.write(data)
        if self.buffered > self._max:
            self._on_overflow()

    # IPullProducer: Twisted calls resumeProducing whenever its buffer empties.
    def resumeProducing(self) -> None:
        self.buffered = 0
        if self._transport.disconnecting:
            # A registered producer would keep loseConnection from finishing.
            self._transport.unregisterProducer()

    def stopProducing(self) -> None:
        self._socket = None
