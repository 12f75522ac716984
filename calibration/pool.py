"""Pool repeated calibrations of one machine into one set of measurements (`calibrate --repeat N`).

A machine drifts: on the 2-vCPU VM, calibrations minutes apart fitted bandwidths 20% apart and the same replay ran
±12% apart between suite runs (calibration/measured/cpu-vm-2026-12-01-loop5). One calibration is a snapshot of
that drift; its fit carries the snapshot into every prediction. Pooling N calibrations point by point (every
timing the median of its N medians) fits the machine's typical state, and the N fits made apart say how far a
single calibration would have moved each field (`spread`).

The raw measurements of repeats share one structure (the same code measured the same sizes and shapes); `pool`
walks it: a timing or any other number becomes the median over repeats, a flag is kept when most repeats raised
it, a text is the first repeat's (the first non-empty reason where a flag is kept). A list whose length differs
between repeats (a sweep that stopped early in one) is taken from the repeat whose length is the most common.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from tiersim.errors import TiersimError

# Profile fields whose spread over the repeats is reported (the fitted ones; sizes of memory never move).
SPREAD_FIELDS = ("hbm_gbps_effective", "bf16_tflops_effective", "launch_us", "matmul_fixed_us", "attention_efficiency",
                 "roofline_overlap", "step_overhead_us", "copy_engine_slowdown", "h2d_gbps_pinned", "d2h_gbps_pinned",
                 "h2d_gbps_pageable", "d2h_gbps_pageable", "copy_latency_us", "ddr_gbps", "dma_half_size_kb",
                 "dma_batch_descriptor_us")
# Keys of a calibration's raw data that are derived from the measurements (refitted after pooling) or are not one.
NOT_POOLED = ("fits", "profile", "repeats")


def pool(raws: Sequence[dict]) -> dict:
    """One raw calibration whose every measurement is the median over `raws` (see the module doc)."""
    if not raws:
        raise TiersimError("pool needs at least one calibration")
    if len(raws) == 1:
        return {k: v for k, v in raws[0].items() if k not in NOT_POOLED}
    out = {k: _pool([r.get(k) for r in raws], k) for k in raws[0] if k not in NOT_POOLED}
    out["wall_s"] = float(sum(r.get("wall_s", 0.0) for r in raws))
    return out


def spread(profiles: Sequence[dict]) -> dict[str, dict]:
    """Per fitted field, its value in each repeat's own profile, their median, and the half-range as a share of the
    median (what one calibration alone could have been off by): {field: {values, median, spread_pct}}."""
    out = {}
    for key in SPREAD_FIELDS:
        values = [p.get(key) for p in profiles]
        if any(v is None for v in values):
            continue
        mid = float(np.median(values))
        half = (max(values) - min(values)) / 2
        out[key] = {"values": [float(v) for v in values], "median": mid,
                    "spread_pct": 100.0 * half / abs(mid) if mid else 0.0}
    return out


def _pool(values: list, key: str):
    """The pooled value of one node over the repeats."""
    first = values[0]
    if isinstance(first, dict):
        dicts = [v for v in values if isinstance(v, dict)]
        out = {k: _pool([d.get(k) for d in dicts], k) for k in first}
        if out.get("flagged") is False and out.get("reason"):
            out["reason"] = ""  # flagged in a minority of repeats only: the pooled point stands
        return out
    if isinstance(first, list):
        lists = [v for v in values if isinstance(v, list)]
        common = Counter(len(v) for v in lists).most_common(1)[0][0]
        same = [v for v in lists if len(v) == common]
        return [_pool([v[i] for v in same], key) for i in range(common)]
    if isinstance(first, bool):
        flags = [bool(v) for v in values]
        return sum(flags) * 2 > len(flags)
    if isinstance(first, int | float):
        nums = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        finite = [v for v in nums if math.isfinite(v)]
        if not finite:
            return first
        mid = float(np.median(finite))
        return int(round(mid)) if isinstance(first, int) else mid
    if isinstance(first, str) and key == "reason":
        return next((v for v in values if v), first)
    return first


__all__ = ["NOT_POOLED", "SPREAD_FIELDS", "pool", "spread"]
