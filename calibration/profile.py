"""A hardware profile from microbenchmark results: every fit of calibration/fit.py, then a HardwareSpec whose
every value says where it came from, how well it fits, and (in its [fit] table) which shapes were fitted
and which were held out.

Every value of the resulting HardwareSpec carries "measured: <device>, <driver>, torch <version>,
<date>, <how>, fit residual ...", or, for what a microbenchmark cannot measure, where it comes from.
A fit whose residual is above calibration.fit.FIT_LIMIT is marked in its source ("RESIDUAL ABOVE THE
15% LIMIT") and listed under [fit] marked. A copy mechanism's optional constant whose fit misses by more than
REFUSE_LIMIT (its residual exceeds the values it fits) is refused: not written, so that mechanism is not
available in the profile (`auto` chooses among the others; the validation suite runs it as `auto`), and listed
under [fit] refused with the residual.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tiersim.calibration.fit import (
    FIT_LIMIT,
    MATMULS_PER_LAYER,
    ComputeFit,
    LinkFit,
    check_shape,
    fit_compute_shapes,
    fit_gather,
    fit_link,
    fit_mechanisms,
    fit_roofline,
    kernel_work,
    matmul_bound_s,
)
from tiersim.errors import TiersimError
from tiersim.fileio import atomic_path, write_json
from tiersim.specs import HardwareSpec, ModelSpec
from tiersim.specs.hardware import datasheet_for

GB = 1e9
LINK_CURVES = ("h2d_pinned", "d2h_pinned", "h2d_pageable", "d2h_pageable")
# Kernel launches of each timed kind (hw/kernels.py), so its fixed cost is bounded by that many no-op launches.
KERNEL_LAUNCHES = {"matmul": 2, "attention": 12, "lm_head": 8}


def shapes_of(raw: dict, role: str) -> list[tuple[ModelSpec, list[dict], list[dict]]]:
    """(model, layer timings, head timings) of the shapes measured with `role` ('fitted' or 'held_out'); a raw
    result without a shapes list has one fitted shape, its model's."""
    shapes = raw.get("shapes")
    if not shapes:
        return [(ModelSpec.from_dict(raw["model"]), raw["layers"], raw["head"])] if role == "fitted" else []
    return [(ModelSpec.from_dict(s["model"]), s["layers"], s["head"]) for s in shapes if s["role"] == role]


def narrow_gemms(raw: dict, role: str = "fitted") -> list[dict]:
    """The cold narrow GEMM calls (hw/compute_rounds.py) measured on the shapes with `role`."""
    return [p for s in raw.get("shapes") or [] if s["role"] == role for p in s.get("narrow_gemms") or []]


def launch_bound_s(raw: dict) -> float | None:
    """The no-op layer's time (the replay's layer on a shape with nothing to compute): the launch cost's bound; the
    larger of the layer alone and the layer inside a replayed step (hw/calibrate.step_overhead: what one more
    no-op layer adds to the replay's step), since the fit also reads layers timed inside the replay."""
    launch = raw.get("launch") or {}
    floor = launch.get("noop_layer")
    in_replay = (launch.get("step_overhead") or {}).get("layer_s")
    bounds = [v for v in (floor["median_s"] if floor else None, in_replay) if v is not None and v > 0]
    return max(bounds) if bounds else None


