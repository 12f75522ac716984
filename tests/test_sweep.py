"""Sweeps: grid parsing, engines that agree, resume, failure rows, interruption, version and scheduler errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import click
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import tiersim
from tiersim.cli import cli
from tiersim.cli.options import policy_options
from tiersim.cli.simulate import simulate_options
from tiersim.errors import TiersimError
from tiersim.sim import SimConfig, simulate
from tiersim.specs import hardware_spec, model_spec
from tiersim.studies import sweep as sw
from tiersim.studies.sweep import DEFAULTS, WALL_COLUMNS, grid_keys, parse_grid, partial_dir, read_grid, read_results, run_sweep
from tiersim.traces.format import write_trace
from tiersim.traces.synth import SynthParams, synth_request

TINY = {"model": ["r1-qwen-7b"], "gen-tokens": [200], "steps": [50]}


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    params = SynthParams()
    requests = [synth_request(params, 20, g, seed) for seed, g in enumerate((150, 200, 240))]
    write_trace(folder / "tiny.tstrace", requests, model={"id": "synthetic", "shape": {}}, generation={},
                metadata={"synthetic": params.to_dict()})
    return folder


def tiny_grid(trace_dir, **axes):
    return parse_grid({**TINY, "trace": ["tiny.tstrace"], **axes}, base_dir=trace_dir, source="test grid")


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in WALL_COLUMNS if c in df.columns])


# -- grid parsing ----------------------------------------------------------------------------------
def test_grid_keys_are_the_simulate_options_and_their_defaults():
    command = click.command()(simulate_options(policy_options(lambda **kw: None)))
    ctx = click.Context(command)
    # A grid key is the option's name (old spellings such as model-spec are accepted as aliases).
    spelled = lambda p: next((k for k in (o.lstrip("-").replace("-", "_") for o in p.opts) if k in DEFAULTS),
                             p.opts[0].lstrip("-").replace("-", "_"))
    options = {spelled(p): p.get_default(ctx) for p in command.params}
    assert set(options) == set(grid_keys())
    for key, default in options.items():
        assert DEFAULTS[key] == default, key


def test_both_spellings_give_the_same_grid_and_numbers_become_floats(trace_dir):
    a = parse_grid({"hbm-ratio": [0.3, 1], "gen-tokens": [200], "model-spec": ["r1-qwen-7b"]})
    b = parse_grid({"hbm_ratio": [0.3, 1.0], "gen_tokens": [200], "model_spec": ["r1-qwen-7b"]})
    assert a.axes == b.axes == (("hbm_ratio", (0.3, 1.0)), ("gen_tokens", (200,)), ("model", ("r1-qwen-7b",)))
    assert [p.point_id for p in a.points()] == [p.point_id for p in b.points()]
    assert isinstance(a.axes[0][1][1], float)


def test_points_are_the_product_in_file_order_with_defaults_filled_in(trace_dir):
    grid = tiny_grid(trace_dir, batch=[2, 4], strategy=["full", "prefetch-layer", "cpu-attention"])
    points = grid.points()
    assert grid.size == len(points) == 6
    assert [(p.values["batch"], p.values["strategy"]) for p in points] == [
        (2, "full"), (2, "prefetch-layer"), (2, "cpu-attention"), (4, "full"), (4, "prefetch-layer"), (4, "cpu-attention")]
    p = points[4]
    assert p.values["hbm_ratio"] == 0.5 and p.values["hardware"] == "h200-sxm" and p.values["depth"] == 2
    assert p.config == SimConfig(model=model_spec("r1-qwen-7b"), hardware=hardware_spec("h200-sxm"),
                                 trace=trace_dir / "tiny.tstrace", batch=4, strategy="prefetch-layer", gen_tokens=200,
                                 steps=50)
    assert len({q.point_id for q in points}) == 6


def test_grid_file_paths_start_at_the_grid_folder(trace_dir, tmp_path):
    path = trace_dir / "grid.toml"
    path.write_text('trace = "tiny.tstrace"\nbatch = [2, 4]\nhardware = ["h100-sxm"]\n')
    grid = read_grid(path)
    assert [p.config.trace for p in grid.points()] == [trace_dir / "tiny.tstrace"] * 2
    assert grid.points()[0].config.hardware.name == "h100-sxm"


@pytest.mark.parametrize("data, needles", [
    ({"hbm-ration": [0.3]}, ["'hbm-ration' is not a simulate option", "hbm-ratio", "model", "gen-tokens", "sticky"]),
    ({"batch": []}, ["'batch' has an empty list"]),
    ({"hbm-ratio": [0.3], "hbm_ratio": [0.5]}, ["given twice"]),
    ({"batch": [8, 8]}, ["lists 8 twice"]),
    ({"batch": ["8"]}, ["batch = '8' is not an integer"]),
    ({"sticky": [1]}, ["sticky = 1 is not true or false"]),
    ({"strategy": ["warp"]}, ["point strategy='warp'", "prefetch-layer"]),
    ({"hbm-ratio": [0.5, 2.0]}, ["point hbm_ratio=2.0", "hbm_ratio must be a number in [0, 1]"]),
    ({"hardware": ["tpu-v9"]}, ["unknown hardware 'tpu-v9'", "h200-sxm"]),
    ({}, ["names no option"]),
])
def test_bad_grids_are_refused_with_the_accepted_values(data, needles):
    with pytest.raises(TiersimError) as e:
        parse_grid(data, source="g.toml").points()
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_bad_grid_files(tmp_path):
    with pytest.raises(TiersimError, match="no such grid file"):
        read_grid(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("batch = [8,\n")
    with pytest.raises(TiersimError, match="invalid TOML"):
        read_grid(tmp_path / "bad.toml")


# -- running ----------------------------------------------------------------------------------------
def test_engines_give_identical_rows_equal_to_simulate(trace_dir, tmp_path, monkeypatch):
    grid = tiny_grid(trace_dir, batch=[2, 4], strategy=["prefetch-layer", "cpu-attention"],
                     trace=["tiny.tstrace", "missing.tstrace"])
    frames = {}
    for engine, workers in (("local", 1), ("local", 2), ("dask", 2)):
        monkeypatch.setenv("TIERSIM_CACHE_DIR", str(tmp_path / f"cache-{engine}-{workers}"))  # each replays afresh
        stats = run_sweep(grid, tmp_path / f"{engine}{workers}.parquet", engine=engine, workers=workers)
        assert (stats.points, stats.ran, stats.failed, stats.rows) == (8, 8, 4, 8)
        frames[engine, workers] = comparable(read_results(tmp_path / f"{engine}{workers}.parquet"))
    first = frames["local", 1]
    for key, df in frames.items():
        pd.testing.assert_frame_equal(df, first, check_exact=True, obj=str(key))
    assert list(first["status"]) == ["ok"] * 4 + ["failed"] * 4
    assert first["error"].iloc[4].startswith("TraceError: ") and "missing.tstrace" in first["error"].iloc[4]
    assert first["overhead_pct"].iloc[4:].isna().all()
    # Each ok row is that point's simulate summary, flattened.
    point = grid.points()[3]
    s = simulate(point.config, workers=1).summary
    row = first.iloc[3]
    assert row["point_id"] == point.point_id and row["batch"] == 4 and row["strategy"] == "cpu-attention"
    assert row["model_name"] == "r1-qwen-7b" and row["hardware_name"] == "h200-sxm"
    for key, value in s.items():
        if key not in ("config", *WALL_COLUMNS):
            # A summary key that is also a grid key (copy_method) is stored as summary_<key>.
            column = f"summary_{key}" if key in DEFAULTS else key
            assert row[column] == value, key
    assert row["tiersim_version"] == tiersim.__version__
    meta = pq.read_schema(tmp_path / "dask2.parquet").metadata
    assert meta[b"tiersim_version"] == tiersim.__version__.encode()


def counting(monkeypatch) -> list:
    calls = []
    real = sw.simulate

    def fake(cfg, trace=None, workers=None):
        calls.append((cfg.batch, cfg.policy.hbm_ratio))
        return real(cfg, trace, workers)
    monkeypatch.setattr(sw, "simulate", fake)
    return calls


def test_resume_skips_done_points_and_retries_failed_ones(trace_dir, tmp_path, monkeypatch):
    calls = counting(monkeypatch)
    out = tmp_path / "r.parquet"
    first = run_sweep(tiny_grid(trace_dir, batch=[2, 4]), out, workers=1)
    assert calls == [(2, 0.5), (4, 0.5)] and first.rows == 2
    calls.clear()
    bigger = tiny_grid(trace_dir, batch=[2, 4], hbm_ratio=[0.5, 0.7])
    stats = run_sweep(bigger, out, workers=1, resume=True)
    assert sorted(calls) == [(2, 0.7), (4, 0.7)]
    assert (stats.points, stats.skipped, stats.ran, stats.rows) == (4, 2, 2, 4)
    df = read_results(out)
    assert list(zip(df["batch"], df["hbm_ratio"])) == [(2, 0.5), (2, 0.7), (4, 0.5), (4, 0.7)]  # grid order
    calls.clear()
    assert run_sweep(bigger, out, workers=1, resume=True).ran == 0 and calls == []
    # A failed point is retried on resume; its row is replaced, not duplicated.
    with_missing = tiny_grid(trace_dir, batch=[2], trace=["missing.tstrace"])
    assert run_sweep(with_missing, out, workers=1, resume=True).failed == 1
    assert len(read_results(out)) == 5
    assert run_sweep(with_missing, out, workers=1, resume=True).ran == 1
    assert len(read_results(out)) == 5


def test_a_raising_point_is_recorded_and_the_sweep_goes_on(trace_dir, tmp_path, monkeypatch):
    real = sw.simulate

    def flaky(cfg, trace=None, workers=None):
        if cfg.batch == 3:
            raise RuntimeError("boom")
        return real(cfg, trace, workers)
    monkeypatch.setattr(sw, "simulate", flaky)
    stats = run_sweep(tiny_grid(trace_dir, batch=[2, 3, 4]), tmp_path / "r.parquet", workers=1)
    assert (stats.ran, stats.failed) == (3, 1) and stats.errors[0].startswith("RuntimeError: boom (at test_sweep.py:")
    df = read_results(tmp_path / "r.parquet")
    assert list(df["status"]) == ["ok", "failed", "ok"] and df["error"].isna().tolist() == [True, False, True]


@pytest.mark.parametrize("workers", [1, 2])
def test_an_interrupted_sweep_keeps_its_finished_points(trace_dir, tmp_path, workers):
    grid = tiny_grid(trace_dir, batch=[2, 3, 4, 5])
    out = tmp_path / "r.parquet"

    def stop(k, n):
        if k == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_sweep(grid, out, workers=workers, on_point=stop)
    assert not out.exists()
    kept = sorted(partial_dir(out).glob("*.parquet"))
    assert len(kept) == 2
    with pytest.raises(TiersimError, match="2 finished points of an unfinished sweep.*--resume"):
        run_sweep(grid, out, workers=workers)
    stats = run_sweep(grid, out, workers=workers, resume=True)
    assert (stats.skipped, stats.ran, stats.rows) == (2, 2, 4)
    assert list(read_results(out)["batch"]) == [2, 3, 4, 5] and not partial_dir(out).exists()


def test_results_of_another_version_or_format_are_refused_on_resume(trace_dir, tmp_path):
    grid = tiny_grid(trace_dir, batch=[2])
    out = tmp_path / "r.parquet"
    run_sweep(grid, out, workers=1)
    table = pq.read_table(out)
    pq.write_table(table.replace_schema_metadata({b"tiersim_version": b"0.0.1"}), out)
    before = out.read_bytes()
    with pytest.raises(TiersimError, match=rf"written by tiersim 0\.0\.1, this is tiersim {tiersim.__version__}.*"
                                           "without --resume"):
        run_sweep(grid, out, workers=1, resume=True)
    assert out.read_bytes() == before
    out.write_text("batch,overhead\n1,2\n")
    with pytest.raises(TiersimError, match="not a readable parquet file"):
        run_sweep(grid, out, workers=1, resume=True)


def test_an_unreachable_scheduler_fails_fast_and_writes_nothing(trace_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    out = tmp_path / "sub" / "r.parquet"
    start = time.perf_counter()
    with pytest.raises(TiersimError, match=rf"cannot reach the Dask scheduler at tcp://127\.0\.0\.1:{port}"):
        run_sweep(tiny_grid(trace_dir, batch=[2]), out, engine="dask", scheduler=f"tcp://127.0.0.1:{port}")
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "sub").exists()


@pytest.mark.parametrize("kw, needle", [
    (dict(engine="dask", scheduler="my-laptop"), "not an address; accepted: tcp://HOST:PORT"),
    (dict(engine="local", scheduler="tcp://127.0.0.1:8786"), "--scheduler needs --engine dask"),
    (dict(engine="dask", scheduler="tcp://127.0.0.1:8786", workers=2), "--workers does not apply"),
    (dict(engine="spark"), "accepted: local, dask"),
])
def test_engine_options_are_checked_before_anything_runs(trace_dir, tmp_path, kw, needle):
    with pytest.raises(TiersimError, match=needle.replace("(", r"\(")):
        run_sweep(tiny_grid(trace_dir, batch=[2]), tmp_path / "r.parquet", **kw)
    assert not (tmp_path / "r.parquet").exists()


def test_dask_is_imported_only_for_the_dask_engine(trace_dir, tmp_path):
    code = ("import sys; from tiersim.studies.sweep import parse_grid, run_sweep; import tiersim.cli; "
            f"g = parse_grid({{'trace': ['tiny.tstrace'], 'gen_tokens': [200], 'steps': [20], 'batch': [2]}}, "
            f"base_dir=__import__('pathlib').Path({str(trace_dir)!r})); "
            f"run_sweep(g, {str(tmp_path / 'r.parquet')!r}, workers=1); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_sweep_cli(trace_dir, tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(f'trace = "{trace_dir / "tiny.tstrace"}"\nmodel-spec = "r1-qwen-7b"\ngen-tokens = 200\nsteps = 50\n'
                    'batch = [2, 4]\nstrategy = ["prefetch-layer", "evict-only"]\n')
    out = tmp_path / "r.parquet"
    result = CliRunner().invoke(cli, ["sweep", "--grid", str(grid), "--workers", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "4 points on local" in result.output and f"wrote {out}" in result.output
    assert len(read_results(out)) == 4
    result = CliRunner().invoke(cli, ["sweep", "--grid", str(grid), "--workers", "1", "--out", str(out), "--resume",
                                      "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["points"], report["skipped"], report["ran"], report["rows"]) == (4, 4, 0, 4)
    grid.write_text("batchsize = [2]\n")
    result = CliRunner().invoke(cli, ["sweep", "--grid", str(grid), "--out", str(tmp_path / "x.parquet")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "accepted: model, hardware, trace" in lines[0]
    assert not (tmp_path / "x.parquet").exists()


def test_one_point_per_policy_replay_runs_first(trace_dir):
    grid = tiny_grid(trace_dir, batch=[2, 4, 8], hbm_ratio=[0.3, 0.7], strategy=["full", "cpu-attention"])
    points = grid.points()
    phases = sw.schedule_phases(points)
    assert phases == [[0, 2], [1, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    assert [points[i].values["hbm_ratio"] for i in phases[0]] == [0.3, 0.7]


def test_a_folder_as_results_is_refused_before_running(trace_dir, tmp_path, monkeypatch):
    calls = counting(monkeypatch)
    with pytest.raises(TiersimError, match="is a folder; accepted: a results file path"):
        run_sweep(tiny_grid(trace_dir, batch=[2]), tmp_path, workers=1)
    assert calls == []
