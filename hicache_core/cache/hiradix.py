"""HiRadixCache: the prefix cache across device, host and storage, behind the front door engines call.

An engine needs three calls per request (see ``docs/embedding.md``):

* :meth:`HiRadixCache.admit` -- match the prompt across the tiers, start and gate a storage prefetch, pin the
  cached prefix, queue its load back from host, and reserve device slots for the rest. It answers ``wait`` (a
  prefetch is in flight; ask again next step), ``full`` (no device room now; ask again later) or ``ready``.
* :meth:`HiRadixCache.release` -- insert what was computed, hand back unused slots, unpin.
* :meth:`HiRadixCache.abort` -- forget a request that never became ready.

Plus, once per scheduler step, :meth:`poll` (apply background work) and, before the forward pass of newly
admitted requests, :meth:`ready_to_load_host_cache`.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import torch

from hicache_core.cache.node import TreeNode
from hicache_core.cache.radix import EMPTY
from hicache_core.cache.tiers import LOAD_BACK_THRESHOLD, TieredCache
from hicache_core.errors import ConfigError
from hicache_core.keys import hash_chain, namespace_seed

__all__ = ["LOAD_BACK_THRESHOLD", "Admission", "HiRadixCache"]

READY, WAIT, FULL = "ready", "wait", "full"


@attrs.define(eq=False)
class Admission:
    """What :meth:`HiRadixCache.admit` decided for one request.

    ``prefix`` holds the device slots of the cached prefix (tree-owned, pinned until release); ``own`` holds fresh
    slots for the tokens the engine computes (``len(tokens) - len(prefix) + extra_tokens``, page-rounded);
    ``cached`` splits the prefix by the tier it came from."""

    rid: Any
    status: str
    prefix: torch.Tensor = EMPTY
    own: torch.Tensor = EMPTY
    cached: dict[str, int] = attrs.field(factory=lambda: {"device": 0, "host": 0, "storage": 0})
    node: Optional[TreeNode] = None
    salt: Optional[str] = None  # the request's cache_salt
    extra_key: Optional[str] = None  # and extra_key: prefixes are shared only among requests with both the same
    seed: Optional[str] = None  # their namespace_seed (None: the shared, unseeded namespace)

    @property
    def ready(self) -> bool:
        return self.status == READY

    def slots(self, computed: int) -> torch.Tensor:
        """Device slots of the first ``len(prefix) + computed`` tokens."""
        return torch.cat([self.prefix, self.own[:computed]])


def _trim(tiers: dict[str, int], cut: int) -> None:
    """Take ``cut`` tokens off the deepest tiers first (storage pages sit past host pages past device pages)."""
    for tier in ("storage", "host", "device"):
        n = min(cut, tiers[tier])
        tiers[tier] -= n
        cut -= n


class HiRadixCache(TieredCache):
    """The prefix cache. Without a host pool it is a device-only radix cache (no write policies, no storage)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._admitting: dict[Any, int] = {}  # request id -> matched length before its storage prefetch

    def admit(self, rid: Any, tokens, extra_tokens: int = 0, salt: Optional[str] = None,
              extra_key: Optional[str] = None) -> Admission:
        """Admit a request whose prompt is ``tokens``; ``extra_tokens`` more slots are reserved (for decoding).
        At least one prompt token is always left to compute, so the engine gets logits for it. ``salt`` (vLLM's
        and SGLang's ``cache_salt``: a tenant, a user) and ``extra_key`` (SGLang's: an adapter, a tenant) confine
        the request to prefixes written with the same two, in every tier, their storage keys seeded as SGLang
        seeds them; with neither the request shares the unseeded prefixes, keyed as SGLang keys them."""
        for name, v in (("cache_salt", salt), ("extra_key", extra_key)):
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"{name} must be a non-empty string, not {v!r}")
        seed = namespace_seed(extra_key, salt)
        m = self.match_prefix(tokens, seed)
        storage_hit = 0
        if self.storage_enabled:
            if rid not in self._admitting:
                self._admitting[rid] = m.matched_length
                self.prefetch_from_storage(rid, m.last_node, tokens[m.matched_length :])
            if not self.check_prefetch_progress(rid):
                return Admission(rid, WAIT, salt=salt, extra_key=extra_key, seed=seed)
            m = self.match_prefix(tokens, seed)
            storage_hit = max(0, m.matched_length - self._admitting[rid])
        node = m.last_device_node
        self.inc_lock_ref(node)
        loaded = EMPTY
        if m.host_hit_length:
            loaded, loaded_node = self.init_load_back(m.last_node)
            if len(loaded):
                self.inc_lock_ref(loaded_node)
                self.dec_lock_ref(node)
                node = loaded_node
        prefix = torch.cat([m.device_indices, loaded])
        storage = min(storage_hit, len(loaded))  # fetched pages are host-only nodes, loaded like any host hit
        cached = {"device": len(m.device_indices), "host": len(loaded) - storage, "storage": storage}
        if len(prefix) >= len(tokens):  # keep at least one token to compute: redo the last page
            keep = self._page_align(len(tokens) - 1)
            _trim(cached, len(prefix) - keep)
            prefix = prefix[:keep]
        need = len(tokens) - len(prefix) + extra_tokens
        own = self.alloc_device(need + -need % self.page_size)
        if own is None:
            self.dec_lock_ref(node)
            self.ready_to_load_host_cache()  # the loads queued above pin device pages until they run
            return Admission(rid, FULL, salt=salt, extra_key=extra_key, seed=seed)
        self._admitting.pop(rid, None)
        self.metrics.record_request(len(tokens), cached["device"], cached["host"], cached["storage"],
                                    salt=None if seed is None else seed[:12])
        return Admission(rid, READY, prefix, own, cached, node, salt=salt, extra_key=extra_key, seed=seed)

    def release(self, admission: Admission, tokens, computed: int) -> None:
        """The request is done (or cancelled): ``tokens`` is the sequence whose KV it wrote, ``computed`` how many
        of its ``own`` slots hold KV. Whole pages join the tree; duplicates and unused slots are freed."""
        if not admission.ready or admission.node is None:
            raise ValueError(f"request {admission.rid!r}: release() takes a ready admission, not {admission.status!r}")
        p = len(admission.prefix)
        slots = admission.slots(computed)
        aligned = self._page_align(min(len(tokens), len(slots)))
        already = self.insert(tokens[:aligned], slots[:aligned], admission.seed)
        own = admission.own
        if already > p:
            self.device_pool.free(own[: already - p])  # the tree had these already: our copies go
        if len(own) > aligned - p:
            self.device_pool.free(own[aligned - p :])
        self.dec_lock_ref(admission.node)
        admission.node, admission.status = None, "released"
        self.ready_to_load_host_cache()  # a request cancelled before its forward pass: its loads still run

    def abort(self, rid: Any) -> None:
        """Forget a request that was never admitted ``ready`` (a client gone while it waited): its prefetch stops
        and its pages go back."""
        self._admitting.pop(rid, None)
        self.release_aborted_request(rid)

    # --- storage at runtime (SGLang's attach/detach; the owner calls these only while no request is in flight) ---
    def attach_storage(self, backend: Any, config: Any) -> None:
        """Start the storage tier on ``backend`` (built for this cache's host pool) with ``config``."""
        if self.controller is None:
            raise ConfigError("attaching a storage backend needs the host tier (--enable-hierarchical-cache)")
        if self.storage_enabled:
            raise ConfigError(f"storage backend {self.config.hicache_storage_backend!r} is attached already; "
                              "detach it first")
        self.flush()
        for node in self.nodes():  # parents first: nodes made before storage get their keys, chained from the root
            assert node.parent is not None
            if node.seed is None:  # a namespace's root keeps its seed
                node.hash_value = hash_chain(node.key, self.page_size, node.parent.last_hash())
        self.controller.attach_storage(backend, config)
        self.config, self.storage, self.storage_enabled = config, backend, True

    def detach_storage(self) -> None:
        """Wait for the backups in flight, then stop the storage tier and close its backend."""
        if not self.storage_enabled or self.controller is None:
            raise ConfigError("no storage backend is attached")
        if self.ongoing_prefetch or self._admitting:
            raise ConfigError(f"{len(self.ongoing_prefetch)} storage prefetches are in flight; retry when idle")
        self.flush()
        self.controller.detach_storage()
        self.storage, self.storage_enabled = None, False
        self.config = self.config.replace(hicache_storage_backend=None, hicache_storage_backend_extra_config=None)

    def close(self) -> None:
        self._admitting.clear()
        super().close()
