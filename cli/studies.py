"""Commands over many simulations: `advise` (which option serves best), `scaling` (the paper's table, simulated),
`sweep` (a grid on a pool or Dask), `report` (plots and Markdown of a sweep) and `reproduce-prototype` (the
authors' system prototype beside tiersim)."""

from __future__ import annotations

from pathlib import Path

import click

from tiersim.cli.group import cli
from tiersim.cli.options import (
    SIM,
    WEIGHT_DTYPE_BITS,
    WeightBits,
    copy_options,
    deployment_options,
    format_option,
    hardware_option,
    json_option,
    model_option,
    option,
    out_file,
    out_folder,
    policy_options,
    run_options,
    trace_option,
)
from tiersim.cli.output import bar, emit_json, need_extra, new_table, print_table, say, spinner
from tiersim.errors import TiersimError

SCALING = "tiersim.studies.scaling:ScalingConfig"
ADVISE = "tiersim.api:advise"
PROTOTYPE = "tiersim.studies.prototype:reproduce_prototype"


def _csv(values: tuple[str, ...]) -> list[str]:
    """Repeatable, comma-separated option values as one list."""
    return [v.strip() for text in values for v in text.split(",") if v.strip()]


def _csv_ints(option: str, text: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32); anything else names the option and what is accepted."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise TiersimError(f"{option} {text!r} invalid; accepted: comma-separated integers, e.g. 1,8,32") from None
    if not values:
        raise TiersimError(f"{option} is empty; accepted: comma-separated integers, e.g. 1,8,32")
    return values


def _joined(values) -> str:
    """A config's tuple default as the comma-separated text the option takes."""
    return ",".join(str(v) for v in values)


def _weights(text: str) -> tuple[str, ...]:
    """'16,int4,native' -> ('fp16', 'int4', 'native'); anything else names --weight-bits and what is accepted."""
    from tiersim.cli.options import BITS_DTYPE
    from tiersim.studies.scaling import WEIGHT_BITS

    kinds = WeightBits()
    out = []
    for v in _csv((text,)):
        try:
            out.append(BITS_DTYPE[kinds.convert(v, None, None)] if v.isdigit() else v.lower())
        except click.BadParameter:
            out.append(v)
        if out[-1] not in WEIGHT_BITS:
            raise TiersimError(f"--weight-bits {v!r} invalid; accepted: 4, 8, 16, 32 or {', '.join(WEIGHT_BITS)}")
    return tuple(out)


@cli.command()
@model_option(None, multiple=True, aliases=("--model-spec", "--models"), metavar="NAME[,NAME...]",
              help="Models (names or config.json; comma-separated or repeated) [default: r1-qwen-7b,r1-qwen-14b,r1-llama-70b].")
@hardware_option(None, multiple=True, help="Hardware profiles (names or .toml files; comma-separated or repeated) "
                                           "[default: h200-sxm].")
@option("--batches", default_from=SCALING, convert=_joined, metavar="N[,N...]", help="Batch sizes.")
@option("--context", "contexts", default_from=SCALING, convert=_joined, metavar="N[,N...]",
        help="Generated tokens per sequence (the KV length analysed).")
@option("--weight-bits", "--weights", "weights", default_from=SCALING, hidden_opts=("--weights",), metavar="BITS[,...]",
        convert=lambda dtypes: _joined(WEIGHT_DTYPE_BITS.get(d, d) for d in dtypes),
        help="Weight precisions of the grid: 16, 8, 4 (or fp16, bf16, fp32, int8, int4), or native (the checkpoint's "
             "format: fp8 for DeepSeek-R1, mxfp4 experts for gpt-oss).")
@option("--tps", default_from=SCALING, convert=_joined, metavar="N[,N...]",
        help="Tensor-parallel sizes (GPUs per replica); every row is one GPU's share.")
@option("--strategies", default_from=SCALING, convert=_joined, metavar="NAME[,...]",
        help="Strategies to simulate against full.")
@option("--paper/--no-paper", default_from=SCALING,
        help="Add the paper's scenarios (7B and 70B, batch 1 and 8, 2K and 4K tokens, fp16 and int4).")
