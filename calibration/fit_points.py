"""What every fit shares: which measured points to fit and how much each weighs, and the intervals of the
parameters.

Points a measurement flagged (hw/timing.py: CV above its limit, or a busy machine) are dropped when enough
others remain, else down-weighted; a point weighs 1 / (its relative confidence half-width)^2, so a noisy
point counts less. Intervals come from the Jacobian and the residual variance: noise widens them, it
does not move the estimate.
"""

from __future__ import annotations

import numpy as np

GB = 1e9
FIT_LIMIT = 0.15  # rms relative residual above which a fit is marked in the profile
FLAGGED_WEIGHT = 0.25  # weight of a flagged point when too few unflagged ones remain to drop it
Z95 = 1.959964


def usable(points: list[dict], need: int) -> tuple[list[dict], np.ndarray, list[int]]:
    """The points to fit, their weights and the indices dropped: flagged points are dropped when at least `need`
    others remain, else kept at FLAGGED_WEIGHT; a point weighs 1 / (its relative CI half-width, floored at 1%)^2
    relative to the others, so a noisy point counts less."""
    flagged = [i for i, p in enumerate(points) if p.get("flagged")]
    drop = flagged if len(points) - len(flagged) >= need else []
    kept = [p for i, p in enumerate(points) if i not in drop]
    w = []
    for p in kept:
        ci = _ci_rel(p)
        w.append((1.0 / max(ci, 0.01) ** 2 if ci is not None else 1.0) * (FLAGGED_WEIGHT if p.get("flagged") else 1.0))
    w = np.array(w, dtype=np.float64)
    return kept, (w / w.max() if len(w) else w), drop


def _ci_rel(p: dict) -> float | None:
    lo, hi, med = p.get("ci_low_s"), p.get("ci_high_s"), p.get("median_s")
    if lo is None or hi is None or not med or hi < lo:
        return None
    return (hi - lo) / (2 * med)



def param_sd(jac: np.ndarray, fun: np.ndarray, n: int) -> np.ndarray:
    """Standard deviations of the parameters: (JᵀJ)⁻¹ scaled by the residual variance (0 for an exact fit)."""
    p = jac.shape[1]
    s2 = float(fun @ fun) / max(1, n - p)
    cov = np.linalg.pinv(jac.T @ jac) * s2
    return np.sqrt(np.clip(np.diag(cov), 0.0, None))


__all__ = ["FIT_LIMIT", "FLAGGED_WEIGHT", "GB", "Z95", "param_sd", "usable"]
