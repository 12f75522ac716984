"""`simulate`: one configuration, its fair baseline and a verdict; the β search (--target-overhead); or the open
loop (--rate, --arrivals, --rates), every strategy serving the same arrivals."""

from __future__ import annotations

from pathlib import Path

import click

from tiersim.cli.group import cli
from tiersim.cli.options import (
    SIM,
    ConfigOption,
    copy_options,
    deployment_options,
    format_option,
    hardware_option,
    json_option,
    model_option,
    option,
    out_folder,
    policy_options,
    run_options,
    stack,
    trace_option,
    weight_bits_option,
)
from tiersim.cli.output import bar, emit_json, new_table, print_table, say, spinner
from tiersim.errors import TiersimError


def simulate_options(f):
    """The simulator's inputs besides the policy, with SimConfig's defaults."""
    return stack(
        trace_option, model_option(), hardware_option(),
        run_options(SIM, ("batch", "strategy", "depth", "gen_tokens", "steps", "cold_start", "pinned", "seed",
                          "reserve_frac")),
        option("--fixed-compute-ms", type=float, default_from=SIM,
               help="Replace the compute model by a fixed time per decode step (e.g. a measured one)."),
        weight_bits_option(), deployment_options(SIM), copy_options(SIM),
    )(f)


SERVE = "tiersim.sim.serve_run:ServeConfig"
# The open loop's inputs (ServeConfig's fields); without --rate, --arrivals or --rates none of them may be given.
SERVING_FIELDS = ("rate", "arrivals", "rates", "prompt_tokens", "output_tokens", "duration_s", "max_num_seqs",
                  "max_num_batched_tokens", "preemption", "slo_ttft_ms", "slo_tpot_ms")


class ServeOption(ConfigOption):
    """An open-loop option: --help shows ServeConfig's default, parsing leaves it None (ServeConfig fills it in).

    Reading the default while parsing would import sim/serve_run.py, and pandas with it, on every closed-loop
    `tiersim simulate`; simulate_open_loop drops the Nones, so the open loop gets the same defaults.
    """

    def get_default(self, ctx: click.Context, call: bool = True):
        return super().get_default(ctx, call) if not call or ctx.resilient_parsing else None


def serve_option(*decls, **kw):
    """An open-loop option with ServeConfig's default, read only for --help."""
    return click.option(*decls, cls=ServeOption, default_from=SERVE, show_default=True, **kw)


def _length(ctx: click.Context, param: click.Parameter, value):
    """A token count as an int; a preset, file or 'trace' as given."""
    return int(value) if value is not None and value.strip().isdigit() else value


def serving_options(f):
    """The open loop: arrivals, request lengths, vLLM's scheduler knobs and the SLO (ServeConfig's defaults)."""
    return stack(
        option("--rate", type=float, default=None, show_default=False,
               help="Open loop: Poisson arrivals at this many requests/s; every strategy serves the same ones."),
        option("--arrivals", type=click.Path(dir_okay=False, path_type=Path), default=None, show_default=False,
               help="Open loop: a CSV or JSONL file with columns arrival_s, prompt_tokens, output_tokens."),
        option("--rates", default=None, show_default=False, metavar="R1,R2,...",
               help="Open loop: serve every strategy at each rate (req/s) and draw the throughput-latency curve."),
        option("--prompt-tokens", default=None, show_default=False, callback=_length, metavar="N|PRESET|FILE|trace",
               help="Prompt lengths: a count, gsm8k/math500/aime, a file of lengths [default: the trace's prompts]."),
        option("--output-tokens", default=None, show_default=False, callback=_length, metavar="N|PRESET|FILE|trace",
               help="Output lengths: a count, gsm8k/math500/aime, a file, or trace (the trace requests' own) "
                    "[default: --gen-tokens]."),
        option("--duration", "duration_s", type=float, default=None, show_default=False, metavar="SECONDS",
               help="Seconds served [default: 300 s or twice a median request's decode at the TPOT target, the "
                    "longer; an arrivals file: until every request finished]."),
        serve_option("--max-num-seqs", type=int, help="vLLM: most sequences running at once."),
        serve_option("--max-num-batched-tokens", type=int,
                     help="vLLM: token budget of one step (decodes and prefill chunks)."),
        serve_option("--preemption", metavar="recompute|swap",  # checked by ServeConfig
                     help="When KV blocks run out: recompute (vLLM v1) or swap to host (vLLM v0)."),
        serve_option("--slo-ttft-ms", type=float, help="SLO: time to first token, ms."),
        serve_option("--slo-tpot-ms", type=float, help="SLO: time per output token, ms."),
    )(f)