@option("--steps", type=int, default_from=SCALING, help="Decode steps per simulation (warm start).")
@trace_option
@run_options(SCALING, ("depth", "pinned", "seed", "reserve_frac"))
@policy_options
@json_option
@out_folder("Folder for scaling.json and scaling.csv.")
def scaling(model, hardware, batches, contexts, weights, tps, strategies, paper, steps, trace, depth, pinned, seed,
            reserve_frac, policy, json_out: str | None, out: Path | None) -> None:
    """The paper's scaling analysis with real KV heads, simulated."""
    from tiersim import api

    args = dict(model=_csv(model) or None, hardware=_csv(hardware) or "h200-sxm", policy=policy,
                batches=_csv_ints("--batches", batches), contexts=_csv_ints("--context", contexts), weights=_weights(weights),
                tps=_csv_ints("--tps", tps), strategies=tuple(_csv((strategies,))), paper=paper, steps=steps, trace=trace,
                depth=depth, pinned=pinned, seed=seed, reserve_frac=reserve_frac)
    with bar("scaling: simulated points") as advance:
        rows = api.scaling(**args, progress=advance)
    if out is not None:
        import pandas as pd

        from tiersim.fileio import atomic_path, write_json

        write_json(out / "scaling.json", rows)
        with atomic_path(out / "scaling.csv") as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6g")
    if emit_json(json_out, rows):
        return
    print_scaling(rows, policy, steps, tuple(_csv((strategies,))))
    if out is not None:
        say(f"wrote {out}/scaling.json, scaling.csv")


def print_scaling(rows: list[dict], policy, steps: int, strategies: tuple[str, ...]) -> None:
    """The scaling table: capacity at the end of the chain, then simulated overhead per strategy."""
    short = {"evict-only": "evict", "prefetch-sync": "sync", "prefetch-layer": "layer", "cpu-attention": "cpu-attn"}
    t = new_table(f"KV cache per GPU at the end of the chain (real KV heads vs the paper's formula), β={policy.hbm_ratio} "
                  f"r={policy.evict_ratio}; overhead vs full simulated over {steps} steps of steady batching; tp: "
                  f"GPUs per replica, every size one GPU's; * = the paper's scenario",
                  ("model", "hardware", "tp", "batch", "tokens", "weights", "KV GB (paper formula)", "weights GB", "KV/HBM",
                   "saved GB", "fits full/tiered", "DDR GB/step (link ms)", "full ms/step",
                   *(f"{short[s]} %" for s in strategies)), left=("model", "hardware", "weights"))
    t.columns[0].no_wrap = True
    yn = lambda v: "yes" if v else "NO"  # noqa: E731
    for r in rows:
        t.add_row(r["model"] + ("*" if r["paper_scenario"] else ""), r["hardware"], str(r.get("tp", 1)), str(r["batch"]),
                  str(r["context"]),
                  r["weights_dtype"], f"{r['kv_gb']:.2f} ({r['kv_gb_paper_formula']:.2f})", f"{r['weights_gb']:.1f}",
                  f"{100 * r['kv_share_hbm']:.1f}%", f"{r['hbm_saved_gb']:.2f}", f"{yn(r['fits_full'])}/{yn(r['fits_tiered'])}",
                  f"{r['ddr_gb_per_step']:.3f} ({r['ddr_link_ms_per_step']:.1f})", f"{r['step_ms_full']:.2f}",
                  *(f"{r[f'overhead_pct_{s}']:.1f}" for s in strategies))
    print_table(t)


def _length(ctx: click.Context, param: click.Parameter, value):
    """A token count as an int; a preset, file or 'trace' as given."""
    return int(value) if value is not None and value.strip().isdigit() else value


SERVE = "tiersim.sim.serve_run:ServeConfig"
# advise's open-loop options: given only with --rate (their defaults are ServeConfig's, so only a typed one is passed).
ADVISE_SERVING = ("slo_ttft_ms", "slo_tpot_ms", "prompt_tokens", "output_tokens", "duration_s", "max_num_seqs",
                  "max_num_batched_tokens", "preemption")


@cli.command()
@model_option(ADVISE, help="Model to serve.")
@hardware_option(ADVISE)
@run_options(SIM, ("gen_tokens",))
@click.option("--batch", type=int, default=None,
              help="Closed loop: every option at this batch, against full at its largest fitting batch "
                   "[default: each option at its throughput-best batch].")
