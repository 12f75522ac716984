"""The validation suite: a fixed list of configurations (model shapes held out of the fit x strategies x batches x
β x copy mechanisms), each replayed and simulated, and the error distribution it measures.

Two model shapes, each with its own β; per shape every strategy at every batch size, the copy mechanism
alternating so that each strategy meets each mechanism: 8 configurations on two strategies, two batches
and two mechanisms. The calibration fits other shapes (`Suite.fit_shapes`), so every configuration
predicts a shape the profile never saw. `validation_table` turns a run into the profile's [validation]
table (median and p90 |step error| per strategy, mechanism and shape, with the machine and the date);
`simulate` prints its predictions with that band.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiersim.hw.device import device_info as describe_device
from tiersim.hw.device import resolve_device
from tiersim.policy import PolicyConfig
from tiersim.sim.copies import available_methods
from tiersim.specs import HardwareSpec, ModelSpec, model_spec
from tiersim.strategy import BASELINE
from tiersim.traces.format import read_trace
from tiersim.traces.synth import SynthParams, write_synth_trace
from tiersim.validate.single import ValidateConfig, _loadavg, measure_watched, validate


@dataclass(frozen=True, slots=True)
class SuiteShape:
    """One model shape of the suite: the model, the layers replayed (None: all) and its β."""

    model: ModelSpec
    layers: int | None
    hbm_ratio: float


@dataclass(frozen=True, slots=True)
class Suite:
    """The fixed inputs of a validation suite on one kind of device."""

    shapes: tuple[SuiteShape, ...]
    batches: tuple[int, ...]
    strategies: tuple[str, ...]
    mechanisms: tuple[str, ...]  # pinned copy mechanisms, or "pageable" (pinned=False)
    prompt_tokens: int
    gen_tokens: int
    steps: int | None
    policy: PolicyConfig
    fit_shapes: tuple[ModelSpec, ...]  # what `calibrate` fits for this suite (none of `shapes`)
    requests: int = 4

    @property
    def model(self) -> ModelSpec:
        """The first shape's model."""
        return self.shapes[0].model

    def configurations(self) -> list[tuple[SuiteShape, str, int, str]]:
        """(shape, strategy, batch, mechanism) in a fixed order; the mechanism turns with batch, strategy and shape."""
        n = len(self.mechanisms)
        return [(sh, s, b, self.mechanisms[(k + j + 2 * i) % n]) for i, sh in enumerate(self.shapes)
                for k, b in enumerate(self.batches) for j, s in enumerate(self.strategies)]


def _spec(name: str, source: str, **shape) -> ModelSpec:
    return ModelSpec(name, source=source, **shape)


def suite_for(device: str, quick: bool) -> Suite:
    """The fixed suite. CUDA: R1-Distill-Qwen-7B and Llama-3.1-8B shapes (8 layers each; batches 64 and 256, which
    are transfer-bound on PCIe), fitted on R1-Distill-Qwen-1.5B and -14B shapes. CPU: SmolLM2-135M (6 layers) and
    a Qwen2.5-0.5B-shaped model (4 layers), fitted on R1-Distill-Qwen-1.5B and a narrow 512-wide shape (the
    defaults of `calibrate` on CPU, spanning the validated widths 576 and 896). Quick (CI): two tiny shapes fitted
    on a third. Policy: the paper's r; on CPU
    a 32-token window so that a short chain has a DDR tier."""
    policy = lambda **kw: PolicyConfig(evict_ratio=0.03, **kw)  # noqa: E731
    strategies = ("prefetch-layer", "prefetch-sync")
    here = "tiersim.validate.suite: quick-suite shapes"
    if quick:
        tiny = dict(layers=4, head_dim=64, vocab=4096)
        shapes = (SuiteShape(_spec("tiny-wide", here, attention_heads=10, kv_heads=2, hidden=640, intermediate=1792,
                                   **tiny), None, 0.3),
                  SuiteShape(_spec("tiny-narrow", here, attention_heads=6, kv_heads=2, hidden=384, intermediate=1024,
                                   **tiny), None, 0.7))
        fit = (_spec("tiny-cpu", here, attention_heads=8, kv_heads=2, hidden=512, intermediate=1536, **tiny),)
        return Suite(shapes, (2, 4), strategies, _mechanisms(device), 32, 160, 96, policy(window=32, interval=16), fit,
                     requests=3)
    if device.startswith("cuda"):
        shapes = (SuiteShape(model_spec("r1-qwen-7b"), 8, 0.3), SuiteShape(model_spec("llama3.1-8b"), 8, 0.7))
        return Suite(shapes, (64, 256), strategies, _mechanisms(device), 128, 512, None,
                     policy(window=128, interval=64), (model_spec("r1-qwen-1.5b"), model_spec("r1-qwen-14b")))
    qwen05 = _spec("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B config.json (hidden 896, 14/2 heads of 64, 24 layers)",
                   layers=24, attention_heads=14, kv_heads=2, head_dim=64, hidden=896, intermediate=4864, vocab=151936,
                   tied_embeddings=True, family="qwen2")
    from tiersim.hw.calibrate import MID_MODEL, NARROW_MODEL

    shapes = (SuiteShape(model_spec("smollm2-135m"), 6, 0.3), SuiteShape(qwen05, 4, 0.7))
    return Suite(shapes, (4, 16), strategies, _mechanisms(device), 32, 320, None, policy(window=32, interval=32),
                 (model_spec("r1-qwen-1.5b"), NARROW_MODEL, MID_MODEL))