@cli.command()
@simulate_options
@policy_options
@serving_options
@json_option
@out_folder("Folder for summary.json, steps.csv and the plots (open loop: requests.csv, steps.csv, the curve).")
@format_option
@click.option("--target-overhead", type=float, default=None, metavar="PCT",
              help="Search β for the largest HBM saving whose overhead stays within PCT %; print the frontier.")
@click.option("--search-strategy", is_flag=True,
              help="With --target-overhead: also search the strategy (prefetch-layer depth 1/2/4, prefetch-sync, cpu-attention).")
def simulate(policy, json_out: str | None, out: Path | None, formats: tuple[str, ...], target_overhead: float | None,
             search_strategy: bool, **fields) -> None:
    """Project HBM saved and decode slowdown at a batch size, against full at the batch that fits; or serve
    arrivals (--rate, --arrivals, --rates) with every strategy."""
    from tiersim import api
    from tiersim.sim import simulate as run

    serving = {k: fields.pop(k) for k in SERVING_FIELDS}
    cfg = api.sim_config(policy=policy, **fields)  # every input checked before any work
    if any(serving[k] is not None for k in ("rate", "arrivals", "rates")):
        if target_overhead is not None:
            raise TiersimError("--target-overhead searches the closed loop; leave out --rate, --arrivals and --rates")
        return simulate_open_loop(cfg, serving, json_out, out, formats)
    ctx = click.get_current_context()
    given = [k for k in SERVING_FIELDS if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE]
    if given:
        flag = next(p.opts[0] for p in ctx.command.params if p.name == given[0])
        raise TiersimError(f"{flag} sets the open loop; add --rate, --arrivals or --rates")
    if target_overhead is not None:
        return simulate_search(cfg, target_overhead, search_strategy, json_out, out, formats)
    if search_strategy:
        raise TiersimError("--search-strategy needs --target-overhead PCT")
    with spinner(f"simulating {cfg.model.name} on {cfg.hardware.name}, batch {cfg.batch}, and its fair baseline"):
        result = run(cfg, compare=True)
    paths = write_simulation(result, out, formats) if out is not None else []
    if emit_json(json_out, result.summary):
        return
    print_simulation(result.summary)
    if paths:
        say(f"wrote {out}/{', '.join(p.name for p in paths)}")


def write_simulation(result, out: Path, formats: tuple[str, ...] = ("png",)) -> list[Path]:
    """summary.json, steps.csv and the plots of one simulation, each written atomically."""
    from tiersim.fileio import atomic_path, write_json
    from tiersim.studies.plots import write_plots

    write_json(out / "summary.json", result.summary)
    with atomic_path(out / "steps.csv") as tmp:
        result.steps.to_csv(tmp, index=False, float_format="%.6g")
    return [out / "summary.json", out / "steps.csv", *write_plots(result, out, formats=formats)]


