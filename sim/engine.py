"""The SimPy model: one process per hardware actor, one event per layer of a batched decode step.

Actors: the GPU compute stream, the H2D copy stream, the D2H copy stream and, for `cpu-attention`,
the host. The compute stream runs the decode steps layer by layer; what it waits for depends on
the strategy:

- `full`, `evict-only`: nothing (all attended KV is resident);
- `prefetch-sync`: before the forward pass, one synchronous copy of every layer's DDR-tier KV;
- `prefetch-layer`: layer l waits until the copy stream has staged its DDR-tier KV; the copy
  stream runs up to `depth` layers ahead into `depth + 1` staging buffers (double buffering at
  depth 1) and continues into the next step's layers (the DDR set of the next step is the same
  unless a re-tier changed it; promotions are folded into the next step's copies);
- `cpu-attention`: after the q/k/v projections the query goes to the host, which attends over the
  DDR-tier KV in host memory while the GPU attends over HBM; the partial results come back and are
  merged exactly (log-sum-exp) before the rest of the layer.

Demotions decided at the end of a step go out on the D2H stream and free HBM only when done.

A hybrid model's plan (`StepPlan.layer_kinds`) gives each layer its kind's attention and copy: full-attention
layers copy their DDR-tier KV, sliding-window layers copy nothing (the copy stream passes them at once, each
still taking a staging buffer's turn, as the replay's pipeline does); without it every layer is the mean layer.

Work that shares hardware is a fluid: its rate is re-evaluated whenever a copy starts or stops.
A copy runs at its plain rate, or at its duplex rate while the other direction copies too; compute
runs at the product of the slow-down factors of the copies running beside it (a gather kernel's
SMs, every copy's HBM traffic: see sim/plan.py), and the time it loses is the step's interference.
A copy issued on the compute stream (pageable memory) runs between the layers, never beside them.

One concept at ~400 lines: the machine's fluid jobs (copies and compute re-timed at every change) and
the actor processes that use them are one timeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import simpy

from tiersim.strategy import Strategy


@dataclass(frozen=True, slots=True)
class StepPlan:
    """Per-step durations (seconds) of every piece of work, for one strategy; arrays of length `steps`."""

    strategy: Strategy
    layers: int
    depth: int
    matmul_s: np.ndarray  # one layer's projections + MLP
    attention_s: np.ndarray  # one layer's attention on the GPU
    head_s: np.ndarray  # final norm + lm_head
    qkv_share: float  # share of matmul_s before attention (cpu-attention splits the layer there)
    h2d_layer_s: np.ndarray  # prefetch-layer: one layer's staged copy; prefetch-sync: all layers' copy
    h2d_layer_duplex_s: np.ndarray
    h2d_bulk_s: np.ndarray  # cpu-attention: promotions decided at the end of the step, copied back
    h2d_bulk_duplex_s: np.ndarray
    d2h_bulk_s: np.ndarray  # demotions decided at the end of the step
    d2h_bulk_duplex_s: np.ndarray
    query_d2h_s: np.ndarray  # cpu-attention, per layer
    host_attention_s: np.ndarray  # cpu-attention, per layer
    partial_h2d_s: np.ndarray  # cpu-attention, per layer
    # Compute's rate while a copy of this kind runs beside it (1.0: no interference; None: 1.0 every step).
    h2d_layer_slow: np.ndarray | None = None
    h2d_bulk_slow: np.ndarray | None = None
    d2h_bulk_slow: np.ndarray | None = None
    serial_copies: bool = False  # the copies are issued on the compute stream (they serialise with compute)
    copy_method: str = ""  # the mechanism the copy durations were charged for (sim/copies.py)
    h2d_pieces: np.ndarray | None = None  # pieces of the DDR-tier fetch per step, every layer together
    d2h_pieces: np.ndarray | None = None  # pieces copied device -> host per step
    # Hybrid models: what each layer is (None: every layer is the mean layer above). layer_kinds[l] picks the row of
    # the kind arrays (steps long) layer l takes; the rows average to attention_s and h2d_layer_s over the layers.
    layer_kinds: tuple[int, ...] | None = None  # 0: full attention (tiered), 1: sliding window (make_plan)
    kind_attention_s: np.ndarray | None = None  # (kinds, steps): one layer of each kind's attention
    kind_h2d_layer_s: np.ndarray | None = None  # (kinds, steps): prefetch-layer: one layer of each kind's copy
    kind_h2d_layer_duplex_s: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.layer_kinds is None:
            return
        if len(self.layer_kinds) != self.layers or min(self.layer_kinds) < 0:
            raise ValueError(f"layer_kinds has {len(self.layer_kinds)} entries for {self.layers} layers")
        for name in ("kind_attention_s", "kind_h2d_layer_s", "kind_h2d_layer_duplex_s"):
            a = getattr(self, name)
            if a is None or a.ndim != 2 or a.shape[0] <= max(self.layer_kinds) or a.shape[1] != self.steps:
                raise ValueError(f"{name} must have a row per kind in layer_kinds and {self.steps} steps; got "
                                 f"{None if a is None else a.shape}")

    @property
    def steps(self) -> int:
        """Decode steps of the batch."""
        return len(self.matmul_s)

    @property
    def layer_s(self) -> np.ndarray:
        """One layer's compute when nothing waits (the mean layer of a hybrid plan)."""
        return self.matmul_s + self.attention_s

    @property
    def step_compute_s(self) -> np.ndarray:
        """Each step's compute when nothing waits: every layer, then the head."""
        if self.layer_kinds is None:
            return self.layers * self.layer_s + self.head_s
        return (self.kind_attention_s + self.matmul_s).take(self.layer_kinds, axis=0).sum(axis=0) + self.head_s

    def kind_rows(self) -> tuple[tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]:
        """(kind of each layer, and per kind rows of: layer compute, per-layer copy, its duplex time); a plan
        without layer_kinds is one kind, the mean layer."""
        if self.layer_kinds is None:
            return (0,) * self.layers, self.layer_s[None], self.h2d_layer_s[None], self.h2d_layer_duplex_s[None]
        return (self.layer_kinds, self.kind_attention_s + self.matmul_s, self.kind_h2d_layer_s,
                self.kind_h2d_layer_duplex_s)

    def as_lists(self) -> StepPlan:
        """The same plan with Python lists (SimPy processes index them per event; numpy scalars are slower)."""
        arrays = {name: getattr(self, name).tolist() for name in _ListPlan.__dataclass_fields__
                  if name != "layer_s" and not name.startswith("kind") and isinstance(getattr(self, name, None),
                                                                                         np.ndarray)}
        for name in ("h2d_layer_slow", "h2d_bulk_slow", "d2h_bulk_slow"):
            arrays.setdefault(name, [1.0] * self.steps)
        kinds, layer, h2d, h2d_dup = self.kind_rows()
        attention = self.attention_s[None] if self.layer_kinds is None else self.kind_attention_s
        return _ListPlan(self.strategy, self.layers, self.depth, self.qkv_share, self.serial_copies,
                         layer_s=(self.matmul_s + self.attention_s).tolist(), kinds=kinds,
                         kind_layer_s=layer.tolist(), kind_attention_s=attention.tolist(), kind_h2d_s=h2d.tolist(),
                         kind_h2d_dup_s=h2d_dup.tolist(), **arrays)


