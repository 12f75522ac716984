"""ModelSpec and HardwareSpec: sizes exact where the answer is known, every profile number sourced,
and every refusal a one-line message that names the file and the field."""

import dataclasses
import json
import re
import shutil
import tomllib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiersim.errors import SpecError
from tiersim.specs import (
    MODELS,
    PUBLISHED_PARAMS,
    HardwareSpec,
    ModelSpec,
    hardware_names,
    hardware_numeric_fields,
    hardware_optional_fields,
    hardware_spec,
    model_names,
    model_spec,
)

# --- real config.json files (as published on the Hugging Face hub) ----------------------------

LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28,
    "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True, "use_mrope": False,
    "use_sliding_window": False, "vocab_size": 152064,
}
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 12288,
    "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
MISTRAL_7B_V01 = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000,
}
GEMMA_7B = {  # no tie_word_embeddings key: Gemma ties by default
    "architectures": ["GemmaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 2, "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu", "hidden_size": 3072,
    "initializer_range": 0.02, "intermediate_size": 24576, "max_position_embeddings": 8192,
    "model_type": "gemma", "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 16,
    "pad_token_id": 0, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
    "torch_dtype": "bfloat16", "transformers_version": "4.38.0.dev0", "use_cache": True, "vocab_size": 256000,
}
GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
    "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
    "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2",
    "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
    "torch_dtype": "float32", "transformers_version": "4.42.4", "use_cache": True, "vocab_size": 256000,
}
GEMMA3_4B = {  # multimodal wrapper; the text_config leaves most keys at Gemma3TextConfig's defaults
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02,
    "mm_tokens_per_image": 256, "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16,
                      "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False},
}


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


# --- built-in models ----------------------------------------------------------------------------

KV_BYTES_PER_TOKEN = {  # DESIGN.md §4
    "r1-qwen-1.5b": 28_672, "r1-qwen-7b": 57_344, "r1-llama-8b": 131_072, "llama3.1-8b": 131_072,
    "qwen3-8b": 147_456, "r1-qwen-14b": 196_608, "r1-qwen-32b": 262_144, "qwq-32b": 262_144,
    "qwen3-32b": 262_144, "r1-llama-70b": 327_680, "llama3.1-70b": 327_680, "smollm2-135m": 23_040,
    # all layers, sliding ones within their window (tests/test_families.py checks the growing part)
    "qwen3-30b-a3b": 48 * 2 * 4 * 128 * 2,  # 98,304 (DESIGN.md §4)
    "qwen3-235b-a22b": 94 * 2 * 4 * 128 * 2,  # 192,512
    "deepseek-r1": 61 * (512 + 64) * 2,  # 70,272: the MLA latent + rope key (DESIGN.md §4)
    "gpt-oss-20b": 24 * 2 * 8 * 64 * 2,  # 49,152 (24,576 growing: 12 full layers)
    "gpt-oss-120b": 36 * 2 * 8 * 64 * 2,  # 73,728 (36,864 growing: 18 full layers, DESIGN.md §4)
    "gemma-3-270m": 18 * 2 * 1 * 256 * 2,  # 18,432 (3,072 growing: 3 full layers)
}


def test_every_builtin_has_a_kv_size_and_a_published_count():
    assert set(model_names()) == set(KV_BYTES_PER_TOKEN) == set(PUBLISHED_PARAMS)


@pytest.mark.parametrize("name", list(KV_BYTES_PER_TOKEN))
def test_kv_bytes_per_token_of_builtins(name):
    m = model_spec(name)
    assert m.kv_bytes_per_token == KV_BYTES_PER_TOKEN[name]
    assert m.kv_bytes_per_token == m.layers * m.kv_bytes_per_token_layer


