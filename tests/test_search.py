"""The β frontier search (simulate --target-overhead) and advise: the walk, the choice, the verdict, bad input."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
from click.testing import CliRunner

from tiersim.cli import cli
from tiersim.errors import TiersimError
from tiersim.sim import SimConfig
from tiersim.specs import hardware_spec, model_spec
from tiersim.studies import search as search_module
from tiersim.studies.search import FrontierPoint, advise, bisect_beta, search_hbm_ratio
from tiersim.traces.format import write_trace
from tiersim.traces.synth import SynthParams, synth_request

TARGET = 5.0


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("search") / "small.tstrace"
    params = SynthParams()
    requests = [synth_request(params, 40, g, seed) for seed, g in enumerate((250, 330, 480))]
    write_trace(path, requests, model={"id": "synthetic", "shape": {}}, generation={},
                metadata={"synthetic": params.to_dict()})
    return path


def config(trace_path, **kw) -> SimConfig:
    base = dict(model=model_spec("r1-qwen-7b"), hardware=hardware_spec("h200-sxm"), trace=trace_path, batch=64,
                gen_tokens=512, steps=64)
    return SimConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def found(trace_path):
    return search_hbm_ratio(config(trace_path), TARGET, workers=1)


# -- the walk, on a stub whose overhead is known in closed form --------------------------------------
def test_bisection_walks_one_then_zero_then_dyadic_midpoints():
    walked = []

    def evaluate(beta):
        walked.append(beta)
        return types.SimpleNamespace(within_target=100 * (1 - beta) <= 10.0)  # within from β = 0.9 up

    bisect_beta(evaluate, 1 / 64)
    assert walked == [1.0, 0.0, 0.5, 0.75, 0.875, 0.9375, 0.90625, 0.890625]


@pytest.mark.parametrize("within, expected", [(False, [1.0]), (True, [1.0, 0.0])])
def test_bisection_stops_at_the_ends(within, expected):
    walked = []
    bisect_beta(lambda b: walked.append(b) or types.SimpleNamespace(within_target=within), 1 / 64)
    assert walked == expected


def test_none_exists_when_even_beta_one_is_over_the_target(trace_path, monkeypatch):
    fake = types.SimpleNamespace(summary={"hbm_saved_gb": 0.1, "hbm_peak_gb": 10.0, "overhead_pct": 12.0,
                                          "step_ms_mean": 5.0, "fits": True, "attention_mass_ddr": 0.0})
    monkeypatch.setattr(search_module, "simulate", lambda cfg, workers=None: fake)
    r = search_hbm_ratio(config(trace_path), TARGET)
    assert r.chosen is None and r.result is None
    assert [p.hbm_ratio for p in r.frontier] == [1.0]
    assert "no configuration keeps the overhead within 5%" in r.message and "12.00%" in r.message
    assert r.to_dict()["found"] is False and r.to_dict()["summary"] is None


def test_only_a_configuration_that_fits_is_chosen(trace_path, monkeypatch):
    # Every β is within the target but none fits in HBM: the search answers none, and says why.
    fake = types.SimpleNamespace(summary={"hbm_saved_gb": 0.1, "hbm_peak_gb": 150.0, "overhead_pct": 1.0,
                                          "step_ms_mean": 5.0, "fits": False, "attention_mass_ddr": 0.0})
    monkeypatch.setattr(search_module, "simulate", lambda cfg, workers=None: fake)
    r = search_hbm_ratio(config(trace_path), TARGET)
    assert r.chosen is None and r.result is None and all(p.within_target for p in r.frontier)
    assert "no configuration within 5% overhead fits in HBM" in r.message and "150.0 GB of 141 GB" in r.message


# -- the real search -----------------------------------------------------------------------------------
def test_search_chooses_the_largest_saving_within_the_target(found):
    assert found.chosen is not None
    assert found.chosen.overhead_pct <= TARGET and found.chosen.within_target
    within = [p for p in found.frontier if p.overhead_pct <= TARGET]
    assert found.chosen.hbm_saved_gb == max(p.hbm_saved_gb for p in within)
    above = [p for p in found.frontier if p.overhead_pct > TARGET]
    assert above and min(p.hbm_ratio for p in above) < found.chosen.hbm_ratio  # the frontier shows the other side
    assert [p.hbm_ratio for p in found.frontier][:2] == [1.0, 0.0]
    assert all((p.hbm_ratio * 64).is_integer() for p in found.frontier)  # the dyadic grid
    # The chosen point's simulation is the one returned, at its β.
    s = found.result.summary
    assert s["config"]["policy"]["hbm_ratio"] == found.chosen.hbm_ratio
    assert s["overhead_pct"] == found.chosen.overhead_pct and s["hbm_saved_gb"] == found.chosen.hbm_saved_gb


def test_search_is_deterministic(trace_path, found):
    again = search_hbm_ratio(config(trace_path), TARGET, workers=1)
    assert [p.to_dict() for p in again.frontier] == [p.to_dict() for p in found.frontier]


def test_search_strategy_covers_strategies_and_depths(trace_path):
    r = search_hbm_ratio(config(trace_path), TARGET, search_strategy=True, workers=1)
    combos = {(p.strategy, p.depth) for p in r.frontier}
    assert combos == {("prefetch-layer", 1), ("prefetch-layer", 2), ("prefetch-layer", 4), ("prefetch-sync", None),
                      ("cpu-attention", None)}
    within = [p for p in r.frontier if p.within_target]
    assert r.chosen.hbm_saved_gb == max(p.hbm_saved_gb for p in within) and r.chosen.overhead_pct <= TARGET


def test_frontier_point_round_trips_to_json():
    p = FrontierPoint(0.5, "cpu-attention", None, 1.0, 2.0, 3.0, 4.0, True, True, 0.1)
    assert json.loads(json.dumps(p.to_dict()))["depth"] is None


@pytest.mark.parametrize("target", [-1.0, float("nan"), float("inf")])
def test_bad_targets_are_refused(trace_path, target):
    with pytest.raises(TiersimError, match="accepted: a percentage >= 0"):
        search_hbm_ratio(config(trace_path), target)


@pytest.mark.parametrize("strategy", ["full", "evict-only"])
def test_untiered_strategies_cannot_be_searched(trace_path, strategy):
    with pytest.raises(TiersimError, match="tiered strategy"):
        search_hbm_ratio(config(trace_path, strategy=strategy), TARGET)


def test_cli_target_overhead_writes_chosen_outputs_and_frontier(trace_path, tmp_path):
    out = tmp_path / "run"
    args = ["simulate", "--trace", str(trace_path), "--model-spec", "r1-qwen-7b", "--batch", "64", "--gen-tokens", "512",
            "--steps", "64", "--target-overhead", "5", "--out", str(out)]
    r = CliRunner().invoke(cli, [*args, "--json", "-"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert {"target_overhead_pct", "found", "message", "chosen", "frontier", "summary"} <= set(d)
    assert d["found"] and d["chosen"]["overhead_pct"] <= 5 and any(p["overhead_pct"] > 5 for p in d["frontier"])
    assert {"summary.json", "steps.csv", "frontier.json"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["policy"]["hbm_ratio"] == d["chosen"]["hbm_ratio"]
    table = CliRunner().invoke(cli, args[:-2])
    assert table.exit_code == 0 and "β frontier walked" in table.output and "chosen: prefetch-layer" in table.output


@pytest.mark.parametrize("extra, message", [
    (["--target-overhead", "-3"], "target overhead -3.0 invalid"),
    (["--target-overhead", "5", "--strategy", "full"], "tiered strategy"),
    (["--search-strategy"], "--search-strategy needs --target-overhead"),
])
def test_cli_search_bad_input_is_one_line_and_writes_nothing(trace_path, tmp_path, extra, message):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["simulate", "--trace", str(trace_path), "--steps", "8", "--out", str(out), *extra])
    assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists()


# -- advise --------------------------------------------------------------------------------------------
def small_gpu():
    """A 20 GB H200: r1-qwen-7b's 15.2 GB of weights leave room for ~170 sequences of 400 tokens."""
    return dataclasses.replace(hardware_spec("h200-sxm"), hbm_gb=20.0)


