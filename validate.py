"""Prediction vs measurement: replay a configuration on the device, simulate it with a profile, compare.

`validate` replays the TierSchedules of one configuration (hw/replay.py) for the chosen strategy and
for `full`, runs the simulator (tiersim.sim.simulate) on exactly the same inputs — model (cut to
`layers`), trace, batch, generated tokens, steps, policy, strategy, depth, seed, cold start, pinned —
with the hardware profile, and reports measured and predicted step time and overhead with their
errors. `run_suite` does that for a fixed list of configurations and summarises the errors
(`summarize_errors`, `error_table`). hw/ only measures; every comparison lives here.

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
from tiersim.policy import PolicyConfig
from tiersim.sim import SimConfig, simulate
from tiersim.specs import HardwareSpec, ModelSpec, hardware_spec, model_spec
from tiersim.specs.hardware import datasheet_for
from tiersim.strategy import BASELINE
from tiersim.traces.default import default_trace_path
from tiersim.traces.format import Trace, read_trace
from tiersim.traces.synth import SynthParams, write_synth_trace
from tiersim.workload.config import RunConfig
from tiersim.workload.demand import run_workload

SHAPE_KEYS = ("layers", "attention_heads", "kv_heads", "head_dim")


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

    def __post_init__(self) -> None:
        replayable(self.strategy)  # the replay's own refusal, before RunConfig's generic one
        RunConfig.__post_init__(self)  # explicit: zero-argument super() fails in a slots dataclass
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
                            pinned=self.pinned, seed=self.seed, device=self.device, warmup_steps=self.warmup_steps)

    def sim_config(self, model: ModelSpec | None = None, strategy: str | None = None) -> SimConfig:
        """The SimConfig of the same inputs."""
        return SimConfig(model=model or reduced_model(self.model, self.layers), hardware=self.profile,
                         policy=self.policy, trace=self.trace, strategy=strategy or self.strategy, depth=self.depth,
                         batch=self.batch, gen_tokens=self.gen_tokens, steps=self.steps, cold_start=self.cold_start,
                         pinned=self.pinned, seed=self.seed)

    def describe(self) -> dict:
        """The configuration as JSON."""
        return {"model": self.model.name, "layers_replayed": self.layers or self.model.layers,
                "model_layers": self.model.layers, "profile": self.profile.name, "profile_path": self.profile.path,
                "policy": self.policy.to_dict(), "trace": str(self.trace) if self.trace else None,
                "strategy": self.strategy, "depth": self.depth, "batch": self.batch, "gen_tokens": self.gen_tokens,
                "steps": self.decode_steps, "cold_start": self.cold_start, "pinned": self.pinned, "seed": self.seed,
                "device": self.device}


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
    rc = cfg.replay_config(strategy)
    return replay(rc, run_workload(rc, trace, workers=1))


def validate(cfg: ValidateConfig, trace: Trace | None = None, full: ReplayResult | None = None,
             device_info: dict | None = None) -> dict:
    """Replay the strategy and `full`, simulate both, and report measured vs predicted (see the module doc).

    `full` is a ReplayResult of `full` to reuse (the suite shares one per batch size).
    """
    dev = resolve_device(cfg.device)  # refuse a missing device before any work
    info = device_info or describe_device(dev)
    trace = trace if trace is not None else load_trace(cfg.trace)
    if cfg.trace is None:
        cfg = dataclasses.replace(cfg, trace=Path(trace.path))
    check_trace_spec(trace, cfg.model, cfg.any_model)
    wall = time.perf_counter()
    load_before = _loadavg()
    measured = measure(cfg, trace)
    if not cfg.strategy_record.applies_policy:
        full = measured
    elif full is None:
        full = measure(cfg, trace, BASELINE.name)
    sim = simulate(cfg.sim_config(), trace=trace, workers=1).summary
    report = {"device": {k: info[k] for k in ("kind", "name", "label", "driver", "torch", "host", "date")},
              "config": cfg.describe(), **compare(measured, full, sim), "replay": measured.summary(),
              "replay_full": full.summary(), "load_average": [load_before, _loadavg()]}
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


# ---------------------------------------------------------------------------------------------
# The suite: a fixed list of configurations (strategies x batch x β)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Suite:
    """The fixed inputs of a validation suite on one kind of device."""

    model: ModelSpec
    layers: int | None
    batches: tuple[int, ...]
    hbm_ratios: tuple[float, ...]
    strategies: tuple[str, ...]
    prompt_tokens: int
    gen_tokens: int
    steps: int | None
    policy: PolicyConfig
    requests: int = 4

    def configurations(self) -> list[tuple[str, int, float]]:
        """(strategy, batch, β) in a fixed order."""
        return [(s, b, beta) for b in self.batches for s in self.strategies for beta in self.hbm_ratios]


def _tiny_model() -> ModelSpec:
    """A small dense model for quick CPU runs (8 heads of 64, GQA 4:1)."""
    return ModelSpec("tiny-cpu", layers=4, attention_heads=8, kv_heads=2, head_dim=64, hidden=512, intermediate=1536,
                     vocab=4096, source="tiersim.validate: quick-suite shapes")


def suite_for(device: str, quick: bool) -> Suite:
    """The fixed suite: CUDA (7B-shaped, 8 of 28 layers, batches 64 and 256: transfer-bound on PCIe), CPU
    (1.5B-shaped, 4 of 28 layers, whose weights stream from DRAM rather than the last-level cache), or quick
    (a tiny model, for CI). Policy: the paper's β and r; on CPU a 32-token window and Δ 32 so that a short
    chain has a DDR tier."""
    policy = lambda **kw: PolicyConfig(evict_ratio=0.03, **kw)  # noqa: E731
    strategies = ("prefetch-layer", "prefetch-sync")
    if quick:
        return Suite(_tiny_model(), None, (2, 4), (0.3, 0.7), strategies, 32, 160, 96,
                     policy(window=32, interval=16), requests=3)
    if device.startswith("cuda"):
        return Suite(model_spec("r1-qwen-7b"), 8, (64, 256), (0.3, 0.7), strategies, 128, 512, None,
                     policy(window=128, interval=64))
    return Suite(model_spec("r1-qwen-1.5b"), 4, (16, 64), (0.3, 0.7), strategies, 32, 320, None,
                 policy(window=32, interval=32))


def suite_trace(suite: Suite, folder: Path) -> Path:
    """Write (or reuse) the suite's synthetic trace: every request has the same prompt length (lockstep batches)."""
    path = Path(folder) / f"suite-{suite.requests}x{suite.prompt_tokens}+{suite.gen_tokens}.tstrace"
    if not path.exists():
        write_synth_trace(path, SynthParams(), suite.requests, suite.prompt_tokens, suite.gen_tokens, seed=0)
    return path


