"""Fitting the synthetic generator to a captured trace: `tiersim synth --like` against the shipped default trace."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from tiersim.cli import cli
from tiersim.errors import TiersimError
from tiersim.traces.default import small_trace_path
from tiersim.traces.fit import (
    FIT_FIELDS,
    FitReport,
    _from_vector,
    _to_vector,
    fit_synth_params,
    objective,
    sink_shape,
)
from tiersim.traces.format import Request, read_trace
from tiersim.traces.stats import STAT_KEYS, inspect_requests, inspect_trace
from tiersim.traces.synth import SynthParams, synth_request, write_synth_trace


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    """The shipped SmolLM2-135M capture; a synthetic stand-in (with a warning, not a skip) only if it is missing."""
    try:
        return small_trace_path()
    except TiersimError:
        warnings.warn("traces/data/gsm16-512.tstrace is missing: fitting a synthetic stand-in instead", stacklevel=1)
        path = tmp_path_factory.mktemp("standin") / "standin.tstrace"
        params = SynthParams(sink_mass=0.3, generated_sink_share=0.0, recency_mass=0.45, heavy_fraction=0.02,
                             heavy_mass=0.2, heavy_lifetime_steps=400.0, background_jitter=0.8)
        return write_synth_trace(path, params, 16, (90, 110), 512, seed=123)


@pytest.fixture(scope="module")
def fitted(captured, tmp_path_factory):
    """One `synth --like` run: fit report (JSON file and table) and a 16-request synthetic trace at the captured lengths."""
    tr = read_trace(captured)
    prompt = round(float(np.mean([r.prompt_tokens for r in tr])))
    gen = int(np.median([r.generated_tokens for r in tr]))
    out_dir = tmp_path_factory.mktemp("fit")
    out, report = out_dir / "like.tstrace", out_dir / "fit.json"
    result = CliRunner().invoke(cli, ["synth", "--like", str(captured), "--requests", "16", "--prompt-tokens", str(prompt),
                                      "--gen-tokens", str(gen), "--seed", "11", "--out", str(out), "--json", str(report)])
    assert result.exit_code == 0, result.output
    return {"trace": tr, "out": read_trace(out), "report": json.loads(report.read_text()), "output": result.output,
            "prompt": prompt, "gen": gen}


def test_synthetic_matches_captured_top20_and_persistence_within_10_percent(fitted):
    captured = inspect_trace(fitted["trace"], policy=None)["aggregate"]
    synthetic = inspect_trace(fitted["out"], policy=None)["aggregate"]
    assert synthetic["requests"] == 16
    for key in ("top20_mass", "heavy_persistence"):
        assert captured[key] is not None and synthetic[key] is not None
        assert abs(synthetic[key] - captured[key]) / captured[key] < 0.10, (key, captured[key], synthetic[key])


def test_fit_report_compares_every_statistic(fitted):
    report, tr = fitted["report"], fitted["trace"]
    captured = inspect_trace(tr, policy=None)["aggregate"]
    rows = {r["statistic"]: r for r in report["statistics"]}
    assert list(rows) == list(STAT_KEYS)
    for key, row in rows.items():
        assert row["captured"] == pytest.approx(captured[key])
        assert row["relative_error"] == pytest.approx((row["synthetic"] - row["captured"]) / row["captured"])
    assert abs(rows["top20_mass"]["relative_error"]) < 0.10 and abs(rows["heavy_persistence"]["relative_error"]) < 0.10
    assert report["validation_requests"] == len(tr) and 1 <= report["evaluations"] <= 120 + len(FIT_FIELDS)
    assert report["fitted_fields"] == list(FIT_FIELDS)
    params = SynthParams(**report["params"])  # valid parameters
    assert params.vocab_size == max(int(r.token_ids.max()) for r in tr) + 1
    assert params != SynthParams(vocab_size=params.vocab_size)
    for line in ("top20_mass", "heavy_persistence", "relative error", "captured", "synthetic"):
        assert line in fitted["output"]
    assert f"{rows['top20_mass']['captured']:.4f}" in fitted["output"]


def test_like_writes_the_requested_lengths_with_the_fitted_params(fitted):
    out = fitted["out"]
    assert len(out) == 16
    assert {(r.prompt_tokens, r.generated_tokens) for r in out} == {(fitted["prompt"], fitted["gen"])}
    assert out.metadata["synthetic"]["sink_mass"] == pytest.approx(fitted["report"]["params"]["sink_mass"])


def test_longer_chains_from_fitted_params(fitted):
    """The point of the fit: thousands of tokens where the capture has hundreds, with the same concentration."""
    params = SynthParams(**fitted["report"]["params"])
    long = synth_request(params, fitted["prompt"], 4 * fitted["gen"], np.random.default_rng(0))
    stats = inspect_requests([long], policy=None)["aggregate"]
    captured = fitted["report"]["statistics"][1]["captured"]  # top20_mass
    assert long.steps == 4 * fitted["gen"] - 1
    assert abs(stats["top20_mass"] - captured) / captured < 0.15


def test_vector_round_trip():
    p = SynthParams(sink_mass=0.3, recency_mass=0.4, heavy_mass=0.2, heavy_fraction=0.03, heavy_lifetime_steps=500.0,
                    background_concentration=2.0, background_jitter=0.7)
    back = _from_vector(_to_vector(p), p)
    for name in FIT_FIELDS:
        assert getattr(back, name) == pytest.approx(getattr(p, name), rel=1e-6), name
    wild = _from_vector(np.array([40.0, 40.0, 40.0, 99.0, 99.0, -99.0, -99.0]), p)  # clipped, still valid
    assert wild.sink_mass + wild.recency_mass + wild.heavy_mass <= 1.0
    assert wild.heavy_fraction <= 0.5 and wild.heavy_lifetime_steps <= 1e5 and wild.background_jitter >= 0


def test_sink_shape_by_hand():
    # P = 4, sinks = 2: positions 0, 1 get 0.4, 0.1 in every row; from row 2 on (when both exist and are
    # no longer the query) generated sinks 4, 5 get 0.05 each; the query itself takes the rest
    rows = np.zeros((4, 8))
    for t in range(4):
        rows[t, :2] = [0.4, 0.1]
        rows[t, 4 + t] = 1.0 - 0.5 - (0.1 if t >= 2 else 0.0)
        if t >= 2:
            rows[t, [4, 5]] += 0.05
    ids = np.arange(9)
    r = Request.from_dense(4, ids, np.ones(4, np.float32), rows.astype(np.float32))
    share, decay = sink_shape([r], 2)
    assert share == pytest.approx(0.2 / (4 * 0.5 + 0.2), rel=1e-6)
    assert decay == pytest.approx(0.1 / 0.4, rel=1e-6)


def test_objective_and_report_helpers():
    stats = dict.fromkeys(STAT_KEYS, 0.5)
    assert objective(stats, stats) == 0.0
    assert objective({**stats, "top20_mass": 0.55}, stats) == pytest.approx(4 * 0.1**2)
    assert objective({**stats, "heavy_persistence": None}, stats) == 100.0
    report = FitReport(SynthParams(), {"top20_mass": 0.5, "heavy_persistence": None}, {"top20_mass": 0.6}, 1, 0.0, 1, 1, 0.0)
    assert report.relative_error("top20_mass") == pytest.approx(0.2)
    assert report.relative_error("heavy_persistence") is None


def test_fit_refuses_empty_input(tmp_path):
    with pytest.raises(TiersimError, match="no requests"):
        fit_synth_params([])
    result = CliRunner().invoke(cli, ["synth", "--like", str(tmp_path / "none.tstrace"), "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "no such trace file" in result.output
    assert not (tmp_path / "x").exists()
