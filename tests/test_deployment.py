"""Deployment (TP/EP/DP, KV and weight dtypes) and the per-GPU sizes that follow, checked by hand;
the optional NVLink and host fields of hardware profiles."""

import dataclasses

import pytest

from tiersim.errors import ConfigError, SpecError
from tiersim.specs import Deployment, hardware_spec, model_spec, per_gpu

GIB = 2**30


# --- KV per GPU ---------------------------------------------------------------------------------

def test_eight_kv_heads_at_tp8_hold_an_eighth():
    m = model_spec("llama3.1-70b")  # 64 q / 8 KV heads of 128
    one, eight = per_gpu(m, Deployment()), per_gpu(m, Deployment(tp=8))
    assert one.kv_bytes_per_token_layer == 2 * 8 * 128 * 2 == 4096
    assert eight.kv_bytes_per_token_layer == 2 * 1 * 128 * 2 == 512
    assert eight.kv_bytes_per_token * 8 == one.kv_bytes_per_token == m.kv_bytes_per_token
    assert (eight.kv_heads, eight.kv_replication, eight.attention_heads) == (1, 1, 8)


def test_four_kv_heads_at_tp8_are_replicated_in_pairs():
    m = model_spec("qwen3-30b-a3b")  # 32 q / 4 KV heads
    one, eight = per_gpu(m, Deployment()), per_gpu(m, Deployment(tp=8))
    assert (eight.kv_heads, eight.kv_replication) == (1, 2)  # 8 GPUs, 4 heads: each head on 2 GPUs
    assert eight.kv_bytes_per_token * 4 == one.kv_bytes_per_token  # a quarter, not an eighth
    assert per_gpu(m, Deployment(tp=4)).kv_bytes_per_token == eight.kv_bytes_per_token


def test_mla_latent_does_not_shrink_with_tp():
    m = model_spec("deepseek-r1")
    for tp in (1, 2, 4, 8):
        g = per_gpu(m, Deployment(tp=tp))
        assert g.kv_bytes_per_token_layer == (512 + 64) * 2
        assert g.kv_bytes_per_token == 70_272 and g.kv_replication == tp and g.kv_heads == 1


def test_fp8_kv_is_one_byte_per_element():
    for name in ("llama3.1-70b", "deepseek-r1", "gpt-oss-120b"):
        m = model_spec(name)
        bf16, fp8 = per_gpu(m, Deployment(tp=2)), per_gpu(m, Deployment(tp=2, kv_dtype="fp8"))
        assert 2 * fp8.kv_bytes_per_token == bf16.kv_bytes_per_token
        assert 2 * fp8.kv_bytes_per_token_global == bf16.kv_bytes_per_token_global
        assert 2 * fp8.kv_bytes_sliding_fixed == bf16.kv_bytes_sliding_fixed


def test_sliding_layers_per_gpu():
    m = model_spec("gpt-oss-120b")  # 18 full + 18 sliding (128 tokens) layers, 8 KV heads of 64
    g = per_gpu(m, Deployment(tp=8))
    assert g.kv_bytes_per_token_layer == 2 * 1 * 64 * 2 == 256
    assert g.kv_bytes_per_token_global == 18 * 256
    assert g.kv_bytes_sliding_fixed == 18 * 128 * 256
    assert g.kv_bytes_per_sequence(m, 100) == 36 * 100 * 256
    assert g.kv_bytes_per_sequence(m, 10_000) == (18 * 10_000 + 18 * 128) * 256


# --- weights per GPU ----------------------------------------------------------------------------

def test_dense_weights_split_by_tp_norms_replicated():
    m = model_spec("llama3.1-70b")
    embeddings = 2 * 128256 * 8192
    attention = 80 * 8192 * (2 * 8192 + 2 * 1024)
    mlp = 80 * 3 * 8192 * 28672
    norms = 80 * 2 * 8192 + 8192
    assert embeddings + attention + mlp + norms == m.params
    assert per_gpu(m, Deployment()).weight_bytes == 2 * m.params == m.weight_bytes
    assert per_gpu(m, Deployment(tp=8)).weight_bytes == 2 * (embeddings + attention + mlp) / 8 + 2 * norms
    # fp8: layer matmuls 1 byte, embeddings/lm_head and norms stay 2
    assert per_gpu(m, Deployment(tp=8, weight_dtype="fp8")).weight_bytes == \
        (2 * embeddings + attention + mlp) / 8 + 2 * norms
    assert per_gpu(m, Deployment(weight_dtype="int4")).weight_bytes == 2 * embeddings + (attention + mlp) / 2 + 2 * norms


def test_experts_split_by_ep_the_rest_whole():
    m = model_spec("qwen3-30b-a3b")
    d = m.param_breakdown
    g = per_gpu(m, Deployment(dp=8, ep=8))
    assert g.expert_weight_bytes == 2 * d["experts"] / 8
    assert g.weight_bytes == 2 * (m.params - d["experts"]) + 2 * d["experts"] / 8
    # without EP the experts are TP-sliced, and with both, split over max(tp, ep) GPUs
    assert per_gpu(m, Deployment(tp=4)).expert_weight_bytes == 2 * d["experts"] / 4
    assert per_gpu(m, Deployment(tp=2, dp=4, ep=8)).expert_weight_bytes == 2 * d["experts"] / 8


