"""Importance statistics of attention traces: how concentrated, how sink- and recency-bound, how persistent.

Definitions, for one request with a P-token prompt and S traced decode steps (row t is the
attention of the query at position P+t over positions 0..P+t; N = P+S positions in all).
Only decode rows count; the prefill column sums do not.

- received attention c_i = sum over decode rows t of row_t[i], for positions i in 0..N-1.
- topX_mass (X = 5, 20, 50): the share of sum(c) on the k = ceil(X/100 * N) positions with the
  largest c (ties do not matter: the sum of the k largest values is unique).
- gini: the Gini coefficient of c over the N positions, sum_i (2i - N - 1) c_(i) / (N sum c) with
  c sorted ascending and i = 1..N; 0 when every position receives the same, (N-1)/N when one
  position receives everything. Early positions can be attended by more rows than late ones, so
  even uniform rows give a Gini above 0 (test_stats.py computes that case by hand).
- sink_mass: the mean over decode rows of the share of the row on positions 0..sinks-1, the first
  tokens of the sequence, where real models park their attention sink (BOS / first prompt token).
  `sinks` defaults to the policy's (4); the policy itself protects the whole prompt and the first
  `sinks` generated tokens, so this statistic is about the model, not the policy.
- recency_mass: the mean over decode rows of the share of row t on its last `window` positions,
  P+t-window+1..P+t (the query itself included; the whole row while it is shorter than the
  window). `window` defaults to the policy's (128).
- heavy_persistence: decode steps are cut into intervals of `interval` steps (default the policy's
  Δ = 64, so interval ends are the policy's re-tier points); interval j covers steps
  jΔ..(j+1)Δ-1, and only complete intervals count. For each pair of consecutive intervals (j, j+1)
  the candidates are the positions sinks..P+jΔ-window: they exist at the start of interval j and
  lie outside the recency window for all of both intervals (and are not sinks), so neither
  recency nor the sinks can make a token look persistent. With n candidates, k = ceil(f * n)
  (f = heavy_fraction, default 0.2); A and B are the k candidates receiving the most attention
  within interval j and within interval j+1 (attention received in the interval, not the
  cumulative score, which would be trivially persistent; ties go to the earlier position).
  heavy_persistence = sum over pairs of |A ∩ B| / sum over pairs of k, the share of top-k slots
  whose token is again top-k one interval later. 1: the same tokens keep receiving the attention;
  about f (k/n): no memory at all (independent rows). None when no pair has a candidate.
- aggregate: the unweighted mean over requests of each statistic (heavy_persistence over the
  requests where it is defined), the request count and the total prompt and generated tokens.

For a PolicyConfig, `inspect_trace` also replays the policy (tiersim.policy.replay) and reports per
request the tokens per tier at the start of each interval, the share of each interval's attention
mass on each tier, the final tokens per tier and the share of all decode attention per tier.

Rows are read in blocks of `interval` rows (a block is at most interval x N values), so memory
stays O(interval * N) whatever S is.
"""

from __future__ import annotations

import itertools
import math
import os
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from tiersim.errors import TiersimError
from tiersim.fileio import atomic_path
from tiersim.policy import TIER_NAMES, PolicyConfig, TierSchedule, replay
from tiersim.traces.format import Request, Trace, row_offset

TOP_PERCENTS = (5, 20, 50)
_POLICY = PolicyConfig()
STAT_KEYS = ("top5_mass", "top20_mass", "top50_mass", "gini", "sink_mass", "recency_mass", "heavy_persistence")


