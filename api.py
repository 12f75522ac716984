"""The Python face of every CLI command, with the same names: `tiersim.simulate(model=..., hardware=..., batch=...)`.

Each function takes model and hardware as a name, a file or a spec, and any field of the command's
config (SimConfig, PolicyConfig, ...) as a keyword; every input is checked before any work and a
bad one raises a ConfigError naming the field. Heavy modules load only when a function runs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tiersim.errors import ConfigError, TiersimError

if TYPE_CHECKING:
    from tiersim.hw.calibrate import Calibration
    from tiersim.policy import PolicyConfig
    from tiersim.sim import SimConfig, SimResult
    from tiersim.specs import HardwareSpec, ModelSpec
    from tiersim.studies.advise import Advice
    from tiersim.studies.prototype import PrototypeReproduction
    from tiersim.studies.search import SearchResult
    from tiersim.studies.sweep import SweepStats
    from tiersim.traces.capture import CaptureResult

__all__ = ["advise", "calibrate", "capture", "reproduce_prototype", "scaling", "search", "simulate", "sweep", "validate"]

# Weight precisions by bits, as ScalingConfig names them.
_BITS_DTYPE = {32: "fp32", 16: "fp16", 8: "int8", 4: "int4"}


def as_model(model: str | os.PathLike | ModelSpec, field: str = "model") -> ModelSpec:
    """A model name, config.json (or its folder) or ModelSpec, resolved; a ConfigError naming `field` otherwise."""
    from tiersim.specs import ModelSpec, model_spec

    if isinstance(model, ModelSpec):
        return model
    if not isinstance(model, str | os.PathLike):
        raise ConfigError(field, f"{field} must be a model name, a config.json path or a ModelSpec, got {model!r}")
    try:
        return model_spec(model)
    except ConfigError:
        raise
    except TiersimError as e:
        raise ConfigError(field, str(e)) from None


def as_hardware(hardware: str | os.PathLike | HardwareSpec, field: str = "hardware") -> HardwareSpec:
    """A hardware profile name, TOML file or HardwareSpec, resolved; a ConfigError naming `field` otherwise."""
    from tiersim.specs import HardwareSpec, hardware_spec

    if isinstance(hardware, HardwareSpec):
        return hardware
    if not isinstance(hardware, str | os.PathLike):
        raise ConfigError(field, f"{field} must be a profile name, a .toml path or a HardwareSpec, got {hardware!r}")
    try:
        return hardware_spec(hardware)
    except ConfigError:
        raise
    except TiersimError as e:
        raise ConfigError(field, str(e)) from None


def _names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def split_fields(fields: dict[str, Any], config: type, policy: PolicyConfig | None,
                 skip: tuple[str, ...] = ()) -> tuple[dict[str, Any], PolicyConfig]:
    """Keywords → (`config`'s fields, the PolicyConfig with the policy's fields applied); unknown names refused."""
    from tiersim.policy import PolicyConfig

    policy_names = _names(PolicyConfig)
    accepted = tuple(n for n in _names(config) if n not in skip and n != "policy")
    for name in fields:
        if name not in accepted and name not in policy_names:
            raise ConfigError(name, f"{name} is not an input here; accepted: {', '.join(accepted + policy_names)}")
    if policy is not None and not isinstance(policy, PolicyConfig):
        raise ConfigError("policy", f"policy must be a PolicyConfig, got {type(policy).__name__}")
    knobs = {k: v for k, v in fields.items() if k in policy_names}
    policy = dataclasses.replace(policy, **knobs) if policy is not None else PolicyConfig(**knobs)
    return {k: v for k, v in fields.items() if k not in policy_names}, policy


def sim_config(model: str | os.PathLike | ModelSpec = "r1-qwen-14b", hardware: str | os.PathLike | HardwareSpec = "h200-sxm",
               *, policy: PolicyConfig | None = None, **fields) -> SimConfig:
    """A checked SimConfig from names (or specs) and any SimConfig / PolicyConfig field.

    `ep="all"` spreads the experts over every GPU of the deployment (tp × dp), as vLLM's --enable-expert-parallel,
    which a dense model ignores (ep 1).
    """
    from tiersim.sim import SimConfig

    rest, policy = split_fields(fields, SimConfig, policy, skip=("model", "hardware"))
    spec = as_model(model)
    if isinstance(rest.get("ep"), str) and rest["ep"].lower() == "all":
        # A bad tp or dp is refused by SimConfig, by name.
        rest["ep"] = rest.get("tp", 1) * rest.get("dp", 1) if spec.moe is not None else 1
    return SimConfig(model=spec, hardware=as_hardware(hardware), policy=policy, **rest)


def simulate(model: str | os.PathLike | ModelSpec = "r1-qwen-14b", hardware: str | os.PathLike | HardwareSpec = "h200-sxm",
             *, policy: PolicyConfig | None = None, workers: int | None = None, compare: bool = False,
             **fields) -> SimResult:
    """One simulation and its `full` baseline: `.summary` (dict), `.steps` (DataFrame, one row per decode step).

    `compare=True` adds what `tiersim simulate` prints besides: `full` at its largest fitting batch, the
    alternatives and the verdict (sim/verdict.py; a few more simulations).
    """
    from tiersim.sim import simulate as run

    return run(sim_config(model, hardware, policy=policy, **fields), workers=workers, compare=compare)


def search(target_overhead: float, model: str | os.PathLike | ModelSpec = "r1-qwen-14b",
           hardware: str | os.PathLike | HardwareSpec = "h200-sxm", *, search_strategy: bool = False,
           policy: PolicyConfig | None = None, workers: int | None = None,
           progress: Callable[[int, int], None] | None = None, **fields) -> SearchResult:
    """The largest HBM saving whose overhead stays within `target_overhead` %, over β (and strategy and depth);
    `progress(points simulated, most points the walk can take)` after each point."""
    from tiersim.studies.search import check_target, search_hbm_ratio

    cfg = sim_config(model, hardware, policy=policy, **fields)
    try:
        check_target(target_overhead)
    except ConfigError:
        raise
    except TiersimError as e:
        raise ConfigError("target_overhead", str(e)) from None
    return search_hbm_ratio(cfg, target_overhead, search_strategy, workers=workers, progress=progress)


# advise's open-loop inputs besides rate (ServeConfig's fields): given only with rate.
_ADVISE_SERVING = ("slo_ttft_ms", "slo_tpot_ms", "prompt_tokens", "output_tokens", "duration_s", "max_num_seqs",
                   "max_num_batched_tokens", "preemption", "find_max_rate")


def advise(model: str | os.PathLike | ModelSpec = "r1-qwen-14b", hardware: str | os.PathLike | HardwareSpec = "h200-sxm",
           *, batch: int | None = None, rate: float | None = None, slo_ms: float | None = None, max_batch: int = 4096,
           steps: int = 256, policy: PolicyConfig | None = None, workers: int | None = None,
           progress: Callable[[int, int], None] | None = None, **fields) -> Advice:
    """full, the tiered strategies and evict-only compared; the ones that fit ranked, with a baseline and a verdict.

    No `batch` or `rate`: each option at its throughput-best batch (p99 step within `slo_ms`). `batch`: every
    option at that batch, against full at its largest fitting batch. `rate` (req/s): every option serving the same
    Poisson arrivals, against full at the same rate, with each one's maximum sustainable rate; the open loop's
    `slo_ttft_ms`, `slo_tpot_ms`, `prompt_tokens`, `output_tokens`, `duration_s`, `max_num_seqs`,
    `max_num_batched_tokens`, `preemption` and `find_max_rate` are given only with it. Other keywords are SimConfig
    and PolicyConfig fields (weight and KV dtypes, tp, block size, ...). `.to_dict()` for JSON.
    """
    from tiersim.studies.advise import advise as run

    serving = {k: fields.pop(k) for k in _ADVISE_SERVING if k in fields}
    cfg = sim_config(model, hardware, policy=policy, steps=steps, **fields)
    return run(cfg, slo_ms, max_batch, workers=workers, batch=batch, rate=rate, serving=serving, progress=progress)


def _listed(value: Any) -> tuple:
    """One value or several, as a tuple (a string is one value)."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str | os.PathLike | int) or not isinstance(value, Sequence) else tuple(value)


