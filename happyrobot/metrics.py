"""
The server's metrics: Prometheus counters, gauges and histograms in a
registry of their own, and a small ring of one-second samples from which
the dashboard's rates and latency percentiles are computed.

Each server (L{happyrobot.tap.build_factory}) has its own L{Metrics} and
its own C{CollectorRegistry}, never prometheus_client's global one, so
several servers in one process (the tests) do not collide.

The hot paths call one method here per event or per reactor turn, never
per recipient: the fan-out is counted from the registry's return value
(L{Metrics.fanout}), frames written are added up by the turn flusher and
counted once per turn (L{Metrics.turn_flushed}).  Gauges (connections,
rooms, the bus link) are read when scraped, so keeping them costs nothing.
The per-event metrics are plain Python numbers (L{Buckets}, a dict of
counts) turned into Prometheus families only when scraped: an observation
costs a bisect and two additions instead of prometheus_client's locked
Histogram.observe (about 1.4 us each, measured).

No sockets, no reactor import: time comes from the injected clock.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Callable, Iterable, Protocol, Sized

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString
from twisted.internet.interfaces import IReactorTime

from happyrobot import messages

#: Recipients of one event: 0 (the sender alone) up to a large room.
FANOUT_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
#: Receipt to written: a loopback relay is well under a millisecond.
LATENCY_BUCKETS_SECONDS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
)
#: How many one-second samples the dashboard keeps (two minutes).
SAMPLES_KEPT = 120
#: Rates and percentiles on the dashboard cover this many seconds.
DASHBOARD_WINDOW_SECONDS = 5.0
#: Close codes with their own label; any other is counted as its range
#: ("3xxx", "4xxx", "other"), since a client may choose any code.
KNOWN_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010,
                               1011, 1012, 1013, 1014, 1015})

_MESSAGE_KINDS: dict[type, str] = {
    messages.SetUser: "SET_USER",
    messages.JoinProject: "JOIN_PROJECT",
    messages.LeaveProject: "LEAVE_PROJECT",
}


class _Healthy(Protocol):
    #: The bus's engine (``local``, ``redis``), the label of its gauge.
    engine: str

    @property
    def healthy(self) -> bool:
        """Whether the bus reaches every instance."""


def close_label(code: int | None) -> str:
    """
    The C{code} label of a close: bounded, whatever code the client sent.
    Autobahn reports a close frame without a status code as None, which
    RFC 6455 calls 1005.
    """
    if code is None:
        return "1005"
    if code in KNOWN_CLOSE_CODES:
        return str(code)
    if 3000 <= code <= 4999:
        return f"{code // 1000}xxx"
    return "other"


def quantile(bounds: tuple[float, ...], cumulative: list[float], q: float) -> float | None:
    """
    The C{q} quantile of a Prometheus histogram, interpolated within its
    bucket as C{histogram_quantile} does.  C{cumulative} holds the counts of
    the finite C{bounds} and then of C{+Inf}.

    @return: None when the histogram is empty; the largest finite bound when
        the quantile falls in the C{+Inf} bucket.
    """
    total = cumulative[-1] if cumulative else 0
    if total <= 0:
        return None
    rank = q * total
    below = 0.0
    for i, count in enumerate(cumulative):
        if count >= rank:
            if i >= len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            inside = count - below
            fraction = (rank - below) / inside if inside else 1.0
            return lower + (bounds[i] - lower) * fraction
        below = count
    return bounds[-1]


@dataclass(frozen=True)
class Sample:
    """The counters' totals at one moment, kept for the dashboard."""

    at: float
    connections: int
    rooms: int
    messages_in: float
    frames_out: float
    events: float
    errors: float
    #: Cumulative counts of the latency histogram's buckets (+Inf last).
    latency: tuple[float, ...]


