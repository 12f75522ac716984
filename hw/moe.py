"""Mixture of experts in the replay: one layer's router, routed experts and shared experts, and the MLP they
compute. A token goes to its top-k experts and one SwiGLU runs per expert reached, reading exactly those experts'
weights (the simulator, sim/costs.py, charges the expected count, E (1 - (1 - k/E)^T)); the shared experts run on
every token. Every expert uses SwiGLU (gpt-oss's clamped variant has the same matmuls).

torch is imported inside the functions, so that importing this module needs no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tiersim.specs.families import MoESpec


@dataclass(slots=True)
class MoEWeights:
    """One layer's mixture of experts: router, every routed expert (SwiGLU), the shared experts as one MLP."""

    router: object  # [experts, hidden]
    router_bias: object  # [experts] or None
    gate_up: object  # [experts, 2 * expert_intermediate, hidden]: expert e's weights are one contiguous block
    down: object  # [experts, hidden, expert_intermediate]
    gate_up_bias: object  # [experts, 2 * expert_intermediate] or None (gpt-oss)
    down_bias: object  # [experts, hidden] or None
    shared_gate_up: object  # [2 * shared x expert_intermediate, hidden] or None
    shared_down: object  # [hidden, shared x expert_intermediate] or None
    top_k: int
    touched: list = field(default_factory=list)  # routed experts each call multiplied (the replay's count)

    @classmethod
    def random(cls, e: MoESpec, hidden: int, w: Callable[..., object]) -> MoEWeights:
        """Weights of `e`'s shapes, each drawn by `w(*shape)` (in field order)."""
        inter, shared = e.expert_intermediate, e.shared_experts * e.expert_intermediate
        return cls(w(e.experts, hidden), w(e.experts) if e.router_bias else None,
                   w(e.experts, 2 * inter, hidden), w(e.experts, hidden, inter),
                   w(e.experts, 2 * inter) if e.expert_bias else None,
                   w(e.experts, hidden) if e.expert_bias else None,
                   w(2 * shared, hidden) if shared else None, w(hidden, shared) if shared else None,
                   e.experts_per_token)


def moe_mlp(h, e: MoEWeights):
    """Mixture of experts over normed tokens h [T, hidden], as transformers' eager Qwen3-MoE block: router matmul,
    softmax, top-k renormalised; then one SwiGLU per expert the tokens reach, over its tokens only, so a step reads
    the weights of exactly the distinct experts its tokens chose (the simulator charges the expected number,
    E (1 - (1 - k/E)^T)); the shared experts run on every token. Appends the distinct count to `e.touched`
    (one host sync per layer: the per-expert token counts)."""
    import torch
    import torch.nn.functional as F

    logits = h @ e.router.T
    if e.router_bias is not None:
        logits = logits + e.router_bias
    top_w, top_i = torch.softmax(logits, dim=-1, dtype=torch.float32).topk(e.top_k, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    flat = top_i.reshape(-1)
    order = flat.argsort(stable=True)
    tokens, weights = order // e.top_k, top_w.reshape(-1)[order].to(h.dtype)
    counts = torch.bincount(flat, minlength=e.gate_up.shape[0]).tolist()
    out = torch.zeros_like(h)
    at = used = 0
    for expert, n in enumerate(counts):
        if not n:
            continue
        rows = tokens[at: at + n]
        gu = h.index_select(0, rows) @ e.gate_up[expert].T
        if e.gate_up_bias is not None:
            gu = gu + e.gate_up_bias[expert]
        gate, up = gu.chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ e.down[expert].T
        if e.down_bias is not None:
            y = y + e.down_bias[expert]
        out.index_add_(0, rows, y * weights[at: at + n, None])
        at, used = at + n, used + 1
    e.touched.append(used)
    if e.shared_gate_up is not None:
        gate, up = (h @ e.shared_gate_up.T).chunk(2, dim=-1)
        out = out + (F.silu(gate) * up) @ e.shared_down.T
    return out
