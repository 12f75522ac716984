"""The SimPy model of a tiered KV cache: memories, links, compute, strategies, batching, metrics."""

from tiersim.sim.engine import STRATEGIES
from tiersim.sim.run import SimConfig, SimResult, simulate

__all__ = ["STRATEGIES", "SimConfig", "SimResult", "simulate"]
