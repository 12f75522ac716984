"""Small test doubles shared by several test files (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiersim.calibration.fit import layer_work
from tiersim.specs import ModelSpec, hardware_spec


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


def random_request(seed: int, prompt: int, steps: int, ties: bool = False) -> Req:
    """Attention-like rows (recency, a few persistent heavy hitters, noise), each summing to 1; `ties` rounds them
    (and the prefill scores) so that scores tie often."""
    rng = np.random.default_rng(seed)
    heavy = rng.lognormal(0, 2, size=prompt + steps)
    rows = []
    for t in range(steps):
        length = prompt + t + 1
        w = heavy[:length] * rng.random(length) + np.exp(-(length - 1 - np.arange(length)) / 8.0)
        w = w / w.sum()
        rows.append(np.round(w * 4) / 4 if ties else w)
    prefill = rng.random(prompt) * prompt
    return Req(np.round(prefill) if ties else prefill, rows)


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


def cpu_like_profile_file(folder: Path) -> Path:
    """A CPU-like hardware profile written to `folder`/cpu.toml (its numbers matter only for being CPU-sized)."""
    base = hardware_spec("h200-sxm")
    p = dataclasses.replace(base, name="test-cpu", hbm_gb=20.0, hbm_gbps_spec=20.0, hbm_gbps_effective=10.0,
                            bf16_tflops_spec=1.0, bf16_tflops_effective=0.3, h2d_gbps_pinned=8.0, d2h_gbps_pinned=8.0,
                            h2d_gbps_pageable=8.0, d2h_gbps_pageable=8.0, copy_latency_us=1.0, ddr_gbps=10.0,
                            launch_us=100.0, ddr_gb=20.0)
    path = folder / "cpu.toml"
    path.write_text(p.to_toml())
    return path


def synthetic_timings(model: ModelSpec, truth: tuple, noise: float = 0.0, seed: int = 0, reps: int = 1):
    """Whole-layer and lm_head timings the cost model predicts at `truth` (calibration.fit's Work.predict
    arguments), with lognormal noise of sd `noise`: the data a fit must recover `truth` from."""
    layers = [{"tokens": b, "batch": b, "kv_tokens": n} for b in (1, 4, 16, 64) for n in (192, 1088, 4160)] * reps
    layers += [{"tokens": t, "batch": 1, "kv_tokens": 0} for t in (128, 512, 2048)] * reps
    head = [{"tokens": t} for t in (1, 8, 64)] * reps
    t = layer_work(model, [dict(p, median_s=1.0) for p in layers], [dict(p, median_s=1.0) for p in head]).predict(*truth)
    t = t * np.exp(np.random.default_rng(seed).normal(0.0, noise, len(t))) if noise else t
    for p, s in zip(layers + head, t, strict=True):
        p["median_s"] = float(s)
    return layers, head
