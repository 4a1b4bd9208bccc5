"""
Room sequence numbers, history, resume and acknowledgements: the pure
history (happyrobot.history), the registry's hold/release, and the v2
protocol over loopback with the in-memory engine.
"""

from __future__ import annotations

import json
from typing import Any

import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from happyrobot.config import Config
from happyrobot.history import Histories, RoomHistory, with_seq
from happyrobot.rooms import RoomRegistry
from happyrobot.tap import build_factory
from happyrobot.web import make_site
from tests.helpers import Client, ServerTestCase


def event(n: int) -> bytes:
    return b'{"type":"TASK_UPDATE","payload":{"n":%d}}' % n


def seqs(frames: list[bytes] | None) -> list[int]:
    assert frames is not None
    return [json.loads(f)["seq"] for f in frames]


class RoomHistoryTests(SynchronousTestCase):
    """RoomHistory with explicit times."""

    def test_with_seq(self) -> None:
        """seq is added to a serialised object without reparsing it."""
        self.assertEqual(json.loads(with_seq(b'{"a":1}', 7)), {"a": 1, "seq": 7})

    def test_numbers_grow_by_one_from_the_epoch(self) -> None:
        """The first event gets the epoch number, each next one one more."""
        h = RoomHistory(first_seq=1000, max_events=10, max_age_seconds=60)
        self.assertEqual(h.seq, 999)
        got = [h.append(event(i), now=0)[0] for i in range(3)]
        self.assertEqual(got, [1000, 1001, 1002])

    def test_since(self) -> None:
        """since(n) gives the events after n in order; n equal to the last gives none."""
        h = RoomHistory(1, 10, 60)
        for i in range(5):
            h.append(event(i), 0)
        self.assertEqual(seqs(h.since(2, 0)), [3, 4, 5])
        self.assertEqual(h.since(5, 0), [])
        self.assertEqual(seqs(h.since(0, 0)), [1, 2, 3, 4, 5])

    def test_gap_and_future_need_resync(self) -> None:
        """A since before the kept events, or beyond the last number, gives None."""
        h = RoomHistory(1, max_events=3, max_age_seconds=60)
        for i in range(6):
            h.append(event(i), 0)
        self.assertEqual(seqs(h.since(3, 0)), [4, 5, 6])
        self.assertIsNone(h.since(2, 0))
        self.assertIsNone(h.since(7, 0))

    def test_age_bound(self) -> None:
        """Events older than the age bound are forgotten; the counter is not."""
        h = RoomHistory(1, max_events=100, max_age_seconds=10)
        h.append(event(1), now=0)
        h.append(event(2), now=5)
        self.assertEqual(seqs(h.since(0, now=9)), [1, 2])
        self.assertIsNone(h.since(0, now=12))
        self.assertEqual(seqs(h.since(1, now=12)), [2])
        self.assertEqual(h.since(2, now=20), [])
        self.assertTrue(h.empty)
        self.assertEqual(h.append(event(3), now=20)[0], 3)

    def test_retry_recognised_while_kept(self) -> None:
        """The same op key gets the original number and no new event, until it ages out."""
        h = RoomHistory(1, max_events=2, max_age_seconds=60)
        self.assertEqual(h.append(event(1), 0, ("u", "op1")), (1, with_seq(event(1), 1)))
        self.assertEqual(h.append(event(1), 0, ("u", "op1")), (1, None))
        self.assertEqual(h.append(event(1), 0, ("other", "op1"))[0], 2)
        h.append(event(2), 0)
        h.append(event(3), 0)  # op1's event is trimmed now
        seq, data = h.append(event(1), 0, ("u", "op1"))
        self.assertEqual(seq, 5)
        self.assertIsNotNone(data)


class HistoriesTests(SynchronousTestCase):
    """Histories: per-room epochs and sweeping."""

    def test_epoch_is_creation_time_ms_and_sweep(self) -> None:
        """A room's numbering starts at its creation time in ms; aged-out rooms are dropped."""
        hs = Histories(max_events=10, max_age_seconds=10)
        self.assertEqual(hs.append("p1", event(0), 1.5)[0], 1500)
        hs.append("p2", event(0), 2)
        self.assertEqual(len(hs), 2)
        self.assertEqual(hs.sweep(now=5), 0)
        self.assertEqual(hs.sweep(now=20), 2)
        self.assertEqual(hs.append("p1", event(0), 30)[0], 30000)


