"""The compressed tier's quantiser (T2 of hw.TieredCache): symmetric per token and KV head, 8, 4 or 2 bits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiersim.errors import TiersimError


@dataclass(frozen=True, slots=True)
class Quantized:
    """KV rows quantized symmetric per (token, head): x ≈ q · scale, q in [−(2^(b−1)−1), 2^(b−1)−1].

    8 bits are stored as int8; 4 and 2 bits as offset-binary codes (q + 2^(b−1)) packed 8/b per byte
    along head_dim (low bits first). One float16 scale per token and head: absmax / (2^(b−1)−1).
    """

    data: torch.Tensor  # (1, kv_heads, n, head_dim · bits / 8)
    scale: torch.Tensor  # (1, kv_heads, n, 1) float16
    bits: int
    head_dim: int

    @property
    def tokens(self) -> int:
        """Positions stored."""
        return self.data.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of codes and scales."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def select(self, index: torch.Tensor) -> Quantized:
        """The rows at `index` (along the position axis)."""
        return Quantized(self.data.index_select(2, index), self.scale.index_select(2, index), self.bits, self.head_dim)


def quantize(x: torch.Tensor, bits: int) -> Quantized:
    """Quantize (1, heads, n, head_dim) rows to `bits` (8, 4 or 2) with one float16 scale per token and head."""
    if bits not in (2, 4, 8):
        raise TiersimError(f"compressed bits must be 2, 4 or 8, got {bits!r}")
    qmax = 2 ** (bits - 1) - 1
    head_dim = x.shape[-1]
    per_byte = 8 // bits
    if head_dim % per_byte:
        raise TiersimError(f"head_dim {head_dim} is not a multiple of {per_byte}: cannot pack {bits}-bit codes")
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / qmax).to(torch.float16)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    q = torch.clamp(torch.round(xf / safe), -qmax, qmax)
    if bits == 8:
        return Quantized(q.to(torch.int8), scale, bits, head_dim)
    codes = (q + 2 ** (bits - 1)).to(torch.uint8).reshape(*x.shape[:-1], head_dim // per_byte, per_byte)
    shifts = torch.arange(per_byte, device=x.device, dtype=torch.uint8) * bits
    packed = (codes << shifts).sum(-1, dtype=torch.uint8)  # disjoint bit fields: the sum is a bitwise or
    return Quantized(packed, scale, bits, head_dim)


def dequantize(q: Quantized, dtype: torch.dtype) -> torch.Tensor:
    """Rows back in `dtype`: q · scale."""
    if q.bits == 8:
        values = q.data.float()
    else:
        per_byte = 8 // q.bits
        shifts = torch.arange(per_byte, device=q.data.device, dtype=torch.uint8) * q.bits
        codes = (q.data.unsqueeze(-1) >> shifts) & (2 ** q.bits - 1)
        values = codes.reshape(*q.data.shape[:-1], q.head_dim).float() - 2 ** (q.bits - 1)
    return (values * q.scale.float()).to(dtype)


def cat_quantized(parts: list[Quantized]) -> Quantized:
    """The rows of several Quantized of the same width, one after the other."""
    return Quantized(torch.cat([p.data for p in parts], 2), torch.cat([p.scale for p in parts], 2),
                     parts[0].bits, parts[0].head_dim)
