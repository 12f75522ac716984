"""Fit the simulator's hardware constants to microbenchmark results, with physical structure and error bars.

- Compute, per kernel kind: time = Σ_groups max(bytes / B, FLOPs / F) + launches x c, the cost model's
  roofline (sim/costs.py). A whole layer has two groups (its matmuls; its attention) and one launch cost;
  the lm_head one group and one launch; a lone GEMM or attention kernel one group and one fixed cost.
  The profile's layer fit adds the cost model's two refinements as parameters in [0.01, 1]: the
  attention group's share of the roofline (attention_efficiency) and the share of the shorter of
  memory and FLOP time hidden under the longer (roofline_overlap: max + (1 - share) x min; a CPU
  core streaming weights while it multiplies hides only part of one under the other).
  Fitted with scipy.optimize.least_squares on weighted log-time residuals, B, F > 0 and 0 <= c <=
  the measured no-op (the launch of a layer with nothing to compute: hw/calibrate.py), so that a
  fit can never buy a residual with a launch cost the machine does not have. The profile's constants
  come from the whole-layer and lm_head fit over the *fitted* shapes; shapes measured but held out
  are predicted by it and their errors recorded.
- Link curves (and each copy mechanism): time = calls x per-call cost + pieces x per-piece cost +
  bytes / bandwidth, all >= 0 (scipy.optimize.lsq_linear on relative residuals); the bandwidth from
  the copies of at least 1 MiB (on a CPU, smaller copies run from cache). The size curve, the
  effective rate at each size, rides along.
- Every fit reports its residuals (rms and max relative) and 95% intervals of its parameters (from
  the Jacobian and the residual variance: noise widens them, it does not move the estimate); a fit
  whose rms residual exceeds FIT_LIMIT is marked in the profile's source strings.
- Points a measurement flagged (hw/timing.py: CV above its limit, or a busy machine) are dropped
  when enough others remain, else down-weighted; the fit lists them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import least_squares, lsq_linear

from tiersim.errors import TiersimError
from tiersim.specs import ModelSpec

GB = 1e9
FIT_LIMIT = 0.15  # rms relative residual above which a fit is marked in the profile
BANDWIDTH_MIN_BYTES = 1 << 20  # copies this large set the bandwidth; smaller ones only the latency
MAX_GBPS = 1e4  # a fitted rate above 10 TB/s is not a host link or memory: the bandwidth was not identified
EFF_MIN = 0.01  # lowest attention efficiency a fit may return (a share of the roofline, never 0)
FLAGGED_WEIGHT = 0.25  # weight of a flagged point when too few unflagged ones remain to drop it
Z95 = 1.959964


# ---------------------------------------------------------------------------------------------
# Points: flagged ones dropped or down-weighted, weights from each point's confidence interval
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Rooflines: Σ max(bytes / B, FLOPs / F) + launches x c
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Work:
    """Points of one roofline fit: per point, its groups' bytes and FLOPs, its launches and its time."""

    bytes: np.ndarray  # [n, groups]
    flops: np.ndarray  # [n, groups]
    launches: np.ndarray  # [n]
    time: np.ndarray  # [n]
    weight: np.ndarray  # [n]
    labels: tuple[str, ...] = ()  # which shape (or kernel) each point is

    def predict(self, bw: float, flops: float, fixed_s: float, attention_eff: float = 1.0,
                overlap: float = 1.0) -> np.ndarray:
        """Roofline time of every point as sim/costs.py takes it: per group the longer of memory and FLOP time plus
        the (1 - overlap) of the shorter not hidden; the second group (a layer's attention) at `attention_eff`."""
        memory, compute = self.bytes / bw, self.flops / flops
        groups = np.maximum(memory, compute)
        if overlap != 1.0:
            groups = groups + (1.0 - overlap) * np.minimum(memory, compute)
        if attention_eff != 1.0 and groups.shape[1] > 1:
            groups = groups.copy()
            groups[:, 1] /= attention_eff
        return groups.sum(axis=1) + self.launches * fixed_s

    @staticmethod
    def join(parts: list[Work]) -> Work:
        """The points of several Works (groups padded with zeros)."""
        g = max(p.bytes.shape[1] for p in parts)
        pad = lambda a: np.pad(a, ((0, 0), (0, g - a.shape[1])))  # noqa: E731
        return Work(np.vstack([pad(p.bytes) for p in parts]), np.vstack([pad(p.flops) for p in parts]),
                    np.concatenate([p.launches for p in parts]), np.concatenate([p.time for p in parts]),
                    np.concatenate([p.weight for p in parts]), tuple(x for p in parts for x in p.labels))


