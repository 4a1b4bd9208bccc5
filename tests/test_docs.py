"""The documentation agrees with the code: env.example and the README list every setting."""

from __future__ import annotations

import os
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
