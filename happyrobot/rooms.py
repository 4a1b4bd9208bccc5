"""
Project rooms: who is in which room, relaying events to the other members,
and presence.

No sockets and no reactor import: a member is anything with a C{client_id},
a C{user_id}, C{initials}, a C{send(frame)} method and a C{writer} (its
outgoing side, with C{send(frame)} too), and time comes from an injected
clock (the reactor in production, L{twisted.internet.task.Clock} in tests).
How a room's frames reach the writers is L{RoomRegistry.fan_out}: a plain
loop here, L{happyrobot.writer.TurnFlusher.fan_out} over the connections'
L{happyrobot.writer.SocketWriter}s in the server.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from happyrobot import messages
from happyrobot.framing import text_frame


class Member(Protocol):
    """One connection as the registry sees it."""

    client_id: str
    user_id: str | None
    initials: str

    def send(self, frame: bytes) -> None:
        """Queue an already framed message for this connection."""

    @property
    def writer(self) -> Writer:
        """Where the room's frames for this member go (the same for its whole life)."""


class Writer(Protocol):
    """A member's outgoing side (in the server, a L{happyrobot.writer.SocketWriter})."""

    def send(self, frame: bytes) -> None:
        """Queue an already framed message."""


def fan_out(writers: Mapping[str, Writer], frame: bytes, exclude: str | None) -> int:
    """Hand C{frame} to every writer but C{exclude}'s; how many that was."""
    sent = 0
    for client_id, writer in writers.items():
        if client_id != exclude:
            writer.send(frame)
            sent += 1
    return sent


class RoomListener(Protocol):
    """
    What the Redis bus hears from the registry: the first local member of a
    room arriving and the last one leaving (it subscribes to and
    unsubscribes from the room's channel), and every change of a room's
    local members, which it announces across instances instead of the
    registry (merging them with the others' and calling
    L{RoomRegistry.send_presence}).  The registry itself stays free of I/O.
    """

    def room_opened(self, project_id: str) -> None:
        """C{project_id} has its first local member."""

    def room_closed(self, project_id: str) -> None:
        """C{project_id} has lost its last local member."""

    def presence_changed(self, project_id: str, active_users: list[dict[str, Any]]) -> None:
        """The local members of C{project_id} are now C{active_users}."""


class Room:
    """The members of one project, in join order, with their join times."""

    __slots__ = ("project_id", "members", "writers", "joined_at_ms", "presence_timer",
                 "presence_dirty", "held")

    def __init__(self, project_id: str) -> None:
        self.project_id = project_id
        self.members: dict[str, Member] = {}
        #: The members' writers, by the same keys in the same order.
        self.writers: dict[str, Writer] = {}
        self.joined_at_ms: dict[str, int] = {}
        self.presence_timer: IDelayedCall | None = None
        self.presence_dirty = False
        #: Members resuming with ``since``: their live events wait here,
        #: with their seq, until the missed ones have been sent.
        self.held: dict[str, list[tuple[int | None, bytes]]] = {}

    def active_users(self) -> list[dict[str, Any]]:
        """Presence entries: one per member that has a user id."""
        return [
            {
                "userId": m.user_id,
                "clientId": cid,
                "joinedAt": self.joined_at_ms[cid],
                "initials": m.initials,
            }
            for cid, m in self.members.items()
            if m.user_id is not None
        ]


