"""
The WebSocket adapter: Autobahn's protocol, carrying bytes between the
socket and the connection's L{happyrobot.session.Session}.

L{CollabProtocol} admits the handshake (connection limits, a URL token),
answers a refused one in JSON, reads whole text frames itself when it can
(the incoming fast path), writes through the connection's
L{happyrobot.writer.SocketWriter}, and closes and drops; what a message
means is the session's.  Autobahn's private attributes are reached only
through L{happyrobot.seams.autobahn}.
"""

from __future__ import annotations

import functools
import secrets
from typing import Any, Iterable, cast

import orjson
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
)
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES

from happyrobot import auth, logs, messages, security
from happyrobot.access import AccessWatch
from happyrobot.bus import Bus
from happyrobot.config import Config
from happyrobot.framing import SharedDeflate, split_text_frames, text_frame
from happyrobot.metrics import Metrics
from happyrobot.rooms import RoomRegistry
from happyrobot.seams import autobahn as seam
from happyrobot.session import CLOSE_POLICY_VIOLATION, EchoSession, Session, Shared
from happyrobot.timers import cancel_if_active
from happyrobot.writer import SocketWriter, TurnFlusher

log = logs.get_logger(__name__)

CLOSE_GOING_AWAY = 1001
CLOSE_TRY_AGAIN_LATER = 1013
OPCODE_PONG = 10
#: The longest reason for a failed connection that Autobahn's log line quotes.
MAX_LOGGED_REASON = 160


def _accept_deflate(max_message_bytes: int) -> Any:
    """
    Accept a client's first permessage-deflate offer (browsers make one),
    with the decompressed size of its messages bounded like any message.
    """

    def accept(offers: list[Any]) -> Any:
        for offer in offers:
            if isinstance(offer, PerMessageDeflateOffer):
                return PerMessageDeflateOfferAccept(offer, max_message_size=max_message_bytes)
        return None

    return accept


def new_client_id(now_ms: int) -> str:
    """A unique, unguessable client id in the original server's style."""
    return f"client_{now_ms}_{secrets.token_hex(6)}"


def http_error(code: int, reason: str, headers: Iterable[tuple[str, Any]] = ()) -> bytes:
    """
    A refused handshake's response (401 bad token, 426 no upgrade, 400 a
    broken one), in JSON like every other error of the site: Autobahn would
    send its reason as the status line and no body.
    """
    body = orjson.dumps({"error": reason})
    head = [f"HTTP/1.1 {code} {RESPONSES.get(code, b'Error').decode('ascii')}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Connection: close"]
    head += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1", "replace") + body


