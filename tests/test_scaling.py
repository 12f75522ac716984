"""tiersim scaling: exact KV arithmetic for the paper's scenarios, tier shares from the schedules, JSON, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tiersim.cli import cli
from tiersim.errors import TiersimError
from tiersim.policy import PolicyConfig
from tiersim.sim import SimConfig, simulate
from tiersim.specs import hardware_spec, model_spec
from tiersim.studies.scaling import (
    SCALING_STRATEGIES,
    ScalingConfig,
    Scenario,
    TierShares,
    capacity_row,
    scaling_rows,
    scenarios,
)
from tiersim.traces.format import write_trace
from tiersim.traces.synth import SynthParams, synth_request

H200 = hardware_spec("h200-sxm")
SHARES = TierShares(hbm=0.5, ddr=0.4, compressed=0.0, evicted=0.1)
REQUIRED = {"model", "hardware", "batch", "context", "weights_dtype", "kv_gb", "kv_gb_paper_formula", "weights_gb",
            "hbm_saved_gb", "fits_full", "ddr_gb_per_step"}


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("scaling") / "small.tstrace"
    params = SynthParams()
    requests = [synth_request(params, 40, g, seed) for seed, g in enumerate((250, 330))]
    write_trace(path, requests, model={"id": "synthetic", "shape": {}}, generation={},
                metadata={"synthetic": params.to_dict()})
    return path


def row(model: str, batch: int, context: int, weights: str = "fp16", shares: TierShares = SHARES) -> dict:
    return capacity_row(Scenario(model_spec(model), H200, batch, context, weights), shares, PolicyConfig(), 0.10)


# -- exact arithmetic ----------------------------------------------------------------------------------
def test_paper_70b_row_real_kv_heads_vs_the_papers_formula():
    r = row("r1-llama-70b", 8, 4096)
    # 8 x 4096 tokens x 80 layers x 2 (K, V) x 128 head_dim x 2 bytes, times 8 KV heads (real) or 64 heads (paper).
    assert r["kv_gb"] == 8 * 4096 * 80 * 2 * 8 * 128 * 2 / 1e9 == pytest.approx(10.737, abs=5e-4)
    assert r["kv_gb_paper_formula"] == 8 * 4096 * 80 * 2 * 64 * 128 * 2 / 1e9 == pytest.approx(85.899, abs=5e-4)
    assert r["kv_gb_paper_formula"] / r["kv_gb"] == 8.0
    params = model_spec("r1-llama-70b").params
    assert r["weights_gb"] == params * 2 / 1e9 == pytest.approx(141.107, abs=1e-3)
    # 141.1 GB of bf16 weights alone exceed one H200's 141 GB.
    assert r["hbm_need_full_gb"] == pytest.approx(r["weights_gb"] + 14.1 + r["kv_gb"], rel=1e-12)
    assert not r["fits_full"] and not r["fits_tiered"]
    int4 = row("r1-llama-70b", 8, 4096, "int4")
    assert int4["weights_gb"] == params * 4 / 8 / 1e9 and int4["fits_full"] and int4["kv_gb"] == r["kv_gb"]


def test_paper_7b_rows():
    r = row("r1-qwen-7b", 1, 2048)
    assert r["kv_gb"] == 2048 * 57_344 / 1e9 == pytest.approx(0.11744, abs=1e-5)
    assert r["kv_gb_paper_formula"] == 2048 * 2 * 28 * 28 * 128 * 2 / 1e9  # 28 attention heads instead of 4 KV heads
    assert row("r1-qwen-7b", 8, 4096)["kv_gb"] == 8 * 4096 * 57_344 / 1e9 == pytest.approx(1.879, abs=1e-3)


def test_tiered_columns_follow_the_tier_shares():
    r = row("r1-qwen-14b", 64, 16384)
    kv = 64 * 16384 * 196_608 / 1e9
    assert r["kv_gb"] == pytest.approx(kv, rel=1e-12)
    assert r["kv_off_hbm_share"] == pytest.approx(0.5, rel=1e-12)  # DDR 0.4 + evicted 0.1
    assert r["hbm_saved_gb"] == pytest.approx(0.5 * kv, rel=1e-12)
    assert r["hbm_saved_gb_paper_formula"] == pytest.approx(0.5 * kv * 40 / 8, rel=1e-12)
    assert r["ddr_gb_per_step"] == pytest.approx(0.4 * kv, rel=1e-12)
    assert r["ddr_link_ms_per_step"] == pytest.approx(1e3 * 0.4 * kv / 55.0, rel=1e-12)  # pinned PCIe Gen5 H2D
    assert r["kv_share_hbm"] == pytest.approx(kv / 141.0, rel=1e-12)
    assert r["hbm_need_tiered_gb"] == pytest.approx(r["hbm_need_full_gb"] - 0.5 * kv, rel=1e-12)


def test_compressed_tokens_count_at_their_compressed_size():
    shares = TierShares(hbm=0.5, ddr=0.0, compressed=0.5, evicted=0.0)
    r = capacity_row(Scenario(model_spec("r1-qwen-7b"), H200, 1, 1024, "fp16"), shares,
                     PolicyConfig(compressed_ratio=1.0, compressed_bits=8), 0.10)
    # int8 of a bf16 value is half its bytes, plus one fp16 scale per 128-wide head: 0.5 + 2/256.
    assert r["kv_off_hbm_share"] == pytest.approx(0.5 * (1 - (0.5 + 2 / 256)), rel=1e-12)


def tp_row(model: str, tp: int, batch: int = 8, context: int = 4096, weights: str = "native") -> dict:
    return capacity_row(Scenario(model_spec(model), H200, batch, context, weights, tp=tp), SHARES, PolicyConfig(), 0.10)


# -- MoE, MLA, sliding windows at TP 1/2/4/8 -----------------------------------------------------------
def test_per_gpu_kv_follows_the_kv_heads_across_tp():
    tokens = 8 * 4096
    llama = {tp: tp_row("r1-llama-70b", tp) for tp in (1, 2, 4, 8)}
    for tp, r in llama.items():  # 8 KV heads: split evenly up to tp 8
        assert r["kv_gb"] == pytest.approx(tokens * 327_680 / tp / 1e9, rel=1e-12) and r["tp"] == tp
        assert r["kv_gb_paper_formula"] == pytest.approx(tokens * 2_621_440 / tp / 1e9, rel=1e-12)
    assert not llama[1]["fits_full"] and llama[2]["fits_full"]
    qwen = {tp: tp_row("qwen3-30b-a3b", tp)["kv_gb"] for tp in (1, 2, 4, 8)}  # 4 KV heads: replicated in pairs at 8
    assert qwen[1] == pytest.approx(tokens * 98_304 / 1e9, rel=1e-12)
    assert qwen[2] == pytest.approx(qwen[1] / 2, rel=1e-12) and qwen[8] == qwen[4] == pytest.approx(qwen[1] / 4)
    deepseek = [tp_row("deepseek-r1", tp) for tp in (1, 2, 4, 8)]  # the MLA latent is on every GPU
    assert {r["kv_gb"] for r in deepseek} == {tokens * 70_272 / 1e9}
    assert deepseek[0]["kv_gb_paper_formula"] / deepseek[0]["kv_gb"] == pytest.approx(2 * 128 * 192 / 576)
    assert [r["weights_dtype"] for r in deepseek] == ["fp8"] * 4
    assert not deepseek[2]["fits_full"] and deepseek[3]["fits_full"]  # fp8 R1 needs all 8 H200s
    weights = [r["weights_gb"] for r in deepseek]
    assert weights == sorted(weights, reverse=True) and weights[3] == pytest.approx(85.12, abs=0.01)


def test_sliding_window_layers_hold_their_window_and_are_not_tiered():
    m = model_spec("gpt-oss-120b")  # 18 full + 18 sliding (128-token window) layers, 8 KV heads of 64
    per_layer = 2 * 8 * 64 * 2
    for tp in (1, 8):
        r = tp_row("gpt-oss-120b", tp, batch=64, context=16384)
        full = 64 * 16384 * 18 * per_layer / tp / 1e9
        assert r["kv_gb"] == pytest.approx(full + 64 * 128 * 18 * per_layer / tp / 1e9, rel=1e-12)
        assert r["hbm_saved_gb"] == pytest.approx(0.5 * full, rel=1e-12)  # DDR 0.4 + evicted 0.1 of global KV
        assert r["ddr_gb_per_step"] == pytest.approx(0.4 * full, rel=1e-12)
    assert tp_row("gpt-oss-120b", 1)["weights_dtype"] == "mxfp4" and m.quantization == "mxfp4"


def test_tp_grid_and_its_bad_values(trace_path):
    models = (model_spec("qwen3-30b-a3b"),)
    rows = scenarios(ScalingConfig(models=models, hardware=(H200,), batches=(8,), contexts=(4096,), tps=(1, 2, 4, 8),
                                   weights=("native",)))
    mine = [s for s in rows if not s.paper]
    assert [s.tp for s in mine] == [1, 2, 4, 8] and all(s.tp == 1 for s in rows if s.paper)
    with pytest.raises(TiersimError, match=r"tps: tp must divide the r1-llama-70b attention heads \(64\), got 3"):
        ScalingConfig(models=(model_spec("r1-llama-70b"),), hardware=(H200,), tps=(3,))
    with pytest.raises(TiersimError, match="tps: tp 2 needs NVLink"):
        ScalingConfig(models=models, hardware=(hardware_spec("rtx4090"),), tps=(2,))
    cfg = ScalingConfig(models=models, hardware=(H200,), batches=(8,), contexts=(256,), tps=(1, 4), paper=False,
                        steps=8, trace=trace_path, strategies=("prefetch-layer",), weights=("native",))
    by_tp = {r["tp"]: r for r in scaling_rows(cfg)}
    assert by_tp[4]["step_ms_full"] < by_tp[1]["step_ms_full"]  # a quarter of the weights read per GPU


# -- scenarios -----------------------------------------------------------------------------------------
def test_the_papers_scenarios_are_always_there_once():
    cfg = ScalingConfig(models=(model_spec("r1-qwen-7b"),), hardware=(H200,), batches=(8, 32), contexts=(2048,))
    rows = scenarios(cfg)
    paper = [s for s in rows if s.paper]
    assert len(paper) == 2 * 2 * 2 * 2  # 7B and 70B x batch 1, 8 x 2K, 4K x fp16, int4
    assert {s.weights_dtype for s in paper} == {"fp16", "int4"}
    keys = [(s.model.name, s.batch, s.context, s.weights_dtype) for s in rows]
    assert len(keys) == len(set(keys))
    assert len(rows) == 16 + 1  # the grid's (7B, 8, 2048, fp16) is a paper scenario; (7B, 32, 2048) is not
    no_paper = scenarios(ScalingConfig(models=(model_spec("r1-qwen-7b"),), hardware=(H200,), batches=(8, 32),
                                       contexts=(2048,), paper=False))
    assert len(no_paper) == 2 and not any(s.paper for s in no_paper)


def test_tier_shares_come_from_the_schedules(trace_path):
    # Blocks of one token: at 300 generated tokens a 3% eviction of 16-token pages rounds down to none.
    cfg = SimConfig(model=model_spec("r1-qwen-7b"), hardware=H200, trace=trace_path, batch=4, gen_tokens=300, steps=8,
                    strategy="evict-only", block_size=1)
    w = simulate(cfg, workers=1).workload
    shares = TierShares.at_end(w)
    assert all(s.counts[-1].sum() == s.prompt_tokens + s.steps for s in w.schedules)
    expected = np.mean([s.counts[-1] / (s.prompt_tokens + s.steps) for s in w.schedules], axis=0)
    np.testing.assert_allclose([shares.hbm, shares.ddr, shares.compressed, shares.evicted], expected, rtol=1e-12)
    assert shares.hbm + shares.ddr + shares.compressed + shares.evicted == pytest.approx(1.0)
    assert 0 < shares.ddr < 1 and shares.evicted > 0


def test_rows_simulate_every_strategy_and_share_points_across_weights(trace_path):
    cfg = ScalingConfig(models=(model_spec("r1-qwen-7b"),), hardware=(H200,), batches=(1, 16), contexts=(256, 512),
                        weights=("fp16", "int4"), paper=False, steps=16, trace=trace_path)
    calls = []
    rows = scaling_rows(cfg, lambda i, n: calls.append((i, n)))
    assert len(rows) == 2 * 2 * 2 and calls[-1] == (8, 8)  # each weights dtype is simulated at its precision
    for r in rows:
        assert REQUIRED <= set(r) and all(f"overhead_pct_{s}" in r for s in SCALING_STRATEGIES)
        assert r["overhead_weights_dtype"] == r["weights_dtype"] and r["sim_steps"] == 16
        assert r["overhead_pct_evict-only"] <= 0 <= r["overhead_pct_prefetch-sync"]
    by = {(r["batch"], r["context"], r["weights_dtype"]): r for r in rows}
    for b in (1, 16):
        for c in (256, 512):
            fp16, int4 = by[(b, c, "fp16")], by[(b, c, "int4")]
            # int4 weights: shorter memory-bound matmuls hide less of the same transfer.
            assert int4["overhead_pct_prefetch-sync"] >= fp16["overhead_pct_prefetch-sync"]
            assert int4["step_ms_full"] < fp16["step_ms_full"]
            assert int4["weights_gb"] == pytest.approx(fp16["weights_gb"] / 4, rel=1e-12)
    # Longer chains move more KV to DDR: at batch 16 the DDR bytes per step grow with the context.
    assert by[(16, 512, "fp16")]["ddr_gb_per_step"] > by[(16, 256, "fp16")]["ddr_gb_per_step"] > 0


# -- CLI -------------------------------------------------------------------------------------------------
def test_cli_scaling_json_has_the_papers_rows(trace_path, tmp_path):
    out, js = tmp_path / "out", tmp_path / "scaling.json"
    r = CliRunner().invoke(cli, ["scaling", "--trace", str(trace_path), "--models", "r1-qwen-7b", "--batches", "1",
                                 "--context", "256", "--strategies", "prefetch-layer", "--steps", "4",
                                 "--json", str(js), "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads(js.read_text())
    assert isinstance(rows, list) and all(REQUIRED | {"overhead_pct_prefetch-layer"} <= set(x) for x in rows)
    paper70 = [x for x in rows if x["model"] == "r1-llama-70b" and x["batch"] == 8 and x["context"] == 4096]
    assert {x["weights_dtype"] for x in paper70} == {"fp16", "int4"}
    assert all(round(x["kv_gb"], 2) == 10.74 and round(x["kv_gb_paper_formula"], 2) == 85.90 for x in paper70)
    assert len(rows) == 16 + 1 and sorted(p.name for p in out.iterdir()) == ["scaling.csv", "scaling.json"]
    assert "10.74 (85.90)" in r.output and "r1-llama-70b*" in r.output


@pytest.mark.parametrize("args, message", [
    (["--models", "no-such-model"], "unknown model 'no-such-model'"),
    (["--hardware", "no-such-gpu"], "unknown hardware 'no-such-gpu'"),
    (["--batches", ""], "--batches is empty"),
    (["--batches", "1,x"], "--batches '1,x' invalid"),
    (["--batches", "0"], "batches: 0 is not an integer >= 1"),
    (["--context", " , "], "--context is empty"),
    (["--weights", "fp8"], "--weight-bits 'fp8' invalid"),
    (["--strategies", "full"], "strategies ['full'] invalid"),
    (["--batches", "8,8"], "repeats a value"),
])
def test_cli_scaling_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    js = tmp_path / "scaling.json"
    r = CliRunner().invoke(cli, ["scaling", *args, "--json", str(js), "--out", str(tmp_path / "out")])
    assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not js.exists() and not (tmp_path / "out").exists()


def test_config_refuses_empty_lists():
    with pytest.raises(TiersimError, match="models is empty"):
        ScalingConfig(models=(), hardware=(H200,))
    with pytest.raises(TiersimError, match="contexts is empty"):
        ScalingConfig(models=(model_spec("r1-qwen-7b"),), hardware=(H200,), contexts=())
