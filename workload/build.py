"""The workload: trace requests → TierSchedules → per-step totals over a continuously batched decode.

The policy runs once per distinct trace request. Each schedule becomes a small table, one row per
step of that request's life in a batch slot (row 0 its prefill, row t+1 its decode step t), whose
columns are token counts per tier, transitions and attention mass. Slots are closed-loop: each
runs requests drawn (seeded) from the trace back to back. The batch's per-step totals are sums of
table rows over slots, so the cost grows with slots x steps, never with tokens.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

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
    flat = np.stack([block_table(s, block_size) for s in w.schedules]).reshape(-1, len(BLOCK_COLUMNS))
    totals = np.zeros((w.slot_rows.shape[1], len(BLOCK_COLUMNS)))
    for b in range(w.slot_rows.shape[0]):
        totals += flat[w.slot_rows[b]]
    return totals


def extend_requests(trace: Trace, gen_tokens: int, params: SynthParams, seed: int) -> list[ExtendedRequest]:
    """Every trace request continued (or cut) to `gen_tokens` generated tokens."""
    if len(trace) == 0:
        raise TiersimError(f"{trace.path}: the trace holds no requests")
    return [ExtendedRequest(trace[i], params, gen_tokens, seed=seed * 1_000_003 + i) for i in range(len(trace))]


def slot_rows(n_requests: int, rows_per_request: int, batch: int, steps: int, seed: int, cold_start: bool):
    """Flat table-row index of every slot at every step; closed loop, each slot drawing requests with its own seed.

    Returns (rows (batch, steps), requests started, requests finished).
    """
    out = np.empty((batch, steps), dtype=np.int64)
    started = finished = 0
    for b in range(batch):
        rng = np.random.default_rng([seed, b])
        k, first = 0, True
        while k < steps:
            r = int(rng.integers(n_requests))
            start = 0 if (cold_start or not first) else int(rng.integers(rows_per_request))
            seg = np.arange(start, rows_per_request)[: steps - k]
            out[b, k: k + len(seg)] = r * rows_per_request + seg
            started += 1
            finished += int(seg[-1] == rows_per_request - 1)
            k += len(seg)
            first = False
    return out, started, finished


def _replay_table(args: tuple[ExtendedRequest, PolicyConfig]) -> tuple[TierSchedule, np.ndarray]:
    schedule = replay(*args)
    return schedule, request_table(schedule)


def replay_all(requests: list[ExtendedRequest], policy: PolicyConfig, workers: int | None = None,
               keys: list[str] | None = None):
    """Schedules and tables of every request: from the cache where `keys` hit, else replayed in
    `workers` forked processes (one per core by default) and stored."""
    done = cache.load_schedules(keys, policy) if keys else [None] * len(requests)
    todo = [i for i, d in enumerate(done) if d is None]
    workers = min(len(todo), os.cpu_count() or 1) if workers is None else max(1, workers)
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


def build_workload(trace: Trace, policy: PolicyConfig, gen_tokens: int, batch: int, steps: int, seed: int,
                   cold_start: bool, params: SynthParams, workers: int | None = None) -> Workload:
    """Run the policy once per distinct request (in parallel) and total the batch per step."""
    check.integer("batch", batch, 1)
    check.integer("steps", steps, 1)
    requests = extend_requests(trace, gen_tokens, params, seed)
    keys = [cache.entry_key(trace, i, policy, gen_tokens, seed, params) for i in range(len(requests))]
    done = replay_all(requests, policy, workers, keys)
    schedules = tuple(s for s, _ in done)
    tables = np.stack([t for _, t in done])
    rows_per_request = tables.shape[1]
    rows, started, finished = slot_rows(len(requests), rows_per_request, batch, steps, seed, cold_start)
    flat = tables.reshape(-1, len(COLUMNS))
    totals = np.zeros((steps, len(COLUMNS)))
    for b in range(batch):
        totals += flat[rows[b]]
    return Workload(
        tables=tables, totals=totals, slot_rows=rows, schedules=schedules,
        captured_tokens=sum(r.captured_steps for r in requests),
        synthetic_tokens=sum(r.synthetic_steps for r in requests),
        requests_started=started, requests_finished=finished,
        trace_model=str(trace.model.get("id", "unknown")) if isinstance(trace.model, dict) else "unknown",
    )
