"""``build_cache``: one call from a config and a KV shape to a working HiRadixCache, with its pools and backend.

The backend is resolved once (:func:`~hicache_core.registry.resolve_config`), the layout adjustments it implies
are applied and logged, and the cache keeps the adjusted config (``cache.config``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from hicache_core.cache.agree import Solo
from hicache_core.cache.hiradix import HiRadixCache
from hicache_core.config import HiCacheConfig
from hicache_core.errors import ConfigError
from hicache_core.memory import DevicePool, HostPool, KVSpec, host_pool_tokens
from hicache_core.metrics import CacheMetrics
from hicache_core.plugins import HiCachePluginManager
from hicache_core.registry import open_storage, resolve_config

TIERS = ("radix", "hicache", "hicache+storage")


def tiers_from_flags(
    *, disable_radix_cache: bool, enable_hierarchical_cache: bool, storage_backend: Optional[str]
) -> str:
    """The one home of SGLang's flags -> tiers rule: ``none`` (no prefix cache), ``radix`` (device only),
    ``hicache`` (+ host) or ``hicache+storage``; a storage backend needs the host tier, and no prefix cache takes
    neither."""
    if disable_radix_cache:
        if enable_hierarchical_cache or storage_backend:
            raise ConfigError(
                "--disable-radix-cache turns the prefix cache off; drop it to use "
                "--enable-hierarchical-cache or a storage backend"
            )
        return "none"
    if not enable_hierarchical_cache:
        if storage_backend:
            raise ConfigError("--hicache-storage-backend needs the host tier: add --enable-hierarchical-cache")
        return "radix"
    return "hicache+storage" if storage_backend else "hicache"


def default_tiers(config: HiCacheConfig) -> str:
    """The tiers ``config``'s flags ask for; an embedder that names a backend gets the host tier under it without
    also setting ``enable_hierarchical_cache``."""
    backend = config.hicache_storage_backend
    return tiers_from_flags(
        disable_radix_cache=False,
        enable_hierarchical_cache=config.enable_hierarchical_cache or bool(backend),
        storage_backend=backend,
    )


def build_cache(
    config: HiCacheConfig,
    spec: KVSpec,
    device_tokens: int,
    *,
    tiers: Optional[str] = None,
    device: Optional[torch.device | str] = None,
    host_tokens: Optional[int] = None,
    pin_memory: Optional[bool] = None,
    metrics: Optional[CacheMetrics] = None,
    tp_rank: int = 0,
    tp_size: int = 1,
    pm: Optional[HiCachePluginManager] = None,
    force_kernel: bool = False,
    agree: Optional[Solo] = None,
    storage_writes: bool = True,
) -> HiRadixCache:
    """A cache over a device pool of ``device_tokens`` (rounded down to whole pages).

    ``tiers``: ``radix`` (device only), ``hicache`` (device + host) or ``hicache+storage`` (device + host + the
    configured backend); default from the config (:func:`default_tiers`). The host pool holds ``host_tokens``,
    else ``--hicache-size`` / ``--hicache-ratio`` of the device pool.

    Tensor parallelism: each rank builds its own cache over its shard of the heads with its ``tp_rank`` /
    ``tp_size`` (its own storage keys; MLA pages are shared, written by rank 0 only) and ``agree`` =
    :class:`~hicache_core.cache.agree.RankAgreement` on a group of the ranks, so their trees stay identical.

    ``storage_writes=False``: this cache only reads storage (a PD decode instance that does not offload)."""
    tiers = tiers or default_tiers(config)
    if tiers not in TIERS:
        raise ConfigError(f"cache tiers {tiers!r}: choose one of {', '.join(TIERS)}")
    if tiers == "hicache+storage" and not config.hicache_storage_backend:
        raise ConfigError("a storage tier needs --hicache-storage-backend (see `hicache backends`)")
    if tiers != "hicache+storage":
        config = config.replace(hicache_storage_backend=None)
    config, resolved = resolve_config(config, pm)
    ps = config.page_size
    device_tokens -= device_tokens % ps
    if device_tokens <= 0:
        raise ConfigError(f"the device pool must hold at least one page of {ps} tokens")
    device_pool = DevicePool(spec, device_tokens, ps, device)
    host_pool = None
    backend: Any = None
    if tiers != "radix":
        n = host_tokens if host_tokens is not None else host_pool_tokens(config, device_tokens, spec)
        host_pool = HostPool(spec, n, ps, config.hicache_mem_layout, pin_memory=pin_memory)
    if resolved is not None:
        backend = open_storage(config, resolved, spec, host_pool, tp_rank=tp_rank, tp_size=tp_size, pm=pm)
    return HiRadixCache(
        config,
        device_pool,
        host_pool,
        backend,
        metrics,
        force_kernel=force_kernel,
        agree=agree,
        storage_writes=storage_writes,
    )


def attach_backend(
    cache: HiRadixCache,
    config: HiCacheConfig,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    pm: Optional[HiCachePluginManager] = None,
) -> HiRadixCache:
    """Build the backend ``config`` names for ``cache``'s host pool and attach it (runtime attach)."""
    if cache.host_pool is None:
        raise ConfigError("attaching a storage backend needs the host tier (--enable-hierarchical-cache)")
    if not config.hicache_storage_backend:
        raise ConfigError("name the backend to attach (hicache_storage_backend); see `hicache backends`")
    config = config.replace(hicache_mem_layout=cache.config.hicache_mem_layout, page_size=cache.page_size)
    config, resolved = resolve_config(config, pm)
    if config.hicache_mem_layout != cache.host_pool.layout:
        raise ConfigError(
            f"storage backend {config.hicache_storage_backend!r} needs host layout "
            f"{config.hicache_mem_layout}; this server's host pool is {cache.host_pool.layout} "
            f"(restart with --hicache-mem-layout {config.hicache_mem_layout})"
        )
    assert resolved is not None
    backend = open_storage(
        config, resolved, cache.host_pool.spec, cache.host_pool, tp_rank=tp_rank, tp_size=tp_size, pm=pm
    )
    try:
        cache.operator.attach_storage(backend, config)
    except BaseException:
        backend.close()
        raise
    return cache
