"""
Each room's delivery order on this instance, as a pure state machine: no
Redis, no reactor.  The Redis bus feeds it what happens (a room opened, a
connection came up or went, a SUBSCRIBE was confirmed, a live event
arrived, a read of the history answered) and it decides what to do next
("read the seq", "subscribe", "read the history after N", "deliver seq S
to all but X", "RESYNC_REQUIRED at S"), through the outputs it was given.

The rule: a room's events reach the local members in seq order with no
gap and no duplicate from C{last} on.  When a room opens, C{last} is its
seq as read before the SUBSCRIBE is sent; after every (re)subscription,
and whenever a live event skips a number, the history after C{last} is
read and delivered first (live events wait meanwhile in a buffer, and
those already delivered are dropped by seq), or, if the history no longer
reaches back that far, the members get RESYNC_REQUIRED at the seq before
the events it still keeps, then those (or at the current seq).  So events
published while the subscription was down, or before it was confirmed,
are delivered late but in order, never silently lost.
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol

from happyrobot import logs
from happyrobot.framing import text_frame

log = logs.get_logger(__name__)

#: What a read of a room's history answered: its seq, then its events after
#: the seq asked for with their sender tags (C{[event, tag, event, tag...]},
#: None when the history does not reach back; an empty event with a seq as
#: its tag where the numbering jumped to that seq), then, when the history
#: did not reach back but keeps later events, the seq those follow (else
#: None).
ReadResult = tuple[int, "list[bytes] | None", "int | None"]
#: A presence envelope waiting for a room's SUBSCRIBE, and what serves the
#: local members instead if it never reaches Redis.
Waiting = tuple[bytes, Callable[[], object]]


class SequencerOutputs(Protocol):
    """What the sequencer asks the bus to do."""

    def read(self, project_id: str, room: RoomSequence, since: int | None) -> None:
        """
        Read the room's seq (C{since} None) or its history after C{since}
        (what is kept, if it does not reach back); answer with
        L{Sequencer.read_done}, or L{Sequencer.read_failed}.
        """

    def subscribe(self, project_id: str, room: RoomSequence) -> bool:
        """
        Send SUBSCRIBE for the room; answer with L{Sequencer.subscribed}
        once Redis confirms it.  False when it could not be sent.
        """

    def resync(self, project_id: str, at: int) -> None:
        """Send RESYNC_REQUIRED at seq C{at} to the room's local members."""

    def release(self, project_id: str, waiting: list[Waiting]) -> None:
        """The room's SUBSCRIBE is confirmed: publish what waited for it."""


class RoomSequence:
    """
    Where this instance's delivery of one room's events stands.  Until
    Redis confirms the room's SUBSCRIBE, presence announcements wait in
    C{backlog}: publishing them at once could overtake the SUBSCRIBE (the
    two go over different connections) and our own members would miss
    them.
    """

    __slots__ = ("confirmed", "subscribing", "backlog", "last", "stale", "reading",
                 "buffer", "overflow")

    def __init__(self) -> None:
        self.confirmed = False
        self.subscribing = False
        #: Presence envelopes in publishing order, with their local fallback.
        self.backlog: list[Waiting] = []
        #: The last seq delivered (or known to be before our members'
        #: time); None until read, before the first SUBSCRIBE.
        self.last: int | None = None
        #: Events may be missing after C{last}: read the history before
        #: delivering more (set on every (re)subscription and on a gap).
        self.stale = True
        #: A read of this room's seq or history is running.
        self.reading = False
        #: Live events waiting while stale: (seq, JSON, excluded client).
        self.buffer: list[tuple[int, bytes, str | None]] = []
        #: The buffer overflowed and was dropped: read again afterwards.
        self.overflow = False

    @property
    def synced(self) -> bool:
        """Subscribed, and everything up to C{last} delivered."""
        return self.confirmed and not self.stale and not self.reading


