"""
Tests for L{happyrobot.rooms}: membership, relaying to the other members,
presence lists and presence throttling.

The registry runs on a L{Clock} and with C{encode=lambda b: b}, so every
frame a member receives is plain JSON; time moves only by C{clock.advance}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from happyrobot import messages
from happyrobot.framing import text_frame
from happyrobot.rooms import RoomRegistry

#: Where the test clock starts, in seconds: PROTOCOL.md's example time.
START_SECONDS = 1732590000.0
START_MS = 1732590000000


class RecordingMember:
    """A fake member that records every frame it is sent."""

    def __init__(self, client_id: str, user_id: str | None = None, initials: str = "") -> None:
        """A member with these ids and initials that has received nothing yet."""
        self.client_id = client_id
        self.user_id = user_id
        self.initials = initials
        self.frames: list[bytes] = []

    @property
    def writer(self) -> RecordingMember:
        """Frames for this member come back to its C{send}."""
        return self

    def send(self, frame: bytes) -> None:
        """Record C{frame}."""
        self.frames.append(frame)

    def decoded(self) -> list[dict[str, Any]]:
        """Every frame received, decoded from JSON."""
        return [json.loads(f) for f in self.frames]

    def presences(self) -> list[dict[str, Any]]:
        """The USER_PRESENCE frames received, decoded."""
        return [m for m in self.decoded() if m["type"] == "USER_PRESENCE"]

    def last_presence(self) -> dict[str, Any]:
        """The payload of the last USER_PRESENCE received."""
        presences = self.presences()
        assert presences, f"{self.client_id} received no presence"
        payload: dict[str, Any] = presences[-1]["payload"]
        return payload


class RecordingListener:
    """A fake room listener that records the rooms opened and closed, in order."""

    def __init__(self) -> None:
        """A listener that has heard nothing yet."""
        self.events: list[tuple[str, str]] = []
        #: The presence changes it heard, which the registry no longer announces itself.
        self.presence: list[tuple[str, list[str]]] = []

    def presence_changed(self, project_id: str, active_users: list[dict[str, Any]]) -> None:
        """Record the local members' user ids."""
        self.presence.append((project_id, [u["userId"] for u in active_users]))

    def room_opened(self, project_id: str) -> None:
        """Record that C{project_id} opened."""
        self.events.append(("opened", project_id))

    def room_closed(self, project_id: str) -> None:
        """Record that C{project_id} closed."""
        self.events.append(("closed", project_id))


def _member(n: int, user: bool = True) -> RecordingMember:
    """Member number C{n}, with a user id and initials unless C{user} is false."""
    if not user:
        return RecordingMember(f"c{n}")
    return RecordingMember(f"c{n}", f"user_{n}", f"U{n}")


def _registry(window: float = 0.0) -> tuple[Clock, RoomRegistry]:
    """A clock at START_SECONDS and a registry on it that sends plain JSON."""
    clock = Clock()
    clock.advance(START_SECONDS)
    return clock, RoomRegistry(clock, presence_window_seconds=window, encode=lambda b: b)


def _entry(member: RecordingMember, joined_at: int) -> dict[str, Any]:
    """The activeUsers entry expected for C{member}."""
    return {
        "userId": member.user_id,
        "clientId": member.client_id,
        "joinedAt": joined_at,
        "initials": member.initials,
    }


