"""
The Lua scripts the Redis bus runs, as package data, loaded once.

Redis runs a script alone and freezes its time while it runs, so each of
these is one atomic step.  ``common.lua`` (the room's seq and the trimming
of its history by age) is put in front of the three scripts that use it;
the sources of APPEND and BATCH are byte for byte those of the previous
version, so both versions run the same SHA1s on a shared Redis (READ
differs: it raises a seq that went backwards).

  - L{APPEND}: number, store and publish one event.  KEYS: seq key,
    history stream, [op key].  ARGV: the event's JSON (without seq),
    channel, envelope head, history size, history TTL in ms, sender tag (or
    ''). Returns C{{seq, 1 if a retry of a kept event else 0}}.
  - L{BATCH}: number, store and publish several events of one room,
    consecutively, as one C{B} envelope (retries of kept events are left
    out and answered with their original seq).  KEYS: seq key, history
    stream, op keys.  ARGV: channel, envelope head (kind B, no sender),
    history size, history TTL in ms, event count, then four per event: its
    JSON (without seq), sender tag (or ''), sender client id (or ''), index
    of its op key in KEYS (0 for none).  Returns C{{seq, retry}} per event,
    flattened.
  - L{READ}: a room's events after a seq.  KEYS: seq key, history stream.
    ARGV: since ('' for the seq alone), history size, history TTL in ms,
    '1' to get what is kept when the history does not reach back to since.
    Returns C{{seq, 1, event, sender tag, ...}} oldest first, or C{{seq, 0}}
    when the history does not reach back (or since is above seq; with
    ARGV[4] '1', an instance's own catch-up, the numbering went backwards,
    by a failover or an older snapshot: the seq first jumps above since
    and the time in ms, so no seq is handed out twice); with
    ARGV[4] '1', rather every event still in the stream after since
    (C{{seq, 1, ...}}), or if the stream does not reach back either,
    C{{seq, 2, oldest - 1, event, sender tag, ...}}.
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
