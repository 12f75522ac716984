"""The replay's copy mechanisms (hw/copies.py): pieces in blocks computed by hand, every CPU mechanism moving exactly
the schedule's tokens and exactly the pieces and bytes the simulator charges, buffers allocated once, and bad
input refused by field."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from testkit import Probe

from tiersim.errors import ConfigError
from tiersim.hw.copies import CPU_METHODS, block_runs, coalesce, piece_count, resolve_method
from tiersim.hw.replay import ReplayConfig, Replayer, plan_replay, replay
from tiersim.policy import DDR, HBM, PolicyConfig
from tiersim.sim.copies import KVLayout
from tiersim.specs import ModelSpec
from tiersim.traces.format import read_trace
from tiersim.traces.synth import SynthParams, write_synth_trace
from tiersim.workload.build import BCOL, block_totals, build_workload
from tiersim.workload.demand import continuation_params

# float32 so that a position written into a key comes back exactly
TINY = ModelSpec("tiny-copies", layers=2, attention_heads=4, kv_heads=2, head_dim=16, hidden=64, intermediate=128,
                 vocab=256, dtype_bytes=4)
BLOCK = 4
POLICY = PolicyConfig(hbm_ratio=0.4, evict_ratio=0.1, window=16, interval=8, page_size=BLOCK)


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("copies") / "t.tstrace"
    write_synth_trace(path, SynthParams(), 3, 20, 160, seed=2)
    return path


def config(**kw) -> ReplayConfig:
    base = dict(model=TINY, policy=POLICY, strategy="prefetch-layer", batch=3, gen_tokens=100, steps=120, depth=1,
                warmup_steps=0, chunk_tokens=8, block_size=BLOCK)
    return ReplayConfig(**{**base, **kw})


def workload(trace_path, cfg: ReplayConfig):
    tr = read_trace(trace_path)
    return build_workload(tr, cfg.policy, cfg.gen_tokens, cfg.batch, cfg.decode_steps, cfg.seed, cfg.cold_start,
                          continuation_params(tr), workers=1)


def test_pieces_are_runs_inside_one_block_counted_by_hand():
    pos = np.array([0, 1, 2, 3, 5, 6, 16, 17, 31, 32, 33])
    first, tokens, index = block_runs(pos, 16)
    assert first.tolist() == [0, 5, 16, 31, 32]  # 0-3 and 5-6 split by the gap, 31 | 32 by the block boundary
    assert tokens.tolist() == [4, 2, 2, 1, 2] and index.tolist() == [0, 4, 6, 8, 9]
    assert piece_count(pos, 4) == 5  # the same runs: each already lies inside one 4-token block
    assert piece_count(np.arange(2, 10), 4) == 3  # 2-3 | 4-7 | 8-9
    assert piece_count(np.arange(64), 16) == 4 and piece_count(np.zeros(0), 16) == 0
    src, rows = coalesce(np.array([0, 8, 16, 40, 48]), np.array([8, 8, 8, 8, 4]))
    assert src.tolist() == [0, 40] and rows.tolist() == [24, 12]


def test_auto_keeps_the_replays_long_standing_choice():
    assert resolve_method("auto", cuda=False, pinned=True, uva=False) == "dma-batched"  # one fused index_select
    assert resolve_method("auto", cuda=True, pinned=True, uva=True) == "gather-kernel"
    assert resolve_method("auto", cuda=True, pinned=True, uva=False) == "host-gather"
    assert resolve_method("dma", cuda=True, pinned=False, uva=True) == "pageable"


def _simulator_pieces(w, cfg: ReplayConfig) -> tuple[np.ndarray, np.ndarray]:
    """Pieces per step the simulator charges, from its own functions (workload.block_totals, sim.copies.KVLayout):
    staged DDR runs of every layer, plus the runs promoted at the last step's re-tier (H2D); demoted runs (D2H)."""
    bt = block_totals(w, cfg.block_size)
    layout = KVLayout("per-layer", cfg.block_size, cfg.model.layers, split_kv=True)
    promoted = np.concatenate([[0.0], bt[:-1, BCOL["promoted_runs"]]])
    h2d = layout.pieces(bt[:, BCOL["ddr_runs"]] + promoted, 0, all_layers=True)
    d2h = layout.pieces(bt[:, BCOL["demoted_runs"]], 0, all_layers=True)
    return h2d, d2h


