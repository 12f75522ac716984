"""The replay runs every model family the simulator models — mixture of experts, multi-head latent attention and
hybrid sliding-window attention — with real kernels: exact data movement against the schedules, the latent as the
cached and moved row, sliding layers held at their window and never copied, the experts the simulator charges,
and `validate` end to end on CPU."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from testkit import Probe, cpu_like_profile_file

from tiersim.copy_methods import CPU_METHODS
from tiersim.hw.config import reduced_model
from tiersim.hw.kernels import LayerWeights
from tiersim.hw.moe import moe_mlp
from tiersim.hw.norm import rms_norm
from tiersim.hw.plan import kv_geometry
from tiersim.hw.replay import ReplayConfig, Replayer, memory_need, plan_replay, replay
from tiersim.policy import DDR, HBM, PolicyConfig
from tiersim.sim import SimConfig, simulate
from tiersim.sim.copies import KVLayout
from tiersim.specs import ModelSpec, hardware_spec, model_spec
from tiersim.specs.families import MLASpec, MoESpec
from tiersim.traces.format import read_trace
from tiersim.traces.synth import SynthParams, write_synth_trace
from tiersim.validate import ValidateConfig, validate
from tiersim.workload.build import BCOL, block_totals, build_workload
from tiersim.workload.demand import continuation_params

# float32 so that a position written into a key (or latent) comes back exactly
SHAPE = dict(attention_heads=4, kv_heads=2, head_dim=16, hidden=64, intermediate=128, vocab=256, dtype_bytes=4)
WINDOW = 24
HYBRID = ModelSpec("tiny-hybrid", layers=3, **SHAPE, layer_types=("sliding", "full", "sliding"), sliding_window=WINDOW)
MLA = ModelSpec("tiny-mla", layers=3, **{**SHAPE, "kv_heads": 4, "head_dim": 24},
                mla=MLASpec(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, q_lora_rank=24))
MOE = ModelSpec("tiny-moe", layers=3, **SHAPE, moe=MoESpec(experts=8, experts_per_token=2, expert_intermediate=32,
                                                           shared_experts=1, dense_layers=(0,)))
FAMILIES = [HYBRID, MLA, MOE]
POLICY = PolicyConfig(hbm_ratio=0.5, evict_ratio=0.1, window=16, interval=8)


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("fam") / "t.tstrace"
    write_synth_trace(path, SynthParams(), 3, 20, 200, seed=1)
    return path


def config(model, **kw) -> ReplayConfig:
    base = dict(model=model, policy=POLICY, strategy="prefetch-layer", batch=3, gen_tokens=120, steps=120, depth=1,
                warmup_steps=0, chunk_tokens=8)
    return ReplayConfig(**{**base, **kw})


def workload(trace_path, cfg: ReplayConfig):
    tr = read_trace(trace_path)
    return build_workload(tr, cfg.policy, cfg.gen_tokens, cfg.batch, cfg.decode_steps, cfg.seed, cfg.cold_start,
                          continuation_params(tr), workers=1)


def tiers_at(schedule, t: int) -> np.ndarray:
    """Tier of every position during decode step t (the new token included, in HBM)."""
    tiers = np.zeros(schedule.prompt_tokens + t + 1, dtype=np.int8)
    done = np.flatnonzero(schedule.retier_steps <= t - 1)
    if len(done):
        after = schedule.tiers_after(int(done[-1]))
        tiers[: len(after)] = after
    return tiers


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "deepseek-r1", "gemma-3-270m", "gpt-oss-20b"])
def test_the_families_the_replay_refused_are_accepted(name):
    cfg = ReplayConfig(model=reduced_model(model_spec(name), 4), policy=POLICY, chunk_tokens=16)
    assert cfg.model.layers == 4


def test_cutting_a_model_cuts_its_layer_kinds_and_dense_layers():
    gemma = model_spec("gemma-3-270m")  # five sliding layers, then a full one
    assert reduced_model(gemma, 6).layer_types == gemma.layer_types[:6]
    assert reduced_model(gemma, 6).sliding_window == gemma.sliding_window
    assert reduced_model(gemma, 3).layer_types is None or set(reduced_model(gemma, 3).layer_types) == {"sliding"}
    r1 = model_spec("deepseek-r1")  # three dense layers first
    assert reduced_model(r1, 3).moe is None and reduced_model(r1, 3).mla == r1.mla
    assert reduced_model(r1, 4).moe.dense_layers == (0, 1, 2)
    assert reduced_model(MOE, 2).moe.dense_layers == (0,)


@pytest.mark.parametrize("model", FAMILIES, ids=lambda m: m.name)
@pytest.mark.parametrize("strategy,cold", [("prefetch-layer", True), ("prefetch-sync", False)])
def test_every_attention_sees_exactly_its_layers_tokens(trace_path, model, strategy, cold):
    """Full-attention layers: the schedule's HBM tokens resident and its DDR tokens staged; sliding layers: the last
    `window` positions and nothing staged."""
    cfg = config(model, strategy=strategy, cold_start=cold)
    w = workload(trace_path, cfg)
    probe = Probe()
    replay(cfg, w, probe=probe)
    rows, sliding = w.tables.shape[1], set(model.sliding_layers)
    checked = {True: 0, False: 0}
    for (k, layer, b, _h), (resident, ddr) in probe.seen.items():
        request, row = divmod(int(w.slot_rows[b, k]), rows)
        first = int(w.slot_rows[b, 0]) % rows
        if first != 0 and k < rows - first:  # warm start: this slot's first request began before the run
            continue
        tiers = tiers_at(w.schedules[request], row - 1)
        if layer in sliding:
            last = len(tiers) - 1
            assert (resident, ddr) == (list(range(max(0, last + 1 - WINDOW), last + 1)), []), (k, layer, b)
        else:
            assert (resident, ddr) == (np.flatnonzero(tiers == HBM).tolist(), np.flatnonzero(tiers == DDR).tolist())
        checked[layer in sliding] += 1
    assert checked[False] > 300 and (checked[True] > 300 or not sliding)
    assert any(ddr for _, ddr in probe.seen.values())


@pytest.mark.parametrize("model", FAMILIES, ids=lambda m: m.name)
@pytest.mark.parametrize("method", CPU_METHODS)
def test_copies_move_the_bytes_and_pieces_the_simulator_charges(trace_path, model, method):
    """Per step: the bytes the copy engine moved are the simulator's (full-attention layers only; MLA the latent) and
    the pieces are its per-layer runs (MLA: one part per layer, no V)."""
    cfg = config(model, copy_method=method, block_size=4, policy=dataclasses.replace(POLICY, page_size=4))
    w = workload(trace_path, cfg)
    result = replay(cfg, w)
    sim = simulate(SimConfig(model=model, hardware=hardware_spec("h200-sxm"), policy=cfg.policy, trace=trace_path,
                             strategy=cfg.strategy, batch=3, gen_tokens=120, steps=120, block_size=4,
                             cold_start=cfg.cold_start, depth=cfg.depth), workers=1)
    got = result.copies
    np.testing.assert_array_equal(got.h2d_bytes, sim.steps["h2d_bytes"].to_numpy())
    np.testing.assert_array_equal(got.d2h_bytes[1:], sim.steps["d2h_bytes"].to_numpy()[:-1])  # copied a step later
    full = len(model.full_layers)
    bt = block_totals(w, 4)
    layout = KVLayout("per-layer", 4, full, split_kv=model.mla is None)
    promoted = np.concatenate([[0.0], bt[:-1, BCOL["promoted_runs"]]])
    np.testing.assert_array_equal(got.h2d_pieces, layout.pieces(bt[:, BCOL["ddr_runs"]] + promoted, 0, True))
    assert got.h2d_bytes.sum() > 0
    # every piece is one block of one full-attention layer's K, V or latent
    part_bytes = model.kv_bytes_per_token_layer // layout.parts
    np.testing.assert_array_equal(got.h2d_bytes, got.h2d_pieces * 4 * part_bytes)


def test_the_mla_cache_holds_latents(trace_path):
    cfg = config(MLA)
    w = workload(trace_path, cfg)
    rep = Replayer(cfg, plan_replay(cfg, w))
    a = MLA.mla
    assert rep.v0 == [] and len(rep.k0) == MLA.layers  # one latent pool per layer, no V
    pool = rep.k0[0]
    assert pool.shape[-2:] == (cfg.chunk, a.kv_lora_rank + a.qk_rope_head_dim) and pool.shape[-3] == 1
    tokens = pool.numel() // pool.shape[-1]
    assert pool.numel() * pool.element_size() / tokens == MLA.kv_bytes_per_token_layer == (32 + 8) * 4
    host = rep.host[0]
    assert host.numel() * host.element_size() == rep.plan.layout.host_v_offset * MLA.kv_bytes_per_token_layer
    result = rep.run()
    staged = np.array([s.staged_rows for s in rep.plan.steps])
    # a DDR-tier token moves its latent of every layer: 160 bytes x 3 layers, not 2 x heads x head_dim
    np.testing.assert_array_equal(result.copies.h2d_bytes[staged > 0] % (MLA.layers * 160), 0)
    assert (result.copies.h2d_bytes >= staged * MLA.layers * 160).all()


def test_mla_absorbed_attention_equals_the_unabsorbed_form():
    """The replay's absorbed MLA (queries through W_UK into the latent, output through W_UV) is the same attention
    as the textbook form that up-projects every cached latent to per-head K and V."""
    from tiersim.hw.kernels import attention_output, prefill_attention, project

    torch.manual_seed(0)
    m, a = MLA, MLA.mla
    wt = LayerWeights.random(m, torch.device("cpu"), torch.float64)
    x = torch.randn(7, m.hidden, dtype=torch.float64)
    q, kn, vn = project(m, wt, rms_norm(x, wt.norm))
    from tiersim.hw.kernels import attn_shape

    absorbed = attention_output(m, wt, prefill_attention(q, kn, vn, 1, 7, attn_shape(m)))
    # unabsorbed: per-head keys [nope from the latent | shared rope], values from the latent
    h = rms_norm(x, wt.norm)
    qf = (rms_norm(h @ wt.mla.q_a.T, wt.mla.q_norm) @ wt.mla.q_b.T).view(7, 4, 24)
    c, rope = kn.split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
    k_nope = torch.einsum("tr,hnr->thn", c, wt.mla.w_uk)
    k = torch.cat([k_nope, rope[:, None, :].expand(7, 4, 8)], dim=-1)
    v = torch.einsum("tr,hvr->thv", c, wt.mla.w_uv)
    o = torch.nn.functional.scaled_dot_product_attention(qf.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                         is_causal=True)
    plain = o.transpose(0, 1).reshape(7, 4 * a.v_head_dim) @ wt.o.T
    torch.testing.assert_close(absorbed, plain)


def test_sliding_layers_keep_their_window_and_have_no_pools_or_copies(trace_path):
    cfg = config(HYBRID)
    w = workload(trace_path, cfg)
    need = memory_need(cfg, w)
    rep = Replayer(cfg, plan_replay(cfg, w))
    assert len(rep.k0) == len(rep.host) == 1 and len(rep.k_ring) == len(rep.v_ring) == 2  # one full, two sliding
    assert rep.k_ring[0].shape == (cfg.batch, HYBRID.kv_heads, WINDOW, HYBRID.head_dim)
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    assert size(rep.k_ring + rep.v_ring) == need.device["sliding windows"] \
        == HYBRID.kv_bytes_sliding_fixed(cfg.batch)  # the window of every slot, whatever the context
    assert size(rep.k0 + rep.v0) == need.device["T0 pools"]
    assert size(rep.host) == need.host["DDR pool"]
    result = rep.run()
    staged = np.array([s.staged_rows for s in rep.plan.steps])
    per_token = HYBRID.kv_bytes_per_token_layer  # only the full layer's KV crosses the link
    assert HYBRID.kv_bytes_per_token_global == per_token
    np.testing.assert_array_equal(result.copies.h2d_bytes[staged > 0] % per_token, 0)
    assert result.copies.h2d_bytes.sum() >= staged.sum() * per_token > 0


@pytest.mark.parametrize("model", FAMILIES, ids=lambda m: m.name)
def test_memory_need_covers_what_the_replay_allocates(trace_path, model):
    cfg = config(model)
    w = workload(trace_path, cfg)
    need = memory_need(cfg, w)
    rep = Replayer(cfg, plan_replay(cfg, w))
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    assert size([rep.lm_head] + [t for lw in rep.weights for t in lw.tensors()]) <= need.device["weights"]
    assert size(rep.k0 + rep.v0) == need.device["T0 pools"]
    assert size(rep.staging) == need.device["staging"]
    assert size(rep.host) == need.host["DDR pool"]
    geo = kv_geometry(model)
    assert geo.parts * geo.heads * geo.width * model.dtype_bytes == model.kv_bytes_per_token_layer


def test_moe_layer_is_the_mixture_it_claims():
    """The grouped per-expert matmuls equal every expert computed on every token, weighted by the renormalised
    top-k router probabilities (zero elsewhere), plus the shared expert; and only the chosen experts are counted."""
    torch.manual_seed(1)
    lw = LayerWeights.random(MOE, torch.device("cpu"), torch.float64, layer=1)
    e = lw.moe
    h = torch.randn(5, MOE.hidden, dtype=torch.float64)
    out = moe_mlp(h, e)
    probs = torch.softmax(h @ e.router.T, dim=-1)
    top_w, top_i = probs.topk(2, dim=-1)
    gates = torch.zeros_like(probs).scatter(1, top_i, top_w / top_w.sum(-1, keepdim=True))
    silu = torch.nn.functional.silu
    every = torch.stack([(silu(g) * u) @ e.down[i].T for i in range(8)
                         for g, u in [(h @ e.gate_up[i].T).chunk(2, dim=-1)]], dim=1)  # [T, E, hidden]
    sg, su = (h @ e.shared_gate_up.T).chunk(2, dim=-1)
    want = (gates[..., None] * every).sum(1) + (silu(sg) * su) @ e.shared_down.T
    torch.testing.assert_close(out, want)
    assert e.touched == [len(set(top_i.flatten().tolist()))]


def test_moe_replay_reads_the_experts_the_simulator_charges(trace_path):
    """The experts the replay's routing reaches per MoE layer and step, averaged, are the simulator's expected
    E (1 - (1 - k/E)^T) for the batch's T new tokens, and the expert bytes it reports are those experts' weights."""
    cfg = config(MOE, strategy="full", steps=64)
    w = workload(trace_path, cfg)
    result = replay(cfg, w)
    decode = np.array([not s.prefill.any() for s in plan_replay(cfg, w).steps])
    expected = MOE.moe.experts_touched(cfg.batch)  # 8 (1 - 0.75^3) = 4.625 for three decoding slots
    assert abs(result.experts_touched[decode].mean() - expected) < 0.1 * expected
    per_expert = 3 * MOE.hidden * MOE.moe.expert_intermediate * MOE.dtype_bytes
    np.testing.assert_allclose(result.expert_bytes, result.experts_touched * MOE.moe_layers * per_expert)


def _tiny_configs(tmp_path):
    """Small config.json files of the two families the catalog has only at full size, read by the family readers."""
    moe = {"model_type": "qwen3_moe", "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 32, "num_hidden_layers": 2, "intermediate_size": 384, "moe_intermediate_size": 64,
           "num_experts": 16, "num_experts_per_tok": 4, "vocab_size": 512, "norm_topk_prob": True,
           "torch_dtype": "bfloat16", "decoder_sparse_step": 1, "mlp_only_layers": []}
    mla = {"model_type": "deepseek_v3", "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
           "num_hidden_layers": 2, "intermediate_size": 256, "moe_intermediate_size": 64, "n_routed_experts": 8,
           "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 64,
           "q_lora_rank": 96, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "vocab_size": 512,
           "torch_dtype": "bfloat16", "topk_method": "noaux_tc"}
    paths = []
    for name, cfg in (("tiny-qwen3-moe", moe), ("tiny-deepseek-v3", mla)):
        path = tmp_path / name / "config.json"
        path.parent.mkdir()
        path.write_text(json.dumps(cfg))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    return cpu_like_profile_file(tmp_path_factory.mktemp("prof"))


def test_validate_measures_each_family_on_cpu(trace_path, profile, tmp_path):
    moe_path, mla_path = _tiny_configs(tmp_path)
    models = [model_spec(moe_path), model_spec(mla_path), model_spec("gemma-3-270m")]
    assert models[0].moe is not None and models[1].mla is not None and models[1].moe is not None
    for model in models:
        cfg = ValidateConfig(model=model, profile=profile, policy=POLICY, trace=trace_path, strategy="prefetch-layer",
                             depth=1, batch=2, gen_tokens=60, steps=24, layers=min(model.layers, 6), warmup_steps=1,
                             any_model=True)
        report = validate(cfg)
        assert report["measured_step_ms"] > 0 and report["predicted_step_ms"] > 0
        assert report["h2d_gb_per_step"] == pytest.approx(report["predicted_h2d_gb_per_step"])
        if model.moe is not None:
            assert report["measured_experts_per_layer"] > 0 and report["predicted_experts_per_layer"] > 0
        else:
            assert "measured_experts_per_layer" not in report