def test_mla_down_projections_and_router_are_replicated():
    m = model_spec("deepseek-r1")
    d = m.param_breakdown
    assert d["attention_latent"] == 61 * 7168 * (1536 + 512 + 64)  # q_a_proj, kv_a_proj_with_mqa
    g = per_gpu(m, Deployment(tp=8))
    split = d["embeddings"] + d["attention"] + d["mlp"] + d["shared_experts"] + d["experts"]
    assert g.weight_bytes == 2 * split / 8 + 2 * (d["attention_latent"] + d["router"] + d["other"])


@pytest.mark.parametrize("name, checkpoint_gib", [("gpt-oss-120b", 60.8), ("gpt-oss-20b", 12.8)])
def test_mxfp4_experts_match_the_published_checkpoint_size(name, checkpoint_gib):
    # model card table 1 (arxiv.org/abs/2508.10925): checkpoint 60.8 GiB / 12.8 GiB, experts in MXFP4
    # (4-bit values + one 8-bit scale per 32: 4.25 bits), everything else bf16
    m = model_spec(name)
    d = m.param_breakdown
    g = per_gpu(m, Deployment(weight_dtype="mxfp4"))
    assert g.weight_bytes == d["experts"] * 4.25 / 8 + 2 * (m.params - d["experts"])
    assert g.weight_bytes / GIB == pytest.approx(checkpoint_gib, rel=0.01)


def test_allreduce_bytes_two_per_layer_only_under_tp():
    m = model_spec("llama3.1-70b")
    assert per_gpu(m, Deployment()).allreduce_bytes_per_token_layer == 0
    assert per_gpu(m, Deployment(tp=8)).allreduce_bytes_per_token_layer == 2 * 8192 * 2


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(tp=0), "tp"), (dict(ep=1.5), "ep"), (dict(dp=True), "dp"), (dict(kv_dtype="int4"), "kv_dtype"),
    (dict(weight_dtype="fp4"), "weight_dtype"), (dict(gpu_memory_utilization=0), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"), (dict(max_model_len=0), "max_model_len"),
    (dict(tp=2, ep=3), "ep"),
])
def test_bad_deployment_names_the_field(kwargs, field):
    with pytest.raises(ConfigError) as e:
        Deployment(**kwargs)
    assert e.value.field == field and field in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name, kwargs, field", [
    ("llama3.1-70b", dict(tp=3), "tp"),  # 64 heads
    ("r1-qwen-7b", dict(tp=7), "tp"),  # 28 heads divide, but 4 KV heads neither divide nor are divided by 7
    ("llama3.1-70b", dict(dp=2, ep=2), "ep"),  # dense
    ("gpt-oss-20b", dict(dp=64, ep=64), "ep"),  # 32 experts
    ("llama3.1-8b", dict(weight_dtype="mxfp4"), "weight_dtype"),
])
def test_sharding_that_does_not_fit_the_model_names_the_field(name, kwargs, field):
    with pytest.raises(ConfigError) as e:
        per_gpu(model_spec(name), Deployment(**kwargs))
    assert e.value.field == field and model_spec(name).name in str(e.value)


# --- host and NVLink fields of hardware profiles --------------------------------------------------

def test_dgx_profiles_carry_host_and_nvlink():
    h = hardware_spec("h200-sxm")
    assert (h.nvlink_gbps, h.gpus_per_host, h.sockets, h.cores_per_socket, h.ddr_gbps_per_socket) == \
        (450.0, 8, 2, 56, 160.0)
    assert all(h.sources[k] for k in ("nvlink_gbps", "nvlink_latency_us", "gpus_per_host", "sockets"))
    assert isinstance(h.gpus_per_host, int)
    assert hardware_spec("gh200").nvlink_gbps is None and hardware_spec("gh200").gpus_per_host == 1
    rtx = hardware_spec("rtx5080")
    assert rtx.nvlink_gbps is None and rtx.sockets is None and "sockets" not in rtx.sources


@pytest.mark.parametrize("line, field", [
    ('sockets = { value = 1.5, source = "x" }', "sockets"),
    ('nvlink_gbps = { value = -1, source = "x" }', "nvlink_gbps"),
    ("gpus_per_host = { value = 8 }", "gpus_per_host"),
])
def test_bad_optional_profile_field_names_it(tmp_path, line, field):
    text = open(hardware_spec("rtx5080").path).read() + line + "\n"
    path = tmp_path / "box.toml"
    path.write_text(text)
    with pytest.raises(SpecError) as e:
        hardware_spec(path)
    assert field in str(e.value) and "box.toml" in str(e.value)


def test_a_source_needs_a_value():
    h = hardware_spec("rtx5080")
    with pytest.raises(SpecError, match="nvlink_gbps"):
        dataclasses.replace(h, sources={**h.sources, "nvlink_gbps": "x"})
