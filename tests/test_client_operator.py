"""
The browser client (``/client.js``) and the operator API: run in Node
(its built-in WebSocket) against a real server on loopback, it stops
rejoining a room it was revoked from and stops reconnecting after a
disconnect of its user.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from twisted.internet import reactor

from tests.helpers import REPO_ROOT, LineCollector, ServerTestCase
from tests.test_browser import _env, driver_result, ensure_node

DRIVER = os.path.join(REPO_ROOT, "tests", "node", "operator.mjs")


class ClientOperatorTests(ServerTestCase):
    timeout = 60

    async def test_revoked_room_not_rejoined_and_disconnect_final(self) -> None:
        node, _ = await ensure_node(self)
        self.start_server()
        module = Path(self.mktemp())
        module.mkdir()
        shutil.copy(os.path.join(REPO_ROOT, "happyrobot", "static", "client.js"),
                    module / "client.mjs")
        driver = LineCollector()
        transport = reactor.spawnProcess(
            driver, node,
            [node, "--experimental-websocket", "--no-warnings", DRIVER,
             (module / "client.mjs").resolve().as_uri(), f"ws://127.0.0.1:{self.port_number}/ws"],
            env=_env(), path=os.path.dirname(DRIVER))

        async def stop() -> None:
            if not driver.ended.called:
                transport.signalProcess("KILL")
                await driver.ended

        self.addCleanup(stop)
        registry = self.factory.registry

        await driver.wait_for(b'{"need":"revoke"}')
        code, body, _ = await self.http("POST", "/projects/p1/revoke",
                                        {"userId": "user_n", "reason": "left the team"})
        self.assertEqual((code, body["connections"]), (200, 1))
        transport.write(b"revoke-done\n")

        await driver.wait_for(b'{"need":"reconnected"}')
        [session] = [p.session for p in self.factory.connections.values()]
        self.assertEqual(set(session.projects), {"p2"})  # p1 was not joined again
        self.assertEqual((registry.member_count("p1"), registry.member_count("p2")), (0, 1))
        transport.write(b"reconnected-done\n")

        await driver.wait_for(b'{"need":"disconnect"}')
        code, body, _ = await self.http("POST", "/users/user_n/disconnect")
        self.assertEqual((code, body["connections"]), (200, 1))
        transport.write(b"disconnect-done\n")

        await driver.ended
        result = driver_result(self, driver)
        log = result["log"]
        self.assertEqual(log["revoked"], [{"projectId": "p1",
                                           "reason": "Your access to project p1 was revoked: "
                                                     "left the team"}])
        self.assertEqual(result["roomsAfterRevoke"], ["p2"])
        self.assertEqual(log["rejoins"], ["p2"])
        self.assertEqual(log["errors"], ["ACCESS_REVOKED"])
        self.assertEqual(log["terminated"], [{"code": 4403, "reason": "User disconnected"}])
        self.assertEqual(result["finalState"], "closed")
        # Closed straight from open, and nothing after: no reconnection.
        self.assertEqual(log["states"][-2:], ["open", "closed"])
        await self.factory.when_empty()
