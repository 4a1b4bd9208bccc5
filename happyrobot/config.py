"""
Configuration: command-line option, then environment, then ``.env`` file,
then default.  Pure code: L{load_config} takes the three sources as plain
mappings, so it is tested without touching the real environment.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass, replace
from typing import IO, Callable, Mapping
from urllib.parse import unquote, urlsplit

from dotenv import dotenv_values

LOG_LEVELS = ("error", "warn", "info", "debug")


class ConfigError(Exception):
    """A bad setting; the text is one line naming the variable."""


@dataclass(frozen=True)
class Setting:
    """One setting: its variable, its option, its default and its help."""

    env: str
    option: str
    default: str
    help: str


#: Every setting, in the order ``env.example`` lists them.  ``twistd
#: happyrobot-ws --help`` does not keep it: twistd lists options sorted by name.
SETTINGS = (
    Setting("PORT", "port", "3001",
            "TCP port to listen on; --port also takes a Twisted endpoint "
            "description such as tcp:3001:interface=127.0.0.1"),
    Setting("ALLOWED_ORIGINS", "allowed-origins", "http://localhost:3000",
            "comma-separated browser origins allowed to connect and to read "
            "HTTP replies (CORS); * allows any"),
    Setting("LOG_LEVEL", "log-level", "info", "one of error, warn, info, debug"),
    Setting("NODE_ENV", "node-env", "development",
            "development, production or test (production warns about open settings)"),
    Setting("REDIS_URL", "redis-url", "",
            "redis://[[user]:password@]host[:port][/db] shared by every instance of "
            "one deployment (empty: this process is the whole deployment)"),
    Setting("INSTANCE_TTL", "instance-ttl", "10",
            "with REDIS_URL: seconds after which the members of an instance that "
            "stopped sending heartbeats (a crash) leave every room's presence"),
    Setting("REDIS_SENTINELS", "redis-sentinels", "",
            "host:port,host:port,... of the Redis Sentinels that name the master (empty: "
            "REDIS_URL's host); with both, the sentinels name the master and REDIS_URL "
            "gives only its user name, password and database"),
    Setting("REDIS_SENTINEL_MASTER", "redis-sentinel-master", "mymaster",
            "with REDIS_SENTINELS: the name under which the sentinels monitor the master"),
    Setting("REDIS_SENTINEL_PASSWORD", "redis-sentinel-password", "",
            "with REDIS_SENTINELS: the sentinels' own password (requirepass in their "
            "config; Redis's password is REDIS_URL's)"),
    Setting("REDIS_MIN_REPLICAS", "redis-min-replicas", "0",
            "with Redis: an event is acknowledged (ACK, POST /broadcast 200) only once "
            "this many replicas confirmed it (WAIT); 0 acknowledges it once the master "
            "stored it"),
    Setting("REDIS_MIN_REPLICAS_TIMEOUT_MS", "redis-min-replicas-timeout-ms", "500",
            "with REDIS_MIN_REPLICAS: milliseconds to wait for the replicas before the "
            "sender is told to retry (below half of INSTANCE_TTL)"),
    Setting("MAX_MESSAGE_BYTES", "max-message-bytes", "65536",
            "largest WebSocket message accepted; larger ones close the socket with 1009"),
    Setting("MAX_BROADCAST_BYTES", "max-broadcast-bytes", "1048576",
            "largest POST /broadcast body accepted (413 beyond)"),
    Setting("PRESENCE_WINDOW_MS", "presence-window-ms", "50",
            "USER_PRESENCE changes within this window are sent as one (0 = every change)"),
    Setting("PING_INTERVAL", "ping-interval", "30",
            "seconds between WebSocket pings (0 disables)"),
    Setting("PING_TIMEOUT", "ping-timeout", "10",
            "seconds to wait for a pong before dropping the connection"),
    Setting("HANDSHAKE_TIMEOUT", "handshake-timeout", "10",
            "seconds a client has to finish the WebSocket opening handshake"),
    Setting("SHUTDOWN_TIMEOUT", "shutdown-timeout", "10",
            "seconds to wait for WebSockets to close on SIGTERM before exiting"),
    Setting("API_TOKEN", "api-token", "",
            "bearer token required by POST /broadcast, /stats, /metrics and /dashboard "
            "(empty: open)"),
    Setting("RATE_LIMIT_PER_SECOND", "rate-limit-per-second", "100",
            "messages a second one connection may send, sustained (0 = no limit)"),
    Setting("RATE_LIMIT_BURST", "rate-limit-burst", "200",
            "messages one connection may send in a burst; a client that keeps "
            "sending past it while limited is closed with 1008"),
    Setting("MAX_ROOMS_PER_CONNECTION", "max-rooms-per-connection", "100",
            "rooms one connection may be in at once (0 = no limit)"),
    Setting("MAX_CONNECTIONS", "max-connections", "20000",
            "open WebSockets in total (0 = no limit); more are refused with 503"),
    Setting("MAX_CONNECTIONS_PER_IP", "max-connections-per-ip", "1000",
            "open WebSockets per client address (0 = no limit); more get 429"),
    Setting("TRUST_PROXY", "trust-proxy", "false",
            "true behind a reverse proxy: count clients by X-Forwarded-For"),
    Setting("JWT_PUBLIC_KEY", "jwt-public-key", "",
            "PEM public key (or a path to one) that verifies RS256 session tokens; "
            "when set, clients must present a valid token"),
    Setting("JWKS_URL", "jwks-url", "",
            "JWKS document with the session-token signing keys (instead of JWT_PUBLIC_KEY)"),
    Setting("JWT_ISSUER", "jwt-issuer", "", "required iss claim of session tokens (optional)"),
    Setting("JWT_AUDIENCE", "jwt-audience", "", "required aud claim of session tokens (optional)"),
    Setting("JWT_LEEWAY_SECONDS", "jwt-leeway-seconds", "5",
            "clock skew allowed when checking exp and nbf"),
    Setting("PROJECT_AUTH_URL", "project-auth-url", "",
            "back-end URL asked (GET ?userId=&projectId=, Bearer API_TOKEN) before each join"),
    Setting("PROJECT_AUTH_TIMEOUT", "project-auth-timeout", "3",
            "seconds to wait for PROJECT_AUTH_URL before refusing the join"),
    Setting("PROJECT_AUTH_CACHE_SECONDS", "project-auth-cache-seconds", "60",
            "how long an answer of PROJECT_AUTH_URL is reused"),
    Setting("MAX_BUFFER_BYTES", "max-buffer-bytes", "1048576",
            "bytes queued for a client that stops reading before it is closed with 1013"),
    Setting("WORKERS", "workers", "1",
            "processes serving the port (auto = one per core); more than one needs "
            "REDIS_URL, through which they share rooms"),
    Setting("HISTORY_SIZE", "history-size", "1000",
            "events kept per room for clients resuming with since (v2)"),
    Setting("HISTORY_TTL_SECONDS", "history-ttl-seconds", "300",
            "how long a room's events are kept for resuming clients (v2)"),
    Setting("HISTORY_MAX_BYTES", "history-max-bytes", "1048576",
            "without REDIS_URL: bytes of events kept per room for resuming clients "
            "(v2; unset: at most HISTORY_TOTAL_BYTES)"),
    Setting("HISTORY_TOTAL_BYTES", "history-total-bytes", "67108864",
            "without REDIS_URL: bytes of events kept for resuming clients across all "
            "rooms (v2)"),
    Setting("DRAIN_WINDOW_SECONDS", "drain-window-seconds", "5",
            "on SIGTERM, WebSockets are closed with 1001 spread over this many seconds "
            "(reconnects then do not stampede the other instances); below "
            "SHUTDOWN_TIMEOUT (unset: at most half of it)"),
    Setting("PERMESSAGE_DEFLATE", "permessage-deflate", "false",
            "true accepts clients' permessage-deflate offers: events of 256 bytes or more "
            "are compressed, once per event (docs/performance.md)"),
    Setting("CONFORMANCE_ECHO", "conformance-echo", "false",
            "true adds /echo, a WebSocket echoing every message, for the "
            "Autobahn|Testsuite (scripts/conformance); never in production"),
    Setting("INTAKE_STREAM", "intake-stream", "",
            "Redis stream through which the back end publishes: one entry per event, "
            "its field event holding the POST /broadcast body, published into the rooms "
            "once each and in order; needs Redis (empty: off; docs/operations.md)"),
)


@dataclass(frozen=True)
class Config:
    """The server's settings, validated."""

    port: str = "tcp:3001"
    allowed_origins: tuple[str, ...] = ("http://localhost:3000",)
    log_level: str = "info"
    node_env: str = "development"
    redis_url: str | None = None
    instance_ttl_seconds: float = 10.0
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str = "mymaster"
    redis_sentinel_password: str = ""
    redis_min_replicas: int = 0
    redis_min_replicas_timeout_ms: int = 500
    max_message_bytes: int = 65536
    max_broadcast_bytes: int = 1048576
    presence_window_seconds: float = 0.05
    ping_interval_seconds: float = 30.0
    ping_timeout_seconds: float = 10.0
    handshake_timeout_seconds: float = 10.0
    shutdown_timeout_seconds: float = 10.0
    api_token: str = ""
    rate_limit_per_second: float = 100.0
    rate_limit_burst: int = 200
    max_rooms_per_connection: int = 100
    max_connections: int = 20000
    max_connections_per_ip: int = 1000
    trust_proxy: bool = False
    max_buffer_bytes: int = 1048576
    jwt_public_key: str = ""
    jwks_url: str = ""
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_leeway_seconds: float = 5.0
    project_auth_url: str = ""
    project_auth_timeout_seconds: float = 3.0
    project_auth_cache_seconds: float = 60.0
    conformance_echo: bool = False
    permessage_deflate: bool = False
    workers: int = 1
    history_size: int = 1000
    history_ttl_seconds: float = 300.0
    history_max_bytes: int = 1048576
    history_total_bytes: int = 67108864
    drain_window_seconds: float = 5.0
    intake_stream: str = ""

    @property
    def production(self) -> bool:
        return self.node_env == "production"

    @property
    def redis(self) -> bool:
        """Whether the instances share rooms through Redis (REDIS_URL or REDIS_SENTINELS)."""
        return bool(self.redis_url or self.redis_sentinels)

    def origin_allowed(self, origin: str) -> bool:
        """Whether a browser at C{origin} may connect and read replies."""
        return "*" in self.allowed_origins or origin in self.allowed_origins