def print_simulation(s: dict) -> None:
    """The simulate table: memory, time, transfer, attention."""
    c = s["config"]
    t = new_table(f"{c['model']['name']} on {c['hardware']['name']} ({c['hardware']['link']}), batch {c['batch']}, "
                  f"{c['strategy']}, β={c['policy']['hbm_ratio']} r={c['policy']['evict_ratio']}, {c['gen_tokens']} tokens",
                  ("quantity", "tiered", "full (no tiering)"), left=("quantity",))
    cap = s["hbm_capacity_gb"]
    t.add_row("HBM peak (GB)", f"{s['hbm_peak_gb']:.1f} of {cap:g}", f"{s['hbm_peak_gb_full']:.1f} of {cap:g}")
    t.add_row("fits / largest batch that fits", f"{'yes' if s['fits'] else 'NO'} / {s['max_batch']}",
              f"{'yes' if s['fits_full'] else 'NO'} / {s['max_batch_full']}")
    t.add_row("HBM saved (GB): offload + evict",
              f"{s['hbm_saved_gb']:.1f} ({s['hbm_saved_offload_gb']:.1f} + {s['hbm_saved_evict_gb']:.1f})", "")
    t.add_row("host DDR peak (GB)", f"{s['ddr_peak_gb']:.1f}", "0")
    t.add_row("step ms mean / p50 / p99", f"{s['step_ms_mean']:.2f} / {s['step_ms_p50']:.2f} / {s['step_ms_p99']:.2f}",
              f"{s['step_ms_full_mean']:.2f}")
    t.add_row("  compute / exposed / hidden transfer ms",
              f"{s['compute_ms_mean']:.2f} / {s['stall_ms_mean']:.2f} / {s['hidden_transfer_ms_mean']:.2f}", "")
    t.add_row("  analytic lower bound ms", f"{s['bound_step_ms']:.2f}", "")
    t.add_row("overhead vs full (%)", f"{s['overhead_pct']:.2f}", "")
    t.add_row("transfer share, paper's definition (%)", f"{s['transfer_overhead_pct_paper']:.2f}", "")
    t.add_row("throughput (tokens/s)", f"{s['throughput_tok_s']:,.0f}", f"{s['throughput_tok_s_full']:,.0f}")
    if (b := s.get("baseline")) is not None:  # the fair comparison (sim/verdict.py)
        t.add_row("fair baseline: full at its largest fitting batch", "",
                  f"batch {b['batch']}: {b['step_ms']:.2f} ms, {b['throughput_tok_s']:,.0f} tok/s" if b["fits"]
                  else "no batch fits")
    if (m := s.get("at_max_batch")) is not None:
        t.add_row(f"at its largest fitting batch ({m['steps']}-step run)",
                  f"batch {m['batch']}: {m['step_ms']:.2f} ms, {m['throughput_tok_s']:,.0f} tok/s", "")
    t.add_row("H2D / D2H GB per step", f"{s['h2d_gb_per_step']:.3f} / {s['d2h_gb_per_step']:.4f}", "0 / 0")
    t.add_row("H2D / D2H link busy (%)", f"{100 * s['link_util_h2d']:.1f} / {100 * s['link_util_d2h']:.1f}", "")
    t.add_row("copy method", f"{s['copy_method']}" + (" (auto)" if c.get("copy_method") == "auto" else ""), "")
    if estimates := s.get("copy_method_estimates_ms"):  # auto: each candidate's mean estimated step
        t.add_row("  auto's estimates, step ms", " · ".join(f"{k} {v:.2f}" for k, v in estimates.items()), "")
    t.add_row("H2D pieces per step × bytes per piece", f"{s['h2d_pieces_per_step']:,.0f} × {s['h2d_piece_bytes']:,.0f}", "")
    t.add_row("interference: compute slowed by the copy (ms/step)", f"{s['interference_ms_mean']:.3f}", "")
    t.add_row("DDR tokens per sequence per step", f"{s['ddr_tokens_per_slot_step']:.0f}", "")
    t.add_row("attention mass on DDR / lost to eviction (%)",
              f"{100 * s['attention_mass_ddr']:.2f} / {100 * s['attention_mass_evicted']:.3f}", "0 / 0")
    t.add_row(f"tokens from trace ({s['trace_model']}) / synthetic extension",
              f"{s['tokens_captured']:,} / {s['tokens_synthetic']:,} ({100 * s['synthetic_share']:.0f}% synthetic)", "")
    t.add_row("simulated in", f"{s['sim_wall_s']:.2f} s, {s['sim_events']:,} events", "")
    print_table(t)
    say(f"step time {s['step_ms_mean']:.4g} ms" + (f" ± {s['error_bar_pct']:.0f}% (validated on {s['validated_on']})"
        if s.get("error_bar_pct") is not None else " (unvalidated: datasheet profile)"))
    if s.get("verdict"):
        say(f"verdict: {s['verdict']}")


