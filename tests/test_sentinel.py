"""
L{happyrobot.redis.sentinel}: the pure parsing and the order in which the
sentinels are asked (no Redis), the acknowledgement by WAIT
(REDIS_MIN_REPLICAS) against a real redis-server with and without a
replica, and a manual failover (SENTINEL FAILOVER, the old master still
running) followed through C{+switch-master}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase

from happyrobot.bus import Unavailable
from happyrobot.config import load_config
from happyrobot.redis.bus import RedisBus
from happyrobot.redis.client import RedisLink, run_id
from happyrobot.redis.events import UNCONFIRMED
from happyrobot.redis.sentinel import (
    RedisTarget,
    SentinelLink,
    Sentinels,
    master_address,
    switched_to,
)
from happyrobot.rooms import RoomRegistry
from tests.helpers import RedisServer, RedisTestCase, free_port
from tests.sentinel_harness import MASTER_NAME, SentinelDeployment
from tests.test_failover import jumps
from tests.test_redis import BusNode, raw_event


class ParsingTests(SynchronousTestCase):
    """The sentinels' replies and announcements."""

    def test_master_address(self) -> None:
        """get-master-addr-by-name gives host and port; anything else is unknown."""
        self.assertEqual(master_address([b"10.0.0.5", b"6380"]), ("10.0.0.5", 6380))
        self.assertEqual(master_address(["h", "6379"]), ("h", 6379))
        for reply in (None, [], [b"h"], [b"h", b"x"], [b"", b"1"], b"h 1"):
            self.assertIsNone(master_address(reply), reply)

    def test_switched_to(self) -> None:
        """+switch-master for our master gives the new address; others are ignored."""
        self.assertEqual(switched_to(b"mymaster 10.0.0.1 6379 10.0.0.2 6380", "mymaster"),
                         ("10.0.0.2", 6380))
        self.assertIsNone(switched_to(b"other 10.0.0.1 6379 10.0.0.2 6380", "mymaster"))
        self.assertIsNone(switched_to(b"mymaster 10.0.0.1 6379", "mymaster"))
        self.assertIsNone(switched_to(b"mymaster a 1 b x", "mymaster"))


class RunIdTests(SynchronousTestCase):
    """The run id read from INFO server, which marks a new Redis for the scripts."""

    def test_run_id(self) -> None:
        info = b"# Server\r\nredis_version:7.0.15\r\nrun_id:8a1f\r\ntcp_port:6379\r\n"
        self.assertEqual(run_id(info), b"8a1f")
        self.assertEqual(run_id(b"# Server\r\n"), b"")
        self.assertEqual(run_id(None), b"")


class LocateTests(SynchronousTestCase):
    """Sentinels.locate asks each sentinel in turn."""

    def sentinels(self, answers: dict[tuple[str, int], Any]) -> tuple[Sentinels, list[Any]]:
        asked: list[Any] = []

        def ask(sentinel: tuple[str, int], command: tuple[Any, ...]) -> Deferred[Any]:
            asked.append(sentinel)
            self.assertEqual(command, ("SENTINEL", "get-master-addr-by-name", "mymaster"))
            answer = answers[sentinel]
            return fail(answer) if isinstance(answer, Exception) else succeed(answer)

        return Sentinels(tuple(answers), "mymaster", ask), asked

    def test_first_that_knows(self) -> None:
        """A sentinel that fails or does not know the master is skipped; it is asked last next."""
        s1, s2, s3 = ("s1", 1), ("s2", 2), ("s3", 3)
        sentinels, asked = self.sentinels({s1: ConnectionRefusedError("refused"), s2: None,
                                           s3: [b"m", b"6379"]})
        self.assertEqual(self.successResultOf(sentinels.locate()), ("m", 6379))
        self.assertEqual(asked, [s1, s2, s3])
        self.assertEqual(sentinels.current, ("m", 6379))
        del asked[:]
        self.assertEqual(self.successResultOf(sentinels.locate()), ("m", 6379))
        self.assertEqual(asked, [s3])

    def test_announced_master_tried_first(self) -> None:
        """
        A +switch-master goes to the next attempt without asking, once; the
        sentinel that announced it is asked first afterwards.
        """
        s1, s2 = ("s1", 1), ("s2", 2)
        sentinels, asked = self.sentinels({s1: [b"old", b"1"], s2: [b"new", b"2"]})
        self.assertEqual(self.successResultOf(sentinels.locate()), ("old", 1))
        self.assertTrue(sentinels.announced(("new", 2), s2))
        self.assertFalse(sentinels.announced(("new", 2), s1))  # heard already
        del asked[:]
        self.assertEqual(self.successResultOf(sentinels.locate()), ("new", 2))
        self.assertEqual(asked, [])
        self.assertEqual(sentinels.sentinels, [s1, s2])  # the last one announcing is first
        self.assertFalse(sentinels.announced(("new", 2), s2))  # where we are already
        self.assertEqual(self.successResultOf(sentinels.locate()), ("new", 2))
        self.assertEqual(asked, [s2])

    def test_none_knows(self) -> None:
        """When no sentinel names the master, the failure says what each answered."""
        sentinels, _ = self.sentinels({("s1", 1): ConnectionRefusedError("refused"),
                                       ("s2", 2): [b"", b""]})
        failure = self.failureResultOf(sentinels.locate(), ConnectionError)
        message = failure.getErrorMessage()
        self.assertIn("s1:1: ", message)
        self.assertIn("s2:2: does not know 'mymaster'", message)


