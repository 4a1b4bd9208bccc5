"""
Tests for the Redis bus: the envelope and settings as plain code, then two
server instances in this process sharing a real ``redis-server`` (started
and stopped by the helpers; no fake Redis).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from twisted.application.service import IService
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from happyrobot.bus import (
    EVENT,
    LocalBus,
    RedisBus,
    channel_name,
    merge_presence,
    merge_stats,
    pack_envelope,
    unpack_envelope,
)
from happyrobot.config import Config, ConfigError, RedisAddress, load_config, redis_address
from happyrobot.rooms import RoomRegistry
from happyrobot.tap import Options, build_factory, makeService
from happyrobot.web import make_site
from tests.helpers import Client, Node, RedisTestCase, spawn_twistd

#: Events are seen by the tests past any USER_PRESENCE.
_SKIPPED = {"USER_PRESENCE"}


async def next_event(client: Client) -> dict[str, Any]:
    """The next message that is not USER_PRESENCE."""
    while True:
        msg = await client.next()
        if msg.get("type") not in _SKIPPED:
            return msg  # type: ignore[no-any-return]


def event(op: str, project_id: str = "p1") -> dict[str, Any]:
    """A TASK_UPDATE with operation id C{op}."""
    return {"type": "TASK_UPDATE", "projectId": project_id, "payload": {"id": op},
            "operationId": op}


class EnvelopeTests(SynchronousTestCase):
    """The Redis message format."""

    def test_round_trip(self) -> None:
        """An envelope gives back kind, instance, sender and the frame bytes untouched."""
        frame = b"\x81\x05hello\n\x00\xff"
        data = pack_envelope(EVENT, b"host-1-abc", "client_1_aa", frame)
        self.assertEqual(unpack_envelope(data), (EVENT, b"host-1-abc", "client_1_aa", frame))

    def test_no_sender(self) -> None:
        """A server-side publish has no sender."""
        data = pack_envelope(EVENT, b"i", None, b"x")
        self.assertEqual(unpack_envelope(data), (EVENT, b"i", None, b"x"))

    def test_malformed(self) -> None:
        """Bytes that are not an envelope raise ValueError."""
        self.assertRaises(ValueError, unpack_envelope, b"E\nonly")

    def test_channel_name(self) -> None:
        """Each room has its own channel, binary-safe for any project id."""
        self.assertEqual(channel_name("p1"), b"happyrobot:project:p1")
        self.assertEqual(channel_name("\ud800"), b"happyrobot:project:\xed\xa0\x80")


class MergeTests(SynchronousTestCase):
    """Presence and statistics merged over instances, as plain code."""

    def test_presence_in_join_order(self) -> None:
        """Entries from several instances form one list ordered by join time."""
        a = [{"clientId": "c2", "joinedAt": 20}, {"clientId": "c4", "joinedAt": 40}]
        b = [{"clientId": "c3", "joinedAt": 30}, {"clientId": "c1", "joinedAt": 10}]
        self.assertEqual([e["clientId"] for e in merge_presence([a, b])],
                         ["c1", "c2", "c3", "c4"])

    def test_stats(self) -> None:
        """Totals and per-project lists add up over instances, with a per-instance part."""
        body = merge_stats({
            "i1": {"connections": 2, "projects": {"p1": ["a"]}, "startedAt": 1},
            "i2": {"connections": 3, "projects": {"p1": ["b"], "p2": ["c", "d"]}},
        })
        self.assertEqual((body["totalClients"], body["totalProjects"]), (5, 2))
        self.assertEqual(body["projectStats"]["p1"], {"clientCount": 2, "clients": ["a", "b"]})
        self.assertEqual(body["instances"]["i2"], {"clients": 3, "projects": 2,
                                                   "startedAt": None})

    def test_registry_hands_presence_to_publisher(self) -> None:
        """With a presence publisher the registry reports local presence and sends none itself."""
        registry = RoomRegistry(Clock(), encode=lambda b: b)
        calls: list[tuple[str, list[str]]] = []

        class Publisher:
            def presence_changed(self, project_id: str, users: list[dict[str, Any]]) -> None:
                calls.append((project_id, [u["userId"] for u in users]))

        class Member:
            client_id, user_id, initials = "c1", "u1", "U1"

            def __init__(self) -> None:
                self.frames: list[bytes] = []

            def send(self, frame: bytes) -> None:
                self.frames.append(frame)

        registry.presence_publisher = Publisher()
        m = Member()
        registry.join("p1", m)
        self.assertEqual((calls, m.frames), ([("p1", ["u1"])], []))
        registry.send_presence("p1", [{"userId": "u1"}, {"userId": "u9"}])
        self.assertEqual(len(m.frames), 1)
        self.assertIn(b'"userCount":2', m.frames[0])


class RedisSettingTests(SynchronousTestCase):
    """REDIS_URL and the service wiring it selects."""

    def test_url_parsed(self) -> None:
        """Host, port, database and percent-encoded credentials come from the URL."""
        self.assertEqual(redis_address("redis://u:p%40ss@10.0.0.5:6380/3"),
                         RedisAddress("10.0.0.5", 6380, 3, "u", "p@ss"))
        self.assertEqual(redis_address("redis://cache"), RedisAddress("cache"))

    def test_unset_or_empty(self) -> None:
        """Without REDIS_URL, or with it empty, there is no Redis."""
        self.assertIsNone(load_config({}, {}).redis_url)
        self.assertIsNone(load_config({}, {"REDIS_URL": " "}).redis_url)

    def test_flag_wins(self) -> None:
        """--redis-url overrides the environment."""
        config = load_config({"redis-url": "redis://a:1/0"}, {"REDIS_URL": "redis://b:2/0"})
        self.assertEqual(config.redis_url, "redis://a:1/0")

    def test_bad_url(self) -> None:
        """A URL that is not redis://host[:port][/db] is refused naming REDIS_URL."""
        for bad in ("http://h", "redis://", "redis://h:x", "redis://h/x"):
            e = self.assertRaises(ConfigError, load_config, {}, {"REDIS_URL": bad})
            self.assertIn("REDIS_URL", str(e))

    def test_password_not_in_error(self) -> None:
        """The refusal never repeats a password."""
        e = self.assertRaises(ConfigError, load_config, {},
                              {"REDIS_URL": "redis://:secret@h/notanumber"})
        self.assertNotIn("secret", str(e))

    def test_make_service_wires_redis_bus(self) -> None:
        """With REDIS_URL the bus is a RedisBus, a child service told about rooms."""
        options = Options(environ={"REDIS_URL": "redis://127.0.0.1:1/0"})
        options.parseOptions(["--env-file="])
        service = makeService(options, MemoryReactorClock())
        bus = service.factory.bus  # type: ignore[attr-defined]
        self.assertIsInstance(bus, RedisBus)
        self.assertIn(bus, list(IService(service)))
        registry = service.factory.registry  # type: ignore[attr-defined]
        self.assertIs(registry.listener, bus)
        self.assertIs(registry.presence_publisher, bus)
        self.assertFalse(bus.healthy)

    def test_without_redis_local_bus(self) -> None:
        """Without REDIS_URL the bus is the in-memory LocalBus."""
        options = Options(environ={})
        options.parseOptions(["--env-file="])
        service = makeService(options, MemoryReactorClock())
        self.assertIsInstance(service.factory.bus, LocalBus)  # type: ignore[attr-defined]