def simulate_search(cfg, target_overhead: float, search_strategy: bool, json_out: str | None, out: Path | None,
                    formats: tuple[str, ...]) -> None:
    """simulate --target-overhead: the β search, its frontier, and the chosen configuration's outputs."""
    import dataclasses

    from tiersim import api
    from tiersim.fileio import write_json

    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ("model", "hardware", "policy")}
    with bar(f"searching β for overhead ≤ {target_overhead:g}%: points") as advance:
        found = api.search(target_overhead, cfg.model, cfg.hardware, search_strategy=search_strategy, policy=cfg.policy,
                           progress=advance, **fields)
    if found.result is not None and found.chosen is not None:  # the chosen configuration states its baseline too
        from tiersim.sim.verdict import comparison

        p = found.chosen
        chosen = dataclasses.replace(cfg, strategy=p.strategy, depth=p.depth or cfg.depth,
                                     policy=dataclasses.replace(cfg.policy, hbm_ratio=p.hbm_ratio))
        with spinner("simulating the chosen configuration's fair baseline"):
            found.result.summary.update(comparison(chosen, found.result.summary))
    if out is not None:
        if found.result is not None:
            write_simulation(found.result, out, formats)
        write_json(out / "frontier.json", found.to_dict())
    if emit_json(json_out, found.to_dict()):
        return
    t = new_table(f"β frontier walked (target overhead {found.target_overhead_pct:g}%), in walk order",
                  ("strategy", "depth", "β", "HBM saved GB", "HBM peak GB", "overhead %", "step ms", "fits", "within"),
                  left=("strategy",))
    for p in found.frontier:
        t.add_row(p.strategy, "—" if p.depth is None else str(p.depth), f"{p.hbm_ratio:g}", f"{p.hbm_saved_gb:.2f}",
                  f"{p.hbm_peak_gb:.1f}", f"{p.overhead_pct:.2f}", f"{p.step_ms_mean:.2f}", "yes" if p.fits else "NO",
                  "yes" if p.within_target else "no", style="bold green" if p is found.chosen else None)
    print_table(t)
    say(("chosen: " if found.chosen else "") + found.message)
    if found.result is not None:
        print_simulation(found.result.summary)
    if out is not None:
        files = "summary.json, steps.csv, plots and " if found.result is not None else ""
        say(f"wrote {files}{out}/frontier.json")


def simulate_open_loop(cfg, serving: dict, json_out: str | None, out: Path | None, formats: tuple[str, ...]) -> None:
    """simulate --rate/--arrivals/--rates: every strategy serves the same arrivals; summary, records, the curve."""
    from tiersim.sim.serve_run import ServeConfig, rate_sweep, simulate_serving

    ctx = click.get_current_context()
    chosen = ctx.get_parameter_source("strategy") == click.core.ParameterSource.COMMANDLINE
    scfg = ServeConfig.from_sim(cfg, strategies=(cfg.strategy,) if chosen else (),
                                **{k: v for k, v in serving.items() if v is not None})
    if out is not None:
        from tiersim.traces.figure_files import check_formats

        check_formats(formats)  # refused before any work
    run = sweep = None
    served = ", ".join(scfg.served)
    if scfg.rate is not None or scfg.arrivals is not None:
        with spinner(f"serving {served} on {cfg.model.name}, {cfg.hardware.name}, and their sustainable rates"):
            run = simulate_serving(scfg)
    if scfg.rates:
        with spinner(f"serving {served} at {len(scfg.rates)} rates"):
            sweep = rate_sweep(scfg)
    summary = run.summary if run is not None else sweep.summary
    if run is not None and sweep is not None:
        summary["sweep"] = sweep.summary["sweep"]
    paths = write_serving(summary, run, sweep, out, formats) if out is not None else []
    if emit_json(json_out, summary):
        return
    print_serving(summary, sweep)
    if paths:
        say(f"wrote {out}/{', '.join(p.name for p in paths)}")


