"""Capture real attention traces from local Hugging Face causal LMs into a trace file, resumably.

`capture_trace` ties the steps together: resolve the model (traces/hf.py, never the network), read
the prompts (capture_prompts.py), load the model with eager attention, run capture_loop.capture_batch
over batches of prompts, and write the trace. Long captures survive interruption: each finished
batch is saved in a hidden `.OUT.partial/` folder beside the output (capture_resume.py), `resume=True`
continues from there, and the complete trace is merged into OUT atomically.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiersim.errors import TiersimError
from tiersim.fileio import write_json
from tiersim.traces.capture_loop import CaptureConfig, Captured, capture_batch
from tiersim.traces.capture_prompts import Prompt, answer_correct, as_prompts
from tiersim.traces.capture_resume import batch_path, manifest, merge, open_partial, partial_dir
from tiersim.traces.format import write_trace
from tiersim.traces.hf import ModelSource, encode_prompts, eos_ids, load_model, pad_id, resolve_model, text_config

__all__ = ["CaptureConfig", "CaptureResult", "capture_trace", "partial_dir"]


@dataclass(frozen=True, slots=True)
class CaptureResult:
    """What capture_trace wrote: the file, one summary dict per request, and timings."""

    path: Path
    requests: list[dict]
    wall_s: float  # seconds of generation over all runs (resumed ones included)
    batches: int
    resumed_batches: int  # batches taken from an earlier, interrupted run

    def to_dict(self) -> dict:
        """Plain dict (path as text)."""
        return {"path": str(self.path), "requests": self.requests, "wall_s": self.wall_s,
                "batches": self.batches, "resumed_batches": self.resumed_batches}


def capture_trace(model: str | os.PathLike, prompts: str | os.PathLike | Sequence[Prompt | str],
                  out: str | os.PathLike, config: CaptureConfig | None = None, *, gguf_file: str | None = None,
                  resume: bool = False, progress: bool = False, prompts_name: str | None = None,
                  on_batch: Callable[[int, int], None] | None = None) -> CaptureResult:
    """Capture a trace of `prompts` (a JSONL path or a list) from a local model into `out`, resumably.

    Every input is checked before the model loads and nothing is written at `out` until the whole
    trace is merged there atomically. Each finished batch goes to partial_dir(out) first; after an
    interruption `resume=True` continues with the same settings. `on_batch(k, n)` runs after batch k
    of n is saved (tests use it to interrupt).
    """
    config = config or CaptureConfig()
    out = Path(out)
    _check_out(out)
    if prompts_name is None and isinstance(prompts, (str, os.PathLike)):
        prompts_name = Path(prompts).name
    prompt_list = as_prompts(prompts)
    source = resolve_model(model, gguf_file)
    n = len(prompt_list)
    batches = [range(i, min(i + config.batch_size, n)) for i in range(0, n, config.batch_size)]
    wanted = manifest(source, config, prompt_list)
    done = open_partial(out, wanted, resume, len(batches))
    folder = partial_dir(out)

    if done < len(batches):
        _capture_batches(source, prompt_list, batches, done, config, folder, wanted, prompts_name, progress, on_batch)
    rows, wall = merge(out, folder, len(batches), done)
    return CaptureResult(out, rows, wall, len(batches), done)


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise TiersimError(f"--out {out} is a directory; give a file name such as {out / 'capture.tstrace'}")
    if not out.parent.is_dir():
        raise TiersimError(f"--out {out}: the directory {out.parent} does not exist; create it first")


def _capture_batches(source: ModelSource, prompts: list[Prompt], batches: list[range], done: int,
                     config: CaptureConfig, folder: Path, wanted: dict, prompts_name: str | None, progress: bool,
                     on_batch: Callable[[int, int], None] | None) -> None:
    """Load the model, capture batches done.., and save each as its own small trace in `folder`."""
    loaded = load_model(source, config.device, config.dtype)
    ids = encode_prompts(loaded.tokenizer, prompts, chat_template=config.chat_template, system=config.system)
    limit = getattr(text_config(loaded.model), "max_position_embeddings", None)
    longest = max(len(ids[i]) for b in batches[done:] for i in b)
    if limit and longest + config.max_new_tokens > limit:
        raise TiersimError(f"the longest prompt has {longest} tokens; with --max-new-tokens {config.max_new_tokens}"
                           f" it exceeds the model's {limit} positions")
    eos = eos_ids(loaded.model, loaded.tokenizer)
    pad = pad_id(loaded.model, eos)
    generation = {"generator": "tiersim.traces.capture", **config.to_dict(), "greedy": config.temperature == 0,
                  "attn_implementation": "eager", "eos_token_ids": eos, "pad_token_id": pad,
                  "prompts_file": prompts_name}
    with _progress(progress, sum(map(len, batches[done:])) * config.max_new_tokens) as on_tokens:
        for k in range(done, len(batches)):
            t0 = time.perf_counter()
            batch = batches[k]
            captured = capture_batch(loaded.model, [ids[i] for i in batch], config, first_index=batch.start,
                                     eos_token_ids=eos, pad_token_id=pad, on_tokens=on_tokens)
            info = [_request_info(prompts[i], c, loaded.tokenizer) for i, c in zip(batch, captured)]
            if not folder.exists():
                folder.mkdir()
                write_json(folder / "manifest.json", wanted)
            write_trace(batch_path(folder, k), [c.request for c in captured], model=loaded.header(),
                        generation=generation, metadata={"requests": info, "wall_s": time.perf_counter() - t0},
                        increments_dtype=config.increments_dtype)
            if on_batch:
                on_batch(k, len(batches))


def _request_info(prompt: Prompt, captured: Captured, tokenizer: Any) -> dict:
    gen = captured.request.generated_ids.tolist()
    end = captured.natural_length if captured.natural_length is not None else len(gen)
    info: dict[str, Any] = {"id": prompt.id, "stop": captured.stop, "natural_length": captured.natural_length}
    if prompt.answer is not None:
        got, correct = answer_correct(tokenizer.decode(gen[:end], skip_special_tokens=True), prompt.answer)
        info.update(answer=prompt.answer, model_answer=got, correct=correct)
    return info


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar (tokens/s, ETA) on stderr, or nothing."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class TokensPerSecond(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed or 0.0:.1f} tok/s")

    with Progress(TextColumn("capture"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), TokensPerSecond(),
                  TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task("capture", total=total)

        def update(new: int, dropped: int) -> None:
            if dropped:
                bar.update(task, total=bar.tasks[0].total - dropped)
            bar.advance(task, new)

        yield update
