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
    C{kind \\n instance id \\n sender client id (may be empty) \\n body}.
    Kind C{E} is an event and the body the already framed WebSocket
    message (serialised and framed once, by the publisher); kind C{P}
    (empty body) says the room's presence changed.
  - hash ``happyrobot:presence:<projectId>``: one field per instance with
    local members in the room, its value the JSON list of their
    USER_PRESENCE entries.
  - string ``happyrobot:instance:<instanceId>``, with a TTL of
    ``INSTANCE_TTL`` refreshed by heartbeats every third of it: JSON
    C{{"startedAt", "connections", "projects": {projectId: [clientId]}}}.
    Its expiry is how the others learn that an instance died.
  - set ``happyrobot:instances``: instance ids, for ``/stats``.
"""

from __future__ import annotations

import functools
import os
import random
import secrets
import socket
from typing import Any, Callable, Protocol

import orjson
from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from happyrobot import logs
from happyrobot.config import RedisAddress, redis_address
from happyrobot.rooms import RoomRegistry

log = logs.get_logger(__name__)

CHANNEL_PREFIX = b"happyrobot:project:"
PRESENCE_PREFIX = b"happyrobot:presence:"
INSTANCE_PREFIX = b"happyrobot:instance:"
INSTANCES_KEY = b"happyrobot:instances"
#: Envelope kinds: an event, a presence change.
EVENT = b"E"
PRESENCE = b"P"
#: How long clean-up commands may take when the service stops.
GOODBYE_TIMEOUT_SECONDS = 2.0
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


def presence_key(project_id: str) -> bytes:
    """The Redis hash of one room's members, by instance."""
    return PRESENCE_PREFIX + project_id.encode("utf-8", "surrogatepass")


def instance_key(instance_id: bytes) -> bytes:
    """The Redis key that lives as long as the instance sends heartbeats."""
    return INSTANCE_PREFIX + instance_id


