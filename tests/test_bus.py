"""Tests for the embedded engine (LocalBus) as a service answering the whole Bus protocol."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from happyrobot.bus import HISTORY_SWEEP_SECONDS, LocalBus
from happyrobot.history import Histories
from happyrobot.rooms import RoomRegistry
from happyrobot.tap import DrainService, Options, makeService


class Member:
    """A registry member that keeps its frames."""

    def __init__(self, client_id: str) -> None:
        self.client_id, self.user_id, self.initials = client_id, "u-" + client_id, "U"
        self.frames: list[bytes] = []
        self.writer = self

    def send(self, frame: bytes) -> None:
        self.frames.append(frame)


class LocalBusTests(SynchronousTestCase):
    """The in-memory engine."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = RoomRegistry(self.clock, 0.0)
        self.histories = Histories(100, 10.0, 1 << 20, 1 << 24)
        self.connections = 3
        self.bus = LocalBus(self.registry, self.histories, self.clock, lambda: self.connections)

    def test_cluster_stats_for_this_process(self) -> None:
        """/stats from the embedded engine: this process's connections and rooms, nothing more."""
        self.registry.join("p1", Member("c1"))
        self.registry.join("p1", Member("c2"))
        self.registry.join("p2", Member("c3"))
        body = self.successResultOf(self.bus.cluster_stats())
        self.assertEqual(body, {
            "totalClients": 3,
            "totalProjects": 2,
            "projectStats": {"p1": {"clientCount": 2, "clients": ["c1", "c2"]},
                             "p2": {"clientCount": 1, "clients": ["c3"]}},
        })

    def test_service_sweeps_aged_histories(self) -> None:
        """While running, the bus forgets histories whose events aged out, every sweep period."""
        self.successResultOf(self.bus.append("p1", b'{"type":"X"}'))
        self.assertEqual(len(self.histories), 1)
        self.bus.startService()
        self.clock.advance(HISTORY_SWEEP_SECONDS)
        self.assertEqual(len(self.histories), 0)
        self.successResultOf(self.bus.append("p1", b'{"type":"X"}'))
        self.bus.stopService()
        self.clock.advance(HISTORY_SWEEP_SECONDS * 3)
        self.assertEqual(len(self.histories), 1)  # stopped: no more sweeps
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_made_a_child_of_the_drain(self) -> None:
        """Without REDIS_URL the LocalBus is a child of the drain, like the Redis bus."""
        options = Options(environ={})
        options.parseOptions(["--env-file="])
        service = makeService(options, MemoryReactorClock())
        bus = service.factory.bus  # type: ignore[attr-defined]
        self.assertIsInstance(bus, LocalBus)
        drains = [s for s in service if isinstance(s, DrainService)]
        self.assertEqual([bus in list(d) for d in drains], [True])