@dataclass(slots=True)
class _ListPlan:
    """A StepPlan as Python lists, for the processes."""

    strategy: Strategy
    layers: int
    depth: int
    qkv_share: float
    serial_copies: bool
    layer_s: list
    matmul_s: list
    attention_s: list
    head_s: list
    h2d_layer_s: list
    h2d_layer_duplex_s: list
    h2d_bulk_s: list
    h2d_bulk_duplex_s: list
    d2h_bulk_s: list
    d2h_bulk_duplex_s: list
    query_d2h_s: list
    host_attention_s: list
    partial_h2d_s: list
    h2d_layer_slow: list
    h2d_bulk_slow: list
    d2h_bulk_slow: list
    kinds: tuple  # per layer, its row of the kind lists (all 0 without layer_kinds)
    kind_layer_s: list  # [kind][step]
    kind_attention_s: list
    kind_h2d_s: list
    kind_h2d_dup_s: list

    @property
    def steps(self) -> int:
        return len(self.matmul_s)


@dataclass(slots=True)
class Timeline:
    """What happened, per step: when it started and ended, where time went, what the links did."""

    start_s: np.ndarray
    end_s: np.ndarray
    compute_s: np.ndarray
    stall_s: np.ndarray
    h2d_busy_s: np.ndarray
    d2h_busy_s: np.ndarray
    host_busy_s: np.ndarray
    d2h_done_s: np.ndarray  # completion time of the demotions decided at the end of each step (nan: none)
    interference_s: np.ndarray  # compute time lost to copies running beside it (SMs, HBM traffic)
    events: int = 0  # events the engine took: SimPy's scheduled events, or the recurrence's (sim/recurrence.py)
    engine: str = "simpy"  # which engine drew it: "simpy" (this module) or "recurrence"

    @classmethod
    def empty(cls, steps: int) -> Timeline:
        z = lambda: np.zeros(steps)
        return cls(z(), z(), z(), z(), z(), z(), z(), np.full(steps, np.nan), z())

    @property
    def step_s(self) -> np.ndarray:
        """Wall time of each step, end to end (the first from its start)."""
        return np.diff(np.concatenate([[self.start_s[0]], self.end_s]))