def fits(raw: dict) -> dict:
    """Every fit of one calibration result."""
    out = {name: fit_link(points).to_dict() for name, points in raw["copies"].items()}
    out["gather"] = fit_gather(raw["gather"] + raw.get("gather_rows", [])).to_dict()
    fitted, held = shapes_of(raw, "fitted"), shapes_of(raw, "held_out")
    gemms = narrow_gemms(raw)
    compute = fit_compute_shapes(fitted, launch_bound_s(raw), attention_efficiency=True, roofline_overlap=True,
                                 matmul_max_s=matmul_bound_s(gemms))
    out["compute"] = compute.to_dict()
    if len(gemms) >= 2:  # the narrow GEMMs alone: per-call cost + bytes / rate, the cross-check of the layer fit's
        try:
            out["narrow_gemms"] = fit_link(gemms).to_dict()
        except TiersimError as e:
            out["narrow_gemms"] = {"unfitted": str(e)}
    out["held_out"] = [check_shape(compute, *s) for s in held]
    model = ModelSpec.from_dict(raw["model"])
    noop_op = (raw.get("launch") or {}).get("noop_op")
    kinds = {}
    for kind, points in (("matmul", raw.get("gemm")), ("attention", raw.get("attention")), ("lm_head", raw.get("head"))):
        if points and len(points) >= 3:
            bound = noop_op["median_s"] * KERNEL_LAUNCHES[kind] if noop_op else None
            kinds[kind] = fit_roofline(kernel_work(kind, points, model), bound).to_dict()
    out["kinds"] = kinds
    out["step_overhead"] = (raw.get("launch") or {}).get("step_overhead")
    out["copy_engine"] = copy_engine_fit(raw)
    out["mechanisms"] = fit_mechanisms(raw.get("copy_mechanisms"))
    att = raw.get("attention")
    out["attention_kv_gbps_median"] = float(np.median([p["kv_gbps"] for p in att])) if att else None
    return out


def reference_table(raw: dict) -> dict:
    """The profile's speed reference (hw/calibrate: the calibrated model's `full` replay, timed every round):
    its shape, batch and steps, and the median over rounds of its decode step, so that `validate --suite` can time
    the same replay and say how fast the machine runs against the calibration. Empty where none was timed."""
    ref = raw.get("reference") or {}
    rounds = [r["step_s"] for r in ref.get("rounds") or []]
    if not rounds:
        return {}
    table = {k: v for k, v in ref.items() if k != "rounds"}
    times = np.array(rounds) * 1e3
    return {"reference": {**table, "step_ms": round(float(np.median(times)), 4), "rounds": len(rounds),
                          "min_ms": round(float(times.min()), 4), "max_ms": round(float(times.max()), 4)}}


def copy_engine_fit(raw: dict) -> dict | None:
    """How much a copy engine beside them slows a layer's compute, from hw/calibrate's back-to-back pairs (a `full`
    replay, then prefetch-layer with nothing to copy) on the fitted shapes: the median over pairs of the per-layer
    time ratio less 1 (`slowdown`, held at >= 0), per shape too, the pairs' spread (p10..p90), and the same as a
    difference in us (a fixed cost per layer would make these equal across shapes; on the 2-vCPU VM a share fitted
    better: +167 us on a 3 ms layer and +1,067 us on a 19 ms one, both ~5.6%). None where no pairs were measured."""
    fitted = {s["model"]["name"] for s in raw.get("shapes", []) if s.get("role") == "fitted"}
    pairs = [p for p in raw.get("copy_engine") or [] if not fitted or p["shape"] in fitted]
    if not pairs:
        return None
    share = np.array([p["engine_layer_s"] / p["full_layer_s"] - 1 for p in pairs])
    diff = np.array([p["engine_layer_s"] - p["full_layer_s"] for p in pairs]) * 1e6
    per_shape = {name: float(np.median([x for x, p in zip(share, pairs) if p["shape"] == name]))
                 for name in dict.fromkeys(p["shape"] for p in pairs)}
    return {"slowdown": max(0.0, float(np.median(share))), "median": float(np.median(share)), "pairs": len(pairs),
            "p10": float(np.percentile(share, 10)), "p90": float(np.percentile(share, 90)), "per_shape": per_shape,
            "median_us": float(np.median(diff)), "batch": pairs[0]["batch"]}


def _link_gather_note(raw: dict) -> str:
    """What the GPU's own gather from pinned host memory reached (the pinned fetch of sim/costs.py), for comparison."""
    points = raw.get("link_gather") or []
    if not points or "unavailable" in points[0]:
        return ""
    rates = ", ".join(f"{p['gbps']:.1f}" for p in points)
    return (f"; for comparison, the GPU gathering {points[0]['row_bytes']}-byte KV rows from pinned host memory "
            f"itself (zero-copy) reached {rates} GB/s at {', '.join(str(p['bytes'] >> 20) + ' MiB' for p in points)}")


