"""Tests for L{happyrobot.timers}."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from happyrobot.timers import cancel_if_active


class CancelIfActiveTests(SynchronousTestCase):
    """L{cancel_if_active}: cancel a timer whatever state it is in."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.ran: list[int] = []

    def test_pending_call_cancelled(self) -> None:
        """A timer not yet due is cancelled and never runs."""
        call = self.clock.callLater(1, self.ran.append, 1)
        cancel_if_active(call)
        self.assertFalse(call.active())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(2)
        self.assertEqual(self.ran, [])

    def test_call_that_ran(self) -> None:
        """A timer that already ran is left alone (cancelling it would raise)."""
        call = self.clock.callLater(1, self.ran.append, 1)
        self.clock.advance(1)
        cancel_if_active(call)
        self.assertEqual(self.ran, [1])

    def test_call_already_cancelled(self) -> None:
        """A timer cancelled before is left alone (cancelling it again would raise)."""
        call = self.clock.callLater(1, self.ran.append, 1)
        call.cancel()
        cancel_if_active(call)
        self.assertFalse(call.active())

    def test_none(self) -> None:
        """No timer at all is nothing to cancel."""
        cancel_if_active(None)
