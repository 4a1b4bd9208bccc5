"""
Tests for L{happyrobot.config}: where each setting comes from (option, then
environment, then ``.env``, then default), how each value is checked, and
the ``.env`` reader.  Environments are plain dicts: nothing here reads
C{os.environ} or the working directory.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from happyrobot import config
from happyrobot.config import SETTINGS, Config, ConfigError, load_config, parse_dotenv

#: For each variable: its Config field and three valid values with what
#: each becomes, none of them the default.
_VALUES: dict[str, tuple[str, list[tuple[str, Any]]]] = {
    "PORT": (
        "port",
        [
            ("4000", "tcp:4000"),
            ("4001", "tcp:4001"),
            ("tcp:4002:interface=127.0.0.1", "tcp:4002:interface=127.0.0.1"),
        ],
    ),
    "ALLOWED_ORIGINS": (
        "allowed_origins",
        [
            ("https://a.example", ("https://a.example",)),
            ("https://b.example", ("https://b.example",)),
            ("*", ("*",)),
        ],
    ),
    "LOG_LEVEL": ("log_level", [("debug", "debug"), ("error", "error"), ("warn", "warn")]),
    "NODE_ENV": (
        "node_env",
        [("production", "production"), ("test", "test"), ("staging", "staging")],
    ),
    "MAX_MESSAGE_BYTES": ("max_message_bytes", [("1024", 1024), ("2048", 2048), ("128", 128)]),
    "MAX_BROADCAST_BYTES": (
        "max_broadcast_bytes",
        [("4096", 4096), ("8192", 8192), ("100000", 100000)],
    ),
    "PRESENCE_WINDOW_MS": ("presence_window_seconds", [("250", 0.25), ("0", 0.0), ("125", 0.125)]),
    "PING_INTERVAL": ("ping_interval_seconds", [("5", 5.0), ("0", 0.0), ("2.5", 2.5)]),
    "PING_TIMEOUT": ("ping_timeout_seconds", [("2.5", 2.5), ("0.5", 0.5), ("60", 60.0)]),
    "HANDSHAKE_TIMEOUT": ("handshake_timeout_seconds", [("3", 3.0), ("0.25", 0.25), ("30", 30.0)]),
    "SHUTDOWN_TIMEOUT": ("shutdown_timeout_seconds", [("7", 7.0), ("0", 0.0), ("1.5", 1.5)]),
    "REDIS_URL": (
        "redis_url",
        [
            ("redis://r1:6379/0", "redis://r1:6379/0"),
            ("redis://r2", "redis://r2"),
            (" redis://r3/2 ", "redis://r3/2"),
        ],
    ),
    "API_TOKEN": ("api_token", [(" tok-1 ", "tok-1"), ("tok-2", "tok-2"), ("tok-3", "tok-3")]),
    "RATE_LIMIT_PER_SECOND": ("rate_limit_per_second", [("5", 5.0), ("0", 0.0), ("0.5", 0.5)]),
    "RATE_LIMIT_BURST": ("rate_limit_burst", [("10", 10), ("1", 1), ("500", 500)]),
    "MAX_ROOMS_PER_CONNECTION": ("max_rooms_per_connection", [("5", 5), ("0", 0), ("1000", 1000)]),
    "MAX_CONNECTIONS": ("max_connections", [("10", 10), ("0", 0), ("50000", 50000)]),
    "MAX_CONNECTIONS_PER_IP": ("max_connections_per_ip", [("3", 3), ("0", 0), ("20", 20)]),
    "TRUST_PROXY": ("trust_proxy", [("true", True), ("false", False), ("on", True)]),
    "MAX_BUFFER_BYTES": ("max_buffer_bytes", [("2048", 2048), ("4096", 4096), ("1024", 1024)]),
    "HISTORY_MAX_BYTES": (
        "history_max_bytes",
        [("65536", 65536), ("131072", 131072), ("67108864", 67108864)],
    ),
    "HISTORY_TOTAL_BYTES": (
        "history_total_bytes",
        [("1048576", 1048576), ("2000000", 2000000), ("1000000000", 1000000000)],
    ),
}

#: The numeric settings that take a fraction (not only whole numbers).
_FLOAT = (
    "PRESENCE_WINDOW_MS",
    "PING_INTERVAL",
    "PING_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "SHUTDOWN_TIMEOUT",
    "RATE_LIMIT_PER_SECOND",
)
#: The numeric settings that take only whole numbers.
_INTEGER = (
    "MAX_MESSAGE_BYTES",
    "MAX_BROADCAST_BYTES",
    "RATE_LIMIT_BURST",
    "MAX_ROOMS_PER_CONNECTION",
    "MAX_CONNECTIONS",
    "MAX_CONNECTIONS_PER_IP",
    "MAX_BUFFER_BYTES",
)
#: The settings that take a number.
_NUMERIC = _INTEGER + _FLOAT


def _setting(env: str) -> config.Setting:
    """The Setting for variable C{env}."""
    (setting,) = [s for s in SETTINGS if s.env == env]
    return setting


def _error(test: SynchronousTestCase, env: str, value: str) -> str:
    """Load C{value} for C{env} from the environment and return the error text."""
    return str(test.assertRaises(ConfigError, load_config, {}, {env: value}))


class DefaultsTests(SynchronousTestCase):
    """With nothing set, every setting has its documented default."""

    def test_nothing_set(self) -> None:
        """No option, environment or .env gives Config()."""
        self.assertEqual(load_config({}, {}), Config())
        self.assertEqual(load_config({}, {}, None), Config())
        self.assertEqual(load_config({}, {}, {}), Config())

    def test_documented_defaults(self) -> None:
        """Config()'s defaults are those of the original server."""
        self.assertEqual(
            Config(),
            Config(
                port="tcp:3001",
                allowed_origins=("http://localhost:3000",),
                log_level="info",
                node_env="development",
                redis_url=None,
                max_message_bytes=65536,
                max_broadcast_bytes=1048576,
                presence_window_seconds=0.05,
                ping_interval_seconds=30.0,
                ping_timeout_seconds=10.0,
                handshake_timeout_seconds=10.0,
                shutdown_timeout_seconds=10.0,
                api_token="",
                rate_limit_per_second=100.0,
                rate_limit_burst=200,
                max_rooms_per_connection=100,
                max_connections=20000,
                max_connections_per_ip=1000,
                trust_proxy=False,
                max_buffer_bytes=1048576,
            ),
        )

    def test_setting_defaults_match_config(self) -> None:
        """Each Setting's default text, when given explicitly, gives Config()'s value."""
        for setting in SETTINGS:
            self.assertEqual(
                load_config({setting.option: setting.default}, {}), Config(), setting.env
            )
            self.assertEqual(load_config({}, {setting.env: setting.default}), Config(), setting.env)

    def test_unset_options_fall_through(self) -> None:
        """Options that are None (as usage.Options leaves them) do not count."""
        options = {s.option: None for s in SETTINGS}
        self.assertEqual(load_config(options, {}), Config())

    def test_unrelated_variables_ignored(self) -> None:
        """Variables that are not settings, and lower-case names, change nothing."""
        environ = {"HOME": "/root", "port": "1", "log_level": "x", "PATH": "/bin"}
        self.assertEqual(load_config({"unknown": "1"}, environ, {"OTHER": "2"}), Config())

    def test_frozen(self) -> None:
        """A Config cannot be changed after it is made."""
        cfg = Config()
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, cfg, "port", "tcp:1")

    def test_production(self) -> None:
        """production is true only for NODE_ENV=production."""
        self.assertFalse(Config().production)
        self.assertTrue(load_config({}, {"NODE_ENV": "production"}).production)
        self.assertFalse(load_config({}, {"NODE_ENV": "Production"}).production)


