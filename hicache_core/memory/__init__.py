"""Device (L1) and host (L2) KV pools and their page allocator."""

from hicache_core.memory.allocator import PageAllocator
from hicache_core.memory.device_pool import DevicePool, default_device
from hicache_core.memory.host_pool import HostPool, host_pool_tokens
from hicache_core.memory.spec import DTYPES, KVSpec

__all__ = ["DTYPES", "DevicePool", "HostPool", "KVSpec", "PageAllocator", "default_device", "host_pool_tokens"]
