"""
The intake's reader following the master: across a manual failover
(C{SENTINEL FAILOVER}: the old master keeps running, demoted to a replica)
the entries appended to the new master reach the room once each, in order
(a real Sentinel deployment, tests/sentinel_harness.py, and one server
instance in this process); a reader that reached a replica connects again
(READONLY); the bus's link reconnects the reader with its own.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.task import deferLater

from happyrobot.redis.connections import SingleConnection
from happyrobot.redis.intake import Intake, for_bus
from tests.helpers import RedisServer, RedisTestCase, free_port
from tests.sentinel_harness import MASTER_NAME, SentinelDeployment
from tests.test_intake import events_of, wait_until


def event(n: int) -> bytes:
    return json.dumps({"type": "T", "projectId": "p1", "operationId": f"o{n}",
                       "payload": {"n": n}}).encode()


class IntakeFailoverTests(RedisTestCase):
    """SENTINEL FAILOVER with the intake consuming."""

    timeout = 90

    async def test_reader_follows_manual_failover(self) -> None:
        deployment = SentinelDeployment(self)
        await deployment.start()
        old = await deployment.master()
        node = await self.start_node(old, redis_url="",
                                     redis_sentinels=deployment.sentinel_addresses,
                                     intake_stream="in", instance_ttl_seconds=1.5)
        intake = for_bus(node.factory.config, node.bus, node.factory.metrics, reactor)
        intake.startService()
        self.addCleanup(intake.stopService)
        member = await node.joined("p1", "u1")
        await node.settled()
        await wait_until(lambda: intake.active, 10, "the lease")
        await old.command("XADD", "in", "*", "event", event(0))
        self.assertEqual([e["payload"]["n"] for e in await events_of(member, 1)], [0])

        self.assertEqual(await deployment.sentinels[0].command(
            "SENTINEL", "failover", MASTER_NAME), "OK")
        new = await deployment.failed_over(old)
        link = node.bus.link
        await node.bus.when(lambda: link.sentinels.current == ("127.0.0.1", new.port)
                            and node.bus.settled())
        for n in range(1, 21):
            await new.command("XADD", "in", "*", "event", event(n))
        got = await events_of(member, 20, 20.0)
        self.assertEqual([e["payload"]["n"] for e in got], list(range(1, 21)))
        seqs = [e["seq"] for e in got]
        self.assertEqual(seqs, sorted(set(seqs)))
        # Nothing more (no second delivery) before an entry appended last.
        await new.command("XADD", "in", "*", "event", event(21))
        self.assertEqual([e["payload"]["n"] for e in await events_of(member, 1)], [21])
        await wait_until(lambda: intake.consumed == 22, 10, "every entry acknowledged")
        self.assertEqual((await new.command("XPENDING", "in", "happyrobot"))[0], 0)

        async def demoted() -> bool:  # the old master runs on, a replica of the new one
            return (await old.command("ROLE"))[0] == "slave"

        await deployment.until(demoted, "the old master demoted")


class ReaderReconnectTests(RedisTestCase):
    """The reader connects again when its Redis is a replica, or when the bus's link does."""

    timeout = 30

    async def test_replica_reached_then_master(self) -> None:
        """
        A reader whose first connection reaches a replica (an address out of
        date) gets READONLY, connects again, and consumes from the master.
        """
        master = await self.start_redis()
        replica = RedisServer(free_port(), ("--replicaof", "127.0.0.1", str(master.port)))
        await replica.start()
        self.addCleanup(replica.stop)
        node = await self.start_node(master)
        ports = [replica.port]
        reached: list[int] = []

        def endpoint() -> Any:
            reached.append(ports.pop() if ports else master.port)
            return HostnameEndpoint(reactor, "127.0.0.1", reached[-1])

        reader = SingleConnection(node.bus.link.address, endpoint, reactor, 2.0,
                                  lambda attempt: 0.05, lambda up: None)
        intake = Intake("in", "me", reader, node.bus.link.command, node.bus.append,
                        node.bus.flush, reactor, 1.5, 10000)
        intake.startService()
        self.addCleanup(intake.stopService)
        member = await node.joined("p1", "u1")
        await node.settled()
        for n in range(3):
            await master.command("XADD", "in", "*", "event", event(n))
        got = await events_of(member, 3)
        self.assertEqual([e["payload"]["n"] for e in got], [0, 1, 2])
        self.assertEqual(reached, [replica.port, master.port])
        await wait_until(lambda: intake.consumed == 3, 5, "the entries acknowledged")

    async def test_link_reconnects_the_reader(self) -> None:
        """RedisLink.reconnect (on +switch-master) drops and makes the reader's connection too."""
        redis = await self.start_redis()
        node = await self.start_node(redis, intake_stream="in")
        intake = for_bus(node.factory.config, node.bus, node.factory.metrics, reactor)
        reader = intake._reader
        reader.start()
        self.addCleanup(reader.stop)
        await wait_until(lambda: reader.up, 5, "the reader")
        before = await reader.command("CLIENT", "ID")
        ids: list[Any] = []

        async def new_id() -> None:
            ids.append(await reader.command("CLIENT", "ID") if reader.up else before)

        await node.bus.link.reconnect()
        for _ in range(250):  # at most 5 s
            await new_id()
            if ids[-1] != before:
                break
            await deferLater(reactor, 0.02)
        self.assertNotEqual(ids[-1], before)
        clients = await redis.command("CLIENT", "LIST", "ID", before)
        self.assertEqual(clients, "")  # the former connection is closed
