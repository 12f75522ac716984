"""HBM and DDR occupancy per step for one strategy, and the largest batch that fits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tiersim.sim.config import SimConfig, compressed_factor
from tiersim.sim.costs import GB
from tiersim.sim.engine import Timeline
from tiersim.sim.shard import window_demand
from tiersim.strategy import Strategy, get_strategy
from tiersim.workload.build import BCOL, Workload, block_totals


@dataclass(frozen=True, slots=True)
class Memory:
    """HBM and DDR bytes per step for one strategy."""

    fixed_bytes: float  # weights + reserve
    hbm_bytes: np.ndarray  # everything on the GPU, fixed part included
    ddr_bytes: np.ndarray
    staging_bytes: np.ndarray
    inflight_bytes: np.ndarray  # demoted KV still in HBM because its D2H copy has not finished
    kept_bytes: np.ndarray  # HBM had only eviction freed blocks (every block with a token not evicted held)


def account_memory(strategy: str | Strategy, w: Workload, cfg: SimConfig, tl: Timeline, layer_bytes: np.ndarray,
                   demoted_bytes: np.ndarray, blocks: np.ndarray | None = None) -> Memory:
    """HBM and DDR occupancy per step: weights, reserve, resident KV blocks, staging buffers, demotions in flight.

    KV lives in blocks of cfg.block_size tokens and a block frees HBM only once none of its tokens is in
    HBM (`blocks`: workload.build.block_totals, computed when not given). The compressed tier and the
    DDR tier are counted per token (packed stores); demotions in flight per token too.
    """
    s = get_strategy(strategy)
    if blocks is None:
        blocks = block_totals(w, cfg.block_size)
    m, c, g = cfg.model, w.column, cfg.share
    fixed = cfg.weight_bytes + cfg.reserve_frac * cfg.hardware.hbm_gb * GB  # one GPU's weights and reserve
    kvt = g.kv_bytes_per_token_global  # per GPU; only full-attention layers grow and are tiered
    window = window_demand(w, g.sliding_window).resident_tokens * g.kv_bytes_per_token_sliding  # never tiered
    zeros = np.zeros(len(w.totals))
    held = lambda name: blocks[:, BCOL[name]] * cfg.block_size * kvt  # noqa: E731 - bytes of the blocks held
    if not s.applies_policy:
        full = fixed + held("blocks") + window
        return Memory(fixed, full, zeros, zeros, zeros, full)
    resident = held("hbm_blocks") + compressed_factor(cfg.policy, m, g.kv_element_bytes) * c("compressed") * kvt + window
    if s.prefetches:  # a staging buffer holds one full-attention layer's copy
        staging = s.staging_buffers(cfg.depth, g.full_layers) * layer_bytes / g.full_share
    elif s.host_attends:  # each slot's query goes out and its partial output and log-sum-exp come back
        staging = c("decode") * g.attention_heads * (g.query_width * m.dtype_bytes + (g.value_width + 1) * 4)
    else:
        staging = zeros
    inflight = np.zeros(len(zeros) + 1)
    for j in np.flatnonzero(demoted_bytes > 0):
        # Issued at the end of step j; still resident at the start of each later step it has not finished by.
        last = int(np.searchsorted(tl.start_s, tl.d2h_done_s[j], side="left"))
        inflight[j + 1: max(j + 1, last)] += demoted_bytes[j]
    inflight = inflight[:-1]
    ddr = c("ddr") * kvt if s.keeps_ddr else zeros
    return Memory(fixed, fixed + resident + staging + inflight, ddr, staging, inflight,
                  fixed + held("kept_blocks") + window)


def max_batch(memory: Memory, batch: int, capacity_bytes: float) -> int:
    """Largest batch whose peak fits, scaling this run's per-slot peak share (KV, staging, in-flight)."""
    room = capacity_bytes - memory.fixed_bytes
    per_slot = (memory.hbm_bytes.max() - memory.fixed_bytes) / batch
    if room <= 0:
        return 0
    return int(room // per_slot) if per_slot > 0 else batch


