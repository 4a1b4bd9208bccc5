"""
The seam to Autobahn: every private or undocumented attribute of its
WebSocket protocol and factory that happyrobot uses is used here, and only
here (L{happyrobot.ws} calls these small functions).  L{check} verifies at
start-up that each one still exists, so that an Autobahn upgrade that
removes one stops the server with one line naming the version.

What they are for:
  - the incoming fast path (L{happyrobot.ws}) reads whole text frames
    itself when Autobahn's frame machine holds nothing (C{state}, C{data},
    C{current_frame}, C{inside_message}), hands it the rest
    (C{_dataReceived}), counts the traffic as a pong as Autobahn does
    (C{autoPingTimeoutCall}, C{_cancelAutoPingTimeoutCall}) and fails
    invalid UTF-8 as Autobahn does (C{_invalid_payload});
  - the rate limit counts the frames that are not whole messages
    (C{current_frame});
  - the write path shares each compressed frame between connections with
    the same window (C{_perMessageCompress}), and replaces the per
    connection queue it never uses (C{send_queue});
  - overrides in L{happyrobot.ws} of methods that are not in Autobahn's
    interfaces: C{sendData} (every write through our writer),
    C{sendHttpErrorResponse} (JSON bodies), C{dropConnection} and
    C{sendCloseFrame} (no more frames once closing);
  - closing: the protocol close codes Autobahn's C{sendClose} refuses
    (C{sendCloseFrame}), a bounded failure reason in Autobahn's log line
    (C{wasNotCleanReason}), a cut-off client's close counted as clean
    (C{wasClean}), and the reference cycle of C{is_closed} undone;
  - the handshake: options bound once per factory instead of copied onto
    every connection (C{CONFIG_ATTRS}).
"""

from __future__ import annotations

import types
from typing import Any

import autobahn
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from happyrobot.seams import Unsupported

#: Autobahn's state of an open connection.
STATE_OPEN: int = getattr(WebSocketServerProtocol, "STATE_OPEN", 3)
OPCODE_CLOSE = 8

#: Used on the protocol class, or overridden by L{happyrobot.ws} (an
#: override of a method Autobahn no longer has would silently never run).
CLASS_ATTRIBUTES = (
    "STATE_OPEN", "CONFIG_ATTRS", "_dataReceived", "_cancelAutoPingTimeoutCall",
    "_invalid_payload", "sendCloseFrame", "sendData", "sendHttpErrorResponse",
    "dropConnection",
)
#: Set on each connection by Autobahn (by the time its handshake is done).
INSTANCE_ATTRIBUTES = (
    "state", "data", "current_frame", "inside_message", "autoPingTimeoutCall",
    "autoPingRestartOnAnyTraffic", "_perMessageCompress", "send_queue",
    "wasNotCleanReason", "wasClean", "is_closed",
)


def check(protocol: type = WebSocketServerProtocol, version: str = autobahn.__version__) -> None:
    """
    Raise L{Unsupported}, with a one-line message naming the Autobahn
    version, unless C{protocol} (a C{WebSocketServerProtocol}) has every
    attribute this module uses.  The instance attributes are looked for on
    a connection opened in memory.  Checked once per class.
    """
    if protocol in _checked:
        return
    missing = [name for name in CLASS_ATTRIBUTES if not hasattr(protocol, name)]
    if not missing:
        opened = _open_in_memory(protocol)
        missing = [name for name in INSTANCE_ATTRIBUTES if not hasattr(opened, name)]
        opened.connectionLost(Failure(ConnectionDone()))
    if missing:
        raise Unsupported(
            f"autobahn {version} lacks {protocol.__name__}.{missing[0]}, which happyrobot "
            f"relies on; install a version in pyproject.toml's range"
        )
    _checked.add(protocol)


_checked: set[type] = set()

_HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class _MemoryTransport:
    """The least of a TCP transport that Autobahn uses to open a connection."""

    disconnecting = False

    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, data: list[bytes]) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    def abortConnection(self) -> None:
        pass

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 0)

    getHost = getPeer

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


def _open_in_memory(protocol: type) -> Any:
    """A connection of C{protocol} through its opening handshake."""
    factory = WebSocketServerFactory(reactor=Clock())  # no timers, no global reactor
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0,
                               autoPingInterval=0)
    proto: Any = protocol()
    proto.factory = factory
    proto.transport = _MemoryTransport()
    proto.connectionMade()
    proto.dataReceived(_HANDSHAKE)
    return proto


