"""
Fan-out of room events.  The rest of the server publishes through a L{Bus}
and never delivers to sockets itself, so one process and many processes
behind a shared broker look the same to it.

L{LocalBus} is the embedded engine, used when no ``REDIS_URL`` is set: it
hands each event straight to this process's room registry.

L{RedisBus} is used when ``REDIS_URL`` is set: every instance of the
deployment publishes its rooms' events to Redis and delivers, from its
subscriptions, the events of the rooms it has local members in.  This
module is the only importer of txredisapi, and it imports it lazily (inside
L{RedisBus.startService}), because importing txredisapi installs the global
reactor.

Redis names (see also the README):

  - channel ``happyrobot:project:<projectId>``: one message per event, an
    envelope of four newline-separated fields,
    C{kind \\n instance id \\n sender client id (may be empty) \\n frame},
    where kind C{E} is an event and C{frame} is the already framed
    WebSocket message (serialised and framed once, by the publisher).
"""

from __future__ import annotations

import functools
import os
import random
import secrets
import socket
from typing import Any, Callable, Protocol

from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from happyrobot import logs
from happyrobot.config import RedisAddress, redis_address
from happyrobot.rooms import RoomRegistry

log = logs.get_logger(__name__)

CHANNEL_PREFIX = b"happyrobot:project:"
#: Envelope kinds.
EVENT = b"E"
#: First and longest wait between reconnection attempts (exponential backoff).
RECONNECT_INITIAL_DELAY_SECONDS = 0.5
RECONNECT_MAX_DELAY_SECONDS = 10.0


class Bus(Protocol):
    """What the WebSocket and HTTP adapters publish through."""

    @property
    def healthy(self) -> bool:
        """Whether events currently reach every instance."""

    def publish(self, project_id: str, frame: bytes, exclude: str | None = None) -> None:
        """Deliver a framed event to every member of C{project_id} but C{exclude}."""


class LocalBus:
    """The in-memory engine: one process, delivery in the same call."""

    healthy = True

    def __init__(self, registry: RoomRegistry) -> None:
        self._registry = registry

    def publish(self, project_id: str, frame: bytes, exclude: str | None = None) -> None:
        self._registry.deliver(project_id, frame, exclude)


# ------------------------------------------------------------------ Redis


def channel_name(project_id: str) -> bytes:
    """The Redis channel of one room (binary-safe for any project id)."""
    return CHANNEL_PREFIX + project_id.encode("utf-8", "surrogatepass")


def pack_envelope(kind: bytes, instance_id: bytes, sender: str | None, body: bytes) -> bytes:
    """One Redis message: kind, publishing instance, sending client, body."""
    return b"\n".join((kind, instance_id, (sender or "").encode("ascii"), body))


def unpack_envelope(data: bytes) -> tuple[bytes, bytes, str | None, bytes]:
    """
    The fields of L{pack_envelope}; the sender is None when empty.

    @raise ValueError: when C{data} is not an envelope.
    """
    kind, instance_id, sender, body = data.split(b"\n", 3)
    return kind, instance_id, sender.decode("ascii") or None, body


def new_instance_id() -> str:
    """A name for this process that is unique in the deployment and readable in /stats."""
    host = "".join(c for c in socket.gethostname()[:64] if c.isprintable() and not c.isspace())
    return f"{host or 'host'}-{os.getpid()}-{secrets.token_hex(3)}"


class _Channel:
    """
    This instance's subscription to one room that has local members.

    Until Redis confirms the SUBSCRIBE, events published for the room wait
    in C{backlog}: publishing them at once could overtake the SUBSCRIBE (the
    two go over different connections) and the room's own local members
    would miss them.
    """

    __slots__ = ("confirmed", "backlog")

    def __init__(self) -> None:
        self.confirmed = False
        #: (envelope, frame, exclude) in publishing order.
        self.backlog: list[tuple[bytes, bytes, str | None]] = []


class _RedisClientFactory(Factory):
    """
    Builds txredisapi protocols for one L{ClientService} and tells the bus
    when a connection becomes usable and when it is lost.
    """

    noisy = False
    #: txredisapi: on a failed AUTH/SELECT, log instead of failing a Deferred.
    isLazy = True

    def __init__(
        self,
        protocol_class: type,
        address: RedisAddress,
        select_db: bool,
        ready: Callable[[Any], None],
        lost: Callable[[Any], None],
    ) -> None:
        self.protocol_class = protocol_class
        self.address = address
        self.select_db = select_db
        self.ready = ready
        self.lost = lost

    def buildProtocol(self, addr: Any) -> Any:
        a = self.address
        proto = self.protocol_class(
            charset=None,  # frames are bytes, not text: no decoding
            convertNumbers=False,
            password=a.password,
            username=a.username,
            dbid=a.db if self.select_db and a.db else None,
        )
        proto.factory = self
        return proto

    def stopTrying(self) -> None:
        """txredisapi calls this when AUTH or SELECT fails; keep retrying with backoff."""

    def connectionError(self, why: str) -> None:
        log.error("Redis refused this server: {why}", why=why)


