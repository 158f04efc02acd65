"""SGLang's real host pools (``sglang.srt.mem_cache.pool_host``), built with their own constructors on the CPU:
``MHATokenToKVPoolHost`` and ``MLATokenToKVPoolHost`` over device buffers of SGLang's shapes (MHA: per-layer
``[tokens, heads, head_dim]`` K and V; MLA: per-layer ``[tokens, 1, kv_lora_rank + qk_rope_head_dim]``)."""

import os

import torch
from sglang.srt.mem_cache.device_pool_info import KVBufferLayout, KVBuffers, MHABufferInfo, MLABufferInfo
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
from sglang_helpers import PS, storage_config

from hicache_core.memory import KVSpec
from hicache_core.sglang import HiCacheForSGLang

LAYERS, HEADS, HEAD_DIM, LORA, ROPE = 3, 2, 8, 16, 8
DEVICE_TOKENS = 64


def _ptrs(tensors) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.uint64)


def real_host_pool(layout: str, *, mla: bool = False, page_size: int = 4, dtype=torch.bfloat16):
    """A real SGLang host pool of 2x a 64-token device pool, unpinned, its buffer filled with random bytes."""
    if not mla:
        return _mha_host(
            MHATokenToKVPoolHost, layout, layers=LAYERS, v_head_dim=HEAD_DIM, page_size=page_size, dtype=dtype
        )
    cpu = torch.device("cpu")
    common = dict(pin_memory=False, device="cpu", device_capacity_tokens=DEVICE_TOKENS, start_layer=0, end_layer=LAYERS)
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
    _fill(pool.kv_buffer)
    return pool


def spec_of(mla: bool, dtype=torch.bfloat16) -> KVSpec:
    """The same geometry as hicache describes it (for hicache's own HostPool beside SGLang's)."""
    if mla:
        return KVSpec(layer_num=LAYERS, head_num=1, head_dim=LORA + ROPE, dtype=dtype, is_mla=True)
    return KVSpec(layer_num=LAYERS, head_num=HEADS, head_dim=HEAD_DIM, dtype=dtype)


# --- the other kinds a hybrid model's HostPoolGroup holds (SGLang's own constructors, on the CPU) -----------------
V_HEAD_DIM, SWA_LAYERS, MAMBA_LAYERS, MAMBA_SLOTS = 4, 2, 2, 12


def _fill(*buffers) -> None:
    for buf in buffers:
        b = buf.view(-1).view(torch.uint8)
        b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8))


def _mha_host(cls, layout: str, *, layers: int, v_head_dim: int, page_size: int = 4, dtype=torch.bfloat16):
    """An SGLang MHA host pool of class ``cls`` over ``layers`` layers, 2x a 64-token device pool, random bytes."""
    k = tuple(torch.zeros(DEVICE_TOKENS, HEADS, HEAD_DIM, dtype=dtype) for _ in range(layers))
    v = tuple(torch.zeros(DEVICE_TOKENS, HEADS, v_head_dim, dtype=dtype) for _ in range(layers))
    info = MHABufferInfo(
        buffers=KVBuffers(k=k, v=v, k_data_ptrs=_ptrs(k), v_data_ptrs=_ptrs(v), layout=KVBufferLayout.NHD),
        page_size=page_size,
        head_num=HEADS,
        head_dim=HEAD_DIM,
        v_head_dim=v_head_dim,
        dtype=dtype,
        device=torch.device("cpu"),
    )
    pool = cls(
        info, 2.0, 0, page_size, layout, pin_memory=False, device="cpu", device_capacity_tokens=DEVICE_TOKENS,
        start_layer=0, end_layer=layers,
    )  # fmt: skip
    _fill(*((pool.k_buffer, pool.v_buffer) if v_head_dim != HEAD_DIM else (pool.kv_buffer,)))
    return pool


def asymmetric_pool(layout: str):
    """``AsymmetricMHATokenToKVPoolHost`` (K head dim 8, V head dim 4: MiMo-V2's kind), page_first layouts only."""
    from sglang.srt.mem_cache.pool_host.mha import AsymmetricMHATokenToKVPoolHost

    return _mha_host(AsymmetricMHATokenToKVPoolHost, layout, layers=LAYERS, v_head_dim=V_HEAD_DIM)


