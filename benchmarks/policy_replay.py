"""Policy replay cost and TierSchedule memory as the chain grows; ratios measured in one run.

Target (issue 2): schedule memory O(steps + tokens), not O(steps x tokens): doubling the chain
should roughly double the schedule's bytes (a dense steps x tokens record would quadruple).
Replay time is O(steps x tokens) by nature (every step reads a row of that length).

    python benchmarks/policy_replay.py
"""

from __future__ import annotations

import time

import numpy as np

from tiersim.policy import PolicyConfig, replay
from tiersim.traces.synth import SynthParams, synth_request


def measure(gen_tokens: int, config: PolicyConfig) -> tuple[float, int, int]:
    """(replay seconds, schedule bytes, dense steps x tokens float32 bytes) for one request."""
    req = synth_request(SynthParams(), 256, gen_tokens, np.random.default_rng(0))
    start = time.perf_counter()
    s = replay(req, config)
    seconds = time.perf_counter() - start
    schedule_bytes = sum(a.nbytes for a in s.to_arrays().values())
    dense_bytes = req.steps * (req.prompt_tokens + req.steps) * 4
    return seconds, schedule_bytes, dense_bytes


def main() -> None:
    config = PolicyConfig(hbm_ratio=0.5, evict_ratio=0.05, compressed_ratio=0.2)
    rows = [(g, *measure(g, config)) for g in (1024, 2048, 4096, 8192)]
    print(f"{'gen tokens':>10} {'replay s':>9} {'steps/s':>9} {'schedule MB':>12} {'dense MB':>9}")
    for g, sec, sb, db in rows:
        print(f"{g:>10} {sec:>9.3f} {(g - 1) / sec:>9.0f} {sb / 1e6:>12.2f} {db / 1e6:>9.1f}")
    print("per doubling of the chain:")
    for (g0, s0, b0, d0), (g1, s1, b1, d1) in zip(rows, rows[1:]):
        print(f"  {g0}->{g1}: schedule bytes x{b1 / b0:.2f} (dense x{d1 / d0:.2f}), replay time x{s1 / s0:.2f}")


if __name__ == "__main__":
    main()
