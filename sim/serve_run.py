"""The open loop: every strategy serves the same arrivals; latency, goodput, memory over time, sustainable rates.

`simulate_serving(cfg)` draws the requests once (Poisson at `rate` for `duration_s`, or a file of
arrivals), serves them with each strategy through the vLLM-v1 scheduler (sim/serving.py), and
searches each strategy's maximum sustainable rate under the SLO with the same seed (90% rule).
`rate_sweep(cfg, rates)` serves every strategy at each rate: the throughput–latency curve.
`closed_loop(cfg)` serves `batch` slots back to back, the serving form of `simulate`'s closed loop.

What each strategy needs from the rest of the simulator: its KV pools (sim/blocks.kv_capacity, the
host DDR being this GPU's share of the host's), its step time (sim/step_time.CostStepTime over the
same CostModel as `simulate`; copies at the link-rate bound unless `copy_method` names a mechanism)
and, for a tiered strategy, its split of each request's KV into HBM and DDR tiers: the replayed
policy's own schedules (workload/build's request tables, request i following schedule i mod n),
which is why the policy runs once (or comes from the cache) before any request is served. Past
`gen_tokens` generated tokens a request keeps its schedule's last tier counts.

Lengths by default are those of the closed loop: the trace requests' prompts and `gen_tokens`
generated tokens; `output_tokens="trace"` takes the trace requests' own generated lengths.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd

from tiersim import check
from tiersim.errors import ConfigError
from tiersim.sim.blocks import KVCapacity, kv_capacity
from tiersim.sim.config import SimConfig
from tiersim.sim.copies import get_copy_method
from tiersim.sim.costs import CostModel
from tiersim.sim.scheduler import KVSplit, SchedulerConfig, table_split
from tiersim.sim.serving import SLO, SUSTAINABLE_SHARE, ServingResult, max_sustainable_rate, serve
from tiersim.sim.step_time import CostStepTime
from tiersim.sim.verdict import open_loop_verdict
from tiersim.strategy import BASELINE, STRATEGY_NAMES, get_strategy
from tiersim.traces.format import Trace
from tiersim.workload.arrivals import LengthSpec, Request, length_dist, poisson_requests, read_arrivals
from tiersim.workload.build import COL
from tiersim.workload.demand import read_run_trace, run_workload

MIN_DURATION_S = 300.0  # Poisson arrivals, default: at least this, and twice a median request's decode at the TPOT SLO
TRACE = "trace"  # a length spec: the trace requests' own lengths
Progress = Callable[[int, int], None]  # progress(strategies done, strategies in all)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeConfig(SimConfig):
    """A simulation config plus the serving inputs: arrivals, request lengths, scheduler knobs and the SLO."""

    rate: float | None = None  # Poisson arrivals, requests/s
    arrivals: Path | None = None  # or a CSV/JSONL file of arrival_s, prompt_tokens, output_tokens
    prompt_tokens: int | str | Path | None = None  # count, preset, file or "trace"; None: the trace's prompts
    output_tokens: int | str | Path | None = None  # count, preset, file or "trace"; None: gen_tokens
    duration_s: float | None = None  # served seconds; None: see `served_seconds` (Poisson), every request done (file)
    max_num_seqs: int = 256  # vLLM's defaults
    max_num_batched_tokens: int = 8192
    preemption: str = "recompute"
    slo_ttft_ms: float = 2000.0  # assumption: an interactive target (2 s to the first token, 20 tokens/s after)
    slo_tpot_ms: float = 50.0
    rates: tuple[float, ...] = ()  # rate_sweep's rates (a "1,2,4" string is read too)
    strategies: tuple[str, ...] = ()  # the strategies served; (): all of them
    find_max_rate: bool = True  # search each strategy's maximum sustainable rate

    def __post_init__(self) -> None:
        SimConfig.__post_init__(self)
        if self.rate is not None and self.arrivals is not None:
            raise ConfigError("rate", "give rate (Poisson arrivals) or arrivals (a file), not both")
        check.number("rate", self.rate, 0, low_open=True, optional=True)
        if self.arrivals is not None:
            object.__setattr__(self, "arrivals", Path(self.arrivals))
        check.number("duration_s", self.duration_s, 0, low_open=True, optional=True)
        for name in ("prompt_tokens", "output_tokens"):
            spec = getattr(self, name)
            if spec is not None and spec != TRACE:
                length_dist(spec, name)
        SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, self.preemption)
        SLO(self.slo_ttft_ms, self.slo_tpot_ms)
        object.__setattr__(self, "rates", parse_rates(self.rates))
        names = (self.strategies,) if isinstance(self.strategies, str) else tuple(self.strategies)
        for name in names:
            get_strategy(name, "strategies")
        object.__setattr__(self, "strategies", names)

    @classmethod
    def from_sim(cls, cfg: SimConfig, **serving) -> ServeConfig:
        """A SimConfig's inputs plus serving fields."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(SimConfig)}, **serving)

    @property
    def slo(self) -> SLO:
        """The latency targets."""
        return SLO(self.slo_ttft_ms, self.slo_tpot_ms)

    @property
    def scheduler(self) -> SchedulerConfig:
        """vLLM's scheduler knobs."""
        return SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, self.preemption)

    @property
    def served(self) -> tuple[str, ...]:
        """The strategies served, `full` (the baseline) first."""
        names = self.strategies or STRATEGY_NAMES
        return (BASELINE.name, *(n for n in names if n != BASELINE.name))

    @property
    def ddr_gb_per_gpu(self) -> float:
        """Host DDR this GPU may hold KV in: the host's, shared by its GPUs."""
        return self.hardware.ddr_gb / (self.hardware.gpus_per_host or 1)

    def to_dict(self) -> dict:
        """Every input, resolved, for the summary."""
        return {**SimConfig.to_dict(self), "rate": self.rate, "arrivals": str(self.arrivals) if self.arrivals else None,
                "prompt_tokens": _spec(self.prompt_tokens), "output_tokens": _spec(self.output_tokens),
                "duration_s": self.duration_s, "max_num_seqs": self.max_num_seqs,
                "max_num_batched_tokens": self.max_num_batched_tokens, "preemption": self.preemption,
                "slo_ttft_ms": self.slo_ttft_ms, "slo_tpot_ms": self.slo_tpot_ms, "rates": list(self.rates),
                "strategies": list(self.served)}


