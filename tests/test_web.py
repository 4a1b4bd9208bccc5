"""
HTTP tests over loopback: /health, /stats, POST /broadcast, CORS, and the
JSON 404/405 replies.
"""

from __future__ import annotations

import os

from happyrobot.web import _static_file
from tests.helpers import REPO_ROOT, ServerTestCase


class HealthTests(ServerTestCase):
    """GET /health."""

    async def test_healthy(self) -> None:
        """A serving server answers 200 with counts and uptime."""
        self.start_server()
        await self.joined("p1", "user_a")
        await self.connect()
        code, body, _ = await self.http("GET", "/health")
        self.assertEqual(code, 200)
        self.assertEqual(body["status"], "healthy")
        self.assertEqual((body["clients"], body["projects"]), (2, 1))
        self.assertIsInstance(body["timestamp"], int)
        self.assertGreaterEqual(body["uptime"], 0)

    async def test_draining(self) -> None:
        """While draining for shutdown /health answers 503 draining with a reason."""
        self.start_server()
        self.factory.draining = True
        code, body, _ = await self.http("GET", "/health")
        self.assertEqual((code, body["status"]), (503, "draining"))
        self.assertIn("reason", body)

    async def test_degraded_bus(self) -> None:
        """An unhealthy bus makes /health answer 503 degraded."""
        self.start_server()
        self.factory.bus.healthy = False  # type: ignore[misc]
        code, body, _ = await self.http("GET", "/health")
        self.assertEqual((code, body["status"]), (503, "degraded"))

    async def test_draining_refuses_new_websockets(self) -> None:
        """While draining, a new WebSocket handshake is refused."""
        self.start_server()
        self.factory.draining = True
        c = await self.connect(expect_open=False)
        await self.assertFailure(c.opened, ConnectionError)
        self.assertEqual(self.factory.connections, {})


