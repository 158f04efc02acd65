"""Opening a backend for a host pool: its StorageConfig and namespace, construction, registration of the host pool,
the v1 face the controller speaks (v0 classes adapted, keys prefixed with the namespace for classes that do not
apply it), the storage quota check and the MLA writer rule, and the lifecycle hooks observers see."""

from __future__ import annotations

import logging
from typing import Any, Optional

from hicache_core.config import HiCacheConfig
from hicache_core.errors import BackendLoadError, ConfigError
from hicache_core.keys import StorageNamespace
from hicache_core.memory import HostPool, KVSpec
from hicache_core.plugins import HiCachePluginManager, get_plugin_manager
from hicache_core.registry.names import ResolvedBackend, check_layout, construct, resolve
from hicache_core.storage.adapter import Delegate, ReadOnlyRank, as_v1
from hicache_core.storage.base import ExtraInfo, StorageConfig, call_with_extra
from hicache_core.storage.codec import check_pool as check_codec_pool
from hicache_core.storage.codec import namespace_name as codec_namespace
from hicache_core.storage.codec_storage import CodecStorage
from hicache_core.storage.head_split import HeadSplitStorage, check_head_group
from hicache_core.storage.hooks import Describes, holds_namespace_quota

logger = logging.getLogger(__name__)


def make_storage_config(
    config: HiCacheConfig, spec, *, layout: Optional[str] = None, tp_rank: int = 0, tp_size: int = 1
) -> StorageConfig:
    """The StorageConfig (and namespace) for a KV spec under a config. ``layout`` defaults to the config's."""
    layout = layout or config.hicache_mem_layout
    # head-split pages (MHA only: MLA's latent is every rank's already) are named by the model's heads, no rank
    group = config.storage_head_group if not spec.is_mla else 0
    if group:
        check_head_group(group, spec.head_num, tp_size)
    ns = StorageNamespace(
        model=config.model_name or "",
        fingerprint=config.hicache_model_fingerprint or "",
        dtype=spec.dtype_name,
        page_size=config.page_size,
        layout=layout,
        is_mla=spec.is_mla,
        layer_num=spec.layer_num,
        head_num=spec.head_num * tp_size if group else spec.head_num,
        head_dim=spec.head_dim,
        tp_size=1 if group else tp_size,
        tp_rank=0 if group else tp_rank,
        kv_format=spec.kv_format,
        codec=codec_namespace(config.storage_codec[0]),
        head_group=group,
    )
    return StorageConfig(
        tp_rank=tp_rank,
        tp_size=tp_size,
        is_mla_model=spec.is_mla,
        is_page_first_layout=layout in ("page_first", "page_first_direct"),
        model_name=config.model_name,
        extra_config=config.backend_extra_config,
        namespace=ns,
        page_size=config.page_size,
        layout=layout,
        codec=config.storage_codec,
        head_group=group,
    )


def with_codec(inner: Any, raw: Any, backend: str, interface_v1: bool, storage_config: StorageConfig, pool: Any) -> Any:
    """``inner`` (what :func:`as_v1` made of ``raw``) behind the configured L3 codec, or as it is without one; a
    backend without blob methods (a v0 class stores blobs as tensors), or a pool whose KV the codec cannot take, is
    refused with the reason."""
    name, when, level = storage_config.codec
    if name == "none":
        return inner
    kind = getattr(pool, "kind", None)  # an SGLang pool's class (integrations/sglang_pools.py)
    what = f"host pool {kind}" if kind else "this pool"
    check_codec_pool(name, pool.dtype, getattr(getattr(pool, "spec", None), "kv_format", ""), what)
    if interface_v1 and not (hasattr(raw, "batch_set_blobs") and hasattr(raw, "batch_get_blobs")):
        raise ConfigError(
            f'"codec": "{name}": storage backend {backend!r} ({type(raw).__qualname__}) stores whole pages '
            "only (it has no batch_set_blobs/batch_get_blobs for values of other lengths); use the file, memory or "
            'mooncake backend, or leave "codec" out'
        )
    return CodecStorage(inner, name, when, level)


