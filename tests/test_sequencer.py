"""
Tests for the room sequencer as plain code: every ordering case the Redis
tests cover (in order, duplicates, gaps, overflow, a history that no longer
reaches back, resubscription, rooms closing during a read), with no Redis
and no reactor.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from happyrobot.redis.sequencer import RoomSequence, Sequencer

ME = b"host-1-aaa"


def _payload(frame: bytes) -> bytes:
    """The payload of one unmasked text frame made by text_frame."""
    n = frame[1]
    if n < 126:
        return frame[2:]
    return frame[4:] if n == 126 else frame[10:]


def ev(seq: int) -> bytes:
    """An event's JSON as Redis gives it (with its seq)."""
    return b'{"seq":%d}' % seq


class Steps:
    """Records what the sequencer asks for; reads and subscriptions are answered by the test."""

    def __init__(self) -> None:
        self.asked: list[tuple[Any, ...]] = []
        self.delivered: list[tuple[str, int, str | None, bytes]] = []
        self.subscribe_sent = True
        self.changes = 0
        self.rooms: dict[str, RoomSequence] = {}

    # SequencerOutputs, then the sequencer's other callbacks
    def read(self, project_id: str, room: RoomSequence, since: int | None) -> None:
        self.rooms[project_id] = room
        self.asked.append(("read", project_id, since))

    def subscribe(self, project_id: str, room: RoomSequence) -> bool:
        self.rooms[project_id] = room
        self.asked.append(("subscribe", project_id))
        return self.subscribe_sent

    def resync(self, project_id: str, at: int) -> None:
        self.delivered.append((project_id, -at, None, b"RESYNC"))

    def release(self, project_id: str, waiting: list[tuple[bytes, Any]]) -> None:
        self.asked.append(("release", project_id, [envelope for envelope, _ in waiting]))

    def changed(self) -> None:
        self.changes += 1

    # the registry's deliver
    def deliver(self, project_id: str, frame: bytes, exclude: str | None, seq: int) -> None:
        self.delivered.append((project_id, seq, exclude, _payload(frame)))

    def take(self) -> list[tuple[Any, ...]]:
        asked, self.asked = self.asked, []
        return asked

    def seqs(self, project_id: str = "p1") -> list[int]:
        """Delivered seqs in order, RESYNC_REQUIRED as -seq."""
        return [s for p, s, _, _ in self.delivered if p == project_id]


class SequencerTestCase(SynchronousTestCase):
    """A sequencer with both links up and recording outputs."""

    def setUp(self) -> None:
        self.steps = Steps()
        self.seq = Sequencer(self.steps, self.steps.deliver, self.steps.changed, ME, buffer_limit=5)
        self.seq.commands_changed(True)
        self.seq.subscriber_changed(True)

    def room(self, project_id: str = "p1") -> RoomSequence:
        room = self.seq.room(project_id)
        assert room is not None
        return room

    def synced_at(self, last: int, project_id: str = "p1") -> RoomSequence:
        """Open a room whose seq is C{last}, subscribe it and catch up with nothing new."""
        self.seq.open(project_id)
        room = self.room(project_id)
        self.assertEqual(self.steps.take(), [("read", project_id, None)])
        self.seq.read_done(project_id, room, None, (last, None, None))
        self.assertEqual(self.steps.take(), [("subscribe", project_id)])
        self.seq.subscribed(project_id, room, self.seq.epoch)
        self.assertEqual(self.steps.take(), [("read", project_id, last)])
        self.seq.read_done(project_id, room, last, (last, [], None))
        self.assertTrue(room.synced)
        self.assertEqual(self.steps.take(), [])
        return room

    def live(self, seq: int, exclude: str | None = None, project_id: str = "p1") -> None:
        room = self.seq.room(project_id)
        assert room is not None
        self.seq.live(project_id, room, seq, ev(seq), exclude)


