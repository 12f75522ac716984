"""RMSNorm, the one normalisation every replayed layer uses (decoder layers, MLA's latent and query, the final
norm before lm_head). torch is imported inside, so importing this module needs no torch."""

from __future__ import annotations


def rms_norm(x, weight):
    """RMSNorm in the activation dtype."""
    import torch

    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) * weight
