#!/usr/bin/env python3
"""
A floor for the ``handshakes`` scenario, not a server to run: the least a
Twisted process does per WebSocket connection of the benchmark.  It parses
the upgrade request itself, answers 101 and CONNECTION_ESTABLISHED in one
write, and answers the client's close frame; no twisted.web, no Autobahn, no
checks beyond the benchmark's needs, no rooms.  Set PORT (default 3001).

Comparing it with our server (bench/paired.py) tells how much of a
handshake's CPU is the reactor, the kernel and Python themselves, and how
much the layers above them (twisted.web's request, Autobahn's handshake and
protocol, our onOpen).
"""
import base64
import hashlib
import os
import secrets
import time

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import protocol, reactor  # noqa: E402

import orjson  # noqa: E402

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CLOSE_1000 = b"\x88\x02\x03\xe8"


def text_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload


class Floor(protocol.Protocol):
    opened = False
    buf = b""

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        if not self.opened:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            lines = head.split(b"\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            key = headers.get(b"sec-websocket-key")
            if not lines[0].startswith(b"GET ") or key is None:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                self.transport.loseConnection()
                return
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
            now = int(time.time() * 1000)
            hello = orjson.dumps({"type": "CONNECTION_ESTABLISHED",
                                  "clientId": f"client_{now}_{secrets.token_hex(6)}", "timestamp": now})
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                                 + text_frame(hello))
            self.opened = True
        # Client frames: masked, short (the benchmark sends only a close).
        buf = self.buf
        while len(buf) >= 6 and (buf[1] & 0x7F) < 126 and len(buf) >= 6 + (buf[1] & 0x7F):
            opcode, size = buf[0] & 0x0F, buf[1] & 0x7F
            buf = buf[6 + size:]
            if opcode == 8:
                self.transport.write(CLOSE_1000)
                self.transport.loseConnection()
                return
        self.buf = buf


if __name__ == "__main__":
    reactor.listenTCP(int(os.environ.get("PORT", "3001")), protocol.Factory.forProtocol(Floor),
                      interface="127.0.0.1", backlog=1024)
    reactor.run()
