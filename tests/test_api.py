"""The Python API (tiersim.api, reached as tiersim.simulate ...) and the CLI's promises around it: the same names,
errors that name the field (Python) or the flag (CLI), outputs refused before any work, a light `import tiersim`."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from click.testing import CliRunner

import tiersim
from tiersim.cli import cli
from tiersim.errors import ConfigError, TiersimError
from tiersim.traces.format import write_trace
from tiersim.traces.synth import SynthParams, synth_request

SMALL = {"batch": 8, "gen_tokens": 300, "steps": 40, "hbm_ratio": 0.5, "evict_ratio": 0.1}
WALL = ("sim_wall_s", "sim_events")


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("api") / "small.tstrace"
    requests = [synth_request(SynthParams(), 32, g, seed) for seed, g in enumerate((250, 330))]
    write_trace(path, requests, model={"id": "synthetic", "shape": {}}, generation={},
                metadata={"synthetic": SynthParams().to_dict()})  # known generator: no continuation fit
    return path


def _flags(fields: dict) -> list[str]:
    return [a for k, v in fields.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def test_api_with_names_matches_the_cli(trace_path, tmp_path):
    r = tiersim.simulate(model="r1-qwen-7b", hardware="h200-sxm", trace=trace_path, compare=True, **SMALL)
    assert isinstance(r.steps, pd.DataFrame) and len(r.steps) == 40
    s = r.summary
    assert s["config"]["model"]["name"] == "r1-qwen-7b" and s["config"]["hardware"]["name"] == "h200-sxm"
    assert s["config"]["batch"] == 8 and s["config"]["policy"]["hbm_ratio"] == 0.5
    out = tmp_path / "s.json"
    result = CliRunner().invoke(cli, ["simulate", "--model", "r1-qwen-7b", "--trace", str(trace_path), *_flags(SMALL),
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    cli_summary = json.loads(out.read_text())
    assert {k: v for k, v in cli_summary.items() if k not in WALL} == \
        json.loads(json.dumps({k: v for k, v in s.items() if k not in WALL}))


def test_old_flag_spellings_still_work_and_hide_from_help(trace_path, tmp_path):
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    base = ["simulate", "--trace", str(trace_path), *_flags(SMALL)]
    assert CliRunner().invoke(cli, [*base, "--model", "r1-qwen-7b", "--weight-bits", "8", "--json", str(new)]).exit_code == 0
    r = CliRunner().invoke(cli, [*base, "--model-spec", "r1-qwen-7b", "--weights", "int8", "--json", str(old)])
    assert r.exit_code == 0, r.output
    drop = lambda d: {k: v for k, v in d.items() if k not in WALL}  # noqa: E731
    assert drop(json.loads(new.read_text())) == drop(json.loads(old.read_text()))
    assert json.loads(new.read_text())["config"]["weight_bits"] == 8
    help_text = CliRunner().invoke(cli, ["simulate", "--help"]).output
    assert "--model " in help_text and "--model-spec" not in help_text and "--weights" not in help_text
    assert "[default: 256]" in help_text and "[default: r1-qwen-14b]" in help_text  # SimConfig's and the API's defaults


@pytest.mark.parametrize("fields, field", [
    ({"batch": 0}, "batch"),
    ({"gen_tokens": 1}, "gen_tokens"),
    ({"hbm_ratio": 1.5}, None),  # PolicyConfig raises a PolicyError (no field) until it moves to check.py
    ({"no_such_knob": 3}, "no_such_knob"),
    ({"model": "gpt-9"}, "model"),
    ({"hardware": "tpu-v9"}, "hardware"),
])
def test_api_bad_input_names_the_field_before_any_work(fields, field):
    with pytest.raises(TiersimError) as e:
        tiersim.simulate(**fields)
    if field is not None:
        assert isinstance(e.value, ConfigError) and e.value.field == field
    assert next(iter(fields)) in str(e.value) or "unknown" in str(e.value)


@pytest.mark.parametrize("args, line", [
    (["--gen-tokens", "1"], "Error: --gen-tokens: gen_tokens must be an integer >= 2, got 1"),
    (["--batch", "0"], "Error: --batch"),
    (["--hbm-ratio", "1.5"], "Error: --hbm-ratio: hbm_ratio must be"),
    (["--model", "gpt-9"], "Error: --model: unknown model 'gpt-9'"),
    (["--tp", "3"], "Error: --tp: tp must divide the r1-qwen-14b attention heads (40), got 3"),
    (["--tensor-parallel-size", "2", "--hardware", "rtx5080"], "Error: --tp: tp 2 needs NVLink"),
    (["--model", "qwen3-30b-a3b", "--ep", "3"], "Error: --ep: ep must divide the deployment's tp x dp = 1 GPUs"),
    (["--dp", "0"], "Error: --dp: dp must be an integer >= 1"),
    (["--gpu-memory-utilization", "1.5"], "Error: --gpu-memory-utilization: gpu_memory_utilization must be"),
    (["--max-model-len", "100"], "Error: --max-model-len: max_model_len 100 is shorter than gen_tokens 4096"),
    (["--weight-bits", "8", "--quantization", "fp8"], "Error: --weight-dtype"),
    (["--block-size", "0"], "Error: --block-size: block_size must be an integer >= 1"),
    (["--copy-method", "dma", "--pageable"], "Error: --copy-method: copy_method 'dma' needs pinned host memory"),
    (["--eviction", "prototype", "--compressed-ratio", "0.2"], "Error: --compressed-ratio: compressed_ratio must be 0"),
])
def test_cli_errors_name_the_flag_in_one_line(trace_path, tmp_path, args, line):
    result = CliRunner().invoke(cli, ["simulate", "--trace", str(trace_path), "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 1
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(line) and "Traceback" not in result.output, result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, flag", [
    (["simulate", "--json", "/dev/null/x.json"], "--json"),
    (["simulate", "--out", "/dev/null/run"], "--out"),
    (["scaling", "--out", "/dev/null/s"], "--out"),
    (["sweep", "--grid", "g.toml", "--out", "/dev/null/r.parquet"], "--out"),
    (["inspect", "t.tstrace", "--plot", "/dev/null/p.png"], "--plot"),
    (["calibrate", "--out", "/dev/null/p.toml"], "--out"),
])
def test_unwritable_outputs_fail_before_any_work(args, flag):
    result = CliRunner().invoke(cli, args)
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith(f"Error: {flag} /dev/null/") and "/dev/null is not a folder" in lines[0]
    assert "sim_wall_s" not in result.output  # nothing ran


def test_file_output_over_a_folder_is_refused(tmp_path):
    result = CliRunner().invoke(cli, ["specs", "--json", str(tmp_path)])
    assert result.exit_code == 1 and f"--json {tmp_path}: is a folder" in result.output


@pytest.mark.parametrize("blocked, args, message", [
    ("torch", ["capture", "--model", "smollm2-135m", "--prompt", "hi", "--max-new-tokens", "4", "--out", "{tmp}/t.tstrace"],
     "Error: capture needs the torch extra: pip install 'tiersim[torch]' (torch not installed)"),
    ("torch", ["validate"], "Error: validate needs the torch extra"),
    ("torch", ["calibrate", "--out", "{tmp}/p.toml"], "Error: calibrate needs the torch extra"),
    ("distributed", ["sweep", "--grid", "{tmp}/g.toml", "--engine", "dask", "--out", "{tmp}/r.parquet"],
     "Error: sweep --engine dask needs the dist extra: pip install 'tiersim[dist]'"),
])
def test_a_missing_extra_is_one_line_naming_it(tmp_path, blocked, args, message):
    # None in sys.modules is how Python itself marks a module that cannot be imported.
    code = (f"import sys; sys.modules[{blocked!r}] = None\nfrom tiersim.cli import cli\n"
            f"cli({[a.replace('{tmp}', str(tmp_path)) for a in args]!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
    assert done.stderr.startswith(message) and not list(tmp_path.iterdir())


def test_python_dash_m_tiersim_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "tiersim", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "simulate" in done.stdout and "cache" in done.stdout, done.stderr


def test_import_tiersim_and_the_cli_stay_light():
    probe = ("import sys, tiersim, tiersim.cli; heavy = ('numpy', 'pandas', 'torch', 'matplotlib', 'scipy', 'simpy');"
             "print([m for m in heavy if m in sys.modules]); tiersim.simulate; print('pandas' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "False"]  # even reaching tiersim.simulate loads no pandas


def test_validation_is_the_api_validate_and_tiersim_validate_the_module():
    import tiersim.api
    import tiersim.validate

    assert tiersim.validation is tiersim.api.validate and tiersim.validate.__name__ == "tiersim.validate"
    with pytest.raises(AttributeError, match="no_such_function"):
        tiersim.no_such_function  # noqa: B018


def test_cache_info_and_clear(tmp_path, monkeypatch, trace_path):
    monkeypatch.setenv("TIERSIM_CACHE_DIR", str(tmp_path / "cache"))
    tiersim.simulate(model="r1-qwen-7b", trace=trace_path, **SMALL)  # fills the schedule cache
    r = CliRunner().invoke(cli, ["cache", "info", "--json", "-"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert set(info) >= {"dir", "entries", "bytes", "limit"} and info["entries"] > 0 and info["bytes"] > 0
    assert str(tmp_path / "cache") in str(info["dir"])
    r = CliRunner().invoke(cli, ["cache", "clear"])
    assert r.exit_code == 0 and f"removed {info['entries']} entries" in r.output, r.output
    assert json.loads(CliRunner().invoke(cli, ["cache", "info", "--json", "-"]).output)["entries"] == 0


NEW_FLAGS = {"model": "qwen3-30b-a3b", "tp": 2, "dp": 2, "ep": 4, "kv_dtype": "fp8", "weight_dtype": "fp8",
             "gpu_memory_utilization": 0.8, "max_model_len": 4096, "block_size": 32, "kv_layout": "cross-layer",
             "copy_method": "dma"}


def _summary(path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in WALL}


def test_every_new_simulate_flag_reaches_the_config(trace_path, tmp_path):
    out = tmp_path / "s.json"
    r = CliRunner().invoke(cli, ["simulate", "--trace", str(trace_path), *_flags(SMALL), *_flags(NEW_FLAGS),
                                 "--json", str(out)])
    assert r.exit_code == 0, r.output
    s = json.loads(out.read_text())
    c = s["config"]
    assert {k: c[k] for k in ("tp", "dp", "ep", "kv_dtype", "weight_dtype", "gpu_memory_utilization", "max_model_len",
                              "block_size", "kv_layout", "copy_method")} == {k: v for k, v in NEW_FLAGS.items()
                                                                             if k != "model"}
    assert c["model"]["name"] == "qwen3-30b-a3b"
    assert c["reserve_frac"] == pytest.approx(0.2)  # --gpu-memory-utilization 0.8 replaces --reserve-frac
    assert c["policy"]["page_size"] == 32  # the tiering unit defaults to the block
    assert s["copy_method"] == "dma" and s["copy_method_estimates_ms"] == {}  # asked for by name: no auto choice
    assert s["h2d_piece_bytes"] > 0 and s["h2d_pieces_per_step"] > 0


def test_vllm_spellings_and_the_api_give_identical_results(trace_path, tmp_path):
    ours, vllm = tmp_path / "ours.json", tmp_path / "vllm.json"
    base = ["simulate", "--trace", str(trace_path), "--model", "qwen3-30b-a3b", *_flags(SMALL)]
    r = CliRunner().invoke(cli, [*base, "--tp", "2", "--dp", "2", "--ep", "4", "--kv-dtype", "fp8", "--weight-dtype",
                                 "fp8", "--gpu-memory-utilization", "0.85", "--max-model-len", "2048", "--json", str(ours)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, [*base, "--tensor-parallel-size", "2", "--data-parallel-size", "2",
                                 "--enable-expert-parallel", "--kv-cache-dtype", "fp8_e4m3", "--quantization", "fp8",
                                 "--gpu-memory-utilization", "0.85", "--max-model-len", "2048", "--json", str(vllm)])
    assert r.exit_code == 0, r.output
    assert _summary(ours) == _summary(vllm)
    api = tiersim.simulate(model="qwen3-30b-a3b", trace=trace_path, tp=2, dp=2, ep="all", kv_dtype="fp8",
                           weight_dtype="fp8", gpu_memory_utilization=0.85, max_model_len=2048, compare=True,
                           **SMALL).summary
    assert json.loads(json.dumps({k: v for k, v in api.items() if k not in WALL})) == _summary(ours)
    assert api["config"]["ep"] == 4


def test_vllm_auto_dtype_is_unset_and_expert_parallel_leaves_a_dense_model_alone(trace_path, tmp_path):
    plain, auto = tmp_path / "plain.json", tmp_path / "auto.json"
    base = ["simulate", "--trace", str(trace_path), "--model", "r1-qwen-7b", *_flags(SMALL)]
    assert CliRunner().invoke(cli, [*base, "--json", str(plain)]).exit_code == 0
    r = CliRunner().invoke(cli, [*base, "--kv-cache-dtype", "auto", "--enable-expert-parallel", "--json", str(auto)])
    assert r.exit_code == 0, r.output
    assert _summary(plain) == _summary(auto)
    assert _summary(auto)["config"]["kv_dtype"] is None and _summary(auto)["config"]["ep"] == 1


@pytest.mark.parametrize("args, flag", [
    (["--kv-dtype", "int3"], "'--kv-dtype'"),
    (["--quantization", "awq4"], "'--weight-dtype'"),
    (["--copy-method", "teleport"], "'--copy-method'"),
    (["--kv-layout", "diagonal"], "'--kv-layout'"),
    (["--ep", "many"], "'--ep'"),
    (["--eviction", "random"], "'--eviction'"),
])
def test_a_value_outside_the_choices_names_the_flag(args, flag):
    result = CliRunner().invoke(cli, ["simulate", *args])
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 2 and last.startswith(f"Error: Invalid value for {flag}"), result.output


def test_advise_takes_the_deployment_and_copy_flags():
    help_text = CliRunner().invoke(cli, ["advise", "--help"]).output
    for flag in ("--tp", "--ep", "--dp", "--kv-dtype", "--weight-dtype", "--gpu-memory-utilization", "--max-model-len",
                 "--block-size", "--kv-layout", "--copy-method"):
        assert f"{flag} " in help_text, flag
    assert "--tp INTEGER" in help_text  # vLLM's spellings are accepted and named in the help, not listed as flags
    result = CliRunner().invoke(cli, ["advise", "--tensor-parallel-size", "3"])
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert result.exit_code == 1 and lines == ["Error: --tp: tp must divide the r1-qwen-14b attention heads (40), got 3"]


def test_api_reproduce_prototype_has_the_library_defaults():
    import inspect

    from tiersim.studies import prototype

    ours, theirs = (inspect.signature(f).parameters for f in (tiersim.api.reproduce_prototype,
                                                             prototype.reproduce_prototype))
    assert {k: p.default for k, p in ours.items()} == {k: p.default for k, p in theirs.items()}
    with pytest.raises(ConfigError) as e:
        tiersim.api.reproduce_prototype(requests=0)
    assert e.value.field == "requests"
