"""THE tiering policy: cumulative-attention scores sort KV tokens into HBM, DDR, compressed and evicted.

One state machine, two entry points: `TieringPolicy.step` (online, one decode step at a time, used
by a live cache) and `replay` (offline, a whole trace request into a `TierSchedule`, used by the
simulator and the replay validator). Pure numpy, no I/O. Semantics: DESIGN.md §1 and §3.

Timeline of decode step t (0-based) of a request with a P-token prompt: the token at position P+t
is appended to the cache in HBM, its query attends over positions 0..P+t and those weights are added
to the scores; if t+1 generated tokens are now cached, t+1 is a multiple of `interval` and
t+1 > sinks + window, the cache is re-tiered at the end of the step, effective from step t+1.

Eviction modes: `target` (default: r of all candidates evicted in total, offloaded tokens re-scored
and promotable), `compound` (the authors' accuracy code: each round evicts r of the survivors) and
`prototype` (the authors' system prototype, `manage_cache`: only HBM-resident candidates are re-tiered;
a round with fewer than `PROTOTYPE_MIN_CANDIDATES` of them is skipped and is no re-tier point).

One concept past ~400 lines: the online step and the offline replay share one state machine, and
the three eviction modes are branches of its re-tier; splitting them would put the semantics in two places.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from tiersim.errors import PolicyError

HBM, DDR, COMPRESSED, EVICTED = 0, 1, 2, 3
TIER_NAMES = ("hbm", "ddr", "compressed", "evicted")
EVICTION_MODES = ("target", "compound", "prototype")
# manage_cache returns early when fewer GPU-resident candidates than this are left (DESIGN.md §1).
PROTOTYPE_MIN_CANDIDATES = 10
COMPRESSED_BITS = (2, 4, 8)
TRANSITION_KINDS = ("demoted", "promoted", "compressed", "decompressed", "evicted")


def _check_ratio(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise PolicyError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_int(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise PolicyError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The knobs of the method; defaults are the paper's (DESIGN.md §1) with non-compounding eviction.

    `page_size` is the tiering unit in tokens. None means "the run's KV block": a simulation or replay
    (`for_block_size`) tiers whole blocks, except in the `prototype` mode, which works per token as the
    authors' `manage_cache` did (None → 1 there). A policy used on its own (`TieringPolicy`, `replay`
    without a run) treats None as 1: per token. A given page_size is always kept (`--page-size 1
    --block-size 16` tiers single tokens inside 16-token blocks).
    """

    hbm_ratio: float = 0.5
    evict_ratio: float = 0.03
    sinks: int = 4
    window: int = 128
    interval: int = 64
    compressed_ratio: float = 0.0
    compressed_bits: int = 8
    page_size: int | None = None
    eviction: str = "target"
    sticky: bool = False

    def __post_init__(self) -> None:
        _check_ratio("hbm_ratio", self.hbm_ratio)
        _check_ratio("evict_ratio", self.evict_ratio)
        _check_ratio("compressed_ratio", self.compressed_ratio)
        _check_int("sinks", self.sinks, 0)
        _check_int("window", self.window, 0)
        _check_int("interval", self.interval, 1)
        if self.page_size is not None:
            _check_int("page_size", self.page_size, 1)
        if self.compressed_bits not in COMPRESSED_BITS or isinstance(self.compressed_bits, bool):
            raise PolicyError(f"compressed_bits must be one of {COMPRESSED_BITS}, got {self.compressed_bits!r}")
        if self.eviction not in EVICTION_MODES:
            raise PolicyError(f"eviction must be one of {EVICTION_MODES}, got {self.eviction!r}")
        if not isinstance(self.sticky, bool):
            raise PolicyError(f"sticky must be true or false, got {self.sticky!r}")
        if self.eviction == "prototype" and self.compressed_ratio > 0:
            raise PolicyError(f"compressed_ratio must be 0 with eviction 'prototype' (the authors' prototype has "
                              f"no compressed tier), got {self.compressed_ratio!r}")

    @property
    def unit(self) -> int:
        """Tokens per tiering unit when the policy runs on its own: page_size, or 1 (per token) when unset."""
        return 1 if self.page_size is None else self.page_size

    def for_block_size(self, block_size: int) -> PolicyConfig:
        """This policy inside a run whose KV blocks hold `block_size` tokens: an unset page_size becomes the block
        (the prototype's: 1, it tiers tokens); a given one is kept."""
        if self.page_size is not None:
            return self
        return replace(self, page_size=1 if self.eviction == "prototype" else block_size)

    @property
    def freezes_offloaded(self) -> bool:
        """Whether tokens off HBM stop being scored (`sticky`, and always in the prototype, whose DDR
        tokens are no longer in the cache the model attends over)."""
        return self.sticky or self.eviction == "prototype"

    def to_dict(self) -> dict:
        """Plain dict of the knobs, for headers and summaries."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class TierChanges:
    """What one decode step changes: token positions and the tier each moves from and to."""

    step: int
    positions: np.ndarray
    from_tier: np.ndarray
    to_tier: np.ndarray
    retiered: bool = False

    def __len__(self) -> int:
        return len(self.positions)

    def of_kind(self, kind: str) -> np.ndarray:
        """Positions of one transition kind (see `TRANSITION_KINDS`)."""
        return self.positions[_kind_mask(kind, self.from_tier, self.to_tier)]

    @property
    def demoted(self) -> np.ndarray:
        """HBM → DDR."""
        return self.of_kind("demoted")

    @property
    def promoted(self) -> np.ndarray:
        """DDR or compressed → HBM."""
        return self.of_kind("promoted")

    @property
    def compressed(self) -> np.ndarray:
        """HBM or DDR → compressed."""
        return self.of_kind("compressed")

    @property
    def evicted(self) -> np.ndarray:
        """Anything → evicted (never returns)."""
        return self.of_kind("evicted")


def _kind_mask(kind: str, from_tier: np.ndarray, to_tier: np.ndarray) -> np.ndarray:
    if kind == "demoted":
        return (from_tier == HBM) & (to_tier == DDR)
    if kind == "promoted":
        return to_tier == HBM
    if kind == "compressed":
        return to_tier == COMPRESSED
    if kind == "decompressed":
        return (from_tier == COMPRESSED) & (to_tier == DDR)
    if kind == "evicted":
        return to_tier == EVICTED
    raise PolicyError(f"unknown transition kind {kind!r}; accepted: {', '.join(TRANSITION_KINDS)}")


_NO_MOVES = np.zeros(0, dtype=np.int64)
_NO_TIERS = np.zeros(0, dtype=np.int8)


class TieringPolicy:
    """The online state machine: per-position scores and tiers of one request's KV cache."""

    def __init__(self, config: PolicyConfig, prefill: np.ndarray, expected_steps: int = 0):
        prefill = np.asarray(prefill)
        if prefill.ndim != 1:
            raise PolicyError(f"prefill scores must be a 1-D array over the prompt, got shape {prefill.shape}")
        if not np.all(np.isfinite(prefill)) or (prefill.size and prefill.min() < 0):
            raise PolicyError("prefill scores must be finite and non-negative")
        self.config = config
        self.prompt_tokens = len(prefill)
        self.steps_done = 0
        self._length = self.prompt_tokens
        capacity = max(16, self.prompt_tokens + max(expected_steps, 0) + 1)
        self._scores = np.zeros(capacity, dtype=np.float64)
        self._scores[: self.prompt_tokens] = prefill
        self._tiers = np.zeros(capacity, dtype=np.int8)

    @property
    def length(self) -> int:
        """Positions currently in the cache (prompt plus generated tokens fed so far)."""
        return self._length

    @property
    def scores(self) -> np.ndarray:
        """Cumulative attention score per position (read-only view)."""
        view = self._scores[: self._length]
        view.flags.writeable = False
        return view

    @property
    def tiers(self) -> np.ndarray:
        """Tier per position, HBM=0 DDR=1 COMPRESSED=2 EVICTED=3 (read-only view)."""
        view = self._tiers[: self._length]
        view.flags.writeable = False
        return view

    def _grow(self, needed: int) -> None:
        if needed <= len(self._scores):
            return
        capacity = max(needed, 2 * len(self._scores))
        self._scores = np.concatenate([self._scores, np.zeros(capacity - len(self._scores))])
        self._tiers = np.concatenate([self._tiers, np.zeros(capacity - len(self._tiers), dtype=np.int8)])

    def step(self, increments: np.ndarray) -> TierChanges:
        """Feed one decode step's attention over positions 0..P+t; return the tier changes to apply."""
        length = self._length + 1
        increments = np.asarray(increments)
        self._check(increments)
        self._grow(length)
        self._tiers[length - 1] = HBM
        self._scores[length - 1] = 0.0
        scores = self._scores[:length]
        if self.config.freezes_offloaded:
            # The authors' prototype never re-scored offloaded tokens.
            scores += np.where(self._tiers[:length] == HBM, increments, 0.0)
        else:
            scores += increments
        self._length = length
        step = self.steps_done
        self.steps_done += 1
        generated = length - self.prompt_tokens
        cfg = self.config
        if generated % cfg.interval == 0 and generated > cfg.sinks + cfg.window:
            return self._retier(step)
        return TierChanges(step, _NO_MOVES, _NO_TIERS, _NO_TIERS)

    def _check(self, increments: np.ndarray) -> None:
        """Refuse the next step's increments unless they cover every cached position and are finite and non-negative."""
        length = self._length + 1
        if increments.shape != (length,):
            raise PolicyError(
                f"step {self.steps_done}: increments must have length {length} (prompt {self.prompt_tokens} "
                f"+ {self.steps_done + 1} generated), got shape {increments.shape}"
            )
        # Two passes catch everything: min is NaN if any value is, the sum is inf if any value is.
        if not increments.min() >= 0 or not np.isfinite(increments.sum()):
            raise PolicyError(f"step {self.steps_done}: increments must be finite and non-negative")

    def _retier(self, step: int) -> TierChanges:
        cfg, n = self.config, self.config.unit
        first, stop = candidate_pages(cfg, self.prompt_tokens, self._length)
        lo, hi = first * n, stop * n
        old = self._tiers[lo:hi:n].copy()
        page_scores = self._scores[lo:hi].reshape(-1, n).sum(axis=1)
        new = _assign_prototype(cfg, old, page_scores) if cfg.eviction == "prototype" else \
            _assign_tiers(cfg, old, page_scores)
        if new is None:  # a skipped prototype round: not a re-tier point
            return TierChanges(step, _NO_MOVES, _NO_TIERS, _NO_TIERS)
        moved = np.flatnonzero(new != old)
        if moved.size == 0:
            return TierChanges(step, _NO_MOVES, _NO_TIERS, _NO_TIERS, retiered=True)
        positions = ((first + moved)[:, None] * n + np.arange(n)[None, :]).ravel()
        from_tier = np.repeat(old[moved], n)
        to_tier = np.repeat(new[moved], n)
        self._tiers[positions] = to_tier
        return TierChanges(step, positions.astype(np.int64), from_tier, to_tier, retiered=True)


