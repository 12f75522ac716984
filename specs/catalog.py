"""The built-in models: each a ModelSpec written from its published config.json (the source URL is
on the spec), and the published parameter counts the tests hold them to."""

from __future__ import annotations

from pathlib import Path

from tiersim.errors import SpecError
from tiersim.specs.families import FULL, SLIDING, MLASpec, MoESpec
from tiersim.specs.models import ModelSpec


def _hf(repo: str) -> str:
    return f"https://huggingface.co/{repo}/blob/main/config.json"


_QWEN2 = dict(family="qwen2", qkv_bias=True, tied_embeddings=False, head_dim=128)
_QWEN3 = dict(family="qwen3", qk_norm=True, tied_embeddings=False, head_dim=128)
_LLAMA3_8B = dict(family="llama", layers=32, attention_heads=32, kv_heads=8, head_dim=128, hidden=4096,
                  intermediate=14336, vocab=128256)
_LLAMA3_70B = dict(family="llama", layers=80, attention_heads=64, kv_heads=8, head_dim=128, hidden=8192,
                   intermediate=28672, vocab=128256)
_QWEN25_32B = dict(_QWEN2, layers=64, attention_heads=40, kv_heads=8, hidden=5120, intermediate=27648, vocab=152064)
# Qwen3-MoE config.json: num_experts 128, num_experts_per_tok 8, decoder_sparse_step 1, mlp_only_layers [] (every
# layer MoE), head_dim 128, num_key_value_heads 4, no shared experts, router without bias.
_QWEN3_MOE = dict(family="qwen3_moe", qk_norm=True, tied_embeddings=False, head_dim=128, kv_heads=4, vocab=151936)
# gpt-oss config.json: hidden 2880, 64 q / 8 KV heads of 64, attention_bias true, 4 experts per token of
# intermediate 2880 (biased gate_up/down, biased router), layer_types alternating sliding_attention (even
# layers) / full_attention, sliding_window 128, vocab 201088, untied; experts shipped in mxfp4
# (quantization_config.quant_method), attention, router and embeddings in bf16.
_GPT_OSS = dict(family="gpt_oss", attention_heads=64, kv_heads=8, head_dim=64, hidden=2880, intermediate=2880,
                vocab=201088, qkv_bias=True, sliding_window=128, quantization="mxfp4")


def _alternating(layers: int) -> tuple[str, ...]:
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(layers))


