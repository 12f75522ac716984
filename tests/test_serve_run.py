"""The open loop and the serving form of the closed loop: every strategy at the same arrivals, against the simulator."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from tiersim.cli import cli
from tiersim.errors import ConfigError
from tiersim.sim import engine
from tiersim.sim.blocks import KVCapacity
from tiersim.sim.costs import CostModel
from tiersim.sim.memory import account_memory
from tiersim.sim.plan import make_plan
from tiersim.sim.run import simulate
from tiersim.sim.serve_run import ServeConfig, closed_loop, length_specs, parse_rates, rate_sweep, simulate_serving
from tiersim.specs import hardware_spec, model_spec
from tiersim.strategy import STRATEGY_NAMES
from tiersim.studies.serving_plots import plot_serving_curve
from tiersim.traces.format import write_trace
from tiersim.traces.synth import SynthParams, synth_request
from tiersim.workload.demand import read_run_trace, run_workload

P, G = 40, 60


def small_trace(path, lengths):
    params = SynthParams()
    write_trace(path, [synth_request(params, P, g, seed) for seed, g in enumerate(lengths)],
                model={"id": "synthetic", "shape": {}}, generation={}, metadata={"synthetic": params.to_dict()})
    return path


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    return small_trace(tmp_path_factory.mktemp("serve") / "small.tstrace", (50, 70, 90))


@pytest.fixture(scope="module")
def one_request_trace(tmp_path_factory):
    return small_trace(tmp_path_factory.mktemp("serve1") / "one.tstrace", (G,))


def config(trace, **kw) -> ServeConfig:
    base = dict(model=model_spec("r1-qwen-7b"), hardware=hardware_spec("h200-sxm"), trace=trace, batch=8,
                gen_tokens=G, steps=150, find_max_rate=False)
    return ServeConfig(**{**base, **kw})


def test_closed_loop_reproduces_the_simulated_per_step_totals(trace_path):
    """N slots served back to back with unlimited KV: each step holds the decodes and prefills the closed-loop
    workload has, so `full` costs exactly the simulator's step and holds its blocks."""
    cfg = config(trace_path, strategy="full", cold_start=True, max_num_seqs=8, max_num_batched_tokens=10**7)
    block_bytes = cfg.block_size * cfg.model.kv_bytes_per_token
    res = closed_loop(cfg, capacity=KVCapacity(cfg.block_size, 10**9, block_bytes=block_bytes), workers=1)
    w = run_workload(cfg, workers=1)
    n = cfg.decode_steps
    s = res.steps.iloc[:n]
    assert s["decode_seqs"].tolist() == w.column("decode").tolist()
    assert s["prefill_seqs"].tolist() == w.column("prefill").tolist()
    assert s["prefill_tokens"].tolist() == w.column("prefill_tokens").tolist()
    cost = CostModel(cfg.model, cfg.hardware, share=cfg.share)
    tl = engine.run(make_plan("full", w, cost, cfg)[0])
    assert s["step_s"].to_numpy() == pytest.approx(tl.step_s, rel=1e-9)
    zeros = np.zeros(n)
    mem = account_memory("full", w, cfg, tl, zeros, zeros)
    assert s["hbm_bytes"].to_numpy() == pytest.approx(mem.hbm_bytes - mem.fixed_bytes, rel=1e-12)
    assert res.metrics["preemptions"] == 0


def test_vanishing_rate_tpot_is_the_single_request_step(one_request_trace):
    """Requests far apart: TTFT is the simulator's prefill step of one request, TPOT the mean of its decode steps."""
    cfg = config(one_request_trace, rate=1e-3, duration_s=6000.0, strategies=("full",), batch=1, cold_start=True,
                 steps=G, strategy="full")
    run = simulate_serving(cfg, workers=1)
    r = run.results["full"].requests
    assert len(r) >= 3 and (r["status"] == "finished").all() and (r["output_tokens"] == G).all()
    step_s = simulate(cfg, workers=1).timeline.step_s  # batch 1: its prefill, then G - 1 decodes
    assert r["ttft_s"].to_numpy() == pytest.approx(np.full(len(r), step_s[0]), rel=1e-9)
    assert r["tpot_s"].to_numpy() == pytest.approx(np.full(len(r), step_s[1:].mean()), rel=1e-9)
    assert run.summary["serving"]["full"]["mean_concurrency"] < 0.01


