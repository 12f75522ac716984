"""Model-shaped compute of the replay: RMSNorm, the q/k/v, o, gate/up and down projections with a layer's real
weight shapes (random weights), and attention over T0 chunks plus staged tokens; also the same kernels set up
on synthetic work for calibration (`layer_kernel`, `head_kernel`).

torch is imported inside the functions, so that importing this module (and hw.microbench) needs no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tiersim.hw.plan import Layout, StepWork
from tiersim.specs import ModelSpec


def torch_dtype(model: ModelSpec):
    """bf16 for 2-byte models, fp32 for 4-byte ones."""
    import torch

    return {2: torch.bfloat16, 4: torch.float32}[model.dtype_bytes]


@dataclass(slots=True)
class LayerWeights:
    """One decoder layer's matmul weights (random), in the model's real shapes."""

    qkv: object  # [(heads + 2 kv_heads) * head_dim, hidden]
    o: object  # [hidden, heads * head_dim]
    gate_up: object  # [2 * intermediate, hidden]
    down: object  # [hidden, intermediate]
    norm: object  # [hidden]

    @classmethod
    def random(cls, m: ModelSpec, device, dtype) -> LayerWeights:
        """Normal(0, 0.02) weights drawn on the device from torch's global generator."""
        import torch

        def w(*shape):
            return torch.empty(*shape, device=device, dtype=dtype).normal_(0.0, 0.02)

        qkv_out = (m.attention_heads + 2 * m.kv_heads) * m.head_dim
        return cls(w(qkv_out, m.hidden), w(m.hidden, m.attention_heads * m.head_dim), w(2 * m.intermediate, m.hidden),
                   w(m.hidden, m.intermediate), torch.ones(m.hidden, device=device, dtype=dtype))


def rms_norm(x, weight):
    """RMSNorm in the activation dtype."""
    import torch

    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) * weight


def mlp(x, w: LayerWeights):
    """SwiGLU MLP with the residual."""
    import torch.nn.functional as F

    gate, up = (rms_norm(x, w.norm) @ w.gate_up.T).chunk(2, dim=-1)
    return x + (F.silu(gate) * up) @ w.down.T


