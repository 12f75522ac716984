"""Calibration: timing helpers, the scipy fits on curves with known answers, profiles with sources, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tiersim.calibration.fit import (
    LinkFit,
    build_profile,
    fit_compute,
    fit_link,
    fits,
    predict_compute,
)
from tiersim.cli import cli
from tiersim.errors import TiersimError
from tiersim.hw import calibrate as calibrate_module
from tiersim.hw import microbench, timing
from tiersim.specs import ModelSpec, hardware_spec

TINY = ModelSpec("tiny-cal", layers=2, attention_heads=4, kv_heads=2, head_dim=32, hidden=128, intermediate=256,
                 vocab=512)


def test_time_op_takes_the_median_of_groups_of_inner_calls(monkeypatch):
    clock = iter([0.0, 1.0] + [0.0, 0.3, 0.3, 0.5, 0.5, 0.6, 0.6, 1.0, 1.0, 1.1])  # once, then 5 groups
    monkeypatch.setattr(microbench.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(timing, "_one_thread", lambda: False)  # the fake clock is the only one: no CPU-time check
    calls = []
    t = microbench.time_op(lambda: calls.append(1), microbench.resolve_device("cpu"), warmup=1, repeats=5, inner=None,
                           min_repeat_s=0.5, cv_limit=None, pin=False)
    # One timed call of 1.0 s > 0.5 s: one call per group; groups took 0.3, 0.2, 0.1, 0.4, 0.1 s.
    assert t.inner == 1 and t.repeats == 5 and len(calls) == 1 + 1 + 5
    assert t.median_s == pytest.approx(0.2) and t.min_s == pytest.approx(0.1) and t.max_s == pytest.approx(0.4)
    assert t.spread == pytest.approx((np.percentile([.3, .2, .1, .4, .1], 90) - np.percentile([.3, .2, .1, .4, .1], 10)) / .2)


def test_link_fit_recovers_latency_and_bandwidth_exactly():
    sizes = microbench.COPY_SIZES
    points = [{"bytes": b, "median_s": 3e-6 + b / 20e9} for b in sizes]
    f = fit_link(points)
    assert f.latency_us == pytest.approx(3.0, rel=1e-6) and f.gbps == pytest.approx(20.0, rel=1e-6)
    assert f.rms_rel < 1e-9 and f.points == len(sizes)
    noisy = [{"bytes": p["bytes"], "median_s": p["median_s"] * (1.1 if i % 2 else 0.9)} for i, p in enumerate(points)]
    g = fit_link(noisy)
    assert 0.09 < g.rms_rel < 0.11 and "fit residual" in g.residual()


def test_link_bandwidth_comes_from_large_copies_so_cached_small_ones_do_not_inflate_it():
    # A CPU: copies up to 256 KiB run from cache at 30 GB/s, larger ones from DRAM at 6 GB/s.
    points = [{"bytes": b, "median_s": 1e-6 + b / ((30 if b <= 256 << 10 else 6) * 1e9)} for b in microbench.COPY_SIZES]
    f = fit_link(points)
    assert f.gbps == pytest.approx(6.0, rel=0.02)
    assert 0 <= f.latency_us < 1.0  # the cached copies pull the latency down; it never goes negative


def test_link_fit_refuses_curves_that_do_not_grow():
    with pytest.raises(TiersimError, match="at least 2 sizes"):
        fit_link([{"bytes": 4096, "median_s": 1e-6}])


def test_compute_fit_recovers_the_cost_models_constants():
    layers = [{"tokens": b, "batch": b, "kv_tokens": n, "median_s": 0.0} for b in (1, 4, 16, 64) for n in (192, 1088, 4160)]
    layers += [{"tokens": t, "batch": 1, "kv_tokens": 0, "median_s": 0.0} for t in (256, 1024, 2048)]
    head = [{"tokens": t, "median_s": 0.0} for t in (1, 8, 64)]
    truth = (12e9, 0.4e12, 80e-6)
    from tiersim.calibration.fit import _work

    mm, att, _ = _work(TINY, layers, head)
    t = predict_compute(truth, mm, att)
    for p, s in zip(layers + head, t):
        p["median_s"] = float(s)
    f = fit_compute(TINY, layers, head)
    assert f.hbm_gbps == pytest.approx(12.0, rel=1e-3) and f.tflops == pytest.approx(0.4, rel=1e-3)
    assert f.launch_us == pytest.approx(80.0, rel=1e-2) and f.rms_rel < 1e-3


def _raw(kind="cpu", name="CPU Test Processor (2 cores)") -> dict:
    """A measurement result with known curves, shaped like microbench.measure()."""
    curve = lambda lat, gbps: [{"bytes": b, "median_s": lat + b / (gbps * 1e9)} for b in microbench.COPY_SIZES]  # noqa: E731
    layers = [{"tokens": b, "batch": b, "kv_tokens": n, "median_s": 0.0} for b in (1, 4, 16) for n in (192, 1088)]
    layers += [{"tokens": 512, "batch": 1, "kv_tokens": 0, "median_s": 0.0}]
    head = [{"tokens": 1, "median_s": 0.0}, {"tokens": 16, "median_s": 0.0}]
    from tiersim.calibration.fit import _work

    mm, att, _ = _work(TINY, layers, head)
    for p, s in zip(layers + head, predict_compute((10e9, 0.5e12, 50e-6), mm, att)):
        p["median_s"] = float(s)
    info = {"kind": kind, "name": name, "driver": "no GPU driver (CPU device)" if kind == "cpu" else "driver 550.1",
            "torch": "2.13.0", "date": "2026-01-02", "host": "testhost", "ram_bytes": 32e9,
            "memory_bytes": 141e9 if kind == "cuda" else 32e9,
            "label": "CPU measurement of this machine (Test), not a GPU" if kind == "cpu" else f"GPU {name}"}
    return {"device": info, "model": TINY.to_dict(), "quick": True,
            "copies": {"h2d_pinned": curve(2e-6, 50), "d2h_pinned": curve(3e-6, 40), "h2d_pageable": curve(4e-6, 15),
                       "d2h_pageable": curve(5e-6, 20)},
            "duplex": {"bytes": 1 << 26, "factor": 0.8, "factor_h2d": 0.75, "factor_d2h": 0.85},
            "device_copy": {"gbps_read_write": 30.0},
            "gather": [{"bytes": b, "row_bytes": 64, "median_s": b / 6e9} for b in (1 << 20, 1 << 22, 1 << 24)],
            "gemm": [{"weight_gbps": 9.0, "tflops": 0.45}], "attention": [{"kv_gbps": 8.0}],
            "layers": layers, "head": head}


def test_cpu_profile_values_and_sources():
    raw = _raw()
    f = fits(raw)
    p = build_profile(raw, f)
    assert p.h2d_gbps_pinned == pytest.approx(50.0, rel=1e-6) and p.d2h_gbps_pageable == pytest.approx(20.0, rel=1e-6)
    assert p.copy_latency_us == pytest.approx(2.0, rel=1e-5)
    assert p.hbm_gbps_effective == pytest.approx(10.0, rel=1e-3) and p.bf16_tflops_effective == pytest.approx(0.5, rel=1e-3)
    assert p.launch_us == pytest.approx(50.0, rel=1e-2)
    assert p.ddr_gbps == pytest.approx(12.0, rel=1e-6)  # read + write of a 6 GB/s gather
    assert p.duplex_factor == 0.8
    assert p.hbm_gb == p.ddr_gb == 32.0  # the CPU device's memory is host RAM
    assert p.hbm_gbps_spec == pytest.approx(15.0)  # the best any benchmark reached: device copy 30 GB/s read + write
    assert "CPU" in p.description and "not a GPU" in p.description and p.link.startswith("none: CPU device")
    for key, source in p.sources.items():
        assert source.startswith("measured: CPU Test Processor (2 cores), no GPU driver (CPU device), torch 2.13.0, "
                                 "2026-01-02"), key
    for key in ("h2d_gbps_pinned", "hbm_gbps_effective", "launch_us", "ddr_gbps", "copy_latency_us"):
        assert "fit residual" in p.sources[key]
    assert "MemTotal" in p.sources["hbm_gb"] and "MemTotal" in p.sources["ddr_gb"]


def test_profile_round_trips_through_toml(tmp_path):
    p = build_profile(_raw(), fits(_raw()))
    path = tmp_path / "p.toml"
    path.write_text(p.to_toml())
    q = hardware_spec(str(path))
    assert q.to_dict() | {"path": ""} == p.to_dict() | {"path": ""}


def test_known_gpu_takes_its_datasheet_for_spec_values():
    raw = _raw("cuda", "NVIDIA H200")
    p = build_profile(raw, fits(raw))
    sheet = hardware_spec("h200-sxm")
    assert p.hbm_gbps_spec == sheet.hbm_gbps_spec and p.bf16_tflops_spec == sheet.bf16_tflops_spec
    assert "datasheet" in p.sources["hbm_gbps_spec"] and p.link == sheet.link
    assert p.hbm_gb == 141.0 and "torch.cuda.get_device_properties" in p.sources["hbm_gb"]
    assert p.sources["h2d_gbps_pinned"].startswith("measured: NVIDIA H200, driver 550.1, torch 2.13.0, 2026-01-02")


def test_cuda_without_cuda_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(cli, ["calibrate", "--device", "cuda", "--out", str(tmp_path / "p.toml")])
    assert r.exit_code == 2
    assert "Error: --device cuda: CUDA is not available here" in r.output
    assert not (tmp_path / "p.toml").exists()
    with pytest.raises(microbench.DeviceError, match="unknown; accepted: cpu, cuda, cuda:N"):
        microbench.resolve_device("gpu")


def test_cli_calibrate_cpu_quick_writes_a_loadable_measured_profile(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 128, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 256,
                                  "vocab_size": 512}))
    out = tmp_path / "cpu.toml"
    r = CliRunner().invoke(cli, ["calibrate", "--device", "cpu", "--quick", "--model-spec", str(config),
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    p = hardware_spec(str(out))
    assert p.hbm_gb == p.ddr_gb and "not a GPU" in p.description
    assert all(s.startswith("measured: CPU ") for s in p.sources.values())
    raw = json.loads(out.with_suffix(".raw.json").read_text())
    sizes = [c["bytes"] for c in raw["copies"]["h2d_pinned"]]
    assert sizes[0] == 4096 and sizes[-1] == 256 << 20  # 4 KiB .. 256 MiB
    assert set(raw["copies"]) == {"h2d_pinned", "d2h_pinned", "h2d_pageable", "d2h_pageable"}
    # Every whole-layer and lm_head timing of every fitted shape (the model's first) is fitted or dropped as flagged.
    fitted = [s for s in raw["shapes"] if s["role"] == "fitted"]
    assert fitted[0]["layers"] == raw["layers"] and fitted[0]["head"] == raw["head"]
    # Decode layers and lm_heads are fitted as the replay measured them (its own `full` steps, two halves of growing
    # context per batch, the median of the rounds); the isolated decode timings ride along unfitted; prefill stays.
    for s in fitted:
        decode = [p_ for p_ in s["layers"] if p_["kv_tokens"]]
        assert decode and all(p_["source"] == "replay" for p_ in decode + s["head"])
        assert {p_["batch"] for p_ in decode} == set(calibrate_module.QUICK_REPLAY_BATCHES)
        assert all(len(p_["rounds"]) == calibrate_module.QUICK_ROUNDS for p_ in decode + s["head"])
        assert all(p_["p10_s"] <= p_["median_s"] <= p_["p90_s"] for p_ in decode + s["head"])
        assert any(p_["kv_tokens"] for p_ in s["isolated_layers"]) and s["isolated_head"]
        assert any(not p_["kv_tokens"] for p_ in s["layers"])  # prefill points, from the isolated layers
    c = raw["fits"]["compute"]
    assert raw["device"]["kind"] == "cpu" and c["points"] + c["dropped"] == sum(len(s["layers"]) + len(s["head"])
                                                                             for s in fitted)
    assert all(g["gemm"] in ("qkv", "o", "gate_up", "down", "lm_head") and g["median_s"] > 0 for g in raw["gemm"])
    assert {a["kv_tokens"] for a in raw["attention"]} == {2 * 128 + 64, 16 * 128 + 64}
    assert all(p_["p10_s"] <= p_["median_s"] <= p_["p90_s"] for p_ in raw["layers"])
    LinkFit(**raw["fits"]["h2d_pinned"])  # the fit's fields are all there
    # The copy engine's cost: per fitted shape and round, `full` then prefetch-layer with nothing to copy, back to back.
    pairs = raw["copy_engine"]
    assert len(pairs) == calibrate_module.QUICK_ROUNDS and {q["shape"] for q in pairs} == {fitted[0]["model"]["name"]}
    assert all(q["batch"] == calibrate_module.ENGINE_BATCH and q["full_layer_s"] > 0 and q["engine_layer_s"] > 0
               for q in pairs)
    engine = raw["fits"]["copy_engine"]
    ratios = [q["engine_layer_s"] / q["full_layer_s"] - 1 for q in pairs]
    assert engine["median"] == pytest.approx(float(np.median(ratios))) and engine["slowdown"] == max(0.0, engine["median"])
    if engine["slowdown"] >= 1e-4:
        assert p.copy_engine_slowdown == pytest.approx(engine["slowdown"]) and "back to back" in p.sources["copy_engine_slowdown"]
    else:  # nothing measurable: absent (the cost model's 0), the pairs still in the [fit] table
        assert p.copy_engine_slowdown is None
    assert p.fit["copy_engine_pairs"]["pairs"] == len(pairs)