class JoinTests(SynchronousTestCase):
    """L{RoomRegistry.join}."""

    def test_creates_room(self) -> None:
        """The first join makes the room and reports the member as new."""
        _, registry = _registry()
        self.assertTrue(registry.join("p1", _member(1)))
        self.assertIn("p1", registry)
        self.assertEqual(len(registry), 1)
        self.assertEqual(registry.member_count("p1"), 1)

    def test_joiner_receives_presence(self) -> None:
        """The joiner receives a USER_PRESENCE listing itself."""
        _, registry = _registry()
        a = RecordingMember("c1", "user_2x", "AL")
        registry.join("p1", a)
        self.assertEqual(
            a.decoded(),
            [
                {
                    "type": "USER_PRESENCE",
                    "payload": {
                        "projectId": "p1",
                        "activeUsers": [
                            {
                                "userId": "user_2x",
                                "clientId": "c1",
                                "joinedAt": START_MS,
                                "initials": "AL",
                            }
                        ],
                        "userCount": 1,
                    },
                    "operationId": f"presence-{START_MS}",
                    "timestamp": START_MS,
                }
            ],
        )

    def test_every_member_receives_presence(self) -> None:
        """A second join sends every member the list of both, in join order, with join times."""
        clock, registry = _registry()
        a, b = _member(1), _member(2)
        registry.join("p1", a)
        clock.advance(2.5)
        registry.join("p1", b)
        expected = {
            "projectId": "p1",
            "activeUsers": [_entry(a, START_MS), _entry(b, START_MS + 2500)],
            "userCount": 2,
        }
        self.assertEqual(a.last_presence(), expected)
        self.assertEqual(b.last_presence(), expected)
        self.assertEqual((len(a.frames), len(b.frames)), (2, 1))

    def test_member_without_user_not_listed(self) -> None:
        """A member without a user id receives presence but is not listed or counted."""
        _, registry = _registry()
        anon, a = _member(1, user=False), _member(2)
        registry.join("p1", anon)
        self.assertEqual(
            anon.last_presence(), {"projectId": "p1", "activeUsers": [], "userCount": 0}
        )
        registry.join("p1", a)
        expected = {"projectId": "p1", "activeUsers": [_entry(a, START_MS)], "userCount": 1}
        self.assertEqual(anon.last_presence(), expected)
        self.assertEqual(a.last_presence(), expected)
        self.assertEqual(registry.member_count("p1"), 2)

    def test_rejoin_does_not_duplicate(self) -> None:
        """Joining again is not new, keeps one entry and the first join time, and re-announces."""
        clock, registry = _registry()
        a, b = _member(1), _member(2)
        registry.join("p1", a)
        registry.join("p1", b)
        clock.advance(10)
        self.assertFalse(registry.join("p1", a))
        self.assertEqual(registry.member_count("p1"), 2)
        self.assertEqual(
            a.last_presence()["activeUsers"], [_entry(a, START_MS), _entry(b, START_MS)]
        )
        self.assertEqual((len(a.frames), len(b.frames)), (3, 2))

    def test_rooms_are_separate(self) -> None:
        """Presence of one room goes only to that room's members."""
        _, registry = _registry()
        a, b = _member(1), _member(2)
        registry.join("p1", a)
        registry.join("p2", b)
        self.assertEqual(len(a.frames), 1)
        self.assertEqual(b.last_presence()["projectId"], "p2")
        self.assertEqual(len(registry), 2)

    def test_member_in_many_rooms(self) -> None:
        """One member may be in several rooms, with a presence for each."""
        _, registry = _registry()
        a = _member(1)
        registry.join("p1", a)
        registry.join("p2", a)
        self.assertEqual([p["payload"]["projectId"] for p in a.presences()], ["p1", "p2"])
        self.assertTrue(registry.is_member("p1", "c1"))
        self.assertTrue(registry.is_member("p2", "c1"))

    def test_default_encoding_is_text_frame(self) -> None:
        """Without C{encode}, presence is sent as an RFC 6455 text frame."""
        clock = Clock()
        registry = RoomRegistry(clock)
        a = _member(1)
        registry.join("p1", a)
        expected = messages.presence("p1", [_entry(a, 0)], 0)
        self.assertEqual(a.frames, [text_frame(expected)])