def _mechanisms(device: str) -> tuple[str, ...]:
    """The copy mechanisms the suite turns through: every pinned one the device runs, and the pageable path."""
    from tiersim.hw.copies import COPY_METHODS, CPU_METHODS

    return (*(COPY_METHODS if device.startswith("cuda") else CPU_METHODS[::-1]), "pageable")


def suite_trace(suite: Suite, folder: Path) -> Path:
    """Write (or reuse) the suite's synthetic trace: every request has the same prompt length (lockstep batches)."""
    path = Path(folder) / f"suite-{suite.requests}x{suite.prompt_tokens}+{suite.gen_tokens}.tstrace"
    if not path.exists():
        write_synth_trace(path, SynthParams(), suite.requests, suite.prompt_tokens, suite.gen_tokens, seed=0)
    return path


def case_config(suite: Suite, shape: SuiteShape, strategy: str, batch: int, mechanism: str, profile: HardwareSpec,
                device: str, trace_path: Path) -> ValidateConfig:
    """The ValidateConfig of one configuration: a pinned mechanism by name on both sides where the profile gives
    its constants (else `auto`), or the pageable path."""
    pinned = mechanism != "pageable"
    known = {m.name for m in available_methods(profile)}
    method = mechanism if pinned and mechanism in known else "auto"
    return ValidateConfig(model=shape.model, profile=profile, layers=shape.layers, device=device, trace=trace_path,
                          policy=dataclasses.replace(suite.policy, hbm_ratio=shape.hbm_ratio), strategy=strategy,
                          batch=batch, gen_tokens=suite.gen_tokens, steps=suite.steps, pinned=pinned,
                          copy_method=method)


