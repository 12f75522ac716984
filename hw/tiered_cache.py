"""hw.TieredCache: the tiering policy live in a Hugging Face model's KV cache, with real data movement.

One request per cache (batch 1: each request has its own policy and so its own kept positions).
Per layer the cache keeps every position's tier from THE policy (`tiersim.policy.TieringPolicy`,
stepped on the head- and layer-averaged attention of each new query, aggregated as
traces/capture.py does) and stores

- T0 (HBM): full-precision keys and values on the model's device;
- T1 (DDR): full precision in host memory (pinned when the model is on CUDA), copied back to the
  device before that layer's attention, so it contributes exactly what it would from HBM;
- T2 (compressed): on the device, quantized symmetric per token and per KV head (see `quantize`);
  dequantized before attention, so it is approximate;
- T3 (evicted): dropped.

Keys are cached after RoPE and positions are never renumbered, so attending over a subset of the
positions is exact for the kept ones. Each layer attends over the non-evicted positions in position
order, gathered into one contiguous tensor, whichever tier each sits in: with no compressed tier the
attention is bit-identical for every HBM ratio β (the paper's claim, exactly), and with no eviction
it is bit-identical to transformers' DynamicCache. The causal mask stays right with fewer keys than
positions seen because `get_mask_sizes` reports the kept length and an offset of
(positions seen − kept): the compacted old keys then sit before every query and the new keys at
their true positions.

Use: run the prompt through the model with `cache=TieredCache.for_model(model, policy)` and
`output_attentions=True` (eager attention), call `cache.start(out.attentions)`, then after every
one-token decode forward `cache.observe(out.attentions)`; `decode` does exactly that.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from tiersim.errors import TiersimError
from tiersim.policy import COMPRESSED, DDR, EVICTED, HBM, PolicyConfig, TierChanges, TieringPolicy

STORED_TIERS = (HBM, DDR, COMPRESSED)


# ---------------------------------------------------------------- attention aggregation (as capture.py)


def prefill_scores(attentions: Sequence[torch.Tensor]) -> np.ndarray:
    """Prefill seed of the scores: per layer the column sums over query rows of the head mean, averaged over layers."""
    first = attentions[0]
    query_mask = torch.ones(first.shape[0], first.shape[2], dtype=torch.float32, device=first.device)
    acc = torch.zeros(first.shape[0], first.shape[-1], dtype=torch.float32, device=first.device)
    for a in attentions:
        acc += torch.einsum("bhqk,bq->bk", a.float(), query_mask) / a.shape[1]
    return (acc / len(attentions))[0].cpu().numpy()


def decode_row(attentions: Sequence[torch.Tensor]) -> np.ndarray:
    """Attention of the last query over the keys: mean over heads, then over layers (float32)."""
    per_layer = torch.stack([a[:, :, -1, :].float().mean(1) for a in attentions])
    return per_layer.mean(0)[0].cpu().numpy()


# ---------------------------------------------------------------- the compressed tier's quantiser


@dataclass(frozen=True, slots=True)
class Quantized:
    """KV rows quantized symmetric per (token, head): x ≈ q · scale, q in [−(2^(b−1)−1), 2^(b−1)−1].

    8 bits are stored as int8; 4 and 2 bits as offset-binary codes (q + 2^(b−1)) packed 8/b per byte
    along head_dim (low bits first). One float16 scale per token and head: absmax / (2^(b−1)−1).
    """

    data: torch.Tensor  # (1, kv_heads, n, head_dim · bits / 8)
    scale: torch.Tensor  # (1, kv_heads, n, 1) float16
    bits: int
    head_dim: int

    @property
    def tokens(self) -> int:
        """Positions stored."""
        return self.data.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of codes and scales."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def select(self, index: torch.Tensor) -> Quantized:
        """The rows at `index` (along the position axis)."""
        return Quantized(self.data.index_select(2, index), self.scale.index_select(2, index), self.bits, self.head_dim)


def quantize(x: torch.Tensor, bits: int) -> Quantized:
    """Quantize (1, heads, n, head_dim) rows to `bits` (8, 4 or 2) with one float16 scale per token and head."""
    if bits not in (2, 4, 8):
        raise TiersimError(f"compressed bits must be 2, 4 or 8, got {bits!r}")
    qmax = 2 ** (bits - 1) - 1
    head_dim = x.shape[-1]
    per_byte = 8 // bits
    if head_dim % per_byte:
        raise TiersimError(f"head_dim {head_dim} is not a multiple of {per_byte}: cannot pack {bits}-bit codes")
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / qmax).to(torch.float16)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    q = torch.clamp(torch.round(xf / safe), -qmax, qmax)
    if bits == 8:
        return Quantized(q.to(torch.int8), scale, bits, head_dim)
    codes = (q + 2 ** (bits - 1)).to(torch.uint8).reshape(*x.shape[:-1], head_dim // per_byte, per_byte)
    shifts = torch.arange(per_byte, device=x.device, dtype=torch.uint8) * bits
    packed = (codes << shifts).sum(-1, dtype=torch.uint8)  # disjoint bit fields: the sum is a bitwise or
    return Quantized(packed, scale, bits, head_dim)


def dequantize(q: Quantized, dtype: torch.dtype) -> torch.Tensor:
    """Rows back in `dtype`: q · scale."""
    if q.bits == 8:
        values = q.data.float()
    else:
        per_byte = 8 // q.bits
        shifts = torch.arange(per_byte, device=q.data.device, dtype=torch.uint8) * q.bits
        codes = (q.data.unsqueeze(-1) >> shifts) & (2 ** q.bits - 1)
        values = codes.reshape(*q.data.shape[:-1], q.head_dim).float() - 2 ** (q.bits - 1)
    return (values * q.scale.float()).to(dtype)


def _cat_quantized(parts: list[Quantized]) -> Quantized:
    return Quantized(torch.cat([p.data for p in parts], 2), torch.cat([p.scale for p in parts], 2),
                     parts[0].bits, parts[0].head_dim)


# ---------------------------------------------------------------- which position sits where


@dataclass(frozen=True, slots=True)
class TierIndex:
    """Committed placement of one request's positions: the kept (non-evicted) ones in order, and per tier
    its positions (ascending) and their slots in the kept order."""

    tiers: np.ndarray  # (seen,) int8
    kept: np.ndarray  # (kept,) int64 ascending
    positions: tuple[np.ndarray, np.ndarray, np.ndarray]  # per stored tier, ascending
    slots: tuple[np.ndarray, np.ndarray, np.ndarray]  # per stored tier, index into `kept`

    @classmethod
    def from_tiers(cls, tiers: np.ndarray) -> TierIndex:
        """Index of a tier array (HBM=0 DDR=1 COMPRESSED=2 EVICTED=3 per position)."""
        tiers = np.array(tiers, dtype=np.int8)
        kept = np.flatnonzero(tiers != EVICTED)
        kept_tiers = tiers[kept]
        slots = tuple(np.flatnonzero(kept_tiers == t) for t in STORED_TIERS)
        return cls(tiers, kept, tuple(kept[s] for s in slots), slots)

    @property
    def seen(self) -> int:
        """Positions cached so far, evicted ones included."""
        return len(self.tiers)

    @property
    def hbm_only(self) -> bool:
        """True when every kept position is in HBM (the HBM store is then the kept KV in order)."""
        return len(self.positions[DDR]) == 0 and len(self.positions[COMPRESSED]) == 0

    def counts(self) -> np.ndarray:
        """(4,) positions per tier."""
        return np.bincount(self.tiers, minlength=4)[:4]


_EMPTY_INDEX = TierIndex.from_tiers(np.zeros(0, dtype=np.int8))


class TieredLayer(CacheLayerMixin):
    """One decoder layer's KV: T0 on the device, T1 in host memory, T2 quantized, T3 dropped."""

    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, cache: TieredCache):
        super().__init__()
        self._cache = cache
        self.pending = 0  # positions appended by the current forward, not yet committed by start/observe
        self.hbm_k = self.hbm_v = None
        self.ddr_k = self.ddr_v = None
        self.comp_k: Quantized | None = None
        self.comp_v: Quantized | None = None

    # -- the transformers layer interface

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Empty stores shaped like the first keys and values."""
        self.device, self.dtype = key_states.device, key_states.dtype
        b, heads, _, dim = key_states.shape
        self.hbm_k = key_states.new_empty((b, heads, 0, dim))
        self.hbm_v = value_states.new_empty((b, heads, 0, value_states.shape[-1]))
        self.ddr_k, self.ddr_v = self._to_host(self.hbm_k), self._to_host(self.hbm_v)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions to T0 and return the kept KV in position order (T1 fetched, T2 dequantized)."""
        if key_states.shape[0] != 1:
            raise TiersimError(f"TieredCache holds one request (batch 1), got a batch of {key_states.shape[0]}")
        if self.pending:
            raise TiersimError("TieredCache: a second forward before start()/observe() committed the previous one")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.hbm_k = torch.cat([self.hbm_k, key_states], dim=-2)
        self.hbm_v = torch.cat([self.hbm_v, value_states], dim=-2)
        self.pending = key_states.shape[-2]
        return self.gather()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv length, kv offset): the kept keys, shifted so that the newest sit at their true positions."""
        index = self._cache.index
        kept = len(index.kept) + self.pending
        return kept + query_length, index.seen - len(index.kept)

    def get_seq_length(self) -> int:
        """Positions seen (evicted ones included): the next position id."""
        return self._cache.index.seen + self.pending

    def get_max_length(self) -> int:
        """No maximum."""
        return -1

    def reset(self) -> None:
        """Not supported: a tiered cache serves one request from start to end."""
        raise TiersimError("TieredCache cannot be reset; make a new one per request")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Not supported (one request, greedy or forced decoding)."""
        raise TiersimError("TieredCache does not support beam search")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Not supported (one request per cache)."""
        raise TiersimError("TieredCache holds one request; batch selection is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Not supported (one request per cache)."""
        raise TiersimError("TieredCache holds one request; batch expansion is not supported")

    def crop(self, tokens_to_remove: int) -> None:
        """Not supported."""
        raise TiersimError("TieredCache cannot be cropped")

    # -- tier stores

    def _to_host(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            return x.to("cpu", copy=True)
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        host.copy_(x, non_blocking=True)
        return host

    def gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the kept positions (committed, then pending) in position order, on the device."""
        index = self._cache.index
        if index.hbm_only:
            return self.hbm_k, self.hbm_v
        n_kept = len(index.kept)
        hbm_slots = np.concatenate([index.slots[HBM], np.arange(n_kept, n_kept + self.pending)])
        return (self._assemble(index, hbm_slots, self.hbm_k, self.ddr_k, self.comp_k),
                self._assemble(index, hbm_slots, self.hbm_v, self.ddr_v, self.comp_v))

    def _assemble(self, index: TierIndex, hbm_slots: np.ndarray, hbm: torch.Tensor, ddr: torch.Tensor,
                  comp: Quantized | None) -> torch.Tensor:
        b, heads, _, dim = hbm.shape
        out = hbm.new_empty((b, heads, len(index.kept) + self.pending, dim))
        dev = out.device
        out.index_copy_(2, torch.as_tensor(hbm_slots, device=dev), hbm)
        if len(index.slots[DDR]):
            out.index_copy_(2, torch.as_tensor(index.slots[DDR], device=dev), ddr.to(dev, non_blocking=True))
        if comp is not None and len(index.slots[COMPRESSED]):
            out.index_copy_(2, torch.as_tensor(index.slots[COMPRESSED], device=dev), dequantize(comp, out.dtype))
        return out

    def commit(self) -> None:
        """The pending positions become part of the committed index (they stay in T0)."""
        self.pending = 0

    def retier(self, new: TierIndex) -> None:
        """Move every position from its tier in the cache's current index to its tier in `new` (same positions)."""
        old = self._cache.index
        keys, values = self.gather()  # the kept rows in order: exact from T0 and T1, dequantized from T2
        dev = keys.device

        def rows(x: torch.Tensor, tier: int) -> torch.Tensor:
            return x.index_select(2, torch.as_tensor(np.searchsorted(old.kept, new.positions[tier]), device=dev))

        self.hbm_k, self.hbm_v = rows(keys, HBM), rows(values, HBM)
        self.ddr_k, self.ddr_v = self._to_host(rows(keys, DDR)), self._to_host(rows(values, DDR))
        self.comp_k, self.comp_v = self._requantize(old, new, keys, self.comp_k), \
            self._requantize(old, new, values, self.comp_v)

    def _requantize(self, old: TierIndex, new: TierIndex, full: torch.Tensor, comp: Quantized | None
                    ) -> Quantized | None:
        """The new T2 store: rows that stay compressed keep their codes, newly compressed rows are quantized."""
        target = new.positions[COMPRESSED]
        if len(target) == 0:
            return None
        dev = full.device
        stay = np.isin(target, old.positions[COMPRESSED])
        parts, order = [], []
        if stay.any():
            parts.append(comp.select(torch.as_tensor(np.searchsorted(old.positions[COMPRESSED], target[stay]), device=dev)))
            order.append(target[stay])
        if (~stay).any():
            fresh = full.index_select(2, torch.as_tensor(np.searchsorted(old.kept, target[~stay]), device=dev))
            parts.append(quantize(fresh, self._cache.config.compressed_bits))
            order.append(target[~stay])
        merged = _cat_quantized(parts) if len(parts) > 1 else parts[0]
        return merged.select(torch.as_tensor(np.argsort(np.concatenate(order), kind="stable"), device=dev))

    def stored(self) -> np.ndarray:
        """(3,) positions held in T0, T1, T2 by this layer's stores (pending included in T0)."""
        comp = 0 if self.comp_k is None else self.comp_k.tokens
        return np.array([self.hbm_k.shape[2], self.ddr_k.shape[2], comp], dtype=np.int64)

    def nbytes(self) -> dict[str, int]:
        """Bytes per place: T0 and T2 on the device, T1 on the host."""
        size = lambda t: t.numel() * t.element_size()  # noqa: E731
        comp = sum(q.nbytes for q in (self.comp_k, self.comp_v) if q is not None)
        return {"hbm": size(self.hbm_k) + size(self.hbm_v), "ddr": size(self.ddr_k) + size(self.ddr_v),
                "compressed": comp}


# ---------------------------------------------------------------- the cache


@dataclass(slots=True)
class TierStats:
    """What the cache measured over a request: positions per tier from the stores after every step."""

    steps: list[np.ndarray] = field(default_factory=list)  # per decode step (4,): T0, T1, T2, T3 positions
    moved: np.ndarray = field(default_factory=lambda: np.zeros((4, 4), dtype=np.int64))  # [from, to] positions
    retiers: int = 0

    def to_dict(self) -> dict:
        """Plain dict: final counts, shares and the moves."""
        counts = np.array(self.steps) if self.steps else np.zeros((0, 4), dtype=np.int64)
        final = counts[-1] if len(counts) else np.zeros(4, dtype=np.int64)
        total = max(1, int(final.sum()))
        mean_share = (counts / counts.sum(1, keepdims=True)).mean(0) if len(counts) else np.zeros(4)
        names = ("hbm", "ddr", "compressed", "evicted")
        return {"decode_steps": len(counts), "retiers": self.retiers,
                "final_tokens": {n: int(final[i]) for i, n in enumerate(names)},
                "final_share": {n: float(final[i]) / total for i, n in enumerate(names)},
                "mean_share": {n: float(mean_share[i]) for i, n in enumerate(names)},
                "max_tokens": {n: int(counts[:, i].max()) if len(counts) else 0 for i, n in enumerate(names)},
                "moved_to": {n: int(self.moved[:, i].sum()) for i, n in enumerate(names)}}


class TieredCache(Cache):
    """A transformers Cache that applies the tiering policy online from the model's real attention."""

    def __init__(self, config: PolicyConfig, num_layers: int):
        if not isinstance(config, PolicyConfig):
            raise TiersimError(f"TieredCache needs a PolicyConfig, got {type(config).__name__}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise TiersimError(f"num_layers must be an integer >= 1, got {num_layers!r}")
        self.config = config
        self.index = _EMPTY_INDEX
        self.policy: TieringPolicy | None = None
        self.stats = TierStats()
        super().__init__(layers=[TieredLayer(self) for _ in range(num_layers)])

    @classmethod
    def for_model(cls, model: Any, config: PolicyConfig) -> TieredCache:
        """A cache with one layer per decoder layer of `model` (eager attention required for the policy)."""
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in (None, "eager"):
            raise TiersimError(f"TieredCache needs attention weights: load the model with attn_implementation='eager'"
                               f" (it uses {impl!r})")
        return cls(config, int(cfg.num_hidden_layers))

    def _pending(self, attentions: Sequence[torch.Tensor] | None) -> int:
        pending = {layer.pending for layer in self.layers}
        if len(pending) != 1 or 0 in pending:
            raise TiersimError("TieredCache: every layer must have run exactly one forward since the last commit")
        if not attentions or len(attentions) != len(self.layers) or attentions[0] is None:
            raise TiersimError("TieredCache needs the attention weights of every layer: run the model with"
                               " output_attentions=True and eager attention")
        expected = len(self.index.kept) + pending.copy().pop()
        for a in attentions:
            if a.shape[0] != 1 or a.shape[-1] != expected:
                raise TiersimError(f"attention weights of shape {tuple(a.shape)} do not cover the {expected} kept positions")
        return pending.pop()

    def start(self, attentions: Sequence[torch.Tensor]) -> None:
        """Commit the prompt (all in T0) and seed the policy's scores from the prefill attention."""
        if self.policy is not None:
            raise TiersimError("TieredCache.start() was already called; use observe() after decode steps")
        prompt = self._pending(attentions)
        self.policy = TieringPolicy(self.config, prefill_scores(attentions))
        for layer in self.layers:
            layer.commit()
        self.index = TierIndex.from_tiers(np.zeros(prompt, dtype=np.int8))

    def observe(self, attentions: Sequence[torch.Tensor]) -> TierChanges:
        """After a one-token decode forward: feed the policy the new query's attention and apply its tier changes."""
        if self.policy is None:
            raise TiersimError("TieredCache.observe() before start(): run the prompt and call start() first")
        if self._pending(attentions) != 1:
            raise TiersimError("TieredCache.observe() handles one decode token per forward")
        old = self.index
        increments = np.zeros(old.seen + 1, dtype=np.float32)
        increments[np.append(old.kept, old.seen)] = decode_row(attentions)
        changes = self.policy.step(increments)
        for layer in self.layers:
            layer.commit()
        grown = TierIndex.from_tiers(np.append(old.tiers, np.int8(HBM)))
        self.index = grown
        if len(changes):
            new = TierIndex.from_tiers(self.policy.tiers)
            for layer in self.layers:
                layer.retier(new)
            self.index = new
            np.add.at(self.stats.moved, (changes.from_tier, changes.to_tier), 1)
        self.stats.retiers += int(changes.retiered)
        self.stats.steps.append(self.measured_counts())
        return changes

    def measured_counts(self) -> np.ndarray:
        """(4,) positions in T0, T1, T2 (from the stores, checked equal in every layer) and T3 (seen − stored)."""
        stored = {tuple(layer.stored()) for layer in self.layers}
        if len(stored) != 1:
            raise TiersimError(f"TieredCache layers disagree on their tier sizes: {sorted(stored)}")
        held = np.array(stored.pop(), dtype=np.int64)
        return np.append(held, self.get_seq_length() - held.sum())

    def nbytes(self) -> dict[str, int]:
        """Bytes of KV per tier over all layers (hbm and compressed on the device, ddr in host memory)."""
        total = {"hbm": 0, "ddr": 0, "compressed": 0}
        for layer in self.layers:
            for k, v in layer.nbytes().items():
                total[k] += v
        return total


# ---------------------------------------------------------------- a decode loop that drives it


@dataclass(frozen=True, slots=True)
class Decoded:
    """Generated (or forced) token ids and whether generation ended on EOS."""

    tokens: list[int]
    eos: bool


def _forward_keywords(model: Any) -> tuple[str, str | None]:
    """Keyword of the KV cache (renamed in transformers 5.x) and of logits_to_keep, if the model has one."""
    params = inspect.signature(model.forward).parameters
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return ("cache" if "cache" in params else "past_key_values"), keep


def decode(model: Any, prompt_ids: Sequence[int], cache: Cache | None, max_new_tokens: int, *,
           eos_token_ids: Sequence[int] = (), forced: Sequence[int] | None = None,
           on_logits: Callable[[int, torch.Tensor], None] | None = None) -> Decoded:
    """Greedy decoding of one prompt with `cache` (a TieredCache, or None for transformers' default cache).

    `on_logits(i, logits)` sees the float32 logits that choose generated token i. With `forced`, token i
    is forced[i] instead of the argmax (teacher forcing), for len(forced) tokens.
    """
    if max_new_tokens < 1:
        raise TiersimError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tiered = isinstance(cache, TieredCache)
    name, keep = _forward_keywords(model)
    kw = {"use_cache": True, "output_attentions": tiered, **({keep: 1} if keep else {})}
    dev = next(model.parameters()).device
    steps = max_new_tokens if forced is None else min(max_new_tokens, len(forced))
    eos = set(int(e) for e in eos_token_ids)
    tokens: list[int] = []
    with torch.inference_mode():
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=dev)
        out = model(input_ids=ids, **kw, **({name: cache} if cache is not None else {}))
        if tiered:
            cache.start(out.attentions)
        else:
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        for i in range(steps):
            logits = out.logits[0, -1].float()
            if on_logits is not None:
                on_logits(i, logits)
            token = int(forced[i]) if forced is not None else int(logits.argmax())
            tokens.append(token)
            if (forced is None and token in eos) or i == steps - 1:
                break
            out = model(input_ids=torch.tensor([[token]], device=dev), **kw, **{name: cache})
            if tiered:
                cache.observe(out.attentions)
    return Decoded(tokens, bool(tokens) and tokens[-1] in eos)