@click.option("--rate", type=float, default=None,
              help="Open loop: every option serves the same Poisson arrivals at this many requests/s, against full "
                   "at the same rate, with each one's maximum sustainable rate under the SLO.")
@click.option("--slo-ms", type=float, default=None,
              help="Closed loop: bound on the p99 decode step time (ms per output token).")
@option("--slo-ttft-ms", type=float, default_from=SERVE, help="Open loop (--rate): SLO on the time to first token, ms.")
@option("--slo-tpot-ms", type=float, default_from=SERVE, help="Open loop (--rate): SLO on the time per output token, ms.")
@option("--prompt-tokens", default=None, show_default=False, callback=_length, metavar="N|PRESET|FILE|trace",
        help="Open loop: prompt lengths, a count, gsm8k/math500/aime or a file [default: the trace's prompts].")
@option("--output-tokens", default=None, show_default=False, callback=_length, metavar="N|PRESET|FILE|trace",
        help="Open loop: output lengths, a count, gsm8k/math500/aime, a file or trace [default: --gen-tokens].")
@option("--duration", "duration_s", type=float, default=None, show_default=False, metavar="SECONDS",
        help="Open loop: seconds of arrivals [default: 300 s or twice a median request's decode at the TPOT target].")
@option("--max-num-seqs", type=int, default_from=SERVE, help="Open loop, vLLM: most sequences running at once.")
@option("--max-num-batched-tokens", type=int, default_from=SERVE, help="Open loop, vLLM: token budget of one step.")
@option("--preemption", default_from=SERVE, metavar="recompute|swap", help="Open loop: when KV blocks run out.")
@option("--steps", type=int, default_from=ADVISE, help="Decode steps per simulation (warm start).")
@option("--max-batch", type=int, default_from=ADVISE, help="Largest batch tried (without --batch or --rate).")
@run_options(SIM, ("depth",))
@trace_option
@run_options(SIM, ("pinned", "seed", "reserve_frac"))
@deployment_options(SIM)
@copy_options(SIM)
@policy_options
@json_option
def advise(batch: int | None, rate: float | None, slo_ms: float | None, max_batch: int, policy, json_out: str | None,
           **fields) -> None:
    """Which strategy serves best (full, tiered, evict-only): at one --batch, at one --rate, or each at its best batch.

    Only options that fit are ranked; the verdict states the baseline (full at its largest fitting batch, or
    full at the same rate) and says so when nothing fits.
    """
    from tiersim import api

    ctx = click.get_current_context()
    typed = [k for k in ADVISE_SERVING if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE]
    serving = {k: fields.pop(k) for k in ADVISE_SERVING}
    if rate is None and typed:
        flag = next(p.opts[0] for p in ctx.command.params if p.name == typed[0])
        raise TiersimError(f"{flag} sets the open loop; add --rate")
    if batch is not None and rate is not None:
        raise TiersimError("--batch (closed loop) and --rate (open loop) exclude each other; give one")
    serving = {k: v for k, v in serving.items() if v is not None} if rate is not None else {}
    api.sim_config(policy=policy, **fields)  # every input checked before the bar starts
    what = (f"{rate:g} req/s, every option and its sustainable rate" if rate is not None else
            f"batch {batch}, every option" if batch is not None else "each option at its throughput-best batch")
    with bar(f"advise: {what}") as advance:
        a = api.advise(batch=batch, rate=rate, slo_ms=slo_ms, max_batch=max_batch, policy=policy, progress=advance,
                       **fields, **serving)
    if emit_json(json_out, a.to_dict()):
        return
    print_advice(a)
    say(a.verdict)


