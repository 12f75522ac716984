"""Hybrid sliding-window models in the simulator: a timeline per layer kind (StepPlan.layer_kinds).

Full-attention layers copy their DDR-tier KV (layers / full_layers x the mean layer's copy), sliding layers copy
nothing and attend their window; the totals per step are the mean layer's, only the overlap changes. Checked: a
3-layer, 2-step timeline by hand; the recurrence against SimPy on random patterned plans, field by field; make_plan
on gemma-3-270m (its captured trace) and gpt-oss-20b, where a full layer's copy is longer than `depth` layers of
compute and stalls the per-kind timeline but not the mean layer's; a dense model keeps its mean layer.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_recurrence import CASES, FIELDS, assert_same, random_plan

from tiersim.sim import SimConfig, engine, recurrence
from tiersim.sim.costs import CostModel
from tiersim.sim.engine import StepPlan
from tiersim.sim.plan import bound_s, choose_copy, make_plan
from tiersim.specs.families import SLIDING
from tiersim.strategy import get_strategy
from tiersim.workload.build import block_totals
from tiersim.workload.demand import run_workload

GEMMA_TRACE = "traces/data/gemma3-270m-gsm4-256.tstrace"
MEAN_ONLY = dict(layer_kinds=None, kind_attention_s=None, kind_h2d_layer_s=None, kind_h2d_layer_duplex_s=None)


def hand_plan(kinds: tuple[int, ...] | None) -> StepPlan:
    """3 layers (full, sliding, sliding), 2 steps, depth 1: every layer computes 1 s; the full layer copies 2.5 s.
    Without kinds: the mean layer, 1 s of compute and 2.5 / 3 s of copy."""
    a = lambda *v: np.array(v, dtype=np.float64)  # noqa: E731
    zeros = a(0.0, 0.0)
    mean_copy = a(2.5, 2.5) / 3
    extra = {} if kinds is None else dict(
        layer_kinds=kinds, kind_attention_s=np.full((2, 2), 0.25),
        kind_h2d_layer_s=np.stack([3 * mean_copy, zeros]), kind_h2d_layer_duplex_s=np.stack([6 * mean_copy, zeros]))
    return StepPlan(
        strategy=get_strategy("prefetch-layer"), layers=3, depth=1, matmul_s=a(0.75, 0.75), attention_s=a(0.25, 0.25),
        head_s=zeros, qkv_share=0.25, h2d_layer_s=mean_copy, h2d_layer_duplex_s=2 * mean_copy,
        h2d_bulk_s=zeros, h2d_bulk_duplex_s=zeros, d2h_bulk_s=zeros, d2h_bulk_duplex_s=zeros,
        query_d2h_s=zeros, host_attention_s=zeros, partial_h2d_s=zeros, **extra)


def test_a_full_layers_copy_longer_than_depth_layers_stalls_by_hand():
    # depth 1: 2 staging buffers; the copy of layer l waits until layer l - 1 computed (module test_engine's rule).
    # t     compute                                   H2D copy stream
    # 0     layer 0 (full) waits                      layer 0: 0 -> 2.5; layers 1 (sliding) passes at 2.5
    # 2.5   layer 0 runs -> 3.5 (stall 2.5)
    # 3.5   layer 1 -> 4.5, layer 2 -> 5.5            layer 2 passes at 3.5 (layer 0 computed)
    # 4.5                                             layer 3 (step 1, full): 4.5 -> 7.0 (layer 1 computed)
    # 5.5   step 0 ends; layer 3 waits
    # 7.0   layer 3 -> 8, layers 4, 5 -> 10 (stall 1.5); layer 4 passes at 7, layer 5 at 8
    p = hand_plan((0, 1, 1))
    for tl in (engine.run(p), recurrence.run(p)):
        np.testing.assert_allclose(tl.end_s, [5.5, 10.0], rtol=1e-12)
        np.testing.assert_allclose(tl.stall_s, [2.5, 1.5], rtol=1e-12)
        np.testing.assert_allclose(tl.h2d_busy_s, [2.5, 2.5], rtol=1e-12)
        np.testing.assert_allclose(tl.compute_s, [3.0, 3.0], rtol=1e-12)
    # The mean layer hides its 0.83 s copy under each 1 s layer: only the first copy stalls.
    mean = engine.run(hand_plan(None))
    np.testing.assert_allclose(mean.end_s, [2.5 / 3 + 3, 2.5 / 3 + 6], rtol=1e-12)
    assert mean.stall_s.sum() == pytest.approx(2.5 / 3, rel=1e-12)


def random_patterned_plan(rng: np.random.Generator, name: str, serial: bool) -> StepPlan:
    """test_recurrence's random plan with a random pattern of two kinds: each its own attention and copy (the
    second kind's copy often zero, as a sliding layer's)."""
    p = random_plan(rng, name, serial)
    n = p.steps
    kinds = tuple(int(k) for k in rng.integers(0, 2, p.layers))
    attention = rng.uniform(0.0, 0.6, (2, n))
    copy = p.h2d_layer_s * rng.choice([0.5, 1.0, 3.0, 6.0])
    second = copy * rng.uniform(0.0, 1.0, n) if rng.random() < 0.3 else np.zeros(n)
    copies = np.stack([copy, second])
    return dataclasses.replace(p, layer_kinds=kinds, kind_attention_s=attention, kind_h2d_layer_s=copies,
                               kind_h2d_layer_duplex_s=copies * rng.uniform(1.0, 2.5, (2, n)))


@pytest.mark.parametrize(("name", "serial"), CASES)
def test_random_patterned_plans_match_the_engine(name, serial):
    rng = np.random.default_rng(1000 + sum(map(ord, name)) + serial)
    for _ in range(100):
        p = random_patterned_plan(rng, name, serial)
        if not recurrence.covers(p):  # a hybrid plan's cpu-attention is SimPy's
            assert name == "cpu-attention" and recurrence.timeline(p).engine == "simpy"
            continue
        assert_same(p)


def test_one_kind_is_the_mean_layer():
    # A pattern whose every layer is the mean layer gives the unpatterned timeline, in both engines.
    rng = np.random.default_rng(7)
    for name, serial in CASES:
        p = random_plan(rng, name, serial)
        one = dataclasses.replace(p, layer_kinds=(0,) * p.layers, kind_attention_s=p.attention_s[None],
                                  kind_h2d_layer_s=p.h2d_layer_s[None], kind_h2d_layer_duplex_s=p.h2d_layer_duplex_s[None])
        a, b = engine.run(p), engine.run(one)
        for f in FIELDS:
            np.testing.assert_allclose(getattr(b, f), getattr(a, f), rtol=1e-12, atol=1e-15, err_msg=f)


def test_a_pattern_must_fit_the_plan():
    p = hand_plan((0, 1, 1))
    with pytest.raises(ValueError, match="layer_kinds has 2 entries for 3 layers"):
        dataclasses.replace(p, layer_kinds=(0, 1))
    with pytest.raises(ValueError, match="kind_h2d_layer_s must have a row per kind"):
        dataclasses.replace(p, kind_h2d_layer_s=p.kind_h2d_layer_s[:1])


def real_plan(model: str, **kw) -> StepPlan:
    """make_plan's plan for a prefetch-layer run of `model` on the H200 (its copy method chosen as the run does)."""
    cfg = SimConfig(model=model, hardware="h200-sxm", strategy="prefetch-layer", steps=128, **kw)
    w = run_workload(cfg, None, 1)
    cost = CostModel(cfg.model, cfg.hardware, cfg.pinned, cfg.fixed_compute_ms, cfg.weight_bits, share=cfg.share)
    blocks = block_totals(w, cfg.block_size)
    cost = dataclasses.replace(cost, copy=choose_copy(w, cost, cfg, blocks)[0])
    return make_plan(cfg.strategy, w, cost, cfg, blocks)[0]