@dataclass(frozen=True, slots=True)
class RooflineFit:
    """B (GB/s), F (TFLOP/s) and the fixed cost per launch (µs), with 95% intervals and residuals."""

    gbps: float
    tflops: float
    fixed_us: float
    fixed_max_us: float | None  # the bound the fixed cost was held under (a measured no-op), None: unbounded
    gbps_ci: tuple[float, float]
    tflops_ci: tuple[float, float]
    fixed_us_ci: tuple[float, float]
    rms_rel: float
    max_rel: float
    points: int
    dropped: int = 0
    residual_by_label: dict[str, float] = field(default_factory=dict)  # rms relative residual per shape / kernel
    attention_eff: float | None = None  # the attention group's share of the roofline, where fitted (else 1)
    attention_eff_ci: tuple[float, float] | None = None
    overlap: float | None = None  # share of the shorter of memory and FLOP time hidden, where fitted (else 1)
    overlap_ci: tuple[float, float] | None = None

    @property
    def within_limit(self) -> bool:
        """Whether the rms residual is at most FIT_LIMIT."""
        return self.rms_rel <= FIT_LIMIT

    def residual(self) -> str:
        """The residual as a phrase for sources (marked when above the limit)."""
        text = f"fit residual {100 * self.rms_rel:.1f}% rms, {100 * self.max_rel:.1f}% max over {self.points} timings"
        if self.dropped:
            text += f" ({self.dropped} flagged timings dropped)"
        return text + ("" if self.within_limit else f"; RESIDUAL ABOVE THE {100 * FIT_LIMIT:.0f}% LIMIT: use with care")

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def fit_roofline(work: Work, fixed_max_s: float | None = None, attention_eff: bool = False,
                 overlap: bool = False) -> RooflineFit:
    """Fit (B, F, c) with B, F > 0 and 0 <= c <= fixed_max_s to the points of `work` (weighted log residuals);
    with `attention_eff`, also the attention group's share e of the roofline, EFF_MIN <= e <= 1 (sim/costs.py's
    attention_efficiency): the attention kernels' own rate relative to the matmuls', at one B and F; with
    `overlap`, also the share o of the shorter of memory and FLOP time hidden, EFF_MIN <= o <= 1 (roofline_overlap).

    The 95% intervals come from the Jacobian (residual variance x (JᵀJ)⁻¹): they widen with noise, and are
    approximate where the roofline's max() switches regime near the data (on synthetic 5% noise they cover the
    truth about three times in four, tests/test_fit_structure.py)."""
    t, n = work.time, len(work.time)
    if n < 3 or not (t > 0).all():
        raise TiersimError(f"roofline fit needs at least 3 positive timings, got {n}")
    sw = np.sqrt(work.weight)
    c_hi = float(t.min()) if fixed_max_s is None else max(float(fixed_max_s), 1e-12)

    extra = [name for name, on in (("attention_eff", attention_eff), ("overlap", overlap)) if on]

    def resid(z):
        more = dict(zip(extra, z[3:]))
        return sw * np.log(work.predict(math.exp(z[0]), math.exp(z[1]), z[2], **more) / t)

    bw0 = float(np.max(work.bytes.sum(axis=1) / t))  # the best any point reached, as if bandwidth-bound
    fl0 = float(np.max(work.flops.sum(axis=1) / t))
    lo = [math.log(bw0) - 7, math.log(fl0) - 7, 0.0] + [EFF_MIN] * len(extra)
    hi = [math.log(bw0) + 7, math.log(fl0) + 7, c_hi] + [1.0] * len(extra)
    best = None
    for scale in (0.7, 1.0, 1.5):
        for c0 in (0.0, 0.5 * c_hi):
            for e0 in ((0.3, 0.9) if extra else (None,)):
                z0 = np.array([math.log(bw0 * scale), math.log(fl0 * scale), min(c0, c_hi)] + [e0] * len(extra))
                sol = least_squares(resid, z0, bounds=(lo, hi), method="trf",
                                    x_scale=[1.0, 1.0, max(c_hi, 1e-9)] + [0.1] * len(extra))
                if best is None or sol.cost < best.cost:
                    best = sol
    bw, fl, c = math.exp(best.x[0]), math.exp(best.x[1]), float(best.x[2])
    got = {name: float(v) for name, v in zip(extra, best.x[3:])}
    rel = work.predict(bw, fl, c, **got) / t - 1.0
    sd = _param_sd(best.jac, best.fun, n)
    lo_z, hi_z = best.x - Z95 * sd, best.x + Z95 * sd
    ci = lambda i, f: (f(lo_z[i]), f(hi_z[i]))  # noqa: E731
    c_ci = (max(0.0, lo_z[2]) * 1e6, min(c_hi, hi_z[2]) * 1e6)
    by = {lab: float(np.sqrt(np.mean(rel[[i for i, x in enumerate(work.labels) if x == lab]] ** 2)))
          for lab in dict.fromkeys(work.labels)}
    return RooflineFit(bw / GB, fl / 1e12, c * 1e6, None if fixed_max_s is None else fixed_max_s * 1e6,
                       ci(0, lambda z: math.exp(z) / GB), ci(1, lambda z: math.exp(z) / 1e12), c_ci,
                       float(np.sqrt(np.mean(rel**2))), float(np.abs(rel).max()), n, residual_by_label=by,
                       **{k: got[k] for k in extra},
                       **{f"{k}_ci": (max(EFF_MIN, lo_z[i]), min(1.0, hi_z[i])) for i, k in enumerate(extra, 3)})


