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
def synth(n_requests: int, prompt_tokens: int, gen_tokens: int, seed: int, out: Path) -> None:
    """Write a synthetic attention trace (sinks, recency, hitters)."""
    from tiersim.traces.synth import SynthParams, write_synth_trace

    write_synth_trace(out, SynthParams(), n_requests, prompt_tokens, gen_tokens, seed)
    console.print(f"wrote {out}: {n_requests} requests, {prompt_tokens} prompt + {gen_tokens} generated tokens each")


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


if __name__ == "__main__":
    main()
