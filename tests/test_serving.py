"""The serving loop: KV blocks, the vLLM-v1 scheduler and the serving metrics, on cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tiersim.errors import ConfigError
from tiersim.sim import engine
from tiersim.sim.blocks import BlockManager, KVCapacity, kv_capacity
from tiersim.sim.config import SimConfig
from tiersim.sim.costs import CostModel
from tiersim.sim.plan import make_plan
from tiersim.sim.scheduler import SchedulerConfig, fraction_split, table_split
from tiersim.sim.serving import SLO, goodput, max_sustainable_rate, serve
from tiersim.sim.step_time import CostStepTime, StepBatch
from tiersim.specs import hardware_spec, model_spec
from tiersim.strategy import STRATEGIES
from tiersim.workload.arrivals import Request, poisson_requests, pool_requests
from tiersim.workload.build import COL, COLUMNS, Workload

MODEL, HARDWARE = model_spec("r1-qwen-7b"), hardware_spec("h200-sxm")


def recorder(seconds):
    """A step-time function that keeps every batch it was asked about."""
    batches = []

    def step_time(b: StepBatch) -> float:
        batches.append(b)
        return seconds(b)

    return step_time, batches


# ---- blocks ------------------------------------------------------------------------------------------------------

def test_block_manager_counts_blocks_per_sequence():
    bm = BlockManager(KVCapacity(block_size=4, hbm_blocks=5, ddr_blocks=3, staging_per_ddr_token=1.0), 3)
    assert bm.blocks([0, 1, 4, 5, 8]).tolist() == [0, 1, 1, 2, 2]
    bm.allocate(np.array([0, 1]), np.array([5, 4]))  # 2 + 1 blocks
    assert bm.hbm_used == 3 and bm.can_allocate(2, 8) and not bm.can_allocate(2, 9)
    # Sequence 0 may grow from 2 to 4 blocks (16 tokens: 4 + 1 = 5 blocks, the pool); 17 tokens need a 6th.
    assert bm.can_allocate(0, 16) and not bm.can_allocate(0, 17)
    # DDR-tier tokens need staging: 4 DDR tokens x 1.0 = 4 staging tokens = 1 HBM block.
    bm.allocate(np.array([2]), 4, 4)
    assert (bm.hbm_used, bm.ddr_used, bm.staging_blocks(bm.ddr_tokens_used)) == (4, 1, 1)
    assert not bm.fits(5, 1, 4) and bm.fits(4, 1, 4)
    bm.swap_out(0)
    assert (bm.hbm_used, bm.ddr_used, int(bm.ddr[0])) == (2, 3, 2) and not bm.can_swap_out(1)
    bm.free(np.array([0, 1, 2]))
    assert (bm.hbm_used, bm.ddr_used, bm.ddr_tokens_used) == (0, 0, 0)


def test_kv_capacity_from_the_gpu():
    cap = kv_capacity(MODEL, HARDWARE, block_size=16)
    room = HARDWARE.hbm_gb * 1e9 * 0.9 - MODEL.weight_bytes
    assert cap.hbm_blocks == int(room // (16 * MODEL.kv_bytes_per_token))
    tiered = kv_capacity(MODEL, HARDWARE, "prefetch-layer", depth=2)
    assert tiered.staging_per_ddr_token == pytest.approx(3 / MODEL.layers)  # depth + 1 buffers of one layer each
    with pytest.raises(ConfigError) as e:
        kv_capacity(model_spec("r1-llama-70b"), hardware_spec("rtx5080"))
    assert e.value.field == "hardware"


# ---- step time -----------------------------------------------------------------------------------------------------

def single_request_workload(prompt: int, decodes: int) -> Workload:
    """The per-step totals of one request alone (row 0 its prefill, then its decodes), as workload/build makes them."""
    totals = np.zeros((decodes + 1, len(COLUMNS)))
    totals[0, COL["prefill_tokens"]] = totals[0, COL["tokens"]] = totals[0, COL["hbm"]] = prompt
    totals[0, COL["prefill_pairs"]] = prompt * (prompt + 1)
    totals[0, COL["prefill"]] = 1
    totals[1:, COL["tokens"]] = totals[1:, COL["hbm"]] = prompt + np.arange(1, decodes + 1)
    totals[1:, COL["decode"]] = 1
    return Workload(totals[None], totals, np.zeros((1, decodes + 1), dtype=np.int64), (), 0, 0, 1, 1)


def test_vanishing_rate_ttft_is_the_prefill_and_tpot_the_single_request_step():
    """Requests far apart: TTFT = the simulator's prefill step, TPOT = the mean of its single-request decode steps."""
    prompt, output = 300, 40
    cost = CostModel(MODEL, HARDWARE)
    plan, _, _ = make_plan("full", single_request_workload(prompt, output - 1), cost,
                           SimConfig(model=MODEL, hardware=HARDWARE, strategy="full"))
    step_s = engine.run(plan).step_s
    reqs = poisson_requests(1e-3, count=4, prompt_tokens=prompt, output_tokens=output, seed=5)
    res = serve(reqs, CostStepTime(cost), kv_capacity(MODEL, HARDWARE))
    done = res.requests
    assert (done["status"] == "finished").all()
    assert np.all(done["arrival_s"].to_numpy()[1:] > done["finish_s"].to_numpy()[:-1])  # never two at once
    assert done["ttft_s"].to_numpy() == pytest.approx(np.full(4, step_s[0]), rel=1e-9)
    assert done["tpot_s"].to_numpy() == pytest.approx(np.full(4, step_s[1:].mean()), rel=1e-9)
    assert res.metrics["preemptions"] == 0 and res.metrics["mean_concurrency"] < 0.01


