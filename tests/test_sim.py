"""The simulator: closed forms, conservation, capacity, the paper's prototype, determinism, bad input."""

from __future__ import annotations

import dataclasses
import json
import re

import diskcache
import numpy as np
import pytest
from click.testing import CliRunner

from tiersim.cli import cli
from tiersim.errors import ConfigError, TiersimError
from tiersim.policy import DDR, EVICTED, HBM, PolicyConfig
from tiersim.sim import SimConfig, simulate
from tiersim.sim.costs import CostModel
from tiersim.sim.plan import bound_s, make_plan
from tiersim.specs import hardware_spec, model_spec
from tiersim.traces.format import read_trace, write_trace
from tiersim.traces.synth import SynthParams, synth_request
from tiersim.workload import cache
from tiersim.workload.build import BCOL, block_totals, build_workload, slot_rows

P, G = 40, 400


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "small.tstrace"
    # Requests of different lengths: two shorter than G (extended), one longer (cut).
    params = SynthParams()
    requests = [synth_request(params, P, g, seed) for seed, g in enumerate((250, 330, 480))]
    write_trace(path, requests, model={"id": "synthetic", "shape": {}}, generation={},
                metadata={"synthetic": params.to_dict()})
    return path


def config(trace_path, **kw) -> SimConfig:
    base = dict(model=model_spec("r1-qwen-7b"), hardware=hardware_spec("h200-sxm"), trace=trace_path,
                batch=16, gen_tokens=G, steps=300)
    base.update(kw)
    return SimConfig(**base)


def no_duplex(name: str):
    return dataclasses.replace(hardware_spec(name), duplex_factor=1.0)


def plan_of(cfg: SimConfig, result):
    cost = CostModel(cfg.model, cfg.hardware, cfg.pinned, cfg.fixed_compute_ms, cfg.weight_bits, share=cfg.share)
    return make_plan(cfg.strategy, result.workload, cost, cfg)[0]


def test_prefetch_sync_step_is_compute_plus_transfer(trace_path):
    cfg = config(trace_path, strategy="prefetch-sync", hardware=no_duplex("h200-sxm"), copy_method="gather-kernel")
    r = simulate(cfg, workers=1)
    plan = plan_of(cfg, r)
    compute = plan.layers * plan.layer_s + plan.head_s
    # The copy runs alone before the forward pass; only the demotions' HBM traffic slows compute (interference).
    tl = r.timeline
    np.testing.assert_allclose(tl.step_s, compute + plan.h2d_layer_s + tl.interference_s, rtol=1e-12)
    assert tl.interference_s.max() < 1e-3 * tl.step_s.min()
    assert r.summary["step_ms_mean"] == pytest.approx(r.summary["bound_step_ms"] + r.summary["interference_ms_mean"],
                                                      rel=1e-12)
    # The sync copy is every layer's DDR tokens, gathered by one kernel: a launch + bytes at 90% of the link.
    ddr = r.workload.column("ddr")
    promoted = np.concatenate([[0], r.workload.column("ddr_to_hbm")[:-1]])
    nbytes = (ddr + promoted) * cfg.model.kv_bytes_per_token
    expected = np.where(nbytes > 0, 10e-6 + nbytes / (0.9 * 55e9), 0)
    np.testing.assert_allclose(plan.h2d_layer_s, expected, rtol=1e-12)


@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("hardware, beta", [("h200-sxm", 0.5), ("gh200", 0.9)])
def test_prefetch_layer_matches_the_pipeline_closed_form(trace_path, depth, hardware, beta):
    cfg = config(trace_path, strategy="prefetch-layer", depth=depth, hardware=no_duplex(hardware),
                 policy=PolicyConfig(hbm_ratio=beta))
    r = simulate(cfg, workers=1)
    plan = plan_of(cfg, r)
    # Two-stage pipeline in steady state: each step costs the slower of its compute and its copies.
    analytic = np.maximum(plan.layers * plan.layer_s + plan.head_s, plan.layers * plan.h2d_layer_s).mean()
    assert r.timeline.step_s.mean() == pytest.approx(analytic, rel=0.02)
    assert r.summary["step_ms_mean"] >= r.summary["bound_step_ms"] * (1 - 1e-9)
    assert np.all(r.timeline.stall_s >= 0)


