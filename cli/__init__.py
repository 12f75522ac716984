"""The `tiersim` command line: parse, call one library function (tiersim.api), print a table, write files.

`tiersim.cli:cli` is the click group (the docs generator reads it), `tiersim.cli:main` the console
script. Each module below adds one group of commands to it; none imports numpy, pandas, matplotlib,
torch, scipy or simpy until a command runs, so `tiersim --help` stays fast.
"""

from tiersim.cli import device, info, simulate, studies, traces  # noqa: F401  (each registers its commands)
from tiersim.cli.group import cli, main
from tiersim.cli.options import policy_options
from tiersim.cli.simulate import simulate_options

__all__ = ["cli", "main", "policy_options", "simulate_options"]
