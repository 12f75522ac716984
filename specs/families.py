"""The parts of a model that are not a plain dense transformer: mixture-of-experts MLPs (`MoESpec`),
multi-head latent attention (`MLASpec`), and per-layer attention kinds (`KVLayerGroup`, full or
sliding window). A `ModelSpec` holds none, one or several of them; each is validated once here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tiersim.errors import SpecError

FULL, SLIDING = "full", "sliding"
LAYER_KINDS = (FULL, SLIDING)


def _positive(where: str, key: str, value: object, *, zero: bool = False) -> None:
    low = 0 if zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SpecError(f"{where}: field '{key}' is {value!r}; accepted: an integer >= {low}")


@dataclass(frozen=True, slots=True)
class MoESpec:
    """Mixture-of-experts MLPs: `experts` routed experts per MoE layer, `experts_per_token` of them used by each token."""

    experts: int  # routed experts per MoE layer (HF num_experts / num_local_experts / n_routed_experts)
    experts_per_token: int  # top-k (HF num_experts_per_tok / experts_per_token)
    expert_intermediate: int  # SwiGLU width of one expert (HF moe_intermediate_size; gpt-oss: intermediate_size)
    shared_experts: int = 0  # experts every token uses (DeepSeek n_shared_experts), each expert_intermediate wide
    dense_layers: tuple[int, ...] = ()  # layer indices with a dense MLP of ModelSpec.intermediate instead of experts
    expert_bias: bool = False  # gpt-oss: gate_up and down projections of every expert carry biases
    router_bias: bool = False  # a bias per expert in the router (gpt-oss; DeepSeek's e_score_correction_bias)

    def validate(self, where: str, layers: int) -> None:
        """Raise SpecError naming the field when the shape is inconsistent with `layers` decoder layers."""
        _positive(where, "moe.experts", self.experts)
        _positive(where, "moe.experts_per_token", self.experts_per_token)
        _positive(where, "moe.expert_intermediate", self.expert_intermediate)
        _positive(where, "moe.shared_experts", self.shared_experts, zero=True)
        if self.experts_per_token > self.experts:
            raise SpecError(f"{where}: field 'moe.experts_per_token' = {self.experts_per_token} exceeds moe.experts = "
                            f"{self.experts}; accepted: 1 <= experts_per_token <= experts")
        if not isinstance(self.dense_layers, tuple) or any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < layers for i in self.dense_layers) or \
                list(self.dense_layers) != sorted(set(self.dense_layers)):
            raise SpecError(f"{where}: field 'moe.dense_layers' is {self.dense_layers!r}; accepted: a sorted tuple of "
                            f"distinct layer indices in [0, {layers})")
        if len(self.dense_layers) == layers:
            raise SpecError(f"{where}: field 'moe.dense_layers' names every layer; accepted: at least one MoE layer "
                            "(a model without one is dense: moe = None)")
        for key in ("expert_bias", "router_bias"):
            if not isinstance(getattr(self, key), bool):
                raise SpecError(f"{where}: field 'moe.{key}' is {getattr(self, key)!r}; accepted: true or false")

    def experts_touched(self, tokens: float) -> float:
        """Expected distinct routed experts one MoE layer reads for `tokens` tokens, routing uniform and independent."""
        if tokens <= 0:
            return 0.0
        return self.experts * (1.0 - (1.0 - self.experts_per_token / self.experts) ** tokens)

    def to_dict(self) -> dict[str, Any]:
        """Fields as JSON values."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoESpec:
        """The record whose to_dict() gave d."""
        return cls(**{**d, "dense_layers": tuple(d.get("dense_layers", ()))})


@dataclass(frozen=True, slots=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2/V3): the cache holds one latent and one shared rope key per token."""

    kv_lora_rank: int  # width of the compressed KV latent
    qk_rope_head_dim: int  # the decoupled rope key, shared by all heads and cached beside the latent
    qk_nope_head_dim: int  # per-head key width without rope (up-projected from the latent)
    v_head_dim: int  # per-head value width (up-projected from the latent)
    q_lora_rank: int | None = None  # queries through a low-rank latent too (V3: 1536); None: a direct projection

    def validate(self, where: str) -> None:
        """Raise SpecError naming the field when a width is not a positive integer."""
        for key in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            _positive(where, f"mla.{key}", getattr(self, key))
        if self.q_lora_rank is not None:
            _positive(where, "mla.q_lora_rank", self.q_lora_rank)

    @property
    def latent_width(self) -> int:
        """Values cached per token per layer: the latent plus the rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def to_dict(self) -> dict[str, Any]:
        """Fields as JSON values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MLASpec:
        """The record whose to_dict() gave d."""
        return cls(**d)


@dataclass(frozen=True, slots=True)
class KVLayerGroup:
    """Layers whose KV cache behaves alike: `full` layers grow with the context and are tiered; `sliding` layers
    keep only the last `window` tokens (a fixed size per sequence, never tiered)."""

    kind: str  # FULL or SLIDING
    layers: tuple[int, ...]  # layer indices
    window: int | None  # tokens a sliding layer keeps; None for full layers
    kv_bytes_per_token_layer: int  # bytes one token adds to one layer of the group at the model's dtype

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one token adds to all layers of the group (while within the window)."""
        return len(self.layers) * self.kv_bytes_per_token_layer

    def kv_bytes(self, context_tokens: int) -> int:
        """Bytes the group holds for one sequence of `context_tokens` tokens."""
        held = context_tokens if self.window is None else min(context_tokens, self.window)
        return held * self.kv_bytes_per_token


def validate_layer_types(where: str, layer_types: tuple[str, ...] | None, sliding_window: int | None,
                         layers: int) -> None:
    """Raise SpecError naming the field unless layer_types lists one kind per layer and a window comes with sliding ones."""
    if layer_types is not None:
        if not isinstance(layer_types, tuple) or len(layer_types) != layers or any(
                t not in LAYER_KINDS for t in layer_types):
            raise SpecError(f"{where}: field 'layer_types' is {layer_types!r}; accepted: None (all full) or a tuple of "
                            f"{layers} entries, each {' or '.join(map(repr, LAYER_KINDS))}")
    has_sliding = layer_types is not None and SLIDING in layer_types
    if has_sliding:
        _positive(where, "sliding_window", sliding_window)
    elif sliding_window is not None:
        raise SpecError(f"{where}: field 'sliding_window' is {sliding_window!r} but no layer is 'sliding'; "
                        "accepted: None unless layer_types has a sliding layer")