class FanOutTests(RedisTestCase):
    """Events cross instances through Redis."""

    async def test_relay_reaches_every_other_member_once(self) -> None:
        """An event reaches members on both instances exactly once, never its sender."""
        redis = await self.start_redis()
        a, b = await self.start_node(redis), await self.start_node(redis)
        a1 = await a.joined("p1", "user_a1")
        a2 = await a.joined("p1", "user_a2")
        b1 = await b.joined("p1", "user_b1")
        await a.settled()
        await b.settled()
        a1.send_json(event("op-1"))
        for c in (a2, b1):
            self.assertEqual((await next_event(c))["operationId"], "op-1")
        # Markers in Redis order: anything duplicated or echoed would come first.
        b1.send_json(event("op-2"))
        for c in (a1, a2):
            self.assertEqual((await next_event(c))["operationId"], "op-2")
        a2.send_json(event("op-3"))
        for c in (a1, b1):
            self.assertEqual((await next_event(c))["operationId"], "op-3")

    async def test_room_order_is_the_same_everywhere(self) -> None:
        """Events from senders on two instances arrive in one order at every member."""
        redis = await self.start_redis()
        a, b = await self.start_node(redis), await self.start_node(redis)
        a1 = await a.joined("p1", "user_a1")
        b1 = await b.joined("p1", "user_b1")
        a2 = await a.joined("p1", "user_a2")
        b2 = await b.joined("p1", "user_b2")
        await a.settled()
        await b.settled()
        for i in range(20):
            a1.send_json(event(f"a-{i}"))
            b1.send_json(event(f"b-{i}"))
        seen = []
        for c in (a2, b2):
            seen.append([(await next_event(c))["operationId"] for _ in range(40)])
        self.assertEqual(seen[0], seen[1])
        self.assertEqual([op for op in seen[0] if op.startswith("a-")],
                         [f"a-{i}" for i in range(20)])

    async def test_broadcast_on_one_instance_reaches_another(self) -> None:
        """POST /broadcast on A reaches the room's members on B, userId kept."""
        redis = await self.start_redis()
        a, b = await self.start_node(redis), await self.start_node(redis)
        b1 = await b.joined("p2", "user_b1")
        await b.settled()
        status, body, _ = await a.http(
            "POST", "/broadcast",
            {"type": "PROJECT_DELETE", "projectId": "p2", "userId": "user_x",
             "operationId": "op-del"},
        )
        self.assertEqual((status, body["success"]), (200, True))
        msg = await next_event(b1)
        self.assertEqual((msg["type"], msg["operationId"], msg["userId"]),
                         ("PROJECT_DELETE", "op-del", "user_x"))

    async def test_subscriptions_follow_local_membership(self) -> None:
        """An instance subscribes on its first local join and unsubscribes on its last leave."""
        redis = await self.start_redis()
        a, b = await self.start_node(redis), await self.start_node(redis)

        async def numsub(project_id: str) -> int:
            reply = await redis.command("PUBSUB", "NUMSUB", f"happyrobot:project:{project_id}")
            return int(reply[1])

        async def channels() -> list[str]:
            return sorted(await redis.command("PUBSUB", "CHANNELS", "happyrobot:project:*"))

        self.assertEqual(await channels(), [])
        a1 = await a.joined("p1", "user_a1")
        await a.settled()
        self.assertEqual(await numsub("p1"), 1)
        a2 = await a.joined("p1", "user_a2")
        b1 = await b.joined("p1", "user_b1")
        b1.send_json({"type": "JOIN_PROJECT", "projectId": "p3"})
        await b.round_trip(b1)
        await a.settled()
        await b.settled()
        self.assertEqual(await numsub("p1"), 2)  # one per instance, not per member
        self.assertEqual(await channels(), ["happyrobot:project:p1", "happyrobot:project:p3"])
        a1.send_json({"type": "LEAVE_PROJECT", "projectId": "p1"})
        await a.round_trip(a1)
        await a.settled()
        self.assertEqual(await numsub("p1"), 2)  # a2 is still there
        for c in (a1, a2):
            c.sendClose(1000)
        await a.factory.when_empty()  # a2's close was its last leave of p1
        await a.settled()
        self.assertEqual(await numsub("p1"), 1)
        b1.send_json({"type": "LEAVE_PROJECT", "projectId": "p1"})
        b1.send_json({"type": "LEAVE_PROJECT", "projectId": "p3"})
        await b.round_trip(b1)
        await b.settled()
        self.assertEqual(await channels(), [])