def sized(size: int) -> bytes:
    """An event that is C{size} bytes once a four-digit seq is added."""
    return b'{"p":"' + b"x" * (size - 19) + b'"}'


def kept(h: RoomHistory, now: float) -> list[bytes]:
    """All the events C{h} still keeps."""
    for since in range(h.seq - 100, h.seq + 1):  # no test keeps more than 100
        events = h.since(since, now)
        if events is not None:
            return events
    raise AssertionError("no since reaches the kept events")


class ByteBoundTests(SynchronousTestCase):
    """RoomHistory's bound on the bytes of its events."""

    def test_sized(self) -> None:
        """The helper makes events of the size asked for."""
        self.assertEqual(len(with_seq(sized(100), 1000)), 100)

    def test_oldest_trimmed_while_over(self) -> None:
        """Events are forgotten oldest first while the kept bytes exceed the bound."""
        h = RoomHistory(1000, max_events=100, max_age_seconds=60, max_bytes=350)
        for _ in range(5):
            h.append(sized(100), 0)
        self.assertEqual(seqs(h.since(1001, 0)), [1002, 1003, 1004])
        self.assertIsNone(h.since(1000, 0))
        self.assertEqual(h.bytes, 300)
        h.append(sized(60), 0)
        self.assertEqual((seqs(kept(h, 0)), h.bytes), ([1003, 1004, 1005], 260))

    def test_exactly_at_the_bound_is_kept(self) -> None:
        """The bound itself is allowed."""
        h = RoomHistory(1000, max_events=100, max_age_seconds=60, max_bytes=300)
        for _ in range(3):
            h.append(sized(100), 0)
        self.assertEqual((seqs(kept(h, 0)), h.bytes), ([1000, 1001, 1002], 300))

    def test_event_over_the_bound_alone(self) -> None:
        """
        An event larger than the bound is kept, alone: the older ones go,
        but it is not lost itself, and a retry of it is recognised.
        """
        h = RoomHistory(1000, max_events=100, max_age_seconds=60, max_bytes=150)
        h.append(sized(100), 0)
        seq, data = h.append(sized(200), 0, ("u", "big"))
        self.assertEqual((seq, len(data or b"")), (1001, 200))
        self.assertEqual(h.bytes, 200)
        self.assertIsNone(h.since(999, 0))
        self.assertEqual(seqs(h.since(1000, 0)), [1001])
        self.assertEqual(h.append(sized(200), 0, ("u", "big")), (1001, None))
        h.append(sized(100), 0)  # the next one pushes it out
        self.assertEqual((h.bytes, seqs(h.since(1001, 0))), (100, [1002]))

    def test_retry_after_byte_trim(self) -> None:
        """A retry of an event trimmed by bytes is a new event; one still kept is recognised."""
        h = RoomHistory(1000, max_events=100, max_age_seconds=60, max_bytes=200)
        h.append(sized(100), 0, ("u", "op1"))
        h.append(sized(100), 0, ("u", "op2"))
        h.append(sized(100), 0, ("u", "op3"))  # op1's event is trimmed by bytes
        self.assertEqual(h.append(sized(100), 0, ("u", "op2")), (1001, None))
        seq, data = h.append(sized(100), 0, ("u", "op1"))
        self.assertEqual(seq, 1003)
        self.assertIsNotNone(data)
        # op2's event went with that append, op3's is still kept.
        self.assertEqual(h.append(sized(100), 0, ("u", "op3")), (1002, None))
        self.assertNotEqual(h.append(sized(100), 0, ("u", "op2"))[1], None)


