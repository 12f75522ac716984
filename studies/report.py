"""`tiersim report`: a sweep's results file → three PNGs and a Markdown summary of the decisions in it.

Plots (one panel per model and hardware pair, colours per strategy throughout):
pareto.png (HBM saved against overhead, the Pareto front marked), overhead_vs_batch.png (median
overhead per strategy against batch, the band spanning the other grid values) and
hbm_occupancy.png (peak HBM per strategy and without tiering against batch, with the capacity
line). report.md holds the tables: the front, the largest saving within an overhead budget per
batch, every point, and the failed points with their errors.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tiersim.errors import TiersimError  # noqa: E402
from tiersim.fileio import atomic_path  # noqa: E402
from tiersim.studies.sweep import DEFAULTS, STATUS_OK, file_version, read_results_table  # noqa: E402

REQUIRED = ("model_name", "hardware_name", "batch", "strategy", "hbm_ratio", "evict_ratio", "overhead_pct",
            "hbm_saved_gb", "hbm_peak_gb", "hbm_peak_gb_full", "hbm_capacity_gb", "fits")
COLOURS = {"full": "C7", "evict-only": "C3", "prefetch-sync": "C1", "prefetch-layer": "C0", "cpu-attention": "C2"}
# Strategies that drop the DDR tier's attention: plotted, but kept off the front and the budget table,
# which compare configurations that lose only what the policy evicts.
LOSSY = ("evict-only",)
MAX_PANELS = 12
PLOTS = ("pareto.png", "overhead_vs_batch.png", "hbm_occupancy.png")


def pareto_mask(overhead_pct: np.ndarray, saved_gb: np.ndarray) -> np.ndarray:
    """True for the points no other point beats: none has lower overhead and at least as much saving."""
    overhead_pct, saved_gb = np.asarray(overhead_pct, float), np.asarray(saved_gb, float)
    mask = np.zeros(len(overhead_pct), bool)
    best = -math.inf
    for i in np.lexsort((-saved_gb, overhead_pct)):  # overhead ascending, then saving descending
        if saved_gb[i] > best:
            mask[i], best = True, saved_gb[i]
    return mask


def load_ok_rows(results: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame, str | None]:
    """(successful rows, failed rows, tiersim version) of a results file; refuses one without a usable row."""
    table = read_results_table(results)
    df, version = table.to_pandas(), file_version(table)
    ok, failed = df[df["status"] == STATUS_OK].copy(), df[df["status"] != STATUS_OK].copy()
    if ok.empty:
        first = f"; first error: {failed['error'].iloc[0]}" if len(failed) else ""
        raise TiersimError(f"{results}: no successful point to report ({len(failed)} failed{first})")
    missing = [c for c in REQUIRED if c not in ok.columns]
    if missing:
        raise TiersimError(f"{results}: results lack the column(s) {', '.join(missing)}; accepted: a tiersim sweep file")
    if "attention_mass_evicted" in ok.columns:
        ok["attention_lost_pct"] = 100 * ok["attention_mass_evicted"].astype(float)
    ok["front"] = False
    for _, sub in ok.groupby(["model_name", "hardware_name"], sort=False):
        exact = sub[~sub["strategy"].isin(LOSSY)]
        sub = exact if len(exact) else sub
        ok.loc[sub.index, "front"] = pareto_mask(sub["overhead_pct"].to_numpy(), sub["hbm_saved_gb"].to_numpy())
    return ok, failed, version


def varying(df: pd.DataFrame) -> list[str]:
    """Grid inputs that take more than one value in these rows, in option order."""
    return [k for k in DEFAULTS if k in df.columns and df[k].astype(str).nunique() > 1]


# -- plots -------------------------------------------------------------------------------------------
def _panels(ok: pd.DataFrame):
    """(model, hardware) groups, at most MAX_PANELS, and a figure with one axes each."""
    groups = list(ok.groupby(["model_name", "hardware_name"], sort=True))[:MAX_PANELS]
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.6 * rows), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    return groups, fig, list(axes.flat)


def _colour(strategy: str) -> str:
    return COLOURS.get(strategy, "C4")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path


def _batch_axis(ax, batches) -> None:
    """Log2 batch axis ticked at the swept batches, written as plain numbers."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(int(b) for b in batches)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("batch (concurrent sequences)")


