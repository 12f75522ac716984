"""Fit the simulator's hardware constants to microbenchmark results and write them as a profile.

- Link curves: time(size) = latency + size / bandwidth, a weighted linear least-squares fit
  (scipy.optimize.lsq_linear, relative residuals, both terms >= 0) per direction and memory kind.
- Compute: the cost model's own layer formula (sim/costs.py),
  layer = max(weight bytes / B, 2·params·tokens / F) + max(KV bytes / B, 4·heads·head_dim·pairs / F) + launch,
  head = max(vocab·hidden·dtype / B, 2·vocab·hidden·tokens / F) + launch,
  fitted to the whole-layer and head measurements for B (effective HBM bandwidth), F (effective
  FLOP rate) and launch with scipy.optimize.least_squares on log-time residuals.
- Host gathers: `ddr_gbps` is the read + write traffic of the measured scattered-row gather (the cost
  model's gather costs 2·bytes / ddr_gbps).

Every value of the resulting HardwareSpec carries "measured: <device>, <driver>, torch <version>,
<date>, <how>, fit residual ...", or, for what a microbenchmark cannot measure, where it comes from.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares, lsq_linear

from tiersim.errors import TiersimError
from tiersim.fileio import atomic_path, write_json
from tiersim.specs import HardwareSpec, ModelSpec
from tiersim.specs.hardware import datasheet_for

GB = 1e9


@dataclass(frozen=True, slots=True)
class LinkFit:
    """latency + bytes / bandwidth, and how well it fits."""

    latency_us: float
    gbps: float
    rms_rel: float  # root-mean-square relative residual
    max_rel: float
    points: int

    def residual(self) -> str:
        """The residual as a phrase for sources."""
        return f"fit residual {100 * self.rms_rel:.1f}% rms, {100 * self.max_rel:.1f}% max over {self.points} sizes"

    def to_dict(self) -> dict:
        return {"latency_us": self.latency_us, "gbps": self.gbps, "rms_rel": self.rms_rel, "max_rel": self.max_rel,
                "points": self.points}


BANDWIDTH_MIN_BYTES = 1 << 20  # copies this large set the bandwidth; smaller ones only the latency


def fit_link(points: list[dict]) -> LinkFit:
    """Fit time = latency + bytes / bandwidth to {bytes, median_s} points, both terms >= 0.

    The bandwidth comes from a relative-residual fit (scipy lsq_linear) of the copies of at least 1 MiB
    (all of them when fewer than two are that large): on a CPU, smaller copies run from cache and would
    inflate it. The latency then minimises the relative residuals of every size at that bandwidth.
    """
    b = np.array([p["bytes"] for p in points], dtype=np.float64)
    t = np.array([p["median_s"] for p in points], dtype=np.float64)
    if len(b) < 2 or not (t > 0).all():
        raise TiersimError(f"link fit needs at least 2 sizes with positive times, got {len(b)}")
    big = b >= BANDWIDTH_MIN_BYTES
    big = big if big.sum() >= 2 else np.ones_like(big)
    a = np.stack([np.ones_like(b), b], axis=1) / t[:, None]  # rows scaled by 1/t: relative residuals
    sol = lsq_linear(a[big], np.ones(int(big.sum())), bounds=(0.0, np.inf))
    inv_bw = float(sol.x[1])
    if inv_bw <= 0:
        raise TiersimError("link fit: bandwidth term came out zero (times do not grow with size)")
    w = 1.0 / t**2  # least squares of (latency + b/bw - t) / t over every size, latency >= 0
    latency_s = max(0.0, float(np.sum(w * (t - b * inv_bw)) / np.sum(w)))
    rel = (latency_s + b * inv_bw - t) / t
    return LinkFit(latency_s * 1e6, 1.0 / inv_bw / GB, float(np.sqrt(np.mean(rel**2))), float(np.abs(rel).max()), len(b))


@dataclass(frozen=True, slots=True)
class ComputeFit:
    """Effective HBM bandwidth, FLOP rate and per-layer launch cost of the cost model's roofline."""

    hbm_gbps: float
    tflops: float
    launch_us: float
    rms_rel: float
    max_rel: float
    points: int

    def residual(self) -> str:
        return (f"fit residual {100 * self.rms_rel:.1f}% rms, {100 * self.max_rel:.1f}% max over {self.points} "
                "layer and lm_head timings")

    def to_dict(self) -> dict:
        return {"hbm_gbps": self.hbm_gbps, "tflops": self.tflops, "launch_us": self.launch_us, "rms_rel": self.rms_rel,
                "max_rel": self.max_rel, "points": self.points}