class Sequencer:
    """
    The L{RoomSequence} of every room with local members, and the state of
    the two Redis connections they depend on.

    @param deliver: hands one event to the room's local members, as
        C{deliver(project_id, frame, exclude, seq)} (the registry's
        C{deliver}); called once per event, with nothing allocated but the
        frame.
    @param advanced: called whenever a room advanced (for whoever waits on
        L{RoomSequence.synced} or C{last}).
    @param instance: this instance's id, to recognise its members' events
        read from the history.
    @param buffer_limit: how many live events a stale room keeps waiting
        before it drops them and reads the history again (the history size).
    """

    def __init__(
        self,
        outputs: SequencerOutputs,
        deliver: Callable[[str, bytes, str | None, int], object],
        advanced: Callable[[], None],
        instance: bytes,
        buffer_limit: int,
    ) -> None:
        self._out = outputs
        self._changed = advanced
        self._deliver_frame = deliver
        self._instance = instance
        self.buffer_limit = buffer_limit
        self._rooms: dict[str, RoomSequence] = {}
        #: The room's sequence, None when it has no local member (the
        #: dict's own get: it is looked up once per message).
        self.room: Callable[[str], RoomSequence | None] = self._rooms.get
        self.commands_up = False
        self.subscriber_up = False
        #: Counts subscriber connections, so a confirmation from a lost one is ignored.
        self.epoch = 0

    # ------------------------------------------------------------ rooms

    def __contains__(self, project_id: str) -> bool:
        return project_id in self._rooms

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._rooms))

    def __len__(self) -> int:
        return len(self._rooms)

    def open(self, project_id: str) -> None:
        """The room's first local member arrived: read its seq, then subscribe."""
        self._rooms[project_id] = RoomSequence()
        self.sync(project_id)

    def close(self, project_id: str) -> RoomSequence | None:
        """The room's last local member left: forget it (its backlog is the caller's)."""
        return self._rooms.pop(project_id, None)

    def settled(self) -> bool:
        """Whether every room has delivered its events up to now."""
        return all(r.synced for r in self._rooms.values())

    def hold(self, project_id: str, waiting: Waiting) -> bool:
        """Keep C{waiting} until the room's SUBSCRIBE is confirmed; False if it need not wait."""
        room = self._rooms.get(project_id)
        if room is not None and not room.confirmed:
            room.backlog.append(waiting)
            return True
        return False

    def take_backlogs(self) -> list[Waiting]:
        """Everything waiting for a SUBSCRIBE, which will not reach Redis now."""
        taken: list[Waiting] = []
        for room in self._rooms.values():
            taken += room.backlog
            room.backlog = []
        return taken

    # ------------------------------------------------------------ links

    def commands_changed(self, up: bool) -> None:
        """The command connection came up (rooms take their next step) or went."""
        self.commands_up = up
        if up:
            for project_id in self:
                self.sync(project_id)

    def subscriber_changed(self, up: bool) -> None:
        """
        The subscriber connection came up or went: either way every room
        must subscribe again and catch up (what was published meanwhile
        reaches us only through the history).
        """
        self.subscriber_up = up
        if up:
            self.epoch += 1
        for room in self._rooms.values():
            room.confirmed = room.subscribing = False
            room.stale = True
        if up:
            for project_id in self:
                self.sync(project_id)

    # ------------------------------------------------------------ steps

    def sync(self, project_id: str) -> None:
        """
        Take one room's next step towards delivering its events from
        C{last} on, when the links allow it: read its seq (a room just
        opened), then SUBSCRIBE, then read and deliver what was published
        after C{last} before the subscription took effect.  Called again
        whenever a step ends or a link comes back.
        """
        room = self._rooms.get(project_id)
        if room is None or room.reading or room.subscribing:
            return
        if room.last is None:
            # The seq before the SUBSCRIBE is sent: every event after it
            # arrives live or is read by the catch-up.
            if self.commands_up:
                room.reading = True
                self._out.read(project_id, room, None)
        elif not room.confirmed:
            if self.subscriber_up:
                room.subscribing = self._out.subscribe(project_id, room)
        elif room.stale and self.commands_up:
            room.reading = True
            self._out.read(project_id, room, room.last)

    def subscribed(self, project_id: str, room: RoomSequence, epoch: int) -> None:
        """
        Redis confirmed the room's SUBSCRIBE sent on subscriber connection
        C{epoch}: publish what waited for it, then catch up.
        """
        if self._rooms.get(project_id) is not room or epoch != self.epoch:
            return  # the room closed, or the connection it was sent on is gone
        room.subscribing = False
        room.confirmed = True
        backlog, room.backlog = room.backlog, []
        if backlog:
            self._out.release(project_id, backlog)
        self.sync(project_id)

    def read_done(
        self, project_id: str, room: RoomSequence, since: int | None, result: ReadResult
    ) -> None:
        """A read asked for by L{SequencerOutputs.read} answered."""
        room.reading = False
        if self._rooms.get(project_id) is not room:
            return  # the room closed meanwhile
        if since is None:
            room.last = result[0]
        else:
            self._caught_up(project_id, room, *result)
        self.sync(project_id)
        self._changed()

    def read_failed(self, project_id: str, room: RoomSequence, why: str) -> None:
        """A read failed: it is tried again when the command connection is back."""
        room.reading = False
        if self._rooms.get(project_id) is not room:
            return
        log.warn("reading the history of {project_id} failed: {why}",
                 project_id=project_id, why=why)
        self.sync(project_id)
        self._changed()

    def _caught_up(
        self,
        project_id: str,
        room: RoomSequence,
        seq: int,
        entries: list[bytes] | None,
        resync_at: int | None = None,
    ) -> None:
        """
        Deliver what the history holds after C{room.last}, then what
        waited.  When the history no longer reaches back that far, the
        members are told RESYNC_REQUIRED, at the seq before the events it
        still keeps (C{resync_at}), and get those, or at C{seq}.
        """
        last = room.last
        assert last is not None
        if entries is None or resync_at is not None:
            at = seq if resync_at is None else resync_at
            log.warn("{project_id}: events after {last} are no longer in the history; "
                     "RESYNC_REQUIRED at {at}", project_id=project_id, last=last, at=at)
            self._out.resync(project_id, at)
            room.last = last = at
        if entries is not None:
            if entries:
                log.info("{project_id}: delivering {n} events missed by the subscription",
                         project_id=project_id, n=len(entries) // 2)
            at = last + 1
            for i in range(0, len(entries), 2):
                if entries[i]:
                    self._from_history(project_id, room, at, entries[i], entries[i + 1])
                    at += 1
                else:  # the numbering jumped (a new Redis) with nothing missed: go on above it
                    room.last = int(entries[i + 1])
                    at = room.last + 1
            room.last = max(room.last or seq, seq)
        if room.overflow:
            room.overflow = False  # live events were dropped: read again
            return
        room.stale = False
        waiting, room.buffer = room.buffer, []
        for seq_, data, exclude in waiting:
            self.live(project_id, room, seq_, data, exclude)

    def _from_history(
        self, project_id: str, room: RoomSequence, seq: int, data: bytes, tag: bytes
    ) -> None:
        """Deliver one event read from the history (C{tag}: who sent it)."""
        if seq <= (room.last or 0):
            return
        room.last = seq
        instance, _, sender = tag.partition(b"\n")
        exclude = sender.decode("ascii") if sender and instance == self._instance else None
        self._deliver_frame(project_id, text_frame(data), exclude, seq)

    def live(
        self, project_id: str, room: RoomSequence, seq: int, data: bytes, exclude: str | None
    ) -> None:
        """One live event: deliver it if it is the next one, else catch up first."""
        if room.stale or room.last is None:
            if len(room.buffer) >= self.buffer_limit:
                room.buffer.clear()
                room.overflow = True
            room.buffer.append((seq, data, exclude))
            return
        if seq <= room.last:
            return  # delivered already, by a catch-up
        if seq > room.last + 1:
            log.warn("{project_id}: event {seq} arrived after {last}; reading the history "
                     "between (events lost on the way, or the numbering jumped after a "
                     "Redis failover or restart)", project_id=project_id, seq=seq, last=room.last)
            room.stale = True
            room.buffer.append((seq, data, exclude))
            self.sync(project_id)
            return
        room.last = seq
        self._deliver_frame(project_id, text_frame(data), exclude, seq)
        self._changed()  # a replay may wait for this seq
