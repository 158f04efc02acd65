"""HiRadixCache: the prefix cache across device, host and storage, behind the front door engines call.

An engine needs three calls per request (see ``docs/embedding.md``):

* :meth:`HiRadixCache.admit` -- match the prompt across the tiers, start and gate a storage prefetch, pin the
  cached prefix, queue its load back from host, and reserve device slots for the rest. It answers ``wait`` (a
  prefetch is in flight; ask again next step), ``full`` (no device room now; ask again later) or ``ready``.
* :meth:`HiRadixCache.release` -- insert what was computed, hand back unused slots, unpin.
* :meth:`HiRadixCache.abort` -- forget a request that never became ready.

Plus, once per scheduler step, :meth:`poll` (apply background work) and, before the forward pass of newly
admitted requests, :meth:`ready_to_load_host_cache`.

The cache is a facade over parts it owns, each with one job: the :class:`~hicache_core.cache.radix.RadixTree`
(``tree``), the :class:`~hicache_core.cache.device_tier.DeviceTier` (``device``: slots, eviction, load back), the
:class:`~hicache_core.cache.host_tier.HostTier` (``host``: write policies, backups, host room) and the
:class:`~hicache_core.cache.prefetch.StoragePrefetcher` (``prefetcher``), with the controller's background work
under them. Only the thread that owns the cache calls it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch

from hicache_core.cache.admission import FULL, READY, WAIT, Admission, trim_tiers
from hicache_core.cache.agree import Solo
from hicache_core.cache.device_tier import LOAD_BACK_THRESHOLD, DeviceTier
from hicache_core.cache.fleet import FleetDoor
from hicache_core.cache.host_tier import HostTier
from hicache_core.cache.node import TreeNode
from hicache_core.cache.operator import OperatorDoor
from hicache_core.cache.prefetch import StoragePrefetcher
from hicache_core.cache.quota import HostQuota
from hicache_core.cache.radix import EMPTY, MatchResult, RadixTree
from hicache_core.cache.restore import Restore
from hicache_core.config import HiCacheConfig
from hicache_core.controller import HiCacheController
from hicache_core.events import KVEvents
from hicache_core.keys import hash_chain, namespace_seed
from hicache_core.memory import DevicePool, HostPool
from hicache_core.metrics import CacheMetrics
from hicache_core.storage import StorageV1

__all__ = ["LOAD_BACK_THRESHOLD", "Admission", "HiRadixCache", "Tokens"]

Tokens = Sequence[int]  # a prompt: a list of token ids (or any sequence of them)


class HiRadixCache:
    """The prefix cache. Without a host pool it is a device-only radix cache (no write policies, no storage).
    Beside the front door, two parts it owns: ``fleet`` (:class:`~hicache_core.cache.fleet.FleetDoor`: KV events,
    restores, retention) and ``operator`` (:class:`~hicache_core.cache.operator.OperatorDoor`: storage attached
    and detached at run time, the local tiers emptied, the backend's stats and wrappers)."""

    def __init__(
        self,
        config: HiCacheConfig,
        device_pool: DevicePool,
        host_pool: Optional[HostPool] = None,
        storage: Optional[StorageV1] = None,
        metrics: Optional[CacheMetrics] = None,
        *,
        force_kernel: bool = False,
        agree: Optional[Solo] = None,
        storage_writes: bool = True,
    ) -> None:
        if storage is not None and host_pool is None:
            raise ValueError("a storage backend needs a host pool (enable the hierarchical cache)")
        self.config = config
        self.agree = agree or Solo()  # tensor-parallel ranks agree on rank-local outcomes (cache/agree.py)
        self.metrics = metrics or CacheMetrics(enable_prometheus=config.enable_metrics)
        self.page_size = config.page_size
        self.tree = RadixTree(device_pool, config.page_size, config.radix_eviction_policy, host_pool)
        self.tree.on_new, self.tree.on_evicted = self._on_new, self.metrics.record_evicted
        self.events = self.tree.events = KVEvents(config.page_size)  # subscribe_events() turns them on
        self.quota = HostQuota(self.tree, config.hicache_salt_host_pages, config.page_size)
        self.controller: Optional[HiCacheController] = None
        self.host: Optional[HostTier] = None
        self.prefetcher: Optional[StoragePrefetcher] = None
        if host_pool is not None:
            self.controller = HiCacheController(
                config, device_pool, host_pool, storage, self.metrics, force_kernel=force_kernel
            )
            self.host = HostTier(
                self.tree, self.controller, config, self.metrics, self.agree, self.quota, storage_writes=storage_writes
            )
            self.tree.on_hit, self.tree.on_split = self.host.on_hit, self.host.on_split
            self.prefetcher = StoragePrefetcher(
                self.tree, self.host, self.controller, self.metrics, self.agree, self.quota
            )
        self.device = DeviceTier(
            self.tree, self.controller, self.host, self.metrics, self.agree, config.hicache_write_policy
        )
        self._admitting: dict[Any, int] = {}  # request id -> matched length before its storage prefetch
        self._joined: dict[Any, Optional[Restore]] = {}  # request id -> the restore it waits on (None: waited)
        capacity = host_pool.size if host_pool is not None else device_pool.size
        self.fleet = FleetDoor(
            self, self.tree, self.host, self.prefetcher, self.events, self.metrics, self.agree, config, capacity
        )
        self.operator = OperatorDoor(self)

    # --- what the parts hold -----------------------------------------------------------------------------------------
    @property
    def device_pool(self):
        return self.tree.device_pool

    @property
    def host_pool(self):
        return self.tree.host_pool

    @property
    def root(self) -> TreeNode:
        return self.tree.root

    @property
    def storage_enabled(self) -> bool:
        return self.controller is not None and self.controller.io is not None

    @property
    def storage(self) -> Any:
        """The attached backend, as built (None without a storage tier)."""
        return self.controller.io.storage if self.controller is not None and self.controller.io else None

    @property
    def ongoing_prefetch(self) -> dict:
        return self.prefetcher.ongoing if self.prefetcher is not None else {}

    @property
    def ongoing_write_through(self) -> dict:
        return self.host.ongoing_write_through if self.host is not None else {}

    @property
    def ongoing_backup(self) -> dict:
        return self.host.ongoing_backup if self.host is not None else {}

    def _on_new(self, node: TreeNode) -> None:
        if self.storage_enabled or self.events.active:  # storage keys (and event ids) chain from the parent's
            assert node.parent is not None
            node.hash_value = hash_chain(node.key, self.page_size, node.parent.last_hash())

    def admissions_in_flight(self) -> int:
        """Requests between their first ``admit`` and ready whose storage prefetch may still be running."""
        return len(set(self.ongoing_prefetch) | set(self._admitting))

    def rehash(self) -> None:
        """Give every node its page keys, chained from its namespace's root (nodes made while nothing needed them
        have none)."""
        for node in self.nodes():  # parents first
            assert node.parent is not None
            if node.seed is None:  # a namespace's root keeps its seed
                node.hash_value = hash_chain(node.key, self.page_size, node.parent.last_hash())

    # --- the tree ----------------------------------------------------------------------------------------------------
    def match_prefix(self, tokens: Tokens, seed: Optional[str] = None) -> MatchResult:
        return self.tree.match_prefix(tokens, seed)

    def insert(self, tokens: Tokens, device_indices: torch.Tensor, seed: Optional[str] = None) -> int:
        return self.tree.insert(tokens, device_indices, seed)

    def nodes(self) -> Iterator[TreeNode]:
        return self.tree.nodes()

    def namespace_root(self, seed: Optional[str]) -> TreeNode:
        return self.tree.namespace_root(seed)

    def inc_lock_ref(self, node: TreeNode) -> None:
        self.tree.inc_lock_ref(node)

    def dec_lock_ref(self, node: TreeNode) -> None:
        self.tree.dec_lock_ref(node)

    def total_size(self) -> tuple[int, int]:
        return self.tree.total_size()

    def pretty(self) -> str:
        return self.tree.pretty()

    # --- the tiers, for engines that schedule their own way ----------------------------------------------------------
    def alloc_device(self, num_tokens: int) -> Optional[torch.Tensor]:
        return self.device.alloc(num_tokens)

    def evict(self, num_tokens: int) -> int:
        return self.device.evict(num_tokens)

    def init_load_back(self, last_node: TreeNode) -> tuple[torch.Tensor, TreeNode]:
        return self.device.init_load_back(last_node)

    def ready_to_load_host_cache(self):
        return self.device.start_loading()

    def evict_host(self, num_tokens: int) -> int:
        return self.host.evict(num_tokens) if self.host is not None else 0

    def backup_in_flight(self, tokens: Tokens, seed: Optional[str] = None) -> bool:
        return self.host is not None and self.host.backup_in_flight(tokens, seed)

    def prefetch_from_storage(self, request_id: Any, anchor: TreeNode, new_tokens: Tokens) -> bool:
        return self.prefetcher is not None and self.prefetcher.start(request_id, anchor, new_tokens)

    def check_prefetch_progress(self, request_id: Any) -> bool:
        return self.prefetcher is None or self.prefetcher.check(request_id)

    def release_aborted_request(self, request_id: Any) -> None:
        if self.prefetcher is not None:
            self.prefetcher.abort(request_id)

    def record_prefill(self, tokens: int, seconds: float) -> None:
        """The engine computed ``tokens`` prompt tokens in ``seconds`` (one forward pass): what the ``cost_aware``
        prefetch policy weighs a storage load against."""
        if self.controller is not None:
            self.controller.cost.record_prefill(tokens, seconds)

    # --- the front door ----------------------------------------------------------------------------------------------
    def admit(
        self,
        rid: Any,
        tokens: Tokens,
        extra_tokens: int = 0,
        salt: Optional[str] = None,
        extra_key: Optional[str] = None,
    ) -> Admission:
        """Admit a request whose prompt is ``tokens``; ``extra_tokens`` more slots are reserved (for decoding).
        At least one prompt token is always left to compute, so the engine gets logits for it. ``salt`` (vLLM's
        and SGLang's ``cache_salt``: a tenant, a user) and ``extra_key`` (SGLang's: an adapter, a tenant) confine
        the request to prefixes written with the same two, in every tier, their storage keys seeded as SGLang
        seeds them; with neither the request shares the unseeded prefixes, keyed as SGLang keys them."""
        for name, v in (("cache_salt", salt), ("extra_key", extra_key)):
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"{name} must be a non-empty string, not {v!r}")
        seed = namespace_seed(extra_key, salt)
        self.events.name_namespace(seed, salt, extra_key)
        m = self.match_prefix(tokens, seed)
        storage_hit = 0
        if self.storage_enabled:
            if rid not in self._admitting:
                self._admitting[rid] = m.matched_length
                joined = self.fleet.joinable(tokens, seed, m.matched_length)
                if joined is not None:  # its restore is fetching what it needs: wait for that, not a second fetch
                    self._joined[rid] = joined
                else:
                    self.prefetch_from_storage(rid, m.last_node, tokens[m.matched_length :])
            joined = self._joined.get(rid)
            if joined is not None:
                if joined.state == "running":
                    return Admission(rid, WAIT, salt=salt, extra_key=extra_key, seed=seed)
                m = self.match_prefix(tokens, seed)  # then fetch what the restore did not cover
                self.prefetch_from_storage(rid, m.last_node, tokens[m.matched_length :])
                self._joined[rid] = None
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
            keep = self.tree._page_align(len(tokens) - 1)
            trim_tiers(cached, len(prefix) - keep)
            prefix = prefix[:keep]
        need = len(tokens) - len(prefix) + extra_tokens
        own = self.device.alloc(need + -need % self.page_size)
        if own is None:
            self.dec_lock_ref(node)
            self.ready_to_load_host_cache()  # the loads queued above pin device pages until they run
            return Admission(rid, FULL, salt=salt, extra_key=extra_key, seed=seed)
        self._admitting.pop(rid, None)
        self.fleet.hit(m.last_node)  # a hit refreshes the retention of the sessions whose prefix it is
        self.metrics.record_request(
            len(tokens), cached["device"], cached["host"], cached["storage"], salt=None if seed is None else seed[:12]
        )
        outcome = self.prefetcher.outcome(rid) if self.prefetcher is not None else None
        if rid in self._joined:
            del self._joined[rid]
            outcome = "restored" if outcome in (None, "local") else outcome
        return Admission(
            rid, READY, prefix, own, cached, node, salt=salt, extra_key=extra_key, seed=seed, prefetch=outcome
        )

    def release(self, admission: Admission, tokens: Tokens, computed: int) -> None:
        """The request is done (or cancelled): ``tokens`` is the sequence whose KV it wrote, ``computed`` how many
        of its ``own`` slots hold KV. Whole pages join the tree; duplicates and unused slots are freed."""
        if not admission.ready or admission.node is None:
            raise ValueError(f"request {admission.rid!r}: release() takes a ready admission, not {admission.status!r}")
        p = len(admission.prefix)
        slots = admission.slots(computed)
        aligned = self.tree._page_align(min(len(tokens), len(slots)))
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
        self._joined.pop(rid, None)
        self.release_aborted_request(rid)

    # --- background work -------------------------------------------------------------------------------------------
    def poll(self) -> None:
        """Apply what background work finished: writes, loads, backups, queried prefetches, returned pages."""
        self.fleet.expire()
        if self.controller is not None and self.host is not None and self.prefetcher is not None:
            self.host.writing_check()
            self.device.loading_check()
            self.host.backups_check()
            if self.controller.io is not None:
                self.prefetcher.advance()
                self.fleet.advance()
            self.controller.poll()
        self.events.flush()

    def busy(self) -> bool:
        """Whether a device<->host copy or a storage backup is still running (on any rank)."""
        ctrl = self.controller
        if ctrl is None:
            return False
        return self.agree.any(bool(ctrl.writes_in_flight() or (ctrl.io is not None and ctrl.io.backups_in_flight())))

    def flush(self, timeout: float = 60.0) -> None:
        """Wait for every copy and storage backup in flight, then apply them (tests, benchmarks, shutdown)."""
        ctrl = self.controller
        if ctrl is None:
            return
        deadline = time.monotonic() + timeout
        self.ready_to_load_host_cache()  # queued loads never started would never finish
        ctrl.wait_idle(timeout)
        self.poll()
        while self.busy():
            if self.agree.any(time.monotonic() > deadline):
                n = ctrl.io.backups_in_flight() if ctrl.io is not None else 0
                raise TimeoutError(f"{n} storage backups still running after {timeout} s")
            time.sleep(0.002)
            ctrl.wait_idle(max(0.0, deadline - time.monotonic()))
            self.poll()

    def close(self, drain_timeout: Optional[float] = None) -> None:
        """Stop the background work and close the backend. ``drain_timeout``: first let every copy, backup and
        call past its deadline return (each bounded by it) and give every unpinned page back, so the pools can be
        checked for leaks afterwards."""
        self._admitting.clear()
        self.events.close()
        if drain_timeout is not None:
            self._drain(drain_timeout)
        if self.controller is not None:
            if self.prefetcher is not None:
                for rid in list(self.prefetcher.ongoing):
                    self.prefetcher.abort(rid)
            self.controller.close()
            if drain_timeout is not None:
                self.controller.poll()  # what the workers handed back while stopping

    def _drain(self, timeout: float) -> None:
        self.flush(timeout)
        self.evict(self.device_pool.size)
        self.flush(timeout)
        io = self.controller.io if self.controller is not None else None
        deadline = time.monotonic() + timeout
        while io is not None and io.guard.abandoned_calls() and time.monotonic() < deadline:
            time.sleep(0.01)  # calls past their deadline return late: then their pages come back
        self.operator.empty_local_tiers(timeout)
