"""
The Lua scripts the Redis bus runs, as package data, loaded once.

Redis runs a script alone and freezes its time while it runs, so each of
these is one atomic step.  ``common.lua`` (the room's seq, its floor, and
the trimming of its history by age) is put in front of the three scripts
that use it.  Each of them takes, last in ARGV, the run id of the Redis
the instance reached (or ''): the first script run with a run id other
than the one that numbered the events so far (a promoted replica, or a
restart from files) raises the floor of every room's seq to the time in
ms, and a room below it jumps above it (by at least 1000) at its next
script, leaving an entry
at the new seq with field C{j} (the seq it jumped from) in its stream.
Versions before the floor read such an entry as an event: upgrade every
instance before a failover.

  - L{APPEND}: number, store and publish one event.  KEYS: seq key,
    history stream, [op key].  ARGV: the event's JSON (without seq),
    channel, envelope head, history size, history TTL in ms, sender tag (or
    ''), run id. Returns C{{seq, 1 if a retry of a kept event else 0}}.
  - L{BATCH}: number, store and publish several events of one room,
    consecutively, as one C{B} envelope (retries of kept events are left
    out and answered with their original seq).  KEYS: seq key, history
    stream, op keys.  ARGV: channel, envelope head (kind B, no sender),
    history size, history TTL in ms, event count, then four per event: its
    JSON (without seq), sender tag (or ''), sender client id (or ''), index
    of its op key in KEYS (0 for none), then the run id.  Returns
    C{{seq, retry}} per event, flattened.
  - L{READ}: a room's events after a seq.  KEYS: seq key, history stream.
    ARGV: since ('' for the seq alone), history size, history TTL in ms,
    '1' for an instance's own catch-up (else a client's replay), run id.
    Returns C{{seq, 1, event, sender tag, ...}} oldest first, across a
    jump that starts at since or after it (a catch-up gets C{'', seq} in
    its place), or C{{seq, 0}} when the history does not reach back (or
    since is above seq).  A catch-up whose since is above seq (the
    numbering went backwards on the same Redis) first makes the seq jump
    above since and the time in ms (C{{seq, 0}} names the new one); one
    that does not reach back gets every event still in the stream after
    since (C{{seq, 1, ...}}), or else the events at the end of the stream
    that follow each other, after the newest jump: C{{seq, 2, the seq
    before them, event, sender tag, ...}}.
  - L{REAP}: remove the presence fields (ARGV) of a room's hash (KEYS[1])
    whose instances' heartbeat keys (KEYS[2...], same order) are gone, in
    one step: an instance that registers again between a read of its key
    and a separate HDEL would lose its fresh field for good.
"""

from __future__ import annotations

import hashlib
from importlib.resources import files


class Script:
    """A Lua script and its SHA1, for EVALSHA."""

    __slots__ = ("name", "source", "sha")

    def __init__(self, name: str, source: bytes) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source).hexdigest().encode("ascii")

    def __repr__(self) -> str:
        return f"<Script {self.name} {self.sha.decode()}>"


def _read(name: str) -> bytes:
    return files(__name__).joinpath(name).read_bytes()


def _load(name: str, common: bool = True) -> Script:
    source = _read(name)
    return Script(name, (_read("common.lua") + source) if common else source)


APPEND = _load("append.lua")
BATCH = _load("batch.lua")
READ = _load("read.lua")
REAP = _load("reap.lua", common=False)

#: Every script, loaded on each new command connection.
ALL = (APPEND, BATCH, READ, REAP)