def test_regimes_are_told_apart(trace_path):
    # PCIe Gen5 at batch 128 and β=0.3: transfer-bound; NVLink-C2C at β=0.9: compute-bound, small stall.
    pcie = simulate(config(trace_path, batch=128, policy=PolicyConfig(hbm_ratio=0.3)), workers=1).summary
    c2c = simulate(config(trace_path, batch=128, hardware=hardware_spec("gh200"), policy=PolicyConfig(hbm_ratio=0.9)),
                   workers=1).summary
    assert pcie["link_util_h2d"] > 0.95 and pcie["overhead_pct"] > 30
    assert pcie["step_ms_mean"] == pytest.approx(pcie["compute_ms_mean"] + pcie["stall_ms_mean"]
                                                 + pcie["interference_ms_mean"])
    assert c2c["stall_ms_mean"] < 0.1 * c2c["compute_ms_mean"] and c2c["overhead_pct"] < 10


def test_full_moves_no_bytes_and_keeps_everything(trace_path):
    r = simulate(config(trace_path, strategy="full"), workers=1)
    s = r.summary
    assert s["h2d_gb_per_step"] == 0 and s["d2h_gb_per_step"] == 0 and s["link_util_h2d"] == 0
    assert s["overhead_pct"] == 0 and s["hbm_saved_gb"] == 0 and s["ddr_peak_gb"] == 0
    assert r.steps["stall_ms"].sum() == 0
    # KV is held in 16-token blocks: each slot's last block is partly filled.
    kvt = model_spec("r1-qwen-7b").kv_bytes_per_token
    kv = block_totals(r.workload, 16)[:, BCOL["blocks"]] * 16 * kvt
    np.testing.assert_allclose(r.memory.hbm_bytes, r.memory.fixed_bytes + kv)
    tokens = r.workload.column("tokens") * kvt
    assert np.all(kv >= tokens) and np.all(kv < tokens + 16 * 16 * kvt)  # at most a block per slot (batch 16) more


def test_hbm_within_capacity_when_it_fits(trace_path):
    r = simulate(config(trace_path, batch=64), workers=1)
    s = r.summary
    assert s["fits"] and r.memory.hbm_bytes.max() <= s["hbm_capacity_gb"] * 1e9
    # Staging buffers and in-flight demotions are part of the HBM count.
    assert r.memory.staging_bytes.max() > 0 and r.memory.inflight_bytes.max() > 0
    assert s["hbm_saved_gb"] > 0 and s["ddr_peak_gb"] > 0


def test_capacity_overflow_is_reported_with_the_largest_batch(trace_path):
    big = config(trace_path, model=model_spec("r1-qwen-32b"), batch=1024, gen_tokens=G)
    s = simulate(big, workers=1).summary
    assert not s["fits_full"] and s["hbm_peak_gb_full"] > s["hbm_capacity_gb"]
    assert 0 < s["max_batch_full"] < 1024 and s["max_batch"] > s["max_batch_full"]
    # The reported largest batch does fit (and one more slot's share would not, up to the estimate).
    ok = simulate(dataclasses.replace(big, batch=s["max_batch_full"], strategy="full"), workers=1).summary
    assert ok["hbm_peak_gb"] <= ok["hbm_capacity_gb"] * 1.02


