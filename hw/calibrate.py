"""`calibrate`: measure this machine (hw.microbench, plus the launch floor and per-step overhead measured here)
on one or more model shapes, and fit a hardware profile (calibration.fit, calibration.profile).

Shapes: the model's own, plus (on CPU, where small shapes are dispatch-bound and large ones
bandwidth-bound) a narrow one (512 wide, narrower than any shape the CPU suite validates) so that the fit
spans both regimes; `held_out` shapes are measured and predicted by the fit, never fitted, and the
profile's [fit] table lists both. Every shape's layers, lm_head and narrow GEMMs are measured in
interleaved rounds (hw/compute_rounds.py: ROUNDS, QUICK_ROUNDS), each point the median of its rounds. The launch floor is the
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

from tiersim.calibration.profile import Calibration, build_profile, fits
from tiersim.hw.compute_rounds import interleaved
from tiersim.hw.copy_bench import BOUNCE_BYTES
from tiersim.hw.device import device_name, resolve_device
from tiersim.hw.kernels import head_kernel, layer_kernel
from tiersim.hw.microbench import MIB, gather_curve, layer_points, measure
from tiersim.hw.streams import cpu_threads
from tiersim.hw.timing import noop_s, time_op
from tiersim.specs import ModelSpec

# A shape with nothing to compute: every kernel of a layer launched on one- or two-element work.
NOOP_MODEL = ModelSpec("noop", layers=1, attention_heads=2, kv_heads=1, head_dim=8, hidden=16, intermediate=16,
                       vocab=16, source="tiersim.hw.calibrate: the launch floor's shape")
# On CPU, a narrow shape (8 heads of 64, hidden 512) beside the model's own: small layers are dispatch-bound, and
# the fit should span the widths it predicts (the CPU suite's SmolLM2-135M is 576 wide).
NARROW_MODEL = ModelSpec("fit-narrow-512", layers=12, attention_heads=8, kv_heads=2, head_dim=64, hidden=512,
                         intermediate=1536, vocab=32000, source="tiersim.hw.calibrate: a narrow calibration shape")
ROUNDS, QUICK_ROUNDS = 3, 2  # interleaved rounds of the compute measurements (hw/compute_rounds.py)


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
    from tiersim.hw.config import ReplayConfig
    from tiersim.hw.replay import replay
    from tiersim.policy import PolicyConfig
    from tiersim.traces.format import read_trace
    from tiersim.traces.synth import SynthParams, write_synth_trace
    from tiersim.workload.demand import run_workload

    with tempfile.TemporaryDirectory(prefix="tiersim-overhead-") as folder:
        path = write_synth_trace(Path(folder) / "t.tstrace", SynthParams(), 1, 16, steps + 8, seed=0)
        trace = read_trace(path)
        medians = {}
        for layers in (1, 3):
            cfg = ReplayConfig(model=dataclasses.replace(NOOP_MODEL, layers=layers), policy=PolicyConfig(),
                               trace=path, strategy="full", batch=1, gen_tokens=steps, device=device, warmup_steps=4)
            medians[layers] = float(np.median(replay(cfg, run_workload(cfg, trace, workers=1)).step_s))
    layer = (medians[3] - medians[1]) / 2
    return {"step_1_layer_s": medians[1], "step_3_layers_s": medians[3], "layer_s": layer,
            "overhead_us": max(0.0, medians[1] - layer - noop_head_s) * 1e6}


def row_gathers(device, model: ModelSpec, quick: bool, repeats: int) -> list[dict]:
    """Host gathers of rows of other sizes than the model's (head_dim / 2 and x 2): the per-row cost apart from
    the bytes."""
    out = []
    for head_dim in (max(8, model.head_dim // 2), model.head_dim * 2):
        shape = dataclasses.replace(model, name=f"{model.name}-rows{head_dim}", head_dim=head_dim)
        out += gather_curve(device, shape, (MIB, 4 * MIB) if quick else (MIB, 4 * MIB, 16 * MIB), repeats)
    return out


def calibrate(device: str, model: ModelSpec, quick: bool = False, name: str | None = None,
              shapes: Sequence[ModelSpec] | None = None, held_out: Sequence[ModelSpec] = ()) -> Calibration:
    """Measure the machine on `model`'s shapes (and `shapes`: more fitted shapes; default on CPU: NARROW_MODEL),
    measure `held_out` shapes without fitting them, and fit a hardware profile; the raw data rides along."""
    dev = resolve_device(device)
    wall = time.perf_counter()
    raw = measure(device, model, quick, layers=False)
    reps = 3 if quick else 7
    extra = list(shapes) if shapes is not None else ([NARROW_MODEL] if dev.type == "cpu" else [])
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
    raw["launch"]["step_overhead"] = step_overhead(device, raw["launch"]["noop_head"]["median_s"])
    raw["bounce_bytes"] = BOUNCE_BYTES  # the host-gather benchmark's (and replay's order of) pinned chunk
    result = fits(raw)
    raw["fits"] = result
    profile = build_profile(raw, result, name)
    raw["profile"] = profile.to_dict()
    raw["wall_s"] = time.perf_counter() - wall  # the whole calibration (measure's own part is in its sweeps)
    return Calibration(profile, raw)


__all__ = ["NARROW_MODEL", "NOOP_MODEL", "QUICK_ROUNDS", "ROUNDS", "Calibration", "calibrate", "launch_floor",
           "step_overhead"]