class OpeningTests(SequencerTestCase):
    """A room's way from its first member to delivering live events."""

    def test_seq_then_subscribe_then_catch_up(self) -> None:
        """A new room reads its seq, subscribes, then reads what came in between and delivers it."""
        self.seq.open("p1")
        room = self.room()
        self.assertEqual(self.steps.take(), [("read", "p1", None)])
        self.assertFalse(room.synced)
        self.seq.read_done("p1", room, None, (10, None, None))
        self.assertEqual((room.last, self.steps.take()), (10, [("subscribe", "p1")]))
        self.seq.subscribed("p1", room, self.seq.epoch)
        self.assertEqual(self.steps.take(), [("read", "p1", 10)])
        self.assertFalse(room.synced)  # reading
        self.seq.read_done("p1", room, 10, (12, [ev(11), b"", ev(12), b""], None))
        self.assertEqual(self.steps.seqs(), [11, 12])
        self.assertEqual(room.last, 12)
        self.assertTrue(room.synced)
        self.assertTrue(self.seq.settled())

    def test_waits_for_the_links(self) -> None:
        """A room opened while Redis is down is read and subscribed once the links are back."""
        self.seq.commands_changed(False)
        self.seq.subscriber_changed(False)
        self.seq.open("p2")
        self.assertEqual(self.steps.take(), [])
        self.seq.subscriber_changed(True)
        self.assertEqual(self.steps.take(), [])  # the seq comes first
        self.seq.commands_changed(True)
        self.assertEqual(self.steps.take(), [("read", "p2", None)])
        self.seq.read_done("p2", self.room("p2"), None, (5, None, None))
        self.assertEqual(self.steps.take(), [("subscribe", "p2")])

    def test_live_events_before_the_catch_up_wait(self) -> None:
        """Events arriving before the room is caught up wait and follow the history, each once."""
        self.seq.open("p1")
        room = self.room()
        self.live(11)  # before the seq is even known
        self.seq.read_done("p1", room, None, (10, None, None))
        self.seq.subscribed("p1", room, self.seq.epoch)
        self.steps.take()
        self.live(12)
        self.live(13)
        self.assertEqual(self.steps.seqs(), [])
        self.seq.read_done("p1", room, 10, (12, [ev(11), b"", ev(12), b""], None))
        self.assertEqual(self.steps.seqs(), [11, 12, 13])
        self.assertEqual(room.last, 13)

    def test_subscribe_not_sent(self) -> None:
        """A SUBSCRIBE that could not be sent is sent when the subscriber link comes back."""
        self.steps.subscribe_sent = False
        self.seq.open("p1")
        room = self.room()
        self.seq.read_done("p1", room, None, (10, None, None))
        self.assertEqual(self.steps.take(), [("read", "p1", None), ("subscribe", "p1")])
        self.assertFalse(room.subscribing)
        self.steps.subscribe_sent = True
        self.seq.subscriber_changed(True)
        self.assertEqual(self.steps.take(), [("subscribe", "p1")])
        self.assertTrue(room.subscribing)


class LiveOrderTests(SequencerTestCase):
    """Live events of a room that is caught up."""

    def test_in_order_delivered_at_once(self) -> None:
        """The next seq is delivered in the same call, with its excluded sender, and waiters hear."""
        room = self.synced_at(10)
        before = self.steps.changes
        self.live(11, "c1")
        self.live(12)
        self.assertEqual(self.steps.delivered,
                         [("p1", 11, "c1", ev(11)), ("p1", 12, None, ev(12))])
        self.assertEqual(room.last, 12)
        self.assertEqual(self.steps.changes, before + 2)
        self.assertEqual(self.steps.take(), [])

    def test_duplicates_dropped(self) -> None:
        """An event at or below the last delivered seq is dropped."""
        self.synced_at(10)
        self.live(11)
        self.live(11)
        self.live(9)
        self.live(12)
        self.assertEqual(self.steps.seqs(), [11, 12])

    def test_gap_read_then_delivered(self) -> None:
        """A skipped number makes the room read the history, then deliver the gap and what waited."""
        room = self.synced_at(10)
        with capturedLogs() as captured:
            self.live(13)
        self.assertEqual([(e["last"], e["seq"]) for e in captured
                          if e["log_level"] == LogLevel.warn], [(10, 13)])
        self.assertEqual(self.steps.take(), [("read", "p1", 10)])
        self.assertFalse(room.synced)
        self.live(14)
        self.live(12)  # arrives late: the history has it, delivered once
        self.seq.read_done("p1", room, 10, (14, [ev(11), b"", ev(12), b"", ev(13), b"",
                                                 ev(14), b""], None))
        self.assertEqual(self.steps.seqs(), [11, 12, 13, 14])
        self.assertTrue(room.synced)
        self.live(15)
        self.assertEqual(self.steps.seqs()[-1], 15)

    def test_history_events_skip_our_own_sender(self) -> None:
        """Events read from the history skip their sender if it is ours, not another instance's."""
        room = self.synced_at(10)
        self.live(13)
        self.seq.read_done("p1", room, 10, (12, [ev(11), ME + b"\nc1", ev(12),
                                                 b"other-2-bbb\nc1"], None))
        self.assertEqual([(s, x) for _, s, x, _ in self.steps.delivered],
                         [(11, "c1"), (12, None), (13, None)])

    def test_overflow_reads_again(self) -> None:
        """Too many events waiting are dropped, and the history is read once more for them."""
        room = self.synced_at(10)
        self.live(12)  # a gap: reading from 10
        self.assertEqual(self.steps.take(), [("read", "p1", 10)])
        for seq in range(13, 19):  # 7 waiting > buffer_limit 5
            self.live(seq)
        self.assertTrue(room.overflow)
        self.seq.read_done("p1", room, 10, (12, [ev(11), b"", ev(12), b""], None))
        self.assertEqual(self.steps.seqs(), [11, 12])
        self.assertEqual(self.steps.take(), [("read", "p1", 12)])  # again, for what was dropped
        self.assertFalse(room.overflow)
        kept = [x for s in range(13, 19) for x in (ev(s), b"")]
        self.seq.read_done("p1", room, 12, (18, kept, None))
        self.assertEqual(self.steps.seqs(), list(range(11, 19)))
        self.assertTrue(room.synced)


