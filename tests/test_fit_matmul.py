"""The fixed cost per GEMM call: recovered with the other constants from synthetic timings, unbiased under noise
(which widens its interval), held under its bound, carried into the cost model and the profile; and the
interleaved rounds' statistics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from testkit import synthetic_timings

from tiersim.calibration.fit import MATMULS_PER_LAYER, fit_compute_shapes, layer_work, matmul_bound_s
from tiersim.hw.timing import Timing, combine_rounds
from tiersim.specs import ModelSpec, hardware_spec

A = ModelSpec("mm-a", layers=2, attention_heads=4, kv_heads=2, head_dim=32, hidden=128, intermediate=256, vocab=512)
B = ModelSpec("mm-b", layers=2, attention_heads=8, kv_heads=2, head_dim=64, hidden=512, intermediate=1536, vocab=2048)
C = ModelSpec("mm-c", layers=2, attention_heads=6, kv_heads=2, head_dim=64, hidden=384, intermediate=1024, vocab=1024)
# bytes/s, FLOP/s, launch s, attention efficiency, roofline overlap, fixed s per GEMM call
TRUTH = (10e9, 0.5e12, 60e-6, 0.5, 0.4, 20e-6)


def timings(model: ModelSpec, truth=TRUTH, noise: float = 0.0, seed: int = 0, reps: int = 1):
    """The cost model's timings at `truth` (testkit.synthetic_timings)."""
    return synthetic_timings(model, truth, noise, seed, reps)


def fit(shapes, **kw):
    return fit_compute_shapes(shapes, launch_max_s=100e-6, attention_efficiency=True, roofline_overlap=True,
                              matmul_max_s=kw.pop("matmul_max_s", 50e-6), **kw)


def test_per_matmul_cost_is_recovered_jointly_with_bandwidth_flop_rate_and_launch():
    f = fit([(A, *timings(A)), (B, *timings(B))])
    assert f.hbm_gbps == pytest.approx(10.0, rel=0.02) and f.tflops == pytest.approx(0.5, rel=0.02)
    assert f.launch_us == pytest.approx(60.0, rel=0.02) and f.matmul_fixed_us == pytest.approx(20.0, rel=0.02)
    assert f.attention_efficiency == pytest.approx(0.5, rel=0.02) and f.roofline_overlap == pytest.approx(0.4, rel=0.02)
    assert f.rms_rel < 1e-3 and f.matmul_fixed_max_us == pytest.approx(50.0)
    # without the term, the same data cannot be fitted as well: the narrow shape's fixed costs go unexplained
    without = fit_compute_shapes([(A, *timings(A)), (B, *timings(B))], 100e-6, True, True)
    assert without.matmul_fixed_us is None and without.rms_rel > 10 * f.rms_rel


def test_per_matmul_cost_is_held_under_its_bound():
    f = fit([(A, *timings(A)), (B, *timings(B))], matmul_max_s=8e-6)
    assert f.matmul_fixed_us <= 8.0 + 1e-9 and f.rms_rel > 1e-3  # the bound costs residual, not a cost the machine lacks
    assert matmul_bound_s([{"median_s": 3e-4}, {"median_s": 1e-4}, {"unavailable": "x"}]) == 1e-4
    assert matmul_bound_s([]) is None


def test_noise_widens_the_per_matmul_interval_and_does_not_bias_it():
    exact = fit([(A, *timings(A)), (B, *timings(B))])
    noisy = [fit([(A, *timings(A, noise=0.05, seed=s, reps=3)), (B, *timings(B, noise=0.05, seed=s + 99, reps=3))])
             for s in range(10)]
    width = lambda f: f.matmul_fixed_us_ci[1] - f.matmul_fixed_us_ci[0]  # noqa: E731
    assert all(width(f) > 20 * max(width(exact), 1e-9) for f in noisy)
    mm = np.array([f.matmul_fixed_us for f in noisy])
    bw = np.array([f.hbm_gbps for f in noisy])
    assert abs(bw.mean() / 10.0 - 1) < 0.02
    # what is left of a bias is smaller than the interval each fit reports (5% noise: about 6% of the truth)
    half = np.mean([width(f) / 2 for f in noisy])
    assert abs(mm.mean() - 20.0) < half and half > 0.05 * 20.0
    covered = sum(f.matmul_fixed_us_ci[0] <= 20.0 <= f.matmul_fixed_us_ci[1] for f in noisy)
    assert covered >= 6  # approximate intervals: the truth inside in most noisy fits


