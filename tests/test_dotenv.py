"""
``.env`` files as the server reads them (python-dotenv, then our
precedence rules): the values Node's dotenv reads and our hand-written
parser did not (a PEM key spanning lines, escaped quotes), the error lines
of a file that cannot be read, and env.example copied to ``.env`` in a real
``twistd -n happyrobot-ws`` process.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
from typing import Any

import jwt
from autobahn.twisted.websocket import WebSocketClientFactory
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from happyrobot import auth
from happyrobot.tap import Options, makeService
from tests.helpers import ORIGIN, REPO_ROOT, Client, LineCollector, ServerTestCase

#: One RSA key pair for the whole module (generating one takes a moment).
_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
#: Its public half as PEM text: five lines between BEGIN and END.
_PEM = _KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
).decode("ascii")


def _token(sub: str) -> str:
    """An RS256 session token for C{sub}, valid for an hour, signed by L{_KEY}."""
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, _KEY, algorithm="RS256")


def _quoted_pem() -> str:
    """A JWT_PUBLIC_KEY line as people write it: the PEM in double quotes, spanning lines."""
    assert _PEM.count("\n") > 3
    return f'JWT_PUBLIC_KEY="{_PEM.strip()}"\n'


class EnvFileTests(SynchronousTestCase):
    """Options.config reads the --env-file with python-dotenv."""

    def options(self, content: bytes, environ: dict[str, str] | None = None) -> Options:
        """Options reading a new env file holding C{content}."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        o = Options(environ=environ or {})
        o.parseOptions(["--env-file", path])
        return o

    def test_pem_key_spanning_lines(self) -> None:
        """
        A PEM public key written as a multi-line double-quoted value is read
        whole (the lines after it too), and start-up builds a verifier that
        accepts tokens signed by its private key.
        """
        o = self.options(f"API_TOKEN=t\n{_quoted_pem()}PORT=4600\n".encode())
        config = o.config()
        self.assertEqual(config.jwt_public_key, _PEM.strip())
        self.assertEqual((config.port, config.api_token), ("tcp:4600", "t"))
        service = makeService(o, MemoryReactorClock())
        verifier = service.factory.verifier  # type: ignore[attr-defined]
        self.assertIsInstance(verifier, auth.TokenVerifier)
        identity = self.successResultOf(verifier.verify(_token("user_a"), time.time()))
        self.assertEqual(identity.user_id, "user_a")

    def test_escaped_quotes(self) -> None:
        r"""A="x \"y\" z" reads as x "y" z, not as x \."""
        config = self.options(b'API_TOKEN="x \\"y\\" z"\nLOG_LEVEL=debug\n').config()
        self.assertEqual((config.api_token, config.log_level), ('x "y" z', "debug"))

    def test_precedence_kept(self) -> None:
        """Flag, then environment, then the file, then the default; an empty value is unset."""
        o = self.options(b"PORT=4700\nLOG_LEVEL=debug\nNODE_ENV=test\nPING_TIMEOUT=3\n"
                         b"HANDSHAKE_TIMEOUT=\nPING_INTERVAL\n",
                         {"LOG_LEVEL": "error", "NODE_ENV": "production", "PING_TIMEOUT": ""})
        o["node-env"] = "development"
        config = o.config()
        self.assertEqual(
            (config.port, config.log_level, config.node_env, config.ping_timeout_seconds,
             config.handshake_timeout_seconds, config.ping_interval_seconds),
            ("tcp:4700", "error", "development", 10.0, 10.0, 30.0),
        )

    def test_unparseable_statement_logged(self) -> None:
        """
        A statement python-dotenv cannot parse is skipped with one warning in
        the server's log naming the file and the line; the rest is read.
        """
        o = self.options(b"PORT=4800\nAPI_TOKEN=\"q\" junk\nLOG_LEVEL=debug\n")
        with capturedLogs() as captured:
            config = o.config()
        self.assertEqual((config.port, config.api_token, config.log_level),
                         ("tcp:4800", "", "debug"))
        warnings = [e for e in captured if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1, captured)
        self.assertEqual(
            formatEvent(warnings[0]).replace("Python-dotenv", "python-dotenv"),
            f"--env-file {o['env-file']}: python-dotenv could not parse statement starting "
            "at line 2; that statement is skipped",
        )
        self.assertEqual(warnings[0]["log_namespace"], "happyrobot.tap")

    def test_not_utf8_one_line(self) -> None:
        """A file that is not UTF-8 stops start-up with one line naming the file."""
        o = self.options(b"PORT=3002\nAPI_TOKEN=caf\xe9\n")
        e = self.assertRaises(SystemExit, makeService, o, MemoryReactorClock())
        self.assertEqual(
            str(e.code),
            f"happyrobot-ws: --env-file {o['env-file']}: 'utf-8' codec can't decode byte 0xe9 "
            "in position 23: invalid continuation byte",
        )

    def test_directory_one_line(self) -> None:
        """An --env-file that names a directory stops start-up with one line."""
        path = self.mktemp()
        os.makedirs(path)
        o = Options(environ={})
        o.parseOptions(["--env-file", path])
        e = self.assertRaises(SystemExit, makeService, o, MemoryReactorClock())
        self.assertEqual(str(e.code), f"happyrobot-ws: --env-file {path}: Is a directory")

    def test_default_env_file_read_from_working_directory(self) -> None:
        """Without --env-file, .env in the working directory is read."""
        folder = self.mktemp()
        os.makedirs(folder)
        with open(os.path.join(folder, ".env"), "w", encoding="utf-8") as f:
            f.write(_quoted_pem())
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(folder)
        self.assertEqual(Options(environ={}).config().jwt_public_key, _PEM.strip())