class RoomRegistry:
    """
    Every room of this server, keyed by project id.  One registry per
    server, shared by the WebSocket factory, the HTTP resources and the bus.

    Presence is throttled per room: the first change in a quiet room is
    announced at once, and further changes within C{presence_window_seconds}
    are folded into one trailing announcement, so C{n} joins cost O(n)
    messages instead of O(n^2) while every member ends with the right list.
    """

    def __init__(
        self,
        clock: IReactorTime,
        presence_window_seconds: float = 0.0,
        encode: Callable[[bytes], bytes] = text_frame,
        fan_out: Callable[[Mapping[str, Any], bytes, str | None], int] = fan_out,
        on_deliver: Callable[[int], None] | None = None,
    ) -> None:
        """
        @param fan_out: hands a frame to a room's writers (the server's
            L{happyrobot.writer.TurnFlusher.fan_out} does it faster).
        @param on_deliver: told each event's number of recipients, once per
            event (the metrics).
        """
        self._rooms: dict[str, Room] = {}
        self._clock = clock
        self._window = presence_window_seconds
        self._encode = encode
        self.fan_out = fan_out
        self.on_deliver = on_deliver
        #: Told about rooms and presence (the Redis bus), if anyone: see L{listen}.
        self.listener: RoomListener | None = None
        #: Every identified connection (in rooms or not) by user id, then
        #: client id: who an operator call (revoke, disconnect) is about.
        self.users: dict[str, dict[str, Member]] = {}

    def listen(self, listener: RoomListener) -> None:
        """
        Tell C{listener} (the Redis bus, which calls this when it is made)
        of rooms opening and closing and of presence changes, which it then
        announces instead of the registry.
        """
        if self.listener is not None and self.listener is not listener:
            raise ValueError("a room registry has one listener")
        self.listener = listener

    # ------------------------------------------------------------ queries

    def __contains__(self, project_id: str) -> bool:
        return project_id in self._rooms

    def __len__(self) -> int:
        return len(self._rooms)

    def member_count(self, project_id: str) -> int:
        """How many connections are in C{project_id} (0 when no such room)."""
        room = self._rooms.get(project_id)
        return len(room.members) if room else 0

    def is_member(self, project_id: str, client_id: str) -> bool:
        room = self._rooms.get(project_id)
        return room is not None and client_id in room.members

    def active_users(self, project_id: str) -> list[dict[str, Any]]:
        room = self._rooms.get(project_id)
        return room.active_users() if room else []

    def connections_of(self, user_id: str) -> list[Member]:
        """The connections of C{user_id} on this server, in rooms or not."""
        return list(self.users.get(user_id, {}).values())

    def snapshot(self) -> dict[str, list[str]]:
        """Project id to the client ids in it, for /stats."""
        return {pid: list(room.members) for pid, room in self._rooms.items()}

    # ------------------------------------------------------------ changes

    def join(self, project_id: str, member: Member, hold: bool = False) -> bool:
        """
        Add C{member} to the room (made on first join) and announce presence.
        Joining again only re-announces.  With C{hold}, events delivered to
        the room are kept for C{member} until L{release}: the caller sends
        what it missed first, so nothing arrives out of order or twice.

        @return: whether C{member} was new to the room.
        """
        room = self._rooms.get(project_id)
        opened = room is None
        if room is None:
            room = self._rooms[project_id] = Room(project_id)
        new = member.client_id not in room.members
        if new:
            room.members[member.client_id] = member
            room.writers[member.client_id] = member.writer
            room.joined_at_ms[member.client_id] = self._now_ms()
        if hold:
            room.held.setdefault(member.client_id, [])
        if opened and self.listener is not None:
            self.listener.room_opened(project_id)
        self._announce(room)
        return new

    def leave(self, project_id: str, member: Member) -> bool:
        """
        Remove C{member}; an emptied room is dropped, otherwise the rest
        learn the new presence.  Leaving a room one is not in does nothing.

        @return: whether C{member} was in the room.
        """
        room = self._rooms.get(project_id)
        if room is None or room.members.pop(member.client_id, None) is None:
            return False
        del room.writers[member.client_id]
        del room.joined_at_ms[member.client_id]
        room.held.pop(member.client_id, None)
        if not room.members:
            if room.presence_timer is not None:
                room.presence_timer.cancel()
            del self._rooms[project_id]
            if self.listener is not None:
                self.listener.room_closed(project_id)
        else:
            self._announce(room)
        return True

    def identified(self, member: Member, previous: str | None) -> None:
        """C{member} now has its C{user_id} (its user was C{previous}): index it by user."""
        if previous is not None:
            self.gone(member, previous)
        if member.user_id is not None:
            self.users.setdefault(member.user_id, {})[member.client_id] = member

    def gone(self, member: Member, user_id: str | None) -> None:
        """C{member}, of C{user_id}, is no longer that user's (it closed, or changed user)."""
        if user_id is None:
            return
        connections = self.users.get(user_id)
        if connections is not None and connections.get(member.client_id) is member:
            del connections[member.client_id]
            if not connections:
                del self.users[user_id]

    def member_changed(self, project_ids: Iterable[str]) -> None:
        """A member of these rooms changed its user: re-announce presence."""
        for project_id in project_ids:
            room = self._rooms.get(project_id)
            if room is not None:
                self._announce(room)

    def deliver(
        self, project_id: str, frame: bytes, exclude: str | None = None, seq: int | None = None
    ) -> int:
        """
        Hand one framed event (numbered C{seq}, if it is) to every member of
        the room but C{exclude}; members being resumed get it later.

        @return: how many members it was handed or kept for.
        """
        room = self._rooms.get(project_id)
        if room is None:
            return 0
        held = room.held
        if not held:
            sent = self.fan_out(room.writers, frame, exclude)
        else:
            sent = 0
            for client_id, writer in room.writers.items():
                if client_id != exclude:
                    if client_id in held:
                        held[client_id].append((seq, frame))
                    else:
                        writer.send(frame)
                    sent += 1
        if self.on_deliver is not None:
            self.on_deliver(sent)
        return sent

    def release(self, project_id: str, member: Member, after_seq: int) -> None:
        """
        End a hold: send what was kept for C{member} except the events
        numbered C{after_seq} or lower (it has had those already).
        """
        room = self._rooms.get(project_id)
        kept = room.held.pop(member.client_id, None) if room is not None else None
        for seq, frame in kept or ():
            if seq is None or seq > after_seq:
                member.send(frame)

    # ------------------------------------------------------------ presence

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def _announce(self, room: Room) -> None:
        if room.presence_timer is not None:
            room.presence_dirty = True
            return
        self._send_presence(room)
        if self._window > 0:
            room.presence_timer = self._clock.callLater(self._window, self._window_end, room)

    def _window_end(self, room: Room) -> None:
        room.presence_timer = None
        if room.presence_dirty and self._rooms.get(room.project_id) is room:
            room.presence_dirty = False
            self._announce(room)

    def _send_presence(self, room: Room) -> None:
        if self.listener is not None:
            self.listener.presence_changed(room.project_id, room.active_users())
        else:
            self.send_presence(room.project_id, room.active_users())

    def send_presence(self, project_id: str, active_users: list[dict[str, Any]]) -> None:
        """Send USER_PRESENCE listing C{active_users} to the local members of the room."""
        room = self._rooms.get(project_id)
        if room is None:
            return
        frame = self._encode(messages.presence(project_id, active_users, self._now_ms()))
        self.fan_out(room.writers, frame, None)
