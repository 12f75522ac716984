"""How DDR-tier KV crosses the host link: the pieces a KV layout makes, and what a copy costs by each mechanism.

The mechanisms' names and records (what each implies) live in tiersim/copy_methods.py, shared with
the replay; they are re-exported here.

A copy moves *pieces*: contiguous runs of host memory whose size follows from the KV layout
(DESIGN.md §3). Blocks of `block_size` tokens are token-major, so a run of DDR-tier tokens inside
one block is contiguous; runs never span blocks (host blocks come from a pool, not in order).

- `per-layer` layout (vLLM's paged cache): each layer keeps K and V apart, so one run is one piece
  per layer for K and one for V (MLA: one latent piece per layer).
- `cross-layer` layout (vLLM's newer offloading connector): a block holds every layer's K and V
  contiguously, [layers, K/V, block_size, heads, head_dim]. A whole block is one piece when every
  layer is fetched at once, and one piece per layer (its K and V adjacent) when fetched per layer;
  a partial run is still one piece per layer and K/V.

Cost of a copy of `pieces` pieces totalling `nbytes` bytes, issued as `calls` API calls, over a
link of `link` B/s (DESIGN.md §4 for the numbers):

- `dma`:           pieces x copy_latency + sum_i s_i / bw(s_i), bw(s) = link x s / (s + s_half),
                   i.e. pieces x (copy_latency + s_half / link) + nbytes / link (exact for any mix of sizes);
- `dma-batched`:   calls x copy_latency + pieces x descriptor + nbytes / link;
- `gather-kernel`: calls x launch + nbytes / (link_frac x link), taking sm_share of the SMs while it runs;
- `host-gather`:   the CPU packs the pieces (read + write: 2 x nbytes at this GPU's share of DDR
                   bandwidth) into pinned chunks of `chunk` bytes, each DMA'd as it fills: a two-stage
                   pipeline over n chunks, max(G, D) + min(G, D) / n, with D = n x copy_latency +
                   (nbytes + n x s_half) / link;
- `pageable`:      the paper's prototype (`pinned=False`): gather into a new tensor, then a staged
                   pageable copy per call, one after the other: 2 x nbytes / ddr + calls x copy_latency +
                   nbytes / pageable link. It runs on the compute stream, so it serialises with compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tiersim.copy_methods import COPY_METHOD_CHOICES, COPY_METHODS, KV_LAYOUTS, PINNED_METHODS, CopyMethod, get_copy_method
from tiersim.errors import ConfigError
from tiersim.specs import HardwareSpec

__all__ = ["COPY_METHODS", "COPY_METHOD_CHOICES", "KV_LAYOUTS", "PINNED_METHODS", "CopyCost", "CopyMethod", "KVLayout",
           "available_methods", "check_profile", "get_copy_method", "mean_piece_bytes"]


def check_profile(method: CopyMethod, hw: HardwareSpec) -> None:
    """A clear error naming the profile field a mechanism needs and the profile lacks."""
    for key in method.profile_fields:
        if getattr(hw, key) is None:
            raise ConfigError("copy_method", f"copy_method {method.name!r} needs the hardware profile field "
                                             f"'{key}', which {hw.path or hw.name} does not give; add it (with a "
                                             f"source) or choose another copy_method")


def available_methods(hw: HardwareSpec) -> tuple[CopyMethod, ...]:
    """The pinned mechanisms whose constants this profile gives (what `auto` chooses among)."""
    return tuple(COPY_METHODS[n] for n in PINNED_METHODS
                 if all(getattr(hw, k) is not None for k in COPY_METHODS[n].profile_fields))


# -- the layout: how many pieces a set of DDR-tier runs makes ------------------------------------
@dataclass(frozen=True, slots=True)
class KVLayout:
    """Where a block's bytes lie in host memory: per layer K and V apart, or every layer of a block together."""

    name: str
    block_size: int
    layers: int
    split_kv: bool  # K and V are separate tensors (False for MLA's one latent)

    def __post_init__(self) -> None:
        if self.name not in KV_LAYOUTS:
            raise ConfigError("kv_layout", f"kv_layout {self.name!r} unknown; accepted: {', '.join(KV_LAYOUTS)}")

    @property
    def parts(self) -> int:
        """Separate tensors per layer: K and V, or one latent."""
        return 2 if self.split_kv else 1

    def pieces(self, runs, full_blocks, all_layers: bool) -> np.ndarray:
        """Pieces of one copy of these runs: of one layer, or (`all_layers`) of every layer at once.

        `runs` are maximal runs of tokens inside one block; `full_blocks` of them are whole blocks.
        """
        runs = np.asarray(runs, dtype=np.float64)
        full = np.asarray(full_blocks, dtype=np.float64)
        layers = self.layers if all_layers else 1
        if self.name == "per-layer":
            return layers * self.parts * runs
        whole = full if all_layers else layers * full  # a whole block: all layers in one piece, or one per layer
        return whole + layers * self.parts * (runs - full)


# -- the cost of one copy ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CopyCost:
    """The time of copies by one mechanism over one link direction, vectorised over steps."""

    method: CopyMethod
    hw: HardwareSpec
    host_gbps: float  # this GPU's share of host DDR bandwidth (GB/s)

    def __post_init__(self) -> None:
        check_profile(self.method, self.hw)

    def seconds(self, nbytes, pieces, calls, link_gbps: float) -> np.ndarray:
        """Time of copies moving `nbytes` in `pieces` pieces issued as `calls` calls at `link_gbps`; zero bytes: 0."""
        b = np.asarray(nbytes, dtype=np.float64)
        n = np.asarray(pieces, dtype=np.float64)
        c = np.asarray(calls, dtype=np.float64)
        hw, link = self.hw, link_gbps * 1e9
        latency = hw.copy_latency_us * 1e-6
        name = self.method.name
        if name == "dma":
            t = n * (latency + hw.dma_half_size_kb * 1024 / link) + b / link
        elif name == "dma-batched":
            t = c * latency + n * hw.dma_batch_descriptor_us * 1e-6 + b / link
        elif name == "gather-kernel":
            t = c * hw.launch_us * 1e-6 + b / (hw.gather_kernel_link_frac * link)
        elif name == "host-gather":
            chunks = np.maximum(1.0, np.ceil(b / (hw.host_gather_chunk_mb * 2**20)))
            gather = 2.0 * b / (self.host_gbps * 1e9)
            dma = chunks * latency + (b + chunks * hw.dma_half_size_kb * 1024) / link
            t = np.maximum(gather, dma) + np.minimum(gather, dma) / chunks
        else:  # pageable
            t = 2.0 * b / (self.host_gbps * 1e9) + c * latency + b / link
        return np.where(b > 0, t, 0.0)

    def sm_share(self) -> float:
        """Share of the SMs this mechanism takes from concurrent compute while it copies."""
        return self.hw.gather_kernel_sm_share if self.method.uses_sms else 0.0


def mean_piece_bytes(nbytes, pieces) -> float:
    """Bytes per piece over a run (0 when nothing moved)."""
    total = float(np.sum(pieces))
    return float(np.sum(nbytes)) / total if total else 0.0

