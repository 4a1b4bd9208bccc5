"""Happy Robot real-time server: project rooms over WebSocket, on Twisted."""

__version__ = "0.1.0"
