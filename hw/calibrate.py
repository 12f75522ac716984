"""`calibrate`: measure this machine (hw.microbench, plus the launch floor and per-step overhead measured here)
on one or more model shapes, and fit a hardware profile (calibration.fit, calibration.profile).

Shapes: the model's own, plus (on CPU, where small shapes are dispatch-bound and large ones
bandwidth-bound) a narrow one (512 wide, narrower than any shape the CPU suite validates) and a mid one
(1024 wide) so that the fit brackets the widths it predicts; `held_out` shapes are measured and predicted by
the fit, never fitted, and the profile's [fit] table lists both. Every shape's layers, lm_head and narrow GEMMs are measured in
interleaved rounds (hw/compute_rounds.py: ROUNDS, QUICK_ROUNDS), each point the median of its rounds; the
decode layers and lm_heads that are fitted come from the replay's own `full` steps (replay_points), where the
validation measures them, and the isolated ones ride along in the raw data. The launch floor is the
replay's own decoder layer (and lm_head) on a shape with nothing to compute: what a layer costs in
launches and dispatch alone, the bound the fitted launch cost is held under.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tiersim.calibration.pool import pool, spread
from tiersim.calibration.profile import Calibration, build_profile, fits
from tiersim.errors import TiersimError
from tiersim.hw.compute_rounds import interleaved
from tiersim.hw.config import ReplayConfig, reduced_model
from tiersim.hw.copy_bench import ReplayPieces
from tiersim.hw.device import device_name, resolve_device
from tiersim.hw.kernels import head_kernel, layer_kernel
from tiersim.hw.microbench import MIB, gather_curve, layer_points, measure
from tiersim.hw.replay import replay
from tiersim.hw.streams import cpu_threads
from tiersim.hw.timing import Timing, combine_rounds, noop_s, summarize, time_op
from tiersim.policy import PolicyConfig
from tiersim.specs import ModelSpec
from tiersim.traces.format import read_trace
from tiersim.traces.synth import SynthParams, write_synth_trace
from tiersim.workload.demand import run_workload

# A shape with nothing to compute: every kernel of a layer launched on one- or two-element work.
NOOP_MODEL = ModelSpec("noop", layers=1, attention_heads=2, kv_heads=1, head_dim=8, hidden=16, intermediate=16,
                       vocab=16, source="tiersim.hw.calibrate: the launch floor's shape")
# On CPU, a narrow shape (8 heads of 64, hidden 512) beside the model's own: small layers are dispatch-bound, and
# the fit should span the widths it predicts (the CPU suite's SmolLM2-135M is 576 wide).
NARROW_MODEL = ModelSpec("fit-narrow-512", layers=12, attention_heads=8, kv_heads=2, head_dim=64, hidden=512,
                         intermediate=1536, vocab=32000, source="tiersim.hw.calibrate: a narrow calibration shape")
# On CPU a 1024-wide shape between the narrow one and r1-qwen-1.5b (1536): this CPU's GEMMs do not interpolate
# in width (its lm_head streams 6.3-6.8 GB/s at widths 512-896 and 9.5 GB/s at 1536:
# calibration/measured/cpu-vm-2026-12-01-loop3), so the fit brackets the validated widths (576, 896) closely.
MID_MODEL = ModelSpec("fit-mid-1024", layers=12, attention_heads=16, kv_heads=4, head_dim=64, hidden=1024,
                      intermediate=2816, vocab=151936, source="tiersim.hw.calibrate: a mid-width calibration shape")
ROUNDS, QUICK_ROUNDS = 3, 2  # interleaved rounds of the compute measurements (hw/compute_rounds.py)
# The replay's own `full` decode steps on each fitted shape (replay_points): batches, decode steps timed per replay,
# decoder layers replayed, prompt tokens per request.
REPLAY_BATCHES, QUICK_REPLAY_BATCHES, REPLAY_STEPS, REPLAY_LAYERS, REPLAY_PROMPT = (1, 4, 16), (1, 16), 32, 4, 128
# The batch at which each fitted shape's `full` replay is followed by a prefetch-layer replay with nothing to copy
# (every token in the HBM tier): how much a copy engine beside it slows a layer, `copy_engine_slowdown`.
ENGINE_BATCH = 16
# The machine's speed reference: the calibrated model's `full` replay (REPLAY_LAYERS layers) at this batch, timed in
# every round of replay_points and again by `validate --suite` before and after its configurations (machine_drift).
REFERENCE_BATCH = 4
REFERENCE_DIMS = ("layers", "attention_heads", "kv_heads", "head_dim", "hidden", "intermediate", "vocab")
REFERENCE_FLAGS = ("qkv_bias", "qk_norm")


def launch_floor(device, repeats: int = 7) -> dict:
    """A no-op kernel, the replay's decoder layer and lm_head on NOOP_MODEL: the floor of launch costs."""
    dev = resolve_device(str(device)) if isinstance(device, str) else device
    name = device_name(dev)
    layer = layer_kernel(NOOP_MODEL, name, 1, 1, 64, 2)
    head = head_kernel(NOOP_MODEL, name, 1, 2)
    return {"noop_op": noop_s(dev, repeats).to_dict(),
            "noop_layer": time_op(layer, dev, warmup=5, repeats=repeats, min_repeat_s=5e-3).to_dict(),
            "noop_head": time_op(head, dev, warmup=5, repeats=repeats, min_repeat_s=5e-3).to_dict()}


