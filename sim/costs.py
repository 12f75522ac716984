"""What each piece of work costs on a given GPU and host: the hardware model of DESIGN.md §3.

Every number comes from the HardwareSpec (a profile with a source per value) and the ModelSpec.
A kernel's time is its roofline, max(bytes / effective HBM bandwidth, FLOPs / effective FLOP rate),
taken per kernel group (the layer's matmuls, then its attention) plus a per-layer launch cost.
A copy costs a per-copy latency plus bytes / link bandwidth. DDR-tier tokens lie scattered in host
memory: from pinned memory the GPU gathers them itself over the link (zero-copy reads of mapped
host memory, so the link is the only limit: the bound max(0, X/B - T) of DESIGN.md §1); from
pageable memory they are first gathered on the host into a new buffer (a memcpy: read + write at
DDR bandwidth), then copied, one after the other: the paper's prototype (index, then `.to(device)`).
Functions are vectorised over decode steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tiersim.specs import HardwareSpec, ModelSpec

GB = 1e9


@dataclass(frozen=True, slots=True)
class CostModel:
    """Time of layer compute, host attention and copies for one model on one machine."""

    model: ModelSpec
    hw: HardwareSpec
    pinned: bool = True
    fixed_compute_ms: float | None = None  # replaces the roofline: total compute per decode step
    weight_bits: int | None = None  # weights quantized to this many bits (int8/int4); None: the model's dtype

    @property
    def weight_bytes_per_param(self) -> float:
        """Bytes per weight as stored (the KV keeps the model's dtype)."""
        return self.model.dtype_bytes if self.weight_bits is None else self.weight_bits / 8

    @property
    def hbm_bytes_per_s(self) -> float:
        """Effective HBM bandwidth in bytes/s."""
        return self.hw.hbm_gbps_effective * GB

    @property
    def flops_per_s(self) -> float:
        """Effective dense bf16 rate in FLOP/s."""
        return self.hw.bf16_tflops_effective * 1e12

    @property
    def launch_s(self) -> float:
        """Fixed cost per layer (kernel launches)."""
        return self.hw.launch_us * 1e-6

    def matmul_s(self, tokens: np.ndarray) -> np.ndarray:
        """One layer's projections and MLP for `tokens` new tokens: weights read once, 2 FLOPs per weight per token."""
        weights = self.model.layer_params * self.weight_bytes_per_param
        flops = 2.0 * self.model.layer_params * np.asarray(tokens, dtype=np.float64)
        return np.maximum(weights / self.hbm_bytes_per_s, flops / self.flops_per_s)

    def qkv_share(self) -> float:
        """Share of a layer's matmul weights in the q, k, v projections (they run before attention)."""
        m = self.model
        qkv = m.hidden * (m.attention_heads + 2 * m.kv_heads) * m.head_dim
        return qkv / m.layer_params

    def attention_s(self, kv_bytes: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """One layer's attention: read `kv_bytes` of KV; QK^T and AV over `pairs` (query, key) pairs."""
        m = self.model
        flops = 4.0 * m.attention_heads * m.head_dim * np.asarray(pairs, dtype=np.float64)
        return np.maximum(np.asarray(kv_bytes, dtype=np.float64) / self.hbm_bytes_per_s, flops / self.flops_per_s)

    def head_s(self, tokens: np.ndarray) -> np.ndarray:
        """The final norm and lm_head over the new tokens."""
        m = self.model
        weights = m.vocab * m.hidden * self.weight_bytes_per_param
        flops = 2.0 * m.vocab * m.hidden * np.asarray(tokens, dtype=np.float64)
        return np.maximum(weights / self.hbm_bytes_per_s, flops / self.flops_per_s) + self.launch_s

    def h2d_s(self, nbytes: np.ndarray | float, copies: int = 1, duplex: bool = False) -> np.ndarray:
        """Host→device copy of `nbytes` in `copies` copies; zero bytes cost nothing."""
        return self._copy_s(nbytes, copies, self.hw.h2d_gbps(self.pinned), duplex)

    def d2h_s(self, nbytes: np.ndarray | float, copies: int = 1, duplex: bool = False) -> np.ndarray:
        """Device→host copy of `nbytes` in `copies` copies; zero bytes cost nothing."""
        return self._copy_s(nbytes, copies, self.hw.d2h_gbps(self.pinned), duplex)

    def _copy_s(self, nbytes, copies: int, gbps: float, duplex: bool) -> np.ndarray:
        nbytes = np.asarray(nbytes, dtype=np.float64)
        bandwidth = gbps * GB * (self.hw.duplex_factor if duplex else 1.0)
        return np.where(nbytes > 0, copies * self.hw.copy_latency_us * 1e-6 + nbytes / bandwidth, 0.0)

    def gather_s(self, nbytes: np.ndarray | float) -> np.ndarray:
        """Host memcpy that gathers scattered DDR-tier tokens into one buffer (read + write at DDR bandwidth)."""
        return 2.0 * np.asarray(nbytes, dtype=np.float64) / (self.hw.ddr_gbps * GB)

    def fetch_s(self, nbytes: np.ndarray | float, copies: int = 1, duplex: bool = False) -> np.ndarray:
        """Bring scattered DDR-tier KV to the GPU: over the link alone (pinned), or host gather then copy (pageable)."""
        copy = self.h2d_s(nbytes, copies, duplex)
        return copy if self.pinned else self.gather_s(nbytes) + copy

    def host_attention_s(self, kv_bytes: np.ndarray) -> np.ndarray:
        """Partial attention on the host over DDR-tier KV: bound by reading it at DDR bandwidth."""
        return np.asarray(kv_bytes, dtype=np.float64) / (self.hw.ddr_gbps * GB)
