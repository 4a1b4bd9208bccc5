"""
The operator API with the embedded engine, over loopback: revoke,
disconnect, presence and events, their authorization and bad input; and
the pure parts (L{happyrobot.operator}) directly.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from happyrobot import operator
from happyrobot.operator import CLOSE_USER_DISCONNECTED, BadRequest
from tests.helpers import Client, ServerTestCase
from tests.test_auth import serve_backend


async def join(client: Client, project_id: str) -> None:
    """Join another room and wait for its first USER_PRESENCE."""
    client.send_json({"type": "JOIN_PROJECT", "projectId": project_id})
    while (await client.next_of("USER_PRESENCE"))["payload"]["projectId"] != project_id:
        pass


class RevokeTests(ServerTestCase):
    """POST /projects/{projectId}/revoke."""

    async def test_revoke(self) -> None:
        """
        The user's connections leave the room at once with ACCESS_REVOKED,
        stay open and in their other rooms; the others see the new presence.
        """
        self.start_server()
        a = await self.joined("p1", "user_a")
        await join(a, "p2")
        a2 = await self.joined("p1", "user_a")  # a second tab
        b = await self.joined("p1", "user_b")
        code, body, _ = await self.http(
            "POST", "/projects/p1/revoke", {"userId": "user_a", "reason": "removed"})
        self.assertEqual(code, 200)
        self.assertEqual(body, {"success": True, "projectId": "p1", "userId": "user_a",
                                "connections": 2})
        for c in (a, a2):
            err = await c.next_of("ERROR")
            self.assertEqual(
                (err["code"], err["projectId"]), ("ACCESS_REVOKED", "p1"))
            self.assertIn("removed", err["error"])
        presence = await b.next_of("USER_PRESENCE")
        while presence["payload"]["userCount"] != 1:
            presence = await b.next_of("USER_PRESENCE")
        self.assertEqual([u["userId"] for u in presence["payload"]["activeUsers"]], ["user_b"])
        self.assertEqual(self.factory.registry.member_count("p1"), 1)
        # Later events of p1 reach b only; a still gets p2's.
        for project_id in ("p1", "p2"):
            await self.http("POST", "/broadcast", {"type": "NOTE", "projectId": project_id})
        self.assertEqual((await b.next_of("NOTE"))["projectId"], "p1")
        self.assertEqual((await a.next_of("NOTE"))["projectId"], "p2")
        self.assertEqual([m for m in await self.round_trip(a2) if m["type"] == "NOTE"], [])
        self.assertIsNone(a.close_code)
        # Joining again is the client's own choice (no PROJECT_AUTH_URL here).
        await join(a, "p1")
        self.assertEqual(self.factory.registry.member_count("p1"), 2)

    async def test_unknown_project_and_user(self) -> None:
        """A project or user with no connection is 200 with connections 0."""
        self.start_server()
        await self.joined("p1", "user_a")
        for path, user in (("/projects/nope/revoke", "user_a"), ("/projects/p1/revoke", "x")):
            code, body, _ = await self.http("POST", path, {"userId": user})
            self.assertEqual((code, body["connections"]), (200, 0))

    async def test_token(self) -> None:
        """With API_TOKEN, a missing or wrong token is 401; the right one acts."""
        self.start_server(api_token="secret")
        a = await self.joined("p1", "user_a")
        for headers in ({}, {"authorization": "Bearer wrong"}):
            code, body, hdrs = await self.http(
                "POST", "/projects/p1/revoke", {"userId": "user_a"}, headers)
            self.assertEqual(code, 401)
            self.assertIn("token", body["error"])
        self.assertEqual(self.factory.registry.member_count("p1"), 1)
        code, body, _ = await self.http("POST", "/projects/p1/revoke", {"userId": "user_a"},
                                        {"authorization": "Bearer secret"})
        self.assertEqual((code, body["connections"]), (200, 1))
        self.assertEqual((await a.next_of("ERROR"))["code"], "ACCESS_REVOKED")

    async def test_bad_input(self) -> None:
        """Malformed ids, bodies and content types get 4xx with a JSON error and act on no one."""
        self.start_server(max_broadcast_bytes=1024)
        await self.joined("p1", "user_a")
        long_id = "x" * 129
        cases: list[tuple[str, Any, dict[str, str], int, str]] = [
            (f"/projects/{long_id}/revoke", {"userId": "user_a"}, {}, 400, "projectId"),
            ("/projects/%FF/revoke", {"userId": "user_a"}, {}, 400, "UTF-8"),
            ("/projects//revoke", {"userId": "user_a"}, {}, 400, "projectId"),
            ("/projects/p1/revoke", {}, {}, 400, "userId"),
            ("/projects/p1/revoke", {"userId": 7}, {}, 400, "userId"),
            ("/projects/p1/revoke", {"userId": long_id}, {}, 400, "userId"),
            ("/projects/p1/revoke", {"userId": "user_a", "reason": 1}, {}, 400, "reason"),
            ("/projects/p1/revoke", b"{not json", {}, 400, "JSON"),
            ("/projects/p1/revoke", b"[1]", {}, 400, "object"),
            ("/projects/p1/revoke", {"userId": "user_a"}, {"content-type": "text/plain"},
             415, "Content-Type"),
            ("/projects/p1/revoke", {"userId": "user_a", "pad": "x" * 2000}, {}, 413, "1024"),
        ]
        for path, body, headers, status, says in cases:
            code, reply, _ = await self.http("POST", path, body, headers)
            self.assertEqual(code, status, (path, body))
            self.assertIn(says, reply["error"], (path, body))
        self.assertEqual(self.factory.registry.member_count("p1"), 1)

    async def test_routes(self) -> None:
        """Unknown paths below /projects and /users are 404, other methods 405."""
        self.start_server()
        for path in ("/projects", "/projects/p1", "/projects/p1/nope", "/users/u1",
                     "/users/u1/revoke", "/projects/p1/revoke/more"):
            code, body, _ = await self.http("POST", path, {"userId": "u1"})
            self.assertEqual((code, body), (404, {"error": "Not found"}), path)
        code, _, headers = await self.http("GET", "/projects/p1/revoke")
        self.assertEqual(code, 405)
        self.assertEqual(headers.getRawHeaders("allow"), ["POST, OPTIONS"])


class DisconnectTests(ServerTestCase):
    """POST /users/{userId}/disconnect."""

    async def test_disconnect(self) -> None:
        """Every connection of the user, in a room or not, is closed with 4403."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        a2 = await self.connect()
        a2.send_json({"type": "SET_USER", "payload": {"userId": "user_a"}})
        await self.round_trip(a2)
        b = await self.joined("p1", "user_b")
        code, body, _ = await self.http("POST", "/users/user_a/disconnect",
                                        {"reason": "account deleted"})
        self.assertEqual((code, body), (200, {"success": True, "userId": "user_a",
                                              "closeCode": 4403, "connections": 2}))
        self.assertEqual(await a.closed, CLOSE_USER_DISCONNECTED)
        self.assertEqual(await a2.closed, CLOSE_USER_DISCONNECTED)
        self.assertEqual(a.remoteCloseReason, "account deleted")
        while (await b.next_of("USER_PRESENCE"))["payload"]["userCount"] != 1:
            pass
        self.assertIsNone(b.close_code)
        self.assertEqual(self.factory.registry.users.keys(), {"user_b"})

    async def test_no_body_and_bad_input(self) -> None:
        """The body is optional; a bad one, a bad user id or a wrong token is refused."""
        self.start_server(api_token="secret")
        auth = {"authorization": "Bearer secret"}
        a = await self.joined("p1", "user_a")
        code, body, _ = await self.http("POST", "/users/nobody/disconnect", None, auth)
        self.assertEqual((code, body["connections"]), (200, 0))
        for path, payload, headers, status in [
            ("/users/user_a/disconnect", None, {}, 401),
            ("/users/user_a/disconnect", {"reason": "x" * 201}, auth, 400),
            ("/users/user_a/disconnect", b"nope", auth, 400),
            ("/users/user_a/disconnect", b"{}", {**auth, "content-type": "text/plain"}, 415),
            (f"/users/{'u' * 129}/disconnect", None, auth, 400),
        ]:
            code, _, _ = await self.http("POST", path, payload, headers)
            self.assertEqual(code, status, (path, payload))
        self.assertIsNone(a.close_code)
        self.assertEqual(self.factory.registry.member_count("p1"), 1)

    async def test_long_reason_cut_for_the_close_frame(self) -> None:
        """A reason longer than a close frame carries is cut there, on a whole character."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        code, _, _ = await self.http("POST", "/users/user_a/disconnect", {"reason": "é" * 200})
        self.assertEqual(code, 200)
        self.assertEqual(await a.closed, 4403)
        self.assertEqual(a.remoteCloseReason, "é" * 61)


class PresenceAndEventsTests(ServerTestCase):
    """GET /projects/{projectId}/presence and /events."""

    async def test_presence(self) -> None:
        """The room's members as USER_PRESENCE lists them, and each user's connections."""
        self.start_server(api_token="secret")
        auth = {"authorization": "Bearer secret"}
        a = await self.joined("p1", "user_a", firstName="Ada", lastName="Byron")
        await self.joined("p1", "user_a")
        b = await self.joined("p1", "user_b")
        seen = await self.round_trip(b)  # b's join is the last change: its presence is current
        code, body, _ = await self.http("GET", "/projects/p1/presence", headers=auth)
        self.assertEqual(code, 200)
        self.assertEqual(body["projectId"], "p1")
        self.assertEqual(body["userCount"], 3)
        self.assertEqual(body["users"], [
            {"userId": "user_a", "initials": "AB", "connections": 2},
            {"userId": "user_b", "initials": "_B", "connections": 1},
        ])
        last = [m for m in [await a.next_of("USER_PRESENCE")] + seen
                if m.get("type") == "USER_PRESENCE"]
        while last[-1]["payload"]["userCount"] < 3:
            last.append(await a.next_of("USER_PRESENCE"))
        self.assertEqual(body["activeUsers"], last[-1]["payload"]["activeUsers"])
        code, body, _ = await self.http("GET", "/projects/none/presence", headers=auth)
        self.assertEqual((code, body["activeUsers"], body["users"]), (200, [], []))
        code, _, _ = await self.http("GET", "/projects/p1/presence")
        self.assertEqual(code, 401)

    async def test_events(self) -> None:
        """The room's events after since, as clients got them, with a limit."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        got = []
        for i in range(5):
            await self.http("POST", "/broadcast",
                            {"type": "NOTE", "projectId": "p1", "payload": {"i": i}})
            got.append(await a.next_of("NOTE"))
        first = got[0]["seq"]
        code, body, _ = await self.http("GET", f"/projects/p1/events?since={first - 1}")
        self.assertEqual(code, 200)
        self.assertEqual(body["events"], got)
        self.assertEqual((body["seq"], body["resyncRequired"], body["hasMore"]),
                         (got[-1]["seq"], False, False))
        code, body, _ = await self.http("GET", f"/projects/p1/events?since={first}&limit=2")
        self.assertEqual((body["events"], body["hasMore"]), (got[1:3], True))
        code, body, _ = await self.http("GET", f"/projects/p1/events?since={got[-1]['seq']}")
        self.assertEqual((body["events"], body["hasMore"]), ([], False))
        # since=0 is before the history: start again from seq, as RESYNC_REQUIRED says.
        code, body, _ = await self.http("GET", "/projects/p1/events?since=0")
        self.assertEqual((code, body["resyncRequired"], body["events"], body["seq"]),
                         (200, True, [], got[-1]["seq"]))
        code, body, _ = await self.http("GET", "/projects/unknown/events?since=0")
        self.assertEqual((code, body["resyncRequired"], body["events"]), (200, True, []))

    async def test_events_bad_query(self) -> None:
        """since is required and a non-negative integer; limit is 1 to 1000."""
        self.start_server()
        for query, says in [("", "since"), ("?since=-1", "since"), ("?since=x", "since"),
                            ("?since=1&limit=0", "limit"), ("?since=1&limit=1001", "limit"),
                            ("?since=1&limit=1e3", "limit"), ("?since=" + "9" * 30, "since"),
                            ("?since=9223372036854775808", "since")]:
            code, body, _ = await self.http("GET", "/projects/p1/events" + query)
            self.assertEqual(code, 400, query)
            self.assertIn(says, body["error"], query)


