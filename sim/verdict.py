"""The fair baseline of a run and its verdict: what `full` can really serve, and one or two sentences from the numbers.

Closed loop (`simulate`): comparing a tiered strategy against `full` at the same batch says nothing
when `full` does not fit there (the default: 156 GB of KV on a 141 GB GPU), so the baseline is
`full` at the largest batch that fits, simulated over the run's own steps at that batch (the
summary's `max_batch_full` estimate, checked by simulating it and lowered until its peak fits, at
most MAX_FULL_PROBES tries), beside `full` at the same batch only when that fits. Extra runs, cut to
CUT_STEPS decode steps, measure the alternatives a serving engineer would try next: the tiered
strategy at its own largest fitting batch (`max_batch`); at the same batch, the other side of the
trade (`evict-only` for an exact strategy, `prefetch-layer` for `evict-only`, both for `full`) and
`cpu-attention`; and, for a strategy that applies the policy, the next β of an eighths grid above
the run's and KV blocks twice as large (the tiering unit, page_size, kept: a new unit would need
one more policy replay). The larger β needs a replay of the policy, done once (about 1.3 s for the
default trace on a 2-core VM) and then read from the schedule cache (workload/cache.py). The
verdict names the best that fits, and calls the cut-short runs so.

Open loop (`simulate --rate/--arrivals/--rates`): every strategy serves the same arrivals; the
baseline is `full` at that load, and the verdict compares goodput under the SLO and each
strategy's maximum sustainable rate (sim/serving.py's 90% rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from tiersim.errors import TiersimError
from tiersim.sim.config import SimConfig
from tiersim.sim.costs import GB
from tiersim.sim.memory import account_memory, max_batch
from tiersim.sim.run import simulate_workload
from tiersim.strategy import BASELINE, STRATEGIES, get_strategy
from tiersim.traces.format import Trace
from tiersim.workload.demand import read_run_trace, run_workload

CUT_STEPS = 256  # decode steps of the extra runs: enough for a warm-started batch's mean step, 1/16 of the default
MAX_FULL_PROBES = 3
# Largest batch the comparison runs (or the run's own, if larger). Assumption: an engine rarely runs more sequences at
# once (vLLM's max_num_seqs defaults are 256 to 1,024); a small model that fits thousands is reported as fitting this.
BATCH_CAP = 1024
EXACT_ALTERNATIVE = "prefetch-layer"  # what evict-only and full are measured against
CPU_ATTENTION = next(s.name for s in STRATEGIES.values() if s.host_attends)  # the host attends instead of copying
BETA_GRID = 8  # a larger β is the next multiple of 1/8: points the β search (studies/search.py) also visits
LOSSY = next(s.name for s in STRATEGIES.values() if s.lossy)  # evict-only: what an exact strategy is measured against


@dataclass(frozen=True, slots=True)
class Measured:
    """One configuration simulated for the comparison, and what it served."""

    label: str  # what it is, for the verdict: "full at its largest fitting batch"
    strategy: str
    batch: int
    steps: int  # decode steps simulated
    hbm_ratio: float
    block_size: int
    step_ms: float
    throughput_tok_s: float
    hbm_peak_gb: float
    fits: bool
    attention_mass_lost: float  # evicted (and, for evict-only, dropped DDR-tier) share of the attention mass

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def measured(label: str, cfg: SimConfig, s: dict) -> Measured:
    """A Measured from a closed-loop summary of `cfg`."""
    return Measured(label, cfg.strategy, cfg.batch, cfg.decode_steps, cfg.policy.hbm_ratio, cfg.block_size,
                    s["step_ms_mean"],
                    s["throughput_tok_s"], s["hbm_peak_gb"], bool(s["fits"]), s["attention_mass_evicted"])


def run_summary(cfg: SimConfig, trace: Trace, workers: int | None) -> dict:
    """The closed-loop summary of `cfg` (no comparison of its own)."""
    return simulate_workload(cfg, run_workload(cfg, trace, workers)).summary


def capped_batch(cfg: SimConfig, batch: int) -> int:
    """`batch`, at most BATCH_CAP (or the run's batch when that is larger)."""
    return min(int(batch), max(cfg.batch, BATCH_CAP))


def feasible_full(cfg: SimConfig, summary: dict, trace: Trace, workers: int | None) -> tuple[Measured | None, list]:
    """`full` at the largest batch that fits, and every batch tried as (batch, HBM peak GB, fits).

    Starts from the summary's `max_batch_full` (per-slot peak scaled to the room left); a batch whose
    peak overflows is lowered to its own estimate, at most MAX_FULL_PROBES times. Only the batch that
    fits is simulated: `full` keeps no DDR tier, so its HBM follows from the workload's blocks alone.
    """
    full = replace(cfg, strategy=BASELINE.name)
    capacity = cfg.hardware.hbm_gb * GB
    batch, tried = capped_batch(cfg, summary["max_batch_full"]), []
    for _ in range(MAX_FULL_PROBES):
        if batch < 1:
            break
        if batch == cfg.batch:  # the run itself has full at this batch
            tried.append((batch, summary["hbm_peak_gb_full"], bool(summary["fits_full"])))
            if summary["fits_full"]:
                s = {"step_ms_mean": summary["step_ms_full_mean"], "throughput_tok_s": summary["throughput_tok_s_full"],
                     "hbm_peak_gb": summary["hbm_peak_gb_full"], "fits": True, "attention_mass_evicted": 0.0}
                return measured(_full_label(cfg, batch), replace(full, batch=batch), s), tried
            batch = min(int(summary["max_batch_full"]), batch - 1)
            continue
        c = replace(full, batch=batch)
        w = run_workload(c, trace, workers)
        zeros = np.zeros(len(w.totals))
        mem = account_memory(BASELINE, w, c, None, zeros, zeros)  # full's case reads no timeline
        peak = float(mem.hbm_bytes.max())
        tried.append((batch, peak / GB, peak <= capacity))
        if peak <= capacity:
            return measured(_full_label(cfg, batch), c, simulate_workload(c, w).summary), tried
        batch = min(max_batch(mem, batch, capacity), batch - 1)
    return None, tried


def _full_label(cfg: SimConfig, batch: int) -> str:
    return "full at its largest fitting batch" if batch < max(cfg.batch, BATCH_CAP) else \
        "full at the largest batch the comparison runs"


def alternatives(cfg: SimConfig, summary: dict, trace: Trace, workers: int | None) -> tuple[Measured | None, list]:
    """The cut-short extra runs: the strategy at its own largest fitting batch, and the alternatives at the run's
    batch (`alternative_configs`)."""
    cut = replace(cfg, steps=min(CUT_STEPS, cfg.decode_steps))
    s = cfg.strategy_record
    at_max = None
    if s.applies_policy and summary["max_batch"] >= 1 and capped_batch(cfg, summary["max_batch"]) != cfg.batch:
        c = replace(cut, batch=capped_batch(cfg, summary["max_batch"]))
        label = f"{cfg.strategy} at its largest fitting batch, {c.batch}" if c.batch == summary["max_batch"] else \
            f"{cfg.strategy} at batch {c.batch}, the most the comparison runs"
        at_max = measured(label, c, run_summary(c, trace, workers))
    return at_max, [measured(label, c, run_summary(c, trace, workers)) for label, c in alternative_configs(cut)]


def larger_beta(beta: float) -> float | None:
    """The next β of BETA_GRID above `beta` (None at 1): what keeping more of the cache in HBM buys."""
    return next((b for b in (k / BETA_GRID for k in range(1, BETA_GRID + 1)) if b > beta + 1e-9), None)


def other_block(cfg: SimConfig) -> SimConfig | None:
    """`cfg` with KV blocks twice as large and the same tiering unit (page_size), so the policy's schedules are
    the run's own (cached) and no replay is needed; None when that unit does not nest with the larger block."""
    try:
        return replace(cfg, block_size=2 * cfg.block_size)
    except TiersimError:
        return None


def alternative_configs(cut: SimConfig) -> list[tuple[str, SimConfig]]:
    """What a serving engineer would try next at the same batch, each a (label, config) of a cut-short run.

    The other side of the trade (`evict-only` for an exact strategy, `prefetch-layer` for `evict-only`, both for
    `full`), `cpu-attention` (the host attends over the DDR tier instead of copying it), and, for a strategy that
    applies the policy, a larger β (the next of BETA_GRID) and blocks twice as large.
    """
    s, batch = cut.strategy_record, cut.batch
    names = (EXACT_ALTERNATIVE, LOSSY) if not s.applies_policy else (EXACT_ALTERNATIVE,) if s.lossy else (LOSSY,)
    names += (CPU_ATTENTION,) if CPU_ATTENTION not in (*names, s.name) else ()
    out = [(f"{n} at batch {batch}", replace(cut, strategy=n)) for n in names]
    if not s.applies_policy:
        return out
    beta = larger_beta(cut.policy.hbm_ratio)
    if beta is not None:
        out.append((f"{s.name} at β={beta:g}, batch {batch}",
                    replace(cut, policy=replace(cut.policy, hbm_ratio=beta))))
    block = other_block(cut)
    if block is not None:
        out.append((f"{s.name} with {block.block_size}-token blocks at batch {batch}", block))
    return out


def comparison(cfg: SimConfig, summary: dict, trace: Trace | None = None, workers: int | None = None) -> dict:
    """The keys a closed-loop summary gains: `baseline`, `at_max_batch`, `alternatives`, `verdict`."""
    trace = read_run_trace(cfg.trace) if trace is None else trace
    full, tried = feasible_full(cfg, summary, trace, workers)
    at_max, others = alternatives(cfg, summary, trace, workers)
    base = baseline(cfg, summary, full, tried)
    return {"baseline": base, "at_max_batch": at_max.to_dict() if at_max else None,
            "alternatives": [m.to_dict() for m in others],
            "verdict": closed_loop_verdict(cfg, summary, full, at_max, others)}


def baseline(cfg: SimConfig, summary: dict, full: Measured | None, tried: list) -> dict:
    """`full` at the largest batch that fits (why that batch), and at the run's batch only when that fits too."""
    cap = summary["hbm_capacity_gb"]
    same = None
    if summary["fits_full"]:
        same = {"batch": cfg.batch, "step_ms": summary["step_ms_full_mean"],
                "throughput_tok_s": summary["throughput_tok_s_full"], "hbm_peak_gb": summary["hbm_peak_gb_full"]}
    at = (f"full needs {summary['hbm_peak_gb_full']:.1f} of {cap:g} GB of HBM at batch {cfg.batch}"
          if not summary["fits_full"] else f"full fits batch {cfg.batch} ({summary['hbm_peak_gb_full']:.1f} GB)")
    if full is None:
        why = (f"{at}, and no batch fits: the weights ({summary['weights_gb']:.1f} GB) and the reserve "
               f"({summary['reserve_gb']:.1f} GB) leave no room" if summary["max_batch_full"] < 1 else
               f"{at}; batches tried ({', '.join(str(b) for b, _, _ in tried)}) all overflow HBM")
        return {"strategy": BASELINE.name, "batch": 0, "steps": cfg.decode_steps, "step_ms": None,
                "throughput_tok_s": None, "hbm_peak_gb": None, "fits": False, "why": why, "same_batch": same,
                "batches_tried": [b for b, _, _ in tried]}
    if full.batch < max(cfg.batch, BATCH_CAP):
        why = f"{at}; its largest batch that fits is {full.batch} ({full.hbm_peak_gb:.1f} GB at its peak)"
    else:
        why = f"{at}; it fits batch {full.batch}, the most the comparison runs ({full.hbm_peak_gb:.1f} GB at its peak)"
    return {**{k: v for k, v in full.to_dict().items() if k not in ("label", "hbm_ratio", "block_size", "attention_mass_lost")},
            "why": why, "same_batch": same, "batches_tried": [b for b, _, _ in tried]}


def relative(a: float, b: float) -> str:
    """How `a` compares to `b`: '96% less', '2.3× as much', 'level with'."""
    if not b or not math.isfinite(a / b):
        return "not comparable with"
    ratio = a / b
    if abs(ratio - 1) < 0.005:
        return "level with"
    if ratio >= 2:
        return f"{ratio:.1f}× as much as"
    return f"{100 * abs(ratio - 1):.0f}% {'more' if ratio > 1 else 'less'} than"


def _served(m: Measured) -> str:
    return f"{m.throughput_tok_s:,.0f} tokens/s at {m.step_ms:.1f} ms per step"


def closed_loop_verdict(cfg: SimConfig, s: dict, full: Measured | None, at_max: Measured | None,
                        others: list[Measured]) -> str:
    """Two sentences: fits or not and the throughput against the fair baseline; the best alternative measured."""
    name, batch, cap = cfg.strategy, cfg.batch, s["hbm_capacity_gb"]
    fits = f"fits ({s['hbm_peak_gb']:.1f} GB)" if s["fits"] else f"does not fit either ({s['hbm_peak_gb']:.1f} GB)"
    full_at = (f"full fits ({s['hbm_peak_gb_full']:.1f} of {cap:g} GB of HBM)" if s["fits_full"] else
               f"full does not fit ({s['hbm_peak_gb_full']:.1f} GB against {cap:g} GB of HBM)")
    base = f"{full.label}, {full.batch} ({_served(full)})" if full is not None else "full, which fits no batch"
    if not cfg.strategy_record.applies_policy:
        first = f"At batch {batch}, {full_at}; the baseline is {base}."
    elif s["fits_full"]:
        first = (f"At batch {batch} both fit ({s['hbm_peak_gb']:.1f} and {s['hbm_peak_gb_full']:.1f} of {cap:g} GB "
                 f"of HBM); at this equal load {name} takes {s['step_ms_mean']:.1f} ms per step against full's "
                 f"{s['step_ms_full_mean']:.1f} ms and serves {s['throughput_tok_s']:,.0f} tokens/s, "
                 f"{relative(s['throughput_tok_s'], s['throughput_tok_s_full'])} full")
        first += f"; {base}." if full is not None and full.batch != batch else "."
    else:
        vs = f", {relative(s['throughput_tok_s'], full.throughput_tok_s)} {base}" if full is not None else \
            f"; {base}"
        first = (f"At batch {batch}, {full_at} and {name} {fits}, serving {s['throughput_tok_s']:,.0f} tokens/s at "
                 f"{s['step_ms_mean']:.1f} ms per step{vs}.")
    runs = [m for m in (at_max, *others) if m is not None]
    if not runs:
        return first
    cut = f"{min(m.steps for m in runs)}-step runs"
    best = max((m for m in (full, *runs) if m is not None and m.fits), key=lambda m: m.throughput_tok_s, default=None)
    rest = "; ".join(_briefly(m, short=True) for m in runs if m is not best)
    if best is None:
        return f"{first} Nothing else measured fits ({cut}): {rest}."
    if best is full:
        return f"{first} None of the other runs ({cut}) serves more: {rest}."
    return (f"{first} The best alternative measured ({cut}) is {best.label}: {_briefly(best, False)}"
            + (f"; the others: {rest}." if rest else "."))


def _briefly(m: Measured, label: bool = True, short: bool = False) -> str:
    """'evict-only at batch 256: 9,949 tokens/s at 25.7 ms per step, losing 10.1% of the attention mass';
    `short`: 'evict-only at batch 256: 9,949 tokens/s (loses 10.1% of the attention mass)', the runs after the best."""
    lossy = get_strategy(m.strategy).lossy
    if short:
        notes = [n for n, on in (("does not fit", not m.fits),
                                 (f"loses {100 * m.attention_mass_lost:.1f}% of the attention mass", lossy)) if on]
        return f"{m.label}: {m.throughput_tok_s:,.0f} tokens/s" + (f" ({', '.join(notes)})" if notes else "")
    lost = f", losing {100 * m.attention_mass_lost:.1f}% of the attention mass" if lossy else ""
    return (f"{m.label}: " if label else "") + _served(m) + ("" if m.fits else " but does not fit") + lost


def open_loop_verdict(load: str, slo: tuple[float, float], serving: dict[str, dict], chosen: str,
                      rate_basis: str) -> str:
    """Two sentences: goodput of full and of the chosen strategy at this load; every strategy's sustainable rate."""
    ttft, tpot = slo

    def at_load(name: str) -> str:
        m = serving[name]
        share = "no outcome known" if m["goodput_share"] is None else f"{100 * m['goodput_share']:.0f}%"
        tp = "no finished request" if m["tpot_ms_p50"] is None else f"TPOT p50 {m['tpot_ms_p50']:.1f} ms"
        return f"{name} {share} ({tp}, {m['throughput_tok_s']:,.0f} tokens/s)"

    names = [BASELINE.name] + ([chosen] if chosen != BASELINE.name and chosen in serving else [])
    first = (f"At {load}, the share of requests within the SLO (TTFT <= {ttft:g} ms, TPOT <= {tpot:g} ms) is: "
             + ", ".join(at_load(n) for n in names))
    rest = [n for n in serving if n not in names]
    if rest:
        best = max(rest, key=lambda n: serving[n]["goodput_share"] or 0.0)
        first += f"; the best of the others is {at_load(best)}"
    rates = {n: m.get("max_sustainable_rate_req_s") for n, m in serving.items()}
    if all(r is None for r in rates.values()):
        return first + "."
    top = max(rates, key=lambda n: rates[n] or 0.0)
    listed = ", ".join(f"{n} {r:.3g}" if r else f"{n} none" for n, r in rates.items() if r is not None)
    return (f"{first}. Maximum sustainable rate ({rate_basis}), in req/s: {listed}; the highest is {top}'s"
            + (f", {relative(rates[top], rates[BASELINE.name])} full's." if top != BASELINE.name and
               rates.get(BASELINE.name) else "."))
