"""
Room sequence numbers and bounded event history, for the v2 delivery
guarantees (resume with ``since``, ``RESYNC_REQUIRED``, acknowledgements).
Pure code: time is passed in as C{now} seconds.

Sequence numbers grow by one per event and room.  A room's first number is
the time in milliseconds when its history began, so that numbers from
before a restart (whose history is gone) are always lower than the new
ones: a client resuming with an old C{since} is told to resync instead of
mistaking new events for the ones it missed.
"""

from __future__ import annotations

from collections import deque
from itertools import islice

#: (user id, operation id): the key under which a retried event is recognised.
OpKey = tuple[str, str]


def with_seq(event: bytes, seq: int) -> bytes:
    """Add ``"seq": N`` to a serialised JSON object without parsing it again."""
    return b'%s,"seq":%d}' % (event[:-1], seq)


class RoomHistory:
    """
    The sequence counter and the recent events of one room, bounded by
    count and by age, with the operation ids of acknowledged events so a
    retry is recognised while its event is still in the history.
    """

    def __init__(self, first_seq: int, max_events: int, max_age_seconds: float) -> None:
        self.seq = first_seq - 1  # the last number given out
        self._max_events = max_events
        self._max_age = max_age_seconds
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
        """Forget events beyond the count bound or older than the age bound."""
        events = self._events
        cutoff = now - self._max_age
        while events and (len(events) > self._max_events or events[0][1] < cutoff):
            events.popleft()
        if self._ops:
            oldest = events[0][0] if events else self.seq + 1
            for key in list(self._ops):  # in insertion order, so oldest first
                if self._ops[key] >= oldest:
                    break
                del self._ops[key]

    @property
    def empty(self) -> bool:
        return not self._events


class Histories:
    """Every room's L{RoomHistory}, made on first use and dropped once empty."""

    def __init__(self, max_events: int, max_age_seconds: float) -> None:
        self._max_events = max_events
        self._max_age = max_age_seconds
        self._rooms: dict[str, RoomHistory] = {}

    def get(self, project_id: str, now: float) -> RoomHistory:
        history = self._rooms.get(project_id)
        if history is None:
            history = RoomHistory(max(1, int(now * 1000)), self._max_events, self._max_age)
            self._rooms[project_id] = history
        return history

    def sweep(self, now: float) -> int:
        """Drop the histories whose events have all aged out; return how many."""
        dropped = 0
        for project_id, history in list(self._rooms.items()):
            history.trim(now)
            if history.empty:
                del self._rooms[project_id]
                dropped += 1
        return dropped

    def __len__(self) -> int:
        return len(self._rooms)
