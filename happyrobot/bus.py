"""
Fan-out of room events.  The rest of the server publishes through a L{Bus}
and never delivers to sockets itself, so one process and many processes
behind a shared broker look the same to it.

L{LocalBus} is the embedded engine, used when no ``REDIS_URL`` is set: it
hands each event straight to this process's room registry.

L{RedisBus} is used when ``REDIS_URL`` is set: every instance of the
deployment publishes its rooms' events to Redis and delivers, from its
subscriptions, the events of the rooms it has local members in.  This
module is the only importer of txredisapi, and it imports it lazily (inside
L{RedisBus.startService}), because importing txredisapi installs the global
reactor.

Redis names (see also the README):

  - channel ``happyrobot:project:<projectId>``: one message per event, an
    envelope of five newline-separated fields,
    C{kind \\n instance id \\n sender client id (may be empty) \\n seq
    (may be empty) \\n body}.  Kind C{E} is an event: its seq and its JSON
    (with ``seq``), framed by each receiving instance once for all its
    members; kind C{P} (no seq, empty body) says the room's presence
    changed; kind C{B} (a batch) carries several consecutive events of
    the room in its body, each as C{sender \n seq \n length \n JSON}
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

Numbering, storing and publishing an event is one Lua script
(L{APPEND_SCRIPT}; the events of one room appended during one incoming
read, or one reactor turn, go through L{BATCH_SCRIPT} together, as one
C{B} message), so the channel carries every room's events in seq order; reading the history is another (L{READ_SCRIPT}).  Both keys of a
room are named in C{KEYS}; they are not hash-tagged, so this is for a
single Redis (or one with replicas), not Redis Cluster.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
import os
import random
import secrets
import socket
from typing import Any, Callable, Protocol

import orjson
from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from happyrobot import logs, messages
from happyrobot.config import RedisAddress, redis_address
from happyrobot.framing import text_frame
from happyrobot.history import Histories, OpKey
from happyrobot.messages import ProtocolError
from happyrobot.rooms import RoomRegistry

log = logs.get_logger(__name__)

CHANNEL_PREFIX = b"happyrobot:project:"
SEQ_PREFIX = b"happyrobot:seq:"
HISTORY_PREFIX = b"happyrobot:history:"
OP_PREFIX = b"happyrobot:op:"
PRESENCE_PREFIX = b"happyrobot:presence:"
INSTANCE_PREFIX = b"happyrobot:instance:"
INSTANCES_KEY = b"happyrobot:instances"
#: Envelope kinds: an event, a presence change.
EVENT = b"E"
PRESENCE = b"P"
#: Envelope kind: several events of one room, numbered consecutively.
BATCH = b"B"
#: How long clean-up commands may take when the service stops.
GOODBYE_TIMEOUT_SECONDS = 2.0
#: At most one "Redis unreachable" line per this many seconds.
UNREACHABLE_LOG_SECONDS = 10.0
#: An event sent to Redis without an answer: it may or may not be stored.
#: Sent again with "ack": true and the same operationId, it is recognised
#: if it was stored (not delivered twice); without ack it may be.
UNCONFIRMED = "Redis did not confirm the event; it may have been stored"
#: First and longest wait between reconnection attempts (exponential backoff).
RECONNECT_INITIAL_DELAY_SECONDS = 0.5
RECONNECT_MAX_DELAY_SECONDS = 10.0
#: How long a replay waits for the live events it covers to reach this
#: instance (normally a round trip; longer only while Redis is away).
REPLAY_DELIVERY_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Replay:
    """What a client resuming with ``since`` missed."""

    #: The room's events after ``since`` (JSON with ``seq``), oldest first;
    #: None when the history no longer reaches back that far.
    events: list[bytes] | None
    #: The room's latest seq when the history was read.
    seq: int


class Bus(Protocol):
    """What the WebSocket and HTTP adapters publish through."""

    @property
    def healthy(self) -> bool:
        """Whether events currently reach every instance."""

    def append(
        self,
        project_id: str,
        event: bytes,
        exclude: str | None = None,
        op_key: OpKey | None = None,
    ) -> Deferred[int]:
        """
        Number C{event} (a serialised JSON object) as the room's next event
        across the deployment, keep it in the room's history, and deliver it
        with its ``seq`` to every member of the room but connection
        C{exclude}.  Fires with the seq.  With the C{op_key} of an event
        still in the history (a retry), fires with the original seq and
        delivers nothing.
        """

    def flush(self) -> None:
        """
        Send the appends made so far (the end of an incoming read); they are
        also sent on the next reactor turn without it.
        """

    def replay(self, project_id: str, since: int) -> Deferred[Replay]:
        """
        The room's events after C{since}.  The caller has joined the room
        with C{hold=True}, so live events wait for it meanwhile; the history
        is read once this instance is sure to receive the room's live
        events, so that nothing falls between the two.
        """

    def member_count(self, project_id: str) -> Deferred[int]:
        """How many connections are in the room, across the deployment."""


class LocalBus:
    """The in-memory engine: one process, delivery in the same call."""

    healthy = True

    def __init__(self, registry: RoomRegistry, histories: Histories, clock: IReactorTime) -> None:
        self._registry = registry
        self._histories = histories
        self._clock = clock

    def append(
        self,
        project_id: str,
        event: bytes,
        exclude: str | None = None,
        op_key: OpKey | None = None,
    ) -> Deferred[int]:
        now = self._clock.seconds()
        seq, data = self._histories.append(project_id, event, now, op_key)
        if data is not None:
            self._registry.deliver(project_id, text_frame(data), exclude, seq)
        return succeed(seq)

    def flush(self) -> None:
        """Nothing waits: L{append} delivers at once."""

    def replay(self, project_id: str, since: int) -> Deferred[Replay]:
        now = self._clock.seconds()
        history = self._histories.get(project_id, now)
        return succeed(Replay(history.since(since, now), history.seq))

    def member_count(self, project_id: str) -> Deferred[int]:
        return succeed(self._registry.member_count(project_id))

    def sweep(self) -> None:
        """Forget the histories whose events have all aged out."""
        self._histories.sweep(self._clock.seconds())


# ------------------------------------------------------------------ Redis


def channel_name(project_id: str) -> bytes:
    """The Redis channel of one room (binary-safe for any project id)."""
    return CHANNEL_PREFIX + project_id.encode("utf-8", "surrogatepass")


def presence_key(project_id: str) -> bytes:
    """The Redis hash of one room's members, by instance."""
    return PRESENCE_PREFIX + project_id.encode("utf-8", "surrogatepass")


def instance_key(instance_id: bytes) -> bytes:
    """The Redis key that lives as long as the instance sends heartbeats."""
    return INSTANCE_PREFIX + instance_id


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


def seq_key(project_id: str) -> bytes:
    """The Redis string holding a room's last seq."""
    return SEQ_PREFIX + project_id.encode("utf-8", "surrogatepass")


def history_key(project_id: str) -> bytes:
    """The Redis stream of a room's recent events."""
    return HISTORY_PREFIX + project_id.encode("utf-8", "surrogatepass")


def op_key_name(project_id: str, op_key: OpKey) -> bytes:
    """The Redis string remembering the seq of one acknowledged operation."""
    return OP_PREFIX + messages.dumps([project_id, op_key[0], op_key[1]])


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
    """A C{B} envelope as L{BATCH_SCRIPT} publishes it (for tests)."""
    body = b"".join(
        b"%s\n%d\n%d\n%s" % ((sender or "").encode("ascii"), seq, len(data), data)
        for sender, seq, data in events
    )
    return envelope_head(BATCH, instance_id, None) + b"%d" % events[0][1] + b"\n" + body


