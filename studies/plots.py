"""PNG plots of a simulation: memory against capacity, where step time goes, how busy the links are."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tiersim.fileio import atomic_path  # noqa: E402
from tiersim.sim.costs import GB  # noqa: E402


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _title(summary: dict) -> str:
    c = summary["config"]
    return (f"{c['model']['name']} on {c['hardware']['name']}, batch {c['batch']}, {c['strategy']}, "
            f"β={c['policy']['hbm_ratio']}, r={c['policy']['evict_ratio']}")


def plot_memory(result, path: Path) -> Path:
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
    ax.set_title(_title(s), fontsize=9)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_breakdown(result, path: Path) -> Path:
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
    ax.set_title(f"{_title(s)}: overhead {s['overhead_pct']:.1f}%", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_links(result, path: Path) -> Path:
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
    ax.set_title(f"{_title(s)}; link {s['config']['hardware']['link']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def write_plots(result, out: Path) -> list[Path]:
    """All plots into folder `out`."""
    return [plot_memory(result, out / "memory.png"), plot_breakdown(result, out / "step_breakdown.png"),
            plot_links(result, out / "links.png")]
