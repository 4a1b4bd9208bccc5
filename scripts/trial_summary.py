"""Turn trial's closing line into the `N passed, N failed` line CI reads."""

from __future__ import annotations

import re
import sys


def summary(text: str) -> str:
    """`N passed, N failed[, N skipped]` from trial's PASSED/FAILED line."""
    match = None
    for match in re.finditer(r"^(PASSED|FAILED) \((.*)\)\s*$", text, re.M):
        pass
    if match is None:
        return "0 passed, 1 failed"  # trial never finished: count it as a failure
    counts = dict(
        (k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", match.group(2))
    )
    passed = counts.get("successes", 0)
    failed = sum(counts.get(k, 0) for k in ("failures", "errors", "unexpectedSuccesses"))
    line = f"{passed} passed, {failed} failed"
    if counts.get("skips"):
        line += f", {counts['skips']} skipped"
    return line


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8", errors="replace") as f:
        print(summary(f.read()))
