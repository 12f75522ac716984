"""hw.TieredCache: the tiering policy live in a Hugging Face model's KV cache, with real data movement.

One request per cache (batch 1: each request has its own policy and so its own kept positions).
Per layer the cache keeps every position's tier from THE policy (`tiersim.policy.TieringPolicy`,
stepped on the head- and layer-averaged attention of each new query, reduced by the same
traces.hf functions capture records with) and stores

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

Two ways to feed it the attention. `TieredCache.for_model(model, policy)` puts a forward hook on
every attention module of the model (once per model; inert for any other cache): each layer hands
its weights to the cache it was called with, and after the last layer the cache commits the forward
pass (the prompt seeds the policy, a decode token steps it). Such a cache works in any loop:
`model.generate(ids, max_new_tokens=N, past_key_values=cache)` (eager attention, batch 1, EOS from
the generation config as usual) or `decode` below. A cache built directly,
`TieredCache(policy, num_layers)`, is driven by hand: run the prompt with `output_attentions=True`,
call `cache.start(out.attentions)`, then `cache.observe(out.attentions)` after every one-token forward.

One concept past ~400 lines: a transformers Cache subclass must implement the whole Cache protocol
(update, lengths, masks, hooks for generate()); its quantiser already lives in hw/tiered_cache_quant.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from tiersim.errors import TiersimError
from tiersim.hw.tiered_cache_quant import Quantized, cat_quantized, dequantize, quantize
from tiersim.policy import COMPRESSED, DDR, EVICTED, HBM, PolicyConfig, TierChanges, TieringPolicy
from tiersim.traces.hf import (
    attention_modules,
    cache_of,
    column_sums,
    decode_rows,
    forward_keywords,
    last_row,
    prefill_scores,
    text_config,
)

STORED_TIERS = (HBM, DDR, COMPRESSED)
_CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value")  # the attention modules' name for it, by version


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
            raise TiersimError(f"TieredCache holds one request (batch 1), got a batch of {key_states.shape[0]}:"
                               " run one prompt per cache (one generate or decode call per prompt)")
        if self.pending and self._cache.hooked:
            raise TiersimError("TieredCache: no attention weights reached it from the previous forward; use it with"
                               " the model it was made for (TieredCache.for_model(model, ...)), eager attention")
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
        merged = cat_quantized(parts) if len(parts) > 1 else parts[0]
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
        self.hooked = False  # True: the model's attention hooks commit every forward (for_model); False: start/observe
        self._recorded: list[torch.Tensor] = []  # this forward's per-layer reductions, in hooked mode
        super().__init__(layers=[TieredLayer(self) for _ in range(num_layers)])

    @classmethod
    def for_model(cls, model: Any, config: PolicyConfig) -> TieredCache:
        """A cache for `model` that observes its attention through hooks: use it in generate, decode or any loop."""
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in (None, "eager"):
            raise TiersimError(f"TieredCache needs attention weights: load the model with attn_implementation='eager'"
                               f" (it uses {impl!r})")
        cache = cls(config, int(text_config(model).num_hidden_layers))
        _install_hooks(model)
        cache.hooked = True
        return cache

    # -- hooked mode: one layer's weights at a time

    def record(self, layer: int, weights: torch.Tensor | None, mask: Any = None) -> None:
        """Take layer `layer`'s attention weights of the current forward; after the last layer, commit the forward."""
        if weights is None:
            raise TiersimError(f"TieredCache got no attention weights from layer {layer}: load the model with"
                               " attn_implementation='eager' (sdpa and flash attention do not return them)")
        if layer != len(self._recorded):
            raise TiersimError(f"TieredCache: attention of layer {layer} arrived where layer {len(self._recorded)}"
                               " was expected; one model forward at a time per cache")
        expected = len(self.index.kept) + self.layers[layer].pending
        if weights.shape[0] != 1 or weights.shape[-1] != expected:
            raise TiersimError(f"attention weights of shape {tuple(weights.shape)} do not cover the {expected} kept"
                               " positions of one request")
        if self.policy is None:
            if layer == 0:
                _check_unpadded(mask)
            self._recorded.append(column_sums(weights))
        else:
            self._recorded.append(last_row(weights))
        if len(self._recorded) < len(self.layers):
            return
        parts, self._recorded = self._recorded, []
        if self.policy is None:  # the same sum in layer order as traces.hf.prefill_scores
            acc = torch.zeros_like(parts[0])
            for p in parts:
                acc += p
            self._commit_prompt(self._pending(), (acc / len(parts))[0].cpu().numpy())
        else:
            self._commit_step(self._pending(), torch.stack(parts).mean(0)[0].cpu().numpy())

    # -- manual mode: the whole forward's weights

    def start(self, attentions: Sequence[torch.Tensor]) -> None:
        """Commit the prompt (all in T0) and seed the policy's scores from the prefill attention."""
        self._refuse_if_hooked("start")
        if self.policy is not None:
            raise TiersimError("TieredCache.start() was already called; use observe() after decode steps")
        self._check_attentions(attentions)
        self._commit_prompt(self._pending(), prefill_scores(attentions)[0].cpu().numpy())

    def observe(self, attentions: Sequence[torch.Tensor]) -> TierChanges:
        """After a one-token decode forward: feed the policy the new query's attention and apply its tier changes."""
        self._refuse_if_hooked("observe")
        if self.policy is None:
            raise TiersimError("TieredCache.observe() before start(): run the prompt and call start() first")
        self._check_attentions(attentions)
        return self._commit_step(self._pending(), decode_rows(attentions).mean(0)[0].cpu().numpy())

    def _refuse_if_hooked(self, name: str) -> None:
        if self.hooked:
            raise TiersimError(f"TieredCache.{name}(): this cache came from for_model and observes the model's"
                               " attention itself; call start()/observe() only on a TieredCache(config, num_layers)")

    def _pending(self) -> int:
        pending = {layer.pending for layer in self.layers}
        if len(pending) != 1 or 0 in pending:
            raise TiersimError("TieredCache: every layer must have run exactly one forward since the last commit")
        return pending.pop()

    def _check_attentions(self, attentions: Sequence[torch.Tensor] | None) -> None:
        if not attentions or len(attentions) != len(self.layers) or attentions[0] is None:
            raise TiersimError("TieredCache needs the attention weights of every layer: run the model with"
                               " output_attentions=True and eager attention")
        expected = len(self.index.kept) + self._pending()
        for a in attentions:
            if a.shape[0] != 1 or a.shape[-1] != expected:
                raise TiersimError(f"attention weights of shape {tuple(a.shape)} do not cover the {expected} kept positions")

    # -- committing a forward

    def _commit_prompt(self, prompt: int, scores: np.ndarray) -> None:
        self.policy = TieringPolicy(self.config, scores)
        for layer in self.layers:
            layer.commit()
        self.index = TierIndex.from_tiers(np.zeros(prompt, dtype=np.int8))

    def _commit_step(self, pending: int, row: np.ndarray) -> TierChanges:
        if pending != 1:
            raise TiersimError(f"TieredCache handles one decode token per forward, got {pending}")
        old = self.index
        increments = np.zeros(old.seen + 1, dtype=np.float32)
        increments[np.append(old.kept, old.seen)] = row
        changes = self.policy.step(increments)
        for layer in self.layers:
            layer.commit()
        self.index = TierIndex.from_tiers(np.append(old.tiers, np.int8(HBM)))
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


