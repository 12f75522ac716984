"""`simulate`: one configuration in, a summary, a per-step table and a timeline out.

Steps: take the batch's workload (workload/demand.py: policy once per trace request, per-step
totals over the batch), turn it into a StepPlan for the chosen strategy with the cost model, draw
its timeline (sim/recurrence.py: the exact recurrence, SimPy where it does not reach), account HBM
and DDR per step, and compare against the `full` strategy on the same hardware and batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from tiersim.sim import recurrence
from tiersim.sim.config import SimConfig
from tiersim.sim.copies import mean_piece_bytes
from tiersim.sim.costs import GB, CostModel
from tiersim.sim.engine import StepPlan, Timeline
from tiersim.sim.memory import Memory, account_memory, max_batch
from tiersim.sim.plan import bound_s, choose_copy, collectives_ms_per_step, make_plan
from tiersim.strategy import BASELINE
from tiersim.traces.format import Trace
from tiersim.workload.build import Workload, block_totals
from tiersim.workload.demand import run_workload

if TYPE_CHECKING:
    import pandas as pd


@dataclass(slots=True)
class SimResult:
    """The outcome of `simulate`: summary (the JSON), per-step table, and the raw pieces behind them.

    `steps` (a DataFrame, one row per decode step) is built from `step_columns` on first use, so a run
    whose caller reads only the summary never imports pandas (about 0.3 s of a cold `tiersim simulate`).
    """

    summary: dict
    step_columns: dict[str, np.ndarray]  # the steps table's columns, in its order
    timeline: Timeline
    timeline_full: Timeline
    memory: Memory
    memory_full: Memory
    workload: Workload
    _steps: pd.DataFrame | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def steps(self) -> pd.DataFrame:
        """One row per decode step of the batch (times in ms, sizes in bytes)."""
        if self._steps is None:
            import pandas as pd

            self._steps = pd.DataFrame(self.step_columns)
        return self._steps


def simulate(cfg: SimConfig, trace: Trace | None = None, workers: int | None = None, *,
             compare: bool = False) -> SimResult:
    """Run one configuration and its `full` baseline; return summary, per-step table and timelines.

    `trace` overrides `cfg.trace` (already read); `workers` processes replay the policy over the
    trace requests (default: one per core). `compare` adds the fair baseline and the verdict
    (sim/verdict.py: `full` at its largest fitting batch, two cut-short alternatives); studies that
    simulate many points leave it off.
    """
    wall = time.perf_counter()
    result = simulate_workload(cfg, run_workload(cfg, trace, workers))
    if compare:
        from tiersim.sim.verdict import comparison  # verdict.py builds on simulate_workload: imported when used

        result.summary.update(comparison(cfg, result.summary, trace, workers))
    result.summary["sim_wall_s"] = time.perf_counter() - wall
    return result


def simulate_workload(cfg: SimConfig, w: Workload) -> SimResult:
    """Plan, run and account one configuration over a built workload, and its `full` baseline beside it."""
    wall = time.perf_counter()
    cost = CostModel(cfg.model, cfg.hardware, cfg.pinned, cfg.fixed_compute_ms, cfg.weight_bits, share=cfg.share)
    blocks = block_totals(w, cfg.block_size)
    method, estimates = choose_copy(w, cost, cfg, blocks)
    cost = replace(cost, copy=method)
    plan, layer_bytes, demoted = make_plan(cfg.strategy, w, cost, cfg, blocks)
    tl = recurrence.timeline(plan)
    mem = account_memory(cfg.strategy, w, cfg, tl, layer_bytes, demoted, blocks)
    if not plan.strategy.applies_policy:
        plan_full, tl_full, mem_full = plan, tl, mem
    else:
        plan_full, lb, dm = make_plan(BASELINE, w, cost, cfg, blocks)
        tl_full = recurrence.timeline(plan_full)
        mem_full = account_memory(BASELINE, w, cfg, tl_full, lb, dm, blocks)
    steps = step_columns(w, plan, tl, mem, layer_bytes, demoted)
    summary = summarize(cfg, w, plan, tl, mem, tl_full, mem_full, steps)
    summary["copy_method_estimates_ms"] = estimates  # auto: each candidate's mean estimated step
    summary.update(collectives_ms_per_step(w, cost, cfg))  # TP all-reduce and EP all-to-all, inside compute_ms
    summary["sim_wall_s"] = time.perf_counter() - wall
    summary["sim_events"] = tl.events + (tl_full.events if tl_full is not tl else 0)
    # Which engine drew the timelines (sim/recurrence.py: the exact recurrence, or SimPy where it does not reach).
    summary["timeline_engine"] = tl.engine if tl_full.engine == tl.engine else f"{tl.engine} (full: {tl_full.engine})"
    return SimResult(summary, steps, tl, tl_full, mem, mem_full, w)


def step_columns(w: Workload, plan: StepPlan, tl: Timeline, mem: Memory, layer_bytes,
                 demoted) -> dict[str, np.ndarray]:
    """The per-step table's columns, one value per decode step (times in ms, sizes in bytes); SimResult.steps."""
    c = w.column
    h2d_bytes = plan.layers * layer_bytes if plan.strategy.prefetches else np.zeros(plan.steps)
    transfer = tl.h2d_busy_s + tl.d2h_busy_s
    zeros = np.zeros(plan.steps)
    h2d_pieces = zeros if plan.h2d_pieces is None else plan.h2d_pieces
    d2h_pieces = zeros if plan.d2h_pieces is None else plan.d2h_pieces
    per_piece = lambda b, n: np.divide(b, n, out=np.zeros(plan.steps), where=n > 0)  # noqa: E731
    return {
        "step": np.arange(plan.steps),
        "time_ms": tl.end_s * 1e3,
        "step_ms": tl.step_s * 1e3,
        "compute_ms": tl.compute_s * 1e3,
        "stall_ms": tl.stall_s * 1e3,
        "interference_ms": tl.interference_s * 1e3,
        "hidden_transfer_ms": np.maximum(0.0, transfer - tl.stall_s) * 1e3,
        "h2d_ms": tl.h2d_busy_s * 1e3,
        "d2h_ms": tl.d2h_busy_s * 1e3,
        "h2d_bytes": h2d_bytes,
        "d2h_bytes": demoted,
        "copy_method": np.full(plan.steps, plan.copy_method, dtype=object),
        "h2d_pieces": h2d_pieces,
        "h2d_piece_bytes": per_piece(h2d_bytes, h2d_pieces),
        "d2h_pieces": d2h_pieces,
        "d2h_piece_bytes": per_piece(demoted, d2h_pieces),
        "hbm_bytes": mem.hbm_bytes,
        "ddr_bytes": mem.ddr_bytes,
        "staging_bytes": mem.staging_bytes,
        "hbm_tokens": c("hbm"),
        "ddr_tokens": c("ddr"),
        "compressed_tokens": c("compressed"),
        "evicted_tokens": c("evicted"),
        "decode_slots": c("decode"),
        "prefill_slots": c("prefill"),
    }


