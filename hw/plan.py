"""The replay plan: what every decode step does to every batch slot, from the TierSchedules (host side, numpy).

Each slot walks through its requests' schedules. A step's work is first drafted in (slot, T0 index,
position) terms (`StepDraft`); once every step is known, the storage layout is fixed (T0 chunks for
the longest resident set) and the drafts become flat row numbers of the pools (`StepWork`).

The KV of a layer group (`KVGeometry`): full-attention layers hold T0 pools and host pools and are tiered;
sliding-window layers hold a ring of `window` tokens per slot (position p at ring index p mod window), never
tiered and never copied. A cache row is one KV head's K (or V) of one token, or for MLA the token's latent
and rope key (one part, no V): rows x width x dtype per token per layer is the spec's KV bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tiersim.errors import TiersimError
from tiersim.hw.config import ReplayConfig
from tiersim.hw.copies import StagedSet, block_runs
from tiersim.policy import COMPRESSED, DDR, EVICTED, HBM, TierSchedule
from tiersim.specs import ModelSpec
from tiersim.strategy import Strategy
from tiersim.workload.build import Workload


@dataclass(frozen=True, slots=True)
class KVGeometry:
    """How one token's KV lies in one layer's cache, and which layers hold what."""

    heads: int  # cache rows per token and part: the KV heads (MLA: 1, one latent shared by every query head)
    width: int  # values per row: head_dim (MLA: kv_lora_rank + qk_rope_head_dim)
    parts: int  # 2: K and V pools; 1: MLA's one latent pool (its values are the latent's first kv_lora_rank)
    full_layers: tuple[int, ...]  # grow, are tiered and copied
    sliding_layers: tuple[int, ...]  # keep `window` tokens, never tiered
    window: int | None

    @property
    def kind(self) -> dict[int, tuple[bool, int]]:
        """Layer -> (sliding, index among the layers of its group)."""
        out = {layer: (False, i) for i, layer in enumerate(self.full_layers)}
        return out | {layer: (True, i) for i, layer in enumerate(self.sliding_layers)}


def kv_geometry(m: ModelSpec) -> KVGeometry:
    """The cache geometry of `m`; parts x heads x width x dtype is the spec's KV bytes per token per layer."""
    if m.mla is not None:
        geo = KVGeometry(1, m.mla.latent_width, 1, m.full_layers, m.sliding_layers, m.sliding_window)
    else:
        geo = KVGeometry(m.kv_heads, m.head_dim, 2, m.full_layers, m.sliding_layers, m.sliding_window)
    assert geo.parts * geo.heads * geo.width * m.dtype_bytes == m.kv_bytes_per_token_layer
    return geo


