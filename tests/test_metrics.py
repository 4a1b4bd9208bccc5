"""
Metrics and the dashboard: the L{happyrobot.metrics} arithmetic on plain
objects, ``GET /metrics`` and ``GET /dashboard`` (and its JSON feed) over
loopback with real clients, their token protection, and the dashboard in
headless Chromium (driven by ``tests/browser/dashboard.mjs``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock, LoopingCall
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from happyrobot.config import Config
from happyrobot.messages import Relay
from happyrobot.metrics import LATENCY_BUCKETS_SECONDS, Metrics, close_label, quantile
from happyrobot.rooms import RoomRegistry
from happyrobot.tap import build_factory, metrics_sampler
from happyrobot.web import make_site
from happyrobot.writer import TurnFlusher
from tests import test_browser
from tests.helpers import LineCollector, RedisTestCase, ServerTestCase

TOKEN = "s3cret-operator-token"


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as {(sample name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class _HealthyBus:
    """What the metrics read of a bus."""

    healthy = True
    engine = "local"


class _Conn:
    """A connection with C{frames} frames queued, as the flusher sees it."""

    def __init__(self, frames: int) -> None:
        self.frames = frames
        self.flushed = 0

    def write_queue(self) -> int:
        self.flushed += 1
        return self.frames


class _Member:
    """A room member that records what it is sent."""

    user_id = "u"
    initials = "U"

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.sent: list[bytes] = []
        self.writer = self

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)


class MetricsUnitTests(SynchronousTestCase):
    """The metrics module and its two hooks, without sockets."""

    def test_quantile_interpolates_within_a_bucket(self) -> None:
        """A quantile is interpolated linearly inside the bucket it falls in."""
        bounds = (1.0, 2.0, 4.0)
        self.assertEqual(quantile(bounds, [0, 10, 10, 10], 0.5), 1.5)
        self.assertEqual(quantile(bounds, [10, 10, 20, 20], 0.75), 3.0)
        self.assertIsNone(quantile(bounds, [0, 0, 0, 0], 0.5))
        self.assertEqual(quantile(bounds, [0, 0, 0, 5], 0.99), 4.0)  # +Inf: the largest bound

    def test_buckets_expose_as_prometheus_does(self) -> None:
        """The plain-number histogram exposes the same buckets as prometheus_client's own."""
        from prometheus_client import CollectorRegistry, Histogram, generate_latest

        values = [0, 0.0001, 0.00011, 0.003, 0.5, 1.0, 7.0, 100.0]
        reference = CollectorRegistry()
        h = Histogram("happyrobot_event_latency_seconds", "d",
                      buckets=LATENCY_BUCKETS_SECONDS, registry=reference)
        metrics = Metrics(Clock())
        for v in values:
            h.observe(v)
            metrics.event_latency.observe(v)

        def buckets(text: str) -> dict[Any, float]:
            return {k: v for k, v in scrape(text).items()
                    if k[0].startswith("happyrobot_event_latency_seconds_")
                    and not k[0].endswith("_created")}

        self.assertEqual(buckets(metrics.exposition().decode()),
                         buckets(generate_latest(reference).decode()))

    def test_close_labels_are_bounded(self) -> None:
        """Protocol close codes keep their number; client-chosen codes fold into ranges."""
        self.assertEqual([close_label(c) for c in (1000, 1013, None, 3001, 4999, 2000)],
                         ["1000", "1013", "1005", "3xxx", "4xxx", "other"])

    def test_flusher_reports_once_per_turn(self) -> None:
        """The flusher adds up the turn's frames and reports them, with event times, once."""
        clock = Clock()
        turns: list[tuple[int, list[float]]] = []
        flusher = TurnFlusher(clock, lambda frames, received: turns.append((frames, received)))
        conns = [_Conn(2), _Conn(1), _Conn(3)]
        for conn in conns:
            flusher.mark(conn)
        self.assertEqual(flusher.time_event("seq", 10.0), "seq")
        clock.advance(0)
        self.assertEqual(turns, [(6, [10.0])])
        self.assertEqual([c.flushed for c in conns], [1, 1, 1])
        flusher.mark(conns[0])
        clock.advance(0)
        self.assertEqual(turns[1], (2, []))
        # An event in a turn that writes nothing is not timed, and adds no turn.
        flusher.time_event(None, 11.0)
        self.assertEqual(clock.getDelayedCalls(), [])
        flusher.mark(conns[1])
        clock.advance(0)
        self.assertEqual(turns[2], (1, []))

    def test_latency_is_observed_per_event(self) -> None:
        """Each event of a turn gets one latency: the turn's end minus its receipt."""
        clock = Clock()
        clock.advance(100.0)
        metrics = Metrics(clock)
        metrics.turn_flushed(500, [99.998, 99.9995])
        text = metrics.exposition().decode()
        values = scrape(text)
        self.assertEqual(values[("happyrobot_event_latency_seconds_count", ())], 2)
        self.assertAlmostEqual(values[("happyrobot_event_latency_seconds_sum", ())], 0.0025)
        self.assertEqual(values[("happyrobot_frames_out_total", ())], 500)

    def test_fanout_is_observed_once_per_event(self) -> None:
        """The registry reports each delivery's recipient count once, not per member."""
        seen: list[int] = []
        registry = RoomRegistry(Clock(), on_deliver=seen.append)
        members = [_Member(f"c{i}") for i in range(5)]
        for m in members:
            registry.join("p1", m)
        self.assertEqual(registry.deliver("p1", b"frame", exclude="c0"), 4)
        self.assertEqual(seen, [4])

    def test_registries_are_per_server(self) -> None:
        """Two servers in one process count separately."""
        a = build_factory(Config(), Clock())
        b = build_factory(Config(), Clock())
        a.metrics.slow_reader()
        self.assertIsNot(a.metrics.registry, b.metrics.registry)
        self.assertEqual(scrape(b.metrics.exposition().decode())[
            ("happyrobot_slow_reader_disconnects_total", ())], 0)

    def test_dashboard_rates_and_percentiles(self) -> None:
        """Rates come from the samples' totals; percentiles from the window's latencies."""
        clock = Clock()
        metrics = Metrics(clock, connections={"a": 1})
        metrics.watch([1, 2], _HealthyBus())
        metrics.sample(0.0)
        event = Relay("TASK_UPDATE", "p1", None, None, False)
        for _ in range(20):
            metrics.message_in(event)
        metrics.turn_flushed(40, [])
        clock.advance(2.0)
        metrics.turn_flushed(0, [clock.seconds() - 0.0004] * 10)
        metrics.sample(2.0)
        data = metrics.dashboard()
        self.assertEqual(data["rates"]["messagesIn"], 10.0)
        self.assertEqual(data["rates"]["framesOut"], 20.0)
        p50 = data["latencyMs"]["p50"]
        self.assertTrue(0.25 <= p50 <= 0.5, p50)  # the 0.25-0.5 ms bucket
        self.assertEqual(data["series"]["connections"], [1])
        self.assertEqual(data["series"]["rooms"], [2])
        self.assertEqual(data["series"]["messagesIn"], [10.0])

    def test_dashboard_before_two_samples(self) -> None:
        """With fewer than two samples the rates are 0 and there are no percentiles."""
        data = Metrics(Clock()).dashboard()
        self.assertEqual(data["rates"]["messagesIn"], 0.0)
        self.assertEqual(data["latencyMs"], {"p50": None, "p90": None, "p99": None})
        self.assertEqual(data["series"]["t"], [])

    def test_sampler_ticks_every_second(self) -> None:
        """The sampler service takes one sample a second on the injected clock."""
        clock = Clock()
        factory = build_factory(Config(), clock)
        sampler = metrics_sampler(factory, clock)
        sampler.startService()
        self.addCleanup(sampler.stopService)
        clock.advance(1.0)
        clock.advance(1.0)
        self.assertEqual(len(factory.metrics.dashboard()["series"]["t"]), 2)

    def test_latency_buckets_cover_loopback_and_slow_links(self) -> None:
        """The latency buckets reach below 1 ms and up to seconds."""
        self.assertLess(LATENCY_BUCKETS_SECONDS[0], 0.001)
        self.assertGreaterEqual(LATENCY_BUCKETS_SECONDS[-1], 1.0)


