"""
Verified identity (session tokens) and project authorization: the rules of
happyrobot.auth on a Clock, and over loopback with a real back end.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs, urlparse

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue, fail, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from happyrobot.auth import (
    AuthError,
    Identity,
    JwksKeys,
    ProjectAuthorizer,
    StaticKey,
    TokenVerifier,
    load_public_key,
)
from happyrobot.config import Config
from happyrobot.session import MAX_BACKLOG
from tests.helpers import ServerTestCase
from tests.test_tap import InMemoryPair

_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PUBLIC_PEM = _KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
).decode()


def token(sub: Any = "user_1", exp: float | None = None, key: Any = _KEY,
          kid: str | None = None, **claims: Any) -> str:
    """An RS256 session token; exp defaults to an hour from the real clock."""
    body = {"sub": sub, "exp": exp if exp is not None else time.time() + 3600, **claims}
    if sub is None:
        del body["sub"]
    headers = {"kid": kid} if kid else None
    return jwt.encode(body, key, algorithm="RS256", headers=headers)


def verifier(**kw: Any) -> TokenVerifier:
    return TokenVerifier(StaticKey(_KEY.public_key()), **kw)


class TokenVerifierTests(SynchronousTestCase):
    """TokenVerifier with a static key and explicit times."""

    def test_valid(self) -> None:
        """A good token gives its sub and exp."""
        identity = self.successResultOf(verifier().verify(token(exp=2000), now=1000))
        self.assertEqual(identity, Identity("user_1", 2000.0))

    def test_expiry_with_leeway(self) -> None:
        """A token is good until exp plus the leeway, and refused after."""
        v = verifier(leeway_seconds=5)
        self.successResultOf(v.verify(token(exp=1000), now=1004))
        self.failureResultOf(v.verify(token(exp=1000), now=1005), AuthError)

    def test_not_yet_valid(self) -> None:
        """A token whose nbf is beyond the leeway is refused."""
        f = self.failureResultOf(verifier().verify(token(exp=5000, nbf=2000), now=1000),
                                 AuthError)
        self.assertIn("not yet valid", str(f.value))

    def test_refused_tokens(self) -> None:
        """Wrong key, HS256, missing or bad sub, garbage: all AuthError."""
        hs = jwt.encode({"sub": "u", "exp": 5000}, "secret", algorithm="HS256")
        for bad in (token(key=_OTHER_KEY, exp=5000), hs, token(sub=None, exp=5000),
                    token(sub=42, exp=5000), token(sub="u" * 500, exp=5000),
                    "not.a.token", "", jwt.encode({"sub": "u"}, _KEY, algorithm="RS256")):
            self.failureResultOf(verifier().verify(bad, now=1000), AuthError)

    def test_issuer_and_audience(self) -> None:
        """With JWT_ISSUER and JWT_AUDIENCE set, both claims must match."""
        v = verifier(issuer="https://clerk.example", audience="happyrobot")
        good = token(exp=5000, iss="https://clerk.example", aud="happyrobot")
        self.successResultOf(v.verify(good, now=1000))
        for bad in (token(exp=5000, iss="https://evil", aud="happyrobot"),
                    token(exp=5000, iss="https://clerk.example", aud="other"),
                    token(exp=5000)):
            self.failureResultOf(v.verify(bad, now=1000), AuthError)

    def test_audience_ignored_when_not_configured(self) -> None:
        """A token with an aud claim is accepted when no audience is configured."""
        self.successResultOf(verifier().verify(token(exp=5000, aud="x"), now=1000))


class KeyLoadingTests(SynchronousTestCase):
    """load_public_key."""

    def test_pem_text_path_and_escapes(self) -> None:
        """The key may be PEM text, PEM with \\n escapes, or a file path."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(PUBLIC_PEM)
        for value in (PUBLIC_PEM, PUBLIC_PEM.replace("\n", "\\n"), path):
            key = load_public_key(value)
            self.successResultOf(TokenVerifier(StaticKey(key)).verify(token(exp=5000), 1000))

    def test_garbage_refused(self) -> None:
        """Something that is not a PEM key raises ValueError."""
        self.assertRaises(ValueError, load_public_key, "-----BEGIN PUBLIC KEY-----\nxx")


def jwks(*keys: tuple[str, Any]) -> bytes:
    """A JWKS document for (kid, private key) pairs."""
    import json

    docs = []
    for kid, key in keys:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        jwk.update(kid=kid, use="sig", alg="RS256")
        docs.append(jwk)
    return json.dumps({"keys": docs}).encode()