def test_every_strategy_serves_the_same_arrivals(trace_path):
    # 300 generated tokens: past the policy's first re-tier (132), so the tiered strategies hold a DDR tier.
    cfg = config(trace_path, rate=4.0, duration_s=20.0, gen_tokens=300, prompt_tokens=200)
    run = simulate_serving(cfg, workers=1)
    assert list(run.results) == list(STRATEGY_NAMES)  # full first, then the others
    arrivals = {name: r.requests["arrival_s"].tolist() for name, r in run.results.items()}
    assert all(a == arrivals["full"] for a in arrivals.values())
    r = run.results["full"].requests
    assert (r["output_tokens"] == 300).all() and (r["prompt_tokens"] == 200).all()
    s = run.summary
    assert s["mode"] == "open-loop" and s["baseline"]["strategy"] == "full" and "full" in s["verdict"]
    for m in s["serving"].values():
        assert m["ttft_ms_p50"] is not None and m["throughput_tok_s"] > 0
        assert m["hbm_kv_gb_peak"] <= m["hbm_kv_gb_capacity"] + 1e-9
        assert m["ddr_kv_gb_peak"] <= m["ddr_kv_gb_capacity"] + 1e-9
    assert s["serving"]["full"]["ddr_kv_gb_peak"] == 0 < s["serving"]["prefetch-layer"]["ddr_kv_gb_peak"]
    steps = run.table("steps")
    assert steps.columns[0] == "strategy" and set(steps["strategy"]) == set(STRATEGY_NAMES)
    assert json.loads(json.dumps(s))["config"]["rate"] == 4.0


def test_each_strategy_has_a_sustainable_rate(trace_path):
    # Two sequences at a time: queueing past a few req/s breaks the TTFT target, so the search stays short.
    cfg = config(trace_path, rate=2.0, duration_s=10.0, strategies=("prefetch-layer",), find_max_rate=True,
                 max_num_seqs=2, slo_ttft_ms=500.0, slo_tpot_ms=20.0)
    s = simulate_serving(cfg, workers=2).summary
    assert list(s["serving"]) == ["full", "prefetch-layer"]
    for m in s["serving"].values():
        rate, trials = m["max_sustainable_rate_req_s"], dict(map(tuple, m["rate_trials"]))
        assert rate > 0 and trials[rate] >= 0.9
        assert all(share < 0.9 for r, share in trials.items() if r > rate * 1.1)
    assert "Maximum sustainable rate" in s["verdict"]


def test_rate_sweep_draws_the_curve(trace_path, tmp_path):
    cfg = config(trace_path, duration_s=20.0, strategies=("evict-only",), rates="4,0.5")
    run = rate_sweep(cfg, workers=1)
    rows = run.sweep
    assert list(zip(rows["strategy"], rows["rate_req_s"])) == [("full", 0.5), ("full", 4.0), ("evict-only", 0.5),
                                                                ("evict-only", 4.0)]
    full = rows[rows["strategy"] == "full"]
    assert full["throughput_tok_s"].iloc[1] > full["throughput_tok_s"].iloc[0]
    paths = plot_serving_curve(rows, run.summary, tmp_path / "curve.png", formats=("png", "svg"))
    assert [p.name for p in paths] == ["curve.png", "curve.svg"] and all(p.stat().st_size > 0 for p in paths)


