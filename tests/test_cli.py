"""
The command-line companion (``python -m happyrobot``): argument parsing
without I/O, ``tail`` and ``publish`` run in-process against a real server
on loopback with their output captured, and one run as a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase

from happyrobot import __main__ as cli
from happyrobot import __version__
from happyrobot.tap import DrainService
from tests.helpers import REPO_ROOT, LineCollector, ServerTestCase, free_port


class _Lines(io.StringIO):
    """An output stream whose complete lines queue up for the test to await."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: DeferredQueue[str] = DeferredQueue()
        self._partial = ""

    def write(self, text: str) -> int:
        """Keep the text, and queue every line it completes."""
        self._partial += text
        *complete, self._partial = self._partial.split("\n")
        for line in complete:
            self.lines.put(line)
        return super().write(text)

    async def next_json(self) -> Any:
        """The next line written, decoded."""
        return json.loads(await self.lines.get())


class ParseArgsTests(SynchronousTestCase):
    """Argument parsing: usage errors exit with 2."""

    def setUp(self) -> None:
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def assertUsageError(self, argv: list[str], text: str) -> None:
        """
        C{argv} exits with 2, the usage of its command (of the program
        when none is given) and one error line containing C{text}.
        """
        self.stderr.seek(0)
        self.stderr.truncate()
        with self.assertRaises(SystemExit) as raised:
            cli.parse_args(argv, environ={})
        self.assertEqual(raised.exception.code, 2)
        prog = " ".join(["happyrobot", *argv[:1]])
        *usage, error = self.stderr.getvalue().splitlines()
        self.assertTrue(usage[0].startswith(f"usage: {prog} [-h]"), usage)
        self.assertTrue(error.startswith(f"{prog}: error: "), error)
        self.assertIn(text, error)

    def test_publish_decodes_the_payload(self) -> None:
        """The publish payload argument is decoded from JSON."""
        args = cli.parse_args(["publish", "p1", "TASK_UPDATE", '{"id": "t1"}'], environ={})
        self.assertEqual((args.command, args.project_id, args.type, args.payload),
                         ("publish", "p1", "TASK_UPDATE", {"id": "t1"}))
        self.assertEqual(args.url, cli.DEFAULT_HTTP_URL)
        self.assertIsNone(args.api_token)

    def test_publish_null_payload(self) -> None:
        """A payload of null is allowed."""
        args = cli.parse_args(["publish", "p1", "PROJECT_DELETE", "null"], environ={})
        self.assertIsNone(args.payload)

    def test_api_token_from_environment(self) -> None:
        """--api-token defaults to the API_TOKEN variable, and the flag wins."""
        argv = ["publish", "p1", "T", "{}"]
        self.assertEqual(cli.parse_args(argv, environ={"API_TOKEN": "s3"}).api_token, "s3")
        flagged = cli.parse_args(argv + ["--api-token", "x"], environ={"API_TOKEN": "s3"})
        self.assertEqual(flagged.api_token, "x")

    def test_tail_defaults(self) -> None:
        """tail connects to the local server's /ws with no user or token given."""
        args = cli.parse_args(["tail", "p1"], environ={})
        self.assertEqual((args.url, args.user_id, args.token), (cli.DEFAULT_WS_URL, None, None))

    def test_payload_not_json(self) -> None:
        """A payload that is not JSON is a usage error."""
        self.assertUsageError(["publish", "p1", "T", "{nope"], "not JSON")

    def test_payload_not_an_object(self) -> None:
        """A payload that is JSON but not an object or null is a usage error."""
        self.assertUsageError(["publish", "p1", "T", "[1, 2]"], "JSON object or null")

    def test_no_command(self) -> None:
        """Running without a command is a usage error."""
        self.assertUsageError([], "required: COMMAND")

    def test_bad_url_scheme(self) -> None:
        """publish needs an http(s) URL, tail a ws(s) or http(s) one."""
        self.assertUsageError(["publish", "p1", "T", "{}", "--url", "ws://h/ws"],
                              "argument --url: must start with http:// or https://")
        self.assertUsageError(["tail", "p1", "--url", "ftp://h/ws"],
                              "argument --url: must start with ws://")

    def test_help(self) -> None:
        """--help exits with 0 and describes both commands."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit) as raised:
            cli.parse_args(["--help"], environ={})
        self.assertEqual(raised.exception.code, 0)
        self.assertIn("tail", out.getvalue())
        self.assertIn("publish", out.getvalue())

    def test_version(self) -> None:
        """--version prints the package's version and exits with 0."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit) as raised:
            cli.parse_args(["--version"], environ={})
        self.assertEqual(raised.exception.code, 0)
        self.assertEqual(out.getvalue(), f"happyrobot {__version__}\n")

    def test_ws_url(self) -> None:
        """http(s) URLs given to tail mean the matching ws(s) URL."""
        self.assertEqual(cli._ws_url("http://h:1/ws"), "ws://h:1/ws")
        self.assertEqual(cli._ws_url("https://h/ws"), "wss://h/ws")
        self.assertEqual(cli._ws_url("ws://h/ws"), "ws://h/ws")