def events_scheduled(env: simpy.Environment) -> int:
    """Events the environment has scheduled so far: SimPy numbers them from its `_eid` counter."""
    return next(env._eid)


class Progress:
    """How many layer-steps a stream has finished (counted over the whole run); others can wait for a count."""

    def __init__(self, env: simpy.Environment) -> None:
        self.env, self.count = env, 0
        self._waiting: list[tuple[int, simpy.Event]] = []

    def advance(self) -> None:
        """One more layer-step done; wake whoever waited for this count."""
        self.count += 1
        while self._waiting and self._waiting[0][0] <= self.count:
            self._waiting.pop(0)[1].succeed()

    def reach(self, count: int) -> simpy.Event:
        """An event that fires once `count` layer-steps are done (waiters ask in increasing order)."""
        event = self.env.event()
        if self.count >= count:
            event.succeed()
        else:
            self._waiting.append((count, event))
        return event


class _Job:
    """One piece of fluid work: what is left of it (seconds at rate 1), its rate now, since when, and who waits."""

    __slots__ = ("left", "rate", "since", "rate_of", "process")

    def __init__(self, env: simpy.Environment, left: float, rate_of) -> None:
        self.left, self.rate_of, self.since, self.process = left, rate_of, env.now, env.active_process
        self.rate = rate_of()


class Machine:
    """The shared hardware: the two copy directions (one copy each at a time) and the compute they slow down.

    Every piece of work is a fluid job at a rate that depends on who else is running; whenever a
    copy starts or stops, each running job whose rate changed is interrupted and re-times what it
    has left (most jobs see no change and cost one timeout, as a plain `env.timeout` would).
    """

    def __init__(self, env: simpy.Environment, tl: Timeline, quiet: bool = False) -> None:
        self.env, self.tl, self.quiet = env, tl, quiet  # quiet: no copy ever runs
        self.active = {"h2d": 0, "d2h": 0}
        self.free = {"h2d": simpy.Resource(env, capacity=1), "d2h": simpy.Resource(env, capacity=1)}
        self.slow: list[float] = []  # compute's rate factor for each copy running now
        self.jobs: set[_Job] = set()

    def fluid(self, work_s: float, rate_of):
        """Do `work_s` seconds of work (its time alone) at `rate_of()`, re-timed at every change; returns elapsed."""
        env, begin = self.env, self.env.now
        job = _Job(env, work_s, rate_of)
        self.jobs.add(job)
        try:
            while True:
                try:
                    if job.rate > 0:
                        yield env.timeout(max(0.0, job.left) / job.rate)
                        break
                    # Stopped outright (a copy takes all of the bandwidth it needs): wait for the next change.
                    yield env.event()
                except simpy.Interrupt:  # re-timed by _change
                    pass
        finally:
            self.jobs.discard(job)
        return env.now - begin

    def _change(self) -> None:
        """Someone started or stopped: every running job whose rate changed re-times what it has left."""
        now = self.env.now
        for job in self.jobs:
            rate = job.rate_of()
            if rate != job.rate:
                job.left -= (now - job.since) * job.rate
                job.since, job.rate = now, rate
                job.process.interrupt()

    def compute(self, k: int, work_s: float):
        """Compute for `work_s` (its time alone) beside whatever copies run; the time lost is step k's interference."""
        if self.quiet:  # the plan copies nothing: nothing can slow compute down
            yield self.env.timeout(work_s)
            return
        elapsed = yield from self.fluid(work_s, self.compute_rate)
        self.tl.interference_s[k] += max(0.0, elapsed - work_s)  # rounding can leave -1e-18 where nothing ran

    def compute_rate(self) -> float:
        """Compute's speed now: the product of the slow-down factors of the running copies."""
        rate = 1.0
        for f in self.slow:
            rate *= f
        return rate

    def copy(self, direction: str, step: int, plain_s: float, duplex_s: float, slow: float = 1.0):
        """Copy in `direction` ("h2d" or "d2h") once that stream is free (one copy at a time)."""
        with self.free[direction].request() as turn:
            yield turn
            yield from self.copy_owned(direction, step, plain_s, duplex_s, slow)

    def copy_owned(self, direction: str, step: int, plain_s: float, duplex_s: float, slow: float = 1.0):
        """Copy from the one process that owns the stream: at the plain rate, or the duplex rate while the other
        direction copies too."""
        other = "d2h" if direction == "h2d" else "h2d"
        self.active[direction] += 1
        self.slow.append(slow)
        self._change()
        duplex_rate = plain_s / duplex_s if duplex_s > 0 else 1.0
        elapsed = yield from self.fluid(plain_s, lambda: duplex_rate if self.active[other] else 1.0)
        self.active[direction] -= 1
        self.slow.remove(slow)
        self._change()
        busy = self.tl.h2d_busy_s if direction == "h2d" else self.tl.d2h_busy_s
        busy[step] += elapsed