def _edit_env_file(path: str, changes: dict[str, str]) -> None:
    """Replace the line of each variable of C{changes} in the file C{path} by C{changes[variable]}."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for env, line in changes.items():
        text, count = re.subn(rf"^{env}=.*\n", lambda _: line, text, flags=re.M)
        assert count == 1, env
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


class EnvExampleProcessTests(ServerTestCase):
    """``cp env.example .env``, a few settings changed, and a real twistd."""

    timeout = 30

    def spawn_in(self, folder: str) -> tuple[LineCollector, Any]:
        """``twistd -n happyrobot-ws`` with no flags, started in C{folder}; killed in cleanup."""
        proc = LineCollector()
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": REPO_ROOT,
               "HOME": os.environ.get("HOME", folder)}
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "happyrobot-ws"]
        transport = reactor.spawnProcess(proc, sys.executable, argv, env=env, path=folder)
        self.addCleanup(lambda: transport.signalProcess("KILL") if transport.pid else None)
        return proc, transport

    async def test_env_example_with_changes_starts(self) -> None:
        """
        With env.example copied to .env and SHUTDOWN_TIMEOUT=4, HISTORY_TOTAL_BYTES,
        API_TOKEN and a multi-line JWT_PUBLIC_KEY changed, the server starts, answers
        /health, takes the token and the key from the file, and drains over the
        fitted 2 s on SIGTERM.
        """
        folder = self.mktemp()
        os.makedirs(folder)
        shutil.copy(os.path.join(REPO_ROOT, "env.example"), os.path.join(folder, ".env"))
        _edit_env_file(os.path.join(folder, ".env"), {
            "PORT": "PORT=tcp:0:interface=127.0.0.1\n",
            "SHUTDOWN_TIMEOUT": "SHUTDOWN_TIMEOUT=4\n",
            "HISTORY_TOTAL_BYTES": "HISTORY_TOTAL_BYTES=65536\n",
            "API_TOKEN": "API_TOKEN=from-the-env-file\n",
            "JWT_PUBLIC_KEY": _quoted_pem(),
        })
        proc, transport = self.spawn_in(folder)
        started = proc.wait_for(b"starting on ")

        def ended_early(code: int | None) -> int | None:
            if not started.called:
                started.errback(self.failureException(
                    f"twistd exited ({code}) before listening:\n{proc.output.decode()}"))
            return code

        ended = proc.ended.addCallback(ended_early)
        output = await started
        match = re.search(rb"starting on (\d+)", output)
        assert match is not None
        self.port_number = int(match.group(1))

        code, body, _ = await self.http("GET", "/health")
        self.assertEqual((code, body["status"]), (200, "healthy"))
        code, _, _ = await self.http("GET", "/stats")
        self.assertEqual(code, 401)
        code, _, _ = await self.http("GET", "/stats",
                                     headers={"authorization": "Bearer from-the-env-file"})
        self.assertEqual(code, 200)

        # The key from the file verifies a session token signed with its private key.
        factory = WebSocketClientFactory(
            f"ws://127.0.0.1:{self.port_number}/ws?token={_token('user_a')}", origin=ORIGIN
        )
        factory.protocol = Client
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port_number)
        client: Client = await endpoint.connect(factory)
        await client.opened
        self.assertEqual((await client.next())["type"], "CONNECTION_ESTABLISHED")

        transport.signalProcess("TERM")
        self.assertEqual(await client.closed, 1001)
        await ended
        self.assertEqual(proc.signal, signal.SIGTERM)
        self.assertRegex(proc.output.decode(), r"closing 1 connections over 2(\.0)? s")
        self.assertNotIn(b"Traceback", proc.output)
        self.assertNotIn(b"could not parse", proc.output)

