"""Prediction vs measurement of one configuration: replay it on the device, simulate it with a profile, compare.

`validate` replays the TierSchedules of one configuration (hw/replay.py) for the chosen strategy and
for `full`, runs the simulator (tiersim.sim.simulate) on exactly the same inputs — model (cut to
`layers`), trace, batch, generated tokens, steps, policy, strategy, depth, seed, cold start, pinned,
copy mechanism, block size — with the hardware profile, and reports measured and predicted step time
and overhead with their errors. On CPU each replay's compute thread is watched: one that held its
core less than BUSY_SHARE of the replay's wall time ran on a busy machine, and the report says so
(`busy`), so that a suite can set it apart. hw/ only measures; every comparison lives here.

Errors: step_error_pct = 100 · (predicted − measured) / measured; overhead_error_pts = predicted −
measured overhead, in percentage points; overhead = 100 · (step / full step − 1).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from tiersim import check
from tiersim.errors import TiersimError
from tiersim.hw.config import REPLAY_STRATEGIES, ReplayConfig, reduced_model, replayable
from tiersim.hw.device import device_info as describe_device
from tiersim.hw.device import resolve_device
from tiersim.hw.replay import ReplayResult, replay
from tiersim.sim import SimConfig, simulate
from tiersim.specs import HardwareSpec, ModelSpec, hardware_spec, model_spec
from tiersim.specs.families import MoESpec
from tiersim.specs.hardware import datasheet_for
from tiersim.strategy import BASELINE
from tiersim.traces.default import default_trace_path
from tiersim.traces.format import Trace, read_trace
from tiersim.workload.config import RunConfig
from tiersim.workload.demand import run_workload

SHAPE_KEYS = ("layers", "attention_heads", "kv_heads", "head_dim")
BUSY_SHARE = 0.85  # CPU: a replay whose compute thread held its core less than this share of the time ran disturbed


@dataclass(frozen=True, slots=True, kw_only=True)
class ValidateConfig(RunConfig):
    """One configuration to replay and simulate: the shared run inputs (the whole model; `layers` cuts it), the
    hardware profile the simulator predicts with, and the device the replay measures on."""

    ACCEPTED_STRATEGIES: ClassVar[tuple[str, ...]] = REPLAY_STRATEGIES

    profile: HardwareSpec  # a profile name or TOML path is resolved here
    batch: int = 8
    gen_tokens: int = 512
    cold_start: bool = True
    layers: int | None = None  # replay (and simulate) only the first N layers
    device: str = "cpu"
    warmup_steps: int = 2
    any_model: bool = False  # allow a captured trace to drive another model's shapes
    copy_method: str = "auto"  # how DDR-tier pieces reach the device, the same name on both sides
    block_size: int = 16  # tokens per KV block: a piece is at most one block, K or V of a layer

    def __post_init__(self) -> None:
        replayable(self.strategy)  # the replay's own refusal, before RunConfig's generic one
        RunConfig.__post_init__(self)  # explicit: zero-argument super() fails in a slots dataclass
        if self.model.quantization is not None:  # the replay multiplies the model's dtype: predict the same weights
            object.__setattr__(self, "model", dataclasses.replace(self.model, quantization=None))
        if isinstance(self.profile, str | Path):
            object.__setattr__(self, "profile", hardware_spec(str(self.profile)))
        if not isinstance(self.profile, HardwareSpec):
            raise check.ConfigError("profile", f"profile must be a profile name, a TOML path or a HardwareSpec, got "
                                               f"{type(self.profile).__name__}")
        self.replay_config()  # everything the replay refuses (layers, depth, compressed tier) is refused here

    def replay_config(self, strategy: str | None = None) -> ReplayConfig:
        """The ReplayConfig of this configuration (model cut to `layers`), optionally for another strategy."""
        return ReplayConfig(model=reduced_model(self.model, self.layers), policy=self.policy, trace=self.trace,
                            strategy=strategy or self.strategy, depth=self.depth, batch=self.batch,
                            gen_tokens=self.gen_tokens, steps=self.steps, cold_start=self.cold_start,
                            pinned=self.pinned, seed=self.seed, device=self.device, warmup_steps=self.warmup_steps,
                            copy_method=self.copy_method, block_size=self.block_size)

    def sim_config(self, model: ModelSpec | None = None, strategy: str | None = None) -> SimConfig:
        """The SimConfig of the same inputs."""
        return SimConfig(model=model or reduced_model(self.model, self.layers), hardware=self.profile,
                         policy=self.policy, trace=self.trace, strategy=strategy or self.strategy, depth=self.depth,
                         batch=self.batch, gen_tokens=self.gen_tokens, steps=self.steps, cold_start=self.cold_start,
                         pinned=self.pinned, seed=self.seed, copy_method=self.copy_method, block_size=self.block_size)

    def describe(self) -> dict:
        """The configuration as JSON."""
        return {"model": self.model.name, "layers_replayed": self.layers or self.model.layers,
                "model_layers": self.model.layers, "profile": self.profile.name, "profile_path": self.profile.path,
                "policy": self.policy.to_dict(), "trace": str(self.trace) if self.trace else None,
                "strategy": self.strategy, "depth": self.depth, "batch": self.batch, "gen_tokens": self.gen_tokens,
                "steps": self.decode_steps, "cold_start": self.cold_start, "pinned": self.pinned, "seed": self.seed,
                "device": self.device, "copy_method": self.copy_method if self.pinned else "pageable",
                "block_size": self.block_size}


def load_trace(path: Path | None) -> Trace:
    """The trace at `path`, or the embedded default one."""
    return read_trace(default_trace_path() if path is None else path)


def trace_model(trace: Trace) -> ModelSpec | None:
    """The model a captured trace came from, when its header gives the whole shape (None for synthetic traces)."""
    shape = trace.model.get("shape") if isinstance(trace.model, dict) else None
    need = ("layers", "attention_heads", "kv_heads", "head_dim", "hidden", "intermediate", "vocab")
    if not isinstance(shape, dict) or not all(isinstance(shape.get(k), int) and shape[k] > 0 for k in need):
        return None
    extra = {k: shape[k] for k in ("tied_embeddings",) if isinstance(shape.get(k), bool)}
    try:  # served in bf16, whatever dtype the capture ran in
        return ModelSpec(name=str(trace.model.get("id") or "trace-model"), **{k: shape[k] for k in need}, **extra,
                         family=str(shape.get("family") or "llama"), source=f"trace header of {trace.path}")
    except TiersimError:
        return None


def check_trace_spec(trace: Trace, model: ModelSpec, any_model: bool) -> None:
    """Refuse a captured trace whose model shape is not `model`'s (unless `any_model`), or per-layer pages that
    do not match the model's layers."""
    if any_model:
        return
    source = trace_model(trace)
    if source is not None:
        theirs = {k: getattr(source, k) for k in SHAPE_KEYS}
        ours = {k: getattr(model, k) for k in SHAPE_KEYS}
        if theirs != ours:
            fmt = lambda d: ", ".join(f"{k} {v}" for k, v in d.items())  # noqa: E731
            raise TiersimError(f"{trace.path}: trace/spec mismatch: captured from {source.name} ({fmt(theirs)}) but "
                               f"--model-spec {model.name} has {fmt(ours)}; accepted: the trace's own model, or "
                               "--any-model to replay this attention on another model's shapes")
    if trace.layers is not None and trace.layers != model.layers:
        raise TiersimError(f"{trace.path}: trace/spec mismatch: per-layer pages for {trace.layers} layers but "
                           f"--model-spec {model.name} has {model.layers}; accepted: a matching model, or --any-model")


