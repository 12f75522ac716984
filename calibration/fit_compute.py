"""Compute fits: the cost model's roofline (sim/costs.py) fitted per kernel kind and over whole layers of
several shapes, with physical bounds.

time = Σ_groups roofline(bytes / B, FLOPs / F) + launches x c + matmul calls x m. A whole layer has two
groups (its matmuls; its attention), one launch and the replay's GEMM calls (hw/kernels.py: fused qkv,
o, fused gate/up, down: 4); the lm_head one group, one launch and one GEMM call; a lone GEMM or
attention kernel one group and one fixed cost. The per-matmul cost m is what a GEMM call costs beyond
its bytes and FLOPs (a CPU streaming a cold weight matrix of a narrow layer reaches a lower rate than a
wide one); the launch c is what a layer costs in dispatch alone. Each is held in [0, its bound]: c
under the measured no-op layer, m under the fastest cold narrow GEMM measured (hw/microbench.py
`narrow_matmuls`: a call cannot cost more fixed time than a whole call), so that a fit can never buy
residual with a fixed cost the machine does not have. Optional parameters in [0.01, 1]: the attention
group's share of the roofline (attention_efficiency) and the share of the shorter of memory and FLOP
time hidden under the longer (roofline_overlap: max + (1 - share) x min).

Fitted with scipy.optimize.least_squares on weighted log-time residuals from several starts; 95%
intervals from the Jacobian (approximate where the max() switches regime near the data).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import least_squares

from tiersim.calibration.fit_points import FIT_LIMIT, GB, Z95, param_sd, usable
from tiersim.errors import TiersimError
from tiersim.specs import ModelSpec

EFF_MIN = 0.01  # lowest share (attention efficiency, overlap) a fit may return (never 0)
# GEMM calls of the replay's dense decoder layer (hw/kernels.py decoder_layer: qkv fused, o, gate/up fused, down)
MATMULS_PER_LAYER = 4
MATMULS_PER_HEAD = 1  # the lm_head


@dataclass(frozen=True, slots=True)
class Work:
    """Points of one roofline fit: per point, its groups' bytes and FLOPs, its launches, GEMM calls and time."""

    bytes: np.ndarray  # [n, groups]
    flops: np.ndarray  # [n, groups]
    launches: np.ndarray  # [n]
    time: np.ndarray  # [n]
    weight: np.ndarray  # [n]
    labels: tuple[str, ...] = ()  # which shape (or kernel) each point is
    matmuls: np.ndarray | None = None  # [n] GEMM calls (None: none)

    def calls(self) -> np.ndarray:
        """GEMM calls per point (zeros where not given)."""
        return np.zeros(len(self.time)) if self.matmuls is None else self.matmuls

    def predict(self, bw: float, flops: float, fixed_s: float, attention_eff: float = 1.0,
                overlap: float = 1.0, matmul_s: float = 0.0) -> np.ndarray:
        """Roofline time of every point as sim/costs.py takes it: per group the longer of memory and FLOP time plus
        the (1 - overlap) of the shorter not hidden; the second group (a layer's attention) at `attention_eff`;
        plus launches x fixed_s and GEMM calls x matmul_s."""
        memory, compute = self.bytes / bw, self.flops / flops
        groups = np.maximum(memory, compute)
        if overlap != 1.0:
            groups = groups + (1.0 - overlap) * np.minimum(memory, compute)
        if attention_eff != 1.0 and groups.shape[1] > 1:
            groups = groups.copy()
            groups[:, 1] /= attention_eff
        return groups.sum(axis=1) + self.launches * fixed_s + self.calls() * matmul_s

    @staticmethod
    def join(parts: list[Work]) -> Work:
        """The points of several Works (groups padded with zeros)."""
        g = max(p.bytes.shape[1] for p in parts)
        pad = lambda a: np.pad(a, ((0, 0), (0, g - a.shape[1])))  # noqa: E731
        return Work(np.vstack([pad(p.bytes) for p in parts]), np.vstack([pad(p.flops) for p in parts]),
                    np.concatenate([p.launches for p in parts]), np.concatenate([p.time for p in parts]),
                    np.concatenate([p.weight for p in parts]), tuple(x for p in parts for x in p.labels),
                    np.concatenate([p.calls() for p in parts]))


@dataclass(frozen=True, slots=True)
class RooflineFit:
    """B (GB/s), F (TFLOP/s), the fixed cost per launch (µs) and per GEMM call (µs), with 95% intervals and
    residuals."""

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
    matmul_us: float | None = None  # fixed cost per GEMM call, where fitted (else 0)
    matmul_us_ci: tuple[float, float] | None = None
    matmul_max_us: float | None = None  # the bound it was held under

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


@dataclass(frozen=True, slots=True)
class _Param:
    """One parameter of a roofline fit: its bounds, starting values and scale (z: its coordinate in the solver)."""

    name: str
    lo: float
    hi: float
    starts: tuple[float, ...]
    scale: float


