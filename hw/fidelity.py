"""tiersim fidelity: the paper's β × r grid reproduced on a real model with the live TieredCache.

For every prompt the model first decodes greedily with transformers' default cache (the reference,
"full"). Then, for every cell (β, r) of the grid, it decodes greedily with a TieredCache and is
compared with the reference:

- `token_agreement`: share of the reference's generated tokens matched position by position
  (a shorter or longer output counts the missing or extra positions as mismatches; the
  denominator is the longer of the two); `prefix_agreement`: share of the reference's tokens
  before the first divergence.
- `kl_mean`: mean over the reference's generated tokens of KL(p_full ‖ p_cell) in nats, the
  next-token distributions compared *teacher-forced* on the reference's tokens (same context on
  both sides). Up to the first divergence the free-running decode already has that context, so a
  second, teacher-forced decode runs only for cells that diverge.
- `accuracy`: share of prompts with an answer whose output's final number (after the last
  "answer is", else the last number; traces.capture_prompts.extract_answer) equals it.
- `bit_identical_to_full`: every logit of every step equal (torch.equal) to the reference's.
- `hbm_share`, `ddr_share`, `compressed_share`, `evicted_share`: measured from the cache's stores
  at the end of each generation, as shares of all positions (prompt included), averaged over prompts.
- `identical_across_hbm_ratios` (top level): per r, whether every β gave bit-identical logits
  (SHA-256 of every step's logits) for every prompt.

Prompts run one by one (the cache holds one request), on the CPU unless told otherwise.
torch, transformers and the model load only when a grid runs (importing this module is cheap).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tiersim.errors import TiersimError
from tiersim.policy import PolicyConfig

if TYPE_CHECKING:  # torch and transformers load only when a grid runs: the CLI imports this module for its defaults
    import torch

    from tiersim.traces.capture_prompts import Prompt
    from tiersim.traces.hf import LoadedModel

SYSTEM = "Solve the math problem step by step. End with: The answer is N."
KL_MODE = "teacher-forced on the full-cache tokens"
QUANTISER = ("symmetric per token and KV head: scale = absmax over head_dim / (2^(b-1) - 1) stored as float16, "
             "codes round(x / scale) clamped to ±(2^(b-1) - 1); int8 for 8 bits, offset-binary packed 8/b per byte "
             "for 4 and 2 bits; T2 stays on the device")
# Short generations need a short window and interval, or nothing would ever leave HBM (see README).
FIDELITY_POLICY = PolicyConfig(sinks=4, window=16, interval=16)


def default_prompts_path() -> Path:
    """The project's grade-school math prompts (package data)."""
    import importlib.resources

    return Path(str(importlib.resources.files("tiersim.traces") / "prompts" / "gsm16.jsonl"))


