"""`calibrate`: measure this machine (hw.microbench) and fit a hardware profile (calibration.fit)."""

from __future__ import annotations

from tiersim.calibration.fit import Calibration, build_profile, fits
from tiersim.hw.microbench import measure
from tiersim.specs import ModelSpec


def calibrate(device: str, model: ModelSpec, quick: bool = False, name: str | None = None) -> Calibration:
    """Measure the machine and fit a hardware profile; the raw measurements and fits ride along."""
    raw = measure(device, model, quick)
    fitted = fits(raw)
    raw["fits"] = fitted
    profile = build_profile(raw, fitted, name)
    raw["profile"] = profile.to_dict()
    return Calibration(profile, raw)