def slow_totals(trace_path, cfg: SimConfig, w):
    """Per-step totals recomputed slot by slot from the schedules themselves (no tables)."""
    rows_per_request = cfg.gen_tokens
    out = {name: np.zeros(cfg.decode_steps) for name in ("hbm", "ddr", "evicted", "hbm_to_ddr", "ddr_to_hbm", "to_evicted")}
    for b in range(cfg.batch):
        for k in range(cfg.decode_steps):
            r, i = divmod(int(w.slot_rows[b, k]), rows_per_request)
            s = w.schedules[r]
            if i == 0:
                out["hbm"][k] += s.prompt_tokens
                continue
            t = i - 1
            out["hbm"][k] += s.counts[t, HBM]
            out["ddr"][k] += s.counts[t, DDR]
            out["evicted"][k] += s.counts[t, EVICTED]
            hit = np.flatnonzero(s.retier_steps == t)
            if hit.size:
                m = s.moves(int(hit[0]))
                out["hbm_to_ddr"][k] += np.count_nonzero((m.from_tier == HBM) & (m.to_tier == DDR))
                out["ddr_to_hbm"][k] += np.count_nonzero((m.from_tier == DDR) & (m.to_tier == HBM))
                out["to_evicted"][k] += np.count_nonzero(m.to_tier == EVICTED)
    return out


def test_batch_totals_equal_a_slow_per_request_reference(trace_path):
    cfg = config(trace_path, batch=5, steps=700, policy=PolicyConfig(evict_ratio=0.1))
    trace = read_trace(trace_path)
    w = build_workload(trace, cfg.policy, cfg.gen_tokens, cfg.batch, cfg.decode_steps, cfg.seed, cfg.cold_start,
                       SynthParams(), workers=1)
    slow = slow_totals(trace_path, cfg, w)
    for name, values in slow.items():
        np.testing.assert_array_equal(w.column(name), values, err_msg=name)
    assert slow["ddr_to_hbm"].sum() > 0 and slow["to_evicted"].sum() > 0


def test_link_bytes_conserve_the_schedules_transitions(trace_path):
    cfg = config(trace_path, strategy="prefetch-layer", policy=PolicyConfig(evict_ratio=0.1))
    r = simulate(cfg, workers=1)
    m, c = cfg.model, r.workload.column
    # D2H carries exactly the demotions; H2D each step's DDR tier plus the previous step's promotions.
    assert r.steps["d2h_bytes"].sum() == pytest.approx(c("hbm_to_ddr").sum() * m.kv_bytes_per_token)
    promoted = np.concatenate([[0], c("ddr_to_hbm")[:-1]])
    np.testing.assert_allclose(r.steps["h2d_bytes"], (c("ddr") + promoted) * m.kv_bytes_per_token)
    # The attention mass per tier sums to the attention of every decode step.
    mass = sum(c(f"mass_{t}") for t in ("hbm", "ddr", "compressed", "evicted"))
    np.testing.assert_allclose(mass, c("decode"), rtol=2e-3)


def test_the_papers_prototype_lands_in_its_overhead_range(trace_path):
    # DESIGN.md §1: RTX 5080, PCIe Gen5 pageable (~15 GB/s H2D, ~22 GB/s D2H), 7B (28 layers, 4 KV heads,
    # head_dim 128), batch 1, synchronous prefetch of all layers before the forward pass, ~47 ms of
    # compute per token. Chains of GSM8K length (~2.5K tokens), β=0.5, r=0.03. Paper: 5.2–7.2%.
    cfg = SimConfig(model=model_spec("r1-qwen-7b"), hardware=hardware_spec("rtx5080"), trace=trace_path,
                    strategy="prefetch-sync", batch=1, gen_tokens=2560, steps=4 * 2560, pinned=False,
                    fixed_compute_ms=47.0, cold_start=True, policy=PolicyConfig(hbm_ratio=0.5, evict_ratio=0.03))
    s = simulate(cfg, workers=1).summary
    assert 5.0 <= s["transfer_overhead_pct_paper"] <= 7.0
    assert 400 <= s["ddr_tokens_per_slot_step"] <= 600  # the paper: ~448 DDR tokens per step
    assert s["compute_ms_mean"] == pytest.approx(47.0, rel=0.03)  # prefill steps add nothing: compute is fixed


def test_same_seed_same_result_and_seeds_matter(trace_path):
    a = simulate(config(trace_path), workers=1).summary
    b = simulate(config(trace_path), workers=2).summary
    c = simulate(config(trace_path, seed=1), workers=1).summary
    drop = lambda s: {k: v for k, v in s.items() if k not in ("sim_wall_s",)}
    assert drop(a) == drop(b)
    assert a["step_ms_mean"] != c["step_ms_mean"]


