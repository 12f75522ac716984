"""The throughput–latency curve of an open-loop rate sweep: every strategy in one figure (PNG, SVG, PDF).

Left, the curve: each strategy is one line through its swept rates, achieved throughput (tokens/s)
against TPOT p50, each point labelled with its arrival rate, the TPOT target as a horizontal line.
Latency spans orders of magnitude between strategies, so its axis is logarithmic when the values
do; a rate at which no request finished has no latency, and no point there. Right, what the
missing points hide: the share of requests within the SLO at each arrival rate, every strategy.
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


def _column(rows: pd.DataFrame, name: str) -> np.ndarray:
    return pd.to_numeric(rows[name], errors="coerce").to_numpy(dtype=float)


def curve_figure(sweep: pd.DataFrame, summary: dict):
    """Throughput against TPOT p50, one line per strategy through its rates; the share within the SLO per rate."""
    fig, (curve, share) = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, (name, rows) in enumerate(sweep.groupby("strategy", sort=False)):
        rows = rows.sort_values("rate_req_s")
        x, y, rates = _column(rows, "throughput_tok_s"), _column(rows, "tpot_ms_p50"), _column(rows, "rate_req_s")
        ok = np.isfinite(y)
        curve.plot(x[ok], y[ok], marker="o", color=f"C{i}", label=name)
        for xi, yi, rate in zip(x[ok], y[ok], rates[ok]):
            curve.annotate(f"{rate:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7, color=f"C{i}")
        share.plot(rates, 100 * np.nan_to_num(_column(rows, "goodput_share")), marker="o", color=f"C{i}", label=name)
    curve.axhline(summary["slo_tpot_ms"], color="k", lw=1, ls="--", label=f"TPOT target {summary['slo_tpot_ms']:g} ms")
    values = pd.to_numeric(sweep["tpot_ms_p50"], errors="coerce").dropna()
    if len(values) and values.min() > 0 and values.max() / values.min() > 20:
        curve.set_yscale("log")
    else:
        curve.set_ylim(bottom=0)
    curve.set_xlim(left=0)
    curve.set(xlabel="throughput (generated tokens/s)", ylabel="TPOT p50 (ms)",
              title="throughput against latency (points: arrival rate, req/s)")
    share.axhline(90, color="k", lw=1, ls="--", label="sustainable: 90%")
    share.set_xlim(left=0)
    share.set_ylim(0, 105)
    share.set(xlabel="arrival rate (req/s)", ylabel="requests within the SLO (%)",
              title=f"SLO: TTFT <= {summary['slo_ttft_ms']:g} ms, TPOT <= {summary['slo_tpot_ms']:g} ms")
    for ax in (curve, share):
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    c = summary["config"]
    fig.suptitle(f"{c['model']['name']} on {c['hardware']['name']}, every strategy at the same arrivals", fontsize=10)
    curve.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    share.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def plot_serving_curve(sweep: pd.DataFrame, summary: dict, path: str | os.PathLike, *,
                       formats: tuple[str, ...] = ("png",)) -> list[Path]:
    """Write curve_figure once per format (path's suffix replaced by each); returns the paths."""
    formats = check_formats(formats)  # refused before any drawing
    return save_figure(curve_figure(sweep, summary), path, formats, dpi=DPI)
