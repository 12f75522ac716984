"""The replay (real copies, model-shaped compute) and the validator: exact data movement against the schedules,
bytes equal to the simulator's, the report's arithmetic, the suite entry point, and bad input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from testkit import Probe, cpu_like_profile_file

from tiersim.cli import cli
from tiersim.errors import ConfigError, TiersimError
from tiersim.hw import gpu_suite
from tiersim.hw.replay import ReplayConfig, Replayer, memory_need, plan_replay, reduced_model, replay
from tiersim.policy import DDR, HBM, PolicyConfig
from tiersim.sim import SimConfig, simulate
from tiersim.specs import ModelSpec, hardware_spec, model_spec
from tiersim.traces.format import read_trace, write_trace
from tiersim.traces.synth import SynthParams, synth_request, write_synth_trace
from tiersim.validate import ValidateConfig, check_trace_spec, validate
from tiersim.workload.build import build_workload
from tiersim.workload.config import RunConfig
from tiersim.workload.demand import continuation_params

# float32 so that a position written into a key comes back exactly
TINY = ModelSpec("tiny-val", layers=3, attention_heads=4, kv_heads=2, head_dim=16, hidden=64, intermediate=128,
                 vocab=256, dtype_bytes=4)
POLICY = PolicyConfig(hbm_ratio=0.5, evict_ratio=0.1, window=16, interval=8)


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("val") / "t.tstrace"
    write_synth_trace(path, SynthParams(), 3, 20, 200, seed=1)
    return path


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    """A CPU-like profile (the numbers are irrelevant to the exact tests)."""
    return cpu_like_profile_file(tmp_path_factory.mktemp("prof"))


def workload(trace_path, cfg: ReplayConfig):
    tr = read_trace(trace_path)
    return build_workload(tr, cfg.policy, cfg.gen_tokens, cfg.batch, cfg.decode_steps, cfg.seed, cfg.cold_start,
                          continuation_params(tr), workers=1)


def expected_sets(schedule, t: int):
    """HBM and DDR positions during decode step t, from the schedule (new token included in HBM)."""
    tiers = np.zeros(schedule.prompt_tokens + t + 1, dtype=np.int8)
    done = np.flatnonzero(schedule.retier_steps <= t - 1)
    if len(done):
        after = schedule.tiers_after(int(done[-1]))
        tiers[: len(after)] = after
    return np.flatnonzero(tiers == HBM).tolist(), np.flatnonzero(tiers == DDR).tolist()


@pytest.mark.parametrize("strategy,cold,policy", [
    ("prefetch-layer", True, POLICY),
    ("prefetch-sync", True, dataclasses.replace(POLICY, page_size=4, evict_ratio=0.0, hbm_ratio=0.3)),
    ("prefetch-layer", False, POLICY),  # warm start: slots at different points, attention slot by slot
])
def test_every_attention_sees_exactly_the_schedules_hbm_and_ddr_tokens(trace_path, strategy, cold, policy):
    cfg = ReplayConfig(model=TINY, policy=policy, strategy=strategy, batch=3, gen_tokens=120, steps=150, depth=2,
                       cold_start=cold, warmup_steps=0, chunk_tokens=8)
    w = workload(trace_path, cfg)
    probe = Probe()
    result = replay(cfg, w, probe=probe)
    assert result.uniform == cold
    rows = w.tables.shape[1]
    checked = 0
    for (k, layer, b, h), (resident, ddr) in probe.seen.items():
        request, row = divmod(int(w.slot_rows[b, k]), rows)
        first = int(w.slot_rows[b, 0]) % rows
        if first != 0 and k < rows - first:  # warm start: this slot's first request began before the run
            continue
        hbm, expected_ddr = expected_sets(w.schedules[request], row - 1)
        assert (resident, ddr) == (hbm, expected_ddr), (k, layer, b, h)
        checked += 1
    assert checked > 500 and any(ddr for _, ddr in probe.seen.values())


@pytest.mark.parametrize("strategy", ["full", "evict-only", "prefetch-sync", "prefetch-layer"])
@pytest.mark.parametrize("cold", [True, False])
def test_bytes_moved_per_step_are_the_simulators(trace_path, strategy, cold):
    cfg = ReplayConfig(model=TINY, policy=POLICY, strategy=strategy, batch=4, gen_tokens=120, steps=200, cold_start=cold)
    plan = plan_replay(cfg, workload(trace_path, cfg))
    sim = simulate(SimConfig(model=TINY, hardware=hardware_spec("h200-sxm"), policy=POLICY, trace=trace_path,
                             strategy=strategy, batch=4, gen_tokens=120, steps=200, cold_start=cold), workers=1)
    np.testing.assert_array_equal(plan.h2d_bytes, sim.steps["h2d_bytes"].to_numpy())
    # Demotions decided at the end of step k: the simulator books them to step k, the replay copies them in step k+1.
    np.testing.assert_array_equal(plan.d2h_bytes[1:], sim.steps["d2h_bytes"].to_numpy()[:-1])
    assert plan.d2h_bytes[0] == 0
    if strategy in ("prefetch-sync", "prefetch-layer"):
        assert plan.h2d_bytes.sum() > 0 and plan.d2h_bytes.sum() > 0
    # Every step attends over the schedule's HBM + DDR tokens (evict-only: HBM only), summed over the batch.
    c = sim.workload.column
    decode = np.array([int(w.attend[~w.prefill].sum() + w.staged[~w.prefill].sum()) for w in plan.steps])
    want = {"full": c("tokens") - c("prefill_tokens"), "evict-only": c("hbm") - c("prefill_tokens")}.get(
        strategy, c("hbm") + c("ddr") - c("prefill_tokens"))
    np.testing.assert_array_equal(decode, want)


def test_memory_need_covers_what_the_replay_allocates(trace_path):
    cfg = ReplayConfig(model=TINY, policy=POLICY, strategy="prefetch-layer", batch=3, gen_tokens=120)
    w = workload(trace_path, cfg)
    need = memory_need(cfg, w)
    rep = Replayer(cfg, plan_replay(cfg, w))
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    weights = size([rep.lm_head] + [x for lw in rep.weights for x in (lw.qkv, lw.o, lw.gate_up, lw.down)])
    assert weights <= need.device["weights"]
    assert size(rep.k0 + rep.v0) == need.device["T0 pools"]  # the longest resident set, in whole chunks
    assert size(rep.staging) == need.device["staging"]
    assert size(rep.host) == need.host["DDR pool"]


def test_validate_reports_measured_and_predicted_with_consistent_errors(trace_path, profile):
    cfg = ValidateConfig(model=TINY, profile=hardware_spec(str(profile)), policy=POLICY, trace=trace_path,
                         strategy="prefetch-sync", batch=2, gen_tokens=100, steps=60, layers=2)
    r = validate(cfg)
    for key in ("measured_step_ms", "predicted_step_ms", "step_error_pct", "measured_overhead_pct",
                "predicted_overhead_pct", "overhead_error_pts", "device", "config"):
        assert key in r
    assert r["device"]["kind"] == "cpu" and "CPU measurement of this machine" in r["device"]["label"]
    assert "not a GPU" in r["device"]["label"]
    assert r["step_error_pct"] == pytest.approx(100 * (r["predicted_step_ms"] / r["measured_step_ms"] - 1))
    assert r["measured_overhead_pct"] == pytest.approx(100 * (r["measured_step_ms"] / r["measured_full_step_ms"] - 1))
    assert r["overhead_error_pts"] == pytest.approx(r["predicted_overhead_pct"] - r["measured_overhead_pct"])
    assert r["measured_step_ms"] > 0 and len(r["steps_measured_ms"]) == 60
    # The prediction is the simulator's on the same inputs, the model cut to the replayed layers.
    two = reduced_model(TINY, 2)
    sim = simulate(SimConfig(model=two, hardware=hardware_spec(str(profile)), policy=POLICY, trace=trace_path,
                             strategy="prefetch-sync", batch=2, gen_tokens=100, steps=60, cold_start=True), workers=1)
    assert r["predicted_step_ms"] == sim.summary["step_ms_mean"]
    assert r["config"]["layers_replayed"] == 2 and r["config"]["model_layers"] == 3
    full_model = simulate(dataclasses.replace(cfg.sim_config(), model=TINY), workers=1).summary
    assert r["predicted_step_ms_scaled"] == full_model["step_ms_mean"] and r["scaled_to_layers"] == 3
    assert r["h2d_gb_per_step"] == pytest.approx(r["predicted_h2d_gb_per_step"], rel=1e-12)


def _invoke(*args):
    return CliRunner().invoke(cli, ["validate", *args])


def test_cli_validate_writes_json_and_table(trace_path, profile, tmp_path):
    out = tmp_path / "v.json"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "num_hidden_layers": 3, "intermediate_size": 128,
                                  "vocab_size": 256}))
    r = _invoke("--device", "cpu", "--model-spec", str(config), "--trace", str(trace_path), "--profile", str(profile),
                "--batch", "2", "--gen-tokens", "80", "--steps", "40", "--strategy", "prefetch-layer", "--depth", "1",
                "--window", "16", "--interval", "8", "--json", str(out))
    assert r.exit_code == 0, r.output
    assert "CPU measurement of this machine" in r.output and "predicted" in r.output
    report = json.loads(out.read_text())
    assert report["config"]["strategy"] == "prefetch-layer" and report["config"]["policy"]["window"] == 16


@pytest.mark.parametrize("args,code,needle", [
    (["--device", "cuda"], 2, "Error: --device cuda: CUDA is not available here"),
    (["--strategy", "cpu-attention"], 1, "strategy 'cpu-attention' is simulated but not replayed"),
    (["--compressed-ratio", "0.5"], 1, "the replay has no compressed tier"),
    (["--layers", "9"], 1, "--layers 9 out of range for tiny-val (3 layers)"),
    (["--strategy", "prefetch-layer", "--depth", "3"], 1, "depth 3 needs more than 3 layers"),
])
def test_bad_input_is_one_clear_line(trace_path, profile, tmp_path, args, code, needle):
    config = tmp_path / "tiny-val"
    config.mkdir()
    (config / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                                                    "num_key_value_heads": 2, "num_hidden_layers": 3,
                                                    "intermediate_size": 128, "vocab_size": 256}))
    r = _invoke("--trace", str(trace_path), "--profile", str(profile), "--model-spec", str(config), "--batch", "2",
                "--gen-tokens", "40", *args)
    assert r.exit_code == code, r.output
    assert needle in r.output
    assert len([line for line in r.output.splitlines() if line.startswith("Error:")]) == 1


def test_profile_with_a_missing_field_is_refused(trace_path, profile, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("\n".join(line for line in profile.read_text().splitlines() if not line.startswith("ddr_gbps")))
    r = _invoke("--trace", str(trace_path), "--profile", str(bad))
    assert r.exit_code == 1 and f"{bad}: field 'ddr_gbps' is missing" in r.output


def test_cpu_without_a_profile_says_how_to_make_one(trace_path):
    r = _invoke("--trace", str(trace_path))
    assert r.exit_code == 1 and "tiersim calibrate --device cpu --out FILE.toml" in r.output


def test_trace_spec_mismatch_is_refused_unless_asked_for(tmp_path, profile):
    path = tmp_path / "captured.tstrace"
    shape = {"layers": 30, "attention_heads": 9, "kv_heads": 3, "head_dim": 64, "hidden": 576, "intermediate": 1536,
             "vocab": 49152}
    write_trace(path, [synth_request(SynthParams(), 16, 40, 0)], model={"id": "smollm2-135m", "shape": shape},
                generation={})
    r = _invoke("--trace", str(path), "--profile", str(profile), "--model-spec", "r1-qwen-1.5b")
    assert r.exit_code == 1
    assert ("trace/spec mismatch: captured from smollm2-135m (layers 30, attention_heads 9, kv_heads 3, head_dim 64) "
            "but --model-spec r1-qwen-1.5b has layers 28, attention_heads 12, kv_heads 2, head_dim 128") in r.output
    check_trace_spec(read_trace(path), hardware_model := dataclasses.replace(TINY, name="x"), any_model=True)
    with pytest.raises(TiersimError, match="trace/spec mismatch"):
        check_trace_spec(read_trace(path), hardware_model, any_model=False)


def test_a_configuration_that_does_not_fit_is_refused_before_allocating(trace_path, profile):
    r = _invoke("--trace", str(trace_path), "--profile", str(profile), "--model-spec", "r1-llama-70b", "--batch", "1",
                "--gen-tokens", "40", "--any-model")
    m = model_spec("r1-llama-70b")
    weights = (m.layers * m.layer_weight_bytes + m.vocab * m.hidden * m.dtype_bytes) / 1e9
    assert r.exit_code == 1
    assert "Error: the replay needs 139." in r.output and f"(device side: weights {weights:.2f}, T0 pools" in r.output
    assert "GB of RAM" in r.output and "but host MemAvailable (the CPU device is host RAM) is " in r.output
    assert "lower --batch, --gen-tokens or --layers" in r.output


def test_replay_and_validate_configs_extend_the_run_config():
    cfg = ReplayConfig(model=TINY)
    assert isinstance(cfg, RunConfig) and (cfg.batch, cfg.gen_tokens, cfg.cold_start, cfg.decode_steps) == (8, 512, True, 512)
    assert cfg.staging_buffers == 3 and ReplayConfig(model=TINY, strategy="prefetch-sync").staging_buffers == 3
    assert ReplayConfig(model=TINY, strategy="evict-only").staging_buffers == 0
    v = ValidateConfig(model=TINY, profile="h200-sxm", layers=2, depth=1)
    assert v.profile.name == "h200-sxm" and v.replay_config().model.layers == 2 and v.sim_config().model.layers == 2
    for make in (lambda: ReplayConfig(model=TINY, strategy="cpu-attention"),
                 lambda: ValidateConfig(model=TINY, profile="h200-sxm", strategy="cpu-attention")):
        with pytest.raises(ConfigError, match="strategy 'cpu-attention' is simulated but not replayed") as e:
            make()
        assert e.value.field == "strategy"
    with pytest.raises(ConfigError, match="batch must be an integer >= 1, got 0"):
        ReplayConfig(model=TINY, batch=0)
    with pytest.raises(ConfigError, match="depth 2 needs more than 2 layers"):
        ValidateConfig(model=TINY, profile="h200-sxm", layers=2)


def test_gpu_suite_entry_runs_shortened_on_cpu(tmp_path):
    out = tmp_path / "suite"
    assert gpu_suite.main(["--out", str(out), "--device", "cpu", "--quick"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    suite = json.loads((out / "validate_suite.json").read_text())
    assert summary["suite"]["configurations"] == len(suite["configs"]) >= 8 and not summary["skipped"]
    combos = {(c["config"]["strategy"], c["config"]["batch"], c["config"]["policy"]["hbm_ratio"]) for c in suite["configs"]}
    assert len(combos) == len(suite["configs"])  # strategies x batch x β, no repeats
    assert {s for s, _, _ in combos} == {"prefetch-layer", "prefetch-sync"} and len({b for _, b, _ in combos}) == 2
    steps = [c["step_error_pct"] for c in suite["configs"]]
    assert summary["suite"]["step_error_pct_median_abs"] == pytest.approx(float(np.median(np.abs(steps))))
    assert summary["suite"]["step_error_pct_worst_abs"] == pytest.approx(max(abs(s) for s in steps))
    assert hardware_spec(str(out / "profile.toml")).sources["hbm_gbps_effective"].startswith("measured: CPU ")
    assert "CPU measurement of this machine" in (out / "README.md").read_text()
    exact = json.loads((out / "exactness.json").read_text())
    assert exact["ran"] and exact["passed"], exact
    # Shapes the fit never saw, every mechanism the CPU runs, the error band stored in the profile, the report.
    assert all(s["held_out"] for s in suite["suite"]["shapes"]) and len(suite["suite"]["shapes"]) == 2
    # Every mechanism the CPU runs is asked for; one whose constants this machine's quick calibration could not
    # identify (a noisy copy curve) runs as `auto` on both sides instead, so the measured set depends on the machine.
    asked = {"dma", "dma-batched", "host-gather", "pageable"}
    assert set(suite["suite"]["mechanisms"]) == asked
    assert {c["config"]["copy_method"] for c in suite["configs"]} <= asked | {"auto"}
    validated = hardware_spec(str(out / "profile.toml"))
    table = validated.validation
    assert table["configurations"] == len(suite["configs"]) and table["fitted_shapes"] == ["tiny-cpu"]
    assert set(table["by_strategy"]) == {"prefetch-layer", "prefetch-sync", "full"}
    assert table["median_abs_pct"] == pytest.approx(summary["suite"]["step_error_pct_median_abs"], abs=0.01)
    assert validated.error_bar("prefetch-sync")[0] == table["by_strategy"]["prefetch-sync"]["p90_abs_pct"]
    readme = (out / "README.md").read_text()
    assert "validation_scatter.png" in readme and "Fit behind the profile" in readme and "load average" in readme
    assert (out / "validation_scatter.png").stat().st_size > 0 and "<table>" in (out / "report.html").read_text()
    assert len([p for p in out.iterdir() if p.is_file()]) <= 8  # what a lent device hands back
    assert gpu_suite.main(["--out", str(tmp_path / "none"), "--device", "cuda"]) == 2
    assert gpu_suite.main(["--device", "cpu"]) == 2  # --out missing: a usage error, as in the main CLI
    assert not torch.cuda.is_available()


def test_simulate_prints_the_error_band_of_a_validated_profile_and_says_unvalidated_otherwise(tmp_path):
    table = {"machine": "NVIDIA H200", "date": "2026-12-02", "median_abs_pct": 4.0, "p90_abs_pct": 9.0,
             "by_strategy": {"prefetch-layer": {"median_abs_pct": 3.0, "p90_abs_pct": 6.0, "n": 4}}}
    path = tmp_path / "validated.toml"
    path.write_text(dataclasses.replace(hardware_spec("h200-sxm"), validation=table).to_toml())
    args = ["simulate", "--model", "r1-qwen-1.5b", "--batch", "4", "--gen-tokens", "200"]
    r = CliRunner().invoke(cli, [*args, "--hardware", str(path)])
    assert r.exit_code == 0, r.output
    assert "ms ± 6% (validated on NVIDIA H200, 2026-12-02)" in r.output
    r = CliRunner().invoke(cli, [*args, "--hardware", "h200-sxm"])
    assert r.exit_code == 0 and "(unvalidated: datasheet profile)" in r.output
    r = CliRunner().invoke(cli, [*args, "--hardware", str(path), "--json", str(tmp_path / "s.json")])
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["error_bar_pct"] == 6.0 and s["validated_on"] == "NVIDIA H200, 2026-12-02"
    plain = simulate(SimConfig(model="r1-qwen-1.5b", hardware="h200-sxm", batch=4, gen_tokens=200), workers=1).summary
    assert plain["error_bar_pct"] is None and plain["validated_on"] is None
