"""KV blocks: a block frees HBM only when every one of its tokens has left, checked on a schedule written by hand.

A 32-token prompt, 40 decode steps, blocks of 16 (block 0: positions 0-15, block 1: 16-31, block 2: 32-47, ...).
Re-tier at the end of step 3: positions 16-23 (half of block 1) HBM -> DDR.
Re-tier at the end of step 10: positions 24-31 (the other half) HBM -> DDR: block 1 has left HBM.
Re-tier at the end of step 20: positions 0-15 (block 0) evicted.
Row r of a request table is decode step r - 1 and holds 32 + r positions.
"""

from __future__ import annotations

import numpy as np
import pytest

from tiersim.policy import DDR, EVICTED, HBM, PolicyConfig, TierSchedule
from tiersim.sim import SimConfig
from tiersim.sim.engine import Timeline
from tiersim.sim.memory import account_memory
from tiersim.workload.build import BCOL, Workload, block_table, block_totals, request_table

PROMPT, STEPS, BS = 32, 40, 16
MOVES = [(3, range(16, 24), HBM, DDR), (10, range(24, 32), HBM, DDR), (20, range(0, 16), HBM, EVICTED)]


def schedule() -> TierSchedule:
    """The schedule of the module docstring, with tier counts consistent with its moves."""
    counts = np.zeros((STEPS, 4), dtype=np.int64)
    live = np.array([PROMPT, 0, 0, 0])
    pos, frm, to, offsets = [], [], [], [0]
    for t in range(STEPS):
        live[HBM] += 1
        counts[t] = live
        for step, positions, a, b in MOVES:
            if step == t:
                live[a] -= len(positions)
                live[b] += len(positions)
                pos += list(positions)
                frm += [a] * len(positions)
                to += [b] * len(positions)
                offsets.append(len(pos))
    return TierSchedule(
        config=PolicyConfig(), prompt_tokens=PROMPT, generated_tokens=STEPS, counts=counts,
        mass=np.zeros((STEPS, 4)), retier_steps=np.array([m[0] for m in MOVES]), moves_offsets=np.array(offsets),
        moves_pos=np.array(pos, dtype=np.int64), moves_from=np.array(frm, dtype=np.int8),
        moves_to=np.array(to, dtype=np.int8), protected=np.zeros(STEPS, dtype=np.int64), final_counts=live)


