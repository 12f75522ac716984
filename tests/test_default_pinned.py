"""The default simulation (`tiersim simulate` with no options) pinned number by number.

tests/data/default_summary.json is the summary of the default run (R1-Distill-Qwen-14B on an H200 SXM,
batch 256, 4,096 generated tokens, prefetch-layer depth 2, β 0.5, r 0.03, the embedded trace) with
its wall time and the profile's file path left out (fields added to the model or hardware records
later are not pinned; every pinned key must stay). A change to any number is a change of the
model, and has to be made on purpose: regenerate the file and say why.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiersim.sim import SimConfig, simulate

PINNED = Path(__file__).parent / "data" / "default_summary.json"
# Wall time; events the timeline engine took (a cost, not a result: SimPy took 847,059, the recurrence far fewer);
# where the profile lies on this machine.
UNPINNED = {("sim_wall_s",), ("sim_events",), ("config", "hardware", "path")}


@pytest.fixture(scope="module")
def summary() -> dict:
    return simulate(SimConfig(model="r1-qwen-14b", hardware="h200-sxm")).summary


def leaves(d: dict, prefix: tuple = ()) -> dict[tuple, object]:
    """Every non-dict value by its key path."""
    out = {}
    for k, v in d.items():
        out |= leaves(v, (*prefix, k)) if isinstance(v, dict) else {(*prefix, k): v}
    return out


def test_default_summary_is_pinned(summary):
    got = {k: v for k, v in leaves(summary).items() if k not in UNPINNED}
    want = leaves(json.loads(PINNED.read_text()))
    assert not set(want) - set(got), "pinned keys missing from the summary"
    # The model and hardware records may describe more than the run used (new spec fields); nothing else may grow.
    grown = {k for k in set(got) - set(want) if k[:2] not in (("config", "model"), ("config", "hardware"))}
    assert not grown, f"summary keys not pinned: {sorted(grown)}"
    for key, value in want.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-9), key
        else:
            assert got[key] == value, key

