"""
The intake (INTAKE_STREAM): entry validation, dead-letter reasons, the
sorting of a batch and the counts (pure), the start-up check, one batch
published against a real Redis, and one instance consuming a real Redis
stream in this process.
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from happyrobot import StartupError
from happyrobot import __main__ as cli
from happyrobot.bus import Unavailable
from happyrobot.messages import MAX_OPERATION_ID_CHARS
from happyrobot.redis import intake as intake_module
from happyrobot.redis.intake import (
    OP_USER,
    Batch,
    Dead,
    Entry,
    GroupState,
    Intake,
    Tally,
    for_bus,
    id_ms,
    parse_entry,
    sort_batch,
    stream_entries,
)
from happyrobot.tap import Options, makeService
from tests.helpers import (
    Client,
    Node,
    RedisServer,
    RedisTestCase,
    free_port,
    wait_until,
)


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


class ParseEntryTests(SynchronousTestCase):
    """One stream entry validated as POST /broadcast validates its body."""

    def test_valid(self) -> None:
        """A valid event is published with its operationId as the de-duplication key."""
        e = parse_entry(b"5-0", [b"event", body(type="T", projectId="p1", operationId="op1",
                                                payload={"a": 1})], 1000)
        assert isinstance(e, Entry)
        self.assertEqual((e.id, e.event.project_id, e.event.type), (b"5-0", "p1", "T"))
        self.assertEqual(e.event.payload, {"a": 1})
        self.assertEqual(e.op_key, (OP_USER, "op1"))

    def test_without_operation_id(self) -> None:
        """Without an operationId, the entry's id is the key and the event's operationId."""
        e = parse_entry(b"17-3", [b"other", b"x", b"event", body(type="T", projectId="p1")], 1000)
        assert isinstance(e, Entry)
        self.assertEqual(e.op_key, (OP_USER, "intake-17-3"))
        self.assertEqual(e.event.operation_id, "intake-17-3")

    def test_dead_reasons(self) -> None:
        """Each kind of bad entry gets its reason, the text of /broadcast's 400 reply."""
        cases = [
            ([b"data", b"{}"], "Missing field: event"),
            ([b"event", b"not json"], "Invalid JSON"),
            ([b"event", b"[1]"], "Body must be a JSON object"),
            ([b"event", body(type="T")], "Missing required fields: type, projectId"),
            ([b"event", body(projectId="p1")], "Missing required fields: type, projectId"),
            ([b"event", body(type="T", projectId="p1", pad="x" * 200)],
             "Body larger than 128 bytes"),
            ([b"event", body(type="T", projectId="p1", operationId=5)],
             f"operationId must be a string of at most {MAX_OPERATION_ID_CHARS} characters"),
        ]
        for fields, reason in cases:
            d = parse_entry(b"1-0", fields, 128)
            self.assertIsInstance(d, Dead, fields)
            assert isinstance(d, Dead)
            self.assertEqual(d.reason, reason)
            self.assertEqual((d.id, d.fields), (b"1-0", fields))

    def test_size_limit_is_inclusive(self) -> None:
        """An event of exactly MAX_BROADCAST_BYTES is accepted."""
        b = body(type="T", projectId="p1")
        self.assertIsInstance(parse_entry(b"1-0", [b"event", b], len(b)), Entry)
        self.assertIsInstance(parse_entry(b"1-0", [b"event", b], len(b) - 1), Dead)

    def test_replies(self) -> None:
        """XREADGROUP replies: none on a timeout, entries (or deleted ones) otherwise."""
        self.assertEqual(stream_entries(None), [])
        self.assertEqual(stream_entries([[b"s", [[b"1-0", [b"event", b"{}"]], [b"2-0", None]]]]),
                         [(b"1-0", [b"event", b"{}"]), (b"2-0", None)])
        self.assertEqual(id_ms(b"1700000000123-4"), 1700000000123)