def with_head_split(inner: Any, raw: Any, backend: str, interface_v1: bool, storage_config: StorageConfig) -> Any:
    """``inner`` storing pages by KV head group (``"head_group"``), or as it is without one; it needs the blob
    methods and does not stack with the L3 codec (each group would be its own codec page)."""
    group = storage_config.head_group
    if not group:
        return inner
    if storage_config.codec[0] != "none":
        raise ConfigError('"head_group" and "codec" do not go together yet: leave one of them out')
    if storage_config.namespace.page_format:
        raise ConfigError(
            f'"head_group": these pages are in another engine\'s byte order ({storage_config.namespace.page_format}), '
            'which hicache does not split by head; leave "head_group" out'
        )
    if not interface_v1 or not (hasattr(raw, "batch_set_blobs") and hasattr(raw, "batch_get_blobs")):
        raise ConfigError(
            f'"head_group": storage backend {backend!r} ({type(raw).__qualname__}) stores whole pages only (it has '
            'no batch_set_blobs/batch_get_blobs); use the file, memory or mooncake backend, or leave "head_group" out'
        )
    heads = storage_config.namespace.head_num // max(1, storage_config.tp_size)
    return HeadSplitStorage(inner, first_head=storage_config.tp_rank * heads, group=group)


class StorageBackendHandle(Delegate):
    """What the controller holds: a v1-speaking backend plus its name; closing tells the observers."""

    def __init__(
        self, name: str, inner: Any, raw: Any, interface_v1: bool, pm: HiCachePluginManager, namespace_tag: str
    ) -> None:
        super().__init__(inner)
        self.name, self.raw, self.interface_v1, self._pm = name, raw, interface_v1, pm
        self.namespace_tag = namespace_tag
        self._closed = False

    def describe(self) -> str:
        """Where the backend keeps its pages, in the backend's words (its class name if it says nothing)."""
        return str(self.raw.describe()) if isinstance(self.raw, Describes) else type(self.raw).__qualname__

    def batch_exists(self, keys, extra_info: Optional[ExtraInfo] = None):
        return call_with_extra(self.inner.batch_exists, keys, extra=extra_info)

    def batch_get_v1(self, keys, host_indices, extra_info: Optional[ExtraInfo] = None):
        return call_with_extra(self.inner.batch_get_v1, keys, host_indices, extra=extra_info)

    def batch_set_v1(self, keys, host_indices, extra_info: Optional[ExtraInfo] = None):
        return call_with_extra(self.inner.batch_set_v1, keys, host_indices, extra=extra_info)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.inner.close()
        finally:
            self._pm.hook.hicache_backend_closed(name=self.name, backend=self.raw)


