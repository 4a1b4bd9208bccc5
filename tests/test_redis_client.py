"""
Tests for the txredisapi seam and the Lua scripts as package data, as plain
code (the real-Redis tests in test_redis prove they work against Redis).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from happyrobot.redis import scripts
from happyrobot.redis.client import (
    TxredisapiChanged,
    check,
    protocol_classes,
)
from happyrobot.tap import Options, makeService


class CheckTests(SynchronousTestCase):
    """The start-up check of what happyrobot uses of txredisapi."""

    def test_installed_version_passes(self) -> None:
        """The txredisapi installed here has everything the client relies on."""
        check()

    def _without(self, cls: type, name: str) -> None:
        # Removed where it is defined: txredisapi's RedisProtocol is
        # HiredisProtocol, which inherits ping and the rest.
        owner = next(c for c in cls.__mro__ if name in vars(c))
        value = vars(owner)[name]
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


class ReplyParserTests(SynchronousTestCase):
    """The subscriber connection's replies, parsed by hiredis through txredisapi."""

    STREAM = (
        b"*3\r\n$9\r\nsubscribe\r\n$2\r\nc1\r\n:1\r\n"
        b"*3\r\n$7\r\nmessage\r\n$2\r\nc1\r\n$6\r\na\r\nb\nc\r\n"
        b"+OK\r\n-NOSCRIPT No matching script\r\n$-1\r\n*-1\r\n*0\r\n"
        b"*2\r\n*1\r\n:7\r\n$0\r\n\r\n"
        b"*3\r\n$7\r\nmessage\r\n$2\r\nc1\r\n$1\r\nz\r\n"
    )
    EXPECTED = [
        [b"subscribe", b"c1", 1], [b"message", b"c1", b"a\r\nb\nc"], b"OK",
        "NOSCRIPT No matching script", None, None, [], [[7], b""], [b"message", b"c1", b"z"],
    ]

    def _subscriber(self) -> tuple[Any, list[Any], list[Any]]:
        replies: list[Any] = []
        messages: list[Any] = []
        proto = protocol_classes()[1](charset=None, convertNumbers=False)
        proto.replyQueue.put = replies.append  # what txredisapi's commands wait on
        proto.factory = type("F", (), {
            "message": lambda self, c, m: messages.append((c, m)),
            "read_done": lambda self: messages.append("read done"),
        })()
        return proto, replies, messages

    def _plain(self, replies: list[Any]) -> list[Any]:
        return [str(r) if isinstance(r, Exception) else r for r in replies]

    def test_split_anywhere(self) -> None:
        """Replies split across reads at any byte come out whole, once, in order."""
        for cut in range(1, len(self.STREAM)):
            proto, replies, messages = self._subscriber()
            proto.dataReceived(self.STREAM[:cut])
            proto.dataReceived(self.STREAM[cut:])
            messages = [m for m in messages if m != "read done"]
            self.assertEqual(messages, [(b"c1", b"a\r\nb\nc"), (b"c1", b"z")], cut)
            # Not the subscribe confirmation: txredisapi drops it when no SUBSCRIBE waits.
            self.assertEqual(self._plain(replies), self.EXPECTED[2:8], cut)

    def test_one_read_handled_in_one_call(self) -> None:
        """
        Every message of a read is delivered before dataReceived returns
        (txredisapi's pure-Python parser puts the rest of the read off to a
        later reactor turn after each bulk string, so a burst of events
        would be written to the members one send() per event).
        """
        proto, _, messages = self._subscriber()
        burst = b"".join(
            b"*3\r\n$7\r\nmessage\r\n$2\r\nc1\r\n$%d\r\n%s\r\n" % (len(b), b)
            for b in (b"e%d" % i for i in range(32))
        )
        proto.dataReceived(burst)
        # ...and then the bus hears that the read is done (its deliveries are written).
        self.assertEqual(messages[-1], "read done")
        self.assertEqual([m for _, m in messages[:-1]], [b"e%d" % i for i in range(32)])

    def test_garbage_drops_the_connection(self) -> None:
        """Bytes that are not RESP raise out of dataReceived: Twisted drops the connection."""
        import txredisapi

        proto, _, messages = self._subscriber()
        self.assertRaises(txredisapi.InvalidData, proto.dataReceived, b"?what\r\n")
        self.assertEqual(messages, [])

    def test_without_hiredis_one_line(self) -> None:
        """A txredisapi without hiredis (its slow parser) stops start-up with one line."""
        import txredisapi

        self.patch(txredisapi, "RedisProtocol", txredisapi.BaseRedisProtocol)
        e = self.assertRaises(TxredisapiChanged, check)
        self.assertIn("HiredisProtocol as its RedisProtocol (is the hiredis package installed?)",
                      str(e))
        self.assertNotIn("\n", str(e))


class BackoffTests(SynchronousTestCase):
    """The wait between reconnection attempts."""

    def test_doubles_up_to_the_longest(self) -> None:
        """It doubles from the first delay and stops at the longest, each spread by 20 %."""
        from happyrobot.redis.bus import backoff

        for attempt, base in ((1, 0.5), (2, 1.0), (3, 2.0), (6, 10.0), (100, 10.0)):
            delays = [backoff(0.5, 10.0, attempt) for _ in range(50)]
            self.assertTrue(all(0.8 * base <= d <= 1.2 * base for d in delays), (attempt, delays))
        self.assertGreater(len({backoff(0.5, 10.0, 1) for _ in range(20)}), 1)
