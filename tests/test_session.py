"""
Tests for L{happyrobot.session}: one connection's logic, fed messages
directly, with a L{Clock}, a list for its frames and the in-memory bus; no
socket and no Autobahn.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from happyrobot import auth, logs
from happyrobot.bus import LocalBus
from happyrobot.config import Config
from happyrobot.framing import binary_frame, text_frame
from happyrobot.history import Histories
from happyrobot.metrics import Metrics
from happyrobot.rooms import RoomRegistry
from happyrobot.session import MAX_BACKLOG, EchoSession, Session, Shared


def _payload(frame: bytes) -> bytes:
    """The payload of one unmasked server frame."""
    n, head = frame[1] & 0x7F, 2
    if n == 126:
        n, head = struct.unpack("!H", frame[2:4])[0], 4
    elif n == 127:
        n, head = struct.unpack("!Q", frame[2:10])[0], 10
    assert len(frame) == head + n, "one whole frame"
    return frame[head:]


class _Writer:
    """A member's writer that keeps the frames it is sent."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.send = self.frames.append

    def decoded(self, kind: str | None = None) -> list[dict[str, Any]]:
        msgs = [json.loads(_payload(f)) for f in self.frames]
        return [m for m in msgs if kind is None or m["type"] == kind]


class _Verifier:
    """A token verifier whose answers the test gives (a Deferred per token)."""

    leeway_seconds = 5.0

    def __init__(self) -> None:
        self.pending: dict[str, Deferred[auth.Identity]] = {}

    def verify(self, token: str, now: float) -> Deferred[auth.Identity]:
        d: Deferred[auth.Identity] = Deferred()
        self.pending[token] = d
        return d


