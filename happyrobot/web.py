"""
The HTTP side, on the same port as the WebSocket: ``/ws`` (Autobahn's
L{WebSocketResource} behind an Origin check), ``GET /health``,
``GET /stats`` and ``POST /broadcast``, with CORS headers for the allowed
origins and JSON bodies for every reply, errors included; and for
operators ``GET /metrics`` (Prometheus text) and ``GET /dashboard`` (an
HTML page polling ``/dashboard/data``).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from importlib import resources
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web.http import CACHED
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site, UnsupportedMethod

from happyrobot import logs, messages, security
from happyrobot.seams import twisted as twisted_seam
from happyrobot.timers import cancel_if_active
from happyrobot.ws import CollabFactory

log = logs.get_logger(__name__)

_PREFLIGHT_METHODS = b"GET,HEAD,PUT,PATCH,POST,DELETE"


def _json(request: Request, code: int, body: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    return messages.dumps(body)


def _cors(request: Request, factory: CollabFactory) -> None:
    """The headers the original's ``cors`` middleware set."""
    request.setHeader(b"vary", b"Origin")
    origin = request.getHeader(b"origin")
    if origin and factory.config.origin_allowed(origin.decode("latin-1")):
        request.setHeader(b"access-control-allow-origin", origin)
        request.setHeader(b"access-control-allow-credentials", b"true")


class Endpoint(Resource):
    """
    One of the server's leaves: CORS headers on every reply, an C{OPTIONS}
    preflight, the API token for operator endpoints, then Twisted's
    dispatch to C{render_<METHOD>} (C{HEAD} as C{GET}).  Its own errors
    have JSON bodies: 404 below it, 401, and 405 for a method it has no
    C{render_} for (with an C{Allow} header naming the ones it has).
    """

    isLeaf = True
    #: Operator endpoints need ``Authorization: Bearer <API_TOKEN>`` when one is set.
    operator = False
    #: ... or ``?token=<API_TOKEN>``, for pages a browser opens (it cannot send the header).
    query_token = False

    def __init__(self, factory: CollabFactory) -> None:
        super().__init__()
        self.factory = factory
        # For Resource.render's 405: the methods rendered here, then OPTIONS
        # (HEAD goes without saying where GET is).
        rendered = (n[len("render_"):] for n in dir(self) if n.startswith("render_"))
        self.allowedMethods = [
            m.encode("ascii") for m in sorted(rendered) if m not in ("HEAD", "OPTIONS")
        ] + [b"OPTIONS"]

    def render(self, request: Request) -> bytes | int:
        _cors(request, self.factory)
        if any(request.postpath or ()):  # /health/anything: not ours
            return _json(request, 404, {"error": "Not found"})
        token = self.factory.config.api_token
        if (
            self.operator
            and token
            and request.method != b"OPTIONS"  # a preflight carries no credentials
            and not self._authorized(request, token)
        ):
            request.setHeader(b"www-authenticate", b'Bearer realm="happyrobot"')
            return _json(request, 401, {"error": "Missing or invalid API token"})
        try:
            return super().render(request)
        except UnsupportedMethod as e:
            request.setHeader(b"allow", b", ".join(e.allowedMethods))
            method = request.method.decode("ascii", "replace")
            return _json(request, 405, {"error": f"Method {method} not allowed"})

    def render_HEAD(self, request: Request) -> bytes | int:
        """C{GET} without the body (Twisted leaves it out), where there is a C{GET}."""
        render_get = getattr(self, "render_GET", None)
        if render_get is None:
            raise UnsupportedMethod(self.allowedMethods)
        return render_get(request)

    def render_OPTIONS(self, request: Request) -> bytes:
        """The CORS preflight: any method, and the headers asked for."""
        request.setResponseCode(204)
        request.setHeader(b"access-control-allow-methods", _PREFLIGHT_METHODS)
        wanted = request.getHeader(b"access-control-request-headers")
        if wanted:
            request.setHeader(b"access-control-allow-headers", wanted)
        request.setHeader(b"content-length", b"0")
        return b""

    def _authorized(self, request: Request, token: str) -> bool:
        if security.bearer_matches(request.getHeader(b"authorization"), token):
            return True
        args: dict[bytes, list[bytes]] = request.args or {}
        given = args.get(b"token") if self.query_token else None
        return given is not None and bool(given) and hmac.compare_digest(
            given[0], token.encode("utf-8")
        )


