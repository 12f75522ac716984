"""Small test doubles shared by several test files (pytest puts tests/ on sys.path)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Req:
    """A trace request in memory: the shape `replay` reads."""

    prefill: np.ndarray
    increments: list[np.ndarray]

    @property
    def steps(self) -> int:
        return len(self.increments)

    @property
    def generated_tokens(self) -> int:
        return len(self.increments) + 1

    def rows(self):
        return iter(self.increments)


class Probe:
    """Writes each new token's position into its key, and records what every attention saw.

    `ddr_in_order`: keep the staged DDR positions in the order they were staged (to check the staging order),
    else sorted like the resident ones.
    """

    def __init__(self, ddr_in_order: bool = False):
        self.seen = {}
        self.ddr_in_order = ddr_in_order

    def tag(self, positions, kv_heads, k_new):
        k_new = k_new.clone()
        k_new[:, 0] = positions.repeat_interleave(kv_heads).to(k_new.dtype)
        return k_new

    def check(self, step, layer, slot, chunks, attend, staged):
        for h in range(chunks.shape[1]):
            resident = chunks[:, h, :, 0].reshape(-1)[:attend].round().long().tolist()
            ddr = [] if staged is None else staged[h, :, 0].round().long().tolist()
            self.seen[(step, layer, slot, h)] = (sorted(resident), ddr if self.ddr_in_order else sorted(ddr))
