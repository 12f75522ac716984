"""The copy mechanisms by name and what each implies: one table for the simulator (sim/copies.py prices a copy)
and the replay (hw/copies.py runs it), so both sides accept, default and refuse the same names.

How DDR-tier KV reaches the GPU (DESIGN.md §3):

| name          | what moves the bytes                                                  | pinned | replay on CPU |
|---------------|-----------------------------------------------------------------------|--------|---------------|
| dma           | one cudaMemcpyAsync per piece on a copy engine                        | yes    | yes           |
| dma-batched   | one batched copy per copy, one descriptor per piece                   | yes    | yes           |
| gather-kernel | a GPU kernel reads mapped pinned host memory (zero-copy)              | yes    | no (no UVA)   |
| host-gather   | the CPU packs pieces into pinned bounce chunks, each DMA'd as it fills | yes    | yes           |
| pageable      | the paper's prototype: host gather into a new tensor, then a copy     | no     | yes           |

`auto` is a choice, not a mechanism: the simulator takes the cheapest its profile can price, the replay its
long-standing default (hw/copies.resolve_method). `pageable` is never named by a user: it is what
`pinned=False` (--pageable) copies with.

The tiering unit (the policy's page) and the KV block must nest, one dividing the other, or a page
straddles blocks and a block is freed by halves; both configs check it here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tiersim.errors import ConfigError

AUTO = "auto"
PAGEABLE = "pageable"
KV_LAYOUTS: tuple[str, ...] = ("per-layer", "cross-layer")


@dataclass(frozen=True, slots=True)
class CopyMethod:
    """One way to move DDR-tier pieces to the GPU, and what it implies."""

    name: str
    description: str
    pinned: bool  # reads page-locked host memory
    uses_sms: bool  # a GPU kernel does the copy: concurrent compute loses its share of SMs
    on_compute_stream: bool  # issued on the compute stream: it serialises with compute
    profile_fields: tuple[str, ...]  # optional profile constants it needs (beyond the link and copy latency)
    runs_on_cpu: bool  # the replay runs it on a CPU device (the host standing in for the GPU)


COPY_METHODS: dict[str, CopyMethod] = {m.name: m for m in (
    CopyMethod("dma", "one cudaMemcpyAsync per piece on a copy engine", True, False, False, ("dma_half_size_kb",),
               True),
    CopyMethod("dma-batched", "one cudaMemcpyBatchAsync per copy, one descriptor per piece", True, False, False,
               ("dma_batch_descriptor_us",), True),
    CopyMethod("gather-kernel", "a GPU kernel reads mapped pinned host memory (zero-copy) and writes HBM", True,
               True, False, ("gather_kernel_link_frac", "gather_kernel_sm_share"), False),
    CopyMethod("host-gather", "the CPU packs pieces into pinned bounce chunks, each DMA'd as it fills", True, False,
               False, ("host_gather_chunk_mb", "dma_half_size_kb"), True),
    CopyMethod(PAGEABLE, "the paper's prototype: host gather into a new tensor, then a pageable .to(device)", False,
               False, True, (), True),
)}
# The mechanisms a user names (pinned host memory), in the order `auto` breaks ties by.
PINNED_METHODS: tuple[str, ...] = tuple(n for n, m in COPY_METHODS.items() if m.pinned)
COPY_METHOD_CHOICES: tuple[str, ...] = (*PINNED_METHODS, AUTO)
# The pinned mechanisms the replay runs on a CPU device.
CPU_METHODS: tuple[str, ...] = tuple(n for n in PINNED_METHODS if COPY_METHODS[n].runs_on_cpu)


def get_copy_method(name: str | CopyMethod, pinned: bool = True) -> CopyMethod:
    """The record of a mechanism name ('auto' is resolved by the side that runs it, not here); pageable host memory
    has one path, `pageable`, whatever is asked."""
    if isinstance(name, CopyMethod):
        return name
    if name not in (*COPY_METHOD_CHOICES, PAGEABLE):
        raise ConfigError("copy_method", f"copy_method {name!r} unknown; accepted: {', '.join(COPY_METHOD_CHOICES)}")
    if not pinned:
        if name not in (AUTO, PAGEABLE):
            raise ConfigError("copy_method", f"copy_method {name!r} needs pinned host memory; with pinned=False "
                                             f"(--pageable) the copy is the pageable path: leave copy_method 'auto'")
        return COPY_METHODS[PAGEABLE]
    if name not in PINNED_METHODS:
        raise ConfigError("copy_method", f"copy_method {name!r} is resolved by the simulator or the replay, or means "
                                         f"pinned=False; accepted here: {', '.join(PINNED_METHODS)}")
    return COPY_METHODS[name]


def check_unit_nests(block_size: int, page_size: int) -> None:
    """The tiering unit and the KV block must nest: one divides the other, or pages straddle blocks."""
    if block_size % page_size and page_size % block_size:
        raise ConfigError("block_size", f"block_size {block_size} and the tiering unit page_size {page_size} do not "
                                        f"nest; accepted: a block size that page_size divides or that divides "
                                        f"page_size (e.g. {math.lcm(block_size, page_size)} or "
                                        f"{math.gcd(block_size, page_size)})")
