"""
Tests for the txredisapi seam and the Lua scripts as package data, as plain
code (the real-Redis tests in test_redis prove they work against Redis).
"""

from __future__ import annotations

import hashlib
import importlib.metadata

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from happyrobot.redis import scripts
from happyrobot.redis.client import TxredisapiChanged, check
from happyrobot.tap import Options, makeService


class CheckTests(SynchronousTestCase):
    """The start-up check of what happyrobot uses of txredisapi."""

    def test_installed_version_passes(self) -> None:
        """The txredisapi installed here has everything the client relies on."""
        check()

    def _without(self, owner: object, name: str) -> None:
        value = getattr(owner, name)
        delattr(owner, name)
        self.addCleanup(setattr, owner, name, value)

    def test_missing_attribute_named_in_one_line(self) -> None:
        """An upgrade that removed something we use stops the start with one line naming it."""
        import txredisapi

        self._without(txredisapi.SubscriberProtocol, "subscribe")
        e = self.assertRaises(TxredisapiChanged, check)
        message = str(e)
        self.assertNotIn("\n", message)
        self.assertIn(f"txredisapi {importlib.metadata.version('txredisapi')}", message)
        self.assertIn("SubscriberProtocol.subscribe", message)

    def test_missing_ready_flag(self) -> None:
        """A protocol without the _ready flag (set in its constructor) is refused too."""
        import txredisapi

        original = txredisapi.RedisProtocol.__init__

        def init(proto: object, *args: object, **kwargs: object) -> None:
            original(proto, *args, **kwargs)  # type: ignore[arg-type]
            del proto._ready  # type: ignore[attr-defined]

        self.patch(txredisapi.RedisProtocol, "__init__", init)
        e = self.assertRaises(TxredisapiChanged, check)
        self.assertIn("RedisProtocol()._ready", str(e))

    def test_make_service_stops_with_one_line(self) -> None:
        """With REDIS_URL and such a txredisapi, the server stops before it starts, in one line."""
        import txredisapi

        self._without(txredisapi.RedisProtocol, "ping")
        options = Options(environ={"REDIS_URL": "redis://127.0.0.1:1/0"})
        options.parseOptions(["--env-file="])
        e = self.assertRaises(SystemExit, makeService, options, MemoryReactorClock())
        self.assertRegex(str(e), r"^happyrobot-ws: txredisapi \S+ lacks RedisProtocol\.ping; "
                                 r"happyrobot needs txredisapi[^\n]*$")


class ScriptTests(SynchronousTestCase):
    """The Lua scripts, loaded from package data."""

    def test_four_scripts_with_their_sha1(self) -> None:
        """Each script carries the SHA1 of its source, the one EVALSHA names."""
        self.assertEqual([s.name for s in scripts.ALL],
                         ["append.lua", "batch.lua", "read.lua", "reap.lua"])
        for script in scripts.ALL:
            self.assertEqual(script.sha, hashlib.sha1(script.source).hexdigest().encode())

    def test_common_part_in_front(self) -> None:
        """The shared functions come first in the scripts that use them, not in the reaper."""
        for script in (scripts.APPEND, scripts.BATCH, scripts.READ):
            self.assertTrue(script.source.startswith(b"\nlocal function now_ms()"), script)
            # Appending publishes; reading does not.
            self.assertEqual(b"'PUBLISH'" in script.source, script is not scripts.READ, script)
        self.assertNotIn(b"now_ms", scripts.REAP.source)