@pytest.fixture(scope="module")
def advice(trace_path):
    # Blocks of one token: at 400 generated tokens a 3% eviction of 16-token pages rounds down to none.
    return advise(config(trace_path, hardware=small_gpu(), gen_tokens=400, steps=32, block_size=1), None, max_batch=512,
                  workers=1)


def test_advise_each_option_at_its_throughput_best_fitting_batch(advice):
    assert [o.strategy for o in advice.options] == ["full", "prefetch-layer", "prefetch-sync", "cpu-attention",
                                                    "evict-only"]
    for o in advice.options:
        assert o.viable
        ok = [t for t in o.trials if t.ok]
        chosen = next(t for t in o.trials if t.batch == o.batch)
        assert chosen.ok and o.throughput_tok_s == chosen.throughput_tok_s
        assert o.throughput_tok_s >= 0.99 * max(t.throughput_tok_s for t in ok)
        assert o.batch <= min(o.max_batch_estimate, 512)
    assert advice.option("full").attention_mass_lost == 0.0
    assert advice.option("evict-only").attention_mass_lost > advice.option("prefetch-layer").attention_mass_lost > 0


def test_advise_verdict_is_built_from_the_numbers(advice):
    exact = [o for o in advice.options if o.strategy != "evict-only"]
    best = max(exact, key=lambda o: o.throughput_tok_s)
    v = advice.verdict
    assert f"Recommendation: {best.strategy}" in v
    assert f"{best.throughput_tok_s:,.0f} tokens/s" in v and str(best.batch) in v
    full, evict = advice.option("full"), advice.option("evict-only")
    assert f"best batch is {full.batch} ({full.throughput_tok_s:,.0f} tokens/s" in v
    assert f"{100 * evict.attention_mass_lost:.2f}% of the attention mass" in v


