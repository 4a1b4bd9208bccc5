"""
WebSocket framing of outgoing messages (RFC 6455, section 5.2).

A server's frames are unmasked, so one event framed once is the same bytes
for every recipient: the fan-out hands these bytes to each member instead of
asking Autobahn to frame (and log) the message once per recipient.
"""

from __future__ import annotations

import struct

_TEXT_FIN = 0x81
_BINARY_FIN = 0x82


def _frame(first: int, payload: bytes) -> bytes:
    """An unmasked frame: the byte C{first} (FIN + opcode), the length, C{payload}."""
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 0x10000:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


def text_frame(payload: bytes) -> bytes:
    """A single unfragmented, unmasked text frame carrying C{payload}."""
    return _frame(_TEXT_FIN, payload)


def binary_frame(payload: bytes) -> bytes:
    """A single unfragmented, unmasked binary frame carrying C{payload}."""
    return _frame(_BINARY_FIN, payload)
