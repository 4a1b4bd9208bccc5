"""
The twistd plugin's options and service: the one place where the pieces
are wired together.

``twistd -n happyrobot-ws [options]`` builds the service with
L{makeService}; ports open only when the service starts, so ``--uid`` and
privileged ports work as with any twistd plugin.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any, Callable, Mapping, cast

from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.python import usage
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

from happyrobot import StartupError, auth, backend, logs, workers
from happyrobot.access import AccessWatch
from happyrobot.bus import Bus, LocalBus
from happyrobot.config import SETTINGS, Config, ConfigError, load_config, read_dotenv
from happyrobot.history import Histories
from happyrobot.metrics import Metrics
from happyrobot.operator import Actions
from happyrobot.redis import intake as redis_intake
from happyrobot.redis.bus import RedisBus
from happyrobot.redis.sentinel import RedisTarget
from happyrobot.rooms import RoomRegistry
from happyrobot.seams import Unsupported
from happyrobot.seams import twisted as twisted_seam
from happyrobot.timers import cancel_if_active
from happyrobot.web import make_site
from happyrobot.workers import IWorkerReactor
from happyrobot.writer import TurnFlusher
from happyrobot.ws import CLOSE_GOING_AWAY, CollabFactory

log = logs.get_logger(__name__)


class Options(usage.Options):
    """Every setting as an option; the help names its variable and default."""

    synopsis = "[options]"
    longdesc = (
        "Happy Robot real-time server: project rooms over WebSocket at /ws, "
        "with /health, /stats and POST /broadcast on the same port. Each "
        "option overrides its environment variable, which overrides the "
        "same variable in the .env file."
    )
    optParameters = [
        [s.option, None, None, f"{s.help} [env {s.env}, default {s.default or 'unset'}]"]
        for s in SETTINGS
        if s.option != "conformance-echo"  # a bare flag, below
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ
        self["env-file"] = ".env"
        self._env_file_given = False

    def opt_env_file(self, path: str) -> None:
        self["env-file"] = path
        self._env_file_given = bool(path)

    # The help of --env-file: twistd's --help shows a docstring's line
    # breaks and indentation as spaces, so it is one line.
    opt_env_file.__doc__ = (
        "dotenv file read for variables not in the environment (default .env, "
        "skipped when missing; a file named here must exist; empty: none)"
    )

    def opt_conformance_echo(self) -> None:
        """Serve /echo for the Autobahn|Testsuite [env CONFORMANCE_ECHO, default false]"""
        # Unset, the key stays absent and CONFORMANCE_ECHO decides.
        self["conformance-echo"] = "true"

    def opt_version(self) -> None:
        """Print the version of happyrobot and exit"""
        from happyrobot import __version__

        print(f"happyrobot {__version__}")
        raise SystemExit(0)

    def config(self) -> Config:
        """
        The settings from these options, the environment and the env file.

        @raise ConfigError: naming the first bad variable.
        """
        dotenv = {}
        path = self["env-file"]
        if path and (self._env_file_given or os.path.exists(path)):
            try:
                # Opened here, not by python-dotenv, which skips a missing
                # file silently and would not give these error lines.
                with open(path, encoding="utf-8") as f:
                    dotenv = read_dotenv(f, lambda problem: log.warn(
                        "--env-file {path}: {problem}; that statement is skipped",
                        path=path, problem=problem))
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"--env-file {path}: {getattr(e, 'strerror', None) or e}") from None
        return load_config(self, self.environ, dotenv)


class IServerReactor(IWorkerReactor, IReactorTCP):
    """
    What the server's services use of their reactor (the reactors twistd
    runs provide all of it).
    """


class ListeningService(twisted_seam.RaisingEndpointService):
    """
    The server's port.  One that cannot be bound (in use, no permission)
    stops start-up with a L{StartupError} naming PORT, instead of a
    traceback, or instead of running without a port.
    """

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            # Short: twistd's daemon parent shows the first 100 bytes.
            # (A TCP port is a number; a UNIX socket's "port" is its path.)
            where = f"{e.interface or '*'}:{e.port}" if isinstance(e.port, int) else e.port
            why = getattr(e.socketError, "strerror", None) or e.socketError
            raise StartupError(f"PORT: {where}: {why}") from None


def listening_service(description: str, site: Site, reactor: IReactorTCP) -> ListeningService:
    """
    The L{ListeningService} for PORT's endpoint C{description}.

    @raise ConfigError: when C{description} is not a valid endpoint.
    """
    try:
        endpoint = endpoints.serverFromString(reactor, description)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"PORT is not a valid endpoint description ({description!r}: {e})") from None
    return ListeningService(endpoint, site)


class DrainService(MultiService):
    """
    On stop (SIGTERM, SIGINT), a rolling restart's share of the work: mark
    the server draining (``/health`` says 503 and new WebSocket handshakes
    are refused; the listening port, a sibling service, stops at the same
    time), then close the WebSockets with 1001 spread evenly over
    C{window} seconds, so that their reconnections do not all land on the
    other instances in the same millisecond, and drop whatever is still
    open C{timeout} seconds after the stop began (keep C{window} below it).

    Its children (the Redis bus) stop only once every connection is gone:
    clients waiting for their turn to be closed keep receiving events and
    sending them.  twistd waits for the returned Deferred.
    """

    def __init__(self, factory: CollabFactory, timeout: float, window: float = 0.0) -> None:
        super().__init__()
        self.factory = factory
        self.timeout = timeout
        self.window = window

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)  # our children stop after the drain, below
        f = self.factory
        f.draining = True
        closing = list(f.connections.values())
        log.info("shutting down: closing {n} connections over {window} s",
                 n=len(closing), window=self.window)
        done = f.when_empty()
        if not done.called:
            closer = self._spread(closing)
            abort = f.clock.callLater(self.timeout, f.abort_all)

            def stop_timers(result: object) -> object:
                for call in (abort, closer.get("call")):
                    cancel_if_active(call)
                return result

            done.addBoth(stop_timers)
        done.addCallback(lambda _: f.http_pool.closeCachedConnections())
        done.addCallback(lambda _: MultiService.stopService(self))
        return done

    def _spread(self, closing: list[Any]) -> dict[str, Any]:
        """
        Close C{closing} in order, the i-th of n at C{i * window / n}
        seconds; returns where the next close is scheduled (C{"call"}).
        """
        f = self.factory
        n = len(closing)
        step = self.window / n
        start = f.clock.seconds()
        queue = deque(closing)
        timer: dict[str, Any] = {}

        def close_due() -> None:
            elapsed = f.clock.seconds() - start + 1e-9  # float rounding of the delays
            while queue and (n - len(queue)) * step <= elapsed:
                proto = queue.popleft()
                still_open = f.connections.get(proto.client_id) is proto
                if still_open:
                    proto.start_close(CLOSE_GOING_AWAY, "Server shutting down")
            timer.pop("call", None)
            if queue and f.connections:
                due = start + (n - len(queue)) * step
                timer["call"] = f.clock.callLater(max(0.0, due - f.clock.seconds()), close_due)

        close_due()
        return timer


def build_factory(config: Config, reactor: IServerReactor) -> CollabFactory:
    """
    The server's objects, each made with what it needs, in that order, and
    the WebSocket factory that holds them.  With Redis (C{config.redis}) the bus
    is a L{RedisBus}, otherwise the in-memory L{LocalBus}: either is a
    service the caller starts and stops (L{makeService} makes it a child).
    """
    # The open connections by client id, filled by the factory.
    connections: dict[str, Any] = {}
    # Per-server metrics (its own Prometheus registry), fed once per event
    # by the registry and once per turn by the flusher.
    metrics = Metrics(reactor, connections)
    flusher = TurnFlusher(reactor, metrics.turn_flushed)
    # Rooms hand their frames straight to the connections' writers.
    registry = RoomRegistry(
        reactor, config.presence_window_seconds, fan_out=flusher.fan_out,
        on_deliver=metrics.fanout,
    )
    # Keep-alive connections to the back end and the identity provider,
    # closed on shutdown.
    http_pool = HTTPConnectionPool(reactor)
    authorizer = None
    if config.project_auth_url:
        authorizer = auth.ProjectAuthorizer(
            backend.project_access(config.project_auth_url, config.api_token, http_pool),
            reactor,
            ttl_seconds=config.project_auth_cache_seconds,
            timeout_seconds=config.project_auth_timeout_seconds,
        )
    # What operator calls (revoke, disconnect) and lapsed access do on this instance.
    actions = Actions(registry, authorizer)
    access = None
    if authorizer is not None:
        access = AccessWatch(authorizer, actions, reactor, config.project_auth_cache_seconds)
    bus: Bus
    if config.redis:
        bus = RedisBus(
            registry, RedisTarget.from_config(config), reactor,
            instance_ttl=config.instance_ttl_seconds,
            history_size=config.history_size, history_ttl_seconds=config.history_ttl_seconds,
            connection_count=connections.__len__, on_read_done=flusher.write_turn,
            actions=actions,
        )
    else:
        histories = Histories(
            config.history_size, config.history_ttl_seconds,
            config.history_max_bytes, config.history_total_bytes,
        )
        bus = LocalBus(registry, histories, reactor, connections.__len__, actions)
    metrics.watch(registry, bus)
    return CollabFactory(
        config, registry, bus, reactor, connections=connections, metrics=metrics,
        flusher=flusher, verifier=_verifier(config, reactor, http_pool), authorizer=authorizer,
        access=access,
        http_pool=http_pool, reactor=reactor,
    )


def _verifier(
    config: Config, reactor: IReactorTime, pool: HTTPConnectionPool
) -> auth.TokenVerifier | None:
    """The session-token verifier that JWT_PUBLIC_KEY or JWKS_URL asks for."""
    keys: auth.StaticKey | auth.JwksKeys
    if config.jwt_public_key:
        try:
            keys = auth.StaticKey(auth.load_public_key(config.jwt_public_key))
        except (ValueError, TypeError, OSError) as e:
            raise ConfigError(f"JWT_PUBLIC_KEY is not a PEM public key or its path ({e})")
    elif config.jwks_url:
        keys = auth.JwksKeys(
            config.jwks_url, lambda url: backend.fetch_url(url, pool), reactor
        )
    else:
        return None
    return auth.TokenVerifier(
        keys,
        issuer=config.jwt_issuer or None,
        audience=config.jwt_audience or None,
        leeway_seconds=config.jwt_leeway_seconds,
    )


#: How often the dashboard's rates and percentiles get a new sample.
METRICS_SAMPLE_SECONDS = 1.0


def metrics_sampler(factory: CollabFactory, reactor: IReactorTime) -> TimerService:
    """The timer that samples C{factory.metrics} every second for /dashboard."""
    sampler = TimerService(METRICS_SAMPLE_SECONDS, _logged(factory.metrics.sample))
    sampler.clock = reactor
    return sampler


def _logged(work: Callable[[], object]) -> Callable[[], None]:
    """C{work} for a timer: an error is logged and the timer keeps going."""

    def tick() -> None:
        try:
            work()
        except Exception:
            log.failure("periodic {name} failed", name=getattr(work, "__name__", "work"))

    return tick


def makeService(options: Options, reactor: IServerReactor | None = None) -> IService:
    """Build the server's service tree from parsed L{Options}."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = cast(IServerReactor, global_reactor)
    try:
        twisted_seam.check()  # before anything relies on it
        config = options.config()
        multi = config.workers > 1 or workers.is_child()
        if multi and not config.redis:
            raise ConfigError(
                "WORKERS above 1 needs REDIS_URL: the workers share rooms through Redis"
            )
        if config.intake_stream and not config.redis:
            raise ConfigError(
                "INTAKE_STREAM needs Redis (REDIS_URL or REDIS_SENTINELS): the stream is in Redis"
            )
        if multi:
            try:
                _, port = workers.tcp_address(config.port)
            except ValueError as e:
                raise ConfigError(f"PORT: {e}") from None
            if port == 0:
                raise ConfigError("PORT: workers need a fixed port, not 0")
        factory = build_factory(config, reactor)
        listener = None if multi else listening_service(config.port, make_site(factory), reactor)
    except (ConfigError, Unsupported) as e:
        # One line naming the variable (or what Twisted lacks), as twistd
        # users expect from a bad flag.
        raise StartupError(str(e)) from None
    logs.set_level(config.log_level)
    service = MultiService()
    # First child, with the bus as its child: the bus starts connecting to
    # Redis before the port opens, and stops only after the drain.
    drain = DrainService(
        factory, config.shutdown_timeout_seconds, config.drain_window_seconds
    )
    drain.setServiceParent(service)
    factory.bus.setServiceParent(drain)
    if config.intake_stream:  # after the bus: stops first, while the bus still publishes
        bus = cast(RedisBus, factory.bus)
        redis_intake.for_bus(config, bus, factory.metrics, reactor).setServiceParent(drain)
    if multi:
        workers.ReusePortService(reactor, config.port, make_site(factory)).setServiceParent(
            service
        )
        if workers.is_child():
            workers.ParentWatch(reactor).setServiceParent(service)
        else:
            pool = workers.WorkerPool(reactor, config.workers, workers.child_argv())
            pool.setServiceParent(service)
    else:
        assert listener is not None
        listener.setServiceParent(service)
    metrics_sampler(factory, reactor).setServiceParent(service)
    service.factory = factory  # type: ignore[attr-defined]
    if config.production and "*" in config.allowed_origins:
        log.warn("ALLOWED_ORIGINS is * in production: any web site may open WebSockets here")
    if config.node_env not in ("development", "production", "test"):
        log.warn("NODE_ENV is {env!r}, not development, production or test: it is treated "
                 "as development (no warnings about open settings)", env=config.node_env)
    if config.conformance_echo:
        log.warn("conformance mode (CONFORMANCE_ECHO) is on: /echo echoes every message; "
                 "use it only to run the Autobahn|Testsuite, never in production")
    if config.production and factory.verifier is None and not config.api_token:
        log.warn(
            "no JWT_PUBLIC_KEY/JWKS_URL and no API_TOKEN in production: user ids are not "
            "verified and POST /broadcast is open to anyone who can reach it"
        )
    log.info(
        "happyrobot-ws on {port} ({env}), origins {origins}",
        port=config.port,
        env=config.node_env,
        origins=",".join(config.allowed_origins),
    )
    return service