def merge_presence(lists: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The presence entries of every instance as one list, in join order."""
    merged = [entry for entries in lists for entry in entries]
    merged.sort(key=lambda e: (e.get("joinedAt") or 0, str(e.get("clientId"))))
    return merged


def merge_stats(instances: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """
    ``/stats`` for the whole deployment from each instance's snapshot
    (C{{"connections": n, "projects": {projectId: [clientId]}}}).
    """
    projects: dict[str, list[str]] = {}
    for snapshot in instances.values():
        for project_id, clients in snapshot.get("projects", {}).items():
            projects.setdefault(project_id, []).extend(clients)
    return {
        "totalClients": sum(int(s.get("connections", 0)) for s in instances.values()),
        "totalProjects": len(projects),
        "projectStats": {
            pid: {"clientCount": len(ids), "clients": ids} for pid, ids in projects.items()
        },
        "instances": {
            iid: {
                "clients": int(s.get("connections", 0)),
                "projects": len(s.get("projects", {})),
                "startedAt": s.get("startedAt"),
            }
            for iid, s in instances.items()
        },
    }


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
        #: (envelope, local fallback) in publishing order; the fallback
        #: serves the local members if the envelope never reaches Redis.
        self.backlog: list[tuple[bytes, Callable[[], object]]] = []


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
    Fan-out, presence and statistics through Redis for a deployment of
    many instances.

    Two connections, each kept up by a L{ClientService} with exponential
    backoff: one for commands and one in subscriber mode (Redis allows
    nothing but (UN)SUBSCRIBE on it).  The instance subscribes to a room's
    channel when the room gets its first local member and unsubscribes when
    it loses its last one (the registry tells us through L{room_opened} and
    L{room_closed}).

    Ordering: every instance, the sender's included, delivers events from
    its subscription, never directly.  Redis executes PUBLISHes one at a
    time and sends each channel's messages to every subscriber in that
    order, so all members of a room, on any instance, see the room's events
    in one order.  The sending connection is skipped by comparing the
    envelope's (instance id, client id) with our own.  Until Redis has
    confirmed a room's SUBSCRIBE, what we publish for it waits, so that it
    cannot overtake the SUBSCRIBE and miss our own members.

    Presence: each instance keeps its local members of a room in the room's
    presence hash (one field per instance) and publishes a C{P} envelope on
    every change; on a C{P} every instance with local members reads the
    hash, drops the fields of instances whose heartbeat key has expired,
    and sends the merged USER_PRESENCE to its members.  A heartbeat every
    third of C{instance_ttl} refreshes our key; it also checks the other
    instances seen in our rooms, and when one has expired (a crash) removes
    its field and announces the change, so its members disappear within
    about 1.3 C{instance_ttl}.

    Faults: while either connection is down the bus is not L{healthy}
    (``/health`` says degraded); events and presence are delivered straight
    to this instance's own members, so local rooms keep working; nothing
    crosses instances and nothing is replayed later.  On reconnection every
    room with local members is subscribed again (txredisapi keeps no list
    of subscriptions) and our presence is registered again.
    """

    def __init__(
        self,
        registry: RoomRegistry,
        url: str,
        reactor: Any,
        instance_id: str | None = None,
        instance_ttl: float = 10.0,
        reconnect_initial_delay: float = RECONNECT_INITIAL_DELAY_SECONDS,
        reconnect_max_delay: float = RECONNECT_MAX_DELAY_SECONDS,
    ) -> None:
        self._registry = registry
        self._address = redis_address(url)
        self._reactor = reactor
        self.instance_id = instance_id or new_instance_id()
        self._instance = self.instance_id.encode("utf-8")
        self.instance_ttl = instance_ttl
        #: Backoff between reconnection attempts (tests shorten it).
        self.reconnect_initial_delay = reconnect_initial_delay
        self.reconnect_max_delay = reconnect_max_delay
        #: How many WebSockets this instance has open (set by the wiring).
        self.connection_count: Callable[[], int] = lambda: 0
        self._started_at_ms = int(reactor.seconds() * 1000)
        self._services: list[ClientService] = []
        #: The usable connections, None while (re)connecting.
        self._commands: Any = None
        self._subscriber: Any = None
        self._channels: dict[str, _Channel] = {}
        self._was_healthy = False
        #: SUBSCRIBE and UNSUBSCRIBE commands not yet answered.
        self._in_flight = 0
        self._waiters: list[tuple[Callable[[], bool], Deferred[None]]] = []
        #: Rooms whose presence hash may hold our field.
        self._registered: set[str] = set()
        #: Other instances seen in each local room's presence at its last read.
        self._seen: dict[str, set[bytes]] = {}
        #: Rooms whose presence is being read: True when it must be read again.
        self._refreshing: dict[str, bool] = {}
        self._heartbeat: LoopingCall | None = None

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
        self._send(project_id, envelope, lambda: self._registry.deliver(project_id, frame, exclude))

    async def cluster_stats(self) -> dict[str, Any]:
        """
        ``/stats`` for the whole deployment: this instance as it is now,
        the others as of their last heartbeat.  While Redis is unreachable,
        this instance only, with C{"partial": true}.
        """
        instances = {self.instance_id: self._snapshot()}
        partial = not self.healthy
        if not partial:
            try:
                ids = [i for i in await self._command("SMEMBERS", INSTANCES_KEY)
                       if i != self._instance]
                values = await self._command("MGET", *map(instance_key, ids)) if ids else []
                dead = [i for i, v in zip(ids, values) if v is None]
                if dead:
                    self._forget(self._command("SREM", INSTANCES_KEY, *dead))
                for iid, value in zip(ids, values):
                    if value is not None:
                        instances[iid.decode("utf-8", "replace")] = orjson.loads(value)
            except Exception:
                partial = True
                log.failure("reading the other instances' statistics failed")
        body = merge_stats(instances)
        body["instanceId"] = self.instance_id
        if partial:
            body["partial"] = True
        return body

    # ------------------------------------------------------------ waiting

    def settled(self) -> bool:
        """
        Whether the link is up and Redis has answered every SUBSCRIBE and
        UNSUBSCRIBE sent so far: from then on every local room receives
        events published anywhere.
        """
        return (
            self.healthy
            and self._in_flight == 0
            and all(c.confirmed for c in self._channels.values())
        )

    def when(self, condition: Callable[[], bool]) -> Deferred[None]:
        """
        A Deferred that fires once C{condition()} holds, checked after every
        change of the link or of a subscription (for tests and readiness
        checks, e.g. C{bus.when(bus.settled)}).
        """
        d: Deferred[None] = Deferred()
        self._waiters.append((condition, d))
        self._changed()
        return d

    def _changed(self) -> None:
        if not self._waiters:
            return
        waiting, self._waiters = self._waiters, []
        for condition, d in waiting:
            if condition():
                d.callback(None)
            else:
                self._waiters.append((condition, d))

    # ------------------------------------------------------------ RoomListener

    def room_opened(self, project_id: str) -> None:
        """The first local member arrived: subscribe to the room's channel."""
        channel = self._channels[project_id] = _Channel()
        if self._subscriber is not None:
            self._subscribe(project_id, channel)

    def room_closed(self, project_id: str) -> None:
        """
        The last local member left: send what waited for the subscription
        (other instances may still have members), withdraw our presence,
        and unsubscribe.
        """
        channel = self._channels.pop(project_id, None)
        self._seen.pop(project_id, None)
        if channel is None:
            return
        if self.healthy and self.running:
            for envelope, _ in channel.backlog:
                self._publish(project_id, envelope)
            self._withdraw(project_id)
        if self._subscriber is not None:
            try:
                d = self._subscriber.unsubscribe([channel_name(project_id)])
            except Exception:  # lost connection: the subscription went with it
                return
            self._in_flight += 1
            d.addErrback(lambda _: None).addCallback(self._answered)
        self._changed()

    def presence_changed(self, project_id: str, active_users: list[dict[str, Any]]) -> None:
        """
        Our members of C{project_id} changed: store them in the room's
        presence hash and tell every instance to announce the room again.
        While Redis is down only our own members are told, about our own
        members.
        """
        if not (self.healthy and self.running):
            self._registry.send_presence(project_id, active_users)
            return
        self._register(project_id, active_users)

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
        self._heartbeat = LoopingCall(self.heartbeat)
        self._heartbeat.clock = self._reactor
        self._heartbeat.start(self.instance_ttl / 3, now=False)
        log.info(
            "instance {instance} connecting to Redis at {host}:{port}",
            instance=self.instance_id,
            host=self._address.host,
            port=self._address.port,
        )

    def stopService(self) -> Deferred[Any]:
        """
        Withdraw this instance (its presence in every room, its heartbeat
        key), then close both connections and stop reconnecting.
        """
        super().stopService()
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.healthy:
            done = [self._withdraw(pid) for pid in list(self._registered)]
            done.append(self._command("DEL", instance_key(self._instance)))
            done.append(self._command("SREM", INSTANCES_KEY, self._instance))
            goodbye = gatherResults(done, consumeErrors=True)
            goodbye.addTimeout(GOODBYE_TIMEOUT_SECONDS, self._reactor)
            try:
                await goodbye
            except Exception:
                log.warn("Redis did not confirm this instance's goodbye; "
                         "its heartbeat key expires instead")
        services, self._services = self._services, []
        await gatherResults([s.stopService() for s in services], consumeErrors=True)

    def _retry_delay(self, attempt: int) -> float:
        delay = min(
            self.reconnect_initial_delay * 2 ** min(attempt - 1, 30), self.reconnect_max_delay
        )
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

    def _answered(self, _: object = None) -> None:
        self._in_flight -= 1
        self._changed()

    def _link_changed(self) -> None:
        healthy = self.healthy
        if healthy == self._was_healthy:
            self._changed()
            return
        self._was_healthy = healthy
        if healthy:
            log.info("Redis link up: {rooms} rooms with local members", rooms=len(self._channels))
            if self.running:
                self._forget(Deferred.fromCoroutine(self._beat(reregister=True)))
            self._changed()
            return
        if self.running:
            log.error("Redis link lost: serving this instance's own rooms only until it is back")
        # What waited for a SUBSCRIBE will not reach Redis now: local members get it.
        for channel in self._channels.values():
            backlog, channel.backlog = channel.backlog, []
            for _, fallback in backlog:
                fallback()
        self._changed()

    def _subscribe(self, project_id: str, channel: _Channel) -> None:
        proto = self._subscriber

        def answered(result: object) -> None:
            self._in_flight -= 1
            # A failure means the connection was lost (txredisapi fails the
            # waiting commands before our lost hook runs): the room is
            # subscribed again on reconnection.
            if (
                not isinstance(result, Failure)
                and self._channels.get(project_id) is channel
                and self._subscriber is proto
            ):
                channel.confirmed = True
                backlog, channel.backlog = channel.backlog, []
                for envelope, fallback in backlog:
                    if self.healthy:
                        self._publish(project_id, envelope)
                    else:
                        fallback()
            self._changed()

        # One channel per SUBSCRIBE: txredisapi matches one reply per command.
        try:
            d = proto.subscribe([channel_name(project_id)])
        except Exception:  # txredisapi's ConnectionError: subscribed again on reconnection
            return
        self._in_flight += 1
        d.addBoth(answered)

    # ------------------------------------------------------------ commands

    def _command(self, *args: Any) -> Deferred[Any]:
        """Run one command on the command connection (a failed Deferred while down)."""
        if self._commands is None:
            return fail(ConnectionError("Redis link down"))
        try:
            return self._commands.execute_command(*args)  # type: ignore[no-any-return]
        except Exception:
            return fail()

    def _forget(self, d: Deferred[Any]) -> None:
        """Run C{d} for its effect; a lost connection is handled elsewhere."""
        d.addErrback(lambda f: log.debug("a Redis command failed: {f}", f=f.getErrorMessage()))

    def _send(self, project_id: str, envelope: bytes, fallback: Callable[[], object]) -> None:
        """Publish now, or after the room's SUBSCRIBE is confirmed."""
        channel = self._channels.get(project_id)
        if channel is not None and not channel.confirmed:
            channel.backlog.append((envelope, fallback))
        else:
            self._publish(project_id, envelope)

    def _publish(self, project_id: str, envelope: bytes) -> None:
        def lost(f: Failure) -> None:
            log.warn("an event for {project_id} was lost with the Redis connection",
                     project_id=project_id)

        self._command("PUBLISH", channel_name(project_id), envelope).addErrback(lost)

    # ------------------------------------------------------------ presence

    def _register(self, project_id: str, active_users: list[dict[str, Any]]) -> None:
        """Store our members of a room and tell every instance."""
        self._registered.add(project_id)
        self._forget(self._command(
            "HSET", presence_key(project_id), self._instance, orjson.dumps(active_users)
        ))
        envelope = pack_envelope(PRESENCE, self._instance, None, b"")
        self._send(project_id, envelope, lambda: self._registry.send_presence(
            project_id, self._registry.active_users(project_id)))

    def _withdraw(self, project_id: str) -> Deferred[Any]:
        """Remove our field from a room's presence and tell the other instances."""
        self._registered.discard(project_id)
        d = self._command("HDEL", presence_key(project_id), self._instance)
        self._forget(d)  # never fails from here on
        self._publish(project_id, pack_envelope(PRESENCE, self._instance, None, b""))
        return d

    def heartbeat(self) -> Deferred[None]:
        """
        Beat now (the service also beats every third of C{instance_ttl}).
        Never fails: errors are logged, and the loop keeps going.
        """
        return Deferred.fromCoroutine(self._beat())

    async def _beat(self, reregister: bool = False) -> None:
        """
        One heartbeat: refresh our key (registering our presence again if
        it had expired, or with C{reregister}), and drop the members of
        instances whose key expired from our rooms.
        """
        if not (self.healthy and self.running):
            return
        try:
            previous = await self._command(
                "SET", instance_key(self._instance), orjson.dumps(self._snapshot()),
                "PX", int(self.instance_ttl * 1000), "GET",
            )
            self._forget(self._command("SADD", INSTANCES_KEY, self._instance))
            if previous is None or reregister:
                if previous is None and not reregister:
                    log.warn("this instance's heartbeat key had expired: registering again")
                self._reregister()
            await self._reap()
        except Exception:
            if self.healthy:
                log.failure("Redis heartbeat failed")

    def _reregister(self) -> None:
        for project_id in list(self._registered - set(self._channels)):
            self._withdraw(project_id)
        for project_id in list(self._channels):
            self._register(project_id, self._registry.active_users(project_id))

    async def _reap(self) -> None:
        """Remove the presence of instances, seen in our rooms, that stopped beating."""
        others = sorted(set().union(*self._seen.values())) if self._seen else []
        if not others:
            return
        values = await self._command("MGET", *map(instance_key, others))
        dead = {i for i, v in zip(others, values) if v is None}
        if not dead:
            return
        log.info("instances {dead} stopped sending heartbeats: removing their members",
                 dead=",".join(sorted(i.decode("utf-8", "replace") for i in dead)))
        self._forget(self._command("SREM", INSTANCES_KEY, *dead))
        for project_id, seen in list(self._seen.items()):
            gone = seen & dead
            if gone:
                seen -= gone
                self._forget(self._command("HDEL", presence_key(project_id), *gone))
                self._publish(project_id, pack_envelope(PRESENCE, self._instance, None, b""))

    def _refresh(self, project_id: str) -> None:
        """Read a room's presence across instances and announce it locally."""
        if project_id in self._refreshing:
            self._refreshing[project_id] = True  # read again when this read is done
            return
        self._refreshing[project_id] = False
        d = Deferred.fromCoroutine(self._read_presence(project_id))

        def done(entries: list[dict[str, Any]] | None) -> None:
            again = self._refreshing.pop(project_id, False)
            if again:
                self._refresh(project_id)
            elif entries is not None and project_id in self._channels:
                self._registry.send_presence(project_id, entries)

        d.addCallback(done)

    async def _read_presence(self, project_id: str) -> list[dict[str, Any]] | None:
        """
        Every instance's members of a room, in join order; ours from the
        registry, the others' from Redis if their heartbeat key still
        lives.  None when Redis could not be read.
        """
        try:
            flat = await self._command("HGETALL", presence_key(project_id))
            fields = dict(zip(flat[::2], flat[1::2]))
            fields.pop(self._instance, None)
            others = sorted(fields)
            alive = await self._command("MGET", *map(instance_key, others)) if others else []
        except Exception:
            if self.healthy:
                log.failure("reading the presence of {project_id} failed", project_id=project_id)
            return None
        dead = [i for i, v in zip(others, alive) if v is None]
        if dead:
            self._forget(self._command("HDEL", presence_key(project_id), *dead))
        lists = [self._registry.active_users(project_id)]
        for instance, value in zip(others, alive):
            if value is not None:
                try:
                    lists.append(orjson.loads(fields[instance]))
                except orjson.JSONDecodeError:
                    log.warn("ignored malformed presence in {project_id}", project_id=project_id)
        if project_id in self._channels:
            self._seen[project_id] = {i for i, v in zip(others, alive) if v is not None}
        return merge_presence(lists)

    def _snapshot(self) -> dict[str, Any]:
        """This instance for /stats: its connections and its rooms' client ids."""
        return {
            "startedAt": self._started_at_ms,
            "connections": self.connection_count(),
            "projects": self._registry.snapshot(),
        }

    # ------------------------------------------------------------ messages

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
        elif kind == PRESENCE:
            self._refresh(project_id)
