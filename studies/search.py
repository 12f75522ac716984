"""Finding the configuration that serves best: the β frontier under an overhead budget, and `advise`.

`search_hbm_ratio` bisects β ∈ [0, 1] for each (strategy, depth): overhead falls and HBM saving
falls as β grows (more of the cache stays in HBM), so the smallest β within the budget saves the
most. β = 1 is tried first (if even that is over budget, none exists), then β = 0 (if within, it is
the answer), then midpoints on the dyadic grid, so the same β recurs across strategies and its
policy schedule comes from the cache. Every simulated point is kept: the frontier it walked.

`advise` compares, each at its throughput-best batch, `full`, the tiered strategies and
`evict-only`: batches are powers of two up to the largest that fits (the summary's `max_batch`
estimate), then a bisection up to the first batch that does not fit or breaks the SLO.

One concept past ~400 lines: the β bisection and `advise` share the frontier points and their
fits-in-HBM rule (only configurations that fit are answers).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from tiersim.errors import TiersimError
from tiersim.sim.config import SimConfig
from tiersim.sim.costs import GB
from tiersim.sim.run import SimResult, simulate
from tiersim.strategy import BASELINE, STRATEGIES, get_strategy

# The exact tiered strategies (β trades HBM for transfer), the one that runs ahead by `depth` first.
SEARCH_STRATEGIES = tuple(s.name for s in sorted((s for s in STRATEGIES.values() if s.keeps_ddr),
                                                 key=lambda s: not s.fetches_per_layer))
SEARCH_DEPTHS = (1, 2, 4)
BETA_TOLERANCE = 1 / 64
THROUGHPUT_TIE = 0.01
# The baseline, the exact tiered strategies, then the lossy one.
ADVISE_OPTIONS = (BASELINE.name, *SEARCH_STRATEGIES,
                  *(s.name for s in STRATEGIES.values() if s.lossy))


# -- the β frontier ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FrontierPoint:
    """One simulated configuration of the search."""

    hbm_ratio: float
    strategy: str
    depth: int | None  # None: the strategy has no depth
    hbm_saved_gb: float
    hbm_peak_gb: float
    overhead_pct: float
    step_ms_mean: float
    fits: bool
    within_target: bool
    attention_mass_ddr: float

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(slots=True)
class SearchResult:
    """The chosen configuration (None when no β meets the target) and every point walked, in walk order."""

    target_overhead_pct: float
    frontier: list[FrontierPoint]
    chosen: FrontierPoint | None
    result: SimResult | None  # the chosen configuration's simulation
    message: str

    def to_dict(self) -> dict:
        """The search for JSON: target, outcome, chosen point, frontier, and the chosen summary."""
        return {
            "target_overhead_pct": self.target_overhead_pct, "found": self.chosen is not None,
            "message": self.message, "chosen": self.chosen.to_dict() if self.chosen else None,
            "frontier": [p.to_dict() for p in self.frontier],
            "summary": self.result.summary if self.result else None,
        }


def search_combos(cfg: SimConfig, search_strategy: bool) -> list[tuple[str, int]]:
    """The (strategy, depth) pairs to search: the configured one, or every tiered strategy and depth."""
    if not search_strategy:
        if not cfg.strategy_record.keeps_ddr:
            raise TiersimError(f"--target-overhead searches β for a tiered strategy; got --strategy {cfg.strategy}; "
                               f"accepted: {', '.join(SEARCH_STRATEGIES)} (or --search-strategy)")
        return [(cfg.strategy, cfg.depth)]
    return [(name, d) for name in SEARCH_STRATEGIES
            for d in (SEARCH_DEPTHS if get_strategy(name).fetches_per_layer else (cfg.depth,))]


def check_target(target_overhead_pct: float) -> float:
    """The budget must be a finite percentage >= 0."""
    if isinstance(target_overhead_pct, bool) or not isinstance(target_overhead_pct, (int, float)) \
            or not math.isfinite(target_overhead_pct) or target_overhead_pct < 0:
        raise TiersimError(f"target overhead {target_overhead_pct!r} invalid; accepted: a percentage >= 0 (e.g. 5)")
    return float(target_overhead_pct)


def search_hbm_ratio(cfg: SimConfig, target_overhead_pct: float, search_strategy: bool = False,
                     tolerance: float = BETA_TOLERANCE, workers: int | None = None) -> SearchResult:
    """The largest HBM saving whose overhead stays within the target, over β (and strategy and depth)."""
    target = check_target(target_overhead_pct)
    if not 0 < tolerance < 1:
        raise TiersimError(f"tolerance {tolerance!r} invalid; accepted: a number in (0, 1)")
    frontier: list[FrontierPoint] = []
    results: dict[int, SimResult] = {}

    def evaluate(strategy: str, depth: int, beta: float) -> FrontierPoint:
        c = dataclasses.replace(cfg, strategy=strategy, depth=depth,
                                policy=dataclasses.replace(cfg.policy, hbm_ratio=beta))
        r = simulate(c, workers=workers)
        s = r.summary
        p = FrontierPoint(beta, strategy, depth if c.strategy_record.fetches_per_layer else None, s["hbm_saved_gb"],
                          s["hbm_peak_gb"], s["overhead_pct"], s["step_ms_mean"], bool(s["fits"]),
                          s["overhead_pct"] <= target, s["attention_mass_ddr"])
        results[len(frontier)] = r
        frontier.append(p)
        return p

    for strategy, depth in search_combos(cfg, search_strategy):
        bisect_beta(lambda b, s=strategy, d=depth: evaluate(s, d, b), tolerance)
    within = [i for i, p in enumerate(frontier) if p.within_target]
    if not within:
        least = min(frontier, key=lambda p: p.overhead_pct)
        return SearchResult(target, frontier, None, None,
                            f"no configuration keeps the overhead within {target:g}%: the lowest is "
                            f"{least.overhead_pct:.2f}% ({describe(least)}, which keeps every surviving token in HBM)")
    # Only a configuration that fits in HBM is an answer: one that does not could not run.
    ok = [i for i in within if frontier[i].fits]
    if not ok:
        least = min((frontier[i] for i in within), key=lambda p: p.hbm_peak_gb)
        return SearchResult(target, frontier, None, None,
                            f"no configuration within {target:g}% overhead fits in HBM: the smallest peak among them "
                            f"is {least.hbm_peak_gb:.1f} GB of {cfg.hardware.hbm_gb:g} GB ({describe(least)}); "
                            f"lower --batch or raise the target")
    best = max(ok, key=lambda i: (frontier[i].hbm_saved_gb, -frontier[i].overhead_pct, -i))
    p = frontier[best]
    return SearchResult(target, frontier, p, results[best],
                        f"{describe(p)} saves {p.hbm_saved_gb:.2f} GB of HBM at {p.overhead_pct:.2f}% overhead "
                        f"(target {target:g}%; fits in HBM)")


def bisect_beta(evaluate, tolerance: float) -> None:
    """Walk β: 1, then 0, then bisect between the last β over budget and the first within it."""
    if not evaluate(1.0).within_target:
        return
    if evaluate(0.0).within_target:
        return
    lo, hi = 0.0, 1.0  # lo over budget, hi within
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if evaluate(mid).within_target:
            hi = mid
        else:
            lo = mid


def describe(p: FrontierPoint) -> str:
    """'prefetch-layer depth 2, β=0.375'."""
    depth = f" depth {p.depth}" if p.depth is not None else ""
    return f"{p.strategy}{depth}, β={p.hbm_ratio:g}"


# -- advise ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Trial:
    """One batch size tried for one option."""

    batch: int
    throughput_tok_s: float
    step_ms_mean: float
    step_ms_p99: float
    hbm_peak_gb: float
    fits: bool
    within_slo: bool

    @property
    def ok(self) -> bool:
        """Fits in HBM and meets the SLO."""
        return self.fits and self.within_slo


@dataclass(frozen=True, slots=True)
class Option:
    """One strategy at its throughput-best batch (batch 0: no batch fits within the SLO)."""

    strategy: str
    batch: int
    max_batch_estimate: int
    throughput_tok_s: float | None  # None (and below): no batch fits within the SLO
    step_ms_mean: float | None
    step_ms_p99: float | None
    hbm_peak_gb: float | None
    attention_mass_lost: float | None
    ddr_gb_per_step: float | None  # DDR-tier KV attended per decode step (all layers)
    trials: tuple[Trial, ...]

    @property
    def viable(self) -> bool:
        """Some batch fits and meets the SLO."""
        return self.batch > 0

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        d = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "trials"}
        return {**d, "viable": self.viable, "trials": [dataclasses.asdict(t) for t in self.trials]}


@dataclass(frozen=True, slots=True)
class Advice:
    """The comparison table and its verdict."""

    model: str
    hardware: str
    gen_tokens: int
    slo_ms: float | None
    hbm_capacity_gb: float
    options: tuple[Option, ...]
    verdict: str
    config: dict

    def option(self, strategy: str) -> Option:
        """The row of one strategy."""
        return next(o for o in self.options if o.strategy == strategy)

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return {"model": self.model, "hardware": self.hardware, "gen_tokens": self.gen_tokens, "slo_ms": self.slo_ms,
                "hbm_capacity_gb": self.hbm_capacity_gb, "slo_applies_to": "step_ms_p99",
                "options": [o.to_dict() for o in self.options], "verdict": self.verdict, "config": self.config}


def _powers_of_two(limit: int) -> list[int]:
    out, b = [], 1
    while b <= limit:
        out.append(b)
        b *= 2
    return out


class _Trials:
    """Simulations of one strategy at several batch sizes, each run once."""

    def __init__(self, cfg: SimConfig, strategy: str, slo_ms: float | None, workers: int | None) -> None:
        self.cfg, self.strategy, self.slo_ms, self.workers = cfg, strategy, slo_ms, workers
        self.summaries: dict[int, dict] = {}
        self.tried: dict[int, Trial] = {}

    def summary(self, batch: int) -> dict:
        """The simulation summary at `batch` (not counted as a trial)."""
        if batch not in self.summaries:
            c = dataclasses.replace(self.cfg, strategy=self.strategy, batch=batch)
            self.summaries[batch] = simulate(c, workers=self.workers).summary
        return self.summaries[batch]

    def __call__(self, batch: int) -> Trial:
        s = self.summary(batch)
        t = Trial(batch, s["throughput_tok_s"], s["step_ms_mean"], s["step_ms_p99"], s["hbm_peak_gb"], bool(s["fits"]),
                  self.slo_ms is None or s["step_ms_p99"] <= self.slo_ms)
        self.tried[batch] = t
        return t

    def option(self, best: Trial | None, estimate: int) -> Option:
        """The row of this strategy at its chosen batch."""
        trials = tuple(sorted(self.tried.values(), key=lambda t: t.batch))
        if best is None:
            return Option(self.strategy, 0, estimate, None, None, None, None, None, None, trials)
        s = self.summaries[best.batch]
        keeps_all = not get_strategy(self.strategy).applies_policy
        lost = 0.0 if keeps_all else s["attention_mass_evicted"]
        # Per GPU, full-attention layers only (sliding-window layers are never tiered).
        ddr_gb = s["ddr_tokens_per_slot_step"] * best.batch * self.cfg.share.kv_bytes_per_token_global / GB
        return Option(self.strategy, best.batch, estimate, best.throughput_tok_s, best.step_ms_mean, best.step_ms_p99,
                      best.hbm_peak_gb, lost, ddr_gb, trials)


def best_batch(cfg: SimConfig, strategy: str, slo_ms: float | None, max_batch: int, probe_batch: int,
               workers: int | None = None) -> Option:
    """The throughput-best batch of one strategy: fits in HBM, p99 step time within the SLO."""
    trial = _Trials(cfg, strategy, slo_ms, workers)
    estimate = int(trial.summary(probe_batch)["max_batch"])
    top = min(estimate, max_batch)
    good = [t for t in map(trial, sorted({*_powers_of_two(top), top} - {0})) if t.ok]
    if not good:
        return trial.option(None, estimate)
    peak = max(t.throughput_tok_s for t in good)
    # The smallest batch within 1% of the best throughput: the same tokens/s at shorter steps and less HBM.
    best = min((t for t in good if t.throughput_tok_s >= (1 - THROUGHPUT_TIE) * peak), key=lambda t: t.batch)
    above = [b for b, t in trial.tried.items() if b > best.batch and not t.ok]
    if best.batch == max(t.batch for t in good) and above:
        best = _edge(trial, best, min(above))
    return trial.option(best, estimate)


def _edge(trial: _Trials, lo: Trial, hi: int) -> Trial:
    """Bisect batch sizes between `lo` (fits, within the SLO) and `hi` (does not) while throughput rises, to ~1.5%."""
    while hi - lo.batch > max(1, lo.batch // 64):
        mid = trial((lo.batch + hi) // 2)
        if mid.ok and mid.throughput_tok_s >= lo.throughput_tok_s:
            lo = mid
        else:
            hi = mid.batch
    return lo


def advise(cfg: SimConfig, slo_ms: float | None = None, max_batch: int = 4096, probe_batch: int = 16,
           workers: int | None = None) -> Advice:
    """Compare full, the tiered strategies and evict-only, each at its throughput-best batch, with a verdict."""
    if slo_ms is not None and not (math.isfinite(slo_ms) and slo_ms > 0):
        raise TiersimError(f"SLO {slo_ms!r} ms invalid; accepted: a step time in ms > 0")
    for name, value in (("max_batch", max_batch), ("probe_batch", probe_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TiersimError(f"{name} must be an integer >= 1, got {value!r}")
    options = tuple(best_batch(cfg, s, slo_ms, max_batch, probe_batch, workers) for s in ADVISE_OPTIONS)
    advice = Advice(cfg.model.name, cfg.hardware.name, cfg.gen_tokens, slo_ms, cfg.hardware.hbm_gb, options, "",
                    {k: v for k, v in cfg.to_dict().items() if k not in ("strategy", "batch")})
    return dataclasses.replace(advice, verdict=verdict(advice, cfg))


def _rel(a: float, b: float, name: str) -> str:
    """'30% above full' / '86% below full' / 'level with full'."""
    pct = 100 * (a / b - 1)
    if abs(pct) < 0.5:
        return f"level with {name}"
    return f"{abs(pct):.0f}% {'above' if pct > 0 else 'below'} {name}"


def verdict(a: Advice, cfg: SimConfig) -> str:
    """One plain-language paragraph, every claim a number from the table."""
    slo = f" within the {a.slo_ms:g} ms SLO (p99 step)" if a.slo_ms is not None else ""
    full = a.option(BASELINE.name)
    evict = next(o for o in a.options if get_strategy(o.strategy).lossy)
    tiered = [o for o in a.options if get_strategy(o.strategy).keeps_ddr and o.viable]
    head = f"For {a.model} on {a.hardware} with {a.gen_tokens:,}-token chains"
    if not full.viable and not tiered:
        return f"{head}, {_why_nothing(a, cfg)} " + _evict_sentence(evict, None, slo)
    parts = [head + (f", without tiering the best batch{slo} is {full.batch} ({full.throughput_tok_s:,.0f} tokens/s, "
                     f"{full.step_ms_mean:.1f} ms per step, {full.hbm_peak_gb:.1f} of {a.hbm_capacity_gb:g} GB of HBM)."
                     if full.viable else f", without tiering no batch fits{slo}.")]
    t = max(tiered, key=lambda o: o.throughput_tok_s) if tiered else None
    if t is not None:
        vs = f" ({_rel(t.throughput_tok_s, full.throughput_tok_s, 'full')})" if full.viable else ""
        parts.append(f"The best tiered strategy at β = {cfg.policy.hbm_ratio:g}, {t.strategy}, runs batch {t.batch} at "
                     f"{t.throughput_tok_s:,.0f} "
                     f"tokens/s{vs}, {t.step_ms_mean:.1f} ms per step, {t.hbm_peak_gb:.1f} GB of HBM, with "
                     f"{t.ddr_gb_per_step:.2f} GB of DDR-tier KV per step {_path(t.strategy, cfg)}, losing "
                     f"{100 * t.attention_mass_lost:.2f}% of the attention mass to eviction (r = {cfg.policy.evict_ratio:g}).")
    else:
        parts.append(f"No tiered strategy fits a batch{slo}.")
    best = max((o for o in (full, *tiered) if o.viable), key=lambda o: o.throughput_tok_s)
    if best is full and t is not None:
        cause = (f"the DDR-tier traffic costs more than its larger batch ({t.batch} against {full.batch}) gains"
                 if t.batch > full.batch else
                 f"the DDR-tier traffic slows every step and full already fits batch {full.batch} against its {t.batch}")
        parts.append(f"Recommendation: full; tiering does not pay here, because {cause}.")
    elif best is full:
        parts.append("Recommendation: full.")
    elif full.viable:
        parts.append(f"Recommendation: {best.strategy}, {_rel(best.throughput_tok_s, full.throughput_tok_s, 'full')} "
                     f"in throughput by fitting batch {best.batch} against {full.batch}.")
    else:
        parts.append(f"Recommendation: {best.strategy}, the only exact way to serve this model here.")
    parts.append(_evict_sentence(evict, best, slo))
    return " ".join(parts)


def _why_nothing(a: Advice, cfg: SimConfig) -> str:
    """Why neither full nor a tiered strategy has a batch: no room at all, or the SLO."""
    fitting = [t for o in a.options if not get_strategy(o.strategy).lossy for t in o.trials if t.fits]
    if not fitting or a.slo_ms is None:
        weights = cfg.weight_bytes / GB
        per_gpu = f" per GPU at tp {cfg.tp}" if cfg.tp > 1 else ""
        return (f"no exact option fits any batch: the weights alone take {weights:.1f} GB{per_gpu} of the "
                f"{a.hbm_capacity_gb:g} GB of HBM, with a {100 * cfg.reserve_frac:g}% reserve on top."
                + _deployments_that_fit(cfg))
    fastest = min(fitting, key=lambda t: t.step_ms_p99)
    return (f"no exact option meets the {a.slo_ms:g} ms SLO: the shortest p99 step of a fitting batch is "
            f"{fastest.step_ms_p99:.1f} ms (batch {fastest.batch}).")


def _deployments_that_fit(cfg: SimConfig) -> str:
    """' Weights and reserve leave room for KV at tp 2 or with fp8 weights.' — the nearest deployments that do."""
    room = (1 - cfg.reserve_frac) * cfg.hardware.hbm_gb * GB
    hosts = cfg.hardware.gpus_per_host or 1
    tps = [tp for tp in (2, 4, 8) if cfg.tp < tp <= hosts and cfg.hardware.nvlink_gbps is not None]
    found = []
    for tp in tps:
        try:
            if dataclasses.replace(cfg, tp=tp).weight_bytes < room:
                found.append(f"at tp {tp} (--tp {tp})")
                break
        except TiersimError:  # tp does not divide this model's heads
            continue
    if cfg.weight_bits is None:
        try:
            fp8 = dataclasses.replace(cfg, weight_dtype="fp8").weight_bytes
        except TiersimError:
            fp8 = cfg.weight_bytes
        if fp8 < min(room, cfg.weight_bytes):
            found.append("with fp8 weights (--weight-dtype fp8)")
    return f" Weights and reserve leave room for KV {' or '.join(found)}." if found else ""


def _path(strategy: str, cfg: SimConfig) -> str:
    if get_strategy(strategy).host_attends:
        return f"attended by the host at {cfg.hardware.ddr_gbps:g} GB/s of DDR bandwidth"
    return f"copied over {cfg.hardware.link} at {cfg.hardware.h2d_gbps(cfg.pinned):g} GB/s"


def _evict_sentence(evict: Option, best: Option | None, slo: str) -> str:
    if not evict.viable:
        return f"evict-only has no batch that fits{slo}{' either' if best is None else ''}."
    than = ""
    if best is not None:
        than = f" ({_rel(evict.throughput_tok_s, best.throughput_tok_s, best.strategy)})"
    return (f"evict-only reaches {evict.throughput_tok_s:,.0f} tokens/s at batch {evict.batch}{than}, but it drops "
            f"{100 * evict.attention_mass_lost:.2f}% of the attention mass (every token outside HBM), which the paper "
            f"reports hurts reasoning accuracy.")
