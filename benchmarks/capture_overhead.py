"""Capture overhead: tiersim's streaming decode loop vs plain `model.generate`, and peak RSS vs length.

    python benchmarks/capture_overhead.py                  # SmolLM2-135M-Instruct, ~15 min on one CPU thread
    python benchmarks/capture_overhead.py --naive --lengths 64,128,256   # also generate(output_attentions=True)

Part 1 (one process): the same model, the same left-padded prompts (the first --requests problems of
traces/prompts/gsm16.jsonl through the chat template) and exactly --tokens new tokens each, timed
alternately --repeats times after a warm-up; the ratio of the fastest runs is the overhead (target
<= 1.3x), in wall time and in process CPU time (steadier when other jobs share the machine).
Part 2 (one subprocess per length): the peak RSS growth of one request over --lengths new tokens,
measured from the kernel's high-water mark (reset through /proc/self/clear_refs after the model is
loaded), for capture, plain generate and, with --naive, generate keeping every step's attentions.
Streaming capture must grow like generate (linearly: the KV cache), the naive one quadratically.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from tiersim.traces.capture_loop import CaptureConfig, capture_batch
from tiersim.traces.capture_prompts import read_prompts
from tiersim.traces.hf import SMOLLM2, encode_prompts, load_model, resolve_model

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "traces" / "prompts" / "gsm16.jsonl"
SYSTEM = "Solve the math problem step by step. End with: The answer is N."


def setup(n_requests: int):
    loaded = load_model(resolve_model(SMOLLM2))
    ids = encode_prompts(loaded.tokenizer, read_prompts(PROMPTS)[:n_requests], system=SYSTEM)
    return loaded, ids


def padded(ids: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    return input_ids, mask


def run_generate(model, ids, tokens: int, pad: int, naive: bool = False):
    input_ids, mask = padded(ids, pad)
    extra = {"output_attentions": True, "return_dict_in_generate": True} if naive else {}
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                             do_sample=False, pad_token_id=pad, **extra)
    return out


def run_capture(model, ids, tokens: int):
    return capture_batch(model, ids, CaptureConfig(max_new_tokens=tokens, min_new_tokens=tokens))


def wall(args) -> dict:
    loaded, ids = setup(args.requests)
    model, pad = loaded.model, loaded.tokenizer.pad_token_id
    run_generate(model, ids, 8, pad)  # warm-up: first calls are several times slower
    run_capture(model, ids, 8)
    times = {"generate": [], "capture": []}
    cpu = {"generate": [], "capture": []}
    load = [os.getloadavg()[0]]
    same = True
    width = max(map(len, ids))
    for _ in range(args.repeats):  # interleaved, so both see the same machine
        for name, fn in (("generate", lambda: run_generate(model, ids, args.tokens, pad)),
                         ("capture", lambda: run_capture(model, ids, args.tokens))):
            t0, c0 = time.perf_counter(), time.process_time()
            result = fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            if name == "generate":
                gen = result
        same &= all(c.request.generated_ids.tolist() == gen[b, width:].tolist() for b, c in enumerate(result))
    load.append(os.getloadavg()[0])
    best = {k: min(v) for k, v in times.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    return {"requests": args.requests, "tokens": args.tokens, "prompt_tokens": [len(p) for p in ids],
            "times_s": times, "cpu_s": cpu, "best_s": best, "best_cpu_s": best_cpu,
            "ratio": best["capture"] / best["generate"], "cpu_ratio": best_cpu["capture"] / best_cpu["generate"],
            "same_tokens": same, "torch_threads": torch.get_num_threads(), "loadavg_1min": load}


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> int:
    """Free what can be freed, reset the RSS high-water mark, return the current RSS in KB."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def child(tokens: int, naive: bool) -> dict:
    loaded, ids = setup(1)
    model, pad = loaded.model, loaded.tokenizer.pad_token_id
    run_capture(model, ids, 4)
    run_generate(model, ids, 4, pad)
    modes = {"capture": lambda: run_capture(model, ids, tokens), "generate": lambda: run_generate(model, ids, tokens, pad)}
    if naive:
        modes["generate+attentions"] = lambda: run_generate(model, ids, tokens, pad, naive=True)
    growth = {}
    for name, fn in modes.items():
        base = _reset_peak()
        result = fn()
        growth[name] = (_status_kb("VmHWM") - base) / 1024
        del result
    cfg = model.config
    kv_mb = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4 \
        * (len(ids[0]) + tokens) / 2**20
    return {"tokens": tokens, "prompt_tokens": len(ids[0]), "growth_mb": growth, "kv_cache_mb": kv_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lengths", default="128,256,512")
    ap.add_argument("--naive", action="store_true", help="also measure generate(output_attentions=True)")
    ap.add_argument("--only", choices=("wall", "rss"), default=None, help="run one part")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: OpenMP spinning on a shared machine cannot distort the ratio)")
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child is not None:
        print(json.dumps(child(args.child, args.naive)))
        return

    w = wall(args) if args.only != "rss" else None
    if w:
        print(f"wall time, SmolLM2-135M-Instruct on CPU ({w['torch_threads']} threads), batch {w['requests']} x"
              f" {w['tokens']} new tokens, prompts {w['prompt_tokens']} tokens:")
        for k in ("generate", "capture"):
            print(f"  {k:9s} best {w['best_s'][k]:7.2f} s wall, {w['best_cpu_s'][k]:7.2f} s CPU;"
                  f" runs {', '.join(f'{t:.2f}' for t in w['times_s'][k])} s")
        print(f"  capture / generate = {w['ratio']:.3f}x wall, {w['cpu_ratio']:.3f}x CPU (target <= 1.3x);"
              f" same tokens: {w['same_tokens']}; 1-min load average {w['loadavg_1min'][0]:.1f} -> {w['loadavg_1min'][1]:.1f}"
              f" on {os.cpu_count()} CPUs")

    rows = []
    for n in [] if args.only == "wall" else [int(x) for x in args.lengths.split(",")]:
        cmd = [sys.executable, __file__, "--child", str(n), "--threads", str(args.threads)] + (["--naive"] if args.naive else [])
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
        print(f"  ({n} new tokens: {json.dumps(rows[-1])})", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"wall": w, "rss": rows}, indent=2) + "\n")
    if not rows:
        return
    modes = list(rows[0]["growth_mb"])
    print("peak RSS growth during one request (MB; high-water mark after the model is loaded):")
    print("  new tokens  " + "  ".join(f"{m:>20s}" for m in modes) + "   KV cache (fp32)")
    for r in rows:
        print(f"  {r['tokens']:10d}  " + "  ".join(f"{r['growth_mb'][m]:20.1f}" for m in modes)
              + f"   {r['kv_cache_mb']:8.1f}")
    first, last = rows[0], rows[-1]
    for m in modes:
        slope = (last["growth_mb"][m] - first["growth_mb"][m]) / (last["tokens"] - first["tokens"]) * 1024
        print(f"  {m}: {slope:.1f} KB per extra token between {first['tokens']} and {last['tokens']} tokens")


if __name__ == "__main__":
    main()
