"""
The connections beside the bus's two (L{happyrobot.redis.client.RedisLink}):
a one-shot command (L{ask}: the sentinels' questions, the command line's
XADD), a subscription that follows one channel (L{Subscription}: the
sentinels' C{+switch-master}), and a command connection of its own
(L{SingleConnection}: the intake's blocking reads).  They are built from
L{happyrobot.redis.client}'s factory and protocols; txredisapi itself is
imported there only.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.python.failure import Failure

from happyrobot import logs
from happyrobot.config import RedisAddress
from happyrobot.redis.client import ConnectionFactory, protocol_classes

log = logs.get_logger(__name__)

def ask(reactor: IReactorTime, address: RedisAddress, timeout: float, *command: Any,
        select_db: bool = False) -> Deferred[Any]:
    """
    Connect to C{address} (AUTH with its password, if any, and with
    C{select_db} SELECT its database), run one command, close: the reply,
    or a failure after C{timeout} seconds at most (a sentinel's questions,
    the command line's XADD).
    """
    command_class, _ = protocol_classes()
    result: Deferred[Any] = Deferred()
    protos: list[Any] = []

    def ready(proto: Any) -> None:
        def done(reply: Any) -> None:
            proto.transport.loseConnection()
            if not result.called:
                result.callback(reply) if not isinstance(reply, Failure) else result.errback(reply)

        if result.called:  # timed out meanwhile
            proto.transport.abortConnection()
            return
        proto.execute_command(*command).addBoth(done)

    def lost(proto: Any) -> None:
        if not result.called:
            result.errback(ConnectionError(f"{address.host}:{address.port} closed the connection"))

    factory = ConnectionFactory(command_class, address, select_db, ready, lost, reactor,
                                timeout)
    endpoint = HostnameEndpoint(reactor, address.host, address.port, timeout=max(1, int(timeout)))

    def connected(proto: Any) -> None:
        protos.append(proto)

    def not_connected(f: Failure) -> None:
        if not result.called:
            result.errback(f)

    endpoint.connect(factory).addCallbacks(connected, not_connected)

    def cancelled(outcome: Any, _: float) -> Any:
        for proto in protos:
            proto.transport.abortConnection()
        return outcome

    result.addTimeout(timeout, reactor, onTimeoutCancel=cancelled)
    return result


class Subscription:
    """
    One channel subscribed to on whichever server C{endpoint} connects to,
    reconnecting with backoff (the sentinels' C{+switch-master}).

    @param message: called with each message's channel and data.
    """

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        address: RedisAddress,
        channel: bytes,
        message: Callable[[bytes, bytes], None],
        reactor: IReactorTime,
        reply_timeout: float,
        retry_delay: Callable[[int], float],
    ) -> None:
        _, subscriber_class = protocol_classes()
        self._channel = channel
        factory = ConnectionFactory(subscriber_class, address, False, self._connected,
                                    lambda proto: None, reactor, reply_timeout, message,
                                    lambda: None)
        self._service = ClientService(endpoint, factory, retryPolicy=retry_delay, clock=reactor)

    def _connected(self, proto: Any) -> None:
        proto.subscribe([self._channel]).addErrback(
            lambda f: log.debug("SUBSCRIBE failed: {f}", f=f.getErrorMessage()))

    def start(self) -> None:
        """Connect and subscribe (again after every lost connection)."""
        self._service.startService()

    def stop(self) -> Deferred[Any]:
        """Close the connection and stop reconnecting."""
        return self._service.stopService()


class SingleConnection:
    """
    One more command connection, kept up by a L{ClientService} with
    backoff, for commands that block (C{XREADGROUP ... BLOCK}): a blocking
    read on the bus's command connection would hold up every command
    queued behind it.  Each connection attempt goes where C{endpoint()},
    called again at each L{reconnect}, goes.  The owner hears of the
    connection becoming usable or lost through C{changed}.
    """

    def __init__(
        self,
        address: RedisAddress,
        endpoint: Callable[[], IStreamClientEndpoint],
        reactor: IReactorTime,
        reply_timeout: float,
        retry_delay: Callable[[int], float],
        changed: Callable[[bool], None],
    ) -> None:
        self.address = address
        self._endpoint = endpoint
        self._reactor = reactor
        self._reply_timeout = reply_timeout
        self._retry_delay = retry_delay
        self._changed = changed
        self._service: ClientService | None = None
        self._proto: Any = None

    @property
    def up(self) -> bool:
        """Whether the connection is usable."""
        return self._proto is not None

    def start(self) -> None:
        """Start connecting (and reconnecting, with backoff)."""
        command_class, _ = protocol_classes()
        factory = ConnectionFactory(command_class, self.address, True, self._connected, self._lost,
                                    self._reactor, self._reply_timeout)
        self._service = ClientService(self._endpoint(), factory, retryPolicy=self._retry_delay,
                                      clock=self._reactor)
        self._service.startService()

    def stop(self) -> Deferred[Any]:
        """Close the connection and stop reconnecting."""
        service, self._service = self._service, None
        if service is None:
            return succeed(None)
        return service.stopService()

    def reconnect(self) -> Deferred[Any]:
        """
        Drop the connection and connect again now, to where the endpoint
        goes then (the master changed, or the Redis reached is a replica now).
        """
        service = self._service
        if service is None:
            return succeed(None)

        def again(_: object) -> None:
            if self._service is service:  # not stopped meanwhile, nor reconnected
                self.start()

        return service.stopService().addBoth(again)

    def command(self, *args: Any) -> Deferred[Any]:
        """Run one command (a failed Deferred while the connection is down)."""
        if self._proto is None:
            return fail(ConnectionError("Redis link down"))
        try:
            return self._proto.execute_command(*args)
        except Exception:
            return fail()

    def _connected(self, proto: Any) -> None:
        self._proto = proto
        self._changed(True)

    def _lost(self, proto: Any) -> None:
        if proto is self._proto:
            self._proto = None
            self._changed(False)
