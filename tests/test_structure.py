"""
The shape of happyrobot/ stays one a maintainer can hold in their head:
small modules and classes, and the libraries' non-public internals used
only in their seam modules (happyrobot/seams/, happyrobot/redis/client.py).
"""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import REPO_ROOT

PACKAGE = os.path.join(REPO_ROOT, "happyrobot")
#: The most lines a module and a class may have.
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 300
#: The modules allowed to use a library's non-public attributes.
SEAMS = {
    os.path.join("seams", "autobahn.py"),
    os.path.join("seams", "twisted.py"),
    os.path.join("redis", "client.py"),
}
#: Non-public or undocumented attributes of Autobahn, Twisted and
#: txredisapi objects that the server relies on (each seam's check()
#: verifies them at start-up).
INTERNALS = {
    # Autobahn
    "_dataReceived", "_cancelAutoPingTimeoutCall", "_invalid_payload", "_perMessageCompress",
    "current_frame", "inside_message", "send_queue", "wasNotCleanReason", "is_closed",
    "CONFIG_ATTRS", "autoPingTimeoutCall", "autoPingRestartOnAnyTraffic",
    # Twisted
    "_raiseSynchronously", "allContentReceived", "requestDone", "handleContentChunk",
    # txredisapi
    "_ready", "replyReceived",
}


def modules() -> list[tuple[str, str]]:
    """(path relative to happyrobot/, source) of every module."""
    found = []
    for folder, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    found.append((os.path.relpath(path, PACKAGE), f.read()))
    return found


def internal_uses(source: str) -> list[str]:
    """C{"line: name"} of each use of a name in L{INTERNALS} in C{source}."""
    found = []
    for node in ast.walk(ast.parse(source)):
        name = None
        if isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, ast.FunctionDef):
            name = node.name  # an override
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            name = node.id  # a class attribute
        if name in INTERNALS:
            found.append((node.lineno, name))
    return [f"{line}: {name}" for line, name in sorted(found)]


class StructureTests(SynchronousTestCase):
    def test_modules_are_small(self) -> None:
        """No module of happyrobot/ is over MAX_MODULE_LINES lines."""
        large = {p: s.count("\n") for p, s in modules() if s.count("\n") > MAX_MODULE_LINES}
        self.assertEqual(large, {})

    def test_classes_are_small(self) -> None:
        """No class of happyrobot/ is over MAX_CLASS_LINES lines."""
        large = {}
        for path, source in modules():
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.ClassDef):
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    if lines > MAX_CLASS_LINES:
                        large[f"{path}:{node.name}"] = lines
        self.assertEqual(large, {})

    def test_internals_only_in_seams(self) -> None:
        """The libraries' internals are named only in the seam modules."""
        found = [
            f"{path}:{use}"
            for path, source in modules()
            if path not in SEAMS
            for use in internal_uses(source)
        ]
        self.assertEqual(found, [])

    def test_internal_uses_found(self) -> None:
        """The check sees an internal read, called, overridden or set as a class attribute."""
        source = (
            "proto._dataReceived(b'')\n"
            "x = request.requestDone\n"
            "class P:\n"
            "    _raiseSynchronously = True\n"
            "    def allContentReceived(self): pass\n"
            "ok = proto.dataReceived\n"
        )
        self.assertEqual(internal_uses(source), [
            "1: _dataReceived", "2: requestDone", "4: _raiseSynchronously",
            "5: allContentReceived",
        ])

    def test_txredisapi_imported_only_by_the_client(self) -> None:
        """redis/client.py is the only importer of txredisapi."""
        importers = []
        for path, source in modules():
            for node in ast.walk(ast.parse(source)):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                if any(n.split(".")[0] == "txredisapi" for n in names):
                    importers.append(path)
        self.assertEqual(sorted(set(importers)), [os.path.join("redis", "client.py")])
