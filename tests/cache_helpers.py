"""Helpers for cache tests: KV whose bytes encode the token prefix, so any wrong page is caught."""

from __future__ import annotations

import zlib

import torch

from hicache_core.cache import HiRadixCache
from hicache_core.config import HiCacheConfig
from hicache_core.memory import DevicePool, HostPool, KVSpec
from hicache_core.registry import create_backend, make_storage_config

PS = 4
SPEC = KVSpec(layer_num=2, head_num=1, head_dim=2, dtype=torch.float32)


def prefix_codes(tokens) -> torch.Tensor:
    """One int32 per position: a checksum of the whole prefix up to and including that token."""
    out, crc = [], 0
    for t in tokens:
        crc = zlib.crc32(int(t).to_bytes(4, "little"), crc)
        out.append(crc & 0x7FFFFFFF)
    return torch.tensor(out, dtype=torch.int32)


def write_kv(pool: DevicePool, idx: torch.Tensor, tokens) -> None:
    codes = prefix_codes(tokens)
    for layer in range(pool.layer_num):
        for kv, buf in enumerate((pool.k_buffer(layer), pool.v_buffer(layer))):
            buf.view(torch.int32)[idx] = (codes + layer * 7 + kv * 3)[:, None, None]


def kv_matches(pool: DevicePool, idx: torch.Tensor, tokens) -> bool:
    if len(idx) == 0:
        return True
    codes = prefix_codes(tokens)[: len(idx)]
    for layer in range(pool.layer_num):
        pool.wait_layer(layer)
        for kv, buf in enumerate((pool.k_buffer(layer), pool.v_buffer(layer))):
            got = buf.view(torch.int32)[idx][:, 0, 0]
            if not torch.equal(got, codes + layer * 7 + kv * 3):
                return False
    return True


def make_cache(*, device_pages=8, host_pages=16, storage=None, store="default", layout="layer_first",
               write_policy="write_through", prefetch="best_effort", extra=None, eviction="lru", model="t") -> HiRadixCache:
    extra = dict(extra or {})
    cfg = HiCacheConfig(page_size=PS, hicache_io_backend="direct", hicache_mem_layout=layout,
                        hicache_write_policy=write_policy, hicache_storage_prefetch_policy=prefetch,
                        hicache_storage_backend=storage, radix_eviction_policy=eviction,
                        hicache_storage_backend_extra_config={"prefetch_threshold": PS, **extra}, model_name=model)
    dev = DevicePool(SPEC, device_pages * PS, PS, "cpu")
    host = HostPool(SPEC, host_pages * PS, PS, layout, pin_memory=False) if host_pages else None
    backend = None
    if storage:
        be_extra = {"store": store, **cfg.backend_extra_config} if storage == "memory" else cfg.backend_extra_config
        backend = create_backend(storage, make_storage_config(cfg, SPEC), host, extra_config=be_extra)
    return HiRadixCache(cfg, dev, host, backend)


def run_request(cache: HiRadixCache, tokens, rid="r") -> dict:
    """What an engine does for one prompt: match, prefetch gate, load back, compute the rest, insert."""
    m = cache.match_prefix(tokens)
    storage_hit = 0
    if cache.storage_enabled and cache.prefetch_from_storage(rid, m.last_node, tokens[m.matched_length:]):
        import time
        before = m.matched_length
        deadline = time.monotonic() + 30
        while not cache.check_prefetch_progress(rid):
            assert time.monotonic() < deadline, "prefetch never ended"
            time.sleep(0.005)
        m = cache.match_prefix(tokens)
        storage_hit = m.matched_length - before
    device_hit = len(m.device_indices)
    cache.inc_lock_ref(m.last_device_node)
    loaded, node = cache.init_load_back(m.last_node) if m.host_hit_length else (torch.empty(0, dtype=torch.int64), m.last_device_node)
    if len(loaded):
        cache.inc_lock_ref(node)
        cache.dec_lock_ref(m.last_device_node)
    else:
        node = m.last_device_node
    cache.ready_to_load_host_cache()
    prefix = torch.cat([m.device_indices, loaded])
    assert kv_matches(cache.device_pool, prefix, tokens), "served KV differs from what was inserted"
    n_new = len(tokens) - len(prefix)
    n_new -= n_new % PS
    new = cache.alloc_device(n_new) if n_new else torch.empty(0, dtype=torch.int64)
    assert new is not None, "device pool exhausted"
    full = torch.cat([prefix, new])
    write_kv(cache.device_pool, full, tokens[: len(full)])
    already = cache.insert(tokens[: len(full)], full)
    if already > len(prefix):
        cache.device_pool.free(full[len(prefix):already])
    cache.dec_lock_ref(node)
    cache.poll()
    return {"device": device_hit, "host": len(loaded), "storage": storage_hit, "computed": len(full) - len(prefix)}


def owned_pages_ok(cache: HiRadixCache) -> None:
    """Every allocated page is owned by exactly one node or free; nothing else holds any."""
    dev_owned, host_owned = [], []
    for n in cache._nodes():
        if n.value is not None:
            dev_owned += n.value[::PS].tolist()
        if n.host_value is not None:
            host_owned += n.host_value[::PS].tolist()
    assert len(dev_owned) == len(set(dev_owned)), "a device page owned twice"
    assert len(host_owned) == len(set(host_owned)), "a host page owned twice"
    used_dev = sorted((cache.device_pool.allocator.used_pages() * PS).tolist())
    assert sorted(dev_owned) == used_dev, "device pages leaked or freed while owned"
    if cache.host_pool is not None:
        used_host = sorted((cache.host_pool.allocator.used_pages() * PS).tolist())
        assert sorted(host_owned) == used_host, (
            f"host pages leaked or freed while owned: owned-not-used {sorted(set(host_owned) - set(used_host))} "
            f"used-not-owned {sorted(set(used_host) - set(host_owned))}\n{cache.pretty()}\n"
            f"prefetch={cache.ongoing_prefetch} detached={cache._detached}")


def locks_balanced(cache: HiRadixCache) -> None:
    for n in cache._nodes():
        assert n.lock_ref == 0 and n.host_ref == 0, f"lock left on {n}"
