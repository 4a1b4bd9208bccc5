"""
Redis Sentinel: which Redis is the master, asked of the sentinels, and
followed when they promote another.

With C{REDIS_SENTINELS} the bus's two connections (L{RedisLink}) go to the
address the sentinels name (C{SENTINEL get-master-addr-by-name}, asked of
each sentinel in turn), and are used only once that Redis answers ROLE
with master.  When a connection drops, the next attempt asks again; when a
sentinel announces C{+switch-master} for our master, both connections (and
the intake's reader, registered with C{also_reconnect}) are dropped and
made again at once.  The bus then recovers as after any
outage: it subscribes again, registers its members again and catches up
from the rooms' streams.

The parsing is pure (tested without Redis); the connections are
L{happyrobot.redis.client}'s.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from happyrobot import logs
from happyrobot.config import Config, RedisAddress, redis_address
from happyrobot.redis.client import RedisLink
from happyrobot.redis.connections import Subscription, ask

log = logs.get_logger(__name__)

#: How long one sentinel may take to answer before the next one is asked.
SENTINEL_TIMEOUT_SECONDS = 1.0
#: The channel on which sentinels announce a new master.
SWITCH_CHANNEL = b"+switch-master"
#: Used for the master's credentials and database when only sentinels are given.
_NO_URL = "redis://sentinel-named-master"

Address = tuple[str, int]


@dataclass(frozen=True)
class RedisTarget:
    """
    Where the bus finds Redis, and how sure an append must be before it is
    acknowledged.

    @ivar url: REDIS_URL: the address (without sentinels), the user name,
        password and database.
    @ivar sentinels: REDIS_SENTINELS, empty without.
    @ivar min_replicas: REDIS_MIN_REPLICAS: replicas that must confirm a
        turn's appends (WAIT) before they are acknowledged.
    """

    url: str = _NO_URL
    sentinels: tuple[Address, ...] = ()
    master: str = "mymaster"
    sentinel_password: str | None = None
    min_replicas: int = 0
    min_replicas_timeout_ms: int = 500

    @classmethod
    def from_config(cls, config: Config) -> RedisTarget:
        """The target the settings describe (REDIS_URL or REDIS_SENTINELS, or both)."""
        return cls(
            config.redis_url or _NO_URL, config.redis_sentinels, config.redis_sentinel_master,
            config.redis_sentinel_password or None, config.redis_min_replicas,
            config.redis_min_replicas_timeout_ms,
        )

    def link(self, reactor: IReactorTime, *args: Any) -> RedisLink:
        """The bus's L{RedisLink} (the arguments after the address), following the sentinels."""
        address = redis_address(self.url)
        if not self.sentinels:
            return RedisLink(address, reactor, *args)
        return SentinelLink(self, address, reactor, *args)


def master_address(reply: Any) -> Address | None:
    """The C{(host, port)} of a C{get-master-addr-by-name} reply; None when unknown."""
    if not isinstance(reply, (list, tuple)) or len(reply) != 2:
        return None
    host, port = (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                  for v in reply)
    return (host, int(port)) if host and port.isdigit() else None


def switched_to(data: bytes, master: str) -> Address | None:
    """
    The new address a C{+switch-master} message announces
    (C{name old-ip old-port new-ip new-port}), when it is about C{master}.
    """
    parts = data.decode("utf-8", "replace").split()
    if len(parts) != 5 or parts[0] != master or not parts[4].isdigit():
        return None
    return parts[3], int(parts[4])


