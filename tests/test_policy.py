"""The tiering policy: a hand-computed case, the authors' compounding figure, and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testkit import Req, random_request

from tiersim.errors import PolicyError
from tiersim.policy import (
    COMPRESSED,
    DDR,
    EVICTED,
    HBM,
    PROTOTYPE_MIN_CANDIDATES,
    PolicyConfig,
    TieringPolicy,
    candidate_pages,
    replay,
)

# -- a case small enough to compute by hand ----------------------------------------------------
# P=2, sinks=1, window=1, interval=2, beta=0.5, r=0.25. Re-tier at the end of steps 3 and 5
# (4 and 6 generated tokens, both > sinks+window=2).
HAND_ROWS = [
    [0.5, 0.2, 0.3],
    [0.4, 0.1, 0.2, 0.3],
    [0.3, 0.1, 0.2, 0.1, 0.3],
    [0.3, 0.1, 0.1, 0.0, 0.3, 0.2],
    [0.2, 0.1, 0.1, 0.3, 0.1, 0.1, 0.1],
    [0.2, 0.1, 0.1, 0.2, 0.0, 0.2, 0.1, 0.1],
]
HAND_CONFIG = PolicyConfig(hbm_ratio=0.5, evict_ratio=0.25, sinks=1, window=1, interval=2)


def hand_request() -> Req:
    return Req(np.array([1.0, 0.5]), [np.array(r) for r in HAND_ROWS])


def test_hand_computed_two_retiers():
    s = replay(hand_request(), HAND_CONFIG)
    # Re-tier 0 (end of step 3): candidates 3 (score 0.3+0.1+0.0=0.4), 4 (0.3+0.3=0.6); no eviction
    # (floor(0.25*2)=0); HBM gets floor(0.5*2)=1: position 4; position 3 demoted.
    # Re-tier 1 (end of step 5): candidates 3 (0.4+0.3+0.2=0.9), 4 (0.6+0.1+0=0.7), 5 (0.1+0.2=0.3),
    # 6 (0.1+0.1=0.2); evict floor(0.25*4)=1: 6; HBM gets floor(0.5*3)=1: 3 (promoted); 4, 5 demoted.
    assert s.retier_steps.tolist() == [3, 5]
    m0, m1 = s.moves(0), s.moves(1)
    assert list(zip(m0.positions.tolist(), m0.from_tier.tolist(), m0.to_tier.tolist())) == [(3, HBM, DDR)]
    assert list(zip(m1.positions.tolist(), m1.from_tier.tolist(), m1.to_tier.tolist())) == [
        (3, DDR, HBM), (4, HBM, DDR), (5, HBM, DDR), (6, HBM, EVICTED),
    ]
    assert m1.promoted.tolist() == [3] and m1.demoted.tolist() == [4, 5] and m1.evicted.tolist() == [6]
    assert s.counts.tolist() == [[3, 0, 0, 0], [4, 0, 0, 0], [5, 0, 0, 0], [6, 0, 0, 0], [6, 1, 0, 0], [7, 1, 0, 0]]
    assert s.final_counts.tolist() == [5, 2, 0, 1]
    # Step 4 and 5 see position 3 in DDR: 0.3 and 0.2 of their attention.
    np.testing.assert_allclose(s.mass[:, DDR], [0, 0, 0, 0, 0.3, 0.2], atol=1e-7)
    np.testing.assert_allclose(s.mass.sum(axis=1), 1.0, rtol=1e-6)
    sets = s.index_sets(1)
    assert sets["hbm"].tolist() == [0, 1, 2, 3, 7] and sets["ddr"].tolist() == [4, 5] and sets["evicted"].tolist() == [6]
    assert s.index_sets(0)["ddr"].tolist() == [3]
    assert s.transition_counts().tolist() == [[1, 0, 0, 0, 0], [2, 1, 0, 0, 1]]
    assert s.protected.tolist() == [3, 4, 4, 4, 4, 4]


def test_hand_computed_with_compressed_tier_and_pages():
    cfg = PolicyConfig(hbm_ratio=0.5, evict_ratio=0.25, sinks=1, window=1, interval=2, compressed_ratio=0.5)
    s = replay(hand_request(), cfg)
    # Re-tier 1 offloads 4 (0.7) and 5 (0.3): floor(0.5*2)=1 compressed, the lower-scored one.
    assert s.index_sets(1)["compressed"].tolist() == [5]
    assert s.index_sets(1)["ddr"].tolist() == [4]
    # Pages of 2: at step 5 (8 positions) pages are {2,3}{4,5}{6,7}; page 1 ({2,3}) holds the sink and
    # page 3 ({6,7}) the window, so the only candidate is page 2 = {4,5}.
    paged = replay(hand_request(), PolicyConfig(hbm_ratio=0.0, evict_ratio=0.0, sinks=1, window=1, interval=2, page_size=2))
    assert candidate_pages(paged.config, 2, 8) == (2, 3)
    assert paged.index_sets(1)["ddr"].tolist() == [4, 5]


def test_an_unset_page_is_the_block_in_a_run_and_a_token_on_its_own():
    unset = PolicyConfig(hbm_ratio=0.5, evict_ratio=0.25, sinks=1, window=1, interval=2)
    assert unset.page_size is None and unset.unit == 1
    one = PolicyConfig(hbm_ratio=0.5, evict_ratio=0.25, sinks=1, window=1, interval=2, page_size=1)
    # On its own (a live cache, `tiersim schedule`) an unset page tiers single tokens, exactly as page_size 1.
    a, b = replay(hand_request(), unset), replay(hand_request(), one)
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.moves_pos, b.moves_pos)
    # Inside a run: the block; a given page (1 included) is kept; the prototype works per token.
    assert unset.for_block_size(16).page_size == 16 and one.for_block_size(16).page_size == 1
    assert PolicyConfig(page_size=32).for_block_size(16).page_size == 32
    assert PolicyConfig(eviction="prototype").for_block_size(16).page_size == 1


def test_sticky_mode_never_promotes():
    s = replay(hand_request(), PolicyConfig(hbm_ratio=0.5, evict_ratio=0.25, sinks=1, window=1, interval=2, sticky=True))
    # Position 3 was offloaded at re-tier 0 and its score froze at 0.4; it is not promoted.
    promoted = [s.moves(k).promoted.tolist() for k in range(s.retiers)]
    assert promoted == [[], []]
    assert s.index_sets(1)["ddr"].tolist()[0] == 3


# -- the authors' compounding eviction -----------------------------------------------------------
@pytest.mark.parametrize("ratio, evicted_share", [(0.03, 0.23), (0.10, 0.54)])
def test_compound_mode_reproduces_the_authors_figure(ratio, evicted_share):
    # Their schedule: a 1,422-token chain, Δ=64, 4 sinks, 128 window; "3%" evicted about 23%.
    req = random_request(0, prompt=50, steps=1422)
    s = replay(req, PolicyConfig(evict_ratio=ratio, eviction="compound"))
    assert s.final_counts[EVICTED] / 1422 == pytest.approx(evicted_share, abs=0.005)
    target = replay(req, PolicyConfig(evict_ratio=ratio))
    unprotected = (1422 // 64) * 64 - 4 - 128  # at the last re-tier point, 1,408 generated tokens
    assert target.final_counts[EVICTED] == math.floor(ratio * unprotected)


# -- properties --------------------------------------------------------------------------------
def _config(kwargs: dict) -> PolicyConfig:
    if kwargs["eviction"] == "prototype":  # the prototype has no compressed tier
        kwargs = {**kwargs, "compressed_ratio": 0.0}
    return PolicyConfig(**kwargs)


configs = st.fixed_dictionaries(dict(
    hbm_ratio=st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0]) | st.floats(0, 1),
    evict_ratio=st.sampled_from([0.0, 0.03, 0.1, 0.5]) | st.floats(0, 1),
    sinks=st.integers(0, 6),
    window=st.integers(0, 24),
    interval=st.integers(1, 12),
    compressed_ratio=st.sampled_from([0.0, 0.0, 0.5]) | st.floats(0, 1),
    page_size=st.sampled_from([None, 1, 2, 4, 16]),  # None: a policy on its own tiers tokens
    eviction=st.sampled_from(["target", "compound", "prototype"]),
    sticky=st.booleans(),
)).map(_config)


def _check_prototype_round(cfg: PolicyConfig, old: np.ndarray, new: np.ndarray, scores: np.ndarray) -> None:
    """One manage_cache round over candidate units: only HBM residents move, in the stated numbers, by score."""
    resident = old == HBM
    n = int(resident.sum())
    assert n >= PROTOTYPE_MIN_CANDIDATES
    # DDR and evicted units are never touched: no eviction from DDR, no promotion.
    assert np.array_equal(new[~resident], old[~resident])
    moved = new[resident]
    n_evict = math.floor(cfg.evict_ratio * n)
    assert int(np.sum(moved == EVICTED)) == n_evict
    assert int(np.sum(moved == HBM)) == min(math.floor(cfg.hbm_ratio * n), n - n_evict)
    assert not np.any(moved == COMPRESSED)
    s = scores[resident]
    for low, high in ((EVICTED, DDR), (DDR, HBM), (EVICTED, HBM)):
        if np.any(moved == low) and np.any(moved == high):
            assert s[moved == low].max() <= s[moved == high].min()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs, seed=st.integers(0, 2**32 - 1), prompt=st.integers(1, 20), steps=st.integers(0, 160))
def test_invariants_online_and_offline(cfg, seed, prompt, steps):
    req = random_request(seed, prompt, steps)
    schedule = replay(req, cfg)
    policy = TieringPolicy(cfg, req.prefill)
    ever_evicted = np.zeros(prompt + steps, dtype=bool)
    evicted_units = 0
    k = 0
    for t, row in enumerate(req.increments):
        before = policy.tiers.copy()
        changes = policy.step(row)
        tiers = policy.tiers
        length = prompt + t + 1
        # Tiers partition the cached positions; every token has exactly one tier.
        assert len(tiers) == length and set(np.unique(tiers)) <= {HBM, DDR, COMPRESSED, EVICTED}
        # The offline schedule agrees with the online state step for step.
        seen = before.tolist() + [HBM]
        assert schedule.counts[t].tolist() == np.bincount(seen, minlength=4).tolist()
        np.testing.assert_allclose(schedule.mass[t], np.bincount(seen, weights=row, minlength=4), atol=1e-6)
        # Protected tokens never leave HBM.
        assert np.all(tiers[: min(length, prompt + cfg.sinks)] == HBM)
        assert np.all(tiers[max(0, length - cfg.window):] == HBM)
        # Evicted tokens never return.
        assert np.all(tiers[ever_evicted[:length]] == EVICTED)
        ever_evicted[:length] |= tiers == EVICTED
        # A page moves as a whole.
        n = cfg.unit
        first, stop = candidate_pages(cfg, prompt, length)
        pages = tiers[first * n: stop * n].reshape(-1, n)
        assert np.all(pages == pages[:, :1])
        page_scores = policy.scores[first * n: stop * n].reshape(-1, n).sum(axis=1)
        old_units = np.asarray(seen, dtype=np.int8)[first * n: stop * n].reshape(-1, n)[:, 0]
        due = (t + 1) % cfg.interval == 0 and t + 1 > cfg.sinks + cfg.window
        if not changes.retiered:
            assert len(changes) == 0
            if due:  # only the prototype skips a due round, and only with too few HBM-resident candidates
                assert cfg.eviction == "prototype" and np.sum(old_units == HBM) < PROTOTYPE_MIN_CANDIDATES
            continue
        assert due
        assert schedule.retier_steps[k] == t
        m = schedule.moves(k)
        assert m.positions.tolist() == changes.positions.tolist()
        assert np.array_equal(schedule.tiers_after(k), tiers)
        k += 1
        if cfg.eviction == "prototype":
            _check_prototype_round(cfg, old_units, pages[:, 0], page_scores)
            continue
        # Tier sizes match the ratios, exactly up to flooring, counted in units (tokens or pages).
        units = pages[:, 0]
        c = len(units)
        evicted = int(np.sum(units == EVICTED))
        if cfg.eviction == "target":
            assert evicted == math.floor(cfg.evict_ratio * c)
        else:
            assert evicted == evicted_units + math.floor(cfg.evict_ratio * (c - evicted_units))
        evicted_units = evicted
        hbm = int(np.sum(units == HBM))
        target_hbm = cfg.hbm_ratio * (c - evicted)
        if cfg.sticky:
            assert hbm <= math.floor(target_hbm)
        else:
            assert abs(hbm - target_hbm) < 1
            compressed = int(np.sum(units == COMPRESSED))
            assert abs(compressed - cfg.compressed_ratio * (c - evicted - hbm)) < 1
            # HBM holds the highest-scored survivors.
            if 0 < hbm < c - evicted:
                assert page_scores[units == HBM].min() >= page_scores[(units == DDR) | (units == COMPRESSED)].max()
    assert k == schedule.retiers
    np.testing.assert_array_equal(schedule.final_counts, np.bincount(policy.tiers, minlength=4))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), evict=st.sampled_from([0.0, 0.05, 0.2]))
def test_eviction_does_not_depend_on_hbm_ratio(seed, evict):
    # The paper's central claim, at the policy level: which tokens are evicted depends on r, not β.
    req = random_request(seed, 8, 300)
    evicted = [replay(req, PolicyConfig(hbm_ratio=b, evict_ratio=evict)).index_sets(-1)["evicted"].tolist()
               for b in (0.3, 0.5, 0.7)]
    assert evicted[0] == evicted[1] == evicted[2]


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"hbm_ratio": 1.5}, "hbm_ratio"),
        ({"evict_ratio": -0.1}, "evict_ratio"),
        ({"compressed_ratio": float("nan")}, "compressed_ratio"),
        ({"interval": 0}, "interval"),
        ({"page_size": 0}, "page_size"),
        ({"page_size": 2.5}, "page_size"),
        ({"page_size": True}, "page_size"),
        ({"window": -1}, "window"),
        ({"eviction": "lru"}, "eviction"),
        ({"compressed_bits": 3}, "compressed_bits"),
        ({"eviction": "prototype", "compressed_ratio": 0.5}, "compressed_ratio"),
    ],
)
def test_bad_config_is_refused(kwargs, needle):
    with pytest.raises(PolicyError, match=needle):
        PolicyConfig(**kwargs)


def test_bad_increments_are_refused():
    policy = TieringPolicy(PolicyConfig(), np.ones(3))
    with pytest.raises(PolicyError, match="length 4"):
        policy.step(np.ones(5) / 5)
    with pytest.raises(PolicyError, match="finite"):
        policy.step(np.array([0.5, np.nan, 0.25, 0.25]))
    with pytest.raises(PolicyError, match="non-negative"):
        policy.step(np.array([0.5, -0.1, 0.3, 0.3]))
    with pytest.raises(PolicyError, match="prefill"):
        TieringPolicy(PolicyConfig(), np.ones((2, 2)))
    # A refused step changes nothing.
    assert policy.length == 3 and policy.steps_done == 0
