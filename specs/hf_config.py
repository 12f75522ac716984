"""Read a local Hugging Face config.json into a ModelSpec, for dense, MoE (Qwen3-MoE, Mixtral, gpt-oss,
DeepSeek-V3), MLA (DeepSeek-V2/V3) and hybrid sliding-window (Gemma 2/3, gpt-oss, Mistral) models.

The JSON is always read as is first: it must hold the shape keys itself (a missing or bad key is
refused, naming it). With transformers installed the file then goes through `AutoConfig` too (which
fills the class defaults a published config.json leaves out, and renames some keys), and that reading
is the one returned; without transformers, or for a model_type it does not know, the plain-JSON reading
is. Both give the same ModelSpec for every supported family (tests/test_families.py): one parser reads
both, accepting the aliases either side uses. Nothing is downloaded: hub ids are refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tiersim.errors import SpecError
from tiersim.specs.families import FULL, SLIDING, MLASpec, MoESpec
from tiersim.specs.models import QUANTIZATIONS, ModelSpec

# HF config classes default tie_word_embeddings to True for Gemma, False for these (and for us).
_TIED_BY_DEFAULT = ("gemma", "gemma2", "gemma3")
# transformers' Gemma3TextConfig defaults: real gemma-3 config.json files leave these out.
_GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "sliding_window": 4096,
}
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_LAYER_TYPES = {"full_attention": FULL, "sliding_attention": SLIDING}
# Each concept under every name a config.json or AutoConfig's to_dict() gives it.
_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts")
_EXPERTS_PER_TOKEN = ("num_experts_per_tok", "experts_per_token")
_QWEN_MOE = ("qwen2_moe", "qwen3_moe")
_QK_NORM = ("qwen3", "qwen3_moe", "gemma3")
_ALL_SLIDING = ("mistral", "mixtral")  # sliding_window, when set, applies to every layer
_MLA_KEYS = ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")


def read_hf_config(path: str | Path, name: str | None = None) -> ModelSpec:
    """The ModelSpec of a local config.json (the file, or a folder that holds it); name defaults to the folder's."""
    path = _local_path(path)
    name = name if name is not None else (path.parent.name or path.stem)
    spec = _parse(_read_json(path), path, name)
    auto = autoconfig_dict(path)
    if auto is None:
        return spec
    try:
        return _parse(auto, path, name)
    except SpecError:  # a value transformers' defaults make unusable; the file itself was fine
        return spec


def read_hf_config_json(path: str | Path, name: str | None = None) -> ModelSpec:
    """The ModelSpec of a local config.json read as plain JSON, without transformers (what read_hf_config falls back to)."""
    path = _local_path(path)
    return _parse(_read_json(path), path, name if name is not None else (path.parent.name or path.stem))


def _local_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        return p / "config.json"
    text = str(path)
    looks_like_hub_id = (not p.exists() and not p.is_absolute() and len(p.parts) == 2 and p.suffix != ".json"
                         and not text.startswith((".", "~")) and "\\" not in text)
    if looks_like_hub_id:
        raise SpecError(f"{text}: looks like a Hugging Face hub id, and tiersim reads only local files; accepted: a "
                        f"local folder holding config.json (e.g. `hf download {text} config.json --local-dir DIR`, "
                        "then pass DIR)")
    return p


def _read_json(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file; accepted: a Hugging Face config.json "
                        "or a local folder holding one") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read ({e}); accepted: a readable config.json") from None
    except json.JSONDecodeError as e:
        raise SpecError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}; "
                        "accepted: a Hugging Face config.json") from None
    if not isinstance(cfg, dict):
        raise SpecError(f"{path}: top level is {type(cfg).__name__}; accepted: a JSON object")
    return cfg


def autoconfig_dict(path: Path) -> dict[str, Any] | None:
    """AutoConfig's view of the file (class defaults filled in), or None without transformers or for an unknown type."""
    try:
        from transformers import AutoConfig
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # unused-key notices are not the user's concern here
    logging.disable(logging.WARNING)
    try:
        return AutoConfig.from_pretrained(str(path.parent if path.name == "config.json" else path),
                                          local_files_only=True, trust_remote_code=False).to_dict()
    except Exception:  # noqa: BLE001 - an unknown model_type or a value transformers rejects: keep the JSON reading
        return None
    finally:
        logging.disable(logging.NOTSET)
        hf_logging.set_verbosity(verbosity)


