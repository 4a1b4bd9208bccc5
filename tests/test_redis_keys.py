"""Tests for the Redis names and message formats, as plain code."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from happyrobot.redis.keys import (
    EVENT,
    channel_name,
    envelope_head,
    merge_presence,
    merge_stats,
    pack_batch,
    pack_envelope,
    unpack_batch,
    unpack_envelope,
)
from happyrobot.rooms import RoomRegistry


class EnvelopeTests(SynchronousTestCase):
    """The Redis message format."""

    def test_round_trip(self) -> None:
        """An envelope gives back kind, instance, sender, seq and the body bytes untouched."""
        body = b'{"a":"x\ny","seq":17}\x00\xff'
        data = pack_envelope(EVENT, b"host-1-abc", "client_1_aa", body, 17)
        self.assertEqual(unpack_envelope(data), (EVENT, b"host-1-abc", "client_1_aa", 17, body))

    def test_no_sender(self) -> None:
        """A server-side publish has no sender; a presence change has no seq."""
        data = pack_envelope(EVENT, b"i", None, b"x", 5)
        self.assertEqual(unpack_envelope(data), (EVENT, b"i", None, 5, b"x"))
        data = pack_envelope(b"P", b"i", None, b"")
        self.assertEqual(unpack_envelope(data), (b"P", b"i", None, None, b""))

    def test_script_envelope(self) -> None:
        """The append script's envelope (head + seq + newline + JSON) unpacks the same way."""
        data = envelope_head(EVENT, b"i", "c1") + b"42\n" + b'{"seq":42}'
        self.assertEqual(unpack_envelope(data), (EVENT, b"i", "c1", 42, b'{"seq":42}'))

    def test_malformed(self) -> None:
        """Bytes that are not an envelope raise ValueError."""
        self.assertRaises(ValueError, unpack_envelope, b"E\nonly")
        self.assertRaises(ValueError, unpack_envelope, b"E\ni\nc\nnot-a-number\n{}")

    def test_batch_round_trip(self) -> None:
        """A batch body gives back each event's sender, seq and JSON, any bytes included."""
        events = [("c1", 7, b'{"a":"x\n3\n","seq":7}'), (None, 8, b"{}\x00\xff"), ("c2", 9, b"")]
        kind, instance, sender, seq, body = unpack_envelope(pack_batch(b"i", events))
        self.assertEqual((kind, instance, sender, seq), (b"B", b"i", None, 7))
        self.assertEqual(unpack_batch(body), events)

    def test_batch_malformed(self) -> None:
        """A truncated or garbled batch raises ValueError."""
        self.assertRaises(ValueError, unpack_batch, b"c1\n7\n10\n{}")
        self.assertRaises(ValueError, unpack_batch, b"c1\n7\n")
        self.assertRaises(ValueError, unpack_batch, b"c1\nx\n2\n{}")

    def test_channel_name(self) -> None:
        """Each room has its own channel, binary-safe for any project id."""
        self.assertEqual(channel_name("p1"), b"happyrobot:project:p1")
        self.assertEqual(channel_name("\ud800"), b"happyrobot:project:\xed\xa0\x80")


class MergeTests(SynchronousTestCase):
    """Presence and statistics merged over instances, as plain code."""

    def test_presence_in_join_order(self) -> None:
        """Entries from several instances form one list ordered by join time."""
        a = [{"clientId": "c2", "joinedAt": 20}, {"clientId": "c4", "joinedAt": 40}]
        b = [{"clientId": "c3", "joinedAt": 30}, {"clientId": "c1", "joinedAt": 10}]
        self.assertEqual([e["clientId"] for e in merge_presence([a, b])],
                         ["c1", "c2", "c3", "c4"])

    def test_stats(self) -> None:
        """Totals and per-project lists add up over instances, with a per-instance part."""
        body = merge_stats({
            "i1": {"connections": 2, "projects": {"p1": ["a"]}, "startedAt": 1},
            "i2": {"connections": 3, "projects": {"p1": ["b"], "p2": ["c", "d"]}},
        })
        self.assertEqual((body["totalClients"], body["totalProjects"]), (5, 2))
        self.assertEqual(body["projectStats"]["p1"], {"clientCount": 2, "clients": ["a", "b"]})
        self.assertEqual(body["instances"]["i2"], {"clients": 3, "projects": 2,
                                                   "startedAt": None})

    def test_registry_hands_presence_to_publisher(self) -> None:
        """With a presence publisher the registry reports local presence and sends none itself."""
        registry = RoomRegistry(Clock(), encode=lambda b: b)
        calls: list[tuple[str, list[str]]] = []

        class Publisher:
            def room_opened(self, project_id: str) -> None:
                pass

            def room_closed(self, project_id: str) -> None:
                pass

            def presence_changed(self, project_id: str, users: list[dict[str, Any]]) -> None:
                calls.append((project_id, [u["userId"] for u in users]))

        class Member:
            client_id, user_id, initials = "c1", "u1", "U1"

            def __init__(self) -> None:
                self.frames: list[bytes] = []
                self.writer = self

            def send(self, frame: bytes) -> None:
                self.frames.append(frame)

        registry.listen(Publisher())
        m = Member()
        registry.join("p1", m)
        self.assertEqual((calls, m.frames), ([("p1", ["u1"])], []))
        registry.send_presence("p1", [{"userId": "u1"}, {"userId": "u9"}])
        self.assertEqual(len(m.frames), 1)
        self.assertIn(b'"userCount":2', m.frames[0])
