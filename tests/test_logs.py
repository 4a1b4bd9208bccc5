"""
Tests for L{happyrobot.logs.LineObserver}: the same lines as twistd's own
text observer, written once per reactor turn.
"""

from __future__ import annotations

import io

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEventAsClassicLogText, formatTime
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from happyrobot import logs
from happyrobot.logs import LineObserver


class _Out(io.StringIO):
    """A text file that counts its flushes."""

    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


class _Reactor(Clock):
    running = True


class LineObserverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.out = _Out()
        self.reactor = _Reactor()
        self.observer = LineObserver(self.out, self.reactor)
        self.log = Logger(namespace="happyrobot.ws", observer=self.observer)

    def test_same_lines_as_twistd(self) -> None:
        """Each line is what twistd's text observer writes for the event."""
        events: list[dict] = []
        log = Logger(namespace="happyrobot.ws",
                     observer=lambda e: (events.append(e), self.observer(e)))
        log.info("{client_id} connected", client_id="client_1_ab")
        log.warn("two\nlines")
        log.info("{n!r} {n:>5} {d[k]} {f()}", n=7, d={"k": "v"}, f=lambda: "called")
        log.info("{missing}")
        log.emit(LogLevel.error, None, log_system="sys")  # no text: no line
        log.info("{x}", x=b"raw", log_system=42)
        log.failure("failed {what}", Failure(KeyError("k")), what="here")
        self.reactor.advance(0)
        twistd = "".join(
            formatEventAsClassicLogText(e, lambda t: formatTime(t)) or "" for e in events
        )
        self.assertEqual(self.out.getvalue(), twistd)
        self.assertIn("[happyrobot.ws#info] client_1_ab connected\n", twistd)
        self.assertIn("#warn] two\n\tlines\n", twistd)
        self.assertIn("#info] 7     7 v called\n", twistd)
        self.assertIn("[42] b'raw'\n", twistd)
        self.assertIn("failed here\n\tTraceback", twistd)
        self.assertIn("Unable to format event", twistd)  # "{missing}", as Twisted says it
        # One line per event but the one without text.
        self.assertEqual(len([t for t in twistd.splitlines() if not t.startswith("\t")]), 6)

    def test_one_write_per_turn(self) -> None:
        """Lines of one turn wait for its end and go out in one flush."""
        for i in range(5):
            self.log.info("line {i}", i=i)
        self.assertEqual(self.out.getvalue(), "")
        self.reactor.advance(0)
        self.assertEqual(self.out.getvalue().count("\n"), 5)
        self.assertEqual(self.out.flushes, 1)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_errors_and_stopped_reactor_write_at_once(self) -> None:
        """An error, or anything while the reactor is not running, is not held back."""
        self.log.info("held")
        self.log.failure("it broke", Failure(ValueError("boom")))
        text = self.out.getvalue()
        self.assertIn("held", text)
        self.assertIn("ValueError: boom", text)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.running = False
        self.log.info("stopping")
        self.assertIn("stopping", self.out.getvalue())

    def test_time_stamp_follows_the_clock(self) -> None:
        """The time stamp, kept per second, changes with the second."""
        for text, when in (("a", 1000.2), ("b", 1000.9), ("c", 1001.0)):
            self.observer({"log_format": text, "log_level": LogLevel.info,
                           "log_namespace": "t", "log_time": when})
        self.observer.flush()
        stamps = [line.split(" ")[0] for line in self.out.getvalue().splitlines()]
        self.assertEqual(stamps, [formatTime(1000), formatTime(1000), formatTime(1001)])

    def test_closed_output_is_not_fatal(self) -> None:
        """With standard output gone, logging does nothing rather than raise."""
        self.out.close()
        self.reactor.running = False
        self.log.info("nowhere")


class LevelLoggerTests(SynchronousTestCase):
    """L{happyrobot.logs.get_logger}: the level applied before the event is built."""

    def tearDown(self) -> None:
        logs.set_level("info")

    def capture(self, logger: Logger) -> list[dict[str, object]]:
        events: list[dict[str, object]] = []
        self.patch(logger, "observer", events.append)
        return events

    def test_same_event_as_twisted(self) -> None:
        """A kept event has exactly the keys and values Twisted's Logger gives it."""
        ours, theirs = logs.get_logger("happyrobot.x"), Logger(namespace="happyrobot.x")
        got, want = self.capture(ours), self.capture(theirs)
        for logger in (ours, theirs):
            logger.info("{client_id} connected", client_id="c1")
            logger.failure("boom", Failure(ValueError("x")))
        self.assertEqual(len(got), 2)
        for a, b in zip(got, want):
            self.assertEqual(set(a), set(b))
            for key in a:
                if key not in ("log_time", "log_logger", "log_failure"):
                    self.assertEqual(a[key], b[key], key)
            self.assertIs(a["log_logger"], ours)
            self.assertLess(abs(float(a["log_time"]) - float(b["log_time"])), 5)  # type: ignore[arg-type]

    def test_level_drops_before_building(self) -> None:
        """Below LOG_LEVEL nothing reaches the observer; at or above it, everything does."""
        log = logs.get_logger("happyrobot.x")
        events = self.capture(log)
        logs.set_level("warn")
        log.debug("d")
        log.info("i")
        log.warn("w")
        log.error("e")
        log.critical("c")
        self.assertEqual([e["log_format"] for e in events], ["w", "e", "c"])
        logs.set_level("debug")
        log.debug("d")
        self.assertEqual(events[-1]["log_format"], "d")

    def test_bad_level_reported_as_twisted_does(self) -> None:
        """An invalid level is reported as a failure, as by Twisted's own Logger."""
        log = logs.get_logger("happyrobot.x")
        events = self.capture(log)
        log.emit("loud", "x")  # type: ignore[arg-type]
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["log_level"], LogLevel.critical)
        self.assertIn("invalid log level", str(events[0]["log_format"]))


class ThrottleTests(SynchronousTestCase):
    """L{logs.Throttle}: one line per interval for a warning anyone can cause."""

    def test_first_due_then_counted(self) -> None:
        """The first is due at once; the next ones are counted into the next line."""
        clock = Clock()
        throttle = logs.Throttle(10.0, clock)
        self.assertEqual(throttle.due(), 1)
        self.assertEqual([throttle.due() for _ in range(5)], [0] * 5)
        clock.advance(9.9)
        self.assertEqual(throttle.due(), 0)
        clock.advance(0.1)
        self.assertEqual(throttle.due(), 7)  # the 6 held back, and this one
        clock.advance(100)
        self.assertEqual(throttle.due(), 1)