class SettingsTests(SynchronousTestCase):
    """SETTINGS describes every Config field once."""

    def test_every_field_has_a_setting(self) -> None:
        """The parsers of SETTINGS fill exactly the fields of Config, one each."""
        fields = [config._PARSERS[s.env][0] for s in SETTINGS]
        self.assertEqual(len(fields), len(set(fields)))
        self.assertEqual(set(fields), {f.name for f in dataclasses.fields(Config)})
        self.assertEqual(set(config._PARSERS), {s.env for s in SETTINGS})

    def test_every_setting_reaches_its_field(self) -> None:
        """Setting each variable changes exactly its own field of Config."""
        for env, (field, values) in _VALUES.items():
            raw, expected = values[0]
            cfg = load_config({}, {env: raw})
            self.assertEqual(getattr(cfg, field), expected, env)
            if env == "SHUTDOWN_TIMEOUT":  # the unset drain window follows it (DrainWindowTests)
                cfg = dataclasses.replace(cfg, drain_window_seconds=Config().drain_window_seconds)
            self.assertEqual(
                dataclasses.replace(cfg, **{field: getattr(Config(), field)}), Config(), env
            )

    def test_option_names(self) -> None:
        """Each option is its variable's name in lower case with dashes."""
        for setting in SETTINGS:
            self.assertEqual(setting.option, setting.env.lower().replace("_", "-"))

    def test_unique_and_documented(self) -> None:
        """Variables and options are unique and every setting has help text."""
        self.assertEqual(len({s.env for s in SETTINGS}), len(SETTINGS))
        self.assertEqual(len({s.option for s in SETTINGS}), len(SETTINGS))
        for setting in SETTINGS:
            self.assertTrue(setting.help.strip(), setting.env)

    def test_original_variables_present(self) -> None:
        """The original server's variables are all settings."""
        self.assertLessEqual(
            {"PORT", "ALLOWED_ORIGINS", "LOG_LEVEL", "NODE_ENV"}, {s.env for s in SETTINGS}
        )