class LeaveTests(SynchronousTestCase):
    """L{RoomRegistry.leave}."""

    def test_leave_removes_and_announces(self) -> None:
        """Leaving removes the member; the others learn the new list and the leaver gets nothing."""
        _, registry = _registry()
        a, b = _member(1), _member(2)
        registry.join("p1", a)
        registry.join("p1", b)
        frames_before = len(b.frames)
        self.assertTrue(registry.leave("p1", b))
        self.assertFalse(registry.is_member("p1", "c2"))
        self.assertEqual(registry.member_count("p1"), 1)
        self.assertEqual(
            a.last_presence(),
            {"projectId": "p1", "activeUsers": [_entry(a, START_MS)], "userCount": 1},
        )
        self.assertEqual(len(b.frames), frames_before)

    def test_last_leave_deletes_room(self) -> None:
        """The last member leaving drops the room."""
        _, registry = _registry()
        a = _member(1)
        registry.join("p1", a)
        self.assertTrue(registry.leave("p1", a))
        self.assertNotIn("p1", registry)
        self.assertEqual(len(registry), 0)
        self.assertEqual(registry.member_count("p1"), 0)
        self.assertEqual(registry.snapshot(), {})
        self.assertEqual(len(a.frames), 1)

    def test_leave_room_not_in(self) -> None:
        """Leaving a room one is not in returns False and sends nothing."""
        _, registry = _registry()
        a, b = _member(1), _member(2)
        registry.join("p1", a)
        self.assertFalse(registry.leave("p1", b))
        self.assertEqual(registry.member_count("p1"), 1)
        self.assertEqual((len(a.frames), len(b.frames)), (1, 0))

    def test_leave_unknown_room(self) -> None:
        """Leaving a room that does not exist returns False and makes no room."""
        _, registry = _registry()
        self.assertFalse(registry.leave("nope", _member(1)))
        self.assertNotIn("nope", registry)

    def test_leave_twice(self) -> None:
        """Leaving twice is harmless: the second time returns False."""
        _, registry = _registry()
        a, b = _member(1), _member(2)
        registry.join("p1", a)
        registry.join("p1", b)
        registry.leave("p1", b)
        frames = len(a.frames)
        self.assertFalse(registry.leave("p1", b))
        self.assertEqual(len(a.frames), frames)

    def test_rejoin_after_leave_is_new(self) -> None:
        """A member who left and comes back is new, with a new join time."""
        clock, registry = _registry()
        a, b = _member(1), _member(2)
        registry.join("p1", a)
        registry.join("p1", b)
        registry.leave("p1", b)
        clock.advance(3)
        self.assertTrue(registry.join("p1", b))
        self.assertEqual(
            a.last_presence()["activeUsers"],
            [_entry(a, START_MS), _entry(b, START_MS + 3000)],
        )

    def test_leave_cancels_presence_timer(self) -> None:
        """An emptied room cancels its pending presence timer and sends nothing later."""
        clock, registry = _registry(window=0.05)
        a, b = _member(1), _member(2)
        registry.join("p1", a)
        registry.join("p1", b)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        registry.leave("p1", b)
        registry.leave("p1", a)
        self.assertEqual(clock.getDelayedCalls(), [])
        counts = (len(a.frames), len(b.frames))
        clock.advance(1)
        self.assertEqual((len(a.frames), len(b.frames)), counts)
        self.assertEqual(counts, (1, 0))