def _link_fit(d: dict) -> LinkFit:
    return LinkFit(**{k: v for k, v in d.items() if k in LinkFit.__dataclass_fields__})


def build_profile(raw: dict, fitted: dict, name: str | None = None) -> HardwareSpec:
    """A HardwareSpec from the measurements and fits; every value says where it came from."""
    info = raw["device"]
    cpu = info["kind"] == "cpu"
    where = f"measured: {info['name']}, {info['driver']}, torch {info['torch']}, {info['date']}"
    if cpu:
        where += ", one torch thread (the replay's CPU compute stream)"
    c = ComputeFit(**fitted["compute"])
    how_copy = ("copy_ between two host buffers (the CPU device has no host link)" if cpu else
                "cudaMemcpyAsync via tensor.copy_(non_blocking=True) on one stream, CUDA events")
    first, last = raw["copies"]["h2d_pinned"][0]["bytes"], raw["copies"]["h2d_pinned"][-1]["bytes"]
    sizes = f"{len(raw['copies']['h2d_pinned'])} sizes {first // 1024} KiB..{last // (1 << 20)} MiB, medians"
    values, sources, marked = {}, {}, []

    def put(key, value, how, ok=True):
        values[key], sources[key] = float(value), f"{where}, {how}"
        if not ok:
            marked.append(key)

    for key, curve in (("h2d_gbps_pinned", "h2d_pinned"), ("d2h_gbps_pinned", "d2h_pinned"),
                       ("h2d_gbps_pageable", "h2d_pageable"), ("d2h_gbps_pageable", "d2h_pageable")):
        f = _link_fit(fitted[curve])
        kind = "pinned" if "pinned" in curve else "pageable"
        put(key, f.gbps, f"{curve.split('_')[0].upper()} {kind}: {how_copy}, {sizes}, bandwidth of latency + "
                         f"bytes/bandwidth (bandwidth from the copies >= 1 MiB); {f.residual()}"
                         + (_link_gather_note(raw) if key == "h2d_gbps_pinned" else ""), f.within_limit)
    lat = _link_fit(fitted["h2d_pinned"])
    others = ", ".join(f"{k} {fitted[k]['latency_us']:.2f}" for k in ("d2h_pinned", "h2d_pageable", "d2h_pageable"))
    dma = (fitted.get("mechanisms") or {}).get("dma", {})
    # Small copies that ran from cache leave the curve no latency: then one copy call's own cost, from dma.
    if lat.latency_us < 0.1 and dma.get("latency_us") and dma.get("identified", True):
        put("copy_latency_us", dma["latency_us"], f"cost per call of the dma mechanism (one copy per piece, over piece "
            f"sizes and counts); the pinned H2D curve's latency ({lat.latency_us:.3f} us; {others} us for the other "
            f"curves) is below 0.1 us: its small copies ran from cache; {_link_fit(dma).residual()}",
            _link_fit(dma).within_limit)
    else:
        put("copy_latency_us", max(lat.latency_us, 0.01),
            f"latency of the pinned H2D fit ({others} us for the other curves); {lat.residual()}"
            + ("; floored at 0.01 us" if lat.latency_us < 0.01 else ""), lat.within_limit)
    dup = raw["duplex"]
    put("duplex_factor", min(1.0, max(dup["factor"], 1e-3)),
        f"H2D and D2H of {dup['bytes'] // (1 << 20)} MiB at once ({'two host threads' if cpu else 'two CUDA streams'}):"
        f" each direction keeps {dup['factor_h2d']:.2f} (H2D) and {dup['factor_d2h']:.2f} (D2H) of its bandwidth alone; "
        "mean, capped at 1" + (f"; SPREAD FLAGGED: {dup['reason']}" if dup.get("flagged") else ""),
        not dup.get("flagged"))
    shapes = ", ".join(c.shapes) or ModelSpec.from_dict(raw["model"]).name
    put("hbm_gbps_effective", c.hbm_gbps,
        f"B of the cost model's layer roofline fitted (scipy least_squares, weighted log residuals) to whole "
        f"model-shaped layers (projections + attention over T0 chunks + MLP) and the lm_head of {shapes}, rotated "
        f"through weight copies larger than the cache; 95% interval {_ci(c.hbm_gbps_ci)} GB/s; {c.residual()}",
        c.within_limit)
    put("bf16_tflops_effective", c.tflops, f"F of the same fit; 95% interval {_ci(c.tflops_ci)} TFLOP/s; {c.residual()}",
        c.within_limit)
    bound = (f", held in [0, {c.launch_max_us:.1f}] us: the replay's layer with nothing to compute (a no-op layer)"
             if c.launch_max_us is not None else "")
    put("launch_us", max(c.launch_us, 0.01), f"per-layer constant of the same fit (kernel launches"
        f"{' and Python dispatch' if cpu else ''}){bound}; 95% interval {_ci(c.launch_us_ci)} us; {c.residual()}"
        + ("; the fit put it at its bound 0, floored at 0.01 us" if c.launch_us < 0.01 else ""), c.within_limit)
    _structure_values(raw, fitted, put)
    _matmul_value(fitted, put)
    g = _link_fit(fitted["gather"])
    per_row = f", {g.piece_us * 1e3:.1f} ns per row" if g.piece_us else ""
    put("ddr_gbps", 2 * g.gbps,
        f"2 x the host gather rate (read + write traffic) of scattered {raw['gather'][0]['row_bytes']}-byte KV rows "
        f"(torch.index_select into a contiguous buffer, {g.points} sizes{per_row}); {g.residual()}", g.within_limit)
    ram = info["ram_bytes"] / GB
    put("ddr_gb", ram, "MemTotal of /proc/meminfo (installed host RAM)")
    if cpu:
        put("hbm_gb", ram, "the CPU device's memory is host RAM: MemTotal of /proc/meminfo")
    else:
        put("hbm_gb", info["memory_bytes"] / GB, "total_memory reported by torch.cuda.get_device_properties")
    _spec_values(raw, values, sources, where)
    refused: dict[str, str] = {}
    _mechanism_values(fitted.get("mechanisms") or {}, values, sources, where, marked, refused)
    if "host-gather" in (fitted.get("mechanisms") or {}) and raw.get("bounce_bytes"):
        values["host_gather_chunk_mb"] = raw["bounce_bytes"] / 2**20
        sources["host_gather_chunk_mb"] = (f"{where}, the pinned bounce chunk the host-gather benchmark fills before "
                                           "each copy (the replay copy engine's BOUNCE_ROWS rows of the benchmark's "
                                           "128-byte KV rows, hw/copy_bench.ReplayPieces): a choice of the mechanism, "
                                           "not a fit")
    sheet = datasheet_for(info)
    label = info["name"]
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:48]
    return HardwareSpec(
        name=name or f"measured-{slug}",
        description=(f"{info['label']}: calibrated {info['date']} on {info['host']}" if cpu else
                     f"{label} measured {info['date']} on {info['host']}"),
        link=("none: CPU device, copies are host memcpy" if cpu else (sheet.link if sheet else "host link (measured)")),
        **values, sources=sources, fit={**fit_table(fitted, marked, refused), **reference_table(raw)})