def resolve_model(name: str | None, trace: Trace) -> ModelSpec:
    """--model-spec, or (when omitted) the model the trace was captured from, or r1-qwen-1.5b for a synthetic trace."""
    if name is not None:
        return model_spec(name)
    return trace_model(trace) or model_spec("r1-qwen-1.5b")


def default_profile(device: str) -> HardwareSpec:
    """Without --profile: the built-in datasheet profile of the CUDA device; on CPU there is none."""
    dev = resolve_device(device)
    info = describe_device(dev)
    sheet = datasheet_for(info)
    if sheet is None:
        what = "this CPU" if dev.type == "cpu" else info["name"]
        raise TiersimError(f"no built-in profile for {what}; accepted: --hardware FILE.toml "
                           f"(make one with `tiersim calibrate --device {device} --out FILE.toml`)")
    return sheet


def measure(cfg: ValidateConfig, trace: Trace, strategy: str | None = None) -> ReplayResult:
    """Replay one strategy of the configuration on the device, over the batch's workload built exactly as the
    simulator builds it (same function, same arguments)."""
    return measure_watched(cfg, trace, strategy)[0]


def measure_watched(cfg: ValidateConfig, trace: Trace, strategy: str | None = None) -> tuple[ReplayResult, float | None]:
    """`measure`, and (CPU) the share of the replay's wall time its compute thread, this one, held a core."""
    rc = cfg.replay_config(strategy)
    w = run_workload(rc, trace, workers=1)
    used, wall = time.thread_time(), time.perf_counter()
    result = replay(rc, w)
    share = (time.thread_time() - used) / max(time.perf_counter() - wall, 1e-9)
    return result, (None if rc.cuda else min(1.0, share))