class PrecedenceTests(SynchronousTestCase):
    """Option, then environment, then .env, then default, for every setting."""

    def test_option_only(self) -> None:
        """An option alone sets its field."""
        for env, (field, values) in _VALUES.items():
            cfg = load_config({_setting(env).option: values[0][0]}, {})
            self.assertEqual(getattr(cfg, field), values[0][1], env)

    def test_environ_only(self) -> None:
        """An environment variable alone sets its field."""
        for env, (field, values) in _VALUES.items():
            self.assertEqual(
                getattr(load_config({}, {env: values[1][0]}), field), values[1][1], env
            )

    def test_dotenv_only(self) -> None:
        """A .env value alone sets its field."""
        for env, (field, values) in _VALUES.items():
            self.assertEqual(
                getattr(load_config({}, {}, {env: values[2][0]}), field), values[2][1], env
            )

    def test_option_beats_environ_and_dotenv(self) -> None:
        """The option wins over the environment and .env."""
        for env, (field, values) in _VALUES.items():
            cfg = load_config(
                {_setting(env).option: values[0][0]}, {env: values[1][0]}, {env: values[2][0]}
            )
            self.assertEqual(getattr(cfg, field), values[0][1], env)

    def test_option_beats_dotenv(self) -> None:
        """The option wins over .env when the environment is silent."""
        for env, (field, values) in _VALUES.items():
            cfg = load_config({_setting(env).option: values[0][0]}, {}, {env: values[2][0]})
            self.assertEqual(getattr(cfg, field), values[0][1], env)

    def test_environ_beats_dotenv(self) -> None:
        """The environment wins over .env."""
        for env, (field, values) in _VALUES.items():
            cfg = load_config(
                {_setting(env).option: None}, {env: values[1][0]}, {env: values[2][0]}
            )
            self.assertEqual(getattr(cfg, field), values[1][1], env)

    def test_bad_lower_source_ignored(self) -> None:
        """A bad value in a source that is overridden is never looked at."""
        cfg = load_config({"port": "4000"}, {"PORT": "abc"}, {"PORT": "70000"})
        self.assertEqual(cfg.port, "tcp:4000")
        cfg = load_config({}, {"LOG_LEVEL": "debug"}, {"LOG_LEVEL": "loud"})
        self.assertEqual(cfg.log_level, "debug")

    def test_sources_mix(self) -> None:
        """Different settings may come from different sources at once."""
        cfg = load_config(
            {"port": "5000"},
            {"LOG_LEVEL": "debug"},
            {"NODE_ENV": "production", "PORT": "6000"},
        )
        self.assertEqual(
            (cfg.port, cfg.log_level, cfg.node_env, cfg.allowed_origins),
            ("tcp:5000", "debug", "production", ("http://localhost:3000",)),
        )

    def test_empty_option_counts(self) -> None:
        """An empty option is a value, not "unset": NODE_ENV='' means development."""
        cfg = load_config({"node-env": ""}, {"NODE_ENV": "production"})
        self.assertEqual(cfg.node_env, "development")

    def test_from_dotenv_text(self) -> None:
        """parse_dotenv's result feeds load_config."""
        dotenv = parse_dotenv("PORT=4100\nLOG_LEVEL='warning'\n# PING_INTERVAL=1\n")
        cfg = load_config({}, {}, dotenv)
        self.assertEqual(
            (cfg.port, cfg.log_level, cfg.ping_interval_seconds), ("tcp:4100", "warn", 30.0)
        )


class PortTests(SynchronousTestCase):
    """PORT: a port number or a Twisted endpoint description."""

    def test_number(self) -> None:
        """A number becomes a TCP endpoint description."""
        self.assertEqual(load_config({}, {"PORT": "8080"}).port, "tcp:8080")

    def test_limits(self) -> None:
        """0 and 65535 are accepted."""
        self.assertEqual(load_config({}, {"PORT": "0"}).port, "tcp:0")
        self.assertEqual(load_config({}, {"PORT": "65535"}).port, "tcp:65535")

    def test_endpoint_description(self) -> None:
        """An endpoint description is kept as it is."""
        for value in ("tcp:3001:interface=127.0.0.1", "unix:/tmp/hr.sock", "tcp6:3001"):
            self.assertEqual(load_config({"port": value}, {}).port, value)

    def test_not_a_number(self) -> None:
        """PORT=abc is refused, naming PORT and the value."""
        self.assertEqual(
            _error(self, "PORT", "abc"),
            "PORT must be a number or an endpoint description, got 'abc'",
        )

    def test_too_large(self) -> None:
        """PORT=70000 is refused, naming PORT and the value."""
        self.assertEqual(
            _error(self, "PORT", "70000"), "PORT must be between 0 and 65535, got '70000'"
        )

    def test_just_too_large(self) -> None:
        """PORT=65536 is refused."""
        self.assertIn("PORT", _error(self, "PORT", "65536"))

    def test_negative(self) -> None:
        """A negative PORT is refused."""
        self.assertIn("PORT", _error(self, "PORT", "-1"))

    def test_empty(self) -> None:
        """An empty PORT means the default, as the original's `PORT || 3001` did."""
        self.assertEqual(load_config({}, {"PORT": ""}).port, "tcp:3001")

    def test_option_error_names_variable(self) -> None:
        """A bad --port is reported under the variable's name too."""
        e = self.assertRaises(ConfigError, load_config, {"port": "abc"}, {})
        self.assertTrue(str(e).startswith("PORT "))

    def test_unicode_digits(self) -> None:
        """
        A value that str.isdigit() accepts but int() does not (a superscript
        two) is a ConfigError naming PORT, not a ValueError.
        """
        self.assertIn("PORT", _error(self, "PORT", "\u00b2"))


class LogLevelTests(SynchronousTestCase):
    """LOG_LEVEL: one of error, warn, info, debug."""

    def test_levels(self) -> None:
        """Each level is accepted as it is."""
        for level in config.LOG_LEVELS:
            self.assertEqual(load_config({}, {"LOG_LEVEL": level}).log_level, level)

    def test_case_and_whitespace(self) -> None:
        """Case and surrounding whitespace do not matter."""
        self.assertEqual(load_config({}, {"LOG_LEVEL": " DEBUG "}).log_level, "debug")

    def test_warning_is_warn(self) -> None:
        """'warning', in any case, maps to 'warn'."""
        for value in ("warning", "WARNING", "Warning"):
            self.assertEqual(load_config({}, {"LOG_LEVEL": value}).log_level, "warn", value)

    def test_bad_level(self) -> None:
        """An unknown level is refused, naming LOG_LEVEL, the choices and the value."""
        self.assertEqual(
            _error(self, "LOG_LEVEL", "verbose"),
            "LOG_LEVEL must be one of error, warn, info, debug, got 'verbose'",
        )

    def test_empty_level(self) -> None:
        """An empty LOG_LEVEL means the default level."""
        self.assertEqual(load_config({}, {"LOG_LEVEL": " "}).log_level, "info")


