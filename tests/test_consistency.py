"""The parts agree with each other: the simulator and the replay tier by the same unit and copy the same pieces, and
a served step costs what the closed-loop plan charges the same batch — on MoE, MLA and sliding-window models under
tensor parallelism, for every strategy and copy path."""

from __future__ import annotations

import numpy as np
import pytest

from tiersim.hw.config import ReplayConfig
from tiersim.hw.plan import plan_replay
from tiersim.policy import PolicyConfig
from tiersim.sim import SimConfig
from tiersim.sim.copies import get_copy_method
from tiersim.sim.costs import CostModel
from tiersim.sim.plan import bound_s, make_plan
from tiersim.sim.step_time import CostStepTime, StepBatch
from tiersim.specs import ModelSpec
from tiersim.strategy import STRATEGIES
from tiersim.traces.format import read_trace
from tiersim.traces.synth import SynthParams, write_synth_trace
from tiersim.workload.build import BCOL, BLOCK_COLUMNS, COL, COLUMNS, Workload, build_workload
from tiersim.workload.demand import continuation_params

TINY = ModelSpec("tiny-consistency", layers=2, attention_heads=4, kv_heads=2, head_dim=16, hidden=64, intermediate=128,
                 vocab=256)
BLOCK = 16
KNOBS = dict(hbm_ratio=0.4, evict_ratio=0.1, window=16, interval=8)


# -- the tiering unit and the pieces: simulator vs replay ------------------------------------------------------------
@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("consistency") / "t.tstrace"
    write_synth_trace(path, SynthParams(), 3, 20, 200, seed=4)
    return path


@pytest.mark.parametrize("page_size, unit", [(None, BLOCK), (1, 1)])  # the default; --page-size 1 --block-size 16
def test_simulator_and_replay_tier_by_the_same_unit_and_copy_the_same_pieces(trace_path, page_size, unit):
    policy = PolicyConfig(page_size=page_size, **KNOBS)
    run = dict(model=TINY, policy=policy, strategy="prefetch-sync", batch=3, gen_tokens=200, steps=240,
               cold_start=True, block_size=BLOCK)
    sim = SimConfig(hardware="h200-sxm", copy_method="dma", **run)
    rep = ReplayConfig(chunk_tokens=BLOCK, warmup_steps=0, **run)
    assert sim.policy == rep.policy and sim.policy.page_size == unit
    tr = read_trace(trace_path)
    w = build_workload(tr, sim.policy, sim.gen_tokens, sim.batch, sim.decode_steps, sim.seed, sim.cold_start,
                       continuation_params(tr), workers=1)
    plan, _, _ = make_plan(sim.strategy, w, CostModel(TINY, sim.hardware, share=sim.share,
                                                      copy=get_copy_method("dma")), sim)
    steps = plan_replay(rep, w).steps
    # The replay counts pieces per layer for K; the simulator every layer's K and V.
    per_step = 2 * TINY.layers
    staged = per_step * np.array([s.staged_pieces + s.promote_pieces for s in steps])
    demoted = per_step * np.array([s.demote_pieces for s in steps])
    np.testing.assert_array_equal(plan.h2d_pieces, staged)
    # Demotions decided at the end of step k: the simulator books them to step k, the replay copies them in step k+1.
    np.testing.assert_array_equal(plan.d2h_pieces[:-1], demoted[1:])
    assert staged.sum() > 0 and demoted.sum() > 0
    whole = [bool((s.staged_set.pieces[:, 1] == BLOCK).all()) for s in steps if s.staged_set is not None]
    # Pages of a block move whole blocks; single tokens inside 16-token blocks make partial pieces.
    assert all(whole) if unit == BLOCK else not all(whole)


def test_the_prototype_tiers_tokens_and_a_given_page_is_kept():
    proto = PolicyConfig(eviction="prototype", page_size=None)
    assert SimConfig(model=TINY, hardware="h200-sxm", policy=proto).policy.page_size == 1
    assert ReplayConfig(model=TINY, policy=proto, strategy="prefetch-sync", block_size=BLOCK,
                        chunk_tokens=BLOCK).policy.page_size == 1
    assert SimConfig(model=TINY, hardware="h200-sxm", policy=PolicyConfig(page_size=32)).policy.page_size == 32
    assert PolicyConfig().unit == 1 and PolicyConfig(page_size=8).unit == 8  # a standalone policy: per token


# -- a served step vs the closed-loop plan -----------------------------------------------------------------------------
DECODES, CONTEXT, DDR, EVICTED, PROMPT = 64, 3000, 1024, 96, 700