def read_dotenv(stream: IO[str], warn: Callable[[str], None] | None = None) -> dict[str, str]:
    """
    The settings of a ``.env`` file, read by python-dotenv (the parser of
    Node's dotenv, which the original server used, in Python): comments,
    ``export``, single and double quotes, escapes in double quotes and
    values spanning lines (a PEM key) as those packages read them, and
    ``${VAR}`` kept as written.  A name without ``=`` counts as unset, as an
    empty value does: it is left out.

    A statement python-dotenv cannot parse is skipped; its warning (the
    line where it starts) goes to C{warn} when given, else to
    python-dotenv's own C{logging} logger.
    """
    if warn is None:
        values = dotenv_values(stream=stream, interpolate=False)
    else:
        logger = logging.getLogger("dotenv.main")
        relay = _Relay(warn)
        logger.addHandler(relay)
        propagate, logger.propagate = logger.propagate, False
        try:
            values = dotenv_values(stream=stream, interpolate=False)
        finally:
            logger.propagate = propagate
            logger.removeHandler(relay)
    return {key: value for key, value in values.items() if value is not None}


class _Relay(logging.Handler):
    """Hands the messages of C{logging} records to a function."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self._warn = warn

    def emit(self, record: logging.LogRecord) -> None:
        self._warn(record.getMessage())


def parse_dotenv(text: str) -> dict[str, str]:
    """L{read_dotenv} of the text of a ``.env`` file."""
    return read_dotenv(io.StringIO(text))


def _number(env: str, value: str, minimum: float, integer: bool = False) -> float:
    try:
        number = int(value) if integer else float(value)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise ConfigError(f"{env} must be {kind}, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{env} must be a finite number, got {value!r}")
    if number < minimum:
        raise ConfigError(f"{env} must be at least {minimum:g}, got {value!r}")
    return number


def _port(value: str) -> str:
    if value.isascii() and value.isdigit():
        number = int(value)
        if not 0 <= number <= 65535:
            raise ConfigError(f"PORT must be between 0 and 65535, got {value!r}")
        return f"tcp:{number}"
    if ":" in value:  # an endpoint description, checked when it is listened on
        return value
    raise ConfigError(f"PORT must be a number or an endpoint description, got {value!r}")


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(entry: str) -> str:
    """
    One ALLOWED_ORIGINS entry as browsers write an C{Origin} header: scheme
    and host in lower case, no default port, no trailing slash.
    """
    if entry in ("*", "null"):
        return entry
    parts = urlsplit(entry)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if (not parts.scheme or not parts.hostname or port == -1 or parts.path not in ("", "/")
            or parts.query or parts.fragment or parts.username or parts.password is not None):
        raise ConfigError("ALLOWED_ORIGINS entries must look like https://app.example.com "
                          f"or http://localhost:3000 (or be * or null), got {entry!r}")
    scheme = parts.scheme.lower()
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def _origins(value: str) -> tuple[str, ...]:
    origins = tuple(_origin(o.strip()) for o in value.split(",") if o.strip())
    if not origins:
        raise ConfigError("ALLOWED_ORIGINS must name at least one origin (or *)")
    return origins


@dataclass(frozen=True)
class RedisAddress:
    """Where a C{REDIS_URL} points: host, port, database and credentials."""

    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None


def redis_address(url: str) -> RedisAddress:
    """
    Parse C{redis://[[user]:password@]host[:port][/db]}.

    @raise ConfigError: naming REDIS_URL when C{url} is not of that form.
    """
    parts = urlsplit(url.strip())
    try:
        port = parts.port or 6379
        db_text = parts.path.lstrip("/")
        db = int(db_text) if db_text else 0
    except ValueError:
        port = db = -1
    if parts.scheme != "redis" or not parts.hostname or port < 0 or db < 0:
        raise ConfigError("REDIS_URL must look like redis://host:6379/0, got "
                          f"{parts.scheme or '?'}://{parts.hostname or '?'}...")
    return RedisAddress(
        host=parts.hostname,
        port=port,
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def _redis_url(value: str) -> str | None:
    value = value.strip()
    if not value:
        return None
    redis_address(value)
    return value


def _sentinels(value: str) -> tuple[tuple[str, int], ...]:
    """REDIS_SENTINELS: C{host:port} entries (C{[v6]:port} for IPv6) separated by commas."""
    found = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        host, sep, port_text = entry.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        port = int(port_text) if port_text.isascii() and port_text.isdigit() else 0
        if not sep or not host or any(c in host for c in "/@[] ") or not 0 < port < 65536:
            raise ConfigError("REDIS_SENTINELS must list host:port entries separated by "
                              f"commas (e.g. s1:26379,s2:26379), got {entry!r}")
        found.append((host, port))
    return tuple(found)


def _sentinel_master(value: str) -> str:
    name = value.strip()
    if any(c.isspace() for c in name):
        raise ConfigError(f"REDIS_SENTINEL_MASTER must be one word, got {value!r}")
    return name


def _log_level(value: str) -> str:
    level = value.strip().lower()
    if level == "warning":
        level = "warn"
    if level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return level


def _bool(env: str, value: str) -> bool:
    word = value.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{env} must be true or false, got {value!r}")


def _url(env: str, value: str) -> str:
    url = value.strip()
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{env} must be an http:// or https:// URL, got {value!r}")
    return url


def _workers(value: str) -> int:
    if value.strip().lower() == "auto":
        return os.cpu_count() or 1
    return int(_number("WORKERS", value, 1, True))


def _count(env: str) -> Callable[[str], int]:
    return lambda v: int(_number(env, v, 0, True))


_PARSERS: dict[str, tuple[str, Callable[[str], object]]] = {
    "PORT": ("port", _port),
    "ALLOWED_ORIGINS": ("allowed_origins", _origins),
    "LOG_LEVEL": ("log_level", _log_level),
    "NODE_ENV": ("node_env", lambda v: v.strip() or "development"),
    "REDIS_URL": ("redis_url", _redis_url),
    "INSTANCE_TTL": ("instance_ttl_seconds", lambda v: _number("INSTANCE_TTL", v, 0.5)),
    "REDIS_SENTINELS": ("redis_sentinels", _sentinels),
    "REDIS_SENTINEL_MASTER": ("redis_sentinel_master", _sentinel_master),
    "REDIS_SENTINEL_PASSWORD": ("redis_sentinel_password", lambda v: v),
    "REDIS_MIN_REPLICAS": ("redis_min_replicas", _count("REDIS_MIN_REPLICAS")),
    "REDIS_MIN_REPLICAS_TIMEOUT_MS": (
        "redis_min_replicas_timeout_ms",
        lambda v: int(_number("REDIS_MIN_REPLICAS_TIMEOUT_MS", v, 1, True))),
    "MAX_MESSAGE_BYTES": ("max_message_bytes",
                          lambda v: int(_number("MAX_MESSAGE_BYTES", v, 128, True))),
    "MAX_BROADCAST_BYTES": ("max_broadcast_bytes",
                            lambda v: int(_number("MAX_BROADCAST_BYTES", v, 128, True))),
    "PRESENCE_WINDOW_MS": ("presence_window_seconds",
                           lambda v: _number("PRESENCE_WINDOW_MS", v, 0) / 1000),
    "PING_INTERVAL": ("ping_interval_seconds", lambda v: _number("PING_INTERVAL", v, 0)),
    "PING_TIMEOUT": ("ping_timeout_seconds", lambda v: _number("PING_TIMEOUT", v, 0.1)),
    "HANDSHAKE_TIMEOUT": ("handshake_timeout_seconds",
                          lambda v: _number("HANDSHAKE_TIMEOUT", v, 0.1)),
    "SHUTDOWN_TIMEOUT": ("shutdown_timeout_seconds",
                         lambda v: _number("SHUTDOWN_TIMEOUT", v, 0)),
    "API_TOKEN": ("api_token", str.strip),
    "RATE_LIMIT_PER_SECOND": ("rate_limit_per_second",
                              lambda v: _number("RATE_LIMIT_PER_SECOND", v, 0)),
    "RATE_LIMIT_BURST": ("rate_limit_burst", lambda v: int(_number("RATE_LIMIT_BURST", v, 1, True))),
    "MAX_ROOMS_PER_CONNECTION": ("max_rooms_per_connection", _count("MAX_ROOMS_PER_CONNECTION")),
    "MAX_CONNECTIONS": ("max_connections", _count("MAX_CONNECTIONS")),
    "MAX_CONNECTIONS_PER_IP": ("max_connections_per_ip", _count("MAX_CONNECTIONS_PER_IP")),
    "TRUST_PROXY": ("trust_proxy", lambda v: _bool("TRUST_PROXY", v)),
    "JWT_PUBLIC_KEY": ("jwt_public_key", str.strip),
    "JWKS_URL": ("jwks_url", lambda v: _url("JWKS_URL", v)),
    "JWT_ISSUER": ("jwt_issuer", str.strip),
    "JWT_AUDIENCE": ("jwt_audience", str.strip),
    "JWT_LEEWAY_SECONDS": ("jwt_leeway_seconds", lambda v: _number("JWT_LEEWAY_SECONDS", v, 0)),
    "PROJECT_AUTH_URL": ("project_auth_url", lambda v: _url("PROJECT_AUTH_URL", v)),
    "PROJECT_AUTH_TIMEOUT": ("project_auth_timeout_seconds",
                             lambda v: _number("PROJECT_AUTH_TIMEOUT", v, 0.1)),
    "PROJECT_AUTH_CACHE_SECONDS": ("project_auth_cache_seconds",
                                   lambda v: _number("PROJECT_AUTH_CACHE_SECONDS", v, 0)),
    "MAX_BUFFER_BYTES": ("max_buffer_bytes",
                         lambda v: int(_number("MAX_BUFFER_BYTES", v, 1024, True))),
    "WORKERS": ("workers", lambda v: _workers(v)),
    "HISTORY_SIZE": ("history_size", lambda v: int(_number("HISTORY_SIZE", v, 1, True))),
    "HISTORY_TTL_SECONDS": ("history_ttl_seconds",
                            lambda v: _number("HISTORY_TTL_SECONDS", v, 1)),
    # A larger event is still kept, alone (history.RoomHistory.trim).
    "HISTORY_MAX_BYTES": ("history_max_bytes",
                          lambda v: int(_number("HISTORY_MAX_BYTES", v, 65536, True))),
    "HISTORY_TOTAL_BYTES": ("history_total_bytes",
                            lambda v: int(_number("HISTORY_TOTAL_BYTES", v, 65536, True))),
    "DRAIN_WINDOW_SECONDS": ("drain_window_seconds",
                             lambda v: _number("DRAIN_WINDOW_SECONDS", v, 0)),
    "CONFORMANCE_ECHO": ("conformance_echo", lambda v: _bool("CONFORMANCE_ECHO", v)),
    "PERMESSAGE_DEFLATE": ("permessage_deflate", lambda v: _bool("PERMESSAGE_DEFLATE", v)),
    "INTAKE_STREAM": ("intake_stream", str.strip),
}


def load_config(
    options: Mapping[str, str | None],
    environ: Mapping[str, str],
    dotenv: Mapping[str, str] | None = None,
) -> Config:
    """
    Build the L{Config}: for each setting the option (keyed by its option
    name, e.g. ``allowed-origins``) wins, then the environment, then the
    ``.env`` values, then the default.

    @raise ConfigError: for the first bad value, naming its variable.
    """
    dotenv = dotenv or {}
    values = {}
    for setting in SETTINGS:
        raw = options.get(setting.option)
        if raw is None:
            raw = environ.get(setting.env)
        if raw is None:
            raw = dotenv.get(setting.env)
        if raw is None or not str(raw).strip():
            continue  # unset or empty: the default, as `process.env.X || default` did
        field, parse = _PARSERS[setting.env]
        values[field] = parse(str(raw))
    return _fitted(Config(**values), values)  # type: ignore[arg-type]


#: The settings whose default, left unset, is fitted to another setting
#: (L{_fitted}); written out, even with the default, a value is checked
#: against that setting instead.  For each: what the default becomes, and
#: the check.  env.example leaves them commented out.
FITTED = {
    "HISTORY_MAX_BYTES": ("HISTORY_TOTAL_BYTES if that is smaller",
                          "must not exceed HISTORY_TOTAL_BYTES"),
    "DRAIN_WINDOW_SECONDS": ("half of SHUTDOWN_TIMEOUT if that is shorter",
                             "must be below SHUTDOWN_TIMEOUT (or be 0)"),
}


def _fitted(config: Config, given: Mapping[str, object]) -> Config:
    """
    The settings bounded by another: left unset, the default fits within
    it; given (C{given} holds the fields that were), it is checked.
    """
    if config.redis_min_replicas and not config.redis:
        raise ConfigError("REDIS_MIN_REPLICAS needs REDIS_URL or REDIS_SENTINELS")
    if (config.redis_min_replicas
            and config.redis_min_replicas_timeout_ms >= config.instance_ttl_seconds * 500):
        # WAIT holds the command connection, which counts as lost after INSTANCE_TTL / 2.
        raise ConfigError(f"REDIS_MIN_REPLICAS_TIMEOUT_MS ({config.redis_min_replicas_timeout_ms}) "
                          "must be below half of INSTANCE_TTL in milliseconds "
                          f"({config.instance_ttl_seconds * 500:g})")
    room, total = config.history_max_bytes, config.history_total_bytes
    if "history_max_bytes" not in given:
        config = replace(config, history_max_bytes=min(room, total))
    elif room > total:
        raise ConfigError(f"HISTORY_MAX_BYTES ({room}) must not exceed "
                          f"HISTORY_TOTAL_BYTES ({total})")
    drain, timeout = config.drain_window_seconds, config.shutdown_timeout_seconds
    if "drain_window_seconds" not in given:
        config = replace(config, drain_window_seconds=min(drain, timeout / 2))
    elif drain and drain >= timeout:
        # The connections still waiting for their 1001 at the timeout
        # would be dropped without one.
        raise ConfigError(f"DRAIN_WINDOW_SECONDS ({drain:g}) must be below "
                          f"SHUTDOWN_TIMEOUT ({timeout:g}), or 0")
    return config
