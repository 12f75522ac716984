"""mkdocs hook: let mkdocstrings find the installed tiersim package, not the `tiersim` console script."""

import os
import sys


def on_startup(command: str, dirty: bool) -> None:
    """Drop the folder of the running script (venv/bin) from sys.path before mkdocstrings reads it."""
    # `mkdocs build` runs a console script, so Python puts venv/bin first on sys.path; griffe (mkdocstrings'
    # loader) then takes the `tiersim` console script in that folder for a namespace package and finds no
    # tiersim.policy. Without that folder griffe asks the import system, which knows the installed package
    # (editable or not) and reads its source from there. on_startup runs before any plugin's on_config.
    script_dir = os.path.dirname(os.path.abspath(sys.argv[0]))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != script_dir]
