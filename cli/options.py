"""Options shared by the commands: one flag per concept, defaults read from the config each command builds.

Defaults are looked up when a command runs or shows its help, not when the CLI loads, so that
`tiersim --help` imports neither numpy nor pandas. Old spellings stay accepted as hidden aliases
(`--model-spec`, `--models` → `--model`; `--profile` → `--hardware`; `--weights` → `--weight-bits`), and so do
vLLM's names of the deployment flags (`--tensor-parallel-size` → `--tp`, `--kv-cache-dtype` → `--kv-dtype`, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from tiersim.errors import TiersimError
from tiersim.strategy import STRATEGY_NAMES

# Where each command's defaults live: "module:attribute", a dataclass, a function or a config instance.
SIM = "tiersim.sim:SimConfig"
API_SIMULATE = "tiersim.api:simulate"
POLICY = "tiersim.policy:PolicyConfig"
PLOT_FORMATS = ("png", "svg", "pdf")
# Weight precisions by name, as `--weights` (the old spelling) gave them; `--weight-bits` takes either.
WEIGHT_DTYPE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4}
BITS_DTYPE = {32: "fp32", 16: "fp16", 8: "int8", 4: "int4"}
# The library's choices, spelled here so that `tiersim --help` loads no numpy (tests/test_cli.py checks that they
# agree): policy.EVICTION_MODES, sim.copies.COPY_METHOD_CHOICES and KV_LAYOUTS, specs KV_DTYPE_BYTES and
# WEIGHT_DTYPE_BITS (specs/deployment.py).
EVICTION_MODES = ("target", "compound", "prototype")
COPY_METHODS = ("dma", "dma-batched", "gather-kernel", "host-gather", "auto")
KV_LAYOUTS = ("per-layer", "cross-layer")
KV_DTYPES = ("bf16", "fp16", "fp8")
WEIGHT_DTYPES = ("bf16", "fp16", "fp8", "int8", "int4", "mxfp4")
# vLLM's spellings of the same dtypes (--kv-cache-dtype, --dtype); `auto` is vLLM's "the model's own" (unset).
VLLM_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8"}


def default_of(source: str, name: str) -> Any:
    """The default of `name` in `source` ("module:attr"): a dataclass field, a function parameter or an attribute."""
    module, attr = source.split(":")
    obj = getattr(importlib.import_module(module), attr)
    if dataclasses.is_dataclass(obj) and isinstance(obj, type):
        f = next(f for f in dataclasses.fields(obj) if f.name == name)
        return f.default_factory() if f.default is dataclasses.MISSING else f.default
    if callable(obj):
        return inspect.signature(obj).parameters[name].default
    return getattr(obj, name)


class ConfigOption(click.Option):
    """An option whose default comes from a config (looked up lazily) and whose old spellings hide from --help."""

    def __init__(self, *decls, default_from: str | None = None, field: str | None = None,
                 hidden_opts: tuple[str, ...] = (), convert: Callable[[Any], Any] | None = None, **kw) -> None:
        super().__init__(*decls, **kw)
        self.default_from, self.field, self.hidden_opts, self.convert = default_from, field or self.name, hidden_opts, convert

    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        if self.default_from is None or ctx.lookup_default(self.name, call=False) is not None:
            return super().get_default(ctx, call)
        value = default_of(self.default_from, self.field)
        return self.convert(value) if self.convert else value

    def get_help_record(self, ctx: click.Context):
        shown = self.opts
        self.opts = [o for o in shown if o not in self.hidden_opts]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown

    def to_info_dict(self) -> dict:
        info = super().to_info_dict()
        if self.default_from is not None:
            with contextlib.suppress(ImportError, StopIteration, KeyError, TiersimError):
                info["default"] = default_of(self.default_from, self.field)
        return info


def option(*decls, **kw):
    """click.option with ConfigOption and shown defaults."""
    kw.setdefault("show_default", True)
    return click.option(*decls, cls=ConfigOption, **kw)


def stack(*decorators):
    """Apply option decorators in reading order (first listed, first in --help)."""
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


# -- output paths: refused before any work, nothing created ---------------------------------------
def writable(flag: str, path: str | os.PathLike, folder: bool) -> None:
    """Refuse, naming the flag, a path that cannot be written (a file under a file, an unwritable folder)."""
    p = Path(path).absolute()
    if p.exists():
        if folder != p.is_dir():
            raise TiersimError(f"{flag} {path}: is {'not ' if folder else ''}a folder; accepted: "
                               f"{'a folder' if folder else 'a file path'} that can be written")
        if not os.access(p if folder else p.parent, os.W_OK | os.X_OK):
            raise TiersimError(f"{flag} {path}: not writable")
        return
    above = p.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise TiersimError(f"{flag} {path}: cannot be written, {above} is not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise TiersimError(f"{flag} {path}: cannot be written, {above} is not writable")


def _check_file(ctx: click.Context, param: click.Parameter, value):
    if value is not None and str(value) != "-":
        writable(param.opts[0], value, folder=False)
    return value


def _check_folder(ctx: click.Context, param: click.Parameter, value):
    if value is not None:
        writable(param.opts[0], value, folder=True)
    return value


def json_option(f):
    """--json FILE|-: the result as JSON too (checked writable before any work)."""
    return click.option("--json", "json_out", metavar="FILE|-", callback=_check_file, expose_value=True,
                        help="Also write the result as JSON to FILE, or '-' for stdout.")(f)


def out_file(help: str, *, required: bool = False, metavar: str | None = None, flag: str = "--out", dest: str | None = None):
    """An output file option, checked writable before any work."""
    return click.option(flag, *([dest] if dest else []), type=click.Path(dir_okay=False, path_type=Path), required=required,
                        default=None, metavar=metavar, callback=_check_file, help=help)


def out_folder(help: str, *, required: bool = False, check: bool = True):
    """--out FOLDER, checked writable before any work (created only when something is written); `check=False`
    leaves the check to the command, for one that first refuses a bad input file."""
    return click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=required, default=None,
                        callback=_check_folder if check else None, help=help)


def format_option(f):
    """--format png|svg|pdf (repeatable): the file formats of the plots."""
    return click.option("--format", "formats", type=click.Choice(PLOT_FORMATS), multiple=True, default=("png",),
                        show_default=True, help="Plot file format (repeatable: --format png --format svg).")(f)


# -- model and hardware: names or files, the same flag everywhere --------------------------------------
def model_option(default_from: str | None = API_SIMULATE, *, multiple: bool = False, help: str = "Model whose KV and "
                 "compute to model.", metavar: str = "NAME|config.json", aliases: tuple[str, ...] = ("--model-spec",),
                 **kw):
    """--model NAME|config.json (old spellings hidden)."""
    return option("--model", *aliases, "model", default_from=default_from, hidden_opts=aliases, multiple=multiple,
                  metavar=metavar, help=help, **kw)


def hardware_option(default_from: str | None = API_SIMULATE, *, multiple: bool = False,
                    help: str = "Hardware profile.", aliases: tuple[str, ...] = (), **kw):
    """--hardware NAME|FILE.toml (old spellings hidden)."""
    return option("--hardware", *aliases, "hardware", default_from=default_from, hidden_opts=aliases, multiple=multiple,
                  metavar="NAME|FILE.toml", help=help, **kw)


class WeightBits(click.ParamType):
    """Bits per weight: 4, 8, 16, 32, or a dtype name (int4, int8, fp16, bf16, fp32)."""

    name = "BITS"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value is None:
            return value
        text = str(value).strip().lower()
        if text in WEIGHT_DTYPE_BITS:
            return WEIGHT_DTYPE_BITS[text]
        if text.isdigit() and int(text) in BITS_DTYPE:
            return int(text)
        self.fail(f"{value!r} invalid; accepted: 4, 8, 16, 32 or {', '.join(WEIGHT_DTYPE_BITS)}", param, ctx)


def weight_bits_option(default_from: str | None = SIM):
    """--weight-bits 4|8|16|32 (or a dtype name; --weights is the old spelling)."""
    return option("--weight-bits", "--weights", "weight_bits", type=WeightBits(), default_from=default_from,
                  hidden_opts=("--weights",), metavar="4|8|16|32",
                  help="Weights stored at this many bits (KV keeps the model's dtype) [default: the model's dtype].")


# -- the run: strategy, batch, length, seed ----------------------------------------------------------
def trace_option(f):
    """--trace FILE (default: the embedded SmolLM2-135M capture)."""
    return option("--trace", type=click.Path(dir_okay=False, path_type=Path), default=None, show_default=False,
                  help="Attention trace; default: the embedded SmolLM2-135M capture.")(f)


def run_options(config: str, only: tuple[str, ...] | None = None):
    """The run's inputs (RunConfig's fields) with `config`'s defaults; `only` picks some of them."""
    options = {
        "strategy": option("--strategy", type=click.Choice(STRATEGY_NAMES), default_from=config,
                           help="How the DDR tier is used at decode time."),
        "depth": option("--depth", type=int, default_from=config, help="prefetch-layer: layers the copy stream runs ahead."),
        "batch": option("--batch", type=int, default_from=config, help="Concurrent sequences (closed-loop continuous batching)."),
        "gen_tokens": option("--gen-tokens", type=int, default_from=config,
                             help="Generated tokens per request (shorter trace requests are extended)."),
        "steps": option("--steps", type=int, default_from=config, help="Decode steps of the batch [default: --gen-tokens]."),
        "cold_start": option("--cold-start/--warm-start", default_from=config,
                             help="Start every slot at token 0, or at a random point of its first request."),
        "pinned": option("--pinned/--pageable", default_from=config, help="Host KV in pinned or pageable memory."),
        "seed": option("--seed", type=int, default_from=config,
                       help="Seed of request draws, start points and synthetic extension."),
        "reserve_frac": option("--reserve-frac", type=float, default_from=config,
                               help="Share of HBM kept for context, allocator and activations."),
    }
    return stack(*(options[k] for k in (only or options)))


