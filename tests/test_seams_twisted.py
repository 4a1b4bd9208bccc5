"""
Tests for L{happyrobot.seams.twisted}: the Twisted internals happyrobot
relies on, and the start-up check that they are all there.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.copyright import version as twisted_version
from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from happyrobot.seams import twisted as twisted_seam
from happyrobot.tap import Options, makeService


class _OldService:
    """A stand-in for a StreamServerEndpointService without _raiseSynchronously."""


class _ChannelWithoutQueue(HTTPChannel):
    """A stand-in for an HTTPChannel that keeps its requests elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        del self.requests


class _ChannelWithoutHooks:
    """A stand-in for an HTTPChannel with a queue but neither hook."""

    def __init__(self) -> None:
        self.requests: list[Any] = []


class _OldRequest:
    """A stand-in for a Request without handleContentChunk."""


class _OtherEventLogger(Logger):
    """A stand-in for a Logger whose events have one key more than ours."""

    def emit(self, level: Any, format: str | None = None, **kwargs: object) -> None:
        super().emit(level, format, log_extra=1, **kwargs)


class CheckTests(SynchronousTestCase):
    """L{twisted_seam.check}: everything there, or one line naming what is not."""

    def test_installed_twisted_has_everything(self) -> None:
        """The Twisted installed with happyrobot passes."""
        twisted_seam.check()

    def assertLacks(self, what: str, **stand_ins: Any) -> None:
        e = self.assertRaises(twisted_seam.Unsupported, twisted_seam.check, **stand_ins)
        self.assertEqual(
            str(e),
            f"Twisted {twisted_version} lacks {what}, which happyrobot relies on; "
            "install a version in pyproject.toml's range",
        )

    def test_missing_raise_synchronously(self) -> None:
        self.assertLacks("StreamServerEndpointService._raiseSynchronously", service=_OldService)

    def test_missing_request_queue(self) -> None:
        self.assertLacks("HTTPChannel.requests", channel=_ChannelWithoutQueue)

    def test_missing_channel_hooks(self) -> None:
        self.assertLacks("HTTPChannel.allContentReceived", channel=_ChannelWithoutHooks)

    def test_missing_content_chunk(self) -> None:
        self.assertLacks("Request.handleContentChunk", request=_OldRequest)

    def test_other_log_events(self) -> None:
        """A Logger.emit that builds other events than our copy fails the check too."""
        self.assertLacks(
            "the log event layout happyrobot copies from Logger.emit",
            logger=_OtherEventLogger,
        )

    def test_make_service_stops_with_one_line(self) -> None:
        """twistd gets the same one-line exit as for a bad setting, checked before the settings."""
        from twisted.internet.testing import MemoryReactorClock

        self.patch(twisted_seam, "HTTPChannel", _ChannelWithoutQueue)
        reactor = MemoryReactorClock()
        options = Options(environ={"PORT": "not an endpoint"})
        e = self.assertRaises(SystemExit, makeService, options, reactor)
        self.assertEqual(
            str(e),
            f"happyrobot-ws: Twisted {twisted_version} lacks HTTPChannel.requests, "
            "which happyrobot relies on; install a version in pyproject.toml's range",
        )
        self.assertEqual(reactor.tcpServers, [])


class RaisingEndpointServiceTests(SynchronousTestCase):
    """L{twisted_seam.RaisingEndpointService}: a port that cannot open raises."""

    class _Refusing:
        def listen(self, factory: Any) -> Any:
            return fail(CannotListenError("127.0.0.1", 1, OSError("in use")))

    def test_listen_error_raised(self) -> None:
        service = twisted_seam.RaisingEndpointService(self._Refusing(), Factory())
        self.assertRaises(CannotListenError, service.privilegedStartService)

    def test_twisted_default_logs_instead(self) -> None:
        """Without the seam, Twisted logs the error and goes on (what the seam changes)."""
        service = StreamServerEndpointService(self._Refusing(), Factory())
        service.privilegedStartService()
        self.assertEqual(len(self.flushLoggedErrors(CannotListenError)), 1)


