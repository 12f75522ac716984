"""The SimPy engine against timelines computed by hand: 2 layers, 3 decode steps, every event written out.

Both plans use the same numbers (seconds; binary fractions, so the sums are exact):
  one layer's compute 1.0 (matmuls 0.75 + attention 0.25), lm_head 0.5: 2 x 1.0 + 0.5 = 2.5 per step;
  H2D of the DDR tier per step 2.0, 1.5, 0.25 (twice as long, 4.0, 3.0, 0.5, if D2H is busy when it starts);
  D2H of the demotions decided at the end of step 0: 3.0 (6.0 if H2D is busy when it starts).
A copy's speed is fixed when it starts. Events due at the same instant run in the order they were scheduled.
"""

from __future__ import annotations

import numpy as np

from tiersim.sim import engine
from tiersim.sim.engine import StepPlan
from tiersim.sim.plan import bound_s
from tiersim.strategy import get_strategy

NAN = np.nan


def plan(strategy: str, depth: int = 1) -> StepPlan:
    """The 2-layer, 3-step plan of the module docstring."""
    a = lambda *v: np.array(v, dtype=np.float64)
    zeros = a(0.0, 0.0, 0.0)
    return StepPlan(
        strategy=get_strategy(strategy), layers=2, depth=depth,
        matmul_s=a(0.75, 0.75, 0.75), attention_s=a(0.25, 0.25, 0.25), head_s=a(0.5, 0.5, 0.5), qkv_share=0.25,
        h2d_layer_s=a(2.0, 1.5, 0.25), h2d_layer_duplex_s=a(4.0, 3.0, 0.5),
        h2d_bulk_s=zeros, h2d_bulk_duplex_s=zeros,
        d2h_bulk_s=a(3.0, 0.0, 0.0), d2h_bulk_duplex_s=a(6.0, 0.0, 0.0),
        query_d2h_s=zeros, host_attention_s=zeros, partial_h2d_s=zeros,
    )


def test_prefetch_layer_timeline_by_hand():
    # depth 1: staging_buffers = 2, so the copy of global layer L (step L // 2) waits until layer L - 1 computed.
    # t     compute stream                                   H2D copy stream                        D2H
    # 0     step 0 starts; layer 0 waits for its copy         L0 (step 0) 2.0 plain -> 2
    # 2     layer 0 runs 2 -> 3 (stall 2)                     L1 (step 0) 2.0 plain -> 4  (buffer 0 free: L-1=0 ≤ 0)
    # 3     layer 1 waits for its copy
    # 4     layer 1 runs 4 -> 5 (stall +1 = 3)                L2 (step 1) 1.5 plain -> 5.5
    # 5     head 5 -> 5.5
    # 5.5   (the copy's timeout was scheduled at t=4, before the head's at t=5, so it is handled first)
    #                                                         L3 (step 1) 1.5 plain -> 7 (D2H not yet started)
    #       step 0 ends at 5.5; step 1 starts; layer 2 is staged, runs 5.5 -> 6.5
    #                                                                                 demotions of step 0 start with
    #                                                                                 H2D busy: duplex 6.0 -> 11.5
    # 6.5   layer 3 waits for its copy
    # 7     layer 3 runs 7 -> 8 (stall 0.5)                   L4 (step 2) 0.25, D2H busy: 0.5 -> 7.5
    # 7.5                                                     L5 waits for buffer: layer 3 computed (at 8)
    # 8     head 8 -> 8.5                                     L5 (step 2) D2H busy: 0.5 -> 8.5
    # 8.5   step 1 ends; step 2 starts; layers 4, 5 staged: 8.5 -> 10.5; head -> 11
    # 11.5                                                                            demotions done
    tl = engine.run(plan("prefetch-layer"))
    np.testing.assert_array_equal(tl.start_s, [0.0, 5.5, 8.5])
    np.testing.assert_array_equal(tl.end_s, [5.5, 8.5, 11.0])
    np.testing.assert_array_equal(tl.step_s, [5.5, 3.0, 2.5])
    np.testing.assert_array_equal(tl.stall_s, [3.0, 0.5, 0.0])
    np.testing.assert_array_equal(tl.compute_s, [2.5, 2.5, 2.5])
    np.testing.assert_array_equal(tl.h2d_busy_s, [2.0 + 2.0, 1.5 + 1.5, 0.5 + 0.5])
    np.testing.assert_array_equal(tl.d2h_busy_s, [6.0, 0.0, 0.0])
    np.testing.assert_array_equal(tl.d2h_done_s, [11.5, NAN, NAN])
    np.testing.assert_array_equal(tl.host_busy_s, [0.0, 0.0, 0.0])
    # The analytic bound, max(compute, layers x copy, demotions) = max(2.5, 2 x 2.0, 3.0) = 4, then 3 and 2.5,
    # stays below every step (step 0 also waits for its first copy before anything overlaps).
    np.testing.assert_array_equal(bound_s(plan("prefetch-layer")), [4.0, 3.0, 2.5])


def test_prefetch_sync_timeline_by_hand():
    # Every layer's copy (one transfer of 2.0, 1.5, 0.25) runs before the forward pass, on the compute's critical path.
    # t     compute stream                                                           D2H
    # 0     step 0: copy 2.0 plain -> 2 (stall 2); layers 2 -> 4; head -> 4.5
    # 4.5   step 0 ends; step 1: copy 1.5 plain (the demotion has not started) -> 6  demotions start with H2D
    #                                                                                busy: duplex 6.0 -> 10.5
    # 6     stall 1.5; layers 6 -> 8; head -> 8.5
    # 8.5   step 1 ends; step 2: copy 0.25 with D2H busy: duplex 0.5 -> 9 (stall 0.5); layers -> 11; head -> 11.5
    # 10.5                                                                           demotions done
    tl = engine.run(plan("prefetch-sync"))
    np.testing.assert_array_equal(tl.start_s, [0.0, 4.5, 8.5])
    np.testing.assert_array_equal(tl.end_s, [4.5, 8.5, 11.5])
    np.testing.assert_array_equal(tl.step_s, [4.5, 4.0, 3.0])
    np.testing.assert_array_equal(tl.stall_s, [2.0, 1.5, 0.5])
    np.testing.assert_array_equal(tl.compute_s, [2.5, 2.5, 2.5])
    np.testing.assert_array_equal(tl.h2d_busy_s, [2.0, 1.5, 0.5])
    np.testing.assert_array_equal(tl.d2h_busy_s, [6.0, 0.0, 0.0])
    np.testing.assert_array_equal(tl.d2h_done_s, [10.5, NAN, NAN])
    # The bound is compute + copy at full bandwidth: step 2 took 0.25 longer because its copy ran duplex.
    np.testing.assert_array_equal(bound_s(plan("prefetch-sync")), [4.5, 4.0, 2.75])


def test_resident_strategies_never_wait():
    # full / evict-only: nothing to fetch, so each step is 2 x 1.0 + 0.5 back to back; demotions still drain.
    for name in ("full", "evict-only"):
        tl = engine.run(plan(name))
        np.testing.assert_array_equal(tl.end_s, [2.5, 5.0, 7.5])
        np.testing.assert_array_equal(tl.stall_s, [0.0, 0.0, 0.0])
        np.testing.assert_array_equal(tl.h2d_busy_s, [0.0, 0.0, 0.0])
        np.testing.assert_array_equal(tl.d2h_busy_s, [3.0, 0.0, 0.0])  # H2D idle: plain
        np.testing.assert_array_equal(tl.d2h_done_s, [5.5, NAN, NAN])