class DeliverTests(SynchronousTestCase):
    """L{RoomRegistry.deliver}."""

    def test_excludes_sender(self) -> None:
        """Every member but the sender receives the frame, and the count says how many."""
        _, registry = _registry()
        a, b, c = _member(1), _member(2), _member(3)
        for m in (a, b, c):
            registry.join("p1", m)
        self.assertEqual(registry.deliver("p1", b"EVENT", exclude="c2"), 2)
        self.assertEqual(a.frames[-1], b"EVENT")
        self.assertEqual(c.frames[-1], b"EVENT")
        self.assertNotIn(b"EVENT", b.frames)

    def test_no_exclude(self) -> None:
        """Without C{exclude} every member receives the frame."""
        _, registry = _registry()
        a, b = _member(1), _member(2)
        registry.join("p1", a)
        registry.join("p1", b)
        self.assertEqual(registry.deliver("p1", b"EVENT"), 2)
        self.assertEqual((a.frames[-1], b.frames[-1]), (b"EVENT", b"EVENT"))

    def test_exclude_stranger(self) -> None:
        """Excluding a client that is not in the room excludes nobody."""
        _, registry = _registry()
        a = _member(1)
        registry.join("p1", a)
        self.assertEqual(registry.deliver("p1", b"EVENT", exclude="c9"), 1)

    def test_sender_alone(self) -> None:
        """A sender alone in its room reaches nobody."""
        _, registry = _registry()
        a = _member(1)
        registry.join("p1", a)
        self.assertEqual(registry.deliver("p1", b"EVENT", exclude="c1"), 0)
        self.assertEqual(len(a.frames), 1)

    def test_unknown_room(self) -> None:
        """Delivering to a room that does not exist reaches nobody and makes no room."""
        _, registry = _registry()
        self.assertEqual(registry.deliver("nope", b"EVENT"), 0)
        self.assertNotIn("nope", registry)

    def test_frame_not_reencoded(self) -> None:
        """The frame is handed over as given, the same object for every member."""
        registry = RoomRegistry(Clock())
        a, b = _member(1), _member(2)
        registry.join("p1", a)
        registry.join("p1", b)
        frame = text_frame(b'{"type":"TASK_UPDATE"}')
        registry.deliver("p1", frame)
        self.assertIs(a.frames[-1], frame)
        self.assertIs(b.frames[-1], frame)

    def test_other_rooms_untouched(self) -> None:
        """Members of other rooms receive nothing."""
        _, registry = _registry()
        a, b = _member(1), _member(2)
        registry.join("p1", a)
        registry.join("p2", b)
        registry.deliver("p1", b"EVENT")
        self.assertNotIn(b"EVENT", b.frames)


class MemberChangedTests(SynchronousTestCase):
    """L{RoomRegistry.member_changed}."""

    def test_reannounces_new_user(self) -> None:
        """After a member's user changes, each of its rooms is told the new entry."""
        _, registry = _registry()
        a, b = _member(1, user=False), _member(2)
        registry.join("p1", a)
        registry.join("p2", a)
        registry.join("p1", b)
        a.user_id, a.initials = "user_new", "NW"
        registry.member_changed({"p1", "p2"})
        self.assertEqual(
            b.last_presence()["activeUsers"], [_entry(a, START_MS), _entry(b, START_MS)]
        )
        self.assertEqual(
            sorted(p["payload"]["projectId"] for p in a.presences()[-2:]), ["p1", "p2"]
        )

    def test_unknown_rooms_ignored(self) -> None:
        """Rooms that do not exist are skipped and not created."""
        _, registry = _registry()
        a = _member(1)
        registry.join("p1", a)
        registry.member_changed(["nope", "p1"])
        self.assertEqual(len(a.frames), 2)
        self.assertNotIn("nope", registry)

    def test_no_rooms(self) -> None:
        """An empty list of rooms sends nothing."""
        _, registry = _registry()
        a = _member(1)
        registry.join("p1", a)
        registry.member_changed([])
        self.assertEqual(len(a.frames), 1)


class QueryTests(SynchronousTestCase):
    """snapshot(), member_count(), is_member(), active_users(), len() and in."""

    def test_snapshot(self) -> None:
        """snapshot() maps each project to its client ids in join order."""
        _, registry = _registry()
        a, b, c = _member(1), _member(2), _member(3)
        registry.join("p1", b)
        registry.join("p1", a)
        registry.join("p2", c)
        self.assertEqual(registry.snapshot(), {"p1": ["c2", "c1"], "p2": ["c3"]})

    def test_snapshot_is_a_copy(self) -> None:
        """Changing a snapshot does not change the registry."""
        _, registry = _registry()
        registry.join("p1", _member(1))
        snap = registry.snapshot()
        snap["p1"].append("c9")
        snap["p2"] = []
        self.assertEqual(registry.snapshot(), {"p1": ["c1"]})

    def test_empty(self) -> None:
        """A new registry has no rooms."""
        _, registry = _registry()
        self.assertEqual((len(registry), registry.snapshot()), (0, {}))
        self.assertNotIn("p1", registry)

    def test_member_count(self) -> None:
        """member_count() counts connections, with or without a user, and 0 for no room."""
        _, registry = _registry()
        registry.join("p1", _member(1))
        registry.join("p1", _member(2, user=False))
        self.assertEqual(registry.member_count("p1"), 2)
        self.assertEqual(registry.member_count("p2"), 0)

    def test_is_member(self) -> None:
        """is_member() is true only for a client in that room."""
        _, registry = _registry()
        registry.join("p1", _member(1))
        registry.join("p2", _member(2))
        self.assertTrue(registry.is_member("p1", "c1"))
        self.assertFalse(registry.is_member("p1", "c2"))
        self.assertFalse(registry.is_member("p3", "c1"))

    def test_active_users(self) -> None:
        """active_users() lists the entries of members with a user id, [] for no room."""
        _, registry = _registry()
        a = _member(1)
        registry.join("p1", a)
        registry.join("p1", _member(2, user=False))
        self.assertEqual(registry.active_users("p1"), [_entry(a, START_MS)])
        self.assertEqual(registry.active_users("p9"), [])


