"""
Re-checks of project access (L{happyrobot.access.AccessWatch} and
L{happyrobot.auth.ProjectAuthorizer.recheck}): sessions fed directly with
a L{Clock} and a back end whose answers the test gives; then over
loopback with a real HTTP back end and real session tokens.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from happyrobot import auth, logs
from happyrobot.access import AccessWatch
from happyrobot.bus import LocalBus
from happyrobot.config import Config
from happyrobot.history import Histories
from happyrobot.metrics import Metrics
from happyrobot.operator import Actions
from happyrobot.rooms import RoomRegistry
from happyrobot.session import Session, Shared
from tests.helpers import ServerTestCase
from tests.test_auth import serve_backend, token, verifier
from tests.test_session import _Verifier, _Writer

PERIOD = 60.0


class _BackEnd:
    """PROJECT_AUTH_URL as the authorizer's C{ask}: each request waits for the test's answer."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.pending: list[Deferred[bool]] = []

    def ask(self, user_id: str, project_id: str) -> Deferred[bool]:
        self.requests.append((user_id, project_id))
        d: Deferred[bool] = Deferred()
        self.pending.append(d)
        return d

    def answer(self, value: bool | Exception) -> None:
        """Answer every request waiting."""
        pending, self.pending = self.pending, []
        for d in pending:
            if isinstance(value, Exception):
                d.errback(value)
            else:
                d.callback(value)


