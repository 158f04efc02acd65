"""SGLang's own storage backends inside hicache: classes deriving from SGLang's ``HiCacheStorage`` are built the way
SGLang builds them -- a ``HiCacheStorageConfig`` with every field SGLang defines, and the argument shapes of
SGLang's factory -- so ``--hicache-storage-backend dynamic`` can name ``sglang.srt.mem_cache.hicache_storage``'s
``HiCacheFile`` or any SGLang v1 class. sglang is imported only when such a class is selected.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

SGLANG_STORAGE = ("sglang.srt.mem_cache.hicache_storage", "HiCacheStorage")


def is_sglang_backend(cls: type) -> bool:
    """True for subclasses of SGLang's HiCacheStorage (checked by name: sglang is not imported here)."""
    return any((c.__module__, c.__name__) == SGLANG_STORAGE for c in getattr(cls, "__mro__", ())[1:])


def sglang_storage_config(storage_config: Any, extra: dict) -> Any:
    """SGLang's HiCacheStorageConfig for a hicache StorageConfig: every field SGLang requires, ranks and layout
    from hicache's, ``extra`` as its extra_config."""
    cls = importlib.import_module(SGLANG_STORAGE[0]).HiCacheStorageConfig
    return cls(tp_rank=storage_config.tp_rank, tp_size=storage_config.tp_size, pp_rank=0, pp_size=1,
               attn_cp_rank=0, attn_cp_size=1, is_mla_model=storage_config.is_mla_model,
               enable_storage_metrics=False, is_page_first_layout=storage_config.is_page_first_layout,
               model_name=storage_config.model_name, extra_config=dict(extra))


def construct_sglang(cls: type, storage_config: Any, extra: dict, host_pool: Any) -> Any:
    """Build an SGLang backend class with the shape SGLang's factory uses for it: ``cls(config)`` when the second
    parameter has a default (HiCacheFile's ``file_path``), ``cls(config, mem_pool_host)`` when the constructor
    takes the host pool (Mooncake, EIC...), else ``cls(config, kwargs)`` (SGLang's dynamic shape)."""
    sconfig = sglang_storage_config(storage_config, extra)
    params = list(inspect.signature(cls).parameters.values())  # the constructor's, without self
    if len(params) < 2 or params[1].default is not inspect.Parameter.empty:
        return cls(sconfig)
    if "pool" in params[1].name or "host" in params[1].name:
        return cls(sconfig, host_pool)
    return cls(sconfig, {})