# -- the compute stream, one story per strategy ----------------------------------------------------
def compute_resident(env, plan: StepPlan, tl: Timeline, gpu: Machine, done: simpy.Store):
    """`full` and `evict-only`: every layer runs on resident KV (demotions may still copy out beside it)."""
    for k in range(plan.steps):
        tl.start_s[k] = env.now
        for kind in plan.kinds:
            yield from gpu.compute(k, plan.kind_layer_s[kind][k])
        yield from gpu.compute(k, plan.head_s[k])
        tl.end_s[k] = env.now
        done.put(k)


def compute_prefetch_sync(env, plan: StepPlan, tl: Timeline, gpu: Machine, done: simpy.Store):
    """The paper's prototype: copy every layer's DDR tokens back, wait, then run the forward pass."""
    for k in range(plan.steps):
        tl.start_s[k] = env.now
        if plan.h2d_layer_s[k] > 0:
            yield from gpu.copy_owned("h2d", k, plan.h2d_layer_s[k], plan.h2d_layer_duplex_s[k])
        tl.stall_s[k] = env.now - tl.start_s[k]
        for kind in plan.kinds:
            yield from gpu.compute(k, plan.kind_layer_s[kind][k])
        yield from gpu.compute(k, plan.head_s[k])
        tl.end_s[k] = env.now
        done.put(k)


def compute_prefetch_layer(env, plan: StepPlan, tl: Timeline, gpu: Machine, staged: Progress, computed: Progress,
                           done: simpy.Store):
    """Layer l waits until its DDR tokens are staged, then computes (freeing that buffer).

    With `serial_copies` the copy is issued on the compute stream itself: it runs right before its layer.
    """
    layer = 0  # counted over the whole run
    for k in range(plan.steps):
        tl.start_s[k] = env.now
        for kind in plan.kinds:
            waited = env.now
            if plan.serial_copies:
                if plan.kind_h2d_s[kind][k] > 0:
                    yield from gpu.copy_owned("h2d", k, plan.kind_h2d_s[kind][k], plan.kind_h2d_dup_s[kind][k])
            elif staged.count <= layer:
                yield staged.reach(layer + 1)
            tl.stall_s[k] += env.now - waited
            yield from gpu.compute(k, plan.kind_layer_s[kind][k])
            computed.advance()
            layer += 1
        yield from gpu.compute(k, plan.head_s[k])
        tl.end_s[k] = env.now
        done.put(k)


def copy_stream_prefetch(env, plan: StepPlan, gpu: Machine, staged: Progress, computed: Progress):
    """The H2D copy stream: stage each layer's DDR tokens `depth` layers ahead, into the strategy's staging buffers."""
    buffers = plan.strategy.staging_buffers(plan.depth, plan.layers)
    layer = 0
    for k in range(plan.steps):
        for kind in plan.kinds:  # a sliding layer of a hybrid model has nothing to copy: it passes at once
            # This layer's buffer was last used `buffers` layers ago; it is free once that layer computed.
            if computed.count < layer - buffers + 1:
                yield computed.reach(layer - buffers + 1)
            if plan.kind_h2d_s[kind][k] > 0:
                yield from gpu.copy_owned("h2d", k, plan.kind_h2d_s[kind][k], plan.kind_h2d_dup_s[kind][k],
                                          plan.h2d_layer_slow[k])
            staged.advance()
            layer += 1