@functools.cache
def _protocol_classes() -> tuple[type, type]:
    """txredisapi's command and subscriber protocols, hooked to report to the bus."""
    import txredisapi

    def ready_when_connected(proto: Any, d: Deferred[Any]) -> Deferred[Any]:
        # txredisapi's connectionMade authenticates and selects the database
        # before the connection is usable; _ready says whether it got there.
        def report(_: object) -> None:
            if proto._ready:
                try:
                    proto.factory.ready(proto)
                except Exception:
                    log.failure("error setting up a Redis connection")

        return d.addCallback(report)

    class CommandProtocol(txredisapi.RedisProtocol):  # type: ignore[misc]
        def connectionMade(self) -> Deferred[Any]:
            return ready_when_connected(self, super().connectionMade())

        def connectionLost(self, why: Failure) -> None:
            super().connectionLost(why)
            self.factory.lost(self)

    class SubscriberProtocol(txredisapi.SubscriberProtocol):  # type: ignore[misc]
        def connectionMade(self) -> Deferred[Any]:
            return ready_when_connected(self, super().connectionMade())

        def connectionLost(self, why: Failure) -> None:
            super().connectionLost(why)
            self.factory.lost(self)

        def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
            self.factory.message(channel, message)

    return CommandProtocol, SubscriberProtocol