class Sentinels:
    """
    Asks the sentinels, in turn, where the master is; the last one that
    answered is asked first next time.

    @param ask: runs one command on one sentinel (L{client.ask}, bound).
    """

    def __init__(
        self,
        sentinels: tuple[Address, ...],
        master: str,
        ask: Callable[[Address, tuple[Any, ...]], Deferred[Any]],
    ) -> None:
        self.sentinels = list(sentinels)
        self.master = master
        self._ask = ask
        #: The master's address as last named, None before.
        self.current: Address | None = None
        #: A new master a sentinel announced, tried next without asking.
        self._announced: Address | None = None

    def announced(self, address: Address, sentinel: Address) -> bool:
        """
        C{sentinel} announced C{address} as the new master (+switch-master):
        the next attempt goes there, and that sentinel is asked first after
        (the others may still name the old master for a while).  False when
        it was announced already.
        """
        if sentinel in self.sentinels:
            self.sentinels.remove(sentinel)
            self.sentinels.insert(0, sentinel)
        if address in (self._announced, self.current):
            return False
        self._announced = address
        return True

    def locate(self) -> Deferred[Address]:
        """The master's address, or a failure naming what each sentinel answered."""
        return Deferred.fromCoroutine(self._locate())

    async def _locate(self) -> Address:
        announced, self._announced = self._announced, None
        if announced is not None:
            return self._found(announced)
        why = []
        for i, sentinel in enumerate(list(self.sentinels)):
            try:
                reply = await self._ask(sentinel, ("SENTINEL", "get-master-addr-by-name",
                                                   self.master))
            except CancelledError:
                raise  # the connection attempt was given up
            except Exception as e:
                why.append(f"{sentinel[0]}:{sentinel[1]}: {e or type(e).__name__}")
                continue
            found = master_address(reply)
            if found is None:
                why.append(f"{sentinel[0]}:{sentinel[1]}: does not know {self.master!r}")
                continue
            if i:  # ask the one that answered first next time
                self.sentinels.remove(sentinel)
                self.sentinels.insert(0, sentinel)
            return self._found(found)
        raise ConnectionError("no sentinel named the master: " + "; ".join(why))

    def _found(self, found: Address) -> Address:
        if found != self.current:
            log.info("the sentinels name {host}:{port} as master {name}",
                     host=found[0], port=found[1], name=self.master)
            self.current = found
        return found


@implementer(IStreamClientEndpoint)
class MasterEndpoint:
    """Connects to the master the sentinels name at each attempt."""

    def __init__(self, reactor: Any, sentinels: Sentinels) -> None:
        self._reactor = reactor
        self._sentinels = sentinels

    def connect(self, factory: Any) -> Deferred[Any]:
        steps: list[Deferred[Any]] = []

        def cancel(_: Deferred[Any]) -> None:
            steps[-1].cancel()

        result: Deferred[Any] = Deferred(cancel)

        def located(address: Address) -> None:
            if result.called:
                return
            endpoint = HostnameEndpoint(self._reactor, address[0], address[1])
            steps.append(endpoint.connect(factory))
            steps[-1].addBoth(settle)

        def settle(outcome: Any) -> None:
            if not result.called:
                (result.errback if isinstance(outcome, Failure) else result.callback)(outcome)

        steps.append(self._sentinels.locate())
        steps[0].addCallbacks(located, settle)
        return result


class SentinelLink(RedisLink):
    """
    A L{RedisLink} whose connections go to the master the sentinels name,
    and that reconnects at once when they announce another.
    """

    def __init__(self, target: RedisTarget, address: RedisAddress, reactor: IReactorTime,
                 reply_timeout: float, retry_delay: Callable[[int], float],
                 *callbacks: Any) -> None:
        super().__init__(address, reactor, reply_timeout, retry_delay, *callbacks)
        self.master_only = True
        self.target = target

        def ask_one(sentinel: Address, command: tuple[Any, ...]) -> Deferred[Any]:
            where = RedisAddress(sentinel[0], sentinel[1], password=target.sentinel_password)
            return ask(reactor, where, SENTINEL_TIMEOUT_SECONDS, *command)

        self.sentinels = Sentinels(target.sentinels, target.master, ask_one)
        # Every sentinel is listened to: the one that led the failover
        # announces it first, the others learn of it up to seconds later.
        self._watches = [
            Subscription(
                HostnameEndpoint(reactor, host, port, timeout=int(SENTINEL_TIMEOUT_SECONDS)),
                RedisAddress(host, port, password=target.sentinel_password), SWITCH_CHANNEL,
                functools.partial(self._announced, (host, port)), reactor, reply_timeout,
                retry_delay,
            )
            for host, port in target.sentinels
        ]

    @property
    def where(self) -> str:
        sentinels = ",".join(f"{h}:{p}" for h, p in self.target.sentinels)
        return f"the master {self.target.master!r} named by the sentinels {sentinels}"

    def endpoint(self) -> IStreamClientEndpoint:
        return MasterEndpoint(self._reactor, self.sentinels)

    def start(self) -> None:
        super().start()
        for watch in self._watches:
            watch.start()

    def stop(self) -> Deferred[Any]:
        return gatherResults([w.stop() for w in self._watches] + [super().stop()],
                             consumeErrors=True)

    def _announced(self, sentinel: Address, channel: bytes, data: bytes) -> None:
        new = switched_to(data, self.target.master)
        if new is None or not self.sentinels.announced(new, sentinel):
            return  # not ours, or heard already (or we noticed the loss first)
        log.warn("the sentinels promoted {host}:{port} to master {name}; connecting to it",
                 host=new[0], port=new[1], name=self.target.master)
        self.reconnect()
