"""The compute calibration measured in interleaved rounds: the replay's whole decoder layers, its lm_head and cold
narrow GEMMs of several model shapes, each round timing every point of every shape once.

A shared VM drifts over minutes: two calibrations 2 minutes apart gave 10.5 and 14.7 ms for the same layer.
Measured shape after shape, that drift lands on one shape and the fit reads it as a difference between
shapes; in rounds (the shapes' order turning each round), it hits every shape alike, and each point is the
median of its rounds' medians, with the CV across rounds recorded (hw.timing.combine_rounds) and a point
that drifts beyond the limit flagged. The narrow GEMMs (one token, each of a layer's weight shapes,
rotated so that every call streams its weights from memory) bound and cross-check the cost model's fixed
cost per GEMM call (calibration/fit_compute.py).
"""

from __future__ import annotations

import functools
import math

from tiersim.hw.device import device_name
from tiersim.hw.kernels import LayerWeights, layer_kernel, torch_dtype
from tiersim.hw.memory import mem_total_bytes
from tiersim.hw.microbench import MIB, Rotation, copies_beyond_cache, gemm_shapes, llc_bytes
from tiersim.hw.norm import rms_norm
from tiersim.hw.timing import combine_rounds, time_op
from tiersim.specs import ModelSpec


def _heads(model: ModelSpec, device, tokens, copies: int) -> dict[int, object]:
    """The replay's final norm + lm_head (hw/kernels.head_kernel's body) per token count, one set of `copies`
    rotated lm_head weights shared by every token count (so that a wide vocabulary is allocated once)."""
    import torch

    dtype = torch_dtype(model)
    heads = [torch.empty(model.vocab, model.hidden, device=device, dtype=dtype).normal_(0.0, 0.02) for _ in range(copies)]
    norm = torch.ones(model.hidden, device=device, dtype=dtype)

    def run(x, w):
        with torch.inference_mode():
            return rms_norm(x, norm) @ w.T

    return {n: Rotation(heads, functools.partial(run, torch.randn(n, model.hidden, device=device).to(dtype)))
            for n in tokens}


def _narrow_gemms(model: ModelSpec, device) -> dict[str, object]:
    """Cold GEMV calls (one token) of each of a layer's weight shapes, rotated through enough copies (3 x the last
    level cache, at most 64) that every call streams its weights from memory, as in a replayed layer."""
    import torch

    dtype, out = torch_dtype(model), {}
    cache = 64 * MIB if device.type == "cuda" else llc_bytes()
    for name, (n_out, n_in) in gemm_shapes(model).items():
        if name == "lm_head":
            continue
        nbytes = n_out * n_in * model.dtype_bytes
        copies = int(min(64, max(2, math.ceil(3 * cache / nbytes))))
        weights = [torch.empty(n_out, n_in, device=device, dtype=dtype).normal_(0.0, 0.02) for _ in range(copies)]
        x = torch.randn(1, n_in, device=device).to(dtype)
        out[name] = (n_out, n_in, nbytes, Rotation(weights, functools.partial(_matmul, x)))
    return out


def _matmul(x, w):
    return x @ w.T


def interleaved(device, shapes: list[ModelSpec], points, head_tokens, rounds: int = 3, repeats: int = 7,
                progress=None) -> dict[str, dict]:
    """Whole layers (the replay's own, hw.kernels.layer_kernel, at each of `points`), lm_heads (at `head_tokens`)
    and cold narrow GEMMs of every shape, measured in `rounds` interleaved rounds: each round times every point of
    every shape once (about repeats / rounds groups, the shapes' order turning), so that slow drift of a shared
    machine hits every shape alike; each point is the median of its rounds' medians with the CV across rounds
    (hw.timing.combine_rounds). Returns, per shape name, {"layers", "head", "narrow_gemms"} point lists."""
    per = max(3, -(-repeats // rounds))
    weights, heads, gemms, got = {}, {}, {}, {}
    for m in shapes:
        most = copies_beyond_cache(m.layer_weight_bytes, device, 8)
        weights[m.name] = [LayerWeights.random(m, device, torch_dtype(m)) for _ in range(most)]
        heads[m.name] = _heads(m, device, head_tokens, copies_beyond_cache(m.vocab * m.hidden * m.dtype_bytes, device, 4))
        gemms[m.name] = _narrow_gemms(m, device)

    def timed(key, fn):
        got.setdefault(key, []).append(time_op(fn, device, warmup=1, repeats=per, max_repeats=2 * per, budget_s=2.0))

    for r in range(rounds):
        for m in shapes[r % len(shapes):] + shapes[: r % len(shapes)]:
            for i, (tokens, batch, kv) in enumerate(points):
                kv_bytes = batch * kv * m.kv_bytes_per_token_layer
                copies = copies_beyond_cache(m.layer_weight_bytes + kv_bytes, device, len(weights[m.name]))
                while copies > 2 and copies * 2 * kv_bytes > 0.25 * mem_total_bytes():
                    copies -= 1
                timed((m.name, "layers", i), layer_kernel(m, device_name(device), tokens, batch, kv, copies,
                                                          weights=weights[m.name]))
            for n, fn in heads[m.name].items():
                timed((m.name, "head", n), fn)
            for name, (_, _, _, fn) in gemms[m.name].items():
                timed((m.name, "gemm", name), fn)
            if progress is not None:
                progress(f"round {r + 1}/{rounds}: {m.name}")
    out = {}
    for m in shapes:
        layers = [{"tokens": t, "batch": b, "kv_tokens": kv, **combine_rounds(got[(m.name, "layers", i)])}
                  for i, (t, b, kv) in enumerate(points)]
        head = [{"tokens": n, **combine_rounds(got[(m.name, "head", n)])} for n in head_tokens]
        narrow = [{"gemm": name, "out": o, "in": i, "tokens": 1, "weight_bytes": nb, "bytes": nb, "calls": 1,
                   **combine_rounds(got[(m.name, "gemm", name)])} for name, (o, i, nb, _) in gemms[m.name].items()]
        out[m.name] = {"layers": layers, "head": head, "narrow_gemms": narrow}
    return out


__all__ = ["interleaved"]
