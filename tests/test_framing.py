"""
Tests for L{happyrobot.framing}: the frame header must be exactly what
RFC 6455 section 5.2 prescribes, since these bytes go straight onto the
wire of every member.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from happyrobot.framing import (
    SharedDeflate,
    binary_frame,
    split_text_frames,
    text_frame,
    unmask,
)


@dataclass(frozen=True)
class _Header:
    """The fields of a decoded RFC 6455 frame header."""

    fin: bool
    rsv: int
    opcode: int
    masked: bool
    length_code: int
    length: int
    header_size: int


def _decode_header(frame: bytes) -> _Header:
    """Decode the base header and extended payload length of C{frame}."""
    first, second = frame[0], frame[1]
    length_code = second & 0x7F
    if length_code == 126:
        (length,) = struct.unpack("!H", frame[2:4])
        size = 4
    elif length_code == 127:
        (length,) = struct.unpack("!Q", frame[2:10])
        size = 10
    else:
        length, size = length_code, 2
    return _Header(
        fin=bool(first & 0x80),
        rsv=(first >> 4) & 0x07,
        opcode=first & 0x0F,
        masked=bool(second & 0x80),
        length_code=length_code,
        length=length,
        header_size=size,
    )


class TextFrameTests(SynchronousTestCase):
    """L{text_frame} makes one final, unmasked text frame with the shortest length encoding."""

    def _check(self, n: int, length_code: int, header_size: int) -> None:
        """Frame C{n} bytes and check every header field and the payload."""
        payload = bytes(i % 251 for i in range(n))
        frame = text_frame(payload)
        header = _decode_header(frame)
        self.assertEqual(
            header,
            _Header(
                fin=True,
                rsv=0,
                opcode=0x1,
                masked=False,
                length_code=length_code,
                length=n,
                header_size=header_size,
            ),
        )
        self.assertEqual(len(frame), header_size + n)
        self.assertEqual(frame[header_size:], payload)

    def test_empty(self) -> None:
        """An empty payload is the two header bytes 0x81 0x00 and nothing else."""
        self.assertEqual(text_frame(b""), b"\x81\x00")
        self._check(0, 0, 2)

    def test_small(self) -> None:
        """A short JSON payload follows a two-byte header holding its length."""
        self.assertEqual(text_frame(b'{"a":1}'), b'\x81\x07{"a":1}')

    def test_125(self) -> None:
        """125 bytes, the largest length in the base header, use the 7-bit length."""
        self._check(125, 125, 2)

    def test_126(self) -> None:
        """126 bytes use the 16-bit extended length (code 126)."""
        self._check(126, 126, 4)
        self.assertEqual(text_frame(b"x" * 126)[:4], b"\x81\x7e\x00\x7e")

    def test_65535(self) -> None:
        """65535 bytes, the largest 16-bit length, still use code 126."""
        self._check(65535, 126, 4)
        self.assertEqual(text_frame(b"x" * 65535)[:4], b"\x81\x7e\xff\xff")

    def test_65536(self) -> None:
        """65536 bytes use the 64-bit extended length (code 127)."""
        self._check(65536, 127, 10)
        self.assertEqual(text_frame(b"x" * 65536)[:10], b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00")

    def test_64_bit_length_high_bit_clear(self) -> None:
        """The 64-bit length has its most significant bit clear, as RFC 6455 requires."""
        frame = text_frame(b"x" * 70000)
        self.assertEqual(frame[2] & 0x80, 0)
        self.assertEqual(_decode_header(frame).length, 70000)

    def test_utf8_payload_unchanged(self) -> None:
        """The payload bytes are copied as given; the length counts bytes, not characters."""
        payload = '{"t":"\u00e9\U0001f600"}'.encode()
        frame = text_frame(payload)
        self.assertEqual(frame, bytes((0x81, len(payload))) + payload)

    @settings(deadline=None, max_examples=60)
    @given(
        st.integers(min_value=0, max_value=200)
        | st.integers(min_value=65500, max_value=65600)
        | st.integers(min_value=0, max_value=70000)
    )
    def test_any_length(self, n: int) -> None:
        """Every payload length decodes back to itself with the minimal length encoding."""
        if n < 126:
            self._check(n, n, 2)
        elif n < 65536:
            self._check(n, 126, 4)
        else:
            self._check(n, 127, 10)


class BinaryFrameTests(SynchronousTestCase):
    """L{binary_frame} is L{text_frame} with the binary opcode (0x2)."""

    @settings(deadline=None, max_examples=40)
    @given(
        st.integers(min_value=0, max_value=200)
        | st.integers(min_value=65500, max_value=65600)
    )
    def test_same_header_but_opcode(self, n: int) -> None:
        """Any length frames exactly as text does, with opcode 0x2 instead of 0x1."""
        payload = bytes(i % 256 for i in range(n))
        frame = binary_frame(payload)
        header = _decode_header(frame)
        self.assertEqual((header.fin, header.rsv, header.opcode, header.masked),
                         (True, 0, 0x2, False))
        self.assertEqual(frame[1:], text_frame(payload)[1:])
        self.assertEqual(frame[header.header_size:], payload)

    def test_not_utf8(self) -> None:
        """Bytes that are not UTF-8 are carried unchanged."""
        self.assertEqual(binary_frame(b"\xff\x00\xfe"), b"\x82\x03\xff\x00\xfe")


def client_frame(
    payload: bytes, opcode: int = 1, fin: bool = True, rsv: int = 0,
    mask: bytes | None = b"\x0f\xa0\x55\x3c", length_code: int | None = None,
) -> bytes:
    """A client frame as RFC 6455 spells it (masked unless C{mask} is None)."""
    n = len(payload)
    if length_code is None:
        length_code = n if n < 126 else (126 if n < 0x10000 else 127)
    head = bytes(((0x80 if fin else 0) | (rsv << 4) | opcode,
                  (0x80 if mask is not None else 0) | length_code))
    if length_code == 126:
        head += struct.pack("!H", n)
    elif length_code == 127:
        head += struct.pack("!Q", n)
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class UnmaskTests(SynchronousTestCase):
    """L{unmask} is the XOR of section 5.3, for every length and offset."""

    @given(st.binary(max_size=300), st.binary(min_size=4, max_size=4))
    def test_matches_the_rfc_loop(self, payload: bytes, mask: bytes) -> None:
        """Byte i is XORed with mask[i % 4]; unmasking twice gives the payload back."""
        expected = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.assertEqual(unmask(payload, mask), expected)
        self.assertEqual(unmask(expected, mask), payload)


class SplitTextFramesTests(SynchronousTestCase):
    """
    L{split_text_frames} takes exactly the whole, final, masked text frames
    off the front of a read and leaves everything else for Autobahn.
    """

    def test_one_frame(self) -> None:
        """One whole frame: its payload unmasked and the offset past it."""
        data = client_frame(b'{"type":"X"}')
        self.assertEqual(split_text_frames(data, 65536), ([(b'{"type":"X"}', len(data))], len(data)))

    def test_several_frames_then_the_rest(self) -> None:
        """Frames come off in order; a ping after them and what follows stay."""
        a, b = client_frame(b"a" * 125), client_frame(b"b" * 126)
        ping = client_frame(b"", opcode=9)
        frames, used = split_text_frames(a + b + ping + a, 65536)
        self.assertEqual(frames, [(b"a" * 125, len(a)), (b"b" * 126, len(a + b))])
        self.assertEqual(used, len(a + b))

    def test_empty_payload(self) -> None:
        """An empty text frame is six bytes and is taken."""
        self.assertEqual(split_text_frames(client_frame(b""), 10), ([(b"", 6)], 6))

    def test_left_for_autobahn(self) -> None:
        """Every frame that is not the plain case is left where it is."""
        cases = {
            "unmasked": client_frame(b"x", mask=None),
            "not final": client_frame(b"x", fin=False),
            "continuation": client_frame(b"x", opcode=0),
            "binary": client_frame(b"x", opcode=2),
            "close": client_frame(b"\x03\xe8", opcode=8),
            "pong": client_frame(b"", opcode=10),
            "reserved bit": client_frame(b"x", rsv=4),
            "non-minimal length": client_frame(b"x" * 10, length_code=126),
            "64-bit length": client_frame(b"x" * 70000),
            "over the limit": client_frame(b"x" * 101),
        }
        for name, data in cases.items():
            self.assertEqual(split_text_frames(data, 100), ([], 0), name)

    def test_limit_is_inclusive_and_zero_means_none(self) -> None:
        """A payload of exactly the limit passes; limit 0 takes up to 64 KiB - 1."""
        data = client_frame(b"x" * 100)
        self.assertEqual(split_text_frames(data, 100)[1], len(data))
        big = client_frame(b"x" * 65535)
        self.assertEqual(split_text_frames(big, 0)[1], len(big))

    @given(
        st.lists(
            st.tuples(st.binary(max_size=300), st.sampled_from(["text", "ping", "binary"])),
            max_size=6,
        ),
        st.integers(min_value=0, max_value=2000),
    )
    @settings(max_examples=300)
    def test_any_read(self, specs: list[tuple[bytes, str]], cut: int) -> None:
        """
        For any sequence of frames cut off anywhere, the result is the whole
        text frames before the first other or incomplete frame, and the
        offset is where that frame starts.
        """
        opcodes = {"text": 1, "ping": 9, "binary": 2}
        encoded = [client_frame(p[:125] if k == "ping" else p, opcode=opcodes[k]) for p, k in specs]
        data = b"".join(encoded)[:cut]
        expected, offset = [], 0
        for (payload, kind), frame in zip(specs, encoded):
            if kind != "text" or offset + len(frame) > len(data):
                break
            offset += len(frame)
            expected.append((payload, offset))
        self.assertEqual(split_text_frames(data, 1000), (expected, offset))


def _inflate(frame: bytes, window_bits: int, decompressor: Any = None) -> bytes:
    """The payload of a compressed frame, as a permessage-deflate client reads it."""
    header = _decode_header(frame)
    d = decompressor or zlib.decompressobj(-window_bits)
    return d.decompress(frame[header.header_size:] + b"\x00\x00\xff\xff")


class SharedDeflateTests(SynchronousTestCase):
    """L{SharedDeflate}: compressed once per frame and window size, valid for any client."""

    BIG = b'{"type":"TASK_UPDATE","payload":{"title":"' + b"write the report " * 40 + b'"}}'

    def test_compressed_frame(self) -> None:
        """A large text frame comes back final, text, RSV1 set and shorter; it inflates to the payload."""
        out = SharedDeflate().frame(text_frame(self.BIG), 15)
        header = _decode_header(out)
        self.assertEqual((header.fin, header.rsv, header.opcode, header.masked), (True, 4, 1, False))
        self.assertLess(len(out), len(self.BIG) // 4)
        self.assertEqual(_inflate(out, 15), self.BIG)

    def test_once_per_frame_and_window(self) -> None:
        """The same frame object gives the same compressed object; another window size its own."""
        deflate, frame = SharedDeflate(), text_frame(self.BIG)
        first = deflate.frame(frame, 15)
        self.assertIs(deflate.frame(frame, 15), first)
        for bits in range(9, 16):
            self.assertEqual(_inflate(deflate.frame(frame, bits), bits), self.BIG, bits)
        self.assertIs(deflate.frame(frame, 15), first)

    def test_every_message_stands_alone(self) -> None:
        """
        Each message decodes with a fresh decompressor (a client without
        context takeover) and with one kept across messages (a client with it).
        """
        deflate = SharedDeflate()
        payloads = [self.BIG, self.BIG.replace(b"report", b"summary"), self.BIG]
        kept = zlib.decompressobj(-15)
        for payload in payloads:
            out = deflate.frame(text_frame(payload), 15)
            self.assertEqual(_inflate(out, 15), payload)
            self.assertEqual(_inflate(out, 15, kept), payload)

    def test_small_incompressible_or_other_frames_stay_plain(self) -> None:
        """Under the threshold, not shrinking, or not a text frame: the frame itself."""
        deflate = SharedDeflate(min_bytes=256)
        for frame in (text_frame(b"x" * 255), text_frame(os.urandom(2000)),
                      binary_frame(self.BIG)):
            self.assertIs(deflate.frame(frame, 15), frame)