class RedisBus(Service):
    """
    Fan-out through Redis pub/sub for a deployment of many instances.

    Two connections, each kept up by a L{ClientService} with exponential
    backoff: one for commands (PUBLISH) and one in subscriber mode (Redis
    allows nothing but (UN)SUBSCRIBE on it).  The instance subscribes to a
    room's channel when the room gets its first local member and
    unsubscribes when it loses its last one (the registry tells us through
    L{room_opened} and L{room_closed}).

    Ordering: every instance, the sender's included, delivers events from
    its subscription, never directly.  Redis executes PUBLISHes one at a
    time and sends each channel's messages to every subscriber in that
    order, so all members of a room, on any instance, see the room's events
    in one order.  The sending connection is skipped by comparing the
    envelope's (instance id, client id) with our own.

    Faults: while either connection is down the bus is not L{healthy}
    (``/health`` says degraded) and events are delivered straight to this
    instance's own members, so local rooms keep working; nothing crosses
    instances and nothing is replayed later.  On reconnection every room
    with local members is subscribed again (txredisapi keeps no list of
    subscriptions), and events wait for that SUBSCRIBE as for a first one.
    """

    def __init__(
        self,
        registry: RoomRegistry,
        url: str,
        reactor: Any,
        instance_id: str | None = None,
        reconnect_initial_delay: float = RECONNECT_INITIAL_DELAY_SECONDS,
        reconnect_max_delay: float = RECONNECT_MAX_DELAY_SECONDS,
    ) -> None:
        self._registry = registry
        self._address = redis_address(url)
        self._reactor = reactor
        self.instance_id = instance_id or new_instance_id()
        self._instance = self.instance_id.encode("utf-8")
        self._initial_delay = reconnect_initial_delay
        self._max_delay = reconnect_max_delay
        self._services: list[ClientService] = []
        #: The usable connections, None while (re)connecting.
        self._commands: Any = None
        self._subscriber: Any = None
        self._channels: dict[str, _Channel] = {}
        self._was_healthy = False

    # ------------------------------------------------------------ Bus

    @property
    def healthy(self) -> bool:
        """Whether both Redis connections are up."""
        return self._commands is not None and self._subscriber is not None

    def publish(self, project_id: str, frame: bytes, exclude: str | None = None) -> None:
        """
        Send C{frame} to the members of C{project_id} on every instance but
        the connection C{exclude}: through Redis while the link is up, to
        the local members only while it is down.
        """
        if not self.healthy:
            self._registry.deliver(project_id, frame, exclude)
            return
        envelope = pack_envelope(EVENT, self._instance, exclude, frame)
        channel = self._channels.get(project_id)
        if channel is not None and not channel.confirmed:
            channel.backlog.append((envelope, frame, exclude))
        else:
            self._publish(project_id, envelope)

    # ------------------------------------------------------------ RoomListener

    def room_opened(self, project_id: str) -> None:
        """The first local member arrived: subscribe to the room's channel."""
        channel = self._channels[project_id] = _Channel()
        if self._subscriber is not None:
            self._subscribe(project_id, channel)

    def room_closed(self, project_id: str) -> None:
        """The last local member left: unsubscribe (after sending what waited)."""
        channel = self._channels.pop(project_id, None)
        if channel is None:
            return
        if self.healthy:
            # Other instances may still have members; our own has none left.
            for envelope, _, _ in channel.backlog:
                self._publish(project_id, envelope)
        if self._subscriber is not None:
            try:
                d = self._subscriber.unsubscribe([channel_name(project_id)])
            except Exception:  # lost connection: the subscription went with it
                return
            d.addErrback(lambda _: None)

    # ------------------------------------------------------------ service

    def startService(self) -> None:
        """Start connecting (and reconnecting, with backoff) to Redis."""
        super().startService()
        command_class, subscriber_class = _protocol_classes()
        commands = _RedisClientFactory(
            command_class, self._address, True, self._commands_ready, self._commands_lost
        )
        subscriber = _RedisClientFactory(
            subscriber_class, self._address, False, self._subscriber_ready, self._subscriber_lost
        )
        subscriber.message = self._message  # type: ignore[attr-defined]
        for factory in (commands, subscriber):
            endpoint = HostnameEndpoint(self._reactor, self._address.host, self._address.port)
            service = ClientService(
                endpoint, factory, retryPolicy=self._retry_delay, clock=self._reactor
            )
            service.startService()
            self._services.append(service)
        log.info(
            "instance {instance} connecting to Redis at {host}:{port}",
            instance=self.instance_id,
            host=self._address.host,
            port=self._address.port,
        )

    def stopService(self) -> Deferred[Any]:
        """Close both connections and stop reconnecting."""
        super().stopService()
        services, self._services = self._services, []
        return gatherResults([s.stopService() for s in services], consumeErrors=True)

    def _retry_delay(self, attempt: int) -> float:
        delay = min(self._initial_delay * 2 ** min(attempt - 1, 30), self._max_delay)
        return delay * random.uniform(0.8, 1.2)  # spread out a fleet's reconnections

    # ------------------------------------------------------------ connections

    def _commands_ready(self, proto: Any) -> None:
        self._commands = proto
        self._link_changed()

    def _commands_lost(self, proto: Any) -> None:
        if proto is self._commands:
            self._commands = None
            self._link_changed()

    def _subscriber_ready(self, proto: Any) -> None:
        self._subscriber = proto
        for project_id, channel in self._channels.items():
            channel.confirmed = False
            self._subscribe(project_id, channel)
        self._link_changed()

    def _subscriber_lost(self, proto: Any) -> None:
        if proto is self._subscriber:
            self._subscriber = None
            for channel in self._channels.values():
                channel.confirmed = False
            self._link_changed()

    def _link_changed(self) -> None:
        healthy = self.healthy
        if healthy == self._was_healthy:
            return
        self._was_healthy = healthy
        if healthy:
            log.info("Redis link up: {rooms} rooms with local members", rooms=len(self._channels))
            return
        if self.running:
            log.error("Redis link lost: serving this instance's own rooms only until it is back")
        # What waited for a SUBSCRIBE will not reach Redis now: local members get it.
        for project_id, channel in self._channels.items():
            backlog, channel.backlog = channel.backlog, []
            for _, frame, exclude in backlog:
                self._registry.deliver(project_id, frame, exclude)

    def _subscribe(self, project_id: str, channel: _Channel) -> None:
        proto = self._subscriber

        def confirmed(_: object) -> None:
            if self._channels.get(project_id) is not channel or self._subscriber is not proto:
                return  # closed or resubscribed meanwhile
            channel.confirmed = True
            backlog, channel.backlog = channel.backlog, []
            for envelope, frame, exclude in backlog:
                if self.healthy:
                    self._publish(project_id, envelope)
                else:
                    self._registry.deliver(project_id, frame, exclude)

        # One channel per SUBSCRIBE: txredisapi matches one reply per command.
        try:
            d = proto.subscribe([channel_name(project_id)])
        except Exception:  # txredisapi's ConnectionError: resubscribed on reconnection
            return
        d.addCallbacks(confirmed, lambda _: None)  # lost: resubscribed on reconnection

    def _publish(self, project_id: str, envelope: bytes) -> None:
        def lost(f: Failure) -> None:
            log.warn("an event for {project_id} was lost with the Redis connection",
                     project_id=project_id)

        try:
            d = self._commands.publish(channel_name(project_id), envelope)
        except Exception:
            lost(Failure())
        else:
            d.addErrback(lost)

    def _message(self, channel: bytes, data: bytes) -> None:
        """A message on one of our channels: deliver it to the local members."""
        try:
            project_id = channel[len(CHANNEL_PREFIX):].decode("utf-8", "surrogatepass")
            kind, instance, sender, body = unpack_envelope(data)
        except (ValueError, UnicodeDecodeError):
            log.warn("ignored a malformed message on a Redis channel")
            return
        if project_id not in self._channels:
            return  # the room emptied; the UNSUBSCRIBE is on its way
        if kind == EVENT:
            exclude = sender if instance == self._instance else None
            self._registry.deliver(project_id, body, exclude)