def _legend(ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8, loc="best")


def pareto_figure(ok: pd.DataFrame):
    """HBM saved (GB) against overhead (%), coloured by strategy; the front (lossless strategies) joined and ringed."""
    groups, fig, axes = _panels(ok)
    for ax, ((model, hardware), sub) in zip(axes, groups):
        for strategy, s in sub.groupby("strategy", sort=False):
            lossy = strategy in LOSSY
            ax.scatter(s["overhead_pct"], s["hbm_saved_gb"], s=22, color=_colour(strategy), alpha=0.8,
                       marker="x" if lossy else "o", label=f"{strategy} (drops DDR attention)" if lossy else strategy)
        front = sub[sub["front"]].sort_values("overhead_pct")
        ax.step(front["overhead_pct"], front["hbm_saved_gb"], where="post", color="k", lw=1.0, label="Pareto front (lossless)")
        ax.scatter(front["overhead_pct"], front["hbm_saved_gb"], s=70, facecolors="none", edgecolors="k", lw=1.0)
        for _, r in front.head(10).iterrows():
            ax.annotate(f"b{r['batch']} β{r['hbm_ratio']:g}", (r["overhead_pct"], r["hbm_saved_gb"]), fontsize=7,
                        xytext=(4, -9), textcoords="offset points")
        if sub["overhead_pct"].max() > 100:
            ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("decode overhead vs no tiering (%)")
        ax.set_ylabel("HBM saved at peak (GB)")
        ax.set_title(f"{model} on {hardware}", fontsize=9)
        ax.grid(alpha=0.3)
        _legend(ax)
    fig.suptitle("HBM saved against decode overhead (upper left is better)", fontsize=10)
    return fig


def _by_batch(sub: pd.DataFrame, column: str) -> pd.DataFrame:
    return sub.groupby("batch")[column].agg(["median", "min", "max"]).sort_index()


def overhead_figure(ok: pd.DataFrame):
    """Median overhead (%) per strategy against batch; the band spans the other grid values."""
    groups, fig, axes = _panels(ok)
    for ax, ((model, hardware), sub) in zip(axes, groups):
        for strategy, s in sub.groupby("strategy", sort=False):
            b = _by_batch(s, "overhead_pct")
            ax.plot(b.index, b["median"], marker="o", ms=4, color=_colour(strategy), label=strategy)
            if (b["max"] > b["min"]).any():
                ax.fill_between(b.index, b["min"], b["max"], color=_colour(strategy), alpha=0.15)
        _batch_axis(ax, sub["batch"])
        ax.set_ylabel("decode overhead vs no tiering (%)")
        ax.set_title(f"{model} on {hardware}", fontsize=9)
        ax.grid(alpha=0.3)
        _legend(ax)
    fig.suptitle("Overhead against batch (line: median over the other grid values; band: min to max)", fontsize=10)
    return fig


def occupancy_figure(ok: pd.DataFrame):
    """Peak HBM (GB) per strategy and without tiering against batch, with the HBM capacity line."""
    groups, fig, axes = _panels(ok)
    for ax, ((model, hardware), sub) in zip(axes, groups):
        for strategy, s in sub.groupby("strategy", sort=False):
            b = _by_batch(s, "hbm_peak_gb")
            ax.plot(b.index, b["median"], marker="o", ms=4, color=_colour(strategy), label=f"{strategy} (peak)")
        full = _by_batch(sub, "hbm_peak_gb_full")
        ax.plot(full.index, full["median"], color="dimgray", ls="--", lw=1.2, label="no tiering (peak)")
        capacity = float(sub["hbm_capacity_gb"].iloc[0])
        ax.axhline(capacity, color="k", lw=2.0, label=f"HBM capacity {capacity:g} GB")
        _batch_axis(ax, sub["batch"])
        ax.set_ylabel("peak HBM occupancy (GB = 1e9 B)")
        ax.set_title(f"{model} on {hardware}", fontsize=9)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        _legend(ax)
    fig.suptitle("HBM occupancy against capacity (median over the other grid values)", fontsize=10)
    return fig


# -- markdown ------------------------------------------------------------------------------------------
def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        if v != 0 and abs(v) < 0.1:
            return f"{v:.2g}"
        return f"{v:,.2f}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _value(v) -> str:
    """An input as written (0.3, not 0.30)."""
    return f"{v:g}" if isinstance(v, (float, np.floating)) and not math.isnan(v) else _cell(v)