def step_overhead(device: str, noop_head_s: float, steps: int = 40) -> dict:
    """Per-step cost of the replay's loop outside its layers and head: NOOP_MODEL replayed (`full`, batch 1) with
    1 and 3 layers; a layer = the difference / 2, the overhead = the 1-layer step - a layer - the no-op head."""
    with tempfile.TemporaryDirectory(prefix="tiersim-overhead-") as folder:
        path = write_synth_trace(Path(folder) / "t.tstrace", SynthParams(), 1, 16, steps + 8, seed=0)
        trace = read_trace(path)
        medians = {}
        for layers in (1, 3):
            result = _replay_full(device, dataclasses.replace(NOOP_MODEL, layers=layers), 1, steps, path, trace)[0]
            medians[layers] = float(np.median(result.step_s))
    layer = (medians[3] - medians[1]) / 2
    return {"step_1_layer_s": medians[1], "step_3_layers_s": medians[3], "layer_s": layer,
            "overhead_us": max(0.0, medians[1] - layer - noop_head_s) * 1e6}


def _points_trace(folder: str, steps: int):
    """The synthetic trace replay_points and the speed reference replay (4 requests of REPLAY_PROMPT tokens, `steps`
    decode steps and a margin): (path, trace)."""
    path = write_synth_trace(Path(folder) / "t.tstrace", SynthParams(), 4, REPLAY_PROMPT, steps + 8, seed=0)
    return path, read_trace(path)


def _replay_full(device: str, model: ModelSpec, batch: int, steps: int, path: Path, trace, strategy: str = "full"):
    """One `full` replay of `model` cut to REPLAY_LAYERS layers over `trace` (read from `path`): (result, workload,
    layers replayed). Another `strategy` keeps every token in the HBM tier (nothing to copy)."""
    cut = reduced_model(model, min(REPLAY_LAYERS, model.layers))
    policy = PolicyConfig() if strategy == "full" else PolicyConfig(hbm_ratio=1.0, evict_ratio=0.0)
    cfg = ReplayConfig(model=cut, policy=policy, trace=path, strategy=strategy, batch=batch,
                       gen_tokens=steps, device=device, warmup_steps=4, depth=max(1, min(2, cut.layers - 1)))
    w = run_workload(cfg, trace, workers=1)
    return replay(cfg, w), w, cut.layers


