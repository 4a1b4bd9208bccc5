"""
Fan-out of room events.  The rest of the server publishes through a L{Bus}
and never delivers to sockets itself, so one process and many processes
behind a shared broker look the same to it.

L{LocalBus} is the embedded engine, used when no ``REDIS_URL`` is set: it
hands each event straight to this process's room registry.
"""

from __future__ import annotations

from typing import Protocol

from happyrobot.rooms import RoomRegistry


class Bus(Protocol):
    """What the WebSocket and HTTP adapters publish through."""

    @property
    def healthy(self) -> bool:
        """Whether events currently reach every instance."""

    def publish(self, project_id: str, frame: bytes, exclude: str | None = None) -> None:
        """Deliver a framed event to every member of C{project_id} but C{exclude}."""


class LocalBus:
    """The in-memory engine: one process, delivery in the same call."""

    healthy = True

    def __init__(self, registry: RoomRegistry) -> None:
        self._registry = registry

    def publish(self, project_id: str, frame: bytes, exclude: str | None = None) -> None:
        self._registry.deliver(project_id, frame, exclude)