def test_lengths_default_to_the_closed_loop_and_trace_takes_the_requests_own(trace_path):
    trace = read_run_trace(trace_path)
    assert length_specs(config(trace_path), trace) == ([P] * 3, G)
    assert length_specs(config(trace_path, output_tokens="trace", prompt_tokens="aime"), trace) == ("aime",
                                                                                                   [50, 70, 90])


def test_serve_config_fields():
    assert parse_rates("4, 1,2,2") == (1.0, 2.0, 4.0)
    cfg = ServeConfig(model="r1-qwen-7b", hardware="h200-sxm", rate=3)
    assert cfg.served == STRATEGY_NAMES and cfg.slo.tpot_ms == 50.0 and cfg.scheduler.max_num_seqs == 256
    assert cfg.ddr_gb_per_gpu == pytest.approx(cfg.hardware.ddr_gb / cfg.hardware.gpus_per_host)
    again = ServeConfig.from_sim(dataclasses.replace(cfg, batch=4), rate=1.0)
    assert again.batch == 4 and again.rate == 1.0


@pytest.mark.parametrize("kw, field", [
    (dict(rate=0), "rate"), (dict(rate=-1.0), "rate"), (dict(rate=1.0, arrivals="x.csv"), "rate"),
    (dict(slo_ttft_ms=0), "slo_ttft_ms"), (dict(slo_tpot_ms=0), "slo_tpot_ms"), (dict(rates="1,0"), "rates"),
    (dict(duration_s=0), "duration_s"), (dict(output_tokens=0), "output_tokens"),
    (dict(prompt_tokens="nope"), "prompt_tokens"), (dict(preemption="drop"), "preemption"),
    (dict(strategies=("fastest",)), "strategies"),
])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ConfigError) as e:
        ServeConfig(model="r1-qwen-7b", hardware="h200-sxm", **kw)
    assert e.value.field == field


def _arrivals(tmp_path, text):
    path = tmp_path / "arrivals.csv"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("args, flag", [
    (["--rate", "0"], "--rate"),
    (["--rate", "-2"], "--rate"),
    (["--rate", "1", "--slo-ttft-ms", "0"], "--slo-ttft-ms"),
    (["--rate", "1", "--slo-tpot-ms", "0"], "--slo-tpot-ms"),
    (["--rates", "1,0"], "--rates"),
    (["--arrivals", "missing"], "--arrivals"),
    (["--arrivals", "decreasing"], "--arrivals"),
    (["--slo-tpot-ms", "20"], "--slo-tpot-ms"),  # an open-loop flag without the open loop
])
def test_bad_input_is_one_line_naming_the_flag_and_nothing_is_written(trace_path, tmp_path, args, flag):
    files = {"missing": "arrival_s,prompt_tokens\n0,10\n1,10\n",
             "decreasing": "arrival_s,prompt_tokens,output_tokens\n0,10,5\n2,10,5\n1,10,5\n"}
    args = [_arrivals(tmp_path, files[a]) if a in files else a for a in args]
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["simulate", "--trace", str(trace_path), "--model", "r1-qwen-7b",
                                      "--gen-tokens", str(G), "--out", str(out), *args])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Error: {flag}"), result.output
    assert not out.exists()


def test_cli_open_loop_writes_its_outputs(trace_path, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["simulate", "--trace", str(trace_path), "--model", "r1-qwen-7b", "--gen-tokens",
                                      str(G), "--strategy", "prefetch-layer", "--rate", "2", "--rates", "1,4",
                                      "--duration", "10", "--max-num-seqs", "2", "--out", str(out), "--format", "svg"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"summary.json", "requests.csv", "steps.csv", "sweep.csv",
                                               "serving_curve.svg"}
    s = json.loads((out / "summary.json").read_text())
    assert list(s["serving"]) == ["full", "prefetch-layer"] and len(s["sweep"]) == 4
    assert s["verdict"] in " ".join(result.output.split()) or "verdict:" in result.output
