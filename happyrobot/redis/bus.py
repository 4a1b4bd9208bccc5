"""
L{RedisBus}: the Redis engine of the bus, for a deployment of many
instances, composed of the parts beside it (see L{happyrobot.redis}).
"""

from __future__ import annotations

import random
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from happyrobot import logs, messages
from happyrobot.bus import Replay, Unavailable
from happyrobot.framing import text_frame
from happyrobot.history import OpKey
from happyrobot.operator import Actions
from happyrobot.redis.client import check
from happyrobot.redis.control import RedisOperator
from happyrobot.redis.events import EventStore
from happyrobot.redis.keys import (
    BATCH,
    CHANNEL_PREFIX,
    CONTROL_PREFIX,
    EVENT,
    PRESENCE,
    channel_name,
    new_instance_id,
    unpack_batch,
    unpack_envelope,
)
from happyrobot.redis.presence import Presence
from happyrobot.redis.sentinel import RedisTarget
from happyrobot.redis.sequencer import ReadResult, RoomSequence, Sequencer, Waiting
from happyrobot.rooms import RoomRegistry

log = logs.get_logger(__name__)

#: A room's channel name is this prefix and its project id (inlined on the hot path).
_PREFIX_LENGTH = len(CHANNEL_PREFIX)

#: How long clean-up commands may take when the service stops.
GOODBYE_TIMEOUT_SECONDS = 2.0
#: First and longest wait between reconnection attempts (exponential backoff).
RECONNECT_INITIAL_DELAY_SECONDS = 0.5
RECONNECT_MAX_DELAY_SECONDS = 10.0
#: How long a replay waits for the live events it covers to reach this
#: instance (normally a round trip; longer only while Redis is away).
REPLAY_DELIVERY_TIMEOUT_SECONDS = 10.0


def backoff(initial: float, longest: float, attempt: int) -> float:
    """
    How long to wait before reconnection attempt C{attempt} (from 1):
    doubling from C{initial} up to C{longest}, spread by +-20 % so that a
    fleet's reconnections do not come all at once.
    """
    return min(initial * 2 ** min(attempt - 1, 30), longest) * random.uniform(0.8, 1.2)


