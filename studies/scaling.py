"""The paper's scaling analysis, done right: KV size from the real KV-head count, at serving batch sizes.

For every model, GPU, batch and context (generated tokens per sequence) one row: capacity at the
end of the chain, when every sequence holds `context` tokens (the paper's framing: KV GB, weights
GB, whether the full cache fits, the HBM tiering saves and the DDR-tier bytes a prefetch strategy
streams per decode step), and the overhead of each strategy against `full`, simulated in steady
continuous batching (warm start: slots at random points of their chains, so the mean context is
about half of `context`; `steps` decode steps of the batch).

The tier shares at the end of the chain come from the policy's schedules (the workload tables of
the simulation), never from a re-implementation of the policy. The paper's formula (attention heads
instead of KV heads) is printed beside tiersim's numbers. Weights at other precisions (int4) are
simulated at that precision (`SimConfig.weight_bits`: fewer weight bytes in HBM and in every
memory-bound matmul); the KV cache keeps the model's dtype (column `overhead_weights_dtype`);
`native` is the checkpoint's own format (fp8 for DeepSeek-R1, mxfp4 experts for gpt-oss). fp8 weights
multiply W8A8 at the GPU's fp8 rate where its profile has one; int4 and mxfp4 are weight-only (bf16 rate).

Every size is per GPU of a tensor-parallel replica (`tps`: 1, 2, 4, 8): KV heads split across the
GPUs (replicated when fewer KV heads than GPUs), an MLA latent on every GPU, weights split as
specs/deployment.py says; sliding-window layers hold their window and are never tiered, so only
full-attention layers' KV is saved or crosses each GPU's own link. The paper's formula, beside it,
counts attention heads for every layer and splits them over the same GPUs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tiersim.errors import ConfigError, TiersimError
from tiersim.policy import PolicyConfig
from tiersim.sim.config import DEFAULT_RESERVE_FRAC, SimConfig, compressed_factor
from tiersim.sim.costs import GB
from tiersim.sim.run import simulate
from tiersim.sim.shard import GPUShare, gpu_share
from tiersim.specs import HardwareSpec, ModelSpec, model_spec
from tiersim.strategy import STRATEGIES
from tiersim.workload.build import COL, Workload

SCALING_STRATEGIES = tuple(s.name for s in STRATEGIES.values() if s.applies_policy)  # each against `full`
WEIGHT_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4, "native": None}
DEFAULT_MODELS = ("r1-qwen-7b", "r1-qwen-14b", "r1-llama-70b")
DEFAULT_BATCHES = (1, 8, 32, 64, 128, 256)
DEFAULT_CONTEXTS = (2048, 4096, 16384)
# The paper's own scaling scenarios: its 7B prototype model and a 70B, batch 1 and 8, 2K and 4K tokens.
PAPER_MODELS = ("r1-qwen-7b", "r1-llama-70b")
PAPER_BATCHES = (1, 8)
PAPER_CONTEXTS = (2048, 4096)
PAPER_WEIGHTS = ("fp16", "int4")


def native_dtype(model: ModelSpec) -> str:
    """Label of the model's own weight precision (16-bit: fp16 or bf16, the same bytes)."""
    return {2: "fp16", 4: "fp32", 1: "int8"}.get(model.dtype_bytes, f"{8 * model.dtype_bytes}-bit")


def _check_ints(name: str, values: tuple, low: int) -> None:
    if not values:
        raise TiersimError(f"{name} is empty; accepted: one or more integers >= {low}")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < low]
    if bad:
        raise TiersimError(f"{name}: {bad[0]!r} is not an integer >= {low}")
    if len(set(values)) != len(values):
        raise TiersimError(f"{name}: {values!r} repeats a value; accepted: distinct values")