def _structure_values(raw: dict, fitted: dict, put) -> None:
    """The cost model's per-kind refinements (sim/costs.py): attention_efficiency from the layer fit's attention
    group (cross-checked against the per-kind sweeps) and step_overhead_us from the replay's no-op steps."""
    c = ComputeFit(**fitted["compute"])
    kinds = fitted.get("kinds") or {}
    if c.attention_efficiency is not None:
        check = ""
        if "attention" in kinds and "matmul" in kinds:
            att, mm = kinds["attention"], kinds["matmul"]
            check = (f"; per-kind cross-check: the attention sweep streams KV at {att['gbps']:.3g} GB/s "
                     f"({100 * att['rms_rel']:.1f}% rms), the GEMM sweep weights at {mm['gbps']:.3g} GB/s "
                     f"({100 * mm['rms_rel']:.1f}% rms), ratio {att['gbps'] / mm['gbps']:.2f}")
        put("attention_efficiency", c.attention_efficiency,
            f"share of the layer roofline the attention group reaches: the 4th parameter of the same fit as "
            f"hbm_gbps_effective (held in [0.01, 1]; 95% interval {_ci(c.attention_efficiency_ci)}){check}; "
            f"{c.residual()}", c.within_limit)
    if c.roofline_overlap is not None:
        put("roofline_overlap", c.roofline_overlap,
            f"share of the shorter of each kernel group's memory and FLOP time hidden under the longer (max + "
            f"(1 - share) x min): the 5th parameter of the same fit as hbm_gbps_effective (held in [0.01, 1]; 95% "
            f"interval {_ci(c.roofline_overlap_ci)}); {c.residual()}", c.within_limit)
    engine = fitted.get("copy_engine")
    if engine and engine["slowdown"] >= 1e-4:  # none measurable: the field stays absent (0), the pairs in [fit]
        shapes = ", ".join(f"{k} {100 * v:+.1f}%" for k, v in engine["per_shape"].items())
        put("copy_engine_slowdown", engine["slowdown"],
            f"per decoder layer, prefetch-layer with every token in the HBM tier (its copy engine running, nothing to "
            f"copy) over `full`, replayed back to back at batch {engine['batch']} on each fitted shape in each round, "
            f"less 1: the median over {engine['pairs']} pairs (p10..p90 {100 * engine['p10']:+.1f}..{100 * engine['p90']:+.1f}%; "
            f"per shape {shapes}; {engine['median_us']:.0f} us a layer); a ratio of medians, no fit residual")
    over = (raw.get("launch") or {}).get("step_overhead")
    if over and over.get("overhead_us"):  # 0: nothing measurable outside the layers, the field stays absent
        put("step_overhead_us", over["overhead_us"],
            f"the replay's decode step of a no-op model (strategy full, batch 1, median over its steps) with 1 layer "
            f"({1e3 * over['step_1_layer_s']:.3f} ms) less one layer (half the 3-layer step's excess, "
            f"{1e3 * over['layer_s']:.3f} ms) less the no-op lm_head; a difference of medians, no fit residual")