class NumberTests(SynchronousTestCase):
    """The numeric settings: parsing, minimums and error messages."""

    def test_not_a_number(self) -> None:
        """Text that is not a number is refused, naming the variable and the value."""
        for env in _NUMERIC:
            message = _error(self, env, "abc")
            self.assertTrue(message.startswith(env + " must be "), message)
            self.assertIn("'abc'", message)

    def test_empty(self) -> None:
        """An empty numeric setting means its default."""
        for env in _NUMERIC:
            self.assertEqual(load_config({}, {env: ""}), Config(), env)

    def test_float_message(self) -> None:
        """A fractional setting says it needs a number."""
        self.assertEqual(
            _error(self, "PING_INTERVAL", "soon"), "PING_INTERVAL must be a number, got 'soon'"
        )

    def test_whole_numbers(self) -> None:
        """The byte limits and counts refuse fractions and exponents, asking for a whole number."""
        for env in _INTEGER:
            for value in ("1024.5", "1e6"):
                self.assertEqual(
                    _error(self, env, value), f"{env} must be a whole number, got {value!r}"
                )

    def test_minimums(self) -> None:
        """Values below each minimum are refused, naming the variable and the minimum."""
        cases = {
            "MAX_MESSAGE_BYTES": ("127", "128"),
            "MAX_BROADCAST_BYTES": ("0", "128"),
            "PRESENCE_WINDOW_MS": ("-1", "0"),
            "PING_INTERVAL": ("-0.5", "0"),
            "PING_TIMEOUT": ("0", "0.1"),
            "HANDSHAKE_TIMEOUT": ("0.05", "0.1"),
            "SHUTDOWN_TIMEOUT": ("-1", "0"),
            "RATE_LIMIT_PER_SECOND": ("-0.1", "0"),
            "RATE_LIMIT_BURST": ("0", "1"),
            "MAX_ROOMS_PER_CONNECTION": ("-1", "0"),
            "MAX_CONNECTIONS": ("-1", "0"),
            "MAX_CONNECTIONS_PER_IP": ("-1", "0"),
            "MAX_BUFFER_BYTES": ("1023", "1024"),
        }
        self.assertEqual(set(cases), set(_NUMERIC))
        for env, (value, minimum) in cases.items():
            self.assertEqual(
                _error(self, env, value), f"{env} must be at least {minimum}, got {value!r}"
            )

    def test_minimums_accepted(self) -> None:
        """Each minimum itself is accepted."""
        cfg = load_config(
            {},
            {
                "MAX_MESSAGE_BYTES": "128",
                "MAX_BROADCAST_BYTES": "128",
                "PRESENCE_WINDOW_MS": "0",
                "PING_INTERVAL": "0",
                "PING_TIMEOUT": "0.1",
                "HANDSHAKE_TIMEOUT": "0.1",
                "SHUTDOWN_TIMEOUT": "0",
                "RATE_LIMIT_PER_SECOND": "0",
                "RATE_LIMIT_BURST": "1",
                "MAX_ROOMS_PER_CONNECTION": "0",
                "MAX_CONNECTIONS": "0",
                "MAX_CONNECTIONS_PER_IP": "0",
                "MAX_BUFFER_BYTES": "1024",
            },
        )
        self.assertEqual(
            (
                cfg.max_message_bytes,
                cfg.max_broadcast_bytes,
                cfg.presence_window_seconds,
                cfg.ping_interval_seconds,
                cfg.ping_timeout_seconds,
                cfg.handshake_timeout_seconds,
                cfg.shutdown_timeout_seconds,
                cfg.rate_limit_per_second,
                cfg.rate_limit_burst,
                cfg.max_rooms_per_connection,
                cfg.max_connections,
                cfg.max_connections_per_ip,
                cfg.max_buffer_bytes,
            ),
            (128, 128, 0.0, 0.0, 0.1, 0.1, 0.0, 0.0, 1, 0, 0, 0, 1024),
        )

    def test_types(self) -> None:
        """Byte limits and counts are ints; times and rates are floats."""
        environ = {env: "1024" for env in _NUMERIC}
        cfg = load_config({}, environ)
        for env in _NUMERIC:
            field = config._PARSERS[env][0]
            expected = int if env in _INTEGER else float
            self.assertIs(type(getattr(cfg, field)), expected, env)

    def test_presence_window_milliseconds(self) -> None:
        """PRESENCE_WINDOW_MS is milliseconds, stored as seconds."""
        self.assertEqual(
            load_config({}, {"PRESENCE_WINDOW_MS": "1500"}).presence_window_seconds, 1.5
        )

    def test_surrounding_whitespace(self) -> None:
        """Whitespace around a number is ignored."""
        cfg = load_config({}, {"MAX_MESSAGE_BYTES": " 2048 ", "PING_TIMEOUT": " 4 "})
        self.assertEqual((cfg.max_message_bytes, cfg.ping_timeout_seconds), (2048, 4.0))

    def test_nan_refused(self) -> None:
        """'nan' is not a usable number for any setting, and is refused naming the variable."""
        for env in _FLOAT:
            self.assertTrue(_error(self, env, "nan").startswith(env + " "), env)

    def test_infinity_refused(self) -> None:
        """'inf' is not a usable number for any setting, and is refused naming the variable."""
        for env in _FLOAT:
            self.assertTrue(_error(self, env, "inf").startswith(env + " "), env)

    def test_negative_infinity_refused(self) -> None:
        """'-inf' is refused as not finite."""
        for env in _FLOAT:
            self.assertTrue(_error(self, env, "-inf").startswith(env + " must be a finite"), env)

    def test_one_line_messages(self) -> None:
        """Every error message is a single line."""
        for env in _NUMERIC + ("PORT", "LOG_LEVEL", "ALLOWED_ORIGINS"):
            self.assertNotIn("\n", _error(self, env, "x\ny" if env != "ALLOWED_ORIGINS" else ","))


