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

Demotions decided at the end of a step go out on the D2H stream and free HBM only when done; a
copy that starts while the other direction is busy runs at the duplex-reduced bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    @property
    def steps(self) -> int:
        """Decode steps of the batch."""
        return len(self.matmul_s)

    @property
    def layer_s(self) -> np.ndarray:
        """One layer's compute when nothing waits."""
        return self.matmul_s + self.attention_s

    def as_lists(self) -> StepPlan:
        """The same plan with Python lists (SimPy processes index them per event; numpy scalars are slower)."""
        arrays = {name: getattr(self, name).tolist() for name in self.__dataclass_fields__
                  if isinstance(getattr(self, name), np.ndarray)}
        return _ListPlan(self.strategy, self.layers, self.depth, self.qkv_share,
                         layer_s=(self.matmul_s + self.attention_s).tolist(), **arrays)


@dataclass(slots=True)
class _ListPlan:
    """A StepPlan as Python lists, for the processes."""

    strategy: Strategy
    layers: int
    depth: int
    qkv_share: float
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
    events: int = 0

    @classmethod
    def empty(cls, steps: int) -> Timeline:
        z = lambda: np.zeros(steps)
        return cls(z(), z(), z(), z(), z(), z(), z(), np.full(steps, np.nan))

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


@dataclass(slots=True)
class Links:
    """The two copy directions; a copy that starts while the other direction is busy gets the duplex bandwidth."""

    env: simpy.Environment
    tl: Timeline
    h2d_active: int = 0
    d2h_active: int = 0
    h2d_free: simpy.Resource = field(init=False)
    d2h_free: simpy.Resource = field(init=False)

    def __post_init__(self) -> None:
        self.h2d_free = simpy.Resource(self.env, capacity=1)
        self.d2h_free = simpy.Resource(self.env, capacity=1)

    def h2d(self, step: int, plain_s: float, duplex_s: float):
        """Copy host→device on the H2D stream (one copy at a time)."""
        with self.h2d_free.request() as turn:
            yield turn
            yield from self.h2d_owned(step, plain_s, duplex_s)

    def h2d_owned(self, step: int, plain_s: float, duplex_s: float):
        """Copy host→device from the one process that owns the H2D stream (no queueing)."""
        seconds = duplex_s if self.d2h_active else plain_s
        self.h2d_active += 1
        yield self.env.timeout(seconds)
        self.h2d_active -= 1
        self.tl.h2d_busy_s[step] += seconds

    def d2h(self, step: int, plain_s: float, duplex_s: float):
        """Copy device→host on the D2H stream (one copy at a time)."""
        with self.d2h_free.request() as turn:
            yield turn
            seconds = duplex_s if self.h2d_active else plain_s
            self.d2h_active += 1
            yield self.env.timeout(seconds)
            self.d2h_active -= 1
            self.tl.d2h_busy_s[step] += seconds


# -- the compute stream, one story per strategy ----------------------------------------------------
def compute_resident(env, plan: StepPlan, tl: Timeline, done: simpy.Store):
    """`full` and `evict-only`: every layer runs on resident KV."""
    for k in range(plan.steps):
        tl.start_s[k] = env.now
        for _ in range(plan.layers):
            yield env.timeout(plan.layer_s[k])
        yield env.timeout(plan.head_s[k])
        tl.end_s[k] = env.now
        done.put(k)


def compute_prefetch_sync(env, plan: StepPlan, tl: Timeline, links: Links, done: simpy.Store):
    """The paper's prototype: copy every layer's DDR tokens back, wait, then run the forward pass."""
    for k in range(plan.steps):
        tl.start_s[k] = env.now
        if plan.h2d_layer_s[k] > 0:
            yield from links.h2d_owned(k, plan.h2d_layer_s[k], plan.h2d_layer_duplex_s[k])
        tl.stall_s[k] = env.now - tl.start_s[k]
        for _ in range(plan.layers):
            yield env.timeout(plan.layer_s[k])
        yield env.timeout(plan.head_s[k])
        tl.end_s[k] = env.now
        done.put(k)


def compute_prefetch_layer(env, plan: StepPlan, tl: Timeline, staged: Progress, computed: Progress,
                           done: simpy.Store):
    """Layer l waits until the copy stream has staged its DDR tokens, then computes (freeing that buffer)."""
    layer = 0  # counted over the whole run
    for k in range(plan.steps):
        tl.start_s[k] = env.now
        for _ in range(plan.layers):
            if staged.count <= layer:
                waited = env.now
                yield staged.reach(layer + 1)
                tl.stall_s[k] += env.now - waited
            yield env.timeout(plan.layer_s[k])
            computed.advance()
            layer += 1
        yield env.timeout(plan.head_s[k])
        tl.end_s[k] = env.now
        done.put(k)


