"""Simulator speed, ratios measured in one run (issue 4 targets).

- the default `tiersim simulate` (r1-qwen-14b: 48 layers, batch 256, 4,096 generated tokens) in under 10 s;
- batch 1024 costs at most 1.5x batch 256 (per-step totals are vectorised over slots);
- doubling --gen-tokens costs at most 2.2x.

Each case runs cold (an empty schedule cache: the policy is replayed over every trace request,
O(steps x tokens)) and warm (schedules reused from the cache, as in a sweep over hardware,
batch or strategy: what remains is the SimPy model, O(steps x layers)).

    python benchmarks/simulate_speed.py [--trace FILE]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from tiersim.sim import SimConfig, simulate
from tiersim.workload.cache import cache_info


def run(trace, cache: str, **kw) -> tuple[float, int]:
    os.environ["TIERSIM_CACHE_DIR"] = cache
    cfg = SimConfig(model="r1-qwen-14b", hardware="h200-sxm", trace=trace, **kw)
    start = time.perf_counter()
    s = simulate(cfg).summary
    return time.perf_counter() - start, s["sim_events"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=None, help="trace file (default: the embedded one)")
    trace = ap.parse_args().trace
    cases = {"default (batch 256, 4096 tokens)": dict(batch=256, gen_tokens=4096),
             "batch 1024": dict(batch=1024, gen_tokens=4096),
             "8192 tokens": dict(batch=256, gen_tokens=8192)}
    rows = {}
    with tempfile.TemporaryDirectory() as cache:
        for name, kw in cases.items():
            with tempfile.TemporaryDirectory() as empty:
                cold = run(trace, empty, **kw)
            run(trace, cache, **kw)  # fill the shared cache
            rows[name] = (cold, run(trace, cache, **kw))
        info = cache_info()  # the shared store, filled by the three cases
    print(f"{'case':<34} {'cold s':>7} {'warm s':>7} {'events':>10} {'events/s warm':>14}")
    for name, ((cold_s, events), (warm_s, _)) in rows.items():
        print(f"{name:<34} {cold_s:>7.2f} {warm_s:>7.2f} {events:>10,} {events / warm_s:>14,.0f}")
    print(f"schedule cache: {info['entries']} entries, {info['bytes'] / 1e6:.1f} MB of {info['limit'] / 1e9:g} GB")
    base = rows["default (batch 256, 4096 tokens)"]
    print(f"default run: {base[0][0]:.2f} s cold, {base[1][0]:.2f} s warm (target < 10 s)")
    for name, target in (("batch 1024", 1.5), ("8192 tokens", 2.2)):
        cold, warm = rows[name][0][0] / base[0][0], rows[name][1][0] / base[1][0]
        print(f"{name} / default: {cold:.2f}x cold, {warm:.2f}x warm (target <= {target}x)")


if __name__ == "__main__":
    main()
