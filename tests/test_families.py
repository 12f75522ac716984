"""MoE, MLA and hybrid sliding-window models: sizes of each new built-in computed by hand from its
config.json, the AutoConfig and plain-JSON readings equal, and refusals that name the field."""

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiersim.errors import SpecError
from tiersim.specs import (
    FULL,
    MODELS,
    PUBLISHED_ACTIVE_PARAMS,
    SLIDING,
    MLASpec,
    ModelSpec,
    MoESpec,
    model_spec,
)
from tiersim.specs.hf_config import autoconfig_dict, read_hf_config, read_hf_config_json

# --- real config.json files (as published on the Hugging Face hub) ----------------------------

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
QWEN3_235B_A22B = dict(QWEN3_30B_A3B, hidden_size=4096, intermediate_size=12288, max_window_layers=94,
                       moe_intermediate_size=1536, num_attention_heads=64, num_hidden_layers=94)
DEEPSEEK_R1 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}
GPT_OSS_120B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
    "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 18, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 36,
    "num_key_value_heads": 8, "num_local_experts": 128, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
}
GPT_OSS_20B = dict(GPT_OSS_120B, num_hidden_layers=24, num_local_experts=32,
                   layer_types=["sliding_attention", "full_attention"] * 12)
GEMMA3_270M = {
    "_sliding_window_pattern": 6, "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640,
    "initializer_range": 0.02, "intermediate_size": 2048,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3, "max_position_embeddings": 32768,
    "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 18, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
    "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 512, "torch_dtype": "bfloat16",
    "transformers_version": "4.55.0.dev0", "use_bidirectional_attention": False, "use_cache": True,
    "vocab_size": 262144,
}
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1e6, "router_aux_loss_coef": 0.02, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0",
    "use_cache": True, "vocab_size": 32000,
}
CONFIGS = {"qwen3-30b-a3b": QWEN3_30B_A3B, "qwen3-235b-a22b": QWEN3_235B_A22B, "deepseek-r1": DEEPSEEK_R1,
           "gpt-oss-20b": GPT_OSS_20B, "gpt-oss-120b": GPT_OSS_120B, "gemma-3-270m": GEMMA3_270M}


