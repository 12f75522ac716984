"""What one GPU of a deployment holds, reads and moves for one model: `GPUShare`.

Built once per run from the model, the deployment (specs/deployment.py: TP/EP/DP, KV and weight
dtypes) and the legacy uniform weight precision (`SimConfig.weight_bits`), and read by the cost
model (sim/costs.py), the step plan and the memory account. Every size is per GPU:

- KV: heads split across the TP GPUs (replicated when fewer KV heads than GPUs), an MLA latent on
  every GPU; only full-attention layers grow and are tiered, sliding-window layers hold their window.
- Weights held: per parameter group at its precision, over the GPUs sharing it (per_gpu).
- Weights read per decode step: every layer weight except the routed experts no token reaches
  (expected count, uniform routing, over the tokens of every replica in the EP group), the lm_head;
  the input embedding only gives rows.
- FLOPs: 2 per active weight per token; TP-split weights over tp, replicated ones (norms, router,
  MLA down-projections) in full on every GPU. With fp8 weights the quantized matmuls (attention, MLA
  projections, MLPs, experts) run W8A8 at the GPU's fp8 rate (`layer_fp8_flops_per_token`), as vLLM runs
  fp8 checkpoints on GPUs with FP8 tensor cores; weight-only formats (int8, int4, mxfp4, the uniform
  `weight_bits`) dequantize to bf16 and keep the bf16 rate.
- Collectives: the TP all-reduces of every layer, and the EP all-to-all of each MoE layer when the
  expert group spans replicas (specs/deployment.py says when and how many bytes).

A dense model on one GPU at its own dtype gives exactly the numbers of the single-GPU model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tiersim.errors import ConfigError
from tiersim.specs import Deployment, ModelSpec, per_gpu
from tiersim.workload.build import COL, Workload

# Parameter groups every GPU of a replica holds in full (ReplicatedLinear and norms): their FLOPs are not split.
_REPLICATED = ("attention_latent", "router", "other")
# Labels of the 8 x bytes of a KV element (kv_dtype None: the model's own dtype).
_KV_LABEL = {1: "fp8", 2: "bf16", 4: "fp32"}


@dataclass(frozen=True, slots=True)
class GPUShare:
    """Per-GPU sizes of one model served one way: KV per token, weights held and read, FLOPs, all-reduce bytes."""

    tp: int
    ep: int
    dp: int
    layers: int
    full_layers: int  # layers whose KV grows with the context, is tiered and crosses the link
    sliding_window: int | None  # tokens a sliding layer keeps (None: no sliding layers)
    attention_heads: int  # query heads computed on this GPU
    query_width: int  # values per head of a query sent to the host (MLA, absorbed: latent + rope)
    value_width: int  # values per head of a partial attention output (MLA, absorbed: the latent)
    kv_bytes_per_token_layer: int  # one token, one layer, this GPU (MLA: the latent and rope key)
    kv_element_bytes: int
    weight_bytes: float  # every weight this GPU holds
    expert_weight_bytes: float  # the routed-expert part of weight_bytes
    step_weight_bytes: float  # layer weights a decode step reads whatever the routing (routed experts aside)
    head_weight_bytes: float  # the lm_head slice (the tied embedding table when tied)
    layer_flops_per_token: float  # matmul FLOPs of one token in one layer (mean over layers), this GPU
    head_flops_per_token: float
    allreduce_bytes_per_token_layer: int  # TP: the two all-reduces of one layer, per token; 0 at tp 1
    moe_layers: int  # layers with routed experts (0 for a dense model)
    alltoall_bytes_per_token_moe_layer: float  # EP across replicas: dispatch + combine bytes of one MoE layer, per
    # token of this replica, sent by this GPU; 0 without an all-to-all
    layer_fp8_flops_per_token: float  # the part of layer_flops_per_token run W8A8 at the fp8 rate (fp8 weights only)
    experts: int  # routed experts per MoE layer; 0 for a dense model
    experts_per_token: int
    weights_label: str  # how the weights are stored: a weight_dtype, or "N-bit (all weights)"
    kv_label: str

    @property
    def gpus(self) -> int:
        """GPUs of the whole deployment."""
        return self.tp * self.dp

    @property
    def sliding_layers(self) -> int:
        """Layers that keep only the last sliding_window tokens."""
        return self.layers - self.full_layers

    @property
    def full_share(self) -> float:
        """Share of layers with full attention (1.0 for a model without sliding layers)."""
        return self.full_layers / self.layers

    @property
    def sliding_share(self) -> float:
        """Share of layers with sliding-window attention."""
        return self.sliding_layers / self.layers

    @property
    def kv_bytes_per_token_global(self) -> int:
        """One token in every full-attention layer: what grows, is tiered, and what a DDR-tier token moves."""
        return self.full_layers * self.kv_bytes_per_token_layer

    @property
    def kv_bytes_per_token_sliding(self) -> int:
        """One token in every sliding-window layer (while within the window)."""
        return self.sliding_layers * self.kv_bytes_per_token_layer

    @property
    def kv_bytes_sliding_fixed(self) -> int:
        """One sequence's sliding-window layers once past the window (their ceiling)."""
        return (self.sliding_window or 0) * self.kv_bytes_per_token_sliding

    def expert_read_share(self, tokens: np.ndarray) -> np.ndarray:
        """Expected share of this GPU's routed-expert weights a step over `tokens` new tokens (per replica) reads:
        1 - (1 - k/E)^n over the n tokens reaching the EP group (uniform, independent routing)."""
        n = np.asarray(tokens, dtype=np.float64) * max(1.0, self.ep / self.tp)
        return 1.0 - (1.0 - self.experts_per_token / self.experts) ** np.maximum(n, 0.0)

    def layer_weight_bytes(self, tokens: np.ndarray) -> np.ndarray | float:
        """Bytes one layer's matmuls read from HBM on this GPU for a step over `tokens` new tokens (mean over layers)."""
        if not self.experts:
            return self.step_weight_bytes / self.layers
        return (self.step_weight_bytes + self.expert_read_share(tokens) * self.expert_weight_bytes) / self.layers

    def to_dict(self) -> dict:
        """The per-GPU sizes, for the summary."""
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d |= {"gpus": self.gpus, "kv_bytes_per_token_global": self.kv_bytes_per_token_global,
              "kv_bytes_sliding_fixed": self.kv_bytes_sliding_fixed}
        return d