# -- the deployment: tiersim's flags, vLLM's spellings as aliases (specs/deployment.py VLLM_FLAGS) -------------
class Dtype(click.ParamType):
    """A dtype of `choices`, or vLLM's spelling of one; `auto` (vLLM's default) leaves it unset (None)."""

    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = choices
        self.name = "|".join((*choices, "auto"))

    def convert(self, value, param, ctx):
        if value is None or value in self.choices:
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return None
        if VLLM_DTYPES.get(text, text) in self.choices:
            return VLLM_DTYPES.get(text, text)
        self.fail(f"{value!r} invalid; accepted: {', '.join(self.choices)} or auto (the model's own)", param, ctx)


class ExpertParallel(click.ParamType):
    """GPUs the experts are spread over: a count, or `all` (tp × dp, what vLLM's --enable-expert-parallel does)."""

    name = "N|all"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value is None:
            return value
        text = str(value).strip().lower()
        if text == "all":
            return text
        try:
            return int(text)
        except ValueError:
            self.fail(f"{value!r} invalid; accepted: an integer >= 1, or all (tp × dp)", param, ctx)


def deployment_options(config: str = SIM):
    """How the model is served (SimConfig's tp, ep, dp, dtypes, memory share and context cap), vLLM's flags as aliases."""
    return stack(
        option("--tp", "--tensor-parallel-size", "tp", type=int, default_from=config, hidden_opts=("--tensor-parallel-size",),
               help="Tensor-parallel GPUs per replica (vLLM: --tensor-parallel-size); every figure is one GPU's."),
        option("--ep", "--enable-expert-parallel", "ep", type=ExpertParallel(), is_flag=False, flag_value="all",
               default_from=config, metavar="N|all", hidden_opts=("--enable-expert-parallel",),
               help="GPUs the routed experts are spread over, whole experts each; 1: experts split like the other "
                    "matrices; all (or vLLM's --enable-expert-parallel, no value): tp × dp, 1 for a dense model."),
        option("--dp", "--data-parallel-size", "dp", type=int, default_from=config, hidden_opts=("--data-parallel-size",),
               help="Data-parallel replicas sharing the host's DDR bandwidth and cores (vLLM: --data-parallel-size)."),
        option("--kv-dtype", "--kv-cache-dtype", "kv_dtype", type=Dtype(KV_DTYPES), default_from=config,
               show_default=False, metavar="bf16|fp16|fp8|auto", hidden_opts=("--kv-cache-dtype",),
               help="KV cache element type (vLLM: --kv-cache-dtype; auto, fp8_e4m3, fp8_e5m2 accepted) "
                    "[default: the model's dtype]."),
        option("--weight-dtype", "--quantization", "weight_dtype", type=Dtype(WEIGHT_DTYPES), default_from=config,
               show_default=False, metavar="DTYPE", hidden_opts=("--quantization",),
               help="Weight format of the decoder's matrices: bf16, fp16, fp8, int8, int4, mxfp4 (routed experts "
                    "only, 4.25 bits) or auto (vLLM: --quantization) [default: --weight-bits if given, else the "
                    "checkpoint's format, else the model's dtype]."),
        option("--gpu-memory-utilization", type=float, default_from=config, show_default=False,
               help="Share of HBM the engine may use, in (0, 1] (vLLM's flag); given, it replaces --reserve-frac "
                    "with 1 - it [default: 1 - --reserve-frac]."),
        option("--max-model-len", type=int, default_from=config, show_default=False,
               help="Longest context the engine admits, tokens (vLLM's flag); at least --gen-tokens [default: no cap]."),
    )