class Buckets:
    """
    A histogram kept as plain numbers: one count per bucket (not
    cumulative) and the sum.  Exposed by L{_HotCollector}.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[float]:
        """Counts of C{le} each bound, then of C{+Inf}, as Prometheus has them."""
        out: list[float] = []
        running = 0
        for count in self.counts:
            running += count
            out.append(running)
        return out

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        les = [_le(b) for b in self.bounds] + ["+Inf"]
        return HistogramMetricFamily(
            name, documentation,
            buckets=list(zip(les, self.cumulative())), sum_value=self.total,
        )


def _le(bound: float) -> str:
    return floatToGoString(bound)  # the label text prometheus_client's own Histogram uses


class _HotCollector:
    """The per-message and per-event metrics, built from L{Metrics}' plain numbers."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        messages_in = CounterMetricFamily(
            "happyrobot_messages_in", "Messages received, by type", labels=["type"]
        )
        for kind, count in sorted(m.messages_in.items()):
            messages_in.add_metric([kind], count)
        return [
            messages_in,
            CounterMetricFamily("happyrobot_frames_out",
                                "WebSocket messages written to clients (frames)",
                                value=m.frames_out),
            m.fanout_recipients.family(
                "happyrobot_fanout_recipients",
                "Local recipients of one relayed or broadcast event"),
            m.event_latency.family(
                "happyrobot_event_latency_seconds",
                "From receipt of a relayed event to the end of the write of its turn"),
        ]


class _LiveCollector:
    """Gauges read at scrape time from the server's own objects."""

    def __init__(self, connections: Sized) -> None:
        self._connections = connections
        self._rooms: Sized = ()
        self._bus: _Healthy | None = None

    def describe(self) -> Iterable[Metric]:
        return self._families(0, 0, False)

    def collect(self) -> Iterable[Metric]:
        healthy = bool(self._bus.healthy) if self._bus is not None else True
        return self._families(len(self._connections), len(self._rooms), healthy)

    def _families(self, connections: int, rooms: int, healthy: bool) -> list[Metric]:
        bus = "local" if self._bus is None else self._bus.engine
        up = GaugeMetricFamily(
            "happyrobot_bus_healthy",
            "1 while events reach every instance (with REDIS_URL: the Redis link is up)",
            labels=["bus"],
        )
        up.add_metric([bus], 1 if healthy else 0)
        return [
            GaugeMetricFamily("happyrobot_connections", "Open WebSocket connections",
                              value=connections),
            GaugeMetricFamily("happyrobot_rooms", "Rooms with at least one local member",
                              value=rooms),
            up,
        ]