def _assign_tiers(cfg: PolicyConfig, old: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """New tier per candidate unit (token or page) from its old tier and its score."""
    new = old.copy()
    alive = np.flatnonzero(old != EVICTED)
    # Ascending by score; ties go to the earlier position first (stable sort).
    alive = alive[np.argsort(scores[alive], kind="stable")]
    n_evicted = len(old) - len(alive)
    if cfg.eviction == "compound":
        n_evict = math.floor(cfg.evict_ratio * len(alive))
    else:
        n_evict = max(0, math.floor(cfg.evict_ratio * len(old)) - n_evicted)
    new[alive[:n_evict]] = EVICTED
    rest = alive[n_evict:]
    n_hbm = math.floor(cfg.hbm_ratio * len(rest))
    if cfg.sticky:
        return _assign_sticky(cfg, old, new, rest, n_hbm)
    top = rest[len(rest) - n_hbm :]
    offloaded = rest[: len(rest) - n_hbm]
    n_compressed = math.floor(cfg.compressed_ratio * len(offloaded))
    new[top] = HBM
    new[offloaded[:n_compressed]] = COMPRESSED
    new[offloaded[n_compressed:]] = DDR
    return new


def _assign_sticky(cfg: PolicyConfig, old: np.ndarray, new: np.ndarray, rest: np.ndarray, n_hbm: int) -> np.ndarray:
    """The authors' prototype: offloaded units never come back; only HBM residents are demoted."""
    resident = rest[old[rest] == HBM]
    n_demote = max(0, len(resident) - n_hbm)
    new[resident[:n_demote]] = DDR
    offloaded = rest[new[rest] != HBM]
    n_compress = math.floor(cfg.compressed_ratio * len(offloaded)) - int(np.sum(new[offloaded] == COMPRESSED))
    if n_compress > 0:
        in_ddr = offloaded[new[offloaded] == DDR]
        new[in_ddr[:n_compress]] = COMPRESSED
    return new


def _assign_prototype(cfg: PolicyConfig, old: np.ndarray, scores: np.ndarray) -> np.ndarray | None:
    """The authors' `manage_cache`: re-tier only the HBM-resident candidates; None when the round is skipped.

    Of the n resident units, the ⌊r·n⌋ lowest-scored are evicted, the ⌊β·n⌋ highest-scored stay in
    HBM and the rest go to DDR; DDR units are never evicted, re-scored or promoted. When β + r > 1
    the two floors can overlap: eviction goes first (as in `target`) and HBM keeps what is left.
    """
    resident = np.flatnonzero(old == HBM)
    n = len(resident)
    if n < PROTOTYPE_MIN_CANDIDATES:
        return None
    # Ascending by score; ties go to the earlier position first (stable sort), as in `_assign_tiers`.
    resident = resident[np.argsort(scores[resident], kind="stable")]
    n_evict = math.floor(cfg.evict_ratio * n)
    n_keep = min(math.floor(cfg.hbm_ratio * n), n - n_evict)
    new = old.copy()
    new[resident[:n_evict]] = EVICTED
    new[resident[n_evict: n - n_keep]] = DDR
    return new


class TraceRequest(Protocol):
    """What `replay` needs of a trace request (tiersim.traces.format.Request provides it)."""

    prefill: np.ndarray
    generated_tokens: int

    @property
    def steps(self) -> int: ...

    def rows(self) -> Iterable[np.ndarray]: ...


@dataclass(frozen=True, slots=True)
class TierSchedule:
    """A request's tiering over its decode steps, as arrays; memory O(steps + tokens + moves).

    `counts[t]` and `mass[t]` describe what the attention of step t saw (before a re-tier at its end).
    Re-tier point k happened at the end of step `retier_steps[k]`; its moves are
    `moves_*[moves_offsets[k]:moves_offsets[k+1]]`.
    """

    config: PolicyConfig
    prompt_tokens: int
    generated_tokens: int
    counts: np.ndarray  # (steps, 4) int64 tokens per tier
    mass: np.ndarray  # (steps, 4) float64 attention mass per tier
    retier_steps: np.ndarray  # (R,) int64
    moves_offsets: np.ndarray  # (R+1,) int64
    moves_pos: np.ndarray  # int64 token positions
    moves_from: np.ndarray  # int8
    moves_to: np.ndarray  # int8
    protected: np.ndarray  # (steps,) tokens protected (prompt, sinks, window, partial pages) during step t
    final_counts: np.ndarray  # (4,) tokens per tier after the last step, its re-tier included

    @property
    def steps(self) -> int:
        """Decode steps covered."""
        return len(self.counts)

    @property
    def retiers(self) -> int:
        """Number of re-tier points."""
        return len(self.retier_steps)

    def _point(self, k: int) -> int:
        if not -self.retiers <= k < self.retiers:
            raise PolicyError(f"re-tier point {k} out of range: this schedule has {self.retiers}")
        return k % self.retiers

    def moves(self, k: int) -> TierChanges:
        """The moves of re-tier point k (negative k counts from the end)."""
        k = self._point(k)
        a, b = self.moves_offsets[k], self.moves_offsets[k + 1]
        return TierChanges(int(self.retier_steps[k]), self.moves_pos[a:b], self.moves_from[a:b], self.moves_to[a:b], True)

    def transition_counts(self) -> np.ndarray:
        """(R, 5) tokens per re-tier point for each of `TRANSITION_KINDS`."""
        out = np.zeros((self.retiers, len(TRANSITION_KINDS)), dtype=np.int64)
        for k in range(self.retiers):
            m = self.moves(k)
            out[k] = [np.count_nonzero(_kind_mask(kind, m.from_tier, m.to_tier)) for kind in TRANSITION_KINDS]
        return out

    def tiers_after(self, k: int) -> np.ndarray:
        """Tier of every position cached right after re-tier point k (rebuilt from the moves)."""
        k = self._point(k)
        length = self.prompt_tokens + int(self.retier_steps[k]) + 1
        tiers = np.zeros(length, dtype=np.int8)
        end = self.moves_offsets[k + 1]
        tiers[self.moves_pos[:end]] = self.moves_to[:end]  # later moves overwrite earlier ones
        return tiers

    def index_sets(self, k: int) -> dict[str, np.ndarray]:
        """Positions in each tier right after re-tier point k, keyed by tier name."""
        tiers = self.tiers_after(k)
        return {name: np.flatnonzero(tiers == tier) for tier, name in enumerate(TIER_NAMES)}

    def mass_share(self) -> np.ndarray:
        """Share of all attention mass that landed on each tier, over the whole request."""
        total = self.mass.sum()
        return self.mass.sum(axis=0) / total if total > 0 else np.zeros(4)

    @classmethod
    def from_arrays(cls, config: PolicyConfig, prompt_tokens: int, generated_tokens: int,
                    arrays: dict[str, np.ndarray]) -> TierSchedule:
        """Rebuild a schedule from `to_arrays()` output (refuses missing or extra arrays)."""
        names = [n for n in cls.__dataclass_fields__ if n not in ("config", "prompt_tokens", "generated_tokens")]
        if sorted(arrays) != sorted(names):
            raise PolicyError(f"schedule arrays {sorted(arrays)} do not match the expected {sorted(names)}")
        return cls(config=config, prompt_tokens=prompt_tokens, generated_tokens=generated_tokens, **arrays)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Every array of the schedule by field name (for .npz export)."""
        scalars = ("config", "prompt_tokens", "generated_tokens")
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in scalars}

    def summary(self) -> dict:
        """Final tier counts, evicted share of generated tokens, and the attention mass share per tier."""
        last = self.final_counts
        share = self.mass_share()
        generated = max(1, self.steps)
        return {
            "steps": self.steps,
            "retiers": self.retiers,
            **{f"final_{name}_tokens": int(last[i]) for i, name in enumerate(TIER_NAMES)},
            "evicted_share_of_generated": float(last[EVICTED]) / generated,
            **{f"mass_share_{name}": float(share[i]) for i, name in enumerate(TIER_NAMES)},
        }


def candidate_pages(config: PolicyConfig, prompt_tokens: int, length: int) -> tuple[int, int]:
    """Page range [first, stop) of unprotected generated tokens when `length` positions are cached.

    Pages are `unit` (page_size, or 1 when unset) consecutive positions; a page touching the prompt, a sink or the window,
    or not yet full, is protected as a whole.
    """
    n = config.unit
    first = -(-(prompt_tokens + config.sinks) // n)
    stop = max(first, (length - config.window) // n)
    return first, stop


def protected_tokens(config: PolicyConfig, prompt_tokens: int, length: int) -> int:
    """Tokens kept in HBM unconditionally when `length` positions are cached."""
    first, stop = candidate_pages(config, prompt_tokens, length)
    return length - (stop - first) * config.unit


@functools.cache
def _half_to_single() -> np.ndarray:
    """The float32 value of every float16 bit pattern, as astype converts it. Looking rows up here is ~6x faster:
    numpy converts subnormal halves (most of an attention row) one at a time."""
    return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


# Largest row sum the quick check passes without the exact one: far from float16's 65,504 and float32's 3.4e38.
_SAFE_HALF_SUM, _SAFE_SINGLE_SUM = 2.0**15, 1e37
_HALF_INF, _SINGLE_INF = 0x7C00, 0x7F800000  # bit patterns from here up are inf, NaN or negative
_HALF, _SINGLE = np.dtype(np.float16), np.dtype(np.float32)  # native byte order: their bits are read as integers
_largest = np.maximum.reduce  # ndarray.max without its Python wrapper: once per row


def _single(row: np.ndarray) -> tuple[np.ndarray, bool]:
    """The row as float32 (its values exactly, as the mass is summed) and whether a quick check on its largest bit
    pattern shows it finite, non-negative and of a sum that cannot overflow; a row not shown so gets the exact check.
    Non-negative floats sort like their bit patterns, so one integer max does the check's work."""
    if row.dtype == _HALF:
        bits = row.view(np.uint16)
        top, table = _largest(bits), _half_to_single()
        return table[bits], bool(top < _HALF_INF and table[top] * len(row) <= _SAFE_HALF_SUM)
    if row.dtype == _SINGLE:
        top = _largest(row.view(np.uint32))
        return row, bool(top < _SINGLE_INF and top.view(np.float32) * len(row) <= _SAFE_SINGLE_SUM)
    return np.asarray(row, dtype=np.float32), False


def replay(request: TraceRequest, config: PolicyConfig) -> TierSchedule:
    """Run the policy over a whole trace request (offline) and record its TierSchedule.

    The state machine of `TieringPolicy.step`, with the per-step work cut to what changes: each row is added to
    the scores and multiplied into the mass per tier; tiers change only at re-tier points (`_retier`, the same
    code); token counts and protected tokens follow from those points in closed form. Results equal feeding
    every row to `step` bit for bit (tests/test_replay_fast.py).
    """
    policy = TieringPolicy(config, request.prefill, expected_steps=request.steps)
    steps, prompt = request.steps, policy.prompt_tokens
    scores, tiers = policy._scores, policy._tiers  # sized for every step: never regrown, so these stay the state
    mass = np.zeros((steps, 4), dtype=np.float64)
    changed = np.zeros((steps + 1, 4), dtype=np.int64)  # tier counts changed by the re-tier ending step t, at t + 1
    # One-hot tier per position: a step's mass per tier is one matrix-vector product with its row.
    onehot = np.zeros((prompt + steps + 1, 4), dtype=np.float32)
    onehot[:, HBM] = 1.0
    retier_steps: list[int] = []
    offsets = [0]
    pos: list[np.ndarray] = []
    frm: list[np.ndarray] = []
    to: list[np.ndarray] = []
    freeze, interval, quiet = config.freezes_offloaded, config.interval, config.sinks + config.window
    done = 0
    for t, row in enumerate(request.rows()):
        if t >= steps:
            break
        length = prompt + t + 1
        row = np.asarray(row)
        single, fine = _single(row) if row.shape == (length,) else (row, False)
        if not fine:
            policy._length, policy.steps_done = length - 1, t
            policy._check(row)  # raises what `step` would; a row that passes was only beyond the quick check
        addend = single if row.dtype in (_HALF, _SINGLE) else row  # the same values: halves convert exactly
        if freeze:  # the authors' prototype never re-scored offloaded tokens
            scores[:length] += np.where(tiers[:length] == HBM, addend, 0.0)
        else:
            scores[:length] += addend
        mass[t] = single @ onehot[:length]  # tiers before this step's re-tier
        done = t + 1
        if done % interval or done <= quiet:
            continue
        policy._length, policy.steps_done = length, done
        changes = policy._retier(t)
        if changes.retiered:
            onehot[changes.positions] = 0.0
            onehot[changes.positions, changes.to_tier] = 1.0
            changed[done] = np.bincount(changes.to_tier, minlength=4) - np.bincount(changes.from_tier, minlength=4)
            retier_steps.append(t)
            pos.append(changes.positions)
            frm.append(changes.from_tier)
            to.append(changes.to_tier)
            offsets.append(offsets[-1] + len(changes))
    policy._length, policy.steps_done = prompt + done, done
    lengths = prompt + np.arange(1, done + 1, dtype=np.int64)  # positions cached during each step
    counts = np.zeros((steps, 4), dtype=np.int64)
    counts[:done] = np.cumsum(changed[:done], axis=0)
    counts[:done, HBM] += lengths
    unit = config.unit
    first = -(-(prompt + config.sinks) // unit)  # candidate_pages, for every step at once
    protected = np.zeros(steps, dtype=np.int64)
    protected[:done] = lengths - (np.maximum(first, (lengths - config.window) // unit) - first) * unit
    final = changed.sum(axis=0)
    final[HBM] += prompt + done
    cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)  # noqa: E731
    return TierSchedule(
        config=config,
        prompt_tokens=prompt,
        generated_tokens=int(request.generated_tokens),
        counts=counts,
        mass=mass,
        retier_steps=np.asarray(retier_steps, dtype=np.int64),
        moves_offsets=np.asarray(offsets, dtype=np.int64),
        moves_pos=cat(pos, np.int64),
        moves_from=cat(frm, np.int8),
        moves_to=cat(to, np.int8),
        protected=protected,
        final_counts=final,
    )