def _decode_steps(result, w) -> np.ndarray:
    """Indices of a replay's decode steps (no prefill in the step)."""
    return np.flatnonzero(w.column("prefill")[: len(result.step_s)] == 0)


def _halves(result, w, layers: int, batch: int) -> list[tuple[str, int, Timing]]:
    """A replay's decode steps cut into two halves of growing context: per half the per-layer time and the lm_head
    time over its steps (hw.timing.summarize, one step a sample), each as (kind, mean KV tokens per sequence,
    Timing)."""
    out = []
    for part in np.array_split(_decode_steps(result, w), 2):
        if len(part) < 3:
            continue
        kv = int(round(float(np.mean(w.column("tokens")[part])) / batch))
        out += [("layers", kv, summarize(result.layers_s[part] / layers, 1, cv_limit=None)),
                ("head", kv, summarize(result.head_s[part], 1, cv_limit=None))]
    return out


def replay_points(device: str, shapes: Sequence[ModelSpec], batches: Sequence[int], rounds: int,
                  steps: int = REPLAY_STEPS, engine: tuple[list, set[str]] | None = None,
                  reference: tuple[str, int, list] | None = None) -> dict[str, dict]:
    """The replay's own `full` decode steps on each shape, cut to REPLAY_LAYERS layers, at each of `batches`, in
    `rounds` interleaved rounds (the shapes' order turning): per shape, decode-layer and lm_head points measured
    where the validation measures them (every layer's weights streaming in turn, the replay's bookkeeping around
    the kernels), each the median of its rounds. On the 2-core VM a narrow layer took ~10% longer inside a
    replay than alone (512 wide, batch 16: 3.0 against 2.8 ms), a wide one the same (1536: 17.7 against 17.9).

    With `engine` (a list, shape names), each of those shapes' `full` replay at ENGINE_BATCH (else the largest batch)
    is followed at once by a prefetch-layer replay with nothing to copy, and the pair's median decode-layer times are
    appended to the list. With `reference` (shape name, batch, list), that shape's replay at that batch appends its
    median decode step."""
    got: dict[tuple, list[dict]] = {}
    pair_batch = ENGINE_BATCH if ENGINE_BATCH in batches else max(batches)
    with tempfile.TemporaryDirectory(prefix="tiersim-replay-points-") as folder:
        path, trace = _points_trace(folder, steps)
        for r in range(rounds):
            for m in list(shapes[r % len(shapes):]) + list(shapes[: r % len(shapes)]):
                for b in batches:
                    result, w, layers = _replay_full(device, m, b, steps, path, trace)
                    for i, (kind, kv, timing) in enumerate(_halves(result, w, layers, b)):
                        got.setdefault((m.name, b, i, kind), []).append((kv, timing))
                    if reference is not None and (m.name, b) == reference[:2]:
                        reference[2].append({"round": r, "step_s": _decode_step_s(result, w)})
                    if engine is not None and m.name in engine[1] and b == pair_batch and layers > 1:
                        alone = _decode_layer_s(result, w, layers)
                        beside = _decode_layer_s(*_replay_full(device, m, b, steps, path, trace, "prefetch-layer"))
                        engine[0].append({"shape": m.name, "batch": b, "round": r, "full_layer_s": alone,
                                       "engine_layer_s": beside, "layers": layers})
    out: dict[str, dict] = {}
    for (name, b, _i, kind), runs in got.items():
        point = {"tokens": b, "source": "replay", **combine_rounds([t for _, t in runs])}
        if kind == "layers":
            point.update(batch=b, kv_tokens=int(round(np.mean([kv for kv, _ in runs]))))
        out.setdefault(name, {"layers": [], "head": []})[kind].append(point)
    return out


def _decode_step_s(result, w) -> float:
    """The median over a replay's decode steps of the whole step (layers and lm_head)."""
    return float(np.median(result.step_s[_decode_steps(result, w)]))