def copy_options(config: str = SIM, only: tuple[str, ...] | None = None):
    """How the KV cache is laid out in blocks and copied from DDR (`config`'s block_size, kv_layout, copy_method)."""
    options = {
        "block_size": option("--block-size", type=int, default_from=config,
                             help="Tokens per KV block (vLLM 16, SGLang 64); HBM is freed a whole block at a time."),
        "kv_layout": option("--kv-layout", type=click.Choice(KV_LAYOUTS), default_from=config,
                            help="per-layer: each layer's K and V apart (vLLM's paged cache); cross-layer: a block's "
                                 "layers together (vLLM's offloading connector)."),
        "copy_method": option("--copy-method", type=click.Choice(COPY_METHODS), default_from=config,
                              help="How DDR-tier KV reaches the GPU: dma (a cudaMemcpyAsync per piece), dma-batched "
                                   "(one call, a descriptor per piece), gather-kernel (a kernel reads mapped host "
                                   "memory, taking SMs), host-gather (the CPU packs pinned chunks); auto: the cheapest "
                                   "by the profile's copy constants. With --pageable only auto (the paper's path)."),
    }
    return stack(*(options[k] for k in (only or options)))


# -- the policy ----------------------------------------------------------------------------------------
POLICY_HELP = {
    "hbm_ratio": ("--hbm-ratio", float, "β: share of surviving unprotected tokens kept in HBM."),
    "evict_ratio": ("--evict-ratio", float, "r: share of unprotected tokens evicted."),
    "sinks": ("--sinks", int, "First generated tokens always kept in HBM."),
    "window": ("--window", int, "Most recent tokens always kept in HBM."),
    "interval": ("--interval", int, "Δ: decode steps between re-tiers."),
    "compressed_ratio": ("--compressed-ratio", float, "Share of offloaded tokens stored compressed."),
    "compressed_bits": ("--compressed-bits", int, "Bit width of the compressed tier (2, 4 or 8)."),
    "page_size": ("--page-size", int, "Tokens per page, the unit of tiering and transfer [default: {page}]."),
    "eviction": ("--eviction", click.Choice(EVICTION_MODES),
                 "target: evicted ≈ r of unprotected tokens; compound: r of the candidates every round (the authors' "
                 "accuracy code); prototype: the authors' system prototype (only HBM-resident tokens re-tiered, DDR "
                 "tokens never re-scored, promoted or evicted)."),
    "sticky": ("--sticky/--no-sticky", None, "Never re-score or promote offloaded tokens (on the target or compound "
                                             "policy; for the authors' system prototype use --eviction prototype)."),
}


def policy_options(f=None, *, source: str = POLICY, fields: tuple[str, ...] = tuple(POLICY_HELP),
                   page: str = "the KV block size"):
    """The tiering policy's knobs with `source`'s defaults; the command receives `policy: PolicyConfig`.

    `page` says what --page-size defaults to in this command (the block size where there are KV blocks).
    """
    def decorate(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            from tiersim.policy import PolicyConfig

            # Knobs a command does not offer (fidelity's β and r come from its grid) keep PolicyConfig's defaults.
            kwargs["policy"] = PolicyConfig(**{name: kwargs.pop(name) for name in fields})
            return f(*args, **kwargs)

        opts = [option(POLICY_HELP[k][0], k, type=POLICY_HELP[k][1], default_from=source,
                       help=POLICY_HELP[k][2].format(page=page), show_default=k != "page_size") for k in fields]
        return stack(*opts)(wrapper)
    return decorate(f) if f is not None else decorate
