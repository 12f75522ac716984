"""A Workload and a strategy → a StepPlan: the duration of every piece of work of every step, and its
analytic lower bound."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from tiersim.errors import ConfigError
from tiersim.sim.config import SimConfig, compressed_factor
from tiersim.sim.copies import COPY_METHODS, CopyMethod, KVLayout, available_methods, get_copy_method
from tiersim.sim.costs import CostModel
from tiersim.sim.engine import StepPlan
from tiersim.sim.shard import GPUShare, window_demand
from tiersim.specs import ModelSpec
from tiersim.strategy import Strategy, get_strategy
from tiersim.workload.build import BCOL, Workload, block_totals


def make_plan(strategy: str | Strategy, w: Workload, cost: CostModel, cfg: SimConfig,
              blocks: np.ndarray | None = None) -> tuple[StepPlan, np.ndarray, np.ndarray]:
    """Durations of every piece of work of every step for one strategy; also per-layer H2D and demoted bytes.

    `blocks` are the workload's per-step block totals (workload.build.block_totals at cfg.block_size),
    computed here when not given. Copies cost what `cost.copy` charges for the pieces the layout makes.
    """
    s = get_strategy(strategy)
    if blocks is None:
        blocks = block_totals(w, cfg.block_size)
    if cost.copy is None:
        cost = replace(cost, copy=choose_copy(w, cost, cfg, blocks)[0])
    m, c, g = cost.model, w.column, cost.share
    cf = compressed_factor(cfg.policy, m, g.kv_element_bytes)  # relative to the KV as stored (fp8: 1 byte)
    kvl = g.kv_bytes_per_token_layer  # one token in one full-attention layer, on one GPU
    decode_hbm = c("hbm") - c("prefill_tokens")
    if not s.applies_policy:
        gpu_tokens = pairs = c("tokens") - c("prefill_tokens")
    elif not s.prefetches:  # the GPU attends over HBM and the compressed tier only
        gpu_tokens, pairs = decode_hbm + cf * c("compressed"), decode_hbm + c("compressed")
    else:
        gpu_tokens = decode_hbm + c("ddr") + cf * c("compressed")
        pairs = decode_hbm + c("ddr") + c("compressed")
    new_tokens = c("decode") + c("prefill_tokens")
    zeros = np.zeros(len(w.totals))
    if cfg.fixed_compute_ms is not None:
        matmul_s = np.full(len(zeros), cfg.fixed_compute_ms * 1e-3 / m.layers)
        attention_s, head_s = zeros, zeros
        kind_attention_s = np.zeros((2, len(zeros)))
    else:
        matmul_s = cost.matmul_s(new_tokens) + cost.allreduce_s(new_tokens) + cost.alltoall_s(new_tokens) + cost.launch_s
        # The mean layer: full-attention layers attend their tiers, sliding ones their window (always in HBM).
        win = window_demand(w, g.sliding_window)
        kv_tokens = gpu_tokens * g.full_share + win.decode_tokens * g.sliding_share
        attended = (pairs + c("prefill_pairs") / 2) * g.full_share \
            + (win.decode_tokens + win.prefill_pairs) * g.sliding_share
        attention_s = cost.attention_s(kv_tokens * kvl, attended)
        # Each kind on its own (rows: full, sliding), for a hybrid plan's per-layer timeline (hybrid_layers).
        kind_attention_s = np.stack([cost.attention_s(gpu_tokens * kvl, pairs + c("prefill_pairs") / 2),
                                     cost.attention_s(win.decode_tokens * kvl, win.decode_tokens + win.prefill_pairs)])
        if s.fetches_per_layer and cost.copy_engine_slowdown:  # a copy engine beside every layer slows its compute
            slow = 1.0 + cost.copy_engine_slowdown
            matmul_s, attention_s, kind_attention_s = matmul_s * slow, attention_s * slow, kind_attention_s * slow
        head_s = cost.head_s(c("decode") + c("prefill"))
    # Re-tier traffic decided at the end of step k-1 lands in step k.
    promoted_tokens = np.concatenate([[0.0], (c("ddr_to_hbm") + cf * c("ddr_to_compressed"))[:-1]])
    demoted_bytes = (c("hbm_to_ddr") + cf * c("compressed_to_ddr")) * g.kv_bytes_per_token_global if s.keeps_ddr \
        else zeros
    # Only full-attention layers hold DDR-tier KV: per layer, their bytes spread over the mean layer.
    layer_bytes = (c("ddr") + promoted_tokens) * kvl * g.full_share
    layout = KVLayout(cfg.kv_layout, cfg.block_size, g.full_layers, m.mla is None)
    runs = lambda name: blocks[:, BCOL[name]]  # noqa: E731
    shift = lambda a: np.concatenate([[0.0], a[:-1]])  # noqa: E731 - decided at the end of k-1, copied in step k
    split = 2 if layout.split_kv else 1  # the prototype's pageable path copies K and V separately
    if s.prefetches:
        # One copy per layer on the copy stream, or every layer's copies back to back before the forward pass.
        fetch_runs = runs("ddr_runs") + shift(runs("promoted_runs"))
        fetch_full = runs("ddr_full_blocks") + shift(runs("promoted_full_blocks"))
        if s.fetches_before_forward:  # the full-attention layers' DDR-tier KV, all of it (sliding layers hold none)
            b = (c("ddr") + promoted_tokens) * kvl * g.full_layers
            n = layout.pieces(fetch_runs, fetch_full, all_layers=True)
            calls = split * g.full_layers if cost.copy.on_compute_stream else np.ones(len(zeros))
        else:  # the mean layer's share of a full-attention layer's pieces
            b, n = layer_bytes, layout.pieces(fetch_runs, fetch_full, all_layers=False) * g.full_share
            calls = np.full(len(zeros), split if cost.copy.on_compute_stream else 1)
        h2d, h2d_dup = cost.fetch_s(b, n, calls=calls), cost.fetch_s(b, n, duplex=True, calls=calls)
        h2d_pieces = n * (1 if s.fetches_before_forward else m.layers)  # per-layer: the mean layer's share x layers
    else:
        h2d = h2d_dup = h2d_pieces = zeros
        b = zeros
    all_calls = split * g.full_layers if cost.copy.on_compute_stream else 1
    demoted_pieces = layout.pieces(runs("demoted_runs"), runs("demoted_full_blocks"), all_layers=True) \
        if s.keeps_ddr else zeros
    d2h, d2h_dup = (cost.d2h_s(demoted_bytes, demoted_pieces, duplex=d, calls=all_calls) for d in (False, True))
    if s.host_attends:
        # Promotions decided at the end of step k are copied in right away, beside the next step's work.
        bulk = (c("ddr_to_hbm") + cf * c("ddr_to_compressed")) * g.kv_bytes_per_token_global
        bulk_pieces = layout.pieces(runs("promoted_runs"), runs("promoted_full_blocks"), all_layers=True)
        bulk_s, bulk_dup = (cost.fetch_s(bulk, bulk_pieces, duplex=d, calls=all_calls) for d in (False, True))
        with_host = c("ddr") > 0
        query_bytes = np.where(with_host, c("decode") * g.attention_heads * g.query_width * m.dtype_bytes, 0.0)
        partial_bytes = np.where(with_host, c("decode") * g.attention_heads * (g.value_width + 1) * 4, 0.0)
        query_s, partial_s = cost.d2h_s(query_bytes), cost.h2d_s(partial_bytes)
        host_s = cost.host_attention_s(c("ddr") * kvl * g.full_share, c("ddr") * g.full_share)
    else:
        bulk = bulk_s = bulk_dup = query_s = host_s = partial_s = zeros
    slow = lambda nbytes, seconds: interference(cost, nbytes, seconds)  # noqa: E731
    # Per-layer copies of a hybrid model: its full and sliding layers apart (the others' timelines do not depend on it).
    hybrid = hybrid_layers(m, g, attention_s, kind_attention_s, h2d, h2d_dup) \
        if s.fetches_per_layer and g.sliding_layers else {}
    return StepPlan(
        strategy=s, layers=m.layers, depth=cfg.depth, matmul_s=matmul_s, attention_s=attention_s,
        head_s=head_s, qkv_share=cost.qkv_share(), h2d_layer_s=h2d, h2d_layer_duplex_s=h2d_dup,
        h2d_bulk_s=bulk_s, h2d_bulk_duplex_s=bulk_dup, d2h_bulk_s=d2h,
        d2h_bulk_duplex_s=d2h_dup, query_d2h_s=query_s, host_attention_s=host_s, partial_h2d_s=partial_s,
        h2d_layer_slow=slow(b, h2d), h2d_bulk_slow=slow(bulk, bulk_s), d2h_bulk_slow=slow(demoted_bytes, d2h),
        serial_copies=cost.copy.on_compute_stream and s.fetches_per_layer,
        copy_method=cost.copy.name, h2d_pieces=h2d_pieces, d2h_pieces=demoted_pieces, **hybrid,
    ), layer_bytes, demoted_bytes


def hybrid_layers(m: ModelSpec, g: GPUShare, attention_s: np.ndarray, kind_attention_s: np.ndarray, h2d: np.ndarray,
                  h2d_dup: np.ndarray) -> dict:
    """The StepPlan fields that make a hybrid model's timeline per layer kind (0: full attention, 1: sliding window).

    The mean layer's totals per step are kept and only placed where they happen: each full-attention layer copies
    layers / full_layers times the mean layer's copy (its own bytes and pieces; the sliding layers copy nothing), and
    the mean layer's attention is split between the kinds in proportion to each kind's own roofline (which is each
    kind's own roofline when both sit on the same side of it, as in decode). So every step's compute and copy time
    summed over the layers is the mean layer's, and only the overlap of copies and compute changes.
    """
    full = set(m.full_layers)
    kinds = tuple(0 if i in full else 1 for i in range(m.layers))
    layers = np.array([g.full_layers, g.sliding_layers], dtype=np.float64)[:, None]
    split = (layers * kind_attention_s).sum(axis=0)
    scale = np.divide(m.layers * attention_s, split, out=np.ones_like(split), where=split > 0)
    to_full = np.array([m.layers / g.full_layers, 0.0])[:, None]
    return {"layer_kinds": kinds, "kind_attention_s": kind_attention_s * scale,
            "kind_h2d_layer_s": to_full * h2d, "kind_h2d_layer_duplex_s": to_full * h2d_dup}


def collectives_ms_per_step(w: Workload, cost: CostModel, cfg: SimConfig) -> dict[str, float]:
    """Mean time per decode step of the NVLink collectives inside the plan's compute: the TP all-reduces of every
    layer and the EP all-to-all of the MoE layers (0 without them, or when a fixed compute time replaces the roofline)."""
    if cfg.fixed_compute_ms is not None:
        return {"allreduce_ms_per_step": 0.0, "alltoall_ms_per_step": 0.0}
    new_tokens = w.column("decode") + w.column("prefill_tokens")
    layers = cost.model.layers
    return {"allreduce_ms_per_step": float(layers * cost.allreduce_s(new_tokens).mean() * 1e3),
            "alltoall_ms_per_step": float(layers * cost.alltoall_s(new_tokens).mean() * 1e3)}


def interference(cost: CostModel, nbytes, seconds) -> np.ndarray:
    """Compute's rate while a copy of `nbytes` taking `seconds` runs beside it: the SMs a gather kernel takes, times
    the HBM bandwidth the copy's bytes take (its writes or reads at its own rate; compute assumed HBM-bound, so this
    term is an upper bound on its slow-down)."""
    nbytes, seconds = np.asarray(nbytes, dtype=np.float64), np.asarray(seconds, dtype=np.float64)
    rate = np.divide(nbytes, seconds, out=np.zeros_like(nbytes), where=seconds > 0)
    hbm = np.maximum(0.0, 1.0 - rate / cost.hbm_bytes_per_s)
    sm = 1.0 - (cost.copy.uses_sms and cost.hw.gather_kernel_sm_share or 0.0)
    return np.where(seconds > 0, sm * hbm, 1.0)


def estimate_s(plan: StepPlan) -> np.ndarray:
    """Each step's time by hand, interference included: what `auto` compares mechanisms by.

    A per-layer fetch of C seconds per step beside compute W slowed to rate f while it runs takes
    max(C, W + C (1 - f)); a fetch before the forward pass adds to it.
    """
    compute = plan.layers * plan.layer_s + plan.head_s
    s = plan.strategy
    if s.fetches_per_layer and not plan.serial_copies:
        c = plan.layers * plan.h2d_layer_s
        f = plan.h2d_layer_slow if plan.h2d_layer_slow is not None else 1.0
        return np.maximum(c, compute + c * (1.0 - f))
    if s.fetches_per_layer:  # on the compute stream: every layer's copy before it
        return compute + plan.layers * plan.h2d_layer_s
    if s.fetches_before_forward:
        return compute + plan.h2d_layer_s
    return bound_s(plan)


def choose_copy(w: Workload, cost: CostModel, cfg: SimConfig, blocks: np.ndarray) -> tuple[CopyMethod, dict]:
    """cfg.copy_method resolved to a mechanism: itself, or (`auto`) the one this profile can model whose estimated
    run (`estimate_s`, interference included) is shortest; also each candidate's mean estimated step in ms."""
    if not cfg.pinned or cfg.copy_method != "auto":
        return get_copy_method(cfg.copy_method, cfg.pinned), {}
    candidates = available_methods(cfg.hardware)
    if not candidates:
        raise ConfigError("copy_method", f"copy_method 'auto' finds no mechanism that {cfg.hardware.name}'s profile "
                                         f"gives the constants of; each needs: "
                                         + "; ".join(f"{m.name}: {', '.join(m.profile_fields)}"
                                                     for m in COPY_METHODS.values() if m.pinned))
    estimates = {}
    for method in candidates:
        plan, _, _ = make_plan(cfg.strategy, w, replace(cost, copy=method), cfg, blocks)
        estimates[method.name] = float(estimate_s(plan).mean() * 1e3)
    best = min(candidates, key=lambda m: estimates[m.name])  # ties: the first in COPY_METHODS order
    return best, estimates


def bound_s(plan: StepPlan) -> np.ndarray:
    """Analytic lower bound of each step: compute, plus whatever transfer it cannot hide."""
    compute = plan.layers * plan.layer_s + plan.head_s
    s = plan.strategy
    if s.fetches_before_forward:
        return compute + plan.h2d_layer_s
    if s.fetches_per_layer and plan.serial_copies:  # copies on the compute stream run between the layers
        return compute + plan.layers * plan.h2d_layer_s
    if s.fetches_per_layer:
        # Demotions run on their own D2H stream and nothing in the step waits for them (the engine keeps them in
        # flight and the memory account holds their bytes), so they bound no step; duplex only slows the fetch.
        return np.maximum(compute, plan.layers * plan.h2d_layer_s)
    if s.host_attends:  # the queries share the D2H stream with the demotions: a lagging demotion delays them
        host = plan.layers * (plan.query_d2h_s + plan.host_attention_s + plan.partial_h2d_s)
        return np.maximum(compute, np.maximum(host, plan.d2h_bulk_s))
    return compute