def test_cost_step_time_matches_make_plan_for_a_batch():
    """A decode batch with one prefill beside it costs what make_plan gives the same per-step totals."""
    cost = CostModel(MODEL, HARDWARE)
    w = single_request_workload(200, 1)
    w.totals[1, COL["decode"]], w.totals[1, COL["tokens"]] = 64, 64 * 3000  # 64 decodes of 3,000 positions
    w.totals[1, COL["prefill"]], w.totals[1, COL["prefill_tokens"]] = 1, 700
    w.totals[1, COL["tokens"]] += 700
    w.totals[1, COL["prefill_pairs"]] = 700 * 701
    plan, _, _ = make_plan("full", w, cost, SimConfig(model=MODEL, hardware=HARDWARE, strategy="full"))
    expected = plan.layers * plan.layer_s[1] + plan.head_s[1]
    got = CostStepTime(cost)(StepBatch(decode_seqs=64, decode_context_tokens=64 * 3000, prefill_seqs=1,
                                       prefill_tokens=700, prefill_pairs=700 * 701 / 2))
    assert got == pytest.approx(expected, rel=1e-12)


def test_sliding_window_prefill_pairs_by_hand():
    """A 300-token chunk after 100 cached tokens, window 128: queries 101..128 attend 101..128 keys, the other 272
    attend 128 each: 3,206 + 34,816 = 38,022 pairs in a sliding layer; the estimate from totals is that exactly."""
    cfg = SimConfig(model="gpt-oss-120b", hardware=HARDWARE)
    step = CostStepTime(CostModel(cfg.model, HARDWARE, share=cfg.share))
    chunk = dict(prefill_seqs=1, prefill_tokens=300, prefill_context_tokens=100, prefill_pairs=300 * 100 + 300 * 301 / 2)
    assert step.compute_s(StepBatch(**chunk)) == step.compute_s(StepBatch(**chunk, prefill_window_pairs=38022))
    assert step.compute_s(StepBatch(**chunk)) < step.compute_s(StepBatch(**chunk, prefill_window_pairs=40000))


# ---- the scheduler, by hand ------------------------------------------------------------------------------------------

def three_requests():
    return [Request(0.0, 2, 3, i) for i in range(3)]


