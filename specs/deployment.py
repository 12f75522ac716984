"""How a model is served: `Deployment` (tensor, expert and data parallelism, KV and weight dtypes, memory
share, context cap) and `per_gpu`, the sizes one GPU of that deployment holds and moves.

Sharding follows vLLM: attention heads and the MLP/expert matrices are split across the `tp` GPUs of
a replica; when a model has fewer KV heads than `tp`, each KV head is replicated on tp / kv_heads GPUs
(so a GPU still holds one); an MLA latent is not per head and is replicated on every GPU; embeddings and
lm_head are split by vocabulary; norms, routers and MLA down-projections (ReplicatedLinear) are
replicated. With `ep` > 1 whole experts are placed on the ep GPUs (vLLM's expert parallelism spans
tp x dp GPUs); experts are otherwise TP-sliced, so each GPU holds 1 / max(tp, ep) of them.

Collectives, per token of a replica: under TP two all-reduces per layer of hidden x activation bytes. When
the EP group spans replicas (ep > tp, hence dp > 1) each MoE layer also dispatches every token's hidden
state to the GPUs holding its top-k experts and combines the results back (vLLM's all2all kernels run only
then: `FusedMoEParallelConfig.use_all2all_kernels` is `dp_size > 1 and use_ep`, vllm/model_executor/layers/
fused_moe/config.py). Each GPU of a replica dispatches its 1/tp of the replica's tokens; of the top_k copies
of a token, (ep - 1)/ep go to other GPUs (uniform routing, one copy per expert as pplx and the all-to-all-v
backends send; DeepEP sends one per destination GPU, fewer). Dispatch and combine move the same bytes:
2 x hidden x activation bytes x top_k x (ep - 1)/ep / tp per token. With ep <= tp the experts sit inside
the replica, whose GPUs all hold every token, and the TP all-reduce combines their outputs: no all-to-all.
"""

from __future__ import annotations

from dataclasses import dataclass

from tiersim.check import choice, integer, number
from tiersim.errors import ConfigError
from tiersim.specs.models import ModelSpec

KV_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1}
# Bits per quantized weight. fp8/int8/int4: the matmul weights of the decoder layers (attention projections,
# dense MLPs, experts), per-block scales not counted (DeepSeek fp8: one fp32 per 128x128 block, 0.002 bits).
# mxfp4 (OCP MX): 32 four-bit values share one 8-bit scale, 4.25 bits, applied to routed experts only, as
# gpt-oss ships them. Embeddings, lm_head, norms, routers and biases stay 16-bit in every case.
WEIGHT_DTYPE_BITS = {"bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int4": 4, "mxfp4": 4.25}
_QUANTIZED = {"fp8": ("attention", "attention_latent", "mlp", "experts", "shared_experts"),
              "int8": ("attention", "attention_latent", "mlp", "experts", "shared_experts"),
              "int4": ("attention", "attention_latent", "mlp", "experts", "shared_experts"),
              "mxfp4": ("experts",)}
# vLLM's flag for each field (the CLI accepts these as aliases of tiersim's own flags).
VLLM_FLAGS = {"tp": "--tensor-parallel-size", "ep": "--enable-expert-parallel (ep = tp x dp)",
              "dp": "--data-parallel-size", "kv_dtype": "--kv-cache-dtype", "weight_dtype": "--quantization / --dtype",
              "gpu_memory_utilization": "--gpu-memory-utilization", "max_model_len": "--max-model-len"}


@dataclass(frozen=True, slots=True)
class Deployment:
    """One serving deployment: `dp` replicas of `tp` GPUs each, experts over `ep` GPUs, and the dtypes in HBM."""

    tp: int = 1  # tensor parallel GPUs per replica
    ep: int = 1  # GPUs the routed experts are spread over (whole experts each); 1: experts TP-sliced
    dp: int = 1  # data-parallel replicas
    kv_dtype: str = "bf16"  # KV cache element: bf16 | fp16 | fp8
    weight_dtype: str = "bf16"  # bf16 | fp16 | fp8 | int8 | int4 | mxfp4 (see WEIGHT_DTYPE_BITS)
    gpu_memory_utilization: float = 0.9  # share of HBM the engine may use (vLLM's default 0.9)
    max_model_len: int | None = None  # longest context (prompt + generation); None: the model's

    def __post_init__(self):
        for key in ("tp", "ep", "dp"):
            integer(key, getattr(self, key), 1)
        choice("kv_dtype", self.kv_dtype, KV_DTYPE_BYTES)
        choice("weight_dtype", self.weight_dtype, WEIGHT_DTYPE_BITS)
        number("gpu_memory_utilization", self.gpu_memory_utilization, 0, 1, low_open=True)
        integer("max_model_len", self.max_model_len, 1, optional=True)
        if (self.tp * self.dp) % self.ep:
            raise ConfigError("ep", f"ep must divide the deployment's tp x dp = {self.tp * self.dp} GPUs, got {self.ep}")

    @property
    def gpus(self) -> int:
        """GPUs of the whole deployment."""
        return self.tp * self.dp

    @property
    def kv_bytes_per_element(self) -> int:
        """Bytes of one KV cache element at kv_dtype."""
        return KV_DTYPE_BYTES[self.kv_dtype]

    def check(self, model: ModelSpec) -> None:
        """Raise ConfigError naming the field when `model` cannot be sharded this way."""
        if model.attention_heads % self.tp:
            raise ConfigError("tp", f"tp must divide the {model.name} attention heads ({model.attention_heads}), "
                                    f"got {self.tp}")
        if model.mla is None and model.kv_heads % self.tp and self.tp % model.kv_heads:
            raise ConfigError("tp", f"tp must divide the {model.name} KV heads ({model.kv_heads}) or be a multiple of "
                                    f"them (each KV head then replicated), got {self.tp}")
        if self.ep > 1 and model.moe is None:
            raise ConfigError("ep", f"ep > 1 needs a mixture-of-experts model; {model.name} is dense, got {self.ep}")
        if model.moe is not None and model.moe.experts % self.ep:
            raise ConfigError("ep", f"ep must divide the {model.name} experts ({model.moe.experts}), got {self.ep}")
        if self.weight_dtype == "mxfp4" and model.moe is None:
            raise ConfigError("weight_dtype", f"weight_dtype mxfp4 quantizes routed experts only; {model.name} has "
                                              "none; accepted for dense models: bf16, fp16, fp8, int8, int4")