def scaling(model: Any = None, hardware: Any = "h200-sxm", *, weight_bits: Any = None, policy: PolicyConfig | None = None,
            progress: Callable[[int, int], None] | None = None, **fields) -> list[dict]:
    """The paper's scaling analysis with real KV heads, one row (dict) per scenario, simulated.

    `model` and `hardware` take one or several names/files/specs; `weight_bits` one or several of 16, 8, 4, 32
    (or dtype names, or native: the checkpoint's format; `weights=` is the ScalingConfig spelling); `tps` one or
    several tensor-parallel sizes; other keywords are ScalingConfig/PolicyConfig fields.
    """
    from tiersim.studies.scaling import DEFAULT_MODELS, ScalingConfig, scaling_rows

    rest, policy = split_fields(fields, ScalingConfig, policy, skip=("models", "hardware"))
    if weight_bits is not None:
        if "weights" in rest:
            raise ConfigError("weight_bits", "give weight_bits or weights, not both")
        rest["weights"] = tuple(_BITS_DTYPE.get(b, b) if isinstance(b, int) else str(b) for b in _listed(weight_bits))
    for name in ("batches", "contexts", "weights", "strategies", "tps"):
        if name in rest:
            rest[name] = _listed(rest[name])
    models = tuple(as_model(m) for m in (_listed(model) or DEFAULT_MODELS))
    gpus = tuple(as_hardware(h) for h in _listed(hardware))
    return scaling_rows(ScalingConfig(models=models, hardware=gpus, policy=policy, **rest), progress)