def _spec(spec) -> int | str | None:
    return spec if spec is None or isinstance(spec, int) else str(spec)


def parse_rates(rates) -> tuple[float, ...]:
    """Rates from '1,2,4' or a sequence: each a number > 0, ascending, each once."""
    if isinstance(rates, str):
        try:
            rates = [float(r) for r in rates.split(",") if r.strip()]
        except ValueError:
            raise ConfigError("rates", f"rates {rates!r} unreadable; accepted: rates in req/s separated by commas, "
                                       f"e.g. 1,2,4") from None
    out = tuple(sorted({float(r) if isinstance(r, int) and not isinstance(r, bool) else r for r in rates}))
    for r in out:
        check.number("rates", r, 0, low_open=True)
    return out


# -- what each strategy serves with ---------------------------------------------------------------------------
@dataclass(slots=True)
class Engine:
    """One strategy's serving engine: KV pools, step time and tier split."""

    strategy: str
    capacity: KVCapacity
    step_time: CostStepTime
    split: KVSplit | None


def tier_tables(cfg: ServeConfig, trace: Trace, workers: int | None) -> tuple[np.ndarray, np.ndarray]:
    """DDR-tier and evicted token counts of every replayed schedule by generated tokens (policy run or cached)."""
    w = run_workload(replace(cfg, batch=1, steps=1), trace, workers)  # the tables do not depend on the batch
    return w.tables[:, :, COL["ddr"]], w.tables[:, :, COL["evicted"]]


