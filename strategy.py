"""The decode-time strategies and what each one implies, in one record.

Code asks the record (`STRATEGIES[name].keeps_ddr`), it does not compare names. The simulator
(sim/), the replay (hw/), the studies and the CLI all read the same table.
"""

from __future__ import annotations

from dataclasses import dataclass

from tiersim.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Strategy:
    """One way to run decode over a tiered KV cache."""

    name: str
    description: str
    applies_policy: bool  # the tiering policy runs (evicts, demotes); False only for `full`
    keeps_ddr: bool  # DDR-tier tokens are kept in host memory (demotions copied out); False: dropped
    fetch: str  # how DDR-tier KV is attended: "none", "per-layer" (ahead, on a copy stream), "all-layers" (before
    #             the forward pass), "host" (attention over it on the host, partials merged)
    replayable: bool  # hw/replay implements it

    @property
    def prefetches(self) -> bool:
        """DDR-tier KV is copied back to HBM staging buffers before attention."""
        return self.fetch in ("per-layer", "all-layers")

    @property
    def fetches_per_layer(self) -> bool:
        """Each layer's DDR-tier KV is copied `depth` layers ahead on a copy stream, overlapping compute."""
        return self.fetch == "per-layer"

    @property
    def fetches_before_forward(self) -> bool:
        """Every layer's DDR-tier KV is copied back, synchronously, before the forward pass."""
        return self.fetch == "all-layers"

    @property
    def host_attends(self) -> bool:
        """The host attends over the DDR tier; only queries and partial results cross the link."""
        return self.fetch == "host"

    @property
    def lossy(self) -> bool:
        """Attention to DDR-tier tokens is lost (they are never attended again)."""
        return self.applies_policy and not self.keeps_ddr

    def staging_buffers(self, depth: int, layers: int) -> int:
        """Per-layer staging buffers held in HBM: depth + 1 for per-layer prefetch, one per layer for sync."""
        if self.fetches_per_layer:
            return depth + 1
        if self.fetches_before_forward:
            return layers
        return 0


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("full", "every token stays in HBM at full precision (the baseline)", False, False, "none", True),
    Strategy("evict-only", "evicted and DDR-tier tokens are dropped; only the HBM tier is attended", True, False,
             "none", True),
    Strategy("prefetch-sync", "every layer's DDR-tier KV is copied back before the forward pass", True, True,
             "all-layers", True),
    Strategy("prefetch-layer", "each layer's DDR-tier KV is copied `depth` layers ahead on a copy stream", True, True,
             "per-layer", True),
    Strategy("cpu-attention", "the host attends over the DDR tier; partial results merged exactly (log-sum-exp)",
             True, True, "host", False),
)}

STRATEGY_NAMES: tuple[str, ...] = tuple(STRATEGIES)
BASELINE: Strategy = STRATEGIES["full"]  # what every tiered run is compared against


def get_strategy(name: str | Strategy, field: str = "strategy", accepted: tuple[str, ...] = STRATEGY_NAMES) -> Strategy:
    """The record of a strategy name (a record passes through); a ConfigError naming `field` otherwise."""
    if isinstance(name, Strategy):
        name = name.name
    if name not in accepted or name not in STRATEGIES:
        raise ConfigError(field, f"{field} {name!r} unknown; accepted: {', '.join(accepted)}")
    return STRATEGIES[name]
