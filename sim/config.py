"""`SimConfig`: every input of one simulation, resolved and checked (extends workload.config.RunConfig)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tiersim import check
from tiersim.policy import PolicyConfig
from tiersim.specs import HardwareSpec, ModelSpec, hardware_spec
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
    weight_bits: int | None = None  # weights stored at 8 or 4 bits (KV stays at the model's dtype); None: model dtype

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

    @property
    def weight_bytes(self) -> float:
        """Bytes of the model's weights as stored."""
        return self.model.weight_bytes if self.weight_bits is None else self.model.weight_bytes_at(self.weight_bits)

    def to_dict(self) -> dict:
        """Every input, resolved, for the summary."""
        return {
            "model": self.model.to_dict(), "hardware": self.hardware.to_dict(), "policy": self.policy.to_dict(),
            "trace": str(self.trace) if self.trace else None, "strategy": self.strategy, "depth": self.depth,
            "batch": self.batch, "gen_tokens": self.gen_tokens, "steps": self.decode_steps,
            "cold_start": self.cold_start, "pinned": self.pinned, "seed": self.seed,
            "reserve_frac": self.reserve_frac, "fixed_compute_ms": self.fixed_compute_ms,
            "weight_bits": self.weight_bits,
        }


def compressed_factor(policy: PolicyConfig, model: ModelSpec) -> float:
    """Bytes of a compressed token relative to full precision: bits/(8·dtype bytes) plus one fp16 scale per head."""
    return policy.compressed_bits / (8 * model.dtype_bytes) + 2 / (model.head_dim * model.dtype_bytes)


