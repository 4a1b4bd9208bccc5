"""The documentation agrees with the code and works from a fresh clone."""

from __future__ import annotations

import os
import re
import runpy

from twisted.trial.unittest import SynchronousTestCase

from happyrobot.config import SETTINGS, Config, load_config, parse_dotenv
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

    def test_readme_names_every_setting(self) -> None:
        """The README's configuration table names every variable and flag."""
        readme = read("README.md")
        for s in SETTINGS:
            self.assertIn(f"`{s.env}`", readme, s.env)
            self.assertIn(f"--{s.option}", readme, s.option)


#: Files written for people who clone the repository.
USER_DOCS = ("README.md", "CHANGELOG.md", "docs/PROTOCOL.md", "docs/operations.md", "docs/security.md",
             "docs/clients.md", "docs/development.md", "docs/performance.md", "docs/design.md",
             "bench/run.py", "bench/paired.py", "bench/peers/node_server.mjs")

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
