"""The demand of one run: its trace read and checked, its requests' continuation fitted (once, kept),
and the batch's per-step workload built — the same for the simulator (sim/) and the replay (hw/)."""

from __future__ import annotations

import json
from pathlib import Path

from tiersim.errors import TiersimError
from tiersim.traces.default import default_trace_path
from tiersim.traces.format import Trace, read_trace
from tiersim.traces.synth import SynthParams
from tiersim.workload import cache
from tiersim.workload.build import Workload, build_workload
from tiersim.workload.config import RunConfig

_SHAPE_KEYS = ("layers", "heads", "attention_heads", "kv_heads", "head_dim", "hidden", "vocab")


def read_run_trace(path: Path | None) -> Trace:
    """The trace of a run (None: the embedded default), its model header checked."""
    trace = read_trace(default_trace_path() if path is None else path)
    check_trace_model(trace)
    return trace


def check_trace_model(trace: Trace) -> None:
    """The trace must say which model its attention came from, with a readable shape."""
    model = trace.model
    shape = model.get("shape") if isinstance(model, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("id"), str) or not isinstance(shape, dict):
        raise TiersimError(f"{trace.path}: the trace header's model is unreadable (need an id and a shape mapping), "
                           f"got {model!r:.120}")
    bad = [k for k, v in shape.items() if not (isinstance(v, int) and not isinstance(v, bool) and v > 0)
           and k in _SHAPE_KEYS]
    if bad:
        raise TiersimError(f"{trace.path}: the trace header's model shape has unreadable {', '.join(bad)}: {shape!r:.120}")


def continuation_params(trace: Trace) -> SynthParams:
    """Synthetic-generator parameters for extending this trace's requests.

    A synthetic trace carries its own; a captured one is fitted once (tiersim.traces.fit) and the
    fit kept: beside the trace as TRACE.fit.json when shipped that way (the embedded default),
    else in the cache.
    """
    synthetic = trace.metadata.get("synthetic") if isinstance(trace.metadata, dict) else None
    names = SynthParams.__dataclass_fields__
    if synthetic:
        return SynthParams(**{k: v for k, v in synthetic.items() if k in names})
    beside = trace.path.with_name(trace.path.stem + ".fit.json")
    key = cache.trace_key(trace)
    if beside.exists():
        shipped = json.loads(beside.read_text())
        if shipped.get("trace_key") == key:
            return SynthParams(**{k: v for k, v in shipped["params"].items() if k in names})
    params = cache.load_fit(key)
    if params is None:
        # Imported here: the fit needs scipy, which a run over a shipped or cached fit never loads.
        from tiersim.traces.fit import fit_synth_params

        report = fit_synth_params(trace)
        params = report.params
        cache.store_fit(key, params, report.to_dict())
    return params


def run_workload(cfg: RunConfig, trace: Trace | None = None, workers: int | None = None) -> Workload:
    """The batch's per-step workload of a run: policy replayed (or cached) per trace request, totalled per step.

    `trace` overrides `cfg.trace` (already read); `workers` processes replay the policy (default: one per core).
    """
    if trace is None:
        trace = read_run_trace(cfg.trace)
    else:
        check_trace_model(trace)
    return build_workload(trace, cfg.policy, cfg.gen_tokens, cfg.batch, cfg.decode_steps, cfg.seed, cfg.cold_start,
                          continuation_params(trace), workers)
