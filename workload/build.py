"""The workload: trace requests → TierSchedules → per-step totals over a continuously batched decode.

The policy runs once per distinct trace request. Each schedule becomes a small table, one row per
step of that request's life in a batch slot (row 0 its prefill, row t+1 its decode step t), whose
columns are token counts per tier, transitions and attention mass. Slots are closed-loop: each
runs requests drawn (seeded) from the trace back to back. The batch's per-step totals are sums of
table rows over slots, so the cost grows with slots x steps, never with tokens: a slot's rows run in
order within a request, so each run is one slice added, slot by slot (the float sums are those of adding
each slot's rows in turn). A process remembers its last few workloads and block tables, reused while
the schedules they came from are the ones the cache still holds (the comparison runs of one simulation
share them).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tiersim import check
from tiersim.errors import TiersimError
from tiersim.policy import COMPRESSED, DDR, EVICTED, HBM, PolicyConfig, TierSchedule, replay
from tiersim.traces.format import Trace
from tiersim.traces.synth import ExtendedRequest, SynthParams
from tiersim.workload import cache

# Columns of a request table (and of the batch totals).
COLUMNS = (
    "hbm", "ddr", "compressed", "evicted",  # tokens per tier during the step
    "tokens",  # positions cached after the step's token is appended (prompt + generated so far)
    "prefill_tokens",  # prompt tokens processed in this step (the request's first row)
    "prefill_pairs",  # P(P+1): (query, key) pairs x 2 of the prompt's causal attention, for its FLOPs
    "prefill",  # 1 for a prefill step (it also yields the request's first token)
    "decode",  # 1 for a decode step
    "hbm_to_ddr", "ddr_to_hbm", "compressed_to_hbm", "to_compressed_from_hbm", "ddr_to_compressed",
    "compressed_to_ddr", "to_evicted",  # transitions at the end of the step (tokens)
    "mass_hbm", "mass_ddr", "mass_compressed", "mass_evicted",  # attention mass of the step per tier
)
COL = {name: i for i, name in enumerate(COLUMNS)}
_PAIRS = {
    (HBM, DDR): "hbm_to_ddr", (DDR, HBM): "ddr_to_hbm", (COMPRESSED, HBM): "compressed_to_hbm",
    (HBM, COMPRESSED): "to_compressed_from_hbm", (DDR, COMPRESSED): "ddr_to_compressed",
    (COMPRESSED, DDR): "compressed_to_ddr",
}


@dataclass(frozen=True, slots=True)
class Workload:
    """Per-request tables and the batch's per-step totals, plus where each token came from."""

    tables: np.ndarray  # (requests, steps_per_request + 1, len(COLUMNS))
    totals: np.ndarray  # (steps, len(COLUMNS)) summed over slots
    slot_rows: np.ndarray  # (batch, steps) flat row index (request * rows_per_request + row) per slot and step
    schedules: tuple[TierSchedule, ...]
    captured_tokens: int  # decode rows taken from the trace, over distinct requests
    synthetic_tokens: int  # decode rows made by the synthetic continuation
    requests_started: int  # requests that entered a slot during the run (including the first ones)
    requests_finished: int
    trace_model: str = "unknown"  # the model the trace's attention came from (its header's model id)
    keys: tuple[str, ...] = ()  # each schedule's cache entry (workload/cache.py), when built from a trace
    runs: np.ndarray | None = None  # (runs, 4) slot, first step, first flat row, steps: slot_rows as runs (slot_runs)
    block_memo: dict = field(default_factory=dict, repr=False, compare=False)  # block_totals by block size

    def column(self, name: str) -> np.ndarray:
        """Per-step batch total of one column."""
        return self.totals[:, COL[name]]