def _param_sd(jac: np.ndarray, fun: np.ndarray, n: int) -> np.ndarray:
    """Standard deviations of the parameters: (JᵀJ)⁻¹ scaled by the residual variance (0 for an exact fit)."""
    p = jac.shape[1]
    s2 = float(fun @ fun) / max(1, n - p)
    cov = np.linalg.pinv(jac.T @ jac) * s2
    return np.sqrt(np.clip(np.diag(cov), 0.0, None))


def layer_work(model: ModelSpec, layers: list[dict], head: list[dict], weights=None) -> Work:
    """Whole-layer and lm_head timings of one shape as roofline points: a layer's matmuls and its attention are
    two groups with one launch cost (decode: every sequence's query over its KV tokens, read once; prefill:
    causal attention over the prompt, the simulator's prefill_pairs / 2); the lm_head one group, one launch."""
    m = model
    rows = []
    for p in layers:
        tokens = p["tokens"]
        if p["kv_tokens"]:
            pairs = kv = p["batch"] * p["kv_tokens"]
        else:
            pairs, kv = tokens * (tokens + 1) / 2, 0
        rows.append((m.layer_weight_bytes, kv * m.kv_bytes_per_token_layer, 2.0 * m.layer_params * tokens,
                     4.0 * m.attention_heads * m.head_dim * pairs, p["median_s"]))
    for p in head:
        rows.append((m.vocab * m.hidden * m.dtype_bytes, 0.0, 2.0 * m.vocab * m.hidden * p["tokens"], 0.0, p["median_s"]))
    a = np.array(rows, dtype=np.float64).reshape(-1, 5)
    w = np.ones(len(a)) if weights is None else np.asarray(weights, dtype=np.float64)
    return Work(a[:, 0:2], a[:, 2:4], np.ones(len(a)), a[:, 4], w, (m.name,) * len(a))