@pytest.mark.parametrize("method", CPU_METHODS)
@pytest.mark.parametrize("strategy", ["prefetch-layer", "prefetch-sync"])
def test_replay_moves_the_pieces_and_bytes_the_simulator_charges(trace_path, method, strategy):
    cfg = config(copy_method=method, strategy=strategy)
    w = workload(trace_path, cfg)
    result = replay(cfg, w)
    assert result.copy_method == method
    got = result.copies
    h2d, d2h = _simulator_pieces(w, cfg)
    np.testing.assert_array_equal(got.h2d_pieces, h2d)
    np.testing.assert_array_equal(got.h2d_bytes, result.h2d_bytes)  # the plan's bytes, which equal the simulator's
    # Demotions decided at the end of step k: the simulator books them to step k, the replay copies them in step k+1.
    np.testing.assert_array_equal(got.d2h_pieces[1:], d2h[:-1])
    np.testing.assert_array_equal(got.d2h_bytes, result.d2h_bytes)
    assert got.h2d_pieces.sum() > 0 and got.d2h_pieces.sum() > 0
    # With the tiering unit equal to the block every piece is a whole block: K or V of one layer.
    piece_bytes = BLOCK * TINY.kv_bytes_per_token_layer // 2
    np.testing.assert_array_equal(got.h2d_bytes, got.h2d_pieces * piece_bytes)
    # Copy calls issued: one per piece (dma), one fused gather per layer (dma-batched), one per bounce chunk
    # (host-gather: one chunk here); each layer's promotions are one more.
    steps = plan_replay(cfg, w).steps
    L = TINY.layers
    promoted = 2 * L * np.array([s.promote_pieces for s in steps])
    staged = L * np.array([s.staged_set is not None for s in steps])
    calls = got.h2d_pieces - promoted if method == "dma" else staged
    np.testing.assert_array_equal(got.h2d_calls, calls + L * np.array([s.promote is not None for s in steps]))


@pytest.mark.parametrize("method", CPU_METHODS)
def test_every_mechanism_stages_exactly_the_schedules_ddr_tokens(trace_path, method):
    # token-level tiering inside 4-token blocks: pieces are partial blocks, the per-piece paths must still be exact
    cfg = config(copy_method=method, policy=dataclasses.replace(POLICY, page_size=1), cold_start=True)
    w = workload(trace_path, cfg)
    probe = Probe(ddr_in_order=True)
    replay(cfg, w, probe=probe)
    rows, checked = w.tables.shape[1], 0
    for (k, _layer, b, _h), (resident, ddr) in probe.seen.items():
        request, row = divmod(int(w.slot_rows[b, k]), rows)
        s, t = w.schedules[request], row - 1
        tiers = np.zeros(s.prompt_tokens + t + 1, dtype=np.int8)
        done = np.flatnonzero(s.retier_steps <= t - 1)
        if len(done):
            after = s.tiers_after(int(done[-1]))
            tiers[: len(after)] = after
        assert resident == np.flatnonzero(tiers == HBM).tolist()
        assert ddr == np.flatnonzero(tiers == DDR).tolist(), (method, k, b)  # in order: pieces land in place
        checked += bool(ddr)
    assert checked > 100


def test_copy_buffers_are_allocated_once(trace_path):
    cfg = config(copy_method="host-gather")
    w = workload(trace_path, cfg)
    rep = Replayer(cfg, plan_replay(cfg, w))
    c = rep.copier
    before = [t.data_ptr() for t in (*c.bounce, c.demote_dev, c.promote_dev)]
    rep.run()
    assert [t.data_ptr() for t in (*c.bounce, c.demote_dev, c.promote_dev)] == before
    assert c.counts.h2d_calls.sum() > 0


