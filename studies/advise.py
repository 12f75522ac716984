"""`advise`: which option serves best — full, the tiered strategies or evict-only — on `simulate`'s fair comparison.

Only options that fit are ranked, against a stated baseline, with one or two sentences made from the
numbers (sim/verdict.py's comparison):

- `batch`: every option at that batch (closed loop, `steps` decode steps), against full at its
  largest fitting batch (checked by simulating it), beside full at the same batch when that fits;
- `rate`: every option serves the same Poisson arrivals (open loop, sim/serve_run.py), against full
  at the same rate; ranked by the share within the SLO, then each one's maximum sustainable rate;
- neither: each option at its throughput-best batch: powers of two up to the largest that fits
  (the summary's `max_batch` estimate), then a bisection up to the first batch that does not fit or
  breaks the SLO.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from tiersim import check
from tiersim.errors import ConfigError, TiersimError
from tiersim.sim.config import SimConfig
from tiersim.sim.costs import GB
from tiersim.sim.run import simulate
from tiersim.sim.verdict import relative
from tiersim.strategy import BASELINE, STRATEGIES, get_strategy
from tiersim.workload.demand import read_run_trace

THROUGHPUT_TIE = 0.01
# The baseline, the exact tiered strategies (the one that runs ahead by `depth` first), then the lossy one.
ADVISE_OPTIONS = (BASELINE.name, *(s.name for s in sorted((s for s in STRATEGIES.values() if s.keeps_ddr),
                                                          key=lambda s: not s.fetches_per_layer)),
                  *(s.name for s in STRATEGIES.values() if s.lossy))


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
class Served:
    """One strategy serving the open loop's arrivals (advise --rate)."""

    strategy: str
    fits: bool  # its KV pools hold every request (none refused as too long for an empty engine)
    goodput_share: float | None  # share of the requests whose outcome is known that meet the SLO
    ttft_ms_p50: float | None
    tpot_ms_p50: float | None
    tpot_ms_p99: float | None
    throughput_tok_s: float
    max_sustainable_rate_req_s: float | None
    kv_hbm_gb: float  # its HBM KV pool
    lossy: bool  # drops the DDR tier (evict-only)

    @property
    def viable(self) -> bool:
        """Fits (the open loop's admission control keeps every strategy within HBM)."""
        return self.fits

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return {**{f: getattr(self, f) for f in self.__dataclass_fields__}, "viable": self.viable}