class _Authorizer:
    """A project authorizer whose answers the test gives."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []
        self.answers: list[Deferred[bool]] = []

    def allowed(self, user_id: str, project_id: str) -> Deferred[bool]:
        self.asked.append((user_id, project_id))
        d: Deferred[bool] = Deferred()
        self.answers.append(d)
        return d


class _Server:
    """The collaborators every session of one server shares."""

    def __init__(self, config: Config, **kw: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.config = config
        self.registry = RoomRegistry(self.clock, 0)
        self.bus = LocalBus(self.registry, Histories(config.history_size, 3600), self.clock)
        self.metrics = Metrics(self.clock)
        self.cut_off_log = logs.Throttle(10.0, self.clock)
        self.kw = kw
        self.closes: list[tuple[str, int, str]] = []
        self.cut_offs: list[str] = []

    def session(self, client_id: str = "c1", cls: type[Session] = Session,
                **kw: Any) -> tuple[Session, _Writer]:
        writer = _Writer()
        shared = Shared(
            self.clock, self.config, self.metrics, self.registry, self.bus, self.cut_off_log,
            **{k: v for k, v in {**self.kw, **kw}.items() if k != "identity"},
        )
        server = self

        class Connection:
            def start_close(self, code: int, reason: str) -> None:
                server.closes.append((client_id, code, reason))

            def cut_off(self) -> None:
                server.cut_offs.append(client_id)

        session = cls(client_id, writer, Connection(), shared, kw.get("identity"))
        return session, writer


def _send(session: Session, **msg: Any) -> None:
    session.received(json.dumps(msg).encode(), False)


class _SessionTestCase(SynchronousTestCase):
    def server(self, **config: Any) -> _Server:
        kw = {k: config.pop(k) for k in ("verifier", "authorizer") if k in config}
        config.setdefault("rate_limit_per_second", 0)
        return _Server(Config(presence_window_seconds=0, **config), **kw)

    def joined(self, server: _Server, project_id: str = "p1", client_id: str = "c1",
               user_id: str = "u1") -> tuple[Session, _Writer]:
        session, writer = server.session(client_id)
        _send(session, type="JOIN_PROJECT", projectId=project_id, userId=user_id)
        self.assertIn(project_id, session.projects)
        return session, writer

    def assertError(self, writer: _Writer, code: str, operation_id: str | None = None) -> None:
        errors = writer.decoded("ERROR")
        self.assertEqual([e["code"] for e in errors], [code])
        self.assertEqual(errors[0].get("operationId"), operation_id)


class IdentityTests(_SessionTestCase):
    def test_set_user_then_join(self) -> None:
        """SET_USER names the user; a join then shows it in the room's presence."""
        server = self.server()
        session, writer = server.session()
        _send(session, type="SET_USER", payload={"userId": "ada", "userInfo": {"name": "Ada L"}})
        self.assertEqual((session.user_id, session.initials), ("ada", "AL"))
        _send(session, type="JOIN_PROJECT", projectId="p1")
        presence = writer.decoded("USER_PRESENCE")
        self.assertEqual([u["userId"] for u in presence[-1]["payload"]["activeUsers"]], ["ada"])
        self.assertTrue(server.registry.is_member("p1", "c1"))

    def test_join_unidentified(self) -> None:
        """A join before any user is refused with NOT_IDENTIFIED, echoing its operationId."""
        session, writer = self.server().session()
        _send(session, type="JOIN_PROJECT", projectId="p1", operationId="op-1")
        self.assertError(writer, "NOT_IDENTIFIED", "op-1")
        self.assertEqual(session.projects, set())

    def test_set_user_without_user_id(self) -> None:
        """SET_USER without a userId (and no auth) is MISSING_USER_ID."""
        session, writer = self.server().session()
        _send(session, type="SET_USER", payload={})
        self.assertError(writer, "MISSING_USER_ID")

    def test_join_without_token_when_auth_is_on(self) -> None:
        """With a verifier, a join with only a claimed userId is UNAUTHORIZED."""
        session, writer = self.server(verifier=_Verifier()).session()
        _send(session, type="JOIN_PROJECT", projectId="p1", userId="u1")
        self.assertError(writer, "UNAUTHORIZED")

    def test_token_sets_user_and_mismatch_refused(self) -> None:
        """A verified token's user is the session's; claiming another one is UNAUTHORIZED."""
        verifier = _Verifier()
        server = self.server(verifier=verifier)
        session, writer = server.session()
        _send(session, type="SET_USER", payload={"token": "t1", "userId": "mallory"})
        verifier.pending["t1"].callback(auth.Identity("u1", 2000.0))
        self.assertIsNone(session.user_id)
        self.assertError(writer, "UNAUTHORIZED")
        _send(session, type="SET_USER", payload={"token": "t2"})
        verifier.pending["t2"].callback(auth.Identity("u1", 2000.0))
        self.assertEqual(session.user_id, "u1")

    def test_bad_token(self) -> None:
        """A token the verifier refuses is UNAUTHORIZED with the verifier's reason."""
        verifier = _Verifier()
        session, writer = self.server(verifier=verifier).session()
        _send(session, type="SET_USER", payload={"token": "t1"}, operationId="op-2")
        verifier.pending["t1"].errback(auth.AuthError("Token expired"))
        self.assertError(writer, "UNAUTHORIZED", "op-2")
        self.assertEqual(writer.decoded("ERROR")[0]["error"], "Token expired")

    def test_url_identity_joins(self) -> None:
        """An identity verified before the session began lets it join with no SET_USER."""
        server = self.server(verifier=_Verifier())
        session, writer = server.session(identity=auth.Identity("u1", 2000.0))
        _send(session, type="JOIN_PROJECT", projectId="p1")
        self.assertEqual(session.user_id, "u1")
        self.assertEqual(writer.decoded("ERROR"), [])


class ExpiryTests(_SessionTestCase):
    def test_expiry_closes_1008(self) -> None:
        """At expiry plus the leeway the session asks for a 1008 close, not before."""
        server = self.server(verifier=_Verifier())
        server.session(identity=auth.Identity("u1", 1100.0))
        server.clock.advance(104.9)
        self.assertEqual(server.closes, [])
        server.clock.advance(0.2)
        self.assertEqual(server.closes, [("c1", 1008, "Session token expired")])

    def test_refresh_moves_expiry(self) -> None:
        """A fresh token in band replaces the expiry timer."""
        verifier = _Verifier()
        server = self.server(verifier=verifier)
        session, _ = server.session(identity=auth.Identity("u1", 1100.0))
        server.clock.advance(90)
        _send(session, type="SET_USER", payload={"token": "t2"})
        verifier.pending["t2"].callback(auth.Identity("u1", 1300.0))
        server.clock.advance(100)
        self.assertEqual(server.closes, [])
        self.assertEqual(len(server.clock.getDelayedCalls()), 1)
        server.clock.advance(120)
        self.assertEqual([c[1] for c in server.closes], [1008])

    def test_end_cancels_expiry(self) -> None:
        """A session that ends leaves no timer behind."""
        server = self.server(verifier=_Verifier())
        session, _ = server.session(identity=auth.Identity("u1", 1100.0))
        session.end()
        self.assertEqual(server.clock.getDelayedCalls(), [])


