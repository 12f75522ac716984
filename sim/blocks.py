"""KV blocks: how many each sequence holds in HBM and in host DDR, and whether the next step fits.

Modelled on nano-vllm's `BlockManager` and vLLM's block pool: the KV cache lives in blocks of
`block_size` tokens; a sequence with T cached tokens holds ceil(T / block_size) blocks. Prefix
caching is not modelled, so a block is only ever counted, never named: the manager keeps per
sequence the blocks it holds in each pool and the pool totals, which is all admission needs.

Two pools. `full` keeps every token in HBM, so it admits by HBM blocks alone. A tiered strategy
keeps a sequence's HBM tier in HBM blocks and its DDR tier in host blocks, and a prefetching one
also needs HBM staging buffers that grow with the batch's DDR tier (DESIGN.md §3: `depth + 1`
per-layer buffers for prefetch-layer, one per layer for prefetch-sync), so a step fits when
HBM blocks + staging blocks <= HBM capacity and DDR blocks <= DDR capacity. Swapped-out
sequences (vLLM v0's swap preemption) hold host blocks in the same DDR pool.

Sizes are one GPU's share of the deployment (sim/shard.GPUShare): a block holds `block_size` tokens
of every full-attention layer (TP-split heads, the KV dtype as stored); a model with sliding-window
layers also keeps, per sequence, min(HBM tokens, window) tokens of those layers in HBM (vLLM's
hybrid allocator gives them blocks of the same pool), counted in blocks by `hbm_blocks`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tiersim import check
from tiersim.errors import ConfigError
from tiersim.sim.shard import GPUShare, gpu_share
from tiersim.specs import HardwareSpec, ModelSpec
from tiersim.strategy import Strategy, get_strategy

GB = 1e9


@dataclass(frozen=True, slots=True)
class KVCapacity:
    """The KV pools of one GPU: blocks of HBM and of host DDR, and the HBM staging a DDR-tier token costs."""

    block_size: int  # tokens per block (vLLM 16, SGLang 64)
    hbm_blocks: int
    ddr_blocks: int = 0
    staging_per_ddr_token: float = 0.0  # HBM tokens of staging per DDR-tier token of the running batch
    block_bytes: float = 0.0  # bytes of one block over the full-attention layers (for occupancy in bytes)
    window: int = 0  # tokens a sliding-window layer keeps (0: no sliding layers)
    window_bytes_per_token: float = 0.0  # bytes one token takes in every sliding-window layer

    def __post_init__(self) -> None:
        check.integer("block_size", self.block_size, 1)
        check.integer("hbm_blocks", self.hbm_blocks, 0)
        check.integer("ddr_blocks", self.ddr_blocks, 0)
        check.number("staging_per_ddr_token", self.staging_per_ddr_token, 0)
        check.number("block_bytes", self.block_bytes, 0)
        check.integer("window", self.window, 0)
        check.number("window_bytes_per_token", self.window_bytes_per_token, 0)


def kv_capacity(model: ModelSpec, hardware: HardwareSpec, strategy: str | Strategy = "full", *, block_size: int = 16,
                weight_bytes: float | None = None, reserve_frac: float = 0.10, depth: int = 2,
                ddr_gb: float | None = None, share: GPUShare | None = None) -> KVCapacity:
    """KV blocks left on one GPU after weights and the reserve (vLLM's gpu_memory_utilization 0.9), and host blocks.

    `share` is this GPU's share of the deployment (SimConfig.share: TP, EP, KV and weight dtypes); None:
    the whole model on one GPU at its own dtype. `weight_bytes` overrides the weights it holds (default:
    the share's; without a share, model.weight_bytes). `ddr_gb` is the host memory this GPU may use for
    the DDR tier or swapped KV (default: the profile's whole `ddr_gb`; a DGX shares it between 8 GPUs,
    so pass the per-GPU share there).
    """
    s = get_strategy(strategy)
    check.integer("block_size", block_size, 1)
    check.number("reserve_frac", reserve_frac, 0, 1, high_open=True)
    if weight_bytes is None:
        weight_bytes = model.weight_bytes if share is None else share.weight_bytes
    g = gpu_share(model) if share is None else share
    block_bytes = float(block_size * g.kv_bytes_per_token_global)
    window = g.sliding_window or 0
    room = hardware.hbm_gb * GB * (1.0 - reserve_frac) - weight_bytes
    if room < block_bytes + window * g.kv_bytes_per_token_sliding:
        raise ConfigError("hardware", f"{model.name} does not leave one KV block on {hardware.name}: "
                                      f"{weight_bytes / GB:.1f} GB of weights, "
                                      f"{hardware.hbm_gb * (1 - reserve_frac):.1f} GB usable")
    ddr = hardware.ddr_gb if ddr_gb is None else ddr_gb
    check.number("ddr_gb", ddr, 0)
    # A staging buffer holds one full-attention layer's copy: per DDR-tier token, buffers x one layer's bytes,
    # in tokens of a block (every full-attention layer).
    staging = s.staging_buffers(depth, g.full_layers) / g.full_layers
    return KVCapacity(block_size, int(room // block_bytes), int(ddr * GB // block_bytes), staging, block_bytes,
                      window, float(g.kv_bytes_per_token_sliding))


class BlockManager:
    """Blocks held per sequence in HBM and DDR, and the pool totals; admission asks `fits`/`can_allocate`."""

    def __init__(self, capacity: KVCapacity, n_seqs: int) -> None:
        self.capacity = capacity
        self.block_size = capacity.block_size
        self.hbm = np.zeros(n_seqs, dtype=np.int64)  # HBM blocks per sequence
        self.ddr = np.zeros(n_seqs, dtype=np.int64)  # DDR blocks per sequence (DDR tier or swapped out)
        self.ddr_tokens = np.zeros(n_seqs, dtype=np.int64)  # DDR-tier tokens (they need staging when attended)
        self.hbm_used = self.ddr_used = self.ddr_tokens_used = 0

    def blocks(self, tokens):
        """Blocks that `tokens` tokens occupy (ceil division; vectorised)."""
        return -(-np.asarray(tokens, dtype=np.int64) // self.block_size)

    def hbm_blocks(self, tokens):
        """HBM blocks a sequence with `tokens` HBM-tier tokens holds: its full-attention blocks, plus its
        sliding-window layers' min(tokens, window) tokens in blocks of the same pool (vectorised)."""
        blocks = self.blocks(tokens)
        cap = self.capacity
        if not cap.window or not cap.block_bytes:
            return blocks
        held = np.minimum(np.asarray(tokens, dtype=np.int64), cap.window) * cap.window_bytes_per_token
        return blocks + np.ceil(held / cap.block_bytes).astype(np.int64)

    def staging_blocks(self, ddr_tokens: float) -> int:
        """HBM blocks of staging buffers for a batch whose DDR tier holds `ddr_tokens` tokens."""
        return math.ceil(ddr_tokens * self.capacity.staging_per_ddr_token / self.block_size)

    def fits(self, hbm_blocks: int, ddr_blocks: int = 0, ddr_tokens: int = 0) -> bool:
        """Pool totals that fit: HBM blocks plus staging within HBM, DDR blocks within DDR."""
        return (hbm_blocks + self.staging_blocks(ddr_tokens) <= self.capacity.hbm_blocks
                and ddr_blocks <= self.capacity.ddr_blocks)

    def can_allocate(self, seq: int, hbm_tokens: int, ddr_tokens: int = 0) -> bool:
        """Whether sequence `seq` can hold `hbm_tokens` in HBM and `ddr_tokens` in DDR beside everything else."""
        return self.fits(self.hbm_used - int(self.hbm[seq]) + int(self.hbm_blocks(hbm_tokens)),
                         self.ddr_used - int(self.ddr[seq]) + int(self.blocks(ddr_tokens)),
                         self.ddr_tokens_used - int(self.ddr_tokens[seq]) + ddr_tokens)

    def hbm_bytes(self) -> float:
        """HBM held now: KV blocks plus the staging buffers of the DDR tier, in bytes."""
        return (self.hbm_used + self.staging_blocks(self.ddr_tokens_used)) * self.capacity.block_bytes

    def ddr_bytes(self) -> float:
        """Host memory held now by DDR-tier and swapped-out KV, in bytes."""
        return self.ddr_used * self.capacity.block_bytes

    def allocate(self, seqs, hbm_tokens, ddr_tokens=0) -> None:
        """Let `seqs` hold blocks for these token counts (grow, shrink or first allocate; vectorised)."""
        hbm, ddr = self.hbm_blocks(hbm_tokens), self.blocks(ddr_tokens)
        ddr_tokens = np.asarray(ddr_tokens, dtype=np.int64)
        self.hbm_used += int((hbm - self.hbm[seqs]).sum())
        self.ddr_used += int((ddr - self.ddr[seqs]).sum())
        self.ddr_tokens_used += int((ddr_tokens - self.ddr_tokens[seqs]).sum())
        self.hbm[seqs], self.ddr[seqs], self.ddr_tokens[seqs] = hbm, ddr, ddr_tokens

    def free(self, seqs) -> None:
        """Release every block of `seqs` in both pools."""
        self.allocate(seqs, 0, 0)

    def can_swap_out(self, seq: int) -> bool:
        """Whether the host pool has room for the HBM blocks of `seq`."""
        return self.ddr_used + int(self.hbm[seq]) <= self.capacity.ddr_blocks

    def swap_out(self, seq: int) -> None:
        """Move the HBM blocks of `seq` to host blocks (its DDR tier stays where it is, and needs no staging)."""
        self.ddr_tokens_used -= int(self.ddr_tokens[seq])
        self.ddr_tokens[seq] = 0
        self.ddr[seq] += self.hbm[seq]
        self.ddr_used += int(self.hbm[seq])
        self.hbm_used -= int(self.hbm[seq])
        self.hbm[seq] = 0
