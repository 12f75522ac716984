"""Importance statistics, `tiersim inspect`, its export and its plot: hand-computed cases, a brute-force reference, files."""

from __future__ import annotations

import json
import math
import struct
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tiersim.cli import cli
from tiersim.errors import TiersimError
from tiersim.policy import TIER_NAMES, PolicyConfig, replay
from tiersim.traces.format import Request, read_trace, write_trace
from tiersim.traces.plots import importance_grid, plot_request, request_figure
from tiersim.traces.stats import (
    STAT_KEYS,
    StatsParams,
    aggregate,
    concentration,
    export_npz,
    inspect_trace,
    request_stats,
    tier_timeline,
)
from tiersim.traces.synth import SynthParams, synth_request, write_synth_trace


def dense_request(matrix, prompt_tokens: int) -> Request:
    matrix = np.asarray(matrix, dtype=np.float32)
    ids = np.arange(prompt_tokens + matrix.shape[0] + 1) % 7
    return Request.from_dense(prompt_tokens, ids, np.ones(prompt_tokens, np.float32), matrix)


def uniform_request(prompt_tokens: int, steps: int) -> Request:
    rows = np.zeros((steps, prompt_tokens + steps))
    for t in range(steps):
        rows[t, : prompt_tokens + t + 1] = 1.0 / (prompt_tokens + t + 1)
    return dense_request(rows, prompt_tokens)


def test_uniform_two_steps_by_hand():
    """P=2: row 0 = 1/3 on 0..2, row 1 = 1/4 on 0..3, so received = (7, 7, 7, 3)/12 over 2 rows."""
    r = uniform_request(2, 2)
    s = request_stats(r, StatsParams(sinks=1, window=2, interval=64))
    assert (s["prompt_tokens"], s["generated_tokens"], s["steps"], s["positions"]) == (2, 3, 2, 4)
    assert s["top5_mass"] == pytest.approx(7 / 24)  # ceil(0.05 * 4) = 1 position
    assert s["top20_mass"] == pytest.approx(7 / 24)  # ceil(0.8) = 1
    assert s["top50_mass"] == pytest.approx(14 / 24)  # 2 positions
    # sorted (3, 7, 7, 7)/12, total 2: sum (2i - 5) x_i = (-9 - 7 + 7 + 21)/12 = 1, / (4 * 2) = 1/8
    assert s["gini"] == pytest.approx(1 / 8)
    assert s["sink_mass"] == pytest.approx((1 / 3 + 1 / 4) / 2)
    assert s["recency_mass"] == pytest.approx((2 / 3 + 2 / 4) / 2)  # last 2 positions of each row
    assert s["heavy_persistence"] is None and s["persistence_slots"] == 0  # no complete pair of intervals


def test_single_uniform_row_has_no_inequality():
    r = uniform_request(99, 1)  # one row over 100 positions
    s = request_stats(r, StatsParams(sinks=4, window=10))
    assert (s["top5_mass"], s["top20_mass"], s["top50_mass"]) == pytest.approx((0.05, 0.20, 0.50))
    assert s["gini"] == pytest.approx(0.0, abs=1e-12)
    assert s["sink_mass"] == pytest.approx(0.04)
    assert s["recency_mass"] == pytest.approx(0.10)
    assert request_stats(r)["recency_mass"] == pytest.approx(1.0)  # row shorter than the 128 window


def test_all_attention_on_one_position():
    p, steps = 5, 20
    rows = np.zeros((steps, p + steps))
    rows[:, 0] = 1.0
    s = request_stats(dense_request(rows, p))
    assert s["top5_mass"] == s["top20_mass"] == s["top50_mass"] == pytest.approx(1.0)
    assert s["gini"] == pytest.approx((p + steps - 1) / (p + steps))
    assert s["sink_mass"] == pytest.approx(1.0)


def test_concentration_refuses_no_mass():
    with pytest.raises(TiersimError, match="no attention mass"):
        concentration(np.zeros(5))


