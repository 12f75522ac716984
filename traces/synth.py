"""Synthetic attention traces with the structure of real reasoning traces.

Each attention row (the query at position q over positions 0..q) mixes four parts, each
normalised over the row and weighted by its mass, then the row is renormalised to sum to 1:

- sinks: the first prompt tokens and the first generated tokens, geometric weights;
- recency: (1 + d / scale) ** -exponent over the distance d = q - i;
- heavy hitters: a sparse set of positions (prompt and generated) with log-normal importance
  that fades as exp(-age / lifetime) with an exponential lifetime per hitter, and per-step
  log-normal jitter; new ones keep appearing among freshly generated tokens;
- background: static Gamma(concentration) weights per position times per-step noise.

A part with no position in a row (no heavy hitter yet, say) gives its mass to the others.
Prefill column sums are the column sums of the P causal prompt rows built the same way.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tiersim.errors import TiersimError
from tiersim.traces.format import Request, increments_length, to_float16, write_trace

Length = int | tuple[int, int]


@dataclass(frozen=True, slots=True)
class SynthParams:
    """Knobs of the synthetic attention model (masses are shares of each row's total of 1)."""

    vocab_size: int = 32000  # token ids are uniform in 0..vocab_size-1
    sink_tokens: int = 4  # prompt positions 0..sink_tokens-1 are sinks
    generated_sink_tokens: int = 4  # the first generated positions that are sinks
    sink_mass: float = 0.35  # share of every row on the sinks
    generated_sink_share: float = 0.25  # share of the sink mass on generated sinks, once they exist
    sink_decay: float = 0.5  # geometric ratio of weights within each sink group
    recency_mass: float = 0.3  # share on the recency profile
    recency_scale_tokens: float = 16.0  # distance at which the recency weight starts falling
    recency_exponent: float = 1.5  # power-law exponent of the recency weight
    heavy_fraction: float = 0.05  # probability that a (non-sink) position is a heavy hitter
    heavy_mass: float = 0.2  # share on the heavy hitters alive in the row
    heavy_sigma: float = 1.0  # log-normal sigma of heavy-hitter importance
    heavy_lifetime_steps: float = 1024.0  # mean (exponential) lifetime in decode steps; inf: never fade
    heavy_jitter_sigma: float = 0.25  # per-step log-normal noise on heavy-hitter weights
    background_concentration: float = 0.5  # Gamma shape of static background weights (small: uneven)
    background_jitter: float = 0.5  # 0: static background, 1: fully exponential per-step noise

    def __post_init__(self) -> None:
        """Refuse values outside the model's meaning."""
        for name in ("vocab_size", "sink_tokens", "generated_sink_tokens"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < (1 if name == "vocab_size" else 0):
                raise TiersimError(f"SynthParams.{name} must be an integer >= {int(name == 'vocab_size')},"
                                   f" got {value!r}")
        unit = ("sink_mass", "generated_sink_share", "recency_mass", "heavy_fraction", "heavy_mass",
                "background_jitter")
        for name in unit:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise TiersimError(f"SynthParams.{name} must lie in [0, 1], got {getattr(self, name)!r}")
        positive = ("recency_scale_tokens", "recency_exponent", "heavy_lifetime_steps", "background_concentration")
        for name in positive:
            if not getattr(self, name) > 0:
                raise TiersimError(f"SynthParams.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("heavy_sigma", "heavy_jitter_sigma"):
            if not 0.0 <= getattr(self, name) < math.inf:
                raise TiersimError(f"SynthParams.{name} must be finite and >= 0, got {getattr(self, name)!r}")
        if not 0.0 < self.sink_decay <= 1.0:
            raise TiersimError(f"SynthParams.sink_decay must lie in (0, 1], got {self.sink_decay!r}")
        if self.sink_mass + self.recency_mass + self.heavy_mass > 1.0 + 1e-9:
            raise TiersimError("SynthParams: sink_mass + recency_mass + heavy_mass must not exceed 1,"
                               f" got {self.sink_mass + self.recency_mass + self.heavy_mass:.6g}")

    @property
    def background_mass(self) -> float:
        """Share of every row on the diffuse background (what the other parts leave)."""
        return max(0.0, 1.0 - self.sink_mass - self.recency_mass - self.heavy_mass)

    def to_dict(self) -> dict:
        """Plain dict of the fields (for trace metadata)."""
        return asdict(self)


class _RowModel:
    """Per-request state of the attention model; fill() writes the row of one query position."""

    def __init__(self, params: SynthParams, prompt_tokens: int, positions: int, rng: np.random.Generator) -> None:
        p, self.params, self.rng, self.prompt_tokens, self.positions = params, params, rng, prompt_tokens, positions
        f32 = np.float32
        self.base = rng.gamma(p.background_concentration, size=positions).astype(f32)
        # Background = base x (jitter x Exp(1) noise + 1 - jitter). The noise of a row is a random window
        # of one pool drawn per request: one slice instead of a fresh draw per row (rows are the hot loop).
        self.base_jitter = self.base * f32(p.background_jitter)
        self.base_still = self.base * f32(1.0 - p.background_jitter)
        self.noise_pool = rng.standard_exponential(2 * positions + 1, dtype=f32)
        d = np.arange(positions, dtype=np.float64)
        recency = (1.0 + d / p.recency_scale_tokens) ** -p.recency_exponent
        self.recency_cum = np.cumsum(recency)
        self.recency_rev = recency[::-1].astype(f32)
        prompt_sinks = np.arange(min(p.sink_tokens, prompt_tokens))
        gen_sinks = prompt_tokens + np.arange(min(p.generated_sink_tokens, positions - prompt_tokens))
        self.prompt_sinks = prompt_sinks
        self.prompt_sink_w = p.sink_decay ** np.arange(prompt_sinks.size)
        self.gen_sinks = gen_sinks
        self.gen_sink_w = p.sink_decay ** np.arange(gen_sinks.size)
        heavy = rng.random(positions) < p.heavy_fraction
        heavy[prompt_sinks] = False
        heavy[gen_sinks] = False
        self.heavy_pos = np.flatnonzero(heavy)
        n = self.heavy_pos.size
        self.heavy_imp = rng.lognormal(0.0, p.heavy_sigma, n)
        self.heavy_life = rng.exponential(p.heavy_lifetime_steps, n) if math.isfinite(p.heavy_lifetime_steps) \
            else np.full(n, np.inf)
        self.heavy_life = np.maximum(self.heavy_life, 1.0)
        self.heavy_birth = np.maximum(self.heavy_pos - prompt_tokens, 0)
        self.noise = np.empty(positions, f32)

    def fill(self, q: int, out: np.ndarray) -> None:
        """Write the attention row of the query at position q (length q+1, sums to 1) into out[:q+1]."""
        p, rng, length = self.params, self.rng, q + 1
        seg = out[:length]
        np.multiply(self.recency_rev[self.positions - length:],
                    np.float32(p.recency_mass / self.recency_cum[q]), out=seg)
        if p.background_mass > 0:
            noise = self.noise[:length]
            start = int(rng.integers(self.positions + 1))
            np.multiply(self.noise_pool[start: start + length], self.base_jitter[:length], out=noise)
            noise += self.base_still[:length]
            total = float(noise.sum())
            if total > 0:
                noise *= np.float32(p.background_mass / total)
                seg += noise
        n = int(np.searchsorted(self.heavy_pos, q, side="right"))
        if n and p.heavy_mass > 0:
            step = max(0, q - self.prompt_tokens)
            w = self.heavy_imp[:n] * np.exp(-(step - self.heavy_birth[:n]) / self.heavy_life[:n]
                                            + p.heavy_jitter_sigma * rng.standard_normal(n))
            seg[self.heavy_pos[:n]] += (w * (p.heavy_mass / w.sum())).astype(np.float32)
        if p.sink_mass > 0:
            self._add_sinks(q, seg)
        total = float(seg.sum())
        if total > 0:
            seg *= np.float32(1.0 / total)
        else:
            seg.fill(np.float32(1.0 / length))

    def _add_sinks(self, q: int, seg: np.ndarray) -> None:
        p = self.params
        n_prompt = min(self.prompt_sinks.size, q + 1)
        n_gen = int(np.count_nonzero(self.gen_sinks <= q))
        if not n_prompt and not n_gen:
            return
        gen_share = (p.generated_sink_share if n_prompt else 1.0) if n_gen else 0.0
        for sinks, w, share in ((self.prompt_sinks[:n_prompt], self.prompt_sink_w[:n_prompt], 1.0 - gen_share),
                                (self.gen_sinks[:n_gen], self.gen_sink_w[:n_gen], gen_share)):
            if sinks.size and share > 0:
                seg[sinks] += (w * (p.sink_mass * share / w.sum())).astype(np.float32)


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def synth_request(params: SynthParams, prompt_tokens: int, gen_tokens: int,
                  rng: np.random.Generator | int | None, steps: int | None = None, *,
                  dtype: Any = np.float32) -> Request:
    """One synthetic request; steps defaults to gen_tokens - 1; rows are filled one at a time."""
    p, g = operator.index(prompt_tokens), operator.index(gen_tokens)
    if p < 1 or g < 0:
        raise TiersimError(f"synth: needs prompt_tokens >= 1 and gen_tokens >= 0, got {p} and {g}")
    s = max(g - 1, 0) if steps is None else operator.index(steps)
    if not 0 <= s <= g:
        raise TiersimError(f"synth: steps must lie in 0..gen_tokens = {g}, got {s}")
    rng = _rng(rng)
    token_ids = rng.integers(0, params.vocab_size, p + g, dtype=np.int32)
    model = _RowModel(params, p, p + s, rng)
    scratch = np.empty(p + s, np.float32)
    prefill = np.zeros(p, np.float64)
    for q in range(p):
        model.fill(q, scratch)
        prefill[: q + 1] += scratch[: q + 1]
    increments = np.empty(increments_length(p, s), dtype=dtype)
    convert = to_float16 if increments.dtype == np.float16 else (lambda row: row)
    offset = 0
    for t in range(s):
        length = p + t + 1
        model.fill(p + t, scratch)
        increments[offset: offset + length] = convert(scratch[:length])
        offset += length
    return Request(prompt_tokens=p, generated_tokens=g, token_ids=token_ids,
                   prefill=prefill.astype(np.float32), increments=increments)


def _draw_length(length: Length, rng: np.random.Generator, name: str) -> int:
    if isinstance(length, (tuple, list)):
        if len(length) != 2 or not 0 <= length[0] <= length[1]:
            raise TiersimError(f"synth: {name} range must be (lo, hi) with 0 <= lo <= hi, got {length!r}")
        return int(rng.integers(length[0], length[1], endpoint=True))
    return operator.index(length)


def synth_requests(params: SynthParams, n_requests: int, prompt_tokens: Length, gen_tokens: Length,
                   seed: int, *, steps: int | None = None, dtype: Any = np.float32) -> Iterator[Request]:
    """Yield n_requests synthetic requests; lengths are ints or inclusive (lo, hi) ranges drawn per request.

    Request i depends only on (seed, i, params, lengths), so it is the same whatever n_requests is.
    """
    for child in np.random.SeedSequence(seed).spawn(operator.index(n_requests)):
        rng = np.random.default_rng(child)
        p = _draw_length(prompt_tokens, rng, "prompt_tokens")
        g = _draw_length(gen_tokens, rng, "gen_tokens")
        yield synth_request(params, p, g, rng, None if steps is None else min(steps, g), dtype=dtype)


def write_synth_trace(path: str | os.PathLike, params: SynthParams, n_requests: int, prompt_tokens: Length,
                      gen_tokens: Length, seed: int, *, increments_dtype: Any = "float16") -> Path:
    """Write a synthetic trace (params and seed recorded in metadata['synthetic'])."""
    dtype = np.dtype(increments_dtype)
    lengths = {"n_requests": n_requests, "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens}
    return write_trace(path, synth_requests(params, n_requests, prompt_tokens, gen_tokens, seed, dtype=dtype),
                       model={"id": "synthetic", "shape": {}, "dtype": None},
                       generation={"generator": "tiersim.traces.synth", "seed": seed, **lengths},
                       metadata={"synthetic": {**params.to_dict(), "seed": seed, **lengths}},
                       increments_dtype=dtype)


class ExtendedRequest:
    """A request continued with synthetic rows to `gen_tokens` (or cut to it): the captured rows come first.

    Rows 0..S-1 are the request's own; later rows come from the synthetic model over all positions
    (captured ones included), so a short captured chain can stand for a long one. Rows are made on
    the fly: nothing of size steps x tokens is held.
    """

    def __init__(self, request: Request, params: SynthParams, gen_tokens: int, seed: int):
        if gen_tokens < 2:
            raise TiersimError(f"gen_tokens must be >= 2 to extend a request, got {gen_tokens}")
        self.request, self.params, self.seed = request, params, seed
        self.prompt_tokens = request.prompt_tokens
        self.generated_tokens = gen_tokens
        self.prefill = request.prefill
        self.captured_steps = min(request.steps, gen_tokens - 1)

    @property
    def steps(self) -> int:
        """Decode steps: one per generated token fed back."""
        return self.generated_tokens - 1

    @property
    def synthetic_steps(self) -> int:
        """Steps that come from the synthetic model."""
        return self.steps - self.captured_steps

    def rows(self) -> Iterator[np.ndarray]:
        """Captured rows, then synthetic ones; row t has length prompt_tokens + t + 1."""
        yield from self.request.rows(0, self.captured_steps)
        if self.synthetic_steps == 0:
            return
        positions = self.prompt_tokens + self.steps
        model = _RowModel(self.params, self.prompt_tokens, positions, np.random.default_rng(self.seed))
        scratch = np.empty(positions, np.float32)
        for t in range(self.captured_steps, self.steps):
            model.fill(self.prompt_tokens + t, scratch)
            yield scratch[: self.prompt_tokens + t + 1]
