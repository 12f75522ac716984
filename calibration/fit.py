"""The fits that turn microbenchmarks into the simulator's hardware constants, by fit kind:

- fit_points.py: which points to fit and their weights (flagged ones dropped or down-weighted), intervals;
- fit_compute.py: the cost model's roofline per kernel kind and over whole layers of several shapes
  (bandwidth, FLOP rate, launch and per-GEMM-call costs within physical bounds, the optional refinements);
- fit_links.py: host-link curves and copy mechanisms (per-call, per-piece costs and a bandwidth).

This module re-exports them, so `tiersim.calibration.fit` stays the one import path; the profile built from
the fits lives in profile.py.
"""

from __future__ import annotations

from tiersim.calibration.fit_compute import (
    EFF_MIN,
    MATMULS_PER_HEAD,
    MATMULS_PER_LAYER,
    ComputeFit,
    RooflineFit,
    Work,
    _work,
    check_shape,
    fit_compute,
    fit_compute_shapes,
    fit_roofline,
    kernel_work,
    layer_work,
    matmul_bound_s,
    predict_compute,
)
from tiersim.calibration.fit_links import (
    BANDWIDTH_MIN_BYTES,
    MAX_GBPS,
    LinkFit,
    fit_gather,
    fit_link,
    fit_mechanisms,
    mechanism_points,
)
from tiersim.calibration.fit_points import FIT_LIMIT, FLAGGED_WEIGHT, GB, Z95, param_sd, usable


def __getattr__(name: str):
    """build_profile, Calibration and summary_rows live in calibration/profile.py; importable from here too."""
    if name in ("Calibration", "build_profile", "summary_rows", "fits"):
        from tiersim.calibration import profile

        return getattr(profile, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BANDWIDTH_MIN_BYTES", "EFF_MIN", "FIT_LIMIT", "FLAGGED_WEIGHT", "GB", "MATMULS_PER_HEAD",
           "MATMULS_PER_LAYER", "MAX_GBPS", "Z95", "ComputeFit", "LinkFit", "RooflineFit", "Work", "_work",
           "check_shape", "fit_compute", "fit_compute_shapes", "fit_gather", "fit_link", "fit_mechanisms",
           "fit_roofline", "kernel_work", "layer_work", "matmul_bound_s", "mechanism_points", "param_sd",
           "predict_compute", "usable"]
