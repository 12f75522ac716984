"""The exact recurrence (sim/recurrence.py) against the SimPy engine, the reference model, field by field.

Random plans of every strategy: copy-bound and compute-bound layers, steps with nothing to copy, interference
factors (some 1.0), duplex rates, demotions long enough to span several steps, copies on the compute stream,
depth 1..3; for cpu-attention also promotions, queries and partials sharing the links. Every Timeline field
must agree within 1e-9 relative (an absolute 1e-12 of the run's length where the engine's fluid leaves
rounding-level interference that the recurrence computes as 0).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_engine import plan as hand_plan

from tiersim.sim import SimConfig, engine, recurrence, simulate
from tiersim.sim.engine import StepPlan
from tiersim.strategy import get_strategy

FIELDS = ("start_s", "end_s", "compute_s", "stall_s", "h2d_busy_s", "d2h_busy_s", "host_busy_s", "d2h_done_s",
          "interference_s")
CASES = [("full", False), ("evict-only", False), ("prefetch-sync", False), ("prefetch-layer", False),
         ("prefetch-layer", True), ("cpu-attention", False)]


def random_plan(rng: np.random.Generator, name: str, serial: bool) -> StepPlan:
    """A small plan whose copies are sometimes slower, sometimes faster than compute, sometimes absent."""
    layers, n, depth = int(rng.integers(1, 7)), int(rng.integers(1, 14)), int(rng.integers(1, 4))
    u = lambda lo, hi: rng.uniform(lo, hi, n)  # noqa: E731
    some_zero = lambda a, share: np.where(rng.random(n) < share, 0.0, a)  # noqa: E731
    slow = lambda: np.where(rng.random(n) < 0.3, 1.0, u(0.2, 1.0))  # noqa: E731
    w = u(0.1, 1.0)
    c = some_zero(u(0.1, 1.0) * rng.choice([0.05, 0.5, 1.0, 3.0, 10.0]), 0.2)
    d = some_zero(u(0.1, 1.0) * rng.choice([0.3, 2.0, 10.0]), 0.3)
    zeros = np.zeros(n)
    host = name == "cpu-attention"
    hb = some_zero(u(0.1, 1.0) * rng.choice([0.3, 2.0]), 0.3) if host else zeros
    return StepPlan(
        strategy=get_strategy(name), layers=layers, depth=depth, matmul_s=w * 0.7, attention_s=w * 0.3,
        head_s=u(0.0, 0.5), qkv_share=0.3, h2d_layer_s=c, h2d_layer_duplex_s=c * u(1.0, 2.5),
        h2d_bulk_s=hb, h2d_bulk_duplex_s=hb * u(1.0, 2.5), d2h_bulk_s=d, d2h_bulk_duplex_s=d * u(1.0, 2.5),
        query_d2h_s=some_zero(u(0.01, 0.2), 0.1) if host else zeros,
        host_attention_s=u(0.0, 2.0) * rng.choice([0.1, 1.0, 5.0]) if host else zeros,
        partial_h2d_s=some_zero(u(0.01, 0.2), 0.1) if host else zeros,
        h2d_layer_slow=slow(), h2d_bulk_slow=slow(), d2h_bulk_slow=slow(), serial_copies=serial)


def assert_same(plan: StepPlan) -> tuple[engine.Timeline, engine.Timeline]:
    ref, fast = engine.run(plan), recurrence.run(plan)
    scale = max(1.0, float(ref.end_s.max()))
    for f in FIELDS:
        np.testing.assert_allclose(getattr(fast, f), getattr(ref, f), rtol=1e-9, atol=1e-12 * scale, err_msg=f)
    return ref, fast


@pytest.mark.parametrize(("name", "serial"), CASES)
def test_random_plans_match_the_engine(name, serial):
    rng = np.random.default_rng(sum(map(ord, name)) + serial)
    for _ in range(150):
        assert_same(random_plan(rng, name, serial))


def test_both_regimes_are_jumped_over_and_stay_exact():
    # 48 layers, no demotions: copy-bound steps (copy 3x compute), compute-bound steps (copy 0.3x), nothing-to-copy
    # steps. The recurrence takes a handful of events per step where SimPy takes hundreds.
    n, layers = 30, 48
    w = np.full(n, 1.0)
    c = np.tile([3.0, 0.3, 0.0], n // 3)
    zeros = np.zeros(n)
    for depth in (1, 2, 3):
        p = StepPlan(get_strategy("prefetch-layer"), layers, depth, w * 0.7, w * 0.3, zeros + 0.5, 0.3, c, c * 1.5,
                     zeros, zeros, zeros, zeros, zeros, zeros, zeros, h2d_layer_slow=np.full(n, 0.8))
        ref, fast = assert_same(p)
        assert fast.events <= 10 * n < ref.events / 10
        assert fast.interference_s.max() > 0 and fast.stall_s.max() > 0


@pytest.mark.parametrize("name", ["full", "evict-only", "prefetch-sync", "prefetch-layer", "cpu-attention"])
def test_hand_computed_plans_match(name):
    for depth in (1, 2):
        p = hand_plan(name, depth)
        assert_same(p)
        assert_same(dataclasses.replace(p, serial_copies=name == "prefetch-layer"))
        assert_same(dataclasses.replace(p, d2h_bulk_slow=np.array([0.5, 1.0, 1.0]), h2d_layer_slow=np.full(3, 0.6)))


@pytest.mark.parametrize("name", ["prefetch-layer", "prefetch-sync", "cpu-attention", "full"])
def test_real_plans_match(name):
    # The default model, hardware and trace (cut to 256 steps so SimPy stays quick), every strategy.
    from tiersim.sim.run import simulate_workload
    from tiersim.workload.demand import run_workload

    cfg = SimConfig(model="r1-qwen-14b", hardware="h200-sxm", strategy=name, steps=256)
    r = simulate_workload(cfg, run_workload(cfg, None, 1))
    assert r.summary["timeline_engine"] == "recurrence"
    for depth in (1, 2, 3):
        assert_same(dataclasses.replace(_plan_of(cfg, r), depth=depth))


def _plan_of(cfg: SimConfig, r) -> StepPlan:
    from tiersim.sim.costs import CostModel
    from tiersim.sim.plan import choose_copy, make_plan
    from tiersim.workload.build import block_totals

    cost = CostModel(cfg.model, cfg.hardware, cfg.pinned, cfg.fixed_compute_ms, cfg.weight_bits, share=cfg.share)
    blocks = block_totals(r.workload, cfg.block_size)
    cost = dataclasses.replace(cost, copy=choose_copy(r.workload, cost, cfg, blocks)[0])
    return make_plan(cfg.strategy, r.workload, cost, cfg, blocks)[0]


def test_what_takes_simpy():
    p = hand_plan("prefetch-layer", 1)
    assert recurrence.covers(p) and recurrence.timeline(p).engine == "recurrence"
    bulk = dataclasses.replace(p, h2d_bulk_s=np.array([1.0, 0.0, 0.0]), h2d_bulk_duplex_s=np.array([2.0, 0.0, 0.0]))
    assert not recurrence.covers(bulk) and recurrence.timeline(bulk).engine == "simpy"
    with pytest.raises(ValueError, match="does not cover"):
        recurrence.run(bulk)


def test_the_summary_names_its_engine():
    s = simulate(SimConfig(model="r1-qwen-14b", hardware="h200-sxm", batch=8, steps=64)).summary
    assert s["timeline_engine"] == "recurrence" and s["sim_events"] > 0
