"""`simulate`: one configuration and its `full` baseline, or (with --target-overhead) the β search around it."""

from __future__ import annotations

from pathlib import Path

import click

from tiersim.cli.group import cli
from tiersim.cli.options import (
    SIM,
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
from tiersim.cli.output import emit_json, new_table, print_table, say, spinner
from tiersim.errors import TiersimError


def simulate_options(f):
    """The simulator's inputs besides the policy, with SimConfig's defaults."""
    return stack(
        trace_option, model_option(), hardware_option(),
        run_options(SIM, ("batch", "strategy", "depth", "gen_tokens", "steps", "cold_start", "pinned", "seed",
                          "reserve_frac")),
        option("--fixed-compute-ms", type=float, default_from=SIM,
               help="Replace the compute model by a fixed time per decode step (e.g. a measured one)."),
        weight_bits_option(),
    )(f)


@cli.command()
@simulate_options
@policy_options
@json_option
@out_folder("Folder for summary.json, steps.csv and the plots.")
@format_option
@click.option("--target-overhead", type=float, default=None, metavar="PCT",
              help="Search β for the largest HBM saving whose overhead stays within PCT %; print the frontier.")
@click.option("--search-strategy", is_flag=True,
              help="With --target-overhead: also search the strategy (prefetch-layer depth 1/2/4, prefetch-sync, cpu-attention).")
def simulate(policy, json_out: str | None, out: Path | None, formats: tuple[str, ...], target_overhead: float | None,
             search_strategy: bool, **fields) -> None:
    """Project HBM saved and decode slowdown at a batch size."""
    from tiersim import api

    cfg = api.sim_config(policy=policy, **fields)  # every input checked before any work
    if target_overhead is not None:
        return simulate_search(cfg, target_overhead, search_strategy, json_out, out, formats)
    if search_strategy:
        raise TiersimError("--search-strategy needs --target-overhead PCT")
    with spinner(f"simulating {cfg.model.name} on {cfg.hardware.name}, batch {cfg.batch}"):
        result = api.simulate(cfg.model, cfg.hardware, policy=cfg.policy,
                              **{k: v for k, v in fields.items() if k not in ("model", "hardware")})
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
    t.add_row("HBM saved (GB)", f"{s['hbm_saved_gb']:.1f}", "")
    t.add_row("host DDR peak (GB)", f"{s['ddr_peak_gb']:.1f}", "0")
    t.add_row("step ms mean / p50 / p99", f"{s['step_ms_mean']:.2f} / {s['step_ms_p50']:.2f} / {s['step_ms_p99']:.2f}",
              f"{s['step_ms_full_mean']:.2f}")
    t.add_row("  compute / exposed / hidden transfer ms",
              f"{s['compute_ms_mean']:.2f} / {s['stall_ms_mean']:.2f} / {s['hidden_transfer_ms_mean']:.2f}", "")
    t.add_row("  analytic lower bound ms", f"{s['bound_step_ms']:.2f}", "")
    t.add_row("overhead vs full (%)", f"{s['overhead_pct']:.2f}", "")
    t.add_row("transfer share, paper's definition (%)", f"{s['transfer_overhead_pct_paper']:.2f}", "")
    t.add_row("throughput (tokens/s)", f"{s['throughput_tok_s']:,.0f}", f"{s['throughput_tok_s_full']:,.0f}")
    t.add_row("H2D / D2H GB per step", f"{s['h2d_gb_per_step']:.3f} / {s['d2h_gb_per_step']:.4f}", "0 / 0")
    t.add_row("H2D / D2H link busy (%)", f"{100 * s['link_util_h2d']:.1f} / {100 * s['link_util_d2h']:.1f}", "")
    t.add_row("DDR tokens per sequence per step", f"{s['ddr_tokens_per_slot_step']:.0f}", "")
    t.add_row("attention mass on DDR / lost to eviction (%)",
              f"{100 * s['attention_mass_ddr']:.2f} / {100 * s['attention_mass_evicted']:.3f}", "0 / 0")
    t.add_row("tokens from trace / synthetic extension", f"{s['tokens_captured']:,} / {s['tokens_synthetic']:,}", "")
    t.add_row("simulated in", f"{s['sim_wall_s']:.2f} s, {s['sim_events']:,} events", "")
    print_table(t)


def simulate_search(cfg, target_overhead: float, search_strategy: bool, json_out: str | None, out: Path | None,
                    formats: tuple[str, ...]) -> None:
    """simulate --target-overhead: the β search, its frontier, and the chosen configuration's outputs."""
    import dataclasses

    from tiersim import api
    from tiersim.fileio import write_json

    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ("model", "hardware", "policy")}
    with spinner(f"searching β for overhead ≤ {target_overhead:g}%"):
        found = api.search(target_overhead, cfg.model, cfg.hardware, search_strategy=search_strategy, policy=cfg.policy,
                           **fields)
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