def test_hand_computed_admissions_preemption_and_completions():
    """3 requests (prompt 2, output 3) at t=0; blocks of 2 tokens, 4 HBM blocks; step = 1 s + 0.1 s per prefill
    token + 0.01 s per decode.

    step 1 [0, 1.6]:     A, B, C admitted, prefill 2 tokens each (1 block each, 3 used); 1 + 0.6 s.
                         Each samples its first token: TTFT 1.6. Each now has 3 tokens, 2 cached.
    step 2 [1.6, 2.62]:  A, B, C decode: each needs ceil(3/2) = 2 blocks, 6 > 4. C (admitted last) is preempted
                         (recompute: blocks freed, back to the front of the queue); A, B fit (4). 1 + 0.02 s.
    step 3 [2.62, 3.64]: A, B decode (4 tokens: 2 blocks each, 4 used). C would need ceil(3/2) = 2 more: no.
                         A and B reach 3 output tokens: finish at 3.64, TPOT (3.64 - 1.6) / 2 = 1.02.
    step 4 [3.64, 4.94]: C recomputes its prompt and generated token: prefill 3 tokens, 1 + 0.3 s; 2nd token.
    step 5 [4.94, 5.95]: C decodes its 3rd token: finish 5.95, TTFT still 1.6, TPOT (5.95 - 1.6) / 2 = 2.175.
    """
    step_time, batches = recorder(lambda b: 1.0 + 0.1 * b.prefill_tokens + 0.01 * b.decode_seqs)
    cap = KVCapacity(block_size=2, hbm_blocks=4, block_bytes=1.0)
    res = serve(three_requests(), step_time, cap)
    r = res.requests
    assert r["first_token_s"].tolist() == pytest.approx([1.6] * 3, abs=1e-12)
    assert r["finish_s"].tolist() == pytest.approx([3.64, 3.64, 5.95], abs=1e-12)
    assert r["tpot_s"].tolist() == pytest.approx([1.02, 1.02, 2.175], abs=1e-12)
    assert r["preemptions"].tolist() == [0, 0, 1]
    s = res.steps
    assert s["decode_seqs"].tolist() == [0, 2, 2, 0, 1]
    assert s["prefill_tokens"].tolist() == [6, 0, 0, 3, 0]
    assert s["preempted"].tolist() == [0, 1, 0, 0, 0]
    assert s["running"].tolist() == [3, 2, 2, 1, 1]
    assert s["hbm_bytes"].tolist() == [3, 4, 4, 2, 2]  # blocks x 1 byte
    assert s["waiting"].tolist() == [0, 1, 1, 0, 0]
    assert [b.prefill_pairs for b in batches] == [9, 0, 0, 6, 0]  # 3 x (2·3/2); 3·4/2
    assert [b.decode_context_tokens for b in batches] == [0, 6, 8, 0, 4]
    assert res.metrics["preemptions"] == 1 and res.metrics["tokens_finished"] == 9


def test_hand_computed_swap_preemption():
    """The same case with swap preemption (10 host blocks; 0.5 s per step that swaps):

    step 2: C's 1 block (its 2 cached tokens) goes to host; 1.02 + 0.5 s → 3.12.
    step 3: A, B decode and finish at 4.14; C would need 2 blocks: no.
    step 4: C swaps back in (1 block) and decodes, no recompute: 1.01 + 0.5 → 5.65. step 5: 6.66.
    """
    step_time, batches = recorder(lambda b: 1.0 + 0.1 * b.prefill_tokens + 0.01 * b.decode_seqs
                                  + 0.5 * (b.swap_in_blocks + b.swap_out_blocks > 0))
    cap = KVCapacity(block_size=2, hbm_blocks=4, ddr_blocks=10, block_bytes=1.0)
    res = serve(three_requests(), step_time, cap, SchedulerConfig(preemption="swap"))
    assert res.requests["finish_s"].tolist() == pytest.approx([4.14, 4.14, 6.66], abs=1e-12)
    assert [(b.swap_out_blocks, b.swap_in_blocks) for b in batches] == [(0, 0), (1, 0), (0, 0), (0, 1), (0, 0)]
    assert res.steps["prefill_tokens"].tolist() == [6, 0, 0, 0, 0]
    assert res.steps["ddr_bytes"].tolist() == [0, 1, 1, 0, 0]


def test_chunked_prefill_shares_the_budget():
    """Budget 4 tokens: A's 6-token prompt takes 4, then its last 2 beside B's 2-token prompt; then both decode.

    step 1: A chunk 4 (pairs 4·5/2 = 10), budget spent, B waits.  step 2: A's last 2 after 4 cached
    (pairs 2·4 + 2·3/2 = 11) and B's 2 (3): both first tokens at t=2.  step 3: both decode and finish.
    """
    step_time, batches = recorder(lambda b: 1.0)
    reqs = [Request(0.0, 6, 2, 0), Request(0.0, 2, 2, 1)]
    res = serve(reqs, step_time, KVCapacity(block_size=16, hbm_blocks=100),
                SchedulerConfig(max_num_batched_tokens=4))
    assert [(b.prefill_seqs, b.prefill_tokens, b.prefill_context_tokens, b.prefill_pairs, b.decode_seqs)
            for b in batches] == [(1, 4, 0, 10, 0), (2, 4, 4, 14, 0), (0, 0, 0, 0, 2)]
    assert res.requests["first_token_s"].tolist() == [2.0, 2.0]
    assert res.requests["finish_s"].tolist() == [3.0, 3.0]