class MetricsEndpointTests(ServerTestCase):
    """GET /metrics over loopback."""

    async def test_values_move(self) -> None:
        """Connecting, relaying and an error show up in the scraped values."""
        self.start_server()
        code, body, headers = await self.http("GET", "/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(headers.getRawHeaders("content-type")[0].startswith("text/plain"))
        before = scrape(body.decode())
        self.assertEqual(before[("happyrobot_connections", ())], 0)
        self.assertEqual(before[("happyrobot_bus_healthy", (("bus", "local"),))], 1)

        a = await self.joined("p1", "user_a")
        b = await self.joined("p1", "user_b")
        for i in range(3):
            a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"i": i}})
        for _ in range(3):
            await b.next_of("TASK_UPDATE")
        await self.round_trip(a)  # one UNKNOWN_TYPE error

        code, body, _ = await self.http("GET", "/metrics")
        values = scrape(body.decode())
        self.assertEqual(values[("happyrobot_connections", ())], 2)
        self.assertEqual(values[("happyrobot_rooms", ())], 1)
        msgs = "happyrobot_messages_in_total"
        self.assertEqual(values[(msgs, (("type", "TASK_UPDATE"),))], 3)
        self.assertEqual(values[(msgs, (("type", "SET_USER"),))], 2)
        self.assertEqual(values[(msgs, (("type", "JOIN_PROJECT"),))], 2)
        self.assertEqual(values[("happyrobot_errors_total", (("code", "UNKNOWN_TYPE"),))], 1)
        # Each event reached one other member: three observations of 1.
        self.assertEqual(values[("happyrobot_fanout_recipients_count", ())], 3)
        self.assertEqual(values[("happyrobot_fanout_recipients_sum", ())], 3)
        self.assertEqual(values[("happyrobot_event_latency_seconds_count", ())], 3)
        self.assertGreater(values[("happyrobot_event_latency_seconds_sum", ())], 0)
        # Greetings, presence, the three events and the error, at least.
        self.assertGreaterEqual(values[("happyrobot_frames_out_total", ())], 2 + 2 + 3 + 1)

        a.sendClose(1000)
        b.sendClose()  # no status code: counted as 1005
        await self.factory.when_empty()
        code, body, _ = await self.http("GET", "/metrics")
        values = scrape(body.decode())
        self.assertEqual(values[("happyrobot_closes_total", (("code", "1000"),))], 1)
        self.assertEqual(values[("happyrobot_closes_total", (("code", "1005"),))], 1)
        self.assertEqual(values[("happyrobot_connections", ())], 0)

    async def test_broadcast_fanout(self) -> None:
        """A POST /broadcast counts as one event with its recipients."""
        self.start_server()
        a = await self.joined("p1", "user_a")
        await self.joined("p1", "user_b")
        code, _, _ = await self.http("POST", "/broadcast",
                                     {"type": "TASK_CREATE", "projectId": "p1", "payload": {}})
        self.assertEqual(code, 200)
        await a.next_of("TASK_CREATE")
        _, body, _ = await self.http("GET", "/metrics")
        values = scrape(body.decode())
        self.assertEqual(values[("happyrobot_fanout_recipients_count", ())], 1)
        self.assertEqual(values[("happyrobot_fanout_recipients_sum", ())], 2)

    async def test_token_required(self) -> None:
        """With API_TOKEN set, /metrics needs the bearer token (not a query parameter)."""
        self.start_server(api_token=TOKEN)
        code, body, _ = await self.http("GET", "/metrics")
        self.assertEqual(code, 401)
        self.assertEqual(body, {"error": "Missing or invalid API token"})
        code, _, _ = await self.http("GET", "/metrics", headers={"authorization": "Bearer nope"})
        self.assertEqual(code, 401)
        code, _, _ = await self.http("GET", f"/metrics?token={TOKEN}")
        self.assertEqual(code, 401)
        code, body, _ = await self.http("GET", "/metrics",
                                        headers={"authorization": f"Bearer {TOKEN}"})
        self.assertEqual(code, 200)
        self.assertIn(b"happyrobot_connections", body)


