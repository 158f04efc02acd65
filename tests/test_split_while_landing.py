"""A node cut in two while its device->host copy is still landing: the upper part (the prefix a second request
shares) is backed up to storage when the copy lands, like the rest. Before, only the lower part was: the shared
prefix had a host copy and never reached storage, so after /flush_cache it was a miss (found by the SmolLM2 serve
test under CI load, where copies land later)."""

from hicache_core.keys import hash_chain
from hicache_core.testing.cache import file_cache

PS = 16


def test_a_prefix_cut_off_a_landing_copy_reaches_storage(tmp_path):
    cache = file_cache(tmp_path, PS, device_pages=16, host_pages=32)
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
