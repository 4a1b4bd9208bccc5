"""
The WebSocket adapter: Autobahn events in, registry and bus calls out.

L{CollabProtocol} holds only its own connection's state (client id, user,
the rooms it joined).  Rooms live in the factory's shared
L{happyrobot.rooms.RoomRegistry}; events leave through the factory's bus.
"""

from __future__ import annotations

import functools
import secrets
import types
from collections import deque
from typing import Any, Mapping, cast

import orjson
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES

from happyrobot import auth, logs, messages, security
from happyrobot.bus import Bus, Replay
from happyrobot.config import Config
from happyrobot.framing import SharedDeflate, binary_frame, split_text_frames, text_frame
from happyrobot.metrics import Metrics
from happyrobot.rooms import RoomRegistry
from happyrobot.writer import SocketWriter, TurnFlusher

log = logs.get_logger(__name__)

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013
OPCODE_CLOSE = 8
OPCODE_PONG = 10
#: Frames a client may send while one of its requests waits on the back end.
MAX_BACKLOG = 64
#: The longest reason for a failed connection that Autobahn's log line quotes.
MAX_LOGGED_REASON = 160


def _unauthorized(failure: Failure) -> None:
    failure.trap(auth.AuthError)
    raise messages.ProtocolError("UNAUTHORIZED", str(failure.value))


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


