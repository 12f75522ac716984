"""Copy mechanisms: each formula against a hand computation, the pieces a layout makes, the engine never beating
the analytic bound for any mechanism, and bad input named by its field."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiersim.errors import ConfigError
from tiersim.policy import PolicyConfig
from tiersim.sim import SimConfig, engine
from tiersim.sim.copies import COPY_METHODS, CopyCost, KVLayout, get_copy_method
from tiersim.sim.engine import StepPlan
from tiersim.sim.plan import bound_s, estimate_s
from tiersim.specs import hardware_spec
from tiersim.strategy import get_strategy

H200 = hardware_spec("h200-sxm")  # copy_latency 2.5 us, link 55 GB/s pinned / 15 pageable, 8 GPUs on 2 x 160 GB/s
N, S = 1000, 32768  # pieces, bytes each
B = N * S


@pytest.mark.parametrize(("name", "calls", "want"), [
    # one call per piece: 2.5 us + s_half (128 KiB) / link per piece, then the bytes at the link rate
    ("dma", N, N * (2.5e-6 + 128 * 1024 / 55e9) + B / 55e9),
    # one call, 1.0 us per descriptor
    ("dma-batched", 1, 2.5e-6 + N * 1.0e-6 + B / 55e9),
    # one launch (10 us), 90% of the link
    ("gather-kernel", 1, 10e-6 + B / (0.9 * 55e9)),
    # 4 chunks of 8 MiB; gather 2B / 40 GB/s (2 x 160 / 8); DMA 4 x 2.5 us + (B + 4 s_half) / link; a 2-stage pipe
    ("host-gather", 1, max(2 * B / 40e9, 4 * 2.5e-6 + (B + 4 * 131072) / 55e9)
     + min(2 * B / 40e9, 4 * 2.5e-6 + (B + 4 * 131072) / 55e9) / 4),
    # the prototype: host gather, then one pageable copy per call (K and V of 48 layers) at 15 GB/s
    ("pageable", 96, 2 * B / 40e9 + 96 * 2.5e-6 + B / 15e9),
])
def test_each_mechanism_costs_what_its_formula_says(name, calls, want):
    method = COPY_METHODS[name]
    cost = CopyCost(method, H200, H200.host_ddr_gbps_per_gpu()[0])
    link = H200.h2d_gbps(method.pinned)
    assert float(cost.seconds(B, N, calls, link)) == pytest.approx(want, rel=1e-12)
    assert float(cost.seconds(0, 0, calls, link)) == 0.0  # nothing to move costs nothing


def test_the_dma_size_curve_is_exact_for_any_mix_of_piece_sizes():
    # bw(s) = link x s / (s + s_half): summing s / bw(s) over pieces of different sizes gives the closed form.
    sizes = np.array([2048, 32768, 1 << 20, 7])
    by_piece = sum(2.5e-6 + s / (55e9 * s / (s + 131072)) for s in sizes)
    cost = CopyCost(COPY_METHODS["dma"], H200, 40.0)
    assert float(cost.seconds(sizes.sum(), len(sizes), len(sizes), 55.0)) == pytest.approx(by_piece, rel=1e-12)


def test_layouts_make_the_pieces_by_hand():
    # 10 runs of DDR tokens, 4 of them whole blocks, 48 layers, K and V apart.
    per_layer, cross = KVLayout("per-layer", 16, 48, True), KVLayout("cross-layer", 16, 48, True)
    assert per_layer.pieces(10, 4, all_layers=False) == 20  # K and V of each run
    assert per_layer.pieces(10, 4, all_layers=True) == 960
    assert cross.pieces(10, 4, all_layers=False) == 4 + 2 * 6  # a whole block's K and V of a layer lie together
    assert cross.pieces(10, 4, all_layers=True) == 4 + 96 * 6  # a whole block of every layer is one piece
    assert KVLayout("per-layer", 16, 48, False).pieces(10, 4, all_layers=True) == 480  # MLA: one latent per layer


def steady_plan(strategy, layers, matmul, attention, head, h2d, duplex, d2h, slow, serial) -> StepPlan:
    """A plan whose every step is the same (stationary demand: the per-step bound is a true lower bound)."""
    steps = 6
    f = lambda v: np.full(steps, float(v))  # noqa: E731
    zeros = f(0)
    return StepPlan(
        strategy=get_strategy(strategy), layers=layers, depth=1, matmul_s=f(matmul), attention_s=f(attention),
        head_s=f(head), qkv_share=0.25, h2d_layer_s=f(h2d), h2d_layer_duplex_s=f(h2d * duplex),
        h2d_bulk_s=zeros, h2d_bulk_duplex_s=zeros, d2h_bulk_s=f(d2h), d2h_bulk_duplex_s=f(d2h * duplex),
        query_d2h_s=zeros, host_attention_s=zeros, partial_h2d_s=zeros, h2d_layer_slow=f(slow),
        d2h_bulk_slow=f(slow), serial_copies=serial)


times = st.floats(0.01, 4.0)


@settings(max_examples=60, deadline=None)
@given(strategy=st.sampled_from(["prefetch-layer", "prefetch-sync", "full"]), layers=st.integers(1, 4),
       matmul=times, attention=times, head=times, h2d=times, duplex=st.floats(1.0, 2.0), d2h=times,
       slow=st.floats(0.3, 1.0), serial=st.booleans())
def test_the_simulated_step_is_never_below_its_bound(strategy, layers, matmul, attention, head, h2d, duplex, d2h,
                                                       slow, serial):
    # Whatever the mechanism (its durations, its interference factor, whether it runs on the compute stream).
    plan = steady_plan(strategy, layers, matmul, attention, head, h2d, duplex, d2h, slow, serial)
    tl = engine.run(plan)
    assert tl.step_s.mean() >= bound_s(plan).mean() * (1 - 1e-9)
    np.testing.assert_allclose(tl.step_s, tl.compute_s + tl.stall_s + tl.interference_s, rtol=1e-9, atol=1e-12)
    assert estimate_s(plan).mean() >= bound_s(plan).mean() * (1 - 1e-12)


@pytest.mark.parametrize("method", ["dma", "dma-batched", "gather-kernel", "host-gather"])
def test_a_real_run_never_beats_its_bound(method, small_run):
    s = small_run(copy_method=method)
    assert s["copy_method"] == method
    assert s["step_ms_mean"] >= s["bound_step_ms"] * (1 - 1e-9)
    assert s["h2d_pieces_per_step"] > 0 and s["h2d_piece_bytes"] == 16 * 4 * 128 * 2  # a 16-token block of K or V


def test_auto_picks_the_cheapest_estimate_and_says_which(small_run):
    s = small_run(copy_method="auto")
    estimates = s["copy_method_estimates_ms"]
    assert set(estimates) == {"dma", "dma-batched", "gather-kernel", "host-gather"}
    assert s["copy_method"] == min(estimates, key=estimates.get)


@pytest.fixture(scope="module")
def small_run():
    from tiersim.sim import simulate

    def run(**kw):
        return simulate(SimConfig(model="r1-qwen-7b", hardware="h200-sxm", batch=4, gen_tokens=600, **kw)).summary
    return run


# -- bad input --------------------------------------------------------------------------------------
def test_bad_input_names_the_field():
    with pytest.raises(ConfigError, match="copy_method 'memcpy' unknown") as e:
        SimConfig(model="r1-qwen-7b", hardware="h200-sxm", copy_method="memcpy")
    assert e.value.field == "copy_method"
    with pytest.raises(ConfigError, match="needs pinned host memory"):
        SimConfig(model="r1-qwen-7b", hardware="h200-sxm", copy_method="dma", pinned=False)
    with pytest.raises(ConfigError, match="block_size 16 and the tiering unit page_size 24 do not nest") as e:
        SimConfig(model="r1-qwen-7b", hardware="h200-sxm", policy=PolicyConfig(page_size=24))
    assert e.value.field == "block_size"
    with pytest.raises(ConfigError, match="kv_layout 'paged' unknown") as e:
        SimConfig(model="r1-qwen-7b", hardware="h200-sxm", kv_layout="paged")
    bare = dataclasses.replace(H200, dma_half_size_kb=None,
                               sources={k: v for k, v in H200.sources.items() if k != "dma_half_size_kb"})
    with pytest.raises(ConfigError, match="needs the hardware profile field 'dma_half_size_kb'"):
        CopyCost(get_copy_method("dma"), bare, 40.0)


def test_the_tiering_unit_defaults_to_the_block():
    assert SimConfig(model="r1-qwen-7b", hardware="h200-sxm").policy.page_size == 16
    assert SimConfig(model="r1-qwen-7b", hardware="h200-sxm", block_size=64).policy.page_size == 64
    assert SimConfig(model="r1-qwen-7b", hardware="h200-sxm", policy=PolicyConfig(page_size=32)).policy.page_size == 32
    assert SimConfig(model="r1-qwen-7b", hardware="h200-sxm", block_size=1).policy.page_size == 1  # per token
    # A given page_size of 1 is kept: per-token tiering inside 16-token blocks (--page-size 1 --block-size 16).
    assert SimConfig(model="r1-qwen-7b", hardware="h200-sxm", policy=PolicyConfig(page_size=1)).policy.page_size == 1
    # The prototype mode tiers tokens, as the authors' manage_cache did.
    proto = PolicyConfig(eviction="prototype")
    assert SimConfig(model="r1-qwen-7b", hardware="h200-sxm", policy=proto).policy.page_size == 1


def test_the_simulator_and_the_replay_share_one_table_of_mechanisms():
    from tiersim import copy_methods
    from tiersim.hw import copies as hw_copies
    from tiersim.sim import copies as sim_copies

    assert sim_copies.COPY_METHODS is copy_methods.COPY_METHODS
    assert sim_copies.COPY_METHOD_CHOICES == hw_copies.COPY_CHOICES == ("dma", "dma-batched", "gather-kernel",
                                                                         "host-gather", "auto")
    assert hw_copies.COPY_METHODS == copy_methods.PINNED_METHODS
    # The replay runs on a CPU device every pinned mechanism but the zero-copy kernel (no mapped memory, no GPU).
    assert hw_copies.CPU_METHODS == ("dma", "dma-batched", "host-gather")
    assert [m.name for m in copy_methods.COPY_METHODS.values() if not m.pinned] == ["pageable"]