def request_table(s: TierSchedule) -> np.ndarray:
    """The table of one schedule: row 0 the prefill, row t+1 decode step t."""
    table = np.zeros((s.steps + 1, len(COLUMNS)))
    table[0, COL["hbm"]] = table[0, COL["tokens"]] = table[0, COL["prefill_tokens"]] = s.prompt_tokens
    table[0, COL["prefill_pairs"]] = s.prompt_tokens * (s.prompt_tokens + 1)
    table[0, COL["prefill"]] = 1
    rows = table[1:]
    rows[:, COL["hbm"]: COL["evicted"] + 1] = s.counts
    rows[:, COL["tokens"]] = s.prompt_tokens + np.arange(1, s.steps + 1)
    rows[:, COL["decode"]] = 1
    rows[:, COL["mass_hbm"]: COL["mass_evicted"] + 1] = s.mass
    for k in range(s.retiers):
        m = s.moves(k)
        t = int(s.retier_steps[k])
        for (a, b), name in _PAIRS.items():
            rows[t, COL[name]] = np.count_nonzero((m.from_tier == a) & (m.to_tier == b))
        rows[t, COL["to_evicted"]] = np.count_nonzero(m.to_tier == EVICTED)
    return table


# Columns of a request's block table (block_table): KV blocks held and the runs DDR-tier tokens make.
BLOCK_COLUMNS = (
    "blocks",  # blocks the cached positions fill (what `full` holds in HBM)
    "hbm_blocks",  # blocks with at least one token in HBM at full precision: they stay allocated
    "kept_blocks",  # blocks with at least one token not evicted (what eviction alone would leave)
    "ddr_runs", "ddr_full_blocks",  # maximal runs of DDR-tier tokens inside one block; how many are whole blocks
    "promoted_runs", "promoted_full_blocks",  # runs copied back (DDR -> HBM or compressed) at the step's re-tier
    "demoted_runs", "demoted_full_blocks",  # runs copied out (HBM or compressed -> DDR) at the step's re-tier
)
BCOL = {name: i for i, name in enumerate(BLOCK_COLUMNS)}


def _runs(mask: np.ndarray, block_size: int) -> tuple[int, int]:
    """Maximal runs of True inside each block of `mask`, and how many of them fill their whole block."""
    m = np.concatenate([mask, np.zeros(-len(mask) % block_size, dtype=bool)]).reshape(-1, block_size)
    starts = m.copy()
    starts[:, 1:] &= ~m[:, :-1]
    return int(starts.sum()), int(m.all(axis=1).sum())