class TailTests(ServerTestCase):
    """``tail`` against a real server."""

    def start_tail(self, *argv: str) -> tuple[Deferred[int], _Lines, io.StringIO]:
        """Run ``tail`` in-process; returns its exit code Deferred, stdout and stderr."""
        args = cli.parse_args(
            ["tail", *argv, "--url", f"ws://127.0.0.1:{self.port_number}/ws"], environ={}
        )
        out, err = _Lines(), io.StringIO()
        d = Deferred.fromCoroutine(cli.run(reactor, args, out, err))
        return d, out, err

    async def test_prints_presence_and_events(self) -> None:
        """tail joins the room and prints presence, relayed and broadcast events as JSON lines."""
        self.start_server()
        done, out, err = self.start_tail("p1", "--user-id", "ops")
        presence = await out.next_json()
        self.assertEqual(presence["type"], "USER_PRESENCE")
        self.assertEqual(presence["payload"]["activeUsers"][0]["userId"], "ops")

        member = await self.joined("p1", "user_a")
        self.assertEqual((await out.next_json())["payload"]["userCount"], 2)
        member.send_json({"type": "TASK_UPDATE", "projectId": "p1",
                          "payload": {"id": "t1"}, "operationId": "op-1"})
        event = await out.next_json()
        self.assertEqual((event["type"], event["payload"], event["operationId"]),
                         ("TASK_UPDATE", {"id": "t1"}, "op-1"))

        code, _, _ = await self.http("POST", "/broadcast", {
            "type": "PROJECT_DELETE", "projectId": "p1", "userId": "user_b"})
        self.assertEqual(code, 200)
        event = await out.next_json()
        self.assertEqual((event["type"], event["userId"]), ("PROJECT_DELETE", "user_b"))

        done.cancel()
        self.assertEqual(await done, 0)
        self.assertEqual(err.getvalue(), "")

    async def test_default_user(self) -> None:
        """Without --user-id or --token, tail connects as the user 'cli'."""
        self.start_server()
        done, out, _ = self.start_tail("p1")
        presence = await out.next_json()
        self.assertEqual(presence["payload"]["activeUsers"][0]["userId"], cli.DEFAULT_USER_ID)
        done.cancel()
        await done

    async def test_refused_join_fails(self) -> None:
        """An ERROR before the join succeeded ends tail with 1 and one line naming the code."""
        self.start_server()
        done, out, err = self.start_tail("p1", "--user-id", "ops", "--token", "")
        self.assertEqual(await done, 1)
        self.assertEqual(out.getvalue(), "")
        message = err.getvalue()
        self.assertTrue(message.startswith("happyrobot: the server refused to join p1: "), message)
        self.assertEqual(message.count("\n"), 1)

    async def test_server_closing_fails(self) -> None:
        """The server closing the connection (here 1001, shutting down) ends tail with 1."""
        self.start_server()
        done, out, err = self.start_tail("p1")
        await out.next_json()
        drained = DrainService(self.factory, timeout=10).stopService()
        self.assertEqual(await done, 1)
        await drained
        self.assertIn("closed the connection (1001", err.getvalue())

    async def test_unreachable(self) -> None:
        """A server that is not there ends tail with 1 and one line."""
        self.start_server()
        self.port_number = free_port()
        done, _, err = self.start_tail("p1")
        self.assertEqual(await done, 1)
        self.assertIn("cannot connect to ws://127.0.0.1:", err.getvalue())


