"""
Timers from the reactor's C{callLater}, the one helper every module uses
for them.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall


def cancel_if_active(call: IDelayedCall | None) -> None:
    """
    Cancel C{call} unless it has already run or been cancelled (or is
    C{None}: no timer was set).
    """
    if call is not None and call.active():
        call.cancel()