def block_table(s: TierSchedule, block_size: int) -> np.ndarray:
    """Blocks and DDR runs of one schedule, per row of its request table (row 0 the prefill, row t+1 decode step t).

    A block stays in HBM while any of its tokens does: partly filled and partly offloaded blocks are held.
    Tiers change only at re-tiers; positions appended since the last one are in HBM.
    """
    bs = block_size
    table = np.zeros((s.steps + 1, len(BLOCK_COLUMNS)))
    blocks = -(-(s.prompt_tokens + np.arange(s.steps + 1)) // bs)
    table[:, BCOL["blocks"]] = table[:, BCOL["hbm_blocks"]] = table[:, BCOL["kept_blocks"]] = blocks
    tiers = np.full(s.prompt_tokens + s.steps + 1, HBM, dtype=np.int8)
    for k in range(s.retiers):
        m = s.moves(k)
        row = int(s.retier_steps[k]) + 1  # the moves happen at the end of this row's step
        ddr_out, ddr_in = m.from_tier == DDR, m.to_tier == DDR
        promoted = np.zeros(len(tiers), dtype=bool)
        promoted[m.positions[ddr_out & ((m.to_tier == HBM) | (m.to_tier == COMPRESSED))]] = True
        demoted = np.zeros(len(tiers), dtype=bool)
        demoted[m.positions[ddr_in & ((m.from_tier == HBM) | (m.from_tier == COMPRESSED))]] = True
        table[row, BCOL["promoted_runs"]: BCOL["demoted_full_blocks"] + 1] = (*_runs(promoted, bs), *_runs(demoted, bs))
        tiers[m.positions] = m.to_tier
        # From the next row until the next re-tier's row: the state after these moves.
        length = s.prompt_tokens + row
        q = length // bs
        head = tiers[: q * bs].reshape(-1, bs)
        stop = int(s.retier_steps[k + 1]) + 2 if k + 1 < s.retiers else s.steps + 1
        span = slice(row + 1, stop)
        tail = blocks[span] - q  # blocks from q on all hold tokens appended since (in HBM)
        table[span, BCOL["hbm_blocks"]] = np.count_nonzero((head == HBM).any(axis=1)) + tail
        table[span, BCOL["kept_blocks"]] = np.count_nonzero((head != EVICTED).any(axis=1)) + tail
        table[span, BCOL["ddr_runs"]: BCOL["ddr_full_blocks"] + 1] = _runs(tiers[:length] == DDR, bs)
    return table


def block_totals(w: Workload, block_size: int) -> np.ndarray:
    """Per-step batch totals of BLOCK_COLUMNS, summed over slots exactly like `Workload.totals`.

    A workload made by hand without schedules is taken as one sequence per step whose offloaded
    tokens fill whole blocks.
    """
    if not w.schedules:
        per = lambda name: -(-w.column(name) // block_size)  # noqa: E731
        full = lambda name: w.column(name) // block_size  # noqa: E731
        promoted, demoted = w.column("ddr_to_hbm") + w.column("ddr_to_compressed"), \
            w.column("hbm_to_ddr") + w.column("compressed_to_ddr")
        held = per("tokens") - full("ddr") - full("compressed") - full("evicted")
        return np.stack([per("tokens"), held, per("tokens") - full("evicted"), per("ddr"), full("ddr"),
                         -(-promoted // block_size), promoted // block_size, -(-demoted // block_size),
                         demoted // block_size], axis=1)
    if block_size not in w.block_memo:
        keys = w.keys if len(w.keys) == len(w.schedules) else (None,) * len(w.schedules)
        flat = np.stack([_block_table(s, key, block_size) for s, key in zip(w.schedules, keys)])
        totals = slot_sum(flat.reshape(-1, len(BLOCK_COLUMNS)), w.runs if w.runs is not None else row_runs(w.slot_rows),
                          w.slot_rows.shape[1])
        totals.flags.writeable = False
        w.block_memo[block_size] = totals
    return w.block_memo[block_size]


_BLOCK_TABLES: OrderedDict[tuple[str, int], tuple[TierSchedule, np.ndarray]] = OrderedDict()
REMEMBER_BLOCK_TABLES = 64  # block tables of recent schedules kept per process (a 4,096-step one is 0.3 MB)


def _block_table(s: TierSchedule, key: str | None, block_size: int) -> np.ndarray:
    """`block_table`, remembered by cache entry while `s` is the schedule that entry gave."""
    known = _BLOCK_TABLES.get((key, block_size)) if key is not None else None
    if known is not None and known[0] is s:
        return known[1]
    table = block_table(s, block_size)
    if key is not None:
        _BLOCK_TABLES[key, block_size] = (s, table)
        while len(_BLOCK_TABLES) > REMEMBER_BLOCK_TABLES:
            _BLOCK_TABLES.popitem(last=False)
    return table


def slot_sum(flat: np.ndarray, runs: np.ndarray, steps: int) -> np.ndarray:
    """Per-step sums over slots of table rows `flat`: each run of a slot's consecutive rows is one slice added,
    slot by slot, so every float sum is the one adding each slot's rows in turn gives."""
    totals = np.zeros((steps, flat.shape[1]))
    for _, k, f, n in runs.tolist():
        totals[k: k + n] += flat[f: f + n]
    return totals


def row_runs(rows: np.ndarray) -> np.ndarray:
    """Runs of consecutive rows in each slot's row indices (batch, steps): (slot, first step, first row, steps)."""
    batch, steps = rows.shape
    start = np.ones(rows.shape, dtype=bool)
    start[:, 1:] = np.diff(rows, axis=1) != 1
    at = np.flatnonzero(start)
    length = np.diff(np.append(at, batch * steps))  # every slot's first step starts a run: runs never span slots
    return np.stack([at // steps, at % steps, rows.ravel()[at], length], axis=1).astype(np.int64)


def extend_requests(trace: Trace, gen_tokens: int, params: SynthParams, seed: int) -> list[ExtendedRequest]:
    """Every trace request continued (or cut) to `gen_tokens` generated tokens."""
    return list(ExtendedRequests(trace, gen_tokens, params, seed))


class ExtendedRequests(Sequence):
    """Every trace request continued (or cut) to `gen_tokens` generated tokens, each read from the trace (and its
    checksums verified) only when asked for: a build whose schedules are all cached reads none."""

    def __init__(self, trace: Trace, gen_tokens: int, params: SynthParams, seed: int):
        if len(trace) == 0:
            raise TiersimError(f"{trace.path}: the trace holds no requests")
        if gen_tokens < 2:  # what ExtendedRequest refuses, refused before any request is read
            raise TiersimError(f"gen_tokens must be >= 2 to extend a request, got {gen_tokens}")
        self.trace, self.gen_tokens, self.params, self.seed = trace, gen_tokens, params, seed
        self._made: dict[int, ExtendedRequest] = {}

    def __len__(self) -> int:
        return len(self.trace)

    def __getitem__(self, i: int) -> ExtendedRequest:
        if not 0 <= i < len(self):
            raise IndexError(f"request {i} out of range for a trace of {len(self)} requests")
        if i not in self._made:
            self._made[i] = ExtendedRequest(self.trace[i], self.params, self.gen_tokens, seed=self.seed * 1_000_003 + i)
        return self._made[i]

    def captured_steps(self) -> int:
        """Decode rows taken from the trace over all requests (ExtendedRequest.captured_steps), from its header."""
        return sum(min(self.trace.steps_of(i), self.gen_tokens - 1) for i in range(len(self)))


_RUNS: OrderedDict[tuple, tuple[int, np.ndarray]] = OrderedDict()  # slot_runs by all but steps: (steps, runs)
REMEMBER_RUNS = 8


def slot_runs(n_requests: int, rows_per_request: int, batch: int, steps: int, seed: int, cold_start: bool) -> np.ndarray:
    """Each slot's requests as runs of table rows, slot by slot: (slot, first step, first flat row, steps) per run.

    Closed loop, each slot drawing requests with its own seed. A slot draws the same requests whatever the
    number of steps, so a shorter run is a longer one's runs cut at `steps` (remembered per process).
    """
    key = (n_requests, rows_per_request, batch, seed, cold_start)
    known = _RUNS.get(key)
    if known is not None and known[0] >= steps:
        runs = known[1]
        if known[0] > steps:
            runs = runs[runs[:, 1] < steps].copy()
            runs[:, 3] = np.minimum(runs[:, 3], steps - runs[:, 1])
            runs.flags.writeable = False
        return runs
    out = []
    for b in range(batch):
        rng = np.random.default_rng([seed, b])
        k, first = 0, True
        while k < steps:
            r = int(rng.integers(n_requests))
            start = 0 if (cold_start or not first) else int(rng.integers(rows_per_request))
            n = min(rows_per_request - start, steps - k)
            out.append((b, k, r * rows_per_request + start, n))
            k += n
            first = False
    runs = np.array(out, dtype=np.int64).reshape(-1, 4)
    runs.flags.writeable = False
    _RUNS[key] = (steps, runs)
    _RUNS.move_to_end(key)
    while len(_RUNS) > REMEMBER_RUNS:
        _RUNS.popitem(last=False)
    return runs


def rows_of(runs: np.ndarray, batch: int, steps: int) -> np.ndarray:
    """Flat table-row index (batch, steps) of every slot at every step, from its runs."""
    at = runs[:, 0] * steps + runs[:, 1]
    return (np.arange(batch * steps, dtype=np.int64) + np.repeat(runs[:, 2] - at, runs[:, 3])).reshape(batch, steps)


def slot_rows(n_requests: int, rows_per_request: int, batch: int, steps: int, seed: int, cold_start: bool):
    """Flat table-row index of every slot at every step; closed loop, each slot drawing requests with its own seed.

    Returns (rows (batch, steps), requests started, requests finished).
    """
    runs = slot_runs(n_requests, rows_per_request, batch, steps, seed, cold_start)
    finished = int(np.count_nonzero(runs[:, 2] % rows_per_request + runs[:, 3] == rows_per_request))
    return rows_of(runs, batch, steps), len(runs), finished


def _replay_table(args: tuple[ExtendedRequest, PolicyConfig]) -> tuple[TierSchedule, np.ndarray]:
    schedule = replay(*args)
    return schedule, request_table(schedule)


# Attention values the replays of one build read before forking workers pays: ~0.7 s of replay on one core. Measured
# on the 2-core VM (2026-12): the default trace's 2 x 4,096-step requests (8.6 M values each) replay in ~0.06 s
# each, while a pool of 2 workers costs ~0.3 s to start and to send the schedules back.
POOL_MIN_VALUES = 100_000_000


def replay_all(requests: Sequence[ExtendedRequest], policy: PolicyConfig, workers: int | None = None,
               keys: list[str] | None = None):
    """Schedules and tables of every request: from the cache where `keys` hit, else replayed in
    `workers` forked processes (by default one per core, or this process when the replays are small) and stored."""
    done = cache.load_schedules(keys, policy) if keys else [None] * len(requests)
    todo = [i for i, d in enumerate(done) if d is None]
    if workers is None:
        values = sum(requests[i].steps * (len(requests[i].prefill) + (requests[i].steps + 1) / 2) for i in todo)
        workers = min(len(todo), os.cpu_count() or 1) if values >= POOL_MIN_VALUES else 1
    workers = max(1, workers)
    jobs = [(requests[i], policy) for i in todo]
    if workers <= 1 or len(jobs) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        fresh = [_replay_table(j) for j in jobs]
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            fresh = list(pool.map(_replay_table, jobs))
    for i, result in zip(todo, fresh):
        done[i] = result
    if keys and todo:
        cache.store_schedules({keys[i]: done[i] for i in todo})
    return done


_BUILT: OrderedDict[tuple, Workload] = OrderedDict()  # recent workloads by their inputs
REMEMBER_WORKLOAD_BYTES = 128 * 2**20  # the default run with its comparison holds ~30 MB


def forget() -> None:
    """Drop every workload, slot run and block table this process remembers, and the cache's decoded schedules:
    the next build starts as a fresh process would (for timing a cold or a warm run)."""
    _BUILT.clear()
    _RUNS.clear()
    _BLOCK_TABLES.clear()
    cache.forget()


def build_workload(trace: Trace, policy: PolicyConfig, gen_tokens: int, batch: int, steps: int, seed: int,
                   cold_start: bool, params: SynthParams, workers: int | None = None) -> Workload:
    """Run the policy once per distinct request (in parallel) and total the batch per step.

    A workload built before in this process from the same schedules (the ones the cache gives now) is returned
    again; its arrays are read-only.
    """
    check.integer("batch", batch, 1)
    check.integer("steps", steps, 1)
    requests = ExtendedRequests(trace, gen_tokens, params, seed)
    keys = tuple(cache.entry_key(trace, i, policy, gen_tokens, seed, params) for i in range(len(requests)))
    done = replay_all(requests, policy, workers, list(keys))
    schedules = tuple(s for s, _ in done)
    memo = (keys, batch, steps, seed, cold_start)
    known = _BUILT.get(memo)
    if known is not None and all(a is b for a, b in zip(known.schedules, schedules)):
        _BUILT.move_to_end(memo)
        return known
    tables = np.stack([t for _, t in done])
    rows_per_request = tables.shape[1]
    runs = slot_runs(len(requests), rows_per_request, batch, steps, seed, cold_start)
    rows, started, finished = slot_rows(len(requests), rows_per_request, batch, steps, seed, cold_start)
    totals = slot_sum(tables.reshape(-1, len(COLUMNS)), runs, steps)
    for array in (tables, totals, rows):
        array.flags.writeable = False
    w = Workload(
        tables=tables, totals=totals, slot_rows=rows, schedules=schedules,
        captured_tokens=(captured := requests.captured_steps()),
        synthetic_tokens=len(requests) * (gen_tokens - 1) - captured,
        requests_started=started, requests_finished=finished,
        trace_model=str(trace.model.get("id", "unknown")) if isinstance(trace.model, dict) else "unknown",
        keys=keys, runs=runs,
    )
    if cache.cache_dir() is None:  # nothing to check a remembered workload against: every build is fresh
        return w
    _BUILT[memo] = w
    while sum(x.tables.nbytes + x.totals.nbytes + x.slot_rows.nbytes for x in _BUILT.values()) > REMEMBER_WORKLOAD_BYTES \
            and len(_BUILT) > 1:
        _BUILT.popitem(last=False)
    return w
