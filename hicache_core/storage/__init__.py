"""The storage backend contract (v0 + v1), the adapters that make every backend speak v1, and the in-memory
reference backend."""

from hicache_core.storage.adapter import NamespacedBackend, V0Adapter
from hicache_core.storage.base import HiCacheStorage, StorageConfig

__all__ = ["HiCacheStorage", "NamespacedBackend", "StorageConfig", "V0Adapter"]