def markdown_table(df: pd.DataFrame, columns: dict[str, str]) -> str:
    """A Markdown table of `df` with columns {column: header}; grid inputs as written, measures rounded."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join((_value if c in DEFAULTS else _cell)(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


METRICS = {"overhead_pct": "overhead %", "hbm_saved_gb": "HBM saved GB", "hbm_peak_gb": "HBM peak GB",
           "hbm_capacity_gb": "capacity GB", "fits": "fits", "throughput_tok_s": "tokens/s",
           "attention_lost_pct": "attention lost %"}


def _config_columns(df: pd.DataFrame, names: tuple[str, str] = ("model_name", "hardware_name")) -> dict[str, str]:
    keys = {names[0]: "model", names[1]: "hardware", "batch": "batch", "strategy": "strategy"}
    for k in varying(df):
        if k not in ("model_spec", "hardware", "batch", "strategy"):
            keys[k] = k
    return keys


def best_within(ok: pd.DataFrame, budget_pct: float) -> pd.DataFrame:
    """Per model, hardware and batch: the lossless point with the largest HBM saving within the overhead budget."""
    inside = ok[(ok["overhead_pct"] <= budget_pct) & ~ok["strategy"].isin(LOSSY)]
    if inside.empty:
        return inside
    best = inside.loc[inside.groupby(["model_name", "hardware_name", "batch"])["hbm_saved_gb"].idxmax()]
    return best.sort_values(["model_name", "hardware_name", "batch"])


def report_markdown(ok: pd.DataFrame, failed: pd.DataFrame, source: str, version: str | None, budget_pct: float) -> str:
    """The summary: what was swept, the front, the best within the budget, every point, the failures."""
    both = pd.concat([ok, failed])
    axes = ", ".join(f"{k} ({', '.join(map(_value, pd.unique(both[k])))})" for k in varying(both)) or "nothing"
    cfg = _config_columns(both)
    metrics = {k: v for k, v in METRICS.items() if k in ok.columns}
    front = ok[ok["front"]].sort_values(["model_name", "hardware_name", "overhead_pct"])
    best = best_within(ok, budget_pct)
    parts = [
        "# tiersim sweep report", "",
        f"Source: `{source}` (tiersim {version or 'unknown'}): {len(both)} points, {len(ok)} ok, {len(failed)} failed. "
        f"Varying: {axes}. Overhead is the mean decode step against the same batch without tiering; "
        "HBM saved is at the peak; attention lost is the share of attention on evicted (and, for evict-only, "
        "dropped) tokens.", "",
        "![HBM saved against overhead](pareto.png)", "", "![Overhead against batch](overhead_vs_batch.png)", "",
        "![HBM occupancy against capacity](hbm_occupancy.png)", "",
        f"## Pareto front ({len(front)} points; per model and hardware)", "",
        f"Points no other beats on both overhead and HBM saved, among strategies that keep the DDR tier's attention "
        f"(not {', '.join(LOSSY)}).", "", markdown_table(front, {**cfg, **metrics}), "",
        f"## Largest HBM saving within {budget_pct:g}% overhead, per batch (lossless strategies)", "",
        markdown_table(best, {**cfg, **metrics}) if len(best) else f"No point stays within {budget_pct:g}% overhead.", "",
        f"## All points ({len(ok)})", "", markdown_table(ok, {"point_id": "point", **cfg, **metrics}), "",
    ]
    if len(failed):
        parts += [f"## Failed points ({len(failed)})", "",
                  markdown_table(failed, {"point_id": "point", **_config_columns(both, ("model_spec", "hardware")),
                                          "error": "error"}), ""]
    return "\n".join(parts)


def write_report(results: str | os.PathLike, out_dir: str | os.PathLike, budget_pct: float = 5.0) -> list[Path]:
    """Write the three plots and report.md into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    ok, failed, version = load_ok_rows(results)
    paths = [_save(make(ok), out_dir / name) for make, name in
             zip((pareto_figure, overhead_figure, occupancy_figure), PLOTS)]
    md = out_dir / "report.md"
    with atomic_path(md) as tmp:
        tmp.write_text(report_markdown(ok, failed, Path(results).name, version, budget_pct))
    return [*paths, md]