def parse_ratios(text: str | Sequence[float], option: str) -> tuple[float, ...]:
    """'0.3,0.5,0.7' (or a sequence) → distinct ratios in [0, 1], in the given order."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    values = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise TiersimError(f"{option}: {item!r} is not a number; give comma-separated ratios in [0, 1],"
                               " e.g. 0.3,0.5,0.7") from None
        if not 0.0 <= value <= 1.0 or math.isnan(value):
            raise TiersimError(f"{option}: {value:g} is outside [0, 1]")
        values.append(value)
    if not values:
        raise TiersimError(f"{option}: no ratios given; e.g. 0.3,0.5,0.7")
    if len(set(values)) != len(values):
        raise TiersimError(f"{option}: {', '.join(f'{v:g}' for v in values)} repeats a ratio")
    return tuple(values)


@dataclass(frozen=True, slots=True)
class FidelityConfig:
    """The grid and the generation settings; the policy's other knobs come from `policy`."""

    hbm_ratios: tuple[float, ...] = (0.3, 0.5, 0.7)
    evict_ratios: tuple[float, ...] = (0.0, 0.03, 0.1)
    policy: PolicyConfig = FIDELITY_POLICY  # hbm_ratio and evict_ratio are set per cell
    max_new_tokens: int = 96
    num_prompts: int | None = 4  # the first N prompts of the file; None: all
    system: str | None = SYSTEM
    chat_template: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "hbm_ratios", parse_ratios(self.hbm_ratios, "--hbm-ratios"))
        object.__setattr__(self, "evict_ratios", parse_ratios(self.evict_ratios, "--evict-ratios"))
        if not isinstance(self.policy, PolicyConfig):
            raise TiersimError(f"policy must be a PolicyConfig, got {type(self.policy).__name__}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 2:
            raise TiersimError(f"--max-new-tokens must be an integer >= 2, got {self.max_new_tokens!r}")
        n = self.num_prompts
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise TiersimError(f"--num-prompts must be an integer >= 1, got {n!r}")

    def cell_policy(self, hbm_ratio: float, evict_ratio: float) -> PolicyConfig:
        """The policy of one cell."""
        return replace(self.policy, hbm_ratio=hbm_ratio, evict_ratio=evict_ratio)

    def to_dict(self) -> dict:
        """Plain dict (the policy without the per-cell ratios)."""
        policy = {k: v for k, v in self.policy.to_dict().items() if k not in ("hbm_ratio", "evict_ratio")}
        return {"hbm_ratios": list(self.hbm_ratios), "evict_ratios": list(self.evict_ratios), "policy": policy,
                "max_new_tokens": self.max_new_tokens, "num_prompts": self.num_prompts, "system": self.system,
                "chat_template": self.chat_template}


# ---------------------------------------------------------------- one decode, recorded


@dataclass(slots=True)
class _Run:
    """What one decode recorded: tokens, a digest of every step's logits, optional comparison with the reference."""

    tokens: list[int] = field(default_factory=list)
    digest: Any = field(default_factory=hashlib.sha256)
    identical: bool = True  # every step's logits equal to the reference's (checked while running)
    kl: list[float] = field(default_factory=list)  # KL per step while the context matches the reference
    wall_s: float = 0.0
    stats: dict | None = None


def _kl(ref_logprobs: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(p_ref ‖ p) in nats from reference log-probabilities and logits (float64)."""
    logq = logits.double().log_softmax(-1)
    return float((ref_logprobs.exp() * (ref_logprobs - logq)).sum())


class _Recorder:
    """`on_logits` for decode: digests every step's logits and compares them with the reference's.

    KL is recorded for the steps whose context equals the reference's: in a free-running decode while
    every token chosen so far (the argmax, as decode picks it) matched; in a forced one from `kl_from` on.
    """

    def __init__(self, run: _Run, ref: _Reference, free: bool, kl_from: int = 0):
        self.run, self.ref, self.free, self.kl_from = run, ref, free, kl_from
        self.on_track = True

    def __call__(self, i: int, logits: torch.Tensor) -> None:
        run, ref = self.run, self.ref
        run.digest.update(logits.cpu().numpy().tobytes())
        inside = i < len(ref.logits)
        if not inside or not logits.equal(ref.logits[i]):
            run.identical = False
        if inside and (self.on_track if self.free else i >= self.kl_from):
            run.kl.append(_kl(ref.logprobs[i], logits))
        if self.free and (not inside or int(logits.argmax()) != ref.tokens[i]):
            self.on_track = False


@dataclass(frozen=True, slots=True)
class _Reference:
    """The full-cache decode of one prompt: tokens, logits and log-probabilities of every step."""

    tokens: list[int]
    logits: list[torch.Tensor]
    logprobs: list[torch.Tensor]
    wall_s: float


def _reference(model: Any, ids: list[int], max_new: int, eos: list[int]) -> _Reference:
    from tiersim.hw.tiered_cache import decode

    logits: list[torch.Tensor] = []
    t0 = time.perf_counter()
    out = decode(model, ids, None, max_new, eos_token_ids=eos, on_logits=lambda i, x: logits.append(x.clone()))
    wall = time.perf_counter() - t0
    return _Reference(out.tokens, logits, [x.double().log_softmax(-1) for x in logits], wall)


def _first_divergence(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _run_cell(model: Any, ids: list[int], ref: _Reference, policy: PolicyConfig, max_new: int,
              eos: list[int]) -> tuple[_Run, float, int]:
    """Free-running decode of one cell (+ teacher-forced where it diverged); (run, mean KL, first divergence)."""
    from tiersim.hw.tiered_cache import TieredCache, decode

    run = _Run()
    t0 = time.perf_counter()
    cache = TieredCache.for_model(model, policy)
    out = decode(model, ids, cache, max_new, eos_token_ids=eos, on_logits=_Recorder(run, ref, free=True))
    run.tokens = out.tokens
    run.stats = cache.stats.to_dict()
    run.identical = run.identical and len(out.tokens) == len(ref.tokens)
    d = _first_divergence(out.tokens, ref.tokens)
    kl = list(run.kl)  # steps 0..d: the logits of token i see tokens < i, all equal to the reference's
    if len(kl) < len(ref.tokens):
        forced = _Run()
        cache = TieredCache.for_model(model, policy)
        decode(model, ids, cache, max_new, forced=ref.tokens, on_logits=_Recorder(forced, ref, free=False, kl_from=len(kl)))
        kl += forced.kl
    run.wall_s = time.perf_counter() - t0
    return run, float(np.mean(kl)), d


# ---------------------------------------------------------------- the grid


def _answer_ok(tokenizer: Any, tokens: list[int], prompt: Prompt) -> bool | None:
    from tiersim.traces.capture_prompts import answer_correct

    return answer_correct(tokenizer.decode(tokens, skip_special_tokens=True), prompt.answer)[1]


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _cell_summary(hbm_ratio: float, evict_ratio: float, per_prompt: list[dict]) -> dict:
    shares = {k: _mean([p["cache"]["final_share"][k] for p in per_prompt]) for k in ("hbm", "ddr", "compressed", "evicted")}
    return {
        "hbm_ratio": hbm_ratio, "evict_ratio": evict_ratio,
        "token_agreement": _mean([p["token_agreement"] for p in per_prompt]),
        "prefix_agreement": _mean([p["prefix_agreement"] for p in per_prompt]),
        "kl_mean": _mean([p["kl_mean"] for p in per_prompt]),
        "accuracy": _mean([p["correct"] for p in per_prompt]),
        "bit_identical_to_full": all(p["bit_identical_to_full"] for p in per_prompt),
        "hbm_share": shares["hbm"], "ddr_share": shares["ddr"], "compressed_share": shares["compressed"],
        "evicted_share": shares["evicted"],
        "ddr_tokens_max": max(p["cache"]["max_tokens"]["ddr"] for p in per_prompt),
        "evicted_tokens": sum(p["cache"]["final_tokens"]["evicted"] for p in per_prompt),
        "logits_sha256": hashlib.sha256("".join(p["logits_sha256"] for p in per_prompt).encode()).hexdigest(),
        "wall_s": sum(p["wall_s"] for p in per_prompt),
        "prompts": per_prompt,
    }


def _prompt_result(prompt: Prompt, run: _Run, ref: _Reference, kl: float, d: int, tokenizer: Any) -> dict:
    n_ref, n = len(ref.tokens), len(run.tokens)
    same = sum(a == b for a, b in zip(run.tokens, ref.tokens))
    return {"id": prompt.id, "generated_tokens": n, "first_divergence": d if d < max(n, n_ref) else None,
            "token_agreement": same / max(n, n_ref), "prefix_agreement": d / n_ref, "kl_mean": kl,
            "correct": _answer_ok(tokenizer, run.tokens, prompt), "bit_identical_to_full": run.identical,
            "logits_sha256": run.digest.hexdigest(), "cache": run.stats, "wall_s": run.wall_s}


def run_fidelity(loaded: LoadedModel, prompts: Sequence[Prompt], config: FidelityConfig,
                 progress: Callable[[str], None] | None = None) -> dict:
    """Decode every prompt with the full cache and with every grid cell's TieredCache; the report as a dict."""
    from tiersim.traces.capture_prompts import extract_answer
    from tiersim.traces.hf import encode_prompts, eos_ids, versions

    prompts = list(prompts)[: config.num_prompts]
    if not prompts:
        raise TiersimError("no prompts to run")
    if config.system is not None and not config.chat_template:
        raise TiersimError("--system needs the chat template (drop --no-chat-template)")
    encoded = encode_prompts(loaded.tokenizer, prompts, chat_template=config.chat_template, system=config.system)
    model, tok = loaded.model, loaded.tokenizer
    eos = eos_ids(model, tok)
    t_start = time.perf_counter()
    cells = {(b, r): [] for r in config.evict_ratios for b in config.hbm_ratios}
    full = []
    for k, (prompt, ids) in enumerate(zip(prompts, encoded)):
        ref = _reference(model, ids, config.max_new_tokens, eos)
        full.append({"id": prompt.id, "prompt_tokens": len(ids), "generated_tokens": len(ref.tokens),
                     "eos": bool(ref.tokens) and ref.tokens[-1] in eos, "correct": _answer_ok(tok, ref.tokens, prompt),
                     "model_answer": extract_answer(tok.decode(ref.tokens, skip_special_tokens=True)),
                     "answer": prompt.answer, "text": tok.decode(ref.tokens, skip_special_tokens=True),
                     "wall_s": ref.wall_s})
        for (b, r), results in cells.items():
            if progress:
                progress(f"prompt {k + 1}/{len(prompts)} ({prompt.id}), β={b:g} r={r:g}")
            run, kl, d = _run_cell(model, ids, ref, config.cell_policy(b, r), config.max_new_tokens, eos)
            results.append(_prompt_result(prompt, run, ref, kl, d, tok))
    summaries = [_cell_summary(b, r, results) for (b, r), results in cells.items()]
    across = {}
    for r in config.evict_ratios:
        row = [c for c in summaries if c["evict_ratio"] == r]
        across[f"{r:g}"] = all(
            len({c["prompts"][i]["logits_sha256"] for c in row}) == 1 for i in range(len(prompts)))
    return {
        "model": loaded.header(), "device": str(next(model.parameters()).device), "config": config.to_dict(),
        "prompts": [p.id for p in prompts], "kl_mode": KL_MODE, "quantiser": QUANTISER,
        "full": {"accuracy": _mean([f["correct"] for f in full]), "requests": full},
        "cells": summaries, "identical_across_hbm_ratios": across,
        "wall_s": time.perf_counter() - t_start, "versions": versions(),
    }


def fidelity(model: str | os.PathLike, config: FidelityConfig, prompts_path: str | os.PathLike | None = None, *,
             gguf_file: str | None = None, device: str = "cpu",
             progress: Callable[[str], None] | None = None) -> dict:
    """Resolve and load the model (local files only), read the prompts, run the grid; every input checked first."""
    from tiersim.traces.capture_prompts import read_prompts
    from tiersim.traces.hf import load_model, resolve_model

    prompts = read_prompts(prompts_path if prompts_path is not None else default_prompts_path())
    source = resolve_model(model, gguf_file)
    return run_fidelity(load_model(source, device), prompts, config, progress)


# ---------------------------------------------------------------- output


def grid(report: dict, key: str) -> np.ndarray:
    """(evict ratios, hbm ratios) array of one cell metric (NaN where missing)."""
    betas, rs = report["config"]["hbm_ratios"], report["config"]["evict_ratios"]
    out = np.full((len(rs), len(betas)), np.nan)
    for c in report["cells"]:
        value = c[key]
        out[rs.index(c["evict_ratio"]), betas.index(c["hbm_ratio"])] = np.nan if value is None else float(value)
    return out


def write_heatmap(report: dict, path: str | os.PathLike) -> Path:
    """PNG: token agreement, mean KL, accuracy and measured HBM share over the β × r grid, each cell annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tiersim.fileio import atomic_path

    betas, rs = report["config"]["hbm_ratios"], report["config"]["evict_ratios"]
    panels = [("token_agreement", "token agreement with full", "viridis", (0, 1)),
              ("kl_mean", f"mean KL(full ‖ tiered), nats\n({KL_MODE})", "magma_r", None),
              ("accuracy", "accuracy (final number = answer)", "viridis", (0, 1)),
              ("hbm_share", "HBM share of positions (measured)", "cividis", (0, 1))]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    for ax, (key, title, cmap, lim) in zip(axes, panels):
        values = grid(report, key)
        vmin, vmax = lim if lim else (0.0, max(1e-9, float(np.nanmax(values)) if np.isfinite(values).any() else 1.0))
        im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", aspect="auto")
        for i in range(len(rs)):
            for j in range(len(betas)):
                v = values[i, j]
                r, g, b, _ = im.cmap(im.norm(v)) if not np.isnan(v) else (1, 1, 1, 1)
                ink = "k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w"  # readable on the cell's colour
                ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.3g}", ha="center", va="center", color=ink, fontsize=9)
        ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
        ax.set_yticks(range(len(rs)), [f"{r:g}" for r in rs])
        ax.set_xlabel("β (HBM ratio)")
        ax.set_ylabel("r (evict ratio)")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    same = ", ".join(f"r={r}: {'yes' if v else 'NO'}" for r, v in report["identical_across_hbm_ratios"].items())
    fig.suptitle(f"{report['model']['id']}: {len(report['prompts'])} prompts × {report['config']['max_new_tokens']} "
                 f"tokens; bit-identical across β — {same}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path
