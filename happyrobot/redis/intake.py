"""
The intake (C{INTAKE_STREAM}): the back end appends one entry per event
to a Redis stream (C{XADD <stream> * event <json>}, the body of ``POST
/broadcast``), and the server publishes each into its room as
``/broadcast`` would: numbered, kept in the history, and de-duplicated by
its C{operationId}.  An entry is acknowledged (C{XACK}) only once its
room's append is confirmed.

Order: one instance at a time consumes, the holder of a lease key
(C{<stream>:consumer}, C{SET NX PX}, renewed every third of its life), so
the entries of a project reach its room in the order they were appended,
whichever instance consumes.  An instance that takes the lease first takes
over every entry the group's former consumer read and did not acknowledge
(C{XAUTOCLAIM}) and publishes them, oldest first, before reading new ones;
the de-duplication by C{operationId} (or, without one, by the entry's id)
makes publishing an entry twice harmless.

Bad entries (no C{event} field, not JSON, no C{projectId} or C{type}, too
large) are moved to C{<stream>:dead} with a C{reason} field, acknowledged,
counted, and logged at most once per L{DEAD_LOG_SECONDS}.
What to do with each entry of a batch is decided without Redis, in
L{happyrobot.redis.intake_entries}; this module sends it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application.service import Service
from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from happyrobot import logs, messages
from happyrobot.config import Config, ConfigError, redis_address
from happyrobot.history import OpKey
from happyrobot.metrics import Metrics
from happyrobot.redis.bus import RedisBus, backoff
from happyrobot.redis.client import is_readonly
from happyrobot.redis.connections import SingleConnection, ask
from happyrobot.redis.intake_entries import (  # noqa: F401 (the intake's names)
    DEAD_LOG_SECONDS,
    OP_USER,
    Batch,
    Dead,
    Entry,
    Tally,
    id_ms,
    parse_entry,
    sort_batch,
    stream_entries,
)

log = logs.get_logger(__name__)

#: The consumer group every instance reads the stream through.
GROUP = b"happyrobot"
#: Suffixes of the dead-letter stream and of the lease key.
DEAD_SUFFIX = ":dead"
LEASE_SUFFIX = ":consumer"
#: Entries read (and published in one reactor turn) per XREADGROUP.
BATCH_SIZE = 1000
#: How long one XREADGROUP waits for new entries, at most.
BLOCK_MS = 1000
#: Wait after a failed read or append before trying again (Redis away).
RETRY_SECONDS = 0.5
#: How often an instance tries to take the lease (and at most how long
#: between renewals): a consumer that died is replaced within INSTANCE_TTL
#: and this.
LEASE_TRY_SECONDS = 1.0
#: About how many entries the dead-letter stream keeps (the oldest go first).
DEAD_KEPT = 10000
#: How often the pending entries and the lag are read for /metrics.
POLL_SECONDS = 2.0


Append = Callable[[str, bytes, "str | None", "OpKey | None"], "Deferred[int]"]
Command = Callable[..., "Deferred[Any]"]

#: Take the lease, or renew it if we hold it (also when we counted it as
#: lost: a renewal that came late).  1 if it is ours now, else 0.
TAKE = (b"if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end "
        b"if redis.call('GET', KEYS[1]) == ARGV[1] then "
        b"return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0")
#: Give the lease up if we hold it (on stop: another instance takes over at once).
RELEASE = (b"if redis.call('GET', KEYS[1]) == ARGV[1] then "
           b"return redis.call('DEL', KEYS[1]) else return 0 end")


class Intake(Service):
    """
    Consumes C{stream} while this instance holds the lease, publishing
    through C{append} and C{flush} (the bus's).  Its reads block, so they
    go over a connection of their own (C{reader}); the lease and the
    statistics use C{command} (the bus's command connection).

    @param lease_seconds: how long the lease lives without renewal: the
        longest that entries wait when their consumer died.
    """

    def __init__(
        self,
        stream: str,
        consumer: str,
        reader: SingleConnection,
        command: Command,
        append: Append,
        flush: Callable[[], None],
        clock: IReactorTime,
        lease_seconds: float,
        max_bytes: int,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self.stream = stream.encode("utf-8")
        self.dead_stream = self.stream + DEAD_SUFFIX.encode()
        self.lease_key = self.stream + LEASE_SUFFIX.encode()
        self.consumer = consumer.encode("utf-8")
        self._reader = reader
        self._command = command
        self._append = append
        self._flush = flush
        self._clock = clock
        self.lease_seconds = lease_seconds
        self.max_bytes = max_bytes
        self.batch_size = batch_size
        #: A read waits for new entries at most this long, well within the lease.
        self.block_ms = max(10, min(BLOCK_MS, int(lease_seconds * 1000 / 6)))
        #: Until when (clock seconds) we may read: two thirds of the lease
        #: after the SET or renewal that confirmed it was ours.
        self._lease_until = 0.0
        #: Take over and publish the pending entries before new ones.
        self._recover = True
        self._group_ready = False
        self._lease_call = LoopingCall(self._lease)
        self._lease_call.clock = clock
        self._poll_call = LoopingCall(self.poll)
        self._poll_call.clock = clock
        self._loop: Deferred[None] | None = None
        self._wake: tuple[IDelayedCall, Deferred[None]] | None = None
        self._fail_log = logs.Throttle(DEAD_LOG_SECONDS, clock)
        #: For /metrics: this instance's counts, and the group's state.
        self.tally = Tally(self.dead_stream.decode("utf-8"), clock)
        self.group = GroupState(self.stream, command, clock)

    @property
    def consumed(self) -> int:
        """Entries this instance published and acknowledged."""
        return self.tally.consumed

    @property
    def dead(self) -> int:
        """Entries this instance moved to the dead-letter stream."""
        return self.tally.dead

    @property
    def active(self) -> bool:
        """Whether this instance holds the lease (and may read)."""
        return self._lease_until > self._clock.seconds()

    # ------------------------------------------------------------ service

    def startService(self) -> None:
        super().startService()
        self._reader.start()
        self._lease_call.start(min(self.lease_seconds / 3, LEASE_TRY_SECONDS), now=True).addErrback(
            lambda f: log.failure("intake lease timer failed", f))
        self._poll_call.start(POLL_SECONDS, now=False).addErrback(
            lambda f: log.failure("intake statistics timer failed", f))
        self._loop = Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: log.failure("the intake stopped", f))
        log.info("intake: consuming {stream} as {consumer} while holding its lease",
                 stream=self.stream.decode(), consumer=self.consumer.decode())

    def stopService(self) -> Deferred[Any]:
        """
        Stop reading and give the lease up at once (another instance takes
        over; the bus, stopped with us, sends this before its goodbye), then
        disconnect.
        """
        super().stopService()
        for call in (self._lease_call, self._poll_call):
            if call.running:
                call.stop()
        release: Deferred[Any] | None = None
        if self._lease_until:
            self._lease_until = 0.0
            release = self._command("EVAL", RELEASE, 1, self.lease_key, self.consumer)
        self._wake_up()
        return Deferred.fromCoroutine(self._stop(release))

    async def _stop(self, release: Deferred[Any] | None) -> None:
        if release is not None:
            try:
                await release
            except Exception:
                log.warn("intake: Redis did not confirm that the lease was given up; "
                         "it expires instead")
        if self._loop is not None:
            # A blocked read ends with its connection, or within block_ms.
            await self._reader.stop()
            await self._loop

    # ------------------------------------------------------------ lease

    def _lease(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._take_or_renew())

    async def _take_or_renew(self) -> None:
        sent = self._clock.seconds()
        ttl_ms = max(1, int(self.lease_seconds * 1000))
        held = self._lease_until > sent
        try:
            ok = await self._command("EVAL", TAKE, 1, self.lease_key, self.consumer, ttl_ms)
        except Exception:
            return  # the link is down: the lease runs out on its own
        if ok == 1:
            if not held:
                log.info("intake: this instance consumes {stream} now",
                         stream=self.stream.decode())
                self._recover = True
            self._lease_until = sent + self.lease_seconds * 2 / 3
            self._wake_up()
        elif held:
            log.warn("intake: another instance holds the lease of {stream} now",
                     stream=self.stream.decode())
            self._lease_until = 0.0

    # ------------------------------------------------------------ consuming

    async def _run(self) -> None:
        #: The next batch, read while the one before it is confirmed.
        ahead: Deferred[Any] | None = None
        while self.running:
            if ahead is not None and (self._recover or not self.active):
                # What it reads is ours and pending: the take-over reads it again.
                ahead.addErrback(lambda _: None)
                ahead, self._recover = None, True
            if not (self.active and self._reader.up):
                await self._sleep(RETRY_SECONDS)
                continue
            try:
                if not self._group_ready:
                    await self._create_group()
                if self._recover:
                    await self._take_over()
                    continue
                read, ahead = ahead or self._read_new(), None
                entries = stream_entries(await read)
                if entries and self.running:
                    confirmed, batch = self._send(entries)
                    # The next batch is read meanwhile, and published only
                    # once this one is confirmed: a failed batch is
                    # published again before anything newer.
                    ahead = self._read_new()
                    await self._acknowledge(confirmed, batch)
            except Exception as e:
                if ahead is not None:  # what it reads is ours and pending: read again below
                    ahead.addErrback(lambda _: None)
                    ahead = None
                if not self.running:
                    return
                self._recover = True  # read what we hold again before anything new
                if "NOGROUP" in str(e):
                    self._group_ready = False  # the stream was deleted, or Redis restarted empty
                if is_readonly(Failure(e)):
                    # A former master, demoted (the sentinels promoted another, or it
                    # came back after a failover): read from the master named now.
                    self._reader.reconnect()
                n = self._fail_log.due()
                if n:
                    log.warn("intake: {why} ({n} failures since the last such line); "
                             "trying again", why=str(e) or e.__class__.__name__, n=n)
                await self._sleep(RETRY_SECONDS)
        if ahead is not None:
            ahead.addErrback(lambda _: None)

    def _read_new(self) -> Deferred[Any]:
        """XREADGROUP of entries no consumer has read, waiting for them up to block_ms."""
        return self._reader.command(
            "XREADGROUP", "GROUP", GROUP, self.consumer, "COUNT", self.batch_size,
            "BLOCK", self.block_ms, "STREAMS", self.stream, ">")

    async def _create_group(self) -> None:
        try:
            await self._reader.command("XGROUP", "CREATE", self.stream, GROUP, "0", "MKSTREAM")
        except Exception as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    async def _take_over(self) -> None:
        """
        Claim every entry of the group that is read and not acknowledged
        (a former consumer's), then publish ours, oldest first, one batch
        per call; L{_recover} ends when none is left.
        """
        cursor = b"0-0"
        for _ in range(10000):  # bounded: each round moves the cursor on
            reply = await self._reader.command(
                "XAUTOCLAIM", self.stream, GROUP, self.consumer, 0, cursor,
                "COUNT", self.batch_size, "JUSTID")
            cursor = reply[0]
            if cursor == b"0-0":
                break
        while self.running:
            entries = stream_entries(await self._reader.command(
                "XREADGROUP", "GROUP", GROUP, self.consumer, "COUNT", self.batch_size,
                "STREAMS", self.stream, "0"))
            if not entries:
                self._recover = False
                return
            await self._publish(entries)

    async def _publish(self, entries: list[tuple[bytes, list[bytes] | None]]) -> None:
        """
        Publish a batch in one reactor turn (the bus sends each room's
        appends as one script call), move the bad entries to the
        dead-letter stream, and acknowledge them all once that is confirmed.
        """
        await self._acknowledge(*self._send(entries))

    def _send(self, entries: list[tuple[bytes, list[bytes] | None]]) -> tuple[Deferred[Any], Batch]:
        """
        Append the valid entries and dead-letter the others, now; the
        Deferred fires once all of it is confirmed.  Also returns the batch
        (the ids to acknowledge then, and the dead letters).
        """
        batch = sort_batch(entries, self.max_bytes, int(self._clock.seconds() * 1000))
        waits = [self._append(project_id, event, None, op_key)
                 for project_id, event, op_key in batch.appends]
        waits.extend(self._reader.command(
            "XADD", self.dead_stream, "MAXLEN", "~", DEAD_KEPT, "*", "reason", d.reason,
            "entry", d.id, *d.fields) for d in batch.dead)
        self._flush()
        return gatherResults(waits, consumeErrors=True), batch

    async def _acknowledge(self, confirmed: Deferred[Any], batch: Batch) -> None:
        """Once C{confirmed}, XACK the batch (on the command connection: the reader may be blocked)."""
        try:
            await confirmed
        except FirstError as e:
            e.subFailure.raiseException()
        await self._command("XACK", self.stream, GROUP, *batch.ids)
        self.tally.acknowledged(batch)

    # ------------------------------------------------------------ statistics

    def poll(self) -> Deferred[None]:
        """Read the group's state now (the service does every L{POLL_SECONDS})."""
        return self.group.poll()

    def status(self) -> dict[str, Any]:
        """The intake's figures, for /dashboard/data."""
        return {
            "stream": self.stream.decode(),
            "active": self.active,
            "pending": self.group.pending,
            "lag": self.group.lag,
            "oldestPendingAgeSeconds": round(self.group.oldest_age_seconds, 3),
            "consumed": self.consumed,
            "dead": self.dead,
        }

    # ------------------------------------------------------------ waiting

    def _sleep(self, seconds: float) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._wake = (self._clock.callLater(seconds, self._wake_up), d)
        return d

    def _wake_up(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None:
            call, d = wake
            if call.active():
                call.cancel()
            d.callback(None)


class GroupState:
    """
    The consumer group's pending entries, lag and oldest entry not
    acknowledged, as Redis last reported them (every instance reads them,
    whichever consumes).
    """

    def __init__(self, stream: bytes, command: Command, clock: IReactorTime) -> None:
        self.stream = stream
        self._command = command
        self._clock = clock
        self.pending = 0
        self.lag = 0
        self.oldest_age_seconds = 0.0

    def poll(self) -> Deferred[None]:
        """Read the group's state (the last figures stay while Redis cannot say)."""
        return Deferred.fromCoroutine(self._poll())

    async def _poll(self) -> None:
        try:
            summary = await self._command("XPENDING", self.stream, GROUP)
            groups = await self._command("XINFO", "GROUPS", self.stream)
        except Exception:
            return  # no group yet, or Redis away: keep the last figures
        pending = int(summary[0] or 0)
        info: dict[bytes, Any] = {}
        for g in groups:
            fields = dict(zip(g[::2], g[1::2]))
            if fields.get(b"name") == GROUP:
                info = fields
        lag = info.get(b"lag")
        self.pending, self.lag = pending, int(lag) if lag is not None else 0
        oldest: bytes | None = summary[1] if pending else None
        if oldest is None and self.lag:
            after = b"(" + (info.get(b"last-delivered-id") or b"0-0")
            try:
                first = await self._command("XRANGE", self.stream, after, "+", "COUNT", 1)
            except Exception:
                return
            oldest = first[0][0] if first else None
        now_ms = self._clock.seconds() * 1000
        self.oldest_age_seconds = max(0.0, (now_ms - id_ms(oldest)) / 1000) if oldest else 0.0


class IntakeCollector:
    """The intake's figures in /metrics."""

    def __init__(self, intake: Intake) -> None:
        self._intake = intake

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        i = self._intake
        yield GaugeMetricFamily("happyrobot_intake_pending",
                                "Intake entries read by a consumer and not acknowledged",
                                value=i.group.pending)
        yield GaugeMetricFamily("happyrobot_intake_lag",
                                "Intake entries not yet read by the consumer group",
                                value=i.group.lag)
        yield GaugeMetricFamily("happyrobot_intake_oldest_pending_age_seconds",
                                "Age of the oldest intake entry not acknowledged (0: none)",
                                value=i.group.oldest_age_seconds)
        yield GaugeMetricFamily("happyrobot_intake_active",
                                "1 while this instance holds the intake's lease and consumes",
                                value=1 if i.active else 0)
        yield CounterMetricFamily("happyrobot_intake_consumed",
                                  "Intake entries this instance published and acknowledged",
                                  value=i.consumed)
        yield CounterMetricFamily("happyrobot_intake_dead",
                                  "Intake entries this instance moved to the dead-letter stream",
                                  value=i.dead)


def for_bus(config: Config, bus: RedisBus, metrics: Metrics, reactor: IReactorTime) -> Intake:
    """
    The intake of C{config.intake_stream}, publishing through C{bus} as
    the instance C{bus.instance_id}, its lease living INSTANCE_TTL, its
    figures in C{metrics} (/metrics and /dashboard/data).
    """
    # The reader goes where the bus's connections go (with Redis Sentinel,
    # to the master the sentinels name at each connection attempt), and
    # connects again when they do, or when the Redis it reached is a replica.
    reader = SingleConnection(
        bus.link.address, bus.link.endpoint, reactor, bus.reply_timeout,
        lambda attempt: backoff(*bus.reconnect_delays, attempt), lambda up: None,
    )
    bus.link.also_reconnect(reader)  # on +switch-master, with the bus's connections
    intake = Intake(
        config.intake_stream, bus.instance_id, reader, bus.link.command, bus.append, bus.flush,
        reactor, config.instance_ttl_seconds, config.max_broadcast_bytes,
    )
    metrics.registry.register(IntakeCollector(intake))
    metrics.intake_status = intake.status
    return intake


class PublishError(Exception):
    """The command line could not append to the stream (one line)."""


async def append_event(reactor: IReactorTime, url: str, stream: str, body: dict[str, Any],
                       timeout: float = 5.0) -> str:
    """
    C{XADD <stream> * event <json>}: what a back end does to publish
    through the intake.  Returns the entry's id.

    @raise PublishError: a bad URL, or Redis unreachable or refusing.
    """
    try:
        address = redis_address(url)
    except ConfigError as e:
        raise PublishError(str(e)) from None
    data = messages.dumps(body)
    try:
        entry_id = await ask(reactor, address, timeout, "XADD", stream, "*", "event", data,
                             select_db=True)
    except Exception as e:
        raise PublishError(f"cannot append to {stream} at {address.host}:{address.port}: "
                           f"{str(e) or e.__class__.__name__}") from None
    return str(entry_id.decode("ascii") if isinstance(entry_id, bytes) else entry_id)