class TotalBytesTests(SynchronousTestCase):
    """Histories' bound on the bytes of all rooms, and its accounting."""

    def make(self, max_bytes: int = 1000, max_total: int = 300) -> Histories:
        return Histories(max_events=5, max_age_seconds=10, max_bytes=max_bytes,
                         max_total_bytes=max_total)

    def test_least_recently_appended_evicted(self) -> None:
        """Over the total, whole histories go, least recently appended first."""
        hs = self.make()
        for room in "abc":
            hs.append(room, sized(100), 1)
        self.assertEqual((len(hs), hs.total_bytes), (3, 300))
        hs.append("a", sized(100), 1)  # 400: b, the least recently appended, goes
        self.assertEqual((len(hs), hs.total_bytes), (2, 300))
        self.assertIsNone(hs.get("b", 1).since(999, 1))  # b's event is gone
        self.assertEqual(seqs(hs.get("a", 1).since(999, 1)), [1000, 1001])
        self.assertEqual(seqs(hs.get("c", 1).since(999, 1)), [1000])
        seq = hs.append("d", sized(150), 1)[0]  # c, then a, go; numbered above b
        self.assertEqual((len(hs), hs.total_bytes), (1, 150))
        self.assertEqual((seq, seqs(hs.get("d", 1).since(1000, 1))), (1001, [1001]))

    def test_room_appended_to_is_never_evicted(self) -> None:
        """The room appended to stays even when it was the least recently appended."""
        hs = self.make()
        hs.append("a", sized(100), 1)
        hs.append("b", sized(100), 1)
        hs.append("b", sized(100), 1)
        hs.append("a", sized(100), 1)  # 400: b goes, not a
        self.assertEqual((len(hs), hs.total_bytes), (1, 200))
        self.assertEqual(seqs(hs.get("a", 1).since(999, 1)), [1000, 1001])

    def test_room_alone_keeps_its_own_bound(self) -> None:
        """A room alone at the total is bounded by its per-room bound only."""
        hs = self.make(max_bytes=300, max_total=300)
        for _ in range(4):
            hs.append("a", sized(100), 1)
        self.assertEqual((len(hs), hs.total_bytes), (1, 300))
        self.assertEqual(seqs(hs.get("a", 1).since(1000, 1)), [1001, 1002, 1003])

    def test_evicted_room_resyncs_and_numbers_above(self) -> None:
        """
        After its eviction, a room's old since is too old, even in the same
        millisecond: its new history numbers from above the dropped one.
        """
        hs = self.make()
        hs.append("a", sized(100), 1)
        hs.append("a", sized(100), 1)  # 1000, 1001
        hs.append("b", sized(200), 1)  # evicts a
        self.assertEqual(len(hs), 1)
        self.assertIsNone(hs.get("a", 1).since(1000, 1))
        self.assertEqual(hs.append("a", sized(100), 1)[0], 1002)
        self.assertIsNone(hs.get("a", 1).since(1000, 1))
        self.assertEqual(seqs(hs.get("a", 1).since(1001, 1)), [1002])
        hs.append("b", sized(200), 2)  # evicts a again; later, numbers follow the clock
        self.assertEqual(hs.append("a", sized(100), 5)[0], 5000)
        self.assertIsNone(hs.get("a", 5).since(1002, 5))

    def test_read_stores_no_history(self) -> None:
        """
        Reading a room without history stores no history, only the seq the
        reader was given: the room's numbering goes on from it, so a client
        told RESYNC_REQUIRED with it resumes without a gap.
        """
        hs = self.make()
        h = hs.get("new", 1)
        self.assertIsNone(h.since(0, 1))
        self.assertEqual((h.seq, h.since(999, 1)), (999, []))
        self.assertEqual((len(hs), hs.total_bytes), (0, 0))
        self.assertEqual(hs.get("new", 30).since(999, 30), [])  # later: still no gap
        self.assertEqual(hs.append("new", sized(100), 40)[0], 1000)
        self.assertEqual(seqs(hs.get("new", 40).since(999, 40)), [1000])
        self.assertEqual(len(hs), 1)
        self.assertEqual(hs.get("other", 1).seq, 999)
        self.assertEqual(hs.append("other", sized(100), 2)[0], 1000)

    def test_read_rooms_forgotten_after_the_age_bound(self) -> None:
        """A room read long ago (past the age bound) is numbered from the clock again."""
        hs = self.make()
        self.assertEqual(hs.get("old", 1).seq, 999)
        hs.sweep(1 + 61)
        self.assertEqual(hs.get("old", 70).seq, 69_999)

    def test_accounting_after_trims_and_sweep(self) -> None:
        """total_bytes is exactly what the rooms keep after trims by count, age, bytes and sweep."""
        hs = self.make(max_bytes=450, max_total=10_000)

        def check(now: float) -> None:
            held = sum(len(e) for room in "abc" for e in kept(hs.get(room, now), now))
            self.assertEqual(hs.total_bytes, held)

        for _ in range(7):  # by count: 5 kept
            hs.append("a", sized(50), 1)
        self.assertEqual(hs.total_bytes, 250)
        for size in (200, 200, 100):  # by bytes: 300 kept
            hs.append("b", sized(size), 2)
        self.assertEqual(hs.total_bytes, 550)
        check(2)
        hs.append("c", sized(100), 5)
        self.assertEqual(hs.get("a", 11.5).since(1005, 11.5), None)  # by age, on a read
        self.assertEqual(hs.total_bytes, 400)
        check(11.5)
        self.assertEqual(hs.sweep(12.5), 2)  # a and b: all aged out
        self.assertEqual(hs.total_bytes, 100)
        check(12.5)
        self.assertEqual(hs.sweep(20), 1)
        self.assertEqual((len(hs), hs.total_bytes), (0, 0))

    @given(st.lists(st.tuples(st.sampled_from("abcd"), st.integers(20, 400),
                              st.floats(0, 3)), max_size=60))
    @settings(max_examples=200, deadline=None)
    def test_bounds_and_accounting_hold(self, script: list[tuple[str, int, float]]) -> None:
        """After any appends, each room and all rooms are within bounds and counted exactly."""
        hs = Histories(max_events=4, max_age_seconds=5, max_bytes=600, max_total_bytes=1000)
        now = 1.0
        for room, size, later in script:
            now += later
            hs.append(room, sized(size), now)
            rooms = [kept(hs.get(r, now), now) for r in "abcd"]
            self.assertLessEqual(max(sum(map(len, events)) for events in rooms), 600)
            self.assertEqual(hs.total_bytes, sum(len(e) for events in rooms for e in events))
            self.assertLessEqual(hs.total_bytes, 1000)


