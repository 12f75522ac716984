"""The `tiersim` command line: parse, call one library function, print a table, write files."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from tiersim import __version__
from tiersim.errors import TiersimError
from tiersim.fileio import dumps_json, write_json, write_npz
from tiersim.policy import EVICTION_MODES, TIER_NAMES, PolicyConfig

# Wide tables stay readable when piped to a file or a CI log (rich assumes 80 columns there).
console = Console(width=None if sys.stdout.isatty() else 200)


class Group(click.Group):
    """A click group that turns tiersim's input errors into a one-line message and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TiersimError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tiersim")
def cli() -> None:
    """Simulate and validate a tiered (HBM / DDR / compressed / evicted) KV cache for reasoning LLMs."""


def main() -> None:
    """Console-script entry point."""
    cli()


def emit_json(target: str | None, obj) -> bool:
    """Write `obj` to FILE or stdout ('-'); True when stdout was taken (skip the table then)."""
    if target is None:
        return False
    if target == "-":
        sys.stdout.write(dumps_json(obj))
        return True
    write_json(target, obj)
    console.print(f"wrote {target}")
    return False


json_option = click.option("--json", "json_out", metavar="FILE|-",
                           help="Also write the result as JSON to FILE, or '-' for stdout.")


def policy_options(f):
    """The tiering policy's knobs, shared by every command that runs it; passes `policy: PolicyConfig`."""
    d = PolicyConfig()
    opt = functools.partial(click.option, show_default=True)
    options = [
        opt("--hbm-ratio", type=float, default=d.hbm_ratio, help="β: share of surviving unprotected tokens kept in HBM."),
        opt("--evict-ratio", type=float, default=d.evict_ratio, help="r: share of unprotected tokens evicted."),
        opt("--sinks", type=int, default=d.sinks, help="First generated tokens always kept in HBM."),
        opt("--window", type=int, default=d.window, help="Most recent tokens always kept in HBM."),
        opt("--interval", type=int, default=d.interval, help="Δ: decode steps between re-tiers."),
        opt("--compressed-ratio", type=float, default=d.compressed_ratio, help="Share of offloaded tokens stored compressed."),
        opt("--compressed-bits", type=int, default=d.compressed_bits, help="Bit width of the compressed tier (2, 4 or 8)."),
        opt("--page-size", type=int, default=d.page_size, help="Tokens per page, the unit of tiering and transfer."),
        opt("--eviction", type=click.Choice(EVICTION_MODES), default=d.eviction,
            help="target: evicted ≈ r of unprotected tokens; compound: r of candidates every round (authors' code)."),
        opt("--sticky/--no-sticky", default=d.sticky, help="Never re-score or promote offloaded tokens (authors' prototype)."),
    ]
    names = list(PolicyConfig.__dataclass_fields__)

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        kwargs["policy"] = PolicyConfig(**{name: kwargs.pop(name) for name in names})
        return f(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


# -- specs ---------------------------------------------------------------------------------------
@cli.command()
@click.option("--model-spec", "extra_models", multiple=True, metavar="NAME|config.json",
              help="Also show this model (repeatable).")
@click.option("--hardware", "extra_hardware", multiple=True, metavar="NAME|FILE.toml",
              help="Also show this hardware profile (repeatable).")
@json_option
def specs(extra_models: tuple[str, ...], extra_hardware: tuple[str, ...], json_out: str | None) -> None:
    """Show built-in models and hardware profiles (and yours)."""
    from tiersim.specs import hardware_names, hardware_spec, model_names, model_spec

    models = {m.name: m for m in (model_spec(n) for n in [*model_names(), *extra_models])}
    hardware = {h.name: h for h in (hardware_spec(n) for n in [*hardware_names(), *extra_hardware])}
    if emit_json(json_out, {"models": {k: m.to_dict() for k, m in models.items()},
                            "hardware": {k: h.to_dict() for k, h in hardware.items()}}):
        return
    t = Table(title="models (KV bytes per token at the model's dtype)")
    for col in ("name", "layers", "heads", "kv heads", "head dim", "hidden", "params (B)", "weights (GB)",
                "KV B/token", "KV B/token, paper formula"):
        t.add_column(col, justify="left" if col == "name" else "right")
    for m in models.values():
        t.add_row(m.name, str(m.layers), str(m.attention_heads), str(m.kv_heads), str(m.head_dim), str(m.hidden),
                  f"{m.params / 1e9:.3f}", f"{m.weight_bytes / 1e9:.2f}", f"{m.kv_bytes_per_token:,}",
                  f"{m.kv_bytes_per_token_paper:,}")
    console.print(t)
    t = Table(title="hardware (GB = 1e9 B; see each profile's sources with --json)")
    for col in ("name", "HBM GB", "HBM GB/s spec / eff.", "bf16 TFLOP/s spec / eff.", "link",
                "H2D / D2H GB/s pinned", "H2D / D2H GB/s pageable", "copy µs", "duplex", "DDR GB", "DDR GB/s"):
        t.add_column(col, justify="left" if col in ("name", "link") else "right")
    for h in hardware.values():
        t.add_row(h.name, f"{h.hbm_gb:g}", f"{h.hbm_gbps_spec:g} / {h.hbm_gbps_effective:g}",
                  f"{h.bf16_tflops_spec:g} / {h.bf16_tflops_effective:g}", h.link,
                  f"{h.h2d_gbps_pinned:g} / {h.d2h_gbps_pinned:g}", f"{h.h2d_gbps_pageable:g} / {h.d2h_gbps_pageable:g}",
                  f"{h.copy_latency_us:g}", f"{h.duplex_factor:g}", f"{h.ddr_gb:g}", f"{h.ddr_gbps:g}")
    console.print(t)


# -- synthetic traces ----------------------------------------------------------------------------
@cli.command()
@click.option("--requests", "n_requests", type=click.IntRange(min=1), default=4, show_default=True, help="Requests in the trace.")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Prompt length of every request.")
@click.option("--gen-tokens", type=click.IntRange(min=2), default=2048, show_default=True, help="Generated tokens per request.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed; same seed, same trace.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Trace file to write (atomically).")
@click.option("--like", "like", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="TRACE",
              help="First fit the generator to this captured trace (scipy) and print the fit.")
@json_option
def synth(n_requests: int, prompt_tokens: int, gen_tokens: int, seed: int, out: Path, like: Path | None,
          json_out: str | None) -> None:
    """Write a synthetic attention trace (sinks, recency, hitters)."""
    from tiersim.traces.synth import SynthParams, write_synth_trace

    params = SynthParams() if like is None else _print_fit(like, json_out)
    write_synth_trace(out, params, n_requests, prompt_tokens, gen_tokens, seed)
    if json_out != "-":
        console.print(f"wrote {out}: {n_requests} requests, {prompt_tokens} prompt + {gen_tokens} generated tokens each")


def _print_fit(like: Path, json_out: str | None):
    """Fit SynthParams to a captured trace, print the fit report, return the parameters."""
    from tiersim.traces.fit import fit_synth_params
    from tiersim.traces.format import read_trace

    report = fit_synth_params(read_trace(like))
    if emit_json(json_out, {"like": str(like), **report.to_dict()}):
        return report.params
    t = Table(title=f"fit to {like.name}: captured vs synthetic at the captured lengths"
                    f" ({report.evaluations} evaluations, {report.seconds:.1f} s)")
    for col in ("statistic", "captured", "synthetic", "relative error"):
        t.add_column(col, justify="left" if col == "statistic" else "right")
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    for name, captured, synthetic, error in report.rows():
        t.add_row(name, fmt(captured, ".4f"), fmt(synthetic, ".4f"), fmt(error, "+.1%"))
    console.print(t)
    return report.params


# -- schedule: the policy over a trace -----------------------------------------------------------
@cli.command()
@click.argument("trace", type=click.Path(dir_okay=False, path_type=Path))
@policy_options
@click.option("--request", "request_index", type=int, default=None, help="Only this request (0-based); default all.")
@click.option("--export", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every schedule's arrays to FILE.npz (keys <array>_<request>).")
@json_option
def schedule(trace: Path, policy: PolicyConfig, request_index: int | None, export: Path | None, json_out: str | None) -> None:
    """Replay the policy over a trace: tokens and mass per tier."""
    from tiersim.policy import replay
    from tiersim.traces.format import read_trace

    tr = read_trace(trace)
    if request_index is not None and not 0 <= request_index < len(tr):
        raise TiersimError(f"--request {request_index} out of range: {trace} has {len(tr)} requests (0..{len(tr) - 1})")
    indices = range(len(tr)) if request_index is None else [request_index]
    rows, arrays = [], {}
    for i in indices:
        req = tr[i]
        s = replay(req, policy)
        rows.append({"request": i, "prompt_tokens": req.prompt_tokens, "generated_tokens": req.generated_tokens, **s.summary()})
        for name, value in s.to_arrays().items():
            arrays[f"{name}_{i}"] = value
    if export is not None:
        write_npz(export, arrays)
        console.print(f"wrote {export}")
    if emit_json(json_out, {"trace": str(trace), "policy": policy.to_dict(), "requests": rows}):
        return
    t = Table(title=f"{trace.name}: final tokens per tier and share of attention mass per tier")
    for col in ("request", "prompt", "steps", "re-tiers", *TIER_NAMES, *(f"mass {n}" for n in TIER_NAMES)):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["request"]), str(r["prompt_tokens"]), str(r["steps"]), str(r["retiers"]),
                  *(str(r[f"final_{n}_tokens"]) for n in TIER_NAMES), *(f"{r[f'mass_share_{n}']:.4f}" for n in TIER_NAMES))
    console.print(t)


