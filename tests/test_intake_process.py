"""
The intake end to end: a real redis-server (appending to its AOF) and two
``twistd happyrobot-ws`` processes consuming one stream, with WebSocket
members of ten rooms on both, through the SIGKILL of the consumer while it
holds entries it has not acknowledged (its members resume on the other;
a replacement instance joins), a malformed entry, and a Redis restart.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import txredisapi
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, race
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.helpers import (
    ORIGIN,
    REDIS_SERVER,
    LineCollector,
    RedisServer,
    free_port,
    listening_twistd,
    wait_until,
)

STREAM = "it:intake"
PROJECTS = [f"proj{i}" for i in range(10)]
ENTRIES = 1000
PER_PROJECT = ENTRIES // len(PROJECTS)


class PersistentRedis(RedisServer):
    """A redis-server appending every write to its AOF in C{data_dir} (fsync always)."""

    def __init__(self, port: int, data_dir: str) -> None:
        super().__init__(port)
        self.data_dir = data_dir

    async def start(self) -> None:
        self.process = proto = LineCollector()
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", self.data_dir, "--save", "", "--appendonly", "yes",
                "--appendfsync", "always"]
        self._transport = reactor.spawnProcess(
            proto, REDIS_SERVER, argv, env={"PATH": os.environ.get("PATH", "")}, path="/")
        ended: Deferred[Any] = Deferred()
        proto.ended.addBoth(lambda r: (ended.callback(r), r)[1])
        await race([proto.wait_for(b"Ready to accept connections"), ended])
        if proto.ended.called:
            raise RuntimeError("redis-server exited: " + proto.output.decode(errors="replace"))


class Member(WebSocketClientProtocol):
    """A room member that keeps the events it receives (frames with a seq)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []
        self.resyncs: list[int] = []
        self.last_seq = 0
        self.opened: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()

    def onOpen(self) -> None:
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        msg = json.loads(payload)
        if msg.get("type") == "RESYNC_REQUIRED":
            self.resyncs.append(msg["seq"])
            self.last_seq = msg["seq"]
        elif "seq" in msg:
            self.events.append(msg)
            self.last_seq = msg["seq"]

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.closed.called:
            self.closed.callback(None)


async def join(port: int, project_id: str, user_id: str, since: int) -> Member:
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/ws", origin=ORIGIN)
    factory.protocol = Member
    member: Member = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    await member.opened.addTimeout(10, reactor)
    member.sendMessage(json.dumps({"type": "SET_USER", "payload": {"userId": user_id}}).encode())
    member.sendMessage(json.dumps({"type": "JOIN_PROJECT", "projectId": project_id,
                                   "since": since}).encode())
    return member



def entry(k: int) -> bytes:
    """Entry k: project k % 10, its number k // 10 in that project."""
    project, n = PROJECTS[k % len(PROJECTS)], k // len(PROJECTS)
    return json.dumps({"type": "TASK_UPDATE", "projectId": project,
                       "operationId": f"{project}-{n}", "payload": {"n": n}}).encode()


