"""
Redis Sentinel failover with real processes (L{tests.sentinel_harness}):
a master, two replicas and three sentinels on loopback ports, and two
RedisBus instances with members of one room on both, while a publisher
sends acknowledged events at a steady rate and the master is SIGKILLed.
Also a single Redis restarted from an older RDB snapshot.
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater

from happyrobot.bus import Unavailable
from happyrobot.redis.bus import RedisBus
from happyrobot.redis.keys import history_key, seq_key
from happyrobot.redis.sentinel import RedisTarget
from happyrobot.rooms import RoomRegistry
from tests.helpers import (
    Client,
    RedisServer,
    RedisTestCase,
    ServerTestCase,
    cancel_txaio_buckets,
    drop_clients,
    free_port,
    listening_twistd,
    wait_until,
)
from tests.sentinel_harness import (
    DOWN_AFTER_MS,
    FAILOVER_TIMEOUT_MS,
    SentinelDeployment,
)
from tests.test_redis import BusNode, Recorder, assert_no_silent_gap, raw_event

#: The publisher's pace: one event every this many seconds, at most EVENTS.
INTERVAL = 0.02
EVENTS = 200
#: How long a refused event waits before it is sent again (same op key).
RETRY_DELAY = 0.05
#: How long the publisher may take in all (bounds the test).
PUBLISH_DEADLINE_SECONDS = 40.0


class TimedRecorder(Recorder):
    """A L{Recorder} that also notes when each frame arrived."""

    def __init__(self, client_id: str) -> None:
        super().__init__(client_id)
        self.times: list[float] = []

    def send(self, frame: bytes) -> None:
        kept = len(self.received)
        super().send(frame)
        if len(self.received) > kept:  # not presence
            self.times.append(time.monotonic())


class Publisher:
    """
    Sends C{EVENTS} events at a steady pace, alternately through each
    instance, each with its own op key, sending a refused one again with the
    same op key until it is acknowledged (as the browser client does).
    """

    def __init__(self, nodes: list[BusNode]) -> None:
        self.nodes = nodes
        #: op -> the seq it was acknowledged with.
        self.acked: dict[str, int] = {}
        self.refusals = 0
        self.sent = 0

    async def one(self, i: int, deadline: float) -> None:
        op = f"op-{i}"
        node = self.nodes[i % len(self.nodes)]
        while time.monotonic() < deadline:
            try:
                self.acked[op] = await node.bus.append("p1", raw_event(op), None, ("pub", op))
                return
            except Unavailable:
                self.refusals += 1
                await deferLater(reactor, RETRY_DELAY, lambda: None)

    async def run(self, count: int) -> None:
        deadline = time.monotonic() + PUBLISH_DEADLINE_SECONDS
        sends = []
        for i in range(count):
            sends.append(Deferred.fromCoroutine(self.one(i, deadline)))
            self.sent += 1
            await deferLater(reactor, INTERVAL, lambda: None)
        await gatherResults(sends)


def events_of(member: Recorder) -> list[dict[str, Any]]:
    return [m for m in member.received if m["type"] == "TASK_UPDATE"]


def client_view(member: Recorder) -> tuple[list[dict[str, Any]], int]:
    """
    What a browser client keeps of what C{member} received: RESYNC_REQUIRED
    sets its last seq, an event at or below it is dropped as seen.  Returns
    the events kept and how many were dropped.
    """
    last, kept, dropped = None, [], 0
    for m in member.received:
        if m["type"] == "RESYNC_REQUIRED":
            last = m["seq"]
        elif last is not None and m["seq"] <= last:
            dropped += 1
        else:
            last = m["seq"]
            kept.append(m)
    return kept, dropped


async def jumps(redis: RedisServer) -> dict[int, int]:
    """The numbering jumps the room's stream records: the seq before -> the seq jumped to."""
    entries = await redis.command("XRANGE", history_key("p1"), "-", "+")
    return {int(fields[3]): int(id_.split("-")[0])
            for id_, fields in entries if len(fields) > 3 and fields[2] == "j"}