class CollabProtocol(WebSocketServerProtocol):
    """One browser tab or back-end service connected to ``/ws``."""

    factory: CollabFactory
    client_id: str = ""
    #: This connection's logic, from the end of the handshake until connectionLost.
    session: Session | None = None
    session_class: type[Session] = Session

    # Autobahn's options, bound on the per-factory protocol class.
    maxFramePayloadSize: int
    maxMessagePayloadSize: int
    utf8validateIncoming: bool
    closeHandshakeTimeout: float

    _address: str | None = None
    _identity: auth.Identity | None = None
    _writer: SocketWriter | None = None
    _abort_call: IDelayedCall | None = None

    # ------------------------------------------------------------ handshake

    def onConnect(self, request: Any) -> Deferred[None] | None:  # type: ignore[override]
        # Count the connection against its address; web.py has already
        # refused it (403/429/503) if a limit or the Origin says no.
        try:
            self._address = security.client_address(
                security.peer_host(self._transport().getPeer()),
                (request.headers.get("x-forwarded-for") or "").encode("latin-1") or None,
                self.factory.config.trust_proxy,
            )
            self.factory.limiter.opened(self._address)
        except Exception:
            log.failure("onConnect failed")
            raise
        # Browsers cannot set headers on a WebSocket, so a session token
        # may come as ?token=...; a bad one is refused before the upgrade.
        token = (request.params.get("token") or [None])[0]
        verifier = self.factory.verifier
        if verifier is None or not token:
            return None

        def verified(identity: auth.Identity) -> None:
            self._identity = identity

        def refused(failure: Failure) -> None:
            failure.trap(auth.AuthError)
            raise ConnectionDeny(401, "Invalid session token")

        return verifier.verify(token, self.factory.clock.seconds()).addCallbacks(
            verified, refused
        )

    def sendHttpErrorResponse(
        self, code: int, reason: str, responseHeaders: list[tuple[str, Any]] | None = None
    ) -> None:
        self.sendData(http_error(code, reason, responseHeaders or ()))

    def connectionMade(self) -> None:
        super().connectionMade()
        seam.drop_send_queue(self)  # every write after the handshake goes through SocketWriter

    def _transport(self) -> Any:
        """The TCP transport (set from connectionMade on)."""
        assert self.transport is not None
        return self.transport

    def onOpen(self) -> None:
        try:
            f = self.factory
            # Outgoing frames: queued per turn, written straight to the
            # socket when possible; what waits in Twisted's buffer is bounded
            # by MAX_BUFFER_BYTES (a reader that stops reading is cut off).
            self._transport().unregisterProducer()  # the HTTP channel we were upgraded from
            transform = None
            bits = seam.deflate_window_bits(self)
            if bits is not None:
                # Each event is compressed once per window size, shared by
                # every recipient with that size.
                transform = functools.partial(f.deflate.frame, window_bits=bits)
            writer = self._writer = SocketWriter(
                self.transport, f.config.max_buffer_bytes, self._drop_slow_reader,
                f.flusher, transform,
            )
            now = f.clock.seconds()
            now_ms = int(now * 1000)
            self.client_id = new_client_id(now_ms)
            self.session = self.session_class(
                self.client_id, writer, self, f.shared,
                self._identity,
            )
            f.connections[self.client_id] = self
            log.info("{client_id} connected", client_id=self.client_id)
            self._greet(now_ms)
        except Exception:
            log.failure("onOpen failed")
            self.dropConnection(abort=True)

    def _greet(self, now_ms: int) -> None:
        # The connection's first frame, with nothing queued before it: it
        # is written at once, behind the handshake reply still in Twisted's
        # buffer (both leave in one send()), with no flush to schedule.
        assert self._writer is not None
        self._writer.write(text_frame(messages.connection_established(self.client_id, now_ms)))
        self.factory.flusher.written += 1

    # ------------------------------------------------------------ writing

    def _closed(self) -> bool:
        """No more frames for this connection: not open yet, closing, or closed."""
        return self._writer is None or self._writer.queue is None

    def _stop_sending(self) -> None:
        """Take no more frames (the close frame has gone, or the connection)."""
        writer = self._writer
        if writer is not None and writer.queue is not None:
            writer.close()
            if self.session is not None:
                self.session.closing()

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Autobahn's own frames (pings, pongs, close) take the same writer,
        # after whatever this connection has queued, so that bytes stay in
        # order.  Autobahn's debug logging of each write is skipped too.
        if sync or chopsize:
            super().sendData(data, sync, chopsize)
            return
        writer = self._writer
        if writer is None:
            # Before onOpen (the handshake's reply, or a refusal) and after
            # the connection is lost: written as Autobahn's sendData would.
            assert self.transport is not None
            self.transport.write(data)
            return
        writer.write_queue()
        # A pong answers the client's ping: one that pings without reading
        # is a slow reader like any other (closed with 1013 past the bound).
        writer.write(data, bounded=data[0] & 0x0F == OPCODE_PONG)

    def _drop_slow_reader(self) -> None:
        # Twisted holds more than MAX_BUFFER_BYTES for a client that is not
        # reading: accept nothing more for it and close with 1013.  A slow
        # client reads the close after its backlog; one that stopped
        # reading is dropped when the close handshake times out, which
        # frees the buffer.
        if self._closed():
            return
        log.warn("{client_id} reads too slowly; closing with 1013", client_id=self.client_id)
        self.factory.metrics.slow_reader()
        self.start_close(CLOSE_TRY_AGAIN_LATER, "Too slow a reader")

    # ------------------------------------------------------------ closing

    def start_close(self, code: int, reason: str) -> None:
        """
        Start closing with a protocol close code.  Frames queued this turn
        still go first; nothing after.  Autobahn drops the connection if the
        client does not answer within the close handshake timeout.
        """
        seam.send_close_frame(self, code, reason.encode("utf-8"))

    def sendCloseFrame(
        self, code: int | None = None, reasonUtf8: bytes | None = None, isReply: bool = False
    ) -> None:
        # Every close frame goes through here (ours, Autobahn's replies and
        # failures): the frames queued so far are written before it (see
        # sendData), and no event after it.
        super().sendCloseFrame(code, reasonUtf8, isReply)
        if not seam.is_open(self):
            self._stop_sending()

    def cut_off(self) -> None:
        """
        Close an abusive client with 1008 and stop reading from it at once:
        waiting for its close reply would mean parsing its flood meanwhile
        (for up to the close handshake timeout), at every other client's
        expense.
        """
        self.start_close(CLOSE_POLICY_VIOLATION, "Rate limit exceeded")
        seam.count_as_clean(self)  # as we chose: no warning of Autobahn's
        self.dropConnection(abort=False)  # the close frame is written first
        # ... if the client reads it: one that does not is cut off.
        self._abort_call = self.factory.clock.callLater(
            self.closeHandshakeTimeout,
            self._transport().abortConnection,  # TCP's
        )

    def dropConnection(self, abort: bool = False) -> None:
        self._stop_sending()
        seam.shorten_failure_reason(self, MAX_LOGGED_REASON)
        super().dropConnection(abort)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._address is not None:
            self.factory.limiter.closed(self._address)
            self._address = None
        self._stop_sending()
        session = self.session
        if session is None:
            return  # the opening handshake never completed
        session.end()
        f = self.factory
        if f.connections.pop(self.client_id, None) is None:
            return
        log.info("{client_id} disconnected ({code})", client_id=self.client_id, code=code)
        f.metrics.closed(code)
        f.connection_closed()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        cancel_if_active(self._abort_call)
        super().connectionLost(reason)
        # Undo the reference cycles of a connection (the writer and the
        # session call back into us; Autobahn's is_closed holds us as its
        # result), so that reference counting frees a closed connection at
        # once.  Left to the cyclic garbage collector, its objects cost a
        # tenth of the CPU of a connect and close.  (web.py undoes the HTTP
        # request's.)
        self._writer = None
        self.session = None
        seam.break_cycle(self)

    # ------------------------------------------------------------ reading

    def dataReceived(self, data: bytes) -> None:
        if seam.idle(self):
            data = self._text_frames(data)
        if data:
            seam.feed(self, data)
        # Everything this read produced (one event or a burst, for every
        # recipient) is written now rather than on the next reactor turn:
        # still one send() per recipient per read, and no added latency.
        # The events this read appended go to Redis as one batch per room.
        self.factory.bus.flush()
        self.factory.flusher.write_turn()

    def _text_frames(self, data: bytes) -> bytes:
        """
        Handle the whole text frames at the start of C{data} here, as
        Autobahn would; return what is left for Autobahn (other kinds of
        frame, a partial frame, or everything after the connection started
        closing).
        """
        # A whole frame is a whole message here: both of Autobahn's limits
        # apply (0 is no limit).
        limits = [n for n in (self.maxFramePayloadSize, self.maxMessagePayloadSize) if n]
        frames, used = split_text_frames(data, min(limits) if limits else 0)
        if not frames:
            return data
        seam.traffic_seen(self)  # traffic counts as a pong
        flusher = self.factory.flusher
        session = self.session
        assert session is not None  # open
        received = session.received
        # A read that is one event (the usual case below saturation) is
        # written to each recipient as it is handed over; a burst is queued
        # and written once per recipient at the end of the read.
        lone = len(frames) == 1 and used == len(data)
        start = 0
        for payload, end in frames:
            if not seam.is_open(self):
                return data[start:]  # closing: Autobahn reads the rest
            start = end
            if self.utf8validateIncoming:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError as e:
                    # Fail the connection as Autobahn does: close with 1007,
                    # then drop it (RFC 6455 7.1.7: no need to wait for the reply).
                    seam.fail_invalid_payload(
                        self, f"invalid UTF-8 in text message at octet {e.start}")
                    self.dropConnection(abort=False)
                    continue
            flusher.direct = lone
            try:
                received(payload, False)
            finally:
                flusher.direct = False
        return data[used:]

    def onFrameBegin(self) -> None:
        # Frames that are not a whole message (pings, pongs, the fragments
        # of a message before its last) cost the rate limit too; whole
        # messages are counted in onMessage.
        if self.session is not None and seam.frame_is_partial(self):
            self.session.frame_begun()
        super().onFrameBegin()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        # The messages Autobahn assembles (fragmented, binary, or in a read
        # the fast path left to it).
        if self.session is not None:
            self.session.received(payload, isBinary)