def reproduce_prototype(gen_tokens: int = 2560, requests: int = 1, compute_ms: float = 47.0,
                        trace: str | os.PathLike | None = None, hbm_ratio: float = 0.5, evict_ratio: float = 0.1,
                        workers: int | None = 1) -> PrototypeReproduction:
    """The authors' system prototype run through tiersim: its reported figures beside tiersim's (`.rows()`,
    `.titles()`, `.figures`; studies/prototype.py says where and why they differ)."""
    from tiersim.studies.prototype import reproduce_prototype as run

    return run(gen_tokens, requests, compute_ms, trace, hbm_ratio, evict_ratio, workers=workers)


def sweep(grid: str | os.PathLike | dict, out: str | os.PathLike, *, engine: str = "local", workers: int | None = None,
          scheduler: str | None = None, resume: bool = False, progress: bool = False) -> SweepStats:
    """Every point of a grid (GRID.toml, a dict of lists, or a Grid) simulated into `out` (parquet), resumably."""
    from tiersim.studies.sweep import Grid, parse_grid, read_grid, run_sweep

    if engine not in ("local", "dask"):
        raise ConfigError("engine", f"engine {engine!r} unknown; accepted: local, dask")
    g = grid if isinstance(grid, Grid) else parse_grid(grid) if isinstance(grid, dict) else read_grid(grid)
    return run_sweep(g, out, engine=engine, workers=workers, scheduler=scheduler, resume=resume, progress=progress)


def capture(model: str | os.PathLike, prompts: str | os.PathLike | Sequence[str], out: str | os.PathLike, *,
            gguf_file: str | None = None, resume: bool = False, progress: bool = False, **fields) -> CaptureResult:
    """Real attention from a local Hugging Face model (folder, GGUF or smollm2-135m) into a trace at `out`."""
    from tiersim.traces.capture import CaptureConfig, capture_trace

    for name in fields:
        if name not in _names(CaptureConfig):
            raise ConfigError(name, f"{name} is not an input here; accepted: {', '.join(_names(CaptureConfig))}")
    return capture_trace(model, prompts, out, CaptureConfig(**fields), gguf_file=gguf_file, resume=resume,
                         progress=progress)


def validate(device: str = "cpu", model: str | os.PathLike | ModelSpec | None = None,
             hardware: str | os.PathLike | HardwareSpec | None = None, *, trace: str | os.PathLike | None = None,
             suite: bool = False, quick: bool = False, out: str | os.PathLike | None = None,
             policy: PolicyConfig | None = None, progress: Callable[[dict], None] | None = None, **fields) -> dict:
    """Replay on the device and compare with the simulator: one configuration, or the fixed suite (`suite=True`).

    `model` defaults to the trace's own model; `hardware` to the device's built-in profile (a CPU needs one
    made by `calibrate`). Returns the report (dict); with `out`, it is also written there as JSON.
    """
    import tempfile

    from tiersim.fileio import write_json
    from tiersim.validate import ValidateConfig, default_profile, load_trace, resolve_model, run_suite
    from tiersim.validate import validate as run

    profile = as_hardware(hardware) if hardware is not None else default_profile(device)
    if suite:
        if fields or model is not None or trace is not None or policy is not None:
            given = ", ".join([*fields, *(n for n, v in (("model", model), ("trace", trace), ("policy", policy)) if v)])
            raise ConfigError("suite", f"the suite fixes its configurations; drop {given} or suite=True")
        folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="tiersim-suite-"))
        result = run_suite(device, profile, folder, quick=quick, progress=progress)
        if out is not None:
            write_json(Path(out) / "validate_suite.json", result)
        return result
    rest, policy = split_fields(fields, ValidateConfig, policy, skip=("model", "profile", "device", "trace"))
    tr = load_trace(Path(trace) if trace is not None else None)
    cfg = ValidateConfig(model=resolve_model(None, tr) if model is None else as_model(model), profile=profile,
                         policy=policy, device=device, trace=Path(tr.path), **rest)
    report = run(cfg, tr)
    if out is not None:
        write_json(Path(out) / "validate.json", report)
    return report


def calibrate(device: str = "cpu", model: str | os.PathLike | ModelSpec | None = None, *, quick: bool = False,
              name: str | None = None, repeat: int = 1) -> Calibration:
    """Measure this machine (`.profile`, `.raw`; `.write(path)` saves both) with `model`'s layer shapes; with
    `repeat` N, N whole measurements pooled (their medians' median), the spread between them kept."""
    from tiersim.hw.calibrate import calibrate as run

    chosen = model if model is not None else ("r1-qwen-7b" if device.startswith("cuda") else "r1-qwen-1.5b")
    return run(device, as_model(chosen), quick, name, repeat=repeat)
