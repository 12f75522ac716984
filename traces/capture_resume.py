"""Resumable captures: finished batches wait in a hidden `.OUT.partial/` folder beside the output.

Each finished batch is saved there as its own small trace, with a manifest of the model, settings
and prompts. A resumed capture must match that manifest and continues after the last readable
batch; `merge` writes every batch into OUT atomically and removes the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from tiersim.errors import TiersimError, TraceError
from tiersim.traces.capture_loop import CaptureConfig
from tiersim.traces.capture_prompts import Prompt
from tiersim.traces.format import read_trace, write_trace
from tiersim.traces.hf import ModelSource, versions
from tiersim.version import __version__


def partial_dir(out: str | os.PathLike) -> Path:
    """The hidden folder beside OUT that holds the finished batches of an unfinished capture."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def batch_path(folder: Path, k: int) -> Path:
    """File of batch k in a partial folder."""
    return folder / f"batch-{k:05d}.tstrace"


def _prompt_hash(p: Prompt) -> str:
    return hashlib.sha256(json.dumps([p.id, p.text, p.answer]).encode()).hexdigest()


def manifest(source: ModelSource, config: CaptureConfig, prompts: Sequence[Prompt]) -> dict:
    """What a resumed capture must match: the model's files, the settings and the prompts (hashed)."""
    return {"format": "tiersim-capture-partial", "tool_version": __version__,
            "model": source.fingerprint(), "config": config.to_dict(),
            "prompts": [_prompt_hash(p) for p in prompts]}


def _differences(old: dict, new: dict) -> list[str]:
    diffs = []
    for key in ("model", "config"):
        a, b = old.get(key, {}), new[key]
        diffs += [f"{key} {k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if old.get("prompts") != new["prompts"]:
        diffs.append(f"prompts: {len(old.get('prompts', []))} then, {len(new['prompts'])} now (or their text differs)")
    return diffs


def open_partial(out: Path, wanted: dict, resume: bool, n_batches: int) -> int:
    """Check an existing partial capture against this one's manifest; return how many batches it already holds."""
    folder = partial_dir(out)
    if not folder.exists():
        return 0
    if not resume:
        raise TiersimError(f"{folder} holds an unfinished capture of {out}: pass --resume to continue it,"
                           " or delete that folder to start over")
    try:
        old = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TiersimError(f"{folder}/manifest.json: unreadable ({e}); delete {folder} to start over") from None
    diffs = _differences(old, wanted)
    if diffs:
        raise TiersimError(f"--resume: {folder} was captured with other settings ({'; '.join(diffs)}); rerun with"
                           f" the same settings, or delete {folder} to start over")
    done = 0
    while done < n_batches and batch_path(folder, done).is_file():
        try:
            read_trace(batch_path(folder, done)).close()
        except TraceError:
            break
        done += 1
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    return done


def merge(out: Path, folder: Path, n_batches: int, resumed: int) -> tuple[list[dict], float]:
    """Write every saved batch into `out` atomically (header from the first), then remove the partial folder.

    Returns one summary row per request (its metadata plus prompt and generated token counts) and the
    seconds of generation over all batches.
    """
    traces = [read_trace(batch_path(folder, k)) for k in range(n_batches)]
    model, generation = traces[0].model, traces[0].generation
    info = [r for tr in traces for r in tr.metadata["requests"]]
    wall = float(sum(tr.metadata["wall_s"] for tr in traces))
    metadata = {"versions": versions(), "requests": info, "wall_s": wall, "resumed_batches": resumed,
                "command": shlex.join(["tiersim", *sys.argv[1:]]) if Path(sys.argv[0]).name == "tiersim" else None}
    write_trace(out, (req for tr in traces for req in tr), model=model, generation=generation, metadata=metadata,
                increments_dtype=generation["increments_dtype"])
    rows = []
    for tr in traces:
        for entry, req_info in zip(tr.header["requests"], tr.metadata["requests"]):
            rows.append({**req_info, "prompt_tokens": entry["prompt_tokens"], "generated_tokens": entry["generated_tokens"]})
        tr.close()
    shutil.rmtree(folder)
    return rows, wall
