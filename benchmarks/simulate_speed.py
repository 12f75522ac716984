"""Simulator speed, ratios measured in one run (issue 4 targets).

- the default `tiersim simulate` (r1-qwen-14b: 48 layers, batch 256, 4,096 generated tokens) in under 10 s;
- batch 1024 costs at most 1.5x batch 256 (per-step totals are vectorised over slots);
- doubling --gen-tokens costs at most 2.2x.

    python benchmarks/simulate_speed.py [--trace FILE]
"""

from __future__ import annotations

import argparse
import time

from tiersim.sim import SimConfig, simulate
from tiersim.specs import hardware_spec, model_spec


def run(trace, **kw) -> tuple[float, int]:
    cfg = SimConfig(model=model_spec("r1-qwen-14b"), hardware=hardware_spec("h200-sxm"), trace=trace, **kw)
    start = time.perf_counter()
    s = simulate(cfg).summary
    return time.perf_counter() - start, s["sim_events"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=None, help="trace file (default: the embedded one)")
    trace = ap.parse_args().trace
    rows = {
        "default (batch 256, 4096 tokens)": run(trace, batch=256, gen_tokens=4096),
        "batch 1024": run(trace, batch=1024, gen_tokens=4096),
        "8192 tokens": run(trace, batch=256, gen_tokens=8192),
        "full strategy only": run(trace, batch=256, gen_tokens=4096, strategy="full"),
    }
    print(f"{'case':<34} {'wall s':>7} {'events':>10} {'events/s':>10}")
    for name, (sec, events) in rows.items():
        print(f"{name:<34} {sec:>7.2f} {events:>10,} {events / sec:>10,.0f}")
    base = rows["default (batch 256, 4096 tokens)"][0]
    print(f"default run: {base:.2f} s (target < 10 s)")
    print(f"batch 1024 / batch 256: {rows['batch 1024'][0] / base:.2f}x (target <= 1.5x)")
    print(f"8192 / 4096 tokens: {rows['8192 tokens'][0] / base:.2f}x (target <= 2.2x)")


if __name__ == "__main__":
    main()
