"""What a model is, as numbers: `ModelSpec`, a decoder-only transformer that is dense, or has
mixture-of-experts MLPs (`moe`), multi-head latent attention (`mla`) or sliding-window layers
(`layer_types`), and the sizes and FLOPs that follow from its shape. Built-in models live in
specs/catalog.py; HF config.json parsing in specs/hf_config.py.

Units: GB = 1e9 bytes, GB/s = 1e9 B/s, TFLOP/s = 1e12 FLOP/s, everywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiersim.errors import SpecError
from tiersim.specs.families import FULL, SLIDING, KVLayerGroup, MLASpec, MoESpec, validate_layer_types

_SHAPE_FIELDS = ("layers", "attention_heads", "kv_heads", "head_dim", "hidden", "intermediate", "vocab")
# Gemma-2/3 add pre/post feed-forward norms to the usual input and post-attention norms.
_FOUR_NORM_FAMILIES = ("gemma2", "gemma3")
# Checkpoint weight formats a config.json can declare (quantization_config.quant_method).
QUANTIZATIONS = ("fp8", "mxfp4")
# The keys of ModelSpec.param_breakdown: where each parameter lives, which decides how TP/EP split it.
PARAM_GROUPS = ("embeddings", "attention", "attention_latent", "mlp", "experts", "expert_biases", "shared_experts",
                "router", "other")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The shape of a decoder-only transformer (dense, MoE, MLA, hybrid attention) and the sizes and FLOPs that follow."""

    name: str
    layers: int
    attention_heads: int
    kv_heads: int  # MLA: equal to attention_heads (every head gets its own K and V from the shared latent)
    head_dim: int  # MLA: the query-key width qk_nope_head_dim + qk_rope_head_dim
    hidden: int
    intermediate: int  # width of a dense MLP (MoE models: of their dense layers, if any)
    vocab: int
    tied_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    family: str = "llama"
    source: str = ""
    dtype_bytes: int = 2
    moe: MoESpec | None = None  # None: dense MLPs in every layer
    mla: MLASpec | None = None  # None: grouped-query attention with kv_heads x head_dim K and V
    layer_types: tuple[str, ...] | None = None  # "full" or "sliding" per layer; None: all full
    sliding_window: int | None = None  # tokens a sliding layer keeps; set iff some layer is sliding
    quantization: str | None = None  # the checkpoint's weight format (fp8, mxfp4); None: dtype_bytes throughout

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
        if self.moe is not None:
            if not isinstance(self.moe, MoESpec):
                raise SpecError(f"{where}: field 'moe' is {self.moe!r}; accepted: None or a MoESpec")
            self.moe.validate(where, self.layers)
        if self.mla is not None:
            if not isinstance(self.mla, MLASpec):
                raise SpecError(f"{where}: field 'mla' is {self.mla!r}; accepted: None or an MLASpec")
            self.mla.validate(where)
            qk = self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim
            if self.head_dim != qk or self.kv_heads != self.attention_heads:
                raise SpecError(f"{where}: fields 'head_dim' = {self.head_dim}, 'kv_heads' = {self.kv_heads} do not "
                                f"match MLA; accepted: head_dim = qk_nope_head_dim + qk_rope_head_dim = {qk} and "
                                f"kv_heads = attention_heads = {self.attention_heads}")
        validate_layer_types(where, self.layer_types, self.sliding_window, self.layers)
        if self.quantization not in (None, *QUANTIZATIONS):
            raise SpecError(f"{where}: field 'quantization' is {self.quantization!r}; accepted: None or one of "
                            f"{', '.join(QUANTIZATIONS)}")

    # --- KV cache -----------------------------------------------------------------------------

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """Bytes of KV one token adds to one layer's cache: K and V of the KV heads, or (MLA) the latent and rope key."""
        if self.mla is not None:
            return self.mla.latent_width * self.dtype_bytes
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV one token adds to the cache of all layers (sliding layers included, within their window)."""
        return self.layers * self.kv_bytes_per_token_layer

    @property
    def kv_bytes_per_token_paper(self) -> int:
        """The paper's per-token KV size, which counts query heads and so ignores grouped-query attention."""
        return 2 * self.layers * self.attention_heads * self.head_dim * self.dtype_bytes

    @property
    def full_layers(self) -> tuple[int, ...]:
        """Indices of the layers that attend over the whole context (their KV grows and is tiered)."""
        if self.layer_types is None:
            return tuple(range(self.layers))
        return tuple(i for i, t in enumerate(self.layer_types) if t == FULL)

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        """Indices of the sliding-window layers (each holds at most sliding_window tokens, never tiered)."""
        if self.layer_types is None:
            return ()
        return tuple(i for i, t in enumerate(self.layer_types) if t == SLIDING)

    @property
    def kv_layer_groups(self) -> tuple[KVLayerGroup, ...]:
        """The layers grouped by how their KV behaves: full (grows), sliding (fixed at the window); empty groups left out."""
        groups = [KVLayerGroup(FULL, self.full_layers, None, self.kv_bytes_per_token_layer),
                  KVLayerGroup(SLIDING, self.sliding_layers, self.sliding_window, self.kv_bytes_per_token_layer)]
        return tuple(g for g in groups if g.layers)

    @property
    def kv_bytes_per_token_global(self) -> int:
        """Bytes one token adds to the full-attention layers: the KV that grows with the context, and what one
        DDR-tier token moves over the link (for MLA the latent, not per-head K and V)."""
        return len(self.full_layers) * self.kv_bytes_per_token_layer

    def kv_bytes_sliding_fixed(self, batch: int = 1) -> int:
        """Bytes the sliding-window layers of `batch` sequences hold once each has reached the window (their ceiling)."""
        if self.sliding_window is None:
            return 0
        return batch * len(self.sliding_layers) * self.sliding_window * self.kv_bytes_per_token_layer

    def kv_bytes_per_sequence(self, context_tokens: int) -> int:
        """Bytes of KV one sequence of `context_tokens` tokens holds in all layers (sliding layers capped at the window)."""
        return sum(g.kv_bytes(context_tokens) for g in self.kv_layer_groups)

    # --- weights ------------------------------------------------------------------------------

    @property
    def moe_layers(self) -> int:
        """Number of layers whose MLP is a mixture of experts."""
        return 0 if self.moe is None else self.layers - len(self.moe.dense_layers)

    @property
    def _attention_split_params(self) -> int:
        """Per layer: attention matmul weights that tensor parallelism splits across GPUs."""
        if self.mla is None:
            return self.hidden * (2 * self.attention_heads + 2 * self.kv_heads) * self.head_dim  # q, o and k, v
        a, h = self.mla, self.attention_heads
        q = (a.q_lora_rank or self.hidden) * h * self.head_dim  # q_b_proj (or q_proj)
        return q + a.kv_lora_rank * h * (a.qk_nope_head_dim + a.v_head_dim) + h * a.v_head_dim * self.hidden

    @property
    def _attention_latent_params(self) -> int:
        """Per layer: MLA down-projections to the latents (q_a_proj, kv_a_proj_with_mqa), replicated under TP."""
        if self.mla is None:
            return 0
        return self.hidden * ((self.mla.q_lora_rank or 0) + self.mla.latent_width)

    @property
    def _expert_matmul_params(self) -> int:
        """Gate, up and down projections of one expert."""
        return 3 * self.hidden * self.moe.expert_intermediate

    @property
    def param_breakdown(self) -> dict[str, int]:
        """Every parameter by where it lives (keys PARAM_GROUPS), summed over layers; the values add up to `params`."""
        n_moe = self.moe_layers
        n_dense = self.layers - n_moe
        per_layer_other = (4 if self.family in _FOUR_NORM_FAMILIES else 2) * self.hidden
        if self.qkv_bias:
            per_layer_other += (self.attention_heads + 2 * self.kv_heads) * self.head_dim
        if self.qk_norm:
            per_layer_other += 2 * self.head_dim  # one weight of head_dim shared by all heads
        if self.mla is not None:
            per_layer_other += (self.mla.q_lora_rank or 0) + self.mla.kv_lora_rank  # latent norms
        d = dict.fromkeys(PARAM_GROUPS, 0)
        d["embeddings"] = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        d["attention"] = self.layers * self._attention_split_params
        d["attention_latent"] = self.layers * self._attention_latent_params
        d["mlp"] = n_dense * 3 * self.hidden * self.intermediate  # gate, up, down (SwiGLU / GeGLU)
        if self.moe is not None:
            m = self.moe
            d["experts"] = n_moe * m.experts * self._expert_matmul_params
            d["expert_biases"] = n_moe * m.experts * (2 * m.expert_intermediate + self.hidden) if m.expert_bias else 0
            d["shared_experts"] = n_moe * m.shared_experts * self._expert_matmul_params
            d["router"] = n_moe * (self.hidden * m.experts + (m.experts if m.router_bias else 0))
        d["other"] = self.layers * per_layer_other + self.hidden  # + the final norm
        return d

    @property
    def params(self) -> int:
        """Total parameters (weights in HBM): embeddings, lm_head unless tied, all layers and experts, final norm."""
        return sum(self.param_breakdown.values())

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (projections, biases, norms); the mean over layers where they differ."""
        return (self.params - self.vocab * self.hidden * (1 if self.tied_embeddings else 2) - self.hidden) // self.layers

    @property
    def expert_params(self) -> int:
        """Parameters of all routed experts (with their biases): the weights expert parallelism splits."""
        d = self.param_breakdown
        return d["experts"] + d["expert_biases"]

    @property
    def _active_layer_matmul_total(self) -> int:
        """Matmul weights one token multiplies in all layers: attention, dense MLPs, top-k + shared experts, router."""
        total = self.layers * (self._attention_split_params + self._attention_latent_params)
        total += (self.layers - self.moe_layers) * 3 * self.hidden * self.intermediate
        if self.moe is not None:
            m = self.moe
            total += self.moe_layers * ((m.experts_per_token + m.shared_experts) * self._expert_matmul_params
                                        + self.hidden * m.experts)
        return total

    @property
    def active_params(self) -> int:
        """Parameters one token uses: all but the routed experts it is not sent to (embeddings counted, as `params`)."""
        if self.moe is None:
            return self.params
        m = self.moe
        unused = m.experts - m.experts_per_token
        per_expert = self._expert_matmul_params + ((2 * m.expert_intermediate + self.hidden) if m.expert_bias else 0)
        return self.params - self.moe_layers * unused * per_expert

    @property
    def layer_weight_bytes(self) -> int:
        """Bytes of one decoder layer's weights at dtype_bytes (the mean over layers where they differ)."""
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

    def step_params_read(self, tokens: float) -> float:
        """Weights one forward step over `tokens` tokens reads from HBM: every layer weight except routed experts no
        token is sent to (expected count, uniform routing), plus the lm_head; the embedding lookup reads rows only."""
        d = self.param_breakdown
        read = d["attention"] + d["attention_latent"] + d["mlp"] + d["shared_experts"] + d["router"]
        read += d["other"] - self.hidden + self.vocab * self.hidden
        if self.moe is not None:
            share = self.moe.experts_touched(tokens) / self.moe.experts
            read += share * (d["experts"] + d["expert_biases"])
        return float(read)

    # --- compute ------------------------------------------------------------------------------

    @property
    def flops_per_token(self) -> int:
        """Forward FLOPs per token: 2 x every matmul weight the token uses (layers, its experts, router, lm_head)."""
        return 2 * (self._active_layer_matmul_total + self.vocab * self.hidden)

    @property
    def attention_flops_per_pair(self) -> int:
        """FLOPs of QK^T and AV in one layer for one (query, key) pair; MLA in the absorbed form, which attends
        over the latent directly: scores over kv_lora_rank + rope, values over kv_lora_rank, per head."""
        if self.mla is not None:
            return 2 * self.attention_heads * (2 * self.mla.kv_lora_rank + self.mla.qk_rope_head_dim)
        return 4 * self.attention_heads * self.head_dim

    def attention_flops_per_token(self, context_tokens: int) -> float:
        """FLOPs of QK^T and AV for one new token attending over context_tokens positions (sliding layers: the window)."""
        keys = sum(len(g.layers) * (context_tokens if g.window is None else min(context_tokens, g.window))
                   for g in self.kv_layer_groups)
        return float(self.attention_flops_per_pair) * keys

    # --- conversion ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field and every derived size, for reports and trace headers (JSON values)."""
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["moe"] = None if self.moe is None else self.moe.to_dict()
        d["mla"] = None if self.mla is None else self.mla.to_dict()
        d["layer_types"] = None if self.layer_types is None else list(self.layer_types)
        for key in ("params", "layer_params", "weight_bytes", "layer_weight_bytes", "flops_per_token",
                    "kv_bytes_per_token", "kv_bytes_per_token_layer", "kv_bytes_per_token_paper",
                    "active_params", "kv_bytes_per_token_global"):
            d[key] = getattr(self, key)
        d["kv_bytes_sliding_fixed"] = self.kv_bytes_sliding_fixed(1)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """The spec whose to_dict() gave d (derived values in d are ignored)."""
        names = [f.name for f in dataclasses.fields(cls)]
        kw = {k: d[k] for k in names if k in d}
        if isinstance(kw.get("moe"), dict):
            kw["moe"] = MoESpec.from_dict(kw["moe"])
        if isinstance(kw.get("mla"), dict):
            kw["mla"] = MLASpec.from_dict(kw["mla"])
        if isinstance(kw.get("layer_types"), list):
            kw["layer_types"] = tuple(kw["layer_types"])
        return cls(**kw)

    @classmethod
    def from_hf_config(cls, path: str | Path, name: str | None = None) -> ModelSpec:
        """Read a Hugging Face config.json (the file, or a local folder that holds it), of any supported family."""
        from tiersim.specs.hf_config import read_hf_config  # hf_config builds ModelSpecs: imported on use

        return read_hf_config(path, name)
