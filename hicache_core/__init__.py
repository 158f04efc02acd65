"""hicache: a hierarchical KV cache (device, host, storage) behind one radix-tree prefix cache."""

from hicache_core.config import HiCacheConfig, add_hicache_args
from hicache_core.errors import BackendLoadError, ConfigError, HiCacheError, StorageError

__version__ = "0.1.0"
__all__ = ["BackendLoadError", "ConfigError", "HiCacheConfig", "HiCacheError", "StorageError", "add_hicache_args"]
