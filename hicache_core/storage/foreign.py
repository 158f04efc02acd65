"""SGLang's own storage backends inside hicache: classes deriving from SGLang's ``HiCacheStorage`` are built the way
SGLang builds them -- a ``HiCacheStorageConfig`` with every field SGLang defines, and the argument shapes of
SGLang's factory -- so ``--hicache-storage-backend dynamic`` can name ``sglang.srt.mem_cache.hicache_storage``'s
``HiCacheFile`` or any SGLang v1 class. sglang is imported only when such a class is selected.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from hicache_core.storage.adapter import Delegate

SGLANG_STORAGE = ("sglang.srt.mem_cache.hicache_storage", "HiCacheStorage")


def is_sglang_backend(cls: type) -> bool:
    """True for subclasses of SGLang's HiCacheStorage (checked by name: sglang is not imported here)."""
    return any((c.__module__, c.__name__) == SGLANG_STORAGE for c in getattr(cls, "__mro__", ())[1:])


def sglang_storage_config(storage_config: Any, extra: dict) -> Any:
    """SGLang's HiCacheStorageConfig for a hicache StorageConfig: every field SGLang requires, ranks and layout
    from hicache's, ``extra`` as its extra_config."""
    cls = importlib.import_module(SGLANG_STORAGE[0]).HiCacheStorageConfig
    return cls(
        tp_rank=storage_config.tp_rank,
        tp_size=storage_config.tp_size,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=storage_config.is_mla_model,
        enable_storage_metrics=False,
        is_page_first_layout=storage_config.is_page_first_layout,
        model_name=storage_config.model_name,
        extra_config=dict(extra),
    )


class PairedSetResults(Delegate):
    """SGLang 0.5.23's HiCacheHF3FS answers ``batch_set_v1`` on an MHA zero-copy pool with one bool per K and per
    V object (two per page), where its own ``batch_get_v1`` folds the same pairs into one per page; the set answer
    is folded the same way here (a page is stored when both halves are). Any other answer passes untouched, so
    the guard still refuses a result of the wrong length."""

    def batch_set_v1(self, keys, host_indices, extra_info: Any = None) -> Any:
        result = self.inner.batch_set_v1(keys, host_indices, extra_info)
        if getattr(self.inner, "mha_zero_copy", False) and isinstance(result, list) and len(result) == 2 * len(keys):
            return [bool(result[2 * i]) and bool(result[2 * i + 1]) for i in range(len(keys))]
        return result

    def describe(self) -> str:
        return type(self.inner).__qualname__


def sglang_page_bytes(host_pool: Any) -> int:
    """The page size SGLang's factory gives ``from_env_config`` backends: one K (or V) object per page in the
    page-first layouts, the whole page in layer_first."""
    per_token = host_pool.get_size_per_token() if host_pool.layout == "layer_first" else host_pool.get_ksize_per_token()
    return per_token * host_pool.page_size


def construct_sglang(cls: type, storage_config: Any, extra: dict, host_pool: Any) -> Any:
    """Build an SGLang backend class with the shape SGLang's factory uses for it: ``from_env_config(bytes_per_page,
    dtype, config)`` where the class has it (HiCacheHF3FS, configured by ``SGLANG_HICACHE_HF3FS_CONFIG_PATH`` as in
    SGLang), ``cls(config)`` when the second parameter has a default (HiCacheFile's ``file_path``),
    ``cls(config, mem_pool_host)`` when the constructor takes the host pool (MooncakeStore, EIC...), else
    ``cls(config, kwargs)`` (SGLang's dynamic shape). ``host_pool`` is hicache's :class:`HostPool`, which answers
    to the names SGLang's backends call on SGLang's host pools."""
    sconfig = sglang_storage_config(storage_config, extra)
    from_env = getattr(cls, "from_env_config", None)
    if callable(from_env):  # HiCacheHF3FS: SGLang's factory sizes its pages
        return PairedSetResults(from_env(sglang_page_bytes(host_pool), host_pool.dtype, sconfig))
    params = list(inspect.signature(cls).parameters.values())  # the constructor's, without self
    if len(params) < 2 or params[1].default is not inspect.Parameter.empty:
        return cls(sconfig)
    if "pool" in params[1].name or "host" in params[1].name:
        return cls(sconfig, host_pool)
    return cls(sconfig, {})
