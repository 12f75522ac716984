"""On-disk reuse of TierSchedules: the policy over a trace request does not depend on hardware or batch.

A sweep over GPUs, batch sizes and strategies replays the same (request, policy, length, seed)
again and again; replay is O(steps x tokens), the rest of a simulation O(steps x layers). Entries
are keyed by the request's own checksums in the trace header, every policy knob, the generated
length, the seed, the synthetic-extension parameters and the tiersim version, so a changed input
never hits a stale entry. Set TIERSIM_CACHE_DIR to move the cache, TIERSIM_CACHE=0 to turn it off.
An unreadable entry is recomputed and rewritten, never trusted. Fits of the synthetic generator to
a trace (used to extend its requests) are kept the same way, keyed by the trace's content.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from tiersim.fileio import write_json, write_npz
from tiersim.policy import PolicyConfig, TierSchedule
from tiersim.traces.format import Trace
from tiersim.traces.synth import SynthParams
from tiersim.version import __version__


def cache_dir(kind: str = "schedules") -> Path | None:
    """Where entries of one kind live, or None when caching is off."""
    if os.environ.get("TIERSIM_CACHE", "1") == "0":
        return None
    root = os.environ.get("TIERSIM_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tiersim"
    return Path(root) / kind


def trace_key(trace: Trace) -> str:
    """A digest of a trace's content: its requests' checksums and its model, as the header records them."""
    ident = {"model": trace.model.get("id"), "requests": trace.header["requests"]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load_fit(key: str) -> SynthParams | None:
    """Synthetic-generator parameters fitted to a trace earlier, or None."""
    root = cache_dir("fits")
    path = root / f"{key}.json" if root else None
    if path is None or not path.exists():
        return None
    try:
        return SynthParams(**json.loads(path.read_text())["params"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_fit(key: str, params: SynthParams, report: dict) -> None:
    """Keep a fit (and its report) for the next simulation of the same trace."""
    root = cache_dir("fits")
    if root is not None:
        try:
            write_json(root / f"{key}.json", {"params": params.to_dict(), "report": report})
        except OSError:
            pass


def entry_key(trace: Trace, index: int, policy: PolicyConfig, gen_tokens: int, seed: int, params: SynthParams) -> str:
    """A digest of everything the schedule of request `index` depends on."""
    ident = {
        "version": __version__,
        "request": trace.header["requests"][index],
        "model": trace.model.get("id"),
        "policy": policy.to_dict(),
        "gen_tokens": gen_tokens,
        "seed": seed,
        "synth": params.to_dict(),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load(key: str, policy: PolicyConfig) -> tuple[TierSchedule, np.ndarray] | None:
    """The cached schedule and table, or None when absent or unreadable."""
    root = cache_dir()
    path = root / f"{key}.npz" if root else None
    if path is None or not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        table = arrays.pop("table")
        prompt, generated = (int(v) for v in arrays.pop("lengths"))
        return TierSchedule.from_arrays(policy, prompt, generated, arrays), table
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
        return None


def store(key: str, schedule: TierSchedule, table: np.ndarray) -> None:
    """Write an entry atomically; a full disk or read-only home only costs the reuse."""
    root = cache_dir()
    if root is None:
        return
    arrays = {**schedule.to_arrays(), "table": table,
              "lengths": np.array([schedule.prompt_tokens, schedule.generated_tokens])}
    try:
        write_npz(root / f"{key}.npz", arrays)
    except OSError:
        pass
