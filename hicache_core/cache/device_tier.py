"""The device tier: slots for new KV, device eviction (demote what has a host copy, drop the rest), and loading
host-only spans back onto the device.

A matched prefix is always (device part)(host-only part): a node is demoted off device only once its children
are, and a demoted node always keeps a host copy (it is deleted otherwise). Without a host tier this is SGLang's
device-only radix cache: eviction drops unlocked leaves.
"""

from __future__ import annotations

from typing import Optional

import torch

from hicache_core.cache.agree import Solo, agreed_prefix
from hicache_core.cache.host_tier import HostTier
from hicache_core.cache.node import TreeNode
from hicache_core.cache.radix import EMPTY, RadixTree
from hicache_core.controller import HiCacheController
from hicache_core.events import GPU
from hicache_core.metrics import CacheMetrics

LOAD_BACK_THRESHOLD = 10  # tokens: shorter host spans are recomputed rather than loaded (SGLang's value)


class DeviceTier:
    def __init__(
        self,
        tree: RadixTree,
        controller: Optional[HiCacheController],
        host: Optional[HostTier],
        metrics: CacheMetrics,
        agree: Solo,
        write_policy: str,
    ) -> None:
        self.tree, self.controller, self.host, self.metrics, self.agree = tree, controller, host, metrics, agree
        self.pool = tree.device_pool
        self.write_policy = write_policy
        self.ongoing_load_back: dict[int, TreeNode] = {}
        self._landed_loads: list[int] = []

    # --- room --------------------------------------------------------------------------------------------------------
    def alloc(self, num_tokens: int) -> Optional[torch.Tensor]:
        """Device slots for new KV, evicting from the tree when the pool is short."""
        idx = self.pool.alloc(num_tokens)
        if idx is None:
            self.make_room(num_tokens)
            idx = self.pool.alloc(num_tokens)
        return idx

    def make_room(self, num_tokens: int) -> None:
        """Evict until ``num_tokens`` device slots are free, if the tree allows."""
        self.evict(num_tokens - self.pool.available_size())
        if (
            self.pool.available_size() < num_tokens
            and self.controller
            and self.host
            and self.agree.any(self.controller.writes_in_flight())
        ):
            # nodes whose host copy is in flight are locked: let the copies land, then they can be demoted
            self.host.writing_check(block=True)
            self.evict(num_tokens - self.pool.available_size())

    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` device slots if possible: demote nodes with a host copy, drop the rest."""
        host = self.host
        if host is None:
            return self.tree.evict(num_tokens)
        pending: set[int] = set()  # write-back copies started by this eviction

        def candidate(n: TreeNode) -> bool:
            return (
                n.value is not None
                and n.lock_ref == 0
                and n.id not in pending
                and all(c.value is None or c.id in pending for c in n.children.values())
            )

        written: list[TreeNode] = []
        retained = self.tree.retained()  # a retained prefix's pages go to host rather than away

        def evict_one(x: TreeNode) -> int:
            if x.backuped:
                return self._demote(x)
            if self.write_policy == "write_back" or x.children or x.id in retained:
                # write_back copies on eviction; a node with host-only children must keep a host copy too
                n = host.write_backup(x, write_back=True)
                if n:
                    pending.add(x.id)
                    written.append(x)
                    return n
                if x.children:
                    return 0  # its host-only children hang from it: it stays until they go
            # no host copy, and none to be had (host full, or its namespace at its host quota): dropped, or its
            # device pages would be held for good
            return self.tree._drop_leaf(x, "device")

        freed = self.tree.evict_leaves(num_tokens, candidate, evict_one)
        if written:
            host.writing_check(block=True)
            for x in written:
                self._demote(x)
        return freed

    def _demote(self, x: TreeNode) -> int:
        assert x.value is not None
        n = len(x.value)
        self.pool.free(x.value)
        x.value = None
        self.tree.withdraw(x, GPU, "demoted")
        self.metrics.record_evicted("device", n)
        return n

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
        self.tree.inc_lock_ref(node)  # nothing on the path may be evicted while we make room
        device = self.controller.load(host_indices, node.id)
        if device is None:
            self.make_room(len(host_indices))
            device = self.controller.load(host_indices, node.id)
        if device is None:
            self.tree.dec_lock_ref(node)
            return None
        offset = 0
        for n in chain:
            size = len(n.host_value)  # type: ignore[arg-type]
            n.value = device[offset : offset + size]
            offset += size
            self.tree.announce(n, GPU)  # its slots are taken and its copy is queued: a request here waits on it
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

    def start_loading(self):
        """Start the queued loads; the device pool's layer waiter now follows this op."""
        return self.controller.start_loading() if self.controller else None

    def loading_check(self) -> None:
        assert self.controller is not None
        for node_id in agreed_prefix(self.agree, self._landed_loads, self.controller.finished_loads()):
            node = self.ongoing_load_back.pop(node_id, None)
            if node is not None:
                self.tree.dec_lock_ref(node)