@dataclass(frozen=True, slots=True)
class ScalingConfig:
    """The scenarios of a scaling run and how each is simulated."""

    models: tuple[ModelSpec, ...]
    hardware: tuple[HardwareSpec, ...]
    batches: tuple[int, ...] = DEFAULT_BATCHES
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    weights: tuple[str, ...] = ("fp16",)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    strategies: tuple[str, ...] = SCALING_STRATEGIES
    paper: bool = True  # add the paper's scenarios (7B and 70B, batch 1 and 8, 2K and 4K, fp16 and int4)
    steps: int = 128  # decode steps of the batch per simulation
    trace: Path | None = None
    depth: int = 2
    pinned: bool = True
    seed: int = 0
    reserve_frac: float = DEFAULT_RESERVE_FRAC
    tps: tuple[int, ...] = (1,)  # tensor-parallel sizes; every row is one GPU of a replica

    def __post_init__(self) -> None:
        for name in ("models", "hardware"):
            if not getattr(self, name):
                raise TiersimError(f"{name} is empty; accepted: one or more names or files")
        _check_ints("batches", self.batches, 1)
        _check_ints("contexts", self.contexts, 2)
        _check_ints("steps", (self.steps,), 1)
        _check_ints("tps", self.tps, 1)
        for tp in self.tps:
            for m in self.models:
                try:
                    gpu_share(m, tp)
                except ConfigError as e:
                    raise TiersimError(f"tps: {e}") from None
            if tp > 1 and any(h.nvlink_gbps is None or h.nvlink_latency_us is None for h in self.hardware):
                raise TiersimError(f"tps: tp {tp} needs NVLink and a hardware profile has no nvlink_gbps / "
                                   "nvlink_latency_us; accepted: tps 1 for such hardware")
        if not self.weights or any(w not in WEIGHT_BITS for w in self.weights):
            raise TiersimError(f"weights {list(self.weights)!r} invalid; accepted: one or more of {', '.join(WEIGHT_BITS)}")
        if not self.strategies or any(s not in SCALING_STRATEGIES for s in self.strategies):
            raise TiersimError(f"strategies {list(self.strategies)!r} invalid; accepted: one or more of "
                               f"{', '.join(SCALING_STRATEGIES)}")
        if len(set(self.strategies)) != len(self.strategies) or len(set(self.weights)) != len(self.weights):
            raise TiersimError("strategies and weights must not repeat a value")


@dataclass(frozen=True, slots=True)
class Scenario:
    """One row of the analysis."""

    model: ModelSpec
    hardware: HardwareSpec
    batch: int
    context: int
    weights_dtype: str
    paper: bool = False
    tp: int = 1

    @property
    def weight_bits(self) -> int | None:
        """Bits per stored weight for the simulator; None at the checkpoint's own format."""
        bits = WEIGHT_BITS[self.weights_dtype]
        native = bits is None or (bits == 8 * self.model.dtype_bytes and self.model.quantization is None)
        return None if native else bits

    @property
    def weights_label(self) -> str:
        """The weights precision as simulated: the asked dtype, or (native) the checkpoint's format."""
        if WEIGHT_BITS[self.weights_dtype] is not None:
            return self.weights_dtype
        return self.model.quantization or native_dtype(self.model)

    @property
    def share(self) -> GPUShare:
        """One GPU's share of the model at this tp and weight precision."""
        return gpu_share(self.model, self.tp, weight_bits=self.weight_bits)

    @property
    def point(self) -> tuple[str, str, int, int, int | None, int]:
        """What the simulation depends on."""
        return self.model.name, self.hardware.name, self.batch, self.context, self.weight_bits, self.tp


def scenarios(cfg: ScalingConfig) -> list[Scenario]:
    """The grid (models x hardware x tps x contexts x batches x weights) plus the paper's scenarios (tp 1), each once."""
    rows: dict[tuple, Scenario] = {}
    for m in cfg.models:
        for h in cfg.hardware:
            for tp in cfg.tps:
                for ctx in cfg.contexts:
                    for b in cfg.batches:
                        for w in cfg.weights:
                            rows[(m.name, h.name, tp, ctx, b, w)] = Scenario(m, h, b, ctx, w, tp=tp)
    if cfg.paper:
        for m in (model_spec(n) for n in PAPER_MODELS):
            for h in cfg.hardware:
                for ctx in PAPER_CONTEXTS:
                    for b in PAPER_BATCHES:
                        for w in PAPER_WEIGHTS:
                            rows[(m.name, h.name, 1, ctx, b, w)] = Scenario(m, h, b, ctx, w, paper=True)
    return [rows[k] for k in sorted(rows, key=lambda k: (*k[:5], -(WEIGHT_BITS[k[5]] or 0)))]


@dataclass(frozen=True, slots=True)
class TierShares:
    """Shares of a sequence's cached tokens per tier at the end of its chain (mean over trace requests)."""

    hbm: float
    ddr: float
    compressed: float
    evicted: float

    @classmethod
    def at_end(cls, w: Workload) -> TierShares:
        """From the workload's per-request tables: the last row, when every token of the chain is cached."""
        last = w.tables[:, -1, :]
        tokens = last[:, COL["tokens"]]
        return cls(*(float(np.mean(last[:, COL[t]] / tokens)) for t in ("hbm", "ddr", "compressed", "evicted")))


