"""The inputs every run shares — simulated (sim.SimConfig), replayed (hw.replay.ReplayConfig) or both
(validate.ValidateConfig) extend this one record instead of copying its fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from tiersim import check
from tiersim.policy import PolicyConfig
from tiersim.specs import ModelSpec, model_spec
from tiersim.strategy import STRATEGY_NAMES, Strategy, get_strategy


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """Model, policy, strategy and the batch of one run; names are resolved to specs and every field checked here."""

    ACCEPTED_STRATEGIES: ClassVar[tuple[str, ...]] = STRATEGY_NAMES

    model: ModelSpec
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    trace: Path | None = None  # None: the embedded default trace
    strategy: str = "prefetch-layer"
    depth: int = 2  # layers the copy stream runs ahead (prefetch-layer)
    batch: int = 256
    gen_tokens: int = 4096
    steps: int | None = None  # decode steps of the batch; None: gen_tokens
    cold_start: bool = False
    pinned: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.model, str | Path):
            object.__setattr__(self, "model", model_spec(self.model))
        if not isinstance(self.model, ModelSpec):
            raise check.ConfigError("model", f"model must be a model name, a config.json path or a ModelSpec, got "
                                             f"{type(self.model).__name__}")
        if not isinstance(self.policy, PolicyConfig):
            raise check.ConfigError("policy", f"policy must be a PolicyConfig, got {type(self.policy).__name__}")
        if isinstance(self.strategy, Strategy):
            object.__setattr__(self, "strategy", self.strategy.name)
        get_strategy(self.strategy, accepted=self.ACCEPTED_STRATEGIES)
        if self.trace is not None:
            object.__setattr__(self, "trace", Path(self.trace))
        check.integer("depth", self.depth, 1)
        check.integer("batch", self.batch, 1)
        check.integer("gen_tokens", self.gen_tokens, 2)
        check.integer("steps", self.steps, 1, optional=True)
        check.integer("seed", self.seed, 0)

    @property
    def strategy_record(self) -> Strategy:
        """What the strategy implies (tiered? prefetches? staging buffers?)."""
        return get_strategy(self.strategy)

    @property
    def decode_steps(self) -> int:
        """Decode steps of the batch that the run covers."""
        return self.gen_tokens if self.steps is None else self.steps
