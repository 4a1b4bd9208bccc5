"""
The twistd plugin's options and service: the one place where the pieces
are wired together.

``twistd -n happyrobot-ws [options]`` builds the service with
L{makeService}; ports open only when the service starts, so ``--uid`` and
privileged ports work as with any twistd plugin.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.python import usage
from twisted.web.client import HTTPConnectionPool

from happyrobot import auth, backend, logs
from happyrobot.bus import Bus, LocalBus, RedisBus
from happyrobot.config import SETTINGS, Config, ConfigError, load_config, parse_dotenv
from happyrobot.rooms import RoomRegistry
from happyrobot.web import make_site
from happyrobot.ws import CollabFactory

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
        [s.option, None, None, f"{s.help} [env {s.env}, default {s.default}]"]
        for s in SETTINGS
        if s.option != "conformance-echo"  # a bare flag, below
    ] + [["env-file", None, ".env", "dotenv file read for variables not in the environment"]]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ

    def opt_conformance_echo(self) -> None:
        """Serve /echo for the Autobahn|Testsuite [env CONFORMANCE_ECHO, default false]"""
        # Unset, the key stays absent and CONFORMANCE_ECHO decides.
        self["conformance-echo"] = "true"

    def config(self) -> Config:
        """
        The settings from these options, the environment and the env file.

        @raise ConfigError: naming the first bad variable.
        """
        dotenv = {}
        path = self["env-file"]
        if path and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                dotenv = parse_dotenv(f.read())
        return load_config(self, self.environ, dotenv)


class DrainService(Service):
    """
    On stop (SIGTERM, SIGINT): mark the server draining, close every
    WebSocket with 1001, and give them C{timeout} seconds before dropping
    what is left.  twistd waits for the returned Deferred.
    """

    def __init__(self, factory: CollabFactory, timeout: float) -> None:
        self.factory = factory
        self.timeout = timeout

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        f = self.factory
        f.draining = True
        log.info("shutting down: closing {n} connections", n=len(f.connections))
        done = f.when_empty()
        done.addCallback(lambda _: f.http_pool.closeCachedConnections())
        f.close_all()
        if not done.called:
            timer = f.clock.callLater(self.timeout, f.abort_all)
            done.addBoth(lambda r: timer.cancel() if timer.active() else None)
        return done


def build_factory(config: Config, reactor: Any) -> CollabFactory:
    """
    The registry, the bus and the WebSocket factory that holds them.  With
    C{config.redis_url} the bus is a L{RedisBus}, a service the caller
    starts and stops (L{makeService} makes it a child); otherwise the
    in-memory L{LocalBus}.
    """
    registry = RoomRegistry(reactor, config.presence_window_seconds)
    bus: Bus
    if config.redis_url:
        bus = registry.listener = registry.presence_publisher = RedisBus(
            registry, config.redis_url, reactor, instance_ttl=config.instance_ttl_seconds
        )
    else:
        bus = LocalBus(registry)
    factory = CollabFactory(config, registry, bus, clock=reactor, reactor=reactor)
    if isinstance(bus, RedisBus):
        bus.connection_count = lambda: len(factory.connections)
    # Keep-alive connections to the back end and the identity provider,
    # closed on shutdown.
    factory.http_pool = HTTPConnectionPool(reactor)
    factory.verifier = _verifier(config, reactor, factory.http_pool)
    if config.project_auth_url:
        factory.authorizer = auth.ProjectAuthorizer(
            backend.project_access(config.project_auth_url, config.api_token, factory.http_pool),
            reactor,
            ttl_seconds=config.project_auth_cache_seconds,
            timeout_seconds=config.project_auth_timeout_seconds,
        )
    return factory


def _verifier(
    config: Config, reactor: Any, pool: HTTPConnectionPool
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


def makeService(options: Options, reactor: Any = None) -> IService:
    """Build the server's service tree from parsed L{Options}."""
    if reactor is None:
        from twisted.internet import reactor
    try:
        config = options.config()
        factory = build_factory(config, reactor)
    except ConfigError as e:
        # One line naming the variable, as twistd users expect from a bad flag.
        raise SystemExit(f"happyrobot-ws: {e}") from None
    logs.set_level(config.log_level)
    service = MultiService()
    if IService.providedBy(factory.bus):
        # First child: it starts connecting to Redis before the port opens.
        factory.bus.setServiceParent(service)
    # strports.service makes a port that cannot be bound (in use, no
    # permission) stop start-up with an error instead of running portless.
    strports.service(config.port, make_site(factory), reactor=reactor).setServiceParent(service)
    DrainService(factory, config.shutdown_timeout_seconds).setServiceParent(service)
    service.factory = factory  # type: ignore[attr-defined]
    if config.production and "*" in config.allowed_origins:
        log.warn("ALLOWED_ORIGINS is * in production: any web site may open WebSockets here")
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
