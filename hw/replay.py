"""Replay TierSchedules on a real device: real copies, model-shaped compute, timed per decode step.

This is the measurement side of `tiersim validate`. It does what the simulator's cost model
describes (sim/costs.py, sim/engine.py), with real tensors:

- T0 (HBM tier) pools on the device, one K and one V pool per layer, in chunks of `chunk_tokens`
  tokens so that attention over a sequence reads contiguous memory; T1 (DDR tier) in host memory,
  pinned on CUDA, one slot per token position (scattered, as the cost model assumes).
- Every decode step, each layer's DDR-tier tokens are brought into a staging buffer: `prefetch-layer`
  on a separate copy stream (a copy thread; on CUDA a `torch.cuda.Stream` with events), up to `depth`
  layers ahead into `depth + 1` buffers; `prefetch-sync` for all layers into one buffer per layer
  before the forward pass. As the cost model has it (sim/costs.py): from pinned memory the device
  gathers the scattered tokens itself over the link (CUDA: an index_select kernel reading the pinned
  pool through a zero-copy UVA alias, or, where the driver will not map it, host gather + DMA, recorded
  as `fetch_path`; CPU: one index_select from the host pool into the staging buffer); from pageable
  memory they are gathered on the host into a new tensor, then copied (the paper's prototype).
- At a re-tier, on the copy engine before that layer's next staged copy: demotions go device to
  host, the holes they and evictions leave in T0 are filled with the last resident tokens, and the
  promotions are copied from the host pool into T0.
- Compute per layer: RMSNorm, the q/k/v, o, gate/up and down projections with the layer's real
  weight shapes (random bf16 weights) for the batch's new tokens, and attention over the resident
  plus staged tokens (decode: one query per sequence, grouped-query heads, both parts merged in one
  softmax; prefill: causal SDPA over the prompt); then the lm_head over one token per sequence.

On `--device cpu` the same code runs with host tensors: the "device" is the host, the copy
stream is a second thread, and torch uses one thread for compute (see `cpu_threads`). That is a
real measurement of this machine, not of a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from tiersim.errors import TiersimError
from tiersim.policy import COMPRESSED, DDR, EVICTED, HBM, PolicyConfig, TierSchedule
from tiersim.specs import ModelSpec
from tiersim.workload.build import Workload

REPLAY_STRATEGIES = ("full", "evict-only", "prefetch-sync", "prefetch-layer")
TIERED = ("prefetch-sync", "prefetch-layer")
GB = 1e9


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """What to replay and how: the model (already cut to the layers to run), policy, strategy, batch."""

    model: ModelSpec
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    strategy: str = "prefetch-layer"
    depth: int = 2
    batch: int = 8
    gen_tokens: int = 512
    steps: int | None = None
    cold_start: bool = True
    pinned: bool = True
    seed: int = 0
    device: str = "cpu"
    warmup_steps: int = 2
    chunk_tokens: int = 128  # tokens per T0 chunk (attention reads whole chunks, the last one partly masked)

    def __post_init__(self) -> None:
        if self.strategy == "cpu-attention":
            raise TiersimError("strategy 'cpu-attention' is simulated but not replayed (no host attention kernel in "
                               f"the replay); accepted: {', '.join(REPLAY_STRATEGIES)}")
        if self.strategy not in REPLAY_STRATEGIES:
            raise TiersimError(f"strategy {self.strategy!r} unknown; accepted: {', '.join(REPLAY_STRATEGIES)}")
        for name, low in (("depth", 1), ("batch", 1), ("gen_tokens", 2), ("warmup_steps", 0), ("chunk_tokens", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise TiersimError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise TiersimError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.policy.compressed_ratio > 0:
            raise TiersimError(f"compressed_ratio {self.policy.compressed_ratio} > 0: the replay has no compressed "
                               "tier; accepted: --compressed-ratio 0")
        if self.strategy == "prefetch-layer" and self.depth >= self.model.layers:
            raise TiersimError(f"depth {self.depth} needs more than {self.model.layers} layers to run ahead into; "
                               f"accepted: depth < layers (use --layers > {self.depth} or a smaller --depth)")

    @property
    def decode_steps(self) -> int:
        """Decode steps of the batch."""
        return self.gen_tokens if self.steps is None else self.steps

    @property
    def chunk(self) -> int:
        """Tokens per T0 chunk."""
        return self.chunk_tokens


# ---------------------------------------------------------------------------------------------
# The plan: what every step does to every slot, from the TierSchedules (host side, numpy)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Layout:
    """Row numbering of the flat [rows, head_dim] views of T0 pools, host pools and staging buffers."""

    batch: int
    kv_heads: int
    chunk: int
    chunks: int  # chunks per slot in T0
    positions: int  # host-pool slots per sequence (longest request)
    slot_major: bool  # T0 as [slot, chunk, head, token, dim] (per-slot attention) or [chunk, slot, ...]

    def t0_rows(self, slot: np.ndarray, index: np.ndarray) -> np.ndarray:
        """T0 rows of (slot, T0 index) pairs, every KV head: shape (n, kv_heads), flattened in that order."""
        slot, index = np.asarray(slot)[:, None], np.asarray(index)[:, None]
        c, o, h = index // self.chunk, index % self.chunk, np.arange(self.kv_heads)[None, :]
        if self.slot_major:
            return ((slot * self.chunks + c) * self.kv_heads + h) * self.chunk + o
        return ((c * self.batch + slot) * self.kv_heads + h) * self.chunk + o

    def host_rows(self, slot: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Host-pool K rows of (slot, position) pairs, head-major per slot: shape (kv_heads, n)."""
        h = np.arange(self.kv_heads)[:, None]
        return (np.asarray(slot)[None, :] * self.kv_heads + h) * self.positions + np.asarray(pos)[None, :]

    @property
    def host_v_offset(self) -> int:
        """Row offset of the V part of the host pool."""
        return self.batch * self.kv_heads * self.positions

    @property
    def t0_rows_total(self) -> int:
        """Rows of one T0 pool (K or V) of one layer."""
        return self.batch * self.chunks * self.kv_heads * self.chunk


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
    gather: np.ndarray | None = None  # host K rows in staging order (V rows: + host_v_offset)
    gather_dev: object = None  # the same index on the device (CUDA zero-copy gather)
    promote: tuple[np.ndarray, np.ndarray] | None = None  # host K rows -> T0 rows, (token, head) order
    demoted_tokens: int = 0

    @property
    def uniform(self) -> bool:
        """Every slot does the same amount of work (one batched kernel per layer)."""
        return bool((self.tokens == self.tokens[0]).all() and (self.attend == self.attend[0]).all()
                    and (self.staged == self.staged[0]).all() and (self.prefill == self.prefill[0]).all())

    @property
    def staged_rows(self) -> int:
        """Staging rows of the K part (the V part has as many)."""
        return int(self.staged.sum())


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