def assert_no_silent_gap_but_jumps(test: Any, seqs: list[int], jumped: dict[int, int]) -> None:
    """L{assert_no_silent_gap}, except where the numbering jumped (with nothing missed)."""
    last = None
    for s in seqs:
        if s < 0:
            last = -s
            continue
        if last is not None and s != last + 1:
            test.assertEqual(jumped.get(last), s - 1, (last, s, jumped))
        last = s


class FailoverTestCase(RedisTestCase):
    """A Sentinel deployment and RedisBus instances that follow it."""

    timeout = 120

    async def deployment(self) -> SentinelDeployment:
        deployment = SentinelDeployment(self)
        await deployment.start()
        return deployment

    async def start_bus(self, deployment: SentinelDeployment, min_replicas: int) -> BusNode:
        registry = RoomRegistry(reactor, 0.0)
        target = RedisTarget(sentinels=deployment.sentinel_addresses, min_replicas=min_replicas,
                             min_replicas_timeout_ms=300)
        bus = RedisBus(registry, target, reactor, reconnect_initial_delay=0.05,
                       reconnect_max_delay=0.25)
        bus.startService()
        self.addCleanup(bus.stopService)
        await bus.when(bus.settled)
        return BusNode(registry, bus)

    async def member(self, node: BusNode, client_id: str) -> TimedRecorder:
        m = TimedRecorder(client_id)
        node.registry.join("p1", m)
        await node.settled()
        return m

    async def delivered(self, members: list[Recorder], seq: int) -> None:
        for m in members:
            await Deferred.fromCoroutine(m.until(seq)).addTimeout(20, reactor)