class NotFound(Endpoint):
    """Every path the server does not serve, whatever the method."""

    def render(self, request: Request) -> bytes | int:
        _cors(request, self.factory)
        return _json(request, 404, {"error": "Not found"})


class Health(Endpoint):
    """``GET /health``: 200 while serving, 503 while draining or degraded."""

    def render_GET(self, request: Request) -> bytes:
        f = self.factory
        now = f.clock.seconds()
        body: dict[str, Any] = {
            "status": "healthy",
            "timestamp": int(now * 1000),
            "clients": len(f.connections),
            "projects": len(f.registry),
            "uptime": round(now - f.started_at, 3),
        }
        if f.draining:
            body.update(status="draining", reason="the server is shutting down")
        elif not f.bus.healthy:
            body.update(status="degraded", reason="the message bus is unreachable")
        return _json(request, 200 if body["status"] == "healthy" else 503, body)


def _json_later(request: Request, body: Deferred[Any]) -> bytes | int:
    """
    Answer with the JSON C{body}: at once when it is ready (the embedded
    engine's), else once it is, unless the client left meanwhile.
    """
    ready: list[bytes] = []
    waiting: list[bool] = []  # the reply was deferred
    gone: list[bool] = []

    def answer(code: int, result: Any) -> None:
        data = _json(request, code, result)
        if not waiting:
            ready.append(data)
        elif not gone:
            request.write(data)
            request.finish()

    def failed(f: Failure) -> None:
        if f.check(messages.ProtocolError) and f.value.code == "UNAVAILABLE":
            answer(503, {"error": f.value.message})  # Redis is down: retry later
        else:
            log.failure("building a reply failed", f)
            answer(500, {"error": "Internal server error"})

    body.addCallbacks(lambda result: answer(200, result), failed)
    if ready:
        return ready[0]
    waiting.append(True)
    request.notifyFinish().addErrback(lambda _: gone.append(True))
    return NOT_DONE_YET


@functools.cache
def _static_file(name: str) -> tuple[bytes, bytes]:
    """A file of the package's ``static/`` (package data) and its entity tag, read once."""
    body = resources.files("happyrobot").joinpath("static", name).read_bytes()
    return body, b'"' + hashlib.sha256(body).hexdigest()[:20].encode("ascii") + b'"'


class ClientFile(Endpoint):
    """
    ``GET /client.js``: the browser client, an ES module (docs/clients.md,
    "Browser client"), and ``GET /client.d.ts``: its TypeScript declarations.
    CORS as on every resource, since browsers fetch module scripts in CORS
    mode; cached for a few minutes, then revalidated by its ETag, so a new
    server version reaches browsers soon.
    """

    def __init__(self, factory: CollabFactory, name: str, content_type: bytes) -> None:
        super().__init__(factory)
        self.name = name
        self.content_type = content_type

    def render_GET(self, request: Request) -> bytes:
        body, etag = _static_file(self.name)
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"public, max-age=300")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"etag", etag)
        if request.setETag(etag) == CACHED:
            return b""
        return body


class Stats(Endpoint):
    """``GET /stats``: connections and rooms with their client ids."""

    operator = True

    def render_GET(self, request: Request) -> bytes | int:
        return _json_later(request, self.factory.bus.cluster_stats())


class BroadcastEndpoint(Endpoint):
    """``POST /broadcast``: the back end publishes into a room."""

    operator = True

    def render_POST(self, request: Request) -> bytes | int:
        if getattr(request, "body_too_large", False):
            limit = self.factory.config.max_broadcast_bytes
            return _json(request, 413, {"error": f"Body larger than {limit} bytes"})
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            return _json(request, 415, {"error": "Content-Type must be application/json"})
        try:
            assert request.content is not None
            event = messages.parse_broadcast(request.content.read())
        except messages.BroadcastError as e:
            return _json(request, 400, {"error": str(e)})
        f = self.factory
        now_ms = int(f.clock.seconds() * 1000)
        project_id = event.project_id

        async def send() -> dict[str, Any]:
            seq = await f.bus.append(project_id, messages.broadcast(event, now_ms))
            return {
                "success": True,
                "message": "Broadcast sent",
                "projectId": project_id,
                # With REDIS_URL, the room's connections on every instance.
                "clientCount": await f.bus.member_count(project_id),
                "seq": seq,
            }

        return _json_later(request, Deferred.fromCoroutine(send()))


