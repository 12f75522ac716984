"""Sweep speed: points per second on the local process pool and on a Dask LocalCluster (issue 6 target).

Target: a grid of 200 points on 2 local workers in under 5 minutes. The grid: r1-qwen-7b on 5 GPUs
(h200-sxm, h100-sxm, a100-80g-sxm, l40s, rtx4090) x batch 8, 32, 64, 128, 256 x 4 strategies
(prefetch-layer, prefetch-sync, cpu-attention, evict-only) x β 0.3, 0.7; every point 1,024 generated
tokens per request and 256 decode steps of the batch, on a synthetic trace of 4 requests (128-token
prompts, 1,024 generated). Each engine runs twice: cold (an empty schedule cache: the first point of
each β replays the policy over the 4 requests, the rest reuse it) and warm (every schedule cached).
Wall time includes starting the pool or cluster. Rows must be identical across engines (sim_wall_s aside).

    python benchmarks/sweep_speed.py [--workers 2] [--engines local,dask]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from tiersim.studies.sweep import WALL_COLUMNS, parse_grid, read_results, run_sweep
from tiersim.traces.synth import SynthParams, write_synth_trace

GRID = {
    "model-spec": ["r1-qwen-7b"],
    "hardware": ["h200-sxm", "h100-sxm", "a100-80g-sxm", "l40s", "rtx4090"],
    "batch": [8, 32, 64, 128, 256],
    "strategy": ["prefetch-layer", "prefetch-sync", "cpu-attention", "evict-only"],
    "hbm-ratio": [0.3, 0.7],
    "gen-tokens": [1024],
    "steps": [256],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--engines", default="local,dask")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synth_trace(tmp / "bench.tstrace", SynthParams(), 4, 128, 1024, seed=0)
        grid = parse_grid({**GRID, "trace": ["bench.tstrace"]}, base_dir=tmp, source="benchmark grid")
        print(f"{grid.size} points, {args.workers} workers")
        print(f"{'engine':<8} {'cache':<6} {'wall s':>8} {'points/s':>9} {'failed':>7}")
        frames, walls = {}, {}
        for engine in args.engines.split(","):
            os.environ["TIERSIM_CACHE_DIR"] = str(tmp / f"cache-{engine}")  # inherited by pool and cluster workers
            for cache in ("cold", "warm"):
                out = tmp / f"{engine}-{cache}.parquet"
                stats = run_sweep(grid, out, engine=engine, workers=args.workers)
                print(f"{engine:<8} {cache:<6} {stats.wall_s:>8.1f} {stats.points_per_s:>9.2f} {stats.failed:>7}")
                frames[engine, cache] = read_results(out).drop(columns=list(WALL_COLUMNS))
                walls[engine, cache] = stats.wall_s
        first = next(iter(frames.values()))
        same = all(f.equals(first) for f in frames.values())
        print(f"rows identical across engines and cache states: {same}")
        if ("local", "cold") in walls:
            print(f"{grid.size} points on {args.workers} local workers, cold cache: {walls['local', 'cold']:.1f} s "
                  f"(target < 300 s)")


if __name__ == "__main__":
    main()
