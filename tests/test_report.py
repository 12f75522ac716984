"""tiersim report and simulate plots: the Pareto front by hand, the plots' labels and lines (one per swept value),
legends outside the data, PNG/SVG/PDF files, the Markdown tables, bad input."""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET

import matplotlib.colors
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from tiersim.cli import cli
from tiersim.errors import TiersimError
from tiersim.sim import SimConfig, simulate
from tiersim.specs import hardware_spec, model_spec
from tiersim.studies.plots import breakdown_figure, links_figure, memory_figure, plot_links, write_plots
from tiersim.studies.report import (
    best_within,
    line_keys,
    load_ok_rows,
    occupancy_figure,
    overhead_figure,
    pareto_figure,
    pareto_mask,
    write_report,
)
from tiersim.studies.sweep import parse_grid, run_sweep
from tiersim.traces.format import write_trace
from tiersim.traces.synth import SynthParams, synth_request


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    params = SynthParams()
    requests = [synth_request(params, 20, g, seed) for seed, g in enumerate((150, 200, 240))]
    write_trace(folder / "tiny.tstrace", requests, model={"id": "synthetic", "shape": {}}, generation={},
                metadata={"synthetic": params.to_dict()})
    grid = parse_grid({"model-spec": ["r1-qwen-7b"], "gen-tokens": [200], "steps": [50], "trace": ["tiny.tstrace"],
                       "hardware": ["h200-sxm", "rtx4090"], "batch": [2, 8],
                       "strategy": ["prefetch-layer", "cpu-attention", "evict-only"], "hbm-ratio": [0.3, 0.7],
                       "window": [16], "interval": [16]},  # short chains that still get tiered
                      base_dir=folder)
    out = folder / "results.parquet"
    run_sweep(grid, out, workers=1)
    failing = parse_grid({"model-spec": ["r1-qwen-7b"], "trace": ["missing.tstrace"], "batch": [2]}, base_dir=folder)
    run_sweep(failing, out, workers=1, resume=True)
    return out


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_pareto_front_by_hand():
    overhead = np.array([0.0, 1.0, 2.0, 3.0, 1.0, 2.0])
    saved = np.array([1.0, 0.5, 3.0, 2.0, 2.0, 3.0])
    # 1 is beaten by 0, 3 by 2; 5 ties 2 exactly and is kept once.
    assert pareto_mask(overhead, saved).tolist() == [True, False, True, False, True, False]
    assert pareto_mask(np.array([5.0]), np.array([-1.0])).tolist() == [True]


def test_front_and_budget_table_leave_out_lossy_strategies(results):
    ok, failed, version = load_ok_rows(results)
    assert len(ok) == 24 and len(failed) == 1 and version is not None
    assert not ok.loc[ok["strategy"] == "evict-only", "front"].any()
    for _, sub in ok.groupby("hardware_name"):
        exact = sub[sub["strategy"] != "evict-only"]
        front = exact[exact["front"]]
        # No lossless point beats a front point on both axes.
        for _, f in front.iterrows():
            assert not ((exact["overhead_pct"] < f["overhead_pct"]) & (exact["hbm_saved_gb"] >= f["hbm_saved_gb"])).any()
        # The lowest-overhead point (the larger saving among ties) and the largest saving are on it.
        lowest = exact[exact["overhead_pct"] == exact["overhead_pct"].min()]
        assert lowest.loc[lowest["hbm_saved_gb"].idxmax(), "front"]
        top = exact[exact["hbm_saved_gb"] == exact["hbm_saved_gb"].max()]
        assert top.loc[top["overhead_pct"].idxmin(), "front"]
        assert len(front) >= 3
    best = best_within(ok, 5.0)
    for _, b in best.iterrows():
        same = ok[(ok["hardware_name"] == b["hardware_name"]) & (ok["batch"] == b["batch"])
                  & (ok["strategy"] != "evict-only") & (ok["overhead_pct"] <= 5.0)]
        assert b["hbm_saved_gb"] == same["hbm_saved_gb"].max()


