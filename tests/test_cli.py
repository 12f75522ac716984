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
