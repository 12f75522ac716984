"""The validation report of a suite run: predicted against measured step time (a scatter plot), the error table per
configuration, the fit behind the profile (residuals per field, shapes fitted and held out), and the machine;
Markdown and a self-contained HTML page. Also the profile with its measured error band, written back."""

from __future__ import annotations

import dataclasses
import html
from importlib.resources import files
from pathlib import Path

from tiersim.calibration.profile import write_profile
from tiersim.fileio import atomic_path
from tiersim.specs import HardwareSpec
from tiersim.traces.figure_files import save_figure
from tiersim.validate.suite import case_key, error_table


def scatter(result: dict, path: Path, formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Predicted against measured step time, one point per configuration (a marker per strategy, a colour per
    shape), the diagonal and ±15% lines; PNG and SVG by default."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    reports = result["configs"]
    shapes = list(dict.fromkeys(case_key(r)["model"] for r in reports))
    markers = {"prefetch-layer": "o", "prefetch-sync": "s"}
    for r in reports:
        k = case_key(r)
        ax.scatter(r["measured_step_ms"], r["predicted_step_ms"], marker=markers.get(k["strategy"], "^"),
                   color=f"C{shapes.index(k['model'])}", facecolors="none" if r.get("busy") else None,
                   label=f"{k['model']}, {k['strategy']}")
    values = [v for r in reports for v in (r["measured_step_ms"], r["predicted_step_ms"])] or [1.0]
    lo, hi = 0.0, 1.1 * max(values)
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, label="predicted = measured")
    for f, style in ((1.15, ":"), (0.85, ":")):
        ax.plot([lo, hi], [lo * f, hi * f], color="grey", lw=0.8, ls=style)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured step time (ms, replay)")
    ax.set_ylabel("predicted step time (ms, simulator)")
    ax.set_title(f"{result['device'].get('name', '')}: {len(reports)} configurations\n"
                 "dotted: ±15%; hollow: replay ran on a busy machine", fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return save_figure(fig, path, formats)


def markdown(result: dict, figure: str) -> str:
    """The report as Markdown."""
    dev, s, suite = result["device"], result["summary"], result["suite"]
    fit = (result.get("profile") or {}).get("fit") or {}
    load = ", ".join(f"{x:.2f}" for x in result["load_average"] if x is not None) or "unknown"
    lines = [f"# tiersim validation: {dev.get('label', dev.get('name', ''))}", "",
             f"Machine: {dev.get('name', '')} on host {dev.get('host', '')}, torch {dev.get('torch', '')}, "
             f"{dev.get('driver', '')}; run {dev.get('date', '')}; load average (1 min) before / after: {load}.", "",
             f"Profile: `{result['profile']['name']}` ({result['profile'].get('path') or 'in memory'}). Shapes fitted: "
             f"{', '.join(fit.get('shapes', [])) or 'not recorded'}; replayed here: "
             + ", ".join(f"{x['model']} ({x['layers'] or 'all'} layers, β {x['hbm_ratio']}"
                         f"{', held out' if x['held_out'] else ', FITTED'})" for x in suite["shapes"]) + ".", "",
             f"![predicted vs measured]({figure})", "", "## Errors per configuration", "", error_table(result), ""]
    drift = result.get("drift")
    if drift:
        lines += ["## The machine's speed against its calibration", "",
                  f"Reference replay ({drift['reference']}): {drift['start_ms']:.2f} ms before the configurations and "
                  f"{drift['end_ms']:.2f} ms after, against {drift['calibrated_ms']:.2f} ms when calibrated "
                  f"(rounds {drift['calibrated_range_ms'][0]:.2f}..{drift['calibrated_range_ms'][1]:.2f} ms): the machine "
                  f"ran {abs(drift['drift_pct']):.1f}% {'slower' if drift['drift_pct'] > 0 else 'faster'} than when "
                  "calibrated."]
        adj = drift.get("drift_adjusted")
        if adj:
            lines.append(f"Had every prediction been scaled by that drift, median |step error| {adj['median_abs_pct']:.1f}%, "
                         f"worst {adj['worst_abs_pct']:.1f}% (signed median {adj['signed_median_pct']:+.1f}%): a "
                         "diagnostic of how much of the error is the machine's speed moving; the errors above are "
                         "the prediction's.")
        lines.append("")
    if s.get("configurations"):
        lines += ["## Error distribution (|step error| %)", "", "| group | value | median | p90 | worst | n |",
                  "|---|---|---:|---:|---:|---:|"]
        for group in ("by_strategy", "by_mechanism", "by_shape"):
            for value, st in s[group].items():
                lines.append(f"| {group[3:]} | {value} | {st['median_abs_pct']:.1f} | {st['p90_abs_pct']:.1f} | "
                             f"{st['worst_abs_pct']:.1f} | {st['n']} |")
        lines.append("")
    if fit:
        lines += ["## Fit behind the profile", "", f"Limit: {fit.get('limit_pct', 15):g}% rms; marked: "
                  f"{', '.join(fit.get('marked', [])) or 'none'}.", "", "| fit | rms residual % |", "|---|---:|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in (fit.get("residual_rms_pct") or {}).items()]
        lines += [f"| held out in calibration: {k} | {v:.1f} |" for k, v in (fit.get("held_out_rms_pct") or {}).items()]
        lines += [f"| compute fit's {k} = {v:.3g} | (same fit) |" for k, v in (fit.get("compute_refinements") or {}).items()]
        for kind, k in (fit.get("kinds") or {}).items():
            lines.append(f"| kernel kind {kind}: {k['gbps']:.3g} GB/s, {k['tflops']:.3g} TFLOP/s, {k['fixed_us']:.1f} us "
                         f"fixed | {k['rms_pct']:.1f} |")
        lines.append("")
    if result.get("skipped"):
        lines += [f"Skipped (budget spent): {len(result['skipped'])} configurations.", ""]
    return "\n".join(lines)


def _html(text: str, figure: str) -> str:
    """A minimal self-contained page: the Markdown's tables as HTML tables, the rest as paragraphs."""
    body, table = [], []

    def flush():
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= set("-: ")]
            cells = [[html.escape(c.strip()) for c in r.strip().strip("|").split("|")] for r in rows]
            head = "".join(f"<th>{c}</th>" for c in cells[0])
            rest = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
            body.append(f"<table><tr>{head}</tr>{rest}</table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("!["):
            body.append(f'<img src="{html.escape(figure)}" alt="predicted vs measured">')
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:70em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px}")
    return f"<!doctype html><meta charset=utf-8><title>tiersim validation</title><style>{style}</style>{''.join(body)}\n"


def write_report(result: dict, folder: Path, formats: tuple[str, ...] = ("png", "svg"), name: str = "report.md") -> list[Path]:
    """`name` (Markdown), report.html and validation_scatter in `formats` in `folder`; returns the paths, the
    Markdown first."""
    folder = Path(folder)
    figures = scatter(result, folder / "validation_scatter.png", formats) if result["configs"] else []
    figure = figures[0].name if figures else ""
    text = markdown(result, figure)
    paths = []
    for file, content in ((name, text), ("report.html", _html(text, figure))):
        with atomic_path(folder / file) as tmp:
            Path(tmp).write_text(content)
        paths.append(folder / file)
    return paths + figures


def store_validation(profile: HardwareSpec, table: dict | None, folder: Path) -> list[Path]:
    """The profile with its [validation] table: folder/profile.validated.toml, and the profile's own file too when it
    is a measured profile outside the built-in ones (a datasheet profile is never rewritten)."""
    if not table:
        return []
    validated = dataclasses.replace(profile, validation=table)
    note = f"[validation] written by `{table['command']}` on {table['date']}."
    paths = [write_profile(validated, Path(folder) / "profile.validated.toml", note)]
    own = Path(profile.path) if profile.path else None
    builtin = Path(str(files("tiersim.calibration") / "profiles")).resolve()
    measured = all(src.startswith("measured:") or "datasheet" in src for src in profile.sources.values())
    if own is not None and own.is_file() and builtin not in own.resolve().parents and measured:
        paths.append(write_profile(validated, own, note))
    return paths


__all__ = ["markdown", "scatter", "store_validation", "write_report"]