class MetricsEndpoint(Endpoint):
    """``GET /metrics``: this server's metrics in the Prometheus text format."""

    operator = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return self.factory.metrics.exposition()


@functools.cache
def _dashboard_page() -> bytes:
    """The dashboard's HTML (package data), read once."""
    return resources.files("happyrobot").joinpath("static/dashboard.html").read_bytes()


#: The dashboard's page may run its own inline script and fetch from this server, nothing else.
_DASHBOARD_POLICY = (
    b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    b"connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    b"frame-ancestors 'none'"
)
#: How many rooms /dashboard/data lists, busiest first.
DASHBOARD_ROOMS = 20


class Dashboard(Endpoint):
    """
    ``GET /dashboard``: one self-contained page (no external scripts) that
    polls ``/dashboard/data`` every second and draws its numbers.  Takes
    the API token as ``?token=`` too, since a browser cannot send a header
    when it opens a page.
    """

    isLeaf = False
    operator = True
    query_token = True

    def __init__(self, factory: CollabFactory) -> None:
        super().__init__(factory)
        self.putChild(b"data", DashboardData(factory))
        self._not_found = NotFound(factory)

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self if path == b"" else self._not_found  # /dashboard/ is the page too

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-security-policy", _DASHBOARD_POLICY)
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return _dashboard_page()


class DashboardData(Endpoint):
    """
    ``GET /dashboard/data``: what the dashboard shows, as JSON: this
    instance's connections and rooms (the busiest with their member
    counts), the bus state, totals, rates and latency percentiles over the
    last seconds, and the one-second series for the charts.
    """

    operator = True
    query_token = True

    def render_GET(self, request: Request) -> bytes:
        f = self.factory
        rooms = f.registry.snapshot()
        busiest = sorted(rooms.items(), key=lambda item: (-len(item[1]), item[0]))
        body = {
            "timestamp": int(f.clock.seconds() * 1000),
            "connections": len(f.connections),
            "rooms": len(rooms),
            "busHealthy": bool(f.bus.healthy),
            "topRooms": [
                {"projectId": pid, "members": len(ids)} for pid, ids in busiest[:DASHBOARD_ROOMS]
            ],
            **f.metrics.dashboard(),
        }
        request.setHeader(b"cache-control", b"no-store")
        return _json(request, 200, body)


class OriginCheckedWebSocket(WebSocketResource):
    """
    ``/ws``: refuses a browser handshake from an origin that is not allowed
    with 403 before any protocol object exists (the defence against
    cross-site WebSocket hijacking).  No ``Origin`` header means a
    non-browser client, such as the back end, and is let through.
    """

    def __init__(self, factory: CollabFactory, echo: bool = False) -> None:
        # /echo's protocols are built by the same factory: one set of
        # connections, limits, flusher and drain for both endpoints.
        super().__init__(factory.echo_endpoint() if echo else factory)
        self.factory = factory

    def render(self, request: Request) -> bytes | int:
        if request.postpath not in ([], [b""]):  # /ws/anything is not /ws
            return _json(request, 404, {"error": "Not found"})
        origin = request.getHeader(b"origin")
        if origin is not None and not self.factory.config.origin_allowed(
            origin.decode("latin-1")
        ):
            log.warn("refused a WebSocket handshake from a disallowed origin")
            return _json(request, 403, {"error": "Origin not allowed"})
        if self.factory.draining:
            return _json(request, 503, {"error": "Server is shutting down"})
        config = self.factory.config
        address = security.client_address(
            security.peer_host(request.getClientAddress()),
            request.getHeader(b"x-forwarded-for"),
            config.trust_proxy,
        )
        refusal = self.factory.limiter.refusal(address)
        if refusal is not None:
            log.warn("refused a WebSocket: {why}", why=refusal)
            busy = self.factory.limiter.max_total and self.factory.limiter.total >= (
                self.factory.limiter.max_total
            )
            return _json(request, 503 if busy else 429, {"error": refusal})
        result = super().render(request)
        if result == NOT_DONE_YET:  # Autobahn took the connection over
            twisted_seam.forget_request(request)
        return result


