"""A closed-loop `tiersim simulate` that prints its summary imports neither pandas nor matplotlib (issue 11's
cold-start target); reading `SimResult.steps` builds the table on first use, the same each time."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import sys
from tiersim.cli import main
sys.argv = ["tiersim", "simulate", "--batch", "8", "--gen-tokens", "64", "--json", "-"]
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
print("HEAVY", *[m for m in ("pandas", "matplotlib") if m in sys.modules])
"""


def test_closed_loop_simulate_imports_no_pandas(tmp_path):
    env = {**os.environ, "TIERSIM_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True).stdout
    assert out.splitlines()[-1] == "HEAVY"


def test_steps_table_is_built_once_from_its_columns():
    from tiersim import api

    r = api.simulate(batch=8, gen_tokens=64)
    steps = r.steps
    assert steps is r.steps  # built once
    assert list(steps.columns) == list(r.step_columns)
    assert len(steps) == len(r.timeline.step_s)
    assert (steps["copy_method"] == r.summary["copy_method"]).all()
    assert float(steps["h2d_bytes"].mean()) / 1e9 == r.summary["h2d_gb_per_step"]
