"""The command line, driven through click's runner: outputs, files and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tiersim import __version__
from tiersim.cli import cli

DESIGN_KV_BYTES = {
    "r1-qwen-1.5b": 28_672, "r1-qwen-7b": 57_344, "r1-llama-8b": 131_072, "llama3.1-8b": 131_072,
    "qwen3-8b": 147_456, "r1-qwen-14b": 196_608, "r1-qwen-32b": 262_144, "qwq-32b": 262_144,
    "qwen3-32b": 262_144, "r1-llama-70b": 327_680, "llama3.1-70b": 327_680, "smollm2-135m": 23_040,
}
# Models whose KV does not grow by the same bytes in every layer (MLA latent, sliding-window layers): DESIGN.md §4
# gives the bytes per generated token of the layers that keep every token (kv_bytes_per_token_global).
DESIGN_GLOBAL_KV_BYTES = {"qwen3-30b-a3b": 98_304, "deepseek-r1": 70_272, "gpt-oss-120b": 36_864}
OTHER_MODELS = {"qwen3-235b-a22b", "gpt-oss-20b", "gemma-3-270m"}
PROFILES = {"h100-sxm", "h100-pcie", "h200-sxm", "a100-80g-sxm", "gh200", "b200", "l40s", "rtx4090", "rtx5080"}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_version_and_help_list_every_command(runner):
    assert runner.invoke(cli, ["--version"]).output.strip() == f"tiersim, version {__version__}"
    out = runner.invoke(cli, ["--help"]).output
    for command in cli.commands:
        assert command in out
    assert all(cli.commands[c].get_short_help_str() for c in cli.commands)


def test_specs_json_has_design_kv_bytes_and_every_profile(runner):
    result = runner.invoke(cli, ["specs", "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(data["models"]) == set(DESIGN_KV_BYTES) | set(DESIGN_GLOBAL_KV_BYTES) | OTHER_MODELS
    assert {k: data["models"][k]["kv_bytes_per_token"] for k in DESIGN_KV_BYTES} == DESIGN_KV_BYTES
    assert {k: data["models"][k]["kv_bytes_per_token_global"] for k in DESIGN_GLOBAL_KV_BYTES} == DESIGN_GLOBAL_KV_BYTES
    for m in data["models"].values():
        for key in ("kv_bytes_per_token_layer", "weight_bytes", "flops_per_token", "params", "kv_heads", "dtype_bytes"):
            assert key in m
    assert set(data["hardware"]) == PROFILES
    for h in data["hardware"].values():
        assert h["h2d_gbps_pinned"] > 0 and h["sources"]["h2d_gbps_pinned"]


def test_specs_table_shows_user_files(runner, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_size": 64, "intermediate_size": 128, "vocab_size": 100, "torch_dtype": "bfloat16",
    }))
    result = runner.invoke(cli, ["specs", "--model-spec", str(config)])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith(f"│ {tmp_path.name}"))
    assert row.split("│")[9].strip() == "256"  # 2 layers × (K, V) × 2 KV heads × 16 head_dim × 2 bytes


def test_bad_inputs_give_one_line_errors(runner, tmp_path):
    bad = tmp_path / "gpu.toml"
    bad.write_text('name = "x"\n')
    for args, needle in [
        (["specs", "--hardware", str(bad)], "gpu.toml"),
        (["specs", "--model-spec", "no-such-model"], "no-such-model"),
    ]:
        result = runner.invoke(cli, args)
        assert result.exit_code != 0
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("Error:"), result.output


def test_synth_then_schedule(runner, tmp_path):
    trace = tmp_path / "t.tstrace"
    result = runner.invoke(cli, ["synth", "--requests", "2", "--prompt-tokens", "16", "--gen-tokens", "400", "--out", str(trace)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "s.json"
    npz = tmp_path / "s.npz"
    result = runner.invoke(cli, ["schedule", str(trace), "--hbm-ratio", "0.3", "--evict-ratio", "0.1",
                                 "--json", str(out), "--export", str(npz)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["policy"]["hbm_ratio"] == 0.3 and len(data["requests"]) == 2
    r = data["requests"][0]
    # 399 steps: re-tiers at 192, 256, 320, 384 generated tokens; at the last, 384-132 = 252 candidates.
    assert r["retiers"] == 4 and r["final_evicted_tokens"] == 25
    assert r["final_hbm_tokens"] + r["final_ddr_tokens"] + r["final_evicted_tokens"] == 16 + 399
    assert sum(r[f"mass_share_{t}"] for t in ("hbm", "ddr", "compressed", "evicted")) == pytest.approx(1.0)
    arrays = np.load(npz, allow_pickle=False)
    assert arrays["counts_1"].shape == (399, 4) and arrays["final_counts_0"].tolist()[3] == 25
    # Bad policy input: one line naming the option, nothing written.
    result = runner.invoke(cli, ["schedule", str(trace), "--hbm-ratio", "1.5", "--json", str(tmp_path / "x.json")])
    assert result.exit_code != 0 and "hbm_ratio" in result.output and not (tmp_path / "x.json").exists()
    result = runner.invoke(cli, ["schedule", str(trace), "--request", "5"])
    assert result.exit_code != 0 and "out of range" in result.output


def test_the_cli_spells_the_library_choices():
    # cli/options.py spells them so that `tiersim --help` loads no numpy; they must not drift from the library's.
    from tiersim.cli import options
    from tiersim.hw.copies import COPY_CHOICES
    from tiersim.policy import EVICTION_MODES
    from tiersim.sim.copies import COPY_METHOD_CHOICES, KV_LAYOUTS
    from tiersim.specs import KV_DTYPE_BYTES, WEIGHT_DTYPE_BITS

    assert options.EVICTION_MODES == EVICTION_MODES
    assert options.COPY_METHODS == COPY_METHOD_CHOICES and set(COPY_CHOICES) == set(COPY_METHOD_CHOICES)
    assert options.KV_LAYOUTS == KV_LAYOUTS
    assert options.KV_DTYPES == tuple(KV_DTYPE_BYTES) and options.WEIGHT_DTYPES == tuple(WEIGHT_DTYPE_BITS)


def test_policy_help_points_to_the_prototype_and_the_block_size(runner):
    out = " ".join(runner.invoke(cli, ["simulate", "--help"]).output.split())
    assert "--eviction [target|compound|prototype]" in out and "use --eviction prototype" in out
    assert "authors' prototype)" not in out  # --sticky is not the authors' system prototype
    assert "--page-size INTEGER Tokens per page, the unit of tiering and transfer [default: the KV block size]" in out
    out = " ".join(runner.invoke(cli, ["schedule", "--help"]).output.split())
    assert "[default: 1 token]" in out


def test_specs_shows_kind_active_params_growing_kv_and_nvlink(runner):
    data = json.loads(runner.invoke(cli, ["specs", "--json", "-"]).output)
    kinds = {k: m["kind"] for k, m in data["models"].items()}
    assert kinds["r1-qwen-7b"] == "dense" and kinds["qwen3-30b-a3b"] == "MoE" and kinds["deepseek-r1"] == "MoE + MLA"
    assert kinds["gpt-oss-120b"] == "MoE + hybrid" and kinds["gemma-3-270m"] == "hybrid"
    assert data["hardware"]["h200-sxm"]["nvlink_gbps"] == 450 and data["hardware"]["h200-sxm"]["gpus_per_host"] == 8
    result = runner.invoke(cli, ["specs"])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if line.startswith("┃ name ") and "layers" in line)
    assert [c.strip() for c in header.split("┃")[-4:-1]] == ["kind", "active params (B)", "KV B/token growing"]
    row = next(line for line in result.output.splitlines() if line.startswith("│ gpt-oss-120b "))
    assert [c.strip() for c in row.split("│")[-4:-1]] == ["MoE + hybrid", "5.712", "36,864"]
    row = next(line for line in result.output.splitlines() if line.startswith("│ h200-sxm "))
    assert [c.strip() for c in row.split("│")[-3:-1]] == ["450", "8"]
    row = next(line for line in result.output.splitlines() if line.startswith("│ rtx5080 "))
    assert [c.strip() for c in row.split("│")[-3:-1]] == ["—", "—"]


def test_scaling_takes_tensor_parallel_sizes_and_native_weights(runner):
    result = runner.invoke(cli, ["scaling", "--model", "deepseek-r1", "--tps", "1,2", "--weights", "native,16",
                                 "--batches", "8", "--context", "2048", "--no-paper", "--steps", "4",
                                 "--strategies", "prefetch-layer", "--json", "-"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert sorted((r["tp"], r["weights_dtype"]) for r in rows) == [(1, "fp16"), (1, "fp8"), (2, "fp16"), (2, "fp8")]
    by = {(r["tp"], r["weights_dtype"]): r for r in rows}
    assert by[(2, "fp8")]["weights_gb"] < by[(1, "fp8")]["weights_gb"] < by[(1, "fp16")]["weights_gb"]
    for args, line in [(["--model", "r1-qwen-7b", "--tps", "1,3"], "Error: --tps: tp must divide the r1-qwen-7b"),
                       (["--weights", "int3"], "Error: --weight-bits 'int3' invalid; accepted: 4, 8, 16, 32 or")]:
        result = runner.invoke(cli, ["scaling", "--no-paper", *args])
        lines = [x for x in result.output.splitlines() if x.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith(line), result.output


@pytest.mark.parametrize("args, line", [
    (["--copy-method", "gather-kernel"], "Error: --copy-method: copy_method 'gather-kernel' needs a CUDA device"),
    (["--block-size", "48"], "Error: --block-size: block_size 48 does not divide into the T0 chunk layout"),
])
def test_validate_copy_flags_reach_its_config(runner, args, line):
    result = runner.invoke(cli, ["validate", "--hardware", "h200-sxm", *args])
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith(line), result.output


def test_reproduce_prototype_prints_the_paper_beside_tiersim(runner, tmp_path):
    out = tmp_path / "p.json"
    result = runner.invoke(cli, ["reproduce-prototype", "--gen-tokens", "1600", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    figures = {f["name"]: f for f in data["figures"]}
    assert figures["tok/s with tiering"]["paper"] == "18.7" and figures["transfer overhead"]["paper"] == "5.2–5.4"
    assert figures["compute per token"]["tiersim"] == pytest.approx(47.0)  # --compute-ms pins it
    assert data["matched_gen_tokens"] is not None and data["matched_gen_tokens"] <= 1600
    assert figures["DDR tokens per step"]["tiersim_matched"] >= 448
    c = data["summary"]["config"]
    assert c["gen_tokens"] == 1600 and c["policy"]["eviction"] == "prototype" and c["policy"]["evict_ratio"] == 0.1
    assert not c["pinned"] and c["model"]["name"] == "r1-qwen-7b" and c["hardware"]["name"] == "rtx5080"
    assert data["titles"][1] == "paper" and "paper beside tiersim" in result.output  # the table too
    assert all(row[1] in result.output for row in data["rows"])
    result = runner.invoke(cli, ["reproduce-prototype", "--requests", "0"])
    assert result.exit_code == 1 and result.output.startswith("Error: --requests: requests must be an integer >= 1")
