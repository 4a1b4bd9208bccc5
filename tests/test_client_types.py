"""
The browser client's TypeScript declarations (``happyrobot/static/client.d.ts``):
``tsc --noEmit`` (strict) compiles a typed example that uses the API as
docs/clients.md shows it and refuses every line of a file of wrong uses;
and the declarations name what ``client.js`` and the protocol define.

TypeScript comes from npm, pinned in ``tests/typescript/package.json`` and
installed with ``npm ci`` from its lock file when it is missing (and Node.js
with apt-get, as root), as the browser test installs playwright-core.  When
that is impossible the test fails, naming what to install; it never skips.
"""

from __future__ import annotations

import json
import os
import re

from twisted.trial.unittest import SynchronousTestCase, TestCase

from happyrobot.messages import RELAYED_TYPES
from tests.helpers import REPO_ROOT
from tests.test_browser import _run, ensure_node

TYPESCRIPT_DIR = os.path.join(REPO_ROOT, "tests", "typescript")
TSC = os.path.join(TYPESCRIPT_DIR, "node_modules", "typescript", "bin", "tsc")
INSTALLED = os.path.join(TYPESCRIPT_DIR, "node_modules", "typescript", "package.json")

#: A diagnostic of ``tsc --pretty false``: ``file(line,column): error TSnnnn: text``.
DIAGNOSTIC = re.compile(r"^(?P<file>[^\s(]+)\((?P<line>\d+),\d+\): error (?P<code>TS\d+): ",
                        re.MULTILINE)
#: The marker of a line of misuse.ts that tsc must refuse.
EXPECT_ERROR = "// expect-error:"