def test_half_a_block_leaving_frees_nothing_the_whole_block_frees_one():
    t = block_table(schedule(), BS)
    col = lambda name: t[:, BCOL[name]]  # noqa: E731
    blocks = -(-(PROMPT + np.arange(STEPS + 1)) // BS)
    np.testing.assert_array_equal(col("blocks"), blocks)
    # Rows 0-4: all in HBM. Rows 5-11: half of block 1 in DDR, the block still held. Rows 12-21: block 1 gone.
    # Rows 22-: block 0 evicted as well.
    freed = np.zeros(STEPS + 1)
    freed[12:] += 1
    freed[22:] += 1
    np.testing.assert_array_equal(col("hbm_blocks"), blocks - freed)
    kept = blocks - (np.arange(STEPS + 1) >= 22)  # eviction alone frees only block 0
    np.testing.assert_array_equal(col("kept_blocks"), kept)
    # The DDR tier: one run of 8 tokens, then one whole block of 16.
    ddr_runs, ddr_full = np.zeros(STEPS + 1), np.zeros(STEPS + 1)
    ddr_runs[5:] = 1
    ddr_full[12:] = 1
    np.testing.assert_array_equal(col("ddr_runs"), ddr_runs)
    np.testing.assert_array_equal(col("ddr_full_blocks"), ddr_full)
    # Demotions copied out at the re-tier rows: two half-block runs, none of them a whole block.
    np.testing.assert_array_equal(np.flatnonzero(col("demoted_runs")), [4, 11])
    assert col("demoted_full_blocks").sum() == 0 and col("promoted_runs").sum() == 0


def test_a_block_is_the_unit_of_tiering_when_pages_are_blocks():
    # With the same moves made page-aligned (16-token pages), the DDR tier is whole blocks only.
    t = block_table(schedule(), 8)  # blocks of 8: each half of block 1 is a whole block
    assert t[5, BCOL["ddr_runs"]] == t[5, BCOL["ddr_full_blocks"]] == 1
    assert t[12, BCOL["ddr_runs"]] == t[12, BCOL["ddr_full_blocks"]] == 2
    assert t[12, BCOL["hbm_blocks"]] == -(-(PROMPT + 12) // 8) - 2


@pytest.fixture(scope="module")
def memory():
    s = schedule()
    table = request_table(s)
    rows = np.arange(STEPS + 1)[None, :]
    w = Workload(tables=table[None], totals=table.copy(), slot_rows=rows, schedules=(s,), captured_tokens=STEPS,
                 synthetic_tokens=0, requests_started=1, requests_finished=1)
    cfg = SimConfig(model="r1-qwen-7b", hardware="h200-sxm", strategy="evict-only", batch=1, gen_tokens=STEPS + 1)
    zeros = np.zeros(STEPS + 1)
    mem = account_memory("evict-only", w, cfg, Timeline.empty(STEPS + 1), zeros, zeros, block_totals(w, BS))
    return mem, BS * cfg.share.kv_bytes_per_token_global


def test_hbm_is_accounted_per_block(memory):
    mem, block = memory
    # Rows 4 and 5 hold 3 blocks of positions each (36, 37 tokens): half of block 1 leaving frees nothing.
    assert mem.hbm_bytes[5] == mem.hbm_bytes[4]
    # Rows 11 and 12 hold 3 blocks of positions each (43, 44 tokens): the rest of block 1 leaving frees one block.
    assert mem.hbm_bytes[11] - mem.hbm_bytes[12] == block
    # What eviction alone would leave: block 1 still held (its tokens are in DDR, not evicted).
    assert mem.kept_bytes[12] - mem.hbm_bytes[12] == block


# -- the KV pools of one GPU (sim/blocks.py) ----------------------------------------------------------------------
def test_kv_capacity_is_one_gpus_share_of_the_deployment():
    from tiersim.sim.blocks import BlockManager, kv_capacity

    cfg = SimConfig(model="r1-llama-70b", hardware="h200-sxm", tp=2)
    g = cfg.share
    cap = kv_capacity(cfg.model, cfg.hardware, block_size=16, share=g)
    # Half the weights and half the KV heads on each GPU: blocks of 16 tokens x 80 layers x 4 KV heads.
    assert g.weight_bytes == pytest.approx(cfg.model.weight_bytes / 2, rel=1e-3)
    assert cap.block_bytes == 16 * cfg.model.kv_bytes_per_token / 2
    assert cap.hbm_blocks == int((cfg.hardware.hbm_gb * 1e9 * 0.9 - g.weight_bytes) // cap.block_bytes)
    # fp8 KV: twice the blocks of bf16 in the same room.
    fp8 = SimConfig(model="r1-llama-70b", hardware="h200-sxm", tp=2, kv_dtype="fp8")
    assert kv_capacity(fp8.model, fp8.hardware, share=fp8.share).block_bytes == cap.block_bytes / 2
    # A sliding-window model: blocks of the 18 full-attention layers; each sequence also holds its window's blocks.
    oss = SimConfig(model="gpt-oss-120b", hardware="h200-sxm")
    w = kv_capacity(oss.model, oss.hardware, "prefetch-layer", share=oss.share)
    assert w.block_bytes == 16 * oss.share.kv_bytes_per_token_global == 16 * 18 * oss.model.kv_bytes_per_token_layer
    assert (w.window, w.window_bytes_per_token) == (128, 18 * oss.model.kv_bytes_per_token_layer)
    assert w.staging_per_ddr_token == pytest.approx(3 / 18)  # depth + 1 buffers of one full-attention layer
    bm = BlockManager(w, 2)
    # 100 tokens: 7 blocks, and 100 window tokens of 18 sliding layers = 100 / 16 blocks -> 7. 1,000 tokens: 63 + 8.
    assert bm.hbm_blocks([100, 1000]).tolist() == [7 + 7, 63 + 8] and bm.blocks([100, 1000]).tolist() == [7, 63]
    bm.allocate(np.array([0, 1]), np.array([100, 1000]), np.array([0, 500]))
    assert (bm.hbm_used, bm.ddr_used) == (85, 32)  # the DDR tier holds no window
