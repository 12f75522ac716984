"""HBM and DDR occupancy per step for one strategy, and the largest batch that fits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tiersim.sim.config import SimConfig, compressed_factor
from tiersim.sim.costs import GB
from tiersim.sim.engine import Timeline
from tiersim.strategy import Strategy, get_strategy
from tiersim.workload.build import Workload


@dataclass(frozen=True, slots=True)
class Memory:
    """HBM and DDR bytes per step for one strategy."""

    fixed_bytes: float  # weights + reserve
    hbm_bytes: np.ndarray  # everything on the GPU, fixed part included
    ddr_bytes: np.ndarray
    staging_bytes: np.ndarray
    inflight_bytes: np.ndarray  # demoted KV still in HBM because its D2H copy has not finished


def account_memory(strategy: str | Strategy, w: Workload, cfg: SimConfig, tl: Timeline, layer_bytes: np.ndarray,
                   demoted_bytes: np.ndarray) -> Memory:
    """HBM and DDR occupancy per step: weights, reserve, resident KV, staging buffers, demotions in flight."""
    s = get_strategy(strategy)
    m, c = cfg.model, w.column
    fixed = cfg.weight_bytes + cfg.reserve_frac * cfg.hardware.hbm_gb * GB
    kvt = m.kv_bytes_per_token
    zeros = np.zeros(len(w.totals))
    if not s.applies_policy:
        return Memory(fixed, fixed + c("tokens") * kvt, zeros, zeros, zeros)
    resident = (c("hbm") + compressed_factor(cfg.policy, m) * c("compressed")) * kvt
    if s.prefetches:
        staging = s.staging_buffers(cfg.depth, m.layers) * layer_bytes
    elif s.host_attends:  # each slot's query goes out and its partial output and log-sum-exp come back
        staging = c("decode") * m.attention_heads * (m.head_dim * m.dtype_bytes + (m.head_dim + 1) * 4)
    else:
        staging = zeros
    inflight = np.zeros(len(zeros) + 1)
    for j in np.flatnonzero(demoted_bytes > 0):
        # Issued at the end of step j; still resident at the start of each later step it has not finished by.
        last = int(np.searchsorted(tl.start_s, tl.d2h_done_s[j], side="left"))
        inflight[j + 1: max(j + 1, last)] += demoted_bytes[j]
    inflight = inflight[:-1]
    ddr = c("ddr") * kvt if s.keeps_ddr else zeros
    return Memory(fixed, fixed + resident + staging + inflight, ddr, staging, inflight)


def max_batch(memory: Memory, batch: int, capacity_bytes: float) -> int:
    """Largest batch whose peak fits, scaling this run's per-slot peak share (KV, staging, in-flight)."""
    room = capacity_bytes - memory.fixed_bytes
    per_slot = (memory.hbm_bytes.max() - memory.fixed_bytes) / batch
    if room <= 0:
        return 0
    return int(room // per_slot) if per_slot > 0 else batch


