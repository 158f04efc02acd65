"""fp8 (e4m3) KV with its scales in the page (``KVSpec.kv_format == FP8_SCALED``): each token's head is quantized
by its own float32 scale (its largest magnitude over 448, e4m3's largest finite value), stored as the head's last
4 bytes. A model writes and reads values; pools, transfers and storage move the bytes as they are."""

from __future__ import annotations

import torch

from hicache_core.memory.spec import FP8_SCALED, KVSpec

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)


def encode(spec: KVSpec, x: torch.Tensor) -> torch.Tensor:
    """Values (tokens, heads, value_dim) as ``spec`` stores them (tokens, heads, head_dim)."""
    if spec.kv_format != FP8_SCALED:
        return x.to(spec.dtype)
    x = x.to(torch.float32)
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return torch.cat([q, scale.view(FP8)], dim=-1)  # a float32 scale is 4 bytes of the fp8 row


def decode(spec: KVSpec, stored: torch.Tensor) -> torch.Tensor:
    """Stored heads (tokens, heads, head_dim) back as values (tokens, heads, value_dim): float32 for FP8_SCALED,
    else the stored dtype."""
    if spec.kv_format != FP8_SCALED:
        return stored
    d = spec.value_dim
    scale = stored[..., d:].contiguous().view(torch.float32)  # (tokens, heads, 1)
    return stored[..., :d].to(torch.float32) * scale