class _Server:
    """One server's shared collaborators, with an authorizer and a token verifier."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.backend = _BackEnd()
        self.authorizer = auth.ProjectAuthorizer(
            self.backend.ask, self.clock, ttl_seconds=PERIOD, timeout_seconds=3.0)
        self.verifier = _Verifier()
        self.registry = RoomRegistry(self.clock, 0)
        config = Config(presence_window_seconds=0, rate_limit_per_second=0,
                        project_auth_cache_seconds=PERIOD)
        bus = LocalBus(self.registry, Histories(100, 3600), self.clock)
        access = AccessWatch(self.authorizer, Actions(self.registry, self.authorizer), self.clock,
                             config.project_auth_cache_seconds)
        self.shared = Shared(self.clock, config, Metrics(self.clock), self.registry, bus,
                             logs.Throttle(10.0, self.clock), self.verifier, self.authorizer,
                             access=access)
        self.closes: list[tuple[str, int]] = []

    def session(self, client_id: str) -> tuple[Session, _Writer]:
        writer = _Writer()
        server = self

        class Connection:
            def start_close(self, code: int, reason: str) -> None:
                server.closes.append((client_id, code))

            def cut_off(self) -> None:
                pass

        return Session(client_id, writer, Connection(), self.shared), writer

    def send(self, session: Session, **msg: Any) -> None:
        session.received(json.dumps(msg).encode(), False)

    def identify(self, session: Session, user_id: str, tok: str) -> None:
        """SET_USER with a session token, verified as C{user_id}."""
        self.send(session, type="SET_USER", payload={"token": tok})
        self.verifier.pending.pop(tok).callback(
            auth.Identity(user_id, self.clock.seconds() + 3600))

    def member(self, client_id: str, user_id: str, *project_ids: str) -> tuple[Session, _Writer]:
        """A session of C{user_id} that joined C{project_ids}, the back end saying yes."""
        session, writer = self.session(client_id)
        self.identify(session, user_id, f"t-{client_id}")
        for project_id in project_ids:
            self.send(session, type="JOIN_PROJECT", projectId=project_id)
            self.backend.answer(True)
            assert project_id in session.projects, project_id
        return session, writer


def revoked(writer: _Writer) -> list[str]:
    return [e["projectId"] for e in writer.decoded("ERROR") if e["code"] == "ACCESS_REVOKED"]


class PeriodicRecheckTests(SynchronousTestCase):
    """Long-lived members are re-checked every PROJECT_AUTH_CACHE_SECONDS."""

    def test_no_removes_every_connection_of_the_pair(self) -> None:
        """One request per pair per period; a no takes every connection of the pair out."""
        s = _Server()
        c1, w1 = s.member("c1", "u1", "p1", "p2")
        c2, w2 = s.member("c2", "u1", "p1")
        other, wo = s.member("c3", "u2", "p1")
        self.assertEqual(len(s.backend.requests), 3)  # (u1,p1) cached for c2
        s.clock.advance(PERIOD - 1)
        self.assertEqual(len(s.backend.requests), 3)
        s.clock.advance(1)
        self.assertEqual(sorted(s.backend.requests[3:]), [("u1", "p1"), ("u1", "p2"), ("u2", "p1")])
        for d, allowed in zip(list(s.backend.pending), [False, True, True]):
            s.backend.pending.remove(d)
            d.callback(allowed)
        self.assertEqual((revoked(w1), revoked(w2), revoked(wo)), (["p1"], ["p1"], []))
        self.assertEqual((c1.projects, c2.projects), ({"p2"}, set()))
        self.assertEqual(s.registry.active_users("p1")[0]["userId"], "u2")
        self.assertEqual(s.closes, [])
        presence = [m for m in wo.decoded("USER_PRESENCE")][-1]
        self.assertEqual(presence["payload"]["userCount"], 1)

    def test_yes_keeps_and_checks_again_a_period_later(self) -> None:
        s = _Server()
        _, w = s.member("c1", "u1", "p1")
        for n in (2, 3, 4):
            s.clock.advance(PERIOD)
            self.assertEqual(len(s.backend.requests), n)
            s.backend.answer(True)
        self.assertEqual(revoked(w), [])

    def test_pairs_without_members_are_forgotten(self) -> None:
        s = _Server()
        c1, _ = s.member("c1", "u1", "p1")
        s.member("c2", "u2", "p2")
        s.send(c1, type="LEAVE_PROJECT", projectId="p1")
        s.clock.advance(PERIOD)
        self.assertEqual(s.backend.requests[2:], [("u2", "p2")])

    def test_unreachable_back_end_keeps_members_and_logs_once(self) -> None:
        s = _Server()
        _, w = s.member("c1", "u1", "p1")
        s.member("c2", "u2", "p1")
        with capturedLogs() as captured:
            for _ in range(3):
                s.clock.advance(PERIOD)
                s.backend.answer(ConnectionRefusedError("back end down"))
            s.clock.advance(PERIOD)
            s.backend.answer(True)
        lines = [(e["log_level"], e["log_format"]) for e in captured
                 if e["log_level"] >= LogLevel.info]
        self.assertEqual(len([1 for level, _ in lines if level == LogLevel.warn]), 1)
        self.assertEqual(len([1 for level, _ in lines if level == LogLevel.error]), 0)
        self.assertTrue(any("again" in text for _, text in lines))
        self.assertEqual(revoked(w), [])
        self.assertEqual(s.registry.member_count("p1"), 2)

    def test_last_member_gone_stops_the_timer(self) -> None:
        s = _Server()
        c1, _ = s.member("c1", "u1", "p1")
        self.assertEqual(len(s.clock.getDelayedCalls()), 2)  # the token expiry and the re-check
        c1.end()
        self.assertEqual(s.clock.getDelayedCalls(), [])


class RefreshRecheckTests(SynchronousTestCase):
    """A fresh session token re-checks the connection's rooms."""

    def test_refresh_asks_again_and_a_no_removes(self) -> None:
        s = _Server()
        c1, w1 = s.member("c1", "u1", "p1", "p2")
        s.clock.advance(5)
        s.identify(c1, "u1", "fresh")
        self.assertEqual(sorted(s.backend.requests[2:]), [("u1", "p1"), ("u1", "p2")])
        for (_, project_id), d in zip(s.backend.requests[2:], list(s.backend.pending)):
            d.callback(project_id != "p1")
        self.assertEqual(revoked(w1), ["p1"])
        self.assertEqual(c1.projects, {"p2"})

    def test_at_most_one_recheck_per_pair_per_period(self) -> None:
        """Refreshes of many connections of the user cost one request per pair per period."""
        s = _Server()
        sessions = [s.member(f"c{i}", "u1", "p1")[0] for i in range(3)]
        self.assertEqual(len(s.backend.requests), 1)
        for i, session in enumerate(sessions):
            s.identify(session, "u1", f"fresh{i}")
        self.assertEqual(len(s.backend.requests), 2)
        s.backend.answer(True)
        s.clock.advance(PERIOD / 2)
        s.identify(sessions[0], "u1", "again")
        s.clock.advance(PERIOD / 2 - 1)  # the periodic re-check waits for a period after it
        self.assertEqual(len(s.backend.requests), 2)
        s.clock.advance(1)
        self.assertEqual(len(s.backend.requests), 3)

    def test_refresh_outside_rooms_asks_nothing(self) -> None:
        s = _Server()
        session, _ = s.session("c1")
        s.identify(session, "u1", "t1")
        s.identify(session, "u1", "t2")
        self.assertEqual(s.backend.requests, [])


