"""What every command prints and writes: tables at the terminal's width, JSON to a file or stdout, progress on
stderr, and the one-line refusal when an optional extra is missing."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from tiersim.errors import TiersimError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

# Which modules each optional extra of pyproject.toml brings, and so which ones a command looks for first.
EXTRAS = {"torch": ("torch", "transformers"), "dist": ("distributed",)}


def console(stderr: bool = False) -> Console:
    """A rich console made now, so it sees the stream and the COLUMNS of this invocation (tests swap both)."""
    from rich.console import Console

    return Console(stderr=stderr)


def say(message: str) -> None:
    """One message line on stdout, never wrapped (paths stay whole to copy them)."""
    console().print(message, soft_wrap=True, markup=False, highlight=False)


def print_table(table: Table) -> None:
    """Print at the terminal's width; into a file or a pipe (no terminal, no COLUMNS) at the table's own width."""
    out = console()
    if not out.is_terminal and "COLUMNS" not in os.environ:
        from rich.console import Console
        from rich.measure import Measurement

        # Measured against an unbounded line, so the width is the table's own, never a fixed number.
        natural = Measurement.get(out, out.options.update_width(sys.maxsize), table).maximum
        out = Console(width=max(out.width, natural))
    out.print(table)


def new_table(title: str, columns: tuple[str, ...] | list[str], left: tuple[str, ...] = ()) -> Table:
    """A table with its columns right-aligned but for those named in `left`."""
    from rich.table import Table

    t = Table(title=title)
    for col in columns:
        t.add_column(col, justify="left" if col in left else "right")
    return t


def emit_json(target: str | None, obj: Any) -> bool:
    """Write `obj` to FILE or stdout ('-'); True when stdout was taken (skip the table then)."""
    from tiersim.fileio import dumps_json, write_json

    if target is None:
        return False
    if target == "-":
        sys.stdout.write(dumps_json(obj))
        return True
    write_json(target, obj)
    say(f"wrote {target}")
    return False


def need_extra(what: str, extra: str) -> None:
    """Refuse in one line, before any work, when `extra` of pyproject.toml is not installed."""
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise TiersimError(f"{what} needs the {extra} extra: pip install 'tiersim[{extra}]' "
                           f"({', '.join(missing)} not installed)")


def _live() -> bool:
    """Progress is drawn only on a terminal: captured or piped stderr stays clean."""
    return sys.stderr.isatty()


@contextlib.contextmanager
def spinner(label: str) -> Iterator[None]:
    """A spinner with the elapsed time on stderr while a library call without a progress callback runs."""
    if not _live():
        yield
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn(label), TimeElapsedColumn(), console=console(stderr=True),
                  transient=True):
        yield


@contextlib.contextmanager
def bar(label: str, total: int | None = None) -> Iterator[Callable[..., None] | None]:
    """A progress bar on stderr; yields `advance(done, total=None)` (None when not on a terminal)."""
    if not _live():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console(stderr=True), transient=True) as progress:
        task = progress.add_task(label, total=total)

        def advance(done: int, n: int | None = None) -> None:
            progress.update(task, completed=done, total=n if n is not None else total)

        yield advance
