"""
A room's events in Redis: numbering, storing and publishing them, and
reading them back.  The appends of one room made during one incoming read
(or one reactor turn) go to Redis together, as one script call, and are
published as one C{B} envelope.

Redis runs scripts one at a time and sends each channel's messages to
every subscriber in that order, so every instance receives a room's events
in seq order.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from happyrobot import logs
from happyrobot.bus import Unavailable
from happyrobot.history import OpKey
from happyrobot.redis import scripts
from happyrobot.redis.client import RedisLink
from happyrobot.redis.keys import (
    BATCH,
    EVENT,
    channel_name,
    envelope_head,
    history_key,
    op_key_name,
    sender_tag,
    seq_key,
)
from happyrobot.redis.sentinel import RedisTarget
from happyrobot.redis.sequencer import ReadResult
from happyrobot.timers import cancel_if_active

#: An event sent to Redis without an answer: it may or may not be stored.
#: Sent again with "ack": true and the same operationId, it is recognised
#: if it was stored (not delivered twice); without ack it may be.
UNCONFIRMED = "Redis did not confirm the event; it may have been stored"

#: At most one "replicas did not confirm" line per this many seconds.
UNCONFIRMED_LOG_SECONDS = 10.0

log = logs.get_logger(__name__)

#: One append waiting for the flush: (event, exclude, op key, the caller's Deferred).
_Append = tuple[bytes, "str | None", "OpKey | None", "Deferred[int]"]


class EventStore:
    """
    The scripts that append and read rooms' events, and the appends
    waiting for L{flush}, per room in order.

    @param history_size: HISTORY_SIZE, the stream's approximate length.
    @param history_ttl_ms: HISTORY_TTL_SECONDS in milliseconds.
    """

    def __init__(
        self,
        link: RedisLink,
        clock: IReactorTime,
        instance: bytes,
        history_size: int,
        history_ttl_ms: int,
        target: RedisTarget | None = None,
    ) -> None:
        self._link = link
        #: REDIS_MIN_REPLICAS and its timeout: what each turn's WAIT asks for.
        self.min_replicas = target.min_replicas if target else 0
        self.min_replicas_timeout_ms = target.min_replicas_timeout_ms if target else 500
        self._unconfirmed = logs.Throttle(UNCONFIRMED_LOG_SECONDS, clock)
        self._clock = clock
        self._instance = instance
        self.history_size = history_size
        self.history_ttl_ms = history_ttl_ms
        self._pending: dict[str, list[_Append]] = {}
        #: The flush due on the next reactor turn, if appends wait for one.
        self.scheduled: IDelayedCall | None = None

    def append(
        self, project_id: str, event: bytes, exclude: str | None, op_key: OpKey | None
    ) -> Deferred[int]:
        """Queue one event until the flush; fires with its seq (see L{RedisBus.append})."""
        if not event.endswith(b"}"):
            return fail(ValueError("an event is a serialised JSON object"))
        if not self._link.commands_up:
            return fail(Unavailable("The event could not be stored; try again"))
        d: Deferred[int] = Deferred()
        pending = self._pending.get(project_id)
        if pending is None:
            pending = self._pending[project_id] = []
        pending.append((event, exclude, op_key, d))
        if self.scheduled is None:
            self.scheduled = self._clock.callLater(0, self.flush)
        return d

    def flush(self) -> None:
        """
        Send the appends made since the last flush: per room, one script
        call that numbers them consecutively and publishes them as one
        envelope (a single event as a plain C{E} envelope, which instances
        of earlier versions understand too).
        """
        cancel_if_active(self.scheduled)
        self.scheduled = None
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        held: list[tuple[Deferred[int], Deferred[int]]] = []
        for project_id, appends in pending.items():
            if self.min_replicas:  # answered once WAIT confirms them
                appends = [(e, x, o, self._hold(d, held)) for e, x, o, d in appends]
            if len(appends) == 1:
                event, exclude, op_key, d = appends[0]
                self._one(project_id, event, exclude, op_key).chainDeferred(d)
            else:
                self._batch(project_id, appends)
        if held:
            self._confirm(held)

    @staticmethod
    def _hold(d: Deferred[int], held: list[tuple[Deferred[int], Deferred[int]]]
              ) -> Deferred[int]:
        """A Deferred for the script's answer, in place of the caller's C{d}."""
        stored: Deferred[int] = Deferred()
        held.append((stored, d))
        return stored

    def _confirm(self, held: list[tuple[Deferred[int], Deferred[int]]]) -> None:
        """
        One WAIT after the turn's scripts, on the same connection, so it
        covers all of them: each caller's Deferred fires with its seq once
        REDIS_MIN_REPLICAS replicas have them, else fails with
        L{Unavailable} (a retry with the same op key is recognised).
        """
        wanted = self.min_replicas
        wait = self._link.command(b"WAIT", wanted, self.min_replicas_timeout_ms)

        def counted(reply: Any) -> bool:
            if int(reply) >= wanted:
                return True
            n = self._unconfirmed.due()
            if n:
                log.warn("only {got} of {wanted} replicas confirmed events within {ms} ms; "
                         "their senders are told to retry ({n} turns since the last such line)",
                         got=int(reply), wanted=wanted, ms=self.min_replicas_timeout_ms, n=n)
            return False

        def settle(confirmed: bool) -> None:
            for stored, d in held:
                if confirmed:
                    stored.chainDeferred(d)
                else:
                    stored.addCallbacks(lambda _, d=d: d.errback(Unavailable(UNCONFIRMED)),
                                        d.errback)

        wait.addCallbacks(counted, lambda f: False).addCallback(settle)

    def _one(
        self, project_id: str, event: bytes, exclude: str | None, op_key: OpKey | None
    ) -> Deferred[int]:
        keys = [seq_key(project_id), history_key(project_id)]
        if op_key is not None:
            keys.append(op_key_name(project_id, op_key))
        d = self._link.eval(scripts.APPEND, keys, [
            event, channel_name(project_id), envelope_head(EVENT, self._instance, exclude),
            self.history_size, self.history_ttl_ms, sender_tag(self._instance, exclude),
            self._link.run_id,
        ])

        def appended(reply: list[Any]) -> int:
            return int(reply[0])

        return d.addCallbacks(appended, self._link.unavailable, errbackArgs=(UNCONFIRMED,))

    def _batch(self, project_id: str, appends: list[_Append]) -> None:
        keys = [seq_key(project_id), history_key(project_id)]
        args: list[Any] = [
            channel_name(project_id), envelope_head(BATCH, self._instance, None),
            self.history_size, self.history_ttl_ms, len(appends),
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
            failure = self._link.unavailable(failure, UNCONFIRMED)
            for _, _, _, d in appends:
                d.errback(failure)

        args.append(self._link.run_id)
        self._link.eval(scripts.BATCH, keys, args).addCallbacks(appended, failed)

    def read(self, project_id: str, since: int | None, kept: bool = False) -> Deferred[ReadResult]:
        """
        Run the read script: the room's seq, and its events after C{since}
        with their sender tags, None when the history does not reach back
        (or C{since} is None).  With C{kept}, a history that does not reach
        back gives the events it still has instead, and the seq they follow.
        """
        d = self._link.eval(scripts.READ, [seq_key(project_id), history_key(project_id)], [
            b"" if since is None else b"%d" % since, self.history_size, self.history_ttl_ms,
            b"1" if kept else b"", self._link.run_id,
        ])

        def parsed(reply: list[Any]) -> ReadResult:
            found = int(reply[1])
            if found == 2:
                return int(reply[0]), list(reply[3:]), int(reply[2])
            return int(reply[0]), (list(reply[2:]) if found else None), None

        return d.addCallback(parsed)
