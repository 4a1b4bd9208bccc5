"""
``python -m happyrobot`` presence, revoke and disconnect, run in-process
against a real server on loopback, and once as a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import sys

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from happyrobot import __main__ as cli
from tests.helpers import REPO_ROOT, ServerTestCase, free_port


class OperatorCommandTests(ServerTestCase):
    """The operator API's commands."""

    async def cli(self, *argv: str) -> tuple[int, str, str]:
        """Run a command in-process against the server; its exit code, stdout and stderr."""
        args = cli.parse_args([*argv, "--url", self.url("")], environ={})
        out, err = io.StringIO(), io.StringIO()
        code = await cli.run(reactor, args, out, err)
        return code, out.getvalue(), err.getvalue()

    async def test_presence_revoke_disconnect(self) -> None:
        self.start_server()
        a = await self.joined("p/1", "user a", firstName="Ann", lastName="Lee")
        code, out, err = await self.cli("presence", "p/1")
        self.assertEqual((code, err), (0, ""))
        reply = json.loads(out)
        self.assertEqual(reply["users"], [{"userId": "user a", "initials": "AL",
                                           "connections": 1}])
        code, out, err = await self.cli("revoke", "p/1", "user a", "--reason", "moved")
        self.assertEqual((code, err, json.loads(out)["connections"]), (0, "", 1))
        err_msg = await a.next_of("ERROR")
        self.assertEqual((err_msg["code"], err_msg["projectId"]), ("ACCESS_REVOKED", "p/1"))
        self.assertIn("moved", err_msg["error"])
        code, out, err = await self.cli("disconnect", "user a")
        self.assertEqual((code, err, json.loads(out)["connections"]), (0, "", 1))
        self.assertEqual(await a.closed, 4403)

    async def test_token_and_errors(self) -> None:
        """A wrong token fails with 1 and one line; the right one (from the environment) works."""
        self.start_server(api_token="s3cret")
        code, out, err = await self.cli("presence", "p1", "--api-token", "wrong")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("answered 401: Missing or invalid API token", err)
        args = cli.parse_args(["disconnect", "u1", "--url", self.url("")],
                              environ={"API_TOKEN": "s3cret"})
        out_io, err_io = io.StringIO(), io.StringIO()
        self.assertEqual(await cli.run(reactor, args, out_io, err_io), 0)
        self.assertEqual(json.loads(out_io.getvalue())["connections"], 0)
        code, out, err = await self.cli("revoke", "p1", "u" * 200, "--api-token", "s3cret")
        self.assertEqual(code, 1)
        self.assertIn("answered 400: userId must be", err)

    async def test_unreachable(self) -> None:
        self.start_server()
        self.port_number = free_port()
        code, out, err = await self.cli("presence", "p1")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("cannot reach http://127.0.0.1:", err)

    async def test_subprocess(self) -> None:
        """``python -m happyrobot revoke`` prints the reply and exits with 0."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": REPO_ROOT}
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "happyrobot", "revoke", "p1", "user_a", "--url", self.url("")],
            env=env, path=REPO_ROOT)
        self.assertEqual((code, err), (0, b""))
        self.assertEqual(json.loads(out)["connections"], 1)
        self.assertEqual((await a.next_of("ERROR"))["code"], "ACCESS_REVOKED")
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "happyrobot", "revoke", "p1"], env=env, path=REPO_ROOT)
        self.assertEqual(code, 2)
        self.assertIn(b"usage: happyrobot revoke", err)
