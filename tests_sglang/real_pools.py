"""SGLang's real host pools (``sglang.srt.mem_cache.pool_host``), built with their own constructors on the CPU:
``MHATokenToKVPoolHost`` and ``MLATokenToKVPoolHost`` over device buffers of SGLang's shapes (MHA: per-layer
``[tokens, heads, head_dim]`` K and V; MLA: per-layer ``[tokens, 1, kv_lora_rank + qk_rope_head_dim]``)."""

import torch
from sglang.srt.mem_cache.device_pool_info import KVBufferLayout, KVBuffers, MHABufferInfo, MLABufferInfo
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

from hicache_core.memory import KVSpec

LAYERS, HEADS, HEAD_DIM, LORA, ROPE = 3, 2, 8, 16, 8
DEVICE_TOKENS = 64


def _ptrs(tensors) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.uint64)


def real_host_pool(layout: str, *, mla: bool = False, page_size: int = 4, dtype=torch.bfloat16):
    """A real SGLang host pool of 2x a 64-token device pool, unpinned, its buffer filled with random bytes."""
    cpu = torch.device("cpu")
    common = dict(pin_memory=False, device="cpu", device_capacity_tokens=DEVICE_TOKENS, start_layer=0, end_layer=LAYERS)
    if mla:
        rows = tuple(torch.zeros(DEVICE_TOKENS, 1, LORA + ROPE, dtype=dtype) for _ in range(LAYERS))
        info = MLABufferInfo(
            buffers=rows,
            data_ptrs=_ptrs(rows),
            layer_indices=tuple(range(LAYERS)),
            device_layer_num=LAYERS,
            page_size=page_size,
            kv_lora_rank=LORA,
            qk_rope_head_dim=ROPE,
            kv_cache_dim=LORA + ROPE,
            dtype=dtype,
            device=cpu,
        )
        pool = MLATokenToKVPoolHost(info, 2.0, 0, page_size, layout, target_layer_num=LAYERS, **common)
    else:
        k = tuple(torch.zeros(DEVICE_TOKENS, HEADS, HEAD_DIM, dtype=dtype) for _ in range(LAYERS))
        v = tuple(torch.zeros(DEVICE_TOKENS, HEADS, HEAD_DIM, dtype=dtype) for _ in range(LAYERS))
        info = MHABufferInfo(
            buffers=KVBuffers(k=k, v=v, k_data_ptrs=_ptrs(k), v_data_ptrs=_ptrs(v), layout=KVBufferLayout.NHD),
            page_size=page_size,
            head_num=HEADS,
            head_dim=HEAD_DIM,
            v_head_dim=HEAD_DIM,
            dtype=dtype,
            device=cpu,
        )
        pool = MHATokenToKVPoolHost(info, 2.0, 0, page_size, layout, **common)
    buf = pool.kv_buffer.view(torch.uint8)
    buf.copy_(torch.randint(0, 256, buf.shape, dtype=torch.uint8))
    return pool


def spec_of(mla: bool, dtype=torch.bfloat16) -> KVSpec:
    """The same geometry as hicache describes it (for hicache's own HostPool beside SGLang's)."""
    if mla:
        return KVSpec(layer_num=LAYERS, head_num=1, head_dim=LORA + ROPE, dtype=dtype, is_mla=True)
    return KVSpec(layer_num=LAYERS, head_num=HEADS, head_dim=HEAD_DIM, dtype=dtype)
