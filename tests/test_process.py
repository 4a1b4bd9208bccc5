"""
End-to-end: ``twistd -n happyrobot-ws`` as a separate process, talked to
over loopback, then stopped with SIGTERM.
"""

from __future__ import annotations

import signal

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint

from tests.helpers import ORIGIN, Client, ServerTestCase, listening_twistd, spawn_twistd


class TwistdProcessTests(ServerTestCase):
    """The real plugin in a real process."""

    timeout = 30

    async def test_serve_then_sigterm_closes_1001_and_exits(self) -> None:
        """The process serves WebSockets and HTTP, and on SIGTERM closes with 1001 and exits."""
        proc, transport, self.port_number = await listening_twistd(self, [])
        code, body, _ = await self.http("GET", "/health")
        self.assertEqual((code, body["status"]), (200, "healthy"))

        factory = WebSocketClientFactory(f"ws://127.0.0.1:{self.port_number}/ws", origin=ORIGIN)
        factory.protocol = Client
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port_number)
        client: Client = await endpoint.connect(factory)
        await client.opened
        hello = await client.next()
        self.assertEqual(hello["type"], "CONNECTION_ESTABLISHED")
        client.send_json({"type": "JOIN_PROJECT", "projectId": "p1", "userId": "user_a"})
        presence = await client.next_of("USER_PRESENCE")
        self.assertEqual(presence["payload"]["userCount"], 1)

        transport.signalProcess("TERM")
        self.assertEqual(await client.closed, 1001)
        # twistd finishes its shutdown, then re-raises the signal it got so
        # that the exit status says "terminated by SIGTERM".
        code = await proc.ended
        self.assertEqual((code, proc.signal), (None, signal.SIGTERM))
        self.assertIn(b"shutting down: closing 1 connections", proc.output)
        self.assertIn(b"Main loop terminated", proc.output)
        self.assertNotIn(b"Traceback", proc.output)

    async def test_line_observer(self) -> None:
        """
        With ``--logger happyrobot.logs.observer`` the process logs the same
        lines: start-up, a connection's two lines, and the whole shutdown.
        """
        proc, transport, self.port_number = await listening_twistd(
            self, [], twistd_args=("--logger", "happyrobot.logs.observer")
        )
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{self.port_number}/ws", origin=ORIGIN)
        factory.protocol = Client
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port_number)
        client: Client = await endpoint.connect(factory)
        hello = await client.next()
        client.sendClose(1000)
        await client.closed
        await proc.wait_for(b"disconnected (1000)")
        transport.signalProcess("TERM")
        await proc.ended
        lines = proc.output.decode().splitlines()
        connected = f"[happyrobot.ws#info] {hello['clientId']} connected"
        self.assertTrue(any(line.endswith(connected) for line in lines), lines)
        self.assertRegex(lines[0], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[happyrobot\.tap#info\] ")
        self.assertIn("Main loop terminated.", lines[-2])
        self.assertIn("Server Shut Down.", lines[-1])

    async def test_bad_port_exits_with_one_line(self) -> None:
        """PORT=abc stops start-up with one line naming PORT and no traceback."""
        proc, _ = spawn_twistd(["--env-file="], env={"PORT": "abc"})
        self.assertEqual(await proc.ended, 1)
        self.assertIn(b"PORT must be", proc.output)
        self.assertNotIn(b"Traceback", proc.output)

    async def test_port_in_use_stops_startup(self) -> None:
        """A port that cannot be bound stops the process instead of running portless."""
        self.start_server()
        proc, _ = spawn_twistd(["--port", f"tcp:{self.port_number}:interface=127.0.0.1",
                                "--env-file="])
        code = await proc.ended
        self.assertNotEqual(code, 0)
        self.assertIn(b"Address already in use", proc.output)
