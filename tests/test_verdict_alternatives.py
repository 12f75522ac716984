"""The verdict's alternatives (a larger β, cpu-attention, another block size beside evict-only and max batch), and a
maximum sustainable rate that never counts a run whose goodput is still unknown as a pass."""

from __future__ import annotations

import pytest

from tiersim.policy import PolicyConfig
from tiersim.sim import SimConfig, simulate
from tiersim.sim.blocks import KVCapacity
from tiersim.sim.scheduler import SchedulerConfig
from tiersim.sim.serving import SLO, known_by_s, max_sustainable_rate, serve
from tiersim.sim.verdict import CUT_STEPS, alternative_configs, larger_beta, other_block
from tiersim.specs import hardware_spec, model_spec
from tiersim.traces.default import small_trace_path
from tiersim.workload.arrivals import poisson_requests


def config(**kw) -> SimConfig:
    base = dict(model=model_spec("r1-qwen-7b"), hardware=hardware_spec("h200-sxm"), trace=small_trace_path(),
                batch=300, gen_tokens=512, steps=300)
    return SimConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def compared() -> dict:
    return simulate(config(), workers=1, compare=True).summary


def test_the_alternatives_are_measured_and_the_best_is_named(compared):
    s = compared
    alts = {a["label"]: a for a in s["alternatives"]}
    assert list(alts) == ["evict-only at batch 300", "cpu-attention at batch 300", "prefetch-layer at β=0.625, batch 300",
                          "prefetch-layer with 32-token blocks at batch 300"]
    assert all(a["steps"] == CUT_STEPS and a["batch"] == 300 for a in alts.values())
    assert alts["prefetch-layer at β=0.625, batch 300"]["hbm_ratio"] == 0.625
    assert alts["prefetch-layer with 32-token blocks at batch 300"]["block_size"] == 32
    # Every run is in the verdict, and the best that fits is the one named.
    v = s["verdict"]
    runs = [*alts.values(), *([s["at_max_batch"]] if s["at_max_batch"] else [])]
    assert all(a["label"] in v for a in runs)
    full = s["baseline"]
    best = max((r for r in [full, *runs] if r["fits"]), key=lambda r: r["throughput_tok_s"])
    if best is full:
        assert "None of the other runs (256-step runs) serves more" in v
    else:
        assert f"The best alternative measured (256-step runs) is {best['label']}: " \
               f"{best['throughput_tok_s']:,.0f} tokens/s" in v


def test_a_larger_beta_takes_less_of_the_ddr_tier(compared):
    """More of the cache in HBM: fewer DDR-tier tokens to copy, so a prefetch-layer step is no slower."""
    alts = {(a["hbm_ratio"], a["block_size"]): a for a in compared["alternatives"] if a["strategy"] == "prefetch-layer"}
    at_max = compared["at_max_batch"]
    assert alts[(0.625, 16)]["hbm_peak_gb"] > 0 and alts[(0.625, 16)]["step_ms"] <= compared["step_ms_mean"] * 1.001
    assert at_max is None or at_max["strategy"] == "prefetch-layer"


def test_larger_beta_walks_the_eighths_grid():
    assert larger_beta(0.5) == 0.625 and larger_beta(0.33) == 0.375 and larger_beta(0.0) == 0.125
    assert larger_beta(0.875) == 1.0 and larger_beta(1.0) is None


def test_other_block_keeps_the_tiering_unit():
    larger = other_block(config())
    assert larger.block_size == 32 and larger.policy.page_size == 16  # the run's schedules, no replay
    own = other_block(config(policy=PolicyConfig(page_size=8)))
    assert own.block_size == 32 and own.policy.page_size == 8
    assert other_block(config(block_size=48, policy=PolicyConfig(page_size=48))).block_size == 96
    assert other_block(config(block_size=16, policy=PolicyConfig(page_size=48))) is None  # 32 and 48 do not nest


def test_which_alternatives_each_strategy_gets():
    names = lambda cfg: [(c.strategy, c.policy.hbm_ratio, c.block_size) for _, c in alternative_configs(cfg)]  # noqa: E731
    assert names(config(strategy="full")) == [("prefetch-layer", 0.5, 16), ("evict-only", 0.5, 16),
                                              ("cpu-attention", 0.5, 16)]
    assert names(config(strategy="cpu-attention")) == [("evict-only", 0.5, 16), ("cpu-attention", 0.625, 16),
                                                       ("cpu-attention", 0.5, 32)]
    at_one = config(strategy="evict-only", policy=PolicyConfig(hbm_ratio=1.0))
    assert names(at_one) == [("prefetch-layer", 1.0, 16), ("cpu-attention", 1.0, 16), ("evict-only", 1.0, 32)]


# -- the maximum sustainable rate ---------------------------------------------------------------------------------
def test_unknown_goodput_is_not_a_pass():
    """1 s steps, 100-token outputs, a 0.5 s TPOT target: every request misses it, but at the end of a 10 s window
    none has finished or is yet certain to miss. The search serves on until every outcome is known: no rate passes."""
    search = max_sustainable_rate(lambda b: 1.0, KVCapacity(16, 10**6), SLO(3000, 500), duration_s=10.0,
                                  prompt_tokens=8, output_tokens=100, max_trials=4)
    assert search.rate == 0.0 and all(share == 0.0 for _, share in search.trials)


def test_every_outcome_is_known_by_the_horizon():
    reqs = poisson_requests(2.0, duration_s=10.0, prompt_tokens=8, output_tokens=[20, 60, 100], seed=3)
    slo = SLO(3000, 500)
    horizon = known_by_s(reqs, slo)
    assert horizon == pytest.approx(max(r.arrival_s for r in reqs) + 3.0 + 0.5 * 100)
    m = serve(reqs, lambda b: 0.8, KVCapacity(16, 10**6), SchedulerConfig(max_num_seqs=4), until_s=horizon,
              slo=slo).metrics
    assert m["slo_known"] == m["requests_arrived"] == len(reqs)
    window = serve(reqs, lambda b: 0.8, KVCapacity(16, 10**6), SchedulerConfig(max_num_seqs=4), until_s=10.0,
                   slo=slo).metrics
    assert window["slo_known"] < window["requests_arrived"]  # the window alone leaves outcomes open


def test_a_met_target_still_passes():
    """The same runs with a 1.5 s TPOT target: every request meets it once finished, so every rate tried passes."""
    search = max_sustainable_rate(lambda b: 1.0, KVCapacity(16, 10**6), SLO(3000, 1500), duration_s=10.0,
                                  prompt_tokens=8, output_tokens=100, max_trials=4)
    assert search.rate == 8.0 and [share for _, share in search.trials] == [1.0] * 4