class Recorder:
    """A room member that records what it is sent."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.user_id: str | None = client_id
        self.initials = "XX"
        self.frames: list[bytes] = []
        self.writer = self

    def send(self, frame: bytes) -> None:
        self.frames.append(frame)


class HoldTests(SynchronousTestCase):
    """RoomRegistry.join(hold=True) and release()."""

    def test_hold_then_release_skips_replayed(self) -> None:
        """Held events come out on release, except those numbered at or below after_seq."""
        registry = RoomRegistry(Clock(), encode=lambda b: b)
        other = Recorder("other")
        registry.join("p", other)
        member = Recorder("m")
        registry.join("p", member, hold=True)
        member.frames.clear()
        for seq in (5, 6, 7):
            registry.deliver("p", b"e%d" % seq, seq=seq)
        self.assertEqual(member.frames, [])
        self.assertEqual(other.frames[-3:], [b"e5", b"e6", b"e7"])
        registry.release("p", member, after_seq=6)
        self.assertEqual(member.frames, [b"e7"])
        registry.deliver("p", b"e8", seq=8)
        self.assertEqual(member.frames, [b"e7", b"e8"])

    def test_leave_drops_hold(self) -> None:
        """Leaving while held forgets the held events; release after that sends nothing."""
        registry = RoomRegistry(Clock(), encode=lambda b: b)
        keep = Recorder("keep")
        registry.join("p", keep)
        member = Recorder("m")
        registry.join("p", member, hold=True)
        registry.deliver("p", b"e1", seq=1)
        registry.leave("p", member)
        member.frames.clear()
        registry.release("p", member, after_seq=0)
        self.assertEqual(member.frames, [])


class DeliveryGuaranteeTests(ServerTestCase):
    """seq, resume with since, RESYNC_REQUIRED and ACK over loopback (in-memory engine)."""

    async def events(self, client: Client, count: int) -> list[dict[str, Any]]:
        got = []
        while len(got) < count:
            msg = await client.next()
            if msg["type"] == "TASK_UPDATE":
                got.append(msg)
        return got

    async def test_relayed_events_carry_seq_and_project(self) -> None:
        """Relayed events carry consecutive seq numbers and the projectId."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        b = await self.joined("p1", "user_b")
        for i in range(3):
            a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"i": i}})
        got = await self.events(b, 3)
        first = got[0]["seq"]
        self.assertEqual([m["seq"] for m in got], [first, first + 1, first + 2])
        self.assertEqual({m["projectId"] for m in got}, {"p1"})

    async def test_resume_gets_missed_then_live(self) -> None:
        """A client rejoining with since gets exactly what it missed, then live events."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        b = await self.joined("p1", "user_b")
        a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"i": 0}})
        last = (await self.events(b, 1))[0]["seq"]
        b.sendClose(1000)
        await b.closed
        for i in range(1, 4):
            a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"i": i}})
        await self.round_trip(a)
        c = await self.connect()
        c.send_json({"type": "SET_USER", "payload": {"userId": "user_b"}})
        c.send_json({"type": "JOIN_PROJECT", "projectId": "p1", "since": last})
        a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"i": 4}})
        got = await self.events(c, 4)
        self.assertEqual([m["payload"]["i"] for m in got], [1, 2, 3, 4])
        self.assertEqual([m["seq"] for m in got], list(range(last + 1, last + 5)))
        self.assertEqual([m["type"] for m in await self.round_trip(c)
                          if m["type"] == "TASK_UPDATE"], [])

    async def test_since_beyond_history_resyncs(self) -> None:
        """When the history no longer reaches back, RESYNC_REQUIRED gives the current seq."""
        self.start_server(history_size=2)
        a = await self.joined("p1", "user_a")
        seq = 0
        for i in range(5):
            a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"i": i},
                         "operationId": f"op{i}", "ack": True})
            seq = (await a.next_of("ACK"))["seq"]
        c = await self.connect()
        c.send_json({"type": "JOIN_PROJECT", "projectId": "p1", "userId": "u",
                     "since": seq - 4})
        msg = await c.next_of("RESYNC_REQUIRED")
        self.assertEqual((msg["projectId"], msg["seq"]), ("p1", seq))
        a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"i": 5}})
        live = await self.events(c, 1)
        self.assertEqual(live[0]["seq"], seq + 1)

    async def test_join_without_since_is_v1(self) -> None:
        """A join without since replays nothing."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {}})
        await self.round_trip(a)
        b = await self.joined("p1", "user_b")
        self.assertEqual([m for m in await self.round_trip(b) if m["type"] == "TASK_UPDATE"],
                         [])

    async def test_ack_and_retry(self) -> None:
        """ack:true gets an ACK with the seq; a retry is acknowledged again and not redelivered."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        b = await self.joined("p1", "user_b")
        frame = {"type": "TASK_CREATE", "projectId": "p1", "payload": {"id": "t1"},
                 "operationId": "op-1", "ack": True}
        a.send_json(frame)
        ack = await a.next_of("ACK")
        self.assertEqual((ack["operationId"], ack["projectId"]), ("op-1", "p1"))
        a.send_json(frame)
        again = await a.next_of("ACK")
        self.assertEqual(again["seq"], ack["seq"])
        got = [m for m in await self.round_trip(b) if m["type"] == "TASK_CREATE"]
        self.assertEqual([m["seq"] for m in got], [ack["seq"]])

    async def test_refused_ack_event_gets_error_with_operation_id(self) -> None:
        """An ack event into a room not joined gets the ERROR with its operationId."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        a.send_json({"type": "TASK_UPDATE", "projectId": "p2", "operationId": "op-x",
                     "ack": True})
        err = await a.next_of("ERROR")
        self.assertEqual((err["code"], err["operationId"]), ("NOT_IN_PROJECT", "op-x"))

    async def test_bad_since_and_ack(self) -> None:
        """since must be a non-negative integer; ack needs an operationId."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        a.send_json({"type": "JOIN_PROJECT", "projectId": "p2", "since": -1})
        self.assertEqual((await a.next_of("ERROR"))["code"], "INVALID_SINCE")
        a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "ack": True})
        self.assertEqual((await a.next_of("ERROR"))["code"], "MISSING_OPERATION_ID")


class RecordingClient(WebSocketClientProtocol):
    """An in-memory client that keeps every message it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[dict[str, Any]] = []

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received.append(json.loads(payload))

    def send_json(self, obj: Any) -> None:
        self.sendMessage(json.dumps(obj).encode())