@dataclass(frozen=True, slots=True)
class StatsParams:
    """Parameters of the statistics; sinks, window and interval default to the policy's."""

    sinks: int = _POLICY.sinks
    window: int = _POLICY.window
    interval: int = _POLICY.interval
    heavy_fraction: float = 0.2

    def __post_init__(self) -> None:
        for name, minimum in (("sinks", 0), ("window", 0), ("interval", 1)):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
                raise TiersimError(f"stats: {name} must be an integer >= {minimum}, got {value!r}")
        if not 0.0 < self.heavy_fraction <= 1.0:
            raise TiersimError(f"stats: heavy_fraction must lie in (0, 1], got {self.heavy_fraction!r}")

    @classmethod
    def from_policy(cls, policy: PolicyConfig, heavy_fraction: float = 0.2) -> StatsParams:
        """The statistics that match a policy configuration (its sinks, window and Δ)."""
        return cls(sinks=policy.sinks, window=policy.window, interval=policy.interval, heavy_fraction=heavy_fraction)

    def to_dict(self) -> dict:
        """Plain dict of the parameters."""
        return asdict(self)


DEFAULT_STATS = StatsParams()


def row_blocks(request: Request, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first step, dense float64 block) for consecutive blocks of rows, zero beyond each row."""
    p, s = request.prompt_tokens, request.steps
    for t0 in range(0, s, block_rows):
        t1 = min(s, t0 + block_rows)
        width = p + t1
        flat = request.increments[row_offset(p, t0): row_offset(p, t1)]
        mask = np.arange(width)[None, :] <= p + np.arange(t0, t1)[:, None]
        block = np.zeros((t1 - t0, width), dtype=np.float64)
        block[mask] = flat
        yield t0, block


def concentration(received: np.ndarray) -> dict[str, float]:
    """topX_mass for X in TOP_PERCENTS and the Gini coefficient of received attention per position."""
    c = np.sort(np.asarray(received, dtype=np.float64))
    n, total = c.size, float(c.sum())
    if n == 0 or total <= 0:
        raise TiersimError("stats: no attention mass to measure (no decode rows, or all zero)")
    top_sums = np.cumsum(c[::-1])
    out = {f"top{x}_mass": float(top_sums[-(-x * n // 100) - 1] / total) for x in TOP_PERCENTS}
    i = np.arange(1, n + 1, dtype=np.float64)
    out["gini"] = float(np.dot(2 * i - n - 1, c) / (n * total))
    return out


def _top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, ties to the lower index."""
    return np.argsort(-values, kind="stable")[:k]


def request_stats(request: Request, params: StatsParams | None = None) -> dict:
    """Every statistic of the module docstring for one request, as a JSON-ready dict."""
    params = params or DEFAULT_STATS
    p, s = request.prompt_tokens, request.steps
    if s == 0:
        raise TiersimError("stats: request has no decode steps")
    n = p + s
    received = np.zeros(n, dtype=np.float64)
    sink_share = np.zeros(s)
    recent_share = np.zeros(s)
    delta, w = params.interval, params.window
    previous: np.ndarray | None = None  # attention received within the previous complete interval
    hits = slots = 0
    for t0, block in row_blocks(request, delta):
        rows, width = block.shape
        within = block.sum(axis=0)
        received[:width] += within
        totals = block.sum(axis=1)
        totals[totals <= 0] = np.nan
        sink_share[t0: t0 + rows] = block[:, : params.sinks].sum(axis=1) / totals
        cum = np.cumsum(block, axis=1)
        last = p + np.arange(t0, t0 + rows)  # each row's own position (its last column)
        r = np.arange(rows)
        before = last - w
        outside = np.where(before >= 0, cum[r, np.maximum(before, 0)], 0.0)
        recent_share[t0: t0 + rows] = (cum[r, last] - outside) / totals
        if rows < delta:
            break  # an incomplete last interval takes no part in persistence
        if previous is not None:
            j0 = t0 - delta  # start step of the earlier interval of the pair
            lo, hi = params.sinks, p + j0 - w + 1
            if hi > lo:
                k = math.ceil(params.heavy_fraction * (hi - lo) - 1e-9)  # 0.07 * 100 is 7.000000000000001
                a = _top_k(previous[lo:hi], k)
                b = _top_k(within[lo:hi], k)
                hits += np.intersect1d(a, b, assume_unique=True).size
                slots += k
        previous = within
    out = {"prompt_tokens": p, "generated_tokens": request.generated_tokens, "steps": s, "positions": n}
    out.update(concentration(received))
    out["sink_mass"] = float(np.nanmean(sink_share))
    out["recency_mass"] = float(np.nanmean(recent_share))
    out["heavy_persistence"] = hits / slots if slots else None
    out["persistence_slots"] = slots
    return out


