"""Tests for L{happyrobot.timers}."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from happyrobot.timers import cancel_if_active


class CancelIfActiveTests(SynchronousTestCase):
    def test_cancel_if_active(self) -> None:
        """Cancels a pending call; a None, run or cancelled one is left alone."""
        clock = Clock()
        ran: list[int] = []
        pending = clock.callLater(1, ran.append, 1)
        done = clock.callLater(0, ran.append, 0)
        clock.advance(0)
        cancel_if_active(pending)
        cancel_if_active(pending)
        cancel_if_active(done)
        cancel_if_active(None)
        clock.advance(2)
        self.assertEqual(ran, [0])
        self.assertFalse(pending.active())