@dataclass(frozen=True, slots=True)
class PerGPU:
    """What one GPU of a deployment holds and moves for one model (bytes at the deployment's dtypes)."""

    attention_heads: int  # query heads computed on this GPU
    kv_heads: int  # KV heads cached on this GPU (MLA: 1, the latent)
    kv_replication: int  # GPUs of a replica holding the same KV (tp / kv_heads when fewer KV heads than tp; MLA: tp)
    kv_bytes_per_token_layer: int  # one token, one layer, on this GPU
    kv_bytes_per_token: int  # one token, all layers (sliding ones within their window)
    kv_bytes_per_token_global: int  # one token, full-attention layers: grows with context, what the DDR tier moves
    kv_bytes_sliding_fixed: int  # one sequence's sliding-window layers once past the window
    weight_bytes: float  # all weights this GPU holds
    expert_weight_bytes: float  # the routed-expert part of weight_bytes
    allreduce_bytes_per_token_layer: int  # TP: two all-reduces per layer of hidden x activation bytes; 0 at tp 1
    # EP across replicas: bytes this GPU sends (and receives) in one MoE layer's dispatch and combine, per token of
    # its replica; 0 when ep <= tp (no all-to-all: see the module docstring)
    alltoall_bytes_per_token_moe_layer: float

    def kv_bytes_per_sequence(self, model: ModelSpec, context_tokens: int) -> int:
        """This GPU's KV bytes for one sequence of `context_tokens` tokens (sliding layers capped at the window)."""
        full = len(model.full_layers) * context_tokens
        sliding = len(model.sliding_layers) * min(context_tokens, model.sliding_window or 0)
        return (full + sliding) * self.kv_bytes_per_token_layer


def per_gpu(model: ModelSpec, dep: Deployment) -> PerGPU:
    """The per-GPU share of `model` served as `dep` (raises ConfigError if the sharding does not fit the model)."""
    dep.check(model)
    kv_b = dep.kv_bytes_per_element
    if model.mla is not None:
        kv_heads, replication = 1, dep.tp
        per_layer = model.mla.latent_width * kv_b
    else:
        kv_heads = max(1, model.kv_heads // dep.tp)
        replication = max(1, dep.tp // model.kv_heads)
        per_layer = 2 * kv_heads * model.head_dim * kv_b
    sliding = model.kv_bytes_sliding_fixed(1) // model.kv_bytes_per_token_layer * per_layer
    weights, experts = _weight_bytes(model, dep)
    return PerGPU(
        attention_heads=model.attention_heads // dep.tp, kv_heads=kv_heads, kv_replication=replication,
        kv_bytes_per_token_layer=per_layer, kv_bytes_per_token=model.layers * per_layer,
        kv_bytes_per_token_global=len(model.full_layers) * per_layer, kv_bytes_sliding_fixed=sliding,
        weight_bytes=weights, expert_weight_bytes=experts,
        allreduce_bytes_per_token_layer=2 * model.hidden * model.dtype_bytes if dep.tp > 1 else 0,
        alltoall_bytes_per_token_moe_layer=_alltoall_bytes(model, dep),
    )


def _alltoall_bytes(model: ModelSpec, dep: Deployment) -> float:
    """One GPU's dispatch + combine bytes in one MoE layer per token of its replica (0 without an all-to-all)."""
    if model.moe is None or dep.ep <= dep.tp:
        return 0.0
    k = model.moe.experts_per_token
    return 2.0 * model.hidden * model.dtype_bytes * k * (dep.ep - 1) / dep.ep / dep.tp


def _weight_bytes(model: ModelSpec, dep: Deployment) -> tuple[float, float]:
    """(all weights, routed experts) bytes on one GPU: each parameter group at its bits, over the GPUs sharing it."""
    quantized = _QUANTIZED.get(dep.weight_dtype, ())
    split = {"embeddings": dep.tp, "attention": dep.tp, "mlp": dep.tp, "shared_experts": dep.tp,
             "experts": max(dep.tp, dep.ep), "expert_biases": max(dep.tp, dep.ep)}
    total = experts = 0.0
    for group, params in model.param_breakdown.items():
        bits = WEIGHT_DTYPE_BITS[dep.weight_dtype] if group in quantized else 16
        nbytes = params * bits / 8 / split.get(group, 1)
        total += nbytes
        if group in ("experts", "expert_biases"):
            experts += nbytes
    return total, experts