class StatsTests(ServerTestCase):
    """GET /stats."""

    async def test_stats(self) -> None:
        """/stats lists every room with its client count and client ids."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        b = await self.joined("p1", "user_b")
        c = await self.joined("p2", "user_c")
        await self.connect()
        code, body, _ = await self.http("GET", "/stats")
        self.assertEqual(code, 200)
        self.assertEqual(body["totalClients"], 4)
        self.assertEqual(body["totalProjects"], 2)
        self.assertEqual(body["projectStats"]["p1"],
                         {"clientCount": 2, "clients": [a.client_id, b.client_id]})
        self.assertEqual(body["projectStats"]["p2"], {"clientCount": 1, "clients": [c.client_id]})


class BroadcastTests(ServerTestCase):
    """POST /broadcast validation."""

    async def test_missing_fields(self) -> None:
        """A body without type or projectId gets the original's 400 text."""
        self.start_server()
        for body in ({}, {"type": "TASK_CREATE"}, {"projectId": "p1"}):
            code, reply, _ = await self.http("POST", "/broadcast", body)
            self.assertEqual(code, 400)
            self.assertEqual(reply, {"error": "Missing required fields: type, projectId"})

    async def test_invalid_bodies(self) -> None:
        """Bad JSON, non-objects and bad field types get 400 with an error text."""
        self.start_server()
        for body in (b"{nope", b"[1]", b'{"type":"X","projectId":7}',
                     b'{"type":"X","projectId":"p","payload":"s"}',
                     b'{"type":"X","projectId":"p","userId":5}',
                     b'{"type":"X","projectId":"p","timestamp":"now"}'):
            code, reply, _ = await self.http("POST", "/broadcast", body)
            self.assertEqual(code, 400, body)
            self.assertIsInstance(reply["error"], str)

    async def test_wrong_content_type(self) -> None:
        """A body that is not declared as JSON gets 415 and nothing is sent."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        code, reply, _ = await self.http(
            "POST", "/broadcast", {"type": "X", "projectId": "p1"},
            headers={"content-type": "text/plain"})
        self.assertEqual(code, 415)
        self.assertEqual(await self.round_trip(a), [])

    async def test_body_too_large(self) -> None:
        """A body over MAX_BROADCAST_BYTES gets 413 and nothing is sent."""
        self.start_server(max_broadcast_bytes=1024)
        a = await self.joined("p1", "user_a")
        body = {"type": "X", "projectId": "p1", "payload": {"x": "y" * 5000}}
        code, reply, _ = await self.http("POST", "/broadcast", body)
        self.assertEqual(code, 413)
        self.assertIn("1024", reply["error"])
        self.assertEqual(await self.round_trip(a), [])

    async def test_empty_room(self) -> None:
        """Broadcasting into a room with no members succeeds with clientCount 0."""
        self.start_server()
        code, reply, _ = await self.http("POST", "/broadcast",
                                         {"type": "TASK_CREATE", "projectId": "nobody"})
        self.assertEqual((code, reply["clientCount"], reply["success"]), (200, 0, True))


class CorsAndRoutingTests(ServerTestCase):
    """CORS headers, preflight, 404 and 405."""

    async def test_allowed_origin_gets_cors_headers(self) -> None:
        """An allowed Origin is echoed with credentials allowed and Vary: Origin."""
        self.start_server()
        _, _, headers = await self.http("GET", "/health",
                                        headers={"origin": "http://localhost:3000"})
        self.assertEqual(headers.getRawHeaders("access-control-allow-origin"),
                         ["http://localhost:3000"])
        self.assertEqual(headers.getRawHeaders("access-control-allow-credentials"), ["true"])
        self.assertEqual(headers.getRawHeaders("vary"), ["Origin"])

    async def test_other_origin_gets_no_cors_headers(self) -> None:
        """A foreign Origin gets no Access-Control-Allow-Origin."""
        self.start_server()
        _, _, headers = await self.http("GET", "/stats", headers={"origin": "http://evil.example"})
        self.assertIsNone(headers.getRawHeaders("access-control-allow-origin"))
        self.assertEqual(headers.getRawHeaders("vary"), ["Origin"])

    async def test_preflight(self) -> None:
        """OPTIONS answers 204 with the allowed methods and the requested headers."""
        self.start_server()
        code, _, headers = await self.http("OPTIONS", "/broadcast", headers={
            "origin": "http://localhost:3000",
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type,authorization"})
        self.assertEqual(code, 204)
        self.assertIn("POST", headers.getRawHeaders("access-control-allow-methods")[0])
        self.assertEqual(headers.getRawHeaders("access-control-allow-headers"),
                         ["content-type,authorization"])
        self.assertEqual(headers.getRawHeaders("access-control-allow-origin"),
                         ["http://localhost:3000"])

    async def test_unknown_paths_404_json(self) -> None:
        """Unknown paths, and the root, answer 404 with a JSON error."""
        self.start_server()
        for path in ("/", "/nope", "/health/extra/deeper", "/wsx"):
            code, body, headers = await self.http("GET", path)
            self.assertEqual((code, body), (404, {"error": "Not found"}), path)
            self.assertTrue(headers.getRawHeaders("content-type")[0].startswith(
                "application/json"))

    async def test_wrong_method_405(self) -> None:
        """A wrong method answers 405 JSON with an Allow header."""
        self.start_server()
        for method, path in (("POST", "/health"), ("GET", "/broadcast"), ("DELETE", "/stats")):
            code, body, headers = await self.http(method, path)
            self.assertEqual(code, 405, path)
            self.assertIn("error", body)
            self.assertTrue(headers.getRawHeaders("allow"))

    async def test_wrong_method_405_exact(self) -> None:
        """The 405 names the method in JSON and lists the endpoint's methods, then OPTIONS."""
        self.start_server()
        for method, path, allow in (
            ("POST", "/health", "GET, OPTIONS"),
            ("PUT", "/dashboard/data", "GET, OPTIONS"),
            ("GET", "/broadcast", "POST, OPTIONS"),
            ("DELETE", "/stats", "GET, OPTIONS"),
        ):
            code, body, headers = await self.http(method, path)
            self.assertEqual((code, body), (405, {"error": f"Method {method} not allowed"}), path)
            self.assertEqual(headers.getRawHeaders("allow"), [allow], path)
            self.assertEqual(headers.getRawHeaders("content-type"),
                             ["application/json; charset=utf-8"], path)

    async def test_head_without_get_405(self) -> None:
        """HEAD where there is no GET (POST /broadcast only) is a 405 too, without a body."""
        self.start_server()
        code, body, headers = await self.http("HEAD", "/broadcast")
        self.assertEqual((code, body), (405, None))
        self.assertEqual(headers.getRawHeaders("allow"), ["POST, OPTIONS"])

    async def test_token_checked_before_method(self) -> None:
        """With API_TOKEN, operator endpoints answer 401 before 405; a preflight needs no token."""
        self.start_server(api_token="secret")
        code, body, _ = await self.http("DELETE", "/stats")
        self.assertEqual((code, body), (401, {"error": "Missing or invalid API token"}))
        code, _, headers = await self.http("OPTIONS", "/stats")
        self.assertEqual(code, 204)
        self.assertEqual(headers.getRawHeaders("access-control-allow-methods"),
                         ["GET,HEAD,PUT,PATCH,POST,DELETE"])
        code, body, _ = await self.http("DELETE", "/stats",
                                        headers={"authorization": "Bearer secret"})
        self.assertEqual((code, body), (405, {"error": "Method DELETE not allowed"}))

    async def test_head_health(self) -> None:
        """HEAD /health answers like GET, without a body."""
        self.start_server()
        code, body, _ = await self.http("HEAD", "/health")
        self.assertEqual((code, body), (200, None))

    async def test_plain_get_on_ws(self) -> None:
        """A GET on /ws without the WebSocket upgrade is refused, not crashed on."""
        self.start_server()
        code, body, headers = await self.http("GET", "/ws")
        self.assertEqual(code, 426)
        self.assertIn("upgrade", body["error"].lower())
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])