@dataclass(frozen=True, slots=True)
class Advice:
    """The comparison table, its baseline, the ranking of the options that fit, and the verdict.

    `mode`: "best-batch" (each option at its throughput-best batch), "batch" (every option at one
    batch, closed loop) or "rate" (every option serving the same Poisson arrivals, open loop).
    """

    model: str
    hardware: str
    gen_tokens: int
    slo_ms: float | None
    hbm_capacity_gb: float
    options: tuple[Option | Served, ...]
    verdict: str
    config: dict
    mode: str = "best-batch"
    batch: int | None = None
    rate: float | None = None
    slo: dict | None = None  # the open loop's TTFT and TPOT targets, ms
    baseline: dict | None = None  # what the others are measured against, and why
    ranking: tuple[str, ...] = ()  # the options that fit (and meet the SLO), best first

    def option(self, strategy: str) -> Option | Served:
        """The row of one strategy."""
        return next(o for o in self.options if o.strategy == strategy)

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        applies = {"best-batch": "step_ms_p99", "batch": "step_ms_p99", "rate": "ttft and tpot per request"}[self.mode]
        return {"mode": self.mode, "model": self.model, "hardware": self.hardware, "gen_tokens": self.gen_tokens,
                "batch": self.batch, "rate": self.rate, "slo_ms": self.slo_ms, "slo": self.slo,
                "hbm_capacity_gb": self.hbm_capacity_gb, "slo_applies_to": applies, "baseline": self.baseline,
                "ranking": list(self.ranking), "options": [o.to_dict() for o in self.options],
                "verdict": self.verdict, "config": self.config}


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
           workers: int | None = None, *, batch: int | None = None, rate: float | None = None,
           serving: dict | None = None, progress: Callable[[int, int], None] | None = None) -> Advice:
    """Compare full, the tiered strategies and evict-only, rank those that fit, and say which serves best.

    No `batch` or `rate`: each option at its throughput-best batch that fits (and keeps its p99 step
    within `slo_ms`). `batch`: every option at that batch (closed loop, `cfg.steps` decode steps),
    against full at its largest fitting batch. `rate`: every option serves the same Poisson arrivals
    at `rate` req/s (open loop, sim/serve_run.py; `serving` holds ServeConfig's fields: the SLO,
    lengths, duration, scheduler knobs), against full at the same rate, with each one's maximum
    sustainable rate. `progress(done, total)` is called as each option is done.
    """
    if slo_ms is not None and not (math.isfinite(slo_ms) and slo_ms > 0):
        raise ConfigError("slo_ms", f"SLO {slo_ms!r} ms invalid; accepted: a step time in ms > 0")
    for name, value in (("max_batch", max_batch), ("probe_batch", probe_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(name, f"{name} must be an integer >= 1, got {value!r}")
    if batch is not None and rate is not None:
        raise ConfigError("batch", "batch (closed loop) and rate (open loop) exclude each other; give one")
    check.integer("batch", batch, 1, optional=True)
    check.number("rate", rate, 0, low_open=True, optional=True)
    if serving and rate is None:
        raise ConfigError(next(iter(serving)), f"{next(iter(serving))} sets the open loop; add rate (req/s)")
    if rate is not None and slo_ms is not None:
        raise ConfigError("slo_ms", "slo_ms bounds the closed loop's p99 step; with rate give slo_tpot_ms "
                                    "(and slo_ttft_ms)")
    head = Advice(cfg.model.name, cfg.hardware.name, cfg.gen_tokens, slo_ms, cfg.hardware.hbm_gb, (), "",
                  {k: v for k, v in cfg.to_dict().items() if k not in ("strategy", "batch")})
    tick = _ticker(progress, len(ADVISE_OPTIONS) + (batch is not None))
    if rate is not None:
        return _advise_rate(cfg, head, rate, serving or {}, workers, tick)
    if batch is not None:
        return _advise_batch(cfg, head, batch, workers, tick)
    options = []
    for s in ADVISE_OPTIONS:
        options.append(best_batch(cfg, s, slo_ms, max_batch, probe_batch, workers))
        tick()
    full = options[0]
    base = {"strategy": BASELINE.name, "batch": full.batch, "throughput_tok_s": full.throughput_tok_s,
            "step_ms": full.step_ms_mean, "why": "full at its own throughput-best batch that fits"} \
        if full.viable else None
    advice = dataclasses.replace(head, options=tuple(options), baseline=base,
                                 ranking=_ranked([o for o in options if o.viable], lambda o: o.throughput_tok_s))
    return dataclasses.replace(advice, verdict=verdict(advice, cfg))


def _ticker(progress: Callable[[int, int], None] | None, total: int) -> Callable[[], None]:
    """A function counting one more option done for `progress(done, total)`."""
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(min(done[0], total), total)

    if progress is not None:
        progress(0, total)
    return tick


def _ranked(options: list, key) -> tuple[str, ...]:
    """Strategy names, best first (ties: the order of ADVISE_OPTIONS, full first)."""
    return tuple(o.strategy for o in sorted(options, key=lambda o: -key(o)))


# -- advise --batch: every option at one batch -----------------------------------------------------------------------
def _advise_batch(cfg: SimConfig, head: Advice, batch: int, workers: int | None, tick) -> Advice:
    """Every option at `batch`; the ones that fit ranked by throughput; full at its largest fitting batch the baseline."""
    from tiersim.sim.verdict import baseline as full_baseline
    from tiersim.sim.verdict import feasible_full

    trial_of = {s: _Trials(cfg, s, head.slo_ms, workers) for s in ADVISE_OPTIONS}
    options = []
    for trials in trial_of.values():
        t = trials(batch)
        options.append(trials.option(t if t.ok else None, int(trials.summaries[batch]["max_batch"])))
        tick()
    summary = trial_of[BASELINE.name].summaries[batch]
    c = dataclasses.replace(cfg, strategy=BASELINE.name, batch=batch)
    full, tried = feasible_full(c, summary, read_run_trace(cfg.trace), workers)
    tick()
    base = full_baseline(c, summary, full, tried)
    viable = [o for o in options if o.viable]
    advice = dataclasses.replace(head, options=tuple(options), mode="batch", batch=batch, baseline=base,
                                 ranking=_ranked(viable, lambda o: o.throughput_tok_s))
    return dataclasses.replace(advice, verdict=batch_verdict(advice, cfg, trial_of))


def batch_verdict(a: Advice, cfg: SimConfig, trial_of: dict) -> str:
    """Two sentences: which options fit at this batch and the best against full at its largest fitting batch."""
    b, cap = a.baseline, a.hbm_capacity_gb
    slo = f" within the {a.slo_ms:g} ms SLO (p99 step)" if a.slo_ms is not None else ""
    base = (f"full at its largest fitting batch, {b['batch']} ({b['throughput_tok_s']:,.0f} tokens/s at "
            f"{b['step_ms']:.1f} ms per step)" if b["fits"] else "full, which fits no batch")
    if not a.ranking:
        peaks = {s: t.tried[a.batch] for s, t in trial_of.items()}
        fitting = [s for s, t in peaks.items() if t.fits]
        if fitting and a.slo_ms is not None:
            fastest = min(fitting, key=lambda s: peaks[s].step_ms_p99)
            why = (f"none meets the {a.slo_ms:g} ms SLO: the shortest p99 step of the ones that fit is "
                   f"{peaks[fastest].step_ms_p99:.1f} ms ({fastest})")
        else:
            least = min(peaks, key=lambda s: peaks[s].hbm_peak_gb)
            why = (f"the smallest HBM peak is {least}'s, {peaks[least].hbm_peak_gb:.1f} GB of {cap:g} GB"
                   if summary_room(trial_of) else _no_room(cfg, cap))
        return (f"At batch {a.batch} nothing fits{slo}: {why}. The baseline is {base}; lower --batch"
                + (" or change the deployment." if b["fits"] else "."))
    best = a.option(a.ranking[0])
    listed = ", ".join(a.ranking)
    first = (f"At batch {a.batch}, {len(a.ranking)} of {len(a.options)} options fit in {cap:g} GB of HBM{slo} "
             f"({listed}); the best is {best.strategy}, {best.throughput_tok_s:,.0f} tokens/s at "
             f"{best.step_ms_mean:.1f} ms per step")
    same = b.get("same_batch")
    if same is not None and best.strategy != BASELINE.name:
        first += f", {relative(best.throughput_tok_s, same['throughput_tok_s'])} full at the same batch"
    first += (f", {relative(best.throughput_tok_s, b['throughput_tok_s'])} {base}." if b["fits"] else
              f"; the baseline is {base}.")
    return first + " " + _lossy_note(a, best)


def summary_room(trial_of: dict) -> bool:
    """Whether the weights leave room for KV (some option's largest fitting batch is at least 1)."""
    return any(t.summaries and max(s["max_batch"] for s in t.summaries.values()) >= 1 for t in trial_of.values())


def _no_room(cfg: SimConfig, cap: float) -> str:
    per_gpu = f" per GPU at tp {cfg.tp}" if cfg.tp > 1 else ""
    return (f"the weights alone take {cfg.weight_bytes / GB:.1f} GB{per_gpu} of the {cap:g} GB of HBM, with a "
            f"{100 * cfg.reserve_frac:g}% reserve on top.{_deployments_that_fit(cfg)}".rstrip("."))


def _lossy_note(a: Advice, best) -> str:
    """The sentence on the lossy option: what it loses, or that the best is exact."""
    lossy = [o for o in a.options if get_strategy(o.strategy).lossy]
    if not lossy:
        return ""
    e = lossy[0]
    if best.strategy == e.strategy:
        exact = next((a.option(n) for n in a.ranking if n != e.strategy), None)
        alt = f"; the best exact option is {exact.strategy}" if exact is not None else "; no exact option fits"
        return (f"{e.strategy} drops {100 * e.attention_mass_lost:.2f}% of the attention mass (every token outside "
                f"HBM), which the paper reports hurts reasoning accuracy{alt}.")
    return "The best is exact: it keeps every surviving token, in HBM or in DDR."


# -- advise --rate: every option serving the same arrivals -----------------------------------------------------------
def _advise_rate(cfg: SimConfig, head: Advice, rate: float, serving: dict, workers: int | None, tick) -> Advice:
    """Every option serves the same Poisson arrivals at `rate`; those that fit ranked by goodput, then sustainable rate."""
    from tiersim.sim.blocks import kv_capacity
    from tiersim.sim.serve_run import ServeConfig, simulate_serving

    scfg = ServeConfig.from_sim(cfg, rate=rate, strategies=ADVISE_OPTIONS, **serving)
    slo = {"ttft_ms": scfg.slo_ttft_ms, "tpot_ms": scfg.slo_tpot_ms}
    head = dataclasses.replace(head, mode="rate", rate=rate, slo=slo)
    try:
        kv_capacity(cfg.model, cfg.hardware, BASELINE, block_size=cfg.block_size, weight_bytes=cfg.weight_bytes,
                    reserve_frac=cfg.reserve_frac, share=cfg.share)
    except ConfigError:  # no KV block left beside the weights: no strategy can serve (they share the same HBM)
        rows = tuple(Served(s, False, None, None, None, None, 0.0, None, 0.0, get_strategy(s).lossy)
                     for s in ADVISE_OPTIONS)
        base = {"strategy": BASELINE.name, "rate": rate, "fits": False, "why": "no KV block fits beside the weights"}
        return dataclasses.replace(head, options=rows, baseline=base,
                                   verdict=f"At {rate:g} req/s nothing fits: {_no_room(cfg, cfg.hardware.hbm_gb)}.")
    run = simulate_serving(scfg, workers=workers, progress=lambda done, total: tick())
    rows = []
    for name, m in run.summary["serving"].items():
        rows.append(Served(name, m["requests_rejected"] == 0, m["goodput_share"], m["ttft_ms_p50"], m["tpot_ms_p50"],
                           m["tpot_ms_p99"], m["throughput_tok_s"], m.get("max_sustainable_rate_req_s"),
                           m["hbm_kv_gb_capacity"],
                           get_strategy(name).lossy))
    order = {s: i for i, s in enumerate(ADVISE_OPTIONS)}
    rows.sort(key=lambda o: order.get(o.strategy, len(order)))
    ranking = tuple(o.strategy for o in sorted((o for o in rows if o.fits), key=_served_key, reverse=True))
    base = {**run.summary["baseline"], "rate": rate, "fits": rows[0].fits}
    advice = dataclasses.replace(head, options=tuple(rows), baseline=base, ranking=ranking,
                                 config={**head.config, **{k: v for k, v in scfg.to_dict().items()
                                                           if k not in head.config and k != "strategies"}})
    return dataclasses.replace(advice, verdict=rate_verdict(advice, run.summary["load"]))


def _served_key(o: Served) -> tuple[float, float, float]:
    """Goodput at the rate asked for first, then headroom (maximum sustainable rate), then tokens/s."""
    return (o.goodput_share or 0.0, o.max_sustainable_rate_req_s or 0.0, o.throughput_tok_s)


def _share(o: Served) -> str:
    if o.goodput_share is None:
        return "no outcome known"
    tpot = "" if o.tpot_ms_p50 is None else f", TPOT p50 {o.tpot_ms_p50:.1f} ms"
    return f"{100 * o.goodput_share:.0f}% of requests within the SLO{tpot}"


def _max_rate(o: Served) -> str:
    r = o.max_sustainable_rate_req_s
    return "" if r is None else f", sustaining at most {r:.3g} req/s"


def rate_verdict(a: Advice, load: str) -> str:
    """Two sentences: the best option that fits at this rate against full at the same rate; what evict-only loses."""
    slo = f"TTFT <= {a.slo['ttft_ms']:g} ms, TPOT <= {a.slo['tpot_ms']:g} ms"
    full = a.option(BASELINE.name)
    if not a.ranking:
        refused = ", ".join(o.strategy for o in a.options)
        return (f"At {load} nothing fits: every option ({refused}) refuses requests too long for its empty KV pool; "
                f"lower the lengths or change the deployment.")
    best = a.option(a.ranking[0])
    against = "full, which cannot hold every request"
    if full.fits:
        against = f"full at the same rate: {_share(full)}{_max_rate(full)}"
    if best is full:
        first = (f"At {load} (SLO {slo}), full serves best of the {len(a.ranking)} options that fit: {_share(full)}"
                 f"{_max_rate(full)}.")
    else:
        vs = ""
        if full.fits and best.max_sustainable_rate_req_s and full.max_sustainable_rate_req_s:
            vs = (f", {relative(best.max_sustainable_rate_req_s, full.max_sustainable_rate_req_s)} full's "
                  f"sustainable rate")
        first = (f"At {load} (SLO {slo}), the best of the {len(a.ranking)} options that fit is {best.strategy}: "
                 f"{_share(best)}{_max_rate(best)}{vs}; the baseline is {against}.")
    return first + " " + _lossy_note_served(a, best)


def _lossy_note_served(a: Advice, best: Served) -> str:
    if not best.lossy:
        return "The best is exact: it keeps every surviving token, in HBM or in DDR."
    exact = next((a.option(n) for n in a.ranking if not a.option(n).lossy), None)
    alt = f"; the best exact option is {exact.strategy} ({_share(exact)})" if exact is not None else \
        "; no exact option fits"
    return f"{best.strategy} drops every token outside HBM, which the paper reports hurts reasoning accuracy{alt}."


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
