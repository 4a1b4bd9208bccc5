"""
WebSocket framing (RFC 6455, section 5.2): outgoing frames, and the common
case of incoming ones.

A server's frames are unmasked, so one event framed once is the same bytes
for every recipient: the fan-out hands these bytes to each member instead of
asking Autobahn to frame (and log) the message once per recipient.

Incoming, nearly every frame a client sends is one whole masked text frame.
L{split_text_frames} takes those off the front of a read so that they skip
Autobahn's general frame machine (a tenth of a millisecond per frame, which
every recipient of the event waits for); anything else (control frames,
fragments, reserved bits, frames cut by the read, oversize frames, protocol
errors) is left to Autobahn.
"""

from __future__ import annotations

import struct
import zlib

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


def unmask(payload: bytes, mask: bytes) -> bytes:
    """C{payload} XORed with the 4-byte C{mask} repeated (section 5.3)."""
    n = len(payload)
    if not n:
        return payload
    key = int.from_bytes((mask * ((n >> 2) + 1))[:n], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(n, "little")


def split_text_frames(data: bytes, max_payload: int) -> tuple[list[tuple[bytes, int]], int]:
    """
    The whole, final, masked text frames without reserved bits at the start
    of C{data} whose payload is at most C{max_payload} bytes (0: no limit
    below 64 KiB), each as (unmasked payload, offset in C{data} just past
    it), and the offset where the first other frame (or an incomplete one)
    starts.  The payloads are not checked for UTF-8.
    """
    frames: list[tuple[bytes, int]] = []
    end = len(data)
    i = 0
    limit = max_payload or 0xFFFF
    while end - i >= 6:
        if data[i] != _TEXT_FIN:
            break
        code = data[i + 1]
        if code < 0x80:
            break  # unmasked: a protocol error for Autobahn to answer
        code &= 0x7F
        if code < 126:
            n, start = code, i + 2
        elif code == 126 and end - i >= 8:
            n = (data[i + 2] << 8) | data[i + 3]
            if n < 126:
                break  # not the shortest encoding: a protocol error
            start = i + 4
        else:
            break  # 64-bit lengths are over any sane limit; or incomplete
        if n > limit or end - start < 4 + n:
            break
        payload_end = start + 4 + n
        frames.append((unmask(data[start + 4 : payload_end], data[start : start + 4]), payload_end))
        i = payload_end
    return frames, i


class SharedDeflate:
    """
    permessage-deflate (RFC 7692) for frames that go to many connections:
    each frame is compressed once (per window size a connection negotiated)
    and the compressed frame is shared by every such connection, as the
    plain frame is.  Every message is compressed on its own (a full flush
    resets the compressor after each), which any client can decode, with or
    without context takeover.  Frames with a payload under C{min_bytes}, or
    that do not shrink, stay plain (RFC 7692 lets a message go
    uncompressed).
    """

    def __init__(self, level: int = 6, min_bytes: int = 256) -> None:
        self._level = level
        self._min = min_bytes
        self._compressors: dict[int, "zlib._Compress"] = {}
        self._last: bytes | None = None
        self._done: dict[int, bytes] = {}

    def frame(self, frame: bytes, window_bits: int) -> bytes:
        """C{frame} (a final text frame from L{text_frame}) for a connection with C{window_bits}."""
        if frame is not self._last:
            self._last, self._done = frame, {}
        out = self._done.get(window_bits)
        if out is None:
            out = self._done[window_bits] = self._deflate(frame, window_bits)
        return out

    def _deflate(self, frame: bytes, window_bits: int) -> bytes:
        if frame[0] != _TEXT_FIN:
            return frame
        code = frame[1] & 0x7F
        payload = frame[2 if code < 126 else 4 if code == 126 else 10:]
        if len(payload) < self._min:
            return frame
        c = self._compressors.get(window_bits)
        if c is None:
            c = self._compressors[window_bits] = zlib.compressobj(
                self._level, zlib.DEFLATED, -window_bits
            )
        data = c.compress(payload) + c.flush(zlib.Z_FULL_FLUSH)
        data = data[:-4]  # the 00 00 ff ff every flush ends with (RFC 7692 7.2.1)
        if len(data) >= len(payload):
            return frame
        return _frame(_TEXT_FIN | 0x40, data)  # RSV1: compressed
