"""What a replay runs: `ReplayConfig` (the shared RunConfig plus the device side) and the model cut to N layers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from tiersim import check
from tiersim.copy_methods import check_unit_nests
from tiersim.errors import ConfigError
from tiersim.hw.copies import check_block_size, check_copy_method
from tiersim.specs import ModelSpec
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
        check_replayable_model(self.model)
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


def check_replayable_model(model: ModelSpec) -> None:
    """Refuse, naming `model`, what the replay's kernels do not run: experts, MLA, sliding-window layers."""
    parts = [what for what, has in (("routed experts (MoE)", model.moe is not None),
                                    ("multi-head latent attention (MLA)", model.mla is not None),
                                    ("sliding-window layers", bool(model.sliding_layers))) if has]
    if parts:
        raise ConfigError("model", f"model {model.name} has {' and '.join(parts)}; the replay runs dense decoder "
                                   f"layers with full attention over per-head K and V only (hw/kernels.py); "
                                   f"accepted: a dense full-attention model (this one can be simulated: tiersim "
                                   f"simulate)")


def reduced_model(model: ModelSpec, layers: int | None) -> ModelSpec:
    """The model cut to its first `layers` layers (the replay and the simulator both run those)."""
    if layers is None or layers == model.layers:
        return model
    if not isinstance(layers, int) or isinstance(layers, bool) or not 1 <= layers <= model.layers:
        raise ConfigError("layers", f"--layers {layers!r} out of range for {model.name} ({model.layers} layers); "
                                    f"accepted: 1..{model.layers}")
    return dataclasses.replace(model, name=f"{model.name}[{layers}/{model.layers} layers]", layers=layers)
