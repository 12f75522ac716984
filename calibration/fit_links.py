"""Copy fits: each host-link curve and each copy mechanism as calls x per-call cost + pieces x per-piece cost +
bytes / bandwidth, every term >= 0 (scipy.optimize.lsq_linear on relative residuals).

The bandwidth comes from the copies of at least 1 MiB (on a CPU, smaller copies run from cache); the size
curve, the effective rate at each size, rides along. A fit whose rms residual over those copies exceeds
FIT_LIMIT is marked; a curve whose times do not grow with the bytes has no identified bandwidth and says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import lsq_linear

from tiersim.calibration.fit_points import FIT_LIMIT, GB, Z95, param_sd, usable
from tiersim.errors import TiersimError

BANDWIDTH_MIN_BYTES = 1 << 20  # copies this large set the bandwidth; smaller ones only the latency
MAX_GBPS = 1e4  # a fitted rate above 10 TB/s is not a host link or memory: the bandwidth was not identified


@dataclass(frozen=True, slots=True)
class LinkFit:
    """latency + bytes / bandwidth (and, where pieces vary, a per-piece cost), and how well it fits."""

    latency_us: float
    gbps: float
    rms_rel: float  # root-mean-square relative residual over every size
    max_rel: float
    points: int
    piece_us: float = 0.0  # cost per piece (a row of a gather, a block of a batched copy)
    gbps_ci: tuple[float, float] | list | None = None
    rms_rel_large: float | None = None  # over the copies that set the bandwidth (>= 1 MiB)
    size_curve: list | None = None  # [bytes, effective GB/s] per measured size
    dropped: int = 0
    identified: bool = True  # False: the times did not grow with the bytes; the rate is the large copies' median

    @property
    def within_limit(self) -> bool:
        """Whether the residual over the sizes that set the bandwidth is at most FIT_LIMIT."""
        return self.identified and (self.rms_rel if self.rms_rel_large is None else self.rms_rel_large) <= FIT_LIMIT

    def residual(self) -> str:
        """The residual as a phrase for sources (marked when above the limit)."""
        text = f"fit residual {100 * self.rms_rel:.1f}% rms, {100 * self.max_rel:.1f}% max over {self.points} sizes"
        if self.rms_rel_large is not None:
            text += f" ({100 * self.rms_rel_large:.1f}% rms over the copies >= 1 MiB)"
        if self.dropped:
            text += f", {self.dropped} flagged sizes dropped"
        if not self.identified:
            text += "; BANDWIDTH NOT IDENTIFIED (times do not grow with the bytes): the median rate of the large copies"
        return text + ("" if self.within_limit else f"; RESIDUAL ABOVE THE {100 * FIT_LIMIT:.0f}% LIMIT: use with care")

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def fit_link(points: list[dict]) -> LinkFit:
    """Fit time = calls x latency + pieces x piece cost + bytes / bandwidth to {bytes, median_s[, calls, pieces]}
    points, every term >= 0.

    The bandwidth (and the per-piece cost, where the pieces vary apart from the bytes) comes from a
    relative-residual fit (scipy lsq_linear) of the copies of at least 1 MiB (all of them when fewer than two
    are that large); the per-call latency then minimises the relative residuals of every size at that rate.
    """
    pts, w, drop = usable(points, need=min(len(points), 2))
    b = np.array([p["bytes"] for p in pts], dtype=np.float64)
    t = np.array([p["median_s"] for p in pts], dtype=np.float64)
    calls = np.array([p.get("calls", 1) for p in pts], dtype=np.float64)
    pieces = np.array([p.get("pieces", 0) for p in pts], dtype=np.float64)
    if len(b) < 2 or not (t > 0).all():
        raise TiersimError(f"link fit needs at least 2 sizes with positive times, got {len(b)}")
    # The bandwidth comes from large pieces (a copy of many small pieces says little about the rate).
    size = np.array([p.get("piece_bytes", p["bytes"]) for p in pts], dtype=np.float64)
    big = size >= BANDWIDTH_MIN_BYTES
    big = big if big.sum() >= 2 else np.ones_like(big)
    per_piece = bool(pieces.any()) and np.linalg.matrix_rank(np.stack([b[big], pieces[big]], 1)) == 2
    cols = [np.ones_like(b), b] + ([pieces] if per_piece else [])
    a = np.stack(cols, axis=1) / t[:, None] * np.sqrt(w)[:, None]  # rows scaled by 1/t: relative residuals
    sol = lsq_linear(a[big], np.sqrt(w[big]), bounds=(0.0, np.inf))
    inv_bw, piece_s = float(sol.x[1]), float(sol.x[2]) if per_piece else 0.0
    identified = inv_bw > 0 and 1.0 / inv_bw / GB <= MAX_GBPS
    if not identified:  # the times do not grow with the bytes: the large copies' median rate, and the fit says so
        inv_bw, piece_s = float(np.median(t[big] / b[big])), 0.0
    rest = t - b * inv_bw - pieces * piece_s
    ww = w / t**2  # least squares of (calls x latency + rest - t) / t over every size, latency >= 0
    latency_s = max(0.0, float(np.sum(ww * calls * rest) / np.sum(ww * calls**2)))
    rel = (calls * latency_s + b * inv_bw + pieces * piece_s - t) / t
    resid = a[big] @ sol.x - np.sqrt(w[big])
    jac = a[big][:, 1:2]
    sd = float(param_sd(jac, resid, int(big.sum()))[0])
    ci = (1.0 / (inv_bw + Z95 * sd) / GB, 1.0 / max(inv_bw - Z95 * sd, 1e-30) / GB)
    large = size >= BANDWIDTH_MIN_BYTES
    curve = [[int(x), float(x / y / GB)] for x, y in zip(b, t)]
    return LinkFit(latency_s * 1e6, 1.0 / inv_bw / GB, float(np.sqrt(np.mean(rel**2))), float(np.abs(rel).max()), len(b),
                   piece_s * 1e6, ci if identified else None,
                   float(np.sqrt(np.mean(rel[large] ** 2))) if large.sum() >= 2 else None, curve, len(drop), identified)


def fit_gather(points: list[dict]) -> LinkFit:
    """The host gather of scattered rows: per-row cost + bytes / rate, where the row sizes vary (else one line)."""
    return fit_link([{**p, "pieces": p["bytes"] // p["row_bytes"]} if "row_bytes" in p else p for p in points])


def mechanism_points(method: str, curves: dict) -> list[dict]:
    """A mechanism's timed points (hw/copy_bench.py: `by_size` and `by_count`, each with bytes, pieces, median_s)
    with the calls each issued: dma one per piece; dma-batched, host-gather and pageable one per copy."""
    pts = [p for key in ("by_size", "by_count") for p in (curves.get(key) or [])
           if isinstance(p, dict) and "median_s" in p and "bytes" in p and "unavailable" not in p]
    if method == "dma":
        return [{**p, "calls": p.get("pieces", 1), "pieces": 0} for p in pts]
    return [{**p, "calls": 1} for p in pts]


def fit_mechanisms(mechanisms: dict | None) -> dict:
    """Each copy mechanism's points fitted by fit_link (per-call cost, per-piece cost, bandwidth); a mechanism that
    cannot be fitted says why."""
    out = {}
    for name, curves in (mechanisms or {}).items():
        points = mechanism_points(name, curves if isinstance(curves, dict) else {})
        try:
            out[name] = fit_link(points).to_dict()
        except (TiersimError, KeyError, TypeError) as e:
            out[name] = {"unfitted": str(e)}
    return out


__all__ = ["BANDWIDTH_MIN_BYTES", "MAX_GBPS", "LinkFit", "fit_gather", "fit_link", "fit_mechanisms", "mechanism_points"]
