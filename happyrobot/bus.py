"""
Fan-out of room events.  The rest of the server publishes through a L{Bus}
and never delivers to sockets itself, so one process and many processes
behind a shared broker look the same to it.

L{LocalBus} is the embedded engine, used when no ``REDIS_URL`` is set: it
hands each event straight to this process's room registry.  With
``REDIS_URL``, L{happyrobot.redis.bus.RedisBus} fans events out through
Redis to every instance of the deployment.  Both are services the wiring
starts and stops, and both answer the whole L{Bus} protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from twisted.application.internet import TimerService
from twisted.application.service import IServiceCollection, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from happyrobot import logs
from happyrobot.framing import text_frame
from happyrobot.history import Histories, OpKey
from happyrobot.messages import ProtocolError
from happyrobot.operator import Actions, LocalOperator, Operator
from happyrobot.rooms import RoomRegistry

log = logs.get_logger(__name__)

#: How often the in-memory engine forgets histories whose events aged out.
HISTORY_SWEEP_SECONDS = 60.0


@dataclass(frozen=True)
class Replay:
    """What a client resuming with ``since`` missed."""

    #: The room's events after ``since`` (JSON with ``seq``), oldest first;
    #: None when the history no longer reaches back that far.
    events: list[bytes] | None
    #: The room's latest seq when the history was read.
    seq: int


class Bus(Protocol):
    """What the WebSocket and HTTP adapters publish through."""

    #: Which engine this is (``local`` or ``redis``), for /metrics.
    engine: str
    @property
    def operator(self) -> Operator:
        """The operator API's actions (revoke, disconnect, presence) across the deployment."""

    @property
    def healthy(self) -> bool:
        """Whether events currently reach every instance."""

    def append(
        self,
        project_id: str,
        event: bytes,
        exclude: str | None = None,
        op_key: OpKey | None = None,
    ) -> Deferred[int]:
        """
        Number C{event} (a serialised JSON object) as the room's next event
        across the deployment, keep it in the room's history, and deliver it
        with its ``seq`` to every member of the room but connection
        C{exclude}.  Fires with the seq.  With the C{op_key} of an event
        still in the history (a retry), fires with the original seq and
        delivers nothing.
        """

    def flush(self) -> None:
        """
        Send the appends made so far (the end of an incoming read); they are
        also sent on the next reactor turn without it.
        """

    def replay(self, project_id: str, since: int) -> Deferred[Replay]:
        """
        The room's events after C{since}.  The caller has joined the room
        with C{hold=True}, so live events wait for it meanwhile; the history
        is read once this instance is sure to receive the room's live
        events, so that nothing falls between the two.
        """

    def member_count(self, project_id: str) -> Deferred[int]:
        """How many connections are in the room, across the deployment."""

    def cluster_stats(self) -> Deferred[dict[str, Any]]:
        """
        The body of ``/stats``: C{totalClients}, C{totalProjects} and
        C{projectStats} (per room its C{clientCount} and C{clients}), for
        every instance the engine reaches.
        """

    def setServiceParent(self, parent: IServiceCollection) -> Any:
        """Become a child of the service that starts and stops the engine."""


class LocalBus(Service):
    """
    The in-memory engine: one process, delivery in the same call.  As a
    service it forgets, every L{HISTORY_SWEEP_SECONDS}, the histories whose
    events have all aged out.

    @param connection_count: how many WebSockets this process has open (for /stats).
    @param actions: what operator calls do here (with the project authorizer).
    """

    healthy = True
    engine = "local"

    def __init__(
        self,
        registry: RoomRegistry,
        histories: Histories,
        clock: IReactorTime,
        connection_count: Callable[[], int] = lambda: 0,
        actions: Actions | None = None,
    ) -> None:
        self._registry = registry
        self.operator = LocalOperator(actions or Actions(registry))
        self._histories = histories
        self._clock = clock
        self._connection_count = connection_count
        self._sweeper = TimerService(HISTORY_SWEEP_SECONDS, self._sweep_logged)
        self._sweeper.clock = clock

    def startService(self) -> None:
        super().startService()
        self._sweeper.startService()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        return self._sweeper.stopService()

    def append(
        self,
        project_id: str,
        event: bytes,
        exclude: str | None = None,
        op_key: OpKey | None = None,
    ) -> Deferred[int]:
        now = self._clock.seconds()
        seq, data = self._histories.append(project_id, event, now, op_key)
        if data is not None:
            self._registry.deliver(project_id, text_frame(data), exclude, seq)
        return succeed(seq)

    def flush(self) -> None:
        """Nothing waits: L{append} delivers at once."""

    def replay(self, project_id: str, since: int) -> Deferred[Replay]:
        now = self._clock.seconds()
        history = self._histories.get(project_id, now)
        return succeed(Replay(history.since(since, now), history.seq))

    def member_count(self, project_id: str) -> Deferred[int]:
        return succeed(self._registry.member_count(project_id))

    def cluster_stats(self) -> Deferred[dict[str, Any]]:
        """``/stats`` for this process, the only instance."""
        rooms = self._registry.snapshot()
        return succeed({
            "totalClients": self._connection_count(),
            "totalProjects": len(rooms),
            "projectStats": {
                pid: {"clientCount": len(ids), "clients": ids} for pid, ids in rooms.items()
            },
        })

    def sweep(self) -> None:
        """Forget the histories whose events have all aged out."""
        self._histories.sweep(self._clock.seconds())

    def _sweep_logged(self) -> None:
        # One failed sweep is logged; the timer keeps going.
        try:
            self.sweep()
        except Exception:
            log.failure("periodic sweep failed")


class Unavailable(ProtocolError):
    """
    Redis cannot be reached: the event was not numbered (so it was sent to
    nobody), or the history could not be read.  An C{ERROR} with code
    C{UNAVAILABLE}; the client retries (an event with the same
    operationId is not delivered twice).
    """

    def __init__(self, message: str) -> None:
        super().__init__("UNAVAILABLE", message)


