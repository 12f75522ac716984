"""The machine's speed reference: calibrate times the calibrated model's `full` replay every round, the profile keeps
the median, and `validate --suite` times the same replay before and after its configurations (machine_drift)."""

import pytest

from tiersim.calibration.profile import reference_table
from tiersim.validate.suite import machine_drift

REF = {"device": "CPU test", "model": "tiny-ref", "layers": 2, "attention_heads": 4, "kv_heads": 2, "head_dim": 32,
       "hidden": 128, "intermediate": 256, "vocab": 512, "qkv_bias": False, "qk_norm": False, "batch": 2, "steps": 8}


def test_the_profile_keeps_the_median_round_and_the_shape():
    raw = {"reference": {**REF, "rounds": [{"round": r, "step_s": s} for r, s in enumerate((0.010, 0.014, 0.011))]}}
    table = reference_table(raw)["reference"]
    assert table["step_ms"] == pytest.approx(11.0) and (table["min_ms"], table["max_ms"]) == (10.0, 14.0)
    assert table["rounds"] == 3 and table["hidden"] == 128 and "rounds" not in REF
    assert reference_table({}) == {}


def test_drift_compares_the_mean_of_start_and_end_with_the_calibration():
    ref = {**REF, "step_ms": 10.0, "min_ms": 9.5, "max_ms": 10.5}
    reports = [{"predicted_step_ms": 10.0, "measured_step_ms": 11.0}, {"predicted_step_ms": 20.0, "measured_step_ms": 24.0}]
    d = machine_drift(ref, 0.0105, 0.0115, reports)
    assert d["drift_pct"] == pytest.approx(10.0) and d["start_ms"] == pytest.approx(10.5)
    # scaled by the drift, 10 -> 11 (0%) and 20 -> 22 against 24 (-8.3%)
    assert d["drift_adjusted"]["median_abs_pct"] == pytest.approx((0 + 100 * (22 / 24 - 1) * -1) / 2)
    assert d["drift_adjusted"]["worst_abs_pct"] == pytest.approx(100 * (1 - 22 / 24))
    assert machine_drift(None, 0.01, 0.01, reports) is None


def test_the_reference_replay_runs_the_stored_shape():
    pytest.importorskip("torch")
    from tiersim.hw.calibrate import reference_spec, reference_step_s

    spec = reference_spec(REF)
    assert (spec.hidden, spec.layers, spec.vocab) == (128, 2, 512)
    assert 0 < reference_step_s("cpu", REF) < 1.0