class FlagAndTokenTests(SynchronousTestCase):
    """TRUST_PROXY (a yes/no flag) and API_TOKEN (a secret string)."""

    def test_true_words(self) -> None:
        """1, true, yes and on, in any case and with whitespace, mean true."""
        for value in ("1", "true", "TRUE", " yes ", "On"):
            self.assertIs(load_config({}, {"TRUST_PROXY": value}).trust_proxy, True, value)

    def test_false_words(self) -> None:
        """0, false, no, off and empty mean false."""
        for value in ("0", "false", "False", " no ", "OFF", ""):
            self.assertIs(load_config({}, {"TRUST_PROXY": value}).trust_proxy, False, value)

    def test_bad_flag(self) -> None:
        """Anything else is refused, naming TRUST_PROXY and the value."""
        self.assertEqual(
            _error(self, "TRUST_PROXY", "maybe"), "TRUST_PROXY must be true or false, got 'maybe'"
        )

    def test_token_stripped(self) -> None:
        """API_TOKEN is kept without surrounding whitespace, and empty means open."""
        self.assertEqual(load_config({}, {"API_TOKEN": "  s3cret\n"}).api_token, "s3cret")
        self.assertEqual(load_config({}, {"API_TOKEN": "   "}).api_token, "")


class RedisUrlTests(SynchronousTestCase):
    """REDIS_URL and L{config.redis_address}."""

    def test_unset_or_empty(self) -> None:
        """Without REDIS_URL, or with an empty one, there is no Redis."""
        self.assertIsNone(load_config({}, {}).redis_url)
        self.assertIsNone(load_config({}, {"REDIS_URL": "  "}).redis_url)

    def test_kept(self) -> None:
        """A valid URL is kept, trimmed."""
        cfg = load_config({}, {"REDIS_URL": " redis://:pw@cache:6380/3 "})
        self.assertEqual(cfg.redis_url, "redis://:pw@cache:6380/3")

    def test_bad_url(self) -> None:
        """A URL that is not redis://host... is refused, naming REDIS_URL but not the password."""
        for value in (
            "http://cache:6379",
            "redis://",
            "redis://h:port/0",
            "redis://h/db",
            "cache:6379",
            "redis://u:hunter2@h/-1",
        ):
            message = _error(self, "REDIS_URL", value)
            self.assertTrue(message.startswith("REDIS_URL "), value)
            self.assertNotIn("hunter2", message)

    def test_address_defaults(self) -> None:
        """A bare host means port 6379, database 0 and no credentials."""
        self.assertEqual(config.redis_address("redis://cache"), config.RedisAddress("cache"))

    def test_address_full(self) -> None:
        """Host, port, database and percent-decoded credentials are read from the URL."""
        self.assertEqual(
            config.redis_address("redis://ann:p%40ss@cache.internal:6380/5"),
            config.RedisAddress("cache.internal", 6380, 5, "ann", "p@ss"),
        )

    def test_address_password_only(self) -> None:
        """redis://:password@host has a password and no user name."""
        self.assertEqual(
            config.redis_address("redis://:pw@h"), config.RedisAddress("h", 6379, 0, None, "pw")
        )