class AuthorizerRecheckTests(SynchronousTestCase):
    """ProjectAuthorizer.recheck and forget."""

    def test_recheck_bypasses_the_cache_once_per_period(self) -> None:
        clock, backend = Clock(), _BackEnd()
        authorizer = auth.ProjectAuthorizer(backend.ask, clock, ttl_seconds=PERIOD)
        authorizer.allowed("u", "p")
        backend.answer(True)
        authorizer.recheck("u", "p")
        self.assertEqual(len(backend.requests), 2)
        backend.answer(False)
        results: list[bool] = []
        authorizer.recheck("u", "p").addCallback(results.append)
        authorizer.allowed("u", "p").addCallback(results.append)
        self.assertEqual((results, len(backend.requests)), ([False, False], 2))
        clock.advance(PERIOD)
        authorizer.recheck("u", "p")
        self.assertEqual(len(backend.requests), 3)

    def test_forget_while_asking_answers_no(self) -> None:
        clock, backend = Clock(), _BackEnd()
        authorizer = auth.ProjectAuthorizer(backend.ask, clock, ttl_seconds=PERIOD)
        results: list[bool] = []
        authorizer.allowed("u", "p").addCallback(results.append)
        authorizer.forget("u", "p")
        backend.answer(True)  # from before the revocation
        self.assertEqual(results, [False])
        authorizer.allowed("u", "p")  # not cached: asked again
        self.assertEqual(len(backend.requests), 2)


class RefreshOverWebSocketTests(ServerTestCase):
    """A real back end on loopback and real session tokens."""

    async def test_token_refresh_after_the_back_end_changed(self) -> None:
        backend, url = await serve_backend(
            self, {("user_t", "p1"), ("user_t", "p2"), ("user_o", "p1")})
        self.start_server(project_auth_url=url,
                          project_auth_cache_seconds=600.0)
        self.factory.verifier = verifier()
        c = await self.connect()
        c.send_json({"type": "SET_USER", "payload": {"token": token("user_t")}})
        for project_id in ("p1", "p2"):
            c.send_json({"type": "JOIN_PROJECT", "projectId": project_id})
            await c.next_of("USER_PRESENCE")
        other = await self.connect()
        other.send_json({"type": "SET_USER", "payload": {"token": token("user_o")}})
        other.send_json({"type": "JOIN_PROJECT", "projectId": "p1"})
        while (await other.next_of("USER_PRESENCE"))["payload"]["userCount"] != 2:
            pass
        backend.allowed.discard(("user_t", "p1"))
        c.send_json({"type": "SET_USER", "payload": {"token": token("user_t", exp=2e9)}})
        err = await c.next_of("ERROR")
        self.assertEqual((err["code"], err["projectId"]), ("ACCESS_REVOKED", "p1"))
        while (await other.next_of("USER_PRESENCE"))["payload"]["userCount"] != 1:
            pass
        await self.http("POST", "/broadcast", {"type": "NOTE", "projectId": "p2"})
        self.assertEqual((await c.next_of("NOTE"))["projectId"], "p2")
        self.assertIsNone(c.close_code)
        self.assertEqual(len(backend.requests), 5)  # 3 joins, 2 re-checks

    async def test_long_lived_member_removed_within_a_period(self) -> None:
        """With PROJECT_AUTH_CACHE_SECONDS=1, a member the back end drops is out within ~1 s."""
        backend, url = await serve_backend(self, {("user_l", "p1")})
        self.start_server(project_auth_url=url,
                          project_auth_cache_seconds=1.0)
        c = await self.joined("p1", "user_l")
        backend.allowed.clear()
        started = reactor.seconds()
        err = await c.next_of("ERROR")
        self.assertEqual((err["code"], err["projectId"]), ("ACCESS_REVOKED", "p1"))
        self.assertLess(reactor.seconds() - started, 2.0)
        self.assertNotIn("p1", self.factory.registry)


class NoCacheTests(SynchronousTestCase):
    """PROJECT_AUTH_CACHE_SECONDS=0: no periodic re-check, one per token refresh."""

    def test_zero_period(self) -> None:
        s = _Server()
        assert s.shared.access is not None
        s.shared.access.period = 0.0
        session, _ = s.member("c1", "u1", "p1")
        self.assertEqual(s.clock.getDelayedCalls()[0].func.__name__, "_token_expired")
        self.assertEqual(len(s.clock.getDelayedCalls()), 1)
        s.identify(session, "u1", "fresh")
        self.assertEqual(len(s.backend.requests), 2)