class StartupTests(SynchronousTestCase):
    """INTAKE_STREAM without Redis stops start-up with one line."""

    def test_needs_redis(self) -> None:
        o = Options(environ={"INTAKE_STREAM": "happyrobot:intake"})
        o.parseOptions(["--env-file="])
        e = self.assertRaises(StartupError, makeService, o, MemoryReactorClock())
        self.assertEqual(e.code, "happyrobot-ws: INTAKE_STREAM needs Redis (REDIS_URL or "
                                 "REDIS_SENTINELS): the stream is in Redis")

    def test_option(self) -> None:
        o = Options(environ={})
        o.parseOptions(["--env-file=", "--intake-stream", " hr:in "])
        self.assertEqual(o.config().intake_stream, "hr:in")
        self.assertEqual(Options(environ={}).config().intake_stream, "")



async def events_of(client: Client, n: int, seconds: float = 10.0) -> list[dict[str, Any]]:
    """The next C{n} events (frames with a seq) that C{client} receives."""
    got: list[dict[str, Any]] = []
    for _ in range(n * 20):
        if len(got) >= n:
            break
        frame = await client.next().addTimeout(seconds, reactor)
        if "seq" in frame and frame.get("type") not in ("ACK",):
            got.append(frame)
    return got


class IntakeRedisTests(RedisTestCase):
    """An instance in this process consuming a real Redis stream."""

    timeout = 30

    async def node_with_intake(self, redis: RedisServer, **overrides: Any) -> tuple[Node, Intake]:
        node = await self.start_node(redis, intake_stream="in", instance_ttl_seconds=1.5,
                                     **overrides)
        intake = for_bus(node.factory.config, node.bus, node.factory.metrics, reactor)
        intake.startService()
        self.addCleanup(intake.stopService)
        return node, intake

    async def test_publish_dead_letter_and_metrics(self) -> None:
        """
        Entries reach their room in order with a seq, a retried operationId
        is published once, a bad entry goes to in:dead with its reason while
        the later ones are delivered, and everything is acknowledged.
        """
        redis = await self.start_redis()
        node, intake = await self.node_with_intake(redis)
        member = await node.joined("p1", "u1")
        await node.settled()
        await wait_until(lambda: intake.active, what="the lease")
        sent = [
            body(type="T", projectId="p1", operationId="a", payload={"n": 1}),
            body(type="T", projectId="p1", operationId="a", payload={"n": 1}),  # a retry
            b"oops",
            body(type="T", projectId="p1", payload={"n": 2}),
        ]
        for b in sent:
            await redis.command("XADD", "in", "*", "event", b)
        got = await events_of(member, 2)
        self.assertEqual([e["payload"]["n"] for e in got], [1, 2])
        self.assertEqual(got[1]["seq"], got[0]["seq"] + 1)
        self.assertEqual(got[0]["operationId"], "a")
        self.assertTrue(got[1]["operationId"].startswith("intake-"))
        dead = await redis.command("XRANGE", "in:dead", "-", "+")
        self.assertEqual(len(dead), 1)
        fields = dict(zip(dead[0][1][::2], dead[0][1][1::2]))
        self.assertEqual((fields["reason"], fields["event"]), ("Invalid JSON", "oops"))
        await wait_until(lambda: intake.consumed == 3 and intake.dead == 1)
        await intake.poll()
        self.assertEqual((intake.group.pending, intake.group.lag), (0, 0))
        text = node.factory.metrics.exposition().decode()
        self.assertIn("happyrobot_intake_consumed_total 3.0", text)
        self.assertIn("happyrobot_intake_dead_total 1.0", text)
        self.assertIn("happyrobot_intake_pending 0.0", text)
        self.assertIn("happyrobot_intake_active 1.0", text)
        self.assertEqual(node.factory.metrics.dashboard()["intake"]["consumed"], 3)

    async def test_one_consumer_and_takeover_of_pending(self) -> None:
        """
        Of two instances one consumes; entries a stopped consumer read and
        did not acknowledge are published by the other, before new ones.
        """
        redis = await self.start_redis()
        a, ia = await self.node_with_intake(redis)
        b, ib = await self.node_with_intake(redis)
        await wait_until(lambda: ia.active or ib.active, what="a lease")
        self.assertFalse(ia.active and ib.active)
        # Entries read by a consumer that died before acknowledging them.
        await wait_until(lambda: ia._group_ready or ib._group_ready, what="the group")
        member = await b.joined("p1", "u1")
        await b.settled()
        holder, other = (ia, ib) if ia.active else (ib, ia)
        await holder.stopService()  # gives the lease up
        for n in range(3):
            await redis.command("XADD", "in", "*", "event",
                                body(type="T", projectId="p1", operationId=f"o{n}",
                                     payload={"n": n}))
        await redis.command("XREADGROUP", "GROUP", "happyrobot", "gone", "COUNT", "2",
                            "STREAMS", "in", ">")
        got = await events_of(member, 3)
        self.assertEqual([e["payload"]["n"] for e in got], [0, 1, 2])
        await wait_until(lambda: other.consumed == 3)
        self.assertTrue(other.active)
        pending = await redis.command("XPENDING", "in", "happyrobot")
        self.assertEqual(pending[0], 0)

    async def test_stop_without_start(self) -> None:
        """Stopping an intake whose loop waits for the lease ends promptly."""
        redis = await self.start_redis()
        _, intake = await self.node_with_intake(redis)
        d: Deferred[Any] = intake.stopService()
        await d.addTimeout(5, reactor)
        self.assertFalse(intake.active)


