"""tiersim fidelity: the grid's exact properties on a tiny random Llama and on SmolLM2-135M; bad input."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM

from tiersim.cli import cli
from tiersim.errors import TiersimError
from tiersim.hw.fidelity import FidelityConfig, default_prompts_path, grid, parse_ratios, run_fidelity
from tiersim.hw.tiered_cache import TieredCache, decode
from tiersim.traces.capture_prompts import Prompt, read_prompts
from tiersim.traces.hf import LoadedModel, ModelSource

# ---------------------------------------------------------------- parsing and validation


def test_parse_ratios():
    assert parse_ratios("0.3, 0.5,0.7", "--hbm-ratios") == (0.3, 0.5, 0.7)
    assert parse_ratios("0", "--evict-ratios") == (0.0,)
    assert parse_ratios([1, 0.5], "--x") == (1.0, 0.5)
    for bad, message in (("0.3,1.5", "outside"), ("-0.1", "outside"), ("a", "not a number"), ("", "not a number"),
                         ("0.3,0.3", "repeats"), ("nan", "outside"), ([], "no ratios")):
        with pytest.raises(TiersimError, match=message):
            parse_ratios(bad, "--hbm-ratios")


def test_config_validation():
    cfg = FidelityConfig(hbm_ratios="0.3,0.7", evict_ratios=(0, 0.1))
    assert cfg.hbm_ratios == (0.3, 0.7) and cfg.evict_ratios == (0.0, 0.1)
    assert cfg.cell_policy(0.7, 0.1).hbm_ratio == 0.7 and cfg.cell_policy(0.7, 0.1).window == 16
    for kw, message in (({"max_new_tokens": 1}, "max-new-tokens"), ({"num_prompts": 0}, "num-prompts"),
                        ({"policy": {"window": 4}}, "PolicyConfig"), ({"hbm_ratios": "2"}, "outside")):
        with pytest.raises(TiersimError, match=message):
            FidelityConfig(**kw)


def test_default_prompts_have_answers():
    prompts = read_prompts(default_prompts_path())
    assert len(prompts) >= 4 and all(p.answer is not None for p in prompts)


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "/no/such/model: no such model folder or file"),
    (["--hbm-ratios", "0.3,1.5"], "--hbm-ratios: 1.5 is outside [0, 1]"),
    (["--evict-ratios", "0,-0.1"], "--evict-ratios: -0.1 is outside [0, 1]"),
    (["--max-new-tokens", "1"], "--max-new-tokens must be an integer >= 2"),
    (["--window", "-1"], "window must be an integer >= 0"),
    (["--compressed-bits", "3"], "compressed_bits must be one of"),
    (["--num-prompts", "-1"], "--num-prompts must be >= 0"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["fidelity", *args, "--json", str(tmp_path / "f.json"), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [f"Error: {result.output.strip()[7:]}"]
    assert message in result.output
    assert not (tmp_path / "f.json").exists() and not out.exists()


def test_cli_empty_or_missing_prompts_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    for path, message in ((empty, "no prompts (the file is empty)"), (tmp_path / "missing.jsonl", "no such prompts file")):
        result = CliRunner().invoke(cli, ["fidelity", "--prompts", str(path), "--json", str(tmp_path / "f.json")])
        assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1


# ---------------------------------------------------------------- the grid on a tiny random Llama


class DigitTokenizer:
    """Text ↔ ids for the tiny model: characters to ids, ids back to space-separated numbers."""

    eos_token_id = 95
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + ord(c) % 90 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


@pytest.fixture(scope="module")
def tiny_loaded(tmp_path_factory):
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    return LoadedModel(model, DigitTokenizer(), ModelSource("tiny-llama", tmp_path_factory.mktemp("tiny")), "cpu", "float32")


@pytest.fixture(scope="module")
def tiny_report(tiny_loaded):
    from tiersim.policy import PolicyConfig

    tok = tiny_loaded.tokenizer
    texts = ["what is 12 + 30?", "count the apples: 7 and 5"]
    # The answer of prompt 0 is the full cache's last token (the tokenizer prints ids), so full accuracy is 1/2.
    full = decode(tiny_loaded.model, tok(texts[0])["input_ids"], None, 48)
    prompts = [Prompt(texts[0], "a", float(full.tokens[-1])), Prompt(texts[1], "b", -1.0)]
    cfg = FidelityConfig(hbm_ratios=(0.3, 0.7), evict_ratios=(0.0, 0.3), max_new_tokens=48, num_prompts=None,
                         system=None, chat_template=False, policy=PolicyConfig(sinks=2, window=8, interval=8))
    return run_fidelity(tiny_loaded, prompts, cfg), prompts, cfg


def test_tiny_grid_exact_properties(tiny_report):
    report, _, _ = tiny_report
    assert [(c["hbm_ratio"], c["evict_ratio"]) for c in report["cells"]] == [(0.3, 0.0), (0.7, 0.0), (0.3, 0.3), (0.7, 0.3)]
    assert report["identical_across_hbm_ratios"] == {"0": True, "0.3": True}
    assert report["full"]["accuracy"] == 0.5
    for c in report["cells"]:
        assert c["ddr_tokens_max"] > 0  # tiering really happened
        if c["evict_ratio"] == 0:
            assert c["bit_identical_to_full"] and c["kl_mean"] == 0.0 and c["token_agreement"] == 1.0
            assert c["prefix_agreement"] == 1.0 and c["accuracy"] == 0.5 and c["evicted_share"] == 0.0
        else:
            assert not c["bit_identical_to_full"] and c["kl_mean"] > 0 and c["evicted_tokens"] > 0
    low, high = grid(report, "hbm_share")[:, 0], grid(report, "hbm_share")[:, 1]
    assert np.all(low < high)  # β = 0.3 kept fewer tokens in HBM than β = 0.7
    for key in ("token_agreement", "kl_mean", "accuracy", "evicted_share", "logits_sha256"):
        assert report["cells"][2][key] == report["cells"][3][key]  # fixed r: identical whatever β


def logits_of(model, ids, cache, steps, **kw):
    logits = []
    out = decode(model, ids, cache, steps, on_logits=lambda i, x: logits.append(x.clone()), **kw)
    return out, logits


def test_tiny_kl_is_the_teacher_forced_kl(tiny_report, tiny_loaded):
    """The spliced KL (free run up to the divergence, forced after) equals a teacher-forced run from token 0."""
    report, prompts, cfg = tiny_report
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    cell = report["cells"][2]
    for prompt, result in zip(prompts, cell["prompts"]):
        ids = tok(prompt.text)["input_ids"]
        full, ref_logits = logits_of(model, ids, None, cfg.max_new_tokens, eos_token_ids=[95])
        _, forced_logits = logits_of(model, ids, TieredCache.for_model(model, cfg.cell_policy(0.3, 0.3)),
                                     cfg.max_new_tokens, forced=full.tokens)
        kl = [float((p.double().softmax(-1) * (p.double().log_softmax(-1) - q.double().log_softmax(-1))).sum())
              for p, q in zip(ref_logits, forced_logits)]
        assert len(kl) == len(full.tokens)
        assert math.isclose(result["kl_mean"], float(np.mean(kl)), rel_tol=1e-12, abs_tol=1e-15)


# ---------------------------------------------------------------- SmolLM2-135M through the CLI (reduced grid)


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory, smollm2_preloaded):
    folder = tmp_path_factory.mktemp("fidelity")
    # 16 tokens: re-tiers after the 8th and 12th; r = 0.2 evicts one token at the 12th
    args = ["fidelity", "--model", "smollm2-135m", "--hbm-ratios", "0.3,0.7", "--evict-ratios", "0,0.2",
            "--num-prompts", "2", "--max-new-tokens", "16", "--sinks", "2", "--window", "4", "--interval", "4",
            "--json", str(folder / "grid.json"), "--out", str(folder / "out")]
    with smollm2_preloaded():  # the session's model instead of a second load of the same files
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result.output, json.loads((folder / "grid.json").read_text()), folder


def test_smollm2_grid_json(smol_run):
    output, report, folder = smol_run
    assert "bit-identical across β: r=0: yes, r=0.2: yes" in output
    assert report["identical_across_hbm_ratios"] == {"0": True, "0.2": True}
    assert report["prompts"] == ["gsm-01", "gsm-02"] and report["kl_mode"].startswith("teacher-forced")
    required = {"hbm_ratio", "evict_ratio", "token_agreement", "kl_mean", "accuracy", "bit_identical_to_full",
                "hbm_share", "evicted_share"}
    assert len(report["cells"]) == 4 and all(required <= set(c) for c in report["cells"])
    by = {(c["hbm_ratio"], c["evict_ratio"]): c for c in report["cells"]}
    for beta in (0.3, 0.7):
        exact, evicting = by[(beta, 0.0)], by[(beta, 0.2)]
        assert exact["bit_identical_to_full"] and exact["kl_mean"] == 0.0 and exact["token_agreement"] == 1.0
        assert exact["accuracy"] == report["full"]["accuracy"]
        assert exact["ddr_tokens_max"] > 0 and exact["evicted_share"] == 0.0
        assert not evicting["bit_identical_to_full"] and evicting["evicted_tokens"] > 0 and evicting["kl_mean"] > 0
    assert by[(0.3, 0.0)]["hbm_share"] < by[(0.7, 0.0)]["hbm_share"]
    assert by[(0.3, 0.2)]["token_agreement"] == by[(0.7, 0.2)]["token_agreement"]
    assert json.loads((folder / "out" / "fidelity.json").read_text())["cells"] == report["cells"]


def test_smollm2_heatmap_png(smol_run):
    _, _, folder = smol_run
    png = Path(folder / "out" / "fidelity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 1000 and height > 300