def run_suite(device: str, profile: HardwareSpec, folder: Path, quick: bool = False, budget_s: float | None = None,
              progress: Callable[[dict], None] | None = None, share_full: bool | None = None,
              report: bool = True) -> dict:
    """Validate every configuration of the suite; with `report`, write report.md / report.html / the scatter plot
    into `folder` and the profile with its [validation] table (folder/profile.validated.toml, and the profile's own
    file when it is a measured one). Each configuration is measured right after its own `full` replay, so that a
    machine whose speed drifts still gives a fair overhead; `share_full` (the quick suite's default) measures one
    `full` per shape and batch instead. Stops starting configurations once `budget_s` seconds are spent (they are
    listed as skipped)."""
    share_full = quick if share_full is None else share_full
    info = describe_device(resolve_device(device))
    suite = suite_for(device, quick)
    folder = Path(folder)  # for the suite's synthetic trace (made again from its seed when missing)
    folder.mkdir(parents=True, exist_ok=True)
    trace_path = suite_trace(suite, folder)
    trace = read_trace(trace_path)
    wall, load = time.perf_counter(), _loadavg()
    from tiersim.hw.calibrate import reference_step_s

    ref = (profile.fit or {}).get("reference")
    ref = ref if ref and ref.get("device") == info["name"] else None  # a reference timed on this machine only
    start_s = reference_step_s(device, ref) if ref else None
    reports, skipped, fulls = [], [], {}
    for shape, strategy, batch, mechanism in suite.configurations():
        if budget_s is not None and time.perf_counter() - wall > budget_s:
            skipped.append({"model": shape.model.name, "strategy": strategy, "batch": batch,
                            "hbm_ratio": shape.hbm_ratio, "copy_method": mechanism})
            continue
        cfg = case_config(suite, shape, strategy, batch, mechanism, profile, device, trace_path)
        key = (shape.model.name, batch)
        if key not in fulls or not share_full:
            fulls[key] = measure_watched(cfg, trace, BASELINE.name)
        r = validate(cfg, trace, full=fulls[key][0], device_info=info, full_share=fulls[key][1])
        reports.append(r)
        if progress is not None:
            progress(r)
    drift = machine_drift(ref, start_s, reference_step_s(device, ref) if ref else None, reports)
    fitted = list((profile.fit or {}).get("shapes", []))
    result = {"device": reports[0]["device"] if reports else {"name": info["name"], "label": info["label"]},
              "suite": {"shapes": [{"model": s.model.name, "layers": s.layers, "hbm_ratio": s.hbm_ratio,
                                    "held_out": s.model.name not in fitted} for s in suite.shapes],
                        "model": suite.model.name, "batches": suite.batches, "strategies": suite.strategies,
                        "mechanisms": suite.mechanisms, "prompt_tokens": suite.prompt_tokens,
                        "gen_tokens": suite.gen_tokens, "steps": suite.steps, "policy": suite.policy.to_dict(),
                        "trace": str(trace_path), "quick": quick, "full_shared_per_batch": share_full,
                        "fitted_shapes": fitted},
              "profile": {"name": profile.name, "path": profile.path, "fit": profile.fit},
              "summary": summarize_errors(reports), "drift": drift, "configs": reports, "skipped": skipped,
              "load_average": [load, _loadavg()], "wall_s": time.perf_counter() - wall}
    result["validation"] = validation_table(result, quick)
    if report:
        from tiersim.validate.report import store_validation, write_report

        result["files"] = [str(p) for p in write_report(result, folder)]
        result["files"] += [str(p) for p in store_validation(profile, result["validation"], folder)]
    return result


def machine_drift(ref: dict | None, start_s: float | None, end_s: float | None, reports: list[dict]) -> dict | None:
    """How fast the machine ran during the suite against its calibration: the profile's reference replay timed
    before and after the configurations against the median calibrate timed; and the step errors had every prediction
    been scaled by that drift (a diagnostic: how much of the error is the machine's speed moving, not the model).
    None without a reference timed on this machine."""
    if ref is None or start_s is None or end_s is None:
        return None
    now_ms = 1e3 * (start_s + end_s) / 2
    drift = now_ms / ref["step_ms"] - 1.0
    out = {"reference": f"{ref['model']}, {ref['layers']} layers, full, batch {ref['batch']}, {ref['steps']} steps",
           "calibrated_ms": ref["step_ms"], "calibrated_range_ms": [ref.get("min_ms"), ref.get("max_ms")],
           "start_ms": 1e3 * start_s, "end_ms": 1e3 * end_s, "drift_pct": 100.0 * drift}
    if reports:
        adjusted = np.array([100.0 * (r["predicted_step_ms"] * (1.0 + drift) / r["measured_step_ms"] - 1.0)
                             for r in reports])
        out["drift_adjusted"] = {"median_abs_pct": float(np.median(np.abs(adjusted))),
                                 "worst_abs_pct": float(np.abs(adjusted).max()),
                                 "signed_median_pct": float(np.median(adjusted))}
    return out


def case_key(r: dict) -> dict:
    """Shape, strategy, batch, β and mechanism of one report."""
    c = r["config"]
    return {"model": c["model"], "strategy": c["strategy"], "batch": c["batch"], "hbm_ratio": c["policy"]["hbm_ratio"],
            "copy_method": c.get("copy_method", "auto")}


def _stats(errors: list[float]) -> dict:
    a = np.abs(np.asarray(errors, dtype=np.float64))
    return {"median_abs_pct": round(float(np.median(a)), 2), "p90_abs_pct": round(float(np.percentile(a, 90)), 2),
            "worst_abs_pct": round(float(a.max()), 2), "n": int(len(a))}


