"""Request arrivals and lengths: Poisson, files, presets, and the errors that name the field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tiersim.errors import ConfigError
from tiersim.workload.arrivals import (
    REASONING_PRESETS,
    LengthDist,
    Request,
    length_dist,
    poisson_requests,
    pool_requests,
    read_arrivals,
    read_lengths,
)


def test_poisson_count_and_rate():
    reqs = poisson_requests(4.0, count=20_000, prompt_tokens=100, output_tokens=7, seed=1)
    assert len(reqs) == 20_000 and [r.id for r in reqs[:3]] == [0, 1, 2]
    gaps = np.diff([0.0] + [r.arrival_s for r in reqs])
    assert np.all(gaps >= 0)
    # Mean gap 1/rate within 4 standard errors (exponential: sd = mean).
    assert abs(gaps.mean() - 0.25) < 4 * 0.25 / np.sqrt(len(gaps))
    assert {r.prompt_tokens for r in reqs} == {100} and {r.output_tokens for r in reqs} == {7}


def test_poisson_duration_scales_with_rate():
    slow = poisson_requests(2.0, duration_s=500.0, output_tokens="gsm8k", seed=3)
    fast = poisson_requests(4.0, duration_s=250.0, output_tokens="gsm8k", seed=3)
    # Same seed: the same unit-rate sequence, times scaled by 1/rate, the same lengths.
    assert len(slow) == len(fast)
    assert np.allclose([r.arrival_s for r in slow], [2 * r.arrival_s for r in fast], rtol=1e-12)
    assert [r.output_tokens for r in slow] == [r.output_tokens for r in fast]
    assert all(r.arrival_s < 500.0 for r in slow)
    assert abs(len(slow) - 1000) < 4 * np.sqrt(1000)


@pytest.mark.parametrize("name", sorted(REASONING_PRESETS))
def test_presets_are_lognormal_with_the_stated_median(name):
    d = length_dist(name, "output_tokens")
    assert d.kind == "lognormal" and d.median == REASONING_PRESETS[name] and d.sigma == 0.5
    x = d.sample(np.random.default_rng(0), 40_000)
    assert abs(np.median(x) / REASONING_PRESETS[name] - 1) < 0.02
    assert x.min() >= 16 and x.max() <= 32768
    # sigma: the interquartile ratio of a lognormal is exp(2 * 0.6745 * sigma).
    q1, q3 = np.percentile(x, [25, 75])
    assert abs(q3 / q1 - np.exp(2 * 0.6745 * 0.5)) < 0.03


def test_lengths_from_list_and_file(tmp_path):
    d = length_dist([5, 9], "output_tokens")
    assert set(d.sample(np.random.default_rng(0), 200).tolist()) == {5, 9}
    (tmp_path / "lengths.txt").write_text("10\n20\n\n30\n")
    assert read_lengths(tmp_path / "lengths.txt") == [10, 20, 30]
    (tmp_path / "lengths.csv").write_text("output_tokens,x\n4,a\n8,b\n")
    assert length_dist(str(tmp_path / "lengths.csv"), "output_tokens").values == (4, 8)
    assert length_dist(LengthDist("fixed", (3,)), "x").values == (3,)


def test_pool_requests_have_lengths_and_no_times():
    reqs = pool_requests(5, prompt_tokens=64, output_tokens=[100], seed=2)
    assert reqs == [Request(0.0, 64, 100, i) for i in range(5)]


def test_read_arrivals_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "a.csv"
    csv_path.write_text("arrival_s,prompt_tokens,output_tokens\n0,10,3\n0.5,20,4\n0.5,30,5\n")
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"arrival_s": t, "prompt_tokens": p, "output_tokens": o})
                               for t, p, o in ((0, 10, 3), (0.5, 20, 4), (0.5, 30, 5))))
    expected = [Request(0.0, 10, 3, 0), Request(0.5, 20, 4, 1), Request(0.5, 30, 5, 2)]
    assert read_arrivals(csv_path) == expected
    assert read_arrivals(jsonl) == expected
    # A missing length column is drawn from the distribution given instead.
    (tmp_path / "b.csv").write_text("arrival_s,prompt_tokens\n0,10\n1,20\n")
    assert [r.output_tokens for r in read_arrivals(tmp_path / "b.csv", output_tokens=7)] == [7, 7]


@pytest.mark.parametrize("text, words", [
    ("arrival_s,prompt_tokens\n0,10\n", ["missing column 'output_tokens'"]),
    ("prompt_tokens,output_tokens\n10,3\n", ["missing column 'arrival_s'"]),
    ("arrival_s,prompt_tokens,output_tokens\n1,10,3\n0.5,10,3\n", ["row 2", "'arrival_s'", "must not decrease"]),
    ("arrival_s,prompt_tokens,output_tokens\n0,-4,3\n", ["row 1", "'prompt_tokens'", ">= 1"]),
    ("arrival_s,prompt_tokens,output_tokens\n0,10,2.5\n", ["'output_tokens'", "integers"]),
    ("arrival_s,prompt_tokens,output_tokens\n-1,10,3\n", ["'arrival_s'", ">= 0"]),
    ("arrival_s,prompt_tokens,output_tokens\n", ["no requests"]),
])
def test_bad_arrival_files_name_the_file_and_column(tmp_path, text, words):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        read_arrivals(path)
    assert e.value.field == "arrivals" and str(path) in str(e.value)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("kwargs, field", [
    ({"rate": 0.0, "count": 3}, "rate"),
    ({"rate": -2.0, "count": 3}, "rate"),
    ({"rate": float("inf"), "count": 3}, "rate"),
    ({"rate": 1.0}, "duration_s"),
    ({"rate": 1.0, "count": 3, "duration_s": 2.0}, "duration_s"),
    ({"rate": 1.0, "count": 0}, "count"),
    ({"rate": 1.0, "count": 3, "prompt_tokens": 0}, "prompt_tokens"),
    ({"rate": 1.0, "count": 3, "output_tokens": "gsm9k"}, "output_tokens"),
    ({"rate": 1.0, "count": 3, "output_tokens": [4, -1]}, "output_tokens"),
])
def test_bad_poisson_input_names_the_field(kwargs, field):
    rate = kwargs.pop("rate")
    with pytest.raises(ConfigError) as e:
        poisson_requests(rate, **kwargs)
    assert e.value.field == field and field in str(e.value)


def test_unknown_file_format(tmp_path):
    path = tmp_path / "a.parquet"
    path.write_text("x")
    with pytest.raises(ConfigError, match="use .csv"):
        read_arrivals(path)
    with pytest.raises(ConfigError, match="no such file"):
        read_arrivals(tmp_path / "missing.csv")
