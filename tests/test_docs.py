"""The documentation agrees with the code and works from a fresh clone."""

from __future__ import annotations

import os
import re
import runpy

from twisted.trial.unittest import SynchronousTestCase

from happyrobot.config import (
    FITTED,
    SETTINGS,
    Config,
    ConfigError,
    load_config,
    parse_dotenv,
)
from tests.helpers import REPO_ROOT


def read(name: str) -> str:
    with open(os.path.join(REPO_ROOT, name), encoding="utf-8") as f:
        return f.read()


class DocsTests(SynchronousTestCase):
    """env.example and README.md."""

    def test_generated_from_settings(self) -> None:
        """env.example and the README table are what scripts/gen_settings_docs.py makes."""
        gen = runpy.run_path(os.path.join(REPO_ROOT, "scripts", "gen_settings_docs.py"))
        self.assertEqual(read("env.example"), gen["render_env_example"]())
        readme = read("README.md")
        self.assertEqual(gen["replace_table"](readme), readme)

    def test_env_example_gives_the_defaults(self) -> None:
        """Loading env.example as a .env file gives the default configuration."""
        self.assertEqual(load_config({}, {}, parse_dotenv(read("env.example"))), Config())

    def test_env_example_changes_nothing(self) -> None:
        """
        With env.example as the .env file, every other setting gives what it
        gives without one, or the same error: no line of it pins a default
        that is otherwise fitted to another setting (SHUTDOWN_TIMEOUT=4 with
        DRAIN_WINDOW_SECONDS=5 written out would refuse to start).
        """
        example = parse_dotenv(read("env.example"))
        for environ in _VARIATIONS:
            try:
                without = load_config({}, environ, {})
            except ConfigError as e:
                error = self.assertRaises(ConfigError, load_config, {}, environ, example)
                self.assertEqual(str(error), str(e), environ)
            else:
                self.assertEqual(load_config({}, environ, example), without, environ)
            # The option, which wins over the environment, too.
            options = {_OPTION[name]: value for name, value in environ.items()}
            try:
                without = load_config(options, {}, {})
            except ConfigError:
                self.assertRaises(ConfigError, load_config, options, {}, example)
            else:
                self.assertEqual(load_config(options, {}, example), without, options)

    def test_fitted_settings_commented_out(self) -> None:
        """The settings fitted to another are in env.example only as commented-out lines."""
        lines = read("env.example").splitlines()
        self.assertEqual(sorted(FITTED), ["DRAIN_WINDOW_SECONDS", "HISTORY_MAX_BYTES"])
        for s in SETTINGS:
            written = [line for line in lines if line.startswith(f"{s.env}=")]
            if s.env in FITTED:
                self.assertEqual(written, [], s.env)
                self.assertIn(f"# {s.env}=", lines)
            else:
                self.assertEqual(written, [f"{s.env}={s.default}"], s.env)

    def test_readme_names_every_setting(self) -> None:
        """The README's configuration table names every variable and flag."""
        readme = read("README.md")
        for s in SETTINGS:
            self.assertIn(f"`{s.env}`", readme, s.env)
            self.assertIn(f"--{s.option}", readme, s.option)


#: Environments (one or two settings each) under which env.example as .env
#: must change nothing: other values of the settings the fitted defaults
#: follow, and the fitted settings themselves.
_VARIATIONS: list[dict[str, str]] = [
    {"SHUTDOWN_TIMEOUT": "4"},
    {"SHUTDOWN_TIMEOUT": "0"},
    {"SHUTDOWN_TIMEOUT": "7.5"},
    {"SHUTDOWN_TIMEOUT": "30"},
    {"HISTORY_TOTAL_BYTES": "65536"},
    {"HISTORY_TOTAL_BYTES": "1000000"},
    {"HISTORY_TOTAL_BYTES": "1000000000"},
    {"HISTORY_MAX_BYTES": "2000000"},
    {"HISTORY_MAX_BYTES": "100000000"},
    {"DRAIN_WINDOW_SECONDS": "8"},
    {"DRAIN_WINDOW_SECONDS": "12"},
    {"DRAIN_WINDOW_SECONDS": "3", "SHUTDOWN_TIMEOUT": "4"},
    {"HISTORY_MAX_BYTES": "65536", "HISTORY_TOTAL_BYTES": "65536"},
    {"SHUTDOWN_TIMEOUT": "4", "HISTORY_TOTAL_BYTES": "100000", "PORT": "4100"},
]

#: Each variable's option name.
_OPTION = {s.env: s.option for s in SETTINGS}

#: Files written for people who clone the repository.
USER_DOCS = ("README.md", "CHANGELOG.md", "docs/PROTOCOL.md", "docs/operations.md", "docs/security.md",
             "docs/clients.md", "docs/development.md", "docs/performance.md", "docs/design.md",
             "docs/operator-api.md", "bench/run.py", "bench/revoke_latency.py", "bench/paired.py", "bench/peers/node_server.mjs")

#: What only one machine has: its temporary folders, home directories and checkouts,
#: and reference material beside the repository that a clone does not include.
MACHINE_ONLY = re.compile(r"/tmp/|/work/|/root/|/home/|\.\./shared")

#: A time of day, which says when something was done rather than what is.
CLOCK_TIME = re.compile(r"\b[0-2][0-9]:[0-5][0-9](?::[0-5][0-9])? ?UTC\b")

#: A Markdown link or image target.
LINK = re.compile(r"\]\(([^)\s]+)\)")


class UserDocsTests(SynchronousTestCase):
    """The README, docs/ and the benchmark's instructions work from a fresh clone."""

    def test_readme_is_short(self) -> None:
        """The README stays a page for users, not a notebook."""
        self.assertLessEqual(len(read("README.md").splitlines()), 260)

    def test_no_machine_paths(self) -> None:
        """No document names a path that exists only on one machine."""
        for name in USER_DOCS:
            for number, line in enumerate(read(name).splitlines(), 1):
                self.assertIsNone(MACHINE_ONLY.search(line), f"{name}:{number}: {line}")

    def test_no_clock_times(self) -> None:
        """No document says at what time of day something was done."""
        for name in USER_DOCS:
            for number, line in enumerate(read(name).splitlines(), 1):
                self.assertIsNone(CLOCK_TIME.search(line), f"{name}:{number}: {line}")

    def test_relative_links_resolve(self) -> None:
        """Every relative link of the Markdown documents names a file of the repository."""
        for name in USER_DOCS:
            if not name.endswith(".md"):
                continue
            for target in LINK.findall(read(name)):
                if target.startswith(("http://", "https://", "#", "mailto:")):
                    continue
                path = os.path.normpath(os.path.join(REPO_ROOT, os.path.dirname(name), target.split("#")[0]))
                self.assertTrue(os.path.exists(path), f"{name}: {target}")
