"""Kconfig fragments: parse them, merge them over a .config, and check that they took effect.

A fragment uses the .config syntax: `CONFIG_NAME=value` sets a symbol and
`# CONFIG_NAME is not set` disables it; other `#` lines and blank lines are comments.
`make olddefconfig` can drop a setting whose dependencies are unmet, which is why the
builder calls `unmet_settings` on the final .config.
"""

import re
from typing import Final

# A symbol's value, or None for "is not set".
Settings = dict[str, str | None]

_ASSIGNMENT: Final = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_NOT_SET: Final = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse_config(text: str) -> Settings:
    """Parse .config or fragment text into {symbol: value or None}; the last line wins.

    Raise ValueError naming the line for a line that is neither a setting nor a comment.
    """
    settings: Settings = {}
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        assignment = _ASSIGNMENT.match(line)
        not_set = _NOT_SET.match(line)
        if assignment:
            settings[assignment.group(1)] = assignment.group(2)
        elif not_set:
            settings[not_set.group(1)] = None
        elif line and not line.startswith("#"):
            raise ValueError(f"line {number} is not a Kconfig setting or comment: {raw_line!r}")
    return settings


def merge_config(base_text: str, fragment: Settings) -> str:
    """Return `base_text` with every symbol of `fragment` replaced by the fragment's setting."""
    remaining: list[str] = []
    for line in base_text.splitlines():
        symbol = _line_symbol(line.strip())
        if symbol is None or symbol not in fragment:
            remaining.append(line)
    for symbol, value in fragment.items():
        remaining.append(f"# {symbol} is not set" if value is None else f"{symbol}={value}")
    return "\n".join(remaining) + "\n"


def unmet_settings(fragment: Settings, config_text: str) -> list[str]:
    """List the fragment settings the final .config does not carry, as readable lines.

    `CONFIG_X=v` needs that exact line; `# CONFIG_X is not set` accepts X unset or absent
    (a symbol whose dependencies are unmet does not appear in .config).
    """
    final = parse_config(config_text)
    unmet: list[str] = []
    for symbol, expected in fragment.items():
        actual = final.get(symbol)
        if actual == expected:
            continue
        if expected is None:
            unmet.append(f"{symbol} should be unset but is {actual}")
        else:
            actual_text = "unset" if actual is None else actual
            unmet.append(f"{symbol}={expected} requested but is {actual_text}")
    return unmet


def _line_symbol(line: str) -> str | None:
    match = _ASSIGNMENT.match(line) or _NOT_SET.match(line)
    return match.group(1) if match else None