@dataclass(frozen=True, slots=True)
class Layout:
    """Row numbering of the flat [rows, head_dim] views of T0 pools, host pools and staging buffers."""

    batch: int
    kv_heads: int
    chunk: int
    chunks: int  # chunks per slot in T0
    positions: int  # host-pool slots per sequence (longest request)
    slot_major: bool  # T0 as [slot, chunk, head, token, dim] (per-slot attention) or [chunk, slot, ...]
    block_size: int = 16  # tokens per KV block of the host pool (a piece never crosses a block boundary)
    parts: int = 2  # K and V, or (MLA) one latent
    window: int = 0  # tokens of a sliding layer's ring (0: no sliding layers)

    def t0_rows(self, slot: np.ndarray, index: np.ndarray) -> np.ndarray:
        """T0 rows of (slot, T0 index) pairs, every KV head: shape (n, kv_heads), flattened in that order."""
        slot, index = np.asarray(slot)[:, None], np.asarray(index)[:, None]
        c, o, h = index // self.chunk, index % self.chunk, np.arange(self.kv_heads)[None, :]
        if self.slot_major:
            return ((slot * self.chunks + c) * self.kv_heads + h) * self.chunk + o
        return ((c * self.batch + slot) * self.kv_heads + h) * self.chunk + o

    def host_rows(self, slot: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Host-pool K rows of (slot, position) pairs: shape (kv_heads, n). The pool is in blocks of `block_size`
        positions, each [position, kv head, head_dim] as vLLM's, a slot's blocks one after the other, so the
        positions of one block are one contiguous piece."""
        h = np.arange(self.kv_heads)[:, None]
        return (np.asarray(slot)[None, :] * self.positions + np.asarray(pos)[None, :]) * self.kv_heads + h

    @property
    def host_v_offset(self) -> int:
        """Row offset of the V part of the host pool."""
        return self.batch * self.kv_heads * self.positions

    @property
    def t0_rows_total(self) -> int:
        """Rows of one T0 pool (K or V) of one layer."""
        return self.batch * self.chunks * self.kv_heads * self.chunk

    def ring_rows(self, slot: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Rows of a sliding layer's ring [slot, kv head, window] for (slot, position) pairs: shape (n, kv_heads)."""
        h = np.arange(self.kv_heads)[None, :]
        return (np.asarray(slot)[:, None] * self.kv_heads + h) * self.window + np.asarray(pos)[:, None] % self.window


def _same_in_every_slot(*per_slot: np.ndarray) -> bool:
    return all(bool((a == a[0]).all()) for a in per_slot)


@dataclass(slots=True)
class StepWork:
    """What one decode step of the batch does in every layer (the same in each layer)."""

    prefill: np.ndarray  # bool per slot: this slot processes its prompt
    tokens: np.ndarray  # new tokens per slot (prompt length or 1)
    attend: np.ndarray  # T0 tokens each slot attends over (the new ones included)
    staged: np.ndarray  # staged tokens per slot (the DDR tier)
    promoted: np.ndarray  # tokens the last re-tier promoted, copied from the host pool into T0
    positions: np.ndarray  # position of each new token, in GEMM row order
    new_rows: np.ndarray  # T0 rows for the new tokens' K/V, (token, head) order
    compact: tuple[np.ndarray, np.ndarray] | None = None  # T0 rows moved (src, dst) to fill holes
    d2h: tuple[np.ndarray, np.ndarray] | None = None  # demoted: T0 rows, host K rows (same order)
    staged_set: StagedSet | None = None  # the DDR-tier rows staged in every layer, and their pieces
    promote: tuple[np.ndarray, np.ndarray] | None = None  # host K rows -> T0 rows, (token, head) order
    demoted_tokens: int = 0
    demote_pieces: int = 0  # pieces per layer for K (V has as many)
    promote_pieces: int = 0
    ring_src: np.ndarray | None = None  # sliding layers: the new tokens (GEMM rows) the ring keeps, a slot's last W
    ring_rows: np.ndarray | None = None  # their ring rows, (token, head) order
    ring_attend: np.ndarray | None = None  # per slot: ring tokens a decoding query attends, min(context, window)

    @property
    def uniform(self) -> bool:
        """Every slot does the same amount of work (one batched kernel per layer)."""
        return _same_in_every_slot(self.tokens, self.attend, self.staged, self.prefill)

    @property
    def staged_rows(self) -> int:
        """Staging rows of the K part (the V part has as many)."""
        return int(self.staged.sum())

    @property
    def touches_t0(self) -> bool:
        """The copy engine reads or rewrites T0 in this step (demotions, compaction, promotions)."""
        return self.d2h is not None or self.compact is not None or self.promote is not None

    @property
    def staged_pieces(self) -> int:
        """Staged pieces per layer for K (V has as many)."""
        return 0 if self.staged_set is None else len(self.staged_set.pieces)


@dataclass(slots=True)
class ReplayPlan:
    """Every step's work, the storage it needs and the bytes it moves."""

    steps: list[StepWork]
    layout: Layout
    staging_rows_max: int  # K rows of the largest staging buffer (per kv head counted)
    h2d_bytes: np.ndarray  # per step, all replayed layers
    d2h_bytes: np.ndarray

    @property
    def tiered(self) -> bool:
        """Some step copies KV between tiers."""
        return bool(self.h2d_bytes.any() or self.d2h_bytes.any())


# -- drafts: one step in (slot, T0 index, position) terms ------------------------------------------

@dataclass(frozen=True, slots=True)
class Compaction:
    """T0 entries of one slot moved from `src` to `dst` indices to fill the holes a re-tier left."""

    slot: int
    src: np.ndarray
    dst: np.ndarray


@dataclass(frozen=True, slots=True)
class HostCopy:
    """Positions of one slot copied between its T0 indices and the host pool (demotion out, promotion in)."""

    slot: int
    t0: np.ndarray
    positions: np.ndarray


@dataclass(slots=True)
class StepDraft:
    """One step's work before the storage layout is known: per-slot counts and per-slot copies."""

    prefill: np.ndarray
    tokens: np.ndarray
    attend: np.ndarray
    staged: np.ndarray
    promoted: np.ndarray
    new_slot: list[np.ndarray] = field(default_factory=list)  # per new token: slot, T0 index, position
    new_idx: list[np.ndarray] = field(default_factory=list)
    positions: list[np.ndarray] = field(default_factory=list)
    compact: list[Compaction] = field(default_factory=list)
    demote: list[HostCopy] = field(default_factory=list)
    promote: list[HostCopy] = field(default_factory=list)
    stage: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (slot, DDR-tier positions)
    demoted_tokens: int = 0
    epochs: tuple[int, ...] = ()  # each slot's staged-set version: equal tuples stage the same rows

    @classmethod
    def empty(cls, batch: int) -> StepDraft:
        """A step in which no slot has done anything yet."""
        z = lambda: np.zeros(batch, dtype=np.int64)  # noqa: E731
        return cls(np.zeros(batch, dtype=bool), z(), z(), z(), z())

    @property
    def uniform(self) -> bool:
        """Every slot does the same amount of work."""
        return _same_in_every_slot(self.tokens, self.attend, self.staged, self.prefill)


class SlotState:
    """One batch slot's KV bookkeeping: which position sits at which T0 index, which are in DDR."""

    def __init__(self, positions: int):
        self.pos_at = np.full(positions, -1, dtype=np.int64)  # position -> T0 index
        self.t0 = np.zeros(positions, dtype=np.int64)  # T0 index -> position
        self.n0 = 0
        self.ddr = np.zeros(0, dtype=np.int64)
        self.request = -1
        self.prompt = 0
        self.epoch = 0  # bumped whenever the staged set changes
        self.seeded_at = -1  # warm start: the step at which the slot joined its first request

    def reset(self, request: int, prompt: int) -> None:
        """Start a new request: nothing resident, nothing in DDR."""
        self.pos_at[:] = -1
        self.request, self.prompt, self.n0 = request, prompt, 0
        self.ddr = np.zeros(0, dtype=np.int64)
        self.epoch += 1

    def append(self, pos: np.ndarray) -> np.ndarray:
        """Put positions at the end of T0; return their T0 indices."""
        idx = np.arange(self.n0, self.n0 + len(pos))
        self.t0[idx], self.pos_at[pos] = pos, idx
        self.n0 += len(pos)
        return idx

    def remove(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Take positions out of T0, filling holes with the last residents; return (src, dst) T0 indices moved."""
        gone = self.pos_at[pos]
        self.pos_at[pos] = -1
        n_new = self.n0 - len(gone)
        holes = np.sort(gone[gone < n_new])
        tail = np.arange(n_new, self.n0)
        movers = tail[self.pos_at[self.t0[tail]] >= 0]  # tail entries still resident
        moved_pos = self.t0[movers]
        self.t0[holes], self.pos_at[moved_pos] = moved_pos, holes
        self.n0 = n_new
        return movers, holes


class Planner:
    """Walks the batch's slots through their schedules, one step of the batch at a time."""

    def __init__(self, strategy: Strategy, workload: Workload, batch: int):
        self.strategy = strategy
        self.schedules: tuple[TierSchedule, ...] = workload.schedules
        self.rows_per_request = workload.tables.shape[1]
        # A slot's blocks lie one after the other, so the pool needs no whole last block to keep pieces contiguous.
        self.positions = max(s.prompt_tokens + s.steps for s in self.schedules) + 1
        self.slots = [SlotState(self.positions) for _ in range(batch)]
        self.retier_at = [dict(zip(s.retier_steps.tolist(), range(s.retiers))) for s in self.schedules]

    def step(self, flat_rows: np.ndarray) -> StepDraft:
        """Advance every slot by one step (slot b to workload row flat_rows[b]); return the step's work."""
        st = self.strategy
        out = StepDraft.empty(len(self.slots))
        epochs = []
        for b, flat in enumerate(flat_rows.tolist()):
            r, row = divmod(flat, self.rows_per_request)
            s, slot = self.schedules[r], self.slots[b]
            if row == 0:  # prefill: the prompt's KV fills T0
                slot.reset(r, s.prompt_tokens)
                pos = np.arange(s.prompt_tokens)
                out.prefill[b] = True
            else:
                t = row - 1
                if slot.request < 0:  # warm start: the slot joins this request mid-way, its KV already in place
                    self._seed(s, t, r, slot)
                k = self.retier_at[r].get(t - 1) if st.applies_policy and slot.seeded_at != t else None
                promoted = np.zeros(0, dtype=np.int64)
                if k is not None:
                    slot.epoch += 1
                    promoted = self._apply_moves(s, k, slot, b, out)
                self._check_counts(s, t, slot, len(promoted))
                pos = np.array([s.prompt_tokens + t])
                if len(promoted):  # into T0 from the host pool (evict-only dropped their KV: stale rows)
                    out.promote.append(HostCopy(b, slot.append(promoted), promoted))
                if st.prefetches:
                    if len(slot.ddr):
                        out.stage.append((b, slot.ddr))
                    out.staged[b] = len(slot.ddr)
                out.promoted[b] = len(promoted)
            idx = slot.append(pos)
            out.tokens[b] = len(pos)
            out.attend[b] = slot.n0
            epochs.append(slot.epoch)
            out.new_slot.append(np.full(len(pos), b))
            out.new_idx.append(idx)
            out.positions.append(pos)
        out.epochs = tuple(epochs)
        return out

    def _seed(self, s: TierSchedule, t: int, r: int, slot: SlotState) -> None:
        """Put a request's KV where its schedule has it before decode step t (tiers after the last re-tier before t)."""
        slot.reset(r, s.prompt_tokens)
        slot.seeded_at = t
        tiers = np.zeros(s.prompt_tokens + t, dtype=np.int8)
        if self.strategy.applies_policy:
            done = np.flatnonzero(s.retier_steps <= t - 1)
            if len(done):
                after = s.tiers_after(int(done[-1]))
                tiers[: len(after)] = after
        slot.append(np.flatnonzero(tiers == HBM))
        if self.strategy.keeps_ddr:
            slot.ddr = np.flatnonzero(tiers == DDR)

    def _apply_moves(self, s: TierSchedule, k: int, slot: SlotState, b: int, out: StepDraft) -> np.ndarray:
        """Apply re-tier point k to slot b: record its T0 compaction and demotions in `out`; return the promoted
        positions (sorted)."""
        mv = s.moves(k)
        if (mv.to_tier == COMPRESSED).any() or (mv.from_tier == COMPRESSED).any():
            raise TiersimError("the schedule uses the compressed tier; the replay has none (use --compressed-ratio 0)")
        frm, to, pos = mv.from_tier, mv.to_tier, mv.positions
        demote = pos[(frm == HBM) & (to == DDR)]
        leave = pos[(frm == HBM) & (to != HBM)]
        promote = np.sort(pos[(frm == DDR) & (to == HBM)])
        drop_ddr = pos[(frm == DDR) & (to != DDR)]
        if self.strategy.keeps_ddr and len(demote):
            out.demote.append(HostCopy(b, slot.pos_at[demote].copy(), demote))
            out.demoted_tokens += len(demote)
        if len(leave):
            src, dst = slot.remove(leave)
            if len(src):
                out.compact.append(Compaction(b, src, dst))
        if self.strategy.keeps_ddr:
            slot.ddr = np.setdiff1d(np.union1d(slot.ddr, demote), drop_ddr, assume_unique=True)
        return promote

    def _check_counts(self, s: TierSchedule, t: int, slot: SlotState, promoted: int) -> None:
        """The slot's T0 and DDR contents must be the schedule's tier counts (internal consistency)."""
        st = self.strategy
        if not st.applies_policy:
            expected_t0, expected_ddr = s.prompt_tokens + t, 0
        else:
            expected_t0 = int(s.counts[t, HBM]) - 1 - promoted  # before the new token and the promotions
            expected_ddr = int(s.counts[t, DDR]) if st.keeps_ddr else 0
        if slot.n0 != expected_t0 or len(slot.ddr) != expected_ddr:
            raise AssertionError(f"replay plan out of step with the schedule at step {t}: T0 {slot.n0} vs "
                                 f"{expected_t0}, DDR {len(slot.ddr)} vs {expected_ddr}")
        if not st.keeps_ddr and s.counts[t, EVICTED] < 0:
            raise AssertionError("negative evicted count")


def plan_replay(cfg: ReplayConfig, workload: Workload) -> ReplayPlan:
    """Walk the batch's slots through their schedules and record every step's copies and kernels."""
    m, strategy = cfg.model, cfg.strategy_record
    geo = kv_geometry(m)
    planner = Planner(strategy, workload, cfg.batch)
    drafts: list[StepDraft] = []
    cap0 = 1
    for k in range(workload.slot_rows.shape[1]):
        drafts.append(planner.step(workload.slot_rows[:, k]))
        cap0 = max(cap0, max(s.n0 for s in planner.slots))
    chunks = -(-cap0 // cfg.chunk)
    uniform = all(d.uniform for d in drafts)
    layout = Layout(cfg.batch, geo.heads, cfg.chunk, chunks, planner.positions, slot_major=not uniform,
                    block_size=cfg.block_size, parts=geo.parts, window=geo.window if geo.sliding_layers else 0)
    steps, h2d, d2h = [], [], []
    last_gather: tuple | None = None
    for d in drafts:
        work, last_gather = _rows_of(d, layout, strategy, last_gather)
        steps.append(work)
        # A DDR-tier token moves its KV of every full-attention layer (sliding-window layers keep their window in
        # the device's ring and are never tiered): the model's global-layer bytes, for MLA the latent.
        fetched = work.staged_rows + int(work.promoted.sum())
        h2d.append(fetched * m.kv_bytes_per_token_global if strategy.prefetches else 0)
        d2h.append(work.demoted_tokens * m.kv_bytes_per_token_global if strategy.keeps_ddr else 0)
    rows_max = max((w.staged_rows for w in steps), default=0) * geo.heads
    return ReplayPlan(steps, layout, rows_max, np.array(h2d, dtype=np.float64), np.array(d2h, dtype=np.float64))


def _rows_of(d: StepDraft, layout: Layout, strategy: Strategy, last_gather: tuple | None) -> tuple[StepWork, tuple]:
    """Turn a step's (slot, index) work into flat row numbers of the storage layout; the second value is the
    staging key (slot epochs, gather rows) the next step may share."""
    t0 = lambda b, idx: layout.t0_rows(np.full(len(idx), b), idx).ravel()  # noqa: E731
    host = lambda b, pos: layout.host_rows(np.full(len(pos), b), pos)  # noqa: E731
    work = StepWork(prefill=d.prefill, tokens=d.tokens, attend=d.attend, staged=d.staged, promoted=d.promoted,
                    positions=np.concatenate(d.positions),
                    new_rows=layout.t0_rows(np.concatenate(d.new_slot), np.concatenate(d.new_idx)).ravel(),
                    demoted_tokens=d.demoted_tokens)
    if layout.window:
        work.ring_src, work.ring_rows, work.ring_attend = ring_writes(d, layout)
    if d.compact:
        work.compact = (np.concatenate([t0(c.slot, c.src) for c in d.compact]),
                        np.concatenate([t0(c.slot, c.dst) for c in d.compact]))
    if d.demote:
        work.d2h = (np.concatenate([t0(c.slot, c.t0) for c in d.demote]),
                    np.concatenate([host(c.slot, c.positions).T.ravel() for c in d.demote]))
        work.demote_pieces = _pieces(d.demote, layout.block_size)
    if d.stage:
        if last_gather is not None and last_gather[0] == d.epochs:
            work.staged_set = last_gather[1]  # the same DDR set as the last step: share the index
        else:
            work.staged_set = staged_set(d.stage, layout)
    if d.promote and strategy.keeps_ddr:
        work.promote = (np.concatenate([host(c.slot, c.positions).T.ravel() for c in d.promote]),
                        np.concatenate([t0(c.slot, c.t0) for c in d.promote]))
        work.promote_pieces = _pieces(d.promote, layout.block_size)
    return work, (d.epochs, work.staged_set)


def ring_writes(d: StepDraft, layout: Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sliding layer's ring writes of one step: (new-token rows kept: each slot's last `window`, their ring rows,
    per slot the tokens a decoding query attends, min(context, window))."""
    W, src, rows, at = layout.window, [], [], 0
    for slot, pos in zip(d.new_slot, d.positions):
        keep = np.arange(max(0, len(pos) - W), len(pos))
        src.append(at + keep)
        rows.append(layout.ring_rows(slot[keep], pos[keep]).ravel())
        at += len(pos)
    last = np.array([int(p[-1]) for p in d.positions])
    return np.concatenate(src), np.concatenate(rows), np.minimum(last + 1, W)


def _pieces(copies: list[HostCopy], block_size: int) -> int:
    """Pieces per layer (for K) of a re-tier's copies: runs of consecutive positions inside a block, per slot."""
    return sum(len(block_runs(np.sort(c.positions), block_size)[0]) for c in copies)


def staged_set(stage: list[tuple[int, np.ndarray]], layout: Layout) -> StagedSet:
    """The host rows and pieces of the (slot, sorted DDR-tier positions) a step stages, in staging order: slot
    after slot, each [kv head, token] (the order the attention reads)."""
    kvh, tables, gather, row = layout.kv_heads, [], [], 0  # MLA: one latent row per token (kv_heads 1, no V)
    for b, pos in stage:
        first, tokens, index = block_runs(pos, layout.block_size)
        src = layout.host_rows(np.full(len(first), b), first)[0]
        tables.append(np.stack([src, tokens, np.full(len(first), row), np.full(len(first), len(pos)), index], axis=1))
        gather.append(layout.host_rows(np.full(len(pos), b), pos).ravel())
        row += kvh * len(pos)
    k = np.concatenate(gather)
    return StagedSet(np.concatenate([k, k + layout.host_v_offset][: layout.parts]),
                     np.concatenate(tables).astype(np.int64), layout.host_v_offset, kvh, parts=layout.parts)