def write_serving(summary: dict, run, sweep, out: Path, formats: tuple[str, ...]) -> list[Path]:
    """summary.json, requests.csv and steps.csv (every strategy), and with a sweep sweep.csv and the curve."""
    from tiersim.fileio import atomic_path, write_json

    write_json(out / "summary.json", summary)
    paths = [out / "summary.json"]
    tables = {"requests.csv": run.table("requests"), "steps.csv": run.table("steps")} if run is not None else {}
    if sweep is not None:
        tables["sweep.csv"] = sweep.sweep
    for name, frame in tables.items():
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")
        paths.append(out / name)
    if sweep is not None and len(sweep.sweep):
        from tiersim.studies.serving_plots import plot_serving_curve

        paths += plot_serving_curve(sweep.sweep, summary, out / "serving_curve.png", formats=formats)
    return paths


def _ms(value) -> str:
    return "—" if value is None else f"{value:,.1f}"


def print_serving(s: dict, sweep) -> None:
    """The open-loop table (one row per strategy at the load served, or per strategy and rate) and the verdict."""
    c = s["config"]
    title = (f"{c['model']['name']} on {c['hardware']['name']}, {s['load']}; SLO TTFT <= {s['slo_ttft_ms']:g} ms, "
             f"TPOT <= {s['slo_tpot_ms']:g} ms")
    columns = ("strategy", "within SLO %", "TTFT p50/p99 ms", "TPOT p50/p99 ms", "latency p50/p99 s", "tokens/s",
               "req/s", "preempt", "queue", "running", "HBM / DDR KV peak GB", "max rate req/s")
    t = new_table(title, columns, left=("strategy",))
    for name, m in s["serving"].items():
        share = "—" if m.get("goodput_share") is None else f"{100 * m['goodput_share']:.0f}"
        latency = [None if m.get(k) is None else m[k] / 1e3 for k in ("latency_ms_p50", "latency_ms_p99")]
        rate = m.get("max_sustainable_rate_req_s")
        t.add_row(name, share, f"{_ms(m.get('ttft_ms_p50'))} / {_ms(m.get('ttft_ms_p99'))}",
                  f"{_ms(m.get('tpot_ms_p50'))} / {_ms(m.get('tpot_ms_p99'))}", f"{_ms(latency[0])} / {_ms(latency[1])}",
                  f"{m.get('throughput_tok_s', 0):,.0f}", f"{m.get('throughput_req_s', 0):.3g}",
                  f"{m.get('preemptions', 0):,}", f"{m.get('mean_queue', 0):.1f}", f"{m.get('mean_concurrency', 0):.1f}",
                  f"{m.get('hbm_kv_gb_peak', 0):.1f} / {m.get('ddr_kv_gb_peak', 0):.1f}",
                  "—" if rate is None else f"{rate:.3g}")
    print_table(t)
    if sweep is not None and len(sweep.sweep):
        t = new_table("rate sweep (the curve)", ("strategy", "rate req/s", "within SLO %", "TTFT p90 ms", "TPOT p50 ms",
                                                 "tokens/s"), left=("strategy",))
        for row in sweep.sweep.to_dict("records"):
            share = row.get("goodput_share")
            t.add_row(row["strategy"], f"{row['rate_req_s']:g}",
                      "—" if share is None or share != share else f"{100 * share:.0f}",
                      _ms(_number(row.get("ttft_ms_p90"))), _ms(_number(row.get("tpot_ms_p50"))),
                      f"{row['throughput_tok_s']:,.0f}")
        print_table(t)
    say(f"verdict: {s['verdict']}")


def _number(value):
    """None for a missing or NaN value (pandas turns None into NaN)."""
    return None if value is None or value != value else value
