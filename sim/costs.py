"""What each piece of work costs on a given GPU and host: the hardware model of DESIGN.md §3.

Every number comes from the HardwareSpec (a profile with a source per value) and the ModelSpec.
A kernel's time is its roofline, max(bytes / effective HBM bandwidth, FLOPs / effective FLOP rate),
taken per kernel group (the layer's matmuls, then its attention) plus a per-layer launch cost; sizes
are one GPU's share of the deployment (sim/shard.py: TP-split heads and weights, experts touched at
this batch, MLA attention in the absorbed form), and under TP each layer adds its two all-reduces
over NVLink; with expert parallelism across replicas each MoE layer adds its all-to-all (dispatch and
combine). fp8 weights run their matmuls W8A8 at the profile's `fp8_tflops_effective` (the bf16 rate
where the GPU has no FP8 tensor cores). Optional profile fields refine the roofline where measured:
`attention_efficiency` (share of the roofline attention kernels reach; 1.0 when absent), `step_overhead_us` (sampling and
scheduling per decode step; 0 when absent) and `roofline_overlap` (share o of the shorter of a kernel's
memory and FLOP times hidden under the longer: max + (1 - o) x min; 1, the plain max, when absent; a CPU
core streaming weights while it multiplies hides only part); `matmul_fixed_us` (cost per GEMM call beyond its
bytes and FLOPs, times the calls the replay's layer makes: fused qkv, o, fused gate/up, down, plus two per
routed expert a step reaches; one for the lm_head; 0 when absent); `copy_engine_slowdown` (share by which a
layer's compute slows beside a concurrent copy engine, its hand-offs and wake-ups: charged to strategies that stage
every layer on a copy stream; 0 when absent).
A copy moves pieces of DDR-tier KV by a mechanism (sim/copies.py: dma, dma-batched, gather-kernel,
host-gather, pageable), each with its per-call, per-piece and bandwidth terms; without one it costs a
per-copy latency plus bytes / link bandwidth (the link-rate bound). The host's work (gathers, host
attention) runs at this GPU's share of host DDR bandwidth and cores: sockets x per-socket bandwidth
/ GPUs per host, every GPU of the host offloading at once (profile topology; else `ddr_gbps`).
Functions are vectorised over decode steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tiersim.sim.copies import CopyCost, CopyMethod
from tiersim.sim.shard import GPUShare, gpu_share
from tiersim.specs import HardwareSpec, ModelSpec

GB = 1e9


def _profile_value(hw: HardwareSpec, key: str, default: float) -> float:
    """An optional profile field (absent or None: `default`, which leaves the roofline as it is)."""
    value = getattr(hw, key, None)
    return default if value is None else float(value)


@dataclass(frozen=True, slots=True)
class CostModel:
    """Time of layer compute, host attention and copies for one model on one machine."""

    model: ModelSpec
    hw: HardwareSpec
    pinned: bool = True
    fixed_compute_ms: float | None = None  # replaces the roofline: total compute per decode step
    weight_bits: int | None = None  # weights quantized to this many bits (int8/int4); None: the model's dtype
    share: GPUShare | None = None  # one GPU's share of the deployment; None: the whole model on one GPU
    copy: CopyMethod | None = None  # how DDR-tier pieces cross the link (sim/copies.py); None: the link-rate bound

    def __post_init__(self) -> None:
        if self.share is None:
            object.__setattr__(self, "share", gpu_share(self.model, weight_bits=self.weight_bits))

    @property
    def weight_bytes_per_param(self) -> float:
        """Bytes per weight as stored with a uniform precision (weight_bits, else the model's dtype)."""
        return self.model.dtype_bytes if self.weight_bits is None else self.weight_bits / 8

    @property
    def attention_efficiency(self) -> float:
        """Share of the roofline the attention kernels reach (profile `attention_efficiency`; 1.0 when absent)."""
        return _profile_value(self.hw, "attention_efficiency", 1.0)

    @property
    def step_overhead_s(self) -> float:
        """Fixed cost per decode step outside the layers: sampling, scheduling (profile `step_overhead_us`)."""
        return _profile_value(self.hw, "step_overhead_us", 0.0) * 1e-6

    @property
    def copy_engine_slowdown(self) -> float:
        """Share by which a layer's compute slows beside a concurrent per-layer copy engine (profile
        `copy_engine_slowdown`; 0 when absent)."""
        return _profile_value(self.hw, "copy_engine_slowdown", 0.0)

    @property
    def roofline_overlap(self) -> float:
        """Share of the shorter of memory and FLOP time hidden under the longer (profile `roofline_overlap`; 1.0)."""
        return _profile_value(self.hw, "roofline_overlap", 1.0)

    @property
    def matmul_fixed_s(self) -> float:
        """Fixed cost per GEMM call beyond its bytes and FLOPs (profile `matmul_fixed_us`; 0 when absent)."""
        return _profile_value(self.hw, "matmul_fixed_us", 0.0) * 1e-6

    def matmul_calls(self, tokens: np.ndarray) -> np.ndarray:
        """GEMM calls of the mean layer for a step over `tokens` new tokens, as the replay's layer makes them
        (hw/kernels.py: qkv fused, o, gate/up fused, down); a MoE layer: qkv and o, and gate/up and down of each
        routed expert the step reaches on this GPU (expected count; shared experts count as a dense MLP)."""
        tokens = np.asarray(tokens, dtype=np.float64)
        share = self.share
        if not share.experts or not share.moe_layers:
            return np.full_like(tokens, 4.0)
        moe = 2.0 + 2.0 * share.experts / share.ep * share.expert_read_share(tokens)
        if self.model.moe is not None and self.model.moe.shared_experts:
            moe = moe + 2.0
        frac = share.moe_layers / share.layers
        return (1.0 - frac) * 4.0 + frac * moe

    def roofline(self, memory_s: np.ndarray, flops_s: np.ndarray) -> np.ndarray:
        """A kernel's time from its memory and FLOP times: the longer, plus the part of the shorter not hidden."""
        longer = np.maximum(memory_s, flops_s)
        overlap = self.roofline_overlap
        return longer if overlap == 1.0 else longer + (1.0 - overlap) * np.minimum(memory_s, flops_s)

    @property
    def hbm_bytes_per_s(self) -> float:
        """Effective HBM bandwidth in bytes/s."""
        return self.hw.hbm_gbps_effective * GB

    @property
    def flops_per_s(self) -> float:
        """Effective dense bf16 rate in FLOP/s."""
        return self.hw.bf16_tflops_effective * 1e12

    @property
    def fp8_flops_per_s(self) -> float:
        """Effective dense fp8 rate in FLOP/s (profile `fp8_tflops_effective`); the bf16 rate on a GPU without FP8
        tensor cores, where fp8 weights run weight-only (vLLM's FP8 Marlin)."""
        return _profile_value(self.hw, "fp8_tflops_effective", self.hw.bf16_tflops_effective) * 1e12

    @property
    def launch_s(self) -> float:
        """Fixed cost per layer (kernel launches)."""
        return self.hw.launch_us * 1e-6

    def matmul_s(self, tokens: np.ndarray) -> np.ndarray:
        """One layer's projections, MLP or experts for `tokens` new tokens on one GPU: the weights the step touches
        read once (MoE: the experts its tokens reach), 2 FLOPs per active weight per token."""
        tokens = np.asarray(tokens, dtype=np.float64)
        weights = self.share.layer_weight_bytes(tokens)
        fp8 = self.share.layer_fp8_flops_per_token * tokens  # W8A8 matmuls (fp8 weights), at the fp8 rate
        flops_s = (self.share.layer_flops_per_token * tokens - fp8) / self.flops_per_s + fp8 / self.fp8_flops_per_s
        roofline = self.roofline(weights / self.hbm_bytes_per_s, flops_s)
        fixed = self.matmul_fixed_s
        return roofline if fixed == 0.0 else roofline + fixed * self.matmul_calls(tokens)

    def allreduce_s(self, tokens: np.ndarray) -> np.ndarray:
        """One layer's two TP all-reduces over NVLink (ring: 2(tp-1)/tp of the bytes per GPU, plus a fixed cost
        each); zero at tp 1."""
        tp = self.share.tp
        tokens = np.asarray(tokens, dtype=np.float64)
        if tp == 1:
            return np.zeros_like(tokens)
        nbytes = self.share.allreduce_bytes_per_token_layer * tokens
        return 2 * self.hw.nvlink_latency_us * 1e-6 + 2 * (tp - 1) / tp * nbytes / (self.hw.nvlink_gbps * GB)

    def alltoall_s(self, tokens: np.ndarray) -> np.ndarray:
        """The mean layer's share of the EP all-to-all over NVLink for `tokens` new tokens of this replica: per MoE
        layer a dispatch and a combine (a fixed cost each, plus this GPU's bytes at the one-way NVLink rate); zero
        when the expert group does not span replicas (specs/deployment.py)."""
        tokens = np.asarray(tokens, dtype=np.float64)
        g = self.share
        if g.alltoall_bytes_per_token_moe_layer == 0:
            return np.zeros_like(tokens)
        moe_layer_s = 2 * self.hw.nvlink_latency_us * 1e-6 \
            + g.alltoall_bytes_per_token_moe_layer * tokens / (self.hw.nvlink_gbps * GB)
        return moe_layer_s * g.moe_layers / g.layers

    def qkv_share(self) -> float:
        """Share of a layer's matmul work in the projections that run before attention (q, k, v; MLA: the query
        and latent down-projections, q_b and the absorbed key up-projection)."""
        m = self.model
        active = (m.active_params - m.param_breakdown["embeddings"] - m.hidden) / m.layers
        if m.mla is None:
            return m.hidden * (m.attention_heads + 2 * m.kv_heads) * m.head_dim / active
        a = m.mla
        before = m.hidden * ((a.q_lora_rank or 0) + a.latent_width) + (a.q_lora_rank or m.hidden) * m.attention_heads \
            * m.head_dim + m.attention_heads * a.qk_nope_head_dim * a.kv_lora_rank
        return before / active

    def attention_s(self, kv_bytes: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """One layer's attention on one GPU: read `kv_bytes` of KV; QK^T and AV over `pairs` (query, key) pairs for
        this GPU's heads (MLA in the absorbed form); at the profile's attention efficiency."""
        flops = self.model.attention_flops_per_pair * np.asarray(pairs, dtype=np.float64) / self.share.tp
        roofline = self.roofline(np.asarray(kv_bytes, dtype=np.float64) / self.hbm_bytes_per_s, flops / self.flops_per_s)
        return roofline / self.attention_efficiency

    def head_s(self, tokens: np.ndarray) -> np.ndarray:
        """The final norm and lm_head (this GPU's vocabulary slice) over the new tokens, and the per-step overhead."""
        weights = self.share.head_weight_bytes
        flops = self.share.head_flops_per_token * np.asarray(tokens, dtype=np.float64)
        return self.roofline(weights / self.hbm_bytes_per_s, flops / self.flops_per_s) + self.launch_s \
            + self.step_overhead_s + self.matmul_fixed_s

    @property
    def host_gbps(self) -> float:
        """This GPU's share of host DDR bandwidth, all GPUs of the host offloading (profile topology, else ddr_gbps)."""
        return self.hw.host_ddr_gbps_per_gpu()[0]

    def h2d_s(self, nbytes: np.ndarray | float, pieces=1, duplex: bool = False, calls=None) -> np.ndarray:
        """Host→device copy of `nbytes` in `pieces` pieces (`calls` API calls; default one per piece); 0 bytes: 0."""
        return self._copy_s(nbytes, pieces, calls, self.hw.h2d_gbps(self.pinned), duplex)

    def d2h_s(self, nbytes: np.ndarray | float, pieces=1, duplex: bool = False, calls=None) -> np.ndarray:
        """Device→host copy of `nbytes` in `pieces` pieces (`calls` API calls; default one per piece); 0 bytes: 0."""
        return self._copy_s(nbytes, pieces, calls, self.hw.d2h_gbps(self.pinned), duplex)

    def _copy_s(self, nbytes, pieces, calls, gbps: float, duplex: bool) -> np.ndarray:
        gbps *= self.hw.duplex_factor if duplex else 1.0
        if self.copy is None:  # no mechanism: one call per piece at the link rate (the link-rate bound)
            nbytes = np.asarray(nbytes, dtype=np.float64)
            return np.where(nbytes > 0, np.asarray(pieces) * self.hw.copy_latency_us * 1e-6 + nbytes / (gbps * GB),
                            0.0)
        copy = CopyCost(self.copy, self.hw, self.host_gbps)
        return copy.seconds(nbytes, pieces, pieces if calls is None else calls, gbps)

    def gather_s(self, nbytes: np.ndarray | float) -> np.ndarray:
        """Host memcpy that gathers scattered DDR-tier tokens into one buffer (read + write at this GPU's DDR share)."""
        return 2.0 * np.asarray(nbytes, dtype=np.float64) / (self.host_gbps * GB)

    def fetch_s(self, nbytes: np.ndarray | float, pieces=1, duplex: bool = False, calls=None) -> np.ndarray:
        """Bring scattered DDR-tier KV to the GPU by the cost model's mechanism (pageable without one: gather + copy)."""
        copy = self.h2d_s(nbytes, pieces, duplex, calls)
        return self.gather_s(nbytes) + copy if self.copy is None and not self.pinned else copy

    def host_attention_s(self, kv_bytes: np.ndarray, pairs=0.0) -> np.ndarray:
        """One layer's partial attention on the host over DDR-tier KV, per step (0 where there is none).

        max(bytes / this GPU's DDR share, FLOPs / (its cores x host_core_gflops)) + one round trip
        (host_roundtrip_us); the FLOP term needs cores_per_socket and host_core_gflops in the profile.
        """
        kv_bytes = np.asarray(kv_bytes, dtype=np.float64)
        t = kv_bytes / (self.host_gbps * GB)
        cores = self.hw.host_cores_per_gpu()
        if cores is not None and self.hw.host_core_gflops is not None:
            flops = self.model.attention_flops_per_pair * np.asarray(pairs, dtype=np.float64) / self.share.tp
            t = np.maximum(t, flops / (cores * self.hw.host_core_gflops * 1e9))
        return np.where(kv_bytes > 0, t + (self.hw.host_roundtrip_us or 0.0) * 1e-6, 0.0)
