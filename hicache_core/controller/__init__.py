"""Background work of the cache, in two parts: :class:`HiCacheController` copies pages between device and host
(``copies``) and, while a backend is attached, owns a :class:`StorageController` (``storage``) that prefetches
and backs up pages under the :class:`PrefetchPolicy` (``policy``) of the config it was attached with."""

from hicache_core.controller.copies import HiCacheController
from hicache_core.controller.policy import PrefetchCost, PrefetchPolicy
from hicache_core.controller.storage import STORAGE_BATCH_PAGES, StorageController

__all__ = ["STORAGE_BATCH_PAGES", "HiCacheController", "PrefetchCost", "PrefetchPolicy", "StorageController"]
