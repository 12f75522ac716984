"""The fast offline replay (`policy.replay`) against the reference: every row fed to `TieringPolicy.step`.

The reference below is the replay as it was before the fast one: one online step per row, the mass
per tier summed per step the same way. The fast replay must give the same schedule bit for bit —
same re-tier points, same moves, same counts, the same float32-summed mass — on captured rows
(float16, the shipped small trace), synthetic continuations (float32), hand-made float64 rows, and
every eviction mode; and refuse bad rows with the same error.
"""

from __future__ import annotations

import numpy as np
import pytest
from testkit import Req

from tiersim.errors import PolicyError
from tiersim.policy import HBM, PolicyConfig, TieringPolicy, TierSchedule, protected_tokens, replay
from tiersim.traces.default import small_trace_path
from tiersim.traces.format import read_trace
from tiersim.traces.synth import ExtendedRequest, SynthParams


def reference_replay(request, config: PolicyConfig) -> TierSchedule:
    """The replay before the fast one, verbatim: `TieringPolicy.step` per row."""
    policy = TieringPolicy(config, request.prefill, expected_steps=request.steps)
    steps = request.steps
    counts = np.zeros((steps, 4), dtype=np.int64)
    mass = np.zeros((steps, 4), dtype=np.float64)
    protected = np.zeros(steps, dtype=np.int64)
    live = np.array([policy.prompt_tokens, 0, 0, 0], dtype=np.int64)
    onehot = np.zeros((policy.prompt_tokens + steps + 1, 4), dtype=np.float32)
    onehot[:, HBM] = 1.0
    retier_steps, offsets, pos, frm, to = [], [0], [], [], []
    for t, row in enumerate(request.rows()):
        if t >= steps:
            break
        changes = policy.step(row)
        live[HBM] += 1
        counts[t] = live
        protected[t] = protected_tokens(config, policy.prompt_tokens, policy.length)
        mass[t] = np.asarray(row, dtype=np.float32) @ onehot[: policy.length]
        if changes.retiered:
            onehot[changes.positions] = 0.0
            onehot[changes.positions, changes.to_tier] = 1.0
            np.add.at(live, changes.from_tier, -1)
            np.add.at(live, changes.to_tier, 1)
            retier_steps.append(t)
            pos.append(changes.positions)
            frm.append(changes.from_tier)
            to.append(changes.to_tier)
            offsets.append(offsets[-1] + len(changes))
    cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)  # noqa: E731
    return TierSchedule(
        config=config, prompt_tokens=policy.prompt_tokens, generated_tokens=int(request.generated_tokens),
        counts=counts, mass=mass, retier_steps=np.asarray(retier_steps, dtype=np.int64),
        moves_offsets=np.asarray(offsets, dtype=np.int64), moves_pos=cat(pos, np.int64), moves_from=cat(frm, np.int8),
        moves_to=cat(to, np.int8), protected=protected, final_counts=live.copy(),
    )


def assert_identical(fast: TierSchedule, ref: TierSchedule) -> None:
    assert (fast.prompt_tokens, fast.generated_tokens, fast.config) == (ref.prompt_tokens, ref.generated_tokens,
                                                                       ref.config)
    for name, want in ref.to_arrays().items():
        got = fast.to_arrays()[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), f"{name} differs"


@pytest.fixture(scope="module")
def small():
    return read_trace(small_trace_path())


CONFIGS = {
    "blocks of 16 (a run's default)": PolicyConfig().for_block_size(16),
    "per token": PolicyConfig(page_size=1),
    "compound, compressed tier": PolicyConfig(eviction="compound", evict_ratio=0.1, compressed_ratio=0.3, page_size=4),
    "prototype": PolicyConfig(eviction="prototype", hbm_ratio=0.4, window=32, interval=16),
    "sticky, compressed tier": PolicyConfig(sticky=True, compressed_ratio=0.5, hbm_ratio=0.25, page_size=2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_small_trace_schedules_are_identical(small, name):
    config = CONFIGS[name]
    assert small[0].increments.dtype == np.float16  # captured rows, most of them subnormal halves
    for i in range(len(small)):
        assert_identical(replay(small[i], config), reference_replay(small[i], config))


def test_synthetic_continuation_is_identical(small):
    """Captured float16 rows, then float32 synthetic ones written into one reused buffer."""
    config = PolicyConfig(hbm_ratio=0.375, interval=32).for_block_size(16)
    for i in (0, 5):
        req = ExtendedRequest(small[i], SynthParams(), small[i].steps + 200, seed=i)
        assert req.synthetic_steps > 0
        assert_identical(replay(req, config), reference_replay(req, config))


def test_float64_rows_are_identical():
    rng = np.random.default_rng(3)
    rows = [rng.random(9 + t) / (9 + t) for t in range(300)]
    req = Req(rng.random(8), rows)
    for config in (PolicyConfig(interval=16, window=8), PolicyConfig(interval=8, window=4, sticky=True, page_size=3)):
        assert_identical(replay(req, config), reference_replay(req, config))


def test_rows_short_of_steps_are_identical():
    """A request whose rows stop before its step count: the steps never fed stay zero in both."""

    class Short(Req):
        @property
        def steps(self) -> int:
            return len(self.increments) + 5

    rows = [np.full(4 + t, 1 / (4 + t), dtype=np.float32) for t in range(40)]
    req = Short(np.ones(3), rows)
    config = PolicyConfig(interval=8, window=4, sinks=1)
    assert_identical(replay(req, config), reference_replay(req, config))


def _bad(rows_at_5: np.ndarray, dtype=np.float16) -> Req:
    rows = [np.full(3 + t, 1 / (3 + t), dtype=dtype) for t in range(8)]
    rows[5] = rows_at_5.astype(dtype)
    return Req(np.ones(2), rows)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # the float16 sum overflowing is the point
@pytest.mark.parametrize("row, needle", [
    (np.array([0.5] * 7 + [np.nan]), "step 5: increments must be finite and non-negative"),
    (np.array([0.5] * 7 + [-0.25]), "step 5: increments must be finite and non-negative"),
    (np.array([0.5] * 7 + [np.inf]), "step 5: increments must be finite and non-negative"),
    (np.array([60000.0] * 8), "step 5: increments must be finite and non-negative"),  # a float16 sum overflows
    (np.array([0.5] * 9), "step 5: increments must have length 8"),
])
def test_bad_rows_are_refused_alike(row, needle):
    req = _bad(row)
    for run in (replay, reference_replay):
        with pytest.raises(PolicyError, match=needle):
            run(req, PolicyConfig(interval=2, window=1, sinks=1))


def test_rows_past_the_quick_check_but_valid_are_kept():
    """-0.0 and large-but-summable halves fail the one-max check yet are valid: the exact check lets them through."""
    for row in (np.array([0.0] * 7 + [-0.0]), np.array([5000.0] * 8)):
        req = _bad(row)
        config = PolicyConfig(interval=2, window=1, sinks=1)
        assert_identical(replay(req, config), reference_replay(req, config))
