"""
Protocol tests: real Autobahn clients over loopback against a listening
server, for every message type and every error path of the WebSocket.
"""

from __future__ import annotations

import gc
import json
import weakref

from autobahn.twisted.websocket import WebSocketClientFactory
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateResponseAccept,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater

from happyrobot.messages import RELAYED_TYPES
from tests.helpers import ORIGIN, Client, ServerTestCase
from tests.test_framing import client_frame


class ConnectionTests(ServerTestCase):
    """Opening a WebSocket and being greeted."""

    async def test_established_with_unique_client_ids(self) -> None:
        """Each connection is greeted with its own clientId and a millisecond timestamp."""
        self.start_server()
        a = await self.connect()
        b = await self.connect()
        self.assertNotEqual(a.client_id, b.client_id)
        self.assertTrue(a.client_id.startswith("client_"))
        self.assertEqual(len(self.factory.connections), 2)

    async def test_disallowed_origin_refused_before_protocol(self) -> None:
        """A browser Origin outside ALLOWED_ORIGINS gets 403 and no connection is created."""
        self.start_server()
        c = await self.connect(origin="http://evil.example", expect_open=False)
        await self.assertFailure(c.opened, ConnectionError)
        self.assertEqual(self.factory.connections, {})
        ok = await self.connect(origin="http://localhost:3000")
        self.assertTrue(ok.client_id)

    async def test_compression_offer_is_declined_not_fatal(self) -> None:
        """A client offering permessage-deflate (every browser does) connects uncompressed."""
        from autobahn.websocket.compress import PerMessageDeflateOffer

        self.start_server()
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{self.port_number}/ws", origin=ORIGIN)
        factory.setProtocolOptions(perMessageCompressionOffers=[PerMessageDeflateOffer()])
        factory.protocol = Client
        client: Client = await TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                  self.port_number).connect(factory)
        self._clients.append(client)
        await client.opened
        self.assertEqual((await client.next())["type"], "CONNECTION_ESTABLISHED")
        self.assertIsNone(client._perMessageCompress)

    async def test_no_origin_is_allowed(self) -> None:
        """A client without an Origin header (a back-end service) may connect."""
        self.start_server()
        c = await self.connect(origin=None)
        self.assertTrue(c.client_id)

    async def test_null_origin_allowed_when_listed(self) -> None:
        """A page opened from a file (Origin: null) connects when null is listed."""
        self.start_server(allowed_origins=("http://localhost:3000", "null"))
        c = await self.connect(origin="null")
        self.assertTrue(c.client_id)

    async def test_null_origin_refused_unless_listed(self) -> None:
        """Origin: null is refused like any other origin that is not listed."""
        self.start_server()
        refused = await self.connect(origin="null", expect_open=False)
        await self.assertFailure(refused.opened, ConnectionError)
        self.assertEqual(self.factory.connections, {})

    async def test_only_ws_path_upgrades(self) -> None:
        """/ws (and /ws/) open a WebSocket; a path below it is not found."""
        self.start_server()
        refused = await self.connect(path="/ws/anything", expect_open=False)
        await self.assertFailure(refused.opened, ConnectionError)
        self.assertEqual(self.factory.connections, {})
        ok = await self.connect(path="/ws/")
        self.assertTrue(ok.client_id)

    async def test_star_allows_any_origin(self) -> None:
        """ALLOWED_ORIGINS=* lets any browser origin connect."""
        self.start_server(allowed_origins=("*",))
        c = await self.connect(origin="http://anywhere.example")
        self.assertTrue(c.client_id)

    async def test_disconnect_leaves_rooms_and_updates_presence(self) -> None:
        """Closing the socket leaves every room; the others get USER_PRESENCE without it."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        b = await self.joined("p1", "user_b")
        await a.next_of("USER_PRESENCE")  # b's arrival
        b.sendClose(1000)
        await b.closed
        msg = await a.next_of("USER_PRESENCE")
        self.assertEqual([u["userId"] for u in msg["payload"]["activeUsers"]], ["user_a"])
        a.sendClose(1000)
        await a.closed
        await self.factory.when_empty()
        self.assertEqual(len(self.factory.registry), 0)

    async def test_closed_connection_is_freed_by_reference_counting(self) -> None:
        """
        A connection that joined a room and closed leaves no reference cycle
        behind (its protocol with its session and writer, its HTTP channel and request): reference
        counting frees it, with the cyclic garbage collector switched off.
        """
        self.start_server()
        made: list[weakref.ref[object]] = []
        make = self.site.requestFactory

        def tracked(channel: object, queued: object) -> object:
            request = make(channel, queued)
            made.extend((weakref.ref(channel), weakref.ref(request)))
            return request

        self.patch(self.site, "requestFactory", tracked)
        if gc.isenabled():
            gc.disable()
            self.addCleanup(gc.enable)
        c = await self.joined("p1", "user_a")
        server = self.factory.connections[c.client_id]
        watched = {"protocol": weakref.ref(server), "session": weakref.ref(server.session),
                   "channel": made[0], "request": made[1]}
        del server
        c.sendClose(1000)
        await c.closed
        await self.factory.when_empty()
        await deferLater(reactor, 0, lambda: None)  # connectionLost has returned
        self.assertEqual({name: ref() is None for name, ref in watched.items()},
                         dict.fromkeys(watched, True))


class PresenceTests(ServerTestCase):
    """SET_USER, JOIN_PROJECT, LEAVE_PROJECT and USER_PRESENCE."""

    async def test_join_sends_presence_to_every_member(self) -> None:
        """After a join the joiner and the members all get the full list with initials."""
        self.start_server()
        a = await self.joined("p1", "user_a", firstName="Ann", lastName="Lee")
        b = await self.connect()
        b.send_json({"type": "SET_USER", "payload": {"userId": "user_b",
                                                     "userInfo": {"name": "Bob"}}})
        b.send_json({"type": "JOIN_PROJECT", "projectId": "p1"})
        for client in (a, b):
            msg = await client.next_of("USER_PRESENCE")
            payload = msg["payload"]
            self.assertEqual(payload["projectId"], "p1")
            self.assertEqual(payload["userCount"], 2)
            users = {u["userId"]: u for u in payload["activeUsers"]}
            self.assertEqual(users["user_a"]["initials"], "AL")
            self.assertEqual(users["user_b"]["initials"], "B")
            self.assertEqual(users["user_b"]["clientId"], b.client_id)
            self.assertIsInstance(users["user_b"]["joinedAt"], int)
            self.assertTrue(msg["operationId"].startswith("presence-"))

    async def test_join_with_user_id_sets_the_user(self) -> None:
        """A userId on JOIN_PROJECT identifies the client as SET_USER would."""
        self.start_server()
        c = await self.connect()
        c.send_json({"type": "JOIN_PROJECT", "projectId": "p1", "userId": "user_2xyz"})
        msg = await c.next_of("USER_PRESENCE")
        self.assertEqual(msg["payload"]["activeUsers"][0]["userId"], "user_2xyz")
        self.assertEqual(msg["payload"]["activeUsers"][0]["initials"], "YZ")

    async def test_join_as_other_user_drops_old_user_info(self) -> None:
        """A JOIN_PROJECT naming another user does not keep the previous user's initials."""
        self.start_server()
        c = await self.connect()
        c.send_json({"type": "SET_USER", "payload": {"userId": "user_a",
                                                     "userInfo": {"email": "bob@x.io"}}})
        c.send_json({"type": "JOIN_PROJECT", "projectId": "p1", "userId": "user_zz"})
        msg = await c.next_of("USER_PRESENCE")
        self.assertEqual(msg["payload"]["activeUsers"][0]["initials"], "ZZ")

    async def test_top_level_user_id_in_set_user(self) -> None:
        """SET_USER accepts a top-level userId."""
        self.start_server()
        c = await self.connect()
        c.send_json({"type": "SET_USER", "userId": "user_top"})
        c.send_json({"type": "JOIN_PROJECT", "projectId": "p1"})
        msg = await c.next_of("USER_PRESENCE")
        self.assertEqual(msg["payload"]["activeUsers"][0]["userId"], "user_top")

    async def test_anonymous_join_refused(self) -> None:
        """JOIN_PROJECT before any user id is refused with NOT_IDENTIFIED and joins nothing."""
        self.start_server()
        c = await self.connect()
        c.send_json({"type": "JOIN_PROJECT", "projectId": "p1", "operationId": "op-j"})
        msg = await c.next()
        self.assertEqual((msg["type"], msg["code"]), ("ERROR", "NOT_IDENTIFIED"))
        self.assertEqual(msg["operationId"], "op-j")
        self.assertNotIn("p1", self.factory.registry)

    async def test_set_user_change_updates_presence(self) -> None:
        """A new SET_USER re-announces presence in every room of the connection."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        a.send_json({"type": "JOIN_PROJECT", "projectId": "p2"})
        await a.next_of("USER_PRESENCE")
        a.send_json({"type": "SET_USER", "payload": {"userId": "user_a",
                                                     "userInfo": {"email": "zed@x.io"}}})
        seen = {}
        for _ in range(2):
            msg = await a.next_of("USER_PRESENCE")
            seen[msg["payload"]["projectId"]] = msg["payload"]["activeUsers"][0]["initials"]
        self.assertEqual(seen, {"p1": "ZE", "p2": "ZE"})

    async def test_leave_updates_presence_and_removes_empty_room(self) -> None:
        """LEAVE_PROJECT tells the others; the last leave removes the room."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        b = await self.joined("p1", "user_b")
        await a.next_of("USER_PRESENCE")
        b.send_json({"type": "LEAVE_PROJECT", "projectId": "p1"})
        msg = await a.next_of("USER_PRESENCE")
        self.assertEqual(msg["payload"]["userCount"], 1)
        a.send_json({"type": "LEAVE_PROJECT", "projectId": "p1"})
        await self.round_trip(a)
        self.assertNotIn("p1", self.factory.registry)

    async def test_leave_twice_is_harmless(self) -> None:
        """Leaving a room one is not in answers nothing and changes nothing."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        a.send_json({"type": "LEAVE_PROJECT", "projectId": "p9"})
        self.assertEqual(await self.round_trip(a), [])
        self.assertEqual(self.factory.registry.member_count("p1"), 1)


class RelayTests(ServerTestCase):
    """The seven relayed event types."""

    async def test_relay_reaches_others_not_sender(self) -> None:
        """A TASK_UPDATE reaches every other member, and never the sender."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        b = await self.joined("p1", "user_b")
        c = await self.joined("p1", "user_c")
        a.send_json({"type": "TASK_UPDATE", "projectId": "p1",
                     "payload": {"id": "t1", "title": "New"}, "operationId": "op-789"})
        for client in (b, c):
            msg = await client.next_of("TASK_UPDATE")
            self.assertEqual(msg["payload"], {"id": "t1", "title": "New"})
            self.assertEqual(msg["operationId"], "op-789")
            self.assertEqual(msg["projectId"], "p1")
            self.assertIsInstance(msg["timestamp"], int)
            self.assertNotIn("userId", msg)
            # (v2) who sent it, by connection and user, nested so that the
            # front end's "skip my own userId" rule does not apply.
            self.assertEqual(msg["sender"], {"clientId": a.client_id, "userId": "user_a"})
        before = await self.round_trip(a)
        self.assertNotIn("TASK_UPDATE", [m["type"] for m in before])

    async def test_every_relayed_type(self) -> None:
        """All seven relayed types are delivered, in the order sent."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        b = await self.joined("p1", "user_b")
        kinds = sorted(RELAYED_TYPES)
        for kind in kinds:
            a.send_json({"type": kind, "projectId": "p1", "payload": {"k": kind}})
        got = []
        while len(got) < len(kinds):
            msg = await b.next()
            if msg["type"] != "USER_PRESENCE":
                got.append(msg["payload"]["k"])
        self.assertEqual(got, kinds)

    async def test_same_user_other_tab_receives(self) -> None:
        """Another connection of the same user receives the relayed event."""
        self.start_server()
        tab1 = await self.joined("p1", "user_a")
        tab2 = await self.joined("p1", "user_a")
        tab1.send_json({"type": "COMMENT_CREATE", "projectId": "p1", "payload": {"id": "c1"}})
        msg = await tab2.next_of("COMMENT_CREATE")
        self.assertEqual(msg["payload"], {"id": "c1"})

    async def test_rooms_are_isolated(self) -> None:
        """Events in one room never reach the members of another."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        a.send_json({"type": "JOIN_PROJECT", "projectId": "p2"})
        await a.next_of("USER_PRESENCE")
        b = await self.joined("p2", "user_b")
        outsider = await self.joined("p3", "user_c")
        a.send_json({"type": "TASK_CREATE", "projectId": "p2", "payload": {"n": 1}})
        msg = await b.next_of("TASK_CREATE")
        self.assertEqual(msg["projectId"], "p2")
        self.assertEqual([m["type"] for m in await self.round_trip(outsider)], [])

    async def test_relay_into_unjoined_room_refused(self) -> None:
        """An event into a room the sender is not in gets NOT_IN_PROJECT and reaches no one."""
        self.start_server()
        member = await self.joined("p1", "user_a")
        intruder = await self.joined("p2", "user_b")
        intruder.send_json({"type": "TASK_DELETE", "projectId": "p1",
                            "payload": {"id": "t1"}, "operationId": "op-1"})
        err = await intruder.next_of("ERROR")
        self.assertEqual(err["code"], "NOT_IN_PROJECT")
        self.assertEqual(err["operationId"], "op-1")
        self.assertEqual(await self.round_trip(member), [])

    async def test_relay_after_leave_refused(self) -> None:
        """After LEAVE_PROJECT the room no longer accepts the client's events."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        b = await self.joined("p1", "user_b")
        a.send_json({"type": "LEAVE_PROJECT", "projectId": "p1"})
        a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {}})
        err = await a.next_of("ERROR")
        self.assertEqual(err["code"], "NOT_IN_PROJECT")
        seen = await self.round_trip(b)
        self.assertNotIn("TASK_UPDATE", [m["type"] for m in seen])


class ErrorTests(ServerTestCase):
    """Bad frames get an ERROR, the connection stays usable, others never notice."""

    async def assert_error(self, client: Client, frame: bytes, code: str,
                           binary: bool = False) -> None:
        client.sendMessage(frame, isBinary=binary)
        msg = await client.next()
        self.assertEqual((msg["type"], msg["code"]), ("ERROR", code))
        self.assertIsInstance(msg["error"], str)

    async def test_error_codes(self) -> None:
        """Each kind of bad frame gets its stable code and the connection keeps working."""
        self.start_server()
        c = await self.joined("p1", "user_a")
        cases = [
            (b"{not json", "INVALID_JSON"),
            (b"[1, 2]", "INVALID_MESSAGE"),
            (b'{"no": "type"}', "INVALID_MESSAGE"),
            (b'{"type": "NOPE"}', "UNKNOWN_TYPE"),
            (b'{"type": "TASK_UPDATE", "payload": {}}', "MISSING_PROJECT_ID"),
            (b'{"type": "TASK_UPDATE", "projectId": 5}', "INVALID_PROJECT_ID"),
            (b'{"type": "TASK_UPDATE", "projectId": "p1", "payload": [1]}', "INVALID_PAYLOAD"),
            (b'{"type": "SET_USER", "payload": {"userId": 42}}', "INVALID_USER_ID"),
            (json.dumps({"type": "SET_USER", "userId": "u" * 5000}).encode(), "INVALID_USER_ID"),
            (b'{"type": "SET_USER", "payload": {"userId": "u", "userInfo": {"name": 1}}}',
             "INVALID_USER_INFO"),
            (b'{"type": "SET_USER", "payload": {}}', "MISSING_USER_ID"),
        ]
        for frame, code in cases:
            await self.assert_error(c, frame, code)
        await self.assert_error(c, b"\x00\x01", "BINARY_NOT_SUPPORTED", binary=True)
        other = await self.joined("p1", "user_b")
        c.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"ok": True}})
        msg = await other.next_of("TASK_UPDATE")
        self.assertEqual(msg["payload"], {"ok": True})

    async def test_bad_user_id_never_reaches_presence(self) -> None:
        """A numeric user id is refused, so presence keeps only valid users."""
        self.start_server()
        c = await self.connect()
        c.send_json({"type": "JOIN_PROJECT", "projectId": "p1", "userId": 12345})
        err = await c.next()
        self.assertEqual(err["code"], "INVALID_USER_ID")
        self.assertNotIn("p1", self.factory.registry)

    async def test_oversize_message_closes_1009(self) -> None:
        """A message over MAX_MESSAGE_BYTES closes that socket with 1009; others carry on."""
        self.start_server(max_message_bytes=1024)
        a = await self.joined("p1", "user_a")
        b = await self.joined("p1", "user_b")
        big = await self.joined("p1", "user_big")
        big.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"x": "y" * 4096}})
        code = await big.closed
        self.assertEqual(code, 1009)
        a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"after": 1}})
        msg = await b.next_of("TASK_UPDATE")
        self.assertEqual(msg["payload"], {"after": 1})

    async def test_malformed_burst_harms_no_one(self) -> None:
        """A burst of garbage from one client loses nothing between two others."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        b = await self.joined("p1", "user_b")
        bad = await self.joined("p1", "user_bad")
        garbage = [b"{", b"[" * 5000 + b"]" * 5000, b'{"type": 1e999}',
                   b'{"type":"TASK_UPDATE","projectId":"p1","payload":' + b"9" * 1000 + b"}",
                   b'"string"', b"null"]
        for i in range(100):
            bad.sendMessage(garbage[i % len(garbage)], isBinary=(i % 10 == 0))
            a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"i": i}})
        got = []
        while len(got) < 100:
            msg = await b.next()
            if msg["type"] == "TASK_UPDATE":
                got.append(msg["payload"]["i"])
        self.assertEqual(got, list(range(100)))
        self.assertIn(bad.client_id, self.factory.connections)


    async def test_invalid_utf8_closes_1007(self) -> None:
        """A text frame that is not UTF-8 fails that connection with 1007; others carry on."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        b = await self.joined("p1", "user_b")
        bad = await self.joined("p1", "user_bad")
        bad.sendMessage(b"\xff\xfe{}", isBinary=False)
        self.assertEqual(await bad.closed, 1007)
        a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"after": 1}})
        msg = await b.next_of("TASK_UPDATE")
        self.assertEqual(msg["payload"], {"after": 1})


def _event(project_id: str, i: int) -> bytes:
    return json.dumps({"type": "TASK_UPDATE", "projectId": project_id, "payload": {"i": i}}).encode()


class ReadTests(ServerTestCase):
    """
    Whole text frames are taken off a read before Autobahn sees the rest;
    whatever is in one read, every frame is handled as Autobahn would.
    """

    async def test_mixed_read(self) -> None:
        """Events, a ping and a fragmented message in one read: all handled, in order."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        b = await self.joined("p1", "user_b")
        pongs: list[bytes] = []
        a.onPong = pongs.append  # type: ignore[method-assign]
        fragmented = _event("p1", 2)
        a.transport.write(
            client_frame(_event("p1", 0))
            + client_frame(_event("p1", 1))
            + client_frame(b"hi", opcode=9)
            + client_frame(fragmented[:10], fin=False)
            + client_frame(fragmented[10:], opcode=0)
            + client_frame(_event("p1", 3))
        )
        got = [(await b.next_of("TASK_UPDATE"))["payload"]["i"] for _ in range(4)]
        self.assertEqual(got, [0, 1, 2, 3])
        await self.round_trip(a)
        self.assertEqual(pongs, [b"hi"])

    async def test_frame_split_across_reads(self) -> None:
        """A frame cut by the end of a read is put together by Autobahn from the next."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        b = await self.joined("p1", "user_b")
        data = client_frame(_event("p1", 0)) + client_frame(_event("p1", 1))
        a.transport.write(data[:-5])
        self.assertEqual((await b.next_of("TASK_UPDATE"))["payload"]["i"], 0)
        a.transport.write(data[-5:])
        self.assertEqual((await b.next_of("TASK_UPDATE"))["payload"]["i"], 1)

    async def test_invalid_utf8_mid_read(self) -> None:
        """
        A frame that is not UTF-8 between two events: the event before it
        is delivered, the connection closes with 1007 and the one after it
        is not delivered.
        """
        self.start_server()
        a = await self.joined("p1", "user_a")
        b = await self.joined("p1", "user_b")
        a.transport.write(
            client_frame(_event("p1", 0)) + client_frame(b"\xff{}") + client_frame(_event("p1", 1))
        )
        self.assertEqual(await a.closed, 1007)
        self.assertEqual((await b.next_of("TASK_UPDATE"))["payload"]["i"], 0)
        self.assertEqual([m for m in await self.round_trip(b) if m["type"] == "TASK_UPDATE"], [])

    async def test_lone_event_is_written_during_its_read(self) -> None:
        """
        A read holding one event writes it to each recipient as it is handed
        over (nothing is queued for the end of the read), and the frames
        are still counted; a burst in one read is queued and written once
        per recipient.
        """
        factory = self.start_server()
        a = await self.joined("p1", "user_a")
        b = await self.joined("p1", "user_b")
        c = await self.joined("p1", "user_c")
        await self.round_trip(a)
        marked: list[object] = []
        mark = factory.flusher.mark
        factory.flusher.mark = lambda conn: (marked.append(conn), mark(conn))  # type: ignore[method-assign]
        before = factory.metrics.frames_out
        a.transport.write(client_frame(_event("p1", 0)))
        for client in (b, c):
            self.assertEqual((await client.next_of("TASK_UPDATE"))["payload"]["i"], 0)
        self.assertEqual(marked, [])
        self.assertEqual(factory.metrics.frames_out - before, 2)
        a.transport.write(client_frame(_event("p1", 1)) + client_frame(_event("p1", 2)))
        for client in (b, c):
            self.assertEqual((await client.next_of("TASK_UPDATE"))["payload"]["i"], 1)
            self.assertEqual((await client.next_of("TASK_UPDATE"))["payload"]["i"], 2)
        self.assertEqual(len(marked), 2)  # b and c, once each
        self.assertEqual(factory.metrics.frames_out - before, 6)


class _DeflateClient(Client):
    """A client that offers permessage-deflate and notes which messages came compressed."""

    def __init__(self) -> None:
        super().__init__()
        self.compressed: list[bool] = []
        self.close_frame: Deferred[int | None] = Deferred()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.compressed.append(bool(self._isMessageCompressed))
        super().onMessage(payload, isBinary)

    def onCloseFrame(self, code: int | None, reasonRaw: bytes) -> bool | None:
        if not self.close_frame.called:
            self.close_frame.callback(code)
        return super().onCloseFrame(code, reasonRaw)  # type: ignore[no-any-return]


class DeflateTests(ServerTestCase):
    """PERMESSAGE_DEFLATE: compressed events for clients that offer it."""

    async def deflate_client(self, user_id: str) -> _DeflateClient:
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{self.port_number}/ws", origin=ORIGIN)
        factory.protocol = _DeflateClient
        factory.setProtocolOptions(
            perMessageCompressionOffers=[PerMessageDeflateOffer()],
            perMessageCompressionAccept=PerMessageDeflateResponseAccept,
        )
        client: _DeflateClient = await TCP4ClientEndpoint(
            reactor, "127.0.0.1", self.port_number
        ).connect(factory)
        self._clients.append(client)
        await client.opened
        client.send_json({"type": "SET_USER", "payload": {"userId": user_id}})
        client.send_json({"type": "JOIN_PROJECT", "projectId": "p1"})
        await client.next_of("USER_PRESENCE")
        return client

    async def test_compressed_both_ways(self) -> None:
        """
        With PERMESSAGE_DEFLATE a client that offers it gets large events
        compressed and small ones plain, and its own compressed events are
        relayed; a client that does not offer it gets plain frames.
        """
        self.start_server(permessage_deflate=True)
        a = await self.deflate_client("user_a")
        b = await self.deflate_client("user_b")
        plain = await self.joined("p1", "user_plain")
        self.assertIsNotNone(b._perMessageCompress)
        big = {"title": "write the report " * 40}
        a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": big})
        a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"t": 1}})
        b.compressed.clear()
        self.assertEqual((await b.next_of("TASK_UPDATE"))["payload"], big)
        self.assertEqual((await b.next_of("TASK_UPDATE"))["payload"], {"t": 1})
        self.assertEqual(b.compressed, [True, False])
        self.assertEqual((await plain.next_of("TASK_UPDATE"))["payload"], big)

    async def test_off_by_default(self) -> None:
        """Without PERMESSAGE_DEFLATE the offer is declined and frames are plain."""
        self.start_server()
        a = await self.deflate_client("user_a")
        b = await self.deflate_client("user_b")
        self.assertIsNone(b._perMessageCompress)
        a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"t": "x" * 1000}})
        b.compressed.clear()
        await b.next_of("TASK_UPDATE")
        self.assertEqual(b.compressed, [False])

    async def test_inflated_size_is_bounded(self) -> None:
        """A message that inflates past MAX_MESSAGE_BYTES closes that connection with 1009."""
        self.start_server(permessage_deflate=True, max_message_bytes=4096)
        a = await self.deflate_client("user_a")
        b = await self.deflate_client("user_b")
        a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"t": "0" * 100_000}})
        # (The close frame, not the end of TCP: Autobahn stops reading a
        # connection whose message failed to inflate, so the client's close
        # reply goes unread and the socket is dropped after the close
        # handshake timeout.)
        self.assertEqual(await a.close_frame, 1009)
        b.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"t": 1}})
        await self.round_trip(b)


class BroadcastDeliveryTests(ServerTestCase):
    """POST /broadcast as the members see it."""

    async def test_broadcast_reaches_every_member_with_user_id(self) -> None:
        """Every member, the acting user's tabs included, gets the event with userId kept."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        b = await self.joined("p1", "user_b")
        code, body, _ = await self.http("POST", "/broadcast", {
            "type": "PROJECT_DELETE", "projectId": "p1", "payload": {"id": "p1"},
            "userId": "user_a"})
        self.assertEqual(code, 200)
        seq = body.pop("seq")
        self.assertIsInstance(seq, int)
        self.assertEqual(body, {"success": True, "message": "Broadcast sent",
                                "projectId": "p1", "clientCount": 2})
        msgs = await gatherResults([a.next_of("PROJECT_DELETE"), b.next_of("PROJECT_DELETE")])
        for msg in msgs:
            self.assertEqual(msg["seq"], seq)
            self.assertEqual(msg["userId"], "user_a")
            self.assertEqual(msg["payload"], {"id": "p1"})
            self.assertTrue(msg["operationId"].startswith("broadcast-"))


