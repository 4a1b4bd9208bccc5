"""Small helpers for scheduled calls (L{twisted.internet.interfaces.IDelayedCall})."""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall


def cancel_if_active(call: IDelayedCall | None) -> None:
    """Cancel a scheduled call unless it is None, has run or was cancelled."""
    if call is not None and call.active():
        call.cancel()