def _work(model: ModelSpec, layers: list[dict], head: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per point: (bytes, flops) of the matmul group, of the attention group, and the measured time."""
    w = layer_work(model, layers, head)
    return np.stack([w.bytes[:, 0], w.flops[:, 0]], 1), np.stack([w.bytes[:, 1], w.flops[:, 1]], 1), w.time


def predict_compute(x, mm: np.ndarray, att: np.ndarray) -> np.ndarray:
    """Cost-model time of each point for x = (bytes/s, FLOP/s, launch s)."""
    bw, flops, launch = x
    return np.maximum(mm[:, 0] / bw, mm[:, 1] / flops) + np.maximum(att[:, 0] / bw, att[:, 1] / flops) + launch


@dataclass(frozen=True, slots=True)
class ComputeFit:
    """Effective HBM bandwidth, FLOP rate and per-layer launch cost of the cost model's roofline."""

    hbm_gbps: float
    tflops: float
    launch_us: float
    rms_rel: float
    max_rel: float
    points: int
    launch_max_us: float | None = None
    hbm_gbps_ci: tuple[float, float] | list | None = None
    tflops_ci: tuple[float, float] | list | None = None
    launch_us_ci: tuple[float, float] | list | None = None
    dropped: int = 0
    shapes: tuple[str, ...] | list = ()
    residual_by_shape: dict = field(default_factory=dict)
    attention_efficiency: float | None = None  # the attention group's share of the roofline, where fitted
    attention_efficiency_ci: tuple[float, float] | list | None = None
    roofline_overlap: float | None = None  # share of the shorter of memory and FLOP time hidden, where fitted
    roofline_overlap_ci: tuple[float, float] | list | None = None

    @property
    def within_limit(self) -> bool:
        """Whether the rms residual is at most FIT_LIMIT."""
        return self.rms_rel <= FIT_LIMIT

    def residual(self) -> str:
        """The residual as a phrase for sources (marked when above the limit)."""
        text = (f"fit residual {100 * self.rms_rel:.1f}% rms, {100 * self.max_rel:.1f}% max over {self.points} layer and "
                "lm_head timings")
        if self.dropped:
            text += f" ({self.dropped} flagged timings dropped)"
        return text + ("" if self.within_limit else f"; RESIDUAL ABOVE THE {100 * FIT_LIMIT:.0f}% LIMIT: use with care")

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def fit_compute(model: ModelSpec, layers: list[dict], head: list[dict], launch_max_s: float | None = None) -> ComputeFit:
    """Fit (bandwidth, FLOP rate, 0 <= launch <= launch_max_s) to one shape's whole-layer and lm_head timings."""
    return fit_compute_shapes([(model, layers, head)], launch_max_s)


def fit_compute_shapes(shapes: list[tuple[ModelSpec, list[dict], list[dict]]],
                       launch_max_s: float | None = None, attention_efficiency: bool = False,
                       roofline_overlap: bool = False) -> ComputeFit:
    """One (bandwidth, FLOP rate, launch) over the whole-layer and lm_head timings of several shapes; with
    `attention_efficiency`, also the attention's share of that roofline, with `roofline_overlap` the share of the
    shorter of memory and FLOP time hidden (the cost model's optional fields of the same names)."""
    parts, dropped = [], 0
    for model, layers, head in shapes:
        points = list(layers) + list(head)
        kept, w, drop = usable(points, need=min(len(points), 3))
        dropped += len(drop)
        keep_layers = [p for p in kept if "kv_tokens" in p]
        keep_head = [p for p in kept if "kv_tokens" not in p]
        parts.append(layer_work(model, keep_layers, keep_head, w))
    work = Work.join(parts)
    if len(work.time) < 3:
        raise TiersimError(f"compute fit needs at least 3 timings, got {len(work.time)}")
    f = fit_roofline(work, launch_max_s, attention_efficiency, roofline_overlap)
    return ComputeFit(f.gbps, f.tflops, f.fixed_us, f.rms_rel, f.max_rel, f.points, f.fixed_max_us, f.gbps_ci,
                      f.tflops_ci, f.fixed_us_ci, dropped, tuple(m.name for m, _, _ in shapes), f.residual_by_label,
                      f.attention_eff, f.attention_eff_ci, f.overlap, f.overlap_ci)


def check_shape(fit: ComputeFit, model: ModelSpec, layers: list[dict], head: list[dict]) -> dict:
    """A held-out shape predicted by a fit: per-point relative errors and their rms."""
    w = layer_work(model, layers, head)
    rel = w.predict(fit.hbm_gbps * GB, fit.tflops * 1e12, fit.launch_us * 1e-6, fit.attention_efficiency or 1.0,
                    fit.roofline_overlap or 1.0) / w.time - 1.0
    return {"shape": model.name, "points": len(rel), "rms_rel": float(np.sqrt(np.mean(rel**2))),
            "max_rel": float(np.abs(rel).max()), "errors_pct": (100 * rel).round(2).tolist()}


def kernel_work(kind: str, points: list[dict], model: ModelSpec) -> Work:
    """Roofline points of one kernel kind: 'matmul' (the GEMM sweep), 'attention' (the attention sweep) or
    'lm_head' (the head sweep), each one group and one fixed cost."""
    kept, w, _ = usable(points, need=min(len(points), 3))
    m = model
    if kind == "matmul":
        rows = [(p["weight_bytes"], 2.0 * p["out"] * p["in"] * p["tokens"]) for p in kept]
    elif kind == "attention":
        rows = [(p["kv_bytes"], 4.0 * m.attention_heads * m.head_dim * p["batch"] * p["kv_tokens"]) for p in kept]
    elif kind == "lm_head":
        rows = [(m.vocab * m.hidden * m.dtype_bytes, 2.0 * m.vocab * m.hidden * p["tokens"]) for p in kept]
    else:
        raise TiersimError(f"kernel kind {kind!r} unknown; accepted: matmul, attention, lm_head")
    a = np.array(rows, dtype=np.float64).reshape(-1, 2)
    return Work(a[:, :1], a[:, 1:], np.ones(len(a)), np.array([p["median_s"] for p in kept]), w, (kind,) * len(a))


# ---------------------------------------------------------------------------------------------
# Copies: calls x per-call + pieces x per-piece + bytes / bandwidth
# ---------------------------------------------------------------------------------------------

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
    sd = float(_param_sd(jac, resid, int(big.sum()))[0])
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


def __getattr__(name: str):
    """build_profile, Calibration and summary_rows live in calibration/profile.py; importable from here too."""
    if name in ("Calibration", "build_profile", "summary_rows", "fits"):
        from tiersim.calibration import profile

        return getattr(profile, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BANDWIDTH_MIN_BYTES", "FIT_LIMIT", "ComputeFit", "LinkFit", "RooflineFit", "Work", "check_shape",
           "fit_compute", "fit_compute_shapes", "fit_gather", "fit_link", "fit_mechanisms", "fit_roofline",
           "kernel_work", "layer_work", "mechanism_points", "predict_compute", "usable"]
