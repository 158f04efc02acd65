"""HiRadixCache: a radix tree over token ids, at page granularity, across device, host and storage.

A matched prefix is always (device part)(host-only part): a node is evicted from device only once its children
are, and an evicted node always keeps a host copy (it is deleted otherwise). Storage is not tracked in the tree;
it is asked live (``batch_exists``) when a request's prompt runs past the local hit.

Only the owner thread calls these methods. Background work (copies, prefetch, backup) reports back through the
controller's acks and queues, applied by :meth:`HiRadixCache.poll`.
"""

from __future__ import annotations

import heapq
import logging
import time
from typing import Any, Optional

import attrs
import torch

from hicache_core.cache.node import TreeNode
from hicache_core.cache.policies import EVICTION_KEYS
from hicache_core.config import HiCacheConfig
from hicache_core.controller import HiCacheController, PrefetchOperation
from hicache_core.keys import hash_chain
from hicache_core.metrics import CacheMetrics

logger = logging.getLogger(__name__)

LOAD_BACK_THRESHOLD = 10  # tokens: shorter host spans are recomputed rather than loaded (SGLang's value)
_EMPTY = torch.empty(0, dtype=torch.int64)


@attrs.frozen
class MatchResult:
    device_indices: torch.Tensor  # device slots of the device-resident part of the prefix
    last_device_node: TreeNode  # deepest node whose KV is on device
    last_node: TreeNode  # deepest matched node (device or host-only): the anchor for prefetch and load back
    host_hit_length: int  # tokens past the device part that are on host only

    @property
    def matched_length(self) -> int:
        return len(self.device_indices) + self.host_hit_length


@attrs.define
class _Prefetch:
    anchor: TreeNode
    tokens: list
    op: PrefetchOperation