def test_plots_have_units_legends_and_the_capacity_line(results):
    ok, _, _ = load_ok_rows(results)
    fig = pareto_figure(ok)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "decode overhead vs no tiering (%)" and ax.get_ylabel() == "HBM saved at peak (GB)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"prefetch-layer", "cpu-attention", "evict-only (drops DDR attention)", "Pareto front (lossless)"} <= set(labels)
    assert [a.get_title() for a in fig.axes if a.get_visible()] == ["r1-qwen-7b on h200-sxm", "r1-qwen-7b on rtx4090"]
    fig = overhead_figure(ok)
    assert fig.axes[0].get_xlabel() == "batch (concurrent sequences)"
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["2", "8"]
    fig = occupancy_figure(ok)
    for ax, capacity in zip(fig.axes, (141.0, 24.0)):
        assert ax.get_ylabel() == "peak HBM occupancy (GB = 1e9 B)"
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert list(lines[f"HBM capacity {capacity:g} GB"].get_ydata()) == [capacity, capacity]
        assert "no tiering (peak)" in lines and "prefetch-layer (peak)" in lines


def test_report_writes_plots_and_tables_with_every_row(results, tmp_path):
    paths = write_report(results, tmp_path / "rep")
    assert [p.name for p in paths] == ["pareto.png", "overhead_vs_batch.png", "hbm_occupancy.png", "report.md"]
    for p in paths[:3]:
        width, height = png_size(p)
        assert width >= 1200 and height >= 450, (p.name, width, height)  # two panels side by side
        assert p.stat().st_size > 20_000
    md = paths[3].read_text()
    df = pq.read_table(results).to_pandas()
    ok, failed = df[df["status"] == "ok"], df[df["status"] == "failed"]
    assert "25 points, 24 ok, 1 failed" in md and "![HBM saved against overhead](pareto.png)" in md
    sections = md.split("\n## ")
    every = next(s for s in sections if s.startswith("All points (24)"))
    header = next(line for line in every.splitlines() if line.startswith("| point"))
    names = [c.strip() for c in header.strip("|").split("|")]
    rows = [line for line in every.splitlines() if line.startswith("| ") and line != header]
    assert len(rows) == 24
    for (_, r), line in zip(ok.iterrows(), rows):
        cells = dict(zip(names, (c.strip() for c in line.strip("|").split("|"))))
        assert {k: cells[k] for k in ("point", "model", "hardware", "batch", "strategy", "hbm_ratio", "trace")} == {
            "point": r["point_id"], "model": "r1-qwen-7b", "hardware": r["hardware_name"], "batch": str(r["batch"]),
            "strategy": r["strategy"], "hbm_ratio": f"{r['hbm_ratio']:g}", "trace": "tiny.tstrace"}
        v = r["overhead_pct"]
        assert cells["overhead %"] == (f"{v:.2g}" if v != 0 and abs(v) < 0.1 else f"{v:,.2f}")
        assert cells["fits"] == ("yes" if r["fits"] else "no")
    front = next(s for s in sections if s.startswith("Pareto front"))
    n_front = int(load_ok_rows(results)[0]["front"].sum())
    assert front.startswith(f"Pareto front ({n_front} points")
    assert sum(line.startswith("| r1-qwen-7b") for line in front.splitlines()) == n_front
    bad = next(s for s in sections if s.startswith("Failed points (1)"))
    assert failed["point_id"].iloc[0] in bad and "TraceError: " in bad and "missing.tstrace" in bad


def test_report_cli_and_bad_input(results, tmp_path):
    result = CliRunner().invoke(cli, ["report", str(results), "--out", str(tmp_path / "rep"), "--overhead-budget", "1"])
    assert result.exit_code == 0, result.output
    assert "within 1% overhead" in (tmp_path / "rep" / "report.md").read_text()
    (tmp_path / "x.parquet").write_text("not parquet")
    table = pq.read_table(results)
    pq.write_table(table.filter(pc.equal(table.column("status"), "failed")), tmp_path / "failed.parquet")
    pq.write_table(table.drop_columns(["point_id"]), tmp_path / "nopoint.parquet")
    for name, needle in (("x.parquet", "not a readable parquet file"), ("none.parquet", "not a readable parquet file"),
                         ("failed.parquet", "no successful point to report (1 failed; first error: TraceError"),
                         ("nopoint.parquet", "not a tiersim sweep results file (no point_id column)")):
        result = CliRunner().invoke(cli, ["report", str(tmp_path / name), "--out", str(tmp_path / name / "o")])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and needle in lines[0], result.output
    with pytest.raises(TiersimError, match="no successful point"):
        write_report(tmp_path / "failed.parquet", tmp_path / "o")


# -- one line per swept value, legends outside, every format ---------------------------------------
def check_file(path) -> None:
    """A real file of the format its suffix names: PNG signature, SVG that parses with an <svg> root, %PDF header."""
    data = path.read_bytes()
    if path.suffix == ".png":
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    elif path.suffix == ".svg":
        assert ET.fromstring(data).tag == "{http://www.w3.org/2000/svg}svg"
    else:
        assert path.suffix == ".pdf" and data[:5] == b"%PDF-" and data.rstrip().endswith(b"%%EOF")
    assert len(data) > 5_000, path