MODELS: dict[str, ModelSpec] = {m.name: m for m in [
    ModelSpec("r1-qwen-1.5b", **_QWEN2, layers=28, attention_heads=12, kv_heads=2, hidden=1536,
              intermediate=8960, vocab=151936, source=_hf("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")),
    ModelSpec("r1-qwen-7b", **_QWEN2, layers=28, attention_heads=28, kv_heads=4, hidden=3584,
              intermediate=18944, vocab=152064, source=_hf("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")),
    ModelSpec("r1-qwen-14b", **_QWEN2, layers=48, attention_heads=40, kv_heads=8, hidden=5120,
              intermediate=13824, vocab=152064, source=_hf("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B")),
    ModelSpec("r1-qwen-32b", **_QWEN25_32B, source=_hf("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B")),
    ModelSpec("qwq-32b", **_QWEN25_32B, source=_hf("Qwen/QwQ-32B")),
    ModelSpec("r1-llama-8b", **_LLAMA3_8B, source=_hf("deepseek-ai/DeepSeek-R1-Distill-Llama-8B")),
    ModelSpec("llama3.1-8b", **_LLAMA3_8B, source=_hf("meta-llama/Llama-3.1-8B")),
    ModelSpec("r1-llama-70b", **_LLAMA3_70B, source=_hf("deepseek-ai/DeepSeek-R1-Distill-Llama-70B")),
    ModelSpec("llama3.1-70b", **_LLAMA3_70B, source=_hf("meta-llama/Llama-3.1-70B")),
    ModelSpec("qwen3-8b", **_QWEN3, layers=36, attention_heads=32, kv_heads=8, hidden=4096,
              intermediate=12288, vocab=151936, source=_hf("Qwen/Qwen3-8B")),
    ModelSpec("qwen3-32b", **_QWEN3, layers=64, attention_heads=64, kv_heads=8, hidden=5120,
              intermediate=25600, vocab=151936, source=_hf("Qwen/Qwen3-32B")),
    ModelSpec("smollm2-135m", family="llama", layers=30, attention_heads=9, kv_heads=3, head_dim=64, hidden=576,
              intermediate=1536, vocab=49152, tied_embeddings=True,
              source=_hf("HuggingFaceTB/SmolLM2-135M-Instruct")),
    # --- mixture of experts ---
    ModelSpec("qwen3-30b-a3b", **_QWEN3_MOE, layers=48, attention_heads=32, hidden=2048, intermediate=6144,
              moe=MoESpec(experts=128, experts_per_token=8, expert_intermediate=768),
              source=_hf("Qwen/Qwen3-30B-A3B")),
    ModelSpec("qwen3-235b-a22b", **_QWEN3_MOE, layers=94, attention_heads=64, hidden=4096, intermediate=12288,
              moe=MoESpec(experts=128, experts_per_token=8, expert_intermediate=1536),
              source=_hf("Qwen/Qwen3-235B-A22B")),
    # DeepSeek-R1 has DeepSeek-V3's config.json: 61 layers, the first 3 (first_k_dense_replace) dense with
    # intermediate 18432, then 256 routed experts (top 8, moe_intermediate_size 2048) + 1 shared; MLA with
    # kv_lora_rank 512, q_lora_rank 1536, qk_nope 128 + qk_rope 64, v_head_dim 128; 128 heads; vocab 129280;
    # weights shipped in fp8 e4m3 (128x128 blocks). The multi-token-prediction layer (num_nextn_predict_layers 1,
    # ~14B parameters, only used for speculative decoding) is not part of the 671B counted here.
    ModelSpec("deepseek-r1", family="deepseek_v3", layers=61, attention_heads=128, kv_heads=128, head_dim=192,
              hidden=7168, intermediate=18432, vocab=129280,
              moe=MoESpec(experts=256, experts_per_token=8, expert_intermediate=2048, shared_experts=1,
                          dense_layers=(0, 1, 2), router_bias=True),
              mla=MLASpec(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                          q_lora_rank=1536),
              quantization="fp8", source=_hf("deepseek-ai/DeepSeek-R1")),
    ModelSpec("gpt-oss-20b", **_GPT_OSS, layers=24, layer_types=_alternating(24),
              moe=MoESpec(experts=32, experts_per_token=4, expert_intermediate=2880, expert_bias=True,
                          router_bias=True),
              source=_hf("openai/gpt-oss-20b")),
    ModelSpec("gpt-oss-120b", **_GPT_OSS, layers=36, layer_types=_alternating(36),
              moe=MoESpec(experts=128, experts_per_token=4, expert_intermediate=2880, expert_bias=True,
                          router_bias=True),
              source=_hf("openai/gpt-oss-120b")),
    # --- hybrid attention (dense): gemma-3-270m config.json: 18 layers, hidden 640, 4 q / 1 KV heads of 256,
    # intermediate 2048, vocab 262144, tied; layer_types 5 sliding_attention then 1 full_attention, x3
    # (_sliding_window_pattern 6), sliding_window 512.
    ModelSpec("gemma-3-270m", family="gemma3", layers=18, attention_heads=4, kv_heads=1, head_dim=256, hidden=640,
              intermediate=2048, vocab=262144, tied_embeddings=True, qk_norm=True, sliding_window=512,
              layer_types=tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(18)),
              source=_hf("google/gemma-3-270m")),
]}