def test_max_num_seqs_queues_the_rest():
    res = serve([Request(0.0, 4, 2, i) for i in range(3)], lambda b: 1.0, KVCapacity(16, 100),
                SchedulerConfig(max_num_seqs=2))
    assert res.requests["finish_s"].tolist() == [2.0, 2.0, 4.0]
    assert res.requests["queued_s"].tolist() == [0.0, 0.0, 2.0]
    assert res.metrics["mean_queue"] == pytest.approx(2.0 / 4.0)
    assert res.metrics["mean_concurrency"] == pytest.approx((2 + 2 + 1 + 1) / 4.0)


def test_a_request_that_never_fits_is_rejected():
    res = serve([Request(0.0, 100, 2, 0), Request(0.0, 4, 2, 1)], lambda b: 1.0, KVCapacity(4, 3))
    assert res.requests["status"].tolist() == ["rejected", "finished"]
    assert res.metrics["requests_rejected"] == 1


def test_closed_loop_keeps_every_slot_busy_with_unlimited_capacity():
    """N slots back to back, as workload/build's closed loop: prefill, output − 1 decodes, next request's prefill."""
    n, output = 3, 4
    reqs = pool_requests(3 * n, prompt_tokens=10, output_tokens=output)
    res = serve(reqs, lambda b: 1.0, KVCapacity(16, 10**6), SchedulerConfig(max_num_batched_tokens=10**6),
                concurrency=n)
    s = res.steps
    assert s["prefill_seqs"].tolist() == [3, 0, 0, 0] * 3 and s["decode_seqs"].tolist() == [0, 3, 3, 3] * 3
    assert res.requests["arrival_s"].tolist() == [0.0] * 3 + [4.0] * 3 + [8.0] * 3
    assert (res.requests["ttft_s"] == 1.0).all()


# ---- properties over real runs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_memory_never_exceeds_capacity_and_requests_are_conserved(strategy, preemption):
    """A loaded run on a small pool: every step within HBM (and DDR) capacity; every arrival accounted for."""
    cost = CostModel(MODEL, HARDWARE)
    cap = kv_capacity(MODEL, HARDWARE, strategy, ddr_gb=2.0)
    cap = KVCapacity(cap.block_size, 400, cap.ddr_blocks, cap.staging_per_ddr_token, cap.block_bytes)  # 6,400 tokens
    s = STRATEGIES[strategy]
    split = fraction_split(0.5, 0.1, keeps_ddr=s.keeps_ddr) if s.applies_policy else None
    reqs = poisson_requests(8.0, duration_s=12.0, prompt_tokens=300, output_tokens=[200, 600, 1500], seed=7)
    res = serve(reqs, CostStepTime(cost, strategy), cap, SchedulerConfig(max_num_seqs=32, preemption=preemption),
                until_s=12.0, split=split)
    s, r, m = res.steps, res.requests, res.metrics
    assert (s["hbm_bytes"] <= cap.hbm_blocks * cap.block_bytes).all()
    assert (s["ddr_bytes"] <= cap.ddr_blocks * cap.block_bytes).all()
    assert m["preemptions"] > 0  # the pool is small enough to make the scheduler preempt
    arrived = r[r["arrival_s"] <= 12.0]
    assert m["requests_arrived"] == len(arrived) == len(r)
    assert m["requests_finished"] + m["requests_running"] + m["requests_waiting"] + m["requests_rejected"] == len(r)
    done = r[r["status"] == "finished"]
    assert (done["generated"] == done["output_tokens"]).all()
    assert m["tokens_finished"] == done["output_tokens"].sum() > 0
    assert (r["generated"] <= r["output_tokens"]).all()
    assert m["tokens_generated"] == r["generated"].sum()
    assert (s["running"] <= 32).all()