class JwksTests(SynchronousTestCase):
    """JwksKeys: caching, re-fetching on an unknown kid, rate limit."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.fetches: list[Deferred[bytes]] = []

    def fetch(self, url: str) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self.fetches.append(d)
        return d

    def test_fetch_once_cache_and_refetch(self) -> None:
        """Simultaneous lookups share one fetch; a new kid refetches only after the interval."""
        keys = JwksKeys("https://idp/jwks", self.fetch, self.clock, min_refetch_seconds=60)
        v = TokenVerifier(keys)
        d1 = v.verify(token(kid="k1", exp=5000), 1000)
        d2 = v.verify(token(kid="k1", exp=5000), 1000)
        self.assertEqual(len(self.fetches), 1)
        self.fetches[0].callback(jwks(("k1", _KEY)))
        self.assertEqual(self.successResultOf(d1).user_id, "user_1")
        self.successResultOf(d2)
        self.successResultOf(v.verify(token(kid="k1", exp=5000), 1000))
        self.assertEqual(len(self.fetches), 1)  # cached
        # A rotated key: unknown kid, but within the refetch interval.
        self.failureResultOf(v.verify(token(kid="k2", key=_OTHER_KEY, exp=5000), 1000),
                             AuthError)
        self.assertEqual(len(self.fetches), 1)
        self.clock.advance(61)
        d3 = v.verify(token(kid="k2", key=_OTHER_KEY, exp=5000), 1000)
        self.assertEqual(len(self.fetches), 2)
        self.fetches[1].callback(jwks(("k1", _KEY), ("k2", _OTHER_KEY)))
        self.successResultOf(d3)

    def test_fetch_failure_refuses(self) -> None:
        """When the JWKS cannot be fetched or read, tokens are refused, not crashed on."""
        keys = JwksKeys("https://idp/jwks", lambda url: fail(OSError("down")), self.clock)
        self.failureResultOf(TokenVerifier(keys).verify(token(kid="k", exp=5000), 1000),
                             AuthError)
        self.clock.advance(61)
        keys2 = JwksKeys("https://idp/jwks", lambda url: succeed(b"{nope"), self.clock)
        self.failureResultOf(TokenVerifier(keys2).verify(token(kid="k", exp=5000), 1000),
                             AuthError)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class ProjectAuthorizerTests(SynchronousTestCase):
    """ProjectAuthorizer on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.asked: list[tuple[str, str, Deferred[bool]]] = []

    def ask(self, user: str, project: str) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.asked.append((user, project, d))
        return d

    def test_coalesces_and_caches(self) -> None:
        """Many simultaneous joins make one request; the answer is reused until the TTL."""
        a = ProjectAuthorizer(self.ask, self.clock, ttl_seconds=60, timeout_seconds=3)
        waiting = [a.allowed("u", "p") for _ in range(5)]
        self.assertEqual(len(self.asked), 1)
        self.asked[0][2].callback(True)
        self.assertEqual([self.successResultOf(d) for d in waiting], [True] * 5)
        self.assertTrue(self.successResultOf(a.allowed("u", "p")))
        self.assertEqual(len(self.asked), 1)
        self.clock.advance(61)
        a.allowed("u", "p")
        self.assertEqual(len(self.asked), 2)

    def test_no_is_cached_per_pair(self) -> None:
        """A refusal is remembered for its pair only."""
        a = ProjectAuthorizer(self.ask, self.clock)
        d = a.allowed("u", "p")
        self.asked[0][2].callback(False)
        self.assertFalse(self.successResultOf(d))
        self.assertFalse(self.successResultOf(a.allowed("u", "p")))
        a.allowed("u", "q")
        self.assertEqual(len(self.asked), 2)

    def test_timeout_fails_closed(self) -> None:
        """No answer within the timeout fails every waiter; nothing is cached."""
        a = ProjectAuthorizer(self.ask, self.clock, timeout_seconds=3)
        d1, d2 = a.allowed("u", "p"), a.allowed("u", "p")
        self.clock.advance(2.9)
        self.assertNoResult(d1)
        self.clock.advance(0.2)
        self.failureResultOf(d1)
        self.failureResultOf(d2)
        a.allowed("u", "p")
        self.assertEqual(len(self.asked), 2)