@pytest.mark.parametrize(("model", "kw"), [("gemma-3-270m", {"trace": GEMMA_TRACE, "batch": 8, "depth": 2}),
                                           ("gpt-oss-20b", {"batch": 8, "depth": 1})])
def test_hybrid_plans_keep_the_totals_and_stall_per_kind(model, kw):
    p = real_plan(model, **kw)
    spec = SimConfig(model=model, hardware="h200-sxm").model
    assert p.layer_kinds == tuple(int(t == SLIDING) for t in spec.layer_types)
    counts = np.bincount(p.layer_kinds, minlength=2)[:, None]
    # Summed over the layers, each kind's attention and copy are the mean layer's totals.
    np.testing.assert_allclose((counts * p.kind_attention_s).sum(axis=0), p.layers * p.attention_s, rtol=1e-12)
    np.testing.assert_allclose((counts * p.kind_h2d_layer_s).sum(axis=0), p.layers * p.h2d_layer_s, rtol=1e-12)
    np.testing.assert_allclose(p.step_compute_s, p.layers * p.layer_s + p.head_s, rtol=1e-12)
    assert np.all(p.kind_h2d_layer_s[1] == 0) and np.all(p.kind_h2d_layer_s[0] > 0)
    per_kind, mean = recurrence.timeline(p), recurrence.timeline(dataclasses.replace(p, **MEAN_ONLY))
    assert per_kind.engine == "recurrence"
    np.testing.assert_allclose(per_kind.compute_s, mean.compute_s, rtol=1e-12)
    np.testing.assert_allclose(per_kind.h2d_busy_s.sum(), mean.h2d_busy_s.sum(), rtol=1e-9)
    # A full layer's copy outlasts `depth` layers of compute: the stalls the mean layer spreads away appear.
    assert per_kind.stall_s.sum() > 1.1 * mean.stall_s.sum()
    assert per_kind.step_s.mean() > 1.05 * mean.step_s.mean()
    assert np.all(per_kind.step_s >= bound_s(p) * (1 - 1e-9))


def test_hybrid_real_plan_matches_simpy():
    # gemma-3-270m's plan cut to its first 32 steps (SimPy walks every layer): the recurrence equals the engine.
    p = real_plan("gemma-3-270m", trace=GEMMA_TRACE, batch=8, depth=2)
    cut = {f.name: getattr(p, f.name)[..., :32] for f in dataclasses.fields(p)
           if isinstance(getattr(p, f.name), np.ndarray)}
    assert_same(dataclasses.replace(p, **cut))


def test_dense_models_keep_the_mean_layer():
    p = real_plan("r1-qwen-14b", batch=8)
    assert p.layer_kinds is None and p.kind_attention_s is None
    # Hybrid models keep the mean layer where the per-kind split changes no timeline (nothing copies per layer).
    assert real_plan("gpt-oss-20b", batch=8).layer_kinds is not None
    cfg = SimConfig(model="gpt-oss-20b", hardware="h200-sxm", strategy="prefetch-sync", steps=16, batch=8)
    w = run_workload(cfg, None, 1)
    cost = CostModel(cfg.model, cfg.hardware, share=cfg.share)
    assert make_plan(cfg.strategy, w, cost, cfg)[0].layer_kinds is None
