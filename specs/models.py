"""What a model and a GPU are, as numbers: ModelSpec (built-in table or any HF config.json) and
HardwareSpec (TOML profiles in calibration/profiles/, every number with its source).

Units: GB = 1e9 bytes, GB/s = 1e9 B/s, TFLOP/s = 1e12 FLOP/s, everywhere.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiersim.errors import SpecError

# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

_SHAPE_FIELDS = ("layers", "attention_heads", "kv_heads", "head_dim", "hidden", "intermediate", "vocab")
# Gemma-2/3 add pre/post feed-forward norms to the usual input and post-attention norms.
_FOUR_NORM_FAMILIES = ("gemma2", "gemma3")
# HF config classes default tie_word_embeddings to True for Gemma, False for these (and for us).
_TIED_BY_DEFAULT = ("gemma", "gemma2", "gemma3")
# Config keys of architectures whose KV size or parameter count these formulas would get wrong.
_UNSUPPORTED_KEYS = {
    "num_local_experts": "mixture-of-experts",
    "num_experts": "mixture-of-experts",
    "n_routed_experts": "mixture-of-experts",
    "kv_lora_rank": "multi-head latent attention",
}
# transformers' Gemma3TextConfig defaults: real gemma-3 config.json files leave these out.
_GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
}
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The shape of a dense decoder-only transformer, and the sizes and FLOPs that follow from it."""

    name: str
    layers: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    family: str = "llama"
    source: str = ""
    dtype_bytes: int = 2

    def __post_init__(self):
        where = f"model {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(f"model: field 'name' is {self.name!r}; accepted: a non-empty string")
        for key in _SHAPE_FIELDS + ("dtype_bytes",):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SpecError(f"{where}: field '{key}' is {value!r}; accepted: a positive integer")
        for key in ("tied_embeddings", "qkv_bias", "qk_norm"):
            if not isinstance(getattr(self, key), bool):
                raise SpecError(f"{where}: field '{key}' is {getattr(self, key)!r}; accepted: true or false")
        if self.attention_heads % self.kv_heads:
            raise SpecError(f"{where}: field 'kv_heads' = {self.kv_heads} does not divide attention_heads = "
                            f"{self.attention_heads}; accepted: a divisor of attention_heads")
        if not isinstance(self.family, str) or not self.family:
            raise SpecError(f"{where}: field 'family' is {self.family!r}; accepted: a non-empty string")

    # --- KV cache -----------------------------------------------------------------------------

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """Bytes of K and V one token adds to one layer's cache."""
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token adds to the cache of all layers."""
        return self.layers * self.kv_bytes_per_token_layer

    @property
    def kv_bytes_per_token_paper(self) -> int:
        """The paper's per-token KV size, which counts query heads and so ignores grouped-query attention."""
        return 2 * self.layers * self.attention_heads * self.head_dim * self.dtype_bytes

    # --- weights ------------------------------------------------------------------------------

    @property
    def _layer_matmul_params(self) -> int:
        q_out = self.attention_heads * self.head_dim
        kv_out = self.kv_heads * self.head_dim
        attention = self.hidden * (2 * q_out + 2 * kv_out)  # q, o and k, v projections
        return attention + 3 * self.hidden * self.intermediate  # gate, up, down (SwiGLU / GeGLU)

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer: projections, their biases, norms."""
        bias = (self.attention_heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        norms = (4 if self.family in _FOUR_NORM_FAMILIES else 2) * self.hidden
        qk_norms = 2 * self.head_dim if self.qk_norm else 0  # one weight of head_dim shared by all heads
        return self._layer_matmul_params + bias + norms + qk_norms

    @property
    def params(self) -> int:
        """Total parameters: embeddings, lm_head unless tied, all layers, final norm."""
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return embeddings + self.layers * self.layer_params + self.hidden

    @property
    def layer_weight_bytes(self) -> int:
        """Bytes of one decoder layer's weights at dtype_bytes."""
        return self.layer_params * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights at dtype_bytes."""
        return self.params * self.dtype_bytes

    def weight_bytes_at(self, bits_per_weight: float) -> float:
        """Bytes of all weights quantized to bits_per_weight (8 for int8, 4 for int4)."""
        if not bits_per_weight > 0:
            raise SpecError(f"weight_bytes_at: bits_per_weight is {bits_per_weight!r}; accepted: a number > 0")
        return self.params * bits_per_weight / 8

    # --- compute ------------------------------------------------------------------------------

    @property
    def flops_per_token(self) -> int:
        """Dense forward FLOPs per token: 2 x every matmul weight (layers and lm_head, not the embedding lookup)."""
        return 2 * (self.layers * self._layer_matmul_params + self.vocab * self.hidden)

    def attention_flops_per_token(self, context_tokens: int) -> float:
        """FLOPs of QK^T and AV for one new token attending over context_tokens positions."""
        return 4.0 * self.layers * self.attention_heads * self.head_dim * context_tokens

    # --- conversion ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field and every derived size, for reports and trace headers."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("params", "layer_params", "weight_bytes", "layer_weight_bytes", "flops_per_token",
                    "kv_bytes_per_token", "kv_bytes_per_token_layer", "kv_bytes_per_token_paper"):
            d[key] = getattr(self, key)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """The spec whose to_dict() gave d (derived values in d are ignored)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{k: d[k] for k in names if k in d})

    @classmethod
    def from_hf_config(cls, path: str | Path, name: str | None = None) -> ModelSpec:
        """Read a Hugging Face config.json (the file, or a folder that holds it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise SpecError(f"{path}: no such file; accepted: a Hugging Face config.json "
                            "or a folder holding one") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"{path}: cannot read ({e}); accepted: a readable config.json") from None
        except json.JSONDecodeError as e:
            raise SpecError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}; "
                            "accepted: a Hugging Face config.json") from None
        if not isinstance(cfg, dict):
            raise SpecError(f"{path}: top level is {type(cfg).__name__}; accepted: a JSON object")

        model_type = cfg.get("model_type", "")
        dtype = cfg.get("torch_dtype", cfg.get("dtype"))
        if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers, e.g. gemma3: the decoder is here
            cfg = cfg["text_config"]
            model_type = cfg.get("model_type", model_type)
            dtype = cfg.get("torch_dtype", cfg.get("dtype", dtype))
        family = {"gemma3_text": "gemma3"}.get(model_type, model_type) or "unknown"
        if family == "gemma3":
            cfg = _GEMMA3_TEXT_DEFAULTS | cfg
        for key, what in _UNSUPPORTED_KEYS.items():
            if cfg.get(key) not in (None, 0, 1):
                raise SpecError(f"{path}: key '{key}' = {cfg[key]!r} marks a {what} model; "
                                "accepted: dense decoder-only models (llama, qwen2, qwen3, mistral, gemma*)")

        def positive_int(key: str, default: int | None = None) -> int:
            value = cfg.get(key)
            if value is None:
                if default is not None:
                    return default
                raise SpecError(f"{path}: key '{key}' is missing (model_type {model_type or 'absent'!r}); "
                                f"accepted: a config with {key} as a positive integer")
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SpecError(f"{path}: key '{key}' is {value!r}; accepted: a positive integer")
            return value

        hidden = positive_int("hidden_size")
        heads = positive_int("num_attention_heads")
        tied = cfg.get("tie_word_embeddings", family in _TIED_BY_DEFAULT)
        if not isinstance(tied, bool):
            raise SpecError(f"{path}: key 'tie_word_embeddings' is {tied!r}; accepted: true or false")
        bias = cfg.get("attention_bias", False)
        if not isinstance(bias, bool):
            raise SpecError(f"{path}: key 'attention_bias' is {bias!r}; accepted: true or false")
        if dtype is None:
            dtype_bytes = 2
        elif dtype in _DTYPE_BYTES:
            dtype_bytes = _DTYPE_BYTES[dtype]
        else:
            key = "torch_dtype" if "torch_dtype" in cfg else "dtype"
            raise SpecError(f"{path}: key '{key}' is {dtype!r}; accepted: {', '.join(_DTYPE_BYTES)} or absent (bf16)")
        if name is None:
            name = path.parent.name or path.stem
        try:
            return cls(
                name=name,
                layers=positive_int("num_hidden_layers"),
                attention_heads=heads,
                kv_heads=positive_int("num_key_value_heads", heads),
                head_dim=positive_int("head_dim", hidden // heads),
                hidden=hidden,
                intermediate=positive_int("intermediate_size"),
                vocab=positive_int("vocab_size"),
                tied_embeddings=tied,
                qkv_bias=family == "qwen2" or bias,  # Qwen2 hard-codes q/k/v bias; o_proj bias is not counted
                qk_norm=family in ("qwen3", "gemma3"),
                family=family,
                source=str(path),
                dtype_bytes=dtype_bytes,
            )
        except SpecError as e:
            raise SpecError(f"{path}: {e}") from None


def _hf(repo: str) -> str:
    return f"https://huggingface.co/{repo}/blob/main/config.json"


_QWEN2 = dict(family="qwen2", qkv_bias=True, tied_embeddings=False, head_dim=128)
_QWEN3 = dict(family="qwen3", qk_norm=True, tied_embeddings=False, head_dim=128)
_LLAMA3_8B = dict(family="llama", layers=32, attention_heads=32, kv_heads=8, head_dim=128, hidden=4096,
                  intermediate=14336, vocab=128256)
_LLAMA3_70B = dict(family="llama", layers=80, attention_heads=64, kv_heads=8, head_dim=128, hidden=8192,
                   intermediate=28672, vocab=128256)
_QWEN25_32B = dict(_QWEN2, layers=64, attention_heads=40, kv_heads=8, hidden=5120, intermediate=27648, vocab=152064)

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
]}

# Published parameter counts (the "Model size" Hugging Face shows from the safetensors metadata), for tests.
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
}


def model_names() -> list[str]:
    """Names of the built-in models."""
    return list(MODELS)


def model_spec(name_or_path: str | Path) -> ModelSpec:
    """A built-in model by name, or the model of a config.json file or of a folder holding one."""
    if isinstance(name_or_path, str) and name_or_path in MODELS:
        return MODELS[name_or_path]
    path = Path(name_or_path)
    if path.exists() or path.suffix == ".json" or len(path.parts) > 1:
        return ModelSpec.from_hf_config(path)
    raise SpecError(f"unknown model {str(name_or_path)!r}; accepted: a config.json path or one of {', '.join(MODELS)}")