def engine(cfg: ServeConfig, strategy: str, tables: tuple[np.ndarray, np.ndarray] | None,
           assign: np.ndarray | None = None) -> Engine:
    """The KV pools, step time and split of one strategy on cfg's model and GPU; request i follows schedule
    `assign[i]` of `tables` (default: i mod the number of schedules)."""
    s = get_strategy(strategy)
    copy = None if cfg.pinned and cfg.copy_method == "auto" else get_copy_method(cfg.copy_method, cfg.pinned)
    cost = CostModel(cfg.model, cfg.hardware, cfg.pinned, cfg.fixed_compute_ms, cfg.weight_bits, share=cfg.share,
                     copy=copy)
    capacity = kv_capacity(cfg.model, cfg.hardware, s, block_size=cfg.block_size, weight_bytes=cfg.weight_bytes,
                           reserve_frac=cfg.reserve_frac, depth=cfg.depth, ddr_gb=cfg.ddr_gb_per_gpu,
                           share=cfg.share)
    split = None
    if s.applies_policy:
        ddr, evicted = tables
        if assign is not None:
            split = table_split(ddr, evicted, assign, keeps_ddr=s.keeps_ddr)
        else:
            n, inner = len(ddr), table_split(ddr, evicted, np.arange(len(ddr)), keeps_ddr=s.keeps_ddr)
            split = lambda ids, prompt, context: inner(ids % n, prompt, context)  # noqa: E731
    return Engine(s.name, capacity, CostStepTime(cost, s, cfg.block_size, page_size=cfg.policy.page_size,
                                                    kv_layout=cfg.kv_layout), split)


def length_specs(cfg: ServeConfig, trace: Trace) -> tuple[LengthSpec, LengthSpec]:
    """What prompt and output lengths are drawn from (defaults: the closed loop's)."""
    prompt = cfg.prompt_tokens if cfg.prompt_tokens not in (None, TRACE) else \
        [int(trace[i].prompt_tokens) for i in range(len(trace))]
    if cfg.output_tokens is None:
        output = cfg.gen_tokens
    elif cfg.output_tokens == TRACE:
        output = [int(trace[i].generated_tokens) for i in range(len(trace))]
    else:
        output = cfg.output_tokens
    return prompt, output


def served_seconds(cfg: ServeConfig, output: LengthSpec) -> float:
    """Seconds a Poisson run serves: `duration_s`, else MIN_DURATION_S or twice a median request's decode at the
    TPOT target, the longer (a request's TPOT is known to be met or missed only after that long)."""
    if cfg.duration_s is not None:
        return cfg.duration_s
    median = float(np.median(length_dist(output, "output_tokens").sample(np.random.default_rng(0), 1001)))
    return max(MIN_DURATION_S, 2 * median * cfg.slo_tpot_ms * 1e-3)


def serving_requests(cfg: ServeConfig, trace: Trace) -> tuple[list[Request], str, float | None]:
    """The arrivals every strategy serves, a phrase saying what they are, and the served duration (None: to the end)."""
    prompt, output = length_specs(cfg, trace)
    if cfg.arrivals is not None:  # a length column may be left out of the file only when its flag says what instead
        reqs = read_arrivals(cfg.arrivals, prompt_tokens=prompt if cfg.prompt_tokens is not None else None,
                             output_tokens=output if cfg.output_tokens is not None else None, seed=cfg.seed)
        return reqs, f"the {len(reqs):,} arrivals of {cfg.arrivals.name}", cfg.duration_s
    if cfg.rate is None:
        raise ConfigError("rate", "an open-loop run needs rate (requests/s) or arrivals (a file)")
    duration = served_seconds(cfg, output)
    reqs = poisson_requests(cfg.rate, duration_s=duration, prompt_tokens=prompt, output_tokens=output, seed=cfg.seed)
    if not reqs:
        raise ConfigError("rate", f"rate {cfg.rate:g} req/s brings no request in {duration:g} s; raise rate or "
                                  f"duration")
    return reqs, f"{cfg.rate:g} req/s (Poisson, {duration:g} s, {len(reqs):,} requests)", duration


# -- the runs ------------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class ServingRun:
    """An open-loop run: summary (the JSON), every strategy's requests and steps, and the rate sweep if any."""

    summary: dict
    results: dict[str, ServingResult] = field(default_factory=dict)
    sweep: pd.DataFrame | None = None  # one row per (strategy, rate)

    def table(self, name: str) -> pd.DataFrame:
        """Every strategy's `requests` or `steps` records, a `strategy` column first."""
        return pd.concat([getattr(r, name).assign(strategy=s)[["strategy", *getattr(r, name).columns]]
                          for s, r in self.results.items()], ignore_index=True)


@dataclass(frozen=True, slots=True)
class Job:
    """One strategy's share of an open-loop run (picklable: it crosses to a worker process)."""

    cfg: ServeConfig
    strategy: str
    tables: tuple[np.ndarray, np.ndarray] | None
    requests: list[Request] | None  # the run's arrivals (None: a sweep only)
    until_s: float | None  # served seconds (None: until every request finished)
    search_s: float  # seconds of each Poisson run of the rate search or sweep
    specs: tuple[LengthSpec, LengthSpec]  # what the search's and the sweep's lengths are drawn from
    rates: tuple[float, ...] = ()  # the sweep's rates