def legends_outside(fig) -> None:
    """Every visible axes' legend lies wholly to the right of its data area."""
    fig.canvas.draw()
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert axes
    for ax in axes:
        assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1


def test_sweep_over_beta_draws_one_line_per_beta(results):
    ok, _, _ = load_ok_rows(results)
    assert line_keys(ok) == ["hbm_ratio"]  # hardware varies too, but it is the panel
    colours = {"prefetch-layer": "C0", "cpu-attention": "C2", "evict-only": "C3"}
    for make, column in ((overhead_figure, "overhead_pct"), (occupancy_figure, "hbm_peak_gb")):
        fig = make(ok)
        for ax, hardware in zip(fig.axes, ("h200-sxm", "rtx4090")):
            assert ax.get_title() == f"r1-qwen-7b on {hardware}"
            assert ax.get_ylim()[0] <= 0  # magnitudes from zero
            texts = [t.get_text() for t in ax.get_legend().get_texts()]
            assert "β=0.3" in texts and "β=0.7" in texts
            for strategy, colour in colours.items():
                drawn = [line for line in ax.get_lines() if matplotlib.colors.same_color(line.get_color(), colour)]
                assert len(drawn) == 2, (column, strategy)  # one per β, not a median over β
                assert len({(line.get_linestyle(), line.get_marker()) for line in drawn}) == 2
                expected = {tuple(s.sort_values("batch")[column]) for _, s in
                            ok[(ok["hardware_name"] == hardware) & (ok["strategy"] == strategy)].groupby("hbm_ratio")}
                assert {tuple(line.get_ydata()) for line in drawn} == expected
                assert all(list(line.get_xdata()) == [2, 8] for line in drawn)
        legends_outside(fig)
    legends_outside(pareto_figure(ok))


def test_report_in_svg_and_pdf(results, tmp_path):
    paths = write_report(results, tmp_path / "rep", formats=("svg", "pdf"))
    assert [p.name for p in paths] == ["pareto.svg", "pareto.pdf", "overhead_vs_batch.svg", "overhead_vs_batch.pdf",
                                       "hbm_occupancy.svg", "hbm_occupancy.pdf", "report.md"]
    for p in paths[:-1]:
        check_file(p)
    md = paths[-1].read_text()
    assert "![HBM saved against overhead](pareto.svg)" in md and ".png" not in md
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == sorted(p.name for p in paths)  # no temporaries left


@pytest.mark.parametrize("formats", [("jpg",), ("png", "eps"), (), ("PNG",)])
def test_bad_format_names_the_flag(results, tmp_path, formats):
    with pytest.raises(TiersimError, match="^--format: .*accepted: png, svg, pdf$"):
        write_report(results, tmp_path / "rep", formats=formats)
    assert not (tmp_path / "rep").exists()  # refused before anything is written


@pytest.fixture(scope="module")
def sim_result(tmp_path_factory):
    path = tmp_path_factory.mktemp("simplots") / "small.tstrace"
    params = SynthParams()
    write_trace(path, [synth_request(params, 40, g, seed) for seed, g in enumerate((250, 330))],
                model={"id": "synthetic", "shape": {}}, generation={}, metadata={})
    return simulate(SimConfig(model=model_spec("r1-qwen-7b"), hardware=hardware_spec("h200-sxm"), trace=path,
                              batch=8, gen_tokens=300, steps=200), workers=1)


def test_simulate_plots_in_every_format_legends_outside_axes_from_zero(sim_result, tmp_path):
    paths = write_plots(sim_result, tmp_path / "sim", formats=("png", "svg", "pdf"))
    assert [p.name for p in paths] == [f"{n}.{f}" for n in ("memory", "step_breakdown", "links") for f in ("png", "svg", "pdf")]
    for p in paths:
        check_file(p)
    assert write_plots(sim_result, tmp_path / "default") == [tmp_path / "default" / f"{n}.png"
                                                              for n in ("memory", "step_breakdown", "links")]
    for make in (memory_figure, breakdown_figure, links_figure):
        fig = make(sim_result)
        ax = fig.axes[0]
        assert ax.get_xlim()[0] == 0 and ax.get_ylim()[0] == 0
        legends_outside(fig)
    with pytest.raises(TiersimError, match="--format: 'gif'"):
        plot_links(sim_result, tmp_path / "x.png", formats=("gif",))