def copy_stream_prefetch(env, plan: StepPlan, links: Links, staged: Progress, computed: Progress):
    """The H2D copy stream: stage each layer's DDR tokens `depth` layers ahead, into the strategy's staging buffers."""
    buffers = plan.strategy.staging_buffers(plan.depth, plan.layers)
    layer = 0
    for k in range(plan.steps):
        for _ in range(plan.layers):
            # This layer's buffer was last used `buffers` layers ago; it is free once that layer computed.
            if computed.count < layer - buffers + 1:
                yield computed.reach(layer - buffers + 1)
            if plan.h2d_layer_s[k] > 0:
                yield from links.h2d_owned(k, plan.h2d_layer_s[k], plan.h2d_layer_duplex_s[k])
            staged.advance()
            layer += 1


def compute_cpu_attention(env, plan: StepPlan, tl: Timeline, to_host: simpy.Store, from_host: simpy.Store,
                          done: simpy.Store):
    """Projections, query to the host, GPU attention over HBM, merge the host's partials, MLP."""
    for k in range(plan.steps):
        tl.start_s[k] = env.now
        pre = plan.matmul_s[k] * plan.qkv_share
        for _ in range(plan.layers):
            yield env.timeout(pre)
            yield to_host.put(k)
            yield env.timeout(plan.attention_s[k])
            waited = env.now
            yield from_host.get()
            tl.stall_s[k] += env.now - waited
            yield env.timeout(plan.matmul_s[k] - pre)
        yield env.timeout(plan.head_s[k])
        tl.end_s[k] = env.now
        done.put(k)


def host_attention(env, plan: StepPlan, tl: Timeline, links: Links, to_host: simpy.Store, from_host: simpy.Store):
    """The host: receive the queries, attend over DDR-tier KV, send partial outputs and log-sum-exps back."""
    while True:
        k = yield to_host.get()
        yield from links.d2h(k, plan.query_d2h_s[k], plan.query_d2h_s[k])  # a few KB: latency-bound
        yield env.timeout(plan.host_attention_s[k])
        tl.host_busy_s[k] += plan.host_attention_s[k]
        yield from links.h2d(k, plan.partial_h2d_s[k], plan.partial_h2d_s[k])
        yield from_host.put(k)


def bulk_copies(env, plan: StepPlan, tl: Timeline, links: Links, done: simpy.Store):
    """Re-tier traffic: after step k, its demotions go out on D2H (and, for cpu-attention, promotions come in)."""
    while True:
        k = yield done.get()
        if plan.h2d_bulk_s[k] > 0:
            env.process(links.h2d(k, plan.h2d_bulk_s[k], plan.h2d_bulk_duplex_s[k]))
        if plan.d2h_bulk_s[k] > 0:
            env.process(_demote(env, k, plan, tl, links))


def _demote(env, k: int, plan: StepPlan, tl: Timeline, links: Links):
    yield from links.d2h(k, plan.d2h_bulk_s[k], plan.d2h_bulk_duplex_s[k])
    tl.d2h_done_s[k] = env.now


def run(step_plan: StepPlan) -> Timeline:
    """Simulate the plan to its last step and return the timeline."""
    plan = step_plan.as_lists()
    env = simpy.Environment()
    tl = Timeline.empty(plan.steps)
    links = Links(env, tl)
    done = simpy.Store(env)
    s = plan.strategy
    if s.fetches_before_forward:
        main = env.process(compute_prefetch_sync(env, plan, tl, links, done))
    elif s.fetches_per_layer:
        staged, computed = Progress(env), Progress(env)
        main = env.process(compute_prefetch_layer(env, plan, tl, staged, computed, done))
        env.process(copy_stream_prefetch(env, plan, links, staged, computed))
    elif s.host_attends:
        to_host, from_host = simpy.Store(env), simpy.Store(env)
        main = env.process(compute_cpu_attention(env, plan, tl, to_host, from_host, done))
        env.process(host_attention(env, plan, tl, links, to_host, from_host))
    else:  # every attended token is resident
        main = env.process(compute_resident(env, plan, tl, done))
    env.process(bulk_copies(env, plan, tl, links, done))
    env.run(until=main)
    env.run()  # let the last demotions drain (they free HBM, they do not delay the steps)
    tl.compute_s[:] = step_plan.layers * step_plan.layer_s + step_plan.head_s
    tl.events = events_scheduled(env)
    return tl
