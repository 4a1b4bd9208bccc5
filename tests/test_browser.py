"""
The browser client (``/client.js``) in a real browser: headless Chromium,
driven by playwright-core from ``tests/browser/driver.mjs``, against the
server as a ``twistd`` process that is stopped (SIGTERM) and started again
on the same port in the middle of the test.

The test installs what it needs when it is missing: the Debian package
``chromium`` (with apt-get, as root) and playwright-core (``npm ci`` in
``tests/browser``).  When that is impossible it fails, naming what to
install; it never skips.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, race
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProcessTransport
from twisted.internet.protocol import Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import File

from tests.helpers import REPO_ROOT, LineCollector, spawn_twistd

BROWSER_DIR = os.path.join(REPO_ROOT, "tests", "browser")
CHROMIUM = "/usr/bin/chromium"
PLAYWRIGHT = os.path.join(BROWSER_DIR, "node_modules", "playwright-core", "package.json")
PROJECT = "p-browser"



def driver_result(test: Any, driver: Any) -> dict[str, Any]:
    """A finished driver's ``RESULT <json>`` line, failing the test if it is missing or not ok."""
    text = driver.output.decode("utf-8", "replace")
    found = re.search(r"^RESULT (.*)$", text, re.MULTILINE)
    if found is None:
        test.fail("the driver printed no RESULT line. Output:\n" + text[-4000:])
    result: dict[str, Any] = json.loads(found.group(1))
    if not result["ok"]:
        test.fail(f"the driver failed: {result.get('error')}\nOutput:\n{text[-4000:]}")
    return result

class _TrackingFactory(WrappingFactory):
    """
    Wraps the test page's site and remembers its connections, so that
    cleanup can close the keep-alive connections a browser leaves behind
    (trial fails a test that leaves sockets open).
    """

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self._idle: list[Deferred[None]] = []

    def unregisterProtocol(self, p: Protocol) -> None:
        """A connection ended; wake whoever waits for the last one."""
        super().unregisterProtocol(p)
        if not self.protocols:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    async def close_all(self) -> None:
        """Abort every open connection and wait until all are gone."""
        if not self.protocols:
            return
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        for p in list(self.protocols):
            p.transport.abortConnection()  # type: ignore[attr-defined]
        await d


def _env() -> dict[str, str]:
    """A small environment for the commands the test runs (apt-get, npm, node)."""
    return {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "DEBIAN_FRONTEND": "noninteractive",
    }


async def _run(argv: list[str], path: str = "/") -> tuple[int, str]:
    """Run a command to its end; its exit code and combined output."""
    out, err, code = await getProcessOutputAndValue(argv[0], argv[1:], env=_env(), path=path)
    return code, (out + err).decode("utf-8", "replace")


async def ensure_node(test: TestCase) -> tuple[str, str]:
    """
    The paths of node and npm, installed with apt-get when missing (as
    root); fails C{test} when they cannot be had.
    """
    apt = shutil.which("apt-get")
    if not (shutil.which("node") and shutil.which("npm")):
        if os.geteuid() != 0 or apt is None:
            test.fail("node and npm are missing and cannot be installed here (needs root "
                      "and apt-get): install the Debian packages nodejs and npm")
        code, output = await _run([apt, "install", "-y", "-qq", "nodejs", "npm"])
        if code != 0:
            test.fail(f"could not install nodejs and npm (exit {code}):\n{output[-2000:]}")
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        test.fail("node and npm are still missing after apt-get install nodejs npm")
    return node, npm


async def _until_line(proc: LineCollector, needle: bytes, what: str) -> bytes:
    """C{proc}'s output once it contains C{needle}; an error if C{proc} ends first."""
    ended: Deferred[Any] = Deferred()

    def relay(result: Any) -> Any:
        if not ended.called:
            ended.callback(None)
        return result

    proc.ended.addBoth(relay)
    index, output = await race([proc.wait_for(needle), ended])
    if index != 0:
        tail = proc.output.decode("utf-8", "replace")[-4000:]
        raise AssertionError(f"{what}: the process ended first. Output:\n{tail}")
    return output  # type: ignore[no-any-return]


