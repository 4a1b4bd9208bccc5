"""
The package as users install it: one version, printed by both commands;
the MIT license, in the metadata and in the installed files; dependency
ranges without a cap that a date will hit; and the constraints files
(the lock and the floors) in step with pyproject.toml and used by the
image, scripts/serve and scripts/test.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import re
import sys
import tomllib
from typing import Any

from twisted.application.service import IServiceMaker
from twisted.internet.utils import getProcessOutputAndValue
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase

import happyrobot
from tests.helpers import REPO_ROOT


def read(name: str) -> str:
    with open(os.path.join(REPO_ROOT, name), encoding="utf-8") as f:
        return f.read()


def pyproject() -> dict[str, Any]:
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?\s*(.*?)\s*$")


def parse_requirement(text: str) -> tuple[str, list[str], list[tuple[str, str]]]:
    """C{name[extras] >=1,<2} as its normalized name, extras and (operator, version) pairs."""
    match = REQUIREMENT.match(text)
    assert match, text
    name, extras, spec = match.groups()
    clauses = []
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op, version = re.match(r"(==|>=|<=|!=|~=|<|>)\s*(\S+)$", clause).groups()  # type: ignore[union-attr]
        clauses.append((op, version))
    return normalize(name), [e.strip() for e in (extras or "").split(",") if e.strip()], clauses


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version (C{"26.11.1"} -> (26, 11, 1)), three parts at least."""
    parts = tuple(int(p) for p in re.match(r"\d+(?:\.\d+)*", version).group().split("."))  # type: ignore[union-attr]
    return parts + (0,) * (3 - len(parts))


def tested_requirements() -> dict[str, list[tuple[str, str]]]:
    """The dependencies and the test extra: what the constraints files pin."""
    project = pyproject()["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["test"]
    parsed = [parse_requirement(r) for r in requirements]
    return {name: clauses for name, _, clauses in parsed}


def pins(name: str) -> dict[str, str]:
    """The C{name==version} lines of a constraints file, by normalized name."""
    found = {}
    for line in read(name).splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pinned, version = line.split("==")
            found[normalize(pinned)] = version.strip()
    return found


def installed() -> importlib.metadata.Distribution:
    """The installed distribution (scripts/test installs it in both passes)."""
    try:
        return importlib.metadata.distribution("happyrobot")
    except importlib.metadata.PackageNotFoundError:
        raise AssertionError(
            "the package is not installed: install it (pip install '.[test]'; "
            "bash scripts/test does) to test what it installs"
        ) from None


class VersionTests(SynchronousTestCase):
    """One place holds the version; both commands print it."""

    def test_one_place(self) -> None:
        """pyproject.toml reads the version from happyrobot.__version__; setup.py names none."""
        config = pyproject()
        self.assertNotIn("version", config["project"])
        self.assertIn("version", config["project"]["dynamic"])
        self.assertEqual(config["tool"]["setuptools"]["dynamic"]["version"],
                         {"attr": "happyrobot.__version__"})
        self.assertNotRegex(read("setup.py"), r"version\s*=")
        self.assertRegex(happyrobot.__version__, r"^\d+\.\d+\.\d+$")

    def test_twistd_plugin_version(self) -> None:
        """The plugin's options answer --version with the package's version."""
        [maker] = [m for m in getPlugins(IServiceMaker) if m.tapname == "happyrobot-ws"]
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit) as raised:
            maker.options().parseOptions(["--version"])
        self.assertEqual(raised.exception.code, 0)
        self.assertEqual(out.getvalue(), f"happyrobot {happyrobot.__version__}\n")

    def test_installed_version(self) -> None:
        """The installed package's metadata carries the same version."""
        self.assertEqual(installed().version, happyrobot.__version__)


class VersionProcessTests(TestCase):
    """``twistd happyrobot-ws --version`` as an operator runs it."""

    timeout = 30

    async def test_twistd_version(self) -> None:
        """It prints the package's version and exits with 0."""
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": REPO_ROOT}
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-c", "from twisted.scripts.twistd import run; run()", "happyrobot-ws", "--version"],
            env=env, path=REPO_ROOT)
        self.assertEqual((code, out.decode()), (0, f"happyrobot {happyrobot.__version__}\n"))


class LicenseTests(SynchronousTestCase):
    """The MIT license, in the repository, the metadata and the installed files."""

    def test_license_file(self) -> None:
        """LICENSE is the MIT license with the project's copyright line."""
        text = read("LICENSE")
        self.assertTrue(text.startswith("MIT License\n"))
        self.assertIn("\nCopyright (c) 2026 The Happy Robot authors\n", text)
        self.assertIn("Permission is hereby granted, free of charge, to any person obtaining a copy",
                      text)
        self.assertIn('THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND', text)

    def test_declared(self) -> None:
        """pyproject.toml declares it as an SPDX expression and ships the file."""
        project = pyproject()["project"]
        self.assertEqual(project["license"], "MIT")
        self.assertEqual(project["license-files"], ["LICENSE"])

    def test_installed_metadata(self) -> None:
        """The installed metadata names the license and carries the file."""
        dist = installed()
        self.assertEqual(dist.metadata["License-Expression"], "MIT")
        licenses = [f for f in dist.files or () if f.name == "LICENSE"]
        self.assertEqual(len(licenses), 1)
        self.assertEqual(licenses[0].read_text(encoding="utf-8"), read("LICENSE"))


