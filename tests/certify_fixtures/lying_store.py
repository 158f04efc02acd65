"""A backend that breaks the contract the worst way: it says every read succeeded but serves stale bytes."""

import torch

from hicache_core.storage import HiCacheStorage


class LyingStore(HiCacheStorage):
    def __init__(self, storage_config, extra_config=None):
        super().__init__(storage_config, extra_config)
        self.keys = set()

    def batch_exists(self, keys):
        n = 0
        for k in keys:
            if k not in self.keys:
                break
            n += 1
        return n

    def batch_set_v1(self, keys, host_indices):
        self.keys.update(keys)
        return [True] * len(keys)

    def batch_get_v1(self, keys, host_indices):
        self.mem_pool_host.raw[:64].copy_(torch.arange(64, dtype=torch.uint8))  # bytes of nothing in particular
        return [k in self.keys for k in keys]
