"""hw.TieredCache: the quantiser, the tier index, and exactness (own loop and generate) on a tiny random Llama and SmolLM2."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from tiersim.errors import TiersimError
from tiersim.hw.tiered_cache import TieredCache, TierIndex, decode
from tiersim.hw.tiered_cache_quant import dequantize, quantize
from tiersim.policy import COMPRESSED, DDR, EVICTED, HBM, PolicyConfig
from tiersim.traces.hf import decode_rows, prefill_scores

BETAS = (0.3, 0.5, 0.7)
SHORT = {"sinks": 2, "window": 8, "interval": 8}  # re-tiers every 8 steps once 10 tokens were generated


def policy(hbm_ratio=0.5, evict_ratio=0.0, **kw):
    return PolicyConfig(hbm_ratio=hbm_ratio, evict_ratio=evict_ratio, **{**SHORT, **kw})


def run(model, prompt, cache, steps, **kw):
    """Decode `steps` tokens (EOS ignored); the logits of every step."""
    logits = []
    out = decode(model, prompt, cache, steps, on_logits=lambda i, x: logits.append(x.clone()), **kw)
    return out.tokens, logits


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------- the quantiser


def test_quantize_int8_by_hand():
    x = torch.tensor([[[[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]]]])  # (1 batch, 1 head, 2 tokens, dim 4)
    q = quantize(x, 8)
    scale = torch.tensor(1 / 127, dtype=torch.float16)
    assert q.data.dtype == torch.int8 and q.scale.dtype == torch.float16
    assert q.scale[0, 0, 0, 0] == scale and q.scale[0, 0, 1, 0] == 0
    expected = torch.round(torch.tensor([1.0, -0.5, 0.25, 0.0]) / scale.float())
    assert torch.equal(q.data[0, 0, 0].float(), expected) and q.data[0, 0, 0, 0] == 127
    assert torch.equal(dequantize(q, torch.float32)[0, 0, 1], torch.zeros(4))  # an all-zero row stays zero
    assert q.nbytes == 2 * 4 * 1 + 2 * 2  # codes + one float16 scale per token and head


@pytest.mark.parametrize("bits", [4, 2])
def test_sub_byte_codes_pack_two_or_four_per_byte(bits):
    qmax = 2 ** (bits - 1) - 1
    levels = torch.arange(-qmax, qmax + 1, dtype=torch.float32)
    row = levels.repeat(8)[:8] * 0.5  # absmax 0.5·qmax: every code lands exactly on a level
    x = row.reshape(1, 1, 1, 8)
    q = quantize(x, bits)
    assert q.data.dtype == torch.uint8 and q.data.shape == (1, 1, 1, 8 * bits // 8)
    assert torch.equal(dequantize(q, torch.float32), x)  # exact: every value is a multiple of the scale 0.5


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([8, 4, 2]), st.floats(1e-2, 1e2))
def test_quantisation_error_is_half_a_step(seed, bits, magnitude):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 3, 5, 16), generator=g) * magnitude
    q = quantize(x, bits)
    err = (dequantize(q, torch.float32) - x).abs()
    absmax = x.abs().amax(-1, keepdim=True)
    # half a quantisation step, plus what the float16 rounding of the scale can add at the extremes
    assert torch.all(err <= 0.5 * q.scale.float() + absmax * 2.0**-10)


def test_quantize_refuses_bad_widths():
    with pytest.raises(TiersimError, match="2, 4 or 8"):
        quantize(torch.zeros(1, 1, 1, 8), 3)
    with pytest.raises(TiersimError, match="multiple of 4"):
        quantize(torch.zeros(1, 1, 1, 6), 2)


# ---------------------------------------------------------------- the tier index


def test_tier_index_by_hand():
    ix = TierIndex.from_tiers(np.array([HBM, DDR, EVICTED, COMPRESSED, HBM, DDR]))
    assert ix.seen == 6 and ix.kept.tolist() == [0, 1, 3, 4, 5]
    assert [p.tolist() for p in ix.positions] == [[0, 4], [1, 5], [3]]
    assert [s.tolist() for s in ix.slots] == [[0, 3], [1, 4], [2]]  # slots in the kept order
    assert ix.counts().tolist() == [2, 2, 1, 1] and not ix.hbm_only
    assert TierIndex.from_tiers(np.array([HBM, EVICTED, HBM])).hbm_only


def test_aggregation_matches_capture_by_hand():
    a = torch.zeros(1, 2, 1, 3)
    a[0, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    a[0, 1, 0] = torch.tensor([0.0, 0.5, 0.5])
    b = torch.full((1, 2, 1, 3), 1 / 3)
    assert np.allclose(decode_rows([a, b]).mean(0)[0], [(0.5 + 1 / 3) / 2, (0.25 + 1 / 3) / 2, (0.25 + 1 / 3) / 2])
    p = torch.tril(torch.ones(1, 1, 2, 2)) / torch.tensor([1.0, 2.0]).reshape(1, 1, 2, 1)  # rows [1,0], [.5,.5]
    assert np.allclose(prefill_scores([p, p])[0], [1.5, 0.5])  # column sums, mean over heads and layers


# ---------------------------------------------------------------- a tiny random Llama (float32, eager)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()


PROMPT = list(range(3, 23))
STEPS = 64


@pytest.fixture(scope="module")
def tiny_full(tiny):
    return run(tiny, PROMPT, None, STEPS)


def test_tiny_no_eviction_is_bit_identical_to_dynamic_cache(tiny, tiny_full):
    for beta in BETAS:
        cache = TieredCache.for_model(tiny, policy(beta))
        tokens, logits = run(tiny, PROMPT, cache, STEPS)
        stats = cache.stats.to_dict()
        assert stats["retiers"] == 6  # 63 tokens fed back: re-tiers after the 16th, 24th, ..., 56th
        assert stats["moved_to"]["ddr"] > 0 and stats["max_tokens"]["ddr"] > 0  # DDR really held KV
        assert stats["final_tokens"]["evicted"] == 0
        assert tokens == tiny_full[0] and same(logits, tiny_full[1])


def test_tiny_eviction_is_bit_identical_across_beta_and_differs_from_full(tiny, tiny_full):
    runs = []
    for beta in BETAS:
        cache = TieredCache.for_model(tiny, policy(beta, 0.2))
        runs.append(run(tiny, PROMPT, cache, STEPS))
        # last re-tier after 56 fed tokens: 56 − 2 sinks − 8 window = 46 candidates, ⌊0.2 · 46⌋ = 9 evicted
        assert cache.stats.to_dict()["final_tokens"]["evicted"] == 9
        assert cache.stats.to_dict()["max_tokens"]["ddr"] > 0
    for tokens, logits in runs[1:]:
        assert tokens == runs[0][0] and same(logits, runs[0][1])
    assert not same(runs[0][1], tiny_full[1])


def test_tiny_eviction_equals_masking_the_evicted_positions(tiny):
    """Attending over the kept positions is the full cache with evicted positions masked out (RoPE positions kept)."""
    cache = TieredCache.for_model(tiny, policy(0.3, 0.2))
    tokens, logits = run(tiny, PROMPT, cache, 40)
    ref = DynamicCache(config=tiny.config)
    reference = TieredCache.for_model(tiny, policy(0.3, 0.2))  # replays the same tiers; its hooks observe each forward
    with torch.inference_mode():
        ids = torch.tensor([PROMPT])
        out = tiny(input_ids=ids, cache=ref, use_cache=True)
        tiny(input_ids=ids, cache=reference, use_cache=True)
        for i, token in enumerate(tokens[:-1]):
            mask = torch.ones(1, len(PROMPT) + i + 1, dtype=torch.long)
            mask[0, np.flatnonzero(reference.index.tiers == EVICTED)] = 0
            out = tiny(input_ids=torch.tensor([[token]]), cache=ref, attention_mask=mask, use_cache=True)
            tiny(input_ids=torch.tensor([[token]]), cache=reference, use_cache=True)
            torch.testing.assert_close(out.logits[0, -1], logits[i + 1], rtol=1e-5, atol=1e-5)
    assert int((reference.index.tiers == EVICTED).sum()) > 0


def test_tiny_measured_tiers_match_the_policy_and_bytes(tiny):
    """Driven by hand (start/observe on the output attentions), as a loop without hooks would."""
    cache = TieredCache(policy(0.3, 0.1, compressed_ratio=0.5, compressed_bits=4), 3)
    counts = []
    with torch.inference_mode():
        out = tiny(input_ids=torch.tensor([PROMPT]), cache=cache, use_cache=True, output_attentions=True)
        cache.start(out.attentions)
        token = int(out.logits[0, -1].argmax())
        for _ in range(48):
            out = tiny(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True, output_attentions=True)
            cache.observe(out.attentions)
            token = int(out.logits[0, -1].argmax())
            assert cache.measured_counts().tolist() == np.bincount(cache.policy.tiers, minlength=4).tolist()
            counts.append(cache.measured_counts())
    hbm, ddr, comp, evicted = counts[-1]
    assert ddr > 0 and comp > 0 and evicted > 0
    layers, kv_heads, dim = 3, 2, 16
    nbytes = cache.nbytes()
    assert nbytes["hbm"] == hbm * layers * 2 * kv_heads * dim * 4
    assert nbytes["ddr"] == ddr * layers * 2 * kv_heads * dim * 4
    assert nbytes["compressed"] == comp * layers * 2 * kv_heads * (dim * 4 // 8 + 2)  # 4-bit codes + fp16 scale
    assert all(layer.ddr_k.device.type == "cpu" for layer in cache.layers)


def test_tiny_compressed_tier_is_approximate(tiny, tiny_full):
    cache = TieredCache.for_model(tiny, policy(0.3, 0.0, compressed_ratio=1.0, compressed_bits=8))
    tokens, logits = run(tiny, PROMPT, cache, STEPS)
    assert cache.stats.to_dict()["max_tokens"]["compressed"] > 0
    assert not same(logits, tiny_full[1])
    assert max(float((a - b).abs().max()) for a, b in zip(logits, tiny_full[1])) < 0.5  # int8: close, not equal


def test_tiny_pages_and_sticky_run(tiny):
    cache = TieredCache.for_model(tiny, policy(0.3, 0.1, page_size=4, sticky=True, eviction="compound"))
    run(tiny, PROMPT, cache, STEPS)
    tiers = cache.policy.tiers
    stats = cache.stats.to_dict()
    assert stats["max_tokens"]["ddr"] > 0 and stats["max_tokens"]["ddr"] % 4 == 0  # whole pages move
    assert cache.measured_counts().tolist() == np.bincount(tiers, minlength=4).tolist()


def test_tiny_bad_use_is_refused(tiny):
    cache = TieredCache.for_model(tiny, policy())
    with torch.inference_mode(), pytest.raises(TiersimError, match="batch 1"):
        tiny(input_ids=torch.tensor([PROMPT, PROMPT]), cache=cache, use_cache=True)
    hooked = TieredCache.for_model(tiny, policy())
    with torch.inference_mode():
        tiny(input_ids=torch.tensor([PROMPT]), cache=hooked, use_cache=True, output_attentions=True)
    with pytest.raises(TiersimError, match="observes the model's attention itself"):
        hooked.start(None)
    with torch.inference_mode(), pytest.raises(TiersimError, match="unpadded request"):
        mask = torch.ones(1, len(PROMPT), dtype=torch.long)
        mask[0, 3] = 0
        tiny(input_ids=torch.tensor([PROMPT]), attention_mask=mask, cache=TieredCache.for_model(tiny, policy()),
             use_cache=True)
    cache = TieredCache(policy(), 3)
    with torch.inference_mode():
        out = tiny(input_ids=torch.tensor([PROMPT]), cache=cache, use_cache=True, output_attentions=True)
        with pytest.raises(TiersimError, match="before start"):
            cache.observe(out.attentions)
        with pytest.raises(TiersimError, match="second forward"):
            tiny(input_ids=torch.tensor([[5]]), cache=cache, use_cache=True)
        cache.start(out.attentions)
        out = tiny(input_ids=torch.tensor([[5]]), cache=cache, use_cache=True)
        with pytest.raises(TiersimError, match="output_attentions"):
            cache.observe(out.attentions)
    with pytest.raises(TiersimError, match="PolicyConfig"):
        TieredCache({"hbm_ratio": 0.5}, 2)
    tiny.config._attn_implementation = "sdpa"
    try:
        with pytest.raises(TiersimError, match="eager"):
            TieredCache.for_model(tiny, policy())
    finally:
        tiny.config._attn_implementation = "eager"


# ---------------------------------------------------------------- inside transformers' generate


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_tiny_generate_with_tiered_cache_equals_plain_generate_and_stops_at_eos(tiny, tiny_full):
    tokens = tiny_full[0]
    first = {}
    for i, t in enumerate(tokens):
        first.setdefault(t, i)
    stop = min(i for i in first.values() if i >= 24)  # a token first generated after two re-tiers serves as EOS
    eos = tokens[stop]
    ids = torch.tensor([PROMPT])
    plain = tiny.generate(ids, max_new_tokens=STEPS, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert plain[0, len(PROMPT):].tolist() == tokens[: stop + 1]  # generate stopped at that EOS
    for beta in BETAS:
        cache = TieredCache.for_model(tiny, policy(beta))
        out = tiny.generate(ids, max_new_tokens=STEPS, do_sample=False, eos_token_id=eos, pad_token_id=0,
                            past_key_values=cache)
        assert torch.equal(out, plain), f"β={beta}, r=0: generate with TieredCache differs from plain generate"
        stats = cache.stats.to_dict()
        assert stats["decode_steps"] == stop and stats["retiers"] == stop // 8 - 1  # after the 16th, 24th, ... token
        assert stats["moved_to"]["ddr"] > 0
    # with eviction generate drives the cache exactly as tiersim's own loop does
    evicting = TieredCache.for_model(tiny, policy(0.3, 0.2))
    out = tiny.generate(ids, max_new_tokens=STEPS, do_sample=False, eos_token_id=eos, pad_token_id=0,
                        past_key_values=evicting)
    own = TieredCache.for_model(tiny, policy(0.3, 0.2))
    assert out[0, len(PROMPT):].tolist() == decode(tiny, PROMPT, own, STEPS, eos_token_ids=[eos]).tokens
    assert evicting.stats.to_dict() == own.stats.to_dict() and evicting.stats.to_dict()["final_tokens"]["evicted"] > 0


def test_tiny_generate_refuses_a_batch(tiny):
    with pytest.raises(TiersimError, match="batch 1.*one prompt per cache") as e:
        tiny.generate(torch.tensor([PROMPT, PROMPT]), max_new_tokens=4, do_sample=False, pad_token_id=0,
                      cache=TieredCache.for_model(tiny, policy()))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- SmolLM2-135M (the real model, DESIGN.md §5)


@pytest.fixture(scope="module")
def smol(smollm2):
    ids = smollm2.tokenizer("Tom has 3 apples and buys 5 more. How many apples does he have?")["input_ids"]
    return smollm2.model, ids


SMOL_STEPS = 20
SMOL = {"sinks": 2, "window": 4, "interval": 4}  # re-tiers after the 8th, 12th and 16th token; r=0.1 evicts at the 16th


def smol_policy(hbm_ratio, evict_ratio=0.0):
    return PolicyConfig(hbm_ratio=hbm_ratio, evict_ratio=evict_ratio, **SMOL)


def test_smollm2_exactness(smol):
    model, ids = smol
    full_tokens, full_logits = run(model, ids, None, SMOL_STEPS)
    for beta in BETAS:
        cache = TieredCache.for_model(model, smol_policy(beta))
        tokens, logits = run(model, ids, cache, SMOL_STEPS)
        assert cache.stats.to_dict()["moved_to"]["ddr"] > 0
        assert tokens == full_tokens and same(logits, full_logits), f"β={beta}, r=0 differs from the full cache"
    evicting = []
    for beta in BETAS:
        cache = TieredCache.for_model(model, smol_policy(beta, 0.1))
        evicting.append(run(model, ids, cache, SMOL_STEPS))
        stats = cache.stats.to_dict()
        assert stats["final_tokens"]["evicted"] > 0 and stats["max_tokens"]["ddr"] > 0
    for tokens, logits in evicting[1:]:
        assert tokens == evicting[0][0] and same(logits, evicting[0][1]), "r=0.1 outputs depend on β"
    assert not same(evicting[0][1], full_logits)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_smollm2_generate_with_tiered_cache_equals_plain_generate(smol):
    model, ids = smol
    x = torch.tensor([ids])
    plain = model.generate(x, max_new_tokens=13, do_sample=False)
    cache = TieredCache.for_model(model, smol_policy(0.3))
    tiered = model.generate(x, max_new_tokens=13, do_sample=False, past_key_values=cache)
    assert torch.equal(tiered, plain) and tiered.shape[1] == len(ids) + 13
    stats = cache.stats.to_dict()  # 12 tokens fed back: re-tiers after the 8th and the 12th
    assert stats["retiers"] == 2 and stats["moved_to"]["ddr"] > 0 and stats["final_tokens"]["evicted"] == 0


def test_tiny_live_tiers_equal_the_offline_replay_of_a_capture(tiny):
    """The live cache feeds the policy what capture records: replaying a float32 capture gives the same tiers."""
    from tiersim.policy import replay
    from tiersim.traces.capture_loop import CaptureConfig, capture_batch

    cfg = policy(0.3, 0.0)
    steps = 48
    captured = capture_batch(tiny, [PROMPT], CaptureConfig(max_new_tokens=steps, increments_dtype="float32"),
                             eos_token_ids=[])[0].request
    cache = TieredCache.for_model(tiny, cfg)
    tokens, _ = run(tiny, PROMPT, cache, steps)
    assert tokens == captured.generated_ids.tolist()
    schedule = replay(captured, cfg)
    assert schedule.retiers == cache.stats.retiers == 4
    offline, live = schedule.tiers_after(-1), cache.policy.tiers  # offline: positions up to the last re-tier
    assert np.array_equal(live[: len(offline)], offline) and np.all(live[len(offline):] == HBM)
    assert np.array_equal(schedule.final_counts, cache.measured_counts())
    assert np.allclose(cache.policy.scores, schedule_scores(captured), rtol=1e-6, atol=1e-7)


def schedule_scores(request):
    """Prefill column sums plus every decode row: the cumulative scores the policy should hold at the end."""
    scores = np.zeros(request.prompt_tokens + request.steps, dtype=np.float64)
    scores[: request.prompt_tokens] = request.prefill
    for row in request.rows():
        scores[: len(row)] += row
    return scores