class PublishStreamTests(RedisTestCase):
    """``python -m happyrobot publish --stream``."""

    async def publish(self, *argv: str) -> tuple[int, str, str]:
        args = cli.parse_args(["publish", *argv], environ={})
        out, err = io.StringIO(), io.StringIO()
        code = await cli.run(reactor, args, out, err)
        return code, out.getvalue(), err.getvalue()

    async def test_appends_the_broadcast_body(self) -> None:
        """The entry's event field is the body POST /broadcast would get."""
        redis = await self.start_redis()
        code, out, err = await self.publish("p1", "TASK_UPDATE", '{"id": "t1"}', "--stream",
                                            "in", "--redis-url", redis.url,
                                            "--operation-id", "op-9", "--user-id", "u1")
        self.assertEqual((code, err), (0, ""))
        reply = json.loads(out)
        entries = await redis.command("XRANGE", "in", "-", "+")
        self.assertEqual(reply, {"success": True, "stream": "in", "id": entries[0][0]})
        self.assertEqual(entries[0][1][0], "event")
        self.assertEqual(json.loads(entries[0][1][1]), {
            "type": "TASK_UPDATE", "projectId": "p1", "payload": {"id": "t1"}, "userId": "u1",
            "operationId": "op-9"})

    async def test_errors(self) -> None:
        """Without a Redis URL, or with a Redis that is not there: one line, exit 1."""
        code, _, err = await self.publish("p1", "T", "{}", "--stream", "in")
        self.assertEqual((code, err), (1, "happyrobot: --stream needs --redis-url (or "
                                          "REDIS_URL)\n"))
        port = free_port()
        code, _, err = await self.publish("p1", "T", "{}", "--stream", "in", "--redis-url",
                                          f"redis://127.0.0.1:{port}/0")
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith(f"happyrobot: cannot append to in at 127.0.0.1:{port}: "),
                        err)
        code, _, err = await self.publish("p1", "T", "{}", "--stream", "in", "--redis-url",
                                          "http://x")
        self.assertEqual(code, 1)
        self.assertIn("REDIS_URL must look like", err)