def test_paper_kv_formula_ignores_gqa_by_the_head_ratio():
    m = model_spec("r1-llama-70b")
    tokens = 8 * 4096  # the paper's scaling-table row: batch 8 x 4K tokens
    assert m.kv_bytes_per_token_paper == 2_621_440
    assert m.kv_bytes_per_token_paper * tokens == 80 * 2**30  # the paper's "80 GB" is 80 GiB (85.9 GB)
    assert m.kv_bytes_per_token * tokens == 10_737_418_240  # ~10.7 GB (10 GiB) with the real 8 KV heads
    assert m.kv_bytes_per_token_paper // m.kv_bytes_per_token == 64 // 8


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_params_within_2_percent_of_published(name):
    published, where = PUBLISHED_PARAMS[name]
    assert where
    assert model_spec(name).params == pytest.approx(published, rel=0.02)


def test_params_exact_where_the_safetensors_total_is_known():
    assert model_spec("llama3.1-8b").params == 8_030_261_248
    assert model_spec("llama3.1-70b").params == 70_553_706_496
    assert model_spec("r1-qwen-7b").params == 7_615_616_512  # = Qwen2.5-7B
    assert model_spec("smollm2-135m").params == 134_515_008


def test_derived_sizes_of_a_two_layer_model_by_hand():
    m = ModelSpec("tiny", layers=2, attention_heads=4, kv_heads=2, head_dim=8, hidden=32, intermediate=64,
                  vocab=100, qkv_bias=True, qk_norm=True, family="qwen3")
    # per layer: q 32*32 + k 32*16 + v 32*16 + o 32*32 = 3072; MLP 3*32*64 = 6144;
    # q/k/v bias 32+16+16 = 64; two norms 2*32 = 64; q/k norms 2*8 = 16
    assert m.layer_params == 3072 + 6144 + 64 + 64 + 16 == 9360
    assert m.params == 2 * 100 * 32 + 2 * 9360 + 32 == 25_152  # embed + lm_head + layers + final norm
    assert m.layer_weight_bytes == 18_720
    assert m.weight_bytes == 50_304
    assert m.weight_bytes_at(4) == 12_576
    assert m.weight_bytes_at(8) == 25_152
    assert m.flops_per_token == 2 * (2 * 9216 + 100 * 32) == 43_264
    assert m.kv_bytes_per_token_layer == 2 * 2 * 8 * 2 == 64
    assert m.kv_bytes_per_token == 128
    assert m.kv_bytes_per_token_paper == 2 * 2 * 4 * 8 * 2 == 256
    assert m.attention_flops_per_token(10) == 4 * 2 * 4 * 8 * 10 == 2560
    tied = dataclasses.replace(m, tied_embeddings=True)
    assert m.params - tied.params == 100 * 32
    assert tied.flops_per_token == m.flops_per_token  # the tied lm_head still multiplies


def test_to_dict_has_fields_and_derived_values_and_round_trips():
    m = model_spec("qwen3-8b")
    d = m.to_dict()
    for key in ("params", "layer_params", "weight_bytes", "flops_per_token", "kv_bytes_per_token",
                "kv_bytes_per_token_layer", "kv_bytes_per_token_paper", "layer_weight_bytes"):
        assert d[key] == getattr(m, key)
    for f in dataclasses.fields(ModelSpec):
        assert d[f.name] == getattr(m, f.name)
    assert json.loads(json.dumps(d)) == d
    assert ModelSpec.from_dict(d) == m


@given(layers=st.integers(1, 100), kv_heads=st.integers(1, 16), group=st.integers(1, 8),
       head_dim=st.sampled_from([32, 64, 128, 256]), hidden=st.integers(1, 10_000),
       intermediate=st.integers(1, 50_000), vocab=st.integers(1, 300_000), tied=st.booleans(),
       bias=st.booleans(), qk_norm=st.booleans(), family=st.sampled_from(["llama", "qwen2", "gemma2"]))