class RoomTests(_SessionTestCase):
    def test_relay_reaches_others_not_sender(self) -> None:
        """An event goes to the other members with its seq, not back to the sender."""
        server = self.server()
        a, a_writer = self.joined(server, client_id="a", user_id="ua")
        _, b_writer = self.joined(server, client_id="b", user_id="ub")
        _send(a, type="TASK_UPDATE", projectId="p1", payload={"n": 1})
        [event] = b_writer.decoded("TASK_UPDATE")
        self.assertEqual((event["payload"], event["sender"]),
                         ({"n": 1}, {"clientId": "a", "userId": "ua"}))
        self.assertIsInstance(event["seq"], int)
        self.assertEqual(a_writer.decoded("TASK_UPDATE"), [])

    def test_not_in_project(self) -> None:
        """An event for a room not joined is NOT_IN_PROJECT, with the operationId."""
        session, writer = self.joined(self.server())
        _send(session, type="TASK_UPDATE", projectId="p2", payload={}, operationId="op-3")
        self.assertError(writer, "NOT_IN_PROJECT", "op-3")

    def test_ack(self) -> None:
        """An event with ack is answered with ACK, its operationId and seq."""
        server = self.server()
        session, writer = self.joined(server)
        _, other_writer = self.joined(server, client_id="c2")
        _send(session, type="TASK_UPDATE", projectId="p1", payload={}, operationId="op-4",
              ack=True)
        [ack] = writer.decoded("ACK")
        [event] = other_writer.decoded("TASK_UPDATE")
        self.assertEqual((ack["operationId"], ack["projectId"], ack["seq"]),
                         ("op-4", "p1", event["seq"]))

    def test_too_many_rooms(self) -> None:
        """Past MAX_ROOMS_PER_CONNECTION a join is TOO_MANY_ROOMS; joining again is fine."""
        session, writer = self.joined(self.server(max_rooms_per_connection=2))
        _send(session, type="JOIN_PROJECT", projectId="p2")
        _send(session, type="JOIN_PROJECT", projectId="p1")
        self.assertEqual(writer.decoded("ERROR"), [])
        _send(session, type="JOIN_PROJECT", projectId="p3", operationId="op-5")
        self.assertError(writer, "TOO_MANY_ROOMS", "op-5")
        self.assertEqual(session.projects, {"p1", "p2"})

    def test_leave_and_end(self) -> None:
        """LEAVE_PROJECT leaves one room (twice is harmless); end() leaves the rest."""
        server = self.server()
        session, _ = self.joined(server)
        _send(session, type="JOIN_PROJECT", projectId="p2")
        _send(session, type="LEAVE_PROJECT", projectId="p1")
        _send(session, type="LEAVE_PROJECT", projectId="p1")
        self.assertEqual(session.projects, {"p2"})
        session.end()
        self.assertEqual(len(server.registry), 0)

    def test_resume_replays_missed_events(self) -> None:
        """A join with since gets the events after it, then live ones, each once, in order."""
        server = self.server()
        a, _ = self.joined(server, client_id="a")
        _, seen = self.joined(server, client_id="w")
        for n in range(3):
            _send(a, type="TASK_UPDATE", projectId="p1", payload={"n": n})
        first = seen.decoded("TASK_UPDATE")[0]["seq"]
        b, b_writer = server.session("b")
        _send(b, type="JOIN_PROJECT", projectId="p1", userId="ub", since=first)
        _send(a, type="TASK_UPDATE", projectId="p1", payload={"n": 3})
        self.assertEqual([e["payload"]["n"] for e in b_writer.decoded("TASK_UPDATE")], [1, 2, 3])
        self.assertEqual([e["seq"] for e in b_writer.decoded("TASK_UPDATE")],
                         [first + 1, first + 2, first + 3])

    def test_resume_too_far_back(self) -> None:
        """When the history no longer reaches back to since: RESYNC_REQUIRED with the seq."""
        server = self.server(history_size=2)
        a, _ = self.joined(server, client_id="a")
        _, seen = self.joined(server, client_id="w")
        for n in range(5):
            _send(a, type="TASK_UPDATE", projectId="p1", payload={"n": n})
        seqs = [e["seq"] for e in seen.decoded("TASK_UPDATE")]
        b, b_writer = server.session("b")
        _send(b, type="JOIN_PROJECT", projectId="p1", userId="ub", since=seqs[0])
        [resync] = b_writer.decoded("RESYNC_REQUIRED")
        self.assertEqual((resync["projectId"], resync["seq"]), ("p1", seqs[-1]))
        self.assertEqual(b_writer.decoded("TASK_UPDATE"), [])

    def test_replay_unavailable_undoes_the_join(self) -> None:
        """A replay that fails leaves the room and answers with the error."""
        server = self.server()
        server.bus.replay = lambda project_id, since: fail(  # type: ignore[method-assign]
            RuntimeError("history lost"))
        session, writer = server.session()
        _send(session, type="JOIN_PROJECT", projectId="p1", userId="u1", since=0,
              operationId="op-6")
        self.assertError(writer, "INTERNAL_ERROR", "op-6")
        self.assertEqual(session.projects, set())
        self.assertEqual(len(server.registry), 0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_binary_refused(self) -> None:
        """A binary message is BINARY_NOT_SUPPORTED; the session stays usable."""
        session, writer = self.server().session()
        session.received(b"\x00\x01", True)
        self.assertError(writer, "BINARY_NOT_SUPPORTED")

    def test_nothing_answered_once_closing(self) -> None:
        """After closing() a message is neither answered nor handled."""
        session, writer = self.server().session()
        session.closing()
        _send(session, type="JOIN_PROJECT", projectId="p1")
        self.assertEqual(writer.frames, [])


class AuthorizerTests(_SessionTestCase):
    def setUp(self) -> None:
        self.authorizer = _Authorizer()
        self.srv = self.server(authorizer=self.authorizer)
        self.session, self.writer = self.srv.session()

    def test_allowed(self) -> None:
        """An allowed join completes when the answer comes."""
        _send(self.session, type="JOIN_PROJECT", projectId="p1", userId="u1")
        self.assertEqual(self.authorizer.asked, [("u1", "p1")])
        self.assertEqual(self.session.projects, set())
        self.authorizer.answers[0].callback(True)
        self.assertEqual(self.session.projects, {"p1"})

    def test_forbidden(self) -> None:
        """A refused join is FORBIDDEN, with its operationId."""
        _send(self.session, type="JOIN_PROJECT", projectId="p1", userId="u1", operationId="j")
        self.authorizer.answers[0].callback(False)
        self.assertError(self.writer, "FORBIDDEN", "j")
        self.assertEqual(self.session.projects, set())

    def test_unavailable(self) -> None:
        """A back end that fails is AUTH_UNAVAILABLE."""
        _send(self.session, type="JOIN_PROJECT", projectId="p1", userId="u1")
        self.authorizer.answers[0].errback(RuntimeError("down"))
        self.assertError(self.writer, "AUTH_UNAVAILABLE")

    def test_backlog_in_order(self) -> None:
        """Messages behind a pending join wait, and are handled in the order sent."""
        other, other_writer = self.srv.session("c2")
        _send(other, type="JOIN_PROJECT", projectId="p1", userId="u2")
        self.authorizer.answers[0].callback(True)
        _send(self.session, type="JOIN_PROJECT", projectId="p1", userId="u1")
        for n in range(3):
            _send(self.session, type="TASK_UPDATE", projectId="p1", payload={"n": n})
        self.assertEqual(self.session._backlog is not None and len(self.session._backlog), 3)
        self.assertEqual(other_writer.decoded("TASK_UPDATE"), [])
        self.authorizer.answers[1].callback(True)
        self.assertEqual([e["payload"]["n"] for e in other_writer.decoded("TASK_UPDATE")],
                         [0, 1, 2])
        self.assertEqual(self.writer.decoded("ERROR"), [])

    def test_backlog_bounded(self) -> None:
        """Past MAX_BACKLOG waiting messages the session asks for a 1008 close."""
        _send(self.session, type="JOIN_PROJECT", projectId="p1", userId="u1")
        for n in range(MAX_BACKLOG):
            _send(self.session, type="TASK_UPDATE", projectId="p1", payload={"n": n})
        self.assertEqual(self.srv.closes, [])
        _send(self.session, type="TASK_UPDATE", projectId="p1", payload={})
        self.assertEqual(self.srv.closes, [("c1", 1008, "Too many messages while busy")])


class RateLimitTests(_SessionTestCase):
    def test_rate_limited_then_cut_off(self) -> None:
        """Past the burst: RATE_LIMITED; past twice the burst: cut off, logged once."""
        server = self.server(rate_limit_per_second=1, rate_limit_burst=2)
        session, writer = server.session()
        with capturedLogs() as events:
            for _ in range(2 + 2):
                session.received(b"{}", False)  # 2 accepted (INVALID), 2 refused
            self.assertEqual(server.cut_offs, [])
            self.assertEqual([e["code"] for e in writer.decoded("ERROR")].count("RATE_LIMITED"), 2)
            session.received(b"{}", False)
        self.assertEqual(server.cut_offs, ["c1"])
        warned = [e for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warned), 1)
        self.assertIn("c1", warned[0]["client_id"])

    def test_tokens_come_back(self) -> None:
        """After a pause the bucket refills: messages are handled again."""
        server = self.server(rate_limit_per_second=1, rate_limit_burst=1)
        session, writer = server.session()
        session.received(b"{}", False)
        session.received(b"{}", False)
        server.clock.advance(1)
        session.received(b"{}", False)
        self.assertEqual([e["code"] for e in writer.decoded("ERROR")],
                         ["INVALID_MESSAGE", "RATE_LIMITED", "INVALID_MESSAGE"])

    def test_partial_frames_flood(self) -> None:
        """Frames that are not messages cost the limit too: a flood is cut off, with no ERROR."""
        server = self.server(rate_limit_per_second=1, rate_limit_burst=3)
        session, writer = server.session()
        for _ in range(3 + 3):
            session.frame_begun()
        self.assertEqual(server.cut_offs, [])
        session.frame_begun()
        self.assertEqual(server.cut_offs, ["c1"])
        self.assertEqual(writer.frames, [])

    def test_no_limit(self) -> None:
        """RATE_LIMIT_PER_SECOND=0: no limit at all."""
        server = self.server(rate_limit_per_second=0)
        session, writer = server.session()
        for _ in range(500):
            session.frame_begun()
            session.received(b"{}", False)
        self.assertNotIn("RATE_LIMITED", [e["code"] for e in writer.decoded("ERROR")])
        self.assertEqual(server.cut_offs, [])


class EchoSessionTests(_SessionTestCase):
    def test_echo(self) -> None:
        """Text comes back as text, binary as binary, after the same rate limit."""
        server = self.server(rate_limit_per_second=0.001, rate_limit_burst=2)
        session, writer = server.session(cls=EchoSession)
        session.received(b"one", False)
        session.received(b"\xff", True)
        session.received(b"three", False)
        self.assertEqual(writer.frames[:2], [text_frame(b"one"), binary_frame(b"\xff")])
        self.assertEqual(json.loads(_payload(writer.frames[2]))["code"], "RATE_LIMITED")


class MetricsTests(_SessionTestCase):
    def test_errors_counted(self) -> None:
        """Every ERROR is counted by its code."""
        server = self.server()
        session, _ = server.session()
        session.received(b"{}", False)
        _send(session, type="JOIN_PROJECT", projectId="p1")
        _send(session, type="JOIN_PROJECT", projectId="p1")
        counted = {code: server.metrics.errors.labels(code)._value.get()
                   for code in ("INVALID_MESSAGE", "NOT_IDENTIFIED")}
        self.assertEqual(counted, {"INVALID_MESSAGE": 1, "NOT_IDENTIFIED": 2})