class RedisMetricsTests(RedisTestCase):
    """Metrics of instances sharing a real redis-server."""

    async def test_link_state_and_cross_instance_events(self) -> None:
        """The bus gauge follows the Redis link; each instance counts its own deliveries."""
        redis = await self.start_redis()
        a, b = await self.start_node(redis), await self.start_node(redis)
        sender = await a.joined("p1", "user_a")
        receiver = await b.joined("p1", "user_b")
        await a.settled()
        await b.settled()
        sender.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {}})
        await receiver.next_of("TASK_UPDATE")

        up = ("happyrobot_bus_healthy", (("bus", "redis"),))
        _, body, _ = await b.http("GET", "/metrics")
        values = scrape(body.decode())
        self.assertEqual(values[up], 1)
        self.assertEqual(values[("happyrobot_fanout_recipients_sum", ())], 1)
        self.assertNotIn(("happyrobot_messages_in_total", (("type", "TASK_UPDATE"),)), values)
        _, body, _ = await a.http("GET", "/metrics")
        values = scrape(body.decode())
        self.assertEqual(values[("happyrobot_messages_in_total", (("type", "TASK_UPDATE"),))], 1)

        await redis.stop()
        await a.bus.when(lambda: not a.bus.healthy)
        _, body, _ = await a.http("GET", "/metrics")
        self.assertEqual(scrape(body.decode())[up], 0)
        _, data, _ = await a.http("GET", "/dashboard/data")
        self.assertFalse(data["busHealthy"])


