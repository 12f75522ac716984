"""Hardware profiles (TOML in profiles/, every number with its source; measured/ holds results from real
machines), the fits that turn microbenchmarks into constants (fit.py: rooflines per kernel kind, link and copy
mechanism curves, residuals and intervals), and the profile built from them (profile.py: sources, the [fit]
table of shapes fitted and held out). `validate --suite` adds the [validation] table: the measured error band."""
