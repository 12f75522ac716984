"""A Workload and a strategy → a StepPlan: the duration of every piece of work of every step, and its
analytic lower bound."""

from __future__ import annotations

import numpy as np

from tiersim.sim.config import SimConfig, compressed_factor
from tiersim.sim.costs import CostModel
from tiersim.sim.engine import StepPlan
from tiersim.strategy import Strategy, get_strategy
from tiersim.workload.build import Workload


def make_plan(strategy: str | Strategy, w: Workload, cost: CostModel, cfg: SimConfig) -> tuple[StepPlan, np.ndarray,
                                                                                               np.ndarray]:
    """Durations of every piece of work of every step for one strategy; also per-layer H2D and demoted bytes."""
    s = get_strategy(strategy)
    m, c = cost.model, w.column
    cf = compressed_factor(cfg.policy, m)
    kvl = m.kv_bytes_per_token_layer
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
    else:
        matmul_s = cost.matmul_s(new_tokens) + cost.launch_s
        attention_s = cost.attention_s(gpu_tokens * kvl, pairs + c("prefill_pairs") / 2)
        head_s = cost.head_s(c("decode") + c("prefill"))
    # Re-tier traffic decided at the end of step k-1 lands in step k.
    promoted_tokens = np.concatenate([[0.0], (c("ddr_to_hbm") + cf * c("ddr_to_compressed"))[:-1]])
    demoted_bytes = (c("hbm_to_ddr") + cf * c("compressed_to_ddr")) * m.kv_bytes_per_token if s.keeps_ddr else zeros
    layer_bytes = (c("ddr") + promoted_tokens) * kvl
    if s.prefetches:
        # One copy per layer on the copy stream, or every layer's copies back to back before the forward pass.
        copies = m.layers if s.fetches_before_forward else 1
        b = layer_bytes * copies
        h2d, h2d_dup = cost.fetch_s(b, copies), cost.fetch_s(b, copies, duplex=True)
    else:
        h2d = h2d_dup = zeros
    if s.host_attends:
        # Promotions decided at the end of step k are copied in right away, beside the next step's work.
        bulk = (c("ddr_to_hbm") + cf * c("ddr_to_compressed")) * m.kv_bytes_per_token
        bulk_s, bulk_dup = cost.fetch_s(bulk), cost.fetch_s(bulk, duplex=True)
        with_host = c("ddr") > 0
        query_bytes = np.where(with_host, c("decode") * m.attention_heads * m.head_dim * m.dtype_bytes, 0.0)
        partial_bytes = np.where(with_host, c("decode") * m.attention_heads * (m.head_dim + 1) * 4, 0.0)
        query_s, partial_s = cost.d2h_s(query_bytes), cost.h2d_s(partial_bytes)
        host_s = cost.host_attention_s(c("ddr") * kvl)
    else:
        bulk_s = bulk_dup = query_s = host_s = partial_s = zeros
    return StepPlan(
        strategy=s, layers=m.layers, depth=cfg.depth, matmul_s=matmul_s, attention_s=attention_s,
        head_s=head_s, qkv_share=cost.qkv_share(), h2d_layer_s=h2d, h2d_layer_duplex_s=h2d_dup,
        h2d_bulk_s=bulk_s, h2d_bulk_duplex_s=bulk_dup, d2h_bulk_s=cost.d2h_s(demoted_bytes),
        d2h_bulk_duplex_s=cost.d2h_s(demoted_bytes, duplex=True), query_d2h_s=query_s, host_attention_s=host_s,
        partial_h2d_s=partial_s,
    ), layer_bytes, demoted_bytes


def bound_s(plan: StepPlan) -> np.ndarray:
    """Analytic lower bound of each step: compute, plus whatever transfer it cannot hide."""
    compute = plan.layers * plan.layer_s + plan.head_s
    s = plan.strategy
    if s.fetches_before_forward:
        return compute + plan.h2d_layer_s
    if s.fetches_per_layer:
        return np.maximum(compute, np.maximum(plan.layers * plan.h2d_layer_s, plan.d2h_bulk_s))
    if s.host_attends:
        host = plan.layers * (plan.query_d2h_s + plan.host_attention_s + plan.partial_h2d_s)
        return np.maximum(compute, np.maximum(host, plan.d2h_bulk_s))
    return compute


