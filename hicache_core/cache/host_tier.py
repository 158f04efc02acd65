"""The host tier: host copies of device pages by write policy, their backup to storage, and host eviction.

Write policies: ``write_through`` copies a node to host as soon as it is inserted, ``write_through_selective`` once
it has been hit ``write_through_threshold`` times, ``write_back`` only when device eviction demotes it. Once a
copy has landed (on every tensor-parallel rank) and a storage tier is attached, the node's pages not yet in
storage are backed up; the host copy is protected until the backup has finished everywhere. Under
``--hicache-storage-admission seen_twice`` a backup waits until the node's prefix has been asked for twice (a second
insert along it, or its pages' keys seen before, by a request whose node has since been evicted): a prompt sent
once writes nothing to L3.

Only the owner thread calls these methods; the controller's workers run the copies.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

from hicache_core.cache.agree import Solo, agreed_prefix
from hicache_core.cache.node import TreeNode
from hicache_core.cache.quota import HostQuota
from hicache_core.cache.radix import RadixTree
from hicache_core.config import HiCacheConfig
from hicache_core.controller import HiCacheController
from hicache_core.events import CPU, STORAGE
from hicache_core.metrics import CacheMetrics


class HostTier:
    def __init__(
        self,
        tree: RadixTree,
        controller: HiCacheController,
        config: HiCacheConfig,
        metrics: CacheMetrics,
        agree: Solo,
        quota: HostQuota,
        *,
        storage_writes: bool = True,
    ) -> None:
        self.tree, self.controller, self.metrics, self.agree, self.quota = tree, controller, metrics, agree, quota
        self.pool = controller.host_pool
        self.storage_writes = storage_writes  # False: this cache only reads storage (a PD decode without offload)
        self.write_policy = config.hicache_write_policy
        self.write_through_threshold = config.write_through_threshold
        self.ongoing_write_through: dict[int, TreeNode] = {}
        self.ongoing_backup: dict[int, TreeNode] = {}
        self._write_locked: set[int] = set()  # nodes pinned on device until their host copy lands
        # upper parts cut off a node whose host copy was still landing (tree.on_split): they land with it
        self._riders: dict[int, list[TreeNode]] = {}
        self._rider_of: dict[int, int] = {}
        self._landed_writes: list[int] = []  # finished here, not yet everywhere
        self._backed_up: dict[int, Any] = {}
        self._backing_up: dict[int, tuple] = {}  # node id -> (parent key, tokens, seed) for its storage event
        self.seen_twice = config.hicache_storage_admission == "seen_twice"
        # page keys of host copies held back from storage, oldest first: a page whose key comes back was asked for
        # before, even if its node was evicted since (bounded: four host pools' worth of pages)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._seen_cap = max(1024, 4 * self.pool.size // max(1, tree.page_size))

    def on_hit(self, node: TreeNode) -> None:
        """The tree's ``on_hit``: a node held back from storage whose prefix is asked for again is backed up;
        write-through (selective or not) starts a node's host copy."""
        if node.held_back and node.hit_count >= 2 and node.host_value is not None:
            self._backup(node)
        if self.write_policy == "write_back":
            return
        if not node.backuped and node.value is not None and node.hit_count >= self.write_through_threshold:
            self.write_backup(node)

    # --- device -> host -> storage -----------------------------------------------------------------------------------
    def write_backup(self, node: TreeNode, write_back: bool = False) -> int:
        """Start copying a node's device pages to host; returns tokens written (0 if the host is full)."""
        assert node.value is not None
        if self.quota.room(node, len(node.value)) < len(node.value):
            return 0  # its namespace is at its host quota (cache/quota.py)
        if self.agree.active and self.room(len(node.value)) < len(node.value):
            return 0
        host = self.controller.write(node.value, node.id)
        if host is None:
            self.evict(len(node.value))
            host = self.controller.write(node.value, node.id)
        if host is None:
            return 0
        node.host_value = host
        self.ongoing_write_through[node.id] = node
        if not write_back:
            self.tree.inc_lock_ref(node)  # keep the device pages until the copy has landed
            self._write_locked.add(node.id)
        return len(host)

    def on_split(self, upper: TreeNode, child: TreeNode) -> None:
        """The tree's ``on_split``: a node whose host copy is still landing (or a part already cut off one) was cut;
        the upper part's pages are in that copy, so its storage backup follows the copy's landing too. Without
        this the upper part -- typically a prefix a second request shares -- had a host copy and never a backup."""
        landing = child.id if child.id in self.ongoing_write_through else self._rider_of.get(child.id)
        if landing is not None:
            self._riders.setdefault(landing, []).append(upper)
            self._rider_of[upper.id] = landing

    def writing_check(self, block: bool = False) -> None:
        """Apply finished device->host copies; chain a storage backup after each (and after each upper part cut
        off the node while its copy was landing)."""
        io = self.controller.io
        for node_id in agreed_prefix(self.agree, self._landed_writes, self.controller.finished_writes(block)):
            node = self.ongoing_write_through.pop(node_id, None)
            if node is None:
                continue
            if node_id in self._write_locked:
                self._write_locked.discard(node_id)
                self.tree.dec_lock_ref(node)
            riders = self._riders.pop(node_id, [])
            for rider in riders:
                self._rider_of.pop(rider.id, None)
            for landed in (*riders, node):
                if landed is not node and landed.host_value is None:
                    continue  # evicted from host (or from the tree) before the copy landed
                self.tree.announce(landed, CPU)
                if io is not None and self.storage_writes and landed.host_value is not None and self._admitted(landed):
                    self._backup(landed)

    def _admitted(self, node: TreeNode) -> bool:
        """Whether a node whose host copy just landed goes to storage now (``seen_twice``: only when its prefix
        was asked for before; else it is held back and its page keys remembered)."""
        if not self.seen_twice or node.hit_count >= 2 or not node.hash_value:
            return True
        if node.hash_value[-1] in self._seen:  # its whole prefix came before, in a node evicted since
            self._seen.move_to_end(node.hash_value[-1])
            return True
        node.held_back = True
        self.metrics.add("storage_held_back_tokens", len(node.key))
        for key in node.hash_value:
            self._seen[key] = None
            self._seen.move_to_end(key)
        while len(self._seen) > self._seen_cap:
            self._seen.popitem(last=False)
        return False

    def _backup(self, node: TreeNode) -> None:
        """Start backing up a node's host copy to storage (with a storage tier that this cache writes to)."""
        io = self.controller.io
        node.held_back = False
        if io is None or not self.storage_writes or not node.hash_value or node.host_value is None:
            return
        if node.id in self.ongoing_backup:
            return
        prefix = self.tree.storage_keys_above(node.parent) if io.config.pass_prefix_keys else None
        io.write_storage(node.host_value, node.hash_value, node.id, prefix, self._storage_extra(node))
        node.protect_host()  # the backup worker reads these host pages
        self.ongoing_backup[node.id] = node
        if self.tree.events is not None and self.tree.events.active:
            parent = node.parent.last_hash() if node.parent is not None else None
            self._backing_up[node.id] = (parent, list(node.key), self.tree.seed_of(node))

    def _storage_extra(self, node: TreeNode) -> Optional[dict]:
        """What a backup of ``node`` tells the backend besides its keys: its namespace's seed and storage quota
        when ``--hicache-salt-storage-pages`` caps it."""
        assert self.controller.io is not None
        cap = self.controller.io.config.hicache_salt_storage_pages
        ns = self.quota.namespace_of(node) if cap else None
        return None if ns is None else {"namespace_seed": ns.seed, "namespace_storage_pages": cap}

    def backups_check(self) -> None:
        """Release the host copies of nodes whose storage backup has finished (on every rank)."""
        io = self.controller.io
        if io is not None:
            for op in io.finished_backups():
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
            meta = self._backing_up.pop(node_id, None)
            if meta is not None and self.tree.events is not None:  # in storage everywhere: now a router may know
                pages = op.completed_tokens // self.tree.page_size
                self.tree.events.stored(op.hash_value[:pages], meta[0], meta[1], STORAGE, meta[2])

    def backup_in_flight(self, tokens, seed: Optional[str] = None) -> bool:
        """Whether a page of ``tokens``' cached path is still on its way to storage (its device->host copy or its
        storage backup has not finished). False once every page that will be backed up is in storage: a page whose
        copy never started (host full) or whose backup failed is not waited for; a reader recomputes it."""
        busy = self.ongoing_write_through.keys() | self.ongoing_backup.keys()
        if not busy:
            return False
        node = self.tree.match_prefix(tokens, seed).last_node
        while node is not self.tree.root:
            if node.id in busy:
                return True
            node = node.parent  # type: ignore[assignment]
        return False

    # --- host room ---------------------------------------------------------------------------------------------------
    def evict(self, num_tokens: int) -> int:
        """Free host pages of host-only leaves (never a device-resident node's copy, never a locked node's)."""
        return self.tree.evict_leaves(num_tokens, self.tree.host_leaf, self.tree.drop_host_leaf)

    def evictable(self) -> int:
        """Host tokens :meth:`evict` could free now (whole unlocked host-only subtrees)."""
        ok: dict[int, bool] = {}
        total = 0
        for n in reversed(list(self.tree.nodes())):  # children before parents
            e = n.value is None and n.lock_ref == 0 and n.host_ref == 0 and all(ok[c.id] for c in n.children.values())
            ok[n.id] = e
            if e and n.host_value is not None:
                total += len(n.host_value)
        return total

    def room(self, want: int) -> int:
        """Free host tokens on every rank after evicting host-only pages toward ``want`` (the same on every rank,
        though pages come back from worker threads at different times on each)."""
        avail = self.agree.min([self.pool.available_size()])[0]
        if avail < want and self.evictable() >= want - avail:
            avail += self.evict(want - avail)
        return avail
