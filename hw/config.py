"""What a replay runs: `ReplayConfig` (the shared RunConfig plus the device side) and the model cut to N layers.

Every model family replays: dense, mixture-of-experts, multi-head latent attention, sliding-window layers
(hw/kernels.py, hw/plan.KVGeometry)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from tiersim import check
from tiersim.copy_methods import check_unit_nests
from tiersim.errors import ConfigError
from tiersim.hw.copies import check_block_size, check_copy_method
from tiersim.specs import ModelSpec
from tiersim.specs.families import SLIDING
from tiersim.strategy import STRATEGIES, Strategy, get_strategy
from tiersim.workload.config import RunConfig

REPLAY_STRATEGIES: tuple[str, ...] = tuple(name for name, s in STRATEGIES.items() if s.replayable)


def replayable(strategy: str | Strategy) -> Strategy:
    """The record of a strategy the replay implements; a strategy it only simulates is refused by name."""
    name = strategy.name if isinstance(strategy, Strategy) else strategy
    record = STRATEGIES.get(name) if isinstance(name, str) else None
    if record is not None and not record.replayable:
        why = "no host attention kernel in the replay" if record.host_attends else "the replay does not implement it"
        raise ConfigError("strategy", f"strategy {name!r} is simulated but not replayed ({why}); accepted: "
                                      f"{', '.join(REPLAY_STRATEGIES)}")
    return get_strategy(strategy, accepted=REPLAY_STRATEGIES)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayConfig(RunConfig):
    """What to replay and how: the shared run inputs (model already cut to the layers to run) and the device."""

    ACCEPTED_STRATEGIES: ClassVar[tuple[str, ...]] = REPLAY_STRATEGIES

    batch: int = 8
    gen_tokens: int = 512
    cold_start: bool = True
    device: str = "cpu"
    warmup_steps: int = 2
    chunk_tokens: int = 128  # tokens per T0 chunk (attention reads whole chunks, the last one partly masked)
    copy_method: str = "auto"  # how DDR-tier pieces reach the device (hw/copies.py); auto: see resolve_method
    block_size: int = 16  # tokens per KV block of the host pool: a piece is at most one block, K or V of a layer

    def __post_init__(self) -> None:
        replayable(self.strategy)  # before RunConfig's check, whose refusal would only say "unknown"
        RunConfig.__post_init__(self)  # explicit: zero-argument super() fails in a slots dataclass
        check.integer("warmup_steps", self.warmup_steps, 0)
        check.integer("chunk_tokens", self.chunk_tokens, 1)
        check_copy_method(self.copy_method, self.cuda)
        check_block_size(self.block_size, self.chunk_tokens)
        # The tiering unit as the simulator resolves it (an unset page_size: the block; the prototype: 1 token), so
        # both sides of a validation tier and copy the same pieces.
        policy = self.policy.for_block_size(self.block_size)
        check_unit_nests(self.block_size, policy.page_size)
        object.__setattr__(self, "policy", policy)
        if not self.pinned and self.copy_method != "auto":
            raise ConfigError("copy_method", f"copy_method {self.copy_method!r} needs pinned host memory; with "
                                             "--pageable the replay gathers into a new pageable tensor, then copies "
                                             "(the paper's prototype); accepted: --copy-method auto")
        if self.policy.compressed_ratio > 0:
            raise ConfigError("compressed_ratio", f"compressed_ratio {self.policy.compressed_ratio} > 0: the replay "
                                                  "has no compressed tier; accepted: --compressed-ratio 0")
        if self.strategy_record.fetches_per_layer and self.depth >= self.model.layers:
            raise ConfigError("depth", f"depth {self.depth} needs more than {self.model.layers} layers to run ahead "
                                       f"into; accepted: depth < layers (use --layers > {self.depth} or a smaller "
                                       "--depth)")

    @property
    def chunk(self) -> int:
        """Tokens per T0 chunk."""
        return self.chunk_tokens

    @property
    def cuda(self) -> bool:
        """The device is a CUDA GPU (else the host stands in for it)."""
        return self.device.startswith("cuda")

    @property
    def staging_buffers(self) -> int:
        """Staging buffers the strategy holds on the device."""
        return self.strategy_record.staging_buffers(self.depth, self.model.layers)


def reduced_model(model: ModelSpec, layers: int | None) -> ModelSpec:
    """The model cut to its first `layers` layers (the replay and the simulator both run those): the per-layer
    attention kinds and the dense-MLP layers of an MoE model cut with it (no sliding layer left: no window; only
    dense layers left: a dense model)."""
    if layers is None or layers == model.layers:
        return model
    if not isinstance(layers, int) or isinstance(layers, bool) or not 1 <= layers <= model.layers:
        raise ConfigError("layers", f"--layers {layers!r} out of range for {model.name} ({model.layers} layers); "
                                    f"accepted: 1..{model.layers}")
    kinds = None if model.layer_types is None else model.layer_types[:layers]
    window = model.sliding_window if kinds is not None and SLIDING in kinds else None
    moe = model.moe
    if moe is not None:
        dense = tuple(i for i in moe.dense_layers if i < layers)
        moe = None if len(dense) == layers else dataclasses.replace(moe, dense_layers=dense)
    return dataclasses.replace(model, name=f"{model.name}[{layers}/{model.layers} layers]", layers=layers,
                               layer_types=kinds if window is not None else None, sliding_window=window, moe=moe)
