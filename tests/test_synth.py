"""Synthetic traces: valid rows, determinism, and the structure of real attention (sinks, recency, heavy hitters)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiersim.errors import TiersimError
from tiersim.traces.format import Request, read_trace
from tiersim.traces.synth import SynthParams, synth_request, synth_requests, write_synth_trace

P, G = 64, 640


@pytest.fixture(scope="module")
def long_request() -> Request:
    return synth_request(SynthParams(), P, G, np.random.default_rng(0))


def check_rows(r: Request, tol: float) -> None:
    assert r.steps == max(r.generated_tokens - 1, 0)
    offset = 0
    for t, row in enumerate(r.rows()):
        assert row.size == r.prompt_tokens + t + 1
        assert r.row_offset(t) == offset
        offset += row.size
        assert (row >= 0).all()
        assert abs(float(row.sum(dtype=np.float64)) - 1.0) < tol
    assert offset == r.increments.size


def test_rows_are_distributions(long_request):
    r = long_request
    assert r.increments.dtype == np.float32
    check_rows(r, 1e-5)
    assert r.prefill.shape == (P,) and (r.prefill >= 0).all()
    assert float(r.prefill.sum(dtype=np.float64)) == pytest.approx(P, rel=1e-5)
    assert r.token_ids.shape == (P + G,) and r.token_ids.dtype == np.int32
    assert 0 <= r.token_ids.min() and r.token_ids.max() < SynthParams().vocab_size


def test_float16_rows_sum_to_one():
    r = synth_request(SynthParams(), 32, 300, 5, dtype=np.float16)
    assert r.increments.dtype == np.float16
    check_rows(r, 2e-3)


def test_prefill_column_sums_are_causal():
    """Prefill position i is attended only by queries i..P-1, each row summing to 1."""
    p = 40
    r = synth_request(SynthParams(), p, 2, 1)
    tail = np.cumsum(r.prefill[::-1].astype(np.float64))[::-1]  # mass on positions i..P-1
    assert np.all(tail <= np.arange(p, 0, -1) + 1e-4)  # rows i..P-1 give at most 1 each
    assert r.prefill[-1] <= 1.0


def test_steps_argument_and_lengths():
    r = synth_request(SynthParams(), 10, 20, 0, steps=20)
    assert r.steps == 20 and r.increments.size == 20 * 11 + 20 * 19 // 2
    assert synth_request(SynthParams(), 10, 0, 0).steps == 0
    with pytest.raises(TiersimError):
        synth_request(SynthParams(), 10, 20, 0, steps=21)
    with pytest.raises(TiersimError):
        synth_request(SynthParams(), 0, 20, 0)


def test_deterministic_for_a_seed():
    a = list(synth_requests(SynthParams(), 3, (8, 40), (10, 60), seed=11))
    b = list(synth_requests(SynthParams(), 3, (8, 40), (10, 60), seed=11))
    c = list(synth_requests(SynthParams(), 3, (8, 40), (10, 60), seed=12))
    for x, y in zip(a, b):
        assert np.array_equal(x.increments, y.increments) and np.array_equal(x.token_ids, y.token_ids)
        assert np.array_equal(x.prefill, y.prefill)
    assert any(x.increments.size != z.increments.size or not np.array_equal(x.increments, z.increments)
               for x, z in zip(a, c))
    first = next(synth_requests(SynthParams(), 1, (8, 40), (10, 60), seed=11))
    assert np.array_equal(first.increments, a[0].increments)  # request i does not depend on n_requests


def test_length_ranges_drawn_per_request():
    rs = list(synth_requests(SynthParams(), 12, (5, 9), (3, 30), seed=2))
    assert all(5 <= r.prompt_tokens <= 9 and 3 <= r.generated_tokens <= 30 for r in rs)
    assert len({(r.prompt_tokens, r.generated_tokens) for r in rs}) > 3
    with pytest.raises(TiersimError):
        next(synth_requests(SynthParams(), 1, (9, 5), 10, seed=0))


def test_sinks_get_far_more_than_average(long_request):
    r = long_request
    for t in (100, 300, r.steps - 1):
        row = r.row(t)
        average = 1.0 / row.size
        assert row[0] > 0.1 and row[0] > 20 * average
        assert row[:4].mean() > 10 * average
        assert row[P: P + 4].mean() > 3 * average  # first generated tokens are sinks too


def test_recency_profile(long_request):
    r = long_request
    row = r.row(r.steps - 1).astype(np.float64)
    by_distance = row[::-1]
    assert by_distance[:16].mean() > by_distance[16:64].mean() > by_distance[128:512].mean()
    assert by_distance[:64].sum() > 0.15


def test_mass_is_concentrated(long_request):
    r = long_request
    for t in (200, r.steps - 1):
        row = np.sort(r.row(t))[::-1]
        assert row[: row.size // 5].sum() > 0.7  # uniform would give 0.2


def overlap_at(r: Request, lag: int, k: int, rng: np.random.Generator) -> tuple[float, float]:
    """Mean top-k overlap of rows lag apart (outside sinks and the recent 128), and a shuffled baseline."""
    same, shuffled = [], []
    for t in range(200, r.steps - lag, 50):
        middle = np.r_[4: r.prompt_tokens, r.prompt_tokens + 4: r.prompt_tokens + t - 128]
        a, b = r.row(t)[middle], r.row(t + lag)[middle]
        top_a = set(np.argpartition(a, -k)[-k:])
        same.append(len(top_a & set(np.argpartition(b, -k)[-k:])) / k)
        shuffled.append(len(top_a & set(np.argpartition(rng.permutation(b), -k)[-k:])) / k)
    return float(np.mean(same)), float(np.mean(shuffled))


def test_heavy_hitters_persist(long_request):
    same, shuffled = overlap_at(long_request, 64, 16, np.random.default_rng(0))
    assert same > 0.6
    assert same > 5 * shuffled


def test_heavy_hitter_lifetime_controls_persistence():
    short = synth_request(SynthParams(heavy_lifetime_steps=8.0), P, G, 0)
    long = synth_request(SynthParams(heavy_lifetime_steps=float("inf")), P, G, 0)
    rng = np.random.default_rng(0)
    assert overlap_at(short, 64, 16, rng)[0] + 0.2 < overlap_at(long, 64, 16, rng)[0]


def test_params_validated():
    for bad in ({"sink_mass": 1.5}, {"sink_mass": 0.5, "recency_mass": 0.4, "heavy_mass": 0.2},
                {"recency_scale_tokens": 0}, {"heavy_lifetime_steps": -1.0}, {"vocab_size": 0},
                {"sink_tokens": -1}, {"sink_decay": 0.0}, {"background_concentration": 0.0},
                {"heavy_sigma": float("nan")}):
        with pytest.raises(TiersimError):
            SynthParams(**bad)
    assert SynthParams().background_mass == pytest.approx(0.15)


@settings(max_examples=25, deadline=None)
@given(p=st.integers(1, 20), g=st.integers(0, 30), seed=st.integers(0, 2**32 - 1),
       sink=st.floats(0, 0.5), recency=st.floats(0, 0.5), heavy_fraction=st.floats(0, 1),
       sink_tokens=st.integers(0, 6))
def test_any_params_give_valid_rows(p, g, seed, sink, recency, heavy_fraction, sink_tokens):
    params = SynthParams(sink_mass=sink, recency_mass=recency, heavy_mass=0.0 if sink + recency > 1 else
                         min(0.3, 1 - sink - recency), heavy_fraction=heavy_fraction, sink_tokens=sink_tokens)
    r = synth_request(params, p, g, seed)
    check_rows(r, 1e-5)
    assert float(r.prefill.sum(dtype=np.float64)) == pytest.approx(p, rel=1e-5)


def test_write_synth_trace_round_trip(tmp_path):
    params = SynthParams(heavy_fraction=0.1)
    path = write_synth_trace(tmp_path / "s.trace", params, 3, 16, (20, 40), seed=9)
    trace = read_trace(path)
    trace.verify()
    assert trace.model["id"] == "synthetic" and trace.increments_dtype == "float16"
    meta = trace.metadata["synthetic"]
    assert meta["seed"] == 9 and meta["heavy_fraction"] == 0.1 and meta["gen_tokens"] == [20, 40]
    assert SynthParams(**{k: meta[k] for k in SynthParams.__dataclass_fields__}) == params
    expected = list(synth_requests(params, 3, 16, (20, 40), seed=9, dtype=np.float16))
    assert len(trace) == 3
    for got, want in zip(trace, expected):
        assert np.array_equal(got.increments, want.increments)
        assert np.array_equal(got.token_ids, want.token_ids)
        check_rows(got, 2e-3)
