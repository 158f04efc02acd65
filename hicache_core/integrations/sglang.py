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

import importlib
import logging
from pathlib import Path
from typing import Any, Optional

import attrs
import torch

from hicache_core.config import DYNAMIC_KEYS, HiCacheConfig
from hicache_core.errors import BackendLoadError
from hicache_core.integrations.sglang_pools import kind_of, kv_spec_of, served
from hicache_core.integrations.sglang_v2 import SidePool, SidePools
from hicache_core.registry import StorageBackendHandle, create_backend, make_storage_config
from hicache_core.storage.base import ExtraInfo
from hicache_core.storage.foreign import sglang_storage_config

logger = logging.getLogger(__name__)

# the SGLang pool kinds that hold a model's KV (the others sit beside it in a HostPoolGroup)
ANCHOR_KINDS = ("MHATokenToKVPoolHost", "MLATokenToKVPoolHost", "AsymmetricMHATokenToKVPoolHost")

_SGLangStorage: Any = object  # SGLang's factory requires its own base class, when sglang imports
_SGLANG_ERROR: Optional[BaseException] = None
try:
    _SGLangStorage = importlib.import_module("sglang.srt.mem_cache.hicache_storage").HiCacheStorage
except Exception as e:  # any import failure means "not usable here"
    _SGLANG_ERROR = e


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
        self.storage_config: Any = None
        self.side = SidePools(self._open_side)
        # MLA: every rank reads, one rank writes (SGLang's rule; is_storage_writer where SGLang defines it)
        writer = getattr(storage_config, "is_storage_writer", None)
        self.writes = (
            bool(writer) if writer is not None else (not storage_config.is_mla_model or storage_config.tp_rank == 0)
        )

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Build the hicache backend on SGLang's host pool: its layout, dtype, page size and pointers. A
        ``HostPoolGroup`` (a hybrid model's pools) registers its anchor here and every other entry as a side pool,
        as SGLang's hybrid controller does through ``register_mem_host_pool_v2``. A pool of a kind hicache does not
        serve is refused here, naming its class."""
        sc = self.sglang_config
        group = mem_pool_host if hasattr(mem_pool_host, "anchor_entry") else None
        if group is not None:
            mem_pool_host = group.anchor_entry.host_pool
        self.mem_pool_host = mem_pool_host
        is_mla = bool(sc.is_mla_model)
        fields: Optional[dict] = None
        if hasattr(mem_pool_host, "page_memoryviews"):  # hicache's own host pool
            pool: Any = mem_pool_host
            spec = mem_pool_host.spec
        else:
            kind = kind_of(mem_pool_host)  # refuses a kind hicache does not serve, naming it
            if kind not in ANCHOR_KINDS:
                raise BackendLoadError(
                    f"SGLang host pool {kind} holds {'a state slot' if kind == 'MambaPoolHost' else 'side data'}, "
                    "not a model's KV: it is a side pool (register_mem_host_pool_v2), never the anchor"
                )
            spec = kv_spec_of(mem_pool_host, is_mla)
            pool, fields = served(mem_pool_host, is_mla=is_mla)
        config = HiCacheConfig(
            page_size=pool.page_size,
            hicache_mem_layout=pool.layout,
            model_name=namespace_model_name(sc.model_name),
            hicache_model_fingerprint=self.fingerprint,
            hicache_storage_backend=self.backend_name,
            hicache_storage_backend_extra_config=self.backend_extra,
        )
        storage_config = make_storage_config(config, spec, tp_rank=sc.tp_rank, tp_size=sc.tp_size)
        # SGLang's own name stays the backend's (SGLang-layout files are named with it); the namespace has its own
        storage_config = attrs.evolve(storage_config, model_name=sc.model_name)
        if fields:
            storage_config = attrs.evolve(storage_config, namespace=attrs.evolve(storage_config.namespace, **fields))
        self.storage_config = storage_config
        self.handle = create_backend(self.backend_name, storage_config, pool)
        self.side.anchor = SidePool(self.handle, replicated=is_mla)
        logger.info("hicache backend %s for SGLang at %s", self.backend_name, self.handle.describe())
        for entry in getattr(group, "entries", ()):
            if group is not None and entry is not group.anchor_entry:
                self.register_mem_host_pool_v2(entry.host_pool, entry.name)

    def _open_side(self, storage_config: Any, pool: Any) -> StorageBackendHandle:
        return create_backend(self.backend_name, storage_config, pool)

    # --- v2: the pools beside the KV of a hybrid model (hicache_core/integrations/sglang_v2.py) ---------------------
    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        if self.handle is None:
            raise BackendLoadError("HiCacheForSGLang: register_mem_pool_host() comes before register_mem_host_pool_v2")
        self.side.register(host_pool, host_pool_name, self.storage_config)

    def on_host_pools_registered(self) -> None:
        logger.info("hicache for SGLang: side pools %s", sorted(self.side.pools) or "none")

    def batch_exists_v2(self, keys: list[str], pool_transfers: Any = None, extra_info: Any = None) -> Any:
        from sglang.srt.mem_cache.hicache_storage import PoolTransferResult

        extra = ExtraInfo.of(extra_info)
        kv_pages = self.backend.batch_exists(list(keys), extra)
        final, hits = self.side.exists(list(keys), kv_pages, list(pool_transfers or []), extra)
        return PoolTransferResult(final, hits)

    def batch_get_v2(self, transfers: list, extra_info: Any = None) -> dict[str, list[bool]]:
        return self.side.move(transfers, ExtraInfo.of(extra_info), write=False, writer=self.writes)

    def batch_set_v2(self, transfers: list, extra_info: Any = None) -> dict[str, list[bool]]:
        return self.side.move(transfers, ExtraInfo.of(extra_info), write=True, writer=self.writes)

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
        self.side.clear()

    def get_stats(self) -> Optional[dict]:
        return self.backend.get_stats() if self.handle is not None else None

    def close(self) -> None:
        self.side.close()
        if self.handle is not None:
            self.handle.close()


def _server_args() -> Any:
    """SGLang's published server args, or None outside an SGLang server (or an SGLang without the runtime
    context)."""
    try:
        from sglang.srt.runtime_context import get_server_args

        args = get_server_args()
    except Exception:
        return None
    return args if args is not None and getattr(args, "model_path", None) else None


def sglang_fingerprint(given: Any = None) -> Optional[str]:
    """The weights' identity inside an SGLang server: ``hicache_model_fingerprint`` from the extra config when
    given. Else, for a local checkpoint, its content digest -- the fingerprint hicache's engine and the vLLM
    connector key the same checkpoint by, so the three share pages -- with what else SGLang's server args say
    changes the KV appended (``+revision=``, ``+quantization=``, ``+kv_cache_dtype=`` when set), so a model
    updated in place under the same path gets new keys. For a hub model, a digest of the model path, revision,
    dtype, quantization and KV cache dtype. None outside a server (nothing published)."""
    if given is not None:
        return HiCacheConfig(hicache_model_fingerprint=str(given)).hicache_model_fingerprint
    args = _server_args()
    if args is None:
        logger.info(
            "HiCacheForSGLang: no SGLang server args published; pages are keyed by the model name only "
            "(pass hicache_model_fingerprint in the extra config to key them by the weights)"
        )
        return None
    import hashlib

    from hicache_core.identity import checkpoint_fingerprint

    local = Path(str(args.model_path)).expanduser()
    if local.exists():
        more = [
            f"+{k}={v}"
            for k in ("revision", "quantization", "kv_cache_dtype")
            if (v := getattr(args, k, None)) not in (None, "", "auto")
        ]
        return checkpoint_fingerprint(local) + "".join(more)
    parts = [
        f"{k}={getattr(args, k, None)}" for k in ("model_path", "revision", "dtype", "quantization", "kv_cache_dtype")
    ]
    return hashlib.sha256(";".join(parts).encode()).hexdigest()[:32]


def namespace_model_name(model_name: Optional[str]) -> Optional[str]:
    """The model name in the storage namespace: SGLang's, except that a local checkpoint SGLang names by its path
    (no ``--served-model-name``) is named by its directory, as hicache's engine and the vLLM connector name it."""
    args = _server_args()
    if args is None or not model_name or str(model_name) != str(args.model_path):
        return model_name
    local = Path(str(model_name)).expanduser()
    return local.name if local.exists() else model_name


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