def print_advice(a) -> None:
    """The advise table of the mode run: options at their best batch, at one batch, or at one rate."""
    rank = {s: i + 1 for i, s in enumerate(a.ranking)}
    if a.mode == "rate":
        t = new_table(f"{a.model} on {a.hardware}, {a.rate:g} req/s; SLO TTFT <= {a.slo['ttft_ms']:g} ms, TPOT <= "
                      f"{a.slo['tpot_ms']:g} ms; ranked: the options that fit", ("rank", "option", "within SLO %",
                      "TTFT p50 ms", "TPOT p50 / p99 ms", "tokens/s", "max rate req/s", "HBM KV pool GB"),
                      left=("option",))
        for o in a.options:
            num = lambda v, f="{:.1f}": "—" if v is None else f.format(v)  # noqa: E731
            t.add_row(str(rank.get(o.strategy, "—" if o.fits else "does not fit")), o.strategy,
                      num(None if o.goodput_share is None else 100 * o.goodput_share, "{:.0f}"), num(o.ttft_ms_p50),
                      f"{num(o.tpot_ms_p50)} / {num(o.tpot_ms_p99)}", f"{o.throughput_tok_s:,.0f}",
                      num(o.max_sustainable_rate_req_s, "{:.3g}"), f"{o.kv_hbm_gb:.1f}")
        print_table(t)
        return
    slo = f", p99 step ≤ {a.slo_ms:g} ms" if a.slo_ms is not None else ""
    title = (f"{a.model} on {a.hardware}, {a.gen_tokens}-token chains, every option at batch {a.batch}{slo}"
             if a.mode == "batch" else
             f"{a.model} on {a.hardware}, {a.gen_tokens}-token chains, each option at its throughput-best batch{slo}")
    t = new_table(title + "; ranked: the options that fit", ("rank", "option", "batch", "largest fitting (est.)",
                  "tokens/s", "step ms mean / p99", f"HBM GB (of {a.hbm_capacity_gb:g})", "attention mass lost"),
                  left=("option",))
    for o in a.options:
        if not o.viable:
            tried = next((x for x in o.trials if x.batch == a.batch), None) if a.mode == "batch" else None
            peak = f"{tried.hbm_peak_gb:.1f}" if tried is not None else "—"
            t.add_row("does not fit" if tried is None or not tried.fits else "over SLO", o.strategy, "—",
                      str(o.max_batch_estimate), "—", "—", peak, "—")
            continue
        t.add_row(str(rank.get(o.strategy, "—")), o.strategy, str(o.batch), str(o.max_batch_estimate),
                  f"{o.throughput_tok_s:,.0f}", f"{o.step_ms_mean:.2f} / {o.step_ms_p99:.2f}", f"{o.hbm_peak_gb:.1f}",
                  f"{100 * o.attention_mass_lost:.2f}%")
    print_table(t)
    if (b := a.baseline) is not None and a.mode == "batch":
        say(f"baseline: {b['why']}")


@cli.command()
@click.option("--grid", "grid_path", type=click.Path(dir_okay=False, path_type=Path), required=True, metavar="GRID.toml",
              help="Simulate options (dashes or underscores), each a list of values; relative paths start at the grid.")
@click.option("--engine", type=click.Choice(["local", "dask"]), default="local", show_default=True,
              help="local: a process pool; dask: a Dask scheduler, or a LocalCluster on loopback.")
@click.option("--scheduler", default=None, metavar="tcp://HOST:PORT", help="Dask scheduler to submit to (--engine dask).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes of the local pool or LocalCluster [default: one per core].")
@out_file("Results: one row per point (written atomically at the end; finished points kept as they come).", required=True,
          metavar="RESULTS.parquet")
@click.option("--resume", is_flag=True, help="Skip points already done in RESULTS (or left by an interrupted sweep).")
@json_option
def sweep(grid_path: Path, engine: str, scheduler: str | None, workers: int | None, out: Path, resume: bool,
          json_out: str | None) -> None:
    """Run a grid of simulations on a process pool or Dask."""
    import sys

    from tiersim import api

    if engine == "dask":
        need_extra("sweep --engine dask", "dist")
    try:
        stats = api.sweep(grid_path, out, engine=engine, workers=workers, scheduler=scheduler, resume=resume,
                          progress=sys.stderr.isatty())
    except KeyboardInterrupt:
        from tiersim.studies.sweep import partial_dir

        folder = partial_dir(out)
        kept = len(list(folder.glob("*.parquet"))) if folder.is_dir() else 0
        raise click.ClickException(f"interrupted: {out} untouched; {kept} finished points kept in {folder}, "
                                   f"rerun with --resume") from None
    if emit_json(json_out, {"grid": str(grid_path), "out": str(out), "engine": engine, **stats.to_dict()}):
        return
    t = new_table(f"{grid_path.name}: {stats.points} points on {engine}",
                  ("points", "skipped (done)", "simulated", "failed", "rows in results", "wall s", "points/s"))
    t.add_row(str(stats.points), str(stats.skipped), str(stats.ran), str(stats.failed), str(stats.rows),
              f"{stats.wall_s:.1f}", f"{stats.points_per_s:.2f}")
    print_table(t)
    for error in stats.errors:
        say(f"failed: {error}")
    say(f"wrote {out}")