def fit_roofline(work: Work, fixed_max_s: float | None = None, attention_eff: bool = False,
                 overlap: bool = False, matmul_max_s: float | None = None) -> RooflineFit:
    """Fit (B, F, c) with B, F > 0 and 0 <= c <= fixed_max_s to the points of `work` (weighted log residuals);
    with `attention_eff`, also the attention group's share e of the roofline, EFF_MIN <= e <= 1 (sim/costs.py's
    attention_efficiency); with `overlap`, also the share o of the shorter of memory and FLOP time hidden,
    EFF_MIN <= o <= 1 (roofline_overlap); with `matmul_max_s`, also the fixed cost m per GEMM call,
    0 <= m <= matmul_max_s (matmul_fixed_us).

    The 95% intervals come from the Jacobian (residual variance x (JᵀJ)⁻¹): they widen with noise, and are
    approximate where the roofline's max() switches regime near the data (on synthetic 5% noise they cover the
    truth about three times in four, tests/test_fit_structure.py)."""
    t, n = work.time, len(work.time)
    if n < 3 or not (t > 0).all():
        raise TiersimError(f"roofline fit needs at least 3 positive timings, got {n}")
    sw = np.sqrt(work.weight)
    c_hi = float(t.min()) if fixed_max_s is None else max(float(fixed_max_s), 1e-12)
    bw0 = float(np.max(work.bytes.sum(axis=1) / t))  # the best any point reached, as if bandwidth-bound
    fl0 = float(np.max(work.flops.sum(axis=1) / t))
    params = [_Param("bw", math.log(bw0) - 7, math.log(bw0) + 7, tuple(math.log(bw0 * s) for s in (0.7, 1.0, 1.5)), 1.0),
              _Param("flops", math.log(fl0) - 7, math.log(fl0) + 7, (math.log(fl0),), 1.0),
              _Param("fixed", 0.0, c_hi, (0.0, 0.5 * c_hi), max(c_hi, 1e-9))]
    if matmul_max_s is not None and matmul_max_s > 0 and work.calls().any():
        params.append(_Param("matmul", 0.0, float(matmul_max_s), (0.0, 0.5 * matmul_max_s), float(matmul_max_s)))
    params += [_Param(name, EFF_MIN, 1.0, (0.3, 0.9), 0.1) for name, on in (("attention_eff", attention_eff),
                                                                             ("overlap", overlap)) if on]

    def model(z) -> np.ndarray:
        v = dict(zip((p.name for p in params), z))
        return work.predict(math.exp(v["bw"]), math.exp(v["flops"]), v["fixed"], v.get("attention_eff", 1.0),
                            v.get("overlap", 1.0), v.get("matmul", 0.0))

    def resid(z):
        return sw * np.log(model(z) / t)

    best = None
    for z0 in _starts(params, fl0):
        sol = least_squares(resid, z0, bounds=([p.lo for p in params], [p.hi for p in params]), method="trf",
                            x_scale=[p.scale for p in params])
        if best is None or sol.cost < best.cost:
            best = sol
    v = dict(zip((p.name for p in params), best.x))
    rel = model(best.x) / t - 1.0
    sd = param_sd(best.jac, best.fun, n)
    ci = {p.name: (max(p.lo, z - Z95 * s), min(p.hi, z + Z95 * s)) for p, z, s in zip(params, best.x, sd)}
    by = {lab: float(np.sqrt(np.mean(rel[[i for i, x in enumerate(work.labels) if x == lab]] ** 2)))
          for lab in dict.fromkeys(work.labels)}
    exp_ci = lambda k, unit: (math.exp(ci[k][0]) / unit, math.exp(ci[k][1]) / unit)  # noqa: E731
    us_ci = lambda k: (ci[k][0] * 1e6, ci[k][1] * 1e6)  # noqa: E731
    more = {}
    for key, name in (("attention_eff", "attention_eff"), ("overlap", "overlap")):
        if name in v:
            more[key], more[f"{key}_ci"] = float(v[name]), ci[name]
    if "matmul" in v:
        more.update(matmul_us=float(v["matmul"]) * 1e6, matmul_us_ci=us_ci("matmul"), matmul_max_us=matmul_max_s * 1e6)
    return RooflineFit(math.exp(v["bw"]) / GB, math.exp(v["flops"]) / 1e12, float(v["fixed"]) * 1e6,
                       None if fixed_max_s is None else fixed_max_s * 1e6, exp_ci("bw", GB), exp_ci("flops", 1e12),
                       us_ci("fixed"), float(np.sqrt(np.mean(rel**2))), float(np.abs(rel).max()), n,
                       residual_by_label=by, **more)