class _Later(Resource):
    isLeaf = True

    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events
        self.requests: list[Request] = []

    def render_GET(self, request: Request) -> int:
        self.events.append("render")
        self.requests.append(request)
        return NOT_DONE_YET

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        self.events.append("body " + request.content.read().decode())
        return b"ok"


def _connect(resource: Resource, channel_class: type[HTTPChannel]) -> tuple[Any, StringTransport]:
    site = Site(resource, reactor=Clock())
    site.protocol = channel_class  # type: ignore[assignment]
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


class HookedHTTPChannelTests(SynchronousTestCase):
    """L{twisted_seam.HookedHTTPChannel}: told when a request is in and when its answer is out."""

    def test_hooks_in_order(self) -> None:
        """A whole request is reported before it is handled, its end once it is answered."""
        events: list[str] = []

        class Recording(twisted_seam.HookedHTTPChannel):
            def request_received(self) -> None:
                events.append("received")

            def response_done(self) -> None:
                events.append("done")

        resource = _Later(events)
        channel, transport = _connect(resource, Recording)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n")
        self.assertEqual(events, [])  # not whole yet
        channel.dataReceived(b"\r\n")
        self.assertEqual(events, ["received", "render"])
        resource.requests[0].finish()
        self.assertEqual(events, ["received", "render", "done"])
        self.assertIn(b"200 OK", transport.value())


class HookedRequestTests(SynchronousTestCase):
    """L{twisted_seam.HookedRequest}: each chunk of the body goes through body_received."""

    def test_chunks_seen_and_kept(self) -> None:
        events: list[str] = []
        chunks: list[bytes] = []

        class Recording(twisted_seam.HookedRequest):
            def body_received(self, data: bytes) -> None:
                chunks.append(data)
                super().body_received(data)  # kept, as by default

        site = Site(_Later(events), requestFactory=Recording, reactor=Clock())
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabc")
        channel.dataReceived(b"def")
        self.assertEqual(chunks, [b"abc", b"def"])
        self.assertEqual(events, ["body abcdef"])


class ForgetRequestTests(SynchronousTestCase):
    """L{twisted_seam.forget_request}: out of the channel's queue, and nothing else."""

    def test_taken_out_of_the_queue(self) -> None:
        """A request taken over (never to finish) leaves its channel's queue."""
        events: list[str] = []
        resource = _Later(events)
        channel, _ = _connect(resource, HTTPChannel)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        request = resource.requests[0]
        self.assertIn(request, channel.requests)
        twisted_seam.forget_request(request)
        self.assertNotIn(request, channel.requests)
        twisted_seam.forget_request(request)  # twice is harmless

    def test_others_left_alone(self) -> None:
        """Another request in the queue stays; a channel with no queue (HTTP/2's) is no error."""
        events: list[str] = []
        resource = _Later(events)
        channel, _ = _connect(resource, HTTPChannel)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        queued = resource.requests[0]
        stranger = Request(channel)
        twisted_seam.forget_request(stranger)
        self.assertEqual(channel.requests, [queued])
        stranger.channel = object()
        twisted_seam.forget_request(stranger)
        self.assertEqual(channel.requests, [queued])


class EmitKnownLevelTests(SynchronousTestCase):
    """L{twisted_seam.emit_known_level}: the event Logger.emit would have built."""

    def test_same_event_as_twisted(self) -> None:
        theirs: list[dict[str, Any]] = []
        ours: list[dict[str, Any]] = []
        a = Logger(namespace="n", source=self, observer=theirs.append)  # type: ignore[arg-type]
        b = Logger(namespace="n", source=self, observer=ours.append)  # type: ignore[arg-type]
        a.warn("{x}", x=1)
        from twisted.logger import LogLevel

        twisted_seam.emit_known_level(b, LogLevel.warn, "{x}", {"x": 1})
        self.assertEqual(set(theirs[0]), set(ours[0]))
        for key in ("log_level", "log_namespace", "log_source", "log_format", "x"):
            self.assertEqual(theirs[0][key], ours[0][key])
        self.assertIs(ours[0]["log_logger"], b)