# -- inspect: importance statistics of a trace ---------------------------------------------------
@cli.command("inspect")
@click.argument("trace", type=click.Path(dir_okay=False, path_type=Path))
@policy_options
@click.option("--request", "request_index", type=int, default=None, help="Only this request (0-based); default all.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE.png",
              help="Write the importance heatmap and tier timeline of --request (default 0) as a PNG.")
@click.option("--export", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE.npz",
              help="Write token_ids_<i>, prefill_<i> and dense float32 increments_<i> (steps x positions) to FILE.npz.")
@json_option
def inspect_command(trace: Path, policy: PolicyConfig, request_index: int | None, plot: Path | None,
                    export: Path | None, json_out: str | None) -> None:
    """Importance statistics of a trace, and the policy's tiers over time."""
    from tiersim.policy import replay
    from tiersim.traces.format import read_trace
    from tiersim.traces.plots import plot_request
    from tiersim.traces.stats import export_npz, inspect_trace

    tr = read_trace(trace)
    report = inspect_trace(tr, policy, request_index)
    say = (lambda msg: None) if json_out == "-" else console.print  # noqa: E731
    if plot is not None:
        i = report["requests"][0]["request"]
        plot_request(tr[i], replay(tr[i], policy), plot, title=f"{trace.name}, request {i}: attention received")
        say(f"wrote {plot}")
    if export is not None:
        export_npz(tr, export, request_index)
        say(f"wrote {export}")
    if emit_json(json_out, report):
        return
    t = Table(title=f"{trace.name} ({report['model']}): importance statistics (shares of decode attention mass)"
                    f" and final tokens per tier")
    cols = ("request", "prompt", "generated", "top5", "top20", "top50", "gini", "sink", "recency", "persistence",
            *TIER_NAMES)
    for col in cols:
        t.add_column(col, justify="right")
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    stats = ("top5_mass", "top20_mass", "top50_mass", "gini", "sink_mass", "recency_mass", "heavy_persistence")
    for r in report["requests"]:
        t.add_row(str(r["request"]), str(r["prompt_tokens"]), str(r["generated_tokens"]), *(fmt(r[k]) for k in stats),
                  *(str(r["tiers"]["final_tokens"][n]) for n in TIER_NAMES))
    a = report["aggregate"]
    t.add_row("mean", str(a["prompt_tokens"]), str(a["generated_tokens"]), *(fmt(a[k]) for k in stats),
              *("" for _ in TIER_NAMES), style="bold")
    console.print(t)