def _serve_one(job: Job) -> tuple[str, ServingResult | None, dict]:
    """Serve one strategy at the run's arrivals; then its rate sweep, or the search of its maximum sustainable rate."""
    cfg, e = job.cfg, engine(job.cfg, job.strategy, job.tables)
    served = lambda reqs, until: serve(reqs, e.step_time, e.capacity, cfg.scheduler, until_s=until,  # noqa: E731
                                       slo=cfg.slo, split=e.split)
    result = None if job.requests is None else served(job.requests, job.until_s)
    extra: dict = {"kv_hbm_blocks": e.capacity.hbm_blocks, "kv_ddr_blocks": e.capacity.ddr_blocks}
    if job.rates:  # every rate with the same seed: the same requests, times scaled
        extra["sweep"] = []
        for rate in job.rates:
            reqs = poisson_requests(rate, duration_s=job.search_s, prompt_tokens=job.specs[0],
                                    output_tokens=job.specs[1], seed=cfg.seed)
            extra["sweep"].append((rate, served(reqs, job.search_s).metrics if reqs else None))
    elif cfg.find_max_rate:
        search = max_sustainable_rate(e.step_time, e.capacity, cfg.slo, duration_s=job.search_s,
                                      prompt_tokens=job.specs[0], output_tokens=job.specs[1], config=cfg.scheduler,
                                      split=e.split, seed=cfg.seed, start_rate=cfg.rate or 1.0, rel_tol=0.1,
                                      max_trials=12)
        extra["max_sustainable_rate_req_s"] = search.rate
        extra["rate_trials"] = [list(t) for t in search.trials]
    return job.strategy, result, extra


def _run_all(jobs: list[Job], workers: int | None, progress: Progress | None = None) -> list[tuple]:
    """The strategies' jobs, in forked processes (one per core by default) when there are several;
    `progress(done, total)` as each strategy is done (in the jobs' order)."""
    workers = min(len(jobs), os.cpu_count() or 1) if workers is None else max(1, workers)
    done: list[tuple] = []

    def collect(results) -> list[tuple]:
        for r in results:
            done.append(r)
            if progress is not None:
                progress(len(done), len(jobs))
        return done

    if progress is not None:
        progress(0, len(jobs))
    if workers <= 1 or len(jobs) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return collect(_serve_one(j) for j in jobs)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return collect(pool.map(_serve_one, jobs))


