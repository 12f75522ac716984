"""Does a profile fitted on some model shapes predict others? Calibrate on shapes A, measure shapes B without
fitting them, and print how far the fit's roofline misses B's whole-layer and lm_head timings.

    python benchmarks/calibration_transfer.py [--device cpu] [--quick] [--json FILE]

A (the defaults of `tiersim calibrate` on CPU): R1-Distill-Qwen-1.5B, a narrow 512-wide and a mid 1024-wide shape,
measured with B in interleaved rounds (hw/compute_rounds.py), decode layers and lm_heads of both A and B timed inside
the replay's own `full` steps (hw/calibrate.replay_points).
B (the CPU validation suite's shapes): SmolLM2-135M and a Qwen2.5-0.5B-shaped model. The documented
bound is calibration.fit.FIT_LIMIT (15% rms per held-out shape); the machine's load average is printed
beside the numbers because a busy 2-core machine moves them. Not a test: it prints what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tiersim.calibration.fit import FIT_LIMIT
from tiersim.hw.calibrate import MID_MODEL, NARROW_MODEL, calibrate
from tiersim.specs import model_spec
from tiersim.validate import suite_for


def main(argv: list[str] | None = None) -> int:
    """Calibrate on A with B held out; print the per-shape and per-point errors."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer points and repeats")
    ap.add_argument("--json", default=None, help="also write the fits and errors here")
    args = ap.parse_args(argv)
    fitted = (model_spec("r1-qwen-1.5b"), NARROW_MODEL, MID_MODEL)
    held = tuple(s.model for s in suite_for(args.device, quick=False).shapes)
    load, wall = os.getloadavg()[0], time.perf_counter()
    cal = calibrate(args.device, fitted[0], quick=args.quick, shapes=fitted[1:], held_out=held)
    f = cal.raw["fits"]
    c = f["compute"]
    print(f"{cal.raw['device']['label']}; load average {load:.2f} -> {os.getloadavg()[0]:.2f}; "
          f"{time.perf_counter() - wall:.0f} s")
    print(f"fitted on {', '.join(c['shapes'])}: B {c['hbm_gbps']:.3g} GB/s, F {c['tflops']:.3g} TFLOP/s, launch "
          f"{c['launch_us']:.1f} us (bound {c['launch_max_us'] or 0:.1f} us), per GEMM call "
          f"{c.get('matmul_fixed_us') or 0:.1f} us (bound {c.get('matmul_fixed_max_us') or 0:.1f} us), rms residual "
          f"{100 * c['rms_rel']:.1f}% ({c['dropped']} flagged timings dropped)")
    narrow = f.get("narrow_gemms") or {}
    if "latency_us" in narrow:
        print(f"  cold narrow GEMMs alone: {narrow['latency_us']:.1f} us per call + bytes / {narrow['gbps']:.3g} GB/s, "
              f"{100 * narrow['rms_rel']:.1f}% rms")
    for shape, rms in c["residual_by_shape"].items():
        print(f"  fitted   {shape:>16}: {100 * rms:5.1f}% rms")
    worst = 0.0
    for h in f["held_out"]:
        worst = max(worst, h["rms_rel"])
        print(f"  held out {h['shape']:>16}: {100 * h['rms_rel']:5.1f}% rms, {100 * h['max_rel']:5.1f}% max over "
              f"{h['points']} timings; errors % {h['errors_pct']}")
    for kind, k in f["kinds"].items():
        print(f"  kernel kind {kind:>9}: {k['gbps']:.3g} GB/s, {k['tflops']:.3g} TFLOP/s, {k['fixed_us']:.1f} us fixed, "
              f"{100 * k['rms_rel']:.1f}% rms")
    print(f"worst held-out rms {100 * worst:.1f}% against the {100 * FIT_LIMIT:.0f}% bound: "
          f"{'within' if worst <= FIT_LIMIT else 'OUTSIDE'}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"fits": f, "device": cal.raw["device"], "load_average": load}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