def _matmul_value(fitted: dict, put) -> None:
    """matmul_fixed_us from the layer fit, with its bound and the narrow GEMMs' own per-call cost beside it; a fit
    that put it at 0 leaves the field absent (the cost model's default)."""
    c = ComputeFit(**fitted["compute"])
    if not c.matmul_fixed_us or c.matmul_fixed_us < 0.01:
        return
    alone = fitted.get("narrow_gemms")
    check = (f"; the cold narrow GEMMs alone (one token, each layer weight shape of the fitted shapes) fit "
             f"{alone['latency_us']:.1f} us per call + bytes / {alone['gbps']:.3g} GB/s ({100 * alone['rms_rel']:.1f}% rms)"
             if alone and "latency_us" in alone else "")
    put("matmul_fixed_us", c.matmul_fixed_us,
        f"fixed cost per GEMM call (the replay's layer makes {MATMULS_PER_LAYER}: qkv, o, gate/up, down; the lm_head "
        f"1) of the same fit as hbm_gbps_effective, held in [0, {c.matmul_fixed_max_us:.1f}] us (the fastest cold "
        f"narrow GEMM call measured); 95% interval {_ci(c.matmul_fixed_us_ci)} us{check}; {c.residual()}",
        c.within_limit)


# A mechanism constant whose fit residual (rms, relative) exceeds this is refused, not written: on the 2-core VM a
# batched-copy fit at 167,656% rms gave 59 us per piece and over-predicted two suite configurations by 58% and 99%
# (calibration/measured/cpu-vm-2026-12-01-loop5); no number is better than that one.
REFUSE_LIMIT = 1.0