class RevokeWithBackendTests(ServerTestCase):
    """Revoke drops the cached PROJECT_AUTH_URL answer: a new join asks again."""

    async def test_rejoin_asks_again(self) -> None:
        backend, url = await serve_backend(self, {("user_a", "p1")})
        self.start_server(project_auth_url=url,
                          project_auth_cache_seconds=600.0)
        a = await self.joined("p1", "user_a")
        self.assertEqual(len(backend.requests), 1)
        backend.allowed.clear()  # the back end removed user_a from p1
        code, body, _ = await self.http("POST", "/projects/p1/revoke", {"userId": "user_a"})
        self.assertEqual((code, body["connections"]), (200, 1))
        self.assertEqual((await a.next_of("ERROR"))["code"], "ACCESS_REVOKED")
        a.send_json({"type": "JOIN_PROJECT", "projectId": "p1", "operationId": "again"})
        err = await a.next_of("ERROR")
        self.assertEqual((err["code"], err["operationId"]), ("FORBIDDEN", "again"))
        self.assertEqual(len(backend.requests), 2)
        self.assertNotIn("p1", self.factory.registry)


class ParsingTests(SynchronousTestCase):
    """The pure request parsers and helpers."""

    def test_parse_revoke(self) -> None:
        self.assertEqual(operator.parse_revoke(b'{"userId":"u","reason":"r"}'), ("u", "r"))
        self.assertEqual(operator.parse_revoke(b'{"userId":"u"}'), ("u", None))
        for bad in (b"", b"{}", b'{"userId":""}', b"null", b'{"userId":"u","reason":[]}'):
            self.assertRaises(BadRequest, operator.parse_revoke, bad)

    def test_parse_disconnect(self) -> None:
        self.assertIsNone(operator.parse_disconnect(b""))
        self.assertIsNone(operator.parse_disconnect(b" {} "))
        self.assertEqual(operator.parse_disconnect(b'{"reason":"r"}'), "r")
        self.assertRaises(BadRequest, operator.parse_disconnect, b"[]")

    def test_close_reason(self) -> None:
        self.assertEqual(operator.close_reason(None), "User disconnected")
        self.assertEqual(len(operator.close_reason("x" * 200).encode()), 123)
        self.assertEqual(operator.close_reason("\ud800ok"), "ok")

    def test_users_of(self) -> None:
        entries = [{"userId": "a", "initials": "A", "clientId": "1"},
                   {"userId": "b", "initials": "B", "clientId": "2"},
                   {"userId": "a", "initials": "A", "clientId": "3"}]
        self.assertEqual(operator.users_of(entries), [
            {"userId": "a", "initials": "A", "connections": 2},
            {"userId": "b", "initials": "B", "connections": 1}])
