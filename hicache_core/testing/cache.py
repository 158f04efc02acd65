"""A small three-tier cache on the file backend, for tests that drive the cache's front door directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def file_cache(storage_dir: str | Path, page_size: int = 16, device_pages: int = 8, host_pages: int = 16) -> Any:
    """A HiRadixCache with device, host and file-storage tiers (direct io, float32 pages of 2 layers x 1 head x
    8), prefetching from one page on; close it after use."""
    from hicache_core.cache import build_cache
    from hicache_core.config import HiCacheConfig
    from hicache_core.memory import KVSpec

    cfg = HiCacheConfig(
        page_size=page_size,
        hicache_io_backend="direct",
        hicache_storage_backend="file",
        hicache_storage_backend_extra_config={"storage_dir": str(storage_dir), "prefetch_threshold": page_size},
    )
    spec = KVSpec(layer_num=2, head_num=1, head_dim=8, dtype=torch.float32)
    return build_cache(
        cfg, spec, device_pages * page_size, tiers="hicache+storage", device="cpu", host_tokens=host_pages * page_size
    )