class IdentityTests(ServerTestCase):
    """Session tokens over the WebSocket."""

    def start(self, **kw: Any) -> None:
        self.start_server(**kw)
        self.factory.verifier = verifier()

    async def test_set_user_with_token(self) -> None:
        """A valid token in SET_USER identifies the client as its sub."""
        self.start()
        c = await self.connect()
        c.send_json({"type": "SET_USER", "payload": {"token": token("user_tok"),
                                                     "userInfo": {"name": "Tok Ken"}}})
        c.send_json({"type": "JOIN_PROJECT", "projectId": "p1"})
        msg = await c.next_of("USER_PRESENCE")
        self.assertEqual(msg["payload"]["activeUsers"][0]["userId"], "user_tok")
        self.assertEqual(msg["payload"]["activeUsers"][0]["initials"], "TK")

    async def test_without_token_refused(self) -> None:
        """Without a token SET_USER and JOIN_PROJECT are refused with UNAUTHORIZED."""
        self.start()
        c = await self.connect()
        c.send_json({"type": "SET_USER", "payload": {"userId": "user_1"}})
        self.assertEqual((await c.next_of("ERROR"))["code"], "UNAUTHORIZED")
        c.send_json({"type": "JOIN_PROJECT", "projectId": "p1", "userId": "user_1"})
        self.assertEqual((await c.next_of("ERROR"))["code"], "UNAUTHORIZED")
        c.send_json({"type": "SET_USER", "payload": {"token": token(key=_OTHER_KEY)}})
        self.assertEqual((await c.next_of("ERROR"))["code"], "UNAUTHORIZED")
        self.assertNotIn("p1", self.factory.registry)

    async def test_claim_must_match_sub(self) -> None:
        """A userId that disagrees with the token's sub is refused."""
        self.start()
        c = await self.connect()
        c.send_json({"type": "SET_USER", "payload": {"token": token("user_1"),
                                                     "userId": "user_2"}})
        err = await c.next_of("ERROR")
        self.assertEqual(err["code"], "UNAUTHORIZED")
        c.send_json({"type": "SET_USER", "payload": {"token": token("user_1")}})
        c.send_json({"type": "JOIN_PROJECT", "projectId": "p1", "userId": "user_2"})
        self.assertEqual((await c.next_of("ERROR"))["code"], "UNAUTHORIZED")

    async def test_url_token(self) -> None:
        """A token in the /ws URL identifies the connection; a bad one is refused at the door."""
        self.start(max_connections_per_ip=5)
        c = await self.connect(path=f"/ws?token={token('user_url')}")
        c.send_json({"type": "JOIN_PROJECT", "projectId": "p1", "userId": "user_url"})
        msg = await c.next_of("USER_PRESENCE")
        self.assertEqual(msg["payload"]["activeUsers"][0]["userId"], "user_url")
        plain = await self.connect(path=f"/ws?token={token('user_plain')}")
        plain.send_json({"type": "JOIN_PROJECT", "projectId": "p1"})  # no SET_USER needed
        msg = await plain.next_of("USER_PRESENCE")
        self.assertIn("user_plain", [u["userId"] for u in msg["payload"]["activeUsers"]])
        bad = await self.connect(path="/ws?token=garbage", expect_open=False)
        await self.assertFailure(bad.opened, ConnectionError)
        await bad.closed
        self.assertEqual(self.factory.limiter.total, 2)  # the refused one is not counted
        # What a caller that is not a browser sees: 401 with a JSON reason.
        code, body, headers = await self.http(
            "GET", "/ws?token=garbage",
            headers={"upgrade": "websocket", "connection": "Upgrade",
                     "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
                     "sec-websocket-version": "13"},
        )
        self.assertEqual((code, body), (401, {"error": "Invalid session token"}))
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])

    async def test_messages_wait_for_verification(self) -> None:
        """Frames sent right after SET_USER are handled after it, in order."""
        self.start()
        other = await self.connect()
        other.send_json({"type": "SET_USER", "payload": {"token": token("user_2")}})
        other.send_json({"type": "JOIN_PROJECT", "projectId": "p1"})
        await other.next_of("USER_PRESENCE")
        c = await self.connect()
        c.send_json({"type": "SET_USER", "payload": {"token": token("user_1")}})
        c.send_json({"type": "JOIN_PROJECT", "projectId": "p1"})
        c.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"n": 1}})
        msg = await other.next_of("TASK_UPDATE")
        self.assertEqual(msg["payload"], {"n": 1})


