"""SGLang's v2 storage calls for hybrid models (``HostPoolGroup``): the pools beside the KV anchor -- sliding-window
KV (``swa``), Mamba state (``mamba``), sparse index K (``indexer``) -- each stored as its own hicache backend on the
same store, under its own namespace (the pool's name, kind, geometry and dtype), so a key SGLang uses for a KV page
and for the Mamba state after it never meet.

What SGLang's hybrid cache controller asks (``sglang.srt.mem_cache.hybrid_cache``), and what is answered:

- KV pages go through v1 (``batch_set_v1`` / ``batch_get_v1`` on the anchor), as for any model.
- ``batch_set_v2`` / ``batch_get_v2`` move each side pool's pages: ``PoolTransfer.keys`` and ``host_indices`` of
  that pool (a Mamba pool's page is one state slot, keyed by the hash of the page it ends on).
- ``batch_exists_v2`` gives the usable prefix: the KV hit, cut where a side pool cannot serve it. ``all_pages``:
  every page of the prefix must exist in the pool; ``trailing_pages``: only the last ``len(keys)`` pages before
  the cut (a window, or the state at its end). A policy hicache does not know, or a pool never registered, cuts
  the hit to nothing: a miss, never a prefix whose side state is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Optional

import attrs

from hicache_core.integrations.sglang_pools import served
from hicache_core.registry import StorageBackendHandle
from hicache_core.storage.base import ExtraInfo, StorageConfig

logger = logging.getLogger(__name__)

ANCHOR = "kv"


def _name(pool_name: Any) -> str:
    return str(getattr(pool_name, "value", pool_name))


@attrs.define
class SidePool:
    handle: StorageBackendHandle
    replicated: bool  # the same bytes on every TP rank (MLA-like): one rank writes


class SidePools:
    """The side pools of one HiCacheForSGLang, by SGLang's pool name."""

    def __init__(self, open_backend: Callable[[StorageConfig, Any], StorageBackendHandle]) -> None:
        self._open = open_backend
        self.pools: dict[str, SidePool] = {}
        self.anchor: Optional[SidePool] = None  # the KV pool, when a v2 call names it

    def register(self, host_pool: Any, pool_name: Any, anchor_config: StorageConfig) -> None:
        name = _name(pool_name)
        if name == ANCHOR:
            return  # the anchor came through register_mem_pool_host
        if name in self.pools:
            raise ValueError(f"HiCacheForSGLang: host pool {name!r} is already registered")
        is_mla = type(host_pool).__name__ == "MLATokenToKVPoolHost"
        pool, fields = served(host_pool, is_mla=is_mla)
        fields["page_format"] = f"sglang/pool={name}" + (f"/{fields['page_format']}" if fields["page_format"] else "")
        ns = attrs.evolve(anchor_config.namespace, page_size=host_pool.page_size, layout=host_pool.layout, **fields)
        sc = attrs.evolve(
            anchor_config,
            namespace=ns,
            is_mla_model=is_mla,
            page_size=host_pool.page_size,
            layout=host_pool.layout,
            is_page_first_layout=host_pool.layout != "layer_first",
        )
        handle = self._open(sc, pool)
        self.pools[name] = SidePool(handle, replicated=is_mla)
        logger.info("hicache: SGLang side pool %s (%s) at %s", name, pool.kind, handle.describe())

    def _pool(self, name: str) -> Optional[SidePool]:
        pool = self.anchor if name == ANCHOR else self.pools.get(name)
        if pool is None:
            logger.warning("HiCacheForSGLang: SGLang asked for host pool %r, which was never registered", name)
        return pool

    # --- v2 ---------------------------------------------------------------------------------------------------------
    def exists(self, keys: list[str], kv_pages: int, transfers: list, extra: Optional[ExtraInfo]) -> tuple[int, dict]:
        """The usable prefix (pages) and each pool's own boundary, given the KV hit ``kv_pages``."""
        hits: dict[str, int] = {ANCHOR: kv_pages} if kv_pages else {}
        final = kv_pages
        for t in transfers or []:
            if final == 0:
                break
            name = _name(t.name)
            pool = self._pool(name)
            policy = _name(getattr(t, "hit_policy", "all_pages"))
            if pool is None:
                boundary = 0
            elif policy == "all_pages":
                boundary = pool.handle.batch_exists(list(keys[:kv_pages]), extra)
            elif policy == "trailing_pages":
                boundary = self._trailing(pool, keys, kv_pages, max(1, len(t.keys or ())), extra)
            else:
                logger.warning("HiCacheForSGLang: hit policy %r of pool %r is not served: a miss", policy, name)
                boundary = 0
            if boundary:
                hits[name] = boundary
            final = min(final, boundary)
        return final, hits

    @staticmethod
    def _trailing(pool: SidePool, keys: list[str], kv_pages: int, window: int, extra: Optional[ExtraInfo]) -> int:
        """The longest prefix (<= kv_pages) whose last ``window`` pages all exist in the pool."""
        known: dict[int, bool] = {}

        def has(i: int) -> bool:
            if i not in known:
                known[i] = pool.handle.batch_exists([keys[i]], extra) == 1
            return known[i]

        for end in range(kv_pages, 0, -1):
            if all(has(i) for i in range(max(0, end - window), end)):
                return end
        return 0

    def move(self, transfers: list, extra: Optional[ExtraInfo], *, write: bool, writer: bool) -> dict[str, list[bool]]:
        out: dict[str, list[bool]] = {}
        for t in transfers or []:
            name, keys = _name(t.name), list(t.keys or [])
            pool = self._pool(name)
            if pool is None or t.host_indices is None:
                out[name] = [False] * len(keys)
            elif write and pool.replicated and not writer:
                out[name] = [True] * len(keys)  # another rank writes these pages
            elif write:
                out[name] = list(pool.handle.batch_set_v1(keys, t.host_indices, extra))
            else:
                out[name] = list(pool.handle.batch_get_v1(keys, t.host_indices, extra))
        return out

    def clear(self) -> None:
        for pool in self.pools.values():
            pool.handle.clear()

    def close(self) -> None:
        for pool in self.pools.values():
            pool.handle.close()