class CollabProtocol(WebSocketServerProtocol):
    """One browser tab or back-end service connected to ``/ws``."""

    factory: CollabFactory
    client_id: str = ""
    user_id: str | None = None
    initials: str = ""

    # Autobahn's options, bound on the per-factory protocol class.
    maxFramePayloadSize: int
    maxMessagePayloadSize: int
    utf8validateIncoming: bool

    _address: str | None = None
    _identity: auth.Identity | None = None
    _expiry: Any = None
    _busy: Deferred[None] | None = None

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
        # A refused handshake (401 bad token, 426 no upgrade, 400 a broken
        # one) answers in JSON like every other error of the site; Autobahn
        # would send its reason as the status line and no body.
        body = orjson.dumps({"error": reason})
        head = [f"HTTP/1.1 {code} {RESPONSES.get(code, b'Error').decode('ascii')}",
                "Content-Type: application/json",
                f"Content-Length: {len(body)}",
                "Connection: close"]
        head += [f"{name}: {value}" for name, value in responseHeaders or ()]
        self.sendData(("\r\n".join(head) + "\r\n\r\n").encode("latin-1", "replace") + body)

    #: Messages that arrived while a join or SET_USER was waiting (made
    #: when first needed: an empty deque is 0.7 kB per connection).
    _backlog: deque[tuple[bytes, bool]] | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        # Autobahn's queue for its synchronous and chopped writes, which
        # this server never makes (every write after the handshake goes
        # through SocketWriter): an empty tuple instead of a 0.7 kB deque
        # per connection, which would fail loudly if ever appended to.
        self.send_queue = ()  # type: ignore[assignment]

    def _transport(self) -> Any:
        """The TCP transport (set from connectionMade on)."""
        assert self.transport is not None
        return self.transport

    def onOpen(self) -> None:
        try:
            config = self.factory.config
            self._user_info: dict[str, str] = {}
            self.projects: set[str] = set()
            if self._identity is not None:
                self._accept_identity(self._identity)
            now = self.factory.clock.seconds()
            self._bucket = (
                security.TokenBucket(config.rate_limit_per_second, config.rate_limit_burst, now)
                if config.rate_limit_per_second
                else None
            )
            # Outgoing frames: queued per turn, written straight to the
            # socket when possible; what waits in Twisted's buffer is bounded
            # by MAX_BUFFER_BYTES (a reader that stops reading is cut off).
            self._transport().unregisterProducer()  # the HTTP channel we were upgraded from
            transform = None
            if self._perMessageCompress is not None:
                # Each event is compressed once per window size, shared by
                # every recipient with that size.
                bits = self._perMessageCompress.server_max_window_bits
                transform = functools.partial(self.factory.deflate.frame, window_bits=bits)
            self._writer = SocketWriter(
                self.transport, config.max_buffer_bytes, self._drop_slow_reader,
                self.factory.flusher, transform,
            )
            now_ms = int(now * 1000)
            self.client_id = new_client_id(now_ms)
            self.factory.connections[self.client_id] = self
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

    _writer: SocketWriter | None = None

    @property
    def outlet(self) -> SocketWriter:
        """This connection's outgoing side, which rooms hand their frames to."""
        assert self._writer is not None, "joined before the connection opened"
        return self._writer

    def _closed(self) -> bool:
        """No more frames for this connection: not open yet, closing, or closed."""
        return self._writer is None or self._writer.queue is None

    def send(self, frame: bytes) -> None:
        """
        Queue an already framed message; the connection's frames of this
        reactor turn are written together (L{SocketWriter}).  The same
        frame bytes go to every recipient of an event.
        """
        if self._writer is not None:
            self._writer.send(frame)

    def flush(self) -> None:
        """Write the frames queued this turn now."""
        if self._writer is not None:
            self._writer.flush()

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
        self.flush()
        # A pong answers the client's ping: one that pings without reading
        # is a slow reader like any other (closed with 1013 past the bound).
        writer.write(data, bounded=data[0] & 0x0F == OPCODE_PONG)

    def _close(self, code: int, reason: str) -> None:
        """
        Start closing with a protocol close code (Autobahn's sendClose()
        only takes 1000 and 3000-4999).  Frames queued this turn still go
        first; nothing after.  Autobahn drops the connection if the client
        does not answer within the close handshake timeout.
        """
        self.sendCloseFrame(code, reason.encode("utf-8"))

    def sendCloseFrame(
        self, code: int | None = None, reasonUtf8: bytes | None = None, isReply: bool = False
    ) -> None:
        # Every close frame goes through here (ours, Autobahn's replies and
        # failures): the frames queued so far are written before it (see
        # sendData), and no event after it.
        super().sendCloseFrame(code, reasonUtf8, isReply)
        if self.state != WebSocketServerProtocol.STATE_OPEN and self._writer is not None:
            self._writer.close()

    def dropConnection(self, abort: bool = False) -> None:
        if self._writer is not None:
            self._writer.close()
        reason = self.wasNotCleanReason
        if reason is not None and len(reason) > MAX_LOGGED_REASON:
            # Autobahn logs it at warn, and it may quote a whole header
            # that a client chose (a bad Sec-WebSocket-Version, say).
            self.wasNotCleanReason = reason[:MAX_LOGGED_REASON] + "..."
        super().dropConnection(abort)

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
        self._close(CLOSE_TRY_AGAIN_LATER, "Too slow a reader")

    def dataReceived(self, data: bytes) -> None:
        if (
            self.state == WebSocketServerProtocol.STATE_OPEN
            and not self.data  # Autobahn holds no part of a frame or message
            and self.current_frame is None
            and not self.inside_message
        ):
            data = self._text_frames(data)
        if data:
            # Autobahn's frame machine, without its Twisted adapter's
            # dataReceived, which adds only a debug line whose arguments
            # (hltype(), hlval()) it formats on every call, debug or not.
            self._dataReceived(data)
        # Everything this read produced (one event or a burst, for every
        # recipient) is written now rather than on the next reactor turn:
        # still one send() per recipient per read, and no added latency.
        # The events this read appended go to Redis as one batch per room.
        self.factory.bus.flush()
        self.factory.flusher.flush_all()

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
        if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
            self._cancelAutoPingTimeoutCall()  # traffic counts as a pong
        flusher = self.factory.flusher
        # A read that is one event (the usual case below saturation) is
        # written to each recipient as it is handed over; a burst is queued
        # and written once per recipient at the end of the read.
        lone = len(frames) == 1 and used == len(data)
        start = 0
        for payload, end in frames:
            if self.state != WebSocketServerProtocol.STATE_OPEN:
                return data[start:]  # closing: Autobahn reads the rest
            start = end
            if self.utf8validateIncoming:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError as e:
                    # Fail the connection as Autobahn does: close with 1007,
                    # then drop it (RFC 6455 7.1.7: no need to wait for the reply).
                    self._invalid_payload(f"invalid UTF-8 in text message at octet {e.start}")
                    self.dropConnection(abort=False)
                    continue
            flusher.direct = lone
            try:
                self.onMessage(payload, False)
            finally:
                flusher.direct = False
        return data[used:]

    def onFrameBegin(self) -> None:
        # Frames that are not a whole message (pings, pongs, the fragments
        # of a message before its last) cost the rate limit too: a flood of
        # tiny ones would otherwise cost CPU that every other client waits
        # for.  Whole messages are counted in onMessage.
        frame = self.current_frame
        if (self._bucket is not None and frame.opcode != OPCODE_CLOSE
                and (frame.opcode > 7 or not frame.fin)
                and not self._bucket.take(self.factory.clock.seconds())
                and self._bucket.abusive and not self._closed()):
            self._cut_off()
        super().onFrameBegin()

    def _cut_off(self) -> None:
        """
        Close an abusive client with 1008 and stop reading from it at once:
        waiting for its close reply would mean parsing its flood meanwhile
        (for up to the close handshake timeout), at every other client's
        expense.
        """
        n = self.factory.cut_off_log.due()  # a client that reconnects to flood again
        if n:
            log.warn("{client_id} kept sending past its rate limit; closed with 1008 "
                     "({n} such clients since the last such line)", client_id=self.client_id, n=n)
        self._close(CLOSE_POLICY_VIOLATION, "Rate limit exceeded")
        self.wasClean = True  # as we chose: no warning of Autobahn's
        self.dropConnection(abort=False)  # the close frame is written first
        # ... if the client reads it: one that does not is cut off.
        assert self.transport is not None
        self._abort_call = self.factory.clock.callLater(
            self.factory.closeHandshakeTimeout,
            self.transport.abortConnection,  # type: ignore[attr-defined]  # TCP's
        )

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._closed():
            return  # closing: nothing more is answered
        if self._bucket is not None and not self._bucket.take(self.factory.clock.seconds()):
            self._rate_limited()
            return
        if self._busy is not None:
            # A join or SET_USER is waiting on the back end or the identity
            # provider: later frames wait their turn, so they are handled in
            # the order sent.
            if self._backlog is None:
                self._backlog = deque()
            elif len(self._backlog) >= MAX_BACKLOG:
                log.warn("{client_id} sent too much while waiting", client_id=self.client_id)
                self._close(CLOSE_POLICY_VIOLATION, "Too many messages while busy")
                return
            self._backlog.append((payload, isBinary))
            return
        self._handle(payload, isBinary)

    def _handle(self, payload: bytes, isBinary: bool) -> None:
        msg = None
        try:
            if isBinary:
                raise messages.ProtocolError(
                    "BINARY_NOT_SUPPORTED", "Binary frames are not supported; send JSON text"
                )
            msg = messages.parse(payload)
            self.factory.metrics.message_in(msg)
            if logs.debug_enabled():
                log.debug(
                    "{client_id} sent {kind}", client_id=self.client_id, kind=type(msg).__name__
                )
            if isinstance(msg, messages.Relay):
                self._on_relay(msg)
                return
            if isinstance(msg, messages.JoinProject):
                waiting = self._on_join(msg)
            elif isinstance(msg, messages.LeaveProject):
                self._on_leave(msg)
                waiting = None
            else:
                waiting = self._on_set_user(msg)
            if waiting is not None:
                self._busy = waiting
                waiting.addErrback(self._failed, msg.operation_id)
                waiting.addBoth(self._resume)
        except Exception:
            self._failed(Failure(), getattr(msg, "operation_id", None))

    def _failed(self, failure: Failure, operation_id: str | None = None) -> None:
        if failure.check(messages.ProtocolError):
            err = failure.value
            if err.operation_id is None:
                err.operation_id = operation_id  # every ERROR echoes the message's operationId
        else:
            log.failure("{client_id}: error handling a message", failure,
                        client_id=self.client_id)
            err = messages.ProtocolError("INTERNAL_ERROR", "Internal server error", operation_id)
        self.factory.metrics.error(err.code)
        self.send(text_frame(messages.error(err, self._now_ms())))

    def _resume(self, _: object) -> None:
        self._busy = None
        while self._backlog and self._busy is None:
            self._handle(*self._backlog.popleft())

    def _rate_limited(self) -> None:
        if self._bucket is not None and self._bucket.abusive:
            self._cut_off()
            return
        err = messages.ProtocolError("RATE_LIMITED", "Too many messages; slow down")
        self.factory.metrics.error(err.code)
        self.send(text_frame(messages.error(err, self._now_ms())))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._address is not None:
            self.factory.limiter.closed(self._address)
            self._address = None
        if self._writer is not None:
            self._writer.close()
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        if not self.client_id:
            return  # the opening handshake never completed
        if self.factory.connections.pop(self.client_id, None) is None:
            return
        for project_id in list(self.projects):
            self.factory.registry.leave(project_id, self)
        self.projects.clear()
        log.info("{client_id} disconnected ({code})", client_id=self.client_id, code=code)
        self.factory.metrics.closed(code)
        self.factory.connection_closed()

    _abort_call: Any = None

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        super().connectionLost(reason)
        # Undo the two reference cycles of a connection (the writer calls
        # back into us; Autobahn's is_closed holds us as its result), so
        # that reference counting frees a closed connection at once.  Left
        # to the cyclic garbage collector, its objects cost a tenth of the
        # CPU of a connect and close.  (web.py undoes the HTTP request's.)
        self._writer = None
        self.is_closed = succeed(None)

    # ------------------------------------------------------------ handlers

    def _set_user(self, user_id: str, user_info: Mapping[str, str]) -> None:
        if user_id == self.user_id and user_info == self._user_info:
            return
        self.user_id = user_id
        self._user_info = dict(user_info)
        self.initials = messages.initials(user_id, user_info)
        self.factory.registry.member_changed(self.projects)

    def _claim(self, claimed: str | None, user_info: Mapping[str, str]) -> None:
        """Set the user, checked against the verified token when auth is on."""
        if self.factory.verifier is None:
            if claimed is None:
                raise messages.ProtocolError("MISSING_USER_ID", "SET_USER needs a userId")
            self._set_user(claimed, user_info)
            return
        if self._identity is None:
            raise messages.ProtocolError("UNAUTHORIZED", "A valid session token is required")
        if claimed is not None and claimed != self._identity.user_id:
            raise messages.ProtocolError("UNAUTHORIZED", "userId does not match the token")
        self._set_user(self._identity.user_id, user_info)

    def _on_set_user(self, msg: messages.SetUser) -> Deferred[None] | None:
        verifier = self.factory.verifier
        if verifier is None or msg.token is None:
            self._claim(msg.user_id, msg.user_info)
            return None
        d = verifier.verify(msg.token, self.factory.clock.seconds())

        def verified(identity: auth.Identity) -> None:
            self._accept_identity(identity)
            self._claim(msg.user_id, msg.user_info)

        return d.addCallbacks(verified, _unauthorized)

    def _accept_identity(self, identity: auth.Identity) -> None:
        """Remember a verified identity and close with 1008 when it expires."""
        self._identity = identity
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        verifier = self.factory.verifier
        assert verifier is not None
        delay = identity.expires_at + verifier.leeway_seconds - self.factory.clock.seconds()
        self._expiry = self.factory.clock.callLater(max(0.0, delay), self._token_expired)

    def _token_expired(self) -> None:
        self._expiry = None
        log.info("{client_id}: session token expired; closing", client_id=self.client_id)
        self._close(CLOSE_POLICY_VIOLATION, "Session token expired")

    def _on_join(self, msg: messages.JoinProject) -> Deferred[None] | None:
        if msg.user is not None:
            # A userId on JOIN_PROJECT sets the user as SET_USER does; the
            # userInfo already given is kept only if it is the same user.
            same = msg.user.user_id == self.user_id
            self._claim(msg.user.user_id, self._user_info if same else {})
        elif self.user_id is None and self._identity is not None:
            self._set_user(self._identity.user_id, {})  # identified by the URL token
        if self.user_id is None:
            if self.factory.verifier is not None:
                raise messages.ProtocolError("UNAUTHORIZED", "A valid session token is required")
            raise messages.ProtocolError(
                "NOT_IDENTIFIED",
                "Clients must identify themselves (SET_USER or userId) before joining",
            )
        project_id = msg.project_id
        if project_id in self.projects:
            self.factory.registry.join(project_id, self)  # re-announces presence
            return None
        limit = self.factory.config.max_rooms_per_connection
        if limit and len(self.projects) >= limit:
            raise messages.ProtocolError(
                "TOO_MANY_ROOMS", f"A connection may be in at most {limit} rooms"
            )
        authorizer = self.factory.authorizer
        if authorizer is None:
            return self._join(project_id, msg.since)

        def answered(allowed: bool) -> Deferred[None] | None:
            if not allowed:
                raise messages.ProtocolError(
                    "FORBIDDEN", f"Not allowed to join project {project_id}"
                )
            return self._join(project_id, msg.since)

        def unanswered(failure: Failure) -> None:
            raise messages.ProtocolError(
                "AUTH_UNAVAILABLE", "Project authorization is unavailable; try again later"
            )

        return authorizer.allowed(self.user_id, project_id).addCallbacks(answered, unanswered)

    def _join(self, project_id: str, since: int | None = None) -> Deferred[None] | None:
        if self._closed():
            return None  # closed while the back end was answering
        self.projects.add(project_id)
        registry = self.factory.registry
        if since is None:
            registry.join(project_id, self)
            return None
        # Resume: live events wait for us while the missed ones are read
        # and sent; release() then skips what the replay already covered.
        registry.join(project_id, self, hold=True)

        def replayed(replay: Replay) -> None:
            if self._closed() or project_id not in self.projects:
                return
            if replay.events is None:
                self.send(text_frame(
                    messages.resync_required(project_id, replay.seq, self._now_ms())))
            else:
                for event in replay.events:
                    self.send(text_frame(event))
            registry.release(project_id, self, replay.seq)

        def failed(failure: Failure) -> Failure:
            # Without the history we cannot promise "no gap": undo the join
            # and answer with the error (UNAVAILABLE while Redis is down), so
            # the client joins again later.
            if project_id in self.projects:
                self.projects.discard(project_id)
                registry.leave(project_id, self)
            return failure

        return self.factory.bus.replay(project_id, since).addCallbacks(replayed, failed)

    def _on_leave(self, msg: messages.LeaveProject) -> None:
        if msg.project_id in self.projects:
            self.projects.discard(msg.project_id)
            self.factory.registry.leave(msg.project_id, self)

    def _on_relay(self, msg: messages.Relay) -> None:
        if msg.project_id not in self.projects:
            raise messages.ProtocolError(
                "NOT_IN_PROJECT",
                "Join the project before sending events to it",
                msg.operation_id,
            )
        received = self.factory.clock.seconds()
        event = messages.relayed(msg, int(received * 1000), self.client_id, self.user_id)
        project_id, op = msg.project_id, msg.operation_id
        if not msg.ack:
            d = self.factory.bus.append(project_id, event, self.client_id)
            d.addCallback(self.factory.flusher.time_event, received)  # event latency
            d.addErrback(self._failed, op)
            return
        assert op is not None and self.user_id is not None  # parse and join ensure both

        def accepted(seq: int) -> None:
            self.send(text_frame(messages.ack(op, project_id, seq, self._now_ms())))

        d = self.factory.bus.append(project_id, event, self.client_id, (self.user_id, op))
        d.addCallback(self.factory.flusher.time_event, received)  # event latency
        d.addCallbacks(accepted, self._failed, errbackArgs=(op,))

    def _now_ms(self) -> int:
        return int(self.factory.clock.seconds() * 1000)