def reference_spec(ref: dict) -> ModelSpec:
    """The dense shape of a profile's speed reference (its [fit] `reference` table)."""
    return ModelSpec(f"reference-{ref['model']}", **{k: int(ref[k]) for k in REFERENCE_DIMS},
                     **{k: bool(ref.get(k, False)) for k in REFERENCE_FLAGS},
                     source="the calibrated model's shape (profile [fit] reference)")


def reference_step_s(device: str, ref: dict) -> float:
    """The reference replay as calibrate timed it: `full`, the reference shape, its batch and steps; the median decode
    step in seconds."""
    with tempfile.TemporaryDirectory(prefix="tiersim-reference-") as folder:
        steps = int(ref["steps"])
        result, w, _ = _replay_full(device, reference_spec(ref), int(ref["batch"]), steps, *_points_trace(folder, steps))
    return _decode_step_s(result, w)


def _decode_layer_s(result, w, layers: int) -> float:
    """The median over a replay's decode steps of its time per decoder layer."""
    return float(np.median(result.layers_s[_decode_steps(result, w)])) / layers


def use_replay_points(shape: dict, points: dict) -> None:
    """Fit `shape` on the replay's decode-layer and lm_head points: its isolated decode points move to
    `isolated_layers` / `isolated_head` (kept in the raw data, not fitted); its prefill points stay."""
    shape["isolated_layers"], shape["isolated_head"] = shape["layers"], shape["head"]
    shape["layers"] = [p for p in shape["layers"] if not p.get("kv_tokens")] + points["layers"]
    shape["head"] = points["head"]