class InstalledFilesTests(SynchronousTestCase):
    """What an install puts on disk besides the modules."""

    def test_plugin_and_package_data(self) -> None:
        """The twistd plugin, the static files and the Lua scripts are installed."""
        files = {str(f).replace(os.sep, "/") for f in installed().files or ()}
        expected = {"twisted/plugins/happyrobot_ws.py"}
        for folder, suffix in (("happyrobot/static", ""), ("happyrobot/redis/scripts", ".lua")):
            names = [n for n in os.listdir(os.path.join(REPO_ROOT, folder)) if n.endswith(suffix)
                     and not n.endswith(".py") and n != "__pycache__"]
            self.assertTrue(names, folder)
            expected.update(f"{folder}/{n}" for n in names)
        self.assertEqual(expected - files, set())
        self.assertNotIn("twisted/plugins/dropin.cache", files)


class RangeTests(SynchronousTestCase):
    """Compatible ranges in the metadata; the exact versions in constraints/."""

    def test_no_calendar_caps(self) -> None:
        """No requirement has an upper bound that a year reaches (such as twisted<27)."""
        project = pyproject()["project"]
        requirements = project["dependencies"] + [
            r for extra in project["optional-dependencies"].values() for r in extra]
        for requirement in requirements:
            for op, version in parse_requirement(requirement)[2]:
                if op in ("<", "<="):
                    self.assertLess(release(version)[0], 20, requirement)

    def test_autobahn_extras(self) -> None:
        """Autobahn comes with its Twisted extra only (accelerate installs nothing)."""
        project = pyproject()["project"]
        extras = {name: extras for name, extras, _ in map(parse_requirement, project["dependencies"])}
        self.assertEqual(extras["autobahn"], ["twisted"])

    def test_floors(self) -> None:
        """Every tested requirement has a floor, and constraints/lowest.txt pins exactly it."""
        lowest = pins("constraints/lowest.txt")
        requirements = tested_requirements()
        self.assertEqual(sorted(lowest), sorted(requirements))
        for name, clauses in requirements.items():
            [floor] = [v for op, v in clauses if op == ">="]
            self.assertEqual(release(lowest[name]), release(floor), name)
            self.assertEqual(len(lowest[name].split(".")), 3, name)
        self.assertEqual(release(lowest["python-dotenv"]), (1, 0, 0))

    def test_lock_within_ranges(self) -> None:
        """constraints/locked.txt pins every tested requirement inside its range, not the package."""
        locked = pins("constraints/locked.txt")
        self.assertNotIn("happyrobot", locked)
        for name, clauses in tested_requirements().items():
            self.assertIn(name, locked)
            version = release(locked[name])
            for op, bound in clauses:
                if op == ">=":
                    self.assertGreaterEqual(version, release(bound), name)
                elif op == "<":
                    self.assertLess(version, release(bound), name)

    def test_lock_names_its_refresh(self) -> None:
        """The lock's header gives the command that refreshes it, and that command exists."""
        header = [line for line in read("constraints/locked.txt").splitlines() if line.startswith("#")]
        self.assertIn("#   bash scripts/lock", header)
        self.assertIn("constraints/locked.txt", read("scripts/lock"))


class InstallTests(SynchronousTestCase):
    """The image and the scripts install with the constraints files."""

    def test_dockerfile(self) -> None:
        """The image installs with the lock and copies everything the build reads."""
        dockerfile = read("Dockerfile")
        self.assertRegex(dockerfile, r"\nRUN pip install [^\n]*-c constraints/locked\.txt \.")
        copied = set()
        for line in dockerfile.splitlines():
            if line.startswith("COPY "):
                copied.update(p.rstrip("/") for p in line.split()[1:-1])
        project = pyproject()["project"]
        needed = {"pyproject.toml", "setup.py", "constraints/locked.txt", project["readme"],
                  *project["license-files"], "happyrobot", "twisted"}
        self.assertEqual(needed - copied, set())
        for ignored in read(".dockerignore").splitlines():
            self.assertNotIn(ignored.strip(), needed)

    def test_serve(self) -> None:
        """scripts/serve installs with the lock."""
        self.assertRegex(read("scripts/serve"), r"pip\" install [^\n]*-c constraints/locked\.txt \.")

    def test_test_passes(self) -> None:
        """scripts/test runs a locked pass and a lowest pass, each with its constraints file."""
        script = read("scripts/test")
        self.assertIn("passes=${TEST_VERSIONS:-locked lowest}", script)
        self.assertRegex(script, r'pip" install [^\n]*-c "constraints/\$pass\.txt" "\.\[test\]"')
        for name in ("locked", "lowest"):
            self.assertTrue(os.path.exists(os.path.join(REPO_ROOT, "constraints", f"{name}.txt")))