class Root(Resource):
    """The resource tree: known children, JSON 404 for everything else."""

    def __init__(self, factory: CollabFactory) -> None:
        super().__init__()
        self._not_found = NotFound(factory)
        self.putChild(b"ws", OriginCheckedWebSocket(factory))
        self.putChild(b"health", Health(factory))
        self.putChild(b"stats", Stats(factory))
        self.putChild(b"broadcast", BroadcastEndpoint(factory))
        self.putChild(
            b"client.js", ClientFile(factory, "client.js", b"text/javascript; charset=utf-8")
        )
        self.putChild(
            b"client.d.ts",
            ClientFile(factory, "client.d.ts", b"application/typescript; charset=utf-8"),
        )
        self.putChild(b"metrics", MetricsEndpoint(factory))
        self.putChild(b"dashboard", Dashboard(factory))
        from happyrobot import web_operator  # it builds on this module's Endpoint

        web_operator.add_routes(self, factory)
        if factory.config.conformance_echo:
            # /echo for the Autobahn|Testsuite, behind the same checks as /ws.
            self.putChild(b"echo", OriginCheckedWebSocket(factory, echo=True))

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self._not_found

    def render(self, request: Request) -> bytes | int:
        return self._not_found.render(request)


class BoundedRequest(twisted_seam.HookedRequest):
    """
    A request whose body is dropped past the site's limit, so a huge POST
    costs no memory or disk; the resource then answers 413.
    """

    body_too_large = False
    _received = 0

    def body_received(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body_bytes:  # type: ignore[attr-defined]
            self.body_too_large = True
            assert self.content is not None
            self.content.seek(0)
            self.content.truncate()
            return
        super().body_received(data)


class DeadlineChannel(twisted_seam.HookedHTTPChannel):
    """
    An HTTP/1.1 channel whose client has the site's timeout
    (HANDSHAKE_TIMEOUT) to send each request whole, counted from when the
    channel starts waiting for it; past it the socket is dropped.
    Twisted's own timeout only bounds the silence between two reads, so a
    client trickling a byte at a time (slowloris) would hold a socket for
    ever, before any connection limit counts it.
    """

    _deadline: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        # Twisted clears timeOut while a request is handled: keep our own.
        self._time_allowed = self.timeOut
        self._arm()

    def request_received(self) -> None:
        self._disarm()  # in time; the request is handled (or upgraded) now

    def response_done(self) -> None:
        # The next request's time starts now, before Twisted reads on: it
        # may have been sent already (pipelined), whole (request_received
        # then disarms at once) or in part.
        self._arm()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._disarm()
        super().connectionLost(reason)

    def _arm(self) -> None:
        if self._time_allowed and self._deadline is None:
            self._deadline = self.callLater(self._time_allowed, self._expired)

    def _disarm(self) -> None:
        cancel_if_active(self._deadline)
        self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        self.transport.abortConnection()  # type: ignore[union-attr]  # a TCP transport


class QuietSite(Site):
    """A Site that access-logs at debug only, and never ``/health`` probes."""

    requestFactory = BoundedRequest
    # Plain HTTP/1.1 (WebSocket upgrades need it; HTTP/2 would need TLS),
    # with a deadline per request.
    protocol = DeadlineChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: Resource,
        max_body_bytes: int,
        timeout: float,
        reactor: IReactorTime | None = None,
    ) -> None:
        # Twisted's idle timeout (the same time) also applies; it is
        # suspended while a request is handled, so upgraded WebSockets are
        # not affected.
        super().__init__(resource, timeout=timeout, reactor=reactor)
        self.max_body_bytes = max_body_bytes

    def log(self, request: Request) -> None:  # type: ignore[override]
        if logs.debug_enabled() and request.path != b"/health":
            log.debug(
                "{method} {path} {code}",
                method=request.method.decode("ascii", "replace"),
                path=request.path.decode("ascii", "replace"),
                code=request.code,
            )


def make_site(factory: CollabFactory) -> Site:
    """The whole HTTP + WebSocket site around a L{CollabFactory}."""
    config = factory.config
    return QuietSite(
        Root(factory),
        config.max_broadcast_bytes,
        config.handshake_timeout_seconds,
        reactor=factory.clock,
    )