class SentinelFailoverTests(FailoverTestCase):
    """The master dies; Sentinel promotes a replica; the instances follow."""

    async def test_acknowledged_events_survive_with_min_replicas(self) -> None:
        """
        With REDIS_MIN_REPLICAS=1, every acknowledged event reaches every
        member exactly once, in order, across the master's SIGKILL; /health
        (the bus's healthy) is degraded while there is no master; the
        refusal window (kill to first delivery again) is reported.
        """
        deployment = await self.deployment()
        a = await self.start_bus(deployment, 1)
        b = await self.start_bus(deployment, 1)
        members = [await self.member(a, "a1"), await self.member(a, "a2"),
                   await self.member(b, "b1")]
        leaving = await self.member(a, "r1")  # leaves before the kill, resumes after
        publisher = Publisher([a, b])
        publishing = Deferred.fromCoroutine(publisher.run(EVENTS))
        await wait_until(lambda: len(publisher.acked) >= 40, 20, "40 events acknowledged")
        a.registry.leave("p1", leaving)
        seen_before = max(m["seq"] for m in events_of(members[0]))
        killed_at, killed_wall = time.monotonic(), time.time()
        old = await deployment.kill_master()
        await a.bus.when(lambda: not a.bus.healthy)
        await b.bus.when(lambda: not b.bus.healthy)
        down_at = time.monotonic()  # what arrives later comes from the new master
        self.assertFalse(a.bus.healthy or b.bus.healthy)  # /health says degraded
        new = await deployment.failed_over(old)
        await b.settled()
        resumed = await b.resume("r1", max(e["seq"] for e in events_of(leaving)))
        await publishing
        self.assertEqual(len(publisher.acked), EVENTS, "every event acknowledged in the end")
        await a.settled()
        await b.settled()
        self.assertTrue(a.bus.healthy and b.bus.healthy)
        await self.delivered(members + [resumed], max(publisher.acked.values()))
        both = Recorder("r1")  # what the resuming client saw, over both connections
        both.received = leaving.received + resumed.received

        by_seq = {seq: op for op, seq in publisher.acked.items()}
        jumped = await jumps(new)
        self.assertEqual(len(jumped), 1)  # a new master: the numbering goes on above
        for m in members + [both]:
            events = events_of(m)
            ops = [e["operationId"] for e in events]
            lost = [op for op in publisher.acked if op not in ops]
            duplicated = len(ops) - len(set(ops))
            self.assertEqual((lost, duplicated), ([], 0), m.client_id)
            seqs = [e["seq"] for e in events]
            self.assertEqual(seqs, sorted(seqs), "in order")
            for e in events:  # each seq is the event acknowledged with it
                self.assertEqual(by_seq.get(e["seq"], e["operationId"]), e["operationId"])
            assert_no_silent_gap_but_jumps(self, m.seqs(), jumped)
        first_after = min(t for m in members for t, msg in zip(m.times, m.received)
                          if t > down_at and msg.get("seq", 0) > seen_before)
        window = first_after - killed_at
        switched = deployment.switched_at()
        sentinel = f"{switched - killed_wall:.2f} s" if switched else "?"
        print(f"\nfailover REDIS_MIN_REPLICAS=1: {EVENTS} events acknowledged, 0 lost, "
              f"0 duplicated, {publisher.refusals} refusals retried; refused for "
              f"{window:.2f} s (kill to first delivery; +switch-master after {sentinel}; "
              f"down-after-milliseconds {DOWN_AFTER_MS}, failover-timeout "
              f"{FAILOVER_TIMEOUT_MS})")
        # Sentinel's detection, its election and promotion, then our
        # reconnection (and the other replica's resync to the new master),
        # which is what the instances add.
        self.assertIsNotNone(switched)
        assert switched is not None
        self.assertLess(window - (switched - killed_wall), 1.5)

    async def test_held_back_replication_gives_resync(self) -> None:
        """
        With REDIS_MIN_REPLICAS=0 and the replicas paused (CLIENT PAUSE)
        before the kill, the new master lacks the last events: every
        member gets RESYNC_REQUIRED past every seq it saw, and no event
        after the failover is dropped as a duplicate.
        """
        deployment = await self.deployment()
        a = await self.start_bus(deployment, 0)
        b = await self.start_bus(deployment, 0)
        members = [await self.member(a, "a1"), await self.member(a, "a2"),
                   await self.member(b, "b1")]
        before = [await (a if i % 2 else b).bus.append("p1", raw_event(f"x-{i}"))
                  for i in range(10)]
        master = await deployment.master()
        replicas = [r for r in deployment.redis if r is not master]
        for r in replicas:  # the replication stream waits on the replicas
            await r.command("CLIENT", "PAUSE", "700", "ALL")
        held = [await a.bus.append("p1", raw_event(f"h-{i}")) for i in range(5)]
        await self.delivered(members, held[-1])
        old = await deployment.kill_master()
        new = await deployment.failed_over(old)
        await a.settled()
        await b.settled()
        kept = await new.command("XRANGE", history_key("p1"), f"{held[0]}-0", f"{held[-1]}-0")
        self.assertEqual(kept, [], "the new master got none of the held events")
        publisher = Publisher([a, b])
        await publisher.run(10)
        after = sorted(publisher.acked.values())
        self.assertGreater(after[0], held[-1])  # numbered above every seq handed out
        await self.delivered(members, after[-1])
        for m in members:
            kept, dropped = client_view(m)
            self.assertEqual(dropped, 0, m.client_id)
            resyncs = [x["seq"] for x in m.received if x["type"] == "RESYNC_REQUIRED"]
            self.assertTrue(resyncs and held[-1] < resyncs[0] < after[0], (m.client_id, resyncs))
            self.assertEqual([e["seq"] for e in kept], before + held + after)
            assert_no_silent_gap(self, m.seqs())


