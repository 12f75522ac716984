"""What one scheduler step of a served batch costs: the decodes and prefill chunks it holds, priced by the roofline.

The scheduler (sim/scheduler.py) hands each step's batch to a step-time function; this is the
default one. It calls the same CostModel methods as `sim.plan.make_plan` and `sim.plan.bound_s`, on
one GPU's share of the deployment (`cost.share`: TP-split heads and weights, the experts a step's
tokens reach, MLA's latent, the full-attention and sliding-window layers apart), so a served step
and a closed-loop step of the same batch cost the same:

    compute = layers x (matmul(new) + all-reduce(new) + launch + attention(KV bytes read, pairs)) + head(seqs)

per mean layer, as make_plan: the full-attention layers' share reads and attends the tiers a
strategy attends, the sliding-window layers' share at most `window` keys per query. A decode reads
its whole context (after appending its token) and attends one pair per cached position; a prefill
chunk of c tokens after c0 cached ones reads those c0 and attends c·c0 + c(c+1)/2 pairs (causal).
Every scheduled sequence gets a logit row (vLLM v1 samples the last position of each, partial
prefills included). Tiered strategies add the transfer they cannot hide (the analytic bound of
`bound_s`, without re-tier traffic), priced by the cost model's copy mechanism over the pieces the
KV layout makes of the DDR tier (sim/copies.KVLayout); a swap preemption adds its D2H and H2D
copies, one copy per block per full-attention layer and K/V, as vLLM v0's `swap_blocks` issued
them. One call per step over batch totals, never per request.

Where the batch gives only totals, per-sequence quantities are estimated: a sliding layer's keys,
min(context, window) summed over the decodes, as min(total, decodes x window) (exact when every
context is on the same side of the window); its prefill pairs and keys read as if the chunks were
equal (exact for one chunk); and the DDR tier's runs inside blocks as one run per tiering unit (a
page smaller than the block: an upper bound; a page of whole blocks: exact). The scheduler may give
them exactly (`decode_window_tokens`, `prefill_window_pairs`, `decode_ddr_runs`, `decode_ddr_full_blocks`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tiersim.sim.copies import KVLayout
from tiersim.sim.costs import CostModel
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
    # Exact per-sequence sums where the scheduler gives them; None: estimated from the totals (module docstring).
    decode_window_tokens: float | None = None  # sum over decodes of min(context, sliding window)
    prefill_window_pairs: float | None = None  # the chunks' (query, key) pairs within the sliding window
    decode_ddr_runs: float | None = None  # maximal runs of the decodes' DDR-tier tokens inside one block
    decode_ddr_full_blocks: float | None = None  # of those runs, the whole blocks

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
    """The roofline step time of a batch for one strategy: compute, plus unhidden transfer, plus swap copies.

    `page_size` is the tiering unit (None: the block), `kv_layout` the host layout of a block
    (sim/copies.KV_LAYOUTS); together they give the pieces a fetch of the DDR tier makes.
    """

    def __init__(self, cost: CostModel, strategy: str | Strategy = "full", block_size: int = 16,
                 include_transfer: bool = True, *, page_size: int | None = None,
                 kv_layout: str = "per-layer") -> None:
        m, g = cost.model, cost.share
        self.cost, self.strategy, self.share = cost, get_strategy(strategy), g
        self.include_transfer = include_transfer  # False: compute and swaps only (a stall hook adds the transfer)
        self.layers = m.layers
        self.block_size = block_size
        self.unit = block_size if page_size is None else page_size
        self.layout = KVLayout(kv_layout, block_size, g.full_layers, m.mla is None)
        self.kv_layer = g.kv_bytes_per_token_layer  # one token, one full-attention layer, this GPU
        self.block_bytes = block_size * g.kv_bytes_per_token_global
        self.query_bytes_per_seq = g.attention_heads * g.query_width * m.dtype_bytes
        self.partial_bytes_per_seq = g.attention_heads * (g.value_width + 1) * 4

    def _window(self, b: StepBatch) -> tuple[float, float, float]:
        """(keys the decodes attend, keys the chunks read, pairs of the chunks) in one sliding-window layer."""
        w = self.share.sliding_window
        if w is None:
            return 0.0, 0.0, 0.0
        decode = b.decode_window_tokens if b.decode_window_tokens is not None \
            else min(b.decode_context_tokens, b.decode_seqs * w)
        if not b.prefill_seqs:
            return decode, 0.0, 0.0
        # The chunks taken as equal: c tokens after c0 cached ones each (exact for one chunk).
        n = b.prefill_seqs
        c, c0 = b.prefill_tokens / n, b.prefill_context_tokens / n
        read = n * min(c0, w)
        if b.prefill_window_pairs is not None:
            return decode, read, b.prefill_window_pairs
        tri = lambda k: k * (k + 1) / 2  # noqa: E731 - keys 1..k
        # Query at position i (1-based) attends min(i, w) keys, for i = c0 + 1 .. c0 + c.
        pairs = max(0.0, tri(min(c0 + c, w)) - tri(min(c0, w))) + max(0.0, c0 + c - max(c0, w)) * w
        return decode, read, n * pairs

    def compute_s(self, b: StepBatch) -> float:
        """GPU compute of the step: every layer's matmuls, all-reduces and attention, then the head."""
        cost, g, s = self.cost, self.share, self.strategy
        if cost.fixed_compute_ms is not None:
            return cost.fixed_compute_ms * 1e-3
        attended = b.decode_context_tokens - b.decode_evicted_tokens
        if s.applies_policy and not s.prefetches:  # the GPU attends over its HBM tier only
            attended -= b.decode_ddr_tokens
        win_decode, win_read, win_pairs = self._window(b)
        # The mean layer, as make_plan: full-attention layers attend their tiers, sliding ones their window.
        kv_tokens = (attended + b.prefill_context_tokens) * g.full_share + (win_decode + win_read) * g.sliding_share
        pairs = (attended + b.prefill_pairs) * g.full_share + (win_decode + win_pairs) * g.sliding_share
        matmul = float(cost.matmul_s(b.new_tokens) + cost.allreduce_s(b.new_tokens) + cost.alltoall_s(b.new_tokens)
                       + cost.launch_s)
        attention = float(cost.attention_s(kv_tokens * self.kv_layer, pairs))
        slow = 1.0 + (cost.copy_engine_slowdown if s.fetches_per_layer else 0.0)  # a copy engine beside every layer
        return self.layers * (matmul + attention) * slow + float(cost.head_s(b.seqs))

    def ddr_runs(self, b: StepBatch) -> tuple[float, float]:
        """(runs inside one block, whole blocks) of the decodes' DDR tier: given, or one run per tiering unit."""
        if b.decode_ddr_runs is not None:
            return b.decode_ddr_runs, b.decode_ddr_full_blocks or 0.0
        if self.unit >= self.block_size:  # pages of whole blocks: the DDR tier is whole blocks
            blocks = b.decode_ddr_tokens / self.block_size
            return blocks, blocks
        return b.decode_ddr_tokens / self.unit, 0.0

    def transfer_s(self, b: StepBatch, compute_s: float) -> float:
        """Transfer time the step cannot hide under `compute_s` (sim/plan.bound_s, no re-tier traffic)."""
        s, g, cost, layers = self.strategy, self.share, self.cost, self.layers
        ddr = b.decode_ddr_tokens
        if ddr <= 0 or not s.keeps_ddr:
            return 0.0
        if s.prefetches:
            serial = cost.copy is not None and cost.copy.on_compute_stream  # the pageable path: K, V apart
            runs, full = self.ddr_runs(b)
            if s.fetches_before_forward:  # every full-attention layer's DDR tier, before the forward pass
                pieces = float(self.layout.pieces(runs, full, all_layers=True))
                calls = self.layout.parts * g.full_layers if serial else 1
                return float(cost.fetch_s(ddr * self.kv_layer * g.full_layers, pieces, calls=calls))
            # The mean layer's share of one full-attention layer's fetch, as make_plan.
            pieces = float(self.layout.pieces(runs, full, all_layers=False)) * g.full_share
            calls = self.layout.parts if serial else 1
            per_layer = float(cost.fetch_s(ddr * self.kv_layer * g.full_share, pieces, calls=calls))
            return layers * per_layer if serial else max(0.0, layers * per_layer - compute_s)
        if s.host_attends:
            per_layer = (float(cost.d2h_s(b.decode_seqs * self.query_bytes_per_seq))
                         + float(cost.host_attention_s(ddr * self.kv_layer * g.full_share, ddr * g.full_share))
                         + float(cost.h2d_s(b.decode_seqs * self.partial_bytes_per_seq)))
            return max(0.0, layers * per_layer - compute_s)
        return 0.0

    def swap_s(self, b: StepBatch) -> float:
        """Swap copies before the forward pass: one copy per block, per full-attention layer, for K and for V."""
        per_block = self.layout.parts * self.share.full_layers
        out = in_ = 0.0
        if b.swap_out_blocks:
            out = float(self.cost.d2h_s(b.swap_out_blocks * self.block_bytes, per_block * b.swap_out_blocks))
        if b.swap_in_blocks:
            in_ = float(self.cost.h2d_s(b.swap_in_blocks * self.block_bytes, per_block * b.swap_in_blocks))
        return out + in_

    def __call__(self, b: StepBatch) -> float:
        """Seconds of one scheduler step."""
        compute = self.compute_s(b)
        transfer = self.transfer_s(b, compute) if self.include_transfer else 0.0
        return compute + transfer + self.swap_s(b)
