"""The simulator on MoE, MLA and sliding-window models and on TP / fp8 deployments: per-GPU sizes by hand,
capacity, all-reduce, the MoE roofline bracket, window KV, the summary's trace fields, and bad input."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from tiersim.errors import ConfigError, SpecError
from tiersim.sim import SimConfig, simulate
from tiersim.sim.costs import CostModel
from tiersim.sim.plan import make_plan
from tiersim.sim.shard import gpu_share, window_demand
from tiersim.specs import hardware_spec, model_spec
from tiersim.traces.format import write_trace
from tiersim.traces.synth import SynthParams, synth_request
from tiersim.workload.build import COL

H200 = hardware_spec("h200-sxm")
P, G = 40, 300


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("families") / "small.tstrace"
    params = SynthParams()
    requests = [synth_request(params, P, g, seed) for seed, g in enumerate((180, 260))]
    write_trace(path, requests, model={"id": "synthetic", "shape": {}}, generation={},
                metadata={"synthetic": params.to_dict()})
    return path


def run(trace_path, model: str, strategy: str = "full", **kw):
    base = dict(model=model, hardware=H200, trace=trace_path, batch=8, gen_tokens=G, steps=64, strategy=strategy)
    cfg = SimConfig(**{**base, **kw})
    return cfg, simulate(cfg, workers=1)


def kv_bytes(result) -> np.ndarray:
    """HBM bytes per step beyond weights and reserve (full strategy: the KV cache)."""
    return result.memory.hbm_bytes - result.memory.fixed_bytes


def assert_kv_is_blocks_of(result, bytes_per_token: int, window_bytes: np.ndarray | float = 0.0) -> None:
    """`full` holds every token of every slot in whole KV blocks: at least the tokens, less than one more block a slot."""
    cfg = result.summary["config"]
    kv = (kv_bytes(result) - window_bytes) / bytes_per_token
    tokens = result.workload.column("tokens")
    block = cfg.get("block_size", 1)
    np.testing.assert_allclose(kv, np.round(kv), rtol=0, atol=1e-6)  # whole tokens' worth
    assert np.all(kv >= tokens) and np.all(kv < tokens + cfg["batch"] * block)


# -- per-GPU sizes ---------------------------------------------------------------------------------------
def test_dense_model_on_one_gpu_keeps_the_single_gpu_numbers():
    m = model_spec("r1-qwen-14b")
    g = gpu_share(m)
    assert g.weight_bytes == m.weight_bytes and g.kv_bytes_per_token_global == m.kv_bytes_per_token
    assert g.layer_weight_bytes(np.array([1.0, 256.0])) == m.layer_params * 2  # no experts: one scalar
    assert g.layer_flops_per_token == 2.0 * m.layer_params and g.head_weight_bytes == m.vocab * m.hidden * 2
    assert gpu_share(m, weight_bits=4).weight_bytes == m.weight_bytes_at(4)
    cost = CostModel(m, H200)
    assert cost.attention_efficiency == 1.0 and cost.step_overhead_s == 0.0  # absent from the profile
    np.testing.assert_array_equal(cost.allreduce_s(np.array([1.0, 64.0])), 0.0)


def test_llama_70b_needs_tp2_or_fp8_on_one_h200(trace_path):
    m = model_spec("r1-llama-70b")
    _, one = run(trace_path, "r1-llama-70b")
    assert not one.summary["fits"] and one.summary["max_batch_full"] == 0
    assert one.summary["weights_gb"] == pytest.approx(m.params * 2 / 1e9)  # 141.1 GB > 141 GB
    _, tp2 = run(trace_path, "r1-llama-70b", tp=2)
    d = m.param_breakdown
    # Everything split in two but the norms, which every GPU holds.
    assert tp2.summary["weights_gb"] == pytest.approx(((m.params - d["other"]) / 2 + d["other"]) * 2 / 1e9, rel=1e-12)
    assert tp2.summary["fits"] and tp2.summary["max_batch_full"] > 100 and tp2.summary["gpus"] == 2
    _, fp8 = run(trace_path, "r1-llama-70b", weight_dtype="fp8")
    matmul = d["attention"] + d["mlp"]  # fp8: the decoder's matmul weights; embeddings, lm_head, norms stay 16-bit
    assert fp8.summary["weights_gb"] == pytest.approx((matmul + 2 * (m.params - matmul)) / 1e9, rel=1e-12)
    assert fp8.summary["fits"] and fp8.summary["weights_dtype"] == "fp8"
    # Half the weight bytes: a memory-bound decode step at batch 8 gets faster too.
    assert fp8.summary["step_ms_full_mean"] < 0.6 * one.summary["step_ms_full_mean"]


def test_kv_per_gpu_splits_with_tp_for_8_kv_heads_and_not_for_mla(trace_path):
    _, tp1 = run(trace_path, "r1-llama-70b")
    _, tp8 = run(trace_path, "r1-llama-70b", tp=8)
    np.testing.assert_allclose(kv_bytes(tp8) * 8, kv_bytes(tp1), rtol=1e-12)
    _, ds1 = run(trace_path, "deepseek-r1")
    _, ds8 = run(trace_path, "deepseek-r1", tp=8)
    np.testing.assert_allclose(kv_bytes(ds8), kv_bytes(ds1), rtol=1e-12)  # the latent is on every GPU
    assert_kv_is_blocks_of(ds8, 61 * (512 + 64) * 2)
    _, fp8 = run(trace_path, "r1-llama-70b", tp=8, kv_dtype="fp8")
    np.testing.assert_allclose(kv_bytes(fp8) * 2, kv_bytes(tp8), rtol=1e-12)


def test_deepseek_r1_fits_eight_h200s_in_fp8_not_one(trace_path):
    m = model_spec("deepseek-r1")
    _, one = run(trace_path, "deepseek-r1")
    _, tp8 = run(trace_path, "deepseek-r1", tp=8)
    assert not one.summary["fits"] and tp8.summary["fits"] and tp8.summary["weights_dtype"] == "fp8"
    assert 80 < tp8.summary["weights_gb"] < 90  # ~671 GB of fp8 / 8, plus the replicated latent projections
    assert one.summary["weights_gb"] > m.params / 1e9  # fp8 decoder, 16-bit embeddings
    with pytest.raises(ConfigError, match="weight_dtype"):
        SimConfig(model="deepseek-r1", hardware=H200, weight_dtype="fp8", weight_bits=16)


def test_gpt_oss_120b_fits_one_h200_in_mxfp4_not_in_bf16(trace_path):
    _, native = run(trace_path, "gpt-oss-120b")
    _, bf16 = run(trace_path, "gpt-oss-120b", weight_dtype="bf16")
    assert native.summary["fits"] and native.summary["weights_dtype"] == "mxfp4"
    assert 60 < native.summary["weights_gb"] < 70 and not bf16.summary["fits"]


# -- compute ---------------------------------------------------------------------------------------------
def test_moe_step_falls_between_the_active_and_total_param_rooflines():
    m = model_spec("qwen3-30b-a3b")
    cost = CostModel(m, H200)
    g, bw, flops = cost.share, cost.hbm_bytes_per_s, cost.flops_per_s
    active = (m.active_params - m.param_breakdown["embeddings"] - m.hidden) * 2 / m.layers
    total = (m.params - m.param_breakdown["embeddings"] - m.hidden) * 2 / m.layers
    # One token reads exactly its 8 experts of 128: the active-parameter roofline.
    assert g.layer_weight_bytes(1.0) == pytest.approx(active, rel=1e-12)
    tokens = np.array([1.0, 4.0, 16.0, 64.0, 4096.0])
    t = cost.matmul_s(tokens)
    low = np.maximum(active / bw, g.layer_flops_per_token * tokens / flops)
    high = np.maximum(total / bw, g.layer_flops_per_token * tokens / flops)
    assert np.all(low <= t * (1 + 1e-12)) and np.all(t <= high * (1 + 1e-12))
    assert low[1] < t[1] < high[1]  # 4 tokens reach ~30 of 128 experts
    assert g.layer_flops_per_token == pytest.approx(2 * active / 2, rel=1e-12)  # FLOPs follow the active weights


def test_tp_all_reduce_per_layer_over_nvlink_by_hand(trace_path):
    m = model_spec("r1-llama-70b")
    cfg, r = run(trace_path, "r1-llama-70b", tp=8)
    cost = CostModel(m, H200, share=cfg.share)
    tokens = np.array([1.0, 256.0])
    # Two ring all-reduces of tokens x hidden x 2 bytes, 2(tp-1)/tp of them per GPU at 450 GB/s, 10 us each.
    np.testing.assert_allclose(cost.allreduce_s(tokens), 2 * 10e-6 + 2 * 7 / 8 * tokens * 2 * 8192 * 2 / 450e9,
                               rtol=1e-12)
    plan = make_plan("full", r.workload, cost, cfg)[0]
    new = r.workload.column("decode") + r.workload.column("prefill_tokens")
    np.testing.assert_allclose(plan.matmul_s, cost.matmul_s(new) + cost.allreduce_s(new) + cost.launch_s, rtol=1e-12)
    # Attention heads split over the 8 GPUs: an eighth of the FLOPs per pair.
    np.testing.assert_allclose(cost.attention_s(0.0, 1e9), 4 * 64 * 128 * 1e9 / 8 / (H200.bf16_tflops_effective * 1e12))


def test_mla_attention_is_the_absorbed_form():
    m = model_spec("deepseek-r1")
    cost = CostModel(m, H200, share=gpu_share(m, 8))
    # Scores over the 512-wide latent + 64 rope dims, values over the latent, 128 heads split over 8 GPUs.
    flops = 2 * 128 * (2 * 512 + 64) * 1e6 / 8
    assert cost.attention_s(0.0, 1e6) == pytest.approx(flops / (H200.bf16_tflops_effective * 1e12), rel=1e-12)
    assert 0 < cost.qkv_share() < 1


# -- sliding-window layers -------------------------------------------------------------------------------
def test_window_demand_by_hand_on_one_prompt():
    # A prompt of 200 positions under a 128-token window: a triangle of 128, then 128 keys for 72 more positions.
    m = model_spec("gpt-oss-20b")
    assert m.sliding_window == 128
    inside, past = min(200, 128), 200 - 128
    assert inside * (inside + 1) / 2 + past * 128 == 8256 + 9216


@pytest.mark.parametrize("gen_tokens", [260, 400])
def test_sliding_kv_stays_at_the_window_and_only_global_layers_are_tiered(trace_path, gen_tokens):
    # Cold start: every slot begins its chain at step 0 (a 40-token prompt) and passes the window at step 88.
    cfg, r = run(trace_path, "gpt-oss-20b", strategy="prefetch-layer", gen_tokens=gen_tokens, steps=256,
                 cold_start=True)
    g, w, c = cfg.share, r.workload, r.workload.column
    assert (g.full_layers, g.sliding_layers, g.sliding_window) == (12, 12, 128)
    flat = w.tables.reshape(-1, w.tables.shape[-1])
    held = np.minimum(flat[w.slot_rows, COL["tokens"]], 128).sum(axis=0)
    win = window_demand(w, 128)
    np.testing.assert_array_equal(win.resident_tokens, held)
    np.testing.assert_array_equal(c("tokens"), cfg.batch * (P + np.arange(256)))  # the prefill, then one a step
    # From step 88 on every slot holds exactly its window in each sliding layer, whatever the chain's length.
    np.testing.assert_array_equal(win.resident_tokens[88:], cfg.batch * 128)
    assert np.all(win.resident_tokens[:88] < cfg.batch * 128)
    # The DDR tier holds full-attention layers only; the window part of HBM is never tiered.
    per_token = 12 * g.kv_bytes_per_token_layer
    np.testing.assert_allclose(r.memory.ddr_bytes, c("ddr") * per_token, rtol=1e-12)
    assert_kv_is_blocks_of(dataclasses.replace(r, memory=r.memory_full), per_token, held * g.kv_bytes_per_token_sliding)
    promoted = np.concatenate([[0.0], c("ddr_to_hbm")[:-1]])
    np.testing.assert_allclose(r.steps["h2d_bytes"], (c("ddr") + promoted) * per_token, rtol=1e-12)
    assert c("ddr")[:192].max() == 0 < c("ddr")[200:].min()  # the first re-tier past 132 tokens, at step 192


# -- summary, config, bad input --------------------------------------------------------------------------
def test_summary_names_the_trace_model_and_its_synthetic_share(trace_path):
    cfg, r = run(trace_path, "qwen3-30b-a3b", batch=64)
    s = r.summary
    assert s["trace_model"] == "synthetic"
    assert s["synthetic_share"] == s["tokens_synthetic"] / (s["tokens_captured"] + s["tokens_synthetic"])
    assert s["config"]["tp"] == 1 and s["config"]["weight_dtype"] is None and s["gpus"] == 1
    assert s["fits"] and s["weights_gb"] == pytest.approx(model_spec("qwen3-30b-a3b").params * 2 / 1e9)


def test_gpu_memory_utilization_sets_the_reserve():
    cfg = SimConfig(model="r1-qwen-7b", hardware=H200, gpu_memory_utilization=0.8)
    assert cfg.reserve_frac == pytest.approx(0.2)
    assert SimConfig(model="r1-qwen-7b", hardware=H200).reserve_frac == 0.10


@pytest.mark.parametrize("kw, field, needle", [
    (dict(model="r1-llama-70b", tp=3), "tp", "tp must divide the r1-llama-70b attention heads (64), got 3"),
    (dict(model="r1-qwen-7b", tp=2, hardware="rtx4090"), "tp", "needs NVLink"),
    (dict(model="deepseek-r1", tp=16), "tp", "at most the 8 GPUs of one h200-sxm host"),
    (dict(model="r1-qwen-7b", tp=2, ep=2), "ep", "ep > 1 needs a mixture-of-experts model"),
    (dict(model="qwen3-30b-a3b", ep=2), "ep", "ep must divide the deployment's tp x dp = 1 GPUs, got 2"),
    (dict(model="r1-qwen-7b", weight_dtype="mxfp4"), "weight_dtype", "quantizes routed experts only"),
    (dict(model="r1-qwen-7b", weight_dtype="int3"), "weight_dtype", "weight_dtype 'int3' unknown"),
    (dict(model="r1-qwen-7b", weight_dtype="int4", weight_bits=8), "weight_dtype", "not both"),
    (dict(model="r1-qwen-7b", kv_dtype="int8"), "kv_dtype", "kv_dtype 'int8' unknown; accepted: bf16, fp16, fp8"),
    (dict(model="r1-qwen-7b", gpu_memory_utilization=0), "gpu_memory_utilization", "in (0, 1]"),
    (dict(model="r1-qwen-7b", max_model_len=1024, gen_tokens=2048), "max_model_len", "shorter than gen_tokens"),
])
def test_bad_deployments_name_the_field(kw, field, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)) as e:
        SimConfig(**{"hardware": H200, **kw})
    assert e.value.field == field


def test_replace_keeps_the_deployment_checked():
    cfg = SimConfig(model="qwen3-30b-a3b", hardware=H200, batch=64)
    assert dataclasses.replace(cfg, tp=4).share.kv_bytes_per_token_layer == 2 * 1 * 128 * 2
    with pytest.raises(ConfigError, match="tp"):
        dataclasses.replace(cfg, tp=3)


def test_attention_efficiency_and_step_overhead_load_from_a_profile(tmp_path):
    text = H200.to_toml().split("\n[")[0].rstrip("\n")  # the fields, before any table
    extra = ('\nattention_efficiency = { value = 0.8, source = "assumption: test" }\n'
             'step_overhead_us = { value = 30.0, source = "assumption: test" }\n')
    path = tmp_path / "h200-refined.toml"
    path.write_text(text + extra)
    hw = hardware_spec(path)
    assert (hw.attention_efficiency, hw.step_overhead_us) == (0.8, 30.0)
    m = model_spec("r1-qwen-7b")
    plain, refined = CostModel(m, H200), CostModel(m, hw)
    assert refined.attention_s(1e9, 1e9) == pytest.approx(plain.attention_s(1e9, 1e9) / 0.8, rel=1e-12)
    assert refined.head_s(8.0) == pytest.approx(plain.head_s(8.0) + 30e-6, rel=1e-12)
    assert hardware_spec(path).to_toml().count("attention_efficiency") == 1  # written back as it was read
    path.write_text(text + extra.replace("0.8", "1.5"))
    with pytest.raises(SpecError, match=r"'attention_efficiency' is 1.5; accepted: a share in \(0, 1\]"):
        hardware_spec(path)
