"""`tiersim report`: a sweep's results file → three plots (PNG, SVG and/or PDF) and a Markdown summary of it.

Plots (one panel per model and hardware pair, colours per strategy throughout, legends to the
right of each panel): pareto (HBM saved against overhead, the Pareto front marked),
overhead_vs_batch (overhead against batch) and hbm_occupancy (peak HBM against batch, without
tiering too, with the capacity line). Against batch, every swept input other than batch and
strategy gets its own line (a line style per combination, named in the legend): a value that was
swept is shown, never pooled into a median. report.md holds the tables: the front, the largest
saving within an overhead budget per batch, every point, and the failed points with their errors.
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
from matplotlib.lines import Line2D  # noqa: E402

from tiersim.errors import TiersimError  # noqa: E402
from tiersim.fileio import atomic_path  # noqa: E402
from tiersim.studies.sweep import DEFAULTS, STATUS_OK, file_version, read_results_table  # noqa: E402
from tiersim.traces.figure_files import check_formats, save_figure  # noqa: E402

REQUIRED = ("model_name", "hardware_name", "batch", "strategy", "hbm_ratio", "evict_ratio", "overhead_pct",
            "hbm_saved_gb", "hbm_peak_gb", "hbm_peak_gb_full", "hbm_capacity_gb", "fits")
COLOURS = {"full": "C7", "evict-only": "C3", "prefetch-sync": "C1", "prefetch-layer": "C0", "cpu-attention": "C2"}
# Strategies that drop the DDR tier's attention: plotted, but kept off the front and the budget table,
# which compare configurations that lose only what the policy evicts.
LOSSY = ("evict-only",)
MAX_PANELS = 12
DPI = 110
PLOTS = ("pareto.png", "overhead_vs_batch.png", "hbm_occupancy.png")
# The paper's symbols for the policy inputs in legends; other inputs keep their grid name.
SYMBOLS = {"hbm_ratio": "β", "evict_ratio": "r"}
# Line style and marker per combination of the swept inputs drawn as separate lines: 32 distinct pairs,
# consecutive ones differing in both, so neighbours in the legend tell apart at a glance.
_LINESTYLES, _MARKERS = ("-", "--", ":", "-."), ("o", "s", "^", "D", "v", "P", "X", "*")
STYLES = [(_LINESTYLES[i % 4], _MARKERS[(i + i // 8) % 8]) for i in range(32)]


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
def line_keys(ok: pd.DataFrame) -> list[str]:
    """Swept inputs that split a panel's points into lines: all but the x axis (batch), the colour (strategy)
    and the panel (model, hardware; kept when two spec files share a name)."""
    panels = ok.groupby(["model_name", "hardware_name"], sort=False)
    return [k for k in varying(ok) if k not in ("batch", "strategy")
            and not (k in ("model", "hardware") and panels[k].nunique(dropna=False).max() <= 1)]


def _key_label(keys: list[str], values: tuple) -> str:
    return ", ".join(f"{SYMBOLS.get(k, k)}={_value(v)}" for k, v in zip(keys, values))


def sweep_lines(sub: pd.DataFrame, column: str, keys: list[str]) -> list[tuple[str, tuple, pd.Series]]:
    """(strategy, values of `keys`, `column` by batch) per line: each swept value its own line, never pooled."""
    out = []
    for group, s in sub.groupby(["strategy", *keys], sort=False, dropna=False):
        out.append((group[0], tuple(group[1:]), s.set_index("batch")[column].sort_index()))
    return out


def _styles(ok: pd.DataFrame, keys: list[str]) -> dict[str, tuple[str, str]]:
    """(line style, marker) per combination of the line keys (by its label), the same in every panel."""
    combos = ok[keys].drop_duplicates().sort_values(keys) if keys else pd.DataFrame(index=[0])
    labels = dict.fromkeys(_key_label(keys, tuple(r)) for r in combos.itertuples(index=False))
    return {label: STYLES[i % len(STYLES)] for i, label in enumerate(labels)}


def _panels(ok: pd.DataFrame):
    """(model, hardware) groups, at most MAX_PANELS, and a figure with one axes each (room on the right for legends)."""
    groups = list(ok.groupby(["model_name", "hardware_name"], sort=True))[:MAX_PANELS]
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(8.5 * cols, 4.6 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    return groups, fig, list(axes.flat)


def _colour(strategy: str) -> str:
    return COLOURS.get(strategy, "C4")


def _batch_axis(ax, batches) -> None:
    """Log2 batch axis ticked at the swept batches, written as plain numbers."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(int(b) for b in batches)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("batch (concurrent sequences)")


