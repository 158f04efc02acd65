"""``kernel`` io: one Triton kernel that moves KV items between any two paged layouts.

An *item* is one token of one layer of K (or V, or the MLA latent): ``head_num * head_dim`` contiguous elements in
every layout. Where item (token t, layer l, kv) lives is the same formula everywhere,
``(t // page_size) * page + (t % page_size) * token + l * layer + kv * kv_stride``; only the four strides differ
per layout (``token_strides()`` of each pool). So one kernel serves host->device per layer, device->host for all
layers, and every layout pair. A program copies one item of one (kv, layer); bytes move as the widest integer word
that divides the item, bit for bit.

On CUDA the host pool must be pinned (the GPU reads host memory directly). On CPU the kernel runs only under
``TRITON_INTERPRET=1`` -- the test suite does that on small shapes.
"""

from __future__ import annotations

import functools
import os

import torch

_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def triton_usable() -> bool:
    """True where the kernel can run: CUDA, or any machine with ``TRITON_INTERPRET=1``."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=1)
def _kernel():
    """Define the kernel on first use, so ``TRITON_INTERPRET`` set by a test before that use takes effect."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy_items(
        src,
        dst,
        src_idx,
        dst_idx,
        n_layers,
        layer_base,
        s_page,
        s_tok,
        s_layer,
        s_kv,
        d_page,
        d_tok,
        d_layer,
        d_kv,
        PAGE: tl.constexpr,
        ITEM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        i = tl.program_id(0)
        j = tl.program_id(1)
        kv = (j // n_layers).to(tl.int64)
        layer = (j % n_layers + layer_base).to(tl.int64)
        st = tl.load(src_idx + i).to(tl.int64)
        dt = tl.load(dst_idx + i).to(tl.int64)
        s_off = (st // PAGE) * s_page + (st % PAGE) * s_tok + layer * s_layer + kv * s_kv
        d_off = (dt // PAGE) * d_page + (dt % PAGE) * d_tok + layer * d_layer + kv * d_kv
        for b in range(0, ITEM, BLOCK):
            offs = b + tl.arange(0, BLOCK)
            mask = offs < ITEM
            tl.store(dst + d_off + offs, tl.load(src + s_off + offs, mask=mask), mask=mask)

    return copy_items


def _word(item_bytes: int, *strides: int) -> int:
    for w in (8, 4, 2, 1):
        if item_bytes % w == 0 and all(s % w == 0 for s in strides):
            return w
    return 1


def _flat_words(t: torch.Tensor, w: int) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8).view(_WORDS[w])


def copy_items(
    src_pool,
    dst_pool,
    src_buf: torch.Tensor,
    dst_buf: torch.Tensor,
    src_indices: torch.Tensor,
    dst_indices: torch.Tensor,
    layers: range,
    device: torch.device,
) -> None:
    """Copy every (kv, layer in ``layers``) item of the given tokens from src to dst."""
    n = src_indices.numel()
    if n == 0:
        return
    item = src_pool.spec.item_bytes
    ss, ds = src_pool.token_strides(), dst_pool.token_strides()
    w = _word(item, *ss, *ds)
    src_w, dst_w = _flat_words(src_buf, w), _flat_words(dst_buf, w)
    si = src_indices.to(device=device, dtype=torch.int64)
    di = dst_indices.to(device=device, dtype=torch.int64)
    num_kv = src_pool.spec.num_kv
    item_words = item // w
    block = min(1024, 1 << (item_words - 1).bit_length())
    grid = (n, num_kv * len(layers))
    _kernel()[grid](
        src_w,
        dst_w,
        si,
        di,
        len(layers),
        layers.start,
        *(s // w for s in ss),
        *(d // w for d in ds),
        PAGE=src_pool.page_size,
        ITEM=item_words,
        BLOCK=block,
    )


def load_layer(host, device, host_indices, device_indices, layer: int) -> None:
    copy_items(
        host, device, host.raw, device.kv_buffer, host_indices, device_indices, range(layer, layer + 1), device.device
    )


def load_all_layers(host, device, host_indices, device_indices) -> None:
    copy_items(
        host, device, host.raw, device.kv_buffer, host_indices, device_indices, range(host.layer_num), device.device
    )


def backup_all_layers(device, host, device_indices, host_indices) -> None:
    copy_items(
        device, host, device.kv_buffer, host.raw, device_indices, host_indices, range(host.layer_num), device.device
    )