class SnapshotRestartTests(RedisTestCase):
    """A single Redis restarted from an older RDB snapshot."""

    timeout = 30

    async def redis_and_two_nodes(self) -> tuple[RedisServer, BusNode, BusNode]:
        """A Redis that keeps an RDB file (written only by SAVE), and two buses on it."""
        redis = RedisServer(free_port(), ("--dbfilename", "dump.rdb"))
        await redis.start()
        self.addCleanup(redis.stop)
        nodes = []
        for _ in range(2):
            registry = RoomRegistry(reactor, 0.0)
            bus = RedisBus(registry, redis.url, reactor, reconnect_initial_delay=0.05,
                           reconnect_max_delay=0.25)
            bus.startService()
            self.addCleanup(bus.stopService)
            await bus.when(bus.settled)
            nodes.append(BusNode(registry, bus))
        return redis, nodes[0], nodes[1]

    async def test_older_snapshot_keeps_numbering(self) -> None:
        """
        The counter read back from the snapshot is below seqs the members
        saw: each member gets RESYNC_REQUIRED past them, new events are
        numbered above them (none dropped as a duplicate), and a client
        resuming from a seen seq gets RESYNC_REQUIRED.
        """
        redis, a, b = await self.redis_and_two_nodes()
        members = [await a.member("a1"), await b.member("b1")]
        saved = [await a.bus.append("p1", raw_event(f"s-{i}")) for i in range(3)]
        self.assertEqual(await redis.command("SAVE"), "OK")
        lost = [await b.bus.append("p1", raw_event(f"l-{i}")) for i in range(3)]
        for m in members:
            await m.until(lost[-1])
        await redis.stop()  # no save points: the snapshot stays the older one
        await redis.start()
        self.assertEqual(int(await redis.command("GET", seq_key("p1"))), saved[-1])
        await a.settled()
        await b.settled()
        after = [await a.bus.append("p1", raw_event(f"n-{i}")) for i in range(3)]
        self.assertGreater(after[0], lost[-1])
        for m in members:
            await m.until(after[-1])
            kept, dropped = client_view(m)
            self.assertEqual(dropped, 0)
            self.assertEqual([e["seq"] for e in kept], saved + lost + after)
            assert_no_silent_gap(self, m.seqs())
        replay = await a.bus.replay("p1", lost[-1])
        self.assertIsNone(replay.events)  # the resuming client gets RESYNC_REQUIRED
        self.assertEqual(replay.seq, after[-1])
        self.assertEqual(json.loads(json.dumps(replay.seq)), after[-1])

    async def test_other_instance_numbers_first(self) -> None:
        """
        After a restart from an older snapshot, an instance without members
        in the room numbers new events before the instance whose members
        saw the lost ones has caught up: those members still get
        RESYNC_REQUIRED, then every new event (no silent hole, nothing
        dropped as a duplicate).
        """
        redis, a, b = await self.redis_and_two_nodes()
        member = await a.member("a1")
        saved = [await a.bus.append("p1", raw_event(f"s-{i}")) for i in range(3)]
        self.assertEqual(await redis.command("SAVE"), "OK")
        lost = [await a.bus.append("p1", raw_event(f"l-{i}")) for i in range(3)]
        await member.until(lost[-1])
        a.bus.reconnect_delays = (1.5, 1.5)  # A comes back late
        await redis.stop()
        await redis.start()
        await b.settled()
        self.assertFalse(a.bus.healthy)
        new = [await b.bus.append("p1", raw_event(f"n-{i}")) for i in range(5)]
        self.assertFalse(a.bus.healthy, "B numbered before A came back")
        self.assertGreater(new[0], lost[-1])
        await Deferred.fromCoroutine(member.until(new[-1])).addTimeout(10, reactor)
        kept, dropped = client_view(member)
        self.assertEqual(dropped, 0)
        self.assertEqual([e["seq"] for e in kept], saved + lost + new)
        resyncs = [m["seq"] for m in member.received if m["type"] == "RESYNC_REQUIRED"]
        self.assertEqual(resyncs, [new[0] - 1])
        assert_no_silent_gap(self, member.seqs())


