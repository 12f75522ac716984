"""advise on the fair comparison: --batch (closed loop at one batch), --rate (open loop at one rate), the
ranking of what fits, the baseline, the "nothing fits" verdict and bad input naming the flag."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from tiersim import api
from tiersim.cli import cli
from tiersim.errors import ConfigError
from tiersim.sim import SimConfig
from tiersim.specs import hardware_spec, model_spec
from tiersim.studies.advise import ADVISE_OPTIONS, advise
from tiersim.traces.default import small_trace_path

TRACE = small_trace_path()
# A 20 GB H200: r1-qwen-7b's 15.2 GB of weights leave a few GB of KV, so batch and rate limits show quickly.
SMALL_GPU = dataclasses.replace(hardware_spec("h200-sxm"), hbm_gb=20.0)
OPEN = dict(duration_s=10.0, prompt_tokens=32, output_tokens=480, slo_tpot_ms=8.0)


def config(**kw) -> SimConfig:
    base = dict(model=model_spec("r1-qwen-7b"), hardware=SMALL_GPU, trace=TRACE, gen_tokens=512, steps=32)
    return SimConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def at_batch():
    calls = []
    a = advise(config(), batch=170, workers=1, progress=lambda done, total: calls.append((done, total)))
    return a, calls


@pytest.fixture(scope="module")
def at_rate():
    return advise(config(), rate=4.0, workers=1, serving=OPEN)


def test_batch_ranks_only_what_fits_against_full_at_its_largest_fitting_batch(at_batch):
    a, calls = at_batch
    assert a.mode == "batch" and a.batch == 170 and [o.strategy for o in a.options] == list(ADVISE_OPTIONS)
    fits = {o.strategy: next(t for t in o.trials if t.batch == 170).fits for o in a.options}
    assert set(a.ranking) == {s for s, ok in fits.items() if ok} and not fits["full"]  # full needs more than 20 GB
    ranked = [a.option(s).throughput_tok_s for s in a.ranking]
    assert ranked == sorted(ranked, reverse=True)
    b = a.baseline
    assert b["strategy"] == "full" and b["fits"] and 0 < b["batch"] < 170 and b["hbm_peak_gb"] <= 20.0
    best = a.option(a.ranking[0])
    assert a.verdict.startswith(f"At batch 170, {len(a.ranking)} of 5 options fit in 20 GB of HBM")
    assert f"the best is {best.strategy}, {best.throughput_tok_s:,.0f} tokens/s" in a.verdict
    assert f"full at its largest fitting batch, {b['batch']} ({b['throughput_tok_s']:,.0f} tokens/s" in a.verdict
    assert calls[0] == (0, 6) and calls[-1] == (6, 6)  # five options and the baseline
    d = a.to_dict()
    assert d["mode"] == "batch" and d["ranking"] == list(a.ranking) and d["baseline"]["batch"] == b["batch"]


def test_rate_serves_every_option_the_same_arrivals_against_full_at_that_rate(at_rate):
    a = at_rate
    assert a.mode == "rate" and a.rate == 4.0 and a.slo == {"ttft_ms": 2000.0, "tpot_ms": 8.0}
    assert [o.strategy for o in a.options] == list(ADVISE_OPTIONS)
    assert all(o.fits for o in a.options) and set(a.ranking) == set(ADVISE_OPTIONS)
    keys = [(a.option(s).goodput_share, a.option(s).max_sustainable_rate_req_s) for s in a.ranking]
    assert keys == sorted(keys, reverse=True)
    full = a.option("full")
    assert a.baseline["strategy"] == "full" and a.baseline["rate"] == 4.0
    assert a.baseline["max_sustainable_rate_req_s"] == full.max_sustainable_rate_req_s > 0
    # prefetch-sync copies the DDR tier before each layer: its TPOT breaks the 8 ms target at this rate.
    assert a.option("prefetch-sync").goodput_share < 0.9 <= full.goodput_share
    assert "At 4 req/s (Poisson, 10 s" in a.verdict and "TPOT <= 8 ms" in a.verdict
    assert f"at most {full.max_sustainable_rate_req_s:.3g} req/s" in a.verdict
    best = a.option(a.ranking[0])
    assert (f"the best of the 5 options that fit is {best.strategy}" in a.verdict or
            (best.strategy == "full" and "full serves best" in a.verdict))
    json.dumps(a.to_dict())


def test_nothing_fits_at_the_batch_says_why():
    a = advise(config(), batch=100_000, workers=1)
    assert a.ranking == () and not any(o.viable for o in a.options)
    assert a.verdict.startswith("At batch 100000 nothing fits: the smallest HBM peak is")
    assert "The baseline is full at its largest fitting batch" in a.verdict and "lower --batch" in a.verdict


def test_nothing_fits_when_the_weights_take_the_gpu():
    cfg = config(model=model_spec("r1-llama-70b"), hardware=hardware_spec("gh200"), gen_tokens=400, steps=8)
    by_batch = advise(cfg, batch=8, workers=1)
    assert by_batch.ranking == () and "nothing fits" in by_batch.verdict
    assert "the weights alone take 141.1 GB of the 96 GB of HBM" in by_batch.verdict
    by_rate = advise(cfg, rate=1.0, workers=1, serving=OPEN)
    assert by_rate.ranking == () and not any(o.fits for o in by_rate.options)
    assert by_rate.verdict.startswith("At 1 req/s nothing fits: the weights alone take 141.1 GB")


def test_without_batch_or_rate_each_option_at_its_best_batch_ranked():
    a = advise(config(gen_tokens=400, steps=16), max_batch=64, workers=1)
    assert a.mode == "best-batch" and a.baseline["strategy"] == "full"
    viable = [o for o in a.options if o.viable]
    assert set(a.ranking) == {o.strategy for o in viable}
    assert [a.option(s).throughput_tok_s for s in a.ranking] == sorted((o.throughput_tok_s for o in viable),
                                                                        reverse=True)


def test_api_takes_batch_rate_and_the_dtypes():
    a = api.advise("r1-qwen-7b", SMALL_GPU, batch=64, trace=TRACE, gen_tokens=512, steps=16, kv_dtype="fp8",
                   weight_dtype="fp8", workers=1)
    assert a.mode == "batch" and a.config["kv_dtype"] == "fp8" and a.config["weight_dtype"] == "fp8"
    fp16 = api.advise("r1-qwen-7b", SMALL_GPU, batch=64, trace=TRACE, gen_tokens=512, steps=16, workers=1)
    assert a.option("full").hbm_peak_gb < fp16.option("full").hbm_peak_gb  # fp8 weights and KV take less
    with pytest.raises(ConfigError) as e:
        api.advise("r1-qwen-7b", batch=8, rate=1.0)
    assert e.value.field == "batch"
    with pytest.raises(ConfigError) as e:
        api.advise("r1-qwen-7b", slo_tpot_ms=20.0)
    assert e.value.field == "slo_tpot_ms" and "add rate" in str(e.value)


@pytest.mark.parametrize("args, message", [
    (["--rate", "0"], "Error: --rate: rate must be a number > 0, got 0.0"),
    (["--rate", "-1"], "Error: --rate: rate must be a number > 0, got -1.0"),
    (["--batch", "0"], "Error: --batch: batch must be an integer >= 1, got 0"),
    (["--batch", "8", "--rate", "1"], "Error: --batch (closed loop) and --rate (open loop) exclude each other"),
    (["--slo-ttft-ms", "500"], "Error: --slo-ttft-ms sets the open loop; add --rate"),
    (["--rate", "1", "--slo-tpot-ms", "0"], "Error: --slo-tpot-ms: slo_tpot_ms must be a number > 0"),
    (["--rate", "1", "--slo-ms", "20"], "Error: --slo-ms: slo_ms bounds the closed loop's p99 step"),
])
def test_bad_input_names_the_flag(args, message):
    r = CliRunner().invoke(cli, ["advise", "--trace", str(TRACE), "--steps", "8", *args])
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith(message), r.output


def test_cli_batch_and_rate_json():
    base = ["advise", "--trace", str(TRACE), "--model", "r1-qwen-7b", "--gen-tokens", "512", "--steps", "16"]
    r = CliRunner().invoke(cli, [*base, "--batch", "32", "--json", "-"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["mode"] == "batch" and d["batch"] == 32 and d["ranking"][0] in ADVISE_OPTIONS
    r = CliRunner().invoke(cli, [*base, "--rate", "2", "--duration", "5", "--output-tokens", "64", "--json", "-"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["mode"] == "rate" and d["slo"] == {"ttft_ms": 2000.0, "tpot_ms": 50.0}
    assert d["config"]["duration_s"] == 5.0 and d["verdict"].startswith("At 2 req/s (Poisson, 5 s")
    printed = CliRunner().invoke(cli, [*base, "--rate", "2", "--duration", "5", "--output-tokens", "64"])
    assert printed.exit_code == 0 and "ranked: the options that fit" in printed.output


def test_search_reports_progress_point_by_point():
    from tiersim.studies.search import search_hbm_ratio

    calls = []
    found = search_hbm_ratio(config(batch=16, steps=16), 50.0, workers=1, progress=lambda d, n: calls.append((d, n)))
    done = [d for d, _ in calls]
    assert done == sorted(done) and calls[-1] == (len(found.frontier), len(found.frontier))
    assert all(d <= n for d, n in calls[:-1]) and calls[0][1] == 8  # β = 1, β = 0 and six halvings to 1/64