def gpu_share(model: ModelSpec, tp: int = 1, ep: int = 1, dp: int = 1, *, weight_dtype: str | None = None,
              weight_bits: int | None = None, kv_dtype: str | None = None) -> GPUShare:
    """One GPU's share of `model` served with tp/ep/dp.

    Weights: `weight_dtype` per parameter group (specs/deployment.py), else `weight_bits` for every parameter
    (the legacy uniform precision), else the checkpoint's format (model.quantization), else the model's dtype
    for every parameter. KV: `kv_dtype`, else the model's dtype. Raises ConfigError naming the field.
    """
    if weight_dtype is not None and weight_bits is not None:
        raise ConfigError("weight_dtype", "give weight_dtype or weight_bits, not both (weight_bits stores every "
                                          "parameter at that many bits; weight_dtype quantizes the matmul weights)")
    weight_dtype = weight_dtype or (model.quantization if weight_bits is None else None)
    dep = Deployment(tp=tp, ep=ep, dp=dp, kv_dtype=kv_dtype or "bf16", weight_dtype=weight_dtype or "bf16")
    g = per_gpu(model, dep)
    # Uniform precision: every group at bf16 scaled to the bytes per parameter (exact: a power-of-two ratio).
    scale = 1.0 if weight_dtype else (model.dtype_bytes if weight_bits is None else weight_bits / 8) / 2
    table_bytes = model.vocab * model.hidden * 2 * scale / tp  # one embedding table (16-bit unless uniform)
    tables = 1 if model.tied_embeddings else 2
    weights, experts = g.weight_bytes * scale, g.expert_weight_bytes * scale
    step = weights - experts - tables * table_bytes - model.hidden * 2 * scale  # the final norm rides with the head
    d = model.param_breakdown
    replicated = sum(d[k] for k in _REPLICATED) - model.hidden
    active_layers = model.active_params - d["embeddings"] - model.hidden
    kv_element = dep.kv_bytes_per_element if kv_dtype else model.dtype_bytes
    kvl = g.kv_bytes_per_token_layer // dep.kv_bytes_per_element * kv_element
    mla = model.mla
    layer_flops = 2.0 * ((active_layers - replicated) / tp + replicated) / model.layers
    # W8A8: every layer matmul but the router (and the norms and biases in `other`), which stay 16-bit.
    fp8_flops = layer_flops - 2.0 * (d["router"] + d["other"] - model.hidden) / model.layers \
        if weight_dtype == "fp8" else 0.0
    return GPUShare(
        tp=tp, ep=ep, dp=dp, layers=model.layers, full_layers=len(model.full_layers),
        sliding_window=model.sliding_window if model.sliding_layers else None,
        attention_heads=g.attention_heads,
        query_width=model.head_dim if mla is None else mla.latent_width,
        value_width=model.head_dim if mla is None else mla.kv_lora_rank,
        kv_bytes_per_token_layer=kvl, kv_element_bytes=kv_element,
        weight_bytes=weights, expert_weight_bytes=experts, step_weight_bytes=step, head_weight_bytes=table_bytes,
        layer_flops_per_token=layer_flops,
        head_flops_per_token=2.0 * model.vocab * model.hidden / tp,
        allreduce_bytes_per_token_layer=g.allreduce_bytes_per_token_layer,
        moe_layers=model.moe_layers, alltoall_bytes_per_token_moe_layer=g.alltoall_bytes_per_token_moe_layer,
        layer_fp8_flops_per_token=fp8_flops,
        experts=0 if model.moe is None else model.moe.experts,
        experts_per_token=0 if model.moe is None else model.moe.experts_per_token,
        weights_label=weight_dtype or f"{8 * model.dtype_bytes if weight_bits is None else weight_bits}-bit "
                                      f"(all weights)",
        kv_label=kv_dtype or _KV_LABEL.get(model.dtype_bytes, f"{8 * model.dtype_bytes}-bit"),
    )