class _Slot:
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


def plan_replay(cfg: ReplayConfig, workload: Workload) -> ReplayPlan:
    """Walk the batch's slots through their schedules and record every step's copies and kernels."""
    m, strategy = cfg.model, cfg.strategy
    schedules = workload.schedules
    rows_per_request = workload.tables.shape[1]
    positions = max(s.prompt_tokens + s.steps for s in schedules) + 1
    slots = [_Slot(positions) for _ in range(cfg.batch)]
    retier_at = [dict(zip(s.retier_steps.tolist(), range(s.retiers))) for s in schedules]
    raw: list[dict] = []
    cap0 = 1
    for k in range(workload.slot_rows.shape[1]):
        step = _plan_step(cfg, workload.slot_rows[:, k], rows_per_request, schedules, retier_at, slots)
        cap0 = max(cap0, max(s.n0 for s in slots))
        raw.append(step)
    chunks = -(-cap0 // cfg.chunk)
    uniform = all(_uniform(r) for r in raw)
    layout = Layout(cfg.batch, m.kv_heads, cfg.chunk, chunks, positions, slot_major=not uniform)
    steps, h2d, d2h = [], [], []
    last_gather: tuple | None = None
    for r in raw:
        work, key = _rows_of(r, layout, last_gather)
        last_gather = key
        steps.append(work)
        fetched = work.staged_rows + int(work.promoted.sum())
        h2d.append(m.layers * fetched * m.kv_bytes_per_token_layer if strategy in TIERED else 0)
        d2h.append(work.demoted_tokens * m.kv_bytes_per_token if strategy in TIERED else 0)
    rows_max = max((w.staged_rows for w in steps), default=0) * m.kv_heads
    return ReplayPlan(steps, layout, rows_max, np.array(h2d, dtype=np.float64), np.array(d2h, dtype=np.float64))


def _uniform(r: dict) -> bool:
    return all(len(set(np.asarray(r[key]).tolist())) == 1 for key in ("tokens", "attend", "staged", "prefill"))


def _plan_step(cfg: ReplayConfig, flat_rows: np.ndarray, rows_per_request: int, schedules: tuple[TierSchedule, ...],
               retier_at: list[dict], slots: list[_Slot]) -> dict:
    """Advance every slot by one step; return the step's work in (slot, T0 index) terms."""
    tiered = cfg.strategy != "full"
    B = len(slots)
    out = {key: np.zeros(B, dtype=np.int64) for key in ("tokens", "attend", "staged", "promoted")}
    out["prefill"] = np.zeros(B, dtype=bool)
    new_slot, new_idx, new_pos = [], [], []
    compact, d2h, staged, promote, epochs = [], [], [], [], []
    demoted = 0
    for b, flat in enumerate(flat_rows.tolist()):
        r, row = divmod(flat, rows_per_request)
        s, slot = schedules[r], slots[b]
        if row == 0:  # prefill: the prompt's KV fills T0
            slot.reset(r, s.prompt_tokens)
            pos = np.arange(s.prompt_tokens)
            out["prefill"][b] = True
        else:
            t = row - 1
            if slot.request < 0:  # warm start: the slot joins this request mid-way, its KV already in place
                _seed_slot(cfg.strategy, s, t, r, slot)
            k = retier_at[r].get(t - 1) if tiered and slot.seeded_at != t else None
            promoted = np.zeros(0, dtype=np.int64)
            if k is not None:
                slot.epoch += 1
                promoted, moved, dem = _apply_moves(cfg.strategy, s, k, slot)
                if moved is not None:
                    compact.append((b, *moved))
                if dem is not None:
                    d2h.append((b, *dem))
                    demoted += len(dem[1])
            _check_counts(cfg.strategy, s, t, slot, len(promoted))
            pos = np.array([s.prompt_tokens + t])
            if len(promoted):  # into T0 from the host pool (evict-only dropped their KV: stale rows)
                promote.append((b, promoted, slot.append(promoted)))
            if cfg.strategy in TIERED:
                if len(slot.ddr):
                    staged.append((b, slot.ddr))
                out["staged"][b] = len(slot.ddr)
            out["promoted"][b] = len(promoted)
        idx = slot.append(pos)
        out["tokens"][b] = len(pos)
        out["attend"][b] = slot.n0
        epochs.append(slot.epoch)
        new_slot.append(np.full(len(pos), b))
        new_idx.append(idx)
        new_pos.append(pos)
    out.update(new_slot=np.concatenate(new_slot), new_idx=np.concatenate(new_idx), positions=np.concatenate(new_pos),
               compact=compact, d2h=d2h, staged_sets=staged, promote=promote, demoted=demoted,
               strategy=cfg.strategy, epochs=tuple(epochs))
    return out


def _seed_slot(strategy: str, s: TierSchedule, t: int, r: int, slot: _Slot) -> None:
    """Put a request's KV where its schedule has it before decode step t (tiers after the last re-tier before t)."""
    slot.reset(r, s.prompt_tokens)
    slot.seeded_at = t
    length = s.prompt_tokens + t
    tiers = np.zeros(length, dtype=np.int8)
    if strategy != "full":
        done = np.flatnonzero(s.retier_steps <= t - 1)
        if len(done):
            after = s.tiers_after(int(done[-1]))
            tiers[: len(after)] = after
    slot.append(np.flatnonzero(tiers == HBM))
    if strategy in TIERED:
        slot.ddr = np.flatnonzero(tiers == DDR)


def _apply_moves(strategy: str, s: TierSchedule, k: int, slot: _Slot):
    """Apply re-tier point k to a slot: returns (promoted positions, T0 moves or None, D2H (T0 idx, pos) or None)."""
    mv = s.moves(k)
    if (mv.to_tier == COMPRESSED).any() or (mv.from_tier == COMPRESSED).any():
        raise TiersimError("the schedule uses the compressed tier; the replay has none (use --compressed-ratio 0)")
    frm, to, pos = mv.from_tier, mv.to_tier, mv.positions
    demote = pos[(frm == HBM) & (to == DDR)]
    leave = pos[(frm == HBM) & (to != HBM)]
    promote = np.sort(pos[(frm == DDR) & (to == HBM)])
    drop_ddr = pos[(frm == DDR) & (to != DDR)]
    dem = None
    if strategy in TIERED and len(demote):
        dem = (slot.pos_at[demote].copy(), demote)
    moved = None
    if len(leave):
        src, dst = slot.remove(leave)
        moved = (src, dst) if len(src) else None
    ddr = np.union1d(slot.ddr, demote) if strategy in TIERED else slot.ddr
    slot.ddr = np.setdiff1d(ddr, drop_ddr, assume_unique=True) if strategy in TIERED else ddr
    return promote, moved, dem


def _check_counts(strategy: str, s: TierSchedule, t: int, slot: _Slot, promoted: int) -> None:
    """The slot's T0 and DDR contents must be the schedule's tier counts (internal consistency)."""
    if strategy == "full":
        expected_t0, expected_ddr = s.prompt_tokens + t, 0
    else:
        expected_t0 = int(s.counts[t, HBM]) - 1 - promoted  # before the new token and the promotions
        expected_ddr = int(s.counts[t, DDR]) if strategy in TIERED else 0
    if slot.n0 != expected_t0 or len(slot.ddr) != expected_ddr:
        raise AssertionError(f"replay plan out of step with the schedule at step {t}: T0 {slot.n0} vs {expected_t0}, "
                             f"DDR {len(slot.ddr)} vs {expected_ddr}")
    if strategy not in TIERED and s.counts[t, EVICTED] < 0:
        raise AssertionError("negative evicted count")


def _rows_of(r: dict, layout: Layout, last_gather: tuple | None) -> tuple[StepWork, tuple]:
    """Turn a step's (slot, index) work into flat row numbers of the storage layout."""
    work = StepWork(prefill=r["prefill"], tokens=r["tokens"], attend=r["attend"], staged=r["staged"],
                    promoted=r["promoted"], positions=r["positions"],
                    new_rows=layout.t0_rows(r["new_slot"], r["new_idx"]).ravel(), demoted_tokens=r["demoted"])
    if r["compact"]:
        src = np.concatenate([layout.t0_rows(np.full(len(a), b), a).ravel() for b, a, _ in r["compact"]])
        dst = np.concatenate([layout.t0_rows(np.full(len(d), b), d).ravel() for b, _, d in r["compact"]])
        work.compact = (src, dst)
    if r["d2h"]:
        t0 = np.concatenate([layout.t0_rows(np.full(len(i), b), i).ravel() for b, i, _ in r["d2h"]])
        host = np.concatenate([layout.host_rows(np.full(len(p), b), p).T.ravel() for b, _, p in r["d2h"]])
        work.d2h = (t0, host)
    key = r["epochs"]
    if r["staged_sets"]:
        if last_gather is not None and last_gather[0] == key:
            work.gather = last_gather[1]  # the same DDR set as the last step: share the index
        else:
            work.gather = np.concatenate([layout.host_rows(np.full(len(p), b), p).ravel() for b, p in r["staged_sets"]])
    if r["promote"] and r["strategy"] in TIERED:
        src = np.concatenate([layout.host_rows(np.full(len(p), b), p).T.ravel() for b, p, _ in r["promote"]])
        dst = np.concatenate([layout.t0_rows(np.full(len(i), b), i).ravel() for b, _, i in r["promote"]])
        work.promote = (src, dst)
    return work, (key, work.gather)


# ---------------------------------------------------------------------------------------------
# Memory: what the plan needs, checked before anything is allocated
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MemoryNeed:
    """Bytes the replay allocates on the device and in host memory, by part."""

    device: dict[str, float]
    host: dict[str, float]

    @property
    def device_bytes(self) -> float:
        """Everything on the device."""
        return float(sum(self.device.values()))

    @property
    def host_bytes(self) -> float:
        """Everything in host memory (pinned on CUDA)."""
        return float(sum(self.host.values()))

    def describe(self, part: str) -> str:
        """One line: the parts in GB."""
        parts = self.device if part == "device" else self.host
        return ", ".join(f"{k} {v / GB:.2f}" for k, v in parts.items() if v)


def memory_need(cfg: ReplayConfig, workload: Workload) -> MemoryNeed:
    """Weights, T0 pools, staging buffers and activations on the device; the DDR pool and bounce buffers on the
    host. From the workload's tier counts alone, so a replay that cannot fit is refused before it is planned."""
    from tiersim.workload.build import COL

    m, dt = cfg.model, cfg.model.dtype_bytes
    tables, totals = workload.tables, workload.totals
    resident = tables[..., COL["tokens"] if cfg.strategy == "full" else COL["hbm"]].max()
    chunks = -(-int(resident) // cfg.chunk)
    t0_rows = cfg.batch * chunks * m.kv_heads * cfg.chunk
    staged_rows = int(totals[:, COL["ddr"]].max()) * m.kv_heads if cfg.strategy in TIERED else 0
    buffers = {"prefetch-layer": cfg.depth + 1, "prefetch-sync": m.layers}.get(cfg.strategy, 0)
    tokens = int((totals[:, COL["decode"]] + totals[:, COL["prefill_tokens"]]).max())
    prompt = int(tables[:, 0, COL["prefill_tokens"]].max())
    width = m.hidden * 4 + (m.attention_heads + 2 * m.kv_heads) * m.head_dim + 2 * m.intermediate
    scores = cfg.batch * m.attention_heads * (int(tables[..., COL["tokens"]].max()) + 2 * cfg.chunk) * 4 * 3
    causal = cfg.batch * m.attention_heads * prompt * prompt * 4
    device = {"weights": m.layers * m.layer_weight_bytes + m.vocab * m.hidden * dt,
              "T0 pools": 2 * t0_rows * m.head_dim * dt * m.layers,
              "staging": buffers * 2 * staged_rows * m.head_dim * dt,
              "activations": tokens * width * dt * 2 + scores + causal + cfg.batch * m.vocab * dt}
    host = {}
    if cfg.strategy in TIERED:
        positions = max(s.prompt_tokens + s.steps for s in workload.schedules) + 1
        host["DDR pool"] = 2 * cfg.batch * m.kv_heads * positions * m.head_dim * dt * m.layers
        if cfg.device.startswith("cuda") and cfg.pinned:
            host["bounce buffers"] = 2 * BOUNCE_ROWS * m.head_dim * dt
        if not cfg.pinned:
            host["pageable gather"] = 2 * staged_rows * m.head_dim * dt
    return MemoryNeed(device, host)


def available_memory(device: str) -> tuple[float, float, str, str]:
    """(device bytes free, host bytes available, device label, host label); on CPU both are host RAM."""
    host = _mem_available()
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return float(free), host, f"{device} free", "host MemAvailable"
    return host, host, "host MemAvailable (the CPU device is host RAM)", "host MemAvailable"


def _mem_available() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def check_memory(cfg: ReplayConfig, need: MemoryNeed) -> None:
    """Refuse, before allocating, a replay that does not fit (device and host; on CPU their sum in RAM)."""
    dev_free, host_free, dev_label, host_label = available_memory(cfg.device)
    hint = "lower --batch, --gen-tokens or --layers"
    if cfg.device.startswith("cuda"):
        if need.device_bytes > dev_free:
            raise TiersimError(f"the replay needs {need.device_bytes / GB:.2f} GB of device memory "
                               f"({need.describe('device')}) but {dev_label} is {dev_free / GB:.2f} GB; {hint}")
        if need.host_bytes > host_free:
            raise TiersimError(f"the replay needs {need.host_bytes / GB:.2f} GB of host memory "
                               f"({need.describe('host')}) but {host_label} is {host_free / GB:.2f} GB; {hint}")
        return
    total = need.device_bytes + need.host_bytes
    if total > 0.9 * host_free:
        raise TiersimError(f"the replay needs {total / GB:.2f} GB of RAM (device side: {need.describe('device')}; "
                           f"host side: {need.describe('host') or 'none'}) but {dev_label} is "
                           f"{host_free / GB:.2f} GB (90% usable); {hint}")


# ---------------------------------------------------------------------------------------------
# Device helpers: streams, clocks, signals that work the same on CUDA and on CPU
# ---------------------------------------------------------------------------------------------

BOUNCE_ROWS = 1 << 15  # rows per pinned bounce buffer: the chunk the host gathers while the DMA runs
EVENT_WINDOW = 1024  # CUDA events kept per stream (waits look back depth + 1 or `layers` layer-steps)


def torch_dtype(model: ModelSpec):
    """bf16 for 2-byte models, fp32 for 4-byte ones."""
    import torch

    return {2: torch.bfloat16, 4: torch.float32}[model.dtype_bytes]


class Clock:
    """Timestamps on the compute stream: CUDA events on CUDA, perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        """A timestamp at this point of the compute stream."""
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        """Seconds from mark a to mark b (call after synchronising)."""
        return a.elapsed_time(b) * 1e-3 if self.cuda else b - a

    def sync(self) -> None:
        """Wait until the device is done."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()


class Progress:
    """Layer-steps finished by one stream, visible to the other thread (and, on CUDA, to the other stream)."""

    def __init__(self, cuda: bool):
        self.cuda, self.count, self.failed = cuda, 0, None
        self.events: dict[int, object] = {}
        self.cond = threading.Condition()

    def advance(self, stream=None) -> None:
        """One more layer-step done (on CUDA: enqueued on `stream`; an event marks its completion)."""
        event = None
        if self.cuda:
            import torch

            event = torch.cuda.Event()
            event.record(stream)
        with self.cond:
            self.events[self.count] = event
            self.events.pop(self.count - EVENT_WINDOW, None)
            self.count += 1
            self.cond.notify_all()

    def wait(self, count: int, stream=None) -> None:
        """Block until `count` layer-steps are done (CUDA: enqueued, and `stream` waits for them on the device)."""
        if count <= 0:
            return
        with self.cond:
            self.cond.wait_for(lambda: self.count >= count or self.failed is not None)
            if self.failed is not None:
                raise RuntimeError("the other stream failed") from self.failed
            event = self.events.get(count - 1)
        if self.cuda:
            if event is None:
                raise RuntimeError(f"layer-step {count - 1} is older than the {EVENT_WINDOW} kept events")
            stream.wait_event(event)

    def fail(self, error: BaseException) -> None:
        """Wake every waiter with an error."""
        with self.cond:
            self.failed = error
            self.cond.notify_all()


def cpu_threads(n: int = 1):
    """Context manager: torch intra-op threads for the CPU device (one: the other core is the copy engine)."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def scope():
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    return scope()


# ---------------------------------------------------------------------------------------------
# Model-shaped compute
# ---------------------------------------------------------------------------------------------

@dataclass(slots=True)
class LayerWeights:
    """One decoder layer's matmul weights (random), in the model's real shapes."""

    qkv: object  # [(heads + 2 kv_heads) * head_dim, hidden]
    o: object  # [hidden, heads * head_dim]
    gate_up: object  # [2 * intermediate, hidden]
    down: object  # [hidden, intermediate]
    norm: object  # [hidden]

    @classmethod
    def random(cls, m: ModelSpec, device, dtype) -> LayerWeights:
        """Normal(0, 0.02) weights drawn on the device from torch's global generator."""
        import torch

        def w(*shape):
            return torch.empty(*shape, device=device, dtype=dtype).normal_(0.0, 0.02)

        qkv_out = (m.attention_heads + 2 * m.kv_heads) * m.head_dim
        return cls(w(qkv_out, m.hidden), w(m.hidden, m.attention_heads * m.head_dim), w(2 * m.intermediate, m.hidden),
                   w(m.hidden, m.intermediate), torch.ones(m.hidden, device=device, dtype=dtype))


def rms_norm(x, weight):
    """RMSNorm in the activation dtype."""
    import torch

    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) * weight


def mlp(x, w: LayerWeights):
    """SwiGLU MLP with the residual."""
    import torch.nn.functional as F

    gate, up = (rms_norm(x, w.norm) @ w.gate_up.T).chunk(2, dim=-1)
    return x + (F.silu(gate) * up) @ w.down.T


def decode_attention(q, k_chunks, v_chunks, valid_last: int, k_stage=None, v_stage=None):
    """One query per sequence over T0 chunks (the last `valid_last` tokens long) and staged tokens, one softmax.

    q [G, g, d] (G = sequences x kv heads, g query heads per kv head, pre-scaled); k/v_chunks [f, G, C, d];
    k/v_stage [G, m, d] or None. Returns [G, g, d].
    """
    import torch

    f, G, C, d = k_chunks.shape
    g = q.shape[1]
    s0 = torch.matmul(q.unsqueeze(0), k_chunks.transpose(-1, -2))  # [f, G, g, C]
    if valid_last < C:
        s0[-1, :, :, valid_last:] = -math.inf
    parts = [s0.permute(1, 2, 0, 3).reshape(G, g, f * C)]
    if k_stage is not None:
        parts.append(torch.matmul(q, k_stage.transpose(-1, -2)))  # [G, g, m]
    p = torch.softmax(torch.cat(parts, dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
    p0 = p[..., : f * C].reshape(G, g, f, C).permute(2, 0, 1, 3).contiguous()
    out = torch.matmul(p0, v_chunks).sum(0)
    if k_stage is not None:
        out = out + torch.matmul(p[..., f * C:], v_stage)
    return out


# ---------------------------------------------------------------------------------------------
# The executor
# ---------------------------------------------------------------------------------------------

@dataclass(slots=True)
class ReplayResult:
    """Per-step times (seconds) and bytes of one replay."""

    step_s: np.ndarray  # wall time of each step, end to end (the first from its start)
    layers_s: np.ndarray  # the decoder layers' share of each step
    head_s: np.ndarray  # lm_head share
    stall_s: np.ndarray  # compute waiting for staged copies
    h2d_bytes: np.ndarray
    d2h_bytes: np.ndarray
    memory: MemoryNeed | None  # set by `replay`
    uniform: bool
    wall_s: float
    fetch_path: str = ""  # how DDR-tier tokens reached the staging buffers

    def summary(self) -> dict:
        """Means in ms, totals, spread."""
        ms = self.step_s * 1e3
        return {
            "step_ms_mean": float(ms.mean()), "step_ms_p50": float(np.median(ms)),
            "step_ms_p10": float(np.percentile(ms, 10)), "step_ms_p90": float(np.percentile(ms, 90)),
            "layers_ms_mean": float(self.layers_s.mean() * 1e3), "head_ms_mean": float(self.head_s.mean() * 1e3),
            "stall_ms_mean": None if np.isnan(self.stall_s).all() else float(np.nanmean(self.stall_s) * 1e3),
            "steps": len(ms),
            "h2d_gb_per_step": float(self.h2d_bytes.mean() / GB), "d2h_gb_per_step": float(self.d2h_bytes.mean() / GB),
            "device_gb": self.memory.device_bytes / GB if self.memory else None,
            "host_gb": self.memory.host_bytes / GB if self.memory else None,
            "batched_attention": self.uniform, "fetch_path": self.fetch_path, "wall_s": self.wall_s,
        }


class Replayer:
    """Storage and kernels for one plan on one device; `run()` replays the steps and times them."""

    def __init__(self, cfg: ReplayConfig, plan: ReplayPlan, probe=None, weights: list[LayerWeights] | None = None):
        import torch

        self.cfg, self.plan, self.m, self.probe = cfg, plan, cfg.model, probe
        self.device = torch.device(cfg.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch_dtype(cfg.model)
        m, lay = self.m, plan.layout
        self.weights = weights or [LayerWeights.random(m, self.device, self.dtype) for _ in range(m.layers)]
        self.lm_head = torch.empty(m.vocab, m.hidden, device=self.device, dtype=self.dtype).normal_(0.0, 0.02)
        self.final_norm = torch.ones(m.hidden, device=self.device, dtype=self.dtype)
        shape = (lay.batch, lay.chunks, m.kv_heads, lay.chunk, m.head_dim) if lay.slot_major else \
            (lay.chunks, lay.batch, m.kv_heads, lay.chunk, m.head_dim)
        self.k0 = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(m.layers)]
        self.v0 = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(m.layers)]
        self.tiered = cfg.strategy in TIERED
        nbuf = {"prefetch-layer": cfg.depth + 1, "prefetch-sync": m.layers}.get(cfg.strategy, 0)
        rows = max(1, plan.staging_rows_max)
        self.staging = [torch.zeros(2 * rows, m.head_dim, device=self.device, dtype=self.dtype) for _ in range(nbuf)]
        pin = self.cuda and cfg.pinned
        host_rows = 2 * lay.host_v_offset if self.tiered else 0
        self.host = [torch.zeros(host_rows, m.head_dim, dtype=self.dtype, pin_memory=pin) for _ in range(m.layers)]
        self.host_uva, self.fetch_path = [], _fetch_path(cfg, self.tiered)
        if pin and self.tiered:
            try:
                self.host_uva = [uva_alias(h, self.device) for h in self.host]
            except Exception as e:  # noqa: BLE001 - any failure: fall back to host gather + DMA
                self.fetch_path = f"host gather + DMA (zero-copy UVA alias unavailable: {str(e).splitlines()[0][:120]})"
        self.bounce = [torch.empty(BOUNCE_ROWS, m.head_dim, dtype=self.dtype, pin_memory=True)
                       for _ in range(2)] if (pin and self.tiered and not self.host_uva) else []
        self._bounce_done = [None, None]  # events: the DMA that last read each bounce buffer
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._to_device(torch)
        self.inputs: dict[int, object] = {}

    def _to_device(self, torch) -> None:
        """Index tensors: T0 and staging ones on the device, host-pool ones on the host."""
        dev, lay = self.device, self.plan.layout
        as_dev = lambda a: torch.as_tensor(a, dtype=torch.int64, device=dev)  # noqa: E731
        as_host = lambda a: torch.as_tensor(a, dtype=torch.int64)  # noqa: E731
        shared: dict[int, tuple] = {}
        for w in self.plan.steps:
            w.new_rows = as_dev(w.new_rows)
            if w.compact is not None:
                w.compact = tuple(as_dev(a) for a in w.compact)
            if w.promote is not None:
                src, dst = w.promote
                w.promote = (as_host(np.concatenate([src, src + lay.host_v_offset])), as_dev(dst))
            if w.d2h is not None:
                t0, host = w.d2h
                w.d2h = (as_dev(t0), as_host(np.concatenate([host, host + lay.host_v_offset])))
            if w.gather is not None and isinstance(w.gather, np.ndarray):
                key = id(w.gather)
                if key not in shared:
                    rows = np.concatenate([w.gather, w.gather + lay.host_v_offset])
                    shared[key] = (w.gather, as_host(rows), as_dev(rows) if self.host_uva else None)
                w.gather, w.gather_dev = shared[key][1], shared[key][2]
        self._positions = [torch.as_tensor(w.positions, device=dev) for w in self.plan.steps] if self.probe else None

    # -- copies ---------------------------------------------------------------------------------
    def demote(self, layer: int, w: StepWork) -> None:
        """Copy a re-tier's demoted tokens of one layer from T0 to the host pool."""
        import torch

        t0_rows, host_rows = w.d2h
        k0, v0 = self.k0[layer].view(-1, self.m.head_dim), self.v0[layer].view(-1, self.m.head_dim)
        data = torch.cat([k0.index_select(0, t0_rows), v0.index_select(0, t0_rows)])
        if self.cuda:
            host = torch.empty(data.shape, dtype=data.dtype, pin_memory=self.cfg.pinned)
            host.copy_(data, non_blocking=self.cfg.pinned)
            torch.cuda.current_stream().synchronize()
            data = host
        self.host[layer].index_copy_(0, host_rows, data)

    def compact(self, layer: int, w: StepWork) -> None:
        """Fill the holes demotions and evictions left in T0 with the last resident tokens."""
        d = self.m.head_dim
        src, dst = w.compact
        for pool in (self.k0[layer].view(-1, d), self.v0[layer].view(-1, d)):
            pool.index_copy_(0, dst, pool.index_select(0, src))

    def promote(self, layer: int, w: StepWork) -> None:
        """Copy the last re-tier's promoted tokens of one layer from the host pool into T0."""
        host_rows, t0_rows = w.promote
        n, d = len(t0_rows), self.m.head_dim
        data = self.host[layer].index_select(0, host_rows)
        if self.cuda:
            data = data.pin_memory() if self.cfg.pinned else data
            data = data.to(self.device, non_blocking=self.cfg.pinned)
        self.k0[layer].view(-1, d).index_copy_(0, t0_rows, data[:n])
        self.v0[layer].view(-1, d).index_copy_(0, t0_rows, data[n:])

    def stage(self, layer: int, w: StepWork, buf) -> None:
        """Gather a layer's DDR-tier (and promoted) tokens from the host pool into a staging buffer."""
        import torch

        rows = w.gather
        n = len(rows)
        out = buf[:n]
        src = self.host[layer]
        if not self.cfg.pinned:  # the paper's prototype: gather into a new pageable tensor, then copy
            out.copy_(src.index_select(0, rows))
        elif not self.cuda:  # host to host: one fused pass
            torch.index_select(src, 0, rows, out=out)
        elif self.host_uva:  # the GPU gathers from pinned host memory itself, over the link
            torch.index_select(self.host_uva[layer], 0, w.gather_dev, out=out)
        else:  # fallback: gather chunk i+1 on the host while chunk i is on the link
            done = self._bounce_done
            for i, start in enumerate(range(0, n, BOUNCE_ROWS)):
                part = rows[start: start + BOUNCE_ROWS]
                bounce = self.bounce[i % 2]
                if done[i % 2] is not None:
                    done[i % 2].synchronize()
                torch.index_select(src, 0, part, out=bounce[: len(part)])
                out[start: start + len(part)].copy_(bounce[: len(part)], non_blocking=True)
                done[i % 2] = torch.cuda.Event()
                done[i % 2].record()

    # -- compute --------------------------------------------------------------------------------
    def layer(self, layer: int, w: StepWork, x, buf, k: int):
        """One decoder layer for the step's new tokens."""
        m, wt = self.m, self.weights[layer]
        d, H, kvh = m.head_dim, m.attention_heads, m.kv_heads
        k0, v0 = self.k0[layer], self.v0[layer]
        k0f, v0f = k0.view(-1, d), v0.view(-1, d)
        if w.compact is not None and not self.tiered:  # tiered: the copy engine did it, before its promotions
            self.compact(layer, w)
        qkv = rms_norm(x, wt.norm) @ wt.qkv.T
        q, kn, vn = qkv.split([H * d, kvh * d, kvh * d], dim=-1)
        k_new, v_new = kn.reshape(-1, d), vn.reshape(-1, d)
        if self.probe is not None:
            k_new = self.probe.tag(self._positions[k], kvh, k_new)
        k0f.index_copy_(0, w.new_rows, k_new)
        v0f.index_copy_(0, w.new_rows, v_new)
        out = self.attention(layer, w, q, kn, vn, buf, k)
        x = x + out @ wt.o.T
        return mlp(x, wt)

    def attention(self, layer: int, w: StepWork, q, kn, vn, buf, k: int):
        """Attention of the step's new tokens: batched when every slot does the same work, else slot by slot."""
        import torch
        import torch.nn.functional as F

        m, lay = self.m, self.plan.layout
        d, H, kvh, C = m.head_dim, m.attention_heads, m.kv_heads, lay.chunk
        g, scale = H // kvh, 1.0 / math.sqrt(d)
        B = lay.batch
        R = w.staged_rows * kvh
        stage_k = buf[:R] if (buf is not None and R) else None
        stage_v = buf[R: 2 * R] if stage_k is not None else None
        if w.uniform and not w.prefill[0] and not lay.slot_major:
            a, s = int(w.attend[0]), int(w.staged[0])
            f = -(-a // C)
            qb = (q.reshape(B * kvh, g, d) * scale)
            kc = self.k0[layer][:f].view(f, B * kvh, C, d)
            vc = self.v0[layer][:f].view(f, B * kvh, C, d)
            ks = stage_k.view(B * kvh, s, d) if (stage_k is not None and s) else None
            vs = stage_v.view(B * kvh, s, d) if ks is not None else None
            if self.probe is not None:
                for b in range(B):
                    self.probe.check(k, layer, b, kc.view(f, B, kvh, C, d)[:, b], a,
                                     None if ks is None else ks.view(B, kvh, s, d)[b])
            return decode_attention(qb, kc, vc, a - (f - 1) * C, ks, vs).reshape(B, H * d)
        if w.uniform:  # every slot prefills the same prompt length
            P = int(w.tokens[0])
            qp = q.reshape(B, P, H, d).transpose(1, 2)
            kp = kn.reshape(B, P, kvh, d).transpose(1, 2)
            vp = vn.reshape(B, P, kvh, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
            return o.transpose(1, 2).reshape(B * P, H * d)
        outs, row, off = [], 0, 0
        for b in range(B):
            n = int(w.tokens[b])
            qs = q[row: row + n]
            if w.prefill[b]:
                qp = qs.reshape(1, n, H, d).transpose(1, 2)
                kp = kn[row: row + n].reshape(1, n, kvh, d).transpose(1, 2)
                vp = vn[row: row + n].reshape(1, n, kvh, d).transpose(1, 2)
                o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
                outs.append(o.transpose(1, 2).reshape(n, H * d))
            else:
                a, s = int(w.attend[b]), int(w.staged[b])
                f = -(-a // C)
                kc = self.k0[layer][b, :f] if lay.slot_major else self.k0[layer][:f, b]
                vc = self.v0[layer][b, :f] if lay.slot_major else self.v0[layer][:f, b]
                ks = stage_k[off: off + kvh * s].view(kvh, s, d) if s else None
                vs = stage_v[off: off + kvh * s].view(kvh, s, d) if s else None
                if self.probe is not None:
                    self.probe.check(k, layer, b, kc, a, ks)
                o = decode_attention(qs.reshape(kvh, g, d) * scale, kc, vc, a - (f - 1) * C, ks, vs)
                outs.append(o.reshape(1, H * d))
                off += kvh * s
            row += n
        return torch.cat(outs)

    def head(self, x, w: StepWork):
        """Final norm and lm_head over the last new token of every slot."""
        last = np.cumsum(w.tokens) - 1
        if len(last) != x.shape[0]:
            import torch

            x = x.index_select(0, torch.as_tensor(last, device=self.device))
        return rms_norm(x, self.final_norm) @ self.lm_head.T

    def _input(self, tokens: int):
        import torch

        if tokens not in self.inputs:
            self.inputs[tokens] = torch.randn(tokens, self.m.hidden, device=self.device).to(self.dtype)
        return self.inputs[tokens]

    # -- the step loop --------------------------------------------------------------------------
    def run(self, steps: list[StepWork] | None = None) -> ReplayResult:
        """Replay `steps` (default: the whole plan) and time each one on the compute stream."""
        import torch

        steps = self.plan.steps if steps is None else steps
        clock = Clock(self.device)
        L, strategy = self.m.layers, self.cfg.strategy
        staged = computed = engine = None
        if strategy == "prefetch-layer":
            staged, computed = Progress(self.cuda), Progress(self.cuda)
            engine = threading.Thread(target=self._copy_engine, args=(steps, staged, computed), daemon=True)
        marks, stall = [], np.zeros(len(steps))  # stalls: host-side on CPU; not measured on CUDA (async)
        wall = time.perf_counter()
        with torch.inference_mode():
            if engine is not None:
                engine.start()
            try:
                marks.append((clock.mark(),))
                for k, w in enumerate(steps):
                    x = self._input(int(w.tokens.sum()))
                    if strategy == "prefetch-sync":
                        t = time.perf_counter()
                        self._sync_copies(w)
                        stall[k] = time.perf_counter() - t
                    for layer in range(L):
                        buf = None
                        if strategy == "prefetch-layer":
                            j = k * L + layer
                            t = time.perf_counter()
                            staged.wait(j + 1, torch.cuda.current_stream() if self.cuda else None)
                            stall[k] += time.perf_counter() - t
                            buf = self.staging[j % len(self.staging)]
                        elif strategy == "prefetch-sync":
                            buf = self.staging[layer]
                        x = self.layer(layer, w, x, buf, k)
                        if computed is not None:
                            computed.advance(torch.cuda.current_stream() if self.cuda else None)
                    mid = clock.mark()
                    self.head(x, w)
                    marks.append((mid, clock.mark()))
            except BaseException as e:
                if staged is not None:
                    computed.fail(e)
                raise
            finally:
                if engine is not None:
                    engine.join(timeout=600)
            clock.sync()
        if staged is not None and staged.failed is not None:
            raise staged.failed
        wall = time.perf_counter() - wall
        ends = [marks[0][0]] + [mk[1] for mk in marks[1:]]
        step_s = np.array([clock.seconds(a, b) for a, b in zip(ends[:-1], ends[1:])])
        head_s = np.array([clock.seconds(mk[0], mk[1]) for mk in marks[1:]])
        n = len(steps)
        if self.cuda:
            stall[:] = np.nan
        return ReplayResult(step_s, step_s - head_s, head_s, stall, self.plan.h2d_bytes[:n], self.plan.d2h_bytes[:n],
                            None, all(w.uniform for w in steps), wall, self.fetch_path)

    def _sync_copies(self, w: StepWork) -> None:
        """prefetch-sync: every layer's demotions and staged copies, then the compute stream waits for them."""
        import torch

        if not _touches_t0(w) and w.gather is None:
            return
        if self.cuda:
            self.copy_stream.wait_stream(torch.cuda.current_stream())  # T0 and staging no longer in use
            with torch.cuda.stream(self.copy_stream):
                for layer in range(self.m.layers):
                    self._copy_layer(layer, w, self.staging[layer])
            torch.cuda.current_stream().wait_stream(self.copy_stream)
        else:
            for layer in range(self.m.layers):
                self._copy_layer(layer, w, self.staging[layer])

    def _copy_layer(self, layer: int, w: StepWork, buf) -> None:
        """The copy engine's work for one layer: demotions out, T0 compaction, promotions in, DDR tier staged."""
        if w.d2h is not None:
            self.demote(layer, w)
        if w.compact is not None:
            self.compact(layer, w)
        if w.promote is not None:
            self.promote(layer, w)
        if w.gather is not None:
            self.stage(layer, w, buf)

    def _copy_engine(self, steps: list[StepWork], staged: Progress, computed: Progress) -> None:
        """The copy stream of prefetch-layer: stage layer j once buffer j % (depth+1) is free, `depth` layers ahead."""
        import torch

        L, nbuf = self.m.layers, len(self.staging)
        try:
            with torch.inference_mode():
                ctx = torch.cuda.stream(self.copy_stream) if self.cuda else _null()
                with ctx:
                    stream = self.copy_stream
                    for k, w in enumerate(steps):
                        for layer in range(L):
                            j = k * L + layer
                            computed.wait(j - nbuf + 1, stream)  # the buffer's last user is done
                            if _touches_t0(w):
                                computed.wait(j - L + 1, stream)  # this layer's T0 is no longer in use
                            self._copy_layer(layer, w, self.staging[j % nbuf])
                            staged.advance(stream)
        except BaseException as e:  # surface it in the compute thread
            staged.fail(e)


class _CudaArray:
    """A pinned host buffer presented through the CUDA array interface (as int16: bf16 has no typestr)."""

    def __init__(self, t):
        self.keep = t
        self.__cuda_array_interface__ = {"shape": tuple(t.shape), "typestr": "<i2", "data": (t.data_ptr(), False),
                                         "version": 2, "strides": None}


def uva_alias(host, device):
    """A CUDA tensor over a pinned host tensor's memory: kernels reading it read host memory over the link
    (zero-copy; pinned memory is mapped under unified addressing). Raises where the driver does not map it."""
    import torch

    if not host.is_pinned() or not host.is_contiguous() or host.element_size() != 2:
        raise ValueError("need a contiguous pinned 2-byte tensor")
    alias = torch.as_tensor(_CudaArray(host.view(torch.int16)), device=device)
    if alias.device.type != "cuda" or alias.data_ptr() != host.data_ptr():
        raise RuntimeError("as_tensor copied instead of aliasing")
    return alias.view(host.dtype)


def _fetch_path(cfg: ReplayConfig, tiered: bool) -> str:
    if not tiered:
        return "none"
    if not cfg.pinned:
        return "pageable: host gather into a new tensor, then copy"
    if cfg.device.startswith("cuda"):
        return "pinned: zero-copy GPU gather over the link (UVA index_select)"
    return "pinned: one index_select from the host pool into the staging buffer (CPU device)"


def _touches_t0(w: StepWork) -> bool:
    """The copy engine reads or rewrites T0 in this step (demotions, compaction, promotions)."""
    return w.d2h is not None or w.compact is not None or w.promote is not None


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def replay(cfg: ReplayConfig, workload: Workload, probe=None) -> ReplayResult:
    """Plan, check memory, allocate, warm up on the first steps, then replay every step and time it."""
    import torch

    need = memory_need(cfg, workload)
    check_memory(cfg, need)
    plan = plan_replay(cfg, workload)
    with cpu_threads(1) if not cfg.device.startswith("cuda") else _null():
        torch.manual_seed(cfg.seed)
        rep = Replayer(cfg, plan, probe)
        if cfg.warmup_steps and probe is None:
            rep.run(plan.steps[: cfg.warmup_steps])
        result = rep.run()
    result.memory = need
    return result


def layer_kernel(model: ModelSpec, device: str, tokens: int, batch: int, kv_tokens: int, copies: int,
                 chunk: int = 128, weights: list[LayerWeights] | None = None):
    """The replay's own decoder layer on synthetic work, for calibration: `batch` sequences decoding one token
    each over `kv_tokens` resident tokens (or, with kv_tokens = 0, one sequence prefilling `tokens` tokens).
    `copies` layers (weights and T0 each) are rotated so that repeats stream from memory (`weights`: reuse these,
    at least `copies` of them). Returns a callable."""
    import torch

    decode = kv_tokens > 0
    b = batch if decode else 1
    per = np.full(b, 1 if decode else tokens)
    attend = np.full(b, kv_tokens if decode else tokens)
    lay = Layout(b, model.kv_heads, chunk, -(-int(attend.max()) // chunk), 1, slot_major=False)
    idx = np.full(b, kv_tokens - 1) if decode else np.arange(tokens)
    slot = np.arange(b) if decode else np.zeros(tokens, dtype=np.int64)
    work = StepWork(prefill=np.full(b, not decode), tokens=per, attend=attend, staged=np.zeros(b, np.int64),
                    promoted=np.zeros(b, np.int64), positions=idx.copy(), new_rows=lay.t0_rows(slot, idx).ravel())
    cfg = ReplayConfig(model=dataclasses.replace(model, layers=copies), strategy="full", batch=b, gen_tokens=2,
                       device=device, chunk_tokens=chunk, warmup_steps=0)
    plan = ReplayPlan([work], lay, 0, np.zeros(1), np.zeros(1))
    rep = Replayer(cfg, plan, weights=weights[:copies] if weights else None)
    rep.lm_head = None  # not used
    x = rep._input(int(per.sum()))
    turn = iter(range(1 << 62))

    def run():
        with torch.inference_mode():
            return rep.layer(next(turn) % copies, work, x, None, 0)

    return run


def head_kernel(model: ModelSpec, device: str, tokens: int, copies: int):
    """The replay's final norm + lm_head over `tokens` tokens, rotating `copies` lm_head weights."""
    import torch

    dev, dtype = torch.device(device), torch_dtype(model)
    heads = [torch.empty(model.vocab, model.hidden, device=dev, dtype=dtype).normal_(0.0, 0.02) for _ in range(copies)]
    norm = torch.ones(model.hidden, device=dev, dtype=dtype)
    x = torch.randn(tokens, model.hidden, device=dev).to(dtype)
    turn = iter(range(1 << 62))

    def run():
        with torch.inference_mode():
            return rms_norm(x, norm) @ heads[next(turn) % copies].T

    return run


def reduced_model(model: ModelSpec, layers: int | None) -> ModelSpec:
    """The model cut to its first `layers` layers (the replay and the simulator both run those)."""
    if layers is None or layers == model.layers:
        return model
    if not isinstance(layers, int) or isinstance(layers, bool) or not 1 <= layers <= model.layers:
        raise TiersimError(f"--layers {layers!r} out of range for {model.name} ({model.layers} layers); "
                           f"accepted: 1..{model.layers}")
    return dataclasses.replace(model, name=f"{model.name}[{layers}/{model.layers} layers]", layers=layers)


__all__ = ["REPLAY_STRATEGIES", "ReplayConfig", "ReplayPlan", "ReplayResult", "Replayer", "StepWork", "memory_need",
           "check_memory", "plan_replay", "reduced_model", "replay", "decode_attention"]
