"""fp8 matmuls at the GPU's fp8 rate (W8A8) and the expert-parallel all-to-all over NVLink: the profiles' fp8 rates,
the FLOPs each rate gets, the all-to-all by hand, where it enters the plan and the summary, and bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tiersim.errors import ConfigError, SpecError
from tiersim.sim import SimConfig, simulate
from tiersim.sim.costs import CostModel
from tiersim.sim.plan import make_plan
from tiersim.sim.shard import gpu_share
from tiersim.specs import hardware_names, hardware_spec, model_spec
from tiersim.specs.hardware import HardwareSpec
from tiersim.traces.format import write_trace
from tiersim.traces.synth import SynthParams, synth_request

H200 = hardware_spec("h200-sxm")
A100 = hardware_spec("a100-80g-sxm")


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8_ep") / "small.tstrace"
    params = SynthParams()
    requests = [synth_request(params, 40, g, seed) for seed, g in enumerate((120, 160))]
    write_trace(path, requests, model={"id": "synthetic", "shape": {}}, generation={},
                metadata={"synthetic": params.to_dict()})
    return path


# -- the profiles' fp8 rates -----------------------------------------------------------------------------------


def test_fp8_rates_from_the_datasheets():
    # H100/H200/GH200 SXM: 3,958 TFLOPS FP8 with sparsity, 1,979 dense; twice the dense bf16 rate on every FP8 GPU.
    for name in ("h100-sxm", "h200-sxm", "gh200"):
        assert hardware_spec(name).fp8_tflops_spec == 1979.0
    for name in hardware_names():
        h = hardware_spec(name)
        if h.fp8_tflops_spec is None:
            continue
        assert h.fp8_tflops_spec == pytest.approx(2 * h.bf16_tflops_spec, rel=0.015), name
        assert h.fp8_tflops_effective <= h.fp8_tflops_spec
        assert h.sources["fp8_tflops_spec"] and h.sources["fp8_tflops_effective"]
    assert A100.fp8_tflops_spec is None and A100.fp8_tflops_effective is None  # Ampere: no FP8 tensor cores


def test_fp8_profile_fields_are_checked():
    d = H200.to_dict()
    with pytest.raises(SpecError, match="fp8_tflops_spec' and 'fp8_tflops_effective' go together"):
        HardwareSpec(**{**d, "fp8_tflops_effective": None, "sources": {}})
    with pytest.raises(SpecError, match="fp8_tflops_effective"):
        HardwareSpec(**{**d, "fp8_tflops_effective": 2500.0})
    assert hardware_spec("h200-sxm").to_toml().count("fp8_tflops_") == 2  # written back with its sources


# -- matmuls at the fp8 rate -----------------------------------------------------------------------------------


def test_fp8_weights_run_w8a8_at_the_fp8_rate_by_hand():
    m = model_spec("r1-llama-70b")
    d = m.param_breakdown
    g = gpu_share(m, weight_dtype="fp8")
    # Every decoder matmul is fp8 (attention, MLP); the norms stay 16-bit.
    assert g.layer_fp8_flops_per_token == pytest.approx(2 * (d["attention"] + d["mlp"]) / m.layers, rel=1e-12)
    assert g.layer_flops_per_token - g.layer_fp8_flops_per_token == pytest.approx(
        2 * (d["other"] - m.hidden) / m.layers, rel=1e-12)
    cost = CostModel(m, H200, share=g)
    tokens = np.array([1.0, 8192.0])
    fp8 = g.layer_fp8_flops_per_token * tokens
    flops_s = (g.layer_flops_per_token * tokens - fp8) / (692.3e12) + fp8 / 1385.3e12
    expected = np.maximum(g.layer_weight_bytes(tokens) / (3800e9), flops_s)
    np.testing.assert_allclose(cost.matmul_s(tokens), expected, rtol=1e-12)
    # Compute-bound at 8,192 tokens: fp8 is about twice as fast as the same weights held in bf16.
    bf16 = CostModel(m, H200, share=gpu_share(m, weight_dtype="bf16")).matmul_s(tokens)
    assert cost.matmul_s(tokens)[1] == pytest.approx(bf16[1] / 2, rel=0.01)


def test_weight_only_formats_and_gpus_without_fp8_keep_the_bf16_rate():
    m = model_spec("r1-llama-70b")
    for dtype in ("bf16", "int8", "int4"):
        assert gpu_share(m, weight_dtype=dtype).layer_fp8_flops_per_token == 0.0
    assert gpu_share(m, weight_bits=8).layer_fp8_flops_per_token == 0.0  # uniform weight_bits: weight-only
    assert gpu_share(model_spec("gpt-oss-120b")).layer_fp8_flops_per_token == 0.0  # mxfp4 experts: dequantized
    assert gpu_share(model_spec("deepseek-r1"), 8).layer_fp8_flops_per_token > 0  # its checkpoint is fp8
    # A100: fp8 weights halve the bytes but multiply at the bf16 rate (vLLM's FP8 Marlin, W8A16).
    g = gpu_share(m, weight_dtype="fp8")
    tokens = np.array([8192.0])
    flops_s = g.layer_flops_per_token * tokens / (A100.bf16_tflops_effective * 1e12)
    np.testing.assert_allclose(CostModel(m, A100, share=g).matmul_s(tokens),
                               np.maximum(g.layer_weight_bytes(tokens) / (A100.hbm_gbps_effective * 1e9), flops_s),
                               rtol=1e-12)


# -- the expert-parallel all-to-all ----------------------------------------------------------------------------


def test_alltoall_qwen3_30b_a3b_at_ep8_by_hand():
    m = model_spec("qwen3-30b-a3b")  # hidden 2048, top 8 of 128 experts, 48 MoE layers
    g = gpu_share(m, tp=1, ep=8, dp=8)
    # Dispatch and combine: 2 x 2048 x 2 bytes x 8 experts x 7/8 of them on other GPUs, per token.
    assert g.alltoall_bytes_per_token_moe_layer == 2 * 2048 * 2 * 8 * 7 / 8 == 57344
    cost = CostModel(m, H200, share=g)
    tokens = np.array([1.0, 64.0, 256.0])
    per_layer = 2 * 10e-6 + tokens * 57344 / 450e9  # two collectives of 10 us, bytes at 450 GB/s one way
    np.testing.assert_allclose(cost.alltoall_s(tokens), per_layer, rtol=1e-12)
    assert 48 * cost.alltoall_s(np.array([64.0]))[0] * 1e3 == pytest.approx(1.35147, rel=1e-5)  # ms per step
    # Linear in tokens beyond its fixed cost.
    a = cost.alltoall_s(np.array([100.0, 200.0, 300.0]))
    assert a[2] - a[1] == pytest.approx(a[1] - a[0], rel=1e-12) and a[0] > 0


def test_alltoall_only_when_the_expert_group_spans_replicas():
    m = model_spec("qwen3-30b-a3b")
    tokens = np.array([1.0, 64.0])
    for tp, ep, dp in ((1, 1, 1), (1, 1, 8), (8, 8, 1), (4, 2, 2)):  # ep 1, or experts inside one replica
        g = gpu_share(m, tp=tp, ep=ep, dp=dp)
        assert g.alltoall_bytes_per_token_moe_layer == 0.0
        np.testing.assert_array_equal(CostModel(m, H200, share=g).alltoall_s(tokens), 0.0)
    dense = model_spec("r1-llama-70b")
    np.testing.assert_array_equal(CostModel(dense, H200, share=gpu_share(dense, 2, dp=4)).alltoall_s(tokens), 0.0)
    # tp 2 x dp 4, ep 8: each GPU dispatches half of its replica's tokens.
    assert gpu_share(m, tp=2, ep=8, dp=4).alltoall_bytes_per_token_moe_layer == 57344 / 2
    # DeepSeek-R1: 58 MoE layers of 61; the mean layer carries 58/61 of one MoE layer's all-to-all.
    r1 = model_spec("deepseek-r1")
    g = gpu_share(r1, tp=1, ep=8, dp=8)
    one = 2 * 10e-6 + 64 * (2 * 7168 * 2 * 8 * 7 / 8) / 450e9
    assert CostModel(r1, H200, share=g).alltoall_s(np.array([64.0]))[0] == pytest.approx(one * 58 / 61, rel=1e-12)


def test_alltoall_in_the_plan_and_the_summary(trace_path):
    base = dict(model="qwen3-30b-a3b", hardware=H200, trace=trace_path, batch=8, gen_tokens=160, steps=48)
    cfg = SimConfig(**base, tp=1, dp=8, ep=8)
    r = simulate(cfg, workers=1)
    w = r.workload
    cost = CostModel(cfg.model, H200, share=cfg.share)
    new = w.column("decode") + w.column("prefill_tokens")
    plan = make_plan("full", w, cost, cfg)[0]
    np.testing.assert_allclose(plan.matmul_s, cost.matmul_s(new) + cost.alltoall_s(new) + cost.launch_s, rtol=1e-12)
    assert r.summary["alltoall_ms_per_step"] == pytest.approx(48 * cost.alltoall_s(new).mean() * 1e3, rel=1e-12)
    assert r.summary["alltoall_ms_per_step"] > 1.0 and r.summary["allreduce_ms_per_step"] == 0.0
    # Without expert parallelism the replicas exchange nothing.
    assert simulate(dataclasses.replace(cfg, ep=1), workers=1).summary["alltoall_ms_per_step"] == 0.0


def test_alltoall_needs_nvlink_within_one_host():
    with pytest.raises(ConfigError, match="ep"):
        SimConfig(model="qwen3-30b-a3b", hardware="gh200", dp=2, ep=2)  # one superchip: no NVLink profile
    SimConfig(model="qwen3-30b-a3b", hardware="gh200", tp=1, dp=2, ep=1)  # no all-to-all: fine
