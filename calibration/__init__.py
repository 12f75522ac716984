"""Hardware profiles (TOML in profiles/, every number with its source; measured/ holds results from real
machines), the fits that turn microbenchmarks into constants (fit.py re-exports them by kind: fit_compute.py,
rooflines per kernel kind with launch and per-GEMM-call costs; fit_links.py, link and copy mechanism curves;
fit_points.py, point weights and intervals), and the profile built from them (profile.py: sources, the [fit]
table of shapes fitted and held out). `validate --suite` adds the [validation] table: the measured error band."""