def _with_zero(ax, axis: str = "y") -> None:
    """Stretch a linear or symlog axis to include zero, so sizes read as sizes (and signs stay visible)."""
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    (ax.set_ylim if axis == "y" else ax.set_xlim)(min(lo, 0.0), max(hi, 0.0))


def _legend(ax, handles: list | None = None) -> None:
    """The legend outside the axes, on their right; from `handles` if given, else from the labelled artists."""
    handles = handles if handles is not None else ax.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                  handlelength=3)


def _line_legend(ax, strategies: list[str], keys: list[str], styles: dict, combos: list[tuple], suffix: str,
                 extra: list) -> None:
    """Colour key (strategies), style key (the swept values each line holds, by name) and the extra lines."""
    handles = [Line2D([], [], color=_colour(s), marker="o", ms=4, label=f"{s}{suffix}") for s in strategies]
    if keys:
        drawn = {_key_label(keys, c) for c in combos}
        handles += [Line2D([], [], color="k", ls=ls, marker=marker, ms=4, label=label)
                    for label, (ls, marker) in styles.items() if label in drawn]
    _legend(ax, handles + extra)


def _draw_lines(ax, sub: pd.DataFrame, column: str, keys: list[str], styles: dict, suffix: str) -> tuple[list, list]:
    """One line per strategy and swept value; returns the strategies and the key combinations drawn."""
    strategies, combos = [], []
    for strategy, values, y in sweep_lines(sub, column, keys):
        ls, marker = styles[_key_label(keys, values)]
        ax.plot(y.index, y.to_numpy(), ls=ls, marker=marker, ms=4, color=_colour(strategy),
                label=f"{strategy}{suffix}")
        strategies += [strategy] if strategy not in strategies else []
        combos.append(values)
    return strategies, combos


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
        _with_zero(ax, "x")
        _with_zero(ax, "y")
        ax.set_xlabel("decode overhead vs no tiering (%)")
        ax.set_ylabel("HBM saved at peak (GB)")
        ax.set_title(f"{model} on {hardware}", fontsize=9)
        ax.grid(alpha=0.3)
        _legend(ax)
    fig.suptitle("HBM saved against decode overhead (upper left is better)", fontsize=10)
    return fig


def overhead_figure(ok: pd.DataFrame):
    """Overhead (%) against batch: one line per strategy (colour) and per value of every other swept input (style)."""
    groups, fig, axes = _panels(ok)
    keys = line_keys(ok)
    styles = _styles(ok, keys)
    for ax, ((model, hardware), sub) in zip(axes, groups):
        strategies, combos = _draw_lines(ax, sub, "overhead_pct", keys, styles, "")
        _batch_axis(ax, sub["batch"])
        _with_zero(ax)
        ax.set_ylabel("decode overhead vs no tiering (%)")
        ax.set_title(f"{model} on {hardware}", fontsize=9)
        ax.grid(alpha=0.3)
        _line_legend(ax, strategies, keys, styles, combos, "", [])
    fig.suptitle("Overhead against batch (colour: strategy; line style: the other swept inputs)", fontsize=10)
    return fig


