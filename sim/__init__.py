"""The SimPy model of a tiered KV cache: costs of each piece of work, the engine's processes, and `simulate`."""

from tiersim.sim.config import SimConfig
from tiersim.sim.run import SimResult, simulate, simulate_workload

__all__ = ["SimConfig", "SimResult", "simulate", "simulate_workload"]
