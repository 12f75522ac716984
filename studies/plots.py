"""Plots of a simulation: memory against capacity, where step time goes, how busy the links are (PNG, SVG, PDF).

Each `*_figure` builds the figure from a SimResult; each `plot_*` writes it once per format and
returns the paths. Legends sit to the right of the data; magnitude axes start at zero.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tiersim.sim.costs import GB  # noqa: E402
from tiersim.traces.figure_files import check_formats, save_figure  # noqa: E402

DPI = 120


def _title(summary: dict) -> str:
    c = summary["config"]
    return (f"{c['model']['name']} on {c['hardware']['name']}, batch {c['batch']}, {c['strategy']}, "
            f"β={c['policy']['hbm_ratio']}, r={c['policy']['evict_ratio']}")


def _finish(ax, title: str) -> None:
    """Title, grid, both axes from zero, and the legend outside the axes on the right."""
    ax.set_title(title, fontsize=9)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)


def memory_figure(result):
    """HBM (tiered and full) and DDR occupancy over simulated time, with the HBM capacity line."""
    s, steps = result.summary, result.steps
    t_s = steps["time_ms"].to_numpy() / 1e3
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(t_s, result.memory.hbm_bytes / GB, label=f"HBM, {s['config']['strategy']}", color="C0")
    ax.plot(t_s, result.memory_full.hbm_bytes / GB, label="HBM, full (no tiering)", color="C3", ls="--")
    ax.plot(t_s, result.memory.ddr_bytes / GB, label="host DDR (KV)", color="C2")
    ax.axhline(s["hbm_capacity_gb"], color="k", lw=1.2, label=f"HBM capacity {s['hbm_capacity_gb']:g} GB")
    ax.axhline(s["weights_gb"] + s["reserve_gb"], color="grey", lw=0.8, ls=":", label="weights + reserve")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("occupancy (GB = 1e9 B)")
    _finish(ax, _title(s))
    return fig


def breakdown_figure(result):
    """Per step: compute and exposed transfer (stall) stacked, hidden transfer, and the full strategy's step."""
    s, steps = result.summary, result.steps
    k = steps["step"].to_numpy()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.stackplot(k, steps["compute_ms"], steps["stall_ms"], labels=["compute", "exposed transfer (stall)"],
                 colors=["C0", "C1"], alpha=0.8)
    ax.plot(k, steps["hidden_transfer_ms"], color="C2", lw=0.8, label="hidden transfer (overlapped)")
    ax.plot(k, result.timeline_full.step_s * 1e3, color="C3", lw=0.8, ls="--", label="step, full (no tiering)")
    ax.set_xlabel("decode step of the batch")
    ax.set_ylabel("time per step (ms)")
    _finish(ax, f"{_title(s)}: overhead {s['overhead_pct']:.1f}%")
    return fig


def links_figure(result):
    """H2D and D2H busy share of each step (smoothed over 32 steps)."""
    s, steps = result.summary, result.steps
    k = steps["step"].to_numpy()
    step_ms = np.maximum(steps["step_ms"].to_numpy(), 1e-12)
    window = min(32, len(k))
    smooth = lambda x: np.convolve(x, np.ones(window) / window, mode="same")
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(k, 100 * smooth(steps["h2d_ms"].to_numpy() / step_ms), label=f"H2D (mean {100 * s['link_util_h2d']:.1f}%)")
    ax.plot(k, 100 * smooth(steps["d2h_ms"].to_numpy() / step_ms), label=f"D2H (mean {100 * s['link_util_d2h']:.1f}%)")
    ax.set_xlabel("decode step of the batch")
    ax.set_ylabel("link busy (% of step time)")
    ax.set_ylim(0, 105)
    _finish(ax, f"{_title(s)}; link {s['config']['hardware']['link']}")
    return fig


def _write(make, result, path: str | os.PathLike, formats: tuple[str, ...]) -> list[Path]:
    formats = check_formats(formats)  # refused before any drawing
    return save_figure(make(result), path, formats, dpi=DPI)


def plot_memory(result, path: str | os.PathLike, *, formats: tuple[str, ...] = ("png",)) -> list[Path]:
    """Write memory_figure once per format (path's suffix replaced by each); returns the paths."""
    return _write(memory_figure, result, path, formats)


def plot_breakdown(result, path: str | os.PathLike, *, formats: tuple[str, ...] = ("png",)) -> list[Path]:
    """Write breakdown_figure once per format (path's suffix replaced by each); returns the paths."""
    return _write(breakdown_figure, result, path, formats)


def plot_links(result, path: str | os.PathLike, *, formats: tuple[str, ...] = ("png",)) -> list[Path]:
    """Write links_figure once per format (path's suffix replaced by each); returns the paths."""
    return _write(links_figure, result, path, formats)


def write_plots(result, out: str | os.PathLike, *, formats: tuple[str, ...] = ("png",)) -> list[Path]:
    """memory, step_breakdown and links into folder `out`, one file per format each; returns the paths."""
    out, formats = Path(out), check_formats(formats)
    return [*plot_memory(result, out / "memory.png", formats=formats),
            *plot_breakdown(result, out / "step_breakdown.png", formats=formats),
            *plot_links(result, out / "links.png", formats=formats)]