def row_gathers(device, model: ModelSpec, quick: bool, repeats: int) -> list[dict]:
    """Host gathers of rows of other sizes than the model's (head_dim / 2 and x 2): the per-row cost apart from
    the bytes."""
    out = []
    for head_dim in (max(8, model.head_dim // 2), model.head_dim * 2):
        shape = dataclasses.replace(model, name=f"{model.name}-rows{head_dim}", head_dim=head_dim)
        out += gather_curve(device, shape, (MIB, 4 * MIB) if quick else (MIB, 4 * MIB, 16 * MIB), repeats)
    return out


def calibrate(device: str, model: ModelSpec, quick: bool = False, name: str | None = None,
              shapes: Sequence[ModelSpec] | None = None, held_out: Sequence[ModelSpec] = (), repeat: int = 1
              ) -> Calibration:
    """Measure the machine on `model`'s shapes (and `shapes`: more fitted shapes; default on CPU: NARROW_MODEL),
    measure `held_out` shapes without fitting them, and fit a hardware profile; the raw data rides along.

    With `repeat` N > 1 the whole measurement runs N times in a row and the profile is fitted on their pooled
    medians (calibration/pool.py); each repeat's own profile is fitted too, and how far apart they are per field is
    kept in the raw data (`repeats`) and the profile's [fit] table (`repeat_spread_pct`)."""
    if repeat < 1:
        raise TiersimError(f"--repeat must be at least 1, got {repeat}")
    if repeat == 1:
        return _calibrate_once(device, model, quick, name, shapes, held_out)
    wall = time.perf_counter()
    runs = [_calibrate_once(device, model, quick, name, shapes, held_out) for _ in range(repeat)]
    raw = pool([c.raw for c in runs])
    apart = spread([c.profile.to_dict() for c in runs])
    profile = _fit_profile(raw, name, {"repeats": repeat,
                                       "repeat_spread_pct": {k: round(v["spread_pct"], 2) for k, v in apart.items()}})
    raw["repeats"] = {"n": repeat, "spread": apart, "wall_s": [c.raw["wall_s"] for c in runs],
                      "how": "every timing the median of the repeats' medians (calibration/pool.py), then one fit"}
    raw["wall_s"] = time.perf_counter() - wall
    return Calibration(profile, raw)


def _calibrate_once(device: str, model: ModelSpec, quick: bool, name: str | None,
                    shapes: Sequence[ModelSpec] | None, held_out: Sequence[ModelSpec]) -> Calibration:
    """One calibration (see `calibrate`)."""
    dev = resolve_device(device)
    wall = time.perf_counter()
    raw = measure(device, model, quick, layers=False)
    reps = 3 if quick else 7
    extra = list(shapes) if shapes is not None else ([NARROW_MODEL, MID_MODEL] if dev.type == "cpu" else [])
    fitted = [model] + [m for m in extra if m.name != model.name]
    roles = {**{m.name: "held_out" for m in held_out}, **{m.name: "fitted" for m in fitted}}
    everyone = fitted + [m for m in held_out if roles[m.name] == "held_out"]
    scope = cpu_threads(1) if dev.type == "cpu" else contextlib.nullcontext()
    with scope:
        raw["launch"] = launch_floor(dev, reps + 2)
        rounds = QUICK_ROUNDS if quick else ROUNDS
        got = interleaved(dev, everyone, layer_points(quick), (1, 16) if quick else (1, 8, 64), rounds, reps)
        raw["rounds"] = rounds
        raw["layers"], raw["head"] = got[model.name]["layers"], got[model.name]["head"]
        raw["shapes"] = [{"model": m.to_dict(), "role": roles[m.name], **got[m.name]} for m in everyone]
        raw["gather_rows"] = row_gathers(dev, model, quick, reps)
    # Held-out shapes are replayed too, so that the fit is checked on timings of the same kind it was fitted on.
    raw["copy_engine"], batches = [], QUICK_REPLAY_BATCHES if quick else REPLAY_BATCHES
    steps = REPLAY_STEPS // 2 if quick else REPLAY_STEPS
    dense = model.moe is None and model.mla is None and model.layer_types is None
    ref_batch = REFERENCE_BATCH if REFERENCE_BATCH in batches else min(batches)
    timed: list = []
    # the copy engine's pairs on every fitted shape; --quick: the model's own only (prefetch needs 2 layers to run ahead)
    paired = {model.name} if quick else {m.name for m in fitted}
    replayed = replay_points(device, everyone, batches, rounds, steps, engine=(raw["copy_engine"], paired),
                             reference=(model.name, ref_batch, timed) if dense else None)
    if timed:
        shape = {k: getattr(model, k) for k in REFERENCE_DIMS + REFERENCE_FLAGS}
        raw["reference"] = {"device": raw["device"]["name"], "model": model.name, **shape,
                            "layers": min(REPLAY_LAYERS, model.layers), "batch": ref_batch, "steps": steps,
                            "rounds": timed}
    for s in raw["shapes"]:
        if s["model"]["name"] in replayed:
            use_replay_points(s, replayed[s["model"]["name"]])
    own = next(s for s in raw["shapes"] if s["model"]["name"] == model.name)
    raw["layers"], raw["head"] = own["layers"], own["head"]
    raw["launch"]["step_overhead"] = step_overhead(device, raw["launch"]["noop_head"]["median_s"])
    raw["bounce_bytes"] = ReplayPieces.bounce_bytes()  # the host-gather benchmark's pinned chunk
    profile = _fit_profile(raw, name)
    raw["wall_s"] = time.perf_counter() - wall  # the whole calibration (measure's own part is in its sweeps)
    return Calibration(profile, raw)


def _fit_profile(raw: dict, name: str | None, fit_extra: dict | None = None):
    """Fit `raw`, build the profile (its [fit] table with `fit_extra` added), and keep both in `raw`."""
    raw["fits"] = fits(raw)
    profile = build_profile(raw, raw["fits"], name)
    if fit_extra:
        profile = dataclasses.replace(profile, fit={**(profile.fit or {}), **fit_extra})
    raw["profile"] = profile.to_dict()
    return profile


__all__ = ["MID_MODEL", "NARROW_MODEL", "NOOP_MODEL", "QUICK_ROUNDS", "ROUNDS", "Calibration", "calibrate", "launch_floor",
           "step_overhead"]