class JumpTests(SequencerTestCase):
    """The numbering jumped (a new Redis) with nothing missed: no RESYNC_REQUIRED."""

    def test_events_continue_above_the_jump(self) -> None:
        """The history's jump entry ('', seq) moves the count on; the events after it follow."""
        room = self.synced_at(10)
        self.live(102)  # numbered after the jump from 11 to 100
        self.assertEqual(self.steps.take(), [("read", "p1", 10)])
        self.seq.read_done("p1", room, 10, (102, [ev(11), b"", b"", b"100", ev(101), b"",
                                                  ev(102), b""], None))
        self.assertEqual(self.steps.seqs(), [11, 101, 102])
        self.assertTrue(room.synced)
        self.live(103)
        self.assertEqual(self.steps.seqs()[-1], 103)


class HistoryGoneTests(SequencerTestCase):
    """Catching up when the history no longer reaches back."""

    def test_resync_at_current_seq(self) -> None:
        """With nothing kept, members get RESYNC_REQUIRED at the current seq, then live events."""
        room = self.synced_at(10)
        self.live(20)
        self.live(21)
        self.steps.take()
        with capturedLogs() as captured:
            self.seq.read_done("p1", room, 10, (20, None, None))
        self.assertEqual(self.steps.seqs(), [-20, 21])
        self.assertEqual([e["at"] for e in captured if e["log_level"] == LogLevel.warn], [20])
        self.assertEqual(room.last, 21)

    def test_resync_before_the_oldest_kept(self) -> None:
        """With later events kept, RESYNC_REQUIRED comes at the one before them, then they follow."""
        room = self.synced_at(10)
        self.live(16)
        self.steps.take()
        self.seq.read_done("p1", room, 10, (16, [ev(14), b"", ev(15), b"", ev(16), b""], 13))
        self.assertEqual(self.steps.seqs(), [-13, 14, 15, 16])
        self.assertTrue(room.synced)


class LinkLossTests(SequencerTestCase):
    """The subscriber or command connection lost and back."""

    def test_resubscribe_and_catch_up(self) -> None:
        """After the subscription is lost, the room subscribes again and reads what it missed."""
        room = self.synced_at(10)
        self.live(11)
        self.seq.subscriber_changed(False)
        self.assertFalse(room.synced)
        self.assertEqual((room.confirmed, room.stale), (False, True))
        self.assertEqual(self.steps.take(), [])
        self.seq.subscriber_changed(True)
        self.assertEqual(self.steps.take(), [("subscribe", "p1")])
        self.seq.subscribed("p1", room, self.seq.epoch)
        self.assertEqual(self.steps.take(), [("read", "p1", 11)])
        self.seq.read_done("p1", room, 11, (14, [x for s in (12, 13, 14)
                                                 for x in (ev(s), b"")], None))
        self.assertEqual(self.steps.seqs(), [11, 12, 13, 14])
        self.assertTrue(room.synced)

    def test_confirmation_from_a_lost_connection_ignored(self) -> None:
        """A SUBSCRIBE answered on a connection since replaced confirms nothing."""
        self.seq.open("p1")
        room = self.room()
        self.seq.read_done("p1", room, None, (10, None, None))
        old = self.seq.epoch
        self.seq.subscriber_changed(False)
        self.seq.subscriber_changed(True)
        self.steps.take()
        self.seq.subscribed("p1", room, old)
        self.assertFalse(room.confirmed)
        self.assertEqual(self.steps.take(), [])

    def test_failed_read_retried_when_commands_back(self) -> None:
        """A read that failed while the command link went is made again when it is back."""
        room = self.synced_at(10)
        self.live(12)
        self.steps.take()
        self.seq.commands_changed(False)
        with capturedLogs() as captured:
            self.seq.read_failed("p1", room, "connection lost")
        self.assertEqual([e["why"] for e in captured], ["connection lost"])
        self.assertEqual(self.steps.take(), [])
        self.seq.commands_changed(True)
        self.assertEqual(self.steps.take(), [("read", "p1", 10)])


