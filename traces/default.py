"""The trace shipped with tiersim: SmolLM2-135M-Instruct on grade-school math (see traces/data/README.md)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from tiersim.errors import TraceError

DEFAULT_TRACE = "default.tstrace"


def default_trace_path() -> Path:
    """Path of the embedded default trace (package data), the one `simulate` uses when none is given."""
    path = Path(str(importlib.resources.files("tiersim.traces") / "data" / DEFAULT_TRACE))
    if not path.is_file():
        raise TraceError(f"{path}: the embedded default trace is missing; reinstall tiersim")
    return path
