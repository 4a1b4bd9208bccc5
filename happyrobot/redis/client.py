"""
The two Redis connections of the bus, and the only importer of txredisapi.

txredisapi is imported lazily (in L{check}, when the bus is made, and in
L{protocol_classes}), because importing it installs the global reactor.

What we use of txredisapi beyond its documented API lives here and only
here, and L{check} stops the server before it starts, with one line naming
the txredisapi version, if an upgrade removed it:

  - C{RedisProtocol._ready}: whether C{connectionMade} got through AUTH
    and SELECT (the connection is usable);
  - the C{callLater} class attribute, its timer (the global reactor),
    replaced per protocol by our reactor's;
  - that C{RedisProtocol} is C{HiredisProtocol} (hiredis installed): it
    handles every reply of a read in one call, so a burst of events that
    arrived together is written to the members together (txredisapi's
    pure-Python parser puts the rest of a read off to a later reactor turn
    after each bulk string);
  - the factory it expects (C{isLazy}, C{stopTrying}, C{connectionError}),
    provided by L{ConnectionFactory} for a L{ClientService}.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Protocol

from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from happyrobot import logs
from happyrobot.bus import Unavailable
from happyrobot.config import RedisAddress
from happyrobot.redis.scripts import ALL as ALL_SCRIPTS
from happyrobot.redis.scripts import Script
from happyrobot.seams import Unsupported

log = logs.get_logger(__name__)

#: At most one "Redis unreachable" line per this many seconds.
UNREACHABLE_LOG_SECONDS = 10.0


class TxredisapiChanged(Unsupported):
    """The installed txredisapi lacks something happyrobot relies on (one line)."""


def check() -> None:
    """
    Stop with one clear line if the installed txredisapi lacks what this
    module relies on (called when the Redis bus is made).

    @raise TxredisapiChanged: naming the version and what is missing.
    """
    import txredisapi

    missing = [name for name in ("ConnectionError", "ResponseError", "TimeoutError",
                                 "RedisProtocol", "SubscriberProtocol") if not hasattr(txredisapi, name)]
    if not missing:
        for name, attrs in (("RedisProtocol", ("callLater", "replyReceived", "ping",
                                               "execute_command")),
                            ("SubscriberProtocol", ("subscribe", "unsubscribe",
                                                    "messageReceived"))):
            cls = getattr(txredisapi, name)
            missing += [f"{name}.{a}" for a in attrs if not hasattr(cls, a)]
        if not missing:
            try:
                proto = txredisapi.RedisProtocol(charset=None, convertNumbers=False,
                                                 replyTimeout=1.0)
            except TypeError as e:
                missing.append(f"RedisProtocol(replyTimeout=...) ({e})")
            else:
                missing += [f"RedisProtocol().{a}" for a in ("_ready", "replyQueue")
                            if not hasattr(proto, a)]
        if getattr(txredisapi, "HiredisProtocol", None) is not txredisapi.RedisProtocol:
            missing.append("HiredisProtocol as its RedisProtocol (is the hiredis package "
                           "installed?)")
    if missing:
        import importlib.metadata  # only when the check fails: a dozen modules of its own

        version = importlib.metadata.version("txredisapi")
        raise TxredisapiChanged(
            f"txredisapi {version} lacks {', '.join(missing)}; happyrobot needs "
            "txredisapi>=1.6.0,<2 and hiredis as pyproject.toml declares"
        )


def run_id(info: Any) -> bytes:
    """The C{run_id} field of an C{INFO server} reply (b"" when absent)."""
    text = info if isinstance(info, bytes) else str(info or "").encode()
    for line in text.splitlines():
        if line.startswith(b"run_id:"):
            return line[7:].strip()
    return b""


def is_response_error(failure: Failure) -> bool:
    """Whether Redis answered with an error (rather than the link failing)."""
    return failure.check("txredisapi.ResponseError") is not None


def is_readonly(failure: Failure) -> bool:
    """Whether Redis refused a write as a replica (READONLY): a former master, demoted."""
    return is_response_error(failure) and failure.getErrorMessage().startswith("READONLY")


def is_connection_error(failure: Failure) -> bool:
    """Whether the link failed (lost, or no reply in time: txredisapi's TimeoutError)."""
    return failure.check("txredisapi.ConnectionError") is not None


class ConnectionFactory(Factory):
    """
    Builds txredisapi protocols for one L{ClientService} and tells the link
    when a connection becomes usable and when it is lost (the factory
    txredisapi's protocols expect, without its reconnection logic).
    """

    noisy = False
    #: txredisapi: on a failed AUTH/SELECT, log instead of failing a Deferred.
    isLazy = True

    def __init__(
        self,
        protocol_class: type,
        address: RedisAddress,
        select_db: bool,
        ready: Callable[[Any], None],
        lost: Callable[[Any], None],
        reactor: IReactorTime,
        reply_timeout: float,
        message: Callable[[bytes, bytes], None] | None = None,
        read_done: Callable[[], None] | None = None,
    ) -> None:
        self.protocol_class = protocol_class
        self.address = address
        self.select_db = select_db
        self.ready = ready
        self.lost = lost
        self.reactor = reactor
        self.reply_timeout = reply_timeout
        self.message = message
        self.read_done = read_done

    def buildProtocol(self, addr: Any) -> Any:
        a = self.address
        proto = self.protocol_class(
            charset=None,  # frames are bytes, not text: no decoding
            convertNumbers=False,
            password=a.password,
            username=a.username,
            dbid=a.db if self.select_db and a.db else None,
            # A Redis that stops answering (hung, or cut off by a network
            # partition, with the TCP connection still open) fails the
            # command and drops the connection after this long, as if it
            # had closed: the bus reports it and reconnects.
            replyTimeout=self.reply_timeout,
        )
        proto.callLater = self.reactor.callLater  # txredisapi's own timer: the global reactor
        proto.factory = self
        return proto

    def stopTrying(self) -> None:
        """txredisapi calls this when AUTH or SELECT fails; keep retrying with backoff."""

    def connectionError(self, why: str) -> None:
        log.error("Redis refused this server: {why}", why=why)


@functools.cache
def protocol_classes() -> tuple[type, type]:
    """txredisapi's command and subscriber protocols, hooked to report to their factory."""
    import txredisapi

    def ready_when_connected(proto: Any, d: Deferred[Any]) -> Deferred[Any]:
        # txredisapi's connectionMade authenticates and selects the database
        # before the connection is usable; _ready says whether it got there.
        # Then Redis must answer a PING: the kernel of a hung Redis still
        # accepts connections.
        def answered(_: object) -> None:
            try:
                proto.factory.ready(proto)
            except Exception:
                log.failure("error setting up a Redis connection")

        def refused(failure: Failure) -> None:
            # A timeout has dropped the connection already; an error reply
            # (LOADING while Redis reads its data, NOAUTH, ...) has not:
            # drop it, and the service connects again after its backoff.
            if not is_connection_error(failure):
                log.warn("Redis answered PING with {why}; connecting again",
                         why=failure.getErrorMessage())
                proto.transport.abortConnection()

        def ping(_: object) -> None:
            if proto._ready:
                proto.ping().addCallbacks(answered, refused)

        return d.addCallback(ping)

    class CommandProtocol(txredisapi.RedisProtocol):
        def connectionMade(self) -> Deferred[Any]:
            return ready_when_connected(self, super().connectionMade())

        def connectionLost(self, why: Failure) -> None:
            super().connectionLost(why)
            self.factory.lost(self)

    class SubscriberProtocol(txredisapi.SubscriberProtocol):
        def connectionMade(self) -> Deferred[Any]:
            return ready_when_connected(self, super().connectionMade())

        def connectionLost(self, why: Failure) -> None:
            super().connectionLost(why)
            self.factory.lost(self)

        def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
            self.factory.message(channel, message)

        def dataReceived(self, data: bytes, unpause: bool = False) -> None:
            super().dataReceived(data, unpause)
            self.factory.read_done()

    return CommandProtocol, SubscriberProtocol


class Reconnects(Protocol):
    """A connection that L{RedisLink.reconnect} drops and makes again with its own."""

    def reconnect(self) -> Deferred[Any]: ...


class RedisLink:
    """
    The bus's two connections to Redis, each kept up by a L{ClientService}
    with backoff: one for commands and one in subscriber mode (Redis allows
    nothing but (UN)SUBSCRIBE and PING on it).  A new connection is used
    once Redis has answered a PING on it; the scripts are loaded again on
    every new command connection (and once more on NOSCRIPT).

    The owner hears of each connection becoming usable or lost through the
    callbacks it passes, and of each message and the end of each read of
    the subscriber connection.  Nothing outside this class touches a
    txredisapi object.
    """

    def __init__(
        self,
        address: RedisAddress,
        reactor: IReactorTime,
        reply_timeout: float,
        retry_delay: Callable[[int], float],
        commands_changed: Callable[[bool], None],
        subscriber_changed: Callable[[bool], None],
        message: Callable[[bytes, bytes], None],
        read_done: Callable[[], None],
    ) -> None:
        self.address = address
        self._reactor = reactor
        self.reply_timeout = reply_timeout
        self._retry_delay = retry_delay
        self._commands_changed = commands_changed
        self._subscriber_changed = subscriber_changed
        self._message = message
        self._read_done = read_done
        self._services: list[ClientService] = []
        #: The run id of the Redis the command connection reached (b"" if
        #: unknown), which the scripts compare with the one that numbered the
        #: rooms' events so far.
        self.run_id = b""
        #: Use a connection only once Redis answers ROLE with master (set
        #: when a sentinel names the address, which may be out of date).
        self.master_only = False
        #: The usable connections, None while (re)connecting.
        self._commands: Any = None
        self._subscriber: Any = None
        self._unreachable = logs.Throttle(UNREACHABLE_LOG_SECONDS, reactor)
        #: Redis's error replies (READONLY, NOREPLICAS, OOM ...) come at the rate of requests too.
        self._refused = logs.Throttle(UNREACHABLE_LOG_SECONDS, reactor)
        #: Other connections to drop and make again with these (L{also_reconnect}).
        self._also: list[Reconnects] = []

    @property
    def where(self) -> str:
        """Where the connections go, for the log."""
        return f"{self.address.host}:{self.address.port}"

    @property
    def commands_up(self) -> bool:
        """Whether the command connection is usable."""
        return self._commands is not None

    @property
    def subscriber_up(self) -> bool:
        """Whether the subscriber connection is usable."""
        return self._subscriber is not None

    @property
    def up(self) -> bool:
        """Whether both connections are usable."""
        return self._commands is not None and self._subscriber is not None

    def endpoint(self) -> IStreamClientEndpoint:
        """Where both connections go (L{happyrobot.redis.sentinel} asks the sentinels)."""
        return HostnameEndpoint(self._reactor, self.address.host, self.address.port)

    def start(self) -> None:
        """Start connecting (and reconnecting, with backoff)."""
        command_class, subscriber_class = protocol_classes()
        a = self.address
        factories = [
            ConnectionFactory(command_class, a, True, self._verified(self._commands_ready),
                              self._commands_lost, self._reactor, self.reply_timeout),
            ConnectionFactory(subscriber_class, a, False, self._verified(self._subscriber_ready),
                              self._subscriber_lost, self._reactor, self.reply_timeout,
                              self._message, self._read_done),
        ]
        for factory in factories:
            endpoint = self.endpoint()
            service = ClientService(
                endpoint, factory, retryPolicy=self._retry_delay, clock=self._reactor
            )
            service.startService()
            self._services.append(service)

    def stop(self) -> Deferred[Any]:
        """Close both connections and stop reconnecting."""
        services, self._services = self._services, []
        return gatherResults([s.stopService() for s in services], consumeErrors=True)

    def also_reconnect(self, conn: Reconnects) -> None:
        """Reconnect C{conn} too whenever L{reconnect} does (the intake's reader)."""
        self._also.append(conn)

    def reconnect(self) -> Deferred[Any]:
        """Drop both connections and connect again now (the master changed)."""
        services = list(self._services)
        for conn in self._also:
            conn.reconnect()

        def again(_: object) -> None:
            for service in services:
                if service in self._services:
                    service.startService()

        return gatherResults([s.stopService() for s in services],
                             consumeErrors=True).addBoth(again)

    # ------------------------------------------------------------ connection hooks

    def _verified(self, ready: Callable[[Any], None]) -> Callable[[Any], None]:
        """C{ready}, called only once the connection answered ROLE with master (L{master_only})."""
        if not self.master_only:
            return ready

        def check(proto: Any) -> None:
            def answered(reply: Any) -> None:
                role = reply[0] if isinstance(reply, list) and reply else reply
                if role in (b"master", "master"):
                    ready(proto)
                else:
                    log.warn("the Redis the sentinels named is not a master; asking them again")
                    proto.transport.abortConnection()

            def failed(f: Failure) -> None:
                if not is_connection_error(f):
                    log.warn("Redis answered ROLE with {why}", why=f.getErrorMessage())
                    proto.transport.abortConnection()

            proto.execute_command("ROLE").addCallbacks(answered, failed)

        return check

    def _commands_ready(self, proto: Any) -> None:
        def identified(reply: Any) -> None:
            if not proto.connected:
                return  # lost meanwhile
            self.run_id = run_id(reply)
            self._commands_up(proto)

        proto.execute_command("INFO", "server").addCallbacks(identified, lambda f: identified(b""))

    def _commands_up(self, proto: Any) -> None:
        self._commands = proto
        # Before any EVALSHA on this connection (Redis may have restarted empty).
        for script in ALL_SCRIPTS:
            self._load(script)
        self._commands_changed(True)

    def _commands_lost(self, proto: Any) -> None:
        if proto is self._commands:
            self._commands = None
            self._commands_changed(False)

    def _subscriber_ready(self, proto: Any) -> None:
        self._subscriber = proto
        self._subscriber_changed(True)

    def _subscriber_lost(self, proto: Any) -> None:
        if proto is self._subscriber:
            self._subscriber = None
            self._subscriber_changed(False)

    # ------------------------------------------------------------ commands

    def command(self, *args: Any) -> Deferred[Any]:
        """Run one command on the command connection (a failed Deferred while down)."""
        if self._commands is None:
            return fail(ConnectionError("Redis link down"))
        try:
            return self._commands.execute_command(*args)
        except Exception:
            return fail()

    def eval(self, script: Script, keys: list[bytes], args: list[Any]) -> Deferred[Any]:
        """
        EVALSHA C{script}; on NOSCRIPT (Redis restarted, or SCRIPT FLUSH)
        load it and try once more.
        """
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        d = self.command(*command)

        def reload(failure: Failure) -> Deferred[Any] | Failure:
            if "NOSCRIPT" not in failure.getErrorMessage():
                return failure
            log.info("Redis does not have our scripts: loading them again")
            self._load(script)
            return self.command(*command)

        return d.addErrback(reload)

    def _load(self, script: Script) -> None:
        """SCRIPT LOAD, before the EVALSHAs that follow on the same connection."""

        def failed(f: Failure) -> None:
            if is_response_error(f):
                log.failure("Redis refused our script", f)

        self.command("SCRIPT", "LOAD", script.source).addErrback(failed)

    def forget(self, d: Deferred[Any]) -> None:
        """Run C{d} for its effect; a lost connection is handled elsewhere."""
        d.addErrback(lambda f: log.debug("a Redis command failed: {f}", f=f.getErrorMessage()))

    def unavailable(self, failure: Failure, message: str) -> Failure:
        """
        Log why a request failed (an error reply, or a lost link: each at
        most once every L{UNREACHABLE_LOG_SECONDS}, with how many requests
        failed) and fail with L{Unavailable} instead.
        """
        if is_response_error(failure):
            n = self._refused.due()
            if n:
                log.error("Redis refused a request: {why} ({n} requests refused since the last "
                          "such line)", why=failure.getErrorMessage(), n=n)
        else:
            n = self._unreachable.due()
            if n:
                log.warn("Redis unreachable: {why} ({n} requests failed since the last such line)",
                         why=failure.getErrorMessage(), n=n)
        return Failure(Unavailable(message))

    # ------------------------------------------------------------ subscriber

    def subscribe(self, channel: bytes) -> Deferred[Any] | None:
        """
        SUBSCRIBE to one channel (txredisapi matches one reply per command);
        None when the subscriber connection is down (subscribe again when
        it is back).  The Deferred fails if the connection is lost first.
        """
        if self._subscriber is None:
            return None
        try:
            return self._subscriber.subscribe([channel])
        except Exception:  # txredisapi's ConnectionError: the connection is going
            return None

    def unsubscribe(self, channel: bytes) -> Deferred[Any] | None:
        """UNSUBSCRIBE from one channel; None when the subscription went with its connection."""
        if self._subscriber is None:
            return None
        try:
            return self._subscriber.unsubscribe([channel])
        except Exception:
            return None

    def ping_subscriber(self) -> None:
        """
        PING on the subscriber connection, which only receives: it shows
        that Redis still answers it (or fails after the reply timeout, and
        the connection is dropped).
        """
        if self._subscriber is None:
            return
        try:
            self.forget(self._subscriber.ping())
        except Exception:
            pass  # the connection is going: its connectionLost reports it
