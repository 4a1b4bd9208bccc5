"""
Tests for the Redis bus: its settings and wiring as plain code, then two
server instances in this process sharing a real ``redis-server`` (started
and stopped by the helpers; no fake Redis).  The envelope, the reply
parser and the room sequencer have their own plain-code tests
(test_redis_keys, test_redis_client, test_sequencer).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Callable

from autobahn.twisted.websocket import WebSocketClientFactory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.application.service import IService
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.trial.unittest import SynchronousTestCase

from happyrobot.bus import LocalBus, Unavailable
from happyrobot.config import (
    Config,
    ConfigError,
    RedisAddress,
    load_config,
    redis_address,
)
from happyrobot.framing import text_frame
from happyrobot.redis.bus import RedisBus
from happyrobot.redis.client import ConnectionFactory
from happyrobot.rooms import RoomRegistry
from happyrobot.tap import DrainService, Options, build_factory, makeService
from happyrobot.web import make_site
from tests.helpers import (
    ORIGIN,
    Client,
    Node,
    RedisServer,
    RedisTestCase,
    listening_twistd,
)

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


class UnreachableLogTests(SynchronousTestCase):
    """A lost link fails many requests at once; the log says so in one line."""

    def test_one_line_per_ten_seconds_with_a_count(self) -> None:
        """Failures are logged at most every 10 s, with how many there were."""
        from twisted.logger import LogLevel, capturedLogs
        from twisted.python.failure import Failure

        clock = Clock()
        bus = RedisBus(RoomRegistry(clock, 0.0), "redis://127.0.0.1:1/0", clock)
        lost = Failure(ConnectionError("Not received Redis response in 5.0 seconds"))
        with capturedLogs() as captured:
            for _ in range(300):
                failure = bus.link.unavailable(lost, "m")
                self.assertIsInstance(failure.value, Unavailable)
            clock.advance(9.9)
            bus.link.unavailable(lost, "m")
            clock.advance(0.1)
            bus.link.unavailable(lost, "m")
        warned = [e for e in captured if e["log_level"] == LogLevel.warn]
        self.assertEqual([e["n"] for e in warned], [1, 301])
        self.assertIn("5.0 seconds", warned[0]["why"])

    def test_error_replies_one_line_per_ten_seconds(self) -> None:
        """
        Redis's error replies (a replica's READONLY, NOREPLICAS ...) fail
        requests at their rate too: one error line every 10 s, with how
        many, and no traceback.
        """
        import txredisapi
        from twisted.logger import LogLevel, capturedLogs
        from twisted.python.failure import Failure

        clock = Clock()
        bus = RedisBus(RoomRegistry(clock, 0.0), "redis://127.0.0.1:1/0", clock)
        refused = Failure(txredisapi.ResponseError(
            "READONLY You can't write against a read only replica."))
        with capturedLogs() as captured:
            for _ in range(300):
                failure = bus.link.unavailable(refused, "m")
                self.assertIsInstance(failure.value, Unavailable)
            clock.advance(10)
            bus.link.unavailable(refused, "m")
        errors = [e for e in captured if e["log_level"] == LogLevel.error]
        self.assertEqual([e["n"] for e in errors], [1, 300])
        self.assertTrue(errors[0]["why"].startswith("READONLY"))
        self.assertFalse([e for e in captured if "log_failure" in e])


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
        """
        With REDIS_URL the bus is a RedisBus told about rooms, a child of
        the drain (so it stops after the last connection) with the
        history settings.
        """
        options = Options(environ={"REDIS_URL": "redis://127.0.0.1:1/0",
                                   "HISTORY_SIZE": "50", "HISTORY_TTL_SECONDS": "30"})
        options.parseOptions(["--env-file="])
        service = makeService(options, MemoryReactorClock())
        bus = service.factory.bus  # type: ignore[attr-defined]
        self.assertIsInstance(bus, RedisBus)
        drain = list(IService(service))[0]
        self.assertIsInstance(drain, DrainService)
        self.assertIn(bus, list(drain))
        self.assertEqual((bus.history_size, bus.history_ttl_seconds), (50, 30.0))
        registry = service.factory.registry  # type: ignore[attr-defined]
        self.assertIs(registry.listener, bus)
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
            msg = await next_event(c)
            self.assertEqual(msg["operationId"], "op-1")
            self.assertEqual(msg["sender"], {"clientId": a1.client_id, "userId": "user_a1"})
        # Markers in Redis order: anything duplicated or echoed would come first.
        b1.send_json(event("op-2"))
        for c in (a1, a2):
            self.assertEqual((await next_event(c))["operationId"], "op-2")
        a2.send_json(event("op-3"))
        for c in (a1, b1):
            self.assertEqual((await next_event(c))["operationId"], "op-3")

    async def test_lone_surrogates_cross_instances(self) -> None:
        """
        Strings with a lone surrogate escape (a title or name cut inside an
        emoji, which JavaScript's JSON accepts) cross instances in events,
        acknowledged retries and presence.
        """
        redis = await self.start_redis()
        a, b = await self.start_node(redis), await self.start_node(redis)
        a1 = await a.joined("p1", "user_a1", firstName="Ann\ud83d", lastName="Lee")
        b1 = await b.join("p1", "user_b1")
        await a.settled()
        await b.settled()
        while True:  # b1's presence comes to list a1, read from Redis
            users = (await b1.next_of("USER_PRESENCE"))["payload"]["activeUsers"]
            if "user_a1" in [u["userId"] for u in users]:
                break
        op = "op-\udc00"
        a1.send_json(dict(event(op), ack=True))
        ack = await a1.next_of("ACK")
        self.assertEqual(ack["operationId"], op)
        msg = await next_event(b1)
        self.assertEqual((msg["operationId"], msg["seq"]), (op, ack["seq"]))
        a1.send_json(dict(event(op), ack=True))  # a retry: recognised by its op key
        self.assertEqual((await a1.next_of("ACK"))["seq"], ack["seq"])
        b1.send_json(event("op-marker"))
        self.assertEqual((await next_event(a1))["operationId"], "op-marker")
        status, body, _ = await a.http("GET", "/stats")
        self.assertEqual(status, 200)
        self.assertFalse(body.get("partial", False))

    async def test_delivery_is_written_at_the_end_of_the_read(self) -> None:
        """
        What one read of the subscription delivers is written before the
        reactor turn ends: with a flusher whose own end-of-turn call never
        comes (its clock never moves), events still reach the members.
        """
        redis = await self.start_redis()
        a, b = await self.start_node(redis), await self.start_node(redis)
        a1 = await a.joined("p1", "user_a1")
        b1 = await b.joined("p1", "user_b1")
        await a.settled()
        await b.settled()
        self.patch(b.factory.flusher, "_clock", Clock())
        for i in range(3):
            a1.send_json(event(f"op-{i}"))
            self.assertEqual((await next_event(b1))["operationId"], f"op-{i}")

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
        """POST /broadcast on A reaches the room's members on B, userId kept, all counted."""
        redis = await self.start_redis()
        a, b = await self.start_node(redis), await self.start_node(redis)
        b1 = await b.joined("p2", "user_b1")
        await b.joined("p2", "user_b2")
        await a.joined("p2", "user_a1")
        await a.settled()
        await b.settled()
        status, body, _ = await a.http(
            "POST", "/broadcast",
            {"type": "PROJECT_DELETE", "projectId": "p2", "userId": "user_x",
             "operationId": "op-del"},
        )
        self.assertEqual((status, body["success"]), (200, True))
        # The room's connections on both instances, not only A's one.
        self.assertEqual(body["clientCount"], 3)
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
        With Redis stopped /health is 503 degraded and an event is refused
        with UNAVAILABLE (never delivered unnumbered); once Redis is back
        the rooms are subscribed again, and since it came back empty every
        member is told RESYNC_REQUIRED, then events cross instances again.
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
        a1.send_json(dict(event("op-local"), ack=True))
        err = await a1.next_of("ERROR")
        self.assertEqual((err["code"], err["operationId"]), ("UNAVAILABLE", "op-local"))

        await redis.start()  # the same port, empty: no subscriptions survive
        await a.settled()
        await b.settled()
        status, body, _ = await a.http("GET", "/health")
        self.assertEqual((status, body["status"]), (200, "healthy"))
        reply = await redis.command("PUBSUB", "NUMSUB", "happyrobot:project:p1")
        self.assertEqual(int(reply[1]), 2)
        a1.send_json(event("op-back"))
        for c in (a2, b1):
            resync = await next_event(c)
            self.assertEqual(resync["type"], "RESYNC_REQUIRED")
            back = await next_event(c)
            self.assertEqual((back["operationId"], back["seq"]), ("op-back", resync["seq"] + 1))
        b1.send_json(event("op-marker"))
        for c in (a1, a2):
            msg = await next_event(c)
            if msg["type"] == "RESYNC_REQUIRED":  # a1 sent op-back, so its first is this
                msg = await next_event(c)
            self.assertEqual(msg["operationId"], "op-marker")

    async def test_hung_redis_counts_as_lost(self) -> None:
        """
        A Redis that stops answering but keeps its connections open (here
        SIGSTOP) counts as lost after the reply timeout, half of
        INSTANCE_TTL: the event waiting on it gets UNAVAILABLE and /health
        says degraded, and new connections (which the kernel still accepts)
        are not used until Redis answers a PING.  Once it answers again,
        events flow.
        """
        built: list[Any] = []
        rebuilt: Deferred[None] = Deferred()
        build = ConnectionFactory.buildProtocol

        def counting(factory: Any, addr: Any) -> Any:
            built.append(factory)
            if len(built) == 6 and not rebuilt.called:
                rebuilt.callback(None)
            return build(factory, addr)

        self.patch(ConnectionFactory, "buildProtocol", counting)
        redis = await self.start_redis()
        a = await self.start_node(redis, instance_ttl_seconds=1.0)  # 0.5 s reply timeout
        self.assertEqual((a.bus.reply_timeout, len(built)), (0.5, 2))
        a1 = await a.joined("p1", "user_a1")
        a2 = await a.joined("p1", "user_a2")
        await a.settled()

        redis.pause()
        a1.send_json(dict(event("op-hung"), ack=True))
        err = await a1.next_of("ERROR")
        self.assertEqual((err["code"], err["operationId"]), ("UNAVAILABLE", "op-hung"))
        await a.bus.when(lambda: not a.bus.healthy)
        # Both connections reconnected twice: the kernel accepted them, but
        # no PING was answered, so none was used.
        await rebuilt
        self.assertFalse(a.bus.healthy)
        status, body, _ = await a.http("GET", "/health")
        self.assertEqual((status, body["status"]), (503, "degraded"))

        redis.resume()
        await a.settled()
        status, body, _ = await a.http("GET", "/health")
        self.assertEqual((status, body["status"]), (200, "healthy"))
        a1.send_json(event("op-back"))
        # op-hung may have been stored before Redis froze: then it comes first.
        seen = [await next_event(a2)]
        if seen[0]["operationId"] == "op-hung":
            seen.append(await next_event(a2))
        self.assertEqual(seen[-1]["operationId"], "op-back")

    async def test_ping_refused_connects_again(self) -> None:
        """
        A Redis that answers the PING before use with an error (here NOAUTH;
        LOADING after a restart is the usual one) is connected to again
        after the backoff, until it answers PONG.
        """
        import txredisapi

        redis = await self.start_redis()
        admin = await txredisapi.Connection("127.0.0.1", redis.port, reconnect=False)
        self.addCleanup(admin.disconnect)
        await admin.execute_command("CONFIG", "SET", "requirepass", "pw")
        built: list[Any] = []
        rebuilt: Deferred[None] = Deferred()
        build = ConnectionFactory.buildProtocol

        def counting(factory: Any, addr: Any) -> Any:
            built.append(factory)
            if len(built) == 6:  # refused, dropped and connected again, both links
                rebuilt.callback(None)
            return build(factory, addr)

        self.patch(ConnectionFactory, "buildProtocol", counting)
        registry = RoomRegistry(reactor, 0.0)
        bus = RedisBus(registry, redis.url, reactor, reconnect_initial_delay=0.05,
                       reconnect_max_delay=0.1)
        bus.startService()
        self.addCleanup(bus.stopService)
        await rebuilt
        self.assertFalse(bus.healthy)
        await admin.execute_command("CONFIG", "SET", "requirepass", "")
        await bus.when(bus.settled)
        self.assertTrue(bus.healthy)

    async def test_starts_without_redis(self) -> None:
        """An instance whose Redis is not up yet refuses events (UNAVAILABLE), then connects."""
        redis = await self.start_redis()
        await redis.stop()
        # start_node waits until settled, so build it by hand here.
        factory = build_factory(
            replace(Config(presence_window_seconds=0.0, ping_interval_seconds=0.0),
                    redis_url=redis.url),
            reactor,
        )
        factory.bus.reconnect_delays = (0.05, 0.25)  # type: ignore[attr-defined]
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
        self.assertEqual((await c1.next_of("ERROR"))["code"], "UNAVAILABLE")
        await redis.start()
        await node.settled()
        c1.send_json(event("op-2"))
        msg = await next_event(c2)
        self.assertEqual((msg["operationId"], msg["type"]), ("op-2", "TASK_UPDATE"))
        self.assertEqual(c2.pending(), [])  # op-1 was never delivered
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
        proc, transport, far_port = await listening_twistd(
            self, ["--redis-url", redis.url, "--instance-ttl", "1"])
        await proc.wait_for(b"Redis link up")
        far = Node(a.factory, a.port)  # reuse the client helpers against the process
        far.port_number = far_port
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


    async def test_presence_hash_expires_unless_refreshed(self) -> None:
        """
        A room's presence hash has an expiry, refreshed while an instance
        has members there: if the last instance in a room crashes, its
        field does not stay in Redis for ever.
        """
        redis = await self.start_redis()
        a = await self.start_node(redis, history_ttl_seconds=30.0)
        await a.join("p1", "user_a1")
        await a.settled()
        await a.bus.when(lambda: "p1" in a.bus.presence.registered)
        ttl = await redis.command("PTTL", "happyrobot:presence:p1")
        self.assertTrue(0 < ttl <= 30_000, ttl)
        await redis.command("PERSIST", "happyrobot:presence:p1")
        a.bus.presence.refresh_keys_next_beat()
        await a.bus.heartbeat()
        ttl = await redis.command("PTTL", "happyrobot:presence:p1")
        self.assertTrue(0 < ttl <= 30_000, ttl)

    async def test_dead_field_removed_only_while_dead(self) -> None:
        """
        Removing a dead instance's presence field checks its heartbeat key
        in the same step: an instance that came back keeps its field.
        """
        redis = await self.start_redis()
        a = await self.start_node(redis)
        await redis.command("SET", "happyrobot:instance:ghost", "{}", "PX", 60_000)
        await redis.command("HSET", "happyrobot:presence:p1", "ghost", "[]")
        self.assertEqual(await a.bus.presence.remove_dead("p1", [b"ghost"]), 0)
        self.assertEqual(await redis.command("HKEYS", "happyrobot:presence:p1"), ["ghost"])
        await redis.command("DEL", "happyrobot:instance:ghost")
        self.assertEqual(await a.bus.presence.remove_dead("p1", [b"ghost"]), 1)
        self.assertEqual(await redis.command("HKEYS", "happyrobot:presence:p1"), [])


# ---------------------------------------------------------------- v2: seq, history, resume


class Recorder:
    """A registry member that keeps the events it is sent, decoded."""

    def __init__(self, client_id: str, user_id: str = "u") -> None:
        self.client_id = client_id
        self.user_id = user_id
        self.initials = "U"
        self.frames: DeferredQueue[dict[str, Any]] = DeferredQueue()
        self.received: list[dict[str, Any]] = []
        self.writer = self

    def send(self, frame: bytes) -> None:
        msg = json.loads(_unframe(frame))
        if msg.get("type") != "USER_PRESENCE":
            self.received.append(msg)
            # Not from inside the registry's loop over its members: a
            # waiting test could change the room while it is iterated.
            reactor.callLater(0, self.frames.put, msg)

    def seqs(self) -> list[int]:
        """The seq of every event received, in order (RESYNC_REQUIRED as -seq)."""
        return [m["seq"] if m["type"] != "RESYNC_REQUIRED" else -m["seq"]
                for m in self.received]

    async def until(self, seq: int) -> None:
        """Wait until an event numbered C{seq} or higher (or a RESYNC) has arrived."""
        while True:
            msg = await self.frames.get()
            if msg.get("seq", 0) >= seq:
                return


def _unframe(frame: bytes) -> bytes:
    """The payload of one unmasked text frame made by L{text_frame}."""
    n = frame[1]
    if n < 126:
        return frame[2:]
    return frame[4:] if n == 126 else frame[10:]


def raw_event(op: str) -> bytes:
    """A serialised event without seq, as ws.py hands it to the bus."""
    return b'{"type":"TASK_UPDATE","projectId":"p1","operationId":"%s"}' % op.encode()


class BusNode:
    """A RedisBus with its own registry, for tests below the WebSocket layer."""

    def __init__(self, registry: RoomRegistry, bus: RedisBus) -> None:
        self.registry = registry
        self.bus = bus

    def settled(self) -> Deferred[None]:
        return self.bus.when(self.bus.settled)

    async def member(self, client_id: str, project_id: str = "p1") -> Recorder:
        """A member that joined C{project_id}, once the room is subscribed and caught up."""
        m = Recorder(client_id)
        self.registry.join(project_id, m)
        await self.settled()
        return m

    async def resume(self, client_id: str, since: int, project_id: str = "p1") -> Recorder:
        """A member resuming as ws.py does: join with hold, replay, release."""
        m = Recorder(client_id)
        self.registry.join(project_id, m, hold=True)
        replay = await self.bus.replay(project_id, since)
        if replay.events is None:
            m.send(text_frame(b'{"type":"RESYNC_REQUIRED","seq":%d}' % replay.seq))
        else:
            for e in replay.events:
                m.send(text_frame(e))
        self.registry.release(project_id, m, replay.seq)
        return m


class BusTestCase(RedisTestCase):
    """Two RedisBus instances on one real redis-server."""

    async def start_bus(self, redis: RedisServer, **kw: Any) -> BusNode:
        registry = RoomRegistry(reactor, 0.0)
        bus = RedisBus(registry, redis.url, reactor, reconnect_initial_delay=0.05,
                       reconnect_max_delay=0.25, **kw)
        bus.startService()
        self.addCleanup(bus.stopService)
        await bus.when(bus.settled)
        return BusNode(registry, bus)


def contiguous(seqs: list[int]) -> bool:
    return all(b == a + 1 for a, b in zip(seqs, seqs[1:]))


class SequenceTests(BusTestCase):
    """Room sequence numbers across instances (issue 5, items 1 and 4)."""

    async def test_seq_grows_by_one_across_instances(self) -> None:
        """Appends on two instances get consecutive numbers from one counter."""
        redis = await self.start_redis()
        a, b = await self.start_bus(redis), await self.start_bus(redis)
        seqs = []
        for i in range(6):
            node = (a, b)[i % 2]
            seqs.append(await node.bus.append("p1", raw_event(f"op-{i}")))
        self.assertTrue(contiguous(seqs), seqs)
        # A new room's first number is the Redis time in ms: a new epoch
        # after a data loss starts above anything given out before.
        now_ms = int(float((await redis.command("TIME"))[0]) * 1000)
        self.assertLess(abs(seqs[0] - now_ms), 60_000)
        stored = await redis.command("XRANGE", "happyrobot:history:p1", "-", "+")
        self.assertEqual([int(i.split("-")[0]) for i, _ in stored], seqs)
        self.assertEqual(int(await redis.command("GET", "happyrobot:seq:p1")), seqs[-1])

    async def test_interleaved_publishers_one_order(self) -> None:
        """Two instances publishing at once: every member gets one gap-free seq order."""
        redis = await self.start_redis()
        a, b = await self.start_bus(redis), await self.start_bus(redis)
        members = [await a.member("a1"), await a.member("a2"), await b.member("b1")]
        appended = []
        for i in range(25):
            appended.append(a.bus.append("p1", raw_event(f"a-{i}")))
            appended.append(b.bus.append("p1", raw_event(f"b-{i}")))
        seqs = await gatherResults(appended)
        self.assertEqual(sorted(seqs), list(range(min(seqs), min(seqs) + 50)))
        for m in members:
            await m.until(max(seqs))
            self.assertEqual(m.seqs(), sorted(seqs))
            ops = [e["operationId"] for e in m.received]
            self.assertEqual([o for o in ops if o.startswith("a-")],
                             [f"a-{i}" for i in range(25)])

    async def test_sender_skipped(self) -> None:
        """The sending connection does not get its own event back; its neighbours do."""
        redis = await self.start_redis()
        a = await self.start_bus(redis)
        a1, a2 = await a.member("a1"), await a.member("a2")
        seq = await a.bus.append("p1", raw_event("x"), exclude="a1")
        marker = await a.bus.append("p1", raw_event("marker"))
        await a2.until(marker)
        await a1.until(marker)
        self.assertEqual(a2.seqs(), [seq, marker])
        self.assertEqual(a1.seqs(), [marker])

    async def test_ack_dedupe_across_instances(self) -> None:
        """A retry with the same op key on another instance gets the original seq, delivered once."""
        redis = await self.start_redis()
        a, b = await self.start_bus(redis), await self.start_bus(redis)
        watcher = await b.member("b1")
        first = await a.bus.append("p1", raw_event("op-1"), "a9", ("user-1", "op-1"))
        again = await b.bus.append("p1", raw_event("op-1"), "b9", ("user-1", "op-1"))
        other_user = await b.bus.append("p1", raw_event("op-1"), "b9", ("user-2", "op-1"))
        self.assertEqual(again, first)
        self.assertEqual(other_user, first + 1)
        await watcher.until(other_user)
        self.assertEqual(watcher.seqs(), [first, other_user])

    async def test_script_loaded_again_after_flush(self) -> None:
        """After SCRIPT FLUSH (as after a Redis restart) the next append loads the script again."""
        redis = await self.start_redis()
        a = await self.start_bus(redis)
        first = await a.bus.append("p1", raw_event("1"))
        await redis.command("SCRIPT", "FLUSH")
        self.assertEqual(await a.bus.append("p1", raw_event("2")), first + 1)
        self.assertEqual((await a.bus.replay("p1", first)).seq, first + 1)


class BatchTests(BusTestCase):
    """Appends of one room in one reactor turn: one script call, one envelope."""

    def count_evals(self, node: BusNode) -> list[bytes]:
        calls: list[bytes] = []
        original = node.bus.link.eval

        def counting(script: Any, keys: Any, args: Any) -> Any:
            calls.append(script.sha)
            return original(script, keys, args)

        self.patch(node.bus.link, "eval", counting)
        return calls

    async def test_one_turn_one_script_call(self) -> None:
        """
        Events appended in one turn are numbered consecutively by one call;
        each caller gets its own seq, each member gets every event but its
        own, in order, on both instances; the history holds each with its
        sender.
        """
        redis = await self.start_redis()
        a, b = await self.start_bus(redis), await self.start_bus(redis)
        a1, a2, b1 = await a.member("a1"), await a.member("a2"), await b.member("b1")
        calls = self.count_evals(a)
        senders = ["a1", None, "a2", "a1", None, "a2"]
        ds = [a.bus.append("p1", raw_event(f"op-{i}"), s) for i, s in enumerate(senders)]
        seqs = await gatherResults(ds)
        self.assertEqual(len(calls), 1)
        self.assertTrue(contiguous(seqs), seqs)
        for m in (a1, a2, b1):
            await m.until(seqs[-1] if m is not a2 else seqs[-2])
        self.assertEqual(a1.seqs(), [q for q, s in zip(seqs, senders) if s != "a1"])
        self.assertEqual(a2.seqs(), [q for q, s in zip(seqs, senders) if s != "a2"])
        self.assertEqual(b1.seqs(), seqs)
        self.assertEqual([e["operationId"] for e in b1.received], [f"op-{i}" for i in range(6)])
        stored = await redis.command("XRANGE", "happyrobot:history:p1", "-", "+")
        self.assertEqual([int(i.split("-")[0]) for i, _ in stored], seqs)
        self.assertEqual(int(await redis.command("GET", "happyrobot:seq:p1")), seqs[-1])
        # A resume on the other instance sees the batch as single events, sender skipped.
        late = await b.resume("b2", seqs[0] - 1)
        await late.until(seqs[-1])
        self.assertEqual(late.seqs(), seqs)

    async def test_retries_within_and_across_batches(self) -> None:
        """
        A retry of an event in the history, or of one earlier in the same
        batch, gets the original seq and is not delivered again.
        """
        redis = await self.start_redis()
        a, b = await self.start_bus(redis), await self.start_bus(redis)
        watcher = await b.member("b1")
        first = await a.bus.append("p1", raw_event("op-0"), "a9", ("u", "op-0"))
        ds = [
            a.bus.append("p1", raw_event("op-1"), "a9", ("u", "op-1")),
            a.bus.append("p1", raw_event("op-0"), "a9", ("u", "op-0")),  # in the history
            a.bus.append("p1", raw_event("op-1"), "a9", ("u", "op-1")),  # in this batch
            a.bus.append("p1", raw_event("op-2"), "a9", ("v", "op-1")),  # another user's
            a.bus.append("p1", raw_event("op-3"), "a9"),
        ]
        seqs = await gatherResults(ds)
        self.assertEqual(seqs, [first + 1, first, first + 1, first + 2, first + 3])
        await watcher.until(first + 3)
        self.assertEqual(watcher.seqs(), [first, first + 1, first + 2, first + 3])
        # Nothing but duplicates: answered, nothing published or numbered.
        again = await gatherResults([
            a.bus.append("p1", raw_event("op-1"), "a9", ("u", "op-1")),
            a.bus.append("p1", raw_event("op-2"), "a9", ("v", "op-1")),
        ])
        self.assertEqual(again, [first + 1, first + 2])
        self.assertEqual(int(await redis.command("GET", "happyrobot:seq:p1")), first + 3)

    async def test_lost_batch_read_from_history(self) -> None:
        """
        A batch that never arrived is read from the history when the next
        batch skips ahead; the next batch waits meanwhile and follows.
        """
        redis = await self.start_redis()
        a, b = await self.start_bus(redis), await self.start_bus(redis)
        watcher = await b.member("b1")
        receive = b.bus.rooms.live

        def lossy(project_id: str, room: Any, seq: int, data: bytes, exclude: Any) -> None:
            if b'"x-' not in data:  # the first batch is lost on the way to b
                receive(project_id, room, seq, data, exclude)

        self.patch(b.bus.rooms, "live", lossy)
        lost = await gatherResults([a.bus.append("p1", raw_event(f"x-{i}")) for i in range(4)])
        later = await gatherResults([a.bus.append("p1", raw_event(f"y-{i}")) for i in range(3)])
        self.assertEqual(later[0], lost[-1] + 1)
        await watcher.until(later[-1])
        self.assertEqual(watcher.seqs(), lost + later)
        self.assertEqual([e["operationId"] for e in watcher.received],
                         [f"x-{i}" for i in range(4)] + [f"y-{i}" for i in range(3)])

    async def test_batch_refused_while_redis_down(self) -> None:
        """Appends of one turn all fail with UNAVAILABLE when the link is lost before the flush."""
        redis = await self.start_redis()
        a = await self.start_bus(redis)
        m1 = await a.member("a1")
        ds = [a.bus.append("p1", raw_event(f"x-{i}")) for i in range(3)]
        a.bus.events.scheduled.cancel()  # the flush comes after the link is lost
        await redis.stop()
        await a.bus.when(lambda: not a.bus.healthy)
        a.bus.flush()
        for d in ds:
            f = await self.assertFailure(d, Unavailable)
            self.assertEqual(f.code, "UNAVAILABLE")
        self.assertEqual(m1.received, [])


class ReplayTests(BusTestCase):
    """Resuming with since, on the instance or on another one (items 2 and 3)."""

    async def test_resume_on_other_instance(self) -> None:
        """A member gone from A resumes on B: exactly the missed events, then live ones."""
        redis = await self.start_redis()
        a, b = await self.start_bus(redis), await self.start_bus(redis)
        gone = await a.member("a1")
        seqs = [await a.bus.append("p1", raw_event(f"before-{i}")) for i in range(3)]
        await gone.until(seqs[-1])
        a.registry.leave("p1", gone)
        since = gone.seqs()[-1]
        missed = [await b.bus.append("p1", raw_event(f"missed-{i}")) for i in range(4)]
        back = await b.resume("a1", since)
        live = [await a.bus.append("p1", raw_event(f"live-{i}")) for i in range(3)]
        await back.until(live[-1])
        self.assertEqual(back.seqs(), missed + live)

    async def test_resume_while_events_keep_arriving(self) -> None:
        """Events appended during the replay reach the resuming member once, in order."""
        redis = await self.start_redis()
        a, b = await self.start_bus(redis), await self.start_bus(redis)
        since = await a.bus.append("p1", raw_event("start"))
        for i in range(20):
            a.bus.append("p1", raw_event(f"early-{i}"))
        resumes = [Deferred.fromCoroutine(b.resume(f"r{i}", since)) for i in range(3)]
        flow = [a.bus.append("p1", raw_event(f"flow-{i}")) for i in range(30)]
        members = await gatherResults(resumes)
        last = max(await gatherResults(flow))
        for m in members:
            await m.until(last)
            self.assertEqual(m.seqs(), list(range(since + 1, last + 1)))

    async def test_resume_from_current_seq(self) -> None:
        """since = the current seq replays nothing and misses nothing after."""
        redis = await self.start_redis()
        a = await self.start_bus(redis)
        seq = await a.bus.append("p1", raw_event("1"))
        replay = await a.bus.replay("p1", seq)
        self.assertEqual((replay.events, replay.seq), ([], seq))

    async def test_since_beyond_history(self) -> None:
        """A since the history no longer reaches gives None and the current seq."""
        redis = await self.start_redis()
        a = await self.start_bus(redis, history_size=5)
        seqs = [await a.bus.append("p1", raw_event(str(i))) for i in range(12)]
        replay = await a.bus.replay("p1", seqs[0])
        self.assertEqual((replay.events, replay.seq), (None, seqs[-1]))
        ok = await a.bus.replay("p1", seqs[-6])
        self.assertEqual([json.loads(e)["seq"] for e in ok.events or []], seqs[-5:])
        # Above the current seq, or from an older epoch (lower, before the oldest kept):
        self.assertIsNone((await a.bus.replay("p1", seqs[-1] + 1)).events)
        self.assertIsNone((await a.bus.replay("p1", 3)).events)
        m = await a.resume("m1", seqs[0])
        self.assertEqual(m.received[0], {"type": "RESYNC_REQUIRED", "seq": seqs[-1]})

    async def test_history_trimmed_by_age(self) -> None:
        """Entries older than the history TTL are trimmed and not replayed."""
        redis = await self.start_redis()
        a = await self.start_bus(redis, history_ttl_seconds=60)
        # A room whose two kept events were added long ago (field t, in ms).
        for seq in (99, 100):
            await redis.command("XADD", "happyrobot:history:p1", f"{seq}-0",
                                "t", "1000", "e", '{"seq":%d}' % seq)
        await redis.command("SET", "happyrobot:seq:p1", "100")
        replay = await a.bus.replay("p1", 98)
        self.assertEqual((replay.events, replay.seq), (None, 100))
        self.assertEqual(await redis.command("XLEN", "happyrobot:history:p1"), 0)
        nxt = await a.bus.append("p1", raw_event("3"))
        self.assertEqual(nxt, 101)
        replay = await a.bus.replay("p1", 100)
        self.assertEqual([json.loads(e)["seq"] for e in replay.events or []], [101])
        self.assertIsNone((await a.bus.replay("p1", 99)).events)

    async def test_dedupe_ends_with_the_history(self) -> None:
        """An op key whose event left the history numbers the retry as a new event."""
        redis = await self.start_redis()
        a = await self.start_bus(redis, history_size=1)
        first = await a.bus.append("p1", raw_event("op"), None, ("u", "op"))
        for i in range(300):  # MAXLEN ~ trims whole nodes of the stream
            await a.bus.append("p1", raw_event(str(i)))
        again = await a.bus.append("p1", raw_event("op"), None, ("u", "op"))
        self.assertGreater(again, first)


class OutageTests(BusTestCase):
    """No silent gap after a broker hiccup (item 7)."""

    async def test_subscription_interrupted_catch_up(self) -> None:
        """Events published while A's subscription was down reach A's members in order."""
        redis = await self.start_redis()
        a, b = await self.start_bus(redis), await self.start_bus(redis)
        member = await a.member("a1")
        seqs = [await b.bus.append("p1", raw_event(f"x-{i}")) for i in range(3)]
        await member.until(seqs[-1])
        # Cut every pub/sub connection (A's and B's); the command links stay.
        await redis.command("CLIENT", "KILL", "TYPE", "pubsub")
        missed = [await b.bus.append("p1", raw_event(f"y-{i}")) for i in range(5)]
        await a.settled()
        live = await b.bus.append("p1", raw_event("z"))
        await member.until(live)
        self.assertEqual(member.seqs(), seqs + missed + [live])

    async def _catch_up_after(self, trim_to: int | None) -> tuple[list[int], list[int]]:
        """
        A's subscription is cut while B publishes 5 events, with a history
        of 3 (Redis trims streams roughly; C{trim_to} trims it exactly);
        return the seqs A's member got (RESYNC_REQUIRED as -seq) and the
        seqs published (before the cut, the 5, and after A caught up).
        """
        redis = await self.start_redis()
        a, b = await self.start_bus(redis, history_size=3), await self.start_bus(redis, history_size=3)
        member = await a.member("a1")
        first = await b.bus.append("p1", raw_event("x"))
        await member.until(first)
        await redis.command("CLIENT", "KILL", "TYPE", "pubsub")
        missed = [await b.bus.append("p1", raw_event(f"y-{i}")) for i in range(5)]
        if trim_to is not None:
            await redis.command("XTRIM", "happyrobot:history:p1", "MAXLEN", str(trim_to))
        await a.settled()
        live = await b.bus.append("p1", raw_event("z"))
        await member.until(live)
        return member.seqs(), [first, *missed, live]

    async def test_catch_up_past_the_history_delivers_what_is_kept(self) -> None:
        """
        When more events were published while A's subscription was down
        than the history keeps, A's members are told RESYNC_REQUIRED at
        the seq before the oldest kept event, then get every kept event:
        only what is really gone is left to the reload.
        """
        got, published = await self._catch_up_after(trim_to=3)
        self.assertEqual(got, [published[0], -published[2], *published[3:]])

    async def test_catch_up_beyond_the_history_size_delivers_all(self) -> None:
        """
        Events past HISTORY_SIZE that the stream still holds (Redis trims
        it roughly) are all delivered to an instance catching up: no
        RESYNC_REQUIRED while nothing is lost.
        """
        got, published = await self._catch_up_after(trim_to=None)
        self.assertEqual(got, published)

    async def test_append_refused_while_redis_down(self) -> None:
        """While Redis is unreachable an append fails with UNAVAILABLE and delivers nothing."""
        redis = await self.start_redis()
        a = await self.start_bus(redis)
        m1 = await a.member("a1")
        await redis.stop()
        await a.bus.when(lambda: not a.bus.healthy)
        f = await self.assertFailure(a.bus.append("p1", raw_event("x")), Unavailable)
        self.assertEqual(f.code, "UNAVAILABLE")
        await self.assertFailure(a.bus.replay("p1", 1), Unavailable)
        self.assertEqual(m1.received, [])

    async def test_redis_restart_mid_stream(self) -> None:
        """
        Redis restarted (empty) while events flow: every member ends with
        the events in order, each gap marked by RESYNC_REQUIRED at a seq
        past it.
        """
        redis = await self.start_redis()
        a, b = await self.start_bus(redis), await self.start_bus(redis)
        members = [await a.member("a1"), await b.member("b1"), await b.member("b2")]
        before = [await a.bus.append("p1", raw_event(f"x-{i}")) for i in range(5)]
        for m in members:
            await m.until(before[-1])
        flow = [b.bus.append("p1", raw_event(f"y-{i}")) for i in range(10)]
        await redis.stop()
        await redis.start()
        await a.settled()
        await b.settled()
        after = [await a.bus.append("p1", raw_event(f"z-{i}")) for i in range(3)]
        accepted = [s for s in await gatherResults(
            [d.addErrback(lambda f: f.trap(Unavailable) and None) for d in flow]) if s]
        self.assertGreater(after[0], max(before + accepted))  # a new epoch
        for m in members:
            await m.until(after[-1])
            assert_no_silent_gap(self, m.seqs())
            self.assertEqual(m.seqs()[-3:], after)

    async def test_room_opened_while_down_subscribes_later(self) -> None:
        """A room opened while Redis is down is read, subscribed and caught up once it is back."""
        redis = await self.start_redis()
        a, b = await self.start_bus(redis), await self.start_bus(redis)
        await redis.stop()
        await a.bus.when(lambda: not a.bus.healthy)
        m = Recorder("a1")
        a.registry.join("p2", m)
        await redis.start()
        await a.settled()
        await b.settled()
        seq = await b.bus.append("p2", raw_event("1"))
        await m.until(seq)
        self.assertEqual(m.seqs(), [seq])


def assert_no_silent_gap(test: Any, seqs: list[int]) -> None:
    """
    Each event's seq is the last one's plus one, unless a RESYNC_REQUIRED
    (negative in L{Recorder.seqs}) came between, after which events follow
    its seq.
    """
    last = None
    for s in seqs:
        if s < 0:
            last = -s
            continue
        if last is not None:
            test.assertEqual(s, last + 1, seqs)
        last = s


# ---------------------------------------------------------------- v2 through WebSockets


class Tracker:
    """
    What one client knows of a room across its connections: the seqs it
    received or had acknowledged, as a real client keeps them.  Its
    C{since} is the end of the gap-free run from its starting point (an
    ACK may overtake an earlier event from another instance).
    """

    def __init__(self, name: str, project_id: str) -> None:
        self.name = name
        self.project_id = project_id
        self.base: int | None = None  # the seq of the first RESYNC_REQUIRED
        self.known: dict[int, str] = {}  # seq -> operationId
        self.connections: list[list[int]] = []  # event seqs received, per connection
        self.resyncs: list[int] = []
        self.unacked: dict[str, dict[str, Any]] = {}
        self.errors: list[dict[str, Any]] = []
        self._waiters: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def since(self) -> int:
        assert self.base is not None
        s = self.base
        while s + 1 in self.known:
            s += 1
        return s

    def saw(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "RESYNC_REQUIRED":
            self.resyncs.append(msg["seq"])
            if self.base is None:
                self.base = msg["seq"]
        elif kind == "ACK":
            self.known[msg["seq"]] = msg["operationId"]
            self.unacked.pop(msg["operationId"], None)
        elif kind == "ERROR":
            self.errors.append(msg)
        elif "seq" in msg:
            self.connections[-1].append(msg["seq"])
            self.known[msg["seq"]] = msg["operationId"]
        waiting, self._waiters = self._waiters, []
        for condition, d in waiting:
            if condition():
                d.callback(None)
            else:
                self._waiters.append((condition, d))

    def when(self, condition: Callable[[], bool]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if condition():
            d.callback(None)
        else:
            self._waiters.append((condition, d))
        return d

    def until(self, seq: int) -> Deferred[None]:
        """Fires once every seq up to C{seq} is known."""
        return self.when(lambda: self.base is not None and self.since() >= seq)


class TrackedClient(Client):
    """A WebSocket client that reports every message to its L{Tracker}."""

    tracker: Tracker
    closed_at: float | None = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        super().onMessage(payload, isBinary)
        msg = json.loads(payload)
        if msg.get("type") != "USER_PRESENCE":
            self.tracker.saw(msg)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed_at = reactor.seconds()
        super().onClose(wasClean, code, reason)

    def send_event(self, op: str) -> None:
        """Send a TASK_UPDATE with ack, remembered until acknowledged."""
        msg = dict(event(op, self.tracker.project_id), ack=True)
        self.tracker.unacked[op] = msg
        self.send_json(msg)


async def open_tracked(port_number: int, tracker: Tracker) -> TrackedClient:
    """
    Connect C{tracker}'s client to the server on C{port_number} and join its
    room with C{since} (0 the first time, which always answers
    RESYNC_REQUIRED with the current seq), then send again what was never
    acknowledged (the server recognises retries).
    """
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port_number}/ws", origin=ORIGIN)
    factory.protocol = TrackedClient
    client: TrackedClient = await TCP4ClientEndpoint(
        reactor, "127.0.0.1", port_number).connect(factory)
    client.tracker = tracker
    await client.opened
    tracker.connections.append([])
    since = 0 if tracker.base is None else tracker.since()
    client.send_json({"type": "SET_USER", "payload": {"userId": tracker.name}})
    client.send_json({"type": "JOIN_PROJECT", "projectId": tracker.project_id, "since": since})
    for msg in list(tracker.unacked.values()):
        client.send_json(msg)
    return client


def check_tracker(test: Any, tracker: Tracker, last: int) -> None:
    """
    C{tracker} ended with every event of the room from its start to
    C{last}, each once per connection and in seq order, and no resync.
    """
    assert tracker.base is not None
    test.assertEqual(tracker.resyncs, [tracker.base], tracker.name)
    test.assertEqual(sorted(tracker.known), list(range(tracker.base + 1, last + 1)),
                     tracker.name)
    for seqs in tracker.connections:
        test.assertEqual(seqs, sorted(set(seqs)), tracker.name)
    test.assertEqual(tracker.errors, [], tracker.name)


class ResumeOverWebSocketTests(RedisTestCase):
    """Clients resuming with since through the real WebSocket server (items 3 and 6)."""

    timeout = 30

    def track(self, name: str, project_id: str = "p1") -> Tracker:
        return Tracker(name, project_id)

    async def client(self, node: Node, tracker: Tracker) -> TrackedClient:
        c = await open_tracked(node.port_number, tracker)
        node._clients.append(c)
        await tracker.when(lambda: tracker.base is not None)
        return c

    async def test_resume_on_other_instance(self) -> None:
        """A client cut off from A resumes on B: the missed events, then live ones, nothing twice."""
        redis = await self.start_redis()
        a, b = await self.start_node(redis), await self.start_node(redis)
        writer, reader = self.track("writer"), self.track("reader")
        w = await self.client(b, writer)
        r = await self.client(a, reader)
        await a.settled()
        for i in range(3):
            w.send_event(f"before-{i}")
        await writer.when(lambda: not writer.unacked)
        await reader.until(writer.since())
        r.dropConnection(abort=True)
        await r.closed
        for i in range(5):
            w.send_event(f"missed-{i}")
        await writer.when(lambda: not writer.unacked)
        r = await self.client(b, reader)
        for i in range(3):
            w.send_event(f"live-{i}")
        await writer.when(lambda: not writer.unacked)
        await reader.until(writer.since())
        check_tracker(self, reader, writer.since())
        self.assertEqual(len(reader.connections[1]), 8)  # 5 missed + 3 live

    async def test_ack_retry_on_other_instance(self) -> None:
        """An event retried on another instance is acknowledged with its seq and delivered once."""
        redis = await self.start_redis()
        a, b = await self.start_node(redis), await self.start_node(redis)
        reader = self.track("reader")
        await self.client(b, reader)
        w1 = await self.joined_on(a, "writer")
        w1.send_json(dict(event("op-1"), ack=True))
        first = await w1.next_of("ACK")
        w2 = await self.joined_on(b, "writer")
        w2.send_json(dict(event("op-1"), ack=True))
        again = await w2.next_of("ACK")
        self.assertEqual(again["seq"], first["seq"])
        w2.send_json(dict(event("op-2"), ack=True))
        second = await w2.next_of("ACK")
        self.assertEqual(second["seq"], first["seq"] + 1)
        await reader.until(second["seq"])
        self.assertEqual(reader.connections[0], [first["seq"], second["seq"]])

    async def joined_on(self, node: Node, user: str) -> Client:
        c = await node.connect()
        c.send_json({"type": "SET_USER", "payload": {"userId": user}})
        c.send_json({"type": "JOIN_PROJECT", "projectId": "p1"})
        await node.round_trip(c)
        return c

    async def test_rolling_restart(self) -> None:
        """
        A is stopped with its DrainService (1001 closes spread over the
        window) while events keep flowing from B; its clients resume on B
        with since and none misses an event.
        """
        from happyrobot.tap import DrainService

        redis = await self.start_redis()
        # The writer sends as fast as it is acknowledged: no rate limit.
        a = await self.start_node(redis, rate_limit_per_second=0)
        b = await self.start_node(redis, rate_limit_per_second=0)
        writer = self.track("writer")
        w = await self.client(b, writer)
        trackers = [self.track(f"r{i}") for i in range(4)]
        on_a = [await self.client(a, t) for t in trackers]
        await a.settled()
        resumed: list[Deferred[TrackedClient]] = []
        for c in on_a:
            # Reconnect to B as soon as A closes us, as the browser client does.
            c.closed.addCallback(lambda _, t=c.tracker: resumed.append(
                Deferred.fromCoroutine(self.client(b, t))))

        flowing = True

        async def flow() -> None:
            i = 0
            while flowing:
                w.send_event(f"flow-{i}")
                i += 1
                await writer.when(lambda: not writer.unacked)

        publisher = Deferred.fromCoroutine(flow())
        await writer.when(lambda: len(writer.known) >= 5)
        await a.port.stopListening()
        drain = DrainService(a.factory, timeout=5, window=0.4)
        drain.startService()
        await drain.stopService()
        await gatherResults([c.closed for c in on_a])
        self.assertEqual([(c.close_code, c.tracker.name) for c in on_a],
                         [(1001, t.name) for t in trackers])
        closes = sorted(c.closed_at or 0 for c in on_a)
        self.assertGreater(closes[-1] - closes[0], 0.2)  # spread, not all at once
        await gatherResults(resumed)
        mark = writer.since()
        await writer.when(lambda: writer.since() >= mark + 5)
        flowing = False
        await publisher
        last = writer.since()
        for t in trackers:
            await t.until(last)
            check_tracker(self, t, last)
            self.assertEqual(len(t.connections), 2)
        await a.stop()

    async def test_killed_instance_client_resumes_elsewhere(self) -> None:
        """A client of a SIGKILLed twistd instance resumes on another instance without loss."""
        redis = await self.start_redis()
        a = await self.start_node(redis, instance_ttl_seconds=1.0)
        proc, transport, far_port = await listening_twistd(
            self, ["--redis-url", redis.url, "--instance-ttl", "1"])
        await proc.wait_for(b"Redis link up")
        far = Node(a.factory, a.port)  # the client helpers, against the process
        far.port_number = far_port
        writer, victim = self.track("writer"), self.track("victim")
        w = await self.client(a, writer)
        v = await open_tracked(far.port_number, victim)
        await victim.when(lambda: victim.base is not None)
        for i in range(3):
            w.send_event(f"before-{i}")
        await victim.until(victim.base + 3)  # type: ignore[operator]

        transport.signalProcess("KILL")
        await proc.ended
        for i in range(4):
            w.send_event(f"while-dead-{i}")
        await v.closed
        await writer.when(lambda: not writer.unacked)
        await self.client(a, victim)
        w.send_event("after")
        await writer.when(lambda: not writer.unacked)
        await victim.until(writer.since())
        check_tracker(self, victim, writer.since())
        self.assertEqual(len(victim.connections[1]), 5)


#: One step of a scenario: a client sends an event, loses its connection,
#: or (if disconnected) resumes on instance 0 or 1.
_step = st.one_of(
    st.tuples(st.just("send"), st.integers(0, 2)),
    st.tuples(st.just("drop"), st.integers(0, 2)),
    st.tuples(st.just("resume"), st.integers(0, 2), st.integers(0, 1)),
)


class InterleavingPropertyTests(RedisTestCase):
    """
    Random interleavings of publishes, disconnects and resumes through
    Redis and two instances (item 5): every client ends with exactly the
    room's events, each connection's in seq order.
    """

    timeout = 120

    async def test_random_interleavings(self) -> None:
        """Whatever the interleaving, every client ends with every event of the room, in order."""
        redis = await self.start_redis()
        nodes = [await self.start_node(redis, rate_limit_per_second=0),
                 await self.start_node(redis, rate_limit_per_second=0)]
        examples = iter(range(1000))
        events: list[int] = []  # how many events each example's room got

        async def scenario(steps: list[tuple[Any, ...]]) -> None:
            project_id = f"prop-{next(examples)}"
            trackers = [Tracker(f"user-{i}", project_id) for i in range(3)]
            clients: list[TrackedClient | None] = []
            for i, t in enumerate(trackers):
                clients.append(await open_tracked(nodes[i % 2].port_number, t))
                await t.when(lambda t=t: t.base is not None)
            sent = 0
            try:
                for step in steps:
                    i = step[1]
                    c = clients[i]
                    if step[0] == "send" and c is not None:
                        c.send_event(f"{project_id}-{sent}")
                        sent += 1
                    elif step[0] == "drop" and c is not None:
                        c.dropConnection(abort=True)
                        await c.closed
                        clients[i] = None
                    elif step[0] == "resume" and c is None:
                        clients[i] = await open_tracked(nodes[step[2]].port_number, trackers[i])
                for i, t in enumerate(trackers):
                    if clients[i] is None:
                        clients[i] = await open_tracked(nodes[i % 2].port_number, t)
                for t in trackers:  # every event sent is accepted in the end (retries)
                    await t.when(lambda t=t: not t.unacked)
                # The room's last event: every event sent has been acknowledged.
                last = max(max(t.known, default=t.since()) for t in trackers)
                for t in trackers:
                    await t.until(last)
                    check_tracker(self, t, last)
                events.append(last - min(t.base or 0 for t in trackers))
                # One seq per operation: no retry was delivered twice.
                ops = [op for t in trackers for op in t.known.values()]
                for t in trackers:
                    self.assertEqual(sorted(set(t.known.values())), sorted(set(ops)))
                    self.assertEqual(len(t.known), len(set(t.known.values())))
            finally:
                for c in clients:
                    if c is not None:
                        c.dropConnection(abort=True)
                        await c.closed

        def run(steps: list[tuple[Any, ...]]) -> None:
            d = Deferred.fromCoroutine(scenario(steps))
            d.addTimeout(20, reactor)
            return d

        @settings(max_examples=15, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(_step, min_size=4, max_size=30))
        def prop(steps: list[tuple[Any, ...]]) -> None:
            # Hypothesis drives from a thread; each example runs in the reactor.
            blockingCallFromThread(reactor, run, steps)

        await deferToThread(prop)
        self.assertGreaterEqual(len(events), 15)
        self.assertGreater(sum(events), 0)


class OutageAdapterTests(RedisTestCase):
    """What WebSocket and HTTP clients are told while Redis is unreachable."""

    async def test_clients_told_unavailable(self) -> None:
        """Events, resumes and broadcasts are refused with UNAVAILABLE / 503, never lost silently."""
        redis = await self.start_redis()
        a = await self.start_node(redis)
        c = await a.join("p1", "user_a")
        await c.next_of("USER_PRESENCE")
        await redis.stop()
        await a.bus.when(lambda: not a.bus.healthy)
        c.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {},
                     "operationId": "op-1", "ack": True})
        err = await c.next_of("ERROR")
        self.assertEqual((err["code"], err["operationId"]), ("UNAVAILABLE", "op-1"))
        c.send_json({"type": "JOIN_PROJECT", "projectId": "p2", "since": 5})
        err = await c.next_of("ERROR")
        self.assertEqual(err["code"], "UNAVAILABLE")
        self.assertNotIn("p2", a.factory.registry)
        code, body, _ = await a.http("POST", "/broadcast", {"type": "X", "projectId": "p1"})
        self.assertEqual(code, 503)
        self.assertIn("error", body)