def write_config(tmp_path, folder, cfg):
    (tmp_path / folder).mkdir()
    path = tmp_path / folder / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def one_line_naming(e: pytest.ExceptionInfo, *parts: str):
    message = str(e.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


# --- each new built-in against hand computation from its config ------------------------------

def test_qwen3_30b_a3b_by_hand():
    m = model_spec("qwen3-30b-a3b")
    attention = 2048 * (2 * 32 * 128 + 2 * 4 * 128)  # q, o: 2048 x 4096; k, v: 2048 x 512
    expert = 3 * 2048 * 768  # gate, up, down of one expert
    router = 2048 * 128
    other = 2 * 2048 + 2 * 128  # two RMSNorms, q/k norms
    layer = attention + 128 * expert + router + other
    embeddings = 2 * 151936 * 2048  # untied
    assert layer == 623_120_640
    assert m.params == embeddings + 48 * layer + 2048 == 30_532_122_624  # published 30.5B
    assert m.layer_params == layer
    assert m.active_params == m.params - 48 * (128 - 8) * expert == 3_353_032_704  # published 3.3B
    assert m.flops_per_token == 2 * (48 * (attention + 8 * expert + router) + 151936 * 2048)
    assert m.weight_bytes == 2 * m.params
    assert m.kv_bytes_per_token_layer == 2 * 4 * 128 * 2
    assert m.kv_bytes_per_token == m.kv_bytes_per_token_global == 98_304  # DESIGN.md §4
    assert m.expert_params == 48 * 128 * expert
    assert m.param_breakdown["router"] == 48 * router


def test_qwen3_235b_a22b_by_hand():
    m = model_spec("qwen3-235b-a22b")
    attention = 4096 * (2 * 64 * 128 + 2 * 4 * 128)
    expert = 3 * 4096 * 1536
    layer = attention + 128 * expert + 4096 * 128 + 2 * 4096 + 2 * 128
    assert m.params == 2 * 151936 * 4096 + 94 * layer + 4096 == 235_093_634_560  # published 235B
    assert m.active_params == m.params - 94 * 120 * expert  # published 22B
    assert m.kv_bytes_per_token == 94 * 2 * 4 * 128 * 2 == 192_512


def test_deepseek_r1_by_hand():
    m = model_spec("deepseek-r1")
    h, heads = 7168, 128
    q = h * 1536 + 1536 * heads * (128 + 64)  # q_a_proj, q_b_proj (192-wide query heads)
    kv = h * (512 + 64) + 512 * heads * (128 + 128)  # kv_a_proj_with_mqa, kv_b_proj (k_nope + v per head)
    o = heads * 128 * h
    attention = q + kv + o
    norms = 2 * h + 1536 + 512  # input/post-attention norms, q_a and kv_a latent norms
    dense_mlp = 3 * h * 18432
    expert = 3 * h * 2048
    router = 256 * h + 256  # gate weight + e_score_correction_bias
    dense_layer = attention + dense_mlp + norms
    moe_layer = attention + 256 * expert + 1 * expert + router + norms
    assert attention == 187_105_280
    assert m.params == 2 * 129280 * h + 3 * dense_layer + 58 * moe_layer + h == 671_026_419_200  # published 671B
    assert m.active_params == m.params - 58 * 248 * expert  # published 37B
    assert m.active_params == pytest.approx(37.55e9, rel=1e-3)
    assert m.flops_per_token == 2 * (61 * attention + 3 * dense_mlp + 58 * (9 * expert + 256 * h) + 129280 * h)
    # MLA: the cache holds the 512-wide latent and the 64-wide rope key per token per layer
    assert m.kv_bytes_per_token_layer == (512 + 64) * 2 == 1152
    assert m.kv_bytes_per_token == m.kv_bytes_per_token_global == 61 * 1152 == 70_272  # DESIGN.md §4
    # absorbed attention: scores over latent + rope (576) and values over the latent (512), 2 FLOPs each, per head
    assert m.attention_flops_per_pair == 2 * 128 * (576 + 512) == 278_528
    assert m.attention_flops_per_token(1000) == 61 * 278_528 * 1000
    assert m.quantization == "fp8" and m.moe.dense_layers == (0, 1, 2) and m.moe_layers == 58


@pytest.mark.parametrize("name, layers, experts", [("gpt-oss-20b", 24, 32), ("gpt-oss-120b", 36, 128)])
def test_gpt_oss_by_hand(name, layers, experts):
    m = model_spec(name)
    h = 2880
    attention = h * (2 * 64 * 64 + 2 * 8 * 64)  # q, o: 2880 x 4096; k, v: 2880 x 512
    qkv_bias = 64 * 64 + 2 * 8 * 64
    expert = 3 * h * 2880
    expert_bias = 2 * 2880 + h  # gate_up bias (2 x 2880) + down bias
    router = h * experts + experts
    layer = attention + qkv_bias + experts * (expert + expert_bias) + router + 2 * h
    assert m.params == 2 * 201088 * h + layers * layer + h
    # the model card's active count leaves out the input embedding table (its lookup does no matmul)
    active = m.params - layers * (experts - 4) * (expert + expert_bias)
    assert m.active_params == active
    assert m.flops_per_token == 2 * (layers * (attention + 4 * expert + h * experts) + 201088 * h)
    # alternating sliding (even layers, 128 tokens) / full; 2 x 8 x 64 x 2 = 2048 B per token per layer
    assert m.full_layers == tuple(range(1, layers, 2)) and m.sliding_layers == tuple(range(0, layers, 2))
    assert m.kv_bytes_per_token == layers * 2048
    assert m.kv_bytes_per_token_global == layers // 2 * 2048
    assert m.kv_bytes_sliding_fixed(1) == layers // 2 * 128 * 2048
    assert m.quantization == "mxfp4"
    if name == "gpt-oss-120b":
        # 116.83B published; o_proj biases and attention sinks (2880 + 64 per layer, 0.0001%) are not counted
        assert m.params == 116_829_050_688 and m.kv_bytes_per_token_global == 36_864  # DESIGN.md §4


def test_gemma3_270m_by_hand():
    m = model_spec("gemma-3-270m")
    layer = 640 * (2 * 4 * 256 + 2 * 1 * 256) + 3 * 640 * 2048 + 4 * 640 + 2 * 256  # 4 norms, q/k norms
    assert m.params == 262144 * 640 + 18 * layer + 640 == 268_098_176  # tied; published 268M
    assert m.full_layers == (5, 11, 17)
    assert m.kv_bytes_per_token_layer == 2 * 1 * 256 * 2 == 1024
    assert m.kv_bytes_per_token_global == 3 * 1024
    assert m.kv_bytes_sliding_fixed(4) == 4 * 15 * 512 * 1024
    assert m.attention_flops_per_token(4096) == 4 * 4 * 256 * (3 * 4096 + 15 * 512)


@pytest.mark.parametrize("name", list(PUBLISHED_ACTIVE_PARAMS))
def test_active_params_within_3_percent_of_published(name):
    published, with_embedding, where = PUBLISHED_ACTIVE_PARAMS[name]
    m = model_spec(name)
    active = m.active_params - (0 if with_embedding else m.vocab * m.hidden)
    assert where and active == pytest.approx(published, rel=0.03)


def test_dense_models_keep_their_sizes_and_gain_identities():
    for m in MODELS.values():
        if m.moe is None and m.layer_types is None:
            assert m.active_params == m.params
            assert m.kv_bytes_per_token_global == m.kv_bytes_per_token
            assert m.kv_bytes_sliding_fixed(8) == 0
            assert m.step_params_read(1) == m.layers * m.layer_params + m.vocab * m.hidden
        assert sum(m.param_breakdown.values()) == m.params


def test_experts_read_per_step_grow_with_the_batch_up_to_all():
    m = model_spec("qwen3-30b-a3b")
    assert m.moe.experts_touched(1) == pytest.approx(8)
    assert m.moe.experts_touched(2) == pytest.approx(128 * (1 - (120 / 128) ** 2))
    assert m.moe.experts_touched(10_000) == pytest.approx(128)
    non_expert = m.step_params_read(0)
    assert m.step_params_read(1) == pytest.approx(non_expert + m.expert_params * 8 / 128)
    assert m.step_params_read(10_000) == pytest.approx(non_expert + m.expert_params)


@settings(max_examples=50, deadline=None)
@given(tokens=st.integers(0, 200_000), name=st.sampled_from(["gpt-oss-120b", "gemma-3-270m"]))
def test_sliding_layers_stay_at_their_window_for_any_length(tokens, name):
    m = model_spec(name)
    by_kind = {g.kind: g for g in m.kv_layer_groups}
    sliding = by_kind[SLIDING]
    assert sliding.kv_bytes(tokens) == min(tokens, m.sliding_window) * sliding.kv_bytes_per_token
    assert sliding.kv_bytes(tokens) <= m.kv_bytes_sliding_fixed(1)
    assert by_kind[FULL].kv_bytes(tokens) == tokens * m.kv_bytes_per_token_global
    assert m.kv_bytes_per_sequence(tokens) == tokens * m.kv_bytes_per_token_global + sliding.kv_bytes(tokens)
    if tokens >= m.sliding_window:
        assert m.kv_bytes_per_sequence(tokens) == tokens * m.kv_bytes_per_token_global + m.kv_bytes_sliding_fixed(1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_to_dict_round_trips_through_json(name):
    m = model_spec(name)
    d = json.loads(json.dumps(m.to_dict()))
    assert ModelSpec.from_dict(d) == m
    assert d["active_params"] == m.active_params and d["kv_bytes_per_token_global"] == m.kv_bytes_per_token_global


# --- HF config.json: AutoConfig and plain JSON --------------------------------------------------

@pytest.mark.parametrize("builtin", list(CONFIGS))
def test_autoconfig_and_plain_json_give_the_builtin(tmp_path, builtin):
    path = write_config(tmp_path, builtin, CONFIGS[builtin])
    assert autoconfig_dict(path) is not None  # transformers knows the family: the AutoConfig path is the one taken
    through_auto, plain = read_hf_config(path), read_hf_config_json(path)
    assert through_auto == plain == dataclasses.replace(MODELS[builtin], source=str(path))
    assert model_spec(path.parent) == through_auto


def test_mixtral_is_read_as_moe(tmp_path):
    path = write_config(tmp_path, "Mixtral-8x7B-v0.1", MIXTRAL_8X7B)
    m = read_hf_config(path)
    assert m == read_hf_config_json(path)
    assert m.moe == MoESpec(experts=8, experts_per_token=2, expert_intermediate=14336)
    assert m.layer_types is None  # sliding_window null
    layer = 4096 * (2 * 4096 + 2 * 1024) + 8 * 3 * 4096 * 14336 + 4096 * 8 + 2 * 4096
    assert m.params == 2 * 32000 * 4096 + 32 * layer + 4096 == 46_702_792_704  # published 46.7B


def test_autoconfig_defaults_are_the_json_defaults(tmp_path):
    # Gemma 3 wrappers leave most text keys at class defaults; the layer kinds come from the pattern
    cfg = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                           "num_hidden_layers": 34, "sliding_window": 1024}, "torch_dtype": "bfloat16"}
    path = write_config(tmp_path, "gemma-3-4b-it", cfg)
    m = read_hf_config(path)
    assert m == read_hf_config_json(path)
    assert m.full_layers == (5, 11, 17, 23, 29) and m.sliding_window == 1024
    gemma2 = {"model_type": "gemma2", "hidden_size": 2304, "num_attention_heads": 8, "num_hidden_layers": 26,
              "num_key_value_heads": 4, "head_dim": 256, "intermediate_size": 9216, "vocab_size": 256000,
              "sliding_window": 4096}
    m2 = read_hf_config(write_config(tmp_path, "gemma-2-2b", gemma2))
    assert m2 == read_hf_config_json(tmp_path / "gemma-2-2b") and m2.full_layers == tuple(range(1, 26, 2))
    mistral = {"model_type": "mistral", "hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32,
               "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000, "sliding_window": 4096}
    m3 = read_hf_config(write_config(tmp_path, "mistral", mistral))
    assert m3 == read_hf_config_json(tmp_path / "mistral")
    assert m3.full_layers == () and m3.kv_bytes_per_token_global == 0  # every layer keeps 4096 tokens
    qwen = dict(QWEN3_30B_A3B, use_sliding_window=True, sliding_window=4096, max_window_layers=40)
    m4 = read_hf_config(write_config(tmp_path, "qwen-swa", qwen))
    assert m4 == read_hf_config_json(tmp_path / "qwen-swa") and m4.sliding_layers == tuple(range(40, 48))


def test_qwen_moe_dense_layers_from_sparse_step_and_mlp_only_layers(tmp_path):
    cfg = dict(QWEN3_30B_A3B, decoder_sparse_step=2, mlp_only_layers=[0])
    m = read_hf_config(write_config(tmp_path, "q", cfg))
    assert m == read_hf_config_json(tmp_path / "q")
    assert m.moe.dense_layers == tuple(range(0, 48, 2))  # layer 0 (mlp_only) is also an even layer
    assert m.moe_layers == 24  # MoE where (i + 1) % decoder_sparse_step == 0: the odd layers


def test_hub_ids_are_refused_with_a_request_for_a_local_folder():
    for hub_id in ("Qwen/Qwen3-30B-A3B", "meta-llama/Llama-3.1-8B"):
        with pytest.raises(SpecError) as e:
            model_spec(hub_id)
        one_line_naming(e, hub_id, "hub id", "local folder")


@pytest.mark.parametrize("base, change, key", [
    (QWEN3_30B_A3B, dict(num_hidden_layers=0), "num_hidden_layers"),
    (QWEN3_30B_A3B, dict(num_key_value_heads=5), "kv_heads"),
    (QWEN3_30B_A3B, dict(num_experts_per_tok=129), "moe.experts_per_token"),
    (QWEN3_30B_A3B, dict(num_experts_per_tok=None), "num_experts_per_tok"),
    (QWEN3_30B_A3B, dict(moe_intermediate_size=-768), "moe_intermediate_size"),
    (QWEN3_30B_A3B, dict(mlp_only_layers=[48]), "mlp_only_layers"),
    (QWEN3_30B_A3B, dict(mlp_only_layers=list(range(48))), "moe.dense_layers"),
    (DEEPSEEK_R1, dict(qk_rope_head_dim=None), "qk_rope_head_dim"),
    (DEEPSEEK_R1, dict(kv_lora_rank=0), "kv_lora_rank"),
    (DEEPSEEK_R1, dict(first_k_dense_replace=61), "first_k_dense_replace"),
    (GPT_OSS_120B, dict(layer_types=["sliding_attention"] * 35), "layer_types"),
    (GPT_OSS_120B, dict(layer_types=["chunked_attention"] * 36), "layer_types"),
    (GPT_OSS_120B, dict(sliding_window=0), "sliding_window"),
    (GEMMA3_270M, dict(num_key_value_heads=3), "kv_heads"),
])
def test_recognised_family_with_inconsistent_fields_names_the_field(tmp_path, base, change, key):
    path = write_config(tmp_path, "bad", {**base, **change})
    for read in (read_hf_config, read_hf_config_json):
        with pytest.raises(SpecError) as e:
            read(path)
        one_line_naming(e, str(path), key)


def test_invalid_family_records_are_refused():
    base = MODELS["deepseek-r1"]
    with pytest.raises(SpecError, match="head_dim"):
        dataclasses.replace(base, head_dim=128)
    with pytest.raises(SpecError, match="mla.v_head_dim"):
        dataclasses.replace(base, mla=dataclasses.replace(base.mla, v_head_dim=0))
    with pytest.raises(SpecError, match="moe.dense_layers"):
        dataclasses.replace(base, moe=dataclasses.replace(base.moe, dense_layers=(2, 1)))
    oss = MODELS["gpt-oss-20b"]
    with pytest.raises(SpecError, match="sliding_window"):
        dataclasses.replace(oss, sliding_window=None)
    with pytest.raises(SpecError, match="sliding_window"):
        dataclasses.replace(MODELS["qwen3-8b"], sliding_window=4096)
    with pytest.raises(SpecError, match="layer_types"):
        dataclasses.replace(oss, layer_types=(FULL,) * 23)
    with pytest.raises(SpecError, match="quantization"):
        dataclasses.replace(oss, quantization="gguf")
    with pytest.raises(SpecError, match="mla"):
        dataclasses.replace(base, mla={"kv_lora_rank": 512})
    assert isinstance(base.mla, MLASpec)
