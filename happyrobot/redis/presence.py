"""
Who is in each room across instances, and which instances are alive.

Each instance keeps its local members of a room in the room's presence
hash (one field per instance) and publishes a C{P} envelope on every
change; on a C{P} every instance with local members reads the hash, drops
the fields of instances whose heartbeat key has expired, and sends the
merged USER_PRESENCE to its members.  A heartbeat every third of
C{instance_ttl} refreshes our key; it also checks the other instances seen
in our rooms, and when one has expired (a crash) removes its field and
announces the change, so its members disappear within about 1.3
C{instance_ttl}.  That check and the removal are one script (an instance
registering again in between keeps its field).  A room's presence hash
expires C{history_ttl_seconds} (at least 3 C{instance_ttl}) after the last
instance with members there stopped refreshing it (a crash of the last
one).
"""

from __future__ import annotations

from typing import Any, Callable

import orjson
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from happyrobot import logs, messages
from happyrobot.redis import scripts
from happyrobot.redis.client import RedisLink, is_connection_error
from happyrobot.redis.keys import (
    INSTANCES_KEY,
    PRESENCE,
    channel_name,
    instance_key,
    merge_presence,
    merge_stats,
    pack_envelope,
    presence_key,
    seq_key,
)
from happyrobot.redis.sequencer import Sequencer
from happyrobot.rooms import RoomRegistry

log = logs.get_logger(__name__)