class RedisFaultTests(RedisTestCase):
    """Redis stopped and restarted under running instances."""

    async def test_outage_degrades_then_recovers(self) -> None:
        """
        With Redis stopped /health is 503 degraded and local rooms still
        work; once it is back the rooms are subscribed again and events
        cross instances again, with no duplicates.
        """
        redis = await self.start_redis()
        a, b = await self.start_node(redis), await self.start_node(redis)
        a1 = await a.joined("p1", "user_a1")
        a2 = await a.joined("p1", "user_a2")
        b1 = await b.joined("p1", "user_b1")
        await a.settled()
        await b.settled()

        await redis.stop()
        await a.bus.when(lambda: not a.bus.healthy)
        await b.bus.when(lambda: not b.bus.healthy)
        status, body, _ = await a.http("GET", "/health")
        self.assertEqual((status, body["status"]), (503, "degraded"))
        a1.send_json(event("op-local"))
        self.assertEqual((await next_event(a2))["operationId"], "op-local")

        await redis.start()  # the same port, empty: no subscriptions survive
        await a.settled()
        await b.settled()
        status, body, _ = await a.http("GET", "/health")
        self.assertEqual((status, body["status"]), (200, "healthy"))
        reply = await redis.command("PUBSUB", "NUMSUB", "happyrobot:project:p1")
        self.assertEqual(int(reply[1]), 2)
        a1.send_json(event("op-back"))
        # B never saw op-local (nothing crosses during an outage); A's
        # members see op-back once, after op-local.
        self.assertEqual((await next_event(b1))["operationId"], "op-back")
        self.assertEqual((await next_event(a2))["operationId"], "op-back")
        b1.send_json(event("op-marker"))
        for c in (a1, a2):
            self.assertEqual((await next_event(c))["operationId"], "op-marker")

    async def test_starts_without_redis(self) -> None:
        """An instance whose Redis is not up yet serves local rooms, then connects."""
        redis = await self.start_redis()
        await redis.stop()
        # start_node waits until settled, so build it by hand here.
        factory = build_factory(
            replace(Config(presence_window_seconds=0.0, ping_interval_seconds=0.0),
                    redis_url=redis.url),
            reactor,
        )
        factory.bus.reconnect_initial_delay = 0.05  # type: ignore[attr-defined]
        factory.bus.reconnect_max_delay = 0.25  # type: ignore[attr-defined]
        factory.bus.startService()  # type: ignore[attr-defined]
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            make_site(factory)
        )
        node = Node(factory, port)
        self.addCleanup(self._stop_node, node)
        status, body, _ = await node.http("GET", "/health")
        self.assertEqual((status, body["status"]), (503, "degraded"))
        c1 = await node.joined("p1", "user_1")
        c2 = await node.joined("p1", "user_2")
        c1.send_json(event("op-1"))
        self.assertEqual((await next_event(c2))["operationId"], "op-1")
        await redis.start()
        await node.settled()
        c1.send_json(event("op-2"))
        self.assertEqual((await next_event(c2))["operationId"], "op-2")
        status, body, _ = await node.http("GET", "/health")
        self.assertEqual(status, 200)