def test_advise_respects_the_slo(trace_path):
    a = advise(config(trace_path, hardware=small_gpu(), gen_tokens=400, steps=32), 6.0, max_batch=512, workers=1)
    for o in a.options:
        if o.viable:
            assert o.step_ms_p99 <= 6.0
    assert "within the 6 ms SLO (p99 step)" in a.verdict


def test_advise_when_nothing_fits(trace_path):
    a = advise(config(trace_path, model=model_spec("r1-llama-70b"), hardware=hardware_spec("gh200"), gen_tokens=400,
                      steps=8), None, workers=1)
    assert not any(o.viable for o in a.options)
    assert "weights alone take 141.1 GB of the 96 GB of HBM" in a.verdict


@pytest.mark.parametrize("args, message", [
    (["--slo-ms", "-1"], "SLO -1.0 ms invalid"),
    (["--model-spec", "no-such-model"], "unknown model 'no-such-model'"),
    (["--max-batch", "0"], "max_batch must be an integer >= 1"),
])
def test_advise_bad_input(trace_path, args, message):
    r = CliRunner().invoke(cli, ["advise", "--trace", str(trace_path), "--steps", "8", *args])
    assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1


def test_advise_cli_json(trace_path):
    r = CliRunner().invoke(cli, ["advise", "--trace", str(trace_path), "--model-spec", "r1-qwen-7b", "--gen-tokens", "400",
                                 "--steps", "16", "--max-batch", "32", "--json", "-"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert [o["strategy"] for o in d["options"]][0] == "full" and d["verdict"].startswith("For r1-qwen-7b on h200-sxm")
    assert all(o["batch"] <= 32 for o in d["options"])
