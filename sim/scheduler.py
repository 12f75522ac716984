"""The serving scheduler: continuous batching as vLLM v1 does it, as a SimPy process beside the compute.

Modelled on `vllm/v1/core/sched/scheduler.py` of vLLM v0.11 (the V1 engine; chunked prefill on,
prefix caching off, FCFS, no speculative decoding). Each step, `schedule`:

1. gives the token budget `max_num_batched_tokens` to the RUNNING requests in admission order:
   each takes min(tokens it still has to compute, budget left) — 1 for a decode, the rest of its
   prompt for a chunked prefill;
2. allocates their KV blocks for the step; when the blocks run out it preempts the most recently
   admitted running request (`self.running.pop()`) until the rest fits — recompute (vLLM's only
   mode in V1: blocks freed, request put back at the FRONT of the waiting queue, its prompt and
   generated tokens prefilled again) or swap (vLLM v0's other mode: its HBM blocks copied to
   host blocks, copied back when it resumes; falls back to recompute when the host pool is full);
3. only if nothing was preempted this step, admits WAITING requests in order while the budget
   lasts, `max_num_seqs` is not reached and their blocks for this step are free (a prompt longer
   than the budget is chunked: it takes what is left);

then the step runs for `step_time(batch)` (plus an injected `extra_s(batch)`, e.g. a transfer
stall), and after it every request whose computed tokens reached its length samples one token;
those that reach their output length finish and free their blocks. A request that cannot fit
even in an empty engine is rejected (vLLM refuses prompts beyond max_model_len at entry).

State is held in arrays over all requests and the running set is an index array, so a step is a
few vectorised operations over the batch and one SimPy timeout: never per token.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import simpy

from tiersim import check
from tiersim.sim.blocks import BlockManager
from tiersim.sim.step_time import StepBatch, StepTime

PREEMPTION_MODES = ("recompute", "swap")
WAITING, RUNNING, FINISHED, REJECTED = 0, 1, 2, 3

# (request ids, prompt tokens, context tokens) -> (HBM-tier tokens, DDR-tier tokens); the rest is evicted.
KVSplit = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
ExtraTime = Callable[[StepBatch], float]


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """vLLM's scheduler knobs (defaults: vLLM's `max_num_seqs` 256 and online-serving `max_num_batched_tokens` 8192)."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    preemption: str = "recompute"

    def __post_init__(self) -> None:
        check.integer("max_num_seqs", self.max_num_seqs, 1)
        check.integer("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        check.choice("preemption", self.preemption, PREEMPTION_MODES)


def fraction_split(beta: float, evict_ratio: float, recent: int = 128, retier_every: int = 64,
                   keeps_ddr: bool = True) -> KVSplit:
    """The target policy's steady state: at each re-tier (every `retier_every` generated tokens) the generated
    tokens older than the `recent` window are split: `evict_ratio` evicted, `beta` of the rest in HBM, the remainder
    in DDR; the prompt, the recent window and tokens since the last re-tier stay in HBM. Without `keeps_ddr`
    (evict-only) the DDR tier is dropped: it holds no blocks and is never attended."""
    check.number("beta", beta, 0, 1)
    check.number("evict_ratio", evict_ratio, 0, 1)

    def split(ids: np.ndarray, prompt: np.ndarray, context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        generated = np.maximum(context - prompt, 0)
        tiered = np.maximum(generated // retier_every * retier_every - recent, 0)
        kept = tiered - np.floor(evict_ratio * tiered).astype(np.int64)
        ddr = kept - np.floor(beta * kept).astype(np.int64)
        return context - tiered + kept - ddr, ddr if keeps_ddr else np.zeros_like(ddr)

    return split


DEFAULT_CONFIG = SchedulerConfig()


def table_split(ddr: np.ndarray, evicted: np.ndarray, assign: np.ndarray, keeps_ddr: bool = True) -> KVSplit:
    """The replayed policy's own tiers: request i follows schedule `assign[i]`, whose DDR-tier and evicted token counts
    after g generated tokens are `ddr[k, g]`, `evicted[k, g]` (workload/build's request tables: row g has P + g
    tokens); past a schedule's last row its last counts hold. The prompt is protected, so the counts carry over to any
    prompt length; compressed tokens count as HBM tokens (at full size: an upper bound)."""
    ddr, evicted, assign = (np.asarray(a, dtype=np.int64) for a in (ddr, evicted, assign))
    last = ddr.shape[1] - 1

    def split(ids: np.ndarray, prompt: np.ndarray, context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k, g = assign[ids], np.minimum(np.maximum(context - prompt, 0), last)
        d, e = ddr[k, g], evicted[k, g]
        return context - d - e, d if keeps_ddr else np.zeros_like(d)

    return split


class RequestState:
    """Every request's lengths and progress, as arrays indexed by request id."""

    def __init__(self, arrival_s, prompt_tokens, output_tokens) -> None:
        self.arrival_s = np.asarray(arrival_s, dtype=np.float64).copy()
        self.prompt = np.asarray(prompt_tokens, dtype=np.int64)
        self.output = np.asarray(output_tokens, dtype=np.int64)
        n = len(self.prompt)
        self.computed = np.zeros(n, dtype=np.int64)  # tokens whose KV is cached
        self.num_tokens = self.prompt.copy()  # prompt + generated: what the cache must eventually hold
        self.generated = np.zeros(n, dtype=np.int64)
        self.first_s = np.full(n, np.nan)
        self.finish_s = np.full(n, np.nan)
        self.preemptions = np.zeros(n, dtype=np.int64)
        self.queued_s = np.zeros(n)  # time spent waiting (before admission and after each preemption)
        self.queue_since = np.full(n, np.nan)
        self.swapped = np.zeros(n, dtype=bool)
        self.swapped_blocks = np.zeros(n, dtype=np.int64)
        self.status = np.full(n, -1, dtype=np.int8)  # -1: not arrived yet

    def __len__(self) -> int:
        return len(self.prompt)


class StepLog:
    """One entry per scheduler step: when, how long, what ran, and what memory it held."""

    FIELDS = ("start_s", "step_s", "decode_seqs", "prefill_seqs", "prefill_tokens", "running", "waiting",
              "preempted", "hbm_bytes", "ddr_bytes")

    def __init__(self) -> None:
        for name in self.FIELDS:
            setattr(self, name, [])

    def as_arrays(self) -> dict[str, np.ndarray]:
        """Every column as an array."""
        return {name: np.asarray(getattr(self, name), dtype=np.float64) for name in self.FIELDS}


class Scheduler:
    """Waiting queue, running batch and KV blocks of one engine; `run` is its SimPy process."""

    def __init__(self, env: simpy.Environment, requests: RequestState, blocks: BlockManager, step_time: StepTime,
                 config: SchedulerConfig = DEFAULT_CONFIG, split: KVSplit | None = None,
                 extra_s: ExtraTime | None = None, on_finish: Callable[[int], None] | None = None) -> None:
        self.env, self.r, self.blocks, self.step_time, self.config = env, requests, blocks, step_time, config
        self.split, self.extra_s, self.on_finish = split, extra_s, on_finish
        self.waiting: deque[int] = deque()
        self.running = np.empty(0, dtype=np.int64)
        self.log = StepLog()
        self.steps = self.preempted_total = 0
        self._wake: simpy.Event | None = None
        self._swap_out_blocks = self._swap_in_blocks = self._preempted = 0
        self._batch: tuple | None = None  # the scheduled step: (ids, computed before, tokens before, new tokens)

    def add(self, rid: int) -> None:
        """Request `rid` arrives now and joins the back of the waiting queue."""
        self.r.status[rid], self.r.queue_since[rid] = WAITING, self.env.now
        self.waiting.append(rid)
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def run(self):
        """The scheduler process: schedule a step, let it run, account what it produced; sleep when idle."""
        while True:
            batch = self.schedule()
            if batch is None:
                if not self.waiting:  # idle until the next arrival
                    self._wake = self.env.event()
                    yield self._wake
                    self._wake = None
                continue  # everything was preempted: schedule again now
            step_s = self.step_time(batch) + (self.extra_s(batch) if self.extra_s is not None else 0.0)
            log = self.log
            log.start_s.append(self.env.now)
            log.step_s.append(step_s)
            log.decode_seqs.append(batch.decode_seqs)
            log.prefill_seqs.append(batch.prefill_seqs)
            log.prefill_tokens.append(batch.prefill_tokens)
            log.running.append(len(self.running))
            log.waiting.append(len(self.waiting))
            log.preempted.append(self._preempted)  # preemptions made while forming this batch
            self._preempted = 0
            log.hbm_bytes.append(self.blocks.hbm_bytes())
            log.ddr_bytes.append(self.blocks.ddr_bytes())
            self.steps += 1
            yield self.env.timeout(step_s)
            self.advance()

    def kv_tokens(self, ids: np.ndarray, context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """HBM-tier and DDR-tier tokens of these requests at these context lengths (all HBM without a split)."""
        if self.split is None:
            return context, np.zeros_like(context)
        return self.split(ids, self.r.prompt[ids], context)

    def schedule(self) -> StepBatch | None:
        """Form this step's batch (running first, then waiting), allocating blocks and preempting as vLLM v1 does."""
        r, bm, budget = self.r, self.blocks, self.config.max_num_batched_tokens
        run = self.running
        computed, tokens = r.computed[run], r.num_tokens[run]
        remaining = tokens - computed
        new = remaining if remaining.sum() <= budget else np.clip(budget - (np.cumsum(remaining) - remaining), 0,
                                                                  remaining)
        context = computed + new
        hbm, ddr = self.kv_tokens(run, context)
        hbm_blocks, ddr_blocks = bm.hbm_blocks(hbm), bm.blocks(ddr)
        other_ddr = bm.ddr_used - int(bm.ddr[run].sum())  # swapped-out requests' host blocks
        preempted = 0
        if not bm.fits(int(hbm_blocks.sum()), int(ddr_blocks.sum()) + other_ddr, int(ddr.sum())):
            keep = self._preempt_tail(run, hbm_blocks, ddr_blocks, ddr, other_ddr)
            preempted = len(run) - keep
            run, computed, tokens, new, context, hbm, ddr = (a[:keep] for a in (run, computed, tokens, new, context,
                                                                                 hbm, ddr))
        bm.allocate(run, hbm, ddr)
        budget -= int(new.sum())
        if not preempted:
            admitted = self._admit(budget, len(run))
            if admitted:
                ids, c, t, n, h, d = (np.asarray(col, dtype=np.int64) for col in zip(*admitted))
                run, computed, tokens, new = (np.concatenate(p) for p in ((run, ids), (computed, c), (tokens, t),
                                                                          (new, n)))
                context, hbm, ddr = computed + new, np.concatenate((hbm, h)), np.concatenate((ddr, d))
        self.running = run
        self._preempted += preempted
        if not new.any():
            self._batch = None
            return None
        self._batch = (run, computed, tokens, new)
        decode = (new == 1) & (tokens - computed == 1) & (r.generated[run] > 0)
        prefill = (new > 0) & ~decode
        pf_new, pf_cached = new[prefill], computed[prefill]
        swap_in = self._swap_in_blocks
        self._swap_in_blocks, swap_out, self._swap_out_blocks = 0, self._swap_out_blocks, 0
        return StepBatch(
            decode_seqs=int(decode.sum()), decode_context_tokens=int(context[decode].sum()),
            decode_ddr_tokens=int(ddr[decode].sum()),
            decode_evicted_tokens=int((context - hbm - ddr)[decode].sum()),
            prefill_seqs=int(prefill.sum()), prefill_tokens=int(pf_new.sum()),
            prefill_context_tokens=int(pf_cached.sum()),
            prefill_pairs=float((pf_new * pf_cached + pf_new * (pf_new + 1) // 2).sum()),
            swap_out_blocks=swap_out, swap_in_blocks=swap_in)

    def _preempt_tail(self, run: np.ndarray, hbm_blocks: np.ndarray, ddr_blocks: np.ndarray, ddr: np.ndarray,
                      other_ddr: int) -> int:
        """Preempt the most recently admitted running requests until the rest fits; return how many are kept."""
        r, bm, now = self.r, self.blocks, self.env.now
        cum_hbm, cum_ddr, cum_ddr_tokens = np.cumsum(hbm_blocks), np.cumsum(ddr_blocks), np.cumsum(ddr)
        keep = len(run)
        victims = []
        while keep > 0 and not bm.fits(int(cum_hbm[keep - 1]), int(cum_ddr[keep - 1]) + other_ddr,
                                       int(cum_ddr_tokens[keep - 1])):
            keep -= 1
            rid = int(run[keep])
            rest_ddr = int(cum_ddr[keep - 1]) if keep else 0
            held = int(bm.hbm[rid])
            if self.config.preemption == "swap" and rest_ddr + other_ddr + held + int(bm.ddr[rid]) \
                    <= bm.capacity.ddr_blocks:
                self._swap_out_blocks += held
                bm.swap_out(rid)
                other_ddr += int(bm.ddr[rid])
                r.swapped[rid], r.swapped_blocks[rid] = True, held
            else:
                bm.free(rid)
                r.computed[rid] = 0
            r.preemptions[rid] += 1
            r.status[rid], r.queue_since[rid] = WAITING, now
            victims.append(rid)
        self.waiting.extendleft(victims)  # the last popped (earliest admitted) ends at the front, as in vLLM
        self.preempted_total += len(victims)
        return keep

    def _admit(self, budget: int, running: int) -> list[tuple[int, int, int, int, int, int]]:
        """Admit waiting requests while budget, max_num_seqs and free blocks allow; one row per admitted request."""
        r, bm, now = self.r, self.blocks, self.env.now
        admitted = []
        while self.waiting and budget > 0 and running + len(admitted) < self.config.max_num_seqs:
            rid = self.waiting[0]
            computed, tokens = int(r.computed[rid]), int(r.num_tokens[rid])
            new = min(tokens - computed, budget)
            ids = np.array([rid])
            hbm, ddr = (int(x[0]) for x in self.kv_tokens(ids, np.array([computed + new])))
            if not bm.can_allocate(rid, hbm, ddr):
                if running or admitted:
                    break
                self.waiting.popleft()  # cannot fit even in an empty engine
                bm.free(rid)
                r.status[rid] = REJECTED
                r.queued_s[rid] += now - r.queue_since[rid]
                continue
            self.waiting.popleft()
            bm.allocate(ids, hbm, ddr)
            if r.swapped[rid]:
                self._swap_in_blocks += int(r.swapped_blocks[rid])
                r.swapped[rid] = False
            r.status[rid] = RUNNING
            r.queued_s[rid] += now - r.queue_since[rid]
            admitted.append((rid, computed, tokens, new, hbm, ddr))
            budget -= new
        return admitted

    def advance(self) -> None:
        """After a step: computed tokens advance; requests that reached their length sample a token; some finish."""
        r = self.r
        run, computed, tokens, new = self._batch
        r.computed[run] = computed + new
        ids = run[computed + new == tokens]  # reached their length: one token sampled
        if not ids.size:
            return
        r.generated[ids] += 1
        r.num_tokens[ids] += 1
        now = self.env.now
        first = ids[np.isnan(r.first_s[ids])]
        r.first_s[first] = now
        done = ids[r.generated[ids] >= r.output[ids]]
        if done.size:
            r.finish_s[done], r.status[done] = now, FINISHED
            self.blocks.free(done)
            self.running = self.running[~np.isin(self.running, done)]
            if self.on_finish is not None:
                for rid in done.tolist():
                    self.on_finish(rid)