def swa_pool(layout: str):
    """The sliding-window layers' pool of a hybrid SWA model: an ``MHATokenToKVPoolHost`` over those layers."""
    return _mha_host(MHATokenToKVPoolHost, layout, layers=SWA_LAYERS, v_head_dim=HEAD_DIM)


def k_only_pool(anchor, layout: str):
    """``MHATokenToKOnlyPoolHost`` (MiniMax's sparse index K) sized by its anchor, as SGLang builds it."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKOnlyPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKOnlyPoolHost

    device = MHATokenToKOnlyPool(DEVICE_TOKENS, anchor.page_size, torch.bfloat16, HEADS, HEAD_DIM, LAYERS, "cpu", False)
    pool = MHATokenToKOnlyPoolHost(device, anchor, layout, pin_memory=False, device="cpu")
    _fill(pool.k_buffer)
    return pool


def mamba_pool(layout: str, *, conv_shapes=((6, 3),), temporal_shape=(2, 4, 4)):
    """``MambaPoolHost``: one state slot (temporal SSM state + conv states, every Mamba layer) per request."""
    from sglang.srt.mem_cache.device_pool_info import MambaStateBufferInfo
    from sglang.srt.mem_cache.pool_host.mamba import MambaPoolHost

    temporal = torch.zeros(MAMBA_LAYERS, MAMBA_SLOTS, *temporal_shape)
    conv = tuple(torch.zeros(MAMBA_LAYERS, MAMBA_SLOTS, *s, dtype=torch.bfloat16) for s in conv_shapes)
    info = MambaStateBufferInfo(temporal=temporal, conv=conv)
    pool = MambaPoolHost(info, 2.0, 0, device_capacity=MAMBA_SLOTS, pin_memory=False, device="cpu", layout=layout)
    _fill(pool.temporal_buffer, *pool.conv_buffer)
    return pool


def group(anchor, **side):
    """SGLang's ``HostPoolGroup``: the KV anchor and side pools by SGLang's pool names (``swa=``, ``mamba=``, ...)."""
    from sglang.srt.mem_cache.hicache_storage import PoolName
    from sglang.srt.mem_cache.pool_host import HostPoolGroup, PoolEntry

    entries = [PoolEntry(name=PoolName.KV, host_pool=anchor, device_pool=None, layer_mapper=lambda i: i,
                         is_primary_index_anchor=True)]  # fmt: skip
    entries += [
        PoolEntry(name=PoolName(n), host_pool=p, device_pool=None, layer_mapper=lambda i: i) for n, p in side.items()
    ]
    return HostPoolGroup(entries)


# --- SGLang's way in: its factory, its storage config -------------------------------------------------------------
LAYOUTS = ("layer_first", "page_first", "page_first_direct")


def bridge(pool, extra: dict, *, mla: bool, tp_rank: int = 0, tp_size: int = 1) -> HiCacheForSGLang:
    """Exactly SGLang's path: its factory builds the class by dynamic JSON, then the pool is registered."""
    dynamic = {"backend_name": "hicache", "module_path": "hicache_core.sglang", "class_name": "HiCacheForSGLang"}
    sc = storage_config(
        {**dynamic, "interface_v1": 1, **extra}, model="real-pools", layout=pool.layout, mla=mla, tp_rank=tp_rank,
        tp_size=tp_size,
    )  # fmt: skip
    backend = StorageBackendFactory.create_backend("dynamic", sc, pool)
    assert isinstance(backend, HiCacheForSGLang)
    backend.register_mem_pool_host(pool)
    return backend


def store(name: str, tmp_path) -> dict:
    if name == "file":
        return {"hicache_backend": "file", "storage_dir": str(tmp_path / "file")}
    if name == "hf3fs":
        return {
            "hicache_backend": "hf3fs",
            "file_path_prefix": str(tmp_path / "hf3fs" / "kv"),
            "file_size": 1 << 24,
            "numjobs": 2,
            "entries": 4,
        }
    return {"hicache_backend": name}


def indices(pages) -> torch.Tensor:
    return torch.cat([torch.arange(p * PS, (p + 1) * PS) for p in pages])


def page_bytes(pool, host_indices) -> list[bytes]:
    return [
        pool.get_data_page(int(i), flat=True).contiguous().view(torch.uint8).numpy().tobytes()
        for i in host_indices[::PS]
    ]


def keys(n: int) -> list[str]:
    return [os.urandom(32).hex() for _ in range(n)]
