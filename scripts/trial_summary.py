"""Turn trial's closing lines into the `N passed, N failed` line CI reads."""

from __future__ import annotations

import re
import sys


def counts(text: str) -> dict[str, int]:
    """passed, failed and skipped from the last PASSED/FAILED line of one trial run."""
    match = None
    for match in re.finditer(r"^(PASSED|FAILED) \((.*)\)\s*$", text, re.M):
        pass
    if match is None:
        # trial never finished: count it as a failure
        return {"passed": 0, "failed": 1, "skipped": 0}
    found = dict(
        (k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", match.group(2))
    )
    return {
        "passed": found.get("successes", 0),
        "failed": sum(found.get(k, 0) for k in ("failures", "errors", "unexpectedSuccesses")),
        "skipped": found.get("skips", 0),
    }


def summary(*texts: str) -> str:
    """`N passed, N failed[, N skipped]`, added up over the trial runs given."""
    total = {"passed": 0, "failed": 0, "skipped": 0}
    for text in texts:
        for key, value in counts(text).items():
            total[key] += value
    line = f"{total['passed']} passed, {total['failed']} failed"
    if total["skipped"]:
        line += f", {total['skipped']} skipped"
    return line


if __name__ == "__main__":
    texts = []
    if len(sys.argv) < 2:
        sys.exit("usage: trial_summary.py TRIAL_OUTPUT...")
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    print(summary(*texts))
