"""Replay TierSchedules on a real device: real copies, model-shaped compute, timed per decode step.

This is the measurement side of `tiersim validate`. It does what the simulator's cost model
describes (sim/costs.py, sim/engine.py), with real tensors:

- T0 (HBM tier) pools on the device, one K and one V pool per layer, in chunks of `chunk_tokens`
  tokens so that attention over a sequence reads contiguous memory; T1 (DDR tier) in host memory,
  pinned on CUDA, one slot per token position (scattered, as the cost model assumes).
- Every decode step, each layer's DDR-tier tokens are brought into a staging buffer: `prefetch-layer`
  on a separate copy stream (a copy thread; on CUDA a `torch.cuda.Stream` with events), up to `depth`
  layers ahead into `depth + 1` buffers; `prefetch-sync` for all layers into one buffer per layer
  before the forward pass. The host pool is in KV blocks of `block_size` tokens; the tokens move as
  pieces (runs inside one block, K and V separately) by the `copy_method` (hw/copies.py: one copy per
  piece, coalesced copies, a zero-copy gather kernel over mapped pinned memory, or host gather + DMA
  through bounce buffers; from pageable memory a gather into a new tensor, then a copy: the paper's
  prototype). The pieces, bytes and copy calls of every step are counted where they are issued.
- At a re-tier, on the copy engine before that layer's next staged copy: demotions go device to
  host, the holes they and evictions leave in T0 are filled with the last resident tokens, and the
  promotions are copied from the host pool into T0.
- Compute per layer (hw/kernels.py): RMSNorm, the projections with the layer's real weight shapes and
  attention over the resident plus staged tokens; then the lm_head over one token per sequence.
- Model families (hw/plan.KVGeometry): MLA caches one latent row (kv_lora_rank + rope) per token and layer,
  attends in the absorbed form and moves latents; sliding-window layers keep a ring of `window` tokens per slot
  on the device, never tiered or copied (only full-attention layers have T0, host pools and copies); MoE layers
  route each token to its top-k experts and multiply only the experts reached (the count is reported per step).
- Weights: every replayed layer has its own (as a served model: nothing is reused across layers, so each
  layer's weights stream from memory); a model too large for the device is replayed on its first `--layers`.

The parts: hw/config.py (ReplayConfig), hw/plan.py (what each step does), hw/memory.py (the budget),
hw/streams.py (clocks, signals between streams), hw/kernels.py (compute), this file (storage, copies and
the step loop). On `--device cpu` the same code runs with host tensors: the "device" is the host, the copy
stream is a second thread, and torch uses one thread for compute (see `cpu_threads`). That is a real
measurement of this machine, not of a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from dataclasses import dataclass

import numpy as np

from tiersim.errors import TiersimError
from tiersim.hw.config import REPLAY_STRATEGIES, ReplayConfig, reduced_model
from tiersim.hw.copies import Copier, StepCopies, resolve_method
from tiersim.hw.device import uva_alias
from tiersim.hw.kernels import LayerWeights, decode_attention, decoder_layer, torch_dtype
from tiersim.hw.memory import GB, MemoryNeed, check_memory, memory_need
from tiersim.hw.norm import rms_norm
from tiersim.hw.plan import ReplayPlan, StepWork, kv_geometry, plan_replay
from tiersim.hw.streams import Clock, Progress, cpu_threads, on_stream
from tiersim.workload.build import Workload


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
    copy_method: str = ""  # the mechanism that ran (hw/copies.py)
    copies: StepCopies | None = None  # per step: pieces, bytes and copy calls moved
    experts_touched: np.ndarray | None = None  # MoE: per step, distinct routed experts multiplied, mean per MoE layer
    expert_bytes: np.ndarray | None = None  # MoE: per step, routed-expert weight bytes those experts read, all layers

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
            "batched_attention": self.uniform, "fetch_path": self.fetch_path, "copy_method": self.copy_method,
            **(self.copies.summary() if self.copies is not None else {}), "wall_s": self.wall_s,
            **({} if self.experts_touched is None else {
                "experts_touched_mean": float(self.experts_touched.mean()),
                "expert_gb_per_step": float(self.expert_bytes.mean() / GB)}),
        }


INPUT_VARIANTS = 16  # MoE: distinct step inputs, rotated (routing samples; 16 x layers draws per run)

FETCH_PATHS = {
    ("pageable", False): "pageable: host gather into a new tensor, then copy",
    ("pageable", True): "pageable: host gather into a new tensor, then copy",
    ("gather-kernel", True): "pinned: zero-copy GPU gather over the link (UVA index_select)",
    ("dma", True): "pinned: one cudaMemcpyAsync per piece into a landing buffer, then a reorder kernel",
    ("dma", False): "pinned: one copy per piece into the staging buffer (CPU device)",
    ("dma-batched", True): "pinned: one cudaMemcpyAsync per run of adjacent pieces, then a reorder kernel",
    ("dma-batched", False): "pinned: one index_select from the host pool into the staging buffer (CPU device)",
    ("host-gather", True): "pinned: host gather into pinned bounce buffers + DMA, chunk by chunk",
    ("host-gather", False): "pinned: host gather into a bounce buffer, then a copy (CPU device)",
}


def fetch_path(cfg: ReplayConfig, method: str | None = None) -> str:
    """How DDR-tier tokens reach the staging buffers (before the UVA alias is tried, unless `method` is given)."""
    if not cfg.strategy_record.keeps_ddr:
        return "none"
    method = method or resolve_method(cfg.copy_method, cfg.cuda, cfg.pinned, uva=True)
    return FETCH_PATHS[(method, cfg.cuda)]


class Replayer:
    """Storage and kernels for one plan on one device; `run()` replays the steps and times them."""

    def __init__(self, cfg: ReplayConfig, plan: ReplayPlan, probe=None, weights: list[LayerWeights] | None = None):
        import torch  # lazy: `import tiersim.hw.replay` stays torch-free

        self.cfg, self.plan, self.m, self.probe = cfg, plan, cfg.model, probe
        self.strategy = cfg.strategy_record
        self.device = torch.device(cfg.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch_dtype(cfg.model)
        m, lay = self.m, plan.layout
        geo = self.geo = kv_geometry(m)
        self.weights = weights or [LayerWeights.random(m, self.device, self.dtype, i) for i in range(m.layers)]
        self.lm_head = torch.empty(m.vocab, m.hidden, device=self.device, dtype=self.dtype).normal_(0.0, 0.02)
        self.final_norm = torch.ones(m.hidden, device=self.device, dtype=self.dtype)
        zeros = lambda shape, n: [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(n)]  # noqa: E731
        # Full-attention layers: T0 pools (K and V, or one latent pool), host pools; sliding layers: a ring each.
        shape = (lay.batch, lay.chunks, geo.heads, lay.chunk, geo.width) if lay.slot_major else \
            (lay.chunks, lay.batch, geo.heads, lay.chunk, geo.width)
        full, sliding = len(geo.full_layers), len(geo.sliding_layers)
        self.k0 = zeros(shape, full)
        self.v0 = zeros(shape, full if geo.parts == 2 else 0)
        ring = (lay.batch, geo.heads, lay.window, geo.width)
        self.k_ring = zeros(ring, sliding)
        self.v_ring = zeros(ring, sliding if geo.parts == 2 else 0)
        self.kind = geo.kind  # layer -> (sliding, index in its group)
        rows = max(1, plan.staging_rows_max)
        self.staging = [torch.zeros(geo.parts * rows, geo.width, device=self.device, dtype=self.dtype)
                        for _ in range(cfg.staging_buffers)]
        keeps_ddr, pin = self.strategy.keeps_ddr, self.cuda and cfg.pinned
        host_rows = geo.parts * lay.host_v_offset if keeps_ddr else 0
        self.host = [torch.zeros(host_rows, geo.width, dtype=self.dtype, pin_memory=pin) for _ in range(full)]
        self.host_uva, why = [], ""
        if pin and keeps_ddr and cfg.copy_method in ("auto", "gather-kernel"):
            try:
                self.host_uva = [uva_alias(h, self.device) for h in self.host]
            except Exception as e:  # noqa: BLE001 - any failure: auto falls back to host gather + DMA
                why = str(e).splitlines()[0][:120]
                if cfg.copy_method == "gather-kernel":
                    raise TiersimError(f"--copy-method gather-kernel: the zero-copy UVA alias of pinned host memory "
                                       f"is unavailable here ({why}); accepted: dma, dma-batched, host-gather") from e
        self.copy_method = resolve_method(cfg.copy_method, self.cuda, cfg.pinned, bool(self.host_uva))
        self.fetch_path = fetch_path(cfg, self.copy_method)
        if why:
            self.fetch_path += f" (zero-copy UVA alias unavailable: {why})"
        d2h_rows = max((len(w.d2h[0]) for w in plan.steps if w.d2h is not None), default=0)
        promote_rows = max((len(w.promote[1]) for w in plan.steps if w.promote is not None), default=0)
        self.copier = Copier(self.copy_method, self.device, self.dtype, geo.width, geo.heads,
                             plan.staging_rows_max, len(plan.steps), d2h_rows, promote_rows, cfg.pinned, geo.parts)
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._to_device(torch)
        self.inputs: dict[int, object] = {}

    def _to_device(self, torch) -> None:
        """Index tensors: T0 and staging ones on the device, host-pool ones on the host."""
        dev, lay = self.device, self.plan.layout
        as_dev = lambda a: torch.as_tensor(a, dtype=torch.int64, device=dev)  # noqa: E731
        as_host = lambda a: torch.as_tensor(a, dtype=torch.int64)  # noqa: E731
        for w in self.plan.steps:
            w.new_rows = as_dev(w.new_rows)
            if w.ring_rows is not None:
                w.ring_rows, w.ring_src = as_dev(w.ring_rows), as_dev(w.ring_src)
            if w.compact is not None:
                w.compact = tuple(as_dev(a) for a in w.compact)
            if w.promote is not None:
                src, dst = w.promote
                w.promote = (as_host(np.concatenate([src, src + lay.host_v_offset][: lay.parts])), as_dev(dst))
            if w.d2h is not None:
                t0, host = w.d2h
                w.d2h = (as_dev(t0), as_host(np.concatenate([host, host + lay.host_v_offset][: lay.parts])))
            if w.staged_set is not None:
                w.staged_set.prepare(self.copy_method, dev)  # once per set: steps with the same DDR set share it
        self._positions = [torch.as_tensor(w.positions, device=dev) for w in self.plan.steps] if self.probe else None

    # -- copies (hw/copies.py does the moving and the counting) ---------------------------------
    def _flat(self, i: int):
        """Flat [rows, width] views of full-attention layer i's T0 pools (the V one None for MLA)."""
        d = self.geo.width
        return self.k0[i].view(-1, d), (self.v0[i].view(-1, d) if self.v0 else None)

    def compact(self, i: int, w: StepWork) -> None:
        """Fill the holes demotions and evictions left in full-attention layer i's T0 with the last residents."""
        src, dst = w.compact
        for pool in self._flat(i):
            if pool is not None:
                pool.index_copy_(0, dst, pool.index_select(0, src))

    def copy_layer(self, k: int, layer: int, w: StepWork, buf) -> None:
        """The copy engine's work for one layer of step k: demotions out, T0 compaction, promotions in, DDR tier
        staged; nothing for a sliding-window layer (its ring is never tiered)."""
        sliding, i = self.kind[layer]
        if sliding:
            return
        c = self.copier
        if w.d2h is not None:
            c.demote(k, *self._flat(i), self.host[i], *w.d2h, w.demote_pieces)
        if w.compact is not None:
            self.compact(i, w)
        if w.promote is not None:
            c.promote(k, *self._flat(i), self.host[i], *w.promote, w.promote_pieces)
        if w.staged_set is not None:
            c.stage(k, self.host[i], self.host_uva[i] if self.host_uva else None, w.staged_set, buf)

    # -- compute --------------------------------------------------------------------------------
    def layer(self, layer: int, w: StepWork, x, buf, k: int):
        """One decoder layer of step k for the step's new tokens."""
        sliding, i = self.kind[layer]
        if w.compact is not None and not self.strategy.prefetches and not sliding:  # else the copy engine did it
            self.compact(i, w)
        tag = seen = None
        if self.probe is not None:
            tag = functools.partial(self.probe.tag, self._positions[k], self.geo.heads)
            seen = functools.partial(self.probe.check, k, layer)
        k_pools, v_pools = (self.k_ring, self.v_ring) if sliding else (self.k0, self.v0)
        return decoder_layer(self.m, self.plan.layout, w, self.weights[layer], k_pools[i],
                             v_pools[i] if v_pools else None, x, None if sliding else buf, tag, seen, sliding)

    def head(self, x, w: StepWork):
        """Final norm and lm_head over the last new token of every slot."""
        import torch

        last = np.cumsum(w.tokens) - 1
        if len(last) != x.shape[0]:
            x = x.index_select(0, torch.as_tensor(last, device=self.device))
        return rms_norm(x, self.final_norm) @ self.lm_head.T

    def _input(self, tokens: int, k: int):
        """Hidden states entering step k's first layer: one random set per token count, or for an MoE model
        INPUT_VARIANTS sets used in turn, so that routing varies from step to step as the simulator's expected
        experts per step assumes (one set would route every decode step of the batch alike)."""
        import torch

        variants = INPUT_VARIANTS if self.m.moe is not None else 1
        if tokens not in self.inputs:
            self.inputs[tokens] = [torch.randn(tokens, self.m.hidden, device=self.device).to(self.dtype)
                                   for _ in range(variants)]
        return self.inputs[tokens][k % variants]

    # -- the step loop --------------------------------------------------------------------------
    def run(self, steps: list[StepWork] | None = None) -> ReplayResult:
        """Replay `steps` (default: the whole plan) and time each one on the compute stream."""
        import torch

        steps = self.plan.steps if steps is None else steps
        self.copier.reset(len(steps))
        moe = [lw.moe for lw in self.weights if lw.moe is not None]
        for e in moe:
            e.touched.clear()
        clock = Clock(self.device)
        L = self.m.layers
        per_layer, all_layers = self.strategy.fetches_per_layer, self.strategy.fetches_before_forward
        compute_stream = (lambda: torch.cuda.current_stream()) if self.cuda else (lambda: None)  # noqa: E731
        staged = computed = engine = None
        if per_layer:
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
                    x = self._input(int(w.tokens.sum()), k)
                    if all_layers:
                        t = time.perf_counter()
                        self._sync_copies(k, w)
                        stall[k] = time.perf_counter() - t
                    for layer in range(L):
                        buf = None
                        if per_layer:
                            j = k * L + layer
                            t = time.perf_counter()
                            staged.wait(j + 1, compute_stream())
                            stall[k] += time.perf_counter() - t
                            buf = self.staging[j % len(self.staging)]
                        elif all_layers:
                            buf = self.staging[layer]
                        x = self.layer(layer, w, x, buf, k)
                        if computed is not None:
                            computed.advance(compute_stream())
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
        touched = expert_bytes = None
        if moe:  # every MoE layer ran once per step: its distinct experts, and the bytes of their weights
            counts = np.array([e.touched for e in moe], dtype=np.float64)  # [MoE layers, steps]
            e0 = moe[0]
            per_expert = sum(t[0].numel() * t.element_size() for t in (e0.gate_up, e0.down, e0.gate_up_bias,
                                                                        e0.down_bias) if t is not None)
            touched, expert_bytes = counts.mean(axis=0), counts.sum(axis=0) * per_expert
        return ReplayResult(step_s, step_s - head_s, head_s, stall, self.plan.h2d_bytes[:n], self.plan.d2h_bytes[:n],
                            None, all(w.uniform for w in steps), wall, self.fetch_path, self.copy_method,
                            self.copier.counts, touched, expert_bytes)

    def _sync_copies(self, k: int, w: StepWork) -> None:
        """prefetch-sync: every layer's demotions and staged copies, then the compute stream waits for them."""
        import torch

        if not w.touches_t0 and w.staged_set is None:
            return
        if self.cuda:
            self.copy_stream.wait_stream(torch.cuda.current_stream())  # T0 and staging no longer in use
            with torch.cuda.stream(self.copy_stream):
                for layer in range(self.m.layers):
                    self.copy_layer(k, layer, w, self.staging[layer])
            torch.cuda.current_stream().wait_stream(self.copy_stream)
        else:
            for layer in range(self.m.layers):
                self.copy_layer(k, layer, w, self.staging[layer])

    def _copy_engine(self, steps: list[StepWork], staged: Progress, computed: Progress) -> None:
        """The copy stream of prefetch-layer: stage layer j once buffer j % (depth+1) is free, `depth` layers ahead."""
        import torch

        L, nbuf = self.m.layers, len(self.staging)
        try:
            with torch.inference_mode(), on_stream(self.copy_stream):
                stream = self.copy_stream
                for k, w in enumerate(steps):
                    for layer in range(L):
                        j = k * L + layer
                        computed.wait(j - nbuf + 1, stream)  # the buffer's last user is done
                        if w.touches_t0:
                            computed.wait(j - L + 1, stream)  # this layer's T0 is no longer in use
                        self.copy_layer(k, layer, w, self.staging[j % nbuf])
                        staged.advance(stream)
        except BaseException as e:  # surface it in the compute thread
            staged.fail(e)


def replay(cfg: ReplayConfig, workload: Workload, probe=None) -> ReplayResult:
    """Plan, check memory, allocate, warm up on the first steps, then replay every step and time it."""
    import torch

    need = memory_need(cfg, workload)
    check_memory(cfg, need)
    plan = plan_replay(cfg, workload)
    with contextlib.nullcontext() if cfg.cuda else cpu_threads(1):
        torch.manual_seed(cfg.seed)
        rep = Replayer(cfg, plan, probe)
        if cfg.warmup_steps and probe is None:
            rep.run(plan.steps[: cfg.warmup_steps])
        result = rep.run()
    result.memory = need
    return result


__all__ = ["REPLAY_STRATEGIES", "MemoryNeed", "ReplayConfig", "ReplayPlan", "ReplayResult", "Replayer", "StepWork",
           "check_memory", "decode_attention", "fetch_path", "memory_need", "plan_replay", "reduced_model", "replay",
           "uva_alias"]