# -- heavy-hitter persistence ---------------------------------------------------------------------
P, DELTA, WINDOW = 8, 4, 4
PARAMS = StatsParams(sinks=1, window=WINDOW, interval=DELTA, heavy_fraction=0.25)


def hitter_rows(steps: int, heavy_of_interval) -> np.ndarray:
    """Rows with 0.1 on the query itself and given weights on heavy positions per interval."""
    rows = np.zeros((steps, P + steps))
    for t in range(steps):
        rows[t, P + t] = 0.1
        for pos, w in heavy_of_interval(t // DELTA).items():
            rows[t, pos] += w
    return rows


def test_fixed_heavy_hitters_persist_fully():
    # pairs (0,1), (1,2), (2,3): candidates 1..4, 1..8, 1..12, so k = 1, 2, 3 (ceil(0.25 n))
    r = dense_request(hitter_rows(16, lambda j: {2: 0.3, 5: 0.2, 7: 0.1}), P)
    s = request_stats(r, PARAMS)
    assert s["persistence_slots"] == 1 + 2 + 3
    assert s["heavy_persistence"] == 1.0


def test_rotating_heavy_hitters_do_not_persist():
    """Each interval a new old token is the heavy hitter: cumulative scores would keep the first ones on top."""
    r = dense_request(hitter_rows(16, lambda j: {1 + 3 * j: 0.5, 2 + 3 * j: 0.4}), P)
    s = request_stats(r, StatsParams(sinks=1, window=WINDOW, interval=DELTA, heavy_fraction=0.01))
    assert s["persistence_slots"] == 3  # k = 1 for each pair
    assert s["heavy_persistence"] == 0.0


def test_half_of_the_hitters_persist():
    # k = 2 in pair (1,2): interval 1 tops {2, 6}, interval 2 tops {2, 7} -> 1 of 2; pair (0,1): {2} and {2}
    heavy = {0: {2: 0.5}, 1: {2: 0.5, 6: 0.4}, 2: {2: 0.5, 7: 0.4}}
    r = dense_request(hitter_rows(12, lambda j: heavy[j]), P)
    s = request_stats(r, PARAMS)
    assert s["persistence_slots"] == 1 + 2
    assert s["heavy_persistence"] == pytest.approx(2 / 3)


def test_independent_rows_give_chance_persistence():
    """Rows without memory: overlap of top-20% sets is about 20%, far from the 1 of cumulative scores."""
    rng = np.random.default_rng(3)
    p, steps = 400, 640
    rows = rng.exponential(size=(steps, p + steps)) * (np.arange(p + steps)[None, :] <= p + np.arange(steps)[:, None])
    s = request_stats(dense_request(rows, p))
    assert 0.15 < s["heavy_persistence"] < 0.26


# -- brute-force reference on random requests --------------------------------------------------------
def reference_stats(r: Request, params: StatsParams) -> dict:
    """Every statistic from the dense matrix, loop by loop, as the module docstring defines it."""
    d = r.dense(np.float64)
    s, n = d.shape
    p = r.prompt_tokens
    c = d.sum(axis=0)
    order = sorted(c, reverse=True)
    out = {f"top{x}_mass": sum(order[: math.ceil(x / 100 * n)]) / c.sum() for x in (5, 20, 50)}
    asc = sorted(c)
    out["gini"] = sum((2 * (i + 1) - n - 1) * v for i, v in enumerate(asc)) / (n * c.sum())
    out["sink_mass"] = np.mean([d[t, : params.sinks].sum() / d[t].sum() for t in range(s)])
    out["recency_mass"] = np.mean([d[t, max(0, p + t + 1 - params.window): p + t + 1].sum() / d[t].sum()
                                   for t in range(s)])
    hits = slots = 0
    delta = params.interval
    for j in range(s // delta - 1):
        cand = list(range(params.sinks, p + j * delta - params.window + 1))
        if not cand:
            continue
        k = math.ceil(params.heavy_fraction * len(cand))
        a_att = d[j * delta:(j + 1) * delta].sum(axis=0)
        b_att = d[(j + 1) * delta:(j + 2) * delta].sum(axis=0)
        top_a = set(sorted(cand, key=lambda i: (-a_att[i], i))[:k])  # noqa: B023
        top_b = set(sorted(cand, key=lambda i: (-b_att[i], i))[:k])  # noqa: B023
        hits += len(top_a & top_b)
        slots += k
    out["heavy_persistence"] = hits / slots if slots else None
    return out


@settings(max_examples=40, deadline=None)
@given(p=st.integers(1, 30), steps=st.integers(1, 90), sinks=st.integers(0, 5), window=st.integers(0, 40),
       interval=st.integers(1, 20), fraction=st.sampled_from([0.05, 0.2, 0.5, 1.0]), seed=st.integers(0, 10**6))
def test_streaming_statistics_equal_the_dense_reference(p, steps, sinks, window, interval, fraction, seed):
    rng = np.random.default_rng(seed)
    rows = rng.exponential(size=(steps, p + steps)) ** 3  # uneven, like attention
    rows *= np.arange(p + steps)[None, :] <= p + np.arange(steps)[:, None]
    r = dense_request(rows, p)
    params = StatsParams(sinks=sinks, window=window, interval=interval, heavy_fraction=fraction)
    got, want = request_stats(r, params), reference_stats(r, params)
    for key in STAT_KEYS:
        if want[key] is None:
            assert got[key] is None
        else:
            assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    for x in (5, 20, 50):
        assert 0 < got[f"top{x}_mass"] <= 1
    assert got["top5_mass"] <= got["top20_mass"] <= got["top50_mass"]
    assert 0 <= got["gini"] < 1


def test_params_validated():
    with pytest.raises(TiersimError, match="interval"):
        StatsParams(interval=0)
    with pytest.raises(TiersimError, match="heavy_fraction"):
        StatsParams(heavy_fraction=0.0)
    with pytest.raises(TiersimError, match="no decode steps"):
        request_stats(Request(prompt_tokens=3, generated_tokens=1, token_ids=np.zeros(4, np.int32),
                              prefill=np.ones(3, np.float32), increments=np.zeros(0, np.float32)))
    assert StatsParams.from_policy(PolicyConfig(sinks=2, window=16, interval=8)) == StatsParams(2, 16, 8, 0.2)


def test_aggregate_is_the_mean_over_requests():
    rows = [{"prompt_tokens": 10, "generated_tokens": 20, **dict.fromkeys(STAT_KEYS, 0.2)},
            {"prompt_tokens": 5, "generated_tokens": 40, **dict.fromkeys(STAT_KEYS, 0.4), "heavy_persistence": None}]
    a = aggregate(rows)
    assert (a["requests"], a["prompt_tokens"], a["generated_tokens"]) == (2, 15, 60)
    assert a["top20_mass"] == pytest.approx(0.3)
    assert a["heavy_persistence"] == pytest.approx(0.2)  # the request without one is left out


def test_statistics_of_a_long_request_take_seconds():
    r = synth_request(SynthParams(), 256, 4096, 0)
    start = time.perf_counter()
    s = request_stats(r)
    assert time.perf_counter() - start < 3.0  # ~0.25 s here; a dense steps x tokens pass would be far slower
    assert s["positions"] == 256 + 4095
    assert s["top20_mass"] > 0.5 and s["heavy_persistence"] > 0.5  # synthetic hitters are long-lived


def test_tier_timeline_matches_the_schedule():
    r = synth_request(SynthParams(), 32, 400, 1)
    schedule = replay(r, PolicyConfig())
    timeline = tier_timeline(schedule, 64)
    assert timeline["steps"] == list(range(0, 399, 64))
    for j, t in enumerate(timeline["steps"]):
        assert sum(timeline["tokens"][n][j] for n in TIER_NAMES) == 32 + t + 1  # every cached token has a tier
        assert sum(timeline["mass_share"][n][j] for n in TIER_NAMES) == pytest.approx(1.0)
    assert timeline["final_tokens"] == dict(zip(TIER_NAMES, schedule.final_counts.tolist()))
    assert timeline["tokens"]["hbm"][0] == 33 and timeline["tokens"]["ddr"][-1] > 0


# -- inspect, export, plot -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "t.tstrace"
    return write_synth_trace(path, SynthParams(heavy_fraction=0.1), 3, (20, 60), (300, 420), seed=4)


def test_inspect_json_keys_and_values(trace_path):
    result = CliRunner().invoke(cli, ["inspect", str(trace_path), "--json", "-", "--hbm-ratio", "0.3"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    tr = read_trace(trace_path)
    assert data["trace_requests"] == 3 and data["model"] == "synthetic"
    assert data["policy"]["hbm_ratio"] == 0.3 and data["stats_params"] == StatsParams().to_dict()
    assert [r["request"] for r in data["requests"]] == [0, 1, 2]
    for i, r in enumerate(data["requests"]):
        req = tr[i]
        assert (r["prompt_tokens"], r["generated_tokens"]) == (req.prompt_tokens, req.generated_tokens)
        assert r["top20_mass"] == pytest.approx(request_stats(req)["top20_mass"])
        assert set(r["tiers"]) == {"steps", "tokens", "mass_share", "final_tokens", "total_mass_share"}
        assert r["tiers"]["final_tokens"] == dict(zip(TIER_NAMES, replay(req, PolicyConfig(hbm_ratio=0.3))
                                                      .final_counts.tolist()))
    agg = data["aggregate"]
    assert agg["requests"] == 3
    assert agg["top20_mass"] == pytest.approx(np.mean([r["top20_mass"] for r in data["requests"]]))
    assert set(STAT_KEYS) <= set(agg)


def test_inspect_table_and_one_request(trace_path):
    result = CliRunner().invoke(cli, ["inspect", str(trace_path), "--request", "1"])
    assert result.exit_code == 0, result.output
    assert "top20" in result.output and "persistence" in result.output and "mean" in result.output
    report = inspect_trace(read_trace(trace_path), PolicyConfig(), request=1)
    assert [r["request"] for r in report["requests"]] == [1]
    assert f"{report['requests'][0]['top20_mass']:.3f}" in result.output


def test_export_round_trip(trace_path, tmp_path):
    out = tmp_path / "raw.npz"
    result = CliRunner().invoke(cli, ["inspect", str(trace_path), "--export", str(out)])
    assert result.exit_code == 0, result.output
    tr = read_trace(trace_path)
    with np.load(out, allow_pickle=False) as z:
        assert sorted(z.files) == sorted(f"{n}_{i}" for i in range(3) for n in ("token_ids", "prefill", "increments"))
        for i, req in enumerate(tr):
            inc = z[f"increments_{i}"]
            assert inc.dtype == np.float32 and inc.shape == (req.steps, req.prompt_tokens + req.steps)
            for t in (0, 1, req.steps // 2, req.steps - 1):
                n = req.prompt_tokens + t + 1
                np.testing.assert_array_equal(inc[t, :n], req.row(t).astype(np.float32))
                assert not inc[t, n:].any()
            np.testing.assert_array_equal(z[f"token_ids_{i}"], req.token_ids)
            np.testing.assert_array_equal(z[f"prefill_{i}"], req.prefill)
    one = tmp_path / "one.npz"
    assert export_npz(tr, one, request=2) == [2]
    with np.load(one) as z:
        assert sorted(z.files) == ["increments_2", "prefill_2", "token_ids_2"]


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_written_with_expected_size(trace_path, tmp_path):
    out = tmp_path / "figs" / "inspect.png"
    result = CliRunner().invoke(cli, ["inspect", str(trace_path), "--plot", str(out), "--request", "2"])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 20_000  # three panels of real content, not an empty canvas
    assert png_size(out) == (1200, 1100)
    [heat_only] = plot_request(read_trace(trace_path)[0], None, tmp_path / "heat.png", dpi=50)
    assert png_size(heat_only) == (600, 200)


def test_plot_in_svg_and_pdf_with_the_legend_outside(trace_path, tmp_path):
    req = read_trace(trace_path)[1]
    schedule = replay(req, PolicyConfig())
    paths = plot_request(req, schedule, tmp_path / "req.png", title="t", formats=("svg", "pdf", "png"))
    assert [p.name for p in paths] == ["req.svg", "req.pdf", "req.png"]
    svg, pdf, png = (p.read_bytes() for p in paths)
    assert ET.fromstring(svg).tag == "{http://www.w3.org/2000/svg}svg"
    assert b"<image" in svg  # the heatmap is embedded as a raster, not 100,000 vector cells
    assert pdf[:5] == b"%PDF-" and pdf.rstrip().endswith(b"%%EOF")
    assert png_size(paths[2]) == (1200, 1100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["req.pdf", "req.png", "req.svg"]  # no temporaries left
    # A suffix that is not a format is kept; the figure's single legend lies right of every panel.
    assert plot_request(req, None, tmp_path / "heat.v2", formats=("pdf",)) == [tmp_path / "heat.v2.pdf"]
    fig = request_figure(req, schedule)
    fig.canvas.draw()
    [legend] = fig.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == [f"end of prompt ({req.prompt_tokens} tokens)", *TIER_NAMES]
    assert all(legend.get_window_extent().x0 >= ax.get_window_extent().x1 for ax in fig.axes)
    assert fig.axes[1].get_ylim()[0] == 0  # tokens per tier from zero
    with pytest.raises(TiersimError, match="^--format: 'jpeg' is not a plot format; accepted: png, svg, pdf$"):
        plot_request(req, None, tmp_path / "bad.png", formats=("png", "jpeg"))
    assert not (tmp_path / "bad.png").exists()


def test_importance_grid_exact_and_binned():
    rows = np.array([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]])
    r = dense_request(rows, 2)
    grid, steps, positions = importance_grid(r, max_bins=10)
    assert steps.tolist() == [0, 1, 2] and positions.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(grid[:3], rows.T[:3], rtol=1e-6)
    assert np.isnan(grid[3, 0]) and grid[3, 1] == pytest.approx(0.4)  # position 3 is after query 0
    grid, steps, positions = importance_grid(r, max_bins=2)
    assert steps.tolist() == [0, 1, 2] and positions.tolist() == [0, 2, 4]
    # bin (positions 2-3, step 0) holds one causal cell, 0.25; (positions 0-1, step 1) holds 0.1 and 0.2
    assert grid[1, 0] == pytest.approx(0.25) and grid[0, 1] == pytest.approx(0.15)
    long = synth_request(SynthParams(), 64, 3000, 2)
    grid, steps, positions = importance_grid(long, max_bins=300)
    assert grid.shape == (300, 300) and steps[-1] == long.steps and positions[-1] == 64 + long.steps
    assert np.nanmax(grid) <= 1.0 and np.isnan(grid[-1, 0]) and np.isfinite(grid[0]).all()


def test_bad_input_is_one_line(trace_path, tmp_path):
    runner = CliRunner()
    cases = [
        (["inspect", str(tmp_path / "missing.tstrace")], "no such trace file"),
        (["inspect", str(trace_path), "--request", "3"], "request 3 out of range"),
        (["inspect", str(trace_path), "--request", "-1"], "request -1 out of range"),
        (["inspect", str(trace_path), "--window", "-1"], "window must be an integer >= 0"),
    ]
    bad = tmp_path / "bad.tstrace"
    bad.write_bytes(trace_path.read_bytes()[:5000])
    cases.append((["inspect", str(bad)], "truncated"))
    for args, message in cases:
        result = runner.invoke(cli, args)
        assert result.exit_code != 0, args
        assert message in result.output, (args, result.output)
        assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output
    empty = tmp_path / "empty.tstrace"
    write_trace(empty, [], model={"id": "none"}, generation={})
    result = runner.invoke(cli, ["inspect", str(empty)])
    assert result.exit_code != 0 and "no requests" in result.output
