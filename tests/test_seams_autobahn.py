"""
Tests for L{happyrobot.seams.autobahn}: the start-up check of the Autobahn
attributes happyrobot relies on, and the helpers that use them.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from happyrobot.config import Config
from happyrobot.seams import Unsupported
from happyrobot.seams import autobahn as seam
from happyrobot.tap import build_factory


class CheckTests(SynchronousTestCase):
    def test_installed_autobahn_passes(self) -> None:
        """The installed Autobahn has every attribute the seam uses."""
        seam.check()
        seam.check(WebSocketServerProtocol)

    def test_missing_class_attribute(self) -> None:
        """A protocol class without one: one line naming the version and the attribute."""

        class Bare:
            STATE_OPEN = 3
            CONFIG_ATTRS = ()

        e = self.assertRaises(Unsupported, seam.check, Bare, "24.4.2")
        self.assertEqual(
            str(e),
            "autobahn 24.4.2 lacks Bare._dataReceived, which happyrobot relies on; "
            "install a version in pyproject.toml's range",
        )
        self.assertNotIn("\n", str(e))

    def test_missing_instance_attribute(self) -> None:
        """One Autobahn no longer sets on an open connection is found too."""

        class Older(WebSocketServerProtocol):
            def succeedHandshake(self, res: Any) -> None:
                super().succeedHandshake(res)
                del self.inside_message

        e = self.assertRaises(Unsupported, seam.check, Older, "99.0.0")
        self.assertIn("autobahn 99.0.0 lacks Older.inside_message,", str(e))

    def test_every_instance_attribute_looked_for(self) -> None:
        """Each instance attribute the seam names is set on a connection opened in memory."""
        opened = seam._open_in_memory(WebSocketServerProtocol)
        self.assertTrue(seam.idle(opened))
        self.assertEqual([a for a in seam.INSTANCE_ATTRIBUTES if not hasattr(opened, a)], [])


class HelperTests(SynchronousTestCase):
    def test_shorten_failure_reason(self) -> None:
        """A long failure reason is cut to the limit; a short one or None is kept."""
        proto: Any = WebSocketServerProtocol()
        proto.wasNotCleanReason = "x" * 500
        seam.shorten_failure_reason(proto, 160)
        self.assertEqual(proto.wasNotCleanReason, "x" * 160 + "...")
        proto.wasNotCleanReason = None
        seam.shorten_failure_reason(proto, 160)
        self.assertIsNone(proto.wasNotCleanReason)

    def test_bind_options(self) -> None:
        """The factory's options become class attributes; nothing is left to copy."""
        factory = WebSocketServerFactory()
        factory.setProtocolOptions(autoPingInterval=7, maxMessagePayloadSize=1234,
                                   perMessageCompressionAccept=lambda offers: None)
        bound: Any = seam.bind_options(factory, WebSocketServerProtocol)
        self.assertTrue(issubclass(bound, WebSocketServerProtocol))
        self.assertEqual((bound.autoPingInterval, bound.maxMessagePayloadSize), (7, 1234))
        self.assertEqual(bound.CONFIG_ATTRS, ())
        # A function option stays a plain function on instances, not a method.
        self.assertIsNone(bound().perMessageCompressionAccept([]))


class FactoryTests(SynchronousTestCase):
    def test_factory_runs_the_check(self) -> None:
        """Building the WebSocket factory runs the check: a missing attribute stops it."""

        def missing(*args: object) -> None:
            raise Unsupported("autobahn 0.0 lacks WebSocketServerProtocol.data, ...")

        self.patch(seam, "check", missing)
        e = self.assertRaises(Unsupported, build_factory, Config(), Clock())
        self.assertIn("autobahn 0.0 lacks", str(e))

    def test_start_up_stops_with_one_line(self) -> None:
        """A missing attribute stops makeService with the same one line as a bad setting."""
        from twisted.internet.testing import MemoryReactorClock

        from happyrobot.tap import Options, makeService

        def missing(*args: object) -> None:
            raise Unsupported("autobahn 0.0 lacks WebSocketServerProtocol.data, ...")

        self.patch(seam, "check", missing)
        options = Options(environ={})
        options.parseOptions(["--env-file="])
        e = self.assertRaises(SystemExit, makeService, options, MemoryReactorClock())
        self.assertEqual(str(e), "happyrobot-ws: autobahn 0.0 lacks WebSocketServerProtocol.data, ...")
