"""Helpers for cache tests: KV whose bytes encode the token prefix, so any wrong page is caught."""

from __future__ import annotations

import time
import uuid

import torch

from hicache_core.cache import Admission, HiRadixCache, build_cache
from hicache_core.config import HiCacheConfig
from hicache_core.faults import SENTINEL, kv_matches, write_kv  # noqa: F401 (re-exported)
from hicache_core.memory import KVSpec

PS = 4
SPEC = KVSpec(layer_num=2, head_num=1, head_dim=2, dtype=torch.float32)


def make_cache(
    *,
    device_pages=8,
    host_pages=16,
    storage=None,
    store="default",
    layout="layer_first",
    write_policy="write_through",
    prefetch="best_effort",
    extra=None,
    eviction="lru",
    model="t",
    salt_host_pages=0,
    salt_storage_pages=0,
    **more,
) -> HiRadixCache:
    extra = {"prefetch_threshold": PS, **(extra or {})}
    if storage == "memory":
        extra = {"store": store, **extra}
    cfg = HiCacheConfig(
        page_size=PS,
        hicache_io_backend="direct",
        hicache_mem_layout=layout,
        hicache_write_policy=write_policy,
        hicache_storage_prefetch_policy=prefetch,
        hicache_storage_backend=storage,
        radix_eviction_policy=eviction,
        hicache_storage_backend_extra_config=extra,
        model_name=model,
        hicache_salt_host_pages=salt_host_pages,
        hicache_salt_storage_pages=salt_storage_pages,
        **more,
    )
    tiers = "hicache+storage" if storage else "hicache" if host_pages else "radix"
    return build_cache(
        cfg, SPEC, device_pages * PS, tiers=tiers, device="cpu", host_tokens=host_pages * PS, pin_memory=False
    )


def admit_ready(cache: HiRadixCache, rid, prompt, extra_tokens: int = 0, timeout: float = 30.0, salt=None) -> Admission:
    """Admit as an engine does: poll and ask again while a prefetch is in flight."""
    deadline = time.monotonic() + timeout
    while (adm := cache.admit(rid, prompt, extra_tokens, salt=salt)).status == "wait":
        assert time.monotonic() < deadline, "prefetch never ended"
        time.sleep(0.002)
        cache.poll()
    return adm


def run_request(cache: HiRadixCache, tokens, rid="r", salt=None) -> dict:
    """One request through the front door: admit, check every served byte, compute the rest, release. Under a
    salt the KV encodes the salt too, so a page of another salt is caught as wrong KV."""
    prompt = list(tokens) + [SENTINEL]
    adm = admit_ready(cache, rid, prompt, salt=salt)
    assert adm.ready, "device pool exhausted"
    cache.ready_to_load_host_cache()
    assert kv_matches(cache.device_pool, adm.prefix, prompt, salt), "served KV differs from what was inserted"
    computed = len(prompt) - len(adm.prefix)
    write_kv(cache.device_pool, adm.slots(computed), prompt, salt)
    cache.release(adm, prompt, computed)
    cache.poll()
    c = adm.cached
    return {
        "device": c["device"],
        "host": c["host"] + c["storage"],
        "storage": c["storage"],
        "computed": (len(tokens) - len(adm.prefix)) // PS * PS,
        "prefetch": adm.prefetch,
    }


def owned_pages_ok(cache: HiRadixCache) -> None:
    """Every allocated page is owned by exactly one node or free; nothing else holds any."""
    dev_owned, host_owned = [], []
    for n in cache.nodes():
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
            f"prefetch={cache.ongoing_prefetch}"
        )


def empty_and_check(cache: HiRadixCache, device_free: int, host_free: int) -> None:
    """Flush, evict everything, close: every page must be free again and the tree empty."""
    cache.flush()
    cache.evict(10**6)
    cache.flush()
    cache.evict_host(10**6)
    cache.close()
    cache.controller.poll()  # pages the workers handed back on the way out
    assert cache.device_pool.available_size() == device_free
    assert cache.host_pool.available_size() == host_free
    assert not cache.root.children


def locks_balanced(cache: HiRadixCache) -> None:
    for n in cache.nodes():  # a salt's root holds a lock of its own
        assert n.lock_ref == (1 if n.seed is not None else 0) and n.host_ref == 0, f"lock left on {n}"


def seq(base: int, n_pages: int) -> list[int]:
    return [base * 1000 + i for i in range(n_pages * PS)]


def stored_elsewhere(tokens) -> str:
    """A memory store holding ``tokens``' pages, written by another cache instance that is gone."""
    store = uuid.uuid4().hex
    writer = make_cache(storage="memory", store=store)
    run_request(writer, tokens)
    writer.flush()
    writer.close()
    return store
