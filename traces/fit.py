"""Fit the synthetic generator (SynthParams) to a captured trace, so it can produce longer chains like it.

The fit matches the statistics of tiersim.traces.stats (top5/top20/top50 mass, Gini, sink and recency
mass, heavy-hitter persistence; aggregate over requests) between the captured trace and synthetic
requests of the same prompt and decode lengths:

1. The captured aggregate is measured once, and two shape parameters are read off the trace
   directly (`sink_shape`): generated_sink_share (share of the sink attention on the first
   generated tokens) and sink_decay (how fast attention falls over the prompt sinks).
2. The search runs over FIT_FIELDS in an unconstrained space (the three masses as log-ratios to
   the background mass, logits of heavy_fraction and background_jitter, logs of
   heavy_lifetime_steps and background_concentration, each within bounds) with scipy's
   Nelder-Mead, from a moment-matched start. Every evaluation generates the same
   `sample_requests` synthetic requests (lengths spread over the captured ones, fixed seeds:
   common random numbers make the objective deterministic) and scores
   sum_s w_s * ((synthetic_s - captured_s) / max(captured_s, 0.02))**2, with weight 4 on
   top20_mass and heavy_persistence (the two the fit promises) and 1 on the others. The search
   stops after `max_evaluations` (it has levelled off by about 100 on real traces).
3. The report measures the fitted parameters on fresh synthetic requests (another seed) at every
   captured request's lengths, side by side with the captured statistics.

vocab_size is set from the captured token ids, sink_tokens from the statistics' sinks; the other
SynthParams fields keep their defaults. The fitted generator is then free to make chains of any
length: its statistics drift with length the way the model implies (recency_mass falls and
heavy_persistence rises on longer chains), which a capture of a few hundred tokens cannot check.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import minimize

from tiersim.errors import TiersimError
from tiersim.traces.format import Request, Trace
from tiersim.traces.stats import DEFAULT_STATS, STAT_KEYS, StatsParams, aggregate, request_stats
from tiersim.traces.synth import SynthParams, synth_request

MASS_FIELDS = ("sink_mass", "recency_mass", "heavy_mass")  # searched as log-ratios to the background mass
# Other searched fields: (transform, lower bound, upper bound); logit for shares, log for scales.
SHAPE_FIELDS = {"heavy_fraction": ("logit", 0.002, 0.5), "heavy_lifetime_steps": ("log", 4.0, 1e5),
                "background_concentration": ("log", 0.02, 50.0), "background_jitter": ("logit", 0.0, 1.0)}
FIT_FIELDS = (*MASS_FIELDS, *SHAPE_FIELDS)
WEIGHTS = {"top20_mass": 4.0, "heavy_persistence": 4.0}
_FLOOR = 0.02


@dataclass(frozen=True, slots=True)
class Lengths:
    """Prompt tokens, generated tokens and decode steps of one request."""

    prompt_tokens: int
    generated_tokens: int
    steps: int


@dataclass(frozen=True, slots=True)
class FitReport:
    """The fitted parameters and the statistics they give, next to the captured ones."""

    params: SynthParams
    captured: dict
    synthetic: dict
    evaluations: int
    seconds: float
    sample_requests: int
    validation_requests: int
    objective: float

    def relative_error(self, key: str) -> float | None:
        """(synthetic - captured) / captured for one statistic, None where either is undefined or zero."""
        c, s = self.captured.get(key), self.synthetic.get(key)
        if c is None or s is None or c == 0:
            return None
        return (s - c) / c

    def rows(self) -> list[tuple[str, float | None, float | None, float | None]]:
        """(statistic, captured, synthetic, relative error) for every statistic."""
        return [(k, self.captured.get(k), self.synthetic.get(k), self.relative_error(k)) for k in STAT_KEYS]

    def to_dict(self) -> dict:
        """JSON-ready report."""
        return {"params": self.params.to_dict(), "fitted_fields": list(FIT_FIELDS),
                "statistics": [{"statistic": k, "captured": c, "synthetic": s, "relative_error": e}
                               for k, c, s, e in self.rows()],
                "evaluations": self.evaluations, "seconds": self.seconds, "objective": self.objective,
                "sample_requests": self.sample_requests, "validation_requests": self.validation_requests}


def trace_lengths(requests: Sequence[Request]) -> list[Lengths]:
    """Lengths of each request."""
    return [Lengths(r.prompt_tokens, r.generated_tokens, r.steps) for r in requests]


def synthetic_stats(params: SynthParams, lengths: Sequence[Lengths], seed: int,
                    stats: StatsParams = DEFAULT_STATS) -> dict:
    """Aggregate statistics of synthetic requests with the given lengths (request i seeded by (seed, i))."""
    rows = []
    for i, n in enumerate(lengths):
        rng = np.random.default_rng([seed, i])
        req = synth_request(params, n.prompt_tokens, n.generated_tokens, rng, steps=n.steps)
        rows.append(request_stats(req, stats))
    return aggregate(rows)


def objective(synthetic: dict, captured: dict) -> float:
    """Weighted squared relative error over the statistics defined in both."""
    total = 0.0
    for key in STAT_KEYS:
        c, s = captured.get(key), synthetic.get(key)
        if c is None:
            continue
        if s is None:
            total += 100.0  # a persistence the synthetic sample cannot even measure
            continue
        total += WEIGHTS.get(key, 1.0) * ((s - c) / max(abs(c), _FLOOR)) ** 2
    return total


def _encode(name: str, value: float) -> float:
    kind, lo, hi = SHAPE_FIELDS[name]
    if kind == "log":
        return math.log(min(max(value, lo), hi))
    u = min(max((value - lo) / (hi - lo), 1e-3), 1 - 1e-3)
    return math.log(u / (1 - u))


def _decode(name: str, x: float) -> float:
    kind, lo, hi = SHAPE_FIELDS[name]
    if kind == "log":
        return float(min(max(math.exp(min(x, 50.0)), lo), hi))
    return float(lo + (hi - lo) / (1 + math.exp(-min(max(x, -30.0), 30.0))))


def _to_vector(p: SynthParams) -> np.ndarray:
    background = max(p.background_mass, 1e-3)
    masses = [math.log(max(getattr(p, name), 1e-3) / background) for name in MASS_FIELDS]
    return np.array(masses + [_encode(name, getattr(p, name)) for name in SHAPE_FIELDS])


def _from_vector(x: np.ndarray, base: SynthParams) -> SynthParams:
    w = np.exp(np.clip(np.append(x[: len(MASS_FIELDS)], 0.0), -20, 20))
    masses = w[:-1] / w.sum()
    # Rounding could push the masses a hair above 1 in total; the generator refuses that.
    masses *= min(1.0, (1 - 1e-9) / masses.sum())
    fields = {name: float(m) for name, m in zip(MASS_FIELDS, masses)}
    fields.update({name: _decode(name, v) for name, v in zip(SHAPE_FIELDS, x[len(MASS_FIELDS):])})
    return replace(base, **fields)


def sink_shape(requests: Sequence[Request], sinks: int) -> tuple[float, float]:
    """(generated_sink_share, sink_decay) measured directly: the share of all sink attention on the first
    `sinks` generated tokens (over rows that see them all), and the ratio of attention on prompt sinks 1..n-1
    to that on sinks 0..n-2 (the common ratio of a geometric profile)."""
    prompt_mass = generated_mass = 0.0
    received = np.zeros(sinks)
    for r in requests:
        p = r.prompt_tokens
        for t, row in enumerate(r.rows()):
            head = row[:sinks].astype(np.float64)
            received[: head.size] += head
            prompt_mass += float(head.sum())
            if t >= sinks:
                generated_mass += float(row[p: p + sinks].sum(dtype=np.float64))
    total = prompt_mass + generated_mass
    share = generated_mass / total if total > 0 else 0.0
    below = received[:-1].sum()
    decay = float(np.clip(received[1:].sum() / below, 0.01, 1.0)) if sinks > 1 and below > 0 else 0.5
    return float(np.clip(share, 0.0, 0.9)), decay


def _initial(captured: dict, base: SynthParams) -> SynthParams:
    """Moment-matching start: sink and recency masses from their statistics, the rest from defaults."""
    sink = min(0.9, captured["sink_mass"] / (1 - base.generated_sink_share))
    recency = min(0.9 - sink, captured["recency_mass"])
    heavy = min(base.heavy_mass, max(0.0, 0.95 - sink - recency))
    return replace(base, sink_mass=max(sink, 1e-3), recency_mass=max(recency, 1e-3), heavy_mass=max(heavy, 1e-3))


def _sample(lengths: Sequence[Lengths], n: int) -> list[Lengths]:
    """n lengths spread evenly over the captured ones (cycling through them when n is larger)."""
    if n >= len(lengths):
        return [lengths[i % len(lengths)] for i in range(n)]
    picks = np.linspace(0, len(lengths) - 1, n).round().astype(int)
    return [lengths[i] for i in picks]


def fit_synth_params(trace: Trace | Sequence[Request], *, stats: StatsParams = DEFAULT_STATS,
                     sample_requests: int = 8, max_evaluations: int = 120, seed: int = 0) -> FitReport:
    """Fit SynthParams to a captured trace with Nelder-Mead; see the module docstring."""
    started = time.perf_counter()
    requests = list(trace)
    if not requests:
        raise TiersimError("fit: the trace has no requests")
    if any(r.steps == 0 for r in requests):
        raise TiersimError("fit: every request needs decode steps")
    captured = aggregate([request_stats(r, stats) for r in requests])
    lengths = trace_lengths(requests)
    sample = _sample(lengths, sample_requests)
    vocab = int(max(int(r.token_ids.max()) for r in requests)) + 1
    share, decay = sink_shape(requests, max(stats.sinks, 1))
    base = _initial(captured, SynthParams(vocab_size=max(vocab, 1), sink_tokens=max(stats.sinks, 1),
                                          generated_sink_share=share, sink_decay=decay))
    evaluations = 0

    def cost(x: np.ndarray) -> float:
        nonlocal evaluations
        evaluations += 1
        return objective(synthetic_stats(_from_vector(x, base), sample, seed, stats), captured)

    x0 = _to_vector(base)
    simplex = np.vstack([x0, x0 + np.diag(np.full(x0.size, 0.6))])
    result = minimize(cost, x0, method="Nelder-Mead",
                      options={"maxfev": max_evaluations, "initial_simplex": simplex, "xatol": 0.02, "fatol": 1e-4})
    params = _from_vector(result.x, base)
    synthetic = synthetic_stats(params, lengths, seed + 1, stats)
    return FitReport(params=params, captured=captured, synthetic=synthetic, evaluations=evaluations,
                     seconds=time.perf_counter() - started, sample_requests=len(sample),
                     validation_requests=len(lengths), objective=float(result.fun))
