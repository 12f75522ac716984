"""Figures of a trace request: the importance heatmap and the policy's tier timeline (matplotlib, Agg).

- Importance heatmap: decode step (x) against position (y), colour = mean attention weight of the
  cells in each bin on a log scale; long requests are binned to at most `max_bins` steps and
  positions, reading rows in blocks so no steps x positions matrix is ever built; cells a query
  cannot see (positions after it) are left blank.
- Tier timeline: tokens per tier (stacked) at every decode step, and the share of each step's
  attention mass that landed on each tier (stacked), from a TierSchedule.

One legend, outside the panels on the right; written as PNG, SVG or PDF (traces/figure_files.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from tiersim.errors import TiersimError  # noqa: E402
from tiersim.policy import TIER_NAMES, TierSchedule  # noqa: E402
from tiersim.traces.figure_files import check_formats, save_figure  # noqa: E402
from tiersim.traces.format import Request, row_offset  # noqa: E402

TIER_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#7f7f7f")
FLOOR = 1e-6  # smallest attention weight the colour scale shows; lower (and exact zeros) clip to it


def importance_grid(request: Request, max_bins: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid, step_edges, position_edges): mean attention per (position bin, step bin), NaN where no cell is causal."""
    p, s = request.prompt_tokens, request.steps
    if s == 0:
        raise TiersimError("plot: request has no decode steps")
    n = p + s
    step_edges = np.unique(np.linspace(0, s, min(s, max_bins) + 1).astype(np.int64))
    pos_edges = np.unique(np.linspace(0, n, min(n, max_bins) + 1).astype(np.int64))
    lo, size = pos_edges[:-1], np.diff(pos_edges)
    grid = np.full((lo.size, step_edges.size - 1), np.nan)
    for b, (t0, t1) in enumerate(zip(step_edges[:-1], step_edges[1:])):
        width = p + int(t1)
        flat = request.increments[row_offset(p, int(t0)): row_offset(p, int(t1))]
        mask = np.arange(width)[None, :] <= p + np.arange(t0, t1)[:, None]
        block = np.zeros((int(t1 - t0), width))
        block[mask] = flat
        sums = np.add.reduceat(block.sum(axis=0), lo[lo < width])
        lengths = p + np.arange(t0, t1) + 1  # row lengths
        counts = np.clip(lengths[:, None] - lo[None, :], 0, size[None, :]).sum(axis=0)
        seen = counts > 0
        grid[np.flatnonzero(seen), b] = sums[: seen.sum()] / counts[seen]
    return grid, step_edges, pos_edges


def request_figure(request: Request, schedule: TierSchedule | None, *, title: str = "", max_bins: int = 400):
    """The importance heatmap and, given a schedule, the tier timeline; one legend to the right of every panel."""
    grid, step_edges, pos_edges = importance_grid(request, max_bins)
    panels = 3 if schedule is not None else 1
    fig, axes = plt.subplots(panels, 1, figsize=(12, 4 + 3.5 * (panels - 1)), squeeze=False,
                             gridspec_kw={"height_ratios": [2.2] + [1] * (panels - 1)}, layout="constrained")
    ax = axes[0, 0]
    shown = np.ma.masked_invalid(np.maximum(grid, FLOOR))
    vmax = max(float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0, FLOOR * 10)
    # Rasterized: in SVG and PDF a 400 x 400 mesh would otherwise be 160,000 vector quads.
    mesh = ax.pcolormesh(step_edges, pos_edges, shown, norm=LogNorm(vmin=FLOOR, vmax=vmax), cmap="magma",
                         shading="flat", rasterized=True)
    prompt = ax.axhline(request.prompt_tokens, color="cyan", lw=0.8, ls="--",
                        label=f"end of prompt ({request.prompt_tokens} tokens)")
    ax.set_xlabel("decode step (query at position prompt + step)")
    ax.set_ylabel("key position (tokens)")
    ax.set_title(title or "importance heatmap")
    fig.colorbar(mesh, ax=ax, label="mean attention weight per bin (log scale)")
    handles = [prompt]
    if schedule is not None:
        handles += _tier_panels(axes[1, 0], axes[2, 0], schedule)
    # One figure legend outside the panels: the tier colours are the same in both tier panels.
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    return fig


def plot_request(request: Request, schedule: TierSchedule | None, path: str | os.PathLike, *, title: str = "",
                 max_bins: int = 400, dpi: int = 100, formats: tuple[str, ...] = ("png",)) -> list[Path]:
    """Write request_figure once per format (path's suffix replaced by each), atomically; returns the paths."""
    formats = check_formats(formats)
    fig = request_figure(request, schedule, title=title, max_bins=max_bins)
    return save_figure(fig, path, formats, dpi=dpi, tight=False)  # the figure's size exactly: 12 in x dpi wide


def _tier_panels(ax_tokens: plt.Axes, ax_mass: plt.Axes, schedule: TierSchedule) -> list:
    """Tokens per tier and attention mass share per tier, stacked; returns the tier handles for the legend."""
    steps = np.arange(schedule.steps)
    labels = list(TIER_NAMES)
    areas = ax_tokens.stackplot(steps, schedule.counts.T, labels=labels, colors=TIER_COLOURS, step="post")
    ax_tokens.set_xlabel("decode step")
    ax_tokens.set_ylabel("tokens (KV entries)")
    ax_tokens.set_title(f"tokens per tier (β={schedule.config.hbm_ratio:g}, r={schedule.config.evict_ratio:g},"
                        f" Δ={schedule.config.interval}, window={schedule.config.window})")
    ax_tokens.set_xlim(0, max(1, schedule.steps - 1))
    ax_tokens.set_ylim(bottom=0)
    totals = schedule.mass.sum(axis=1, keepdims=True)
    share = np.divide(schedule.mass, totals, out=np.zeros_like(schedule.mass), where=totals > 0)
    ax_mass.stackplot(steps, share.T, labels=labels, colors=TIER_COLOURS, step="post")
    ax_mass.set_xlabel("decode step")
    ax_mass.set_ylabel("share of the step's attention mass")
    ax_mass.set_ylim(0, 1)
    ax_mass.set_xlim(0, max(1, schedule.steps - 1))
    ax_mass.set_title("attention mass per tier")
    return list(areas)