class ProcessFailoverTests(ServerTestCase):
    """The same with two real ``twistd happyrobot-ws`` processes and WebSocket clients."""

    timeout = 120

    async def client(self, port: int, user: str) -> Client:
        """A WebSocket client of the process on C{port}, joined to p1 with since 0."""
        if not hasattr(self, "_clients"):
            self._clients = []
            self.addCleanup(cancel_txaio_buckets)
            self.addCleanup(drop_clients, self._clients)
        self.port_number = port
        c = await self.connect()
        c.send_json({"type": "SET_USER", "payload": {"userId": user}})
        c.send_json({"type": "JOIN_PROJECT", "projectId": "p1", "since": 0})
        await c.next_of("RESYNC_REQUIRED")  # the starting point
        return c

    async def publish(self, c: Client, name: str, count: int, acked: dict[str, int]) -> int:
        """Send C{count} events with ack, one at a time, each again until acknowledged."""
        refused = 0
        deadline = time.monotonic() + PUBLISH_DEADLINE_SECONDS
        for i in range(count):
            op = f"{name}-{i}"
            while op not in acked and time.monotonic() < deadline:
                c.send_json({"type": "TASK_UPDATE", "projectId": "p1", "operationId": op,
                             "ack": True, "payload": {"i": i}})
                while True:
                    msg = await c.next()
                    if msg.get("operationId") == op and msg["type"] in ("ACK", "ERROR"):
                        break
                if msg["type"] == "ACK":
                    acked[op] = msg["seq"]
                    self.ack_times.append(time.monotonic())
                else:
                    self.assertEqual(msg["code"], "UNAVAILABLE", msg)
                    refused += 1
                    await deferLater(reactor, RETRY_DELAY, lambda: None)
            await deferLater(reactor, INTERVAL, lambda: None)
        return refused

    async def health(self, port: int) -> str:
        self.port_number = port
        _, body, _ = await self.http("GET", "/health")
        return str(body["status"])

    async def test_processes_follow_the_failover(self) -> None:
        """
        REDIS_SENTINELS and REDIS_MIN_REPLICAS=1 through the settings: /health
        goes degraded and back, and every acknowledged event reaches every
        member on both processes exactly once, in order.
        """
        deployment = SentinelDeployment(self)
        await deployment.start()
        env = {"REDIS_SENTINELS": ",".join(f"{h}:{p}" for h, p in deployment.sentinel_addresses),
               "REDIS_MIN_REPLICAS": "1", "REDIS_MIN_REPLICAS_TIMEOUT_MS": "300",
               "PRESENCE_WINDOW_MS": "0"}
        ports = []
        for _ in range(2):
            proc, transport, port = await listening_twistd(self, [], env)
            self.addCleanup(self.ended, proc, transport)
            await proc.wait_for(b"Redis link up")
            ports.append(port)
        self.ack_times: list[float] = []
        members = [await self.client(ports[0], "m1"), await self.client(ports[0], "m2"),
                   await self.client(ports[1], "m3")]
        publishers = [await self.client(ports[0], "p1"), await self.client(ports[1], "p2")]
        acked: dict[str, int] = {}
        publishing = gatherResults([
            Deferred.fromCoroutine(self.publish(c, f"pub{i}", 60, acked))
            for i, c in enumerate(publishers)])
        await wait_until(lambda: len(acked) >= 20, 20, "20 events acknowledged")
        killed_wall = time.time()
        old = await deployment.kill_master()
        killed_at = time.monotonic()
        for _ in range(100):
            if await self.health(ports[0]) == "degraded":
                break
            await deferLater(reactor, 0.05, lambda: None)
        else:
            self.fail("/health never said degraded")
        degraded_after = time.monotonic() - killed_at
        self.assertNotEqual(await self.health(ports[1]), "healthy")
        new = await deployment.failed_over(old)
        refused = sum(await publishing)
        self.assertEqual(len(acked), 120)
        self.assertEqual([await self.health(p) for p in ports], ["healthy", "healthy"])
        jumped = await jumps(new)
        last = max(acked.values())
        for m in members:
            received = []
            while not received or received[-1].get("seq", 0) < last:
                msg = await m.next().addTimeout(20, reactor)
                if msg["type"] in ("TASK_UPDATE", "RESYNC_REQUIRED"):
                    received.append(msg)
            ops = [x["operationId"] for x in received if x["type"] == "TASK_UPDATE"]
            self.assertEqual(sorted(ops), sorted(acked), "each acknowledged event once")
            self.assertEqual([x["seq"] for x in received if x["type"] == "TASK_UPDATE"],
                             sorted(acked.values()), "in order, with the acknowledged seqs")
            assert_no_silent_gap_but_jumps(
                self, [x["seq"] if x["type"] != "RESYNC_REQUIRED" else -x["seq"]
                       for x in received], jumped)
        window = min(t for t in self.ack_times if t > killed_at) - killed_at
        switched = deployment.switched_at()
        sentinel = f"{switched - killed_wall:.2f} s" if switched else "?"
        print(f"\nprocesses REDIS_MIN_REPLICAS=1: 120 events acknowledged, 0 lost, "
              f"0 duplicated, {refused} refusals retried; /health degraded "
              f"{degraded_after:.2f} s after the kill; refused for {window:.2f} s "
              f"(kill to first ACK; +switch-master after {sentinel})")

    @staticmethod
    async def ended(proc: Any, transport: Any) -> None:
        """Stop a server process and wait until it has exited."""
        if not proc.ended.called:
            transport.signalProcess("KILL")
            await proc.ended
