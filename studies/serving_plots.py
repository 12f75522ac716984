"""The throughput–latency curve of an open-loop rate sweep: every strategy in one figure (PNG, SVG, PDF).

Each strategy is one line through its swept rates: achieved throughput (tokens/s) against TPOT p50
(left) and TTFT p90 (right), each point labelled with its arrival rate, the SLO as a horizontal line.
Latency spans orders of magnitude between strategies, so its axis is logarithmic when the values
do; a rate at which no request finished has no latency and no point.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tiersim.traces.figure_files import check_formats, save_figure  # noqa: E402

DPI = 120
PANELS = (("tpot_ms_p50", "TPOT p50 (ms)", "slo_tpot_ms"), ("ttft_ms_p90", "TTFT p90 (ms)", "slo_ttft_ms"))


def curve_figure(sweep: pd.DataFrame, summary: dict):
    """Throughput against TPOT p50 and TTFT p90, one line per strategy through its rates, SLO lines drawn."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, (name, rows) in enumerate(sweep.groupby("strategy", sort=False)):
        rows = rows.sort_values("rate_req_s")
        for ax, (column, _, _) in zip(axes, PANELS):
            y = pd.to_numeric(rows[column], errors="coerce").to_numpy(dtype=float)
            x = rows["throughput_tok_s"].to_numpy(dtype=float)
            ok = np.isfinite(y)
            ax.plot(x[ok], y[ok], marker="o", color=f"C{i}", label=name)
            for xi, yi, rate in zip(x[ok], y[ok], rows["rate_req_s"].to_numpy()[ok]):
                ax.annotate(f"{rate:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=f"C{i}")
    for ax, (column, label, slo) in zip(axes, PANELS):
        ax.axhline(summary[slo], color="k", lw=1, ls="--", label=f"SLO {summary[slo]:g} ms")
        values = pd.to_numeric(sweep[column], errors="coerce").dropna()
        if len(values) and values.min() > 0 and values.max() / values.min() > 20:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)
        ax.set_xlabel("throughput (generated tokens/s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    c = summary["config"]
    fig.suptitle(f"{c['model']['name']} on {c['hardware']['name']}: throughput against latency, points labelled "
                 f"with the arrival rate (req/s)", fontsize=9)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


def plot_serving_curve(sweep: pd.DataFrame, summary: dict, path: str | os.PathLike, *,
                       formats: tuple[str, ...] = ("png",)) -> list[Path]:
    """Write curve_figure once per format (path's suffix replaced by each); returns the paths."""
    formats = check_formats(formats)  # refused before any drawing
    return save_figure(curve_figure(sweep, summary), path, formats, dpi=DPI)