# -- simulate: the main job --------------------------------------------------------------------
def simulate_options(f):
    """The simulator's inputs besides the policy (shared by simulate and later by sweeps)."""
    from tiersim.sim.engine import STRATEGIES

    opt = functools.partial(click.option, show_default=True)
    options = [
        opt("--trace", type=click.Path(dir_okay=False, path_type=Path), default=None,
            help="Attention trace; default: the embedded SmolLM2-135M capture."),
        opt("--model-spec", "model_name", default="r1-qwen-14b", metavar="NAME|config.json", help="Model whose KV and compute to model."),
        opt("--hardware", "hardware_name", default="h200-sxm", metavar="NAME|FILE.toml", help="Hardware profile."),
        opt("--batch", type=int, default=256, help="Concurrent sequences (closed-loop continuous batching)."),
        opt("--strategy", type=click.Choice(STRATEGIES), default="prefetch-layer", help="How the DDR tier is used at decode time."),
        opt("--depth", type=int, default=2, help="prefetch-layer: layers the copy stream runs ahead."),
        opt("--gen-tokens", type=int, default=4096, help="Generated tokens per request (shorter trace requests are extended)."),
        opt("--steps", type=int, default=None, help="Decode steps of the batch to simulate [default: --gen-tokens]."),
        opt("--cold-start", is_flag=True, help="Start every slot at token 0 instead of a random point of its first request."),
        opt("--pinned/--pageable", default=True, help="Host KV in pinned or pageable memory."),
        opt("--seed", type=int, default=0, help="Seed for request draws, start points and synthetic extension."),
        opt("--reserve-frac", type=float, default=0.10, help="Share of HBM kept for context, allocator and activations."),
        opt("--fixed-compute-ms", type=float, default=None,
            help="Replace the compute model by a fixed time per decode step (e.g. a measured one)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def sim_config(policy: PolicyConfig, **kw):
    """Resolve names and files into a SimConfig (errors name the bad input)."""
    from tiersim.sim import SimConfig
    from tiersim.specs import hardware_spec, model_spec

    return SimConfig(model=model_spec(kw.pop("model_name")), hardware=hardware_spec(kw.pop("hardware_name")),
                     policy=policy, **kw)


@cli.command()
@simulate_options
@policy_options
@json_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for summary.json, steps.csv and PNG plots.")
def simulate(policy: PolicyConfig, json_out: str | None, out: Path | None, **kw) -> None:
    """Project HBM saved and decode slowdown at a batch size."""
    from tiersim.sim import simulate as run_simulation

    cfg = sim_config(policy, **kw)
    result = run_simulation(cfg)
    s = result.summary
    if out is not None:
        from tiersim.fileio import atomic_path
        from tiersim.sim.plots import write_plots

        write_json(out / "summary.json", s)
        with atomic_path(out / "steps.csv") as tmp:
            result.steps.to_csv(tmp, index=False, float_format="%.6g")
        write_plots(result, out)
    if emit_json(json_out, s):
        return
    print_simulation(s)
    if out is not None:
        console.print(f"wrote {out}/summary.json, steps.csv, memory.png, step_breakdown.png, links.png")


def print_simulation(s: dict) -> None:
    """The simulate table: memory, time, transfer, attention."""
    c = s["config"]
    t = Table(title=f"{c['model']['name']} on {c['hardware']['name']} ({c['hardware']['link']}), batch {c['batch']}, "
                    f"{c['strategy']}, β={c['policy']['hbm_ratio']} r={c['policy']['evict_ratio']}, "
                    f"{c['gen_tokens']} tokens")
    t.add_column("quantity")
    t.add_column("tiered", justify="right")
    t.add_column("full (no tiering)", justify="right")
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
    console.print(t)


if __name__ == "__main__":
    main()
