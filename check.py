"""One helper for the checks every config repeats: integers that are not bools, numbers in a range.

Each raises `ConfigError` naming the field; the CLI turns the field into its flag (`gen_tokens` →
`--gen-tokens`), so the same check gives a good message in Python and on the command line.
"""

from __future__ import annotations

import math

from tiersim.errors import ConfigError

__all__ = ["ConfigError", "choice", "integer", "number"]


def integer(name: str, value: object, low: int | None = None, high: int | None = None, *, optional: bool = False) -> None:
    """`value` is an int (not a bool) within [low, high]; None passes when `optional`."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low) or (
            high is not None and value > high):
        raise ConfigError(name, f"{name} must be an integer{_range(low, high)}, got {value!r}")


def number(name: str, value: object, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, optional: bool = False) -> None:
    """`value` is a finite real number within the range (ends open or closed as asked); None passes when `optional`."""
    if value is None and optional:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ConfigError(name, f"{name} must be a number{_range(low, high, low_open, high_open)}, got {value!r}")


def choice(name: str, value: object, accepted) -> None:
    """`value` is one of `accepted`."""
    if value not in accepted:
        raise ConfigError(name, f"{name} {value!r} unknown; accepted: {', '.join(map(str, accepted))}")


def _range(low, high, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""
