#!/usr/bin/env python3
"""
A floor for the ``handshakes`` scenario under the project's design
(docs/design.md), not a server to run: the least a server built that way (a
twisted.web resource tree, ``/ws`` through Autobahn's ``WebSocketResource``,
an Autobahn ``WebSocketServerProtocol``) does per WebSocket connection of the
benchmark.
Its ``onOpen`` sends CONNECTION_ESTABLISHED and nothing else: no rooms, no
Origin check, no limits, no log lines.  NVX and the epoll reactor are on, as
in our server (Autobahn's defaults).  Set PORT (default 3001).

Compared with Node (bench/paired.py), it bounds what any server on that
design can reach in handshakes; compared with bench/peers/twisted_floor.py,
it tells what twisted.web and Autobahn cost; compared with our server, what
our own code costs on top.
"""
import os
import secrets
import time

from twisted.internet import epollreactor

epollreactor.install()

import orjson  # noqa: E402
from autobahn.twisted.resource import WebSocketResource  # noqa: E402
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol  # noqa: E402
from twisted.internet import reactor  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import Site  # noqa: E402


class Greeter(WebSocketServerProtocol):
    def onOpen(self) -> None:
        now = int(time.time() * 1000)
        self.sendMessage(orjson.dumps({"type": "CONNECTION_ESTABLISHED",
                                       "clientId": f"client_{now}_{secrets.token_hex(6)}",
                                       "timestamp": now}))


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "3001"))
    factory = WebSocketServerFactory(f"ws://127.0.0.1:{port}")
    factory.protocol = Greeter
    root = Resource()
    root.putChild(b"ws", WebSocketResource(factory))
    reactor.listenTCP(port, Site(root), interface="127.0.0.1", backlog=1024)
    reactor.run()