class PublishTests(ServerTestCase):
    """``publish`` against a real server."""

    async def publish(self, *argv: str) -> tuple[int, str, str]:
        """Run ``publish`` in-process; its exit code, stdout and stderr."""
        args = cli.parse_args(["publish", *argv, "--url", self.url("")], environ={})
        out, err = io.StringIO(), io.StringIO()
        code = await cli.run(reactor, args, out, err)
        return code, out.getvalue(), err.getvalue()

    async def test_publish_reaches_the_room(self) -> None:
        """publish posts the event, every member receives it, and the reply is printed."""
        self.start_server()
        member = await self.joined("p1", "user_a")
        code, out, err = await self.publish(
            "p1", "TASK_CREATE", '{"id": "t9"}', "--user-id", "user_b", "--operation-id", "op-9")
        self.assertEqual((code, err), (0, ""))
        reply = json.loads(out)
        self.assertEqual((reply["success"], reply["projectId"], reply["clientCount"]),
                         (True, "p1", 1))
        event = await member.next_of("TASK_CREATE")
        self.assertEqual((event["payload"], event["userId"], event["operationId"]),
                         ({"id": "t9"}, "user_b", "op-9"))

    async def test_api_token(self) -> None:
        """With API_TOKEN set, the right token is accepted and a wrong one fails with 1."""
        self.start_server(api_token="s3cret")
        code, out, _ = await self.publish("p1", "T", "{}", "--api-token", "s3cret")
        self.assertEqual(code, 0)
        code, out, err = await self.publish("p1", "T", "{}", "--api-token", "wrong")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("answered 401: Missing or invalid API token", err)
        self.assertEqual(err.count("\n"), 1)

    async def test_unreachable(self) -> None:
        """A server that is not there fails with 1 and one line."""
        self.start_server()
        self.port_number = free_port()
        code, out, err = await self.publish("p1", "T", "{}")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("cannot reach http://127.0.0.1:", err)


class CommandLineTests(ServerTestCase):
    """``python -m happyrobot`` as a separate process."""

    timeout = 30

    async def run_cli(self, *argv: str) -> tuple[int, str, str]:
        """Run the module in a subprocess; its exit code, stdout and stderr."""
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": REPO_ROOT}
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "happyrobot", *argv], env=env, path=REPO_ROOT)
        return code, out.decode(), err.decode()

    async def test_publish_subprocess(self) -> None:
        """``python -m happyrobot publish`` prints the reply and exits with 0."""
        self.start_server()
        member = await self.joined("p1", "user_a")
        code, out, err = await self.run_cli(
            "publish", "p1", "TASK_UPDATE", '{"id": "t1"}', "--url", self.url(""))
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(json.loads(out)["clientCount"], 1)
        event = await member.next_of("TASK_UPDATE")
        self.assertEqual(event["payload"], {"id": "t1"})

    async def test_tail_sigint_closes_1000(self) -> None:
        """
        Ctrl-C (SIGINT) on ``python -m happyrobot tail`` closes the WebSocket
        with 1000 before the process exits with 0: the server counts a
        normal close, not a lost connection (1006).
        """
        self.start_server()
        proc = LineCollector()
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": REPO_ROOT}
        argv = [sys.executable, "-m", "happyrobot", "tail", "p1",
                "--url", f"ws://127.0.0.1:{self.port_number}/ws"]
        transport = reactor.spawnProcess(proc, sys.executable, argv, env=env, path=REPO_ROOT)
        self.addCleanup(lambda: transport.signalProcess("KILL") if transport.pid else None)
        await proc.wait_for(b'"USER_PRESENCE"')
        transport.signalProcess("INT")
        self.assertEqual(await proc.ended, 0, proc.output)
        await self.factory.when_empty()
        closes = {code: self.factory.metrics.registry.get_sample_value(
            "happyrobot_closes_total", {"code": code}) for code in ("1000", "1006")}
        self.assertEqual(closes, {"1000": 1.0, "1006": None})
        self.assertNotIn(b"happyrobot:", proc.output)  # no error line

    async def test_usage_error_subprocess(self) -> None:
        """A usage error exits with 2 and says why on stderr."""
        self.start_server()
        code, out, err = await self.run_cli("publish", "p1", "T", "not json")
        self.assertEqual((code, out), (2, ""))
        self.assertTrue(err.startswith("usage: happyrobot publish [-h]"), err)
        self.assertIn("happyrobot publish: error: argument json: the payload is not JSON", err)