class Unavailable(ProtocolError):
    """
    Redis cannot be reached: the event was not numbered (so it was sent to
    nobody), or the history could not be read.  An C{ERROR} with code
    C{UNAVAILABLE}; the client retries (an event with the same
    operationId is not delivered twice).
    """

    def __init__(self, message: str) -> None:
        super().__init__("UNAVAILABLE", message)


#: Lua shared by both scripts.  Redis time is frozen while a script runs,
#: so every key expires (or not) as of the same instant.
_LUA_COMMON = r"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function num(n)
  return string.format('%d', n)
end

local function id_seq(id)
  return tonumber(string.match(id, '^(%d+)'))
end

-- Drop the front entries added before cutoff (field t, first of each
-- entry); return the oldest seq kept, or nil when none is left.
local function trim_age(stream, cutoff)
  local count = 1
  while true do
    local batch = redis.call('XRANGE', stream, '-', '+', 'COUNT', count)
    if #batch == 0 then return nil end
    for i, entry in ipairs(batch) do
      if tonumber(entry[2][2]) >= cutoff then
        if i > 1 then redis.call('XTRIM', stream, 'MINID', entry[1]) end
        return id_seq(entry[1])
      end
    end
    redis.call('XTRIM', stream, 'MINID', num(id_seq(batch[#batch][1])) .. '-1')
    if #batch < count then return nil end
    count = 128
  end
end

-- The room's last seq, starting a new epoch (now in ms) when it is missing.
local function current_seq(seq_key, stream, now, ttl)
  local seq = redis.call('GET', seq_key)
  if seq then return tonumber(seq) end
  seq = now - 1
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  if #last > 0 and id_seq(last[1][1]) > seq then seq = id_seq(last[1][1]) end
  redis.call('SET', seq_key, num(seq), 'PX', ttl)
  return seq
end
"""

#: Number, store and publish one event.
#: KEYS: seq key, history stream, [op key].  ARGV: the event's JSON
#: (without seq), channel, envelope head, history size, history TTL in ms,
#: sender tag (or '').  Returns {seq, 1 if a retry of a kept event else 0}.
APPEND_SCRIPT = _LUA_COMMON + r"""
local now = now_ms()
local ttl = tonumber(ARGV[5])
local oldest = trim_age(KEYS[2], now - ttl)
current_seq(KEYS[1], KEYS[2], now, ttl)
if KEYS[3] then
  local seen = redis.call('GET', KEYS[3])
  if seen and oldest and tonumber(seen) >= oldest then
    return {tonumber(seen), 1}
  end
end
local seq = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ttl)
local s = num(seq)
local data = string.sub(ARGV[1], 1, -2) .. ',"seq":' .. s .. '}'
if ARGV[6] ~= '' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], s .. '-0',
             't', num(now), 'e', data, 's', ARGV[6])
else
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], s .. '-0', 't', num(now), 'e', data)
end
redis.call('PEXPIRE', KEYS[2], ttl)
if KEYS[3] then redis.call('SET', KEYS[3], s, 'PX', ttl) end
redis.call('PUBLISH', ARGV[2], ARGV[3] .. s .. '\n' .. data)
return {seq, 0}
"""

#: Number, store and publish several events of one room, consecutively,
#: as one C{B} envelope (events that are retries of kept ones are left
#: out and answered with their original seq, as in L{APPEND_SCRIPT}).
#: KEYS: seq key, history stream, op keys.  ARGV: channel, envelope head
#: (kind B, no sender), history size, history TTL in ms, event count, then
#: four per event: its JSON (without seq), sender tag (or ''), sender
#: client id (or ''), index of its op key in KEYS (0 for none).  Returns
#: {seq, retry (1 or 0)} per event, flattened.
BATCH_SCRIPT = _LUA_COMMON + r"""
local now = now_ms()
local ttl = tonumber(ARGV[4])
trim_age(KEYS[2], now - ttl)
local seq = current_seq(KEYS[1], KEYS[2], now, ttl)
local first = seq + 1
local t = num(now)
local reply = {}
local parts = {}
for i = 0, tonumber(ARGV[5]) - 1 do
  local at = 6 + i * 4
  local tag = ARGV[at + 1]
  local k = tonumber(ARGV[at + 3])
  local dup = nil
  if k > 0 then
    local seen = redis.call('GET', KEYS[k])
    if seen then
      -- Kept while its event is in the history (whose front only moves
      -- forward within a script: trimmed by age above, by count below).
      local front = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
      if #front > 0 and tonumber(seen) >= id_seq(front[1][1]) then dup = tonumber(seen) end
    end
  end
  if dup then
    reply[#reply + 1] = dup
    reply[#reply + 1] = 1
  else
    seq = seq + 1
    local s = num(seq)
    local data = string.sub(ARGV[at], 1, -2) .. ',"seq":' .. s .. '}'
    if tag ~= '' then
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], s .. '-0', 't', t, 'e', data, 's', tag)
    else
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], s .. '-0', 't', t, 'e', data)
    end
    if k > 0 then redis.call('SET', KEYS[k], s, 'PX', ttl) end
    parts[#parts + 1] = ARGV[at + 2] .. '\n' .. s .. '\n' .. num(#data) .. '\n' .. data
    reply[#reply + 1] = seq
    reply[#reply + 1] = 0
  end
end
if #parts > 0 then
  redis.call('SET', KEYS[1], num(seq), 'PX', ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PUBLISH', ARGV[1], ARGV[2] .. num(first) .. '\n' .. table.concat(parts))
end
return reply
"""

#: Read a room's events after a seq.
#: KEYS: seq key, history stream.  ARGV: since ('' for the seq alone),
#: history size, history TTL in ms, '1' to get what is kept when the
#: history does not reach back to since.  Returns
#: {seq, 1, event, sender tag, event, sender tag, ...} oldest first, or
#: when the history does not reach back to since (or since is above seq)
#: {seq, 0}; with ARGV[4] '1', rather every event still in the stream
#: after since ({seq, 1, ...}, even beyond the history size), or if the
#: stream does not reach back to since either, {seq, 2, oldest - 1, event,
#: sender tag, ...}: every event it keeps, after oldest - 1.
READ_SCRIPT = _LUA_COMMON + r"""
local now = now_ms()
local ttl = tonumber(ARGV[3])
local oldest = trim_age(KEYS[2], now - ttl)
local seq = current_seq(KEYS[1], KEYS[2], now, ttl)
local function read_after(from, reply)
  local entries = redis.call('XRANGE', KEYS[2], num(from + 1) .. '-0', num(seq) .. '-0')
  if #entries ~= seq - from then return nil end
  for _, entry in ipairs(entries) do
    reply[#reply + 1] = entry[2][4]
    reply[#reply + 1] = entry[2][6] or ''
  end
  return reply
end
local function not_kept(since)
  if ARGV[4] == '1' and oldest and oldest <= seq then
    -- Beyond HISTORY_SIZE but still in the stream (trimmed roughly): all of it.
    local reply = since >= oldest - 1 and since < seq and read_after(since, {seq, 1})
    if reply then return reply end
    reply = read_after(oldest - 1, {seq, 2, oldest - 1})
    if reply then return reply end
  end
  return {seq, 0}
end
if ARGV[1] == '' then return {seq, 0} end
local since = tonumber(ARGV[1])
if since > seq or seq - since > tonumber(ARGV[2]) then return not_kept(since) end
if since == seq then return {seq, 1} end
if not oldest or oldest > since + 1 then return not_kept(since) end
return read_after(since, {seq, 1}) or not_kept(since)
"""


class _Script:
    """A Lua script and its SHA1, for EVALSHA."""

    __slots__ = ("source", "sha")

    def __init__(self, source: str) -> None:
        self.source = source.encode("utf-8")
        self.sha = hashlib.sha1(self.source).hexdigest().encode("ascii")


#: Remove the presence fields (ARGV) of a room's hash (KEYS[1]) whose
#: instances' heartbeat keys (KEYS[2...], in the same order) are gone, in
#: one step: an instance that registers again between a read of its key and
#: a separate HDEL would lose its fresh field for good.
REAP_SCRIPT = r"""
local removed = 0
for i, instance in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    removed = removed + redis.call('HDEL', KEYS[1], instance)
  end
end
return removed
"""

_APPEND = _Script(APPEND_SCRIPT)
_BATCH = _Script(BATCH_SCRIPT)
_READ = _Script(READ_SCRIPT)
_REAP = _Script(REAP_SCRIPT)


def new_instance_id() -> str:
    """A name for this process that is unique in the deployment and readable in /stats."""
    host = "".join(c for c in socket.gethostname()[:64] if c.isprintable() and not c.isspace())
    return f"{host or 'host'}-{os.getpid()}-{secrets.token_hex(3)}"


class _Channel:
    """
    This instance's subscription to one room that has local members, and
    where its delivery of the room's events stands.

    The room's events reach the local members in seq order with no gap
    and no duplicate from C{last} on (see L{RedisBus}): a live event
    numbered C{last + 1} is delivered at once; anything else waits in
    C{buffer} while the missing range is read from the history.

    Until Redis confirms the SUBSCRIBE, presence announcements wait in
    C{backlog}: publishing them at once could overtake the SUBSCRIBE (the
    two go over different connections) and our own members would miss
    them.
    """

    __slots__ = ("confirmed", "subscribing", "backlog", "last", "stale", "reading",
                 "buffer", "overflow")

    def __init__(self) -> None:
        self.confirmed = False
        self.subscribing = False
        #: (envelope, local fallback) in publishing order; the fallback
        #: serves the local members if the envelope never reaches Redis.
        self.backlog: list[tuple[bytes, Callable[[], object]]] = []
        #: The last seq delivered (or known to be before our members'
        #: time); None until read, before the first SUBSCRIBE.
        self.last: int | None = None
        #: Events may be missing after C{last}: read the history before
        #: delivering more (set on every (re)subscription and on a gap).
        self.stale = True
        #: A script reading this room's seq or history is running.
        self.reading = False
        #: Live events waiting while stale: (seq, JSON, excluded client).
        self.buffer: list[tuple[int, bytes, str | None]] = []
        #: The buffer overflowed and was dropped: read again afterwards.
        self.overflow = False

    @property
    def synced(self) -> bool:
        """Subscribed, and everything up to C{last} delivered."""
        return self.confirmed and not self.stale and not self.reading


class _RedisClientFactory(Factory):
    """
    Builds txredisapi protocols for one L{ClientService} and tells the bus
    when a connection becomes usable and when it is lost.
    """

    noisy = False
    #: txredisapi: on a failed AUTH/SELECT, log instead of failing a Deferred.
    isLazy = True

    def __init__(
        self,
        protocol_class: type,
        address: RedisAddress,
        select_db: bool,
        ready: Callable[[Any], None],
        lost: Callable[[Any], None],
        reactor: Any,
        reply_timeout: float,
    ) -> None:
        self.protocol_class = protocol_class
        self.address = address
        self.select_db = select_db
        self.ready = ready
        self.lost = lost
        self.reactor = reactor
        self.reply_timeout = reply_timeout

    def buildProtocol(self, addr: Any) -> Any:
        a = self.address
        proto = self.protocol_class(
            charset=None,  # frames are bytes, not text: no decoding
            convertNumbers=False,
            password=a.password,
            username=a.username,
            dbid=a.db if self.select_db and a.db else None,
            # A Redis that stops answering (hung, or cut off by a network
            # partition, with the TCP connection still open) fails the
            # command and drops the connection after this long, as if it
            # had closed: the bus reports it and reconnects.
            replyTimeout=self.reply_timeout,
        )
        proto.callLater = self.reactor.callLater  # txredisapi's own timer: the global reactor
        proto.factory = self
        return proto

    def stopTrying(self) -> None:
        """txredisapi calls this when AUTH or SELECT fails; keep retrying with backoff."""

    def connectionError(self, why: str) -> None:
        log.error("Redis refused this server: {why}", why=why)


class _Incomplete(Exception):
    """The buffer ends inside a reply; C{need} is how long it must at least be."""

    def __init__(self, need: int) -> None:
        self.need = need


def _parse_reply(buf: bytes, pos: int) -> tuple[Any, int]:
    """
    One RESP2 reply of C{buf} from C{pos}, as txredisapi's own parser gives
    it with C{charset=None} and C{convertNumbers=False} (a status as str,
    an error as C{ResponseError}, an integer as int, a bulk string as bytes
    or None, an array as a list or None), and where the next one starts.

    @raise _Incomplete: when C{buf} ends before the reply does.
    @raise ValueError: when C{buf} is not RESP.
    """
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete(len(buf) + 1)
    kind = buf[pos]
    if kind == 36:  # $ bulk string
        n = int(buf[pos + 1:end])
        if n < 0:
            return None, end + 2
        start = end + 2
        stop = start + n
        if len(buf) < stop + 2:
            raise _Incomplete(stop + 2)
        return buf[start:stop], stop + 2
    if kind == 42:  # * array
        n = int(buf[pos + 1:end])
        if n < 0:
            return None, end + 2
        items = []
        pos = end + 2
        for _ in range(n):
            item, pos = _parse_reply(buf, pos)
            items.append(item)
        return items, pos
    if kind == 58:  # : integer
        return int(buf[pos + 1:end]), end + 2
    if kind == 43:  # + status
        return buf[pos + 1:end].decode(), end + 2
    if kind == 45:  # - error
        from txredisapi import ResponseError

        text = buf[pos + 1:end].decode(errors="replace")
        return ResponseError(text), end + 2
    raise ValueError(f"not a Redis reply: {buf[pos:pos + 1]!r}")


class _WholeReadParser:
    """
    Replaces txredisapi's pure-Python reply parser on the subscriber
    connection.  That parser hands the rest of a read to C{callLater(0)}
    after every bulk string, so each published message (three of them)
    was handled on a reactor turn of its own, and each event was written
    to every recipient with a C{send()} of its own.  This one handles
    every complete reply of a read in the same call, so a burst of events
    that arrived together is written together (one C{send()} per recipient
    per turn, as with the embedded engine).
    """

    _rest = b""
    #: The length the buffer must reach before the last incomplete reply
    #: can be complete (so a large message is not parsed again per chunk).
    _need = 0

    def dataReceived(self, data: bytes, unpause: bool = False) -> None:
        buf = self._rest + data if self._rest else data
        if len(buf) < self._need:
            self._rest = buf
            return
        pos, size = 0, len(buf)
        reply_received = self.replyReceived  # type: ignore[attr-defined]
        self._rest, self._need = b"", 0
        while pos < size:
            try:
                reply, pos = _parse_reply(buf, pos)
            except _Incomplete as incomplete:
                self._rest, self._need = buf[pos:], incomplete.need - pos
                return
            except (ValueError, IndexError):
                log.error("Redis sent something that is not a reply; reconnecting")
                self.transport.abortConnection()  # type: ignore[attr-defined]
                return
            reply_received(reply)


@functools.cache
def _protocol_classes() -> tuple[type, type]:
    """txredisapi's command and subscriber protocols, hooked to report to the bus."""
    import txredisapi

    def ready_when_connected(proto: Any, d: Deferred[Any]) -> Deferred[Any]:
        # txredisapi's connectionMade authenticates and selects the database
        # before the connection is usable; _ready says whether it got there.
        # Then Redis must answer a PING: the kernel of a hung Redis still
        # accepts connections.
        def answered(_: object) -> None:
            try:
                proto.factory.ready(proto)
            except Exception:
                log.failure("error setting up a Redis connection")

        def refused(failure: Failure) -> None:
            # A timeout has dropped the connection already; an error reply
            # (LOADING while Redis reads its data, NOAUTH, ...) has not:
            # drop it, and the service connects again after its backoff.
            if not failure.check("txredisapi.ConnectionError"):
                log.warn("Redis answered PING with {why}; connecting again",
                         why=failure.getErrorMessage())
                proto.transport.abortConnection()

        def ping(_: object) -> None:
            if proto._ready:
                proto.ping().addCallbacks(answered, refused)

        return d.addCallback(ping)

    class CommandProtocol(txredisapi.RedisProtocol):
        def connectionMade(self) -> Deferred[Any]:
            return ready_when_connected(self, super().connectionMade())

        def connectionLost(self, why: Failure) -> None:
            super().connectionLost(why)
            self.factory.lost(self)

    class SubscriberProtocol(_WholeReadParser, txredisapi.SubscriberProtocol):
        def connectionMade(self) -> Deferred[Any]:
            return ready_when_connected(self, super().connectionMade())

        def connectionLost(self, why: Failure) -> None:
            super().connectionLost(why)
            self.factory.lost(self)

        def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
            self.factory.message(channel, message)

        def dataReceived(self, data: bytes, unpause: bool = False) -> None:
            super().dataReceived(data, unpause)
            self.factory.read_done()

    return CommandProtocol, SubscriberProtocol


class RedisBus(Service):
    """
    Fan-out, presence and statistics through Redis for a deployment of
    many instances.

    Two connections, each kept up by a L{ClientService} with exponential
    backoff: one for commands and one in subscriber mode (Redis allows
    nothing but (UN)SUBSCRIBE and PING on it).  The instance subscribes to
    a room's channel when the room gets its first local member and
    unsubscribes when it loses its last one (the registry tells us through
    L{room_opened} and L{room_closed}).

    Ordering: every instance, the sender's included, delivers events from
    its subscription, never directly.  L{append} runs one Lua script that
    numbers the event (the room's seq key), stores it in the room's stream
    and PUBLISHes it (the appends of one room waiting for L{flush}, at the
    end of an incoming read or of the reactor turn, are numbered
    consecutively by one script call and published as one C{B} envelope,
    whose events receivers take one by one as if they had come singly); Redis runs scripts one at a time and sends each
    channel's messages to every subscriber in that order, so every
    instance receives a room's events in seq order.  The sending
    connection is skipped by comparing the envelope's (instance id,
    client id) with our own.

    No gap, no duplicate: each room remembers the last seq it delivered
    (L{_Channel.last}).  When a room opens, that is its seq as read before
    the SUBSCRIBE is sent; after every (re)subscription, and whenever a
    live event skips a number, the history after C{last} is read and
    delivered first (live events wait meanwhile, and those already
    delivered are dropped by seq), or, if the history no longer reaches
    back that far (e.g. Redis lost its data), every local member of the
    room gets RESYNC_REQUIRED with the current seq.  So events published
    while our subscription was down, or before it was confirmed, are
    delivered late but in order, never silently lost.  L{replay} reads the
    history for a resuming client only once its room is in that state, so
    every later event reaches the client's hold.

    Presence: each instance keeps its local members of a room in the room's
    presence hash (one field per instance) and publishes a C{P} envelope on
    every change; on a C{P} every instance with local members reads the
    hash, drops the fields of instances whose heartbeat key has expired,
    and sends the merged USER_PRESENCE to its members.  A heartbeat every
    third of C{instance_ttl} refreshes our key; it also checks the other
    instances seen in our rooms, and when one has expired (a crash) removes
    its field and announces the change, so its members disappear within
    about 1.3 C{instance_ttl}.  That check and the removal are one script
    (an instance registering again in between keeps its field).  A room's
    presence hash expires C{history_ttl_seconds} (at least 3
    C{instance_ttl}) after the last instance with members there stopped
    refreshing it (a crash of the last one).

    Faults: while either connection is down the bus is not L{healthy}
    (``/health`` says degraded).  While the command connection is down
    L{append} and L{replay} fail with L{Unavailable} (an ERROR with code
    C{UNAVAILABLE}: the client retries, and a retry of an event sent with
    ack and the same operationId is not delivered twice): an event
    delivered locally without a seq would either be missing from the
    history or make a gap that no one could fill.  Presence is still announced to our own
    members.  A Redis that keeps the connections open but stops
    answering (hung, or cut off by a partition) is found by the reply
    timeout, half of C{instance_ttl}: a command it does not answer in
    time, or the PING that each heartbeat sends on the subscriber
    connection, fails, and the connection is dropped as if Redis had
    closed it.  A new connection is used once Redis has answered a PING
    on it.  On reconnection the scripts are loaded again (and once more
    on NOSCRIPT), every room with local members is subscribed again
    (txredisapi keeps no list of subscriptions) and caught up as above,
    and our presence is registered again.
    """

    def __init__(
        self,
        registry: RoomRegistry,
        url: str,
        reactor: Any,
        instance_id: str | None = None,
        instance_ttl: float = 10.0,
        reconnect_initial_delay: float = RECONNECT_INITIAL_DELAY_SECONDS,
        reconnect_max_delay: float = RECONNECT_MAX_DELAY_SECONDS,
        history_size: int = 1000,
        history_ttl_seconds: float = 300.0,
    ) -> None:
        self._registry = registry
        #: Bounds of each room's history (HISTORY_SIZE, HISTORY_TTL_SECONDS).
        self.history_size = history_size
        self.history_ttl_seconds = history_ttl_seconds
        self._address = redis_address(url)
        self._reactor = reactor
        self.instance_id = instance_id or new_instance_id()
        self._instance = self.instance_id.encode("utf-8")
        self.instance_ttl = instance_ttl
        #: How long Redis may take to answer a command before the link
        #: counts as lost (half of C{instance_ttl}: by then our own
        #: heartbeat key would be at risk anyway).
        self.reply_timeout = instance_ttl / 2
        #: Backoff between reconnection attempts (tests shorten it).
        self.reconnect_initial_delay = reconnect_initial_delay
        self.reconnect_max_delay = reconnect_max_delay
        #: How many WebSockets this instance has open (set by the wiring).
        self.connection_count: Callable[[], int] = lambda: 0
        #: Called after each read of the subscription has been handled
        #: (the wiring writes what it delivered at once, not next turn).
        self.on_read_done: Callable[[], None] = lambda: None
        self._started_at_ms = int(reactor.seconds() * 1000)
        self._services: list[ClientService] = []
        #: The usable connections, None while (re)connecting.
        self._commands: Any = None
        self._subscriber: Any = None
        self._channels: dict[str, _Channel] = {}
        self._was_healthy = False
        #: SUBSCRIBE and UNSUBSCRIBE commands not yet answered.
        self._in_flight = 0
        self._waiters: list[tuple[Callable[[], bool], Deferred[None]]] = []
        #: Rooms whose presence hash may hold our field.
        self._registered: set[str] = set()
        #: Other instances seen in each local room's presence at its last read.
        self._seen: dict[str, set[bytes]] = {}
        #: Rooms whose presence is being read: True when it must be read again.
        self._refreshing: dict[str, bool] = {}
        self._heartbeat: LoopingCall | None = None
        #: When the seq and presence keys of our rooms were last kept from expiring.
        self._keys_refreshed_at = 0.0
        #: Appends waiting for L{flush}, per room in order: (event, exclude,
        #: op key, the Deferred given to the caller).
        self._pending: dict[str, list[tuple[bytes, str | None, OpKey | None, Deferred[int]]]] = {}
        self._flush_call: Any = None
        self._unreachable = logs.Throttle(UNREACHABLE_LOG_SECONDS, reactor)

    # ------------------------------------------------------------ Bus

    @property
    def healthy(self) -> bool:
        """Whether both Redis connections are up."""
        return self._commands is not None and self._subscriber is not None

    def append(
        self,
        project_id: str,
        event: bytes,
        exclude: str | None = None,
        op_key: OpKey | None = None,
    ) -> Deferred[int]:
        """
        Number C{event} as the room's next event, store it in the room's
        history and publish it, all in one script; every instance with
        members in the room delivers it from its subscription (this one
        too, skipping C{exclude}).  Fires with the seq (the original one for
        a retry of a kept C{op_key}, which is not published again).

        @raise Unavailable: (as the Deferred's failure) while Redis is
            unreachable, or when the script's reply was lost with the
            connection (the event may then have been numbered: a retry with
            the same op key finds it).
        """
        if not event.endswith(b"}"):
            return fail(ValueError("an event is a serialised JSON object"))
        if self._commands is None:
            return fail(Unavailable("The event could not be stored; try again"))
        d: Deferred[int] = Deferred()
        pending = self._pending.get(project_id)
        if pending is None:
            pending = self._pending[project_id] = []
        pending.append((event, exclude, op_key, d))
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self.flush)
        return d

    def flush(self) -> None:
        """
        Send the appends made since the last flush: per room, one script
        call that numbers them consecutively and publishes them as one
        envelope (a single event as a plain C{E} envelope, which instances
        of earlier versions understand too).  Called at the end of every
        incoming WebSocket read, and otherwise on the next reactor turn.
        """
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        for project_id, appends in pending.items():
            if len(appends) == 1:
                event, exclude, op_key, d = appends[0]
                self._append_one(project_id, event, exclude, op_key).chainDeferred(d)
            else:
                self._append_batch(project_id, appends)

    def _append_one(
        self, project_id: str, event: bytes, exclude: str | None, op_key: OpKey | None
    ) -> Deferred[int]:
        keys = [seq_key(project_id), history_key(project_id)]
        if op_key is not None:
            keys.append(op_key_name(project_id, op_key))
        tag = self._instance + b"\n" + exclude.encode("ascii") if exclude else b""
        d = self._eval(_APPEND, keys, [
            event, channel_name(project_id), envelope_head(EVENT, self._instance, exclude),
            self.history_size, self._history_ttl_ms(), tag,
        ])

        def appended(reply: list[Any]) -> int:
            return int(reply[0])

        return d.addCallbacks(appended, self._unavailable, errbackArgs=(UNCONFIRMED,))

    def _append_batch(
        self,
        project_id: str,
        appends: list[tuple[bytes, str | None, OpKey | None, Deferred[int]]],
    ) -> None:
        keys = [seq_key(project_id), history_key(project_id)]
        args: list[Any] = [
            channel_name(project_id), envelope_head(BATCH, self._instance, None),
            self.history_size, self._history_ttl_ms(), len(appends),
        ]
        op_index: dict[bytes, int] = {}
        for event, exclude, op_key, _ in appends:
            index = 0
            if op_key is not None:
                name = op_key_name(project_id, op_key)
                index = op_index.get(name, 0)
                if not index:
                    keys.append(name)
                    index = op_index[name] = len(keys)
            sender = exclude.encode("ascii") if exclude else b""
            args += [event, self._instance + b"\n" + sender if sender else b"", sender, index]

        def appended(reply: list[Any]) -> None:
            for i, (_, _, _, d) in enumerate(appends):
                d.callback(int(reply[2 * i]))

        def failed(failure: Failure) -> None:
            failure = self._unavailable(failure, UNCONFIRMED)
            for _, _, _, d in appends:
                d.errback(failure)

        self._eval(_BATCH, keys, args).addCallbacks(appended, failed)

    def replay(self, project_id: str, since: int) -> Deferred[Replay]:
        """
        The room's events after C{since}, read once this instance has
        subscribed to the room and delivered everything up to then (the
        caller has joined the room, with C{hold=True}, which opened it), so
        that every later event reaches the hold; fires once the live events
        up to the seq read have reached the hold too, so that release()
        drops every one of them the replay covers.

        @raise Unavailable: (as the Deferred's failure) while Redis is
            unreachable.
        """
        return Deferred.fromCoroutine(self._replay(project_id, since))

    async def _replay(self, project_id: str, since: int) -> Replay:
        message = "The room's history could not be read; join again"
        if self._commands is None:
            raise Unavailable(message)
        channel = self._channels.get(project_id)
        if channel is not None:  # else no local member: no hold to protect
            await self.when(lambda: channel.synced or self._commands is None
                            or self._channels.get(project_id) is not channel)
            if self._commands is None:
                raise Unavailable(message)
        try:
            seq, entries, _ = await self._read(project_id, since)
        except Exception:
            self._unavailable(Failure(), message).raiseException()
        if channel is not None:
            # The events up to seq may still be on their way on the
            # subscriber connection (the read's reply came on the other
            # one): wait until they have reached the registry, and so the
            # hold, where release() drops them, or they would come twice.
            delivered = self.when(lambda: (channel.last or 0) >= seq
                                  or self._channels.get(project_id) is not channel)
            try:
                await delivered.addTimeout(REPLAY_DELIVERY_TIMEOUT_SECONDS, self._reactor)
            except defer.TimeoutError:
                log.warn("{project_id}: live events up to {seq} were slow to arrive; "
                         "resuming anyway", project_id=project_id, seq=seq)
        return Replay(None if entries is None else entries[::2], seq)

    def _read(
        self, project_id: str, since: int | None, kept: bool = False
    ) -> Deferred[tuple[int, list[bytes] | None, int | None]]:
        """
        Run the read script: the room's seq, and its events after C{since}
        with their sender tags (C{[event, tag, event, tag...]}), None when
        the history does not reach back (or C{since} is None).  With
        C{kept}, a history that does not reach back gives the events it
        still has instead, and the seq they follow (else None).
        """
        d = self._eval(_READ, [seq_key(project_id), history_key(project_id)], [
            b"" if since is None else b"%d" % since, self.history_size, self._history_ttl_ms(),
            b"1" if kept else b"",
        ])

        def parsed(reply: list[Any]) -> tuple[int, list[bytes] | None, int | None]:
            found = int(reply[1])
            if found == 2:
                return int(reply[0]), list(reply[3:]), int(reply[2])
            return int(reply[0]), (list(reply[2:]) if found else None), None

        return d.addCallback(parsed)

    def _load(self, script: _Script) -> None:
        """SCRIPT LOAD, before the EVALSHAs that follow on the same connection."""

        def failed(f: Failure) -> None:
            if f.check("txredisapi.ResponseError"):
                log.failure("Redis refused our script", f)

        self._command("SCRIPT", "LOAD", script.source).addErrback(failed)

    def _history_ttl_ms(self) -> int:
        return max(1, int(self.history_ttl_seconds * 1000))

    def _presence_ttl_ms(self) -> int:
        # Refreshed every third of the history TTL, checked at each beat:
        # longer than the longest gap between two refreshes.
        return max(self._history_ttl_ms(), int(3000 * self.instance_ttl))

    def _unavailable(self, failure: Failure, message: str) -> Failure:
        """
        Log why a script failed (a lost link at most once every
        L{UNREACHABLE_LOG_SECONDS}, with how many requests failed) and fail
        with L{Unavailable} instead.
        """
        if failure.check("txredisapi.ResponseError"):
            log.failure("a Redis script failed", failure)
        else:
            n = self._unreachable.due()
            if n:
                log.warn("Redis unreachable: {why} ({n} requests failed since the last such line)",
                         why=failure.getErrorMessage(), n=n)
        return Failure(Unavailable(message))

    def _eval(self, script: _Script, keys: list[bytes], args: list[Any]) -> Deferred[Any]:
        """
        EVALSHA C{script}; on NOSCRIPT (Redis restarted, or SCRIPT FLUSH)
        load it and try once more.
        """
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        d = self._command(*command)

        def reload(failure: Failure) -> Deferred[Any] | Failure:
            if "NOSCRIPT" not in failure.getErrorMessage():
                return failure
            log.info("Redis does not have our scripts: loading them again")
            self._load(script)
            return self._command(*command)

        return d.addErrback(reload)

    async def cluster_stats(self) -> dict[str, Any]:
        """
        ``/stats`` for the whole deployment: this instance as it is now,
        the others as of their last heartbeat.  While Redis is unreachable,
        this instance only, with C{"partial": true}.
        """
        instances = {self.instance_id: self._snapshot()}
        partial = not self.healthy
        if not partial:
            try:
                ids = [i for i in await self._command("SMEMBERS", INSTANCES_KEY)
                       if i != self._instance]
                values = await self._command("MGET", *map(instance_key, ids)) if ids else []
                dead = [i for i, v in zip(ids, values) if v is None]
                if dead:
                    self._forget(self._command("SREM", INSTANCES_KEY, *dead))
                for iid, value in zip(ids, values):
                    if value is not None:
                        instances[iid.decode("utf-8", "replace")] = messages.loads(value)
            except Exception:
                partial = True
                log.failure("reading the other instances' statistics failed")
        body = merge_stats(instances)
        body["instanceId"] = self.instance_id
        if partial:
            body["partial"] = True
        return body

    # ------------------------------------------------------------ waiting

    def settled(self) -> bool:
        """
        Whether the link is up, Redis has answered every SUBSCRIBE and
        UNSUBSCRIBE sent so far, and every local room has delivered its
        events up to now: from then on every local room receives events
        published anywhere.
        """
        return (
            self.healthy
            and self._in_flight == 0
            and all(c.synced for c in self._channels.values())
        )

    def when(self, condition: Callable[[], bool]) -> Deferred[None]:
        """
        A Deferred that fires once C{condition()} holds, checked after every
        change of the link or of a subscription (for tests and readiness
        checks, e.g. C{bus.when(bus.settled)}).
        """
        d: Deferred[None] = Deferred()
        self._waiters.append((condition, d))
        self._changed()
        return d

    def _changed(self) -> None:
        if not self._waiters:
            return
        waiting, self._waiters = self._waiters, []
        for condition, d in waiting:
            if d.called:
                continue  # timed out or cancelled
            if condition():
                d.callback(None)
            else:
                self._waiters.append((condition, d))

    # ------------------------------------------------------------ RoomListener

    def room_opened(self, project_id: str) -> None:
        """
        The first local member arrived: read the room's seq, then subscribe
        to its channel (see L{_sync}).
        """
        self._channels[project_id] = _Channel()
        self._sync(project_id)

    def room_closed(self, project_id: str) -> None:
        """
        The last local member left: send what waited for the subscription
        (other instances may still have members), withdraw our presence,
        and unsubscribe.
        """
        channel = self._channels.pop(project_id, None)
        self._seen.pop(project_id, None)
        if channel is None:
            return
        if self.healthy and self.running:
            for envelope, _ in channel.backlog:
                self._publish(project_id, envelope)
            self._withdraw(project_id)
        if self._subscriber is not None:
            try:
                d = self._subscriber.unsubscribe([channel_name(project_id)])
            except Exception:  # lost connection: the subscription went with it
                return
            self._in_flight += 1
            d.addErrback(lambda _: None).addCallback(self._answered)
        self._changed()

    def presence_changed(self, project_id: str, active_users: list[dict[str, Any]]) -> None:
        """
        Our members of C{project_id} changed: store them in the room's
        presence hash and tell every instance to announce the room again.
        While Redis is down only our own members are told, about our own
        members.
        """
        if not (self.healthy and self.running):
            self._registry.send_presence(project_id, active_users)
            return
        self._register(project_id, active_users)

    # ------------------------------------------------------------ service

    def startService(self) -> None:
        """Start connecting (and reconnecting, with backoff) to Redis."""
        super().startService()
        command_class, subscriber_class = _protocol_classes()
        timeout = self.reply_timeout
        commands = _RedisClientFactory(
            command_class, self._address, True, self._commands_ready, self._commands_lost,
            self._reactor, timeout,
        )
        subscriber = _RedisClientFactory(
            subscriber_class, self._address, False, self._subscriber_ready, self._subscriber_lost,
            self._reactor, timeout,
        )
        subscriber.message = self._message  # type: ignore[attr-defined]
        subscriber.read_done = lambda: self.on_read_done()  # type: ignore[attr-defined]
        for factory in (commands, subscriber):
            endpoint = HostnameEndpoint(self._reactor, self._address.host, self._address.port)
            service = ClientService(
                endpoint, factory, retryPolicy=self._retry_delay, clock=self._reactor
            )
            service.startService()
            self._services.append(service)
        self._heartbeat = LoopingCall(self.heartbeat)
        self._heartbeat.clock = self._reactor
        self._heartbeat.start(self.instance_ttl / 3, now=False)
        log.info(
            "instance {instance} connecting to Redis at {host}:{port}",
            instance=self.instance_id,
            host=self._address.host,
            port=self._address.port,
        )

    def stopService(self) -> Deferred[Any]:
        """
        Withdraw this instance (its presence in every room, its heartbeat
        key), then close both connections and stop reconnecting.
        """
        super().stopService()
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.healthy:
            done = [self._withdraw(pid) for pid in list(self._registered)]
            done.append(self._command("DEL", instance_key(self._instance)))
            done.append(self._command("SREM", INSTANCES_KEY, self._instance))
            goodbye = gatherResults(done, consumeErrors=True)
            goodbye.addTimeout(GOODBYE_TIMEOUT_SECONDS, self._reactor)
            try:
                await goodbye
            except Exception:
                log.warn("Redis did not confirm this instance's goodbye; "
                         "its heartbeat key expires instead")
        services, self._services = self._services, []
        await gatherResults([s.stopService() for s in services], consumeErrors=True)

    def _retry_delay(self, attempt: int) -> float:
        delay = min(
            self.reconnect_initial_delay * 2 ** min(attempt - 1, 30), self.reconnect_max_delay
        )
        return delay * random.uniform(0.8, 1.2)  # spread out a fleet's reconnections

    # ------------------------------------------------------------ connections

    def _commands_ready(self, proto: Any) -> None:
        self._commands = proto
        # Before any EVALSHA on this connection (Redis may have restarted empty).
        for script in (_APPEND, _BATCH, _READ, _REAP):
            self._load(script)
        self._link_changed()
        for project_id in list(self._channels):
            self._sync(project_id)

    def _commands_lost(self, proto: Any) -> None:
        if proto is self._commands:
            self._commands = None
            if self.running:
                log.error("Redis link lost (commands): events are refused (UNAVAILABLE) "
                          "until it is back")
            self._link_changed()

    def _subscriber_ready(self, proto: Any) -> None:
        self._subscriber = proto
        for channel in self._channels.values():
            channel.confirmed = channel.subscribing = False
            channel.stale = True
        for project_id in list(self._channels):
            self._sync(project_id)
        self._link_changed()

    def _subscriber_lost(self, proto: Any) -> None:
        if proto is self._subscriber:
            self._subscriber = None
            # Whatever is published from now on reaches us only through a
            # catch-up after the next SUBSCRIBE.
            for channel in self._channels.values():
                channel.confirmed = channel.subscribing = False
                channel.stale = True
            if self.running:
                log.error("Redis link lost (subscription): this instance's members get the "
                          "rooms' events again once it is back, the missed ones from the history")
            self._link_changed()

    def _answered(self, _: object = None) -> None:
        self._in_flight -= 1
        self._changed()

    def _link_changed(self) -> None:
        healthy = self.healthy
        if healthy == self._was_healthy:
            self._changed()
            return
        self._was_healthy = healthy
        if healthy:
            log.info("Redis link up: {rooms} rooms with local members", rooms=len(self._channels))
            if self.running:
                self._forget(Deferred.fromCoroutine(self._beat(reregister=True)))
            self._changed()
            return
        # What waited for a SUBSCRIBE will not reach Redis now: local members get it.
        for channel in self._channels.values():
            backlog, channel.backlog = channel.backlog, []
            for _, fallback in backlog:
                fallback()
        self._changed()

    def _subscribe(self, project_id: str, channel: _Channel) -> None:
        proto = self._subscriber

        def answered(result: object) -> None:
            self._in_flight -= 1
            # A failure means the connection was lost (txredisapi fails the
            # waiting commands before our lost hook runs): the room is
            # subscribed again on reconnection.
            if (
                not isinstance(result, Failure)
                and self._channels.get(project_id) is channel
                and self._subscriber is proto
            ):
                channel.subscribing = False
                channel.confirmed = True
                backlog, channel.backlog = channel.backlog, []
                for envelope, fallback in backlog:
                    if self.healthy:
                        self._publish(project_id, envelope)
                    else:
                        fallback()
                self._sync(project_id)
            self._changed()

        # One channel per SUBSCRIBE: txredisapi matches one reply per command.
        try:
            d = proto.subscribe([channel_name(project_id)])
        except Exception:  # txredisapi's ConnectionError: subscribed again on reconnection
            return
        channel.subscribing = True
        self._in_flight += 1
        d.addBoth(answered)

    # ------------------------------------------------------------ delivery

    def _sync(self, project_id: str) -> None:
        """
        Take one room's next step towards delivering its events from
        C{last} on, when the links allow it: read its seq (a room just
        opened), then SUBSCRIBE, then read and deliver what was published
        after C{last} before the subscription took effect.  Called again
        whenever a step ends or a link comes back.
        """
        channel = self._channels.get(project_id)
        if channel is None or channel.reading or channel.subscribing:
            return
        if channel.last is None:
            # The seq before the SUBSCRIBE is sent: every event after it
            # arrives live or is read by the catch-up below.
            if self._commands is not None:
                self._read_for(project_id, channel, None)
        elif not channel.confirmed:
            if self._subscriber is not None:
                self._subscribe(project_id, channel)
        elif channel.stale and self._commands is not None:
            self._read_for(project_id, channel, channel.last)

    def _read_for(self, project_id: str, channel: _Channel, since: int | None) -> None:
        channel.reading = True
        d = self._read(project_id, since, kept=True)

        def done(result: tuple[int, list[bytes] | None, int | None] | Failure) -> None:
            channel.reading = False
            if self._channels.get(project_id) is not channel:
                return  # the room closed meanwhile
            if isinstance(result, Failure):
                # Tried again when the command connection is back.
                log.warn("reading the history of {project_id} failed: {why}",
                         project_id=project_id, why=result.getErrorMessage())
            elif since is None:
                channel.last = result[0]
            else:
                self._caught_up(project_id, channel, *result)
            self._sync(project_id)
            self._changed()

        d.addBoth(done)

    def _caught_up(
        self,
        project_id: str,
        channel: _Channel,
        seq: int,
        entries: list[bytes] | None,
        resync_at: int | None = None,
    ) -> None:
        """
        Deliver what the history holds after C{channel.last}, then what
        waited.  When the history no longer reaches back that far, the
        members are told RESYNC_REQUIRED, at the seq before the events it
        still keeps (C{resync_at}), and get those, or at C{seq}.
        """
        last = channel.last
        assert last is not None
        if entries is None or resync_at is not None:
            at = seq if resync_at is None else resync_at
            log.warn("{project_id}: events after {last} are no longer in the history; "
                     "RESYNC_REQUIRED at {at}", project_id=project_id, last=last, at=at)
            now_ms = int(self._reactor.seconds() * 1000)
            frame = text_frame(messages.resync_required(project_id, at, now_ms))
            self._registry.deliver(project_id, frame)
            channel.last = last = at
        if entries is not None:
            if entries:
                log.info("{project_id}: delivering {n} events missed by the subscription",
                         project_id=project_id, n=len(entries) // 2)
            for i in range(0, len(entries), 2):
                self._deliver(project_id, channel, last + 1 + i // 2, entries[i], entries[i + 1])
            channel.last = max(channel.last or seq, seq)
        if channel.overflow:
            channel.overflow = False  # live events were dropped: read again
            return
        channel.stale = False
        waiting, channel.buffer = channel.buffer, []
        for seq_, data, exclude in waiting:
            self._receive(project_id, channel, seq_, data, exclude)

    def _deliver(
        self, project_id: str, channel: _Channel, seq: int, data: bytes, tag: bytes
    ) -> None:
        """Deliver one event read from the history (C{tag}: who sent it)."""
        if seq <= (channel.last or 0):
            return
        channel.last = seq
        instance, _, sender = tag.partition(b"\n")
        exclude = sender.decode("ascii") if sender and instance == self._instance else None
        self._registry.deliver(project_id, text_frame(data), exclude, seq)

    def _receive(
        self, project_id: str, channel: _Channel, seq: int, data: bytes, exclude: str | None
    ) -> None:
        """One live event: deliver it if it is the next one, else catch up first."""
        if channel.stale or channel.last is None:
            if len(channel.buffer) >= self.history_size:
                channel.buffer.clear()
                channel.overflow = True
            channel.buffer.append((seq, data, exclude))
            return
        if seq <= channel.last:
            return  # delivered already, by a catch-up
        if seq > channel.last + 1:
            log.warn("{project_id}: events {first} to {end} did not arrive; reading them",
                     project_id=project_id, first=channel.last + 1, end=seq - 1)
            channel.stale = True
            channel.buffer.append((seq, data, exclude))
            self._sync(project_id)
            return
        channel.last = seq
        self._registry.deliver(project_id, text_frame(data), exclude, seq)
        self._changed()  # a replay may wait for this seq

    # ------------------------------------------------------------ commands

    def _command(self, *args: Any) -> Deferred[Any]:
        """Run one command on the command connection (a failed Deferred while down)."""
        if self._commands is None:
            return fail(ConnectionError("Redis link down"))
        try:
            return self._commands.execute_command(*args)
        except Exception:
            return fail()

    def _forget(self, d: Deferred[Any]) -> None:
        """Run C{d} for its effect; a lost connection is handled elsewhere."""
        d.addErrback(lambda f: log.debug("a Redis command failed: {f}", f=f.getErrorMessage()))

    def _send(self, project_id: str, envelope: bytes, fallback: Callable[[], object]) -> None:
        """Publish now, or after the room's SUBSCRIBE is confirmed."""
        channel = self._channels.get(project_id)
        if channel is not None and not channel.confirmed:
            channel.backlog.append((envelope, fallback))
        else:
            self._publish(project_id, envelope)

    def _publish(self, project_id: str, envelope: bytes) -> None:
        def lost(f: Failure) -> None:
            log.warn("an event for {project_id} was lost with the Redis connection",
                     project_id=project_id)

        self._command("PUBLISH", channel_name(project_id), envelope).addErrback(lost)

    # ------------------------------------------------------------ presence

    def _register(self, project_id: str, active_users: list[dict[str, Any]]) -> None:
        """Store our members of a room and tell every instance."""
        self._registered.add(project_id)
        key = presence_key(project_id)
        self._forget(self._command("HSET", key, self._instance, messages.dumps(active_users)))
        # Kept alive by every instance with members there (_keep_keys), so
        # the hash of a room whose last instance crashed does not stay for ever.
        self._forget(self._command("PEXPIRE", key, self._presence_ttl_ms()))
        envelope = pack_envelope(PRESENCE, self._instance, None, b"")
        self._send(project_id, envelope, lambda: self._registry.send_presence(
            project_id, self._registry.active_users(project_id)))

    def _withdraw(self, project_id: str) -> Deferred[Any]:
        """Remove our field from a room's presence and tell the other instances."""
        self._registered.discard(project_id)
        d = self._command("HDEL", presence_key(project_id), self._instance)
        self._forget(d)  # never fails from here on
        self._publish(project_id, pack_envelope(PRESENCE, self._instance, None, b""))
        return d

    def heartbeat(self) -> Deferred[None]:
        """
        Beat now (the service also beats every third of C{instance_ttl}).
        Never fails: errors are logged, and the loop keeps going.
        """
        return Deferred.fromCoroutine(self._beat())

    async def _beat(self, reregister: bool = False) -> None:
        """
        One heartbeat: refresh our key (registering our presence again if
        it had expired, or with C{reregister}), and drop the members of
        instances whose key expired from our rooms.
        """
        if not (self.healthy and self.running):
            return
        # The subscriber connection only receives; a PING shows that Redis
        # still answers it (or fails it after the reply timeout).
        try:
            self._forget(self._subscriber.ping())
        except Exception:
            pass  # the connection is going: its connectionLost reports it
        try:
            previous = await self._command(
                "SET", instance_key(self._instance), messages.dumps(self._snapshot()),
                "PX", int(self.instance_ttl * 1000), "GET",
            )
            self._forget(self._command("SADD", INSTANCES_KEY, self._instance))
            self._keep_keys()
            if previous is None or reregister:
                if previous is None and not reregister:
                    log.warn("this instance's heartbeat key had expired: registering again")
                self._reregister()
            await self._reap()
        except Exception:
            # A lost or unanswering link (txredisapi's ConnectionError and
            # its TimeoutError) is reported by _link_changed.
            if self.healthy and not Failure().check("txredisapi.ConnectionError"):
                log.failure("Redis heartbeat failed")

    def _keep_keys(self) -> None:
        """
        Keep the seq and presence keys of our rooms from expiring (every
        third of the history TTL): a quiet room with members keeps its
        numbering, where a new epoch would send them all RESYNC_REQUIRED,
        and its presence.
        """
        now = self._reactor.seconds()
        if now - self._keys_refreshed_at < self.history_ttl_seconds / 3:
            return
        self._keys_refreshed_at = now
        ttl = self._history_ttl_ms()
        for project_id in list(self._channels):
            self._forget(self._command("PEXPIRE", seq_key(project_id), ttl))
        ttl = self._presence_ttl_ms()
        for project_id in list(self._registered):
            self._forget(self._command("PEXPIRE", presence_key(project_id), ttl))

    def _reregister(self) -> None:
        for project_id in list(self._registered - set(self._channels)):
            self._withdraw(project_id)
        for project_id in list(self._channels):
            self._register(project_id, self._registry.active_users(project_id))

    async def _reap(self) -> None:
        """Remove the presence of instances, seen in our rooms, that stopped beating."""
        others = sorted(set().union(*self._seen.values())) if self._seen else []
        if not others:
            return
        values = await self._command("MGET", *map(instance_key, others))
        dead = {i for i, v in zip(others, values) if v is None}
        if not dead:
            return
        log.info("instances {dead} stopped sending heartbeats: removing their members",
                 dead=",".join(sorted(i.decode("utf-8", "replace") for i in dead)))
        self._forget(self._command("SREM", INSTANCES_KEY, *dead))
        for project_id, seen in list(self._seen.items()):
            gone = seen & dead
            if gone:
                seen -= gone
                self._forget(self._remove_dead(project_id, sorted(gone)))
                self._publish(project_id, pack_envelope(PRESENCE, self._instance, None, b""))

    def _remove_dead(self, project_id: str, instances: list[bytes]) -> Deferred[Any]:
        """Remove the fields of C{instances} from a room's presence, if they are still dead."""
        return self._eval(_REAP, [presence_key(project_id), *map(instance_key, instances)],
                          list(instances))

    def _refresh(self, project_id: str) -> None:
        """Read a room's presence across instances and announce it locally."""
        if project_id in self._refreshing:
            self._refreshing[project_id] = True  # read again when this read is done
            return
        self._refreshing[project_id] = False
        d = Deferred.fromCoroutine(self._read_presence(project_id))

        def done(entries: list[dict[str, Any]] | None) -> None:
            again = self._refreshing.pop(project_id, False)
            if again:
                self._refresh(project_id)
            elif entries is not None and project_id in self._channels:
                self._registry.send_presence(project_id, entries)

        d.addCallback(done)

    async def _read_presence(self, project_id: str) -> list[dict[str, Any]] | None:
        """
        Every instance's members of a room, in join order; ours from the
        registry, the others' from Redis if their heartbeat key still
        lives.  None when Redis could not be read.
        """
        try:
            flat = await self._command("HGETALL", presence_key(project_id))
            fields = dict(zip(flat[::2], flat[1::2]))
            fields.pop(self._instance, None)
            others = sorted(fields)
            alive = await self._command("MGET", *map(instance_key, others)) if others else []
        except Exception:
            # A lost connection fails its commands before our lost hook runs.
            if self.healthy and not Failure().check("txredisapi.ConnectionError"):
                log.failure("reading the presence of {project_id} failed", project_id=project_id)
            return None
        dead = [i for i, v in zip(others, alive) if v is None]
        if dead:
            self._forget(self._remove_dead(project_id, dead))
        lists = [self._registry.active_users(project_id)]
        for instance, value in zip(others, alive):
            if value is not None:
                try:
                    lists.append(messages.loads(fields[instance]))
                except orjson.JSONDecodeError:
                    log.warn("ignored malformed presence in {project_id}", project_id=project_id)
        if project_id in self._channels:
            self._seen[project_id] = {i for i, v in zip(others, alive) if v is not None}
        return merge_presence(lists)

    def member_count(self, project_id: str) -> Deferred[int]:
        """
        The room's connections on every live instance, from the room's
        presence in Redis (ours as it is now); only this instance's while
        Redis cannot be read.
        """

        async def count() -> int:
            entries = await self._read_presence(project_id) if self.healthy else None
            if entries is None:
                return self._registry.member_count(project_id)
            return len(entries)

        return Deferred.fromCoroutine(count())

    def _snapshot(self) -> dict[str, Any]:
        """This instance for /stats: its connections and its rooms' client ids."""
        return {
            "startedAt": self._started_at_ms,
            "connections": self.connection_count(),
            "projects": self._registry.snapshot(),
        }

    # ------------------------------------------------------------ messages

    def _message(self, channel: bytes, data: bytes) -> None:
        """A message on one of our channels: deliver it to the local members."""
        try:
            project_id = channel[len(CHANNEL_PREFIX):].decode("utf-8", "surrogatepass")
            kind, instance, sender, seq, body = unpack_envelope(data)
        except (ValueError, UnicodeDecodeError):
            log.warn("ignored a malformed message on a Redis channel")
            return
        room = self._channels.get(project_id)
        if room is None:
            return  # the room emptied; the UNSUBSCRIBE is on its way
        if kind == EVENT and seq is not None:
            exclude = sender if instance == self._instance else None
            self._receive(project_id, room, seq, body, exclude)
        elif kind == BATCH:
            try:
                events = unpack_batch(body)
            except (ValueError, UnicodeDecodeError):
                log.warn("ignored a malformed batch on a Redis channel")
                return
            ours = instance == self._instance
            for sender, seq, json in events:
                self._receive(project_id, room, seq, json, sender if ours else None)
        elif kind == PRESENCE:
            self._refresh(project_id)