# ------------------------------------------------------------ the fast path

def idle(proto: WebSocketServerProtocol) -> bool:
    """Open, and Autobahn holds no part of a frame or a message."""
    return (
        proto.state == STATE_OPEN
        and not proto.data
        and proto.current_frame is None
        and not proto.inside_message
    )


def is_open(proto: WebSocketServerProtocol) -> bool:
    """Open: not connecting, closing or closed."""
    return proto.state == STATE_OPEN


def feed(proto: WebSocketServerProtocol, data: bytes) -> None:
    """
    Hand C{data} to Autobahn's frame machine, without its Twisted adapter's
    dataReceived, which adds only a debug line whose arguments it formats
    on every call, debug or not.
    """
    proto._dataReceived(data)


def traffic_seen(proto: WebSocketServerProtocol) -> None:
    """Count traffic as a pong, as Autobahn does (autoPingRestartOnAnyTraffic)."""
    if proto.autoPingTimeoutCall and proto.autoPingRestartOnAnyTraffic:
        proto._cancelAutoPingTimeoutCall()


def fail_invalid_payload(proto: WebSocketServerProtocol, reason: str) -> None:
    """Fail the connection with 1007 as Autobahn does for invalid UTF-8."""
    proto._invalid_payload(reason)


def frame_is_partial(proto: WebSocketServerProtocol) -> bool:
    """
    In onFrameBegin: whether the frame begun is not a whole message (a
    ping, a pong, a fragment before the last), close frames aside.
    """
    frame = proto.current_frame
    return frame.opcode != OPCODE_CLOSE and (frame.opcode > 7 or not frame.fin)


# ------------------------------------------------------------ writing

def deflate_window_bits(proto: WebSocketServerProtocol) -> int | None:
    """The server's window bits if permessage-deflate was agreed, else None."""
    compress = proto._perMessageCompress
    return None if compress is None else compress.server_max_window_bits


def drop_send_queue(proto: WebSocketServerProtocol) -> None:
    """
    Autobahn's queue for its synchronous and chopped writes, which this
    server never makes: an empty tuple instead of a 0.7 kB deque per
    connection, which would fail loudly if ever appended to.
    """
    proto.send_queue = ()  # type: ignore[assignment]


def send_close_frame(proto: WebSocketServerProtocol, code: int, reason: bytes) -> None:
    """Start closing with any close code (C{sendClose} takes 1000 and 3000-4999 only)."""
    proto.sendCloseFrame(code, reason)


# ------------------------------------------------------------ closing

def shorten_failure_reason(proto: WebSocketServerProtocol, limit: int) -> None:
    """
    Bound the reason Autobahn logs at warn for a failed connection: it may
    quote a whole header that a client chose.
    """
    reason = proto.wasNotCleanReason
    if reason is not None and len(reason) > limit:
        proto.wasNotCleanReason = reason[:limit] + "..."


def count_as_clean(proto: WebSocketServerProtocol) -> None:
    """We chose to close it: no warning of Autobahn's about an unclean close."""
    proto.wasClean = True


def break_cycle(proto: WebSocketServerProtocol) -> None:
    """
    After connectionLost: Autobahn's C{is_closed} holds the protocol as its
    result; replace it so that reference counting frees the connection.
    """
    proto.is_closed = succeed(None)


# ------------------------------------------------------------ the factory

def bind_options(factory: WebSocketServerFactory, protocol: type) -> type:
    """
    A subclass of C{protocol} with the factory's protocol options bound
    as class attributes.  Autobahn copies each of its ~40 options from the
    factory onto every new protocol instance, and pretty-prints the lot for
    a debug line (a quarter of a handshake's CPU, measured); bound once,
    they are shared by every connection and there is nothing to copy.
    """
    options: dict[str, Any] = {
        # A plain function as a class attribute would become a method.
        name: staticmethod(value) if isinstance(value, types.FunctionType) else value
        for name in protocol.CONFIG_ATTRS  # type: ignore[attr-defined]
        for value in (getattr(factory, name),)
    }
    options["CONFIG_ATTRS"] = ()
    return type(protocol.__name__, (protocol,), options)