def _refused(f, key: str, refused: dict) -> bool:
    """Whether the fit `f` of mechanism constant `key` misses by more than REFUSE_LIMIT (then noted in `refused`)."""
    if f.rms_rel <= REFUSE_LIMIT:
        return False
    refused[key] = f"fit residual {100 * f.rms_rel:.0f}% rms above the {100 * REFUSE_LIMIT:.0f}% refusal limit"
    return True


def _mechanism_values(mech: dict, values: dict, sources: dict, where: str, marked: list[str],
                      refused: dict | None = None) -> None:
    """The copy mechanisms' optional constants (sim/copies.py) from their fits, where measured and not refused
    (REFUSE_LIMIT): the dma piece size at half the link rate, the batched copy's cost per piece, the gather kernel's
    share of the link."""
    refused = {} if refused is None else refused
    dma, batched, kernel = mech.get("dma", {}), mech.get("dma-batched", {}), mech.get("gather-kernel", {})
    if "latency_us" in dma and "copy_latency_us" in values and dma.get("identified", True) \
            and not _refused(_link_fit(dma), "dma_half_size_kb", refused):
        f = _link_fit(dma)
        extra_us = max(f.latency_us - values["copy_latency_us"], 1e-3)
        # sim/copies.py charges a dma piece copy_latency_us + dma_half_size_kb / the pinned H2D link rate: the size
        # is the per-piece excess at that rate (at the mechanism's own rate, 5.7 against 36 GB/s on the CPU device,
        # the simulator charged a sixth of the measured excess)
        link = values.get("h2d_gbps_pinned") or f.gbps
        values["dma_half_size_kb"] = extra_us * 1e-6 * link * 1e9 / 1024
        sources["dma_half_size_kb"] = (f"{where}, one copy per piece over piece sizes and counts: (cost per piece "
                                       f"{f.latency_us:.3g} us - copy_latency_us) x the pinned H2D rate {link:.3g} GB/s "
                                       f"(the rate the simulator divides it by; the curve's own is {f.gbps:.3g} GB/s); "
                                       f"{f.residual()}")
        if not f.within_limit:
            marked.append("dma_half_size_kb")
    if "piece_us" in batched and batched.get("identified", True) \
            and not _refused(_link_fit(batched), "dma_batch_descriptor_us", refused):
        f = _link_fit(batched)
        values["dma_batch_descriptor_us"] = max(f.piece_us, 1e-3)
        sources["dma_batch_descriptor_us"] = (f"{where}, cost per piece of one batched copy of N pieces (fit of calls x "
                                              f"latency + pieces x cost + bytes / {f.gbps:.3g} GB/s); {f.residual()}"
                                              + ("; floored at 0.001 us" if f.piece_us < 1e-3 else ""))
        if not f.within_limit:
            marked.append("dma_batch_descriptor_us")
    if "gbps" in kernel and values.get("h2d_gbps_pinned") and kernel.get("identified", True) \
            and not _refused(_link_fit(kernel), "gather_kernel_link_frac", refused):
        f = _link_fit(kernel)
        values["gather_kernel_link_frac"] = min(1.0, f.gbps / values["h2d_gbps_pinned"])
        sources["gather_kernel_link_frac"] = (f"{where}, the zero-copy gather kernel's {f.gbps:.3g} GB/s over the pinned "
                                              f"H2D copy rate, capped at 1; {f.residual()}")