def test_size_identities_hold_for_any_shape(layers, kv_heads, group, head_dim, hidden, intermediate, vocab,
                                            tied, bias, qk_norm, family):
    m = ModelSpec("x", layers, kv_heads * group, kv_heads, head_dim, hidden, intermediate, vocab,
                  tied_embeddings=tied, qkv_bias=bias, qk_norm=qk_norm, family=family)
    assert m.params == vocab * hidden * (1 if tied else 2) + layers * m.layer_params + hidden
    assert m.kv_bytes_per_token_paper == group * m.kv_bytes_per_token
    # matmul weights are everything but biases, norms and (untied) the embedding table
    assert m.flops_per_token < 2 * (m.params + vocab * hidden)
    assert m.weight_bytes == 2 * m.params


def test_invalid_shapes_are_refused():
    with pytest.raises(SpecError, match="kv_heads"):
        ModelSpec("x", 2, 6, 4, 8, 32, 64, 100)
    with pytest.raises(SpecError, match="layers"):
        ModelSpec("x", 0, 4, 4, 8, 32, 64, 100)
    with pytest.raises(SpecError, match="bits_per_weight"):
        model_spec("smollm2-135m").weight_bytes_at(0)


def test_unknown_model_name_lists_the_builtins():
    with pytest.raises(SpecError) as e:
        model_spec("llama-9000")
    one_line_naming(e, "llama-9000", "r1-qwen-7b", "smollm2-135m")


# --- HF config.json --------------------------------------------------------------------------

@pytest.mark.parametrize("cfg, builtin", [(LLAMA31_8B, "llama3.1-8b"), (QWEN25_7B, "r1-qwen-7b"),
                                          (QWEN3_8B, "qwen3-8b")])
def test_builtin_equals_spec_parsed_from_its_config(tmp_path, cfg, builtin):
    path = write_config(tmp_path, builtin, cfg)
    parsed = ModelSpec.from_hf_config(path)
    assert parsed.name == builtin  # the folder name
    assert parsed.source == str(path)
    assert parsed == dataclasses.replace(MODELS[builtin], source=str(path))


def test_llama31_8b_config(tmp_path):
    m = ModelSpec.from_hf_config(write_config(tmp_path, "Llama-3.1-8B", LLAMA31_8B))
    assert (m.family, m.layers, m.attention_heads, m.kv_heads, m.head_dim) == ("llama", 32, 32, 8, 128)
    assert (m.tied_embeddings, m.qkv_bias, m.qk_norm, m.dtype_bytes) == (False, False, False, 2)
    assert m.params == 8_030_261_248
    assert m.kv_bytes_per_token == 131_072


def test_qwen25_7b_config_has_qkv_bias(tmp_path):
    m = ModelSpec.from_hf_config(tmp_path / write_config(tmp_path, "Qwen2.5-7B", QWEN25_7B).parent)
    assert m.qkv_bias and not m.qk_norm and m.family == "qwen2"
    assert m.head_dim == 3584 // 28 == 128
    assert m.params == 7_615_616_512
    no_bias = dataclasses.replace(m, qkv_bias=False)
    assert m.layer_params - no_bias.layer_params == (28 + 2 * 4) * 128


def test_qwen3_8b_config_has_qk_norm(tmp_path):
    m = ModelSpec.from_hf_config(write_config(tmp_path, "Qwen3-8B", QWEN3_8B))
    assert m.qk_norm and not m.qkv_bias and m.family == "qwen3"
    assert m.kv_bytes_per_token == 147_456
    assert m.params == pytest.approx(8.19e9, rel=0.002)
    assert m.layer_params - dataclasses.replace(m, qk_norm=False).layer_params == 2 * 128


def test_explicit_head_dim_wins_over_hidden_over_heads(tmp_path):
    cfg = dict(QWEN3_8B, hidden_size=5120, num_attention_heads=64, num_hidden_layers=64,
               intermediate_size=25600)  # Qwen3-32B: 64 heads x 128 = 8192 != 5120
    m = ModelSpec.from_hf_config(write_config(tmp_path, "Qwen3-32B", cfg))
    assert m.head_dim == 128
    assert m == dataclasses.replace(MODELS["qwen3-32b"], name="Qwen3-32B", source=m.source)