def read(*parts: str) -> str:
    with open(os.path.join(REPO_ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def _pinned_version() -> str:
    """The TypeScript version tests/typescript/package.json pins."""
    package = json.loads(read("tests", "typescript", "package.json"))
    return str(package["dependencies"]["typescript"])


def _installed_version() -> str | None:
    """The version of the TypeScript installed in tests/typescript, if any."""
    try:
        with open(INSTALLED, encoding="utf-8") as f:
            return str(json.load(f)["version"])
    except (OSError, ValueError, KeyError):
        return None


class TypeCheckTests(TestCase):
    """tsc on the typed example and on the misuse file."""

    # Generous, because a first run may install TypeScript with npm.
    timeout = 300

    async def _tsc(self, project: str) -> tuple[int, str]:
        """Run ``tsc -p <project>`` in tests/typescript, installing TypeScript first if needed."""
        node, npm = await ensure_node(self)
        if _installed_version() != _pinned_version():
            argv = [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"]
            code, output = await _run(argv, TYPESCRIPT_DIR)
            if code != 0 or _installed_version() != _pinned_version():
                self.fail(f"could not install typescript {_pinned_version()} with npm ci in "
                          f"{TYPESCRIPT_DIR} (exit {code}):\n{output[-2000:]}")
        return await _run([node, TSC, "-p", project, "--pretty", "false"], TYPESCRIPT_DIR)

    async def test_example_compiles(self) -> None:
        """example.ts, which imports client.d.ts and uses the whole API, compiles without errors."""
        code, output = await self._tsc("tsconfig.json")
        self.assertEqual((code, output), (0, ""))

    async def test_misuse_is_refused(self) -> None:
        """tsc reports an error on each line of misuse.ts marked expect-error, and on no other."""
        code, output = await self._tsc("tsconfig.misuse.json")
        self.assertNotEqual(code, 0, output)
        found = [(m["file"], int(m["line"])) for m in DIAGNOSTIC.finditer(output)]
        self.assertTrue(found, output)
        self.assertEqual({file for file, _ in found}, {"misuse.ts"}, output)
        marked = {
            number
            for number, line in enumerate(read("tests", "typescript", "misuse.ts").splitlines(), 1)
            if EXPECT_ERROR in line
        }
        self.assertGreaterEqual(len(marked), 10)
        self.assertEqual({line for _, line in found}, marked, output)


def _names(pattern: str, text: str) -> set[str]:
    """The first group of every match of C{pattern}, C{^} matching at each line."""
    return set(re.findall(pattern, text, re.MULTILINE))


def _block(text: str, start: str, end: str) -> str:
    """The text between the first C{start} and the next C{end}."""
    begin = text.index(start) + len(start)
    return text[begin:text.index(end, begin)]


def _declared_class() -> str:
    """The body of client.d.ts's HappyRobotClient class."""
    return _block(read("happyrobot", "static", "client.d.ts"),
                  "export declare class HappyRobotClient {", "\n}\n")


def _script_class() -> str:
    """The body of client.js's HappyRobotClient class."""
    return _block(read("happyrobot", "static", "client.js"),
                  "export class HappyRobotClient {", "\n}\n")


class AgreementTests(SynchronousTestCase):
    """The declarations name what client.js, the server and docs/clients.md define."""

    def test_exports(self) -> None:
        """client.d.ts declares exactly the values client.js exports, default included."""
        script = read("happyrobot", "static", "client.js")
        declared = read("happyrobot", "static", "client.d.ts")
        exported = _names(r"^export (?:const|class|function) (\w+)", script)
        declared_names = _names(r"^export declare (?:const|class|function) (\w+)", declared)
        self.assertEqual(declared_names, exported)
        self.assertEqual(exported, {"STATES", "HappyRobotClient", "createClient",
                                    "CLOSE_USER_DISCONNECTED"})
        self.assertIn("\nexport default HappyRobotClient;", script)
        self.assertIn("\nexport default HappyRobotClient;", declared)

    def test_class_members(self) -> None:
        """The class declares every public method, getter and field of client.js's, and no other."""
        body = _script_class()
        methods = _names(r"^  (?:get |async )?([A-Za-z]\w*)\(", body)
        fields = set(re.findall(r"\bthis\.([A-Za-z]\w*) =", body))
        declared = _names(r"^  (?:readonly |get )?([A-Za-z]\w*)[(<:]", _declared_class())
        self.assertEqual(declared, methods | fields)
        self.assertTrue({"connect", "send", "on", "state", "clientId"} <= declared)

    def test_states(self) -> None:
        """STATES and ConnectionState list client.js's states, in its order."""
        script = read("happyrobot", "static", "client.js")
        declared = read("happyrobot", "static", "client.d.ts")
        states = _block(script, "export const STATES = Object.freeze([", "]")
        self.assertIn(f"export declare const STATES: readonly [{states}];", declared)
        union = " | ".join(s.strip() for s in states.split(","))
        self.assertIn(f"export type ConnectionState = {union};", declared)

    def test_client_events(self) -> None:
        """ClientEventMap names exactly the client's own events, those client.js emits."""
        emitted = set(re.findall(r'_emit\("([a-z]+)"', read("happyrobot", "static", "client.js")))
        body = _block(read("happyrobot", "static", "client.d.ts"),
                      "export interface ClientEventMap {", "\n}")
        self.assertEqual(_names(r"^  (\w+):", body), emitted)
        self.assertEqual(emitted, {"state", "dropped", "disconnect", "rejoin", "revoked",
                                   "terminated"})

    def test_event_types(self) -> None:
        """EventType is the server's seven relayed types."""
        union = _block(read("happyrobot", "static", "client.d.ts"), "export type EventType =", ";")
        self.assertEqual(set(re.findall(r'"(\w+)"', union)), set(RELAYED_TYPES))

    def test_error_codes(self) -> None:
        """ErrorCode is the codes of docs/PROTOCOL.md's table of errors."""
        union = _block(read("happyrobot", "static", "client.d.ts"), "export type ErrorCode =", ";")
        errors = _block(read("docs", "PROTOCOL.md"), "\n## Errors\n", "\n## ")
        documented = _names(r"^\| `([A-Z_]+)`", errors)
        self.assertGreaterEqual(len(documented), 20)
        self.assertEqual(set(re.findall(r'"(\w+)"', union)), documented)

    def test_docs_example_is_checked(self) -> None:
        """docs/clients.md's TypeScript example, after its import, is part of example.ts."""
        docs = _block(read("docs", "clients.md"), "\n### TypeScript\n", "\n## ")
        example = _block(docs, "```ts\n", "```\n")
        imports, code = example.split("\n\n", 1)
        self.assertIn('from "./lib/happyrobot/client.js";', imports)
        checked = _block(read("tests", "typescript", "example.ts"),
                         "// docs/clients.md: begin\n", "// docs/clients.md: end\n")
        self.assertEqual(code, checked)
        for name in re.findall(r"type (\w+)", imports):
            self.assertIn(f"type {name},", read("tests", "typescript", "example.ts"))