class TargetTests(SynchronousTestCase):
    """RedisTarget from the settings, and the link it makes."""

    def test_from_config(self) -> None:
        """The sentinels, master name, passwords and replicas come from the settings."""
        config = load_config({}, {
            "REDIS_SENTINELS": "s1:26379,s2:26379", "REDIS_SENTINEL_MASTER": "cache",
            "REDIS_SENTINEL_PASSWORD": "sp", "REDIS_URL": "redis://:rp@ignored:1/2",
            "REDIS_MIN_REPLICAS": "1", "REDIS_MIN_REPLICAS_TIMEOUT_MS": "200",
        })
        target = RedisTarget.from_config(config)
        self.assertEqual(target, RedisTarget("redis://:rp@ignored:1/2",
                                             (("s1", 26379), ("s2", 26379)), "cache", "sp",
                                             1, 200))
        link = target.link(reactor, 1.0, lambda n: 0.1, *[lambda *a: None] * 4)
        self.assertIsInstance(link, SentinelLink)
        self.assertTrue(link.master_only)
        self.assertEqual((link.address.password, link.address.db), ("rp", 2))
        self.assertIn("'cache'", link.where)

    def test_url_alone(self) -> None:
        """REDIS_URL alone makes the plain link to its address, as before."""
        target = RedisTarget.from_config(load_config({}, {"REDIS_URL": "redis://h:7/1"}))
        link = target.link(reactor, 1.0, lambda n: 0.1, *[lambda *a: None] * 4)
        self.assertIs(type(link), RedisLink)
        self.assertFalse(link.master_only)
        self.assertEqual(link.where, "h:7")


class MinReplicasTests(RedisTestCase):
    """REDIS_MIN_REPLICAS: an append is acknowledged once WAIT confirms it."""

    timeout = 30

    async def bus(self, redis: RedisServer, min_replicas: int) -> BusNode:
        registry = RoomRegistry(reactor, 0.0)
        bus = RedisBus(registry, RedisTarget(redis.url, min_replicas=min_replicas,
                                             min_replicas_timeout_ms=1000), reactor)
        bus.startService()
        self.addCleanup(bus.stopService)
        await bus.when(bus.settled)
        return BusNode(registry, bus)

    async def test_unconfirmed_then_confirmed(self) -> None:
        """
        Without a replica the append is refused as unconfirmed (stored, and
        delivered); with one, its retry with the same op key gets the
        original seq, and new appends, single or batched, are acknowledged.
        """
        redis = await self.start_redis()
        a = await self.bus(redis, 1)
        watcher = await a.member("w")
        d = a.bus.append("p1", raw_event("op-1"), None, ("u", "op-1"))
        failure = await self.assertFailure(d, Unavailable)
        self.assertEqual(str(failure), UNCONFIRMED)
        replica = RedisServer(free_port(), ("--replicaof", "127.0.0.1", str(redis.port)))
        await replica.start()
        self.addCleanup(replica.stop)
        for _ in range(200):  # at most 10 s
            if "state=online" in await redis.command("INFO", "replication"):
                break
            await deferLater(reactor, 0.05, lambda: None)
        else:
            self.fail("the replica never came online")
        first = await a.bus.append("p1", raw_event("op-1"), None, ("u", "op-1"))
        batch = [a.bus.append("p1", raw_event(f"b-{i}"), None, ("u", f"b-{i}")) for i in range(3)]
        seqs = [await d for d in batch]
        self.assertEqual(seqs, [first + 1, first + 2, first + 3])
        await watcher.until(seqs[-1])
        self.assertEqual(watcher.seqs(), [first, *seqs])  # op-1 delivered once

    async def test_zero_sends_no_wait(self) -> None:
        """REDIS_MIN_REPLICAS=0 acknowledges without a replica, as before."""
        redis = await self.start_redis()
        a = await self.bus(redis, 0)
        self.assertGreater(await a.bus.append("p1", raw_event("x")), 0)