def _starts(params: list[_Param], fl0: float) -> list[np.ndarray]:
    """Starting points: the bandwidth at three scales, the FLOP rate scaled with it, every other parameter at each
    of its starts (the fixed costs at 0 and mid-bound, the shares at 0.3 and 0.9, each share moving together)."""
    import itertools

    fixed = [p for p in params if p.name in ("fixed", "matmul")]
    shares = [p for p in params if p.lo == EFF_MIN]
    out = []
    for bw in params[0].starts:
        fl = params[1].starts[0] + (bw - params[0].starts[1])
        for fixed_z in itertools.product(*(p.starts for p in fixed)):
            for share in ((0.3, 0.9) if shares else (None,)):
                z = {"bw": bw, "flops": fl, **dict(zip((p.name for p in fixed), fixed_z)),
                     **{p.name: share for p in shares}}
                out.append(np.array([z[p.name] for p in params]))
    return out


def layer_work(model: ModelSpec, layers: list[dict], head: list[dict], weights=None) -> Work:
    """Whole-layer and lm_head timings of one shape as roofline points: a layer's matmuls and its attention are
    two groups with one launch and MATMULS_PER_LAYER GEMM calls (decode: every sequence's query over its KV
    tokens, read once; prefill: causal attention over the prompt, the simulator's prefill_pairs / 2); the lm_head
    one group, one launch, one GEMM call."""
    m = model
    rows = []
    for p in layers:
        tokens = p["tokens"]
        if p["kv_tokens"]:
            pairs = kv = p["batch"] * p["kv_tokens"]
        else:
            pairs, kv = tokens * (tokens + 1) / 2, 0
        rows.append((m.layer_weight_bytes, kv * m.kv_bytes_per_token_layer, 2.0 * m.layer_params * tokens,
                     4.0 * m.attention_heads * m.head_dim * pairs, p["median_s"], MATMULS_PER_LAYER))
    for p in head:
        rows.append((m.vocab * m.hidden * m.dtype_bytes, 0.0, 2.0 * m.vocab * m.hidden * p["tokens"], 0.0,
                     p["median_s"], MATMULS_PER_HEAD))
    a = np.array(rows, dtype=np.float64).reshape(-1, 6)
    w = np.ones(len(a)) if weights is None else np.asarray(weights, dtype=np.float64)
    return Work(a[:, 0:2], a[:, 2:4], np.ones(len(a)), a[:, 4], w, (m.name,) * len(a), a[:, 5])


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
    """Effective HBM bandwidth, FLOP rate, per-layer launch cost and per-GEMM-call cost of the cost model's
    roofline."""

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
    matmul_fixed_us: float | None = None  # fixed cost per GEMM call, where fitted
    matmul_fixed_us_ci: tuple[float, float] | list | None = None
    matmul_fixed_max_us: float | None = None  # its bound: the fastest cold narrow GEMM call measured

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
                       roofline_overlap: bool = False, matmul_max_s: float | None = None) -> ComputeFit:
    """One (bandwidth, FLOP rate, launch) over the whole-layer and lm_head timings of several shapes; with
    `attention_efficiency`, also the attention's share of that roofline, with `roofline_overlap` the share of the
    shorter of memory and FLOP time hidden, with `matmul_max_s` the fixed cost per GEMM call held under it (the
    cost model's optional fields attention_efficiency, roofline_overlap, matmul_fixed_us)."""
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
    f = fit_roofline(work, launch_max_s, attention_efficiency, roofline_overlap, matmul_max_s)
    return ComputeFit(f.gbps, f.tflops, f.fixed_us, f.rms_rel, f.max_rel, f.points, f.fixed_max_us, f.gbps_ci,
                      f.tflops_ci, f.fixed_us_ci, dropped, tuple(m.name for m, _, _ in shapes), f.residual_by_label,
                      f.attention_eff, f.attention_eff_ci, f.overlap, f.overlap_ci, f.matmul_us, f.matmul_us_ci,
                      f.matmul_max_us)


def check_shape(fit: ComputeFit, model: ModelSpec, layers: list[dict], head: list[dict]) -> dict:
    """A held-out shape predicted by a fit: per-point relative errors and their rms."""
    w = layer_work(model, layers, head)
    rel = w.predict(fit.hbm_gbps * GB, fit.tflops * 1e12, fit.launch_us * 1e-6, fit.attention_efficiency or 1.0,
                    fit.roofline_overlap or 1.0, (fit.matmul_fixed_us or 0.0) * 1e-6) / w.time - 1.0
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


def matmul_bound_s(points: list[dict]) -> float | None:
    """The bound of the fixed cost per GEMM call: the fastest cold GEMM call of the narrow-matmul benchmark
    (hw/compute_rounds.py; a call's fixed part cannot exceed the whole call), each call at its fastest round (a
    shared machine only ever slows a call down); None without points."""
    times = [min(p.get("rounds") or [p["median_s"]]) for p in points or [] if p.get("median_s")]
    return min(times) if times else None


__all__ = ["EFF_MIN", "MATMULS_PER_HEAD", "MATMULS_PER_LAYER", "ComputeFit", "RooflineFit", "Work", "check_shape",
           "fit_compute", "fit_compute_shapes", "fit_roofline", "kernel_work", "layer_work", "matmul_bound_s",
           "predict_compute"]