def batch_workload() -> tuple[Workload, np.ndarray]:
    """One step: 64 decodes of 3,000 positions (1,024 in DDR in whole blocks, 96 evicted) and a 700-token prefill,
    one slot each; and its block totals."""
    tables = np.zeros((DECODES + 1, 1, len(COLUMNS)))
    d = tables[:DECODES, 0]
    d[:, COL["tokens"]], d[:, COL["ddr"]], d[:, COL["evicted"]] = CONTEXT, DDR, EVICTED
    d[:, COL["hbm"]], d[:, COL["decode"]] = CONTEXT - DDR - EVICTED, 1
    p = tables[DECODES, 0]
    p[COL["tokens"]] = p[COL["hbm"]] = p[COL["prefill_tokens"]] = PROMPT
    p[COL["prefill_pairs"]], p[COL["prefill"]] = PROMPT * (PROMPT + 1), 1
    totals = tables.sum(axis=0)
    w = Workload(tables, totals, np.arange(DECODES + 1)[:, None], (), 0, 0, DECODES + 1, 0)
    blocks = np.zeros((1, len(BLOCK_COLUMNS)))
    blocks[0, BCOL["ddr_runs"]] = blocks[0, BCOL["ddr_full_blocks"]] = DECODES * DDR / BLOCK
    return w, blocks


@pytest.mark.parametrize("model, tp", [("qwen3-30b-a3b", 2), ("gpt-oss-120b", 2), ("deepseek-r1", 8),
                                       ("r1-qwen-7b", 1)])
@pytest.mark.parametrize("pinned", [True, False])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_a_served_step_costs_what_make_plan_charges(model, tp, pinned, strategy):
    cfg = SimConfig(model=model, hardware="h200-sxm", tp=tp, strategy=strategy, pinned=pinned, block_size=BLOCK)
    copy = get_copy_method("dma" if pinned else "pageable", pinned)
    cost = CostModel(cfg.model, cfg.hardware, pinned, share=cfg.share, copy=copy)
    w, blocks = batch_workload()
    plan, _, _ = make_plan(strategy, w, cost, cfg, blocks)
    tiered = STRATEGIES[strategy].applies_policy  # `full` is served without a split: no DDR tier, nothing evicted
    batch = StepBatch(decode_seqs=DECODES, decode_context_tokens=DECODES * CONTEXT,
                      decode_ddr_tokens=DECODES * DDR * tiered, decode_evicted_tokens=DECODES * EVICTED * tiered,
                      prefill_seqs=1, prefill_tokens=PROMPT, prefill_pairs=PROMPT * (PROMPT + 1) / 2)
    step = CostStepTime(cost, strategy, BLOCK)
    assert step(batch) == pytest.approx(float(bound_s(plan)[0]), rel=1e-12)
    if strategy == "full":  # the compute alone: the plan's layers and head
        assert step.compute_s(batch) == pytest.approx(float(plan.layers * plan.layer_s[0] + plan.head_s[0]), rel=1e-12)


def test_given_runs_price_partial_pieces_as_make_plan_does():
    """Per-token tiering: the scheduler's exact runs (some partial blocks) give make_plan's fetch."""
    cfg = SimConfig(model="qwen3-30b-a3b", hardware="h200-sxm", tp=2, strategy="prefetch-sync", block_size=BLOCK,
                    policy=PolicyConfig(page_size=1))
    cost = CostModel(cfg.model, cfg.hardware, share=cfg.share, copy=get_copy_method("dma"))
    w, blocks = batch_workload()
    runs, full = 5000.0, 3000.0
    blocks[0, BCOL["ddr_runs"]], blocks[0, BCOL["ddr_full_blocks"]] = runs, full
    plan, _, _ = make_plan("prefetch-sync", w, cost, cfg, blocks)
    batch = StepBatch(decode_seqs=DECODES, decode_context_tokens=DECODES * CONTEXT, decode_ddr_tokens=DECODES * DDR,
                      decode_evicted_tokens=DECODES * EVICTED, prefill_seqs=1, prefill_tokens=PROMPT,
                      prefill_pairs=PROMPT * (PROMPT + 1) / 2, decode_ddr_runs=runs, decode_ddr_full_blocks=full)
    step = CostStepTime(cost, "prefetch-sync", BLOCK, page_size=1)
    assert step(batch) == pytest.approx(float(bound_s(plan)[0]), rel=1e-12)
    # Without them, one run per DDR token: an upper bound.
    estimate = StepBatch(**{**{f: getattr(batch, f) for f in StepBatch.__dataclass_fields__},
                            "decode_ddr_runs": None, "decode_ddr_full_blocks": None})
    assert step(estimate) > step(batch)