class DashboardTests(ServerTestCase):
    """GET /dashboard and /dashboard/data over loopback."""

    async def test_page_is_self_contained(self) -> None:
        """The page is HTML with its own script and canvases, and no external URL."""
        self.start_server()
        code, body, headers = await self.http("GET", "/dashboard")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"])
        self.assertIn("default-src 'none'", headers.getRawHeaders("content-security-policy")[0])
        text = body.decode("utf-8")
        self.assertIn("<canvas", text)
        self.assertIn("dashboard/", text.replace('base + "data"', "dashboard/data"))
        self.assertEqual(re.findall(r"https?://", text), [])
        self.assertNotRegex(text, r"<script[^>]+src=")
        self.assertNotRegex(text, r"<link[^>]+href=")

    async def test_trailing_slash_and_unknown_children(self) -> None:
        """/dashboard/ is the page too; other paths below it are JSON 404s."""
        self.start_server()
        code, body, _ = await self.http("GET", "/dashboard/")
        self.assertEqual(code, 200)
        self.assertIn(b"<canvas", body)
        code, body, _ = await self.http("GET", "/dashboard/nope")
        self.assertEqual((code, body), (404, {"error": "Not found"}))

    async def test_token_required(self) -> None:
        """With API_TOKEN set, the page and its feed take the token as header or ?token=."""
        self.start_server(api_token=TOKEN)
        for path in ("/dashboard", "/dashboard/data"):
            code, _, _ = await self.http("GET", path)
            self.assertEqual(code, 401, path)
            code, _, _ = await self.http("GET", f"{path}?token=wrong")
            self.assertEqual(code, 401, path)
            code, _, _ = await self.http("GET", f"{path}?token={TOKEN}")
            self.assertEqual(code, 200, path)
            code, _, _ = await self.http("GET", path, headers={"authorization": f"Bearer {TOKEN}"})
            self.assertEqual(code, 200, path)

    async def test_data_moves(self) -> None:
        """The feed's counts, rooms, rates and latency follow clients connecting and sending."""
        self.start_server()
        metrics = self.factory.metrics
        metrics.sample(1000.0)
        code, idle, _ = await self.http("GET", "/dashboard/data")
        self.assertEqual(code, 200)
        self.assertEqual(
            sorted(idle),
            ["busHealthy", "connections", "latencyMs", "rates", "rooms", "series", "timestamp",
             "topRooms", "totals", "windowSeconds"],
        )
        self.assertEqual((idle["connections"], idle["rooms"], idle["topRooms"]), (0, 0, []))
        self.assertEqual(idle["rates"]["messagesIn"], 0)
        self.assertIsNone(idle["latencyMs"]["p50"])
        self.assertTrue(idle["busHealthy"])

        a = await self.joined("p1", "user_a")
        b = await self.joined("p1", "user_b")
        await self.joined("p2", "user_c")
        for i in range(5):
            a.send_json({"type": "TASK_UPDATE", "projectId": "p1", "payload": {"i": i}})
        for _ in range(5):
            await b.next_of("TASK_UPDATE")
        metrics.sample(1001.0)

        code, busy, _ = await self.http("GET", "/dashboard/data")
        self.assertEqual((busy["connections"], busy["rooms"]), (3, 2))
        self.assertEqual(busy["topRooms"], [{"projectId": "p1", "members": 2},
                                            {"projectId": "p2", "members": 1}])
        # 3 SET_USER + 3 JOIN_PROJECT + 5 events in the one second between samples.
        self.assertEqual(busy["rates"]["messagesIn"], 11.0)
        self.assertEqual(busy["rates"]["events"], 5.0)
        self.assertGreater(busy["rates"]["framesOut"], 5)
        self.assertIsInstance(busy["latencyMs"]["p50"], float)
        self.assertGreaterEqual(busy["latencyMs"]["p99"], busy["latencyMs"]["p50"])
        self.assertEqual(busy["totals"]["messagesIn"], 11)
        self.assertEqual(busy["series"]["connections"], [3])
        self.assertEqual(len(busy["series"]["t"]), 1)
        self.assertEqual(busy["series"]["t"][0], 1001000)


