"""`simulate`: one configuration in, a summary, a per-step table and a timeline out.

Steps: build the workload (policy once per trace request, per-step totals over the batch), turn
it into a StepPlan for the chosen strategy with the cost model, run the SimPy model, account HBM
and DDR per step, and compare against the `full` strategy on the same hardware and batch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tiersim.errors import TiersimError
from tiersim.policy import PolicyConfig
from tiersim.sim import engine
from tiersim.sim.costs import GB, CostModel
from tiersim.sim.engine import STRATEGIES, StepPlan, Timeline
from tiersim.specs import HardwareSpec, ModelSpec
from tiersim.traces.format import Trace, read_trace
from tiersim.traces.synth import SynthParams
from tiersim.workload import cache
from tiersim.workload.build import Workload, build_workload

# vLLM's default gpu_memory_utilization is 0.9: 10% of HBM is left to the CUDA context, the
# allocator and activations (https://docs.vllm.ai/en/latest/api/vllm/config/cache.html).
DEFAULT_RESERVE_FRAC = 0.10


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Every input of one simulation, resolved."""

    model: ModelSpec
    hardware: HardwareSpec
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    trace: Path | None = None  # None: the embedded default trace
    strategy: str = "prefetch-layer"
    depth: int = 2
    batch: int = 256
    gen_tokens: int = 4096
    steps: int | None = None  # decode steps of the batch; None: gen_tokens
    cold_start: bool = False
    pinned: bool = True
    seed: int = 0
    reserve_frac: float = DEFAULT_RESERVE_FRAC
    fixed_compute_ms: float | None = None  # replace the compute roofline by a fixed time per decode step
    weight_bits: int | None = None  # weights stored at 8 or 4 bits (KV stays at the model's dtype); None: model dtype

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise TiersimError(f"strategy {self.strategy!r} unknown; accepted: {', '.join(STRATEGIES)}")
        for name, low in (("depth", 1), ("batch", 1), ("gen_tokens", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise TiersimError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise TiersimError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not 0.0 <= self.reserve_frac < 1.0:
            raise TiersimError(f"reserve_frac must lie in [0, 1), got {self.reserve_frac!r}")
        if self.fixed_compute_ms is not None and not self.fixed_compute_ms > 0:
            raise TiersimError(f"fixed_compute_ms must be > 0, got {self.fixed_compute_ms!r}")
        if self.weight_bits not in (None, 4, 8, 16, 32):
            raise TiersimError(f"weight_bits must be 4, 8, 16 or 32 (or unset), got {self.weight_bits!r}")

    @property
    def weight_bytes(self) -> float:
        """Bytes of the model's weights as stored."""
        return self.model.weight_bytes if self.weight_bits is None else self.model.weight_bytes_at(self.weight_bits)

    @property
    def decode_steps(self) -> int:
        """Decode steps of the batch that the run covers."""
        return self.gen_tokens if self.steps is None else self.steps

    def to_dict(self) -> dict:
        """Every input, resolved, for the summary."""
        return {
            "model": self.model.to_dict(), "hardware": self.hardware.to_dict(), "policy": self.policy.to_dict(),
            "trace": str(self.trace) if self.trace else None, "strategy": self.strategy, "depth": self.depth,
            "batch": self.batch, "gen_tokens": self.gen_tokens, "steps": self.decode_steps,
            "cold_start": self.cold_start, "pinned": self.pinned, "seed": self.seed,
            "reserve_frac": self.reserve_frac, "fixed_compute_ms": self.fixed_compute_ms,
            "weight_bits": self.weight_bits,
        }


@dataclass(frozen=True, slots=True)
class Memory:
    """HBM and DDR bytes per step for one strategy."""

    fixed_bytes: float  # weights + reserve
    hbm_bytes: np.ndarray  # everything on the GPU, fixed part included
    ddr_bytes: np.ndarray
    staging_bytes: np.ndarray
    inflight_bytes: np.ndarray  # demoted KV still in HBM because its D2H copy has not finished


@dataclass(slots=True)
class SimResult:
    """The outcome of `simulate`: summary (the JSON), per-step table, and the raw pieces behind them."""

    summary: dict
    steps: pd.DataFrame
    timeline: Timeline
    timeline_full: Timeline
    memory: Memory
    memory_full: Memory
    workload: Workload


def compressed_factor(policy: PolicyConfig, model: ModelSpec) -> float:
    """Bytes of a compressed token relative to full precision: bits/(8·dtype bytes) plus one fp16 scale per head."""
    return policy.compressed_bits / (8 * model.dtype_bytes) + 2 / (model.head_dim * model.dtype_bytes)


def make_plan(strategy: str, w: Workload, cost: CostModel, cfg: SimConfig) -> tuple[StepPlan, np.ndarray, np.ndarray]:
    """Durations of every piece of work of every step for one strategy; also per-layer H2D and demoted bytes."""
    m, c = cost.model, w.column
    cf = compressed_factor(cfg.policy, m)
    kvl = m.kv_bytes_per_token_layer
    decode_hbm = c("hbm") - c("prefill_tokens")
    if strategy == "full":
        gpu_tokens = pairs = c("tokens") - c("prefill_tokens")
    elif strategy in ("evict-only", "cpu-attention"):
        gpu_tokens, pairs = decode_hbm + cf * c("compressed"), decode_hbm + c("compressed")
    else:
        gpu_tokens = decode_hbm + c("ddr") + cf * c("compressed")
        pairs = decode_hbm + c("ddr") + c("compressed")
    new_tokens = c("decode") + c("prefill_tokens")
    zeros = np.zeros(len(w.totals))
    if cfg.fixed_compute_ms is not None:
        matmul_s = np.full(len(zeros), cfg.fixed_compute_ms * 1e-3 / m.layers)
        attention_s, head_s = zeros, zeros
    else:
        matmul_s = cost.matmul_s(new_tokens) + cost.launch_s
        attention_s = cost.attention_s(gpu_tokens * kvl, pairs + c("prefill_pairs") / 2)
        head_s = cost.head_s(c("decode") + c("prefill"))
    tiered = strategy in ("prefetch-sync", "prefetch-layer", "cpu-attention")
    # Re-tier traffic decided at the end of step k-1 lands in step k.
    promoted_tokens = np.concatenate([[0.0], (c("ddr_to_hbm") + cf * c("ddr_to_compressed"))[:-1]])
    demoted_bytes = (c("hbm_to_ddr") + cf * c("compressed_to_ddr")) * m.kv_bytes_per_token if tiered else zeros
    layer_bytes = (c("ddr") + promoted_tokens) * kvl
    if strategy in ("prefetch-layer", "prefetch-sync"):
        # One copy per layer on the copy stream, or every layer's copies back to back before the forward pass.
        copies = m.layers if strategy == "prefetch-sync" else 1
        b = layer_bytes * copies
        h2d, h2d_dup = cost.fetch_s(b, copies), cost.fetch_s(b, copies, duplex=True)
    else:
        h2d = h2d_dup = zeros
    if strategy == "cpu-attention":
        # Promotions decided at the end of step k are copied in right away, beside the next step's work.
        bulk = (c("ddr_to_hbm") + cf * c("ddr_to_compressed")) * m.kv_bytes_per_token
        bulk_s, bulk_dup = cost.fetch_s(bulk), cost.fetch_s(bulk, duplex=True)
        with_host = c("ddr") > 0
        query_bytes = np.where(with_host, c("decode") * m.attention_heads * m.head_dim * m.dtype_bytes, 0.0)
        partial_bytes = np.where(with_host, c("decode") * m.attention_heads * (m.head_dim + 1) * 4, 0.0)
        query_s, partial_s = cost.d2h_s(query_bytes), cost.h2d_s(partial_bytes)
        host_s = cost.host_attention_s(c("ddr") * kvl)
    else:
        bulk_s = bulk_dup = query_s = host_s = partial_s = zeros
    return StepPlan(
        strategy=strategy, layers=m.layers, depth=cfg.depth, matmul_s=matmul_s, attention_s=attention_s,
        head_s=head_s, qkv_share=cost.qkv_share(), h2d_layer_s=h2d, h2d_layer_duplex_s=h2d_dup,
        h2d_bulk_s=bulk_s, h2d_bulk_duplex_s=bulk_dup, d2h_bulk_s=cost.d2h_s(demoted_bytes),
        d2h_bulk_duplex_s=cost.d2h_s(demoted_bytes, duplex=True), query_d2h_s=query_s, host_attention_s=host_s,
        partial_h2d_s=partial_s,
    ), layer_bytes, demoted_bytes


def account_memory(strategy: str, w: Workload, cfg: SimConfig, tl: Timeline, layer_bytes: np.ndarray,
                   demoted_bytes: np.ndarray) -> Memory:
    """HBM and DDR occupancy per step: weights, reserve, resident KV, staging buffers, demotions in flight."""
    m, c = cfg.model, w.column
    fixed = cfg.weight_bytes + cfg.reserve_frac * cfg.hardware.hbm_gb * GB
    kvt = m.kv_bytes_per_token
    zeros = np.zeros(len(w.totals))
    if strategy == "full":
        return Memory(fixed, fixed + c("tokens") * kvt, zeros, zeros, zeros)
    resident = (c("hbm") + compressed_factor(cfg.policy, m) * c("compressed")) * kvt
    if strategy == "prefetch-layer":
        staging = (cfg.depth + 1) * layer_bytes
    elif strategy == "prefetch-sync":
        staging = m.layers * layer_bytes
    elif strategy == "cpu-attention":
        staging = c("decode") * m.attention_heads * (m.head_dim * m.dtype_bytes + (m.head_dim + 1) * 4)
    else:
        staging = zeros
    inflight = np.zeros(len(zeros) + 1)
    for j in np.flatnonzero(demoted_bytes > 0):
        # Issued at the end of step j; still resident at the start of each later step it has not finished by.
        last = int(np.searchsorted(tl.start_s, tl.d2h_done_s[j], side="left"))
        inflight[j + 1: max(j + 1, last)] += demoted_bytes[j]
    inflight = inflight[:-1]
    ddr = c("ddr") * kvt if strategy != "evict-only" else zeros
    return Memory(fixed, fixed + resident + staging + inflight, ddr, staging, inflight)


def bound_s(plan: StepPlan) -> np.ndarray:
    """Analytic lower bound of each step: compute, plus whatever transfer it cannot hide."""
    compute = plan.layers * plan.layer_s + plan.head_s
    if plan.strategy == "prefetch-sync":
        return compute + plan.h2d_layer_s
    if plan.strategy == "prefetch-layer":
        return np.maximum(compute, np.maximum(plan.layers * plan.h2d_layer_s, plan.d2h_bulk_s))
    if plan.strategy == "cpu-attention":
        host = plan.layers * (plan.query_d2h_s + plan.host_attention_s + plan.partial_h2d_s)
        return np.maximum(compute, np.maximum(host, plan.d2h_bulk_s))
    return compute


def max_batch(memory: Memory, batch: int, capacity_bytes: float) -> int:
    """Largest batch whose peak fits, scaling this run's per-slot peak share (KV, staging, in-flight)."""
    room = capacity_bytes - memory.fixed_bytes
    per_slot = (memory.hbm_bytes.max() - memory.fixed_bytes) / batch
    if room <= 0:
        return 0
    return int(room // per_slot) if per_slot > 0 else batch


def _resolve_trace(cfg: SimConfig) -> Trace:
    if cfg.trace is not None:
        trace = read_trace(cfg.trace)
    else:
        from tiersim.traces.default import default_trace_path

        trace = read_trace(default_trace_path())
    check_trace_model(trace)
    return trace


def check_trace_model(trace: Trace) -> None:
    """The trace must say which model its attention came from, with a readable shape."""
    model = trace.model
    shape = model.get("shape") if isinstance(model, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("id"), str) or not isinstance(shape, dict):
        raise TiersimError(f"{trace.path}: the trace header's model is unreadable (need an id and a shape mapping), "
                           f"got {model!r:.120}")
    bad = [k for k, v in shape.items() if not (isinstance(v, int) and not isinstance(v, bool) and v > 0)
           and k in ("layers", "heads", "attention_heads", "kv_heads", "head_dim", "hidden", "vocab")]
    if bad:
        raise TiersimError(f"{trace.path}: the trace header's model shape has unreadable {', '.join(bad)}: {shape!r:.120}")


def continuation_params(trace: Trace) -> SynthParams:
    """Synthetic-generator parameters for extending this trace's requests.

    A synthetic trace carries its own; a captured one is fitted once (tiersim.traces.fit) and the
    fit kept: beside the trace as TRACE.fit.json when shipped that way (the embedded default),
    else in the cache.
    """
    synthetic = trace.metadata.get("synthetic") if isinstance(trace.metadata, dict) else None
    names = SynthParams.__dataclass_fields__
    if synthetic:
        return SynthParams(**{k: v for k, v in synthetic.items() if k in names})
    beside = trace.path.with_name(trace.path.stem + ".fit.json")
    key = cache.trace_key(trace)
    if beside.exists():
        shipped = json.loads(beside.read_text())
        if shipped.get("trace_key") == key:
            return SynthParams(**{k: v for k, v in shipped["params"].items() if k in names})
    params = cache.load_fit(key)
    if params is None:
        from tiersim.traces.fit import fit_synth_params

        report = fit_synth_params(trace)
        params = report.params
        cache.store_fit(key, params, report.to_dict())
    return params


def simulate(cfg: SimConfig, trace: Trace | None = None, workers: int | None = None) -> SimResult:
    """Run one configuration and its `full` baseline; return summary, per-step table and timelines.

    `workers` processes replay the policy over the trace requests (default: one per core).
    """
    wall = time.perf_counter()
    if trace is None:
        trace = _resolve_trace(cfg)
    else:
        check_trace_model(trace)
    w = build_workload(trace, cfg.policy, cfg.gen_tokens, cfg.batch, cfg.decode_steps, cfg.seed, cfg.cold_start,
                       continuation_params(trace), workers)
    cost = CostModel(cfg.model, cfg.hardware, cfg.pinned, cfg.fixed_compute_ms, cfg.weight_bits)
    plan, layer_bytes, demoted = make_plan(cfg.strategy, w, cost, cfg)
    tl = engine.run(plan)
    mem = account_memory(cfg.strategy, w, cfg, tl, layer_bytes, demoted)
    if cfg.strategy == "full":
        plan_full, tl_full, mem_full = plan, tl, mem
    else:
        plan_full, lb, dm = make_plan("full", w, cost, cfg)
        tl_full = engine.run(plan_full)
        mem_full = account_memory("full", w, cfg, tl_full, lb, dm)
    steps = step_table(w, plan, tl, mem, layer_bytes, demoted)
    summary = summarize(cfg, w, plan, tl, mem, tl_full, mem_full, steps)
    summary["sim_wall_s"] = time.perf_counter() - wall
    summary["sim_events"] = tl.events + (tl_full.events if tl_full is not tl else 0)
    return SimResult(summary, steps, tl, tl_full, mem, mem_full, w)


def step_table(w: Workload, plan: StepPlan, tl: Timeline, mem: Memory, layer_bytes, demoted) -> pd.DataFrame:
    """One row per decode step of the batch (times in ms, sizes in bytes)."""
    c = w.column
    prefetching = plan.strategy in ("prefetch-sync", "prefetch-layer")
    h2d_bytes = plan.layers * layer_bytes if prefetching else np.zeros(plan.steps)
    transfer = tl.h2d_busy_s + tl.d2h_busy_s
    return pd.DataFrame({
        "step": np.arange(plan.steps),
        "time_ms": tl.end_s * 1e3,
        "step_ms": tl.step_s * 1e3,
        "compute_ms": tl.compute_s * 1e3,
        "stall_ms": tl.stall_s * 1e3,
        "hidden_transfer_ms": np.maximum(0.0, transfer - tl.stall_s) * 1e3,
        "h2d_ms": tl.h2d_busy_s * 1e3,
        "d2h_ms": tl.d2h_busy_s * 1e3,
        "h2d_bytes": h2d_bytes,
        "d2h_bytes": demoted,
        "hbm_bytes": mem.hbm_bytes,
        "ddr_bytes": mem.ddr_bytes,
        "staging_bytes": mem.staging_bytes,
        "hbm_tokens": c("hbm"),
        "ddr_tokens": c("ddr"),
        "compressed_tokens": c("compressed"),
        "evicted_tokens": c("evicted"),
        "decode_slots": c("decode"),
        "prefill_slots": c("prefill"),
    })


def summarize(cfg: SimConfig, w: Workload, plan: StepPlan, tl: Timeline, mem: Memory, tl_full: Timeline,
              mem_full: Memory, steps: pd.DataFrame) -> dict:
    """The JSON summary (GB = 1e9 bytes, times in ms)."""
    c = w.column
    step_ms = tl.step_s * 1e3
    total_s = float(tl.step_s.sum())
    capacity = cfg.hardware.hbm_gb * GB
    transfer_s = float((tl.h2d_busy_s + tl.d2h_busy_s).sum())
    compute_s = float(tl.compute_s.sum())
    mass = {t: float(c(f"mass_{t}").sum()) for t in ("hbm", "ddr", "compressed", "evicted")}
    if cfg.strategy == "full":  # no tiering: every token stays in HBM at full precision
        mass = {"hbm": sum(mass.values()), "ddr": 0.0, "compressed": 0.0, "evicted": 0.0}
    mass_total = sum(mass.values()) or 1.0
    lost = mass["evicted"] + (mass["ddr"] if cfg.strategy == "evict-only" else 0.0)
    tokens_out = float((c("decode") + c("prefill")).sum())
    peak, peak_full = float(mem.hbm_bytes.max()), float(mem_full.hbm_bytes.max())
    return {
        "hbm_peak_gb": peak / GB,
        "hbm_peak_gb_full": peak_full / GB,
        "hbm_saved_gb": (peak_full - peak) / GB,
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
        "hidden_transfer_ms_mean": float(steps["hidden_transfer_ms"].mean()),
        "bound_step_ms": float(bound_s(plan).mean() * 1e3),
        "throughput_tok_s": tokens_out / total_s if total_s else 0.0,
        "throughput_tok_s_full": tokens_out / float(tl_full.step_s.sum()),
        "h2d_gb_per_step": float(steps["h2d_bytes"].mean()) / GB,
        "d2h_gb_per_step": float(steps["d2h_bytes"].mean()) / GB,
        "link_util_h2d": float(tl.h2d_busy_s.sum()) / total_s if total_s else 0.0,
        "link_util_d2h": float(tl.d2h_busy_s.sum()) / total_s if total_s else 0.0,
        "evicted_frac": 0.0 if cfg.strategy == "full" else float(c("evicted").sum() / c("tokens").sum()),
        "attention_mass_evicted": lost / mass_total,
        "attention_mass_ddr": mass["ddr"] / mass_total,
        "attention_mass_compressed": mass["compressed"] / mass_total,
        "ddr_tokens_per_slot_step": float(c("ddr").sum() / max(1.0, c("decode").sum())),
        "tokens_captured": w.captured_tokens,
        "tokens_synthetic": w.synthetic_tokens,
        "requests_started": w.requests_started,
        "requests_finished": w.requests_finished,
        "config": cfg.to_dict(),
    }


def largest_fitting_batch(summary: dict) -> str:
    """One line on capacity, for the CLI: the largest batch that fits for full and for the tiered strategy."""
    return (f"fits: {summary['fits']} (full: {summary['fits_full']}); largest batch that fits: "
            f"{summary['max_batch']} tiered, {summary['max_batch_full']} full")

