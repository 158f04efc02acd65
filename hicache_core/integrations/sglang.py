"""hicache inside SGLang: :class:`HiCacheForSGLang` is a storage backend SGLang's own ``StorageBackendFactory`` loads
unchanged, serving SGLang's HiCache from any hicache backend (file, hf3fs, mooncake, memory, a plugin's, dynamic)::

    python -m sglang.launch_server ... --enable-hierarchical-cache --hicache-storage-backend dynamic \\
      --hicache-storage-backend-extra-config '{"backend_name": "hicache", "module_path": "hicache_core.sglang",
        "class_name": "HiCacheForSGLang", "interface_v1": 1, "hicache_backend": "file",
        "storage_dir": "/mnt/kv"}'

``hicache_backend`` names the hicache backend (default ``file``); every other key of the extra config, less the
dynamic-loading keys, reaches that backend. sglang is imported lazily: importing this module without sglang
installed works, constructing the class says what to install.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
from typing import Any, Optional

import torch

from hicache_core.config import DYNAMIC_KEYS, HiCacheConfig
from hicache_core.errors import BackendLoadError
from hicache_core.memory import KVSpec
from hicache_core.registry import StorageBackendHandle, create_backend, make_storage_config
from hicache_core.storage.base import ExtraInfo
from hicache_core.storage.foreign import sglang_storage_config

logger = logging.getLogger(__name__)

_SGLangStorage: Any = object  # SGLang's factory requires its own base class, when sglang imports
_SGLANG_ERROR: Optional[BaseException] = None
try:
    _SGLangStorage = importlib.import_module("sglang.srt.mem_cache.hicache_storage").HiCacheStorage
except Exception as e:  # any import failure means "not usable here"
    _SGLANG_ERROR = e


class SGLangHostPool:
    """An SGLang host pool seen through the interface hicache backends use, built from SGLang's own host-pool API
    only (``get_page_buffer_meta``, ``get_data_page``, ``set_from_flat_data_page``, ``get_dummy_flat_data_page``,
    ``layout``, ``page_size``, ``dtype``, ``kv_buffer``).

    A page's segments are handed out in the page byte order hicache stores (the order of SGLang's own flat page,
    ``get_data_page(i, flat=True)``), not in the order SGLang's ``get_page_buffer_meta`` lists them: for an MHA
    layer_first pool SGLang lists ``[k_l0, v_l0, k_l1, v_l1, ...]`` while its flat page is all K layers, then all
    V. Stored in SGLang's listing order, such a page reads back right only through the same pool and layout, and
    is wrong KV for a v0 read, a page_first_direct pool or hicache's own engine sharing the store. A flat page is
    a slice of one C-contiguous buffer, so its byte order is address order: the segments of a page, sorted by
    address. The order is found once (it is the same for every page) and checked at registration."""

    def __init__(self, pool: Any, spec: KVSpec) -> None:
        self.pool, self.spec = pool, spec
        self.layout, self.page_size, self.dtype = pool.layout, pool.page_size, pool.dtype
        self.size = pool.size
        ptrs, sizes = pool.get_page_buffer_meta(torch.arange(self.page_size))
        self._order = sorted(range(len(ptrs)), key=lambda i: ptrs[i])
        self.segments_per_page = len(ptrs)
        self._reordered = self._order != list(range(len(ptrs)))  # only MHA layer_first today
        self.page_bytes = sum(sizes)
        self.raw = pool.kv_buffer.view(-1).view(torch.uint8)  # one contiguous buffer (zero-copy registration)
        self._check_page_byte_order()

    def get_page_buffer_meta(self, host_indices) -> tuple[list[int], list[int]]:
        """SGLang's pointers and sizes, each page's segments in the page byte order (see the class docstring)."""
        ptrs, sizes = self.pool.get_page_buffer_meta(host_indices)
        if not self._reordered:
            return ptrs, sizes
        n, order = self.segments_per_page, self._order
        if len(ptrs) % n:
            raise ValueError(f"SGLang's host pool gave {len(ptrs)} segments, not a multiple of {n} per page")
        out_p = [ptrs[base + i] for base in range(0, len(ptrs), n) for i in order]
        out_s = [sizes[base + i] for base in range(0, len(sizes), n) for i in order]
        return out_p, out_s

    def page_memoryviews(self, host_indices) -> list[list[memoryview]]:
        """Writable views of each page's segments, in the page byte order, from SGLang's pointers (host memory)."""
        ptrs, sizes = self.get_page_buffer_meta(host_indices)
        n = self.segments_per_page
        views = [memoryview((ctypes.c_char * s).from_address(p)).cast("B") for p, s in zip(ptrs, sizes)]
        return [views[i : i + n] for i in range(0, len(views), n)]

    def _check_page_byte_order(self) -> None:
        """Prove on page 0 (its bytes saved and put back) that the segments read in order are SGLang's flat page;
        a pool whose flat page is not in address order is refused rather than stored in a byte order nobody else
        reads the same way."""
        saved = self.pool.get_data_page(0, flat=True).clone()
        nbytes = saved.numel() * saved.element_size()
        if nbytes != self.page_bytes:
            raise BackendLoadError(
                f"SGLang's host pool {type(self.pool).__name__}: its flat page has {nbytes} bytes "
                f"but get_page_buffer_meta describes {self.page_bytes}; hicache cannot serve it"
            )
        pattern = torch.arange(nbytes, dtype=torch.int64).remainder(251).to(torch.uint8).view(saved.dtype)
        try:
            self.pool.set_from_flat_data_page(0, pattern)
            got = b"".join(bytes(s) for s in self.page_memoryviews(torch.arange(self.page_size))[0])
        finally:
            self.pool.set_from_flat_data_page(0, saved)
        if got != pattern.view(torch.uint8).numpy().tobytes():
            raise BackendLoadError(
                f"SGLang's host pool {type(self.pool).__name__} ({self.layout}): its page "
                "segments in address order are not its flat page; hicache cannot store its "
                "pages in one byte order"
            )

    def get_flat_page(self, index: int) -> torch.Tensor:
        return self.pool.get_data_page(index, flat=True).clone()

    def set_flat_page(self, index: int, data: torch.Tensor) -> None:
        self.pool.set_from_flat_data_page(index, data)

    def dummy_flat_page(self) -> torch.Tensor:
        return self.pool.get_dummy_flat_data_page()


def _spec_of(pool: Any, is_mla: bool) -> KVSpec:
    """The KV geometry of an SGLang host pool (MHA: head_num x head_dim; MLA: kv_lora_rank + qk_rope_head_dim)."""
    if getattr(pool, "spec", None) is not None:
        return pool.spec
    if is_mla:
        return KVSpec(
            layer_num=pool.layer_num,
            head_num=1,
            head_dim=pool.kv_lora_rank + pool.qk_rope_head_dim,
            dtype=pool.dtype,
            is_mla=True,
        )
    return KVSpec(layer_num=pool.layer_num, head_num=pool.head_num, head_dim=pool.head_dim, dtype=pool.dtype)


class HiCacheForSGLang(_SGLangStorage):
    """An SGLang ``HiCacheStorage`` whose pages live in a hicache backend (v1 zero copy, and v0)."""

    def __init__(self, storage_config: Any, kwargs: Optional[dict] = None) -> None:
        if _SGLANG_ERROR is not None:
            raise ImportError(
                "hicache_core.sglang.HiCacheForSGLang is a storage backend for SGLang, and sglang does not import "
                f"here ({type(_SGLANG_ERROR).__name__}: {_SGLANG_ERROR}); pip install sglang, or use hicache's own "
                "engine (hicache_core.cache.build_cache)"
            ) from _SGLANG_ERROR
        extra = {k: v for k, v in dict(storage_config.extra_config or {}).items() if k not in DYNAMIC_KEYS}
        self.backend_name = str(extra.pop("hicache_backend", "file"))
        self.fingerprint = sglang_fingerprint(extra.pop("hicache_model_fingerprint", None))
        self.backend_extra = {**extra, **(kwargs or {})}
        self.sglang_config = storage_config
        self.handle: Optional[StorageBackendHandle] = None
        self.mem_pool_host: Any = None
        # MLA: every rank reads, one rank writes (SGLang's rule; is_storage_writer where SGLang defines it)
        writer = getattr(storage_config, "is_storage_writer", None)
        self.writes = (
            bool(writer) if writer is not None else (not storage_config.is_mla_model or storage_config.tp_rank == 0)
        )

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Build the hicache backend on SGLang's host pool: its layout, dtype, page size and pointers."""
        sc = self.sglang_config
        self.mem_pool_host = mem_pool_host
        spec = _spec_of(mem_pool_host, bool(sc.is_mla_model))
        pool = mem_pool_host if hasattr(mem_pool_host, "page_memoryviews") else SGLangHostPool(mem_pool_host, spec)
        config = HiCacheConfig(
            page_size=pool.page_size,
            hicache_mem_layout=pool.layout,
            model_name=sc.model_name,
            hicache_model_fingerprint=self.fingerprint,
            hicache_storage_backend=self.backend_name,
            hicache_storage_backend_extra_config=self.backend_extra,
        )
        storage_config = make_storage_config(config, spec, tp_rank=sc.tp_rank, tp_size=sc.tp_size)
        self.handle = create_backend(self.backend_name, storage_config, pool)
        logger.info("hicache backend %s for SGLang at %s", self.backend_name, self.handle.describe())

    @property
    def backend(self) -> StorageBackendHandle:
        if self.handle is None:
            raise BackendLoadError("HiCacheForSGLang: register_mem_pool_host() was not called before page I/O")
        return self.handle

    # --- v1: zero copy on SGLang's host pool ----------------------------------------------------------------------
    # SGLang's extra_info (prefix keys with hicache_storage_pass_prefix_keys) reaches backends that take it
    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        return self.backend.batch_exists(list(keys), ExtraInfo.of(extra_info))

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        return list(self.backend.batch_get_v1(list(keys), host_indices, ExtraInfo.of(extra_info)))

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        if not self.writes:
            return [True] * len(keys)  # another rank writes this page (MLA)
        return list(self.backend.batch_set_v1(list(keys), host_indices, ExtraInfo.of(extra_info)))

    # --- v0: flat pages --------------------------------------------------------------------------------------------
    def _v0(self, method: str):
        fn = getattr(self.backend, method, None)
        if not callable(fn):
            raise NotImplementedError(f"hicache backend {self.backend_name!r} is zero copy only: use interface_v1=1")
        return fn

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Optional[torch.Tensor]:
        return self._v0("get")(key, target_location)

    def batch_get(self, keys: list[str], target_locations: Any = None, target_sizes: Any = None) -> list:
        targets = target_locations or [None] * len(keys)
        return [self.get(k, t) for k, t in zip(keys, targets)]

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return True if not self.writes else bool(self._v0("set")(key, value))

    def batch_set(
        self, keys: list[str], values: Any = None, target_locations: Any = None, target_sizes: Any = None
    ) -> bool:
        return all(self.set(k, v) for k, v in zip(keys, values or []))

    def exists(self, key: str) -> bool:
        return self.backend.batch_exists([key]) == 1

    # --- housekeeping ----------------------------------------------------------------------------------------------
    def clear(self) -> None:
        self.backend.clear()

    def get_stats(self) -> Optional[dict]:
        return self.backend.get_stats() if self.handle is not None else None

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def sglang_fingerprint(given: Any = None) -> Optional[str]:
    """The weights' identity inside an SGLang server: ``hicache_model_fingerprint`` from the extra config when
    given, else a digest of what SGLang's server args say about the weights -- model path, revision, dtype,
    quantization, KV cache dtype -- plus the checkpoint's content digest when the model path is local (so a
    model updated in place under the same path gets new keys). None outside a server (nothing published)."""
    if given is not None:
        return HiCacheConfig(hicache_model_fingerprint=str(given)).hicache_model_fingerprint
    try:
        from sglang.srt.runtime_context import get_server_args

        args = get_server_args()
    except Exception:  # not inside an SGLang server process, or an SGLang without the runtime context
        args = None
    if args is None or not getattr(args, "model_path", None):
        logger.info(
            "HiCacheForSGLang: no SGLang server args published; pages are keyed by the model name only "
            "(pass hicache_model_fingerprint in the extra config to key them by the weights)"
        )
        return None
    import hashlib
    from pathlib import Path

    from hicache_core.identity import checkpoint_fingerprint

    parts = [
        f"{k}={getattr(args, k, None)}" for k in ("model_path", "revision", "dtype", "quantization", "kv_cache_dtype")
    ]
    local = Path(str(args.model_path)).expanduser()
    if local.exists():
        parts.append("content=" + checkpoint_fingerprint(local))
    return hashlib.sha256(";".join(parts).encode()).hexdigest()[:32]


def through_sglang(config: HiCacheConfig, host_pool: Any) -> HiCacheForSGLang:
    """HiCacheForSGLang for ``config``'s backend, built the way SGLang builds it (its HiCacheStorageConfig, then
    register_mem_pool_host) on ``host_pool``: what ``hicache bench storage --via-sglang`` measures."""
    if _SGLANG_ERROR is not None:
        raise BackendLoadError(
            f"--via-sglang needs sglang ({type(_SGLANG_ERROR).__name__}: {_SGLANG_ERROR}); "
            "pip install sglang, or run the sglang tox env"
        )
    extra = {"hicache_backend": config.hicache_storage_backend, **config.backend_extra_config}
    sc = sglang_storage_config(make_storage_config(config, host_pool.spec), extra)
    backend = HiCacheForSGLang(sc, {})
    backend.register_mem_pool_host(host_pool)
    return backend