def test_warm_start_spreads_slots_and_cold_start_does_not():
    warm, _, _ = slot_rows(4, 101, batch=64, steps=10, seed=0, cold_start=False)
    cold, started, finished = slot_rows(4, 101, batch=64, steps=10, seed=0, cold_start=True)
    assert np.all(cold[:, 0] % 101 == 0) and started == 64 and finished == 0
    assert len(np.unique(warm[:, 0] % 101)) > 20


def test_cpu_attention_moves_only_queries_and_partials(trace_path):
    cfg = config(trace_path, strategy="cpu-attention")
    r = simulate(cfg, workers=1)
    s = r.summary
    assert s["h2d_gb_per_step"] == 0  # no KV is prefetched
    assert r.timeline.host_busy_s.sum() > 0 and s["ddr_peak_gb"] > 0
    plan = plan_of(cfg, r)
    assert s["step_ms_mean"] >= s["bound_step_ms"] * (1 - 1e-9)
    assert np.all(plan.query_d2h_s[r.workload.column("ddr") > 0] > 0)


def test_evict_only_loses_the_ddr_attention(trace_path):
    tiered = simulate(config(trace_path), workers=1).summary
    evict = simulate(config(trace_path, strategy="evict-only"), workers=1).summary
    assert evict["attention_mass_evicted"] == pytest.approx(tiered["attention_mass_evicted"] + tiered["attention_mass_ddr"])
    assert evict["h2d_gb_per_step"] == 0 and evict["ddr_peak_gb"] == 0
    assert evict["step_ms_mean"] < tiered["step_ms_full_mean"]


def test_extension_is_reported(trace_path):
    s = simulate(config(trace_path), workers=1).summary
    trace = read_trace(trace_path)
    captured = sum(min(trace[i].steps, G - 1) for i in range(len(trace)))
    assert s["tokens_captured"] == captured
    assert s["tokens_synthetic"] == 3 * (G - 1) - captured > 0