@dataclass(frozen=True, slots=True)
class WindowDemand:
    """Per-step totals over the batch of what the sliding-window layers hold and attend (one layer's worth)."""

    resident_tokens: np.ndarray  # tokens a sliding layer holds, summed over slots: min(context, window) each
    decode_tokens: np.ndarray  # keys a decoding slot's query attends in a sliding layer, summed over slots
    prefill_pairs: np.ndarray  # (query, key) pairs of the prompts' windowed causal attention


def window_demand(w: Workload, window: int | None) -> WindowDemand:
    """What one sliding-window layer holds and attends per step, from the slots' rows (zeros without a window)."""
    steps = len(w.totals)
    if window is None:
        zeros = np.zeros(steps)
        return WindowDemand(zeros, zeros, zeros)
    flat = w.tables.reshape(-1, w.tables.shape[-1])
    rows = w.slot_rows  # (batch, steps)
    held = np.minimum(flat[rows, COL["tokens"]], window)
    prompt = flat[rows, COL["prefill_tokens"]]
    inside = np.minimum(prompt, window)
    # sum_{i=1..P} min(i, W): the triangle up to the window, then W keys for every later prompt position.
    pairs = inside * (inside + 1) / 2 + np.maximum(prompt - window, 0) * window
    return WindowDemand(held.sum(axis=0), (held * flat[rows, COL["decode"]]).sum(axis=0), pairs.sum(axis=0))