class CollabFactory(WebSocketServerFactory):
    """
    Autobahn's factory with the server's shared objects hung on it (the
    room registry, the bus, the configuration, the clock, the metrics, the
    turn flusher, the connection limiter and the auth objects), and the
    open connections by client id with the two things done to all of them
    at shutdown (L{abort_all}, L{when_empty}).  Messages are handled by each
    connection's L{Session}.
    """

    protocol = CollabProtocol  # type: ignore[assignment]

    def __init__(
        self,
        config: Config,
        registry: RoomRegistry,
        bus: Bus,
        clock: IReactorTime,
        *,
        connections: dict[str, CollabProtocol] | None = None,
        metrics: Metrics | None = None,
        flusher: TurnFlusher | None = None,
        verifier: auth.TokenVerifier | None = None,
        authorizer: auth.ProjectAuthorizer | None = None,
        access: AccessWatch | None = None,
        http_pool: Any = None,
        **kw: Any,
    ) -> None:
        """
        @param connections: the open connections by client id, filled here
            (the metrics given read its size).
        @param flusher: writes the connections' frames once per turn (the
            room registry fans out through it).
        @param verifier: given when a JWT key is configured.
        @param authorizer: given when PROJECT_AUTH_URL is set.
        @param access: re-checks the members' access (with the authorizer).
        @param http_pool: the keep-alive connections to the back end and
            the identity provider, closed on shutdown.
        @param kw: Autobahn's (C{reactor}).
        """
        super().__init__(server="happyrobot", **kw)
        seam.check()
        self.config = config
        self.registry = registry
        self.bus = bus
        self.clock = clock
        self.connections = {} if connections is None else connections
        self.metrics = Metrics(clock) if metrics is None else metrics
        self.flusher = TurnFlusher(clock, self.metrics.turn_flushed) if flusher is None else flusher
        #: What every connection's session shares; at most one warning
        #: every 10 s about clients cut off for flooding.
        self.shared = Shared(
            clock, config, self.metrics, registry, bus, logs.Throttle(10.0, clock),
            verifier, authorizer, self.flusher.time_event, access,
        )
        self.limiter = security.ConnectionLimiter(
            config.max_connections, config.max_connections_per_ip
        )
        self.http_pool = http_pool
        self.started_at = clock.seconds()
        #: Set on shutdown: /health answers 503 and new handshakes are refused.
        self.draining = False
        self._empty_waiters: list[Deferred[None]] = []
        self.setProtocolOptions(
            autoPingInterval=config.ping_interval_seconds,
            autoPingTimeout=config.ping_timeout_seconds,
            maxMessagePayloadSize=config.max_message_bytes,
            maxFramePayloadSize=config.max_message_bytes,
            # Behind WebSocketResource the opening handshake completes inside
            # the HTTP request's render, so Autobahn's own timer for it would
            # never fire; HANDSHAKE_TIMEOUT is enforced by the HTTP site
            # (web.make_site), and one timer per connection is saved.
            openHandshakeTimeout=0,
            closeHandshakeTimeout=5,
            # Tell a misbehaving client why (1007, 1009, ...) instead of
            # dropping the TCP connection silently.
            failByDrop=False,
            webStatus=False,
            # Origins are checked before Autobahn sees the handshake
            # (web.OriginCheckedWebSocket, 403); setProtocolOptions would
            # otherwise switch its own refusal of "Origin: null" on (400),
            # whatever ALLOWED_ORIGINS says.
            allowNullOrigin=True,
            perMessageCompressionAccept=(
                _accept_deflate(config.max_message_bytes) if config.permessage_deflate
                else lambda offers: None
            ),
        )
        #: Compresses each frame once for every connection that agreed to
        #: permessage-deflate (PERMESSAGE_DEFLATE); unused otherwise.
        self.deflate = SharedDeflate()
        # The protocol options, bound once as class attributes of per-factory
        # protocol classes instead of copied onto every connection.
        self.protocol = cast("type[CollabProtocol]", seam.bind_options(self, self.protocol))
        #: ``/echo``'s protocol (conformance mode): the same options, and
        #: built by this factory, so it shares everything with ``/ws``.
        self.echo_protocol = cast(
            "type[CollabProtocol]", seam.bind_options(self, EchoProtocol))

    @property
    def verifier(self) -> auth.TokenVerifier | None:
        """The session-token verifier, when a JWT key is configured."""
        return self.shared.verifier

    @verifier.setter
    def verifier(self, verifier: auth.TokenVerifier | None) -> None:
        self.shared.verifier = verifier

    @property
    def authorizer(self) -> auth.ProjectAuthorizer | None:
        """The project authorizer, when PROJECT_AUTH_URL is set."""
        return self.shared.authorizer

    def echo_endpoint(self) -> Any:
        """What C{WebSocketResource} needs to serve ``/echo`` from this factory."""
        return _EchoProtocols(self)

    def abort_all(self) -> None:
        """Drop every connection still open, without a closing handshake."""
        for proto in list(self.connections.values()):
            proto.dropConnection(abort=True)

    def when_empty(self) -> Deferred[None]:
        """A Deferred that fires once no WebSocket is open."""
        d: Deferred[None] = Deferred()
        self._empty_waiters.append(d)
        self.connection_closed()
        return d

    def connection_closed(self) -> None:
        if not self.connections:
            waiters, self._empty_waiters = self._empty_waiters, []
            for d in waiters:
                d.callback(None)


class EchoProtocol(CollabProtocol):
    """
    ``/echo``, served only in conformance mode (C{CONFORMANCE_ECHO}), for
    the Autobahn|Testsuite (``scripts/conformance``).  Everything is
    L{CollabProtocol}'s (the Origin check and connection limits, the
    protocol options with the size limits, ping and close handling, the
    rate limit and the write path) except that its session is an
    L{EchoSession}, which sends each message back as it came, and that no
    CONNECTION_ESTABLISHED comes first: the suite expects nothing but its
    own messages back.
    """

    session_class = EchoSession

    def _greet(self, now_ms: int) -> None:
        pass


class _EchoProtocols:
    """Builds ``/echo``'s protocols for C{WebSocketResource}, bound to the main factory."""

    def __init__(self, factory: CollabFactory) -> None:
        self._factory = factory

    def buildProtocol(self, addr: Any) -> CollabProtocol:
        proto = self._factory.echo_protocol()
        proto.factory = self._factory
        return proto