class OriginsTests(SynchronousTestCase):
    """ALLOWED_ORIGINS and Config.origin_allowed()."""

    def test_split_and_trim(self) -> None:
        """A comma-separated list is split, trimmed, stripped of trailing slashes and empties."""
        cfg = load_config(
            {}, {"ALLOWED_ORIGINS": " http://a.example , https://b.example/,, http://c:8080 "}
        )
        self.assertEqual(
            cfg.allowed_origins, ("http://a.example", "https://b.example", "http://c:8080")
        )

    def test_single(self) -> None:
        """A single origin is a one-element tuple."""
        cfg = load_config({"allowed-origins": "https://app.example"}, {})
        self.assertEqual(cfg.allowed_origins, ("https://app.example",))

    def test_star(self) -> None:
        """'*' is kept as the wildcard."""
        self.assertEqual(load_config({}, {"ALLOWED_ORIGINS": " * "}).allowed_origins, ("*",))

    def test_empty_refused(self) -> None:
        """A list with no origin in it is refused, naming ALLOWED_ORIGINS."""
        for value in (" , ,", ","):
            self.assertEqual(
                _error(self, "ALLOWED_ORIGINS", value),
                "ALLOWED_ORIGINS must name at least one origin (or *)",
                value,
            )

    def test_written_as_browsers_send_them(self) -> None:
        """Entries are normalised as an Origin header: lower case, no default port."""
        cfg = load_config({}, {"ALLOWED_ORIGINS":
                               "HTTP://LocalHost:3000/, https://A.example.com:443, http://b:80,"
                               " https://c:8443, http://[::1]:3000, null"})
        self.assertEqual(cfg.allowed_origins, ("http://localhost:3000", "https://a.example.com",
                                               "http://b", "https://c:8443", "http://[::1]:3000",
                                               "null"))
        self.assertTrue(cfg.origin_allowed("https://a.example.com"))
        self.assertTrue(cfg.origin_allowed("null"))

    def test_not_an_origin_refused(self) -> None:
        """Something that is not scheme://host[:port] (or * or null) is refused with one line."""
        for value in ("localhost:4000", "app.example.com", "https://a.example/app",
                      "https://a.example?x=1", "https://user@a.example", "http://a:99999", "http://"):
            text = _error(self, "ALLOWED_ORIGINS", value)
            self.assertIn("ALLOWED_ORIGINS entries must look like https://", text)
            self.assertIn(repr(value), text)

    def test_default_origin(self) -> None:
        """By default only http://localhost:3000 is allowed."""
        cfg = Config()
        self.assertTrue(cfg.origin_allowed("http://localhost:3000"))
        self.assertFalse(cfg.origin_allowed("http://localhost:3001"))
        self.assertFalse(cfg.origin_allowed("https://localhost:3000"))
        self.assertFalse(cfg.origin_allowed("http://evil.example"))
        self.assertFalse(cfg.origin_allowed(""))

    def test_listed_origins(self) -> None:
        """Listed origins are allowed, exactly; others are not."""
        cfg = load_config({}, {"ALLOWED_ORIGINS": "https://a.example,https://b.example/"})
        self.assertTrue(cfg.origin_allowed("https://a.example"))
        self.assertTrue(cfg.origin_allowed("https://b.example"))
        self.assertFalse(cfg.origin_allowed("https://c.example"))
        self.assertFalse(cfg.origin_allowed("https://a.example.evil.com"))
        self.assertFalse(cfg.origin_allowed("http://a.example"))

    def test_star_allows_any(self) -> None:
        """'*' anywhere in the list allows every origin."""
        cfg = load_config({}, {"ALLOWED_ORIGINS": "https://a.example, *"})
        for origin in ("https://a.example", "http://anything:1234", "null", ""):
            self.assertTrue(cfg.origin_allowed(origin), origin)