def test_the_cost_model_charges_the_fitted_calls_and_a_held_out_shape_is_predicted():
    from tiersim.calibration.fit import check_shape
    from tiersim.sim.costs import CostModel

    f = fit([(A, *timings(A)), (B, *timings(B))])
    assert check_shape(f, C, *timings(C))["rms_rel"] < 0.02
    bw, fl, launch, eff, overlap, mm = TRUTH
    hw = dataclasses.replace(hardware_spec("h200-sxm"), hbm_gbps_effective=bw / 1e9, bf16_tflops_effective=fl / 1e12,
                             launch_us=launch * 1e6, attention_efficiency=eff, roofline_overlap=overlap,
                             matmul_fixed_us=mm * 1e6)
    cost, tokens, kv = CostModel(C, hw), np.array([16.0]), 16 * 1088
    assert cost.matmul_calls(tokens)[0] == MATMULS_PER_LAYER
    layer = cost.matmul_s(tokens) + cost.attention_s(np.array([kv * C.kv_bytes_per_token_layer]), np.array([kv])) \
        + cost.launch_s
    point = {"tokens": 16, "batch": 16, "kv_tokens": 1088, "median_s": 1.0}
    assert layer[0] == pytest.approx(layer_work(C, [point], []).predict(*TRUTH)[0], rel=1e-9)
    head = layer_work(C, [], [{"tokens": 16, "median_s": 1.0}]).predict(*TRUTH)[0]
    assert cost.head_s(tokens)[0] == pytest.approx(head, rel=1e-9)  # one GEMM call; no step overhead in this profile
    plain = CostModel(C, dataclasses.replace(hw, matmul_fixed_us=None))
    assert cost.matmul_s(tokens)[0] - plain.matmul_s(tokens)[0] == pytest.approx(4 * mm, rel=1e-9)


def test_a_moe_layer_counts_the_experts_a_step_reaches():
    from tiersim.sim.costs import CostModel
    from tiersim.specs import model_spec

    moe = model_spec("qwen3-30b-a3b")
    cost = CostModel(moe, dataclasses.replace(hardware_spec("h200-sxm"), matmul_fixed_us=5.0))
    calls = cost.matmul_calls(np.array([1.0, 4096.0]))
    k, e = moe.moe.experts_per_token, moe.moe.experts
    assert calls[0] == pytest.approx(2 + 2 * k, rel=1e-9)  # one token: its top-k experts
    assert calls[1] == pytest.approx(2 + 2 * e, rel=1e-3)  # a large step reaches every expert


def _timing(median: float, flagged: bool = False) -> Timing:
    return Timing(median, median, median, median * 0.98, median * 1.02, 3, 1, 0.01, median, median, 0, flagged,
                  "CV 0.2 above the limit" if flagged else "")


def test_rounds_take_the_median_of_medians_and_flag_drift_across_rounds():
    steady = combine_rounds([_timing(1.00e-3), _timing(1.02e-3), _timing(0.99e-3)])
    assert steady["median_s"] == pytest.approx(1.00e-3) and not steady["flagged"]
    assert steady["rounds"] == [0.001, 0.00102, 0.00099] and steady["cv"] < 0.02
    assert steady["ci_low_s"] == pytest.approx(0.99e-3) and steady["ci_high_s"] == pytest.approx(1.02e-3)
    drift = combine_rounds([_timing(1.0e-3), _timing(1.4e-3), _timing(1.05e-3)])
    assert drift["median_s"] == pytest.approx(1.05e-3) and drift["flagged"] and "across 3 rounds" in drift["reason"]
    noisy = combine_rounds([_timing(1e-3, True), _timing(1e-3, True), _timing(1e-3)])
    assert noisy["flagged"] and "2 of 3 rounds flagged" in noisy["reason"]


def test_interleaved_rounds_measure_every_shape_in_every_round_on_cpu():
    pytest.importorskip("torch")
    import torch

    from tiersim.calibration.profile import narrow_gemms
    from tiersim.hw.compute_rounds import interleaved
    from tiersim.hw.streams import cpu_threads

    with cpu_threads(1):
        got = interleaved(torch.device("cpu"), [A, C], [(1, 1, 64), (4, 4, 192), (32, 1, 0)], (1, 4), rounds=2,
                          repeats=3)
    assert set(got) == {"mm-a", "mm-c"}
    for shape in got.values():
        assert [(p["tokens"], p["batch"], p["kv_tokens"]) for p in shape["layers"]] == [(1, 1, 64), (4, 4, 192), (32, 1, 0)]
        assert [p["tokens"] for p in shape["head"]] == [1, 4]
        for p in shape["layers"] + shape["head"] + shape["narrow_gemms"]:
            assert len(p["rounds"]) == 2 and p["median_s"] == pytest.approx(float(np.median(p["rounds"])), rel=1e-4)
            assert min(p["rounds"]) - 1e-9 <= p["median_s"] <= max(p["rounds"]) + 1e-9 and p["cv"] >= 0
        assert [g["gemm"] for g in shape["narrow_gemms"]] == ["qkv", "o", "gate_up", "down"]
    raw = {"shapes": [{"role": "fitted", **got["mm-a"]}, {"role": "held_out", **got["mm-c"]}]}
    assert len(narrow_gemms(raw)) == 4 and len(narrow_gemms(raw, "held_out")) == 4
    assert matmul_bound_s(narrow_gemms(raw)) == min(min(p["rounds"]) for p in got["mm-a"]["narrow_gemms"])