def test_tiered_split_holds_fewer_hbm_blocks():
    split = fraction_split(0.5, 0.1)
    hbm, ddr = split(np.arange(3), np.array([100, 100, 100]), np.array([100, 300, 1100]))
    # 200 generated: 192 at the last re-tier, 64 beyond the recent 128: 6 evicted, 29 HBM, 29 DDR.
    # 1,000 generated: 960 at the last re-tier, 832 tiered: 83 evicted, 374 HBM, 375 DDR.
    assert hbm.tolist() == [100, 300 - 64 + 29, 1100 - 832 + 374] and ddr.tolist() == [0, 29, 375]
    dropped = fraction_split(0.5, 0.1, keeps_ddr=False)(np.arange(3), np.array([100] * 3), np.array([100, 300, 1100]))
    assert dropped[0].tolist() == hbm.tolist() and dropped[1].tolist() == [0, 0, 0]


def test_table_split_follows_the_replayed_schedule():
    ddr = np.array([[0, 0, 1, 2], [0, 3, 3, 3]])
    evicted = np.array([[0, 0, 0, 1], [0, 0, 1, 1]])
    split = table_split(ddr, evicted, assign=np.array([0, 1, 0]))
    # Request 0 (schedule 0) after 2 generated: 1 DDR, 0 evicted; request 1 (schedule 1) after 9: last row (3, 1).
    hbm, d = split(np.array([0, 1, 2]), np.array([10, 50, 7]), np.array([12, 59, 7]))
    assert d.tolist() == [1, 3, 0] and hbm.tolist() == [11, 55, 7]
    assert table_split(ddr, evicted, np.array([1]), keeps_ddr=False)(np.array([0]), np.array([5]),
                                                                     np.array([8]))[1].tolist() == [0]


# ---- metrics -------------------------------------------------------------------------------------------------------

def test_goodput_counts_known_outcomes():
    r = pd.DataFrame({
        "status": ["finished", "finished", "waiting", "running", "running"],
        "arrival_s": [0.0, 0.0, 0.0, 9.0, 0.0], "first_token_s": [0.1, 0.5, np.nan, 9.1, 0.1],
        "output_tokens": [11, 11, 5, 101, 11], "ttft_s": [0.1, 0.5, np.nan, 0.1, 0.1],
        "tpot_s": [0.01, 0.01, np.nan, np.nan, np.nan],
    })
    g = goodput(r, 10.0, SLO(200, 20))
    # Met: request 0. Known misses: 1 (TTFT 500 ms), 2 (waiting 10 s), 4 (9.9 s of decode over 10 tokens).
    # Unknown: 3 (first token in time, 0.9 s of 100 tokens' decode so far).
    assert g["slo_known"] == 4 and g["goodput_share"] == 0.25 and g["goodput_req_s"] == 0.1


def test_max_sustainable_rate_brackets_the_slo():
    """A 1-second step serving one request at a time: TTFT stays under 3 s only while arrivals are rare."""
    search = max_sustainable_rate(lambda b: 1.0, KVCapacity(16, 10**6), SLO(3000, 1500), duration_s=200.0,
                                  prompt_tokens=8, output_tokens=1, config=SchedulerConfig(max_num_seqs=1))
    rates = dict(search.trials)
    assert 0 < search.rate < 1.0 and rates[search.rate] >= 0.9
    assert all(share < 0.9 for rate, share in search.trials if rate > search.rate * 1.05)


@pytest.mark.parametrize("call, field", [
    (lambda: SLO(0, 50), "slo_ttft_ms"),
    (lambda: SLO(100, -1), "slo_tpot_ms"),
    (lambda: SchedulerConfig(max_num_seqs=0), "max_num_seqs"),
    (lambda: SchedulerConfig(max_num_batched_tokens=0), "max_num_batched_tokens"),
    (lambda: SchedulerConfig(preemption="evict"), "preemption"),
    (lambda: serve([], lambda b: 1.0, KVCapacity(16, 10)), "requests"),
    (lambda: serve([Request(1.0, 2, 2, 0), Request(0.5, 2, 2, 1)], lambda b: 1.0, KVCapacity(16, 10)), "arrivals"),
    (lambda: serve([Request(0.0, 2, 2, 0)], lambda b: 1.0, KVCapacity(16, 10), concurrency=0), "concurrency"),
    (lambda: KVCapacity(0, 10), "block_size"),
])
def test_bad_input_names_the_field(call, field):
    with pytest.raises(ConfigError) as e:
        call()
    assert e.value.field == field and field in str(e.value)