def _work(model: ModelSpec, layers: list[dict], head: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per point: (bytes, flops) of each roofline term and the measured time."""
    m = model
    rows, times = [], []
    for p in layers:
        tokens = p["tokens"]
        if p["kv_tokens"]:  # decode: every sequence's query over its KV tokens, read once
            pairs = kv = p["batch"] * p["kv_tokens"]
        else:  # prefill: causal attention over the prompt, its KV just computed (the simulator's prefill_pairs / 2)
            pairs, kv = tokens * (tokens + 1) / 2, 0
        rows.append((m.layer_weight_bytes, 2.0 * m.layer_params * tokens,
                     kv * m.kv_bytes_per_token_layer, 4.0 * m.attention_heads * m.head_dim * pairs))
        times.append(p["median_s"])
    for p in head:
        rows.append((m.vocab * m.hidden * m.dtype_bytes, 2.0 * m.vocab * m.hidden * p["tokens"], 0.0, 0.0))
        times.append(p["median_s"])
    w = np.array(rows, dtype=np.float64)
    return w[:, :2], w[:, 2:], np.array(times)


def predict_compute(x: np.ndarray, mm: np.ndarray, att: np.ndarray) -> np.ndarray:
    """Cost-model time of each point for x = (bytes/s, FLOP/s, launch s)."""
    bw, flops, launch = x
    return (np.maximum(mm[:, 0] / bw, mm[:, 1] / flops) + np.maximum(att[:, 0] / bw, att[:, 1] / flops) + launch)


def fit_compute(model: ModelSpec, layers: list[dict], head: list[dict]) -> ComputeFit:
    """Fit (bandwidth, FLOP rate, launch >= 0) to whole-layer and lm_head timings on log-time residuals."""
    mm, att, t = _work(model, layers, head)
    if len(t) < 3:
        raise TiersimError(f"compute fit needs at least 3 timings, got {len(t)}")

    def resid(z):
        return np.log(predict_compute((np.exp(z[0]), np.exp(z[1]), z[2]), mm, att) / t)

    bw0 = float(np.max((mm[:, 0] + att[:, 0]) / t))  # the best any point reached, as if bandwidth-bound
    fl0 = float(np.max((mm[:, 1] + att[:, 1]) / t))
    best = None
    for scale in (0.7, 1.0, 1.5):
        for launch0 in (0.0, 0.1 * float(t.min())):
            z0 = np.array([math.log(bw0 * scale), math.log(fl0 * scale), launch0])
            sol = least_squares(resid, z0, bounds=([-np.inf, -np.inf, 0.0], [np.inf, np.inf, float(t.min())]),
                                x_scale=[1.0, 1.0, float(t.min())], method="trf")
            if best is None or sol.cost < best.cost:
                best = sol
    x = (math.exp(best.x[0]), math.exp(best.x[1]), float(best.x[2]))
    rel = predict_compute(x, mm, att) / t - 1.0
    return ComputeFit(x[0] / GB, x[1] / 1e12, x[2] * 1e6, float(np.sqrt(np.mean(rel**2))), float(np.abs(rel).max()),
                      len(t))


def fit_gather(points: list[dict]) -> LinkFit:
    """The host gather's bytes/s (a line through latency + bytes / rate)."""
    return fit_link(points)


def fits(raw: dict) -> dict:
    """Every fit of one `measure()` result."""
    model = ModelSpec.from_dict(raw["model"])
    out = {name: fit_link(points).to_dict() for name, points in raw["copies"].items()}
    out["gather"] = fit_gather(raw["gather"]).to_dict()
    out["compute"] = fit_compute(model, raw["layers"], raw["head"]).to_dict()
    # Separate fits, to show how far one bandwidth serves both weights and KV (reported, not used).
    gemm_only = [p for p in raw["layers"] if not p["kv_tokens"]] or raw["layers"]
    enough = len(gemm_only) + len(raw["head"]) >= 3
    out["compute_gemm_only"] = fit_compute(model, gemm_only, raw["head"]).to_dict() if enough else None
    att = raw["attention"]
    out["attention_kv_gbps_median"] = float(np.median([p["kv_gbps"] for p in att])) if att else None
    return out


def _link_gather_note(raw: dict) -> str:
    """What the GPU's own gather from pinned host memory reached (the pinned fetch of sim/costs.py), for comparison."""
    points = raw.get("link_gather") or []
    if not points or "unavailable" in points[0]:
        return ""
    rates = ", ".join(f"{p['gbps']:.1f}" for p in points)
    return (f"; for comparison, the GPU gathering {points[0]['row_bytes']}-byte KV rows from pinned host memory "
            f"itself (zero-copy) reached {rates} GB/s at {', '.join(str(p['bytes'] >> 20) + ' MiB' for p in points)}")


def build_profile(raw: dict, fitted: dict, name: str | None = None) -> HardwareSpec:
    """A HardwareSpec from the measurements and fits; every value says where it came from."""
    info, model = raw["device"], raw["model"]
    cpu = info["kind"] == "cpu"
    where = f"measured: {info['name']}, {info['driver']}, torch {info['torch']}, {info['date']}"
    if cpu:
        where += ", one torch thread (the replay's CPU compute stream)"
    c = fitted["compute"]
    link = {k: fitted[k] for k in ("h2d_pinned", "d2h_pinned", "h2d_pageable", "d2h_pageable")}
    how_copy = ("copy_ between two host buffers (the CPU device has no host link)" if cpu else
                "cudaMemcpyAsync via tensor.copy_(non_blocking=True) on one stream, CUDA events")
    sizes = f"{len(raw['copies']['h2d_pinned'])} sizes {raw['copies']['h2d_pinned'][0]['bytes'] // 1024} KiB.." \
            f"{raw['copies']['h2d_pinned'][-1]['bytes'] // (1 << 20)} MiB, medians"
    values, sources = {}, {}

    def put(key, value, how):
        values[key], sources[key] = float(value), f"{where}, {how}"

    for key, curve in (("h2d_gbps_pinned", "h2d_pinned"), ("d2h_gbps_pinned", "d2h_pinned"),
                       ("h2d_gbps_pageable", "h2d_pageable"), ("d2h_gbps_pageable", "d2h_pageable")):
        f = link[curve]
        kind = "pinned" if "pinned" in curve else "pageable"
        put(key, f["gbps"], f"{curve.split('_')[0].upper()} {kind}: {how_copy}, {sizes}, bandwidth of "
                            f"latency + bytes/bandwidth (bandwidth from the copies >= 1 MiB); {LinkFit(**f).residual()}"
                            + (_link_gather_note(raw) if key == "h2d_gbps_pinned" else ""))
    lat = link["h2d_pinned"]
    others = ", ".join(f"{k} {link[k]['latency_us']:.2f}" for k in ("d2h_pinned", "h2d_pageable", "d2h_pageable"))
    put("copy_latency_us", max(lat["latency_us"], 0.01),
        f"latency of the pinned H2D fit ({others} us for the other curves); {LinkFit(**lat).residual()}"
        + ("; floored at 0.01 us" if lat["latency_us"] < 0.01 else ""))
    dup = raw["duplex"]
    put("duplex_factor", min(1.0, max(dup["factor"], 1e-3)),
        f"H2D and D2H of {dup['bytes'] // (1 << 20)} MiB at once ({'two host threads' if cpu else 'two CUDA streams'}):"
        f" each direction keeps {dup['factor_h2d']:.2f} (H2D) and {dup['factor_d2h']:.2f} (D2H) of its bandwidth alone; "
        "mean, capped at 1")
    put("hbm_gbps_effective", c["hbm_gbps"],
        f"B of the cost model's layer roofline fitted (scipy least_squares, log residuals) to whole model-shaped "
        f"layers of {model['name']} (projections + attention over T0 chunks + MLP) and its lm_head, rotated through "
        f"weight copies larger than the cache; {ComputeFit(**c).residual()}")
    put("bf16_tflops_effective", c["tflops"], f"F of the same fit; {ComputeFit(**c).residual()}")
    put("launch_us", max(c["launch_us"], 0.01), f"per-layer constant of the same fit (kernel launches"
        f"{' and Python dispatch' if cpu else ''}); {ComputeFit(**c).residual()}"
        + ("; the fit put it at its bound 0, floored at 0.01 us" if c["launch_us"] < 0.01 else ""))
    g = fitted["gather"]
    put("ddr_gbps", 2 * g["gbps"],
        f"2 x the host gather rate (read + write traffic) of scattered {raw['gather'][0]['row_bytes']}-byte KV rows "
        f"(torch.index_select into a contiguous buffer, {len(raw['gather'])} sizes); {LinkFit(**g).residual()}")
    ram = info["ram_bytes"] / GB
    put("ddr_gb", ram, "MemTotal of /proc/meminfo (installed host RAM)")
    if cpu:
        put("hbm_gb", ram, "the CPU device's memory is host RAM: MemTotal of /proc/meminfo")
    else:
        put("hbm_gb", info["memory_bytes"] / GB, "total_memory reported by torch.cuda.get_device_properties")
    _spec_values(raw, fitted, values, sources, where)
    sheet = datasheet_for(info)
    label = info["name"]
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:48]
    return HardwareSpec(
        name=name or f"measured-{slug}",
        description=(f"{info['label']}: calibrated {info['date']} on {info['host']}" if cpu else
                     f"{label} measured {info['date']} on {info['host']}"),
        link=("none: CPU device, copies are host memcpy" if cpu else (sheet.link if sheet else "host link (measured)")),
        **values, sources=sources)