class ClosingTests(SequencerTestCase):
    """Rooms emptied while something about them is under way."""

    def test_closed_during_a_read(self) -> None:
        """A read answered after the room closed delivers nothing; a reopened room starts anew."""
        room = self.synced_at(10)
        self.live(13)
        self.steps.take()
        self.assertIs(self.seq.close("p1"), room)
        self.seq.open("p1")
        self.assertEqual(self.steps.take(), [("read", "p1", None)])
        self.seq.read_done("p1", room, 10, (13, [ev(11), b"", ev(12), b""], None))
        self.seq.read_failed("p1", room, "late")
        self.assertEqual(self.steps.seqs(), [])
        self.assertEqual(self.steps.take(), [])
        self.assertIsNone(self.room().last)

    def test_closed_before_subscribe_confirmed(self) -> None:
        """A SUBSCRIBE confirmed after the room closed changes nothing."""
        self.seq.open("p1")
        room = self.room()
        self.seq.read_done("p1", room, None, (10, None, None))
        self.seq.close("p1")
        self.steps.take()
        self.seq.subscribed("p1", room, self.seq.epoch)
        self.assertEqual(self.steps.take(), [])
        self.assertNotIn("p1", self.seq)


class BacklogTests(SequencerTestCase):
    """Presence announcements waiting for a room's SUBSCRIBE."""

    def test_held_until_confirmed(self) -> None:
        """Announcements wait until the SUBSCRIBE is confirmed, then are released in order."""
        self.seq.open("p1")
        room = self.room()
        self.assertTrue(self.seq.hold("p1", (b"P1", lambda: None)))
        self.assertTrue(self.seq.hold("p1", (b"P2", lambda: None)))
        self.seq.read_done("p1", room, None, (10, None, None))
        self.steps.take()
        self.seq.subscribed("p1", room, self.seq.epoch)
        self.assertEqual(self.steps.take(), [("release", "p1", [b"P1", b"P2"]),
                                             ("read", "p1", 10)])
        self.assertFalse(self.seq.hold("p1", (b"P3", lambda: None)))
        self.assertFalse(self.seq.hold("nowhere", (b"P4", lambda: None)))

    def test_taken_when_the_link_goes(self) -> None:
        """What waits is handed back (for local delivery) when it cannot reach Redis."""
        self.seq.open("p1")
        self.seq.open("p2")
        self.seq.hold("p1", (b"P1", lambda: None))
        self.seq.hold("p2", (b"P2", lambda: None))
        self.assertEqual([e for e, _ in self.seq.take_backlogs()], [b"P1", b"P2"])
        self.assertEqual(self.seq.take_backlogs(), [])


class ReplayWaitTests(SequencerTestCase):
    """What a replay waits on: the room synced, then its last seq past the one read."""

    def test_synced_and_last(self) -> None:
        """synced is false while unconfirmed, stale or reading; last follows every delivery."""
        self.seq.open("p1")
        room = self.room()
        self.assertFalse(room.synced)
        self.seq.read_done("p1", room, None, (10, None, None))
        self.assertFalse(room.synced)  # not subscribed
        self.seq.subscribed("p1", room, self.seq.epoch)
        self.assertFalse(room.synced)  # reading
        changes = self.steps.changes
        self.seq.read_done("p1", room, 10, (10, [], None))
        self.assertTrue(room.synced)
        self.assertGreater(self.steps.changes, changes)
        self.live(11)
        self.assertEqual(room.last, 11)
        self.live(13)
        self.assertFalse(room.synced)  # stale: a gap
        self.assertEqual(room.last, 11)


class OrderPropertyTests(SynchronousTestCase):
    """Whatever the arrival order, members get every event once, in seq order."""

    @given(
        st.lists(st.integers(11, 40), min_size=1, max_size=60),
        st.lists(st.booleans(), min_size=60, max_size=60),
    )
    def test_any_arrival_order(self, arrivals: list[int], answer_now: list[bool]) -> None:
        """Live events in any order, with duplicates, end delivered gap-free once the reads answer."""
        steps = Steps()
        seq = Sequencer(steps, steps.deliver, steps.changed, ME, buffer_limit=1000)
        seq.commands_changed(True)
        seq.subscriber_changed(True)
        seq.open("p1")
        steps.take()
        room = seq.room("p1")
        assert room is not None
        seq.read_done("p1", room, None, (10, None, None))
        seq.subscribed("p1", room, seq.epoch)
        top = max(arrivals)

        def answer() -> None:
            for step in steps.take():
                if step[0] == "read":
                    since = step[2]
                    now = max(top, since)
                    entries = [x for s in range(since + 1, now + 1) for x in (ev(s), b"")]
                    seq.read_done("p1", room, since, (now, entries, None))

        for i, s in enumerate(arrivals):
            seq.live("p1", room, s, ev(s), None)
            if answer_now[i]:
                answer()
        while steps.asked:
            answer()
        self.assertEqual(steps.seqs(), list(range(11, top + 1)))
        self.assertTrue(room.synced)