def _tables(cfg: ServeConfig, trace: Trace, workers: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The replayed schedules' tier counts when a tiered strategy is served."""
    return tier_tables(cfg, trace, workers) if any(get_strategy(n).applies_policy for n in cfg.served) else None


def simulate_serving(cfg: ServeConfig, trace: Trace | None = None, workers: int | None = None,
                     progress: Progress | None = None) -> ServingRun:
    """Every strategy serves the same arrivals; metrics, maximum sustainable rates, the baseline and the verdict."""
    trace = read_run_trace(cfg.trace) if trace is None else trace
    requests, load, until = serving_requests(cfg, trace)  # a bad arrivals file is refused before any work
    tables, specs = _tables(cfg, trace, workers), length_specs(cfg, trace)
    if cfg.arrivals is not None:  # searched with Poisson arrivals of the file's lengths, over its span or longer
        specs = ([r.prompt_tokens for r in requests], [r.output_tokens for r in requests])
    span = until or max(max(r.arrival_s for r in requests), served_seconds(cfg, specs[1]))
    done = _run_all([Job(cfg, n, tables, requests, until, span, specs) for n in cfg.served], workers, progress)
    results, serving = {}, {}
    for name, result, extra in done:
        results[name] = result
        search = {k: extra.pop(k) for k in ("max_sustainable_rate_req_s", "rate_trials") if k in extra}
        serving[name] = {**result.metrics, **search, **extra}
    basis = (f"Poisson arrivals over {span:g} s, >= {100 * SUSTAINABLE_SHARE:.0f}% of requests within the SLO"
             if cfg.find_max_rate else "")
    summary = _summary(cfg, load, serving, basis)
    return ServingRun(summary, results)


def rate_sweep(cfg: ServeConfig, rates=None, trace: Trace | None = None, workers: int | None = None,
               progress: Progress | None = None) -> ServingRun:
    """Every strategy at each Poisson rate (same seed): one row per (strategy, rate), for the throughput–latency curve."""
    rates = parse_rates(cfg.rates if rates is None else rates)
    if not rates:
        raise ConfigError("rates", "rate_sweep needs at least one rate, e.g. rates='1,2,4'")
    trace = read_run_trace(cfg.trace) if trace is None else trace
    tables, specs = _tables(cfg, trace, workers), length_specs(cfg, trace)
    duration = served_seconds(cfg, specs[1])
    done = _run_all([Job(cfg, n, tables, None, duration, duration, specs, rates) for n in cfg.served], workers,
                    progress)
    rows, serving = [], {}
    for name, _, extra in done:
        # Unknown is not a pass: a rate that brought no request, or no known outcome, is not sustainable.
        ok = [rate for rate, m in extra["sweep"] if m is not None and (m["goodput_share"] or 0.0) >= SUSTAINABLE_SHARE]
        for rate, m in extra["sweep"]:
            if m is not None:
                rows.append({"strategy": name, "rate_req_s": rate, **m})
        last = next((m for _, m in reversed(extra["sweep"]) if m is not None), {})
        serving[name] = {**last, "max_sustainable_rate_req_s": max(ok) if ok else 0.0,
                         "kv_hbm_blocks": extra["kv_hbm_blocks"], "kv_ddr_blocks": extra["kv_ddr_blocks"]}
    load = f"{rates[-1]:g} req/s (the highest swept; Poisson, {duration:g} s)"
    basis = f"the highest of the swept rates {', '.join(f'{r:g}' for r in rates)} with >= " \
            f"{100 * SUSTAINABLE_SHARE:.0f}% of requests within the SLO"
    summary = _summary(cfg, load, serving, basis)
    summary["sweep"] = rows
    return ServingRun(summary, {}, pd.DataFrame(rows))


def _summary(cfg: ServeConfig, load: str, serving: dict[str, dict], basis: str) -> dict:
    """The open-loop summary: what was served, the baseline (full at this load), each strategy, the verdict."""
    full = serving[BASELINE.name]
    baseline = {"strategy": BASELINE.name, "load": load, "goodput_share": full.get("goodput_share"),
                "throughput_tok_s": full.get("throughput_tok_s"), "tpot_ms_p50": full.get("tpot_ms_p50"),
                "max_sustainable_rate_req_s": full.get("max_sustainable_rate_req_s"),
                "why": "every strategy serves the same arrivals; full is what an engine without tiering serves"}
    return {"mode": "open-loop", "load": load, "slo_ttft_ms": cfg.slo_ttft_ms, "slo_tpot_ms": cfg.slo_tpot_ms,
            "sustainable_rate_basis": basis or None, "baseline": baseline, "serving": serving,
            "verdict": open_loop_verdict(load, (cfg.slo_ttft_ms, cfg.slo_tpot_ms), serving, cfg.strategy, basis),
            "config": cfg.to_dict()}


def closed_loop(cfg: ServeConfig, trace: Trace | None = None, capacity: KVCapacity | None = None,
                workers: int | None = None) -> ServingResult:
    """`batch` slots served back to back through the scheduler, each slot drawing the trace requests the closed
    loop of `simulate` (cold start) draws; `capacity` overrides the strategy's KV pools (e.g. unlimited)."""
    trace = read_run_trace(cfg.trace) if trace is None else trace
    w = run_workload(replace(cfg, cold_start=True), trace, workers)
    rows = w.tables.shape[1]  # a request's rows: its prefill, then gen_tokens - 1 decodes
    # Wave by wave: every slot's first request, then every slot's second, ... (all of a wave end together).
    order = (w.slot_rows[:, ::rows] // rows).T.reshape(-1)
    reqs = [Request(0.0, int(w.schedules[k].prompt_tokens), cfg.gen_tokens, i) for i, k in enumerate(order)]
    e = engine(cfg, cfg.strategy, (w.tables[:, :, COL["ddr"]], w.tables[:, :, COL["evicted"]]), assign=order)
    return serve(reqs, e.step_time, capacity or e.capacity, cfg.scheduler, concurrency=cfg.batch, split=e.split)