class ManualFailoverTests(RedisTestCase):
    """SENTINEL FAILOVER: the old master keeps running, demoted; +switch-master is followed."""

    timeout = 90

    async def test_switch_master_followed(self) -> None:
        deployment = SentinelDeployment(self)
        await deployment.start()
        nodes = []
        for _ in range(2):
            registry = RoomRegistry(reactor, 0.0)
            bus = RedisBus(registry, RedisTarget(sentinels=deployment.sentinel_addresses),
                           reactor, reconnect_initial_delay=0.05, reconnect_max_delay=0.25)
            bus.startService()
            self.addCleanup(bus.stopService)
            await bus.when(bus.settled)
            nodes.append(BusNode(registry, bus))
        a, b = nodes
        members = [await a.member("a1"), await b.member("b1")]
        first = await a.bus.append("p1", raw_event("before"))
        old = await deployment.master()
        self.assertEqual(await deployment.sentinels[0].command(
            "SENTINEL", "failover", MASTER_NAME), "OK")
        new = await deployment.failed_over(old)
        await a.bus.when(lambda: a.bus.link.sentinels.current == ("127.0.0.1", new.port)
                         and a.bus.settled())
        await b.bus.when(lambda: b.bus.link.sentinels.current == ("127.0.0.1", new.port)
                         and b.bus.settled())
        after = await b.bus.append("p1", raw_event("after"))
        # A new master: the numbering goes on above every seq handed out,
        # the jump marked in the room's stream; nothing was missed, so no
        # RESYNC_REQUIRED.
        self.assertEqual(await jumps(new), {first: after - 1})
        for m in members:
            await m.until(after)
            self.assertEqual(m.seqs(), [first, after])
        self.assertEqual((await new.command("ROLE"))[0], "master")


class JumpReadTests(RedisTestCase):
    """Reading a room's history across a jump of its numbering (a new Redis)."""

    timeout = 20

    async def test_reads_across_a_jump(self) -> None:
        """
        A client's replay from at or before the jump gets the events across
        it; from a seq the new Redis never had, RESYNC_REQUIRED.  An
        instance's catch-up gets the jump as ('', seq), or RESYNC_REQUIRED
        at it followed by the events after it.
        """
        redis = await self.start_redis()
        registry = RoomRegistry(reactor, 0.0)
        bus = RedisBus(registry, redis.url, reactor)
        bus.startService()
        self.addCleanup(bus.stopService)
        await bus.when(bus.settled)
        before = [await bus.append("p1", raw_event(f"x-{i}")) for i in range(3)]
        await deferLater(reactor, 0.01, lambda: None)  # the numbering is below the time in ms
        # As if another Redis had numbered the events so far:
        await redis.command("SET", "happyrobot:numbered-by", "another-redis")
        after = [await bus.append("p1", raw_event(f"y-{i}")) for i in range(2)]
        jumped_to = after[0] - 1
        self.assertGreater(jumped_to, before[-1])
        self.assertEqual(await jumps(redis), {before[-1]: jumped_to})
        self.assertEqual(after[1], after[0] + 1)

        def seqs(events: list[bytes] | None) -> list[int] | None:
            return None if events is None else [json.loads(e)["seq"] for e in events]

        for since, expected in ((before[-1], after), (before[0], before[1:] + after),
                                (before[-1] + 1, None), (jumped_to, after)):
            replay = await bus.replay("p1", since)
            self.assertEqual((seqs(replay.events), replay.seq), (expected, after[-1]), since)
        seq, entries, resync_at = await bus.events.read("p1", before[-1], kept=True)
        self.assertEqual((seq, resync_at), (after[-1], None))
        self.assertEqual(entries[:2], [b"", b"%d" % jumped_to])
        self.assertEqual(seqs(entries[2::2]), after)
        seq, entries, resync_at = await bus.events.read("p1", before[-1] + 5, kept=True)
        self.assertEqual((seq, resync_at, seqs(entries[::2])), (after[-1], jumped_to, after))
        # The floor stays: a room opened now starts above it too.
        floor = int(await redis.command("GET", "happyrobot:seq-floor"))
        self.assertGreater(await bus.append("p2", raw_event("z")), floor)