def _busy(*shares: float | None) -> dict:
    """How much of its core each replay's compute thread held, and whether any ran on a busy machine."""
    known = [s for s in shares if s is not None]
    return {"replay_cpu_share": list(shares), "busy": bool(known) and min(known) < BUSY_SHARE}


def validate(cfg: ValidateConfig, trace: Trace | None = None, full: ReplayResult | None = None,
             device_info: dict | None = None, full_share: float | None = None) -> dict:
    """Replay the strategy and `full`, simulate both, and report measured vs predicted (see the module doc).

    `full` is a ReplayResult of `full` to reuse (the suite shares one per shape and batch), `full_share` the share
    of its core its compute thread held.
    """
    dev = resolve_device(cfg.device)  # refuse a missing device before any work
    info = device_info or describe_device(dev)
    trace = trace if trace is not None else load_trace(cfg.trace)
    if cfg.trace is None:
        cfg = dataclasses.replace(cfg, trace=Path(trace.path))
    check_trace_spec(trace, cfg.model, cfg.any_model)
    wall = time.perf_counter()
    load_before = _loadavg()
    measured, share = measure_watched(cfg, trace)
    if not cfg.strategy_record.applies_policy:
        full, full_share = measured, share
    elif full is None:
        full, full_share = measure_watched(cfg, trace, BASELINE.name)
    simulated = simulate(cfg.sim_config(), trace=trace, workers=1)
    sim = simulated.summary
    report = {"device": {k: info[k] for k in ("kind", "name", "label", "driver", "torch", "host", "date")},
              "config": cfg.describe(), **compare(measured, full, sim), "replay": measured.summary(),
              "replay_full": full.summary(), "load_average": [load_before, _loadavg()], **_busy(share, full_share)}
    report.update(_experts(measured, simulated, reduced_model(cfg.model, cfg.layers).moe))
    if cfg.layers is not None and cfg.layers < cfg.model.layers:
        report.update(_scaled(cfg, trace, measured, full))
    report["wall_s"] = time.perf_counter() - wall
    report["steps_measured_ms"] = (measured.step_s * 1e3).round(4).tolist()
    return report