class ExpiryTests(SynchronousTestCase):
    """Token expiry closes the connection unless refreshed in band; on a fake clock."""

    def setup_pair(self) -> InMemoryPair:
        pair = InMemoryPair(self, Config(ping_interval_seconds=0, presence_window_seconds=0))
        # The pair's connection opened already: its session shares the
        # factory's collaborators, the verifier set now included.
        pair.factory.verifier = verifier(leeway_seconds=5)
        pair.clock.advance(1000)
        return pair

    def set_user(self, pair: InMemoryPair, exp: float) -> None:
        pair.client.sendMessage(
            b'{"type":"SET_USER","payload":{"token":"%s"}}' % token(exp=exp).encode())
        pair.flush()

    def test_expired_token_closes_1008(self) -> None:
        """At exp plus leeway the server closes the connection with 1008."""
        pair = self.setup_pair()
        self.set_user(pair, exp=1100)
        proto = next(iter(pair.factory.connections.values()))
        self.assertEqual(proto.session.user_id, "user_1")
        pair.clock.advance(104)
        pair.flush()
        self.assertEqual(len(pair.factory.connections), 1)
        pair.clock.advance(2)
        pair.flush()
        self.assertEqual(pair.client.remoteCloseCode, 1008)

    def test_refresh_in_band(self) -> None:
        """A fresh token in a new SET_USER before expiry keeps the connection open."""
        pair = self.setup_pair()
        self.set_user(pair, exp=1100)
        pair.clock.advance(90)
        self.set_user(pair, exp=1300)
        pair.clock.advance(100)
        pair.flush()
        self.assertEqual(len(pair.factory.connections), 1)
        self.assertIsNone(pair.client.remoteCloseCode)
        pair.clock.advance(120)
        pair.flush()
        self.assertEqual(pair.client.remoteCloseCode, 1008)


class Backend(Resource):
    """A real HTTP back end answering project-authorization questions."""

    isLeaf = True

    def __init__(self, allowed: set[tuple[str, str]], status: int = 200) -> None:
        super().__init__()
        self.allowed = allowed
        self.status = status
        self.requests: list[tuple[dict[str, list[str]], bytes | None]] = []
        #: While set, answers wait until it fires.
        self.hold: Deferred[None] | None = None
        #: One entry per request received.
        self.arrivals: DeferredQueue[None] = DeferredQueue()

    def render_GET(self, request: Any) -> bytes | int:
        query = parse_qs(urlparse(request.uri.decode()).query)
        self.requests.append((query, request.getHeader(b"authorization")))
        self.arrivals.put(None)
        if self.status != 200:
            request.setResponseCode(self.status)
            return b"{}"
        pair = (query["userId"][0], query["projectId"][0])
        request.setResponseCode(200 if pair in self.allowed else 403)
        body = b'{"allowed": true}' if pair in self.allowed else b"{}"
        if self.hold is None:
            return body

        def answer(_: None) -> None:
            request.write(body)
            request.finish()

        self.hold.addCallback(answer)
        return NOT_DONE_YET


async def serve_backend(test: Any, allowed: set[tuple[str, str]],
                        status: int = 200) -> tuple[Backend, str]:
    """A L{Backend} listening on loopback for C{test}, and its PROJECT_AUTH_URL."""
    backend = Backend(allowed, status)
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(backend))
    test.addCleanup(port.stopListening)
    return backend, f"http://127.0.0.1:{port.getHost().port}/can-join"