@cli.command()
@click.argument("results", type=click.Path(dir_okay=False, path_type=Path), metavar="RESULTS.parquet")
@out_folder("Folder for pareto, overhead_vs_batch and hbm_occupancy plots and report.md.", required=True, check=False)
@format_option
@click.option("--overhead-budget", "budget_pct", type=float, default=5.0, show_default=True, metavar="PCT",
              help="report.md lists the largest HBM saving within this overhead per batch.")
def report(results: Path, out: Path, formats: tuple[str, ...], budget_pct: float) -> None:
    """Plots and a Markdown summary of a sweep's results."""
    from tiersim.cli.options import writable
    from tiersim.studies.report import load_ok_rows, write_report

    load_ok_rows(results)  # a bad results file is the more useful message, so it is refused before --out
    writable("--out", out, folder=True)
    with spinner(f"report of {results.name}"):
        paths = write_report(results, out, budget_pct, formats=formats)
    say(f"wrote {', '.join(str(p) for p in paths)}")


@cli.command("reproduce-prototype")
@option("--gen-tokens", type=int, default_from=PROTOTYPE,
        help="Generated tokens per chain (GSM8K: ~2.5K for R1-Distill-Qwen-7B, DESIGN.md §4).")
@option("--requests", type=int, default_from=PROTOTYPE, help="Chains served one after another at batch 1.")
@option("--compute-ms", type=float, default_from=PROTOTYPE,
        help="Compute per decode step, ms: the paper's measured forward (one run uses tiersim's roofline instead).")
@trace_option
@option("--hbm-ratio", type=float, default_from=PROTOTYPE, help="β: share of the GPU-resident candidates kept on the GPU.")
@option("--evict-ratio", type=float, default_from=PROTOTYPE, help="r: share of the GPU-resident candidates evicted.")
@json_option
def reproduce_prototype(gen_tokens: int, requests: int, compute_ms: float, trace: Path | None, hbm_ratio: float,
                        evict_ratio: float, json_out: str | None) -> None:
    """Reproduce the authors' system prototype: the paper's figures beside tiersim's.

    R1-Distill-Qwen-7B in int8 at batch 1 on an RTX 5080, re-tiering only GPU-resident tokens (--eviction
    prototype) and copying every DDR token back from pageable memory before each forward pass; run with compute
    pinned to the paper's, with tiersim's roofline, and on chains whose DDR tier matches the paper's load.
    """
    import dataclasses

    from tiersim import api

    with spinner(f"the prototype's run on {gen_tokens}-token chains: compute pinned, roofline, and at the paper's load"):
        rep = api.reproduce_prototype(gen_tokens, requests, compute_ms, trace, hbm_ratio, evict_ratio)
    figures = [{**dataclasses.asdict(f), "paper": f.paper} for f in rep.figures]
    if emit_json(json_out, {"titles": rep.titles(), "rows": rep.rows(), "figures": figures, "gen_tokens": rep.gen_tokens,
                            "matched_gen_tokens": rep.matched_gen_tokens, "compute_ms": rep.compute_ms,
                            "summary": rep.summary, "summary_roofline": rep.summary_roofline,
                            "summary_matched": rep.summary_matched}):
        return
    # The third run exists only when the chains grew a DDR tier as large as the paper's.
    keep = len(rep.titles()) - (rep.matched_gen_tokens is None)
    t = new_table(f"the authors' system prototype (β={hbm_ratio:g}, r={evict_ratio:g}, {requests} chain"
                  f"{'s' if requests > 1 else ''} at batch 1): paper beside tiersim", rep.titles()[:keep],
                  left=("figure",))
    for row in rep.rows():
        t.add_row(*row[:keep])
    print_table(t)
    if rep.matched_gen_tokens is None:
        say(f"no run at the paper's DDR load: {gen_tokens}-token chains never average "
            f"{rep.figure('DDR tokens per step').paper} DDR tokens per step; a larger --gen-tokens reaches it")
    say("why they differ: the docstring of tiersim/studies/prototype.py (DDR tier size, roofline vs measured compute, "
        "device copies not modelled)")
