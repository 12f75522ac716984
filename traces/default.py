"""The traces shipped with tiersim: SmolLM2-135M-Instruct on grade-school math (see traces/data/README.md).

`default.tstrace` (2 requests x 4,096 generated tokens) is what `simulate` uses when no trace is given, so
the default run replays captured attention rows; `gsm16-512.tstrace` (16 requests x 512 tokens) is the
smaller, more varied capture the tests and quick checks use.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from tiersim.errors import TraceError

DEFAULT_TRACE = "default.tstrace"
SMALL_TRACE = "gsm16-512.tstrace"


def _shipped(name: str) -> Path:
    path = Path(str(importlib.resources.files("tiersim.traces") / "data" / name))
    if not path.is_file():
        raise TraceError(f"{path}: the embedded trace {name} is missing; reinstall tiersim")
    return path


def default_trace_path() -> Path:
    """Path of the embedded default trace (package data), the one `simulate` uses when none is given."""
    return _shipped(DEFAULT_TRACE)


def small_trace_path() -> Path:
    """Path of the embedded 16-request x 512-token capture (package data)."""
    return _shipped(SMALL_TRACE)