def _in_repository(name: str) -> bytes:
    """The checkout's happyrobot/static/<name>."""
    with open(os.path.join(REPO_ROOT, "happyrobot", "static", name), "rb") as f:
        return f.read()


class ClientScriptTests(ServerTestCase):
    """GET /client.js: the browser client, served from the package data."""

    name = "client.js"
    content_type = "text/javascript; charset=utf-8"
    marker = b"export class HappyRobotClient"

    async def test_serves_the_file(self) -> None:
        """The path serves the repository's static file with its type, CORS and caching."""
        self.start_server()
        code, body, headers = await self.http(
            "GET", f"/{self.name}", headers={"origin": "http://localhost:3000"})
        self.assertEqual(code, 200)
        self.assertEqual(body, _in_repository(self.name))
        self.assertIn(self.marker, body)
        self.assertEqual(headers.getRawHeaders("content-type"), [self.content_type])
        self.assertEqual(headers.getRawHeaders("access-control-allow-origin"),
                         ["http://localhost:3000"])
        self.assertEqual(headers.getRawHeaders("access-control-allow-credentials"), ["true"])
        self.assertEqual(headers.getRawHeaders("vary"), ["Origin"])
        self.assertEqual(headers.getRawHeaders("cache-control"), ["public, max-age=300"])
        self.assertEqual(headers.getRawHeaders("x-content-type-options"), ["nosniff"])
        self.assertEqual(headers.getRawHeaders("etag"), [_static_file(self.name)[1].decode()])

    async def test_not_modified(self) -> None:
        """A request with the current ETag in If-None-Match gets 304 and no body."""
        self.start_server()
        _, _, headers = await self.http("GET", f"/{self.name}")
        etag = headers.getRawHeaders("etag")[0]
        code, body, _ = await self.http("GET", f"/{self.name}", headers={"if-none-match": etag})
        self.assertEqual((code, body), (304, None))

    async def test_head_and_wrong_method(self) -> None:
        """HEAD answers without a body; POST gets the JSON 405."""
        self.start_server()
        code, body, _ = await self.http("HEAD", f"/{self.name}")
        self.assertEqual((code, body), (200, None))
        code, body, headers = await self.http("POST", f"/{self.name}", {})
        self.assertEqual(code, 405)
        self.assertEqual(headers.getRawHeaders("allow"), ["GET, OPTIONS"])

    async def test_below_is_not_found(self) -> None:
        """A path below the file is a JSON 404."""
        self.start_server()
        code, body, _ = await self.http("GET", f"/{self.name}/more")
        self.assertEqual((code, body), (404, {"error": "Not found"}))


class ClientTypesTests(ClientScriptTests):
    """GET /client.d.ts: the client's TypeScript declarations, served like /client.js."""

    name = "client.d.ts"
    content_type = "application/typescript; charset=utf-8"
    marker = b"export declare class HappyRobotClient"

    async def test_own_etag(self) -> None:
        """The declarations have an entity tag of their own: /client.js's does not match them."""
        self.start_server()
        _, _, script = await self.http("GET", "/client.js")
        etag = script.getRawHeaders("etag")[0]
        code, body, headers = await self.http(
            "GET", "/client.d.ts", headers={"if-none-match": etag})
        self.assertEqual((code, body), (200, _in_repository("client.d.ts")))
        self.assertNotEqual(headers.getRawHeaders("etag"), [etag])