def compare(measured: ReplayResult, full: ReplayResult, sim: dict) -> dict:
    """Measured (two replays: the strategy and `full`) against predicted (a simulator summary), with the errors."""
    m_step, m_full = float(measured.step_s.mean() * 1e3), float(full.step_s.mean() * 1e3)
    p_step, p_full = sim["step_ms_mean"], sim["step_ms_full_mean"]
    m_over, p_over = 100.0 * (m_step / m_full - 1.0), sim["overhead_pct"]
    return {
        "measured_step_ms": m_step,
        "predicted_step_ms": p_step,
        "step_error_pct": _pct(p_step, m_step),
        "measured_overhead_pct": m_over,
        "predicted_overhead_pct": p_over,
        "overhead_error_pts": p_over - m_over,
        "measured_full_step_ms": m_full,
        "predicted_full_step_ms": p_full,
        "full_step_error_pct": _pct(p_full, m_full),
        "predicted_bound_step_ms": sim["bound_step_ms"],
        "measured_vs_bound_pct": _pct(m_step, sim["bound_step_ms"]),
        "measured_spread": _spread(measured.step_s),
        "measured_full_spread": _spread(full.step_s),
        "measured_stall_ms": _nan_mean(measured.stall_s),
        "predicted_stall_ms": sim["stall_ms_mean"],
        "h2d_gb_per_step": float(measured.h2d_bytes.mean() / 1e9),
        "predicted_h2d_gb_per_step": sim["h2d_gb_per_step"],
        "d2h_gb_per_step": float(measured.d2h_bytes.mean() / 1e9),
        "predicted_d2h_gb_per_step": sim["d2h_gb_per_step"],
    }


def _scaled(cfg: ValidateConfig, trace: Trace, measured: ReplayResult, full: ReplayResult) -> dict:
    """The whole model, estimated: the replayed layers' time x (model layers / replayed layers) + the head,
    next to the simulator's prediction for all layers."""
    scale = cfg.model.layers / cfg.layers
    est = lambda r: float((r.layers_s * scale + r.head_s).mean() * 1e3)  # noqa: E731
    sim = simulate(cfg.sim_config(model=cfg.model), trace=trace, workers=1).summary
    m, mf = est(measured), est(full)
    return {"scaled_to_layers": cfg.model.layers, "scaling": f"layers part x {scale:g} + lm_head, per step",
            "measured_step_ms_scaled": m, "predicted_step_ms_scaled": sim["step_ms_mean"],
            "step_error_pct_scaled": _pct(sim["step_ms_mean"], m),
            "measured_overhead_pct_scaled": 100.0 * (m / mf - 1.0), "predicted_overhead_pct_scaled": sim["overhead_pct"]}


def _experts(measured: ReplayResult, simulated, moe: MoESpec | None) -> dict:
    """MoE: distinct routed experts per MoE layer and step, measured (the replay's routing) beside the simulator's
    expected E (1 - (1 - k/E)^T) for the same steps' new tokens T; and the expert bytes the replay read."""
    if moe is None or measured.experts_touched is None:
        return {}
    c = simulated.workload.column
    tokens = (c("decode") + c("prefill_tokens"))[-len(measured.experts_touched):]
    predicted = np.array([moe.experts_touched(float(t)) for t in tokens])
    return {"measured_experts_per_layer": float(measured.experts_touched.mean()),
            "predicted_experts_per_layer": float(predicted.mean()),
            "measured_expert_gb_per_step": float(measured.expert_bytes.mean() / 1e9)}


def _pct(predicted: float, measured: float) -> float:
    return 100.0 * (predicted - measured) / measured if measured else float("nan")


def _spread(step_s: np.ndarray) -> dict:
    ms = step_s * 1e3
    return {"p10_ms": float(np.percentile(ms, 10)), "p50_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "cv": float(ms.std() / ms.mean()) if ms.mean() else 0.0}


def _nan_mean(a: np.ndarray) -> float | None:
    return None if np.isnan(a).all() else float(np.nanmean(a) * 1e3)


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