async def presence_of(client: Client, expected: set[str]) -> dict[str, Any]:
    """The first USER_PRESENCE to C{client} listing exactly the users C{expected}."""
    while True:
        msg = await client.next_of("USER_PRESENCE")
        users = [u["userId"] for u in msg["payload"]["activeUsers"]]
        if set(users) == expected:
            return msg


class ClusterPresenceTests(RedisTestCase):
    """USER_PRESENCE and /stats over every instance."""

    async def test_presence_lists_members_of_every_instance(self) -> None:
        """Members on both instances see one list with everyone, once each, in join order."""
        redis = await self.start_redis()
        a, b = await self.start_node(redis), await self.start_node(redis)
        a1 = await a.join("p1", "user_a1", firstName="Ann", lastName="Lee")
        b1 = await b.join("p1", "user_b1")
        for c in (a1, b1):
            msg = await presence_of(c, {"user_a1", "user_b1"})
            users = msg["payload"]["activeUsers"]
            self.assertEqual([u["userId"] for u in users], ["user_a1", "user_b1"])
            self.assertEqual(msg["payload"]["userCount"], 2)
            self.assertEqual(users[0]["initials"], "AL")
            self.assertEqual(users[1]["clientId"], b1.client_id)  # type: ignore[attr-defined]
        b1.send_json({"type": "LEAVE_PROJECT", "projectId": "p1"})
        msg = await presence_of(a1, {"user_a1"})
        self.assertEqual(msg["payload"]["userCount"], 1)

    async def test_stopped_instance_leaves_presence(self) -> None:
        """An instance that stops cleanly removes its members from every room at once."""
        redis = await self.start_redis()
        a, b = await self.start_node(redis), await self.start_node(redis)
        a1 = await a.join("p1", "user_a1")
        await b.join("p1", "user_b1")
        await presence_of(a1, {"user_a1", "user_b1"})
        await b.stop()
        await presence_of(a1, {"user_a1"})
        fields = await redis.command("HKEYS", "happyrobot:presence:p1")
        self.assertEqual(fields, [a.bus.instance_id])

    async def test_cluster_stats(self) -> None:
        """/stats on one instance counts the clients and rooms of all of them."""
        redis = await self.start_redis()
        a, b = await self.start_node(redis), await self.start_node(redis)
        a1 = await a.join("p1", "user_a1")
        b1 = await b.join("p1", "user_b1")
        b2 = await b.join("p2", "user_b2")
        await b.connect()  # connected, in no room
        await b.bus.heartbeat()  # B's snapshot as of now
        status, body, _ = await a.http("GET", "/stats")
        self.assertEqual(status, 200)
        self.assertEqual((body["totalClients"], body["totalProjects"]), (4, 2))
        p1 = body["projectStats"]["p1"]
        self.assertEqual(p1["clientCount"], 2)
        self.assertEqual(sorted(p1["clients"]),
                         sorted([a1.client_id, b1.client_id]))  # type: ignore[attr-defined]
        self.assertEqual(body["projectStats"]["p2"]["clients"],
                         [b2.client_id])  # type: ignore[attr-defined]
        self.assertEqual(body["instances"][a.bus.instance_id]["clients"], 1)
        self.assertEqual(body["instances"][b.bus.instance_id]["clients"], 3)
        self.assertEqual(body["instanceId"], a.bus.instance_id)
        self.assertNotIn("partial", body)

    async def test_stats_without_redis_is_partial(self) -> None:
        """While Redis is down /stats answers for this instance alone, marked partial."""
        redis = await self.start_redis()
        a = await self.start_node(redis)
        await a.join("p1", "user_a1")
        await redis.stop()
        await a.bus.when(lambda: not a.bus.healthy)
        status, body, _ = await a.http("GET", "/stats")
        self.assertEqual((status, body["totalClients"], body["partial"]), (200, 1, True))

    async def test_presence_restored_after_redis_restart(self) -> None:
        """After Redis restarts empty every instance registers again, with no duplicates."""
        redis = await self.start_redis()
        a, b = await self.start_node(redis), await self.start_node(redis)
        a1 = await a.join("p1", "user_a1")
        await b.join("p1", "user_b1")
        await presence_of(a1, {"user_a1", "user_b1"})
        await redis.stop()
        await a.bus.when(lambda: not a.bus.healthy)
        await redis.start()
        await a.settled()
        await b.settled()
        await b.join("p1", "user_b2")
        msg = await presence_of(a1, {"user_a1", "user_b1", "user_b2"})
        self.assertEqual(msg["payload"]["userCount"], 3)
        fields = await redis.command("HKEYS", "happyrobot:presence:p1")
        self.assertEqual(sorted(fields), sorted([a.bus.instance_id, b.bus.instance_id]))


