"""
Room sequence numbers and bounded event history, for the v2 delivery
guarantees (resume with ``since``, ``RESYNC_REQUIRED``, acknowledgements).
Pure code: time is passed in as C{now} seconds.

Sequence numbers grow by one per event and room.  A room's first number is
the time in milliseconds when its history began, so that numbers from
before a restart (whose history is gone) are always lower than the new
ones: a client resuming with an old C{since} is told to resync instead of
mistaking new events for the ones it missed.  Within the process a new
history also starts above every number of the histories it has dropped
(swept or evicted), even for a room whose numbers ran ahead of the clock.

Memory is bounded per room (count, age, bytes) and across all rooms
(bytes: the histories of the rooms least recently appended to are
dropped); a history is kept only from its room's first event, so reading
a room that has none stores only the seq it handed out.
"""

from __future__ import annotations

import sys
from collections import OrderedDict, deque
from itertools import islice

#: (user id, operation id): the key under which a retried event is recognised.
OpKey = tuple[str, str]


def with_seq(event: bytes, seq: int) -> bytes:
    """Add ``"seq": N`` to a serialised JSON object without parsing it again."""
    return b'%s,"seq":%d}' % (event[:-1], seq)


class RoomHistory:
    """
    The sequence counter and the recent events of one room, bounded by
    count, by age and by bytes, with the operation ids of acknowledged
    events so a retry is recognised while its event is still in the history.
    """

    def __init__(
        self,
        first_seq: int,
        max_events: int,
        max_age_seconds: float,
        max_bytes: int = sys.maxsize,
        total: ByteCount | None = None,
    ) -> None:
        self.seq = first_seq - 1  # the last number given out
        #: The bytes of the kept events (with their ``seq``).
        self.bytes = 0
        #: What all the rooms of a L{Histories} keep, kept up to date here.
        self.total = total or ByteCount()
        self._max_events = max_events
        self._max_age = max_age_seconds
        self._max_bytes = max_bytes
        self._events: deque[tuple[int, float, bytes]] = deque()
        self._ops: dict[OpKey, int] = {}

    def append(self, event: bytes, now: float, op_key: OpKey | None = None) -> tuple[int, bytes | None]:
        """
        Number C{event} (a serialised JSON object) and keep it.

        @return: its seq and the event with ``seq`` added; for a retry of an
            event still in the history, the original seq and None.
        """
        self.trim(now)
        if op_key is not None:
            seen = self._ops.get(op_key)
            if seen is not None:
                return seen, None
        self.seq += 1
        data = with_seq(event, self.seq)
        self._events.append((self.seq, now, data))
        size = len(data)
        self.bytes += size
        self.total.bytes += size
        if op_key is not None:
            self._ops[op_key] = self.seq
        self.trim(now)
        return self.seq, data

    def since(self, seq: int, now: float) -> list[bytes] | None:
        """
        The kept events after C{seq}, in order; None when the history no
        longer reaches back to C{seq} (or C{seq} is from another epoch).
        """
        self.trim(now)
        if seq > self.seq:
            return None
        oldest = self._events[0][0] if self._events else self.seq + 1
        if seq + 1 < oldest:
            return None
        return [data for _, _, data in islice(self._events, seq + 1 - oldest, None)]

    def trim(self, now: float) -> None:
        """Forget the oldest events beyond the count or byte bound, or older than the age bound."""
        events = self._events
        cutoff = now - self._max_age
        size = self.bytes
        # The newest event stays whatever its size: a retry of it must be
        # recognised, and one large event must not wipe the room's history.
        while events and (
            len(events) > self._max_events
            or (size > self._max_bytes and len(events) > 1)
            or events[0][1] < cutoff
        ):
            size -= len(events.popleft()[2])
        if size != self.bytes:
            self.total.bytes -= self.bytes - size
            self.bytes = size
        if self._ops:
            oldest = events[0][0] if events else self.seq + 1
            for key in list(self._ops):  # in insertion order, so oldest first
                if self._ops[key] >= oldest:
                    break
                del self._ops[key]

    @property
    def empty(self) -> bool:
        return not self._events