class ProjectAuthorizationTests(ServerTestCase):
    """PROJECT_AUTH_URL against a real back end on loopback."""

    async def backend(self, allowed: set[tuple[str, str]], status: int = 200) -> Backend:
        resource, url = await serve_backend(self, allowed, status)
        self.start_server(project_auth_url=url, api_token="s3cret")
        return resource

    async def test_allowed_and_forbidden(self) -> None:
        """The back end's yes lets the user join; its no is FORBIDDEN and joins nothing."""
        backend = await self.backend({("user_a", "p1")})
        a = await self.connect()
        a.send_json({"type": "JOIN_PROJECT", "projectId": "p1", "userId": "user_a"})
        await a.next_of("USER_PRESENCE")
        a.send_json({"type": "JOIN_PROJECT", "projectId": "p2", "operationId": "j2"})
        err = await a.next_of("ERROR")
        self.assertEqual((err["code"], err["operationId"]), ("FORBIDDEN", "j2"))
        self.assertNotIn("p2", self.factory.registry)
        query, auth_header = backend.requests[0]
        self.assertEqual((query["userId"], query["projectId"]), (["user_a"], ["p1"]))
        self.assertEqual(auth_header, b"Bearer s3cret")

    async def test_one_request_for_many_joins(self) -> None:
        """Simultaneous joins of one user into one project make one back-end request."""
        backend = await self.backend({("user_a", "p1")})
        clients = [await self.connect() for _ in range(5)]
        for c in clients:
            c.send_json({"type": "JOIN_PROJECT", "projectId": "p1", "userId": "user_a"})
        for c in clients:
            while (await c.next_of("USER_PRESENCE"))["payload"]["userCount"] < 5:
                pass
        self.assertEqual(len(backend.requests), 1)

    async def test_messages_wait_for_a_pending_join(self) -> None:
        """
        What a client sends while its join waits for the back end is handled
        after the join, in order: its event reaches the room instead of
        being refused as NOT_IN_PROJECT.
        """
        backend = await self.backend({("user_a", "p1"), ("user_b", "p1")})
        b = await self.connect()
        b.send_json({"type": "JOIN_PROJECT", "projectId": "p1", "userId": "user_b"})
        await b.next_of("USER_PRESENCE")
        backend.hold = Deferred()
        a = await self.connect()
        a.send_json({"type": "JOIN_PROJECT", "projectId": "p1", "userId": "user_a"})
        a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"n": 1},
                     "operationId": "e1"})
        a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"n": 2},
                     "operationId": "e2"})
        # A ping after them: Autobahn answers it from the frame layer, after
        # the server has read everything sent before it.
        pong: Deferred[None] = Deferred()
        a.onPong = lambda payload: pong.called or pong.callback(None)  # type: ignore[method-assign]
        a.sendPing()
        await pong
        server_a = list(self.factory.connections.values())[-1]
        self.assertEqual(len(server_a.session._backlog or ()), 2)  # both wait behind the join
        self.assertEqual(self.factory.registry.member_count("p1"), 1)
        backend.hold.callback(None)
        self.assertEqual((await b.next_of("TASK_UPDATE"))["operationId"], "e1")
        self.assertEqual((await b.next_of("TASK_UPDATE"))["operationId"], "e2")
        self.assertEqual(self.factory.registry.member_count("p1"), 2)
        self.assertEqual([m for m in a.pending() if m.get("type") == "ERROR"], [])

    async def test_too_much_while_waiting_closes(self) -> None:
        """More than MAX_BACKLOG messages behind a pending join close the connection with 1008."""
        backend = await self.backend({("user_a", "p1")})
        backend.hold = Deferred()
        a = await self.connect()
        a.send_json({"type": "JOIN_PROJECT", "projectId": "p1", "userId": "user_a"})
        for i in range(MAX_BACKLOG + 1):
            a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"i": i}})
        self.assertEqual(await a.closed, 1008)
        # The answer that comes after the close joins nothing.  (A second
        # question for the same pair waits on the same request and is
        # answered after the first.)
        await backend.arrivals.get()
        assert self.factory.authorizer is not None
        answered = self.factory.authorizer.allowed("user_a", "p1")
        backend.hold.callback(None)
        self.assertTrue(await answered)
        self.assertNotIn("p1", self.factory.registry)

    async def test_backend_error_fails_closed(self) -> None:
        """A back end that errs refuses the join with AUTH_UNAVAILABLE."""
        await self.backend(set(), status=500)
        a = await self.connect()
        a.send_json({"type": "JOIN_PROJECT", "projectId": "p1", "userId": "user_a"})
        self.assertEqual((await a.next_of("ERROR"))["code"], "AUTH_UNAVAILABLE")
        self.assertNotIn("p1", self.factory.registry)


class JwksOverHttpTests(ServerTestCase):
    """JWKS_URL fetched over HTTP (treq) from a real server on loopback."""

    async def test_token_verified_with_fetched_keys(self) -> None:
        """A token signed by a key of the JWKS document is accepted; the document is fetched once."""
        from happyrobot.tap import _verifier

        fetched: list[int] = []

        class Jwks(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                fetched.append(1)
                request.setHeader(b"content-type", b"application/json")
                return jwks(("k1", _KEY))

        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(Jwks()))
        self.addCleanup(port.stopListening)
        self.start_server()
        config = self.factory.config.__class__(
            **{**self.factory.config.__dict__,
               "jwks_url": f"http://127.0.0.1:{port.getHost().port}/jwks"})
        # The verifier the wiring builds for this configuration, with its treq fetch.
        self.factory.verifier = _verifier(config, reactor, self.factory.http_pool)
        for user in ("user_1", "user_2"):
            c = await self.connect()
            c.send_json({"type": "SET_USER", "payload": {"token": token(user, kid="k1")}})
            c.send_json({"type": "JOIN_PROJECT", "projectId": "p1"})
            msg = await c.next_of("USER_PRESENCE")
            self.assertIn(user, [u["userId"] for u in msg["payload"]["activeUsers"]])
        self.assertEqual(len(fetched), 1)
        bad = await self.connect()
        bad.send_json({"type": "SET_USER", "payload": {"token": token(kid="k1", key=_OTHER_KEY)}})
        self.assertEqual((await bad.next_of("ERROR"))["code"], "UNAUTHORIZED")