class LeaseTests(RedisTestCase):
    """The lease is taken once Redis can be reached, however long its life."""

    timeout = 30

    async def test_lease_taken_after_redis_comes_back(self) -> None:
        redis = await self.start_redis()
        node = await self.start_node(redis, intake_stream="in", instance_ttl_seconds=30.0)
        await redis.stop()
        intake = for_bus(node.factory.config, node.bus, node.factory.metrics, reactor)
        intake.startService()
        self.addCleanup(intake.stopService)
        await deferLater(reactor, 0.3)
        self.assertFalse(intake.active)
        await redis.start()
        await wait_until(lambda: intake.active, 5, "the lease, within LEASE_TRY_SECONDS")
        await redis.command("XADD", "in", "*", "event", body(type="T", projectId="p1"))
        await wait_until(lambda: intake.consumed == 1, 5, "the entry")

    async def test_lease_kept_lost_and_taken_back(self) -> None:
        """
        A renewal that comes after the holder counted its lease as lost
        takes it back; a lease another instance holds is not taken.
        """
        redis = await self.start_redis()
        node = await self.start_node(redis, intake_stream="in", instance_ttl_seconds=30.0)
        intake = for_bus(node.factory.config, node.bus, node.factory.metrics, reactor)
        intake.startService()
        self.addCleanup(intake.stopService)
        await wait_until(lambda: intake.active, 5, "the lease")
        intake._lease_until = 0.0  # as if a renewal had been late
        await intake._lease()
        self.assertTrue(intake.active)
        self.assertGreater(await redis.command("PTTL", "in:consumer"), 25000)
        await redis.command("SET", "in:consumer", "someone-else")
        await intake._lease()
        self.assertFalse(intake.active)
        await redis.command("DEL", "in:consumer")
        await intake._lease()
        self.assertTrue(intake.active)


class SortBatchTests(SynchronousTestCase):
    """One batch sorted into appends, dead letters and the ids to acknowledge (pure)."""

    def test_batch(self) -> None:
        """Valid entries become appends in order, bad ones dead letters; every id is acked."""
        batch = sort_batch([
            (b"1-0", [b"event", body(type="T", projectId="p1", operationId="a")]),
            (b"2-0", [b"event", b"nope"]),
            (b"3-0", None),  # deleted from the stream after it was read
            (b"4-0", [b"event", body(type="T", projectId="p2", payload={"n": 4})]),
        ], 1000, 1234)
        self.assertEqual([(a[0], a[2]) for a in batch.appends],
                         [("p1", ("", "a")), ("p2", ("", "intake-4-0"))])
        self.assertEqual([json.loads(a[1]) for a in batch.appends], [
            {"type": "T", "operationId": "a", "timestamp": 1234, "userId": None,
             "projectId": "p1"},
            {"type": "T", "payload": {"n": 4}, "operationId": "intake-4-0", "timestamp": 1234,
             "userId": None, "projectId": "p2"},
        ])
        self.assertEqual(batch.dead, [Dead(b"2-0", "Invalid JSON", [b"event", b"nope"])])
        self.assertEqual(batch.ids, [b"1-0", b"2-0", b"3-0", b"4-0"])

    def test_empty(self) -> None:
        """A read that timed out is an empty batch."""
        self.assertEqual(sort_batch([], 1000, 0), Batch())


