"""The SimPy engine against timelines computed by hand: 2 layers, 3 decode steps, every event written out.

Both plans use the same numbers (seconds; binary fractions, so the sums are exact):
  one layer's compute 1.0 (matmuls 0.75 + attention 0.25), lm_head 0.5: 2 x 1.0 + 0.5 = 2.5 per step;
  H2D of the DDR tier per step 2.0, 1.5, 0.25 (twice as long, 4.0, 3.0, 0.5, if D2H is busy when it starts);
  D2H of the demotions decided at the end of step 0: 3.0 (6.0 if H2D is busy when it starts).
A copy's speed is re-evaluated whenever the other direction starts or stops (a fluid: what it has left
runs at the new rate). Events due at the same instant run in the order they were scheduled. No copy
slows compute unless a test says so (interference factors 1.0).
"""

from __future__ import annotations

import dataclasses

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
    #                                                         L3 (step 1) 1.5 starts plain
    #       step 0 ends at 5.5; step 1 starts; layer 2 is staged, runs 5.5 -> 6.5
    #                                                         D2H starts: L3 drops to half    demotions of step 0
    #                                                         speed, 1.5 left -> 8.5          start at half speed
    # 6.5   layer 3 waits for its copy
    # 8.5   layer 3 runs 8.5 -> 9.5 (stall 2)                 L3 done; L4 (step 2) 0.25 at    1.5 of 3.0 done
    #                                                         half speed -> 9
    # 9                                                       L5 waits for buffer: layer 3    alone: 1.25 left at
    #                                                         computed (at 9.5)               full speed
    # 9.5   head 9.5 -> 10                                    L5 (step 2) at half -> 10       0.75 left, half speed
    # 10    step 1 ends (the head's timeout was scheduled     L5 done                         0.5 left, full -> 10.5
    #       first); step 2: layers 4, 5 staged: 10 -> 12; head -> 12.5
    # 10.5                                                                                   demotions done
    tl = engine.run(plan("prefetch-layer"))
    np.testing.assert_array_equal(tl.start_s, [0.0, 5.5, 10.0])
    np.testing.assert_array_equal(tl.end_s, [5.5, 10.0, 12.5])
    np.testing.assert_array_equal(tl.step_s, [5.5, 4.5, 2.5])
    np.testing.assert_array_equal(tl.stall_s, [3.0, 2.0, 0.0])
    np.testing.assert_array_equal(tl.compute_s, [2.5, 2.5, 2.5])
    np.testing.assert_array_equal(tl.h2d_busy_s, [2.0 + 2.0, 1.5 + 3.0, 0.5 + 0.5])
    np.testing.assert_array_equal(tl.d2h_busy_s, [5.0, 0.0, 0.0])
    np.testing.assert_array_equal(tl.d2h_done_s, [10.5, NAN, NAN])
    np.testing.assert_array_equal(tl.host_busy_s, [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(tl.interference_s, [0.0, 0.0, 0.0])
    # The analytic bound, max(compute, layers x copy, demotions) = max(2.5, 2 x 2.0, 3.0) = 4, then 3 and 2.5,
    # stays below every step (step 0 also waits for its first copy before anything overlaps).
    np.testing.assert_array_equal(bound_s(plan("prefetch-layer")), [4.0, 3.0, 2.5])


def test_prefetch_sync_timeline_by_hand():
    # Every layer's copy (one transfer of 2.0, 1.5, 0.25) runs before the forward pass, on the compute's critical path.
    # t     compute stream                                                           D2H
    # 0     step 0: copy 2.0 plain -> 2 (stall 2); layers 2 -> 4; head -> 4.5
    # 4.5   step 0 ends; step 1: copy 1.5 starts, then the demotions: both at half    demotions start at half speed
    #       speed, the copy -> 7.5
    # 7.5   stall 3; layers 7.5 -> 9.5; head -> 10                                   1.5 done; alone: 1.5 -> 9
    # 9                                                                              demotions done
    # 10    step 1 ends; step 2: copy 0.25 plain -> 10.25 (stall 0.25); layers -> 12.25; head -> 12.75
    tl = engine.run(plan("prefetch-sync"))
    np.testing.assert_array_equal(tl.start_s, [0.0, 4.5, 10.0])
    np.testing.assert_array_equal(tl.end_s, [4.5, 10.0, 12.75])
    np.testing.assert_array_equal(tl.step_s, [4.5, 5.5, 2.75])
    np.testing.assert_array_equal(tl.stall_s, [2.0, 3.0, 0.25])
    np.testing.assert_array_equal(tl.compute_s, [2.5, 2.5, 2.5])
    np.testing.assert_array_equal(tl.h2d_busy_s, [2.0, 3.0, 0.25])
    np.testing.assert_array_equal(tl.d2h_busy_s, [4.5, 0.0, 0.0])
    np.testing.assert_array_equal(tl.d2h_done_s, [9.0, NAN, NAN])
    # The bound is compute + copy at full bandwidth: step 1 took 1.5 longer because its copy ran duplex.
    np.testing.assert_array_equal(bound_s(plan("prefetch-sync")), [4.5, 4.0, 2.75])


def test_copies_on_the_compute_stream_serialise():
    # Pageable copies are issued on the compute stream: each layer's copy runs right before it, never beside compute.
    # t     compute stream                                                           D2H
    # 0     copy 2.0 -> 2; layer -> 3; copy 2.0 -> 5; layer -> 6; head -> 6.5 (stall 4)
    # 6.5   step 1: copy L2 1.5 starts, then the demotions: both at half speed        demotions start at half speed
    # 9.5   L2 done (stall 3); layer 9.5 -> 10.5                                      1.5 done; alone: 1.5 left
    # 10.5  copy L3 1.5 at half speed (D2H busy)                                     0.5 left at half speed -> 11.5
    # 11.5  L3: 0.5 done, 1.0 left alone -> 12.5 (stall +2); layer -> 13.5; head -> 14
    # 14    step 2: copy 0.25 -> 14.25; layer -> 15.25; copy -> 15.5; layer -> 16.5; head -> 17
    tl = engine.run(dataclasses.replace(plan("prefetch-layer"), serial_copies=True))
    np.testing.assert_array_equal(tl.start_s, [0.0, 6.5, 14.0])
    np.testing.assert_array_equal(tl.end_s, [6.5, 14.0, 17.0])
    np.testing.assert_array_equal(tl.stall_s, [4.0, 5.0, 0.5])
    np.testing.assert_array_equal(tl.h2d_busy_s, [4.0, 5.0, 0.5])
    np.testing.assert_array_equal(tl.d2h_busy_s, [5.0, 0.0, 0.0])
    np.testing.assert_array_equal(tl.d2h_done_s, [11.5, NAN, NAN])
    # Each step is its compute plus its copies, nothing hidden.
    np.testing.assert_array_equal(tl.step_s, tl.compute_s + tl.stall_s)


def test_a_copy_beside_compute_slows_it_down():
    # The demotions of step 0 (3.0, 2.5 -> 5.5) halve compute's speed while they run (a gather kernel's SMs, or
    # HBM traffic): step 1's first layer takes 2.0 (2.5 -> 4.5); its second does 0.5 of its work by 5.5, the other
    # 0.5 alone (-> 6.0); head -> 6.5. Step 1 lost 1.5 to interference; steps 0 and 2 ran alone.
    tl = engine.run(dataclasses.replace(plan("full"), d2h_bulk_slow=np.array([0.5, 1.0, 1.0])))
    np.testing.assert_array_equal(tl.end_s, [2.5, 6.5, 9.0])
    np.testing.assert_array_equal(tl.interference_s, [0.0, 1.5, 0.0])
    np.testing.assert_array_equal(tl.d2h_done_s, [5.5, NAN, NAN])
    np.testing.assert_array_equal(tl.step_s, tl.compute_s + tl.stall_s + tl.interference_s)


def test_resident_strategies_never_wait():
    # full / evict-only: nothing to fetch, so each step is 2 x 1.0 + 0.5 back to back; demotions still drain.
    for name in ("full", "evict-only"):
        tl = engine.run(plan(name))
        np.testing.assert_array_equal(tl.end_s, [2.5, 5.0, 7.5])
        np.testing.assert_array_equal(tl.stall_s, [0.0, 0.0, 0.0])
        np.testing.assert_array_equal(tl.h2d_busy_s, [0.0, 0.0, 0.0])
        np.testing.assert_array_equal(tl.d2h_busy_s, [3.0, 0.0, 0.0])  # H2D idle: plain
        np.testing.assert_array_equal(tl.d2h_done_s, [5.5, NAN, NAN])