def test_mistral_7b_config(tmp_path):
    m = ModelSpec.from_hf_config(write_config(tmp_path, "Mistral-7B-v0.1", MISTRAL_7B_V01))
    assert (m.family, m.layers, m.attention_heads, m.kv_heads, m.head_dim, m.vocab) == \
        ("mistral", 32, 32, 8, 128, 32000)
    assert m.params == 7_241_732_096  # published 7.24B
    assert m.kv_bytes_per_token == 131_072


def test_gemma_7b_config_ties_embeddings_by_default(tmp_path):
    m = ModelSpec.from_hf_config(write_config(tmp_path, "gemma-7b", GEMMA_7B))
    assert m.tied_embeddings and m.family == "gemma"
    assert (m.kv_heads, m.head_dim) == (16, 256)  # head_dim 256 although 3072 / 16 = 192
    assert m.params == 8_537_680_896  # published 8.54B
    assert m.kv_bytes_per_token == 2 * 28 * 16 * 256 * 2 == 458_752


def test_gemma2_2b_config_has_four_norms_and_float32(tmp_path):
    m = ModelSpec.from_hf_config(write_config(tmp_path, "gemma-2-2b", GEMMA2_2B))
    assert m.family == "gemma2" and m.tied_embeddings and m.dtype_bytes == 4
    assert m.params == 2_614_341_888  # published 2.61B
    assert m.layer_params - dataclasses.replace(m, family="gemma").layer_params == 2 * 2304
    assert m.kv_bytes_per_token == 2 * 26 * 4 * 256 * 4


def test_gemma3_nested_text_config_uses_gemma3_text_defaults(tmp_path):
    m = ModelSpec.from_hf_config(write_config(tmp_path, "gemma-3-4b-it", GEMMA3_4B))
    assert m.family == "gemma3" and m.qk_norm and m.tied_embeddings and m.dtype_bytes == 2
    assert (m.layers, m.attention_heads, m.kv_heads, m.head_dim, m.hidden, m.vocab) == \
        (34, 8, 4, 256, 2560, 262_208)
    assert m.kv_bytes_per_token == 2 * 34 * 4 * 256 * 2
    # language model only: the 4.3B published for the checkpoint includes a ~0.4B SigLIP vision tower
    assert 3.8e9 < m.params < 3.95e9


def test_dtype_key_and_defaults(tmp_path):
    cfg = {k: v for k, v in LLAMA31_8B.items() if k not in ("torch_dtype", "tie_word_embeddings")}
    assert ModelSpec.from_hf_config(write_config(tmp_path, "a", cfg)).dtype_bytes == 2
    assert not ModelSpec.from_hf_config(tmp_path / "a").tied_embeddings
    assert ModelSpec.from_hf_config(write_config(tmp_path, "b", dict(cfg, dtype="float32"))).dtype_bytes == 4
    assert ModelSpec.from_hf_config(write_config(tmp_path, "c", dict(cfg, torch_dtype="float16"))).dtype_bytes == 2


def test_model_spec_accepts_a_file_or_a_folder_and_a_name(tmp_path):
    path = write_config(tmp_path, "Llama-3.1-8B", LLAMA31_8B)
    assert model_spec(path) == model_spec(str(path.parent))
    assert ModelSpec.from_hf_config(path, name="mine").name == "mine"


def test_unknown_model_type_with_standard_keys_is_accepted(tmp_path):
    m = ModelSpec.from_hf_config(write_config(tmp_path, "x", dict(LLAMA31_8B, model_type="somellama")))
    assert m.family == "somellama" and m.params == 8_030_261_248


@pytest.mark.parametrize("change, key", [
    (lambda c: c.pop("num_hidden_layers"), "num_hidden_layers"),
    (lambda c: c.pop("vocab_size"), "vocab_size"),
    (lambda c: c.update(hidden_size=0), "hidden_size"),
    (lambda c: c.update(intermediate_size=-1), "intermediate_size"),
    (lambda c: c.update(num_key_value_heads=2.5), "num_key_value_heads"),
    (lambda c: c.update(tie_word_embeddings="yes"), "tie_word_embeddings"),
    (lambda c: c.update(torch_dtype="int8"), "torch_dtype"),
    (lambda c: c.update(num_local_experts=8), "num_local_experts"),
    (lambda c: c.update(num_key_value_heads=5), "kv_heads"),
])
def test_bad_config_names_the_file_and_the_key(tmp_path, change, key):
    cfg = dict(LLAMA31_8B)
    change(cfg)
    path = write_config(tmp_path, "bad", cfg)
    with pytest.raises(SpecError) as e:
        ModelSpec.from_hf_config(path)
    one_line_naming(e, str(path), key)


