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
out in a single ``send()``.  A read that holds one lone event is the
exception: L{TurnFlusher.fan_out} writes it to each recipient as it goes,
in a loop that touches only the small writers (not the connections), since
every recipient after the first waits for the ones before it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from happyrobot.timers import cancel_if_active


class Queued(Protocol):
    """A connection's writer as the flusher sees it."""

    def write_queue(self) -> int:
        """Write everything queued; how many frames that was."""


class TurnFlusher:
    """
    Calls C{write_queue()} on every writer that queued frames, once per turn,
    and then tells C{on_turn} (the metrics) how many frames the turn wrote
    and when the events it wrote were received: one call per turn, however
    many recipients.
    """

    #: True while a read that holds one lone event is handled: connections
    #: then write at once (and count it in C{written}) instead of queueing.
    direct = False
    #: Frames written at once this turn, counted into the next write_turn's total.
    written = 0

    def __init__(
        self, clock: IReactorTime, on_turn: Callable[[int, list[float]], None] | None = None
    ) -> None:
        self._clock = clock
        self._dirty: list[Queued] = []
        self._received: list[float] = []
        self._call: IDelayedCall | None = None
        self.on_turn = on_turn

    def mark(self, conn: Queued) -> None:
        """C{conn} has frames queued; write them at the end of this turn."""
        self._dirty.append(conn)
        if self._call is None:
            self._call = self._clock.callLater(0, self.write_turn)

    def fan_out(
        self, writers: Mapping[str, SocketWriter], frame: bytes, exclude: str | None
    ) -> int:
        """
        Hand C{frame} to every writer but C{exclude}'s (the room registry's
        delivery); how many that was.  For a lone event (C{direct}), a
        writer with nothing queued or waiting gets it in one C{send()} right
        here; the others (and every writer in a burst) through
        L{SocketWriter.send}.
        """
        direct = self.direct
        size = len(frame)
        sent = written = 0
        for client_id, writer in writers.items():
            if client_id == exclude:
                continue
            sent += 1
            send_now = writer.send_now
            if direct and send_now is not None and not writer.buffered and not writer.queue:
                try:
                    done = send_now(frame)
                except OSError:
                    done = 0  # EAGAIN, or an error Twisted will report
                written += 1
                if done != size:
                    writer.write(frame[done:])  # the rest waits in Twisted's buffer
            else:
                writer.send(frame)
        self.written += written
        return sent

    def time_event(self, result: Any, received_at: float) -> Any:
        """
        A callback: the event received at C{received_at} (clock seconds) has
        been handed to its recipients, so this turn's L{write_turn} writes
        it; the end of that is the end of its latency.  When this turn writes
        nothing (the event had no local recipients, or with Redis they get
        it in a later turn) there is nothing to time, and no write is
        scheduled for it: an extra reactor turn per event would cost more
        than the measurement is worth.  Passes C{result} on.
        """
        if self._call is not None or self.written:
            self._received.append(received_at)
        return result

    def write_turn(self) -> None:
        """
        Write every marked writer's queue now.  Called at the end of the turn,
        or earlier by a connection that has just handled an incoming read
        (so the frames that read produced leave at once, still together).
        """
        call, self._call = self._call, None
        cancel_if_active(call)
        if not self._dirty and not self._received and not self.written:
            return
        dirty, self._dirty = self._dirty, []
        frames, self.written = self.written, 0
        for conn in dirty:
            frames += conn.write_queue()
        received = self._received
        if received:
            self._received = []
        if self.on_turn is not None:
            self.on_turn(frames, received)


class SocketWriter:
    """
    One connection's outgoing side: the frames queued this turn
    (C{queue}), written together by L{write_queue}, and the bytes waiting in
    Twisted's buffer (C{buffered}), bounded: C{on_overflow} is called once
    a reader that stops reading has more than C{max_buffered} bytes waiting.
    """

    __slots__ = ("_transport", "_socket", "_max", "_on_overflow", "_flusher", "_transform",
                 "buffered", "queue", "send_now")

    def __init__(
        self,
        transport: Any,
        max_buffered: int,
        on_overflow: Callable[[], None],
        flusher: TurnFlusher,
        transform: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self._transport = transport
        # Only a plain TCP or UNIX socket can take our bytes directly: TLS
        # must go through the transport, and so must test transports.
        direct = getattr(transport, "TLS", True) is False and hasattr(transport, "getHandle")
        self._socket = transport.getHandle() if direct else None
        self._max = max_buffered
        self._on_overflow = on_overflow
        self._flusher = flusher
        #: Applied to each event frame for this connection (permessage-deflate).
        self._transform = transform
        #: Frames queued this turn; None once the connection takes no more
        #: (it is closing, or closed).
        self.queue: list[bytes] | None = []
        #: The socket's C{send}, for L{TurnFlusher.fan_out}, when this
        #: connection's frames may go straight to it (a plain socket, no
        #: per-connection transform, still open); otherwise None.
        self.send_now: Callable[[bytes], int] | None = (
            self._socket.send if self._socket is not None and transform is None else None
        )
        transport.registerProducer(self, False)  # calls resumeProducing at once
        # Bytes may still sit in Twisted's buffer from before we were
        # registered (the handshake reply): until it reports empty, write
        # through it.
        self.buffered = 1

    def send(self, frame: bytes) -> None:
        """
        Queue an event frame; this turn's frames are written together by
        L{write_queue}.  While the flusher hands over a lone event (C{direct}), it
        is written at once instead (after anything queued before it).
        """
        queue = self.queue
        if queue is None:
            return  # closing, or closed
        if self._transform is not None:
            frame = self._transform(frame)
        if not queue:
            flusher = self._flusher
            if flusher.direct:
                flusher.written += 1
                self.write(frame)
                return
            flusher.mark(self)
        queue.append(frame)

    def write_queue(self) -> int:
        """Write the frames queued this turn, in one piece; how many were written."""
        queue = self.queue
        if not queue:
            return 0
        self.queue = []
        self.write(queue[0] if len(queue) == 1 else b"".join(queue))
        return len(queue)

    def close(self) -> None:
        """Take no more event frames (the close frame has gone, or the connection)."""
        self.queue = None
        self.send_now = None

    def write(self, data: bytes, bounded: bool = True) -> None:
        """
        Write C{data} after everything written before.  With C{bounded}
        (event frames, pongs), nothing is written once more than the bound
        is waiting; the protocol's own close and ping frames always go.
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
        self.send_now = None