class ParseDotenvTests(SynchronousTestCase):
    """
    L{parse_dotenv} (python-dotenv's C{dotenv_values}) reads KEY=value lines
    as the dotenv packages do.
    """

    def test_simple(self) -> None:
        """KEY=value lines become a dict."""
        self.assertEqual(
            parse_dotenv("PORT=3002\nLOG_LEVEL=debug\n"), {"PORT": "3002", "LOG_LEVEL": "debug"}
        )

    def test_empty_text(self) -> None:
        """Empty text gives an empty dict."""
        self.assertEqual(parse_dotenv(""), {})

    def test_comments_and_blank_lines(self) -> None:
        """Comment lines, indented comments and blank lines are skipped."""
        text = "# a comment\n\n   \n  # indented\nPORT=1\n\t\n"
        self.assertEqual(parse_dotenv(text), {"PORT": "1"})

    def test_export(self) -> None:
        """A leading 'export ' is dropped."""
        self.assertEqual(
            parse_dotenv("export PORT=4\nexport   LOG_LEVEL=info"),
            {"PORT": "4", "LOG_LEVEL": "info"},
        )

    def test_export_prefix_in_name(self) -> None:
        """A name that merely starts with 'export' is kept whole."""
        self.assertEqual(parse_dotenv("exported=1"), {"exported": "1"})

    def test_whitespace_around(self) -> None:
        """Whitespace around the line, the key and the value is trimmed."""
        self.assertEqual(parse_dotenv("  PORT  =  3003  "), {"PORT": "3003"})

    def test_double_quotes(self) -> None:
        """Double quotes around a value are removed, keeping what is inside."""
        self.assertEqual(parse_dotenv('A="hello world"'), {"A": "hello world"})

    def test_single_quotes(self) -> None:
        """Single quotes around a value are removed."""
        self.assertEqual(parse_dotenv("A='x, y'"), {"A": "x, y"})

    def test_empty_quotes(self) -> None:
        """A quoted empty value is empty."""
        self.assertEqual(parse_dotenv("A=\"\"\nB=''"), {"A": "", "B": ""})

    def test_unparseable_statement_skipped(self) -> None:
        """
        A statement python-dotenv cannot parse (an unclosed quote, text after
        the closing quote) is skipped with its warning; the lines after it are read.
        """
        with self.assertLogs("dotenv.main", "WARNING") as logged:
            self.assertEqual(parse_dotenv("A='x\nB=2\nC=\"q\" junk\nD=4"), {"B": "2", "D": "4"})
        self.assertEqual(len(logged.records), 2)
        self.assertIn("could not parse statement starting at line 1", logged.output[0])
        self.assertIn("could not parse statement starting at line 3", logged.output[1])

    def test_inline_comment(self) -> None:
        """A '#' after a space or a tab starts a comment after an unquoted value."""
        self.assertEqual(
            parse_dotenv("PORT=3004 # the port\nB=x\t#after a tab"),
            {"PORT": "3004", "B": "x"},
        )

    def test_hash_without_space_kept(self) -> None:
        """A '#' not preceded by a space is part of the value."""
        self.assertEqual(parse_dotenv("A=abc#def"), {"A": "abc#def"})

    def test_hash_inside_quotes_kept(self) -> None:
        """' #' inside quotes is part of the value."""
        self.assertEqual(parse_dotenv("A=\"x #1\"\nB='y # 2'"), {"A": "x #1", "B": "y # 2"})

    def test_quoted_value_with_inline_comment(self) -> None:
        """A quoted value followed by a ' #' comment loses both the comment and the quotes."""
        self.assertEqual(
            parse_dotenv("A=\"hello world\" # greeting\nB='x'  # c"),
            {"A": "hello world", "B": "x"},
        )

    def test_lines_without_equals_skipped(self) -> None:
        """A name without '=' is left out (unset), and a line without a name is skipped."""
        with self.assertLogs("dotenv.main", "WARNING") as logged:
            self.assertEqual(parse_dotenv("JUSTAWORD\n=value\nexport\nA=1"), {"A": "1"})
        self.assertIn("could not parse statement starting at line 2", logged.output[0])

    def test_name_without_equals_is_unset(self) -> None:
        """
        python-dotenv reads a bare name as "no value": it counts as unset, as an
        empty value does, so the default applies; being the later line, it
        also unsets an earlier KEY=value of the file.
        """
        self.assertEqual(parse_dotenv("PORT"), {})
        self.assertEqual(parse_dotenv("PORT=4200\nPORT\nLOG_LEVEL=debug"), {"LOG_LEVEL": "debug"})
        self.assertEqual(load_config({}, {}, parse_dotenv("PORT\nSHUTDOWN_TIMEOUT")), Config())
        self.assertEqual(load_config({}, {"PORT": "4300"}, parse_dotenv("PORT")).port, "tcp:4300")

    def test_escaped_double_quotes(self) -> None:
        """Inside double quotes, \\" is a quote: the value is not cut at it."""
        self.assertEqual(parse_dotenv('A="x \\"y\\" z"'), {"A": 'x "y" z'})
        self.assertEqual(load_config({}, {}, parse_dotenv('API_TOKEN="x \\"y\\" z"')).api_token,
                         'x "y" z')

    def test_escapes_in_double_quotes_only(self) -> None:
        """\\n is a newline inside double quotes, and two characters inside single quotes."""
        self.assertEqual(parse_dotenv("A=\"a\\nb\"\nB='a\\nb'"), {"A": "a\nb", "B": "a\\nb"})

    def test_multiline_quoted_value(self) -> None:
        """A quoted value may span lines; the lines after it are read as before."""
        text = 'KEY="-----BEGIN X-----\nabc=\ndef==\n-----END X-----"\nPORT=4400\n'
        self.assertEqual(parse_dotenv(text),
                         {"KEY": "-----BEGIN X-----\nabc=\ndef==\n-----END X-----", "PORT": "4400"})

    def test_no_interpolation(self) -> None:
        """${VAR} is kept as written (a password may contain it), as the original server did."""
        self.assertEqual(parse_dotenv("B=2\nA=x${B}y\nC=$B"), {"B": "2", "A": "x${B}y", "C": "$B"})

    def test_empty_value(self) -> None:
        """KEY= gives an empty value."""
        self.assertEqual(parse_dotenv("A="), {"A": ""})

    def test_equals_in_value(self) -> None:
        """Only the first '=' separates key from value."""
        self.assertEqual(
            parse_dotenv("REDIS_URL=redis://h:6379/0?a=b"), {"REDIS_URL": "redis://h:6379/0?a=b"}
        )

    def test_later_line_wins(self) -> None:
        """When a key repeats, the last line wins."""
        self.assertEqual(parse_dotenv("A=1\nA=2"), {"A": "2"})

    def test_crlf(self) -> None:
        """Windows line endings are handled."""
        self.assertEqual(parse_dotenv("A=1\r\nB=2\r\n"), {"A": "1", "B": "2"})


class DrainWindowTests(SynchronousTestCase):
    """DRAIN_WINDOW_SECONDS must end before SHUTDOWN_TIMEOUT."""

    def test_window_at_or_past_timeout_refused(self) -> None:
        """A window that reaches the timeout would drop clients without their 1001."""
        for drain, timeout in (("30", "5"), ("10", "10"), ("5", "0")):
            e = self.assertRaises(ConfigError, load_config, {},
                                  {"DRAIN_WINDOW_SECONDS": drain, "SHUTDOWN_TIMEOUT": timeout})
            self.assertEqual(str(e), f"DRAIN_WINDOW_SECONDS ({drain}) must be below "
                                     f"SHUTDOWN_TIMEOUT ({timeout}), or 0")

    def test_window_below_timeout_or_zero_accepted(self) -> None:
        """A shorter window, or none, is fine."""
        cfg = load_config({}, {"DRAIN_WINDOW_SECONDS": "9.5", "SHUTDOWN_TIMEOUT": "10"})
        self.assertEqual((cfg.drain_window_seconds, cfg.shutdown_timeout_seconds), (9.5, 10))
        cfg = load_config({}, {"DRAIN_WINDOW_SECONDS": "0", "SHUTDOWN_TIMEOUT": "0"})
        self.assertEqual((cfg.drain_window_seconds, cfg.shutdown_timeout_seconds), (0, 0))

    def test_default_window_fits_a_short_timeout(self) -> None:
        """Unset, the window is 5 s, or half of a SHUTDOWN_TIMEOUT below 10 s."""
        for timeout, window in (("10", 5), ("30", 5), ("4", 2), ("0", 0)):
            cfg = load_config({}, {"SHUTDOWN_TIMEOUT": timeout})
            self.assertEqual(cfg.drain_window_seconds, window, timeout)