def summarize_errors(reports: list[dict]) -> dict:
    """Median and worst absolute errors, their spread, per strategy / mechanism / shape, and the measurements' own
    noise and load."""
    if not reports:
        return {"configurations": 0}
    step = np.array([r["step_error_pct"] for r in reports])
    over = np.array([r["overhead_error_pts"] for r in reports])
    full = np.array([r["full_step_error_pct"] for r in reports])
    cv = np.array([r["measured_spread"]["cv"] for r in reports])
    a = np.abs(step)
    group = lambda key: {v: _stats([r["step_error_pct"] for r in reports if case_key(r)[key] == v])  # noqa: E731
                         for v in dict.fromkeys(case_key(r)[key] for r in reports)}
    quiet = [r["step_error_pct"] for r in reports if not r.get("busy")]
    return {
        "configurations": len(reports),
        "step_error_pct_median_abs": float(np.median(a)),
        "step_error_pct_p90_abs": float(np.percentile(a, 90)),
        "step_error_pct_worst_abs": float(a.max()),
        "step_error_pct_min": float(step.min()), "step_error_pct_max": float(step.max()),
        "step_error_pct_p25_p75": [float(np.percentile(step, 25)), float(np.percentile(step, 75))],
        "overhead_error_pts_median_abs": float(np.median(np.abs(over))),
        "overhead_error_pts_worst_abs": float(np.abs(over).max()),
        "full_step_error_pct_median_abs": float(np.median(np.abs(full))),
        "measured_step_cv_median": float(np.median(cv)),
        "busy_configurations": len(reports) - len(quiet),
        "quiet": _stats(quiet) if quiet else None,
        "by_strategy": group("strategy"), "by_mechanism": group("copy_method"), "by_shape": group("model"),
        "full_by_shape": {m: _stats([r["full_step_error_pct"] for r in reports if case_key(r)["model"] == m])
                          for m in dict.fromkeys(case_key(r)["model"] for r in reports)},
    }


def validation_table(result: dict, quick: bool) -> dict | None:
    """The profile's [validation] table from a suite run: |step error| median / p90 / worst over every configuration,
    per strategy (`full` from the full replays), mechanism and shape; where, when, and which shapes were held out."""
    s = result["summary"]
    if not s.get("configurations"):
        return None
    dev = result["device"]
    fitted = result["suite"]["fitted_shapes"]
    full = [r["full_step_error_pct"] for r in result["configs"]]
    table = {"machine": dev.get("name", "unknown"), "host": dev.get("host", ""), "date": dev.get("date", ""),
             "command": f"tiersim validate --suite --device {dev.get('kind', 'cpu')}{' --quick' if quick else ''}",
             "configurations": s["configurations"], "median_abs_pct": round(s["step_error_pct_median_abs"], 2),
             "p90_abs_pct": round(s["step_error_pct_p90_abs"], 2), "worst_abs_pct": round(s["step_error_pct_worst_abs"], 2),
             "busy_configurations": s["busy_configurations"],
             "load_average": [x for x in result["load_average"] if x is not None],
             "fitted_shapes": fitted,
             "held_out_shapes": [x["model"] for x in result["suite"]["shapes"] if x["model"] not in fitted],
             "by_strategy": {**s["by_strategy"], BASELINE.name: _stats(full)},
             "by_mechanism": s["by_mechanism"], "by_shape": s["by_shape"]}
    return table


def error_table(suite: dict) -> str:
    """A suite's errors (a `run_suite` result) as a Markdown table and a one-line summary."""
    lines = ["| model | strategy | copy | batch | β | measured ms | predicted ms | step error % | measured overhead % | "
             "predicted overhead % | overhead error pts | busy |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in suite["configs"]:
        k = case_key(r)
        lines.append(f"| {k['model']} | {k['strategy']} | {k['copy_method']} | {k['batch']} | {k['hbm_ratio']} | "
                     f"{r['measured_step_ms']:.3f} | {r['predicted_step_ms']:.3f} | {r['step_error_pct']:+.1f} | "
                     f"{r['measured_overhead_pct']:+.1f} | {r['predicted_overhead_pct']:+.1f} | "
                     f"{r['overhead_error_pts']:+.1f} | {'yes' if r.get('busy') else 'no'} |")
    s = suite["summary"]
    if s.get("configurations"):
        lines.append("")
        lines.append(f"Median |step error| {s['step_error_pct_median_abs']:.1f}%, worst {s['step_error_pct_worst_abs']:.1f}%;"
                     f" median |overhead error| {s['overhead_error_pts_median_abs']:.1f} pts, worst "
                     f"{s['overhead_error_pts_worst_abs']:.1f} pts; median step-time CV {s['measured_step_cv_median']:.2f}; "
                     f"{s['busy_configurations']} of {s['configurations']} configurations ran on a busy machine.")
    return "\n".join(lines)


__all__ = ["Suite", "SuiteShape", "case_config", "case_key", "error_table", "run_suite", "suite_for", "suite_trace",
           "summarize_errors", "validation_table"]
