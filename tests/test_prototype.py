"""The authors' system prototype: `eviction="prototype"` against a direct re-implementation of
`manage_cache`, a hand-computed case, its steady state, and the reproduction of the paper's run."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testkit import Req, random_request

from tiersim.errors import TiersimError
from tiersim.policy import DDR, EVICTED, HBM, PolicyConfig, TieringPolicy, replay
from tiersim.specs import hardware_spec, model_spec
from tiersim.studies.prototype import (
    PAPER_DDR_TOKENS_PER_STEP,
    PAPER_TOK_S_FULL,
    PAPER_TOK_S_TIERED,
    PAPER_TRANSFER_OVERHEAD_PCT,
    matched_length,
    reproduce_prototype,
)

TIER = {"gpu": HBM, "ddr": DDR, "evicted": EVICTED}


def manage_cache_reference(prefill, rows, beta, r, sinks=4, window=128, interval=64):
    """manage_cache as DESIGN.md §1 describes it, over plain lists: the tier of every position after every step.

    The cache holds the prompt, then one token per decode step. Only GPU-resident tokens gain score
    (DDR tokens are no longer in the cache). At the end of decode step `step`, if (step + 1) is a
    multiple of `interval`, the candidates are the GPU-resident tokens that are not protected (prompt,
    the `sinks` tokens after it, the `window` most recent); with n of them (none if n < 10) the
    floor(r·n) lowest-scored are evicted, the floor(β·n) highest-scored stay and the rest go to DDR.
    Ties rank the earlier position lower (tiersim's convention).
    """
    prompt = len(prefill)
    score = [float(x) for x in prefill]
    tier = ["gpu"] * prompt
    history = []
    for step, row in enumerate(rows):
        score.append(0.0)
        tier.append("gpu")
        for i, w in enumerate(row):
            if tier[i] == "gpu":
                score[i] += float(w)
        if (step + 1) % interval == 0:
            candidates = [i for i in range(prompt + sinks, len(tier) - window) if tier[i] == "gpu"]
            n = len(candidates)
            if n >= 10:
                ranked = sorted(candidates, key=lambda i: (score[i], i))
                n_evict = math.floor(r * n)
                n_keep = min(math.floor(beta * n), n - n_evict)
                for i in ranked[:n_evict]:
                    tier[i] = "evicted"
                for i in ranked[n_evict: n - n_keep]:
                    tier[i] = "ddr"
        history.append([TIER[x] for x in tier])
    return history




def offline_tiers(req: Req, cfg: PolicyConfig) -> list[list[int]]:
    """Every position's tier after every step, rebuilt from the offline TierSchedule's moves alone."""
    s = replay(req, cfg)
    points = {int(t): k for k, t in enumerate(s.retier_steps)}
    tiers = [HBM] * len(req.prefill)
    out = []
    for t in range(req.steps):
        tiers = tiers + [HBM]
        assert s.counts[t].tolist() == np.bincount(tiers, minlength=4).tolist()
        if t in points:
            m = s.moves(points[t])
            for p, to in zip(m.positions.tolist(), m.to_tier.tolist()):
                tiers[p] = to
        out.append(list(tiers))
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(beta=st.sampled_from([0.0, 0.5, 0.9, 1.0]) | st.floats(0, 1), r=st.sampled_from([0.0, 0.1, 0.5]) | st.floats(0, 1),
       sinks=st.integers(0, 6), window=st.integers(0, 24), interval=st.integers(1, 12), prompt=st.integers(1, 20),
       steps=st.integers(0, 160), seed=st.integers(0, 2**32 - 1), ties=st.booleans())
def test_prototype_equals_manage_cache_token_for_token(beta, r, sinks, window, interval, prompt, steps, seed, ties):
    req = random_request(seed, prompt, steps, ties)
    cfg = PolicyConfig(hbm_ratio=beta, evict_ratio=r, sinks=sinks, window=window, interval=interval, eviction="prototype")
    expected = manage_cache_reference(req.prefill, req.increments, beta, r, sinks, window, interval)
    policy = TieringPolicy(cfg, req.prefill)
    for t, row in enumerate(req.increments):
        policy.step(row)
        assert policy.tiers.tolist() == expected[t], f"online, step {t}"
    assert offline_tiers(req, cfg) == expected


# -- a case small enough to compute by hand ----------------------------------------------------------
# P=1, sinks=1, window=2, interval=6, β=0.5, r=0.2. Row t gives v[1+t] to the newest position 1+t;
# rows 18..23 also give 1.0 to position 2 and 0.1 to position 5. Candidates are positions 2..length-3.
V = {1: 0.5, 2: 0.30, 3: 0.85, 4: 0.10, 5: 0.55, 6: 0.70, 7: 0.20, 8: 0.95, 9: 0.40, 10: 0.05, 11: 0.60, 12: 0.75,
     13: 0.15, 14: 0.50, 15: 0.90, 16: 0.35, 17: 0.45, 18: 0.80, 19: 0.25, 20: 0.65, 21: 0.02, 22: 0.99, 23: 0.5,
     24: 0.5}


def hand_request() -> Req:
    rows = []
    for t in range(24):
        row = np.zeros(t + 2)
        row[1 + t] = V[1 + t]
        if t >= 18:
            row[2] += 1.0
            row[5] += 0.1
        rows.append(row)
    return Req(np.array([1.0]), rows)


def test_hand_computed_prototype_rounds():
    cfg = PolicyConfig(hbm_ratio=0.5, evict_ratio=0.2, sinks=1, window=2, interval=6, eviction="prototype")
    s = replay(hand_request(), cfg)
    # Step 5: candidates 2..4 (3 < 10), step 11: 2..10 (9 < 10): both rounds skipped. `target` re-tiers there.
    # Step 17: candidates 2..16, n=15: evict floor(3.0)=3 lowest (10: .05, 4: .10, 13: .15), keep floor(7.5)=7
    # highest (8, 15, 3, 12, 6, 11, 5), the other 5 to DDR (7: .20, 2: .30, 16: .35, 9: .40, 14: .50).
    # Step 23: position 2 got 6 × 1.0 while in DDR, frozen at .30, never promoted; position 5 is at .55 + .6 = 1.15.
    # Residents: the 7 kept + 17..22, n=13: evict floor(2.6)=2 (21: .02, 19: .25), keep floor(6.5)=6
    # (5: 1.15, 22: .99, 8, 15, 3, 18: .80), DDR 5 (17: .45, 11: .60, 20: .65, 6: .70, 12: .75).
    assert s.retier_steps.tolist() == [17, 23]
    assert replay(hand_request(), PolicyConfig(hbm_ratio=0.5, evict_ratio=0.2, sinks=1, window=2, interval=6)
                  ).retier_steps.tolist() == [5, 11, 17, 23]
    first = s.index_sets(0)
    assert first["evicted"].tolist() == [4, 10, 13]
    assert first["ddr"].tolist() == [2, 7, 9, 14, 16]
    assert first["hbm"].tolist() == [0, 1, 3, 5, 6, 8, 11, 12, 15, 17, 18]
    last = s.index_sets(1)
    assert last["evicted"].tolist() == [4, 10, 13, 19, 21]
    assert last["ddr"].tolist() == [2, 6, 7, 9, 11, 12, 14, 16, 17, 20]
    assert last["hbm"].tolist() == [0, 1, 3, 5, 8, 15, 18, 22, 23, 24]
    assert s.transition_counts().tolist() == [[5, 0, 0, 0, 3], [5, 0, 0, 0, 2]]
    assert s.final_counts.tolist() == [10, 10, 0, 5]
    expected = manage_cache_reference([1.0], hand_request().increments, 0.5, 0.2, sinks=1, window=2, interval=6)
    assert s.tiers_after(1).tolist() == expected[23]


def test_steady_state_of_the_papers_setting():
    # DESIGN.md §1: the GPU-resident candidates settle near 64·β/(1−β) = 64 after a round, and the DDR tier
    # grows by ~64·(1−β−r)/(1−β) = 51.2 per round. With the floors they settle one lower: n = 63 + 64 = 127,
    # floor(12.7) = 12 evicted, floor(63.5) = 63 kept, 52 to DDR.
    steps = 64 * 30
    req = Req(np.zeros(8), [np.zeros(8 + t + 1) for t in range(steps)])
    s = replay(req, PolicyConfig(hbm_ratio=0.5, evict_ratio=0.1, eviction="prototype"))
    # First round at 192 generated tokens: 192 − 4 − 128 = 60 candidates (6 evicted, 30 kept, 24 to DDR).
    assert s.retier_steps[0] == 191
    moves = s.transition_counts()
    assert moves[0].tolist() == [24, 0, 0, 0, 6]
    assert moves[-10:, 0].tolist() == [52] * 10 and moves[-10:, 4].tolist() == [12] * 10
    assert np.all(np.diff(s.counts[:, DDR]) >= 0)  # the DDR tier never shrinks
    last = s.index_sets(-1)
    resident = [p for p in last["hbm"] if 8 + 4 <= p < 8 + steps - 128]
    assert len(resident) == 63


# -- the reproduction of the paper's run ---------------------------------------------------------------
def ddr_by_step(gen_tokens: int, beta=0.5, r=0.1, sinks=4, window=128, interval=64) -> np.ndarray:
    """The DDR tier seen by each decode step, from the round arithmetic alone (scores do not matter)."""
    ddr = evicted = 0
    out = np.zeros(gen_tokens - 1)
    for t in range(gen_tokens - 1):
        out[t] = ddr
        if (t + 1) % interval == 0:
            n = max(0, t + 1 - sinks - window) - ddr - evicted
            if n >= 10:
                e, keep = math.floor(r * n), math.floor(beta * n)
                evicted += e
                ddr += n - e - keep
    return out


@pytest.fixture(scope="module")
def reproduction():
    return reproduce_prototype()


def test_ddr_tier_follows_the_round_arithmetic(reproduction):
    # At GSM8K length (2,560 tokens) the prototype's DDR tier averages 863 tokens, ~1.9x the paper's 448:
    # the tier size depends on the chain length alone, and 448 is the average of a 1,522-token chain.
    s = reproduction.summary
    assert s["ddr_tokens_per_slot_step"] == pytest.approx(ddr_by_step(2560).mean(), rel=1e-12)
    assert reproduction.summary_roofline["ddr_tokens_per_slot_step"] == s["ddr_tokens_per_slot_step"]
    assert reproduction.matched_gen_tokens == matched_length(ddr_by_step(2560))
    assert ddr_by_step(reproduction.matched_gen_tokens).mean() >= 448 > ddr_by_step(reproduction.matched_gen_tokens - 1).mean()
    assert 1400 <= reproduction.matched_gen_tokens <= 1600
    paper = PAPER_DDR_TOKENS_PER_STEP[0]
    assert reproduction.summary_matched["ddr_tokens_per_slot_step"] == pytest.approx(paper, rel=0.01)
    assert 1.8 <= reproduction.figure("DDR tokens per step").tiersim / paper <= 2.1


def test_transfer_overhead_is_the_pageable_copy_of_the_ddr_tier(reproduction):
    # Per step the whole DDR tier is fetched: a host gather (read + write at DDR bandwidth), then pageable
    # copies at the paper's own 15 GB/s, K and V apart per layer (56 calls of 3.6 us); D2H demotions are
    # negligible. With 28 calls instead the matched run would be ~4 % lower, outside the tolerance.
    model, hw = model_spec("r1-qwen-7b"), hardware_spec("rtx5080")
    for s, gen in ((reproduction.summary, 2560), (reproduction.summary_matched, reproduction.matched_gen_tokens)):
        ddr = ddr_by_step(gen)
        nbytes = ddr * model.kv_bytes_per_token
        copy_ms = np.where(ddr > 0, 2 * model.layers * hw.copy_latency_us * 1e-3
                           + nbytes * (1 / hw.h2d_gbps_pageable + 2 / hw.ddr_gbps) * 1e-6, 0.0)
        expected = 100 * copy_ms.sum() / (copy_ms.sum() + 47.0 * len(ddr))
        assert s["transfer_overhead_pct_paper"] == pytest.approx(expected, rel=0.02)
    # At the paper's DDR load tiersim's overhead lands within 1 point of the paper's 5.2–5.4 % (measured 5.1 %:
    # the link rate is the paper's own microbenchmark, the rest is host gather and call latency); at 2,560
    # tokens, with ~1.9x the DDR tier, it is ~9 %.
    low, high = PAPER_TRANSFER_OVERHEAD_PCT
    assert low - 1.0 <= reproduction.figure("transfer overhead").tiersim_matched <= high + 1.0
    assert 8.0 <= reproduction.figure("transfer overhead").tiersim <= 10.0


def test_throughput_beside_the_papers(reproduction):
    # Without tiering: 1000 / 47 ms = 21.3 tok/s against the paper's 21.8 (its 47 ms is the tiered run's forward).
    full = reproduction.figure("tok/s without tiering")
    assert full.tiersim == pytest.approx(1000 / 47.0, rel=0.01)
    assert abs(full.tiersim / PAPER_TOK_S_FULL[0] - 1) <= 0.03
    # With tiering, at the paper's DDR load, a tiersim step is forward + transfer, exactly what the paper's own
    # overhead figure implies: 47 ms / (1 − 0.053) = 49.6 ms, 20.2 tok/s. The paper measured 18.7 tok/s: its
    # slowdown holds costs outside its transfer figure (device copies, host-side work; see the study's
    # docstring), so tiersim is faster than the measurement.
    tiered = reproduction.figure("tok/s with tiering").tiersim_matched
    implied = 1000 / (47.0 / (1 - sum(PAPER_TRANSFER_OVERHEAD_PCT) / 200))
    assert tiered == pytest.approx(implied, rel=0.03)
    assert tiered > PAPER_TOK_S_TIERED[0]
    # The int8 roofline puts compute at ~9 ms, five times below the prototype's measured 47 ms.
    compute = reproduction.figure("compute per token").tiersim_roofline
    assert 7.0 <= compute <= 12.0
    assert reproduction.summary_roofline["weights_gb"] == pytest.approx(model_spec("r1-qwen-7b").weight_bytes_at(8) / 1e9)
    assert reproduction.summary["fits"] and reproduction.summary["config"]["policy"]["eviction"] == "prototype"


def test_reproduction_table(reproduction):
    rows = reproduction.rows()
    assert len(rows) == len(reproduction.figures) and {len(r) for r in rows} == {len(reproduction.titles())}
    assert rows[0][:2] == ["tok/s without tiering (tok/s)", "21.8"]
    assert "5.2–5.4" in reproduction.text() and "1522 tokens" in reproduction.text()
    with pytest.raises(TiersimError, match="figure"):
        reproduction.figure("latency")


def test_bad_input_is_refused():
    with pytest.raises(TiersimError, match="compute_ms"):
        reproduce_prototype(compute_ms=0)
    with pytest.raises(TiersimError, match="requests"):
        reproduce_prototype(requests=0)
