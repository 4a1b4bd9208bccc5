"""
The operator API across two instances sharing a real ``redis-server``:
revoke and disconnect through one instance's endpoint act on the other's
connections, and presence and events read the whole deployment.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import Client, Node, RedisServer, RedisTestCase
from tests.test_auth import serve_backend


async def presence_of(client: Client, users: set[str]) -> dict[str, Any]:
    """The first USER_PRESENCE whose users are exactly C{users}."""
    while True:
        msg = await client.next_of("USER_PRESENCE")
        if {u["userId"] for u in msg["payload"]["activeUsers"]} == users:
            return msg


async def join(client: Client, project_id: str) -> None:
    client.send_json({"type": "JOIN_PROJECT", "projectId": project_id})
    while (await client.next_of("USER_PRESENCE"))["payload"]["projectId"] != project_id:
        pass


class RevokeAcrossInstancesTests(RedisTestCase):
    """POST /projects/{projectId}/revoke on A for a member on B."""

    async def start(self, redis: RedisServer, **overrides: Any) -> tuple[Node, Node]:
        return await self.start_node(redis, **overrides), await self.start_node(redis, **overrides)

    async def test_member_on_other_instance_removed(self) -> None:
        """
        Out of the room within a second with ACCESS_REVOKED, no later event
        of that room, still the events of its other room; B's cached answer
        is dropped, so joining again asks the back end, which now says no.
        """
        backend, url = await serve_backend(
            self, {("user_m", "p1"), ("user_m", "p2"), ("user_o", "p1"), ("user_k", "p1")})
        redis = await self.start_redis()
        a, b = await self.start(redis, project_auth_url=url, project_auth_cache_seconds=600.0)
        m = await b.join("p1", "user_m")
        await presence_of(m, {"user_m"})
        await join(m, "p2")
        keep = await b.join("p1", "user_k")  # keeps B subscribed to p1
        other = await a.join("p1", "user_o")
        await presence_of(other, {"user_m", "user_k", "user_o"})
        asked = len(backend.requests)
        backend.allowed.discard(("user_m", "p1"))  # the back end removed m from p1
        started = reactor.seconds()
        code, body, _ = await a.http("POST", "/projects/p1/revoke",
                                     {"userId": "user_m", "reason": "removed from project"})
        err = await m.next_of("ERROR")
        self.assertLess(reactor.seconds() - started, 1.0)
        self.assertEqual((err["code"], err["projectId"]), ("ACCESS_REVOKED", "p1"))
        self.assertEqual(code, 200)
        self.assertEqual(body, {"success": True, "projectId": "p1", "userId": "user_m",
                                "connections": 1, "instances": 2})
        client_id = m.client_id  # type: ignore[attr-defined]
        self.assertFalse(b.factory.registry.is_member("p1", client_id))
        await presence_of(other, {"user_k", "user_o"})
        # A later event of p1 reaches B's other member, not m; p2's reaches m.
        await a.http("POST", "/broadcast", {"type": "NOTE", "projectId": "p1"})
        self.assertEqual((await keep.next_of("NOTE"))["projectId"], "p1")
        await a.http("POST", "/broadcast", {"type": "NOTE", "projectId": "p2"})
        self.assertEqual((await m.next_of("NOTE"))["projectId"], "p2")
        self.assertEqual([x for x in await b.round_trip(m) if x.get("type") == "NOTE"], [])
        self.assertIsNone(m.close_code)
        # Joining again asks the back end again (the cache entry is gone).
        m.send_json({"type": "JOIN_PROJECT", "projectId": "p1", "operationId": "again"})
        err = await m.next_of("ERROR")
        self.assertEqual((err["code"], err["operationId"]), ("FORBIDDEN", "again"))
        self.assertEqual(len(backend.requests), asked + 1)

    async def test_disconnect_everywhere(self) -> None:
        """Every connection of the user on every instance is closed with 4403."""
        redis = await self.start_redis()
        a, b = await self.start(redis)
        on_a = await a.join("p1", "user_x")
        on_b = await b.join("p2", "user_x")
        bystander = await b.join("p2", "user_y")
        await presence_of(bystander, {"user_x", "user_y"})
        code, body, _ = await a.http("POST", "/users/user_x/disconnect", {"reason": "banned"})
        self.assertEqual((code, body["connections"], body["instances"]), (200, 2, 2))
        self.assertNotIn("partial", body)
        self.assertEqual(await on_a.closed, 4403)
        self.assertEqual(await on_b.closed, 4403)
        self.assertEqual(on_b.remoteCloseReason, "banned")
        await presence_of(bystander, {"user_y"})
        self.assertIsNone(bystander.close_code)

    async def test_instance_that_does_not_answer(self) -> None:
        """The count is the answering instances' and the reply says partial."""
        redis = await self.start_redis()
        a, b = await self.start(redis)
        a.bus.operator.timeout = 0.2
        b.bus.operator._answer = lambda call: None  # B hears the call but never answers
        await a.join("p1", "user_x")
        code, body, _ = await a.http("POST", "/users/user_x/disconnect")
        self.assertEqual((code, body["connections"], body["instances"], body["partial"]),
                         (200, 1, 1, True))

    async def test_without_redis_acts_here(self) -> None:
        """While Redis is down the instance acts on its own connections, partial."""
        redis = await self.start_redis()
        a = await self.start_node(redis)
        x = await a.join("p1", "user_x")
        await presence_of(x, {"user_x"})
        await redis.stop()
        await a.bus.when(lambda: not a.bus.healthy)
        code, body, _ = await a.http("POST", "/projects/p1/revoke", {"userId": "user_x"})
        self.assertEqual((code, body["connections"], body["partial"]), (200, 1, True))
        self.assertEqual((await x.next_of("ERROR"))["code"], "ACCESS_REVOKED")
        code, body, _ = await a.http("GET", "/projects/p1/presence")
        self.assertEqual((code, body["activeUsers"], body["partial"]), (200, [], True))