def decode_attention(q, k_chunks, v_chunks, valid_last: int, k_stage=None, v_stage=None):
    """One query per sequence over T0 chunks (the last `valid_last` tokens long) and staged tokens, one softmax.

    q [G, g, d] (G = sequences x kv heads, g query heads per kv head, pre-scaled); k/v_chunks [f, G, C, d];
    k/v_stage [G, m, d] or None. Returns [G, g, d].
    """
    import torch

    f, G, C, d = k_chunks.shape
    g = q.shape[1]
    s0 = torch.matmul(q.unsqueeze(0), k_chunks.transpose(-1, -2))  # [f, G, g, C]
    if valid_last < C:
        s0[-1, :, :, valid_last:] = -math.inf
    parts = [s0.permute(1, 2, 0, 3).reshape(G, g, f * C)]
    if k_stage is not None:
        parts.append(torch.matmul(q, k_stage.transpose(-1, -2)))  # [G, g, m]
    p = torch.softmax(torch.cat(parts, dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
    p0 = p[..., : f * C].reshape(G, g, f, C).permute(2, 0, 1, 3).contiguous()
    out = torch.matmul(p0, v_chunks).sum(0)
    if k_stage is not None:
        out = out + torch.matmul(p[..., f * C:], v_stage)
    return out


def prefill_attention(q, k, v, sequences: int, tokens: int, m: ModelSpec):
    """Causal SDPA over `sequences` prompts of `tokens` tokens each (rows in sequence-major order)."""
    import torch.nn.functional as F

    H, kvh, d = m.attention_heads, m.kv_heads, m.head_dim
    qp = q.reshape(sequences, tokens, H, d).transpose(1, 2)
    kp = k.reshape(sequences, tokens, kvh, d).transpose(1, 2)
    vp = v.reshape(sequences, tokens, kvh, d).transpose(1, 2)
    o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
    return o.transpose(1, 2).reshape(sequences * tokens, H * d)


# seen(slot, T0 chunks [f, kv_heads, C, d], tokens attended in T0, staged [kv_heads, s, d] or None): a probe's view
Seen = Callable[[int, object, int, object], None]


def step_attention(m: ModelSpec, lay: Layout, w: StepWork, q, kn, vn, k0, v0, stage, seen: Seen | None = None):
    """Attention of the step's new tokens over one layer's T0 pools (k0, v0) and staging buffer: batched when
    every slot does the same work, else slot by slot."""
    import torch

    d, H, kvh, C = m.head_dim, m.attention_heads, m.kv_heads, lay.chunk
    g, scale = H // kvh, 1.0 / math.sqrt(d)
    B = lay.batch
    R = w.staged_rows * kvh
    stage_k = stage[:R] if (stage is not None and R) else None
    stage_v = stage[R: 2 * R] if stage_k is not None else None
    if w.uniform and not w.prefill[0] and not lay.slot_major:
        a, s = int(w.attend[0]), int(w.staged[0])
        f = -(-a // C)
        qb = (q.reshape(B * kvh, g, d) * scale)
        kc = k0[:f].view(f, B * kvh, C, d)
        vc = v0[:f].view(f, B * kvh, C, d)
        ks = stage_k.view(B * kvh, s, d) if (stage_k is not None and s) else None
        vs = stage_v.view(B * kvh, s, d) if ks is not None else None
        if seen is not None:
            for b in range(B):
                seen(b, kc.view(f, B, kvh, C, d)[:, b], a, None if ks is None else ks.view(B, kvh, s, d)[b])
        return decode_attention(qb, kc, vc, a - (f - 1) * C, ks, vs).reshape(B, H * d)
    if w.uniform:  # every slot prefills the same prompt length
        return prefill_attention(q, kn, vn, B, int(w.tokens[0]), m)
    outs, row, off = [], 0, 0
    for b in range(B):
        n = int(w.tokens[b])
        if w.prefill[b]:
            outs.append(prefill_attention(q[row: row + n], kn[row: row + n], vn[row: row + n], 1, n, m))
        else:
            a, s = int(w.attend[b]), int(w.staged[b])
            f = -(-a // C)
            kc = k0[b, :f] if lay.slot_major else k0[:f, b]
            vc = v0[b, :f] if lay.slot_major else v0[:f, b]
            ks = stage_k[off: off + kvh * s].view(kvh, s, d) if s else None
            vs = stage_v[off: off + kvh * s].view(kvh, s, d) if s else None
            if seen is not None:
                seen(b, kc, a, ks)
            o = decode_attention(q[row: row + n].reshape(kvh, g, d) * scale, kc, vc, a - (f - 1) * C, ks, vs)
            outs.append(o.reshape(1, H * d))
            off += kvh * s
        row += n
    return torch.cat(outs)


def decoder_layer(m: ModelSpec, lay: Layout, w: StepWork, wt: LayerWeights, k0, v0, x, stage,
                  tag: Callable | None = None, seen: Seen | None = None):
    """One decoder layer for the step's new tokens: projections, their K/V written into T0, attention, MLP.
    `tag(k_new)` may rewrite the new keys before they are stored (a probe's marker)."""
    d, H, kvh = m.head_dim, m.attention_heads, m.kv_heads
    qkv = rms_norm(x, wt.norm) @ wt.qkv.T
    q, kn, vn = qkv.split([H * d, kvh * d, kvh * d], dim=-1)
    k_new, v_new = kn.reshape(-1, d), vn.reshape(-1, d)
    if tag is not None:
        k_new = tag(k_new)
    k0.view(-1, d).index_copy_(0, w.new_rows, k_new)
    v0.view(-1, d).index_copy_(0, w.new_rows, v_new)
    out = step_attention(m, lay, w, q, kn, vn, k0, v0, stage, seen)
    x = x + out @ wt.o.T
    return mlp(x, wt)


def layer_kernel(model: ModelSpec, device: str, tokens: int, batch: int, kv_tokens: int, copies: int,
                 chunk: int = 128, weights: list[LayerWeights] | None = None) -> Callable[[], object]:
    """The replay's own decoder layer on synthetic work, for calibration: `batch` sequences decoding one token
    each over `kv_tokens` resident tokens (or, with kv_tokens = 0, one sequence prefilling `tokens` tokens).
    `copies` layers (weights and T0 each) are rotated so that repeats stream from memory (`weights`: reuse these,
    at least `copies` of them). Returns a callable."""
    import torch

    dev, dtype = torch.device(device), torch_dtype(model)
    decode = kv_tokens > 0
    b = batch if decode else 1
    per = np.full(b, 1 if decode else tokens)
    attend = np.full(b, kv_tokens if decode else tokens)
    lay = Layout(b, model.kv_heads, chunk, -(-int(attend.max()) // chunk), 1, slot_major=False)
    idx = np.full(b, kv_tokens - 1) if decode else np.arange(tokens)
    slot = np.arange(b) if decode else np.zeros(tokens, dtype=np.int64)
    new_rows = torch.as_tensor(lay.t0_rows(slot, idx).ravel(), dtype=torch.int64, device=dev)
    work = StepWork(prefill=np.full(b, not decode), tokens=per, attend=attend, staged=np.zeros(b, np.int64),
                    promoted=np.zeros(b, np.int64), positions=idx.copy(), new_rows=new_rows)
    layers = weights[:copies] if weights else [LayerWeights.random(model, dev, dtype) for _ in range(copies)]
    shape = (lay.chunks, lay.batch, model.kv_heads, lay.chunk, model.head_dim)
    k0 = [torch.zeros(shape, device=dev, dtype=dtype) for _ in range(copies)]
    v0 = [torch.zeros(shape, device=dev, dtype=dtype) for _ in range(copies)]
    x = torch.randn(int(per.sum()), model.hidden, device=dev).to(dtype)
    turn = iter(range(1 << 62))

    def run():
        i = next(turn) % copies
        with torch.inference_mode():
            return decoder_layer(model, lay, work, layers[i], k0[i], v0[i], x, None)

    return run


def head_kernel(model: ModelSpec, device: str, tokens: int, copies: int) -> Callable[[], object]:
    """The replay's final norm + lm_head over `tokens` tokens, rotating `copies` lm_head weights."""
    import torch

    dev, dtype = torch.device(device), torch_dtype(model)
    heads = [torch.empty(model.vocab, model.hidden, device=dev, dtype=dtype).normal_(0.0, 0.02) for _ in range(copies)]
    norm = torch.ones(model.hidden, device=dev, dtype=dtype)
    x = torch.randn(tokens, model.hidden, device=dev).to(dtype)
    turn = iter(range(1 << 62))

    def run():
        with torch.inference_mode():
            return rms_norm(x, norm) @ heads[next(turn) % copies].T

    return run