class RedisBus(Service):
    """
    Fan-out, presence and statistics through Redis: a L{Bus} and the
    registry's room listener (it calls L{RoomRegistry.listen}).

    Every instance, the sender's included, delivers events from its
    subscriptions, never directly: L{append} numbers, stores and publishes
    through one script (L{EventStore}), and each room's L{RoomSequence}
    delivers them in seq order with no gap and no duplicate (L{Sequencer}).
    The instance subscribes to a room's channel when the room gets its
    first local member and unsubscribes when it loses its last one.
    Presence crosses instances through L{Presence}.

    Faults: while either connection is down the bus is not L{healthy}
    (``/health`` says degraded).  While the command connection is down
    L{append} and L{replay} fail with L{Unavailable} (the client retries;
    a retry of an event sent with ack and the same operationId is not
    delivered twice), and presence is announced to our own members only.
    A Redis that keeps the connections open but stops answering is found
    by the reply timeout, half of C{instance_ttl}.  On reconnection every
    room with local members is subscribed again and caught up, and our
    presence is registered again.

    @param connection_count: how many WebSockets this instance has open (for /stats).
    @param on_read_done: called after each read of the subscription has
        been handled, so what it delivered is written at once, not next turn.
    """

    engine = "redis"

    def __init__(
        self,
        registry: RoomRegistry,
        url: str | RedisTarget,
        reactor: IReactorTime,
        instance_id: str | None = None,
        instance_ttl: float = 10.0,
        reconnect_initial_delay: float = RECONNECT_INITIAL_DELAY_SECONDS,
        reconnect_max_delay: float = RECONNECT_MAX_DELAY_SECONDS,
        history_size: int = 1000,
        history_ttl_seconds: float = 300.0,
        connection_count: Callable[[], int] = lambda: 0,
        on_read_done: Callable[[], None] = lambda: None, actions: Actions | None = None,
    ) -> None:
        check()  # txredisapi has what the client relies on, or one line says what is missing
        self._registry = registry
        self._reactor = reactor
        self.instance_id = instance_id or new_instance_id()
        self._instance = self.instance_id.encode("utf-8")
        self.instance_ttl = instance_ttl
        #: Bounds of each room's history (HISTORY_SIZE, HISTORY_TTL_SECONDS).
        self.history_size = history_size
        self.history_ttl_seconds = history_ttl_seconds
        #: How long Redis may take to answer before the link counts as lost
        #: (by then our own heartbeat key would be at risk anyway).
        self.reply_timeout = instance_ttl / 2
        #: Backoff between reconnection attempts (tests shorten it).
        self.reconnect_delays = (reconnect_initial_delay, reconnect_max_delay)
        target = url if isinstance(url, RedisTarget) else RedisTarget(url)
        self.link = target.link(
            reactor, self.reply_timeout, lambda attempt: backoff(*self.reconnect_delays, attempt),
            self._commands_changed, self._subscriber_changed, self._message, on_read_done,
        )
        self.events = EventStore(self.link, reactor, self._instance, history_size,
                                 max(1, int(history_ttl_seconds * 1000)), target)
        self._waiters = Waiters()
        self._changed = self._waiters.check
        self.rooms = Sequencer(_RoomSteps(self), registry.deliver, self._changed, self._instance,
                               history_size)
        self.presence = Presence(
            self.link, registry, self.rooms, reactor, self.instance_id, instance_ttl,
            history_ttl_seconds, lambda: bool(self.healthy and self.running), connection_count,
        )
        self.operator = RedisOperator(self, actions or Actions(registry), reactor)  # operator API
        self._was_healthy = False
        registry.listen(self)
        #: SUBSCRIBE and UNSUBSCRIBE commands not yet answered.
        self._in_flight = 0
        self._heartbeat: LoopingCall | None = None

    # ------------------------------------------------------------ Bus

    @property
    def healthy(self) -> bool:
        """Whether both Redis connections are up."""
        return self.link.up

    def append(
        self, project_id: str, event: bytes, exclude: str | None = None,
        op_key: OpKey | None = None,
    ) -> Deferred[int]:
        """
        Number C{event} as the room's next event, store it in the room's
        history and publish it; every instance with members in the room
        delivers it from its subscription (this one too, skipping
        C{exclude}).  Fires with the seq (the original one for a retry of a
        kept C{op_key}, which is not published again), or fails with
        L{Unavailable} while Redis is unreachable or when the reply was lost
        with the connection (a retry with the same op key finds the event).
        """
        return self.events.append(project_id, event, exclude, op_key)

    def flush(self) -> None:
        """Send the appends made so far (the end of an incoming read)."""
        self.events.flush()

    def replay(self, project_id: str, since: int) -> Deferred[Replay]:
        """
        The room's events after C{since}, read once this instance has
        subscribed to the room and delivered everything up to then (the
        caller has joined with C{hold=True}, which opened it), so that every
        later event reaches the hold; fires once the live events up to the
        seq read have reached the hold too, so release() drops every one the
        replay covers.  Fails with L{Unavailable} while Redis is unreachable.
        """
        return Deferred.fromCoroutine(self._replay(project_id, since))

    async def _replay(self, project_id: str, since: int) -> Replay:
        message = "The room's history could not be read; join again"
        link, rooms = self.link, self.rooms
        if not link.commands_up:
            raise Unavailable(message)
        room = rooms.room(project_id)
        if room is not None:  # else no local member: no hold to protect
            await self.when(lambda: room.synced or not link.commands_up
                            or rooms.room(project_id) is not room)
            if not link.commands_up:
                raise Unavailable(message)
        try:
            seq, entries, _ = await self.events.read(project_id, since)
        except Exception:
            link.unavailable(Failure(), message).raiseException()
        if room is not None:
            # The events up to seq may still be on their way on the
            # subscriber connection: wait until they have reached the hold,
            # where release() drops them, or they would come twice.
            delivered = self.when(lambda: (room.last or 0) >= seq
                                  or rooms.room(project_id) is not room)
            try:
                await delivered.addTimeout(REPLAY_DELIVERY_TIMEOUT_SECONDS, self._reactor)
            except defer.TimeoutError:
                log.warn("{project_id}: live events up to {seq} were slow to arrive; "
                         "resuming anyway", project_id=project_id, seq=seq)
        return Replay(None if entries is None else entries[::2], seq)

    def member_count(self, project_id: str) -> Deferred[int]:
        """The room's connections across live instances (see L{Presence.member_count})."""
        return Deferred.fromCoroutine(self.presence.member_count(project_id))

    def cluster_stats(self) -> Deferred[dict[str, Any]]:
        """``/stats`` for the whole deployment (see L{Presence.cluster_stats})."""
        return Deferred.fromCoroutine(self.presence.cluster_stats())

    def heartbeat(self) -> Deferred[None]:
        """Beat now (the service beats every third of C{instance_ttl}); never fails."""
        return Deferred.fromCoroutine(self.presence.beat())

    # ------------------------------------------------------------ waiting

    def settled(self) -> bool:
        """Whether the link is up, every (UN)SUBSCRIBE answered and every local room caught up."""
        return self.healthy and self._in_flight == 0 and self.rooms.settled()

    def when(self, condition: Callable[[], bool]) -> Deferred[None]:
        """Fires once C{condition()} holds, checked at every change (C{when(bus.settled)})."""
        return self._waiters.when(condition)

    # ------------------------------------------------------------ RoomListener

    def room_opened(self, project_id: str) -> None:
        """The first local member arrived: read the room's seq, then subscribe."""
        self.rooms.open(project_id)

    def room_closed(self, project_id: str) -> None:
        """
        The last local member left: send what waited for the SUBSCRIBE (the
        other instances' members), withdraw our presence, and unsubscribe.
        """
        room = self.rooms.close(project_id)
        self.presence.room_closed(project_id)
        if room is None:
            return
        if self.healthy and self.running:
            for envelope, _ in room.backlog:
                self.presence.publish(project_id, envelope)
            self.presence.withdraw(project_id)
        d = self.link.unsubscribe(channel_name(project_id))
        if d is not None:
            self._in_flight += 1
            d.addBoth(self._answered)
        self._changed()

    def presence_changed(self, project_id: str, active_users: list[dict[str, Any]]) -> None:
        """Our members changed: tell every instance (only ours while Redis is down)."""
        if not (self.healthy and self.running):
            self._registry.send_presence(project_id, active_users)
            return
        self.presence.register(project_id, active_users)

    # ------------------------------------------------------------ service

    def startService(self) -> None:
        """Start connecting (and reconnecting, with backoff) to Redis, and beating."""
        super().startService()
        self.link.start()
        self._heartbeat = LoopingCall(self.heartbeat)
        self._heartbeat.clock = self._reactor
        self._heartbeat.start(self.instance_ttl / 3, now=False)
        log.info("instance {instance} connecting to Redis at {where}",
                 instance=self.instance_id, where=self.link.where)

    def stopService(self) -> Deferred[Any]:
        """Withdraw this instance, then close both connections and stop reconnecting."""
        super().stopService()
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.healthy:
            goodbye = self.presence.goodbye()
            goodbye.addTimeout(GOODBYE_TIMEOUT_SECONDS, self._reactor)
            try:
                await goodbye
            except Exception:
                log.warn("Redis did not confirm this instance's goodbye; "
                         "its heartbeat key expires instead")
        await self.link.stop()

    # ------------------------------------------------------------ connections

    def _commands_changed(self, up: bool) -> None:
        # The rooms hear of a loss first (none may try to read meanwhile),
        # of a new link last (they read once the link is announced).
        if not up:
            self.rooms.commands_changed(False)
            if self.running:
                log.error("Redis link lost (commands): events are refused (UNAVAILABLE) "
                          "until it is back")
        self._link_changed()
        if up:
            self.rooms.commands_changed(True)

    def _subscriber_changed(self, up: bool) -> None:
        self.rooms.subscriber_changed(up)
        self.operator.subscriber_changed(up)
        if not up and self.running:
            log.error("Redis link lost (subscription): this instance's members get the "
                      "rooms' events again once it is back, the missed ones from the history")
        self._link_changed()

    def _answered(self, _: object = None) -> None:
        self._in_flight -= 1
        self._changed()

    def _link_changed(self) -> None:
        healthy = self.healthy
        if healthy != self._was_healthy:
            self._was_healthy = healthy
            if healthy:
                log.info("Redis link up: {rooms} rooms with local members", rooms=len(self.rooms))
                if self.running:
                    self.link.forget(Deferred.fromCoroutine(self.presence.beat(reregister=True)))
            else:
                # What waited for a SUBSCRIBE will not reach Redis now: local members get it.
                for _, fallback in self.rooms.take_backlogs():
                    fallback()
        self._changed()

    # ------------------------------------------------------------ messages

    def _message(self, channel: bytes, data: bytes) -> None:
        """A message on one of our channels: deliver it to the local members."""
        if channel.startswith(CONTROL_PREFIX):
            return self.operator.received(channel, data)
        try:
            project_id = channel[_PREFIX_LENGTH:].decode("utf-8", "surrogatepass")
            kind, instance, sender, seq, body = unpack_envelope(data)
        except (ValueError, UnicodeDecodeError):
            log.warn("ignored a malformed message on a Redis channel")
            return
        rooms = self.rooms
        room = rooms.room(project_id)
        if room is None:
            return  # the room emptied; the UNSUBSCRIBE is on its way
        if kind == EVENT and seq is not None:
            rooms.live(project_id, room, seq, body, sender if instance == self._instance else None)
        elif kind == BATCH:
            try:
                events = unpack_batch(body)
            except (ValueError, UnicodeDecodeError):
                log.warn("ignored a malformed batch on a Redis channel")
                return
            ours = instance == self._instance
            for sender, seq, json in events:
                rooms.live(project_id, room, seq, json, sender if ours else None)
        elif kind == PRESENCE:
            self.presence.refresh(project_id)


