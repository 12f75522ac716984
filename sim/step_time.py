"""What one scheduler step of a served batch costs: the decodes and prefill chunks it holds, priced by the roofline.

The scheduler (sim/scheduler.py) hands each step's batch to a step-time function; this is the
default one, built from the CostModel with the same formulas as `sim.run.make_plan` and
`sim.run.bound_s`, so a served step and a closed-loop step of the same batch cost the same:

    compute = layers x (matmul(new tokens) + launch + attention(KV bytes read, (query, key) pairs)) + head(seqs)

A decode reads its whole context (after appending its token) and attends one pair per cached
position; a prefill chunk of c tokens after c0 cached ones reads those c0 and attends
c·c0 + c(c+1)/2 pairs (causal). Every scheduled sequence gets a logit row (vLLM v1 samples the
last position of each, partial prefills included). Tiered strategies attend over what their
record says lies on the GPU and add the transfer they cannot hide (the analytic bound of
`bound_s`); a swap preemption adds its D2H and H2D copies, one copy per block per layer and K/V
as vLLM v0's `swap_blocks` issued them. Python floats throughout: one call per step, no arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tiersim.sim.costs import GB, CostModel
from tiersim.strategy import Strategy, get_strategy


@dataclass(frozen=True, slots=True)
class StepBatch:
    """The work of one scheduler step, totalled over the batch (token counts)."""

    decode_seqs: int = 0
    decode_context_tokens: int = 0  # positions the decodes attend, their new tokens included
    decode_ddr_tokens: int = 0  # of those, in the DDR tier (tiered strategies)
    decode_evicted_tokens: int = 0  # of those, evicted (never attended)
    prefill_seqs: int = 0
    prefill_tokens: int = 0  # prompt (or recomputed) tokens processed this step
    prefill_context_tokens: int = 0  # tokens cached before the chunks, which the chunks read
    prefill_pairs: float = 0.0  # causal (query, key) pairs of the chunks
    swap_out_blocks: int = 0  # HBM blocks of sequences swapped out before this step
    swap_in_blocks: int = 0  # blocks swapped back in for this step

    @property
    def new_tokens(self) -> int:
        """Tokens that go through the matmuls this step."""
        return self.decode_seqs + self.prefill_tokens

    @property
    def seqs(self) -> int:
        """Sequences scheduled this step (each gets a logit row)."""
        return self.decode_seqs + self.prefill_seqs


StepTime = Callable[[StepBatch], float]


class CostStepTime:
    """The roofline step time of a batch for one strategy: compute, plus unhidden transfer, plus swap copies."""

    def __init__(self, cost: CostModel, strategy: str | Strategy = "full", block_size: int = 16) -> None:
        m, self.cost, self.strategy = cost.model, cost, get_strategy(strategy)
        self.layers = m.layers
        self.kv_layer = m.kv_bytes_per_token_layer
        self.block_bytes = block_size * m.kv_bytes_per_token
        bw, flops, wb = cost.hbm_bytes_per_s, cost.flops_per_s, cost.weight_bytes_per_param
        # Constants of CostModel.matmul_s / attention_s / head_s, so one step is a few float operations.
        self.matmul_weights_s = m.layer_params * wb / bw
        self.matmul_s_per_token = 2.0 * m.layer_params / flops
        self.attention_s_per_byte = 1.0 / bw
        self.attention_s_per_pair = 4.0 * m.attention_heads * m.head_dim / flops
        self.head_weights_s = m.vocab * m.hidden * wb / bw
        self.head_s_per_token = 2.0 * m.vocab * m.hidden / flops
        self.launch_s = cost.launch_s
        self.query_bytes_per_seq = m.attention_heads * m.head_dim * m.dtype_bytes
        self.partial_bytes_per_seq = m.attention_heads * (m.head_dim + 1) * 4

    def compute_s(self, b: StepBatch) -> float:
        """GPU compute of the step: every layer's matmuls and attention, then the head."""
        if self.cost.fixed_compute_ms is not None:
            return self.cost.fixed_compute_ms * 1e-3
        s = self.strategy
        attended = b.decode_context_tokens - b.decode_evicted_tokens
        if s.applies_policy and not s.prefetches:  # the GPU attends over its HBM tier only
            attended -= b.decode_ddr_tokens
        kv_bytes = (attended + b.prefill_context_tokens) * self.kv_layer
        pairs = attended + b.prefill_pairs
        matmul = max(self.matmul_weights_s, self.matmul_s_per_token * b.new_tokens) + self.launch_s
        attention = max(kv_bytes * self.attention_s_per_byte, pairs * self.attention_s_per_pair)
        head = max(self.head_weights_s, self.head_s_per_token * b.seqs) + self.launch_s
        return self.layers * (matmul + attention) + head

    def transfer_s(self, b: StepBatch, compute_s: float) -> float:
        """Transfer time the step cannot hide under `compute_s` (bound_s of sim/run.py, no re-tier traffic)."""
        s, layers = self.strategy, self.layers
        layer_bytes = b.decode_ddr_tokens * self.kv_layer
        if layer_bytes <= 0 or not s.keeps_ddr:
            return 0.0
        if s.fetches_before_forward:
            return float(self.cost.fetch_s(layer_bytes * layers, layers))
        if s.fetches_per_layer:
            return max(0.0, layers * float(self.cost.fetch_s(layer_bytes)) - compute_s)
        if s.host_attends:
            per_layer = (float(self.cost.d2h_s(b.decode_seqs * self.query_bytes_per_seq))
                         + float(self.cost.host_attention_s(layer_bytes))
                         + float(self.cost.h2d_s(b.decode_seqs * self.partial_bytes_per_seq)))
            return max(0.0, layers * per_layer - compute_s)
        return 0.0

    def swap_s(self, b: StepBatch) -> float:
        """Swap copies before the forward pass: one copy per block, per layer, for K and for V."""
        out = in_ = 0.0
        if b.swap_out_blocks:
            out = float(self.cost.d2h_s(b.swap_out_blocks * self.block_bytes, 2 * self.layers * b.swap_out_blocks))
        if b.swap_in_blocks:
            in_ = float(self.cost.h2d_s(b.swap_in_blocks * self.block_bytes, 2 * self.layers * b.swap_in_blocks))
        return out + in_

    def __call__(self, b: StepBatch) -> float:
        """Seconds of one scheduler step."""
        compute = self.compute_s(b)
        return compute + self.transfer_s(b, compute) + self.swap_s(b)


def decode_step_s(cost: CostModel, batch: int, context_tokens: int) -> float:
    """Roofline time of a decode-only step of `batch` sequences attending `context_tokens` positions in all (full)."""
    return CostStepTime(cost)(StepBatch(decode_seqs=batch, decode_context_tokens=context_tokens))


__all__ = ["GB", "CostStepTime", "StepBatch", "StepTime", "decode_step_s"]