def compute_cpu_attention(env, plan: StepPlan, tl: Timeline, gpu: Machine, to_host: simpy.Store,
                          from_host: simpy.Store, done: simpy.Store):
    """Projections, query to the host, GPU attention over HBM, merge the host's partials, MLP."""
    for k in range(plan.steps):
        tl.start_s[k] = env.now
        pre = plan.matmul_s[k] * plan.qkv_share
        for kind in plan.kinds:
            yield from gpu.compute(k, pre)
            yield to_host.put(k)
            yield from gpu.compute(k, plan.kind_attention_s[kind][k])
            waited = env.now
            yield from_host.get()
            tl.stall_s[k] += env.now - waited
            yield from gpu.compute(k, plan.matmul_s[k] - pre)
        yield from gpu.compute(k, plan.head_s[k])
        tl.end_s[k] = env.now
        done.put(k)


def host_attention(env, plan: StepPlan, tl: Timeline, gpu: Machine, to_host: simpy.Store, from_host: simpy.Store):
    """The host: receive the queries, attend over DDR-tier KV, send partial outputs and log-sum-exps back."""
    while True:
        k = yield to_host.get()
        yield from gpu.copy("d2h", k, plan.query_d2h_s[k], plan.query_d2h_s[k])  # a few KB: latency-bound
        yield env.timeout(plan.host_attention_s[k])
        tl.host_busy_s[k] += plan.host_attention_s[k]
        yield from gpu.copy("h2d", k, plan.partial_h2d_s[k], plan.partial_h2d_s[k])
        yield from_host.put(k)


def bulk_copies(env, plan: StepPlan, tl: Timeline, gpu: Machine, done: simpy.Store):
    """Re-tier traffic: after step k, its demotions go out on D2H (and, for cpu-attention, promotions come in)."""
    while True:
        k = yield done.get()
        if plan.h2d_bulk_s[k] > 0:
            env.process(gpu.copy("h2d", k, plan.h2d_bulk_s[k], plan.h2d_bulk_duplex_s[k], plan.h2d_bulk_slow[k]))
        if plan.d2h_bulk_s[k] > 0:
            env.process(_demote(env, k, plan, tl, gpu))


def _demote(env, k: int, plan: StepPlan, tl: Timeline, gpu: Machine):
    yield from gpu.copy("d2h", k, plan.d2h_bulk_s[k], plan.d2h_bulk_duplex_s[k], plan.d2h_bulk_slow[k])
    tl.d2h_done_s[k] = env.now


def run(step_plan: StepPlan) -> Timeline:
    """Simulate the plan to its last step and return the timeline."""
    plan = step_plan.as_lists()
    env = simpy.Environment()
    tl = Timeline.empty(plan.steps)
    p = step_plan
    quiet = not any(np.any(a > 0) for a in (p.h2d_layer_s, p.h2d_bulk_s, p.d2h_bulk_s, p.query_d2h_s,
                                             p.partial_h2d_s))
    gpu = Machine(env, tl, quiet)
    done = simpy.Store(env)
    s = plan.strategy
    if s.fetches_before_forward:
        main = env.process(compute_prefetch_sync(env, plan, tl, gpu, done))
    elif s.fetches_per_layer:
        staged, computed = Progress(env), Progress(env)
        main = env.process(compute_prefetch_layer(env, plan, tl, gpu, staged, computed, done))
        if not plan.serial_copies:
            env.process(copy_stream_prefetch(env, plan, gpu, staged, computed))
    elif s.host_attends:
        to_host, from_host = simpy.Store(env), simpy.Store(env)
        main = env.process(compute_cpu_attention(env, plan, tl, gpu, to_host, from_host, done))
        env.process(host_attention(env, plan, tl, gpu, to_host, from_host))
    else:  # every attended token is resident
        main = env.process(compute_resident(env, plan, tl, gpu, done))
    env.process(bulk_copies(env, plan, tl, gpu, done))
    env.run(until=main)
    env.run()  # let the last demotions drain (they free HBM, they do not delay the steps)
    tl.compute_s[:] = step_plan.step_compute_s
    tl.events = events_scheduled(env)
    return tl