def run_suite(device: str, profile: HardwareSpec, folder: Path, quick: bool = False, budget_s: float | None = None,
              progress=None, share_full: bool | None = None) -> dict:
    """Validate every configuration of the suite. Each is measured right after its own `full` replay, so that a
    machine whose speed drifts (other jobs) still gives a fair overhead; `share_full` (the quick suite's default)
    measures one `full` per batch size instead.

    Stops starting new configurations once `budget_s` seconds are spent (they are listed as skipped).
    """
    share_full = quick if share_full is None else share_full
    info = describe_device(resolve_device(device))
    suite = suite_for(device, quick)
    folder = Path(folder)  # for the suite's synthetic trace (made again from its seed when missing)
    folder.mkdir(parents=True, exist_ok=True)
    trace_path = suite_trace(suite, folder)
    trace = read_trace(trace_path)
    wall = time.perf_counter()
    reports, skipped, fulls = [], [], {}
    for strategy, batch, beta in suite.configurations():
        if budget_s is not None and time.perf_counter() - wall > budget_s:
            skipped.append({"strategy": strategy, "batch": batch, "hbm_ratio": beta})
            continue
        cfg = ValidateConfig(model=suite.model, profile=profile, policy=dataclasses.replace(suite.policy, hbm_ratio=beta),
                             device=device, trace=trace_path, strategy=strategy, batch=batch,
                             gen_tokens=suite.gen_tokens, steps=suite.steps, layers=suite.layers)
        if batch not in fulls or not share_full:
            fulls[batch] = measure(cfg, trace, BASELINE.name)
        r = validate(cfg, trace, full=fulls[batch], device_info=info)
        reports.append(r)
        if progress is not None:
            progress(r)
    return {"device": reports[0]["device"] if reports else {"name": info["name"], "label": info["label"]},
            "suite": {"model": suite.model.name, "layers": suite.layers, "batches": suite.batches,
                      "hbm_ratios": suite.hbm_ratios, "strategies": suite.strategies, "prompt_tokens": suite.prompt_tokens,
                      "gen_tokens": suite.gen_tokens, "steps": suite.steps, "policy": suite.policy.to_dict(),
                      "trace": str(trace_path), "quick": quick, "full_shared_per_batch": share_full},
            "summary": summarize_errors(reports), "configs": reports, "skipped": skipped,
            "wall_s": time.perf_counter() - wall}


def summarize_errors(reports: list[dict]) -> dict:
    """Median and worst absolute errors, their spread, and the measurements' own noise."""
    if not reports:
        return {"configurations": 0}
    step = np.array([r["step_error_pct"] for r in reports])
    over = np.array([r["overhead_error_pts"] for r in reports])
    full = np.array([r["full_step_error_pct"] for r in reports])
    cv = np.array([r["measured_spread"]["cv"] for r in reports])
    a = np.abs(step)
    return {
        "configurations": len(reports),
        "step_error_pct_median_abs": float(np.median(a)),
        "step_error_pct_worst_abs": float(a.max()),
        "step_error_pct_min": float(step.min()), "step_error_pct_max": float(step.max()),
        "step_error_pct_p25_p75": [float(np.percentile(step, 25)), float(np.percentile(step, 75))],
        "overhead_error_pts_median_abs": float(np.median(np.abs(over))),
        "overhead_error_pts_worst_abs": float(np.abs(over).max()),
        "full_step_error_pct_median_abs": float(np.median(np.abs(full))),
        "measured_step_cv_median": float(np.median(cv)),
    }


def error_table(suite: dict) -> str:
    """A suite's errors (a `run_suite` result) as a Markdown table and a one-line summary."""
    lines = ["| strategy | batch | β | measured ms | predicted ms | step error % | measured overhead % | "
             "predicted overhead % | overhead error pts |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in suite["configs"]:
        c = r["config"]
        lines.append(f"| {c['strategy']} | {c['batch']} | {c['policy']['hbm_ratio']} | {r['measured_step_ms']:.3f} | "
                     f"{r['predicted_step_ms']:.3f} | {r['step_error_pct']:+.1f} | {r['measured_overhead_pct']:+.1f} | "
                     f"{r['predicted_overhead_pct']:+.1f} | {r['overhead_error_pts']:+.1f} |")
    s = suite["summary"]
    if s.get("configurations"):
        lines.append("")
        lines.append(f"Median |step error| {s['step_error_pct_median_abs']:.1f}%, worst {s['step_error_pct_worst_abs']:.1f}%;"
                     f" median |overhead error| {s['overhead_error_pts_median_abs']:.1f} pts, worst "
                     f"{s['overhead_error_pts_worst_abs']:.1f} pts; median step-time CV {s['measured_step_cv_median']:.2f}.")
    return "\n".join(lines)
