"""
Everything happyrobot uses of Twisted that is not Twisted's public API, in
one place, and L{check}, which L{happyrobot.tap.makeService} calls first so
that a Twisted without one of them stops the server with one line instead
of failing later:

  - L{RaisingEndpointService}: C{StreamServerEndpointService._raiseSynchronously};
  - L{forget_request}: C{HTTPChannel.requests}, the channel's queue of requests;
  - L{HookedHTTPChannel}: C{HTTPChannel.allContentReceived} and
    C{HTTPChannel.requestDone}, which Twisted calls but does not document
    as hooks;
  - L{HookedRequest}: C{Request.handleContentChunk} ("not intended for users");
  - L{emit_known_level}: what C{Logger.emit} builds and hands to its
    observer, after the level check that L{happyrobot.logs} makes cheaper;
  - L{happyrobot.StartupError} relies on twistd reporting an exception
    raised while the application starts to the parent that waits for a
    daemon's start (no attribute: the daemon tests hold it).

The rest of happyrobot keeps to Twisted's public API: no attribute that
starts with an underscore, no override of a method not documented for it.
"""

from __future__ import annotations

import time
from typing import Any, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.copyright import version as twisted_version
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.web.http import HTTPChannel
from twisted.web.server import Request

from happyrobot.seams import Unsupported


def _lacks(what: str) -> Unsupported:
    return Unsupported(
        f"Twisted {twisted_version} lacks {what}, which happyrobot relies on; "
        "install a version in pyproject.toml's range"
    )


def check(
    service: type | None = None,
    channel: type | None = None,
    request: type | None = None,
    logger: type[Logger] | None = None,
) -> None:
    """
    Verify that Twisted has everything this module uses.  The arguments
    stand in for Twisted's classes (by default, this module's names for
    them) in tests.

    @raise Unsupported: naming the Twisted version and the first thing missing.
    """
    service = service or StreamServerEndpointService
    channel = channel or HTTPChannel
    request = request or Request
    logger = logger or Logger
    if not isinstance(getattr(service, "_raiseSynchronously", None), bool):
        raise _lacks("StreamServerEndpointService._raiseSynchronously")
    if not isinstance(getattr(channel(), "requests", None), list):
        raise _lacks("HTTPChannel.requests")
    for name in ("allContentReceived", "requestDone"):
        if not callable(getattr(channel, name, None)):
            raise _lacks(f"HTTPChannel.{name}")
    if not callable(getattr(request, "handleContentChunk", None)):
        raise _lacks("Request.handleContentChunk")
    # The event emit_known_level builds is the one Logger.emit builds.
    events: list[dict[str, Any]] = []
    probe = logger(namespace="happyrobot.seams", observer=cast(ILogObserver, events.append))
    probe.emit(LogLevel.info, "{x}", x=1, log_trace=[])
    emit_known_level(probe, LogLevel.info, "{x}", {"x": 1, "log_trace": []})
    if len(events) != 2 or not _same_event(*events):
        raise _lacks("the log event layout happyrobot copies from Logger.emit")


def _same_event(theirs: dict[str, Any], ours: dict[str, Any]) -> bool:
    if set(theirs) != set(ours) or abs(theirs["log_time"] - ours["log_time"]) > 60:
        return False
    return all(theirs[key] == ours[key] for key in theirs if key != "log_time")


class RaisingEndpointService(StreamServerEndpointService):
    """
    A L{StreamServerEndpointService} whose C{privilegedStartService} raises
    the error of an endpoint that cannot listen (C{CannotListenError}),
    instead of logging it and running on without a port.
    """

    _raiseSynchronously = True


def forget_request(request: Request) -> None:
    """
    Take C{request} out of its HTTP/1.1 channel's queue of requests, for a
    request whose connection another protocol took over (a WebSocket
    upgrade): it never finishes, and in the queue it would keep the channel
    and itself in a reference cycle, freed only by the cyclic garbage
    collector.
    """
    pending = getattr(request.channel, "requests", None)  # HTTP/1.1's channel has one
    if pending and request in pending:
        pending.remove(request)


class HookedHTTPChannel(HTTPChannel):
    """
    An HTTP/1.1 channel that tells its subclass when a request has arrived
    whole (L{request_received}) and when the oldest request's response is
    done (L{response_done}).
    """

    def request_received(self) -> None:
        """A request's headers and body are read; it is handled (or upgraded) next."""

    def response_done(self) -> None:
        """
        The oldest request's response is done; Twisted reads the next
        request next, which may have been sent already (pipelined), whole
        or in part.
        """

    def allContentReceived(self) -> None:
        self.request_received()
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        self.response_done()
        super().requestDone(request)


class HookedRequest(Request):
    """A request that hands each chunk of its body, as it arrives, to L{body_received}."""

    def body_received(self, data: bytes) -> None:
        """Keep C{data}: add it to C{self.content}.  A subclass may drop it instead."""
        super().handleContentChunk(data)

    def handleContentChunk(self, data: bytes) -> None:
        self.body_received(data)


def emit_known_level(
    logger: Logger, level: LogLevel, format: str | None, event: dict[str, Any]
) -> None:
    """
    What C{logger.emit(level, format, **event)} does once it has found
    C{level} valid: complete C{event} and hand it to the logger's observer.
    Twisted's C{emit} finds the level valid by sorting every L{LogLevel}
    constant on each call; L{happyrobot.logs} knows its levels already.
    """
    event.update(
        log_logger=logger,
        log_level=level,
        log_namespace=logger.namespace,
        log_source=logger.source,
        log_format=format,
        log_time=time.time(),
    )
    if "log_trace" in event:
        event["log_trace"].append((logger, logger.observer))
    logger.observer(event)