def _spec_values(raw: dict, fitted: dict, values: dict, sources: dict, where: str) -> None:
    """hbm_gbps_spec and bf16_tflops_spec: the datasheet when the device is known, else the best measured."""
    sheet = datasheet_for(raw["device"])
    best_bw = max([values["hbm_gbps_effective"], raw["device_copy"]["gbps_read_write"] / 2]
                  + [p["weight_gbps"] for p in raw["gemm"]] + [p["kv_gbps"] for p in raw["attention"]])
    best_fl = max([values["bf16_tflops_effective"]] + [p["tflops"] for p in raw["gemm"]])
    for key, eff, best, unit in (("hbm_gbps_spec", "hbm_gbps_effective", best_bw, "GB/s"),
                                 ("bf16_tflops_spec", "bf16_tflops_effective", best_fl, "TFLOP/s")):
        if sheet is not None and getattr(sheet, key) >= values[eff]:
            values[key], sources[key] = getattr(sheet, key), f"{sheet.sources[key]} (datasheet, via profile {sheet.name})"
        else:
            values[key] = max(best, values[eff])
            why = (f"no datasheet for {raw['device']['name']}" if sheet is None else
                   f"the datasheet value {getattr(sheet, key)} is below the measured effective one")
            sources[key] = (f"{where}: {why}; set to the highest rate any microbenchmark reached ({values[key]:.3g} "
                            f"{unit}: fitted, GEMMs, attention, device copy)")


