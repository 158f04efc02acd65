"""The tiers of the radix tree: device -> host demotion and load back, storage prefetch and backup.

A matched prefix is always (device part)(host-only part): a node is demoted off device only once its children
are, and a demoted node always keeps a host copy (it is deleted otherwise). Storage is not tracked in the tree;
it is asked live (``batch_exists``) when a request's prompt runs past the local hit.

Only the owner thread calls these methods. The controller runs the background work and reports what finished;
:meth:`TieredCache.poll` applies it to the tree. :class:`~hicache_core.cache.hiradix.HiRadixCache` adds the front
door engines call; these finer calls stay public for engines that schedule their own way.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch

from hicache_core.cache.agree import Solo
from hicache_core.cache.cost import PrefetchCost
from hicache_core.cache.node import TreeNode
from hicache_core.cache.prefetch import StoragePrefetch, _Prefetch
from hicache_core.cache.quota import HostQuota
from hicache_core.cache.radix import EMPTY
from hicache_core.config import HiCacheConfig
from hicache_core.controller import HiCacheController
from hicache_core.keys import hash_chain
from hicache_core.metrics import CacheMetrics

logger = logging.getLogger(__name__)

LOAD_BACK_THRESHOLD = 10  # tokens: shorter host spans are recomputed rather than loaded (SGLang's value)


class TieredCache(StoragePrefetch):
    """Device, host and storage tiers. Without a host pool it is a device-only radix cache."""

    def __init__(self, config: HiCacheConfig, device_pool, host_pool=None, storage=None,
                 metrics: Optional[CacheMetrics] = None, *, force_kernel: bool = False,
                 agree: Optional[Solo] = None, storage_writes: bool = True) -> None:
        super().__init__(device_pool, config.page_size, config.radix_eviction_policy)
        self.storage_writes = storage_writes  # False: this cache only reads storage (a PD decode without offload)
        self.config = config
        self.agree = agree or Solo()  # tensor-parallel ranks agree on rank-local outcomes (cache/agree.py)
        self._landed_writes: list[int] = []  # finished here, not yet everywhere
        self._landed_loads: list[int] = []
        self._backed_up: dict[int, Any] = {}
        self.host_pool = host_pool
        self.metrics = metrics or CacheMetrics(enable_prometheus=config.enable_metrics)
        self.controller: Optional[HiCacheController] = None
        if host_pool is not None:
            self.controller = HiCacheController(config, device_pool, host_pool, storage, self.metrics,
                                                force_kernel=force_kernel)
        elif storage is not None:
            raise ValueError("a storage backend needs a host pool (enable the hierarchical cache)")
        self.storage = storage
        self.storage_enabled = storage is not None
        self.write_policy = config.hicache_write_policy
        self.write_through_threshold = config.write_through_threshold
        self.ongoing_write_through: dict[int, TreeNode] = {}
        self.quota = HostQuota(self, config.hicache_salt_host_pages, config.page_size)
        self.ongoing_load_back: dict[int, TreeNode] = {}
        self.ongoing_backup: dict[int, TreeNode] = {}
        self._write_locked: set[int] = set()
        self.ongoing_prefetch: dict[Any, _Prefetch] = {}
        self.cost = PrefetchCost()  # the cost_aware prefetch policy's load and recompute rates (cache/cost.py)

    # --- tree hooks --------------------------------------------------------------------------------------------------
    def _on_new(self, node: TreeNode) -> None:
        if self.storage_enabled:
            assert node.parent is not None
            node.hash_value = hash_chain(node.key, self.page_size, node.parent.last_hash())

    def _on_hit(self, node: TreeNode) -> None:
        node.hit_count += 1
        if self.controller is None or self.write_policy == "write_back":
            return
        if not node.backuped and node.value is not None and node.hit_count >= self.write_through_threshold:
            self.write_backup(node)

    def _record_evicted(self, tier: str, tokens: int) -> None:
        self.metrics.record_evicted(tier, tokens)

    # --- device -> host -> storage -----------------------------------------------------------------------------------
    def write_backup(self, node: TreeNode, write_back: bool = False) -> int:
        """Start copying a node's device pages to host; returns tokens written (0 if the host is full)."""
        assert self.controller is not None and node.value is not None
        if self.quota.room(node, len(node.value)) < len(node.value):
            return 0  # its namespace is at its host quota (cache/quota.py)
        if self.agree.active and self._host_room(len(node.value)) < len(node.value):
            return 0
        host = self.controller.write(node.value, node.id)
        if host is None:
            self.evict_host(len(node.value))
            host = self.controller.write(node.value, node.id)
        if host is None:
            return 0
        node.host_value = host
        self.ongoing_write_through[node.id] = node
        if not write_back:
            self.inc_lock_ref(node)  # keep the device pages until the copy has landed
            self._write_locked.add(node.id)
        return len(host)

    def writing_check(self, block: bool = False) -> None:
        """Apply finished device->host copies; chain a storage backup after each."""
        assert self.controller is not None
        for node_id in self._agreed(self._landed_writes, self.controller.finished_writes(block)):
            node = self.ongoing_write_through.pop(node_id, None)
            if node is None:
                continue
            if node_id in self._write_locked:
                self._write_locked.discard(node_id)
                self.dec_lock_ref(node)
            if self.storage_enabled and self.storage_writes and node.hash_value and node.host_value is not None:
                self.controller.write_storage(node.host_value, node.hash_value, node.id, self._prefix_keys(node.parent),
                                              self._storage_extra(node))
                node.protect_host()  # the backup worker reads these host pages
                self.ongoing_backup[node.id] = node

    def _storage_extra(self, node: TreeNode) -> Optional[dict]:
        """What a backup of ``node`` tells the backend besides its keys: its namespace's seed and storage quota
        when ``--hicache-salt-storage-pages`` caps it."""
        cap = self.config.hicache_salt_storage_pages
        ns = self.quota.namespace_of(node) if cap else None
        return None if ns is None else {"namespace_seed": ns.seed, "namespace_storage_pages": cap}

    def backup_in_flight(self, tokens, seed: Optional[str] = None) -> bool:
        """Whether a page of ``tokens``' cached path is still on its way to storage (its device->host copy or its
        storage backup has not finished). False once every page that will be backed up is in storage: a page whose
        copy never started (host full) or whose backup failed is not waited for; a reader recomputes it."""
        busy = self.ongoing_write_through.keys() | self.ongoing_backup.keys()
        if not busy:
            return False
        node = self.match_prefix(tokens, seed).last_node
        while node is not self.root:
            if node.id in busy:
                return True
            node = node.parent  # type: ignore[assignment]
        return False

    # --- eviction ----------------------------------------------------------------------------------------------------
    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` device slots if possible: demote nodes with a host copy, drop the rest."""
        if self.controller is None:
            return super().evict(num_tokens)
        pending: set[int] = set()  # write-back copies started by this eviction

        def candidate(n: TreeNode) -> bool:
            return (n.value is not None and n.lock_ref == 0 and n.id not in pending
                    and all(c.value is None or c.id in pending for c in n.children.values()))

        written: list[TreeNode] = []

        def evict_one(x: TreeNode) -> int:
            if x.backuped:
                return self._demote(x)
            if self.write_policy == "write_back" or x.children:
                # write_back copies on eviction; a node with host-only children must keep a host copy too
                n = self.write_backup(x, write_back=True)
                if n:
                    pending.add(x.id)
                    written.append(x)
                return n
            return self._drop_leaf(x, "device")

        freed = self.evict_leaves(num_tokens, candidate, evict_one)
        if written:
            self.writing_check(block=True)
            for x in written:
                self._demote(x)
        return freed

    def _demote(self, x: TreeNode) -> int:
        assert x.value is not None
        n = len(x.value)
        self.device_pool.free(x.value)
        x.value = None
        self._record_evicted("device", n)
        return n

    def alloc_device(self, num_tokens: int) -> Optional[torch.Tensor]:
        """Device slots for new KV, evicting from the tree when the pool is short."""
        idx = self.device_pool.alloc(num_tokens)
        if idx is None:
            self._make_room(num_tokens)
            idx = self.device_pool.alloc(num_tokens)
        return idx

    def _make_room(self, num_tokens: int) -> None:
        """Evict until ``num_tokens`` device slots are free, if the tree allows."""
        self.evict(num_tokens - self.device_pool.available_size())
        if (self.device_pool.available_size() < num_tokens and self.controller
                and self.agree.any(self.controller.writes_in_flight())):
            # nodes whose host copy is in flight are locked: let the copies land, then they can be demoted
            self.writing_check(block=True)
            self.evict(num_tokens - self.device_pool.available_size())

    # --- host -> device ----------------------------------------------------------------------------------------------
    def load_back(self, node: TreeNode) -> Optional[torch.Tensor]:
        """Queue host->device for the demoted chain ending at ``node``; all or nothing."""
        assert self.controller is not None
        chain, x = [], node
        while x.value is None:
            chain.append(x)
            x = x.parent  # type: ignore[assignment]
        if not chain:
            return None
        chain.reverse()
        host_indices = torch.cat([n.host_value for n in chain])  # type: ignore[misc]
        if len(host_indices) < LOAD_BACK_THRESHOLD:
            return None
        self.inc_lock_ref(node)  # nothing on the path may be evicted while we make room
        device = self.controller.load(host_indices, node.id)
        if device is None:
            self._make_room(len(host_indices))
            device = self.controller.load(host_indices, node.id)
        if device is None:
            self.dec_lock_ref(node)
            return None
        offset = 0
        for n in chain:
            size = len(n.host_value)  # type: ignore[arg-type]
            n.value = device[offset : offset + size]
            offset += size
        self.ongoing_load_back[node.id] = node  # stays locked until the copy has landed
        self.metrics.add("loaded_back_tokens", len(host_indices))
        return device

    def init_load_back(self, last_node: TreeNode) -> tuple[torch.Tensor, TreeNode]:
        """Load the host-only tail of a match; returns (new device slots, deepest device node)."""
        if last_node.value is None:
            loaded = self.load_back(last_node)
            if loaded is not None:
                return loaded, last_node
            while last_node.value is None:
                last_node = last_node.parent  # type: ignore[assignment]
        return EMPTY, last_node

    def ready_to_load_host_cache(self):
        """Start the queued loads; the device pool's layer waiter now follows this op."""
        return self.controller.start_loading() if self.controller else None

    def loading_check(self) -> None:
        assert self.controller is not None
        for node_id in self._agreed(self._landed_loads, self.controller.finished_loads()):
            node = self.ongoing_load_back.pop(node_id, None)
            if node is not None:
                self.dec_lock_ref(node)

    # --- rank agreement (cache/agree.py) ----------------------------------------------------------------------------
    def _agreed(self, landed: list[int], new: list[int]) -> list[int]:
        """The oldest finished copies that have finished on every rank (all of them with one rank)."""
        landed += new
        n = self.agree.min([len(landed)])[0] if self.agree.active else len(landed)
        out = landed[:n]
        del landed[:n]
        return out

    # --- events ------------------------------------------------------------------------------------------------------
    def poll(self) -> None:
        """Apply what background work finished: writes, loads, backups, queried prefetches, returned pages."""
        ctrl = self.controller
        if ctrl is None:
            return
        self.writing_check()
        self.loading_check()
        for op in ctrl.finished_backups():
            self._backed_up[op.node_id] = op
        done = list(self._backed_up)
        if self.agree.active:  # a node's host copy is released once its backup has finished on every rank
            ids = list(self.ongoing_backup)
            done = [i for i, ok in zip(ids, self.agree.min([int(i in self._backed_up) for i in ids])) if ok]
        for node_id in done:
            op = self._backed_up.pop(node_id)
            node = self.ongoing_backup.pop(node_id, None)
            if node is not None:
                node.release_host()
            self.metrics.add("backuped_tokens", op.completed_tokens)
        self._advance_prefetches()
        ctrl.poll()

    def flush(self, timeout: float = 60.0) -> None:
        """Wait for every copy and storage backup in flight, then apply them (tests, benchmarks, shutdown)."""
        ctrl = self.controller
        if ctrl is None:
            return
        deadline = time.monotonic() + timeout
        self.ready_to_load_host_cache()  # queued loads never started would never finish
        ctrl.wait_idle(timeout)
        self.poll()
        while self.agree.any(bool(ctrl.backups_in_flight() or ctrl.writes_in_flight())):
            if self.agree.any(time.monotonic() > deadline):
                raise TimeoutError(f"{ctrl.backups_in_flight()} storage backups still running after {timeout} s")
            time.sleep(0.002)
            ctrl.wait_idle(max(0.0, deadline - time.monotonic()))
            self.poll()

    def close(self) -> None:
        if self.controller is not None:
            for rid in list(self.ongoing_prefetch):
                self.release_aborted_request(rid)
            self.controller.close()