def test_unsupported_model_type_lacking_standard_keys(tmp_path):
    path = write_config(tmp_path, "mamba", {"model_type": "mamba", "d_model": 768, "n_layer": 24, "vocab_size": 50280})
    with pytest.raises(SpecError) as e:
        ModelSpec.from_hf_config(path)
    one_line_naming(e, str(path), "hidden_size", "mamba")


def test_missing_and_invalid_json_files(tmp_path):
    with pytest.raises(SpecError) as e:
        ModelSpec.from_hf_config(tmp_path / "nowhere")
    one_line_naming(e, "nowhere", "config.json")
    with pytest.raises(SpecError) as e:
        model_spec(str(tmp_path / "nowhere" / "config.json"))
    one_line_naming(e, "nowhere")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"hidden_size": 4096,')
    with pytest.raises(SpecError) as e:
        ModelSpec.from_hf_config(tmp_path / "broken")
    one_line_naming(e, "broken", "invalid JSON")


# --- hardware profiles ---------------------------------------------------------------------

PROFILES = ["h100-sxm", "h100-pcie", "h200-sxm", "a100-80g-sxm", "gh200", "b200", "l40s", "rtx4090", "rtx5080"]
NUMERIC = hardware_numeric_fields()


def test_all_required_profiles_ship():
    assert set(PROFILES) <= set(hardware_names())


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_loads_with_every_number_sourced(name):
    h = hardware_spec(name)
    assert h.name == name
    assert h.path.endswith(f"{name}.toml")
    present_optional = {k for k in hardware_optional_fields() if getattr(h, k) is not None}
    assert set(h.sources) == set(NUMERIC) | present_optional  # every number given, required or optional, has a source
    assert all(s.strip() for s in h.sources.values())
    assert h.h2d_gbps(pinned=True) == h.h2d_gbps_pinned and h.h2d_gbps(pinned=False) == h.h2d_gbps_pageable
    assert h.d2h_gbps(pinned=True) == h.d2h_gbps_pinned and h.d2h_gbps(pinned=False) == h.d2h_gbps_pageable
    assert 0 < h.duplex_factor <= 1


def test_reference_numbers_from_design():
    h200 = hardware_spec("h200-sxm")
    assert (h200.hbm_gb, h200.hbm_gbps_spec, h200.hbm_gbps_effective, h200.h2d_gbps_pinned) == (141, 4800, 3800, 55)
    gh = hardware_spec("gh200")
    assert (gh.link, gh.h2d_gbps_pinned, gh.d2h_gbps_pinned, gh.duplex_factor) == ("NVLink-C2C", 340, 295, 0.5)
    rtx = hardware_spec("rtx5080")
    assert (rtx.hbm_gb, rtx.hbm_gbps_spec, rtx.h2d_gbps_pageable, rtx.d2h_gbps_pageable) == (16, 960, 15, 22)


@pytest.mark.parametrize("name", PROFILES)
def test_to_dict_and_to_toml_round_trip(name, tmp_path):
    h = hardware_spec(name)
    d = h.to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(HardwareSpec)}
    assert d["sources"] == h.sources
    assert HardwareSpec(**d) == h
    path = tmp_path / "again.toml"
    path.write_text(h.to_toml())
    again = hardware_spec(path)
    assert dataclasses.replace(again, path=h.path) == h