class HiRadixCache:
    """The prefix cache. Without a host pool it is a device-only radix cache (no write policies, no storage)."""

    def __init__(
        self,
        config: HiCacheConfig,
        device_pool,
        host_pool=None,
        storage=None,
        metrics: Optional[CacheMetrics] = None,
        *,
        force_kernel: bool = False,
    ) -> None:
        self.config = config
        self.page_size = config.page_size
        self.device_pool = device_pool
        self.host_pool = host_pool
        self.metrics = metrics or CacheMetrics(enable_prometheus=config.enable_metrics)
        self.controller: Optional[HiCacheController] = None
        if host_pool is not None:
            self.controller = HiCacheController(config, device_pool, host_pool, storage, self.metrics, force_kernel=force_kernel)
        elif storage is not None:
            raise ValueError("a storage backend needs a host pool (enable the hierarchical cache)")
        self.storage_enabled = storage is not None
        self.write_policy = config.hicache_write_policy
        self.write_through_threshold = config.write_through_threshold
        self.prefetch_policy = config.hicache_storage_prefetch_policy
        self.prefetch_timeout_base = config.prefetch_timeout_base
        self.prefetch_timeout_per_page = self.page_size / 1024 * config.prefetch_timeout_per_ki_token
        self.prefetch_stall_limit = max(10.0, 4 * config.prefetch_timeout_base)
        self._evict_key = EVICTION_KEYS[config.radix_eviction_policy]
        self.ongoing_write_through: dict[int, TreeNode] = {}
        self._write_locked: set[int] = set()
        self.ongoing_load_back: dict[int, TreeNode] = {}
        self.ongoing_prefetch: dict[Any, _Prefetch] = {}
        self.ongoing_backup: dict[int, TreeNode] = {}
        self._detached: list[PrefetchOperation] = []  # aborted prefetches whose I/O thread still holds pages
        self.reset()

    def reset(self) -> None:
        self.root = TreeNode()
        self.root.value = _EMPTY
        self.root.host_value = _EMPTY
        self.root.hash_value = []
        self.root.lock_ref = 1

    # --- helpers -----------------------------------------------------------------------------------------------------
    def _page_align(self, n: int) -> int:
        return n - n % self.page_size

    def _match_len(self, a: tuple, b: tuple) -> int:
        """Length of the common prefix of two keys, in whole pages."""
        ps, n, i = self.page_size, min(len(a), len(b)), 0
        while i + ps <= n and a[i : i + ps] == b[i : i + ps]:
            i += ps
        return i

    def _descend(self, node: TreeNode, key: tuple) -> tuple[Optional[TreeNode], int]:
        """The child of ``node`` that shares whole leading pages with ``key`` (split so it ends at the shared
        part), and how many tokens they share; (None, 0) when no child starts with key's first page."""
        child = node.children.get(key[: self.page_size])
        if child is None:
            return None, 0
        n = self._match_len(child.key, key)
        if n < len(child.key):
            child = self._split(child, n)
        return child, n

    def _split(self, child: TreeNode, split_len: int) -> TreeNode:
        """Cut ``child`` after ``split_len`` tokens; return the new upper node."""
        ps = self.page_size
        upper = TreeNode(child.key[:split_len], child.parent)
        upper.lock_ref = child.lock_ref
        upper.hit_count = child.hit_count
        upper.last_access_time = child.last_access_time
        upper.creation_time = child.creation_time
        if child.value is not None:
            upper.value, child.value = child.value[:split_len], child.value[split_len:]
        if child.host_value is not None:
            upper.host_value, child.host_value = child.host_value[:split_len], child.host_value[split_len:]
        if child.hash_value is not None:
            upper.hash_value, child.hash_value = child.hash_value[: split_len // ps], child.hash_value[split_len // ps :]
        child.key = child.key[split_len:]
        child.parent = upper
        upper.children[child.key[:ps]] = child
        upper.parent.children[upper.key[:ps]] = upper
        return upper

    def inc_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref <= 0:
                raise RuntimeError(f"lock of {node} released more often than taken")
            node.lock_ref -= 1
            node = node.parent

    def _delete_leaf(self, node: TreeNode) -> None:
        del node.parent.children[node.key[: self.page_size]]

    # --- match / insert ----------------------------------------------------------------------------------------------
    def match_prefix(self, tokens) -> MatchResult:
        """The longest cached prefix of ``tokens`` (whole pages): device slots, then the host-only length."""
        key = tuple(tokens[: self._page_align(len(tokens))])
        node, values, now = self.root, [], time.monotonic()
        while key:
            child, n = self._descend(node, key)
            if child is None:
                break
            child.last_access_time = now
            if child.value is not None:
                values.append(child.value)
            node, key = child, key[n:]
        last_node, host_hit, x = node, 0, node
        while x.value is None:
            host_hit += len(x.host_value)
            x = x.parent
        device = torch.cat(values) if values else _EMPTY
        return MatchResult(device, x, last_node, host_hit)

    def insert(self, tokens, device_indices: torch.Tensor) -> int:
        """Insert a computed sequence; return how many leading tokens were already on device (the caller frees
        its own copies of those beyond what it matched). Evicted nodes on the path take the new device slots."""
        n_all = self._page_align(len(tokens))
        key, value = tuple(tokens[:n_all]), device_indices[:n_all]
        node, prefix, now = self.root, 0, time.monotonic()
        while key:
            child, n = self._descend(node, key)
            if child is None:
                break
            child.last_access_time = now
            if child.value is None:
                child.value = value[:n].clone()
            else:
                prefix += n
            self._inc_hit_count(child)
            node, key, value = child, key[n:], value[n:]
        if key:
            new = TreeNode(key, node)
            new.value = value.clone()
            if self.storage_enabled:
                new.hash_value = hash_chain(key, self.page_size, node.last_hash())
            node.children[key[: self.page_size]] = new
            self._inc_hit_count(new)
        return prefix

    def _inc_hit_count(self, node: TreeNode) -> None:
        node.hit_count += 1
        if self.controller is None or self.write_policy == "write_back":
            return
        if not node.backuped and node.value is not None and node.hit_count >= self.write_through_threshold:
            self.write_backup(node)

    # --- device -> host ----------------------------------------------------------------------------------------------
    def write_backup(self, node: TreeNode, write_back: bool = False) -> int:
        """Start copying a node's device pages to host; returns tokens written (0 if the host is full)."""
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
        """Apply finished device->host copies, in order; chain a storage backup after each."""
        acks = self.controller.ack_write_queue
        done = 0
        for ack in acks:
            if block:
                ack.wait()
            elif not ack.done():
                break
            done += 1
        for ack in acks[:done]:
            ack.wait()  # raises if the copy failed: never serve a host copy that did not land
            for node_id in ack.node_ids:
                node = self.ongoing_write_through.pop(node_id, None)
                if node is None:
                    continue
                if node_id in self._write_locked:
                    self._write_locked.discard(node_id)
                    self.dec_lock_ref(node)
                if self.storage_enabled:
                    self.write_backup_storage(node)
        del acks[:done]

    def write_backup_storage(self, node: TreeNode) -> None:
        if not node.hash_value or node.host_value is None:
            return
        op_id = self.controller.write_storage(node.host_value, node.hash_value, node.id)
        self.ongoing_backup[op_id] = node
        node.protect_host()  # the backup thread reads these host pages

    # --- eviction ----------------------------------------------------------------------------------------------------
    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` device slots if possible: demote nodes with a host copy, drop the rest."""
        if self.controller is None:
            return self._evict_device_only(num_tokens)
        pending: set[int] = set()

        def device_leaf(n: TreeNode) -> bool:
            return all(c.value is None or c.id in pending for c in n.children.values())

        heap = [(self._evict_key(n), n.id, n) for n in self._nodes() if n.value is not None and device_leaf(n)]
        heapq.heapify(heap)
        evicted, written = 0, []
        while evicted < num_tokens and heap:
            _, _, x = heapq.heappop(heap)
            if x.lock_ref > 0 or x.value is None or x.id in pending:
                continue
            if x.backuped:
                evicted += self._evict_backuped(x)
            elif self.write_policy == "write_back" or x.children:
                # write_back copies on eviction; a node with host-only children must keep a host copy too
                n = self.write_backup(x, write_back=True)
                if n == 0:
                    continue
                pending.add(x.id)
                written.append(x)
                evicted += n
            else:
                evicted += self._evict_regular(x)
            p = x.parent
            if p is not self.root and p.value is not None and p.lock_ref == 0 and device_leaf(p):
                heapq.heappush(heap, (self._evict_key(p), p.id, p))
        if written:
            self.writing_check(block=True)
            for x in written:
                self._evict_backuped(x)
        return evicted

    def _evict_backuped(self, x: TreeNode) -> int:
        n = len(x.value)
        self.controller.evict_device(x.value)
        x.value = None
        self.metrics.record_evicted("device", n)
        return n

    def _evict_regular(self, x: TreeNode) -> int:
        n = len(x.value)
        self.device_pool.free(x.value)
        x.value = None
        self._delete_leaf(x)
        self.metrics.record_evicted("device", n)
        return n

    def _evict_device_only(self, num_tokens: int) -> int:
        heap = [(self._evict_key(n), n.id, n) for n in self._nodes() if not n.children]
        heapq.heapify(heap)
        evicted = 0
        while evicted < num_tokens and heap:
            _, _, x = heapq.heappop(heap)
            if x.lock_ref > 0:
                continue
            evicted += self._evict_regular(x)
            p = x.parent
            if p is not self.root and not p.children and p.lock_ref == 0:
                heapq.heappush(heap, (self._evict_key(p), p.id, p))
        return evicted

    def evict_host(self, num_tokens: int) -> int:
        """Free host pages of host-only leaves (never a device-resident node's copy, never a locked node's)."""
        def host_leaf(n: TreeNode) -> bool:
            return n.value is None and not n.children and n.host_ref == 0 and n.lock_ref == 0

        heap = [(self._evict_key(n), n.id, n) for n in self._nodes() if host_leaf(n)]
        heapq.heapify(heap)
        evicted = 0
        while evicted < num_tokens and heap:
            _, _, x = heapq.heappop(heap)
            n = len(x.host_value)
            self.controller.evict_host(x.host_value)
            x.host_value = None
            self._delete_leaf(x)
            self.metrics.record_evicted("host", n)
            evicted += n
            p = x.parent
            if p is not self.root and host_leaf(p):
                heapq.heappush(heap, (self._evict_key(p), p.id, p))
        return evicted

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
        if self.device_pool.available_size() < num_tokens and self.ongoing_write_through:
            # nodes whose host copy is in flight are locked: let the copies land, then they can be demoted
            self.writing_check(block=True)
            self.evict(num_tokens - self.device_pool.available_size())

    # --- host -> device ----------------------------------------------------------------------------------------------
    def load_back(self, node: TreeNode) -> Optional[torch.Tensor]:
        """Queue host->device for the evicted chain ending at ``node``; all or nothing."""
        chain, x = [], node
        while x.value is None:
            chain.append(x)
            x = x.parent
        if not chain:
            return None
        chain.reverse()
        host_indices = torch.cat([n.host_value for n in chain])
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
            n.value = device[offset : offset + len(n.host_value)]
            offset += len(n.host_value)
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
                last_node = last_node.parent
        return _EMPTY, last_node

    def ready_to_load_host_cache(self):
        """Start the queued loads; the device pool's layer waiter now follows this op."""
        return self.controller.start_loading() if self.controller else None

    def loading_check(self) -> None:
        acks = self.controller.ack_load_queue
        done = 0
        for ack in acks:
            if not ack.done():
                break
            done += 1
        for ack in acks[:done]:
            ack.wait()
            for node_id in ack.node_ids:
                node = self.ongoing_load_back.pop(node_id, None)
                if node is not None:
                    self.dec_lock_ref(node)
        del acks[:done]

    # --- storage -> host ---------------------------------------------------------------------------------------------
    def prefetch_from_storage(self, request_id: Any, anchor: TreeNode, new_tokens) -> bool:
        """Start fetching pages past the local hit (``anchor`` = match's last_node) from storage."""
        if not self.storage_enabled or request_id in self.ongoing_prefetch:
            return False
        n = self._page_align(len(new_tokens))
        ctrl = self.controller
        if n < ctrl.prefetch_threshold or ctrl.prefetch_rate_limited():
            return False
        self.inc_lock_ref(anchor)
        host = self.host_pool.alloc(n)
        if host is None:
            self.evict_host(n - self.host_pool.available_size())
            host = self.host_pool.alloc(n)
        if host is None:
            self.dec_lock_ref(anchor)
            return False
        tokens = list(new_tokens[:n])
        op = ctrl.prefetch(request_id, host, tokens, anchor.last_hash() if anchor is not self.root else None)
        self.ongoing_prefetch[request_id] = _Prefetch(anchor, tokens, op)
        ctrl.prefetch_tokens_occupied += n
        return True

    def can_terminate_prefetch(self, op: PrefetchOperation) -> bool:
        if op.revoked or op.io_done.is_set() or self.prefetch_policy == "best_effort":
            return True
        now = time.monotonic()
        if self.prefetch_policy == "wait_complete":
            if now - op.last_progress > self.prefetch_stall_limit:
                logger.warning("prefetch for %r made no progress for %.0f s: giving up on the rest", op.request_id,
                               now - op.last_progress)
                self.metrics.record_storage_error("prefetch_stalled")
                return True
            return False
        budget = self.prefetch_timeout_base + len(op.hash_value) * self.prefetch_timeout_per_page
        return now - op.start_time > budget

    def check_prefetch_progress(self, request_id: Any) -> bool:
        """True when the request may be scheduled: no prefetch, or it has ended and its pages joined the tree."""
        pf = self.ongoing_prefetch.get(request_id)
        if pf is None:
            return True
        if pf.op.revoked:
            self._end_prefetch(request_id, pf)
            self.metrics.add("prefetch_revoked", 1)
            return True
        if not self.can_terminate_prefetch(pf.op):
            return False
        completed, hashes = self.controller.terminate_prefetch(pf.op)
        if completed < len(pf.tokens) and not pf.op.io_done.is_set():
            self.metrics.add("prefetch_terminated_early", 1)
        if completed:
            host = pf.op.host_indices[:completed]
            matched = self._insert_host(pf.anchor, pf.tokens[:completed], host, hashes)
            if matched:
                self.host_pool.free(host[:matched])  # already in the tree: drop the duplicates
            self.metrics.add("prefetched_tokens", completed - matched)
        if not pf.op.io_done.is_set():
            self._detached.append(pf.op)  # its I/O thread still returns the pages past `completed`
        self._end_prefetch(request_id, pf)
        return True

    def _end_prefetch(self, request_id: Any, pf: _Prefetch) -> None:
        self.dec_lock_ref(pf.anchor)
        del self.ongoing_prefetch[request_id]
        self.controller.prefetch_tokens_occupied -= len(pf.tokens)

    def release_aborted_request(self, request_id: Any) -> None:
        """Stop a request's prefetch and hand its pages back."""
        pf = self.ongoing_prefetch.get(request_id)
        if pf is None:
            return
        completed = pf.op.mark_terminate()
        if completed and not pf.op.revoked:
            self.host_pool.free(pf.op.host_indices[:completed])  # the I/O thread returns the rest
        if not pf.op.io_done.is_set():
            self._detached.append(pf.op)
        self._end_prefetch(request_id, pf)

    def _insert_host(self, anchor: TreeNode, tokens, host_indices: torch.Tensor, hashes: list[str]) -> int:
        """Attach fetched pages below ``anchor`` as host-only nodes; return how many were already in the tree."""
        ps = self.page_size
        node, key, matched = anchor, tuple(tokens), 0
        while key:
            child, n = self._descend(node, key)
            if child is None:
                break
            node, key, matched = child, key[n:], matched + n
        if key:
            new = TreeNode(key, node)
            new.host_value = host_indices[matched:].clone()
            new.hash_value = list(hashes[matched // ps :])
            node.children[key[:ps]] = new
        return matched

    # --- events ------------------------------------------------------------------------------------------------------
    def poll(self) -> None:
        """Apply what background work finished: writes, loads, backups, revoked prefetches, returned pages."""
        if self.controller is None:
            return
        self.writing_check()
        self.loading_check()
        ctrl = self.controller
        while not ctrl.ack_backup_queue.empty():
            op = ctrl.ack_backup_queue.get_nowait()
            node = self.ongoing_backup.pop(op.id, None)
            if node is not None:
                node.release_host()
            self.metrics.add("backuped_tokens", op.completed_tokens)
        for rid in [r for r, pf in self.ongoing_prefetch.items() if pf.op.revoked]:
            self._end_prefetch(rid, self.ongoing_prefetch[rid])
            self.metrics.add("prefetch_revoked", 1)
        self._detached = [op for op in self._detached if not op.io_done.is_set()]
        ctrl.drain_release_queue()

    def flush(self, timeout: float = 60.0) -> None:
        """Wait for every copy and storage backup in flight, then apply them (tests, benchmarks, shutdown)."""
        if self.controller is None:
            return
        deadline = time.monotonic() + timeout
        self.controller.wait_transfers(timeout)
        for op in list(self._detached):
            op.io_done.wait(max(0.0, deadline - time.monotonic()))
        self.poll()
        while self.ongoing_backup or self.ongoing_write_through:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.ongoing_backup)} storage backups still running after {timeout} s")
            time.sleep(0.002)
            self.controller.wait_transfers(timeout)
            self.poll()

    def close(self) -> None:
        if self.controller is not None:
            for rid in list(self.ongoing_prefetch):
                self.release_aborted_request(rid)
            self.controller.close()

    # --- introspection -----------------------------------------------------------------------------------------------
    def total_size(self) -> tuple[int, int]:
        """(device tokens, host tokens) held by the tree."""
        d = h = 0
        for n in self._nodes():
            d += len(n.value) if n.value is not None else 0
            h += len(n.host_value) if n.host_value is not None else 0
        return d, h

    def pretty(self) -> str:
        lines = []

        def walk(n: TreeNode, depth: int) -> None:
            for c in n.children.values():
                lines.append("  " * depth + repr(c))
                walk(c, depth + 1)

        walk(self.root, 0)
        return "\n".join(lines)