class Metrics:
    """
    Every metric of one server, in its own registry.  Made first by the
    wiring (the room registry and the turn flusher record into it), with the
    open connections (a sized mapping) that it reads at scrape time; the
    room registry and the bus, made after it, are read once L{watch} has
    named them.
    """

    def __init__(self, clock: IReactorTime, connections: Sized = ()) -> None:
        self._clock = clock
        self._connections = connections
        self._live = _LiveCollector(connections)
        self.registry = CollectorRegistry()
        self.registry.register(self._live)
        #: Valid client messages by type, and frames written (plain numbers).
        self.messages_in: dict[str, int] = {}
        self.frames_out = 0
        self.fanout_recipients = Buckets(FANOUT_BUCKETS)
        self.event_latency = Buckets(LATENCY_BUCKETS_SECONDS)
        self.registry.register(_HotCollector(self))
        self.errors = Counter(
            "happyrobot_errors", "ERROR messages sent, by code", ["code"],
            registry=self.registry,
        )
        self.closes = Counter(
            "happyrobot_closes", "Connections closed, by close code", ["code"],
            registry=self.registry,
        )
        self.slow_readers = Counter(
            "happyrobot_slow_reader_disconnects",
            "Connections closed with 1013 for reading too slowly",
            registry=self.registry,
        )
        self._samples: deque[Sample] = deque(maxlen=SAMPLES_KEPT)
        #: The intake's figures (INTAKE_STREAM), for the dashboard, if it runs.
        self.intake_status: Callable[[], dict[str, Any]] | None = None

    def watch(self, rooms: Sized, bus: _Healthy) -> None:
        """Report the number of C{rooms} and the state of C{bus} from now on."""
        self._live._rooms = rooms
        self._live._bus = bus

    # ------------------------------------------------------------ recording

    def message_in(self, msg: messages.ClientMessage) -> None:
        """One parsed client message (so the C{type} label is one of a known few)."""
        kind = msg.type if isinstance(msg, messages.Relay) else _MESSAGE_KINDS[type(msg)]
        counts = self.messages_in
        counts[kind] = counts.get(kind, 0) + 1

    def error(self, code: str) -> None:
        """An ERROR with C{code} (one of the server's own codes) was sent."""
        self.errors.labels(code).inc()

    def closed(self, code: int | None) -> None:
        """An open connection closed with C{code}."""
        self.closes.labels(close_label(code)).inc()

    def slow_reader(self) -> None:
        """A connection was closed for reading too slowly."""
        self.slow_readers.inc()

    def fanout(self, recipients: int) -> None:
        """One event was handed to C{recipients} local members (once per event)."""
        self.fanout_recipients.observe(recipients)

    def turn_flushed(self, frames: int, received: list[float]) -> None:
        """
        A reactor turn's writes ended: C{frames} frames were written, and the
        events received at the clock times C{received} were among them.
        """
        self.frames_out += frames
        if received:
            now = self._clock.seconds()
            observe = self.event_latency.observe
            for at in received:
                observe(now - at)

    # ------------------------------------------------------------ reading

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

    def sample(self, now: float | None = None) -> Sample:
        """Keep the counters' totals now, for the dashboard's rates (once a second)."""
        taken = Sample(
            at=self._clock.seconds() if now is None else now,
            connections=len(self._connections),
            rooms=len(self._live._rooms),
            messages_in=sum(self.messages_in.values()),
            frames_out=self.frames_out,
            events=sum(self.fanout_recipients.counts),
            errors=_total(self.errors),
            latency=tuple(self.event_latency.cumulative()),
        )
        self._samples.append(taken)
        return taken

    def dashboard(self) -> dict[str, Any]:
        """
        Rates (per second over the last L{DASHBOARD_WINDOW_SECONDS}), latency
        percentiles over the same window, totals, and the one-second series
        for the charts.  Rates need two samples; before that they are 0.
        """
        samples = list(self._samples)
        series: dict[str, list[Any]] = {
            k: [] for k in ("t", "connections", "rooms", "messagesIn", "framesOut", "events",
                            "p50", "p99")
        }
        for prev, cur in pairwise(samples):
            dt = cur.at - prev.at
            if dt <= 0:
                continue
            series["t"].append(int(cur.at * 1000))
            series["connections"].append(cur.connections)
            series["rooms"].append(cur.rooms)
            series["messagesIn"].append(round((cur.messages_in - prev.messages_in) / dt, 2))
            series["framesOut"].append(round((cur.frames_out - prev.frames_out) / dt, 2))
            series["events"].append(round((cur.events - prev.events) / dt, 2))
            latency = _percentiles(prev.latency, cur.latency)
            series["p50"].append(latency["p50"])
            series["p99"].append(latency["p99"])
        rates = {"messagesIn": 0.0, "framesOut": 0.0, "events": 0.0, "errors": 0.0}
        latency = {"p50": None, "p90": None, "p99": None}
        if len(samples) >= 2:
            last = samples[-1]
            first = next(
                (s for s in samples if last.at - s.at <= DASHBOARD_WINDOW_SECONDS + 0.5),
                samples[-2],
            )
            if first is last:
                first = samples[-2]
            dt = last.at - first.at
            if dt > 0:
                rates = {
                    "messagesIn": round((last.messages_in - first.messages_in) / dt, 2),
                    "framesOut": round((last.frames_out - first.frames_out) / dt, 2),
                    "events": round((last.events - first.events) / dt, 2),
                    "errors": round((last.errors - first.errors) / dt, 2),
                }
            latency = _percentiles(first.latency, last.latency)
        extra = {"intake": self.intake_status()} if self.intake_status else {}
        return {
            **extra,
            "totals": {
                "messagesIn": sum(self.messages_in.values()),
                "framesOut": self.frames_out,
                "events": sum(self.fanout_recipients.counts),
                "errors": _total(self.errors),
                "slowReaders": _total(self.slow_readers),
            },
            "rates": rates,
            "latencyMs": latency,
            "windowSeconds": DASHBOARD_WINDOW_SECONDS,
            "series": series,
        }


def _total(metric: Any) -> float:
    """The sum of a counter's values over all its labels."""
    return float(sum(s.value for s in metric.collect()[0].samples if s.name.endswith("_total")))


def _percentiles(before: tuple[float, ...], after: tuple[float, ...]) -> dict[str, float | None]:
    """p50/p90/p99 in milliseconds of what the latency histogram got between two samples."""
    if len(before) != len(after):
        before = (0.0,) * len(after)
    delta = [a - b for a, b in zip(after, before)]
    result: dict[str, float | None] = {}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        value = quantile(LATENCY_BUCKETS_SECONDS, delta, q)
        result[name] = None if value is None else round(value * 1000, 3)
    return result