def aggregate(rows: Sequence[dict]) -> dict:
    """Mean over requests of each statistic (None-valued ones left out), plus counts and token totals."""
    out: dict = {"requests": len(rows), "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
                 "generated_tokens": sum(r["generated_tokens"] for r in rows)}
    for key in STAT_KEYS:
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def tier_timeline(schedule: TierSchedule, interval: int) -> dict:
    """Tokens per tier at the start of each interval and each interval's attention mass share per tier."""
    starts = np.arange(0, schedule.steps, interval)
    mass = np.add.reduceat(schedule.mass, starts, axis=0) if starts.size else np.zeros((0, 4))
    totals = mass.sum(axis=1, keepdims=True)
    share = np.divide(mass, totals, out=np.zeros_like(mass), where=totals > 0)
    whole = schedule.mass_share()
    return {"steps": starts.tolist(),
            "tokens": {name: schedule.counts[starts, i].tolist() for i, name in enumerate(TIER_NAMES)},
            "mass_share": {name: share[:, i].tolist() for i, name in enumerate(TIER_NAMES)},
            "final_tokens": {name: int(schedule.final_counts[i]) for i, name in enumerate(TIER_NAMES)},
            "total_mass_share": {name: float(whole[i]) for i, name in enumerate(TIER_NAMES)}}


def request_indices(trace: Trace, request: int | None) -> list[int]:
    """All request indices, or just `request` after checking it is in range."""
    if request is None:
        return list(range(len(trace)))
    if not 0 <= request < len(trace):
        raise TiersimError(f"request {request} out of range: {trace.path} has {len(trace)} requests"
                           f" (0..{len(trace) - 1})")
    return [request]


def inspect_requests(requests: Iterable[Request], policy: PolicyConfig | None = _POLICY,
                     params: StatsParams | None = None, indices: Iterable[int] | None = None) -> dict:
    """Statistics per request (and the policy's tier timeline when a policy is given) plus their aggregate."""
    params = params or (StatsParams.from_policy(policy) if policy is not None else StatsParams())
    rows = []
    for i, req in zip(itertools.count() if indices is None else indices, requests):
        row = {"request": i, **request_stats(req, params)}
        if policy is not None:
            row["tiers"] = tier_timeline(replay(req, policy), params.interval)
        rows.append(row)
    if not rows:
        raise TiersimError("stats: no requests to inspect")
    return {"stats_params": params.to_dict(), "policy": policy.to_dict() if policy is not None else None,
            "requests": rows, "aggregate": aggregate(rows)}


def inspect_trace(trace: Trace, policy: PolicyConfig | None = _POLICY, request: int | None = None,
                  params: StatsParams | None = None) -> dict:
    """The whole `tiersim inspect` report of a trace (or of one request) as a JSON-ready dict."""
    indices = request_indices(trace, request)
    report = inspect_requests((trace[i] for i in indices), policy, params, indices)
    return {"trace": str(trace.path), "model": trace.model.get("id"), "trace_requests": len(trace), **report}


def export_npz(trace: Trace, path: str | os.PathLike, request: int | None = None) -> list[int]:
    """Write token_ids_<i>, prefill_<i> and dense float32 increments_<i> (S x (P+S)) to an .npz, atomically.

    Streams one array at a time into the zip, so only one request's dense matrix is in memory.
    """
    indices = request_indices(trace, request)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for i in indices:
            req = trace[i]
            for name, arr in (("token_ids", req.token_ids), ("prefill", req.prefill),
                              ("increments", req.dense(np.float32))):
                with zf.open(f"{name}_{i}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    return indices
