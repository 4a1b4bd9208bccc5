"""
Regenerate env.example and the README's configuration table from
happyrobot.config.SETTINGS, so that the documentation cannot drift from the
code (tests/test_docs.py checks both).  Run from the checkout:

    python scripts/gen_settings_docs.py
"""

from __future__ import annotations

import sys

HEADER = """\
# Happy Robot real-time server: every setting, with its default.
# Copy to .env (read from the working directory, or the file named by
# --env-file).  Precedence: command-line flag > process environment > .env > default.
# An empty value counts as unset: the default applies.  Copied unchanged,
# this file changes nothing: the settings whose default is fitted to another
# setting are commented out.
"""
TABLE_MARK = "<!-- The table below is generated from happyrobot/config.py SETTINGS. -->"


def render_env_example() -> str:
    """The text of env.example."""
    from happyrobot.config import FITTED, SETTINGS

    blocks = [HEADER]
    for s in SETTINGS:
        if s.env in FITTED:
            # Written out, even as the default, it would be checked instead of fitted.
            fit, check = FITTED[s.env]
            blocks.append(f"# {s.help}\n# Commented out: unset, it is {s.default} or {fit}; "
                          f"a value given here {check}.\n# {s.env}=\n")
        else:
            blocks.append(f"# {s.help}\n{s.env}={s.default}\n")
    return "\n".join(blocks)


def render_table() -> str:
    """The README's configuration table, marker included."""
    from happyrobot.config import SETTINGS

    rows = [TABLE_MARK, "| variable | flag | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        flag = f"`--{s.option}`" if s.option == "conformance-echo" else f"`--{s.option}=`"
        default = f"`{s.default}`" if s.default else "*(empty)*"
        rows.append(f"| `{s.env}` | {flag} | {default} | {s.help.replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"


def replace_table(readme: str) -> str:
    """C{readme} with its generated table (marker to the first blank line) rewritten."""
    start = readme.index(TABLE_MARK)
    end = readme.index("\n\n", start) + 1
    return readme[:start] + render_table() + readme[end:]


if __name__ == "__main__":
    sys.path.insert(0, ".")
    with open("env.example", "w", encoding="utf-8") as f:
        f.write(render_env_example())
    with open("README.md", encoding="utf-8") as f:
        readme = f.read()
    with open("README.md", "w", encoding="utf-8") as f:
        f.write(replace_table(readme))