class CrashTests(RedisTestCase):
    """A twistd instance killed with SIGKILL, next to one in this process."""

    timeout = 40

    async def test_killed_instance_members_vanish(self) -> None:
        """The members of a SIGKILLed instance leave presence within the heartbeat bound."""
        redis = await self.start_redis()
        a = await self.start_node(redis, instance_ttl_seconds=1.0)
        proc, transport = spawn_twistd(
            ["--port", "tcp:0:interface=127.0.0.1", "--env-file=", "--redis-url", redis.url,
             "--instance-ttl", "1"]
        )
        self.addCleanup(lambda: transport.signalProcess("KILL") if transport.pid else None)
        output = await proc.wait_for(b"starting on ")
        match = re.search(rb"starting on (\d+)", output)
        assert match is not None
        await proc.wait_for(b"Redis link up")
        far = Node(a.factory, a.port)  # reuse the client helpers against the process
        far.port_number = int(match.group(1))
        a1 = await a.join("p1", "user_a1")
        p1 = await far.join("p1", "user_far")
        await presence_of(a1, {"user_a1", "user_far"})

        transport.signalProcess("KILL")
        killed_at = reactor.seconds()
        await proc.ended
        await p1.closed
        msg = await presence_of(a1, {"user_a1"})
        # TTL 1 s, and A checks every third of its own 1 s TTL.
        self.assertLess(reactor.seconds() - killed_at, 3.0)
        self.assertEqual(msg["payload"]["userCount"], 1)
        fields = await redis.command("HKEYS", "happyrobot:presence:p1")
        self.assertEqual(fields, [a.bus.instance_id])