def occupancy_figure(ok: pd.DataFrame):
    """Peak HBM (GB) against batch per strategy and swept value, without tiering, and the HBM capacity line."""
    groups, fig, axes = _panels(ok)
    keys = line_keys(ok)
    styles = _styles(ok, keys)
    for ax, ((model, hardware), sub) in zip(axes, groups):
        strategies, combos = _draw_lines(ax, sub, "hbm_peak_gb", keys, styles, " (peak)")
        # Without tiering the peak depends on no policy input: draw each distinct curve once.
        fulls = {}
        for _, values, y in sweep_lines(sub, "hbm_peak_gb_full", keys):
            fulls.setdefault((tuple(y.index), tuple(y.to_numpy())), (values, y))
        for values, y in fulls.values():
            ls, marker = ("--", "") if len(fulls) == 1 else styles[_key_label(keys, values)]
            ax.plot(y.index, y.to_numpy(), color="dimgray", ls=ls, marker=marker, ms=3, lw=1.2, label="no tiering (peak)")
        capacity = float(sub["hbm_capacity_gb"].iloc[0])
        cap = ax.axhline(capacity, color="k", lw=2.0, label=f"HBM capacity {capacity:g} GB")
        _batch_axis(ax, sub["batch"])
        ax.set_ylabel("peak HBM occupancy (GB = 1e9 B)")
        ax.set_title(f"{model} on {hardware}", fontsize=9)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        full = Line2D([], [], color="dimgray", ls="--", lw=1.2, label="no tiering (peak)")
        _line_legend(ax, strategies, keys, styles, combos, " (peak)", [full, cap])
    fig.suptitle("HBM occupancy against capacity (colour: strategy; line style: the other swept inputs)", fontsize=10)
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
        if k not in ("model", "hardware", "batch", "strategy"):
            keys[k] = k
    return keys


def best_within(ok: pd.DataFrame, budget_pct: float) -> pd.DataFrame:
    """Per model, hardware and batch: the lossless point with the largest HBM saving within the overhead budget."""
    inside = ok[(ok["overhead_pct"] <= budget_pct) & ~ok["strategy"].isin(LOSSY)]
    if inside.empty:
        return inside
    best = inside.loc[inside.groupby(["model_name", "hardware_name", "batch"])["hbm_saved_gb"].idxmax()]
    return best.sort_values(["model_name", "hardware_name", "batch"])


def report_markdown(ok: pd.DataFrame, failed: pd.DataFrame, source: str, version: str | None, budget_pct: float,
                    image_format: str = "png") -> str:
    """The summary: what was swept, the front, the best within the budget, every point, the failures."""
    pareto, overhead, occupancy = (Path(name).with_suffix(f".{image_format}").name for name in PLOTS)
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
        f"![HBM saved against overhead]({pareto})", "", f"![Overhead against batch]({overhead})", "",
        f"![HBM occupancy against capacity]({occupancy})", "",
        f"## Pareto front ({len(front)} points; per model and hardware)", "",
        f"Points no other beats on both overhead and HBM saved, among strategies that keep the DDR tier's attention "
        f"(not {', '.join(LOSSY)}).", "", markdown_table(front, {**cfg, **metrics}), "",
        f"## Largest HBM saving within {budget_pct:g}% overhead, per batch (lossless strategies)", "",
        markdown_table(best, {**cfg, **metrics}) if len(best) else f"No point stays within {budget_pct:g}% overhead.", "",
        f"## All points ({len(ok)})", "", markdown_table(ok, {"point_id": "point", **cfg, **metrics}), "",
    ]
    if len(failed):
        parts += [f"## Failed points ({len(failed)})", "",
                  markdown_table(failed, {"point_id": "point", **_config_columns(both, ("model", "hardware")),
                                          "error": "error"}), ""]
    return "\n".join(parts)


def write_report(results: str | os.PathLike, out_dir: str | os.PathLike, budget_pct: float = 5.0, *,
                 formats: tuple[str, ...] = ("png",)) -> list[Path]:
    """Write the three plots (one file per format each) and report.md into `out_dir`; returns their paths."""
    out_dir, formats = Path(out_dir), check_formats(formats)
    ok, failed, version = load_ok_rows(results)
    paths = [path for make, name in zip((pareto_figure, overhead_figure, occupancy_figure), PLOTS)
             for path in save_figure(make(ok), out_dir / name, formats, dpi=DPI)]
    md = out_dir / "report.md"
    image = next((f for f in formats if f != "pdf"), formats[0])  # Markdown viewers show PNG and SVG inline, not PDF
    with atomic_path(md) as tmp:
        tmp.write_text(report_markdown(ok, failed, Path(results).name, version, budget_pct, image))
    return [*paths, md]