class _RoomSteps:
    """What the L{Sequencer} asks of Redis and of the registry, for L{RedisBus}."""

    def __init__(self, bus: RedisBus) -> None:
        self._bus = bus

    def read(self, project_id: str, room: RoomSequence, since: int | None) -> None:
        rooms = self._bus.rooms

        def done(result: ReadResult | Failure) -> None:
            if isinstance(result, Failure):
                rooms.read_failed(project_id, room, result.getErrorMessage())
            else:
                rooms.read_done(project_id, room, since, result)

        self._bus.events.read(project_id, since, kept=True).addBoth(done)

    def subscribe(self, project_id: str, room: RoomSequence) -> bool:
        bus = self._bus
        epoch = bus.rooms.epoch
        d = bus.link.subscribe(channel_name(project_id))
        if d is None:
            return False  # subscribed again on reconnection
        bus._in_flight += 1

        def answered(result: object) -> None:
            bus._in_flight -= 1
            # A failure means the connection was lost (txredisapi fails the
            # waiting commands before our lost hook runs): the room is
            # subscribed again on reconnection.
            if not isinstance(result, Failure):
                bus.rooms.subscribed(project_id, room, epoch)
            bus._changed()

        d.addBoth(answered)
        return True

    def resync(self, project_id: str, at: int) -> None:
        now_ms = int(self._bus._reactor.seconds() * 1000)
        frame = text_frame(messages.resync_required(project_id, at, now_ms))
        self._bus._registry.deliver(project_id, frame)

    def release(self, project_id: str, waiting: list[Waiting]) -> None:
        bus = self._bus
        for envelope, fallback in waiting:
            if bus.healthy:
                bus.presence.publish(project_id, envelope)
            else:
                fallback()


class Waiters:
    """Deferreds waiting for conditions, checked whenever something may have changed."""

    def __init__(self) -> None:
        self._waiting: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def when(self, condition: Callable[[], bool]) -> Deferred[None]:
        """A Deferred that fires once C{condition()} holds (checked now and by L{check})."""
        d: Deferred[None] = Deferred()
        self._waiting.append((condition, d))
        self.check()
        return d

    def check(self) -> None:
        """Fire the Deferreds whose condition now holds."""
        if not self._waiting:
            return
        waiting, self._waiting = self._waiting, []
        for condition, d in waiting:
            if d.called:
                continue  # timed out or cancelled
            if condition():
                d.callback(None)
            else:
                self._waiting.append((condition, d))