def create_backend(
    backend: str | ResolvedBackend,
    storage_config: StorageConfig,
    host_pool: Any,
    *,
    extra_config: Optional[dict] = None,
    pm: Optional[HiCachePluginManager] = None,
) -> StorageBackendHandle:
    """Construct and register a backend (resolving its name unless given resolved); return it speaking v1."""
    pm = pm or get_plugin_manager()
    extra = storage_config.extra_config if extra_config is None else extra_config
    resolved = backend if isinstance(backend, ResolvedBackend) else resolve(backend, extra, pm)
    check_layout(resolved, storage_config.layout)
    try:
        raw = construct(resolved.cls, storage_config, dict(extra), host_pool)
    except (BackendLoadError, ConfigError):
        raise
    except Exception as e:
        raise BackendLoadError(
            f"storage backend {resolved.name!r} ({resolved.cls.__module__}.{resolved.cls.__qualname__}) failed to "
            f"start: {type(e).__name__}: {e}"
        ) from e
    if resolved.interface_v1 and not callable(getattr(raw, "register_mem_pool_host", None)):
        raise BackendLoadError(
            f"storage backend {resolved.name!r} is v1 (zero copy) but has no "
            "register_mem_pool_host(host_pool): v1 reads and writes the host pool in place"
        )
    inner = as_v1(raw, interface_v1=resolved.interface_v1, namespace=storage_config.namespace)
    try:
        inner = with_codec(inner, raw, resolved.name, resolved.interface_v1, storage_config, host_pool)
        inner = with_head_split(inner, raw, resolved.name, resolved.interface_v1, storage_config)
    except ConfigError:
        _close_quietly(raw)
        raise
    try:
        inner.register_mem_pool_host(host_pool)  # optional for v0 classes: the adapter keeps the pool
    except Exception as e:
        raise BackendLoadError(f"storage backend {resolved.name!r} rejected the host pool: {e}") from e
    handle = StorageBackendHandle(resolved.name, inner, raw, resolved.interface_v1, pm, storage_config.namespace.tag)
    pm.hook.hicache_backend_created(name=resolved.name, backend=raw, storage_config=storage_config)
    logger.info(
        "storage backend %s (%s, %s) ready", resolved.name, resolved.origin, "v1" if resolved.interface_v1 else "v0"
    )
    return handle


def quota_checked(config: HiCacheConfig, backend: Any) -> Any:
    """``--hicache-salt-storage-pages`` needs a backend that can count and drop a namespace's pages across
    processes (``supports_namespace_quota``); refused, with the backend closed, otherwise."""
    if config.hicache_salt_storage_pages and not holds_namespace_quota(backend.raw):
        backend.close()
        raise ConfigError(
            f"--hicache-salt-storage-pages: storage backend {config.hicache_storage_backend!r} cannot "
            "hold a per-namespace storage quota (it cannot count or drop one namespace's pages); use "
            "the file backend, or leave the flag at 0"
        )
    return backend


def open_storage(
    config: HiCacheConfig,
    resolved: ResolvedBackend | str,
    spec: KVSpec,
    host_pool: Any,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    pm: Optional[HiCachePluginManager] = None,
) -> Any:
    """The one way a cache gets its backend, at start (``build_cache``) and at run time (``attach_backend``):
    built for ``host_pool`` under the config's namespace for this rank, its storage quota checked, and -- MLA pages
    being the same on every rank -- read-only on every rank but 0, so each page is written once."""
    sc = make_storage_config(config, spec, tp_rank=tp_rank, tp_size=tp_size)
    backend = quota_checked(config, create_backend(resolved, sc, host_pool, pm=pm))
    return ReadOnlyRank(backend) if spec.is_mla and tp_rank != 0 else backend


def open_backend(
    config: HiCacheConfig,
    spec: KVSpec,
    host_tokens: int,
    *,
    resolved: Optional[ResolvedBackend] = None,
    tp_rank: int = 0,
    tp_size: int = 1,
    pm: Optional[HiCachePluginManager] = None,
) -> tuple[StorageBackendHandle, HostPool]:
    """A host pool of ``host_tokens`` and the configured backend registered with it: what ``hicache check``, the
    storage benchmark and the conformance kit need. ``config`` must already be resolved (:func:`resolve_config`)."""
    if not config.hicache_storage_backend:
        raise ConfigError("--hicache-storage-backend: name a backend (see `hicache backends`)")
    pool = HostPool(spec, host_tokens, config.page_size, config.hicache_mem_layout, pin_memory=False)
    return open_storage(
        config, resolved or config.hicache_storage_backend, spec, pool, tp_rank=tp_rank, tp_size=tp_size, pm=pm
    ), pool


def _close_quietly(raw: Any) -> None:
    """Close a backend refused after its construction; its own error on closing is only logged."""
    try:
        if callable(getattr(raw, "close", None)):
            raw.close()
    except Exception as e:
        logger.warning("closing the refused backend failed: %s", e)