@dataclass(frozen=True, slots=True)
class Calibration:
    """A calibrated profile and everything behind it."""

    profile: HardwareSpec
    raw: dict  # measurements, fits, device info

    def write(self, toml_path: str | Path, raw_path: str | Path | None = None) -> tuple[Path, Path]:
        """Write the profile TOML and the raw JSON atomically; return both paths."""
        toml_path = Path(toml_path)
        raw_path = Path(raw_path) if raw_path else toml_path.with_suffix(".raw.json")
        header = (f"# {self.profile.description}\n# Written by `tiersim calibrate`; raw measurements and fits in "
                  f"{raw_path.name}.\n# Units: GB = 1e9 bytes, GB/s = 1e9 B/s, TFLOP/s dense.\n")
        text = header + self.profile.to_toml()
        toml_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(toml_path) as tmp:
            Path(tmp).write_text(text)
        write_json(raw_path, self.raw)
        return toml_path, raw_path


def summary_rows(cal: Calibration) -> list[tuple[str, str, str]]:
    """(field, value, how) rows for the CLI table."""
    p = cal.profile
    rows = []
    for key in ("hbm_gbps_effective", "bf16_tflops_effective", "launch_us", "h2d_gbps_pinned", "d2h_gbps_pinned",
                "h2d_gbps_pageable", "d2h_gbps_pageable", "copy_latency_us", "duplex_factor", "ddr_gbps", "hbm_gb",
                "ddr_gb", "hbm_gbps_spec", "bf16_tflops_spec"):
        value = getattr(p, key)
        residual = re.search(r"fit residual [^;]*", p.sources[key])
        rows.append((key, f"{value:.4g}", residual.group(0) if residual else p.sources[key].split(", ")[-1][:60]))
    return rows


__all__ = ["Calibration", "ComputeFit", "LinkFit", "build_profile", "fit_compute", "fit_link", "fits",
           "predict_compute", "summary_rows"]