class PresenceThrottleTests(SynchronousTestCase):
    """Presence changes within the window are folded into one trailing announcement."""

    WINDOW = 0.05

    def test_first_change_sent_at_once(self) -> None:
        """The first change in a quiet room is sent immediately, and a window timer starts."""
        clock, registry = _registry(self.WINDOW)
        a = _member(1)
        registry.join("p1", a)
        self.assertEqual(len(a.presences()), 1)
        calls = clock.getDelayedCalls()
        self.assertEqual(len(calls), 1)
        self.assertAlmostEqual(calls[0].getTime(), START_SECONDS + self.WINDOW)

    def test_change_within_window_is_deferred(self) -> None:
        """A second change within the window is sent, with the new list, when the window ends."""
        clock, registry = _registry(self.WINDOW)
        a, b = _member(1), _member(2)
        registry.join("p1", a)
        clock.advance(0.01)
        registry.join("p1", b)
        self.assertEqual((len(a.frames), len(b.frames)), (1, 0))
        clock.advance(0.04)
        self.assertEqual((len(a.frames), len(b.frames)), (2, 1))
        self.assertEqual(a.last_presence(), b.last_presence())
        self.assertEqual([u["clientId"] for u in a.last_presence()["activeUsers"]], ["c1", "c2"])

    def test_quiet_window_sends_nothing(self) -> None:
        """When nothing changes within the window, its end sends nothing and no timer remains."""
        clock, registry = _registry(self.WINDOW)
        a = _member(1)
        registry.join("p1", a)
        clock.advance(self.WINDOW)
        self.assertEqual(len(a.frames), 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_change_after_quiet_window_sent_at_once(self) -> None:
        """After a quiet window, the next change is sent immediately again."""
        clock, registry = _registry(self.WINDOW)
        a, b = _member(1), _member(2)
        registry.join("p1", a)
        clock.advance(1)
        registry.join("p1", b)
        self.assertEqual((len(a.frames), len(b.frames)), (2, 1))

    def test_trailing_announcement_starts_new_window(self) -> None:
        """A trailing announcement opens a new window, so a change right after it waits."""
        clock, registry = _registry(self.WINDOW)
        a, b, c = _member(1), _member(2), _member(3)
        registry.join("p1", a)
        registry.join("p1", b)
        clock.advance(self.WINDOW)
        self.assertEqual(len(a.frames), 2)
        registry.join("p1", c)
        self.assertEqual((len(a.frames), len(c.frames)), (2, 0))
        clock.advance(self.WINDOW)
        self.assertEqual((len(a.frames), len(c.frames)), (3, 1))
        self.assertEqual(c.last_presence()["userCount"], 3)

    def test_many_joins_cost_linear_messages(self) -> None:
        """200 joins within one window cost O(n) presence frames, and all end with the full list."""
        clock, registry = _registry(self.WINDOW)
        members = [_member(i) for i in range(200)]
        for m in members:
            registry.join("p1", m)
        total = sum(len(m.frames) for m in members)
        self.assertEqual(total, 1)
        clock.advance(self.WINDOW + 0.001)
        for m in members:
            self.assertLessEqual(len(m.presences()), 2, m.client_id)
            payload = m.last_presence()
            self.assertEqual(payload["userCount"], 200)
            self.assertEqual(
                [u["clientId"] for u in payload["activeUsers"]], [f"c{i}" for i in range(200)]
            )
        total = sum(len(m.frames) for m in members)
        self.assertEqual(total, 201)
        clock.advance(1)
        self.assertEqual(sum(len(m.frames) for m in members), 201)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_many_joins_spread_over_windows(self) -> None:
        """Joins spread over several windows still cost at most one frame per member per window."""
        clock, registry = _registry(self.WINDOW)
        members = [_member(i) for i in range(100)]
        for i, m in enumerate(members):
            registry.join("p1", m)
            if i % 25 == 24:
                clock.advance(self.WINDOW)
        clock.advance(1)
        for m in members:
            self.assertLessEqual(len(m.presences()), 5, m.client_id)
            self.assertEqual(m.last_presence()["userCount"], 100)

    def test_leave_within_window(self) -> None:
        """A member who leaves within the window gets nothing and is not in the trailing list."""
        clock, registry = _registry(self.WINDOW)
        a, b = _member(1), _member(2)
        registry.join("p1", a)
        registry.join("p1", b)
        registry.leave("p1", b)
        clock.advance(self.WINDOW)
        self.assertEqual(len(b.frames), 0)
        self.assertEqual(
            a.last_presence(),
            {"projectId": "p1", "activeUsers": [_entry(a, START_MS)], "userCount": 1},
        )

    def test_member_changed_within_window(self) -> None:
        """A user change within the window is folded into the trailing announcement."""
        clock, registry = _registry(self.WINDOW)
        a = _member(1, user=False)
        registry.join("p1", a)
        a.user_id, a.initials = "user_1", "AB"
        registry.member_changed(["p1"])
        self.assertEqual(len(a.frames), 1)
        clock.advance(self.WINDOW)
        self.assertEqual(a.last_presence()["activeUsers"], [_entry(a, START_MS)])

    def test_room_emptied_while_pending(self) -> None:
        """A room that empties while a trailing announcement is pending sends nothing later."""
        clock, registry = _registry(self.WINDOW)
        members = [_member(i) for i in range(5)]
        for m in members:
            registry.join("p1", m)
        for m in members:
            registry.leave("p1", m)
        counts = [len(m.frames) for m in members]
        clock.advance(1)
        self.assertEqual([len(m.frames) for m in members], counts)
        self.assertEqual(counts, [1, 0, 0, 0, 0])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_room_recreated_while_old_timer_pending(self) -> None:
        """A room emptied and made again starts fresh: its first change is sent at once."""
        clock, registry = _registry(self.WINDOW)
        a, b = _member(1), _member(2)
        registry.join("p1", a)
        registry.join("p1", b)
        registry.leave("p1", a)
        registry.leave("p1", b)
        registry.join("p1", b)
        self.assertEqual(b.last_presence()["activeUsers"], [_entry(b, START_MS)])
        clock.advance(1)
        self.assertEqual(len(a.frames), 1)
        self.assertEqual(len(b.frames), 1)

    def test_rooms_throttled_separately(self) -> None:
        """A pending window in one room does not delay the first change in another."""
        clock, registry = _registry(self.WINDOW)
        a, b = _member(1), _member(2)
        registry.join("p1", a)
        registry.join("p2", b)
        self.assertEqual((len(a.frames), len(b.frames)), (1, 1))
        self.assertEqual(len(clock.getDelayedCalls()), 2)


class PresenceUnthrottledTests(SynchronousTestCase):
    """With a window of 0 every change is announced at once."""

    def test_every_change_sent(self) -> None:
        """n joins send member i exactly n - i presence frames, and no timer is scheduled."""
        clock, registry = _registry(0)
        members = [_member(i) for i in range(10)]
        for m in members:
            registry.join("p1", m)
        self.assertEqual([len(m.presences()) for m in members], list(range(10, 0, -1)))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_leave_and_change_sent(self) -> None:
        """Leaves and user changes are announced immediately too."""
        clock, registry = _registry(0)
        a, b = _member(1), _member(2)
        registry.join("p1", a)
        registry.join("p1", b)
        registry.leave("p1", b)
        a.initials = "ZZ"
        registry.member_changed(["p1"])
        self.assertEqual(len(a.presences()), 4)
        self.assertEqual(a.last_presence()["activeUsers"][0]["initials"], "ZZ")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_default_window_is_zero(self) -> None:
        """A registry made without a window announces every change at once."""
        clock = Clock()
        registry = RoomRegistry(clock, encode=lambda b: b)
        a, b = _member(1), _member(2)
        registry.join("p1", a)
        registry.join("p1", b)
        self.assertEqual((len(a.frames), len(b.frames)), (2, 1))
        self.assertEqual(clock.getDelayedCalls(), [])


class ListenerTests(SynchronousTestCase):
    """The registry's listener hears of rooms opening and closing, and of nothing else."""

    def test_no_listener(self) -> None:
        """A registry has no listener until one is set, and works without it."""
        _, registry = _registry()
        self.assertIsNone(registry.listener)
        a = _member(1)
        registry.join("p1", a)
        self.assertTrue(registry.leave("p1", a))

    def test_first_join_opens(self) -> None:
        """Only the first member's join opens the room."""
        _, registry = _registry()
        registry.listen(listener := RecordingListener())
        registry.join("p1", _member(1))
        registry.join("p1", _member(2))
        registry.join("p1", _member(1))
        self.assertEqual(listener.events, [("opened", "p1")])

    def test_last_leave_closes(self) -> None:
        """Only the last member's leave closes the room."""
        _, registry = _registry()
        registry.listen(listener := RecordingListener())
        a, b = _member(1), _member(2)
        registry.join("p1", a)
        registry.join("p1", b)
        registry.leave("p1", a)
        self.assertEqual(listener.events, [("opened", "p1")])
        registry.leave("p1", b)
        registry.leave("p1", b)
        self.assertEqual(listener.events, [("opened", "p1"), ("closed", "p1")])

    def test_closed_room_is_gone(self) -> None:
        """When the listener hears a room closed, the registry no longer has it."""
        _, registry = _registry()
        seen: list[bool] = []

        class Checking(RecordingListener):
            """A listener that checks the registry when a room closes."""

            def room_closed(self, project_id: str) -> None:
                """Record whether the room is still in the registry."""
                seen.append(project_id in registry)

        registry.listen(Checking())
        a = _member(1)
        registry.join("p1", a)
        registry.leave("p1", a)
        self.assertEqual(seen, [False])

    def test_reopen(self) -> None:
        """A room emptied and joined again opens again, per room."""
        _, registry = _registry()
        registry.listen(listener := RecordingListener())
        a, b = _member(1), _member(2)
        registry.join("p1", a)
        registry.join("p2", b)
        registry.leave("p1", a)
        registry.join("p1", a)
        self.assertEqual(
            listener.events,
            [("opened", "p1"), ("opened", "p2"), ("closed", "p1"), ("opened", "p1")],
        )

    def test_listener_announces_presence(self) -> None:
        """With a listener, presence changes go to it and the members get none from the registry."""
        _, registry = _registry()
        registry.listen(listener := RecordingListener())
        registry.listen(listener)  # the same one again changes nothing
        a = _member(1)
        registry.join("p1", a)
        self.assertEqual(listener.presence, [("p1", [a.user_id])])
        self.assertEqual(a.frames, [])

    def test_one_listener(self) -> None:
        """A second, different listener is refused."""
        _, registry = _registry()
        registry.listen(RecordingListener())
        self.assertRaises(ValueError, registry.listen, RecordingListener())

    def test_stranger_leaving_closes_nothing(self) -> None:
        """Leaving a room one is not in, or one that does not exist, tells the listener nothing."""
        _, registry = _registry()
        registry.listen(listener := RecordingListener())
        registry.join("p1", _member(1))
        registry.leave("p1", _member(2))
        registry.leave("p9", _member(2))
        self.assertEqual(listener.events, [("opened", "p1")])