class Presence:
    """
    This instance's part of the deployment's presence: its members in the
    rooms' presence hashes, its heartbeat key, and reading the others'.

    @param active: whether Redis can be used now (both links up and the
        service running).
    @param connection_count: how many WebSockets this instance has open.
    """

    def __init__(
        self,
        link: RedisLink,
        registry: RoomRegistry,
        rooms: Sequencer,
        clock: IReactorTime,
        instance_id: str,
        instance_ttl: float,
        history_ttl_seconds: float,
        active: Callable[[], bool],
        connection_count: Callable[[], int],
    ) -> None:
        self._link = link
        self._registry = registry
        self._rooms = rooms
        self._clock = clock
        self.instance_id = instance_id
        self._instance = instance_id.encode("utf-8")
        self.instance_ttl = instance_ttl
        self.history_ttl_seconds = history_ttl_seconds
        self._active = active
        self._connection_count = connection_count
        self._started_at_ms = int(clock.seconds() * 1000)
        #: Rooms whose presence hash may hold our field.
        self.registered: set[str] = set()
        #: Other instances seen in each local room's presence at its last read.
        self._seen: dict[str, set[bytes]] = {}
        #: Rooms whose presence is being read: True when it must be read again.
        self._refreshing: dict[str, bool] = {}
        #: When the seq and presence keys of our rooms were last kept from expiring.
        self._keys_refreshed_at = 0.0

    def _history_ttl_ms(self) -> int:
        return max(1, int(self.history_ttl_seconds * 1000))

    def _presence_ttl_ms(self) -> int:
        # Refreshed every third of the history TTL, checked at each beat:
        # longer than the longest gap between two refreshes.
        return max(self._history_ttl_ms(), int(3000 * self.instance_ttl))

    # ------------------------------------------------------------ announcing

    def publish(self, project_id: str, envelope: bytes) -> None:
        """PUBLISH an envelope on the room's channel now."""

        def lost(f: Failure) -> None:
            log.warn("an event for {project_id} was lost with the Redis connection",
                     project_id=project_id)

        self._link.command("PUBLISH", channel_name(project_id), envelope).addErrback(lost)

    def _changed_envelope(self) -> bytes:
        return pack_envelope(PRESENCE, self._instance, None, b"")

    def register(self, project_id: str, active_users: list[dict[str, Any]]) -> None:
        """Store our members of a room and tell every instance (after the room's SUBSCRIBE)."""
        self.registered.add(project_id)
        key = presence_key(project_id)
        forget = self._link.forget
        forget(self._link.command("HSET", key, self._instance, messages.dumps(active_users)))
        # Kept alive by every instance with members there (keep_keys), so
        # the hash of a room whose last instance crashed does not stay for ever.
        forget(self._link.command("PEXPIRE", key, self._presence_ttl_ms()))
        envelope = self._changed_envelope()

        def fallback() -> None:
            self._registry.send_presence(project_id, self._registry.active_users(project_id))

        if not self._rooms.hold(project_id, (envelope, fallback)):
            self.publish(project_id, envelope)

    def withdraw(self, project_id: str) -> Deferred[Any]:
        """Remove our field from a room's presence and tell the other instances."""
        self.registered.discard(project_id)
        d = self._link.command("HDEL", presence_key(project_id), self._instance)
        self._link.forget(d)  # never fails from here on
        self.publish(project_id, self._changed_envelope())
        return d

    def room_closed(self, project_id: str) -> None:
        """Forget which instances were seen in a room we left."""
        self._seen.pop(project_id, None)

    def goodbye(self) -> Deferred[Any]:
        """Withdraw from every room and delete our heartbeat key (the service stops)."""
        done = [self.withdraw(pid) for pid in list(self.registered)]
        done.append(self._link.command("DEL", instance_key(self._instance)))
        done.append(self._link.command("SREM", INSTANCES_KEY, self._instance))
        return gatherResults(done, consumeErrors=True)

    # ------------------------------------------------------------ heartbeat

    def refresh_keys_next_beat(self) -> None:
        """Have the next heartbeat keep our rooms' keys from expiring, whenever they were last."""
        self._keys_refreshed_at = float("-inf")

    async def beat(self, reregister: bool = False) -> None:
        """
        One heartbeat: refresh our key (registering our presence again if
        it had expired, or with C{reregister}), and drop the members of
        instances whose key expired from our rooms.  Never fails.
        """
        if not self._active():
            return
        self._link.ping_subscriber()
        try:
            previous = await self._link.command(
                "SET", instance_key(self._instance), messages.dumps(self.snapshot()),
                "PX", int(self.instance_ttl * 1000), "GET",
            )
            self._link.forget(self._link.command("SADD", INSTANCES_KEY, self._instance))
            self._keep_keys()
            if previous is None or reregister:
                if previous is None and not reregister:
                    log.warn("this instance's heartbeat key had expired: registering again")
                self._reregister()
            await self._reap()
        except Exception:
            # A lost or unanswering link (txredisapi's ConnectionError and
            # its TimeoutError) is reported by the bus.
            if self._link.up and not is_connection_error(Failure()):
                log.failure("Redis heartbeat failed")

    def _keep_keys(self) -> None:
        """
        Keep the seq and presence keys of our rooms from expiring (every
        third of the history TTL): a quiet room with members keeps its
        numbering, where a new epoch would send them all RESYNC_REQUIRED,
        and its presence.
        """
        now = self._clock.seconds()
        if now - self._keys_refreshed_at < self.history_ttl_seconds / 3:
            return
        self._keys_refreshed_at = now
        ttl = self._history_ttl_ms()
        for project_id in self._rooms:
            self._link.forget(self._link.command("PEXPIRE", seq_key(project_id), ttl))
        ttl = self._presence_ttl_ms()
        for project_id in list(self.registered):
            self._link.forget(self._link.command("PEXPIRE", presence_key(project_id), ttl))

    def _reregister(self) -> None:
        for project_id in list(self.registered):
            if project_id not in self._rooms:
                self.withdraw(project_id)
        for project_id in self._rooms:
            self.register(project_id, self._registry.active_users(project_id))

    async def _reap(self) -> None:
        """Remove the presence of instances, seen in our rooms, that stopped beating."""
        others = sorted(set().union(*self._seen.values())) if self._seen else []
        if not others:
            return
        values = await self._link.command("MGET", *map(instance_key, others))
        dead = {i for i, v in zip(others, values) if v is None}
        if not dead:
            return
        log.info("instances {dead} stopped sending heartbeats: removing their members",
                 dead=",".join(sorted(i.decode("utf-8", "replace") for i in dead)))
        self._link.forget(self._link.command("SREM", INSTANCES_KEY, *dead))
        for project_id, seen in list(self._seen.items()):
            gone = seen & dead
            if gone:
                seen -= gone
                self._link.forget(self.remove_dead(project_id, sorted(gone)))
                self.publish(project_id, self._changed_envelope())

    def remove_dead(self, project_id: str, instances: list[bytes]) -> Deferred[Any]:
        """
        Remove the fields of C{instances} from a room's presence if their
        heartbeat keys are still gone (one script); fires with how many
        were removed.
        """
        return self._link.eval(
            scripts.REAP, [presence_key(project_id), *map(instance_key, instances)],
            list(instances),
        )

    # ------------------------------------------------------------ reading

    def refresh(self, project_id: str) -> None:
        """Read a room's presence across instances and announce it locally."""
        if project_id in self._refreshing:
            self._refreshing[project_id] = True  # read again when this read is done
            return
        self._refreshing[project_id] = False
        d = Deferred.fromCoroutine(self.read(project_id))

        def done(entries: list[dict[str, Any]] | None) -> None:
            again = self._refreshing.pop(project_id, False)
            if again:
                self.refresh(project_id)
            elif entries is not None and project_id in self._rooms:
                self._registry.send_presence(project_id, entries)

        d.addCallback(done)

    async def read(self, project_id: str) -> list[dict[str, Any]] | None:
        """
        Every instance's members of a room, in join order; ours from the
        registry, the others' from Redis if their heartbeat key still
        lives.  None when Redis could not be read.
        """
        command = self._link.command
        try:
            flat = await command("HGETALL", presence_key(project_id))
            fields = dict(zip(flat[::2], flat[1::2]))
            fields.pop(self._instance, None)
            others = sorted(fields)
            alive = await command("MGET", *map(instance_key, others)) if others else []
        except Exception:
            # A lost connection fails its commands before our lost hook runs.
            if self._link.up and not is_connection_error(Failure()):
                log.failure("reading the presence of {project_id} failed", project_id=project_id)
            return None
        dead = [i for i, v in zip(others, alive) if v is None]
        if dead:
            self._link.forget(self.remove_dead(project_id, dead))
        lists = [self._registry.active_users(project_id)]
        for instance, value in zip(others, alive):
            if value is not None:
                try:
                    lists.append(messages.loads(fields[instance]))
                except orjson.JSONDecodeError:
                    log.warn("ignored malformed presence in {project_id}", project_id=project_id)
        if project_id in self._rooms:
            self._seen[project_id] = {i for i, v in zip(others, alive) if v is not None}
        return merge_presence(lists)

    async def member_count(self, project_id: str) -> int:
        """
        The room's connections on every live instance, from the room's
        presence in Redis (ours as it is now); only this instance's while
        Redis cannot be read.
        """
        entries = await self.read(project_id) if self._link.up else None
        if entries is None:
            return self._registry.member_count(project_id)
        return len(entries)

    def snapshot(self) -> dict[str, Any]:
        """This instance for /stats: its connections and its rooms' client ids."""
        return {
            "startedAt": self._started_at_ms,
            "connections": self._connection_count(),
            "projects": self._registry.snapshot(),
        }

    async def cluster_stats(self) -> dict[str, Any]:
        """
        ``/stats`` for the whole deployment: this instance as it is now,
        the others as of their last heartbeat.  While Redis is unreachable,
        this instance only, with C{"partial": true}.
        """
        instances = {self.instance_id: self.snapshot()}
        partial = not self._link.up
        if not partial:
            command = self._link.command
            try:
                ids = [i for i in await command("SMEMBERS", INSTANCES_KEY)
                       if i != self._instance]
                values = await command("MGET", *map(instance_key, ids)) if ids else []
                dead = [i for i, v in zip(ids, values) if v is None]
                if dead:
                    self._link.forget(command("SREM", INSTANCES_KEY, *dead))
                for iid, value in zip(ids, values):
                    if value is not None:
                        instances[iid.decode("utf-8", "replace")] = messages.loads(value)
            except Exception:
                partial = True
                log.failure("reading the other instances' statistics failed")
        body = merge_stats(instances)
        body["instanceId"] = self.instance_id
        if partial:
            body["partial"] = True
        return body