def capacity_row(s: Scenario, shares: TierShares, policy: PolicyConfig, reserve_frac: float) -> dict:
    """The analytic columns of one scenario on one GPU: every sequence at `context` tokens (GB = 1e9 bytes)."""
    m, h, g = s.model, s.hardware, s.share
    tokens = s.batch * s.context
    # Full-attention layers hold every token and are tiered; sliding ones hold their window, always in HBM.
    kv_global_gb = tokens * g.kv_bytes_per_token_global / GB
    kv_gb = kv_global_gb + s.batch * min(s.context, g.sliding_window or 0) * g.kv_bytes_per_token_sliding / GB
    kv_paper_gb = tokens * m.kv_bytes_per_token_paper / s.tp / GB
    weights_gb = g.weight_bytes / GB
    reserve_gb = reserve_frac * h.hbm_gb
    off_hbm = shares.ddr + shares.evicted + (1.0 - compressed_factor(policy, m, g.kv_element_bytes)) * shares.compressed
    need_full = weights_gb + reserve_gb + kv_gb
    saved_gb = kv_global_gb * off_hbm
    ddr_gb = kv_global_gb * shares.ddr
    return {
        "model": m.name, "hardware": h.name, "tp": s.tp, "batch": s.batch, "context": s.context,
        "weights_dtype": s.weights_label,
        "paper_scenario": s.paper,
        "kv_heads": m.kv_heads, "attention_heads": m.attention_heads, "kv_heads_per_gpu": 0 if m.mla else
        max(1, m.kv_heads // s.tp), "kv_bytes_per_token_gpu": g.kv_bytes_per_token_global,
        "kv_gb": kv_gb, "kv_gb_paper_formula": kv_paper_gb, "weights_gb": weights_gb,
        "hbm_gb": h.hbm_gb, "reserve_gb": reserve_gb, "kv_share_hbm": kv_gb / h.hbm_gb,
        "hbm_need_full_gb": need_full, "fits_full": need_full <= h.hbm_gb,
        "fits_full_paper_formula": weights_gb + reserve_gb + kv_paper_gb <= h.hbm_gb,
        "kv_off_hbm_share": off_hbm, "ddr_share": shares.ddr, "evicted_share": shares.evicted,
        "hbm_saved_gb": saved_gb, "hbm_saved_gb_paper_formula": kv_paper_gb * off_hbm,
        "hbm_need_tiered_gb": need_full - saved_gb, "fits_tiered": need_full - saved_gb <= h.hbm_gb,
        "ddr_gb_per_step": ddr_gb, "ddr_link_ms_per_step": 1e3 * ddr_gb / h.h2d_gbps_pinned,
    }


def simulate_point(cfg: ScalingConfig, s: Scenario) -> tuple[TierShares, dict]:
    """Simulate every strategy at one (model, hardware, batch, context); the tier shares and the overhead columns."""
    base = SimConfig(model=s.model, hardware=s.hardware, policy=cfg.policy, trace=cfg.trace, batch=s.batch,
                     gen_tokens=s.context, steps=cfg.steps, depth=cfg.depth, pinned=cfg.pinned, seed=cfg.seed,
                     reserve_frac=cfg.reserve_frac, weight_bits=s.weight_bits, tp=s.tp)
    cols, extra, shares = {}, {}, None
    for strategy in cfg.strategies:
        result = simulate(dataclasses.replace(base, strategy=strategy))
        summary = result.summary
        shares = shares or TierShares.at_end(result.workload)
        cols[f"overhead_pct_{strategy}"] = summary["overhead_pct"]
        extra[f"hbm_saved_gb_sim_{strategy}"] = summary["hbm_saved_gb"]  # steady state, staging buffers included
    weights = s.weights_label if s.weight_bits else (s.model.quantization or native_dtype(s.model))
    extra |= {"step_ms_full": summary["step_ms_full_mean"], "overhead_weights_dtype": weights,
              "allreduce_ms_per_step": summary["allreduce_ms_per_step"],  # TP's NVLink all-reduces, inside the step
              "sim_steps": cfg.steps, "sim_gen_tokens": s.context}
    return shares, cols | extra


def scaling_rows(cfg: ScalingConfig, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Every scenario's row; scenarios that differ only in weights precision share one simulation."""
    todo = scenarios(cfg)
    points = list(dict.fromkeys(s.point for s in todo))
    done: dict[tuple, tuple[TierShares, dict]] = {}
    rows = []
    for s in todo:
        if s.point not in done:
            done[s.point] = simulate_point(cfg, s)
            if progress:
                progress(len(done), len(points))
        shares, cols = done[s.point]
        rows.append({**capacity_row(s, shares, cfg.policy, cfg.reserve_frac), **cols,
                     "hbm_ratio": cfg.policy.hbm_ratio, "evict_ratio": cfg.policy.evict_ratio})
    return rows
