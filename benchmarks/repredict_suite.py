"""Re-predict measured CPU suite runs with another profile, without measuring again.

    python benchmarks/repredict_suite.py PROFILE.toml RUN_DIR [RUN_DIR ...]

Each RUN_DIR holds a `validate_suite.json` written by `tiersim validate --suite --device cpu`. Every configuration is
simulated again exactly as the suite simulates it (validate/suite.case_config on the suite's own synthetic trace),
with the copy mechanism that run replayed (`auto` where PROFILE has no constants for it), and compared with what
that run measured. Printed per run: median and worst |step error| and the signed median; then all runs on one
line. With the profile a run was made with, it reproduces that run's report; with another (a pooled calibration,
a re-fit) it says what that profile would have scored on the same measurements. `--verbose` prints every
configuration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from tiersim.sim import simulate
from tiersim.sim.copies import available_methods
from tiersim.specs.hardware import hardware_spec
from tiersim.traces.format import read_trace
from tiersim.validate.suite import case_config, suite_for, suite_trace


def repredict(profile_path: str, runs: list[str], verbose: bool = False) -> list[dict]:
    """Per run: the |step error| median and worst, and the signed median (%), under `profile_path`."""
    profile = hardware_spec(profile_path)
    suite = suite_for("cpu", False)
    folder = Path(tempfile.mkdtemp(prefix="tiersim-repredict-"))
    path = suite_trace(suite, folder)
    trace = read_trace(path)
    shapes = {s.model.name: s for s in suite.shapes}
    known = {m.name for m in available_methods(profile)}
    predicted: dict[tuple, float] = {}
    out = []
    for run in runs:
        report = json.loads((Path(run) / "validate_suite.json").read_text())
        errors = []
        for c in report["configs"]:
            cf = c["config"]
            mechanism = "pageable" if not cf["pinned"] else cf["copy_method"]
            mechanism = mechanism if mechanism == "pageable" or mechanism in known else "auto"
            key = (cf["model"], cf["strategy"], cf["batch"], mechanism)
            if key not in predicted:
                cfg = case_config(suite, shapes[cf["model"]], cf["strategy"], cf["batch"], mechanism, profile, "cpu", path)
                predicted[key] = simulate(cfg.sim_config(), trace=trace, workers=1).summary["step_ms_mean"]
            error = 100 * (predicted[key] / c["measured_step_ms"] - 1)
            errors.append(error)
            if verbose:
                print(f"    {' '.join(map(str, key)):<48} predicted {predicted[key]:7.2f} ms, measured "
                      f"{c['measured_step_ms']:7.2f} ms: {error:+.1f}%")
        size = [abs(e) for e in errors]
        row = {"run": run, "median": statistics.median(size), "worst": max(size), "signed": statistics.median(errors)}
        print(f"  {run}: median {row['median']:.1f}%, worst {row['worst']:.1f}%, signed median {row['signed']:+.1f}%")
        out.append(row)
    print(f"{profile_path}: medians " + " ".join(f"{r['median']:.1f}" for r in out) + " | worst "
          + " ".join(f"{r['worst']:.1f}" for r in out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    repredict(args.profile, args.runs, args.verbose)


if __name__ == "__main__":
    main()