def test_simulate_cli_writes_outputs(trace_path, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["simulate", "--trace", str(trace_path), "--model-spec", "r1-qwen-7b", "--batch", "8",
                                      "--gen-tokens", "300", "--out", str(out), "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    s = json.loads((out / "summary.json").read_text())
    for key in ("hbm_peak_gb", "hbm_peak_gb_full", "hbm_saved_gb", "ddr_peak_gb", "hbm_capacity_gb", "fits", "fits_full",
                "max_batch", "max_batch_full", "step_ms_mean", "step_ms_p50", "step_ms_p99", "step_ms_full_mean",
                "overhead_pct", "transfer_overhead_pct_paper", "throughput_tok_s", "h2d_gb_per_step", "d2h_gb_per_step",
                "link_util_h2d", "evicted_frac", "attention_mass_evicted", "attention_mass_ddr", "bound_step_ms",
                "sim_wall_s", "sim_events", "config"):
        assert key in s, key
    assert s["config"]["batch"] == 8 and s["config"]["policy"]["hbm_ratio"] == 0.5
    lines = (out / "steps.csv").read_text().splitlines()
    assert len(lines) == 301 and lines[0].startswith("step,time_ms,step_ms,compute_ms,stall_ms")
    for png in ("memory.png", "step_breakdown.png", "links.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, needle", [
    (["--model-spec", "gpt-9"], "r1-qwen-14b"),
    (["--hardware", "tpu-v9"], "h200-sxm"),
    (["--batch", "0"], "batch"),
    (["--hbm-ratio", "2"], "hbm_ratio"),
    (["--evict-ratio", "-0.5"], "evict_ratio"),
    (["--depth", "0"], "depth"),
])
def test_bad_input_is_one_clear_line(trace_path, tmp_path, args, needle):
    result = CliRunner().invoke(cli, ["simulate", "--trace", str(trace_path), "--out", str(tmp_path / "o"), *args])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.output
    assert not (tmp_path / "o").exists()


def test_config_takes_names_and_each_bad_field_is_named():
    cfg = SimConfig(model="r1-qwen-14b", hardware="h200-sxm", batch=128)
    assert (cfg.model, cfg.hardware, cfg.batch) == (model_spec("r1-qwen-14b"), hardware_spec("h200-sxm"), 128)
    assert cfg.strategy_record.staging_buffers(cfg.depth, cfg.model.layers) == 3  # prefetch-layer, depth 2
    for field, value, needle in (("reserve_frac", 1.0, "reserve_frac must be a number in [0, 1)"),
                                 ("fixed_compute_ms", 0, "fixed_compute_ms must be a number > 0"),
                                 ("weight_bits", 3, "weight_bits 3 unknown; accepted: 4, 8, 16, 32"),
                                 ("hardware", 3, "hardware must be a profile name"),
                                 ("strategy", "fast", "strategy 'fast' unknown"), ("steps", 0, "steps must be")):
        with pytest.raises(ConfigError, match=re.escape(needle)) as e:
            SimConfig(**{"model": "r1-qwen-14b", "hardware": "h200-sxm", field: value})
        assert e.value.field == field
    with pytest.raises(TiersimError, match="tpu-v9"):
        SimConfig(model="r1-qwen-14b", hardware="tpu-v9")


def test_trace_with_unreadable_model_shape_is_refused(trace_path, tmp_path):
    src = read_trace(trace_path)
    bad = tmp_path / "bad.tstrace"
    write_trace(bad, [src[0]], model={"id": "x", "shape": {"layers": "many"}}, generation={})
    with pytest.raises(TiersimError, match="layers"):
        simulate(config(bad), workers=1)
    write_trace(bad, [src[0]], model={"id": "x", "shape": "28 layers"}, generation={})
    with pytest.raises(TiersimError, match="unreadable"):
        simulate(config(bad), workers=1)


def test_bound_is_below_every_strategy(trace_path):
    for strategy in ("prefetch-sync", "prefetch-layer", "cpu-attention", "evict-only"):
        cfg = config(trace_path, strategy=strategy)
        r = simulate(cfg, workers=1)
        assert r.timeline.step_s.mean() >= bound_s(plan_of(cfg, r)).mean() * (1 - 1e-9), strategy


def schedule_entries(root) -> list[str]:
    """Keys of the schedule entries in the bounded store under `root`."""
    with diskcache.Cache(str(root / cache.STORE)) as store:
        return sorted(k for k in store.iterkeys() if k.startswith("schedule/"))


def test_schedule_cache_hits_give_identical_results_and_bad_entries_are_recomputed(trace_path, tmp_path, monkeypatch):
    monkeypatch.setenv("TIERSIM_CACHE_DIR", str(tmp_path / "cache"))
    cold = simulate(config(trace_path), workers=1)
    entries = schedule_entries(tmp_path / "cache")
    assert len(entries) == 3  # one per trace request
    assert cache.cache_info()["entries"] == 3  # a synthetic trace carries its own continuation: no fit is stored
    warm = simulate(config(trace_path), workers=1)
    for a, b in zip(cold.workload.schedules, warm.workload.schedules):
        for name, value in a.to_arrays().items():
            np.testing.assert_array_equal(value, b.to_arrays()[name])
    with diskcache.Cache(str(tmp_path / "cache" / cache.STORE)) as store:
        store.set(entries[0], b"not an npz")
    again = simulate(config(trace_path), workers=1)
    np.testing.assert_array_equal(again.workload.totals, cold.workload.totals)
    with diskcache.Cache(str(tmp_path / "cache" / cache.STORE)) as store:
        assert store.get(entries[0])[:2] == b"PK"  # rewritten
    # Another policy is another entry, not a stale hit.
    simulate(config(trace_path, policy=PolicyConfig(hbm_ratio=0.7)), workers=1)
    assert len(schedule_entries(tmp_path / "cache")) == 6
    monkeypatch.setenv("TIERSIM_CACHE", "0")
    off = simulate(config(trace_path, policy=PolicyConfig(hbm_ratio=0.3)), workers=1)
    monkeypatch.delenv("TIERSIM_CACHE")
    assert len(schedule_entries(tmp_path / "cache")) == 6 and off.summary["fits"]


def test_schedule_cache_is_bounded_and_can_be_cleared(trace_path, tmp_path, monkeypatch):
    monkeypatch.setenv("TIERSIM_CACHE_DIR", str(tmp_path / "cache"))
    assert cache.cache_info() == {"dir": str(tmp_path / "cache" / cache.STORE), "entries": 0, "bytes": 0,
                                  "limit": 2_000_000_000}
    simulate(config(trace_path), workers=1)
    info = cache.cache_info()
    assert info["entries"] == 3 and info["bytes"] > 0
    # A bound below one policy's entries: storing the next ones evicts the entries stored first.
    first = schedule_entries(tmp_path / "cache")
    monkeypatch.setenv("TIERSIM_CACHE_MAX_GB", str(info["bytes"] / 1e9))
    assert cache.cache_info()["limit"] == int(info["bytes"])
    simulate(config(trace_path, policy=PolicyConfig(hbm_ratio=0.7)), workers=1)
    kept = schedule_entries(tmp_path / "cache")
    assert set(first) - set(kept) and cache.cache_info()["bytes"] <= info["bytes"] * 1.5
    assert cache.cache_clear() == len(kept)
    assert cache.cache_info()["entries"] == 0
    monkeypatch.setenv("TIERSIM_CACHE_MAX_GB", "lots")
    with pytest.raises(TiersimError, match="TIERSIM_CACHE_MAX_GB must be a number > 0"):
        cache.cache_info()
    monkeypatch.delenv("TIERSIM_CACHE_MAX_GB")
    monkeypatch.setenv("TIERSIM_CACHE", "0")
    assert cache.cache_info()["dir"] is None


def test_int4_weights_shrink_weights_and_memory_bound_layers(trace_path):
    fp16 = simulate(config(trace_path, strategy="full", batch=4), workers=1).summary
    int4 = simulate(config(trace_path, strategy="full", batch=4, weight_bits=4), workers=1).summary
    m = model_spec("r1-qwen-7b")
    assert fp16["weights_gb"] == pytest.approx(m.weight_bytes / 1e9)
    assert int4["weights_gb"] == pytest.approx(m.params * 0.5 / 1e9)
    # At batch 4 the matmuls are bound by reading weights: a quarter of the bytes, about a quarter of the time.
    assert 0.2 < int4["compute_ms_mean"] / fp16["compute_ms_mean"] < 0.45
    assert fp16["attention_mass_evicted"] == 0 and fp16["attention_mass_ddr"] == 0 and fp16["evicted_frac"] == 0


def test_copy_engine_slowdown_is_charged_to_every_layer_of_prefetch_layer_only(trace_path):
    """`copy_engine_slowdown` stretches every layer's compute where a copy engine stages each layer, nowhere else."""
    plain = hardware_spec("h200-sxm")
    engine = dataclasses.replace(plain, copy_engine_slowdown=0.05)
    for strategy, charged in (("prefetch-layer", True), ("prefetch-sync", False), ("full", False)):
        cfgs = [config(trace_path, strategy=strategy, hardware=hw) for hw in (plain, engine)]
        runs = [simulate(c, workers=1) for c in cfgs]
        plans = [plan_of(c, r) for c, r in zip(cfgs, runs)]
        for field in ("matmul_s", "attention_s"):
            assert np.allclose(getattr(plans[1], field), getattr(plans[0], field) * (1.05 if charged else 1.0))
        assert np.array_equal(plans[1].head_s, plans[0].head_s)
        grew = runs[1].summary["step_ms_mean"] / runs[0].summary["step_ms_mean"] - 1
        assert (0 < grew <= 0.05 + 1e-9) if charged else grew == pytest.approx(0.0, abs=1e-12)