def fit_table(fitted: dict, marked: list[str], refused: dict[str, str] | None = None) -> dict:
    """The profile's [fit] table: shapes fitted and held out, residuals per field, what is marked and what refused
    (REFUSE_LIMIT), per-kind fits."""
    c = fitted["compute"]
    table = {"shapes": list(c.get("shapes") or []), "held_out": [h["shape"] for h in fitted.get("held_out", [])],
             "limit_pct": 100 * FIT_LIMIT,
             "residual_rms_pct": {"compute": round(100 * c["rms_rel"], 2),
                                  **{k: round(100 * fitted[k]["rms_rel"], 2) for k in (*LINK_CURVES, "gather")}},
             "marked": marked}
    if refused:
        table["refused"] = refused
    if fitted.get("held_out"):
        table["held_out_rms_pct"] = {h["shape"]: round(100 * h["rms_rel"], 2) for h in fitted["held_out"]}
    if c.get("launch_max_us") is not None:
        table["launch_bound_us"] = round(c["launch_max_us"], 3)
    if c.get("matmul_fixed_max_us") is not None:
        table["matmul_fixed_bound_us"] = round(c["matmul_fixed_max_us"], 3)
    if fitted.get("narrow_gemms", {}).get("latency_us") is not None:
        table["narrow_gemm_call_us"] = round(fitted["narrow_gemms"]["latency_us"], 3)
    refinements = {k: round(c[k], 4) for k in ("attention_efficiency", "roofline_overlap", "matmul_fixed_us")
                   if c.get(k) is not None}
    if refinements:  # the cost model's optional compute fields, fitted with the layer roofline
        table["compute_refinements"] = refinements
    kinds = {k: {"gbps": round(v["gbps"], 4), "tflops": round(v["tflops"], 5), "fixed_us": round(v["fixed_us"], 3),
                 "rms_pct": round(100 * v["rms_rel"], 2)} for k, v in (fitted.get("kinds") or {}).items()}
    if kinds:
        table["kinds"] = kinds
    over = fitted.get("step_overhead")
    if over and over.get("overhead_us") is not None:
        table["step_overhead_us"] = round(over["overhead_us"], 3)
    engine = fitted.get("copy_engine")
    if engine:
        table["copy_engine_pairs"] = {"median_pct": round(100 * engine["median"], 2), "p10_pct": round(100 * engine["p10"], 2),
                                      "p90_pct": round(100 * engine["p90"], 2), "pairs": engine["pairs"]}
    return table


def _ci(ci) -> str:
    return "n/a" if not ci else f"[{ci[0]:.4g}, {ci[1]:.4g}]"


def _spec_values(raw: dict, values: dict, sources: dict, where: str) -> None:
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
        write_profile(self.profile, toml_path, f"Written by `tiersim calibrate`; raw measurements and fits in "
                                               f"{raw_path.name}.")
        write_json(raw_path, self.raw)
        return toml_path, raw_path


def write_profile(profile: HardwareSpec, path: str | Path, note: str) -> Path:
    """Write a profile TOML atomically, a header with its description, `note` and the units first."""
    path = Path(path)
    header = f"# {profile.description}\n# {note}\n# Units: GB = 1e9 bytes, GB/s = 1e9 B/s, TFLOP/s dense.\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(header + replace(profile, path="").to_toml())
    return path


def summary_rows(cal: Calibration) -> list[tuple[str, str, str]]:
    """(field, value, how) rows for the CLI table."""
    p = cal.profile
    rows = []
    for key in ("hbm_gbps_effective", "bf16_tflops_effective", "launch_us", "matmul_fixed_us", "attention_efficiency",
                "step_overhead_us", "copy_engine_slowdown", "roofline_overlap", "h2d_gbps_pinned", "d2h_gbps_pinned",
                "h2d_gbps_pageable", "d2h_gbps_pageable", "copy_latency_us", "duplex_factor", "ddr_gbps", "hbm_gb",
                "ddr_gb", "hbm_gbps_spec", "bf16_tflops_spec"):
        value = getattr(p, key)
        if value is None:  # an optional refinement the calibration did not measure
            continue
        residual = re.search(r"fit residual [^;]*(; RESIDUAL ABOVE[^;]*)?", p.sources[key])
        rows.append((key, f"{value:.4g}", residual.group(0) if residual else p.sources[key].split(", ")[-1][:60]))
    return rows


__all__ = ["Calibration", "build_profile", "fit_table", "fits", "launch_bound_s", "narrow_gemms", "shapes_of",
           "summary_rows",
           "write_profile"]