class CollabFactory(WebSocketServerFactory):
    """
    Autobahn's factory with the server's shared objects hung on it: the
    room registry, the bus, the configuration, the clock and the open
    connections by client id.  No logic lives here.
    """

    protocol = CollabProtocol  # type: ignore[assignment]

    def __init__(
        self, config: Config, registry: RoomRegistry, bus: Bus, clock: IReactorTime, **kw: Any
    ) -> None:
        super().__init__(server="happyrobot", **kw)
        self.config = config
        self.registry = registry
        self.bus = bus
        self.clock = clock
        self.connections: dict[str, CollabProtocol] = {}
        #: Replaced by the wiring (tap.build_factory) with one that also
        #: reads the live connections, rooms and bus when scraped.
        self.metrics = Metrics(clock)
        self.flusher = TurnFlusher(clock, self._turn_flushed)
        #: At most one warning every 10 s about clients cut off for flooding.
        self.cut_off_log = logs.Throttle(10.0, clock)
        self.limiter = security.ConnectionLimiter(
            config.max_connections, config.max_connections_per_ip
        )
        #: Set by the wiring when a JWT key is configured / PROJECT_AUTH_URL is set.
        self.verifier: auth.TokenVerifier | None = None
        self.authorizer: auth.ProjectAuthorizer | None = None
        self.http_pool: Any = None
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
        # Autobahn copies each of its ~40 options from the factory onto
        # every new protocol instance, and pretty-prints the lot for a debug
        # line (a quarter of a handshake's CPU, measured).  Bound once as
        # class attributes of a per-factory protocol class they are shared
        # by every connection and there is nothing to copy or print.
        options: dict[str, Any] = {
            # A plain function as a class attribute would become a method.
            name: staticmethod(value) if isinstance(value, types.FunctionType) else value
            for name in self.protocol.CONFIG_ATTRS
            for value in (getattr(self, name),)
        }
        options["CONFIG_ATTRS"] = ()
        self.protocol = cast(
            "type[CollabProtocol]", type(self.protocol.__name__, (self.protocol,), options)
        )
        #: ``/echo``'s protocol (conformance mode): the same options, and
        #: built by this factory, so it shares everything with ``/ws``.
        self.echo_protocol = cast(
            "type[CollabProtocol]", type(EchoProtocol.__name__, (EchoProtocol,), options)
        )

    def echo_endpoint(self) -> Any:
        """What C{WebSocketResource} needs to serve ``/echo`` from this factory."""
        return _EchoProtocols(self)

    def _turn_flushed(self, frames: int, received: list[float]) -> None:
        self.metrics.turn_flushed(frames, received)

    def close_all(self, code: int = CLOSE_GOING_AWAY, reason: str = "Server shutting down") -> None:
        """Start a clean close of every open WebSocket."""
        # sendClose() only lets applications use 1000 and 3000-4999; the
        # protocol codes (1001 going away, 1008, 1013) go through sendCloseFrame.
        for proto in list(self.connections.values()):
            proto.sendCloseFrame(code, reason.encode("utf-8"))

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
    rate limit and the C{send()} write path) except that each message is
    sent back as it came, text as text and binary as binary, and that no
    CONNECTION_ESTABLISHED comes first: the suite expects nothing but its
    own messages back.
    """

    def _greet(self, now_ms: int) -> None:
        pass

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._bucket is not None and not self._bucket.take(self.factory.clock.seconds()):
            self._rate_limited()
            return
        self.send(binary_frame(payload) if isBinary else text_frame(payload))


class _EchoProtocols:
    """Builds ``/echo``'s protocols for C{WebSocketResource}, bound to the main factory."""

    def __init__(self, factory: CollabFactory) -> None:
        self._factory = factory

    def buildProtocol(self, addr: Any) -> CollabProtocol:
        proto = self._factory.echo_protocol()
        proto.factory = self._factory
        return proto