class BrowserClientTests(TestCase):
    """Two Chromium pages in one project, across a server restart."""

    # Generous, because a first run may install Chromium and playwright-core;
    # the test itself takes a few seconds.
    timeout = 600

    async def _ensure_chromium(self) -> None:
        """Install the Debian package chromium if it is missing, or fail saying how."""
        if os.path.exists(CHROMIUM):
            return
        apt = shutil.which("apt-get")
        if os.geteuid() != 0 or apt is None:
            self.fail(f"{CHROMIUM} is missing and cannot be installed here (needs root and "
                      "apt-get): install the Debian package chromium")
        for argv in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "chromium"]):
            code, output = await _run(argv)
            if code != 0:
                self.fail(f"could not install chromium: {' '.join(argv)} exited with {code}:\n"
                          + output[-2000:])
        if not os.path.exists(CHROMIUM):
            self.fail(f"apt-get installed chromium but {CHROMIUM} does not exist")

    async def _ensure_playwright(self) -> str:
        """The path of node, after installing playwright-core if it is missing."""
        node, npm = await ensure_node(self)
        if not os.path.exists(PLAYWRIGHT):
            argv = [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"]
            code, output = await _run(argv, BROWSER_DIR)
            if code != 0 or not os.path.exists(PLAYWRIGHT):
                self.fail(f"could not install playwright-core with npm ci in {BROWSER_DIR} "
                          f"(exit {code}):\n{output[-2000:]}")
        return node

    async def _serve_page(self) -> int:
        """Serve tests/browser/page.html on a free loopback port; the port."""
        root = Resource()
        root.putChild(b"page.html", File(os.path.join(BROWSER_DIR, "page.html")))
        factory = _TrackingFactory(Site(root))
        port: IListeningPort = await serverFromString(
            reactor, "tcp:0:interface=127.0.0.1"
        ).listen(factory)
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.close_all)
        return port.getHost().port  # type: ignore[attr-defined,no-any-return]

    def _twistd(self, port: str, origin: str) -> tuple[LineCollector, IProcessTransport]:
        """Start the server process; cleanup stops it if the test did not."""
        proc, transport = spawn_twistd([
            "--port", port, "--env-file=", "--allowed-origins", origin,
            "--presence-window-ms", "0",
        ])

        async def stop() -> None:
            if not proc.ended.called:
                transport.signalProcess("KILL")
                await proc.ended

        self.addCleanup(stop)
        return proc, transport

    async def test_two_pages_exchange_events_across_a_restart(self) -> None:
        """
        Two pages exchange events; the server is stopped and started again
        while page A keeps sending; each page ends with all of the other's
        events, in order, none twice, those sent offline included.
        """
        await self._ensure_chromium()
        node = await self._ensure_playwright()
        page_port = await self._serve_page()
        origin = f"http://127.0.0.1:{page_port}"

        first, first_transport = self._twistd("tcp:0:interface=127.0.0.1", origin)
        output = await _until_line(first, b"starting on ", "the server")
        match = re.search(rb"starting on (\d+)", output)
        assert match is not None
        port = int(match.group(1))

        config = {
            "page": f"{origin}/page.html",
            "server": f"http://127.0.0.1:{port}",
            "ws": f"ws://127.0.0.1:{port}/ws",
            "project": PROJECT,
        }
        driver = LineCollector()
        driver_transport = reactor.spawnProcess(
            driver, node, [node, "driver.mjs", json.dumps(config)], env=_env(), path=BROWSER_DIR
        )

        async def stop_driver() -> None:
            if not driver.ended.called:
                driver_transport.signalProcess("KILL")
                await driver.ended

        self.addCleanup(stop_driver)

        await _until_line(driver, b'{"need":"stop"}', "the driver")
        first_transport.signalProcess("TERM")
        await first.ended
        self.assertIn(b"shutting down: closing 2 connections", first.output)
        driver_transport.write(b"stop-done\n")

        await _until_line(driver, b'{"need":"start"}', "the driver")
        second, _ = self._twistd(f"tcp:{port}:interface=127.0.0.1", origin)
        await _until_line(second, b"starting on ", "the restarted server")
        driver_transport.write(b"start-done\n")

        await driver.ended
        result = driver_result(self, driver)

        a, b = result["A"], result["B"]
        self.assertTrue(result["createClientIsExported"])
        # Every event of each page reached the other once, in the order sent.
        self.assertEqual(b["received"], a["sent"])
        self.assertEqual(a["received"], b["sent"])
        self.assertEqual(len(b["sent"]), 8)
        # Some of A's events were sent while the server was down, queued,
        # and delivered after the restart.
        self.assertGreaterEqual(result["queuedAtReconnect"], 5)
        self.assertGreater(len(a["sent"]), 5 + result["queuedAtReconnect"])
        for page in (a, b):
            self.assertEqual(page["sentOk"], page["sent"])
            self.assertEqual((page["sendErrors"], page["dropped"], page["errors"]), ([], [], []))
            self.assertEqual(page["disconnects"][0], 1001)
            self.assertEqual(page["states"][:3], ["connecting", "open", "reconnecting"])
            self.assertEqual((page["states"][-1], page["finalState"]), ("open", "open"))
            self.assertIn(PROJECT, page["rejoins"])
        self.assertNotIn(b"Traceback", first.output + second.output)
