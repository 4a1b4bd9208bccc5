"""
End-to-end: ``twistd --pidfile=… --logfile=… happyrobot-ws`` daemonized (no
``-n``, as legacy Twisted hosts run it).  twistd's parent process waits for
the daemon to say that it started; a failed start must end it with status
1 and one line naming the cause, and leave no pid file, as ``twistd -n``
does; a start that succeeds ends it with 0.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from tests.helpers import REPO_ROOT, LineCollector, free_port

#: How long the daemon's parent may take to exit before the test kills it
#: (and fails): start-up takes well under a second.
PARENT_EXIT_SECONDS = 15.0


class _Collector(LineCollector):
    """A L{LineCollector} that also tells when the process itself has exited."""

    def __init__(self) -> None:
        super().__init__()
        #: Fires with the exit code when the process exits (its pipes may stay open).
        self.exited: Deferred[int | None] = Deferred()

    def processExited(self, reason: Any) -> None:
        self.exited.callback(getattr(reason.value, "exitCode", None))


class Daemon:
    """
    A daemonizing ``twistd happyrobot-ws`` started in a temporary run
    directory, with its pid file and log file there.

    Besides its stdout and stderr, the process gets a pipe on descriptor 3,
    which twistd's daemonizing forks keep open (they replace 0-2 only): the
    collector's C{ended} fires once the parent has exited I{and} the daemon
    has closed it, by exiting.  It fires with the parent's exit status.
    """

    def __init__(self, test: TestCase, args: list[str], env: dict[str, str]) -> None:
        self.rundir = os.path.abspath(test.mktemp())
        os.makedirs(self.rundir)
        self.pidfile = os.path.join(self.rundir, "twistd.pid")
        self.logfile = os.path.join(self.rundir, "twistd.log")
        self.proc = _Collector()
        child_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": REPO_ROOT,
                     "HOME": os.environ.get("HOME", "/tmp"), **env}
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                f"--pidfile={self.pidfile}", f"--logfile={self.logfile}",
                "happyrobot-ws", "--env-file=", *args]
        self.transport = reactor.spawnProcess(
            self.proc, sys.executable, argv, env=child_env, path=self.rundir,
            childFDs={0: "w", 1: "r", 2: "r", 3: "r"},
        )
        test.addCleanup(self.kill)

    def kill(self) -> None:
        """SIGKILL the parent and the daemon its pid file names, if still there."""
        if self.transport.pid:
            self.transport.signalProcess("KILL")
        try:
            with open(self.pidfile) as f:
                os.kill(int(f.read()), signal.SIGKILL)
        except (OSError, ValueError):
            pass

    async def ended(self) -> tuple[int | None, bool]:
        """
        The parent's exit status once it and the daemon are gone, and
        whether that took longer than L{PARENT_EXIT_SECONDS} (then both
        were killed).
        """
        timer = reactor.callLater(PARENT_EXIT_SECONDS, self.kill)
        code = await self.proc.ended
        timed_out = not timer.active()
        if not timed_out:
            timer.cancel()
        return code, timed_out

    def log(self) -> str:
        """The log file's text (empty when the daemon did not get to open it)."""
        try:
            with open(self.logfile, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return ""


class DaemonStartFailureTests(TestCase):
    """A daemonized start that fails, fails: status 1, one line, no pid file."""

    timeout = PARENT_EXIT_SECONDS + 15

    def take_port(self) -> int:
        """A port on 127.0.0.1 this test listens on until its cleanup."""
        taken = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        return int(taken.getHost().port)

    def assert_failed(self, daemon: Daemon, code: int | None, timed_out: bool) -> None:
        self.assertFalse(timed_out, f"twistd's parent was still running after "
                                    f"{PARENT_EXIT_SECONDS} s: {daemon.proc.output!r}")
        self.assertEqual(code, 1, daemon.proc.output)
        self.assertFalse(os.path.exists(daemon.pidfile), "the pid file was left behind")
        self.assertNotIn("Traceback", daemon.log())
        self.assertNotIn(b"Traceback", daemon.proc.output)

    async def test_port_in_use(self) -> None:
        """
        A port already taken: the parent prints the error naming PORT and
        exits with 1; the log has the same one line.
        """
        port = self.take_port()
        daemon = Daemon(self, ["--port", f"tcp:{port}:interface=127.0.0.1"], {})
        code, timed_out = await daemon.ended()
        self.assert_failed(daemon, code, timed_out)
        why = f"happyrobot-ws: PORT: 127.0.0.1:{port}: Address already in use"
        self.assertIn(f"StartupError: {why}'".encode(), daemon.proc.output)  # whole
        self.assert_logged(daemon, why)

    def assert_logged(self, daemon: Daemon, why: str) -> None:
        """The log file has C{why} as one line, once."""
        errors = [line for line in daemon.log().splitlines() if "happyrobot-ws: " in line]
        self.assertEqual(len(errors), 1, daemon.log())
        self.assertTrue(errors[0].endswith(why), errors[0])

    async def test_workers_port_in_use(self) -> None:
        """The same with WORKERS above 1, whose port is a service of its own."""
        port = self.take_port()
        daemon = Daemon(self, ["--port", f"tcp:{port}:interface=127.0.0.1"],
                        {"WORKERS": "2", "REDIS_URL": "redis://127.0.0.1:1/0"})
        code, timed_out = await daemon.ended()
        self.assert_failed(daemon, code, timed_out)
        why = f"happyrobot-ws: PORT: 127.0.0.1:{port}: Address already in use"
        self.assertIn(f"StartupError: {why}'".encode(), daemon.proc.output)  # whole
        self.assert_logged(daemon, why)

    async def test_bad_setting(self) -> None:
        """A bad setting stops twistd before it daemonizes: one line on stderr."""
        daemon = Daemon(self, [], {"PORT": "abc"})
        code, timed_out = await daemon.ended()
        self.assert_failed(daemon, code, timed_out)
        lines = daemon.proc.output.decode().splitlines()
        self.assertEqual(lines, ["happyrobot-ws: PORT must be a number or an endpoint "
                                 "description, got 'abc'"])


class DaemonStartTests(TestCase):
    """A daemonized start that succeeds: the parent exits with 0, the daemon serves."""

    timeout = PARENT_EXIT_SECONDS + 15

    async def test_serves_then_stops_on_sigterm(self) -> None:
        """The parent exits with 0; the daemon answers /health, and SIGTERM stops it."""
        port = free_port()
        daemon = Daemon(self, ["--port", f"tcp:{port}:interface=127.0.0.1"], {})
        timer = reactor.callLater(PARENT_EXIT_SECONDS, daemon.kill)
        self.assertEqual(await daemon.proc.exited, 0, daemon.proc.output)
        self.assertTrue(timer.active(), "twistd's parent was killed after waiting too long")
        timer.cancel()
        with open(daemon.pidfile) as f:
            pid = int(f.read())
        response = await treq.get(f"http://127.0.0.1:{port}/health", persistent=False)
        self.assertEqual(response.code, 200)
        await response.content()
        os.kill(pid, signal.SIGTERM)
        code, timed_out = await daemon.ended()  # the daemon has closed descriptor 3
        self.assertEqual((code, timed_out), (0, False))
        self.assertFalse(os.path.exists(daemon.pidfile))
        self.assertIn("Server Shut Down.", daemon.log())
