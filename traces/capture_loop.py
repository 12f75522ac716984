"""Capture's decode loop: generate for a left-padded batch and record every step's attention row.

`capture_batch` runs its own decode loop and reduces every forward pass's attention at once to one
row per request (traces.hf.decode_rows: mean over heads, then layers, float32), so peak memory grows
with the sequence, not with steps × layers × heads × length. Row t of a request is the attention of
the query at position P+t (the t-th generated token, fed back) over positions 0..P+t, as in
format.py: G generated tokens give S = G - 1 rows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from tiersim.errors import TiersimError
from tiersim.traces.format import Request, increments_length, page_offsets, row_offset
from tiersim.traces.hf import (
    DTYPES,
    cache_of,
    checked_attentions,
    decode_rows,
    eos_ids,
    forward_keywords,
    pad_id,
    prefill_scores,
    text_config,
)

INCREMENTS_DTYPES = ("float16", "float32")
_PREFILL_ATTENTION_BYTES = 256 << 20  # attention of one prefill chunk, all layers, float32


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    """Generation and recording settings of one capture (all of them go into the trace header)."""

    max_new_tokens: int = 512
    min_new_tokens: int = 0  # EOS is suppressed until this many tokens were generated
    temperature: float = 0.0  # 0: greedy; > 0: sample from softmax(logits / temperature)
    seed: int = 0  # sampling seed; request i draws from its own stream (seed, i)
    batch_size: int = 8
    chat_template: bool = True
    system: str | None = None  # system message, with the chat template only
    per_layer_pages: int | None = None  # also keep per-layer attention summed over pages of N positions
    device: str = "cpu"
    dtype: str = "float32"
    increments_dtype: str = "float16"

    def __post_init__(self) -> None:
        """Refuse settings that cannot be captured, naming the option."""
        for name, minimum in (("max_new_tokens", 1), ("min_new_tokens", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise TiersimError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")
        if self.min_new_tokens > self.max_new_tokens:
            raise TiersimError(f"--min-new-tokens {self.min_new_tokens} exceeds --max-new-tokens {self.max_new_tokens}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0.0 <= self.temperature < math.inf:
            raise TiersimError(f"--temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise TiersimError(f"--seed must be an integer >= 0, got {self.seed!r}")
        pages = self.per_layer_pages
        if pages is not None and (isinstance(pages, bool) or not isinstance(pages, int) or pages < 1):
            raise TiersimError(f"--per-layer-pages must be an integer >= 1, got {pages!r}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.device)):
            raise TiersimError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise TiersimError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.increments_dtype not in INCREMENTS_DTYPES:
            raise TiersimError(f"increments dtype must be one of {', '.join(INCREMENTS_DTYPES)}, got {self.increments_dtype!r}")
        if self.system is not None and not self.chat_template:
            raise TiersimError("--system needs the chat template (drop --no-chat-template)")

    def to_dict(self) -> dict:
        """Plain dict of the settings."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Captured:
    """One captured request and how its generation ended."""

    request: Request
    stop: str  # "eos" or "length"
    natural_length: int | None = None  # tokens before the first EOS that min_new_tokens suppressed


def _generators(seed: int, first_index: int, n: int) -> list[torch.Generator]:
    """One sampling stream per request, keyed by (seed, request index): batching does not change draws."""
    gens = []
    for i in range(first_index, first_index + n):
        state = np.random.SeedSequence([seed, i]).generate_state(2, np.uint32)
        gens.append(torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))
    return gens


def _choose(logits: torch.Tensor, index: int, config: CaptureConfig, eos: list[int],
            gens: list[torch.Generator]) -> tuple[list[int], list[bool]]:
    """Pick generated token `index` for every row; also say where EOS was suppressed (min_new_tokens)."""
    logits = logits.float()
    suppressed = [False] * logits.shape[0]
    if index < config.min_new_tokens and eos:
        eos_t = torch.tensor(eos, device=logits.device)
        suppressed = torch.isin(logits.argmax(-1), eos_t).tolist()
        logits[:, eos_t] = -math.inf
    if config.temperature == 0:
        return logits.argmax(-1).tolist(), suppressed
    probs = torch.softmax(logits / config.temperature, dim=-1).cpu()
    return [int(torch.multinomial(probs[k], 1, generator=g)) for k, g in enumerate(gens)], suppressed


