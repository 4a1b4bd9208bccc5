"""
The WebSocket adapter: Autobahn events in, registry and bus calls out.

L{CollabProtocol} holds only its own connection's state (client id, user,
the rooms it joined).  Rooms live in the factory's shared
L{happyrobot.rooms.RoomRegistry}; events leave through the factory's bus.
"""

from __future__ import annotations

import secrets
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime


from happyrobot import logs, messages, security
from happyrobot.bus import Bus
from happyrobot.config import Config
from happyrobot.framing import text_frame
from happyrobot.rooms import RoomRegistry

log = logs.get_logger(__name__)

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013


def new_client_id(now_ms: int) -> str:
    """A unique, unguessable client id in the original server's style."""
    return f"client_{now_ms}_{secrets.token_hex(6)}"


class CollabProtocol(WebSocketServerProtocol):
    """One browser tab or back-end service connected to ``/ws``."""

    factory: CollabFactory
    client_id: str = ""
    user_id: str | None = None
    initials: str = ""

    _address: str | None = None

    def onConnect(self, request: Any) -> None:
        # Count the connection against its address; web.py has already
        # refused it (403/429/503) if a limit or the Origin says no.
        try:
            self._address = security.client_address(
                security.peer_host(self.transport.getPeer()),
                (request.headers.get("x-forwarded-for") or "").encode("latin-1") or None,
                self.factory.config.trust_proxy,
            )
            self.factory.limiter.opened(self._address)
        except Exception:
            log.failure("onConnect failed")
            raise

    def onOpen(self) -> None:
        try:
            config = self.factory.config
            self._user_info: dict[str, str] = {}
            self.projects: set[str] = set()
            now = self.factory.clock.seconds()
            self._bucket = (
                security.TokenBucket(config.rate_limit_per_second, config.rate_limit_burst, now)
                if config.rate_limit_per_second
                else None
            )
            # Slow readers: the transport tells us when its buffer is full
            # (pauseProducing) and when it drained (resumeProducing).  What we
            # queue meanwhile is bounded by MAX_BUFFER_BYTES.
            self._paused = False
            self._queued_while_paused = 0
            self.transport.unregisterProducer()  # the HTTP channel we were upgraded from
            self.transport.registerProducer(self, True)
            now_ms = int(now * 1000)
            self.client_id = new_client_id(now_ms)
            self.factory.connections[self.client_id] = self
            log.info("{client_id} connected", client_id=self.client_id)
            self.send(text_frame(messages.connection_established(self.client_id, now_ms)))
        except Exception:
            log.failure("onOpen failed")
            self.dropConnection(abort=True)

    # IPushProducer, for the transport's buffer signals.
    def pauseProducing(self) -> None:
        # Twisted calls this on every write while the buffer stays full;
        # count from the first one.
        if not self._paused:
            self._paused = True
            self._queued_while_paused = 0

    def resumeProducing(self) -> None:
        self._paused = False

    def stopProducing(self) -> None:
        self._paused = True

    def send(self, frame: bytes) -> None:
        """
        Write an already framed message.  The same frame bytes go to every
        recipient; writing them directly skips Autobahn's per-call framing
        and debug logging on the fan-out path.
        """
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            return
        if self._paused:
            self._queued_while_paused += len(frame)
            if self._queued_while_paused > self.factory.config.max_buffer_bytes:
                self._drop_slow_reader()
                return
        self.transport.write(frame)

    def _drop_slow_reader(self) -> None:
        # The close frame would queue behind the data the client is not
        # reading, so say 1013 and abort at once: that frees the buffer now.
        log.warn("{client_id} reads too slowly; closing with 1013", client_id=self.client_id)
        self.close_code_sent = CLOSE_TRY_AGAIN_LATER
        self.sendCloseFrame(CLOSE_TRY_AGAIN_LATER, b"Too slow a reader")
        self.dropConnection(abort=True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            if self._bucket is not None and not self._bucket.take(self.factory.clock.seconds()):
                self._rate_limited()
                return
            if isBinary:
                raise messages.ProtocolError(
                    "BINARY_NOT_SUPPORTED", "Binary frames are not supported; send JSON text"
                )
            msg = messages.parse(payload)
            if logs.debug_enabled():
                log.debug(
                    "{client_id} sent {kind}", client_id=self.client_id, kind=type(msg).__name__
                )
            if isinstance(msg, messages.Relay):
                self._on_relay(msg)
            elif isinstance(msg, messages.JoinProject):
                self._on_join(msg)
            elif isinstance(msg, messages.LeaveProject):
                self._on_leave(msg)
            else:
                self._on_set_user(msg)
        except messages.ProtocolError as e:
            self.send(text_frame(messages.error(e, self._now_ms())))
        except Exception:
            log.failure("{client_id}: error handling a message", client_id=self.client_id)
            err = messages.ProtocolError("INTERNAL_ERROR", "Internal server error")
            self.send(text_frame(messages.error(err, self._now_ms())))

    def _rate_limited(self) -> None:
        if self._bucket is not None and self._bucket.abusive:
            log.warn("{client_id} kept sending past its rate limit; closing with 1008",
                     client_id=self.client_id)
            self.sendCloseFrame(CLOSE_POLICY_VIOLATION, b"Rate limit exceeded")
            return
        err = messages.ProtocolError("RATE_LIMITED", "Too many messages; slow down")
        self.send(text_frame(messages.error(err, self._now_ms())))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._address is not None:
            self.factory.limiter.closed(self._address)
            self._address = None
        if not self.client_id:
            return  # the opening handshake never completed
        if self.factory.connections.pop(self.client_id, None) is None:
            return
        for project_id in list(self.projects):
            self.factory.registry.leave(project_id, self)
        self.projects.clear()
        log.info("{client_id} disconnected ({code})", client_id=self.client_id, code=code)
        self.factory.connection_closed()

    # ------------------------------------------------------------ handlers

    def _on_set_user(self, msg: messages.SetUser, info: bool = True) -> None:
        user_info = msg.user_info if info else self._user_info
        if msg.user_id == self.user_id and user_info == self._user_info:
            return
        self.user_id = msg.user_id
        self._user_info = dict(user_info)
        self.initials = messages.initials(msg.user_id, user_info)
        self.factory.registry.member_changed(self.projects)

    def _on_join(self, msg: messages.JoinProject) -> None:
        if msg.user is not None:
            # A userId on JOIN_PROJECT sets the user as SET_USER does, but
            # keeps the userInfo already given.
            self._on_set_user(msg.user, info=False)
        if self.user_id is None:
            raise messages.ProtocolError(
                "NOT_IDENTIFIED",
                "Clients must identify themselves (SET_USER or userId) before joining",
            )
        limit = self.factory.config.max_rooms_per_connection
        if limit and msg.project_id not in self.projects and len(self.projects) >= limit:
            raise messages.ProtocolError(
                "TOO_MANY_ROOMS", f"A connection may be in at most {limit} rooms"
            )
        self.projects.add(msg.project_id)
        self.factory.registry.join(msg.project_id, self)

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
        frame = text_frame(messages.relayed(msg, self._now_ms()))
        self.factory.bus.publish(msg.project_id, frame, self.client_id)

    def _now_ms(self) -> int:
        return int(self.factory.clock.seconds() * 1000)


class CollabFactory(WebSocketServerFactory):
    """
    Autobahn's factory with the server's shared objects hung on it: the
    room registry, the bus, the configuration, the clock and the open
    connections by client id.  No logic lives here.
    """

    protocol = CollabProtocol

    def __init__(
        self, config: Config, registry: RoomRegistry, bus: Bus, clock: IReactorTime, **kw: Any
    ) -> None:
        super().__init__(server="happyrobot", **kw)
        self.config = config
        self.registry = registry
        self.bus = bus
        self.clock = clock
        self.connections: dict[str, CollabProtocol] = {}
        self.limiter = security.ConnectionLimiter(
            config.max_connections, config.max_connections_per_ip
        )
        self.started_at = clock.seconds()
        #: Set on shutdown: /health answers 503 and new handshakes are refused.
        self.draining = False
        self._empty_waiters: list[Deferred[None]] = []
        self.setProtocolOptions(
            autoPingInterval=config.ping_interval_seconds,
            autoPingTimeout=config.ping_timeout_seconds,
            maxMessagePayloadSize=config.max_message_bytes,
            maxFramePayloadSize=config.max_message_bytes,
            openHandshakeTimeout=config.handshake_timeout_seconds,
            closeHandshakeTimeout=5,
            # Tell a misbehaving client why (1007, 1009, ...) instead of
            # dropping the TCP connection silently.
            failByDrop=False,
            webStatus=False,
            perMessageCompressionAccept=lambda offers: None,
        )

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
