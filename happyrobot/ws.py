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


from happyrobot import logs, messages
from happyrobot.bus import Bus
from happyrobot.config import Config
from happyrobot.framing import text_frame
from happyrobot.rooms import RoomRegistry

log = logs.get_logger(__name__)

CLOSE_GOING_AWAY = 1001


def new_client_id(now_ms: int) -> str:
    """A unique, unguessable client id in the original server's style."""
    return f"client_{now_ms}_{secrets.token_hex(6)}"


class CollabProtocol(WebSocketServerProtocol):
    """One browser tab or back-end service connected to ``/ws``."""

    factory: CollabFactory
    client_id: str = ""
    user_id: str | None = None
    initials: str = ""

    def onOpen(self) -> None:
        try:
            self._user_info: dict[str, str] = {}
            self.projects: set[str] = set()
            now_ms = self._now_ms()
            self.client_id = new_client_id(now_ms)
            self.factory.connections[self.client_id] = self
            log.info("{client_id} connected", client_id=self.client_id)
            self.send(text_frame(messages.connection_established(self.client_id, now_ms)))
        except Exception:
            log.failure("onOpen failed")
            self.dropConnection(abort=True)

    def send(self, frame: bytes) -> None:
        """
        Write an already framed message.  The same frame bytes go to every
        recipient; writing them directly skips Autobahn's per-call framing
        and debug logging on the fan-out path.
        """
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.transport.write(frame)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
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

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
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
