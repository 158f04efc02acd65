"""The reference model's numeric building blocks: linear layers (plain and oneDNN's), RMSNorm, rotary frequencies,
and the process's allocator tuning for activations."""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any, Optional

import torch

from hicache_core.engine.model_config import COMPUTE, ModelConfig


def lin(x: torch.Tensor, p: dict, name: str) -> torch.Tensor:
    y = x @ p[name]
    b = p.get(name + "_b")
    return y if b is None else y + b


def onednn_linear_op() -> Any:
    """oneDNN's matmul as torch exposes it (``mkldnn::_linear_pointwise``: ``x @ w.T + b`` with ``w`` as (out, in)),
    or None where this torch build lacks it or it gives a wrong answer on a probe.

    Why: torch's float32 ``mm`` on CPU is MKL's sgemm, which on AMD CPUs runs its AVX2 kernels. On this project's
    machines (2 cores of an AMD EPYC, AVX-512) MKL reaches 210 GF/s and oneDNN 510 (SmolLM2's 512 x 576 x 3072
    MLP matmul: 7.7 ms vs 3.4 ms); vLLM's CPU backend uses oneDNN for the same reason. Same float32 arithmetic
    (no reduced precision), only another summation order."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
    if op is None:
        return None
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=g) for s in ((5, 24), (40, 24), (40,)))
        got = op(x, w, b, "none", [], "")
        if not torch.allclose(got, x @ w.T + b, rtol=1e-4, atol=1e-4):
            return None
    except (RuntimeError, TypeError):  # an op of another signature in some torch build
        return None
    return op


ONEDNN: Any = onednn_linear_op()


def dnn(x: torch.Tensor, wb: tuple[torch.Tensor, Optional[torch.Tensor]]) -> torch.Tensor:
    """``x @ w.T + b`` by oneDNN, for a fused (weight, bias) of ``TinyLlama._fuse`` (engine/model.py)."""
    return ONEDNN(x, wb[0], wb[1], "none", [], "")


_HEAP_KEPT = False


def keep_activations_in_heap() -> None:
    """Have glibc serve allocations up to 32 MiB from its heap and keep freed memory there (``mallopt``), once a
    process, unless ``$HICACHE_MALLOC_TUNE=0`` or the ``MALLOC_*`` variables already say otherwise.

    glibc's default hands an activation of more than a few hundred KiB out by ``mmap`` and gives it back on free, so
    each op's output is fresh memory, faulted in 4 KiB at a time: 15,000-25,000 page faults in a 512-token
    SmolLM2 float32 prefill, ~100 of its 480 ms on 2 cores (with it: 0 faults, 370 ms); float64 took 410,000
    faults and 1650 ms (with it: 1280 ms). The cost is freed memory the process keeps for its next forward pass: up
    to 256 MiB at the heap's top before glibc trims it."""
    global _HEAP_KEPT
    if _HEAP_KEPT:
        return
    _HEAP_KEPT = True
    if os.environ.get("HICACHE_MALLOC_TUNE", "1") == "0" or not sys.platform.startswith("linux"):
        return
    if any(k.startswith("MALLOC_") and k.endswith("THRESHOLD_") for k in os.environ):
        return  # the user tuned malloc
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):
            return  # not glibc (musl has no such thresholds)
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value
        libc.mallopt(m_trim_threshold, 256 << 20)
    except (OSError, AttributeError):
        return


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_inv_freq(c: ModelConfig) -> torch.Tensor:
    d = c.rope_dim
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, d, 2, dtype=COMPUTE) / d))
    rs = c.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        inv = inv / float(rs["factor"])
    elif kind == "llama3":  # long-context scaling of Llama 3.1: low frequencies slowed, a smooth band between
        factor, lo, hi = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old = float(rs["original_max_position_embeddings"])
        wavelen = 2 * torch.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    elif kind != "default":
        raise ValueError(f"rope scaling {kind!r} is not supported (plain, linear and llama3 are)")
    return inv