class TallyTests(SynchronousTestCase):
    """The counts of what was acknowledged, and the throttled line about dead letters."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.tally = Tally("in:dead", self.clock)

    def acknowledged(self, entries: list[tuple[bytes, list[bytes] | None]]) -> None:
        self.tally.acknowledged(sort_batch(entries, 1000, 0))

    def test_counts(self) -> None:
        """Consumed counts every acknowledged entry but the dead ones; one line for the first."""
        with capturedLogs() as events:
            self.acknowledged([
                (b"1-0", [b"event", body(type="T", projectId="p1")]),
                (b"2-0", [b"event", b"nope"]),
                (b"3-0", None),
            ])
        self.assertEqual((self.tally.consumed, self.tally.dead), (2, 1))
        lines = [e for e in events if "bad entries" in e.get("log_format", "")]
        self.assertEqual([(e["n"], e["dead"]) for e in lines], [(1, "in:dead")])

    def test_dead_letter_log_throttled(self) -> None:
        """At most one line per 10 s about bad entries, with how many there were."""
        with capturedLogs() as events:
            for i in range(5):
                self.acknowledged([(b"%d-0" % i, [b"event", b"{"])])
                self.clock.advance(3)
            self.acknowledged([(b"9-0", [b"event", b"{"]), (b"10-0", [b"x", b"y"])])
        lines = [e["n"] for e in events if "bad entries" in e.get("log_format", "")]
        # t=0: the first; t=12: the four since; the last two (t=15) wait for t>=22.
        self.assertEqual(lines, [1, 4])
        self.assertEqual((self.tally.dead, self.tally.consumed), (7, 0))
        self.clock.advance(7)
        with capturedLogs() as events:
            self.acknowledged([(b"11-0", [b"event", b"{"])])
        self.assertEqual([e["n"] for e in events if "bad entries" in e.get("log_format", "")],
                         [3])


async def xack_calls(redis: RedisServer) -> int:
    """How many XACK commands Redis has run since its statistics were reset."""
    for line in (await redis.command("INFO", "commandstats")).splitlines():
        if line.startswith("cmdstat_xack:"):
            return int(line.split("calls=", 1)[1].split(",", 1)[0])
    return 0


class PublishTests(RedisTestCase):
    """One batch against a real Redis: appends, dead letters, one XACK, or none on failure."""

    timeout = 30

    async def batch_read(self, redis: RedisServer, **overrides: Any) -> tuple[Node, Intake]:
        """
        An intake (its reader started, not consuming) whose consumer has
        read four entries, the third deleted from the stream since.
        """
        node = await self.start_node(redis, intake_stream="in", **overrides)
        intake = for_bus(node.factory.config, node.bus, node.factory.metrics, reactor)
        intake._reader.start()
        self.addCleanup(intake._reader.stop)
        await wait_until(lambda: intake._reader.up, 5, "the reader")
        await redis.command("XGROUP", "CREATE", "in", "happyrobot", "0", "MKSTREAM")
        for fields in ([body(type="T", projectId="p1", operationId="a")], [b"nope"],
                       [body(type="T", projectId="p1")], [body(type="T", projectId="p2")]):
            await redis.command("XADD", "in", "*", "event", *fields)
        read = await intake._reader.command("XREADGROUP", "GROUP", "happyrobot", "me",
                                            "STREAMS", "in", ">")
        self.ids = [e[0] for e in stream_entries(read)]
        await redis.command("XDEL", "in", self.ids[2])
        await redis.command("CONFIG", "RESETSTAT")
        return node, intake

    async def pending(self) -> list[bytes]:
        read = await self.intake._reader.command("XREADGROUP", "GROUP", "happyrobot", "me",
                                                 "STREAMS", "in", "0")
        return stream_entries(read)  # type: ignore[return-value]

    async def test_batch(self) -> None:
        """
        Valid entries are appended in one turn, the bad one goes to in:dead
        with its reason, its id and its fields, and all are acked in one XACK.
        """
        redis = await self.start_redis()
        node, self.intake = await self.batch_read(redis)
        appended: list[tuple[str, bytes, Any, Any]] = []
        flushes: list[None] = []

        def append(project_id: str, event: bytes, exclude: Any, op_key: Any) -> Deferred[int]:
            appended.append((project_id, event, exclude, op_key))
            return node.bus.append(project_id, event, exclude, op_key)

        def flush() -> None:
            flushes.append(None)
            node.bus.flush()

        self.intake._append, self.intake._flush = append, flush
        members = [await node.joined(p, "u1") for p in ("p1", "p2")]
        await node.settled()
        entries = await self.pending()
        self.assertEqual([e[1] is None for e in entries], [False, False, True, False])
        with capturedLogs() as events:
            await self.intake._publish(entries)  # type: ignore[arg-type]
        third = "intake-" + self.ids[3].decode()
        self.assertEqual([(a[0], a[2], a[3]) for a in appended],
                         [("p1", None, ("", "a")), ("p2", None, ("", third))])
        self.assertEqual(json.loads(appended[0][1])["operationId"], "a")
        self.assertEqual(len(flushes), 1)
        dead = await redis.command("XRANGE", "in:dead", "-", "+")
        self.assertEqual([d[1] for d in dead], [
            ["reason", "Invalid JSON", "entry", self.ids[1].decode(), "event", "nope"]])
        self.assertEqual(await xack_calls(redis), 1)
        self.assertEqual(await self.pending(), [])
        self.assertEqual((self.intake.consumed, self.intake.dead), (3, 1))
        lines = [e for e in events if "bad entries" in e.get("log_format", "")]
        self.assertEqual([e["n"] for e in lines], [1])
        for member, op in zip(members, ("a", third)):
            self.assertEqual([e["operationId"] for e in await events_of(member, 1)], [op])

    async def test_dead_letters_trimmed(self) -> None:
        """The dead-letter stream keeps about the last DEAD_KEPT entries (MAXLEN ~)."""
        redis = await self.start_redis()
        node, self.intake = await self.batch_read(redis)
        self.patch(intake_module, "DEAD_KEPT", 4)
        await redis.command("CONFIG", "SET", "stream-node-max-entries", "2")
        await self.intake._publish([(b"%d-0" % i, [b"event", b"{"]) for i in range(1, 21)])
        dead = await redis.command("XRANGE", "in:dead", "-", "+")
        self.assertTrue(4 <= len(dead) <= 6, len(dead))
        self.assertEqual(dead[-1][1][:4], ["reason", "Invalid JSON", "entry", "20-0"])
        self.assertEqual(self.intake.dead, 20)

    async def test_failed_append_acks_nothing(self) -> None:
        """
        When an append fails (here: no replica confirms it, REDIS_MIN_REPLICAS),
        nothing of the batch is acknowledged: every entry stays pending.
        """
        redis = await self.start_redis()
        _, self.intake = await self.batch_read(redis, redis_min_replicas=1,
                                               redis_min_replicas_timeout_ms=50)
        entries = await self.pending()
        await self.assertFailure(
            Deferred.fromCoroutine(self.intake._publish(entries)),  # type: ignore[arg-type]
            Unavailable)
        self.assertEqual(await xack_calls(redis), 0)
        self.assertEqual([e[0] for e in await self.pending()], self.ids)
        self.assertEqual((self.intake.consumed, self.intake.dead), (0, 0))


class GroupStateTests(RedisTestCase):
    """The pending entries, the lag and the age of the oldest entry not acknowledged."""

    async def test_pending_lag_and_age(self) -> None:
        redis = await self.start_redis()
        import txredisapi

        # Replies as the server's connections have them: bytes.
        conn = await txredisapi.Connection("127.0.0.1", redis.port, reconnect=False,
                                           charset=None, convertNumbers=False)
        self.addCleanup(conn.disconnect)
        state = GroupState(b"in", conn.execute_command, reactor)
        await state.poll()  # no stream yet: nothing to say
        self.assertEqual((state.pending, state.lag, state.oldest_age_seconds), (0, 0, 0.0))
        now_ms = int(reactor.seconds() * 1000)
        await redis.command("XGROUP", "CREATE", "in", "happyrobot", "0", "MKSTREAM")
        for age in (60, 30, 10):
            await redis.command("XADD", "in", f"{now_ms - age * 1000}-0", "event", "{}")
        await redis.command("XREADGROUP", "GROUP", "happyrobot", "gone", "COUNT", "1",
                            "STREAMS", "in", ">")
        await state.poll()
        self.assertEqual((state.pending, state.lag), (1, 2))
        self.assertTrue(59 <= state.oldest_age_seconds < 65, state.oldest_age_seconds)
        await redis.command("XACK", "in", "happyrobot", f"{now_ms - 60000}-0")
        await state.poll()  # the oldest not acknowledged is now the first not read
        self.assertEqual((state.pending, state.lag), (0, 2))
        self.assertTrue(29 <= state.oldest_age_seconds < 35, state.oldest_age_seconds)
