"""
The intake's entries, pure: one stream entry validated as ``POST
/broadcast`` validates its body (L{parse_entry}), a batch sorted into the
appends, the dead letters and the ids to acknowledge (L{sort_batch}), and
the count of what was consumed with its throttled line about dead letters
(L{Tally}).  L{happyrobot.redis.intake} sends what these decide to Redis.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet.interfaces import IReactorTime

from happyrobot import logs, messages
from happyrobot.history import OpKey

log = logs.get_logger("happyrobot.redis.intake")

#: The user part of an intake entry's de-duplication key (a client's user
#: id is never empty, so the two never meet).
OP_USER = ""
#: At most one line about dead-lettered entries per this many seconds.
DEAD_LOG_SECONDS = 10.0


@dataclass(frozen=True)
class Entry:
    """A valid entry: the event to publish, and its de-duplication key."""

    id: bytes
    event: messages.Broadcast
    op_key: OpKey


@dataclass(frozen=True)
class Dead:
    """An entry that cannot be published: why, and its fields as they were."""

    id: bytes
    reason: str
    fields: list[bytes]


def parse_entry(entry_id: bytes, fields: list[bytes], max_bytes: int) -> Entry | Dead:
    """
    Validate one stream entry as ``POST /broadcast`` validates its body.
    Without an C{operationId}, the event gets C{intake-<entry id>}, so a
    second publication of the same entry is recognised too.

    @param max_bytes: MAX_BROADCAST_BYTES, the largest C{event} accepted.
    """
    event = None
    for name, value in zip(fields[::2], fields[1::2]):
        if name == b"event":
            event = value
            break
    if event is None:
        return Dead(entry_id, "Missing field: event", fields)
    if len(event) > max_bytes:
        return Dead(entry_id, f"Body larger than {max_bytes} bytes", fields)
    try:
        parsed = messages.parse_broadcast(event)
    except messages.BroadcastError as e:
        return Dead(entry_id, str(e), fields)
    op = parsed.operation_id
    if op is None:
        op = "intake-" + entry_id.decode("ascii")
        parsed = replace(parsed, operation_id=op)
    return Entry(entry_id, parsed, (OP_USER, op))


def stream_entries(reply: Any) -> list[tuple[bytes, list[bytes] | None]]:
    """The entries of an XREADGROUP reply on one stream (none for a timeout)."""
    if not reply:
        return []
    return [(e[0], e[1]) for e in reply[0][1]]


def id_ms(entry_id: bytes) -> int:
    """The time part of a stream entry id (when Redis appended it), in ms."""
    return int(entry_id.split(b"-", 1)[0])


@dataclass
class Batch:
    """
    What to do with one batch of entries: the appends (project id, the
    event as its room's frame, de-duplication key) in the entries' order,
    the dead letters, and every id to acknowledge once all is confirmed
    (entries deleted from the stream after they were read included).
    """

    appends: list[tuple[str, bytes, OpKey]] = field(default_factory=list)
    dead: list[Dead] = field(default_factory=list)
    ids: list[bytes] = field(default_factory=list)


def sort_batch(entries: list[tuple[bytes, list[bytes] | None]], max_bytes: int,
               now_ms: int) -> Batch:
    """Sort an XREADGROUP batch into appends and dead letters, stamping the events C{now_ms}."""
    batch = Batch()
    for entry_id, fields in entries:
        batch.ids.append(entry_id)
        if fields is None:
            continue  # deleted from the stream after it was read: nothing to publish
        parsed = parse_entry(entry_id, fields, max_bytes)
        if isinstance(parsed, Entry):
            event = parsed.event
            batch.appends.append((event.project_id, messages.broadcast(event, now_ms),
                                  parsed.op_key))
        else:
            batch.dead.append(parsed)
    return batch


class Tally:
    """
    The entries this instance consumed and dead-lettered, and at most one
    line per L{DEAD_LOG_SECONDS} about the dead letters (with how many
    there were since the last line).
    """

    def __init__(self, dead_stream: str, clock: IReactorTime) -> None:
        self.dead_stream = dead_stream
        self.consumed = 0
        self.dead = 0
        self._dead_log = logs.Throttle(DEAD_LOG_SECONDS, clock)

    def acknowledged(self, batch: Batch) -> None:
        """Count a batch whose entries are all acknowledged now."""
        dead = len(batch.dead)
        self.consumed += len(batch.ids) - dead
        self.dead += dead
        for _ in range(dead):
            n = self._dead_log.due()
            if n:
                log.warn("intake: {n} bad entries moved to {dead} (its reason field "
                         "says why)", n=n, dead=self.dead_stream)
