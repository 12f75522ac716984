"""How long `import tiersim` and `tiersim --help` take, each the median of several fresh interpreters.

Run: python benchmarks/import_time.py [--runs N]. Prints both times, the bare interpreter's time in
the same run (so the ratio says what tiersim itself adds), and the heavy modules `import tiersim`
and the CLI pull in (there should be none: numpy, pandas, torch, ... load when a command runs).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("numpy", "pandas", "matplotlib", "torch", "scipy", "simpy", "pyarrow")


def median_s(cmd: list[str], runs: int) -> float:
    """Median wall time of `cmd` over `runs` runs (one warm-up run first, so the OS file cache is hot)."""
    subprocess.run(cmd, check=True, capture_output=True)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def heavy_modules(code: str) -> list[str]:
    """Heavy modules present in sys.modules after running `code` in a fresh interpreter."""
    probe = f"{code}\nimport sys; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    return out.split()


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="Interpreters per measurement (median).")
    runs = parser.parse_args().runs
    script = shutil.which("tiersim", path=str(Path(sys.executable).parent))
    cli = [script, "--help"] if script else [sys.executable, "-m", "tiersim", "--help"]
    bare = median_s([sys.executable, "-c", "pass"], runs)
    imp = median_s([sys.executable, "-c", "import tiersim"], runs)
    helps = median_s(cli, runs)
    print(f"median of {runs} runs each (wall time of a fresh interpreter, start-up included)")
    print(f"  python -c pass          {bare:6.3f} s")
    print(f"  python -c 'import tiersim'  {imp:6.3f} s  ({imp / bare:.2f}x bare python)")
    print(f"  {' '.join(Path(cli[0]).name if i == 0 else c for i, c in enumerate(cli))}  {helps:6.3f} s  "
          f"({helps / bare:.2f}x bare python)")
    print(f"  heavy modules after import tiersim:      {heavy_modules('import tiersim') or 'none'}")
    print(f"  heavy modules after import tiersim.cli:  {heavy_modules('import tiersim.cli') or 'none'}")


if __name__ == "__main__":
    main()
