"""Writing a matplotlib figure as PNG, SVG and PDF files, each atomically; the formats every plot writer accepts.

Lives in the lowest layer that draws figures (traces/) so that studies/ and hw/ share it. It never
imports matplotlib itself: it is handed a figure, and pyplot is already loaded by whoever drew it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tiersim.errors import TiersimError
from tiersim.fileio import atomic_path

FORMATS = ("png", "svg", "pdf")
# No creation dates in vector files, so the same figure gives the same bytes on every run.
_METADATA = {"png": {}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}


def check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    """The requested formats in order, each once; anything but png, svg or pdf is refused naming --format."""
    if isinstance(formats, str):  # one name, not its letters
        formats = (formats,)
    out: list[str] = []
    for name in formats:
        if name not in FORMATS:
            raise TiersimError(f"--format: {name!r} is not a plot format; accepted: {', '.join(FORMATS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise TiersimError(f"--format: no plot format given; accepted: {', '.join(FORMATS)}")
    return tuple(out)


def figure_paths(path: str | os.PathLike, formats: Iterable[str]) -> list[Path]:
    """One path per format: `path` with its format suffix (.png, .svg, .pdf) replaced, any other suffix kept."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix.lstrip(".") in FORMATS else path
    return [stem.with_name(f"{stem.name}.{name}") for name in check_formats(formats)]


def save_figure(fig, path: str | os.PathLike, formats: Iterable[str] = ("png",), *, dpi: int = 110,
                tight: bool = True) -> list[Path]:
    """Write `fig` once per format beside `path`, each file atomically, close it; returns the paths written.

    `tight` crops the canvas to what is drawn (legends outside the axes included); without it the
    file keeps the figure's size exactly.
    """
    import matplotlib.pyplot as plt

    try:
        paths = figure_paths(path, formats)
        for target in paths:
            name = target.suffix[1:]
            with atomic_path(target) as tmp, open(tmp, "wb") as f:
                fig.savefig(f, format=name, dpi=dpi, metadata=_METADATA[name],
                            bbox_inches="tight" if tight else None)
    finally:
        plt.close(fig)
    return paths