class IntakeProcessTests(TestCase):
    """Issue point 7, against real processes."""

    timeout = 120

    async def test_two_instances_kill_dead_letter_and_redis_restart(self) -> None:
        data_dir = os.path.abspath(self.mktemp())
        os.makedirs(data_dir)
        redis = PersistentRedis(free_port(), data_dir)
        await redis.start()
        self.addCleanup(redis.stop)
        conn = await txredisapi.Connection("127.0.0.1", redis.port, reconnect=True)
        self.addCleanup(conn.disconnect)

        args = ["--redis-url", redis.url, "--intake-stream", STREAM, "--instance-ttl", "2"]
        servers = [await listening_twistd(self, args) for _ in range(2)]
        pids = [transport.pid for _, transport, _ in servers]

        # One member per room on each instance, each joined with since 0.
        members: list[tuple[int, str, Member]] = []  # (instance index, room, member)
        for i, (_, _, port) in enumerate(servers):
            for p in PROJECTS:
                members.append((i, p, await join(port, p, f"user{i}-{p}", 0)))
        await wait_until(lambda: all(m.resyncs for _, _, m in members), 15, "every join")

        async def append(first: int, last: int) -> None:
            await gatherResults([conn.execute_command("XADD", STREAM, "*", "event", entry(k))
                                 for k in range(first, last)])

        async def holder() -> int:
            value = await conn.execute_command("GET", f"{STREAM}:consumer")
            assert value, "no instance holds the intake's lease"
            return [i for i, pid in enumerate(pids) if f"-{pid}-" in value][0]

        # 1. Entries flow in; the consumer is killed while it holds unacknowledged ones.
        await wait_until(lambda: any(b"this instance consumes" in proc.output
                                     for proc, _, _ in servers), 15, "a consumer")
        await append(0, 300)
        await wait_until(lambda: all(len(m.events) == 30 for _, _, m in members), 20,
                         "the first 300 entries")
        victim = await holder()
        victim_transport = servers[victim][1]
        killed_holding = 0
        k = 300
        for _ in range(100):  # bounded: each try appends 10 entries
            await append(k, k + 10)
            k += 10
            victim_transport.signalProcess(signal.SIGSTOP)
            consumer = await conn.execute_command("GET", f"{STREAM}:consumer")
            held = await conn.execute_command("XPENDING", STREAM, "happyrobot", "-", "+",
                                              100, consumer)
            if held:
                killed_holding = len(held)
                victim_transport.signalProcess(signal.SIGKILL)
                break
            victim_transport.signalProcess(signal.SIGCONT)
        self.assertGreater(killed_holding, 0, "the consumer never held unacknowledged entries")
        await servers[victim][0].ended
        survivor = 1 - victim
        survivor_proc, survivor_transport, survivor_port = servers[survivor]

        # A replacement joins, so that two instances consume again.
        replacement = await listening_twistd(self, args)

        # The killed instance's members resume on the survivor from their last seq.
        moved = [(m, await join(survivor_port, p, f"again-{p}", m.last_seq))
                 for i, p, m in members if i == victim]

        # 2. A malformed entry, then more entries, all delivered.
        await conn.execute_command("XADD", STREAM, "*", "event", b"{not json")
        await append(k, 900)
        await wait_until(lambda: all(len(m.events) >= 90 for i, _, m in members if i == survivor),
                         30, "90 events in every room")

        # 3. Entries appended just before Redis restarts are not lost: both
        # instances are frozen so that neither consumes them first.
        for _ in range(200):  # every entry so far acknowledged
            if (await conn.execute_command("XPENDING", STREAM, "happyrobot"))[0] == 0:
                break
            await deferLater(reactor, 0.05)
        else:
            self.fail("entries 0-899 were not all acknowledged within 10 s")
        live = [survivor_transport, replacement[1]]
        for t in live:
            t.signalProcess(signal.SIGSTOP)
        await append(900, ENTRIES)
        await conn.execute_command("SHUTDOWN", "SAVE").addErrback(lambda _: None)
        await redis.process.ended  # type: ignore[union-attr]
        await redis.start()
        # None of them was acknowledged: read and pending, or not read yet.
        group = await conn.execute_command("XINFO", "GROUPS", STREAM)
        delivered = dict(zip(group[0][::2], group[0][1::2]))["last-delivered-id"]
        unread = await conn.execute_command("XRANGE", STREAM, "(" + delivered, "+")
        pending = await conn.execute_command("XPENDING", STREAM, "happyrobot")
        self.assertEqual(len(unread) + pending[0], ENTRIES - 900)
        for t in live:
            t.signalProcess(signal.SIGCONT)

        survivors = [m for i, _, m in members if i == survivor]
        await wait_until(lambda: all(len(m.events) >= PER_PROJECT for m in survivors),
                         40, "every event in every room on the survivor")

        # Every member of every room: every event exactly once, in append order.
        for m in survivors:
            self.assert_in_order(m.events, range(PER_PROJECT))
        await wait_until(lambda: all(len(old.events) + len(new.events) >= PER_PROJECT
                                     for old, new in moved), 20, "the resumed members' events")
        self.assertTrue(all(old.events and new.events for old, new in moved))
        for old, new in moved:
            self.assert_in_order(old.events + new.events, range(PER_PROJECT))
        dead = await conn.execute_command("XRANGE", f"{STREAM}:dead", "-", "+")
        self.assertEqual(len(dead), 1)
        fields = dict(zip(dead[0][1][::2], dead[0][1][1::2]))
        self.assertEqual((fields["reason"], fields["event"]), ("Invalid JSON", "{not json"))
        pending = await conn.execute_command("XPENDING", STREAM, "happyrobot")
        self.assertEqual(pending[0], 0)
        for proc in (survivor_proc, replacement[0]):
            self.assertNotIn(b"Traceback", proc.output)

    def assert_in_order(self, events: list[dict[str, Any]], numbers: range) -> None:
        """
        The events are C{numbers} in order, each once, with consecutive
        seqs but for one jump upwards: the Redis restart from its files,
        above which the numbering goes on (see the Redis Sentinel section
        of docs/operations.md).
        """
        self.assertEqual([e["payload"]["n"] for e in events], list(numbers))
        seqs = [e["seq"] for e in events]
        steps = [b - a for a, b in zip(seqs, seqs[1:])]
        self.assertEqual([s for s in steps if s != 1 and s <= 0], [], "seqs grow")
        self.assertLessEqual(len([s for s in steps if s != 1]), 1, "one jump at most")