# Published parameter counts (the "Model size" Hugging Face shows from the safetensors metadata, or the model
# card / technical report where the safetensors count differs in what it includes), for tests.
PUBLISHED_PARAMS: dict[str, tuple[float, str]] = {
    "r1-qwen-1.5b": (1.78e9, "huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B: model size 1.78B params"),
    "r1-qwen-7b": (7.62e9, "huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-7B: model size 7.62B params"),
    "r1-qwen-14b": (14.8e9, "huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-14B: model size 14.8B params"),
    "r1-qwen-32b": (32.8e9, "huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-32B: model size 32.8B params"),
    "qwq-32b": (32.8e9, "huggingface.co/Qwen/QwQ-32B: model size 32.8B params (model card text: 32.5B)"),
    "r1-llama-8b": (8.03e9, "huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Llama-8B: model size 8.03B params"),
    "llama3.1-8b": (8.03e9, "huggingface.co/meta-llama/Llama-3.1-8B: model size 8.03B params"),
    "r1-llama-70b": (70.6e9, "huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Llama-70B: model size 70.6B params"),
    "llama3.1-70b": (70.6e9, "huggingface.co/meta-llama/Llama-3.1-70B: model size 70.6B params"),
    "qwen3-8b": (8.19e9, "huggingface.co/Qwen/Qwen3-8B: model size 8.19B params (model card: 8.2B)"),
    "qwen3-32b": (32.8e9, "huggingface.co/Qwen/Qwen3-32B: model size 32.8B params (model card: 32.8B)"),
    "smollm2-135m": (135e6, "huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct: model size 135M params"),
    "qwen3-30b-a3b": (30.5e9, "https://huggingface.co/Qwen/Qwen3-30B-A3B model card: 30.5B total, 3.3B activated"),
    "qwen3-235b-a22b": (235e9, "https://huggingface.co/Qwen/Qwen3-235B-A22B model card: 235B total, 22B activated"),
    "deepseek-r1": (671e9, "https://huggingface.co/deepseek-ai/DeepSeek-R1 model card: 671B total, 37B activated "
                           "(the hub's 685B adds the 14B multi-token-prediction module)"),
    "gpt-oss-20b": (20.91e9, "https://arxiv.org/abs/2508.10925 (gpt-oss-120b & gpt-oss-20b model card) table 1: "
                             "20.91B total, 3.61B active"),
    "gpt-oss-120b": (116.83e9, "https://arxiv.org/abs/2508.10925 (gpt-oss-120b & gpt-oss-20b model card) table 1: "
                               "116.83B total, 5.13B active"),
    "gemma-3-270m": (268e6, "https://huggingface.co/google/gemma-3-270m: model size 268M params (name: 270M)"),
}

# Published active parameters per token of the MoE models, and whether the figure counts the input embedding
# table (gpt-oss's "active" counts the unembedding only; Qwen and DeepSeek count both tables).
PUBLISHED_ACTIVE_PARAMS: dict[str, tuple[float, bool, str]] = {
    "qwen3-30b-a3b": (3.3e9, True, PUBLISHED_PARAMS["qwen3-30b-a3b"][1]),
    "qwen3-235b-a22b": (22e9, True, PUBLISHED_PARAMS["qwen3-235b-a22b"][1]),
    "deepseek-r1": (37e9, True, PUBLISHED_PARAMS["deepseek-r1"][1]),
    "gpt-oss-20b": (3.61e9, False, PUBLISHED_PARAMS["gpt-oss-20b"][1]),
    "gpt-oss-120b": (5.13e9, False, PUBLISHED_PARAMS["gpt-oss-120b"][1]),
}


def model_names() -> list[str]:
    """Names of the built-in models."""
    return list(MODELS)


def model_spec(name_or_path: str | Path) -> ModelSpec:
    """A built-in model by name, or the model of a local config.json file or of a local folder holding one."""
    if isinstance(name_or_path, str) and name_or_path in MODELS:
        return MODELS[name_or_path]
    path = Path(name_or_path)
    if path.exists() or path.suffix == ".json" or len(path.parts) > 1:
        return ModelSpec.from_hf_config(path)
    raise SpecError(f"unknown model {str(name_or_path)!r}; accepted: a config.json path or one of {', '.join(MODELS)}")
