"""The fair baseline and the verdict: full where it fits, the cut-short alternatives, sentences made of the numbers."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from tiersim.cli import cli
from tiersim.sim import SimConfig, simulate
from tiersim.sim.verdict import CUT_STEPS, open_loop_verdict, relative
from tiersim.specs import hardware_spec, model_spec
from tiersim.traces.format import write_trace
from tiersim.traces.synth import SynthParams, synth_request

NEW_KEYS = {"baseline", "at_max_batch", "alternatives", "verdict"}
WALL = {"sim_wall_s"}


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("verdict") / "small.tstrace"
    params = SynthParams()
    write_trace(path, [synth_request(params, 40, g, seed) for seed, g in enumerate((250, 330, 480))],
                model={"id": "synthetic", "shape": {}}, generation={}, metadata={"synthetic": params.to_dict()})
    return path


def config(trace_path, **kw) -> SimConfig:
    base = dict(model=model_spec("r1-qwen-7b"), hardware=hardware_spec("h200-sxm"), trace=trace_path, batch=16,
                gen_tokens=400, steps=300)
    return SimConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def default_summary() -> dict:
    """The default run (`tiersim simulate` with no options), with its comparison."""
    return simulate(SimConfig(model="r1-qwen-14b", hardware="h200-sxm"), compare=True).summary


def test_default_verdict_names_full_at_the_batch_that_fits(default_summary):
    s = default_summary
    b = s["baseline"]
    assert not s["fits_full"] and s["fits"]
    assert b["strategy"] == "full" and b["fits"] and 0 < b["batch"] < 256 and b["steps"] == 4096
    assert b["hbm_peak_gb"] <= s["hbm_capacity_gb"] and b["same_batch"] is None
    # Every batch tried before the one reported overflowed HBM.
    assert b["batches_tried"][-1] == b["batch"] and all(t > b["batch"] for t in b["batches_tried"][:-1])
    v = s["verdict"]
    assert v.startswith("At batch 256, full does not fit")
    assert f"full at its largest fitting batch, {b['batch']} ({b['throughput_tok_s']:,.0f} tokens/s" in v
    assert f"{s['throughput_tok_s']:,.0f} tokens/s" in v and f"{CUT_STEPS}-step runs" in v
    m = s["at_max_batch"]
    assert m["strategy"] == "prefetch-layer" and m["batch"] == s["max_batch"] and m["steps"] == CUT_STEPS
    # The other side of the trade, cpu-attention, the next β of the eighths grid and blocks twice as large.
    assert [(a["strategy"], a["hbm_ratio"], a["block_size"]) for a in s["alternatives"]] == \
        [("evict-only", 0.5, 16), ("cpu-attention", 0.5, 16), ("prefetch-layer", 0.625, 16), ("prefetch-layer", 0.5, 32)]
    assert all(a["steps"] == CUT_STEPS and a["batch"] == 256 for a in s["alternatives"])
    assert v.count(". ") == 1 and v.endswith(".")  # two sentences


def test_the_comparison_only_adds_keys(trace_path):
    cfg = config(trace_path, batch=300)
    plain = simulate(cfg, workers=1).summary
    compared = simulate(cfg, workers=1, compare=True).summary
    assert set(compared) - set(plain) == NEW_KEYS
    assert {k: v for k, v in compared.items() if k not in NEW_KEYS | WALL} == \
        {k: v for k, v in plain.items() if k not in WALL}


def test_when_full_fits_the_same_batch_is_the_equal_load_comparison(trace_path):
    s = simulate(config(trace_path), workers=1, compare=True).summary
    b = s["baseline"]
    assert s["fits_full"] and b["same_batch"]["batch"] == 16
    assert b["same_batch"]["step_ms"] == s["step_ms_full_mean"] and b["batch"] >= 16 and b["fits"]
    assert s["verdict"].startswith("At batch 16 both fit") and "at this equal load" in s["verdict"]
    assert f"{s['step_ms_full_mean']:.1f} ms" in s["verdict"]


def test_full_lowered_until_it_fits(trace_path):
    """On a 24 GB GPU a 7B model leaves ~6 GB of KV: batch 600 does not fit; the baseline batch does."""
    cfg = config(trace_path, hardware=hardware_spec("rtx4090"), batch=600, steps=200)
    s = simulate(cfg, workers=1, compare=True).summary
    b = s["baseline"]
    assert not s["fits_full"] and b["fits"] and b["batch"] < 600
    check = simulate(dataclasses.replace(cfg, strategy="full", batch=b["batch"]), workers=1).summary
    assert check["fits"] and check["hbm_peak_gb"] == pytest.approx(b["hbm_peak_gb"])
    assert "full does not fit" in s["verdict"] and f"batch, {b['batch']} (" in s["verdict"]


def test_weights_that_leave_no_room(trace_path):
    cfg = config(trace_path, model=model_spec("r1-qwen-14b"), hardware=hardware_spec("rtx4090"), strategy="full",
                 batch=4, steps=50)
    s = simulate(cfg, workers=1, compare=True).summary
    b = s["baseline"]
    assert b["batch"] == 0 and not b["fits"] and "leave no room" in b["why"]
    assert "full, which fits no batch" in s["verdict"]
    assert [a["strategy"] for a in s["alternatives"]] == ["prefetch-layer", "evict-only", "cpu-attention"]


def test_relative():
    assert relative(275, 6565) == "96% less than"
    assert relative(150, 100) == "50% more than"
    assert relative(230, 100) == "2.3× as much as"
    assert relative(1000.4, 1000) == "level with"


def test_open_loop_verdict_from_the_numbers():
    m = dict(goodput_share=1.0, tpot_ms_p50=15.0, throughput_tok_s=3973.0)
    serving = {"full": {**m, "max_sustainable_rate_req_s": 1.625},
               "prefetch-layer": {**m, "goodput_share": 0.0, "tpot_ms_p50": 90.3, "max_sustainable_rate_req_s": 0.14},
               "evict-only": {**m, "goodput_share": 1.0, "max_sustainable_rate_req_s": 2.375}}
    v = open_loop_verdict("1 req/s", (2000, 50), serving, "prefetch-layer", "the 90% rule")
    assert v.startswith("At 1 req/s, the share of requests within the SLO (TTFT <= 2000 ms, TPOT <= 50 ms) is: "
                        "full 100% (TPOT p50 15.0 ms, 3,973 tokens/s), prefetch-layer 0% (TPOT p50 90.3 ms")
    assert "full 1.62, prefetch-layer 0.14, evict-only 2.38" in v and "evict-only's, 46% more than full's." in v


def test_cli_prints_and_writes_the_verdict(trace_path, tmp_path):
    out = tmp_path / "s.json"
    args = ["simulate", "--trace", str(trace_path), "--model", "r1-qwen-7b", "--batch", "16", "--gen-tokens", "400",
            "--steps", "300"]
    printed = CliRunner().invoke(cli, args)
    assert printed.exit_code == 0, printed.output
    written = CliRunner().invoke(cli, [*args, "--json", str(out)])
    assert written.exit_code == 0, written.output
    s = json.loads(out.read_text())
    assert NEW_KEYS <= set(s) and "verdict: At batch 16 both fit" in " ".join(printed.output.split())