class MemoryServer:
    """The real server stack and real clients joined by iosim on a fake clock."""

    def __init__(self, test: SynchronousTestCase, config: Config) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1_700_000_000)  # a realistic epoch for sequence numbers
        saved = txaio.config.loop
        txaio.config.loop = self.clock  # Autobahn's timers go through txaio
        test.addCleanup(setattr, txaio.config, "loop", saved)
        self.factory = build_factory(config, self.clock)
        self.site = make_site(self.factory)
        self.pumps: list[iosim.IOPump] = []

    def connect(self) -> RecordingClient:
        server = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        factory = WebSocketClientFactory("ws://127.0.0.1/ws", reactor=self.clock)
        factory.protocol = RecordingClient
        client = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2))
        self.pumps.append(iosim.connect(server, iosim.makeFakeServer(server),
                                        client, iosim.makeFakeClient(client)))
        self.flush()
        return client

    def flush(self) -> None:
        for _ in range(4):
            for pump in self.pumps:
                pump.flush()
            self.clock.advance(0)


class InterleavingTests(SynchronousTestCase):
    """Property: no interleaving of publishes, drops and resumes loses or repeats an event."""

    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.sampled_from(["publish", "publish", "broadcast", "drop", "resume"]),
                    min_size=1, max_size=30),
           st.integers(min_value=2, max_value=50))
    def test_interleavings_lose_nothing(self, script: list[str], history: int) -> None:
        """A client ends with exactly the room's events in seq order, or is told to resync."""
        server = MemoryServer(self, Config(presence_window_seconds=0, ping_interval_seconds=0,
                                           history_size=history, rate_limit_per_second=0))
        pub = server.connect()
        pub.send_json({"type": "JOIN_PROJECT", "projectId": "p", "userId": "pub"})
        sub: RecordingClient | None = server.connect()
        assert sub is not None
        # A v2 client's first join says since 0: RESYNC_REQUIRED tells it the
        # room's current seq, from which it can later resume without a gap.
        sub.send_json({"type": "JOIN_PROJECT", "projectId": "p", "userId": "sub", "since": 0})
        server.flush()
        bus = server.factory.bus
        seen: list[int] = []
        published = 0

        def collect(client: RecordingClient) -> None:
            for m in client.received:
                if m["type"] in ("TASK_UPDATE", "PROJECT_DELETE"):
                    seen.append(m["seq"])
                elif m["type"] == "RESYNC_REQUIRED":
                    # The client reloads the room as of this seq: what it
                    # holds counts as everything up to here.
                    seen.extend(range(seen[-1] + 1 if seen else m["seq"], m["seq"] + 1))
            client.received.clear()

        collect(sub)

        for step in script:
            if step == "publish":
                pub.send_json({"type": "TASK_UPDATE", "projectId": "p", "payload": {}})
                published += 1
            elif step == "broadcast":
                bus.append("p", b'{"type":"PROJECT_DELETE","projectId":"p"}')
                published += 1
            elif step == "drop" and sub is not None:
                server.flush()
                collect(sub)
                sub.dropConnection(abort=True)
                sub = None
            elif step == "resume" and sub is None:
                sub = server.connect()
                sub.send_json({"type": "JOIN_PROJECT", "projectId": "p", "userId": "sub",
                               "since": seen[-1]})
            server.flush()
        if sub is not None:
            collect(sub)
        start = seen[0]  # the first RESYNC_REQUIRED: the room's seq at the first join
        if sub is not None:
            server.flush()
            collect(sub)
            # In order, no duplicate, no gap, up to the room's last event.
            self.assertEqual(seen, list(range(start, start + len(seen))))
            self.assertEqual(seen[-1], start + published)