class LoggingTests(ServerTestCase):
    """What the server logs at info: lifecycle with ids only, nothing per message."""

    async def test_info_logs_ids_only(self) -> None:
        """Connect and disconnect are logged with the client id; payloads, names and
        per-message lines never appear at info."""
        from twisted.logger import LogLevel, capturedLogs, formatEvent

        self.start_server()
        with capturedLogs() as captured:
            a = await self.joined("p1", "user_a", firstName="Secret", lastName="Person",
                                  email="secret@example.com")
            b = await self.joined("p1", "user_b")
            for i in range(20):
                a.send_json({"type": "TASK_UPDATE", "projectId": "p1",
                             "payload": {"title": "confidential-title"}})
            for _ in range(20):
                await b.next_of("TASK_UPDATE")
            a.sendClose(1000)
            await a.closed
            await self.round_trip(b)
        ours = [e for e in captured if e.get("log_namespace", "").startswith("happyrobot")
                and e["log_level"] >= LogLevel.info]
        texts = [formatEvent(e) for e in ours]
        self.assertTrue(any(a.client_id in t and "connected" in t for t in texts), texts)
        self.assertTrue(any(a.client_id in t and "disconnected" in t for t in texts), texts)
        self.assertLessEqual(len(texts), 6)  # lifecycle only, not one per message
        for t in texts:
            for secret in ("confidential-title", "Secret", "secret@example.com", "user_a"):
                self.assertNotIn(secret, t)