def _install_hooks(model: Any) -> None:
    """Once per model: every attention module hands its weights to the TieredCache it is called with."""
    if getattr(model, "_tiersim_attention_hooks", False):
        return
    for module in attention_modules(model):
        module.register_forward_hook(_record_attention, with_kwargs=True)
    model._tiersim_attention_hooks = True


def _record_attention(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
    cache = next((kwargs[k] for k in _CACHE_KEYWORDS if kwargs.get(k) is not None), None)
    if isinstance(cache, TieredCache) and cache.hooked:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        cache.record(module.layer_idx, weights, kwargs.get("attention_mask"))


def _check_unpadded(mask: Any) -> None:
    """The prompt's mask must be plain causal: the cache compacts positions, so a padding mask would misalign."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return
    allowed = mask[0, 0] if mask.dtype == torch.bool else mask[0, 0] == 0
    q, k = allowed.shape
    if not torch.equal(allowed, torch.ones(q, k, dtype=torch.bool, device=allowed.device).tril(k - q)):
        raise TiersimError("TieredCache holds one unpadded request, but the prompt's attention mask hides positions"
                           " (padding, or a pad token id inside the prompt); pass attention_mask=torch.ones_like(ids)")


# ---------------------------------------------------------------- a decode loop that drives it


@dataclass(frozen=True, slots=True)
class Decoded:
    """Generated (or forced) token ids and whether generation ended on EOS."""

    tokens: list[int]
    eos: bool


def decode(model: Any, prompt_ids: Sequence[int], cache: Cache | None, max_new_tokens: int, *,
           eos_token_ids: Sequence[int] = (), forced: Sequence[int] | None = None,
           on_logits: Callable[[int, torch.Tensor], None] | None = None) -> Decoded:
    """Greedy decoding of one prompt with `cache` (a TieredCache of either kind, or None for transformers' default).

    `on_logits(i, logits)` sees the float32 logits that choose generated token i. With `forced`, token i
    is forced[i] instead of the argmax (teacher forcing), for len(forced) tokens.
    """
    if max_new_tokens < 1:
        raise TiersimError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    manual = isinstance(cache, TieredCache) and not cache.hooked  # a hooked cache commits every forward itself
    name, keep = forward_keywords(model)
    kw = {"use_cache": True, "output_attentions": manual, **({keep: 1} if keep else {})}
    dev = next(model.parameters()).device
    steps = max_new_tokens if forced is None else min(max_new_tokens, len(forced))
    eos = set(int(e) for e in eos_token_ids)
    tokens: list[int] = []
    with torch.inference_mode():
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=dev)
        out = model(input_ids=ids, **kw, **({name: cache} if cache is not None else {}))
        if manual:
            cache.start(out.attentions)
        cache = cache_of(out) if cache is None else cache
        for i in range(steps):
            logits = out.logits[0, -1].float()
            if on_logits is not None:
                on_logits(i, logits)
            token = int(forced[i]) if forced is not None else int(logits.argmax())
            tokens.append(token)
            if (forced is None and token in eos) or i == steps - 1:
                break
            out = model(input_ids=torch.tensor([[token]], device=dev), **kw, **{name: cache})
            if manual:
                cache.observe(out.attentions)
    return Decoded(tokens, bool(tokens) and tokens[-1] in eos)
