"""A node cut in two while its device->host copy is still landing: the upper part (the prefix a second request
shares) is backed up to storage when the copy lands, like the rest. Before, only the lower part was: the shared
prefix had a host copy and never reached storage, so after /flush_cache it was a miss (found by the SmolLM2 serve
test under CI load, where copies land later)."""

import torch

from hicache_core.cache import build_cache
from hicache_core.config import HiCacheConfig
from hicache_core.keys import hash_chain
from hicache_core.memory import KVSpec

PS = 16


def test_a_prefix_cut_off_a_landing_copy_reaches_storage(tmp_path):
    cfg = HiCacheConfig(
        page_size=PS,
        hicache_io_backend="direct",
        hicache_storage_backend="file",
        hicache_storage_backend_extra_config={"storage_dir": str(tmp_path), "prefetch_threshold": PS},
    )
    spec = KVSpec(layer_num=2, head_num=1, head_dim=8, dtype=torch.float32)
    cache = build_cache(cfg, spec, 16 * PS, tiers="hicache+storage", device="cpu", host_tokens=32 * PS)
    try:
        shared = list(range(100, 100 + 4 * PS))
        a, b = shared + list(range(500, 500 + 2 * PS)), shared + list(range(900, 900 + 2 * PS))
        first = cache.admit("a", a + [1], 0)
        cache.ready_to_load_host_cache()
        cache.release(first, a + [1], len(a) + 1)  # its node's host copy starts; nothing polls it in yet
        second = cache.admit("b", b + [1], 0)  # matches the shared prefix: the node is cut while the copy lands
        cache.ready_to_load_host_cache()
        cache.release(second, b + [1], len(b) + 1 - len(second.prefix))
        cache.flush()
        backend = cache.controller.io.guard.backend
        for prompt in (a, b):
            keys = hash_chain(prompt, PS)
            assert backend.batch_exists(keys) == len(keys), f"{backend.batch_exists(keys)} of {len(keys)} pages stored"
    finally:
        cache.close()
