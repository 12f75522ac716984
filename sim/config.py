"""`SimConfig`: every input of one simulation, resolved and checked (extends workload.config.RunConfig)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tiersim import check
from tiersim.copy_methods import COPY_METHOD_CHOICES, KV_LAYOUTS, check_unit_nests, get_copy_method
from tiersim.policy import PolicyConfig
from tiersim.sim.shard import GPUShare, gpu_share
from tiersim.specs import KV_DTYPE_BYTES, WEIGHT_DTYPE_BITS, HardwareSpec, ModelSpec, hardware_spec
from tiersim.workload.config import RunConfig

# vLLM's default gpu_memory_utilization is 0.9: 10% of HBM is left to the CUDA context, the
# allocator and activations (https://docs.vllm.ai/en/latest/api/vllm/config/cache.html).
DEFAULT_RESERVE_FRAC = 0.10
WEIGHT_BITS = (4, 8, 16, 32)


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig(RunConfig):
    """Every input of one simulation, resolved: the shared run inputs plus the machine and how it is modelled."""

    hardware: HardwareSpec  # a profile name or TOML path is resolved here
    reserve_frac: float = DEFAULT_RESERVE_FRAC
    fixed_compute_ms: float | None = None  # replace the compute roofline by a fixed time per decode step
    weight_bits: int | None = None  # every weight stored at this many bits (KV stays at the model's dtype)
    # The deployment (specs/deployment.py; vLLM's flag in VLLM_FLAGS). `batch` is the batch of one replica.
    tp: int = 1  # tensor-parallel GPUs per replica: heads, KV and weights split, two all-reduces per layer
    ep: int = 1  # GPUs the routed experts are spread over (whole experts); 1: experts TP-sliced
    dp: int = 1  # data-parallel replicas (GPUs of the host share its DDR bandwidth and cores)
    kv_dtype: str | None = None  # bf16 | fp16 | fp8; None: the model's dtype
    weight_dtype: str | None = None  # bf16 | fp16 | fp8 | int8 | int4 | mxfp4 per parameter group; None: weight_bits,
    # else the checkpoint's format (model.quantization), else the model's dtype. Not together with weight_bits.
    gpu_memory_utilization: float | None = None  # share of HBM the engine may use; given, it sets reserve_frac = 1 - it
    max_model_len: int | None = None  # longest context the engine admits; None: no cap
    # How the KV cache is laid out and copied (sim/copies.py).
    block_size: int = 16  # tokens per KV block (vLLM 16, SGLang 64); HBM is freed a whole block at a time
    kv_layout: str = "per-layer"  # per-layer (K and V of each layer apart) | cross-layer (a block's layers together)
    copy_method: str = "auto"  # dma | dma-batched | gather-kernel | host-gather | auto (the cheapest); pinned=False
    # uses the pageable path (the paper's prototype)

    def __post_init__(self) -> None:
        RunConfig.__post_init__(self)
        if isinstance(self.hardware, str | Path):
            object.__setattr__(self, "hardware", hardware_spec(self.hardware))
        if not isinstance(self.hardware, HardwareSpec):
            raise check.ConfigError("hardware", f"hardware must be a profile name, a TOML path or a HardwareSpec, "
                                                f"got {type(self.hardware).__name__}")
        check.number("reserve_frac", self.reserve_frac, 0, 1, high_open=True)
        check.number("fixed_compute_ms", self.fixed_compute_ms, 0, low_open=True, optional=True)
        if self.weight_bits is not None:
            check.choice("weight_bits", self.weight_bits, WEIGHT_BITS)
        self._check_deployment()
        self._check_copies()

    def _check_copies(self) -> None:
        check.integer("block_size", self.block_size, 1)
        check.choice("kv_layout", self.kv_layout, KV_LAYOUTS)
        check.choice("copy_method", self.copy_method, COPY_METHOD_CHOICES)
        if self.copy_method != "auto":
            get_copy_method(self.copy_method, self.pinned)  # a pinned mechanism asked for on pageable memory
        # The tiering unit defaults to the block (DESIGN.md §3): an unset page_size (None) takes the block size (the
        # prototype mode: 1); a given page_size, 1 included, is kept and must nest with the block.
        policy = self.policy.for_block_size(self.block_size)
        check_unit_nests(self.block_size, policy.page_size)
        object.__setattr__(self, "policy", policy)

    def _check_deployment(self) -> None:
        for key in ("tp", "ep", "dp"):
            check.integer(key, getattr(self, key), 1)
        if self.kv_dtype is not None:
            check.choice("kv_dtype", self.kv_dtype, KV_DTYPE_BYTES)
        if self.weight_dtype is not None:
            check.choice("weight_dtype", self.weight_dtype, WEIGHT_DTYPE_BITS)
        check.number("gpu_memory_utilization", self.gpu_memory_utilization, 0, 1, low_open=True, optional=True)
        check.integer("max_model_len", self.max_model_len, 2, optional=True)
        if self.max_model_len is not None and self.gen_tokens > self.max_model_len:
            raise check.ConfigError("max_model_len", f"max_model_len {self.max_model_len} is shorter than gen_tokens "
                                                     f"{self.gen_tokens}; accepted: max_model_len >= gen_tokens")
        if self.gpu_memory_utilization is not None:  # vLLM's name for the same budget wins over reserve_frac
            object.__setattr__(self, "reserve_frac", 1.0 - self.gpu_memory_utilization)
        hw = self.hardware
        if self.tp > 1 and (hw.nvlink_gbps is None or hw.nvlink_latency_us is None):
            raise check.ConfigError("tp", f"tp {self.tp} needs NVLink for its all-reduces and {hw.name} has no "
                                          "nvlink_gbps / nvlink_latency_us in its profile; accepted: tp 1, or a profile "
                                          "with both")
        if hw.gpus_per_host is not None and self.tp > hw.gpus_per_host:
            raise check.ConfigError("tp", f"tp must be at most the {hw.gpus_per_host} GPUs of one {hw.name} host "
                                          f"(NVLink does not leave the host), got {self.tp}")
        if self.ep > self.tp and (hw.nvlink_gbps is None or hw.nvlink_latency_us is None
                                  or (hw.gpus_per_host is not None and self.ep > hw.gpus_per_host)):
            raise check.ConfigError("ep", f"ep {self.ep} spans replicas and its all-to-all needs NVLink among GPUs of "
                                          f"one host; {hw.name}'s profile gives no nvlink_gbps / nvlink_latency_us or "
                                          f"fewer GPUs per host; accepted: ep <= tp, or ep within one NVLink host")
        self.share  # noqa: B018 - raises ConfigError naming tp/ep/weight_dtype when the model cannot be sharded so

    @property
    def share(self) -> GPUShare:
        """One GPU's share of the model as deployed: KV per token, weights held and read, FLOPs, all-reduce bytes."""
        return gpu_share(self.model, self.tp, self.ep, self.dp, weight_dtype=self.weight_dtype,
                         weight_bits=self.weight_bits, kv_dtype=self.kv_dtype)

    @property
    def weight_bytes(self) -> float:
        """Bytes of weights one GPU holds, as stored."""
        return self.share.weight_bytes

    def to_dict(self) -> dict:
        """Every input, resolved, for the summary."""
        return {
            "model": self.model.to_dict(), "hardware": self.hardware.to_dict(), "policy": self.policy.to_dict(),
            "trace": str(self.trace) if self.trace else None, "strategy": self.strategy, "depth": self.depth,
            "batch": self.batch, "gen_tokens": self.gen_tokens, "steps": self.decode_steps,
            "cold_start": self.cold_start, "pinned": self.pinned, "seed": self.seed,
            "reserve_frac": self.reserve_frac, "fixed_compute_ms": self.fixed_compute_ms,
            "weight_bits": self.weight_bits, "tp": self.tp, "ep": self.ep, "dp": self.dp, "kv_dtype": self.kv_dtype,
            "weight_dtype": self.weight_dtype, "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_model_len": self.max_model_len,
            "block_size": self.block_size, "kv_layout": self.kv_layout, "copy_method": self.copy_method,
        }


def compressed_factor(policy: PolicyConfig, model: ModelSpec, kv_element_bytes: int | None = None) -> float:
    """Bytes of a compressed token relative to full precision: bits/(8·element bytes) plus one fp16 scale per head.

    `kv_element_bytes` is the bytes of one KV element as stored (GPUShare.kv_element_bytes: 1 for an fp8 KV
    cache); None: the model's dtype.
    """
    element = model.dtype_bytes if kv_element_bytes is None else kv_element_bytes
    return policy.compressed_bits / (8 * element) + 2 / (model.head_dim * element)