#: At most this many rooms read without a history are remembered.
MAX_FLOORS = 100_000


class ByteCount:
    """A running count of bytes, shared by the histories of one L{Histories}."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


class Histories:
    """
    Every room's L{RoomHistory}: made on first use, kept from its first
    event, and dropped once empty (L{sweep}) or to keep the bytes of all
    rooms within C{max_total_bytes}: then the histories of the rooms least
    recently appended to are dropped, never the one being appended to.
    """

    def __init__(
        self,
        max_events: int,
        max_age_seconds: float,
        max_bytes: int = sys.maxsize,
        max_total_bytes: int = sys.maxsize,
    ) -> None:
        self._max_events = max_events
        self._max_age = max_age_seconds
        self._max_bytes = max_bytes
        self._max_total = max_total_bytes
        self._total = ByteCount()
        self._first_seq = 1  # above every number of a dropped history
        self._rooms: OrderedDict[str, RoomHistory] = OrderedDict()  # least recently appended first
        #: Rooms read without a history: the seq a reader was given, and
        #: when.  The room's numbering goes on from it, so a client told
        #: RESYNC_REQUIRED with it resumes from there without a gap; kept
        #: as long as an event would be, and at most MAX_FLOORS of them.
        self._floors: dict[str, tuple[int, float]] = {}

    def get(self, project_id: str, now: float) -> RoomHistory:
        """
        The room's history, for reading (add events with L{append}).  A
        room without one gets an empty one, numbered from C{now} in ms or
        from the seq an earlier read was given, which is not kept.
        """
        history = self._rooms.get(project_id)
        if history is None:
            floor = self._floors.get(project_id)
            if floor is None:
                first = max(self._first_seq, int(now * 1000))
                if len(self._floors) >= MAX_FLOORS:
                    oldest = next(iter(self._floors))
                    self._first_seq = max(self._first_seq, self._floors.pop(oldest)[0] + 1)
                self._floors[project_id] = (first - 1, now)
            else:
                first = floor[0] + 1
            history = RoomHistory(
                first, self._max_events, self._max_age, self._max_bytes, self._total
            )
        return history

    def append(
        self, project_id: str, event: bytes, now: float, op_key: OpKey | None = None
    ) -> tuple[int, bytes | None]:
        """L{RoomHistory.append} to the room's history, within the total bound."""
        rooms = self._rooms
        history = rooms.get(project_id)
        if history is None:
            history = rooms[project_id] = self.get(project_id, now)
            del self._floors[project_id]
        else:
            rooms.move_to_end(project_id)
        result = history.append(event, now, op_key)
        while self._total.bytes > self._max_total and len(rooms) > 1:
            self._drop(rooms.popitem(last=False)[1])
        return result

    def _drop(self, history: RoomHistory) -> None:
        """Stop counting C{history} (already out of C{_rooms})."""
        self._total.bytes -= history.bytes
        history.total = ByteCount()
        self._first_seq = max(self._first_seq, history.seq + 1)

    def sweep(self, now: float) -> int:
        """Drop the histories whose events have all aged out; return how many."""
        dropped = 0
        for project_id, history in list(self._rooms.items()):
            history.trim(now)
            if history.empty:
                del self._rooms[project_id]
                self._drop(history)
                dropped += 1
        cutoff = now - self._max_age
        for project_id, (seq, read_at) in list(self._floors.items()):
            if read_at < cutoff:
                del self._floors[project_id]
                self._first_seq = max(self._first_seq, seq + 1)
        return dropped

    @property
    def total_bytes(self) -> int:
        """The bytes of the events kept in all rooms."""
        return self._total.bytes

    def __len__(self) -> int:
        return len(self._rooms)
