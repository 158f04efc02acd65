"""The hicache page order against vLLM's real CPU cache-write op (``cpu_attn_reshape_and_cache``, the ISA this CPU
picks: amx for bf16 on an AMX Xeon, vec for fp16): a block vLLM wrote reaches the host tier as it is, leaves for
storage as hicache's page (K|V, token, head, dim), and a page read back from storage loads bit-equal to the block
vLLM wrote. No LLM is started."""

from __future__ import annotations

import warnings

import pytest
import torch

with warnings.catch_warnings():  # vLLM's import-time notices about torch APIs are not ours to fix
    warnings.simplefilter("ignore")
    from vllm._custom_ops import cpu_attn_reshape_and_cache

    from hicache_core.integrations.vllm.connector import _cpu_isa, cpu_block_order
from hicache_core.integrations.vllm.settings import Geometry
from hicache_core.integrations.vllm.worker import WorkerHalf

LAYERS, BLOCKS = 2, 6


def geometry(dtype: torch.dtype, block_size: int = 32, heads: int = 2, head_size: int = 64) -> Geometry:
    names = tuple(f"model.layers.{i}.self_attn.attn" for i in range(LAYERS))
    return Geometry(names, BLOCKS, block_size, heads, head_size, dtype)


def vllm_write(g: Geometry, cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: list[int]) -> None:
    """What vLLM's forward does: tokens [T, H, D] into the blocks' slots, through vLLM's own op."""
    b, h, n, c = cache.shape
    kc, vc = cache.view(b, h, 2 * n, c // 2).chunk(2, dim=2)
    slots = (torch.tensor(blocks)[:, None] * n + torch.arange(n)).reshape(-1)
    cpu_attn_reshape_and_cache(key, value, kc, vc, slots, _cpu_isa(g))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_block_vllm_wrote_lands_as_hicache_page_and_loads_back_bit_equal(dtype):
    g = geometry(dtype)
    order = cpu_block_order(g)
    assert not torch.equal(order.perm, torch.arange(order.numel)), "the probe read a real packing, not identity"
    caches = {n: torch.zeros(BLOCKS, g.kv_heads, g.block_size, 2 * g.head_size, dtype=dtype) for n in g.layer_names}
    worker = WorkerHalf(g, host_pages=4, staging_pages=2, order=order)
    try:
        worker.register(caches)
        blocks, slots = [4, 1], [2, 0]
        t = len(blocks) * g.block_size
        kv = {n: torch.randn(2, t, g.kv_heads, g.head_size).to(dtype) for n in g.layer_names}
        for n in g.layer_names:
            vllm_write(g, caches[n], kv[n][0].contiguous(), kv[n][1].contiguous(), blocks)
        for layer in range(LAYERS):
            worker._to_host(layer, blocks, slots)
        worker._reorder(slots, unpack=True)  # what a backup does to its staging pages
        for layer, n in enumerate(g.layer_names):
            for i, s in enumerate(slots):
                want = kv[n][:, i * g.block_size : (i + 1) * g.block_size].reshape(2, -1)
                assert torch.equal(worker.host[:, s, layer].view(dtype), want), (layer, s)
        before = {n: c.clone() for n, c in caches.items()}
        for c in caches.values():
            c[blocks] = 0
        worker._reorder(slots, unpack=False)  # what a storage read does before the pages go to vLLM's blocks
        worker._to_blocks([5, 3], slots)  # into other blocks: every byte comes from the host page
        for n in g.layer_names:
            assert torch.equal(caches[n][[5, 3]].view(torch.int8), before[n][blocks].view(torch.int8))
    finally:
        worker.close()


def test_a_block_of_another_shape_is_refused_with_the_setting_that_keeps_vllms_bytes():
    g = geometry(torch.bfloat16)
    worker = WorkerHalf(g, 2, 1, cpu_block_order(geometry(torch.bfloat16, block_size=64)))
    caches = {n: torch.zeros(BLOCKS, g.kv_heads, g.block_size, 2 * g.head_size, dtype=g.dtype) for n in g.layer_names}
    try:
        with pytest.raises(ValueError, match='"hicache_page_order": "vllm"'):
            worker.register(caches)
    finally:
        worker.close()