class DashboardBrowserTests(ServerTestCase):
    """The dashboard in headless Chromium, while clients connect and send."""

    # Generous, because a first run may install Chromium and playwright-core.
    timeout = 600

    def _start_tracked_server(self, **overrides: Any) -> None:
        """
        L{ServerTestCase.start_server}, with the site wrapped so that cleanup
        also closes the browser's keep-alive HTTP connections.
        """
        config = replace(
            Config(presence_window_seconds=0.0, ping_interval_seconds=0.0), **overrides
        )
        self.factory = build_factory(config, reactor)
        tracking = test_browser._TrackingFactory(make_site(self.factory))
        self.addCleanup(tracking.close_all)
        self._clients = []
        self.port = self.successResultOf(
            serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(tracking)
        )
        self.port_number = self.port.getHost().port
        self.addCleanup(self._stop)
        sampler = metrics_sampler(self.factory, reactor)
        sampler.startService()
        self.addCleanup(sampler.stopService)

    async def test_numbers_move_and_screenshot(self) -> None:
        """
        The page shows the idle server, then the new connections, a message
        rate and a latency once clients send; a screenshot is saved.
        """
        await test_browser.BrowserClientTests._ensure_chromium(self)  # type: ignore[arg-type]
        node = await test_browser.BrowserClientTests._ensure_playwright(self)  # type: ignore[arg-type]
        self._start_tracked_server(api_token=TOKEN)
        screenshot = os.path.abspath(self.mktemp()) + ".png"
        config = {
            "page": f"http://127.0.0.1:{self.port_number}/dashboard?token={TOKEN}",
            "screenshot": screenshot,
        }
        driver = LineCollector()
        script = os.path.join(test_browser.BROWSER_DIR, "dashboard.mjs")
        transport = reactor.spawnProcess(
            driver, node, [node, script, json.dumps(config)],
            env=test_browser._env(), path=test_browser.BROWSER_DIR,
        )

        async def stop_driver() -> None:
            if not driver.ended.called:
                transport.signalProcess("KILL")
                await driver.ended

        self.addCleanup(stop_driver)

        await test_browser._until_line(driver, b'{"need":"traffic"}', "the driver")
        a = await self.joined("p-dash", "user_a")
        await self.joined("p-dash", "user_b")
        await self.joined("p-other", "user_c")
        n = iter(range(1_000_000))
        sender = LoopingCall(lambda: a.send_json(
            {"type": "TASK_UPDATE", "projectId": "p-dash", "payload": {"n": next(n)}}))
        sender.start(0.02)
        self.addCleanup(lambda: sender.stop() if sender.running else None)
        transport.write(b"traffic-done\n")

        await driver.ended
        sender.stop()
        result = test_browser.driver_result(self, driver)
        before, after = result["before"], result["after"]
        self.assertEqual((before["connections"], before["rooms"]), ("0", "0"))
        self.assertEqual((after["connections"], after["rooms"]), ("3", "2"))
        self.assertEqual(after["roomRows"], 2)
        self.assertNotIn(after["rateIn"], ("–", "0"))
        self.assertNotEqual(after["p50"], "–")
        self.assertTrue(result["tokenHidden"])
        self.assertEqual((result["foreign"], result["errors"]), ([], []))
        png = FilePath(screenshot).getContent()
        self.assertEqual(png[:8], b"\x89PNG\r\n\x1a\n")
        self.assertGreater(len(png), 20_000)