def _first(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The value of the first of `keys` that cfg holds and is not null."""
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


class _Reader:
    """Typed reads of one config dict; each refusal names the file and the key."""

    def __init__(self, cfg: dict[str, Any], path: Path, model_type: str):
        self.cfg, self.path, self.model_type = cfg, path, model_type

    def fail(self, key: str, value: Any, accepted: str) -> SpecError:
        return SpecError(f"{self.path}: key '{key}' is {value!r}; accepted: {accepted}")

    def positive_int(self, *keys: str, default: int | None = None, why: str = "") -> int:
        for key in keys:
            value = self.cfg.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise self.fail(key, value, "a positive integer")
            return value
        if default is not None:
            return default
        raise SpecError(f"{self.path}: key '{keys[0]}' is missing (model_type {self.model_type or 'absent'!r}{why}); "
                        f"accepted: a config with {keys[0]} as a positive integer")

    def boolean(self, key: str, default: bool) -> bool:
        value = self.cfg.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, value, "true or false")
        return value

    def layer_list(self, key: str, layers: int) -> list[int]:
        value = self.cfg.get(key) or []
        if not isinstance(value, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < layers
                                              for i in value):
            raise self.fail(key, value, f"a list of layer indices in [0, {layers})")
        return value


def _parse(cfg: dict[str, Any], path: Path, name: str) -> ModelSpec:
    model_type = cfg.get("model_type", "")
    dtype = _first(cfg, "torch_dtype", "dtype")
    quant = cfg.get("quantization_config")
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers, e.g. gemma3: the decoder is here
        cfg = cfg["text_config"]
        model_type = cfg.get("model_type", model_type)
        dtype = _first(cfg, "torch_dtype", "dtype", default=dtype)
    family = {"gemma3_text": "gemma3"}.get(model_type, model_type) or "unknown"
    if family == "gemma3":
        cfg = _GEMMA3_TEXT_DEFAULTS | {k: v for k, v in cfg.items() if v is not None}
    r = _Reader(cfg, path, model_type)

    hidden = r.positive_int("hidden_size")
    heads = r.positive_int("num_attention_heads")
    layers = r.positive_int("num_hidden_layers")
    tied = r.boolean("tie_word_embeddings", family in _TIED_BY_DEFAULT)
    bias = r.boolean("attention_bias", False)
    if dtype is None:
        dtype_bytes = 2
    elif dtype in _DTYPE_BYTES:
        dtype_bytes = _DTYPE_BYTES[dtype]
    else:
        raise r.fail("torch_dtype" if "torch_dtype" in cfg else "dtype", dtype,
                     f"{', '.join(_DTYPE_BYTES)} or absent (bf16)")
    mla = _mla(r)
    kv_heads = heads if mla else r.positive_int("num_key_value_heads", default=heads)
    head_dim = (mla.qk_nope_head_dim + mla.qk_rope_head_dim) if mla else r.positive_int("head_dim", default=hidden // heads)
    layer_types, window = _layer_types(r, family, layers)
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    try:
        return ModelSpec(
            name=name, layers=layers, attention_heads=heads, kv_heads=kv_heads, head_dim=head_dim, hidden=hidden,
            intermediate=r.positive_int("intermediate_size"), vocab=r.positive_int("vocab_size"),
            tied_embeddings=tied,
            qkv_bias=family == "qwen2" or bias,  # Qwen2 hard-codes q/k/v bias; o_proj bias is not counted
            qk_norm=family in _QK_NORM, family=family, source=str(path), dtype_bytes=dtype_bytes,
            moe=_moe(r, family, layers), mla=mla, layer_types=layer_types, sliding_window=window,
            quantization=method if method in QUANTIZATIONS else None,
        )
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None


def _moe(r: _Reader, family: str, layers: int) -> MoESpec | None:
    experts_key = next((k for k in _EXPERTS if r.cfg.get(k) is not None), None)
    if experts_key is None or r.cfg[experts_key] in (0, 1):
        return None
    experts = r.positive_int(experts_key)
    why = f"; {experts_key} = {experts} marks a mixture-of-experts model"
    if r.cfg.get("shared_expert_intermediate_size"):
        raise r.fail("shared_expert_intermediate_size", r.cfg["shared_expert_intermediate_size"],
                     "absent: shared experts of their own width (Qwen2-MoE) are not modelled")
    dense: set[int] = set()
    if family in _QWEN_MOE:
        step = r.positive_int("decoder_sparse_step", default=1)
        dense = set(r.layer_list("mlp_only_layers", layers)) | {i for i in range(layers) if (i + 1) % step}
    elif "first_k_dense_replace" in r.cfg or "moe_layer_freq" in r.cfg:  # DeepSeek-V2/V3
        k = r.cfg.get("first_k_dense_replace") or 0
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < layers:
            raise r.fail("first_k_dense_replace", k, f"an integer in [0, {layers})")
        freq = r.positive_int("moe_layer_freq", default=1)
        dense = {i for i in range(layers) if i < k or i % freq}
    return MoESpec(
        experts=experts,
        experts_per_token=r.positive_int(*_EXPERTS_PER_TOKEN, why=why),
        expert_intermediate=r.positive_int("moe_intermediate_size", "intermediate_size", why=why),
        shared_experts=r.cfg.get("n_shared_experts") or 0,
        dense_layers=tuple(sorted(dense)),
        expert_bias=family == "gpt_oss",  # gpt-oss experts: gate_up_proj_bias, down_proj_bias
        router_bias=family == "gpt_oss" or r.cfg.get("topk_method") == "noaux_tc",  # noaux_tc: e_score_correction_bias
    )


def _mla(r: _Reader) -> MLASpec | None:
    if r.cfg.get("kv_lora_rank") is None:
        return None
    why = f"; kv_lora_rank = {r.cfg['kv_lora_rank']!r} marks multi-head latent attention"
    q_lora = r.cfg.get("q_lora_rank")
    return MLASpec(kv_lora_rank=r.positive_int("kv_lora_rank"),
                   **{k: r.positive_int(k, why=why) for k in _MLA_KEYS},
                   q_lora_rank=None if q_lora is None else r.positive_int("q_lora_rank"))


def _layer_types(r: _Reader, family: str, layers: int) -> tuple[tuple[str, ...] | None, int | None]:
    """Per-layer attention kinds as transformers resolves them (layer_types when given, else the family's rule)."""
    cfg = r.cfg
    window = cfg.get("sliding_window")
    given = cfg.get("layer_types")
    if given is not None:
        if not isinstance(given, list) or len(given) != layers or any(t not in _LAYER_TYPES for t in given):
            raise r.fail("layer_types", given, f"a list of {layers} entries, each "
                         f"{' or '.join(map(repr, _LAYER_TYPES))}")
        kinds = [_LAYER_TYPES[t] for t in given]
    elif family == "gemma2" or family == "gpt_oss":
        window = r.positive_int("sliding_window", default=4096 if family == "gemma2" else 128)
        kinds = [SLIDING if i % 2 == 0 else FULL for i in range(layers)]
    elif family == "gemma3":
        pattern = r.positive_int("sliding_window_pattern", "_sliding_window_pattern", default=6)
        kinds = [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
    elif family in ("qwen2", "qwen3", *_QWEN_MOE) and r.boolean("use_sliding_window", False) and window:
        first_sliding = r.positive_int("max_window_layers", default=28)
        kinds = [SLIDING if i >= first_sliding else FULL for i in range(layers)]
    elif family in _ALL_SLIDING and window is not None:
        kinds = [SLIDING] * layers
    else:
        kinds = [FULL] * layers
    if SLIDING not in kinds:
        return None, None
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise r.fail("sliding_window", window, "a positive integer (tokens a sliding-window layer keeps)")
    return tuple(kinds), window
