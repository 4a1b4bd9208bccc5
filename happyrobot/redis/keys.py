"""
Redis names and message formats of the bus (pure: no I/O).

Instances of this version and the previous one share a Redis, so none of
these may change.

  - channel ``happyrobot:project:<projectId>``: one message per event, an
    envelope of five newline-separated fields,
    C{kind \\n instance id \\n sender client id (may be empty) \\n seq
    (may be empty) \\n body}.  Kind C{E} is an event: its seq and its JSON
    (with ``seq``), framed by each receiving instance once for all its
    members; kind C{P} (no seq, empty body) says the room's presence
    changed; kind C{B} (a batch) carries several consecutive events of
    the room in its body, each as C{sender \\n seq \\n length \\n JSON}
    (see L{unpack_batch}), its seq field the first one's.
  - string ``happyrobot:seq:<projectId>``: the room's last seq.  Made,
    when missing, as the Redis time in milliseconds minus one, so numbers
    given out after a data loss are higher than any before it (the epoch
    idea of L{happyrobot.history}).  It expires C{history_ttl} after the
    last event, refreshed meanwhile by every instance with local members.
  - stream ``happyrobot:history:<projectId>``: the room's recent events,
    entry ID C{<seq>-0}, fields C{t} (Redis time in ms), C{e} (the JSON
    with ``seq``) and, for a client's event, C{s} (C{instance \\n client
    id}, so a catch-up skips the sender as live delivery does).  Trimmed
    by count (C{MAXLEN ~ history_size}) and by age (C{XTRIM MINID} past the
    front entries older than C{history_ttl}).
  - string ``happyrobot:op:<JSON [projectId, userId, operationId]>``: the
    seq of an acknowledged event, for C{history_ttl}, so a retry is
    recognised while the event is in the history.
  - hash ``happyrobot:presence:<projectId>``: one field per instance with
    local members in the room, its value the JSON list of their
    USER_PRESENCE entries.
  - string ``happyrobot:instance:<instanceId>``, with a TTL of
    ``INSTANCE_TTL`` refreshed by heartbeats every third of it: JSON
    C{{"startedAt", "connections", "projects": {projectId: [clientId]}}}.
    Its expiry is how the others learn that an instance died.
  - set ``happyrobot:instances``: instance ids, for ``/stats``.
  - channel ``happyrobot:control``: operator calls (revoke, disconnect)
    for every instance, as JSON C{{"op", "id", "from", "userId",
    "projectId"?, "reason"?}}; each instance acts on its connections and
    answers on the caller's channel ``happyrobot:control:reply:<instanceId>``
    with C{{"id", "instance", "connections"}}.

Both keys of a room are named in a script's C{KEYS}; they are not
hash-tagged, so this is for a single Redis (or one with replicas), not
Redis Cluster.
"""

from __future__ import annotations

import os
import secrets
import socket
from typing import Any

from happyrobot import messages
from happyrobot.history import OpKey

CHANNEL_PREFIX = b"happyrobot:project:"
SEQ_PREFIX = b"happyrobot:seq:"
HISTORY_PREFIX = b"happyrobot:history:"
OP_PREFIX = b"happyrobot:op:"
PRESENCE_PREFIX = b"happyrobot:presence:"
INSTANCE_PREFIX = b"happyrobot:instance:"
INSTANCES_KEY = b"happyrobot:instances"
CONTROL_CHANNEL = b"happyrobot:control"
#: Every control channel's name begins so (and no room's does).
CONTROL_PREFIX = CONTROL_CHANNEL
#: Envelope kinds: an event, a presence change.
EVENT = b"E"
PRESENCE = b"P"
#: Envelope kind: several events of one room, numbered consecutively.
BATCH = b"B"


def _name(project_id: str) -> bytes:
    return project_id.encode("utf-8", "surrogatepass")


def channel_name(project_id: str) -> bytes:
    """The Redis channel of one room (binary-safe for any project id)."""
    return CHANNEL_PREFIX + _name(project_id)


def presence_key(project_id: str) -> bytes:
    """The Redis hash of one room's members, by instance."""
    return PRESENCE_PREFIX + _name(project_id)


def instance_key(instance_id: bytes) -> bytes:
    """The Redis key that lives as long as the instance sends heartbeats."""
    return INSTANCE_PREFIX + instance_id


def seq_key(project_id: str) -> bytes:
    """The Redis string holding a room's last seq."""
    return SEQ_PREFIX + _name(project_id)