def test_user_copy_loads_by_path(tmp_path):
    src = hardware_spec("h100-sxm").path
    dst = tmp_path / "my-box.toml"
    shutil.copy(src, dst)
    dst.write_text(dst.read_text().replace('value = 55.0', 'value = 51.5', 1))
    h = hardware_spec(str(dst))
    assert h.path == str(dst)
    assert h.h2d_gbps_pinned == 51.5
    assert hardware_spec(dst) == h


def _profile_text() -> str:
    with open(hardware_spec("h200-sxm").path) as f:
        return f.read()


def _set_line(text: str, key: str, line: str | None) -> str:
    pattern = re.compile(rf"^{key} = .*$", re.M)
    assert pattern.search(text)
    return pattern.sub(line, text) if line is not None else pattern.sub("", text)


@pytest.mark.parametrize("edit, field", [
    (lambda t: t + 'hbm_tb = { value = 1.0, source = "x" }\n', "hbm_tb"),
    (lambda t: _set_line(t, "ddr_gbps", None), "ddr_gbps"),
    (lambda t: _set_line(t, "description", None), "description"),
    (lambda t: _set_line(t, "h2d_gbps_pinned", 'h2d_gbps_pinned = { value = 0.0, source = "x" }'), "h2d_gbps_pinned"),
    (lambda t: _set_line(t, "d2h_gbps_pageable", 'd2h_gbps_pageable = { value = -5, source = "x" }'),
     "d2h_gbps_pageable"),
    (lambda t: _set_line(t, "ddr_gbps", 'ddr_gbps = { value = nan, source = "x" }'), "ddr_gbps"),
    (lambda t: _set_line(t, "ddr_gb", 'ddr_gb = { value = inf, source = "x" }'), "ddr_gb"),
    (lambda t: _set_line(t, "hbm_gb", 'hbm_gb = { value = 0, source = "x" }'), "hbm_gb"),
    (lambda t: _set_line(t, "ddr_gbps", "ddr_gbps = { value = 160.0 }"), "ddr_gbps"),
    (lambda t: _set_line(t, "ddr_gbps", 'ddr_gbps = { value = 160.0, source = "  " }'), "ddr_gbps"),
    (lambda t: _set_line(t, "launch_us", 'launch_us = { value = "fast", source = "x" }'), "launch_us"),
    (lambda t: _set_line(t, "launch_us", "launch_us = 10.0"), "launch_us"),
    (lambda t: _set_line(t, "launch_us", 'launch_us = { value = 1.0, source = "x", unit = "us" }'), "launch_us"),
    (lambda t: _set_line(t, "duplex_factor", 'duplex_factor = { value = 1.5, source = "x" }'), "duplex_factor"),
    (lambda t: _set_line(t, "hbm_gbps_effective", 'hbm_gbps_effective = { value = 5000, source = "x" }'),
     "hbm_gbps_effective"),
    (lambda t: t + "hbm_gb = = 3\n", "invalid TOML"),
])
def test_bad_profile_names_the_file_and_the_field(tmp_path, edit, field):
    path = tmp_path / "broken-box.toml"
    path.write_text(edit(_profile_text()))
    with pytest.raises(SpecError) as e:
        hardware_spec(path)
    one_line_naming(e, "broken-box.toml", field)


def test_unknown_key_message_lists_accepted_keys(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text(_profile_text() + 'hbm_tb = { value = 1.0, source = "x" }\n')
    with pytest.raises(SpecError) as e:
        hardware_spec(path)
    one_line_naming(e, "hbm_tb", *NUMERIC)


def test_unknown_profile_name_lists_the_profiles(tmp_path):
    with pytest.raises(SpecError) as e:
        hardware_spec("h300")
    one_line_naming(e, "h300", *PROFILES)
    with pytest.raises(SpecError) as e:
        hardware_spec(tmp_path / "missing.toml")
    one_line_naming(e, "missing.toml")


def test_profiles_are_valid_toml_with_only_value_and_source():
    for name in PROFILES:
        with open(hardware_spec(name).path, "rb") as f:
            data = tomllib.load(f)
        assert all(set(data[k]) == {"value", "source"} for k in NUMERIC)