def summarize(cfg: SimConfig, w: Workload, plan: StepPlan, tl: Timeline, mem: Memory, tl_full: Timeline,
              mem_full: Memory, steps: dict[str, np.ndarray]) -> dict:
    """The JSON summary (GB = 1e9 bytes, times in ms)."""
    c, s = w.column, cfg.strategy_record
    step_ms = tl.step_s * 1e3
    total_s = float(tl.step_s.sum())
    capacity = cfg.hardware.hbm_gb * GB
    transfer_s = float((tl.h2d_busy_s + tl.d2h_busy_s).sum())
    compute_s = float(tl.compute_s.sum())
    mass = {t: float(c(f"mass_{t}").sum()) for t in ("hbm", "ddr", "compressed", "evicted")}
    if not s.applies_policy:  # no tiering: every token stays in HBM at full precision
        mass = {"hbm": sum(mass.values()), "ddr": 0.0, "compressed": 0.0, "evicted": 0.0}
    mass_total = sum(mass.values()) or 1.0
    lost = mass["evicted"] + (mass["ddr"] if s.lossy else 0.0)
    tokens_out = float((c("decode") + c("prefill")).sum())
    peak, peak_full = float(mem.hbm_bytes.max()), float(mem_full.hbm_bytes.max())
    return {
        "hbm_peak_gb": peak / GB,
        "hbm_peak_gb_full": peak_full / GB,
        "hbm_saved_gb": (peak_full - peak) / GB,
        # The saving split: what freeing only the evicted tokens' blocks would give, and what offloading adds to it.
        "hbm_saved_evict_gb": (peak_full - float(mem.kept_bytes.max())) / GB,
        "hbm_saved_offload_gb": (float(mem.kept_bytes.max()) - peak) / GB,
        "ddr_peak_gb": float(mem.ddr_bytes.max()) / GB,
        "hbm_capacity_gb": cfg.hardware.hbm_gb,
        "weights_gb": cfg.weight_bytes / GB,
        "reserve_gb": cfg.reserve_frac * capacity / GB,
        "fits": peak <= capacity,
        "fits_full": peak_full <= capacity,
        "max_batch": max_batch(mem, cfg.batch, capacity),
        "max_batch_full": max_batch(mem_full, cfg.batch, capacity),
        "step_ms_mean": float(step_ms.mean()),
        "step_ms_p50": float(np.percentile(step_ms, 50)),
        "step_ms_p99": float(np.percentile(step_ms, 99)),
        "step_ms_full_mean": float(tl_full.step_s.mean() * 1e3),
        "overhead_pct": 100.0 * (float(tl.step_s.mean()) / float(tl_full.step_s.mean()) - 1.0),
        "transfer_overhead_pct_paper": 100.0 * transfer_s / (transfer_s + compute_s) if transfer_s + compute_s else 0.0,
        "compute_ms_mean": compute_s * 1e3 / plan.steps,
        "stall_ms_mean": float(tl.stall_s.mean() * 1e3),
        "interference_ms_mean": float(tl.interference_s.mean() * 1e3),
        "copy_method": plan.copy_method,
        "h2d_pieces_per_step": float(np.mean(steps["h2d_pieces"])),
        "h2d_piece_bytes": mean_piece_bytes(steps["h2d_bytes"], steps["h2d_pieces"]),
        "d2h_pieces_per_step": float(np.mean(steps["d2h_pieces"])),
        "d2h_piece_bytes": mean_piece_bytes(steps["d2h_bytes"], steps["d2h_pieces"]),
        "host_ddr_gbps_per_gpu": cfg.hardware.host_ddr_gbps_per_gpu()[0],
        "host_ddr_basis": cfg.hardware.host_ddr_gbps_per_gpu()[1],
        "hidden_transfer_ms_mean": float(np.mean(steps["hidden_transfer_ms"])),
        "bound_step_ms": float(bound_s(plan).mean() * 1e3),
        "throughput_tok_s": tokens_out / total_s if total_s else 0.0,
        "throughput_tok_s_full": tokens_out / float(tl_full.step_s.sum()),
        "h2d_gb_per_step": float(np.mean(steps["h2d_bytes"])) / GB,
        "d2h_gb_per_step": float(np.mean(steps["d2h_bytes"])) / GB,
        "link_util_h2d": float(tl.h2d_busy_s.sum()) / total_s if total_s else 0.0,
        "link_util_d2h": float(tl.d2h_busy_s.sum()) / total_s if total_s else 0.0,
        "evicted_frac": 0.0 if not s.applies_policy else float(c("evicted").sum() / c("tokens").sum()),
        "attention_mass_evicted": lost / mass_total,
        "attention_mass_ddr": mass["ddr"] / mass_total,
        "attention_mass_compressed": mass["compressed"] / mass_total,
        "ddr_tokens_per_slot_step": float(c("ddr").sum() / max(1.0, c("decode").sum())),
        "tokens_captured": w.captured_tokens,
        "tokens_synthetic": w.synthetic_tokens,
        "trace_model": w.trace_model,
        "synthetic_share": w.synthetic_tokens / max(1, w.captured_tokens + w.synthetic_tokens),
        "gpus": cfg.share.gpus,
        "weights_dtype": cfg.share.weights_label,
        "requests_started": w.requests_started,
        "requests_finished": w.requests_finished,
        # The profile's measured error band (validate --suite), None for an unvalidated (datasheet) profile.
        "error_bar_pct": cfg.hardware.error_bar(s.name)[0],
        "validated_on": cfg.hardware.error_bar(s.name)[1],
        "config": cfg.to_dict(),
    }


def largest_fitting_batch(summary: dict) -> str:
    """One line on capacity, for the CLI: the largest batch that fits for full and for the tiered strategy."""
    return (f"fits: {summary['fits']} (full: {summary['fits_full']}); largest batch that fits: "
            f"{summary['max_batch']} tiered, {summary['max_batch_full']} full")