@pytest.mark.parametrize("kw,field,words", [
    (dict(copy_method="memcpy"), "copy_method", "accepted: dma, dma-batched, gather-kernel, host-gather, auto"),
    (dict(copy_method="gather-kernel"), "copy_method", "needs a CUDA device"),
    (dict(copy_method="dma", pinned=False), "copy_method", "needs pinned host memory"),
    (dict(block_size=3), "block_size", "does not divide into the T0 chunk layout"),
    (dict(block_size=0), "block_size", ">= 1"),
])
def test_bad_input_names_the_field(kw, field, words):
    with pytest.raises(ConfigError, match=words) as e:
        config(**kw)
    assert e.value.field == field


def test_every_mechanism_fills_the_staging_buffer_bit_for_bit(trace_path):
    cfg = config(policy=dataclasses.replace(POLICY, page_size=1))
    w = workload(trace_path, cfg)
    plan = plan_replay(cfg, w)
    sets = [s.staged_set for s in plan.steps if s.staged_set is not None]
    assert len(sets) > 1
    outs = {}
    for method in CPU_METHODS:
        rep = Replayer(dataclasses.replace(cfg, copy_method=method), plan_replay(cfg, w))
        host = rep.host[0]
        host.copy_(torch.randn(host.shape, generator=torch.Generator().manual_seed(3)))
        for st in (s.staged_set for s in rep.plan.steps if s.staged_set is not None):
            out = torch.full((len(st.gather) + 5, TINY.head_dim), float("nan"))
            rep.copier.stage(0, host, None, st, out)
            want = host.index_select(0, torch.as_tensor(st.gather))  # K rows then V rows, in staging order
            assert torch.equal(out[: len(st.gather)], want), method
            assert out[len(st.gather):].isnan().all()  # nothing written past the staged rows
            outs.setdefault(method, []).append(out)
    assert all(len(v) == len(sets) for v in outs.values())


def test_the_tiering_unit_follows_the_block_as_in_the_simulator():
    unset = dataclasses.replace(POLICY, page_size=None)
    assert config(policy=unset).policy.page_size == BLOCK
    assert config(policy=unset, block_size=8).policy.page_size == 8
    assert config(policy=dataclasses.replace(POLICY, page_size=1)).policy.page_size == 1
    with pytest.raises(ConfigError, match="do not nest") as e:
        config(policy=dataclasses.replace(POLICY, page_size=3))
    assert e.value.field == "block_size"


def test_memory_need_counts_the_landing_and_re_tier_buffers(trace_path):
    from tiersim.hw.memory import memory_need
    from tiersim.workload.build import COL

    cfg = config(policy=dataclasses.replace(POLICY, page_size=1))
    w = workload(trace_path, cfg)
    row = TINY.head_dim * TINY.dtype_bytes
    staged = int(w.totals[:, COL["ddr"]].max()) * TINY.kv_heads
    moved = (int(w.totals[:, COL["hbm_to_ddr"]].max()) + int(w.totals[:, COL["ddr_to_hbm"]].max())) * TINY.kv_heads
    assert moved > 0 and staged > 0
    cpu = memory_need(cfg, w)
    assert cpu.device["landing"] == 0 and cpu.device["re-tier buffers"] == 2 * moved * row
    assert "re-tier buffers" not in cpu.host  # the CPU device has no pinned side
    # What the Copier allocates on CUDA (memory_need reads no device): dma lands the pieces, then reorders them.
    cuda = memory_need(dataclasses.replace(cfg, device="cuda", copy_method="dma"), w)
    assert cuda.device["landing"] == 2 * staged * row and cuda.host["re-tier buffers"] == 2 * moved * row
    assert memory_need(dataclasses.replace(cfg, device="cuda"), w).device["landing"] == 0  # auto: no landing