class HistoryBytesTests(SynchronousTestCase):
    """HISTORY_MAX_BYTES (per room) and HISTORY_TOTAL_BYTES (all rooms)."""

    def test_defaults(self) -> None:
        """1 MiB per room, 64 MiB in all."""
        cfg = Config()
        self.assertEqual((cfg.history_max_bytes, cfg.history_total_bytes), (1 << 20, 1 << 26))

    def test_minimums(self) -> None:
        """Each takes a whole number of at least 64 KiB."""
        for env in ("HISTORY_MAX_BYTES", "HISTORY_TOTAL_BYTES"):
            self.assertEqual(_error(self, env, "65535"),
                             f"{env} must be at least 65536, got '65535'")
            self.assertEqual(_error(self, env, "1e6"),
                             f"{env} must be a whole number, got '1e6'")
        cfg = load_config({}, {"HISTORY_MAX_BYTES": "65536", "HISTORY_TOTAL_BYTES": "65536"})
        self.assertEqual((cfg.history_max_bytes, cfg.history_total_bytes), (65536, 65536))
        self.assertIs(type(cfg.history_total_bytes), int)

    def test_per_room_above_total_refused(self) -> None:
        """A room may not keep more than all rooms together: one line names both."""
        for environ, room, total in (
            ({"HISTORY_MAX_BYTES": "67108865"}, 67108865, 67108864),
            ({"HISTORY_MAX_BYTES": "1048576", "HISTORY_TOTAL_BYTES": "1048575"}, 1048576, 1048575),
        ):
            e = self.assertRaises(ConfigError, load_config, {}, environ)
            self.assertEqual(str(e), f"HISTORY_MAX_BYTES ({room}) must not exceed "
                                     f"HISTORY_TOTAL_BYTES ({total})")

    def test_unset_per_room_fits_a_smaller_total(self) -> None:
        """Unset, the per-room bound is 1 MiB or the whole total, if that is smaller."""
        cfg = load_config({}, {"HISTORY_TOTAL_BYTES": "500000"})
        self.assertEqual((cfg.history_max_bytes, cfg.history_total_bytes), (500000, 500000))


class RedisSentinelSettingsTests(SynchronousTestCase):
    """REDIS_SENTINELS, REDIS_SENTINEL_MASTER/PASSWORD, REDIS_MIN_REPLICAS(_TIMEOUT_MS)."""

    def test_sentinels_parsed(self) -> None:
        """host:port entries separated by commas, IPv6 in brackets, blanks skipped."""
        cfg = load_config({}, {"REDIS_SENTINELS": " s1:26379, 10.0.0.2:26380,,[::1]:26381 "})
        self.assertEqual(cfg.redis_sentinels,
                         (("s1", 26379), ("10.0.0.2", 26380), ("::1", 26381)))
        self.assertTrue(cfg.redis)
        self.assertFalse(Config().redis)

    def test_bad_sentinels(self) -> None:
        """Each malformed entry is named in a one-line error."""
        for value in ("s1", "s1:", ":26379", "s1:0", "s1:65536", "s1:x", "redis://s1:26379",
                      "s1:26379,s2"):
            message = _error(self, "REDIS_SENTINELS", value)
            self.assertTrue(message.startswith("REDIS_SENTINELS must list host:port"), message)

    def test_master_name_and_password(self) -> None:
        """The master's name is one word; the sentinels' password is kept as given."""
        cfg = load_config({"redis-sentinel-master": "cache"},
                          {"REDIS_SENTINEL_PASSWORD": "s3cret", "REDIS_SENTINELS": "s:1"})
        self.assertEqual((cfg.redis_sentinel_master, cfg.redis_sentinel_password),
                         ("cache", "s3cret"))
        self.assertIn("one word", _error(self, "REDIS_SENTINEL_MASTER", "my master"))

    def test_min_replicas(self) -> None:
        """A whole number of replicas and a timeout of at least 1 ms, only with Redis."""
        cfg = load_config({}, {"REDIS_URL": "redis://r", "REDIS_MIN_REPLICAS": "1",
                               "REDIS_MIN_REPLICAS_TIMEOUT_MS": "250"})
        self.assertEqual((cfg.redis_min_replicas, cfg.redis_min_replicas_timeout_ms), (1, 250))
        self.assertIn("whole number", _error(self, "REDIS_MIN_REPLICAS", "1.5"))
        self.assertIn("at least 1", _error(self, "REDIS_MIN_REPLICAS_TIMEOUT_MS", "0"))
        e = self.assertRaises(ConfigError, load_config, {}, {"REDIS_MIN_REPLICAS": "1"})
        self.assertEqual(str(e), "REDIS_MIN_REPLICAS needs REDIS_URL or REDIS_SENTINELS")
        e = self.assertRaises(ConfigError, load_config, {}, {
            "REDIS_URL": "redis://r", "REDIS_MIN_REPLICAS": "1", "INSTANCE_TTL": "1"})
        self.assertEqual(str(e), "REDIS_MIN_REPLICAS_TIMEOUT_MS (500) must be below half of "
                                 "INSTANCE_TTL in milliseconds (500)")
