"""Multi-head latent attention (DeepSeek-V2/V3) in the absorbed form, as the replay runs it: the no-rope query
goes through W_UK into the latent space beside the rope query, every head attends one cache row per token (the
normed latent of kv_lora_rank values plus the shared rope key, its first kv_lora_rank values serving as the
values), and the output goes back up through W_UV before o_proj: the FLOPs of
`ModelSpec.attention_flops_per_pair`. Rope is not applied (it costs no matmul). The attention itself is
hw/kernels.py's, over a single cache head (`AttnShape.latent`).

torch is imported inside the functions, so that importing this module needs no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tiersim.hw.norm import rms_norm
from tiersim.specs import ModelSpec


@dataclass(slots=True)
class MLAWeights:
    """One layer's multi-head latent attention (DeepSeek-V2/V3), kv_b_proj kept as its two absorbed halves."""

    q_a: object  # [q_lora_rank, hidden] (None: q_b is a direct projection of the hidden state)
    q_norm: object  # [q_lora_rank]
    q_b: object  # [H * (qk_nope + qk_rope), q_lora_rank or hidden]
    kv_a: object  # [kv_lora_rank + qk_rope, hidden]: kv_a_proj_with_mqa, the latent and the shared rope key
    kv_norm: object  # [kv_lora_rank]
    w_uk: object  # [H, qk_nope, kv_lora_rank]: kv_b_proj's key half, absorbed into the query
    w_uv: object  # [H, v_head_dim, kv_lora_rank]: its value half, applied to the attention output

    @classmethod
    def random(cls, m: ModelSpec, w: Callable[..., object], ones: Callable[[int], object]) -> MLAWeights:
        """Weights of `m`'s shapes (m.mla set), each drawn by `w(*shape)` (in field order); the norms `ones(n)`."""
        a, H, hid = m.mla, m.attention_heads, m.hidden
        q_in = a.q_lora_rank or hid
        return cls(w(a.q_lora_rank, hid) if a.q_lora_rank else None, ones(q_in), w(H * m.head_dim, q_in),
                   w(a.latent_width, hid), ones(a.kv_lora_rank), w(H, a.qk_nope_head_dim, a.kv_lora_rank),
                   w(H, a.v_head_dim, a.kv_lora_rank))


def absorbed_project(m: ModelSpec, w: MLAWeights, h):
    """The step's queries and new cache rows from normed hidden states h [T, hidden]: (q [T, H x latent_width],
    the new latent plus rope key [T, latent_width] as the one cache row, its first kv_lora_rank values as V); the
    query is absorbed into the latent (q_nope times W_UK, beside q_rope)."""
    import torch

    a, T, H = m.mla, h.shape[0], m.attention_heads
    q_in = h if w.q_a is None else rms_norm(h @ w.q_a.T, w.q_norm)
    q = (q_in @ w.q_b.T).view(T, H, m.head_dim)
    q_nope, q_rope = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
    q_lat = torch.bmm(q_nope.transpose(0, 1), w.w_uk).transpose(0, 1)  # [T, H, kv_lora_rank]
    q = torch.cat([q_lat, q_rope], dim=-1).reshape(T, H * a.latent_width)
    c, rope = (h @ w.kv_a.T).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
    latent = torch.cat([rms_norm(c, w.kv_norm), rope], dim=-1)
    return q, latent, latent[:, : a.kv_lora_rank]


def absorbed_output(m: ModelSpec, w: MLAWeights, out):
    """The attention output in the latent space [T, H x kv_lora_rank] up through W_UV: [T, H x v_head_dim]."""
    import torch

    T, H = out.shape[0], m.attention_heads
    out = torch.bmm(out.view(T, H, m.mla.kv_lora_rank).transpose(0, 1), w.w_uv.transpose(1, 2))
    return out.transpose(0, 1).reshape(T, H * m.mla.v_head_dim)