def history_key(project_id: str) -> bytes:
    """The Redis stream of a room's recent events."""
    return HISTORY_PREFIX + _name(project_id)


def op_key_name(project_id: str, op_key: OpKey) -> bytes:
    """The Redis string remembering the seq of one acknowledged operation."""
    return OP_PREFIX + messages.dumps([project_id, op_key[0], op_key[1]])


def reply_channel(instance_id: bytes) -> bytes:
    """The channel on which an instance receives the answers to its operator calls."""
    return CONTROL_CHANNEL + b":reply:" + instance_id


def new_instance_id() -> str:
    """A name for this process that is unique in the deployment and readable in /stats."""
    host = "".join(c for c in socket.gethostname()[:64] if c.isprintable() and not c.isspace())
    return f"{host or 'host'}-{os.getpid()}-{secrets.token_hex(3)}"


def pack_envelope(
    kind: bytes, instance_id: bytes, sender: str | None, body: bytes, seq: int | None = None
) -> bytes:
    """One Redis message: kind, publishing instance, sending client, seq, body."""
    return envelope_head(kind, instance_id, sender) + (b"%d" % seq if seq is not None else b"") \
        + b"\n" + body


def envelope_head(kind: bytes, instance_id: bytes, sender: str | None) -> bytes:
    """The first three fields of an envelope (the append script adds the seq and body)."""
    return b"\n".join((kind, instance_id, (sender or "").encode("ascii"), b""))


def unpack_envelope(data: bytes) -> tuple[bytes, bytes, str | None, int | None, bytes]:
    """
    The fields of L{pack_envelope}; the sender and seq are None when empty.

    @raise ValueError: when C{data} is not an envelope.
    """
    kind, instance_id, sender, seq, body = data.split(b"\n", 4)
    return kind, instance_id, sender.decode("ascii") or None, int(seq) if seq else None, body


def unpack_batch(body: bytes) -> list[tuple[str | None, int, bytes]]:
    """
    The events of a C{B} envelope's body, in order: (sender client id or
    None, seq, JSON with ``seq``).

    @raise ValueError: when C{body} is not a batch.
    """
    events = []
    pos, size = 0, len(body)
    while pos < size:
        a = body.index(b"\n", pos)
        b = body.index(b"\n", a + 1)
        c = body.index(b"\n", b + 1)
        end = c + 1 + int(body[b + 1:c])
        if end > size:
            raise ValueError("truncated batch")
        events.append((body[pos:a].decode("ascii") or None, int(body[a + 1:b]), body[c + 1:end]))
        pos = end
    return events


def pack_batch(instance_id: bytes, events: list[tuple[str | None, int, bytes]]) -> bytes:
    """A C{B} envelope as the batch script publishes it (for tests)."""
    body = b"".join(
        b"%s\n%d\n%d\n%s" % ((sender or "").encode("ascii"), seq, len(data), data)
        for sender, seq, data in events
    )
    return envelope_head(BATCH, instance_id, None) + b"%d" % events[0][1] + b"\n" + body


def sender_tag(instance_id: bytes, sender: str | None) -> bytes:
    """What a history entry keeps of its sender (C{instance \\n client id}), or b""."""
    return instance_id + b"\n" + sender.encode("ascii") if sender else b""


def merge_presence(lists: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The presence entries of every instance as one list, in join order."""
    merged = [entry for entries in lists for entry in entries]
    merged.sort(key=lambda e: (e.get("joinedAt") or 0, str(e.get("clientId"))))
    return merged


def merge_stats(instances: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """
    ``/stats`` for the whole deployment from each instance's snapshot
    (C{{"connections": n, "projects": {projectId: [clientId]}}}).
    """
    projects: dict[str, list[str]] = {}
    for snapshot in instances.values():
        for project_id, clients in snapshot.get("projects", {}).items():
            projects.setdefault(project_id, []).extend(clients)
    return {
        "totalClients": sum(int(s.get("connections", 0)) for s in instances.values()),
        "totalProjects": len(projects),
        "projectStats": {
            pid: {"clientCount": len(ids), "clients": ids} for pid, ids in projects.items()
        },
        "instances": {
            iid: {
                "clients": int(s.get("connections", 0)),
                "projects": len(s.get("projects", {})),
                "startedAt": s.get("startedAt"),
            }
            for iid, s in instances.items()
        },
    }