@dataclass(slots=True)
class _Buffers:
    """The growing arrays of one request in a batch."""

    prompt_ids: list[int]
    pad: int  # left-padding columns before the first real token
    increments: np.ndarray
    pages: np.ndarray | None
    page_offsets: np.ndarray | None
    generated: list[int] = field(default_factory=list)
    steps: int = 0
    stop: str | None = None
    natural_length: int | None = None


def _prefill_chunk(layers: int, heads: int, batch: int, width: int) -> int:
    """Query rows per prefill forward so that one pass's attention stays under _PREFILL_ATTENTION_BYTES."""
    return max(1, min(width, _PREFILL_ATTENTION_BYTES // max(1, layers * heads * batch * width * 4)))


def _buffers(prompt_ids: Sequence[Sequence[int]], config: CaptureConfig, n_layers: int) -> list[_Buffers]:
    width, max_steps = max(len(p) for p in prompt_ids), config.max_new_tokens - 1
    bufs = []
    for p in prompt_ids:
        n_inc = increments_length(len(p), max_steps)
        offsets = page_offsets(len(p), max_steps, config.per_layer_pages) if config.per_layer_pages else None
        pages = None if offsets is None else np.zeros((n_layers, int(offsets[-1])), config.increments_dtype)
        bufs.append(_Buffers(list(map(int, p)), width - len(p), np.zeros(n_inc, config.increments_dtype), pages, offsets))
    return bufs


def capture_batch(model: Any, prompt_ids: Sequence[Sequence[int]], config: CaptureConfig, *, first_index: int = 0,
                  eos_token_ids: Sequence[int] | None = None, pad_token_id: int | None = None,
                  on_tokens: Callable[[int, int], None] | None = None) -> list[Captured]:
    """Generate for a batch of tokenized prompts and record their attention rows; one Captured per prompt.

    Prompts are left-padded; position ids come from the attention mask; each request's rows and prefill
    sums start at its first real token. `on_tokens(new, dropped)` is told the tokens generated per step
    and the token budget a request gave up by stopping early (for progress bars).
    """
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise TiersimError("capture_batch: every prompt needs at least one token")
    eos = list(eos_ids(model) if eos_token_ids is None else eos_token_ids)
    pad = pad_id(model, eos) if pad_token_id is None else int(pad_token_id)
    dev = next(model.parameters()).device
    cache_kw, keep_kw = forward_keywords(model)
    keep = {keep_kw: 1} if keep_kw else {}
    cfg = text_config(model)
    n_layers, n_heads = int(cfg.num_hidden_layers), int(cfg.num_attention_heads)
    b_size, width = len(prompt_ids), max(len(p) for p in prompt_ids)
    bufs = _buffers(prompt_ids, config, n_layers)
    ids = torch.full((b_size, width), pad, dtype=torch.long)
    mask = torch.zeros((b_size, width), dtype=torch.long)
    for b, buf in enumerate(bufs):
        ids[b, buf.pad:] = torch.tensor(buf.prompt_ids, dtype=torch.long)
        mask[b, buf.pad:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ids, mask, positions = ids.to(dev), mask.to(dev), positions.to(dev)
    out_dtype = torch.float16 if config.increments_dtype == "float16" else torch.float32
    gens = _generators(config.seed, first_index, b_size) if config.temperature > 0 else []

    with torch.inference_mode():
        cache = None
        colsum = torch.zeros((b_size, width), dtype=torch.float32, device=dev)
        chunk = _prefill_chunk(n_layers, n_heads, b_size, width)
        for start in range(0, width, chunk):
            stop = min(width, start + chunk)
            out = model(input_ids=ids[:, start:stop], attention_mask=mask[:, :stop],
                        position_ids=positions[:, start:stop], use_cache=True, output_attentions=True,
                        **keep, **({cache_kw: cache} if cache is not None else {}))
            cache = cache_of(out)
            colsum[:, :stop] += prefill_scores(checked_attentions(out, stop), mask[:, start:stop].float())
        prefill = colsum.cpu().numpy()
        logits = out.logits[:, -1, :]
        del out

        active = list(range(b_size))  # request index of each batch row
        last_pos = positions[:, -1].clone()
        index = 0  # index of the generated token being chosen
        while True:
            chosen, suppressed = _choose(logits, index, config, eos, [gens[b] for b in active] if gens else [])
            finished = []
            for row, b in enumerate(active):
                buf = bufs[b]
                buf.generated.append(chosen[row])
                if suppressed[row] and buf.natural_length is None:
                    buf.natural_length = index
                if chosen[row] in eos:
                    buf.stop = "eos"
                elif len(buf.generated) == config.max_new_tokens:
                    buf.stop = "length"
                if buf.stop:
                    finished.append(row)
            if on_tokens:
                on_tokens(len(active), sum(config.max_new_tokens - len(bufs[active[r]].generated) for r in finished))
            if len(finished) == len(active):
                break
            feed = torch.tensor(chosen, dtype=torch.long, device=dev)
            if finished and hasattr(cache, "batch_select_indices"):
                keep_rows = [r for r in range(len(active)) if r not in finished]
                sel = torch.tensor(keep_rows, device=dev)
                cache.batch_select_indices(sel)
                feed, mask, last_pos = feed[sel], mask[sel], last_pos[sel]
                active = [active[r] for r in keep_rows]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            last_pos = last_pos + 1
            out = model(input_ids=feed[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                        use_cache=True, output_attentions=True, **keep, **{cache_kw: cache})
            per_layer = decode_rows(checked_attentions(out, mask.shape[1]))  # (layers, rows, keys)
            rows = per_layer.mean(0).to(out_dtype).cpu().numpy()
            layer_rows = per_layer.cpu().numpy() if config.per_layer_pages else None  # summed in float32
            logits = out.logits[:, -1, :]
            del out, per_layer
            for row, b in enumerate(active):
                buf = bufs[b]
                if buf.stop:
                    continue
                length = len(buf.prompt_ids) + index + 1
                start = row_offset(len(buf.prompt_ids), index)
                buf.increments[start: start + length] = rows[row, buf.pad:]
                if layer_rows is not None:
                    _add_pages(buf, index, layer_rows[:, row, buf.pad:], config.per_layer_pages)
                buf.steps = index + 1
            index += 1
    return [_captured(buf, prefill[b, buf.pad:], config) for b, buf in enumerate(bufs)]


def _add_pages(buf: _Buffers, t: int, layer_row: np.ndarray, page_size: int) -> None:
    """Sum one step's per-layer row over pages of page_size positions (the last page may be partial)."""
    n_layers, length = layer_row.shape
    n_pages = -(-length // page_size)
    padded = np.zeros((n_layers, n_pages * page_size), np.float32)
    padded[:, :length] = layer_row
    start = int(buf.page_offsets[t])
    buf.pages[:, start: start + n_pages] = padded.reshape(n_layers, n_pages, page_size).sum(-1, dtype=np.float32)


def _captured(buf: _Buffers, prefill: np.ndarray, config: CaptureConfig) -> Captured:
    p, s = len(buf.prompt_ids), buf.steps
    pages = None
    if buf.pages is not None:
        pages = np.ascontiguousarray(buf.pages[:, : int(buf.page_offsets[s])])
    request = Request(prompt_tokens=p, generated_tokens=len(buf.generated),
                      token_ids=np.array(buf.prompt_ids + buf.generated, dtype=np.int32),
                      prefill=np.ascontiguousarray(prefill, dtype=np.float32),
                      increments=buf.increments[: increments_length(p, s)].copy(),
                      layer_pages=pages, page_size=config.per_layer_pages if pages is not None else None)
    return Captured(request, buf.stop or "length", buf.natural_length)
