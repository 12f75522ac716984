"""Finding the configuration that serves best: the β frontier under an overhead budget, and `advise`.

`search_hbm_ratio` bisects β ∈ [0, 1] for each (strategy, depth): overhead falls and HBM saving
falls as β grows (more of the cache stays in HBM), so the smallest β within the budget saves the
most. β = 1 is tried first (if even that is over budget, none exists), then β = 0 (if within, it is
the answer), then midpoints on the dyadic grid, so the same β recurs across strategies and its
policy schedule comes from the cache. Every simulated point is kept: the frontier it walked.

`advise` (studies/advise.py, re-exported here) compares `full`, the tiered strategies and
`evict-only` on `simulate`'s fair comparison and ranks the options that fit.

Both return only configurations that fit in HBM.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from tiersim.errors import TiersimError
from tiersim.sim.config import SimConfig
from tiersim.sim.run import SimResult, simulate
from tiersim.strategy import STRATEGIES, get_strategy

# The exact tiered strategies (β trades HBM for transfer), the one that runs ahead by `depth` first.
SEARCH_STRATEGIES = tuple(s.name for s in sorted((s for s in STRATEGIES.values() if s.keeps_ddr),
                                                 key=lambda s: not s.fetches_per_layer))
SEARCH_DEPTHS = (1, 2, 4)
BETA_TOLERANCE = 1 / 64


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
                     tolerance: float = BETA_TOLERANCE, workers: int | None = None,
                     progress: Callable[[int, int], None] | None = None) -> SearchResult:
    """The largest HBM saving whose overhead stays within the target, over β (and strategy and depth).

    `progress(points simulated, most points the walk can take)` is called after each point and once at the end
    with both equal (a walk that stops early at β = 1 or 0 takes fewer than the most).
    """
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

    combos = search_combos(cfg, search_strategy)
    most = len(combos) * (2 + math.ceil(math.log2(1 / tolerance)))  # β = 1, β = 0, then the bisection

    def step(strategy: str, depth: int, beta: float) -> FrontierPoint:
        p = evaluate(strategy, depth, beta)
        if progress is not None:
            progress(len(frontier), most)
        return p

    for strategy, depth in combos:
        bisect_beta(lambda b, s=strategy, d=depth: step(s, d, b), tolerance)
    if progress is not None:
        progress(len(frontier), len(frontier))
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


from tiersim.studies.advise import ADVISE_OPTIONS, Advice, Option, Served, advise  # noqa: E402  (re-exported)

__all__ = ["ADVISE_OPTIONS", "Advice", "FrontierPoint", "Option", "SearchResult", "Served", "advise",
           "search_hbm_ratio"]