class ReadAcrossInstancesTests(RedisTestCase):
    """GET presence and events on one instance agree with what clients everywhere saw."""

    async def test_presence(self) -> None:
        redis = await self.start_redis()
        a, b = await self.start_node(redis), await self.start_node(redis)
        a1 = await a.join("p1", "user_a", firstName="Ann", lastName="Lee")
        await b.join("p1", "user_b")
        await b.join("p1", "user_b")
        seen = await presence_of(a1, {"user_a", "user_b"})
        while seen["payload"]["userCount"] < 3:
            seen = await presence_of(a1, {"user_a", "user_b"})
        for node in (a, b):
            code, body, _ = await node.http("GET", "/projects/p1/presence")
            self.assertEqual(code, 200)
            self.assertEqual(body["activeUsers"], seen["payload"]["activeUsers"])
            self.assertEqual(body["users"], [
                {"userId": "user_a", "initials": "AL", "connections": 1},
                {"userId": "user_b", "initials": "_B", "connections": 2}])
            self.assertNotIn("partial", body)
        code, body, _ = await a.http("GET", "/projects/empty/presence")
        self.assertEqual((code, body["activeUsers"]), (200, []))

    async def test_events(self) -> None:
        redis = await self.start_redis()
        a, b = await self.start_node(redis), await self.start_node(redis)
        watcher = await a.join("p1", "user_w")
        await presence_of(watcher, {"user_w"})
        sender = await b.join("p1", "user_s")
        got = []
        for i in range(4):
            sender.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"i": i}})
            got.append(await watcher.next_of("TASK_UPDATE"))
        first = got[0]["seq"]
        for node in (a, b):
            code, body, _ = await node.http("GET", f"/projects/p1/events?since={first - 1}")
            self.assertEqual(code, 200)
            self.assertEqual((body["events"], body["resyncRequired"]), (got, False))
        code, body, _ = await a.http("GET", f"/projects/p1/events?since={first}&limit=1")
        self.assertEqual((body["events"], body["hasMore"]), (got[1:2], True))
        code, body, _ = await a.http("GET", "/projects/p1/events?since=0")
        self.assertEqual((body["resyncRequired"], body["seq"]), (True, got[-1]["seq"]))


class RecheckAcrossInstancesTests(RedisTestCase):
    """A token refresh on instance B, after the back end changed its answer."""

    async def test_token_refresh_removes_the_member_everywhere_it_shows(self) -> None:
        from tests.test_auth import token, verifier

        backend, url = await serve_backend(self, {("user_t", "p1"), ("user_o", "p1")})
        redis = await self.start_redis()
        a = await self.start_node(redis, project_auth_url=url, project_auth_cache_seconds=600.0)
        b = await self.start_node(redis, project_auth_url=url, project_auth_cache_seconds=600.0)
        for node in (a, b):
            node.factory.verifier = verifier()
        other = await a.connect()
        other.send_json({"type": "SET_USER", "payload": {"token": token("user_o")}})
        other.send_json({"type": "JOIN_PROJECT", "projectId": "p1"})
        member = await b.connect()
        member.send_json({"type": "SET_USER", "payload": {"token": token("user_t")}})
        member.send_json({"type": "JOIN_PROJECT", "projectId": "p1"})
        await presence_of(other, {"user_o", "user_t"})
        backend.allowed.discard(("user_t", "p1"))
        member.send_json({"type": "SET_USER", "payload": {"token": token("user_t", exp=2e9)}})
        err = await member.next_of("ERROR")
        self.assertEqual((err["code"], err["projectId"]), ("ACCESS_REVOKED", "p1"))
        await presence_of(other, {"user_o"})
        code, body, _ = await a.http("GET", "/projects/p1/presence")
        self.assertEqual([u["userId"] for u in body["users"]], ["user_o"])


class ControlMessageTests(SynchronousTestCase):
    """What arrives on the control channels, handled without a Redis connection."""

    def test_malformed_ignored_and_calls_acted_on(self) -> None:
        from twisted.logger import LogLevel, capturedLogs

        from happyrobot.redis.bus import RedisBus
        from happyrobot.redis.keys import CONTROL_CHANNEL, reply_channel
        from happyrobot.rooms import RoomRegistry

        clock = Clock()
        registry = RoomRegistry(clock, 0.0)
        bus = RedisBus(registry, "redis://127.0.0.1:1/0", clock)
        closed: list[tuple[int, str]] = []

        class Connection:
            client_id, user_id, initials, projects = "c1", "u1", "U1", frozenset()

            def disconnect(self, code: int, reason: str) -> bool:
                closed.append((code, reason))
                return True

        registry.identified(Connection(), None)  # type: ignore[arg-type]
        with capturedLogs() as captured:
            for data in (b"not json", b"[1]", b'{"op":"disconnect"}',
                         b'{"op":"revoke","id":"1","from":"x","userId":"u1","projectId":7}'):
                bus.operator.received(CONTROL_CHANNEL, data)
            bus.operator.received(reply_channel(b"nobody"), b"{}")
        warnings = [e for e in captured if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 4)
        self.assertEqual(closed, [])
        bus.operator.received(CONTROL_CHANNEL, json.dumps(
            {"op": "disconnect", "id": "2", "from": "x", "userId": "u1", "reason": "bye"}).encode())
        bus.operator.received(CONTROL_CHANNEL, b'{"op":"future","id":"3","from":"x"}')
        self.assertEqual(closed, [(4403, "bye")])
