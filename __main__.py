"""`python -m tiersim`: the command line."""

from tiersim.cli import main

main()
