"""Storage -> host: prefetching a request's pages past its local hit, as part of :class:`TieredCache`.

Storage is asked first (the prefetch worker's ``batch_exists``); host pages are granted only for pages storage
holds; when the request may stop waiting (the prefetch policy), what landed joins the tree as host-only nodes.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import attrs
import torch

from hicache_core.cache.agree import Solo
from hicache_core.cache.cost import PrefetchCost
from hicache_core.cache.node import TreeNode
from hicache_core.cache.quota import HostQuota
from hicache_core.cache.radix import RadixTree
from hicache_core.config import HiCacheConfig
from hicache_core.controller import HiCacheController
from hicache_core.metrics import CacheMetrics
from hicache_core.operations import PrefetchOperation


@attrs.define
class _Prefetch:
    anchor: TreeNode
    op: PrefetchOperation
    queried: bool = False  # storage has answered (on every rank), and op.hash_value holds the pages all found


class StoragePrefetch(RadixTree):
    """The prefetch half of :class:`~hicache_core.cache.tiers.TieredCache`, which sets these up."""

    config: HiCacheConfig
    controller: Optional[HiCacheController]
    host_pool: Any
    metrics: CacheMetrics
    storage_enabled: bool
    ongoing_prefetch: dict[Any, _Prefetch]
    agree: Solo
    cost: PrefetchCost
    quota: HostQuota

    def record_prefill(self, tokens: int, seconds: float) -> None:
        """The engine computed ``tokens`` prompt tokens in ``seconds`` (one forward pass): what the ``cost_aware``
        prefetch policy weighs a storage load against."""
        self.cost.record_prefill(tokens, seconds)

    def _host_room(self, want: int) -> int:
        """Free host tokens on every rank after evicting host-only pages toward ``want`` (the same on every rank,
        though pages come back from worker threads at different times on each)."""
        avail = self.agree.min([self.host_pool.available_size()])[0]
        if avail < want and self.host_evictable() >= want - avail:
            avail += self.evict_host(want - avail)
        return avail

    def _agree_queried(self, pfs: list[_Prefetch]) -> None:
        """Mark prefetches whose storage query has answered everywhere; keep the pages every rank found."""
        pending = [pf for pf in pfs if not pf.queried and not pf.op.granted and not pf.op.revoked]
        if not self.agree.active:
            for pf in pending:
                pf.queried = pf.op.queried.is_set()
            return
        local = [[int(pf.op.queried.is_set()), len(pf.op.hash_value) if pf.op.queried.is_set() else 0] for pf in pending]
        agreed = self.agree.min([x for pair in local for x in pair])
        for i, pf in enumerate(pending):
            if agreed[2 * i]:
                pf.queried = True
                pf.op.hash_value = pf.op.hash_value[: agreed[2 * i + 1]]

    def evict_host(self, num_tokens: int) -> int:
        """Free host pages of host-only leaves (never a device-resident node's copy, never a locked node's)."""
        return self.evict_leaves(num_tokens, self._host_leaf, lambda x: self._drop_leaf(x, "host"))

    @staticmethod
    def _host_leaf(n: TreeNode) -> bool:
        return n.value is None and not n.children and n.host_ref == 0 and n.lock_ref == 0

    # --- storage -> host ---------------------------------------------------------------------------------------------
    def prefetch_from_storage(self, request_id: Any, anchor: TreeNode, new_tokens) -> bool:
        """Start fetching pages past the local hit (``anchor`` = match's last_node) from storage. Storage is asked
        first; host pages are taken only once it has said which pages it holds."""
        ctrl = self.controller
        if not self.storage_enabled or ctrl is None or request_id in self.ongoing_prefetch:
            return False
        n = self._page_align(len(new_tokens))
        if n < ctrl.prefetch_threshold or ctrl.prefetch_rate_limited():
            return False
        if self.config.hicache_storage_prefetch_policy == "cost_aware" and self.agree.all(self.cost.skip(n)):
            self.metrics.add("prefetch_skipped_cost", 1)  # recomputing is expected to be faster
            return False
        self.inc_lock_ref(anchor)  # the anchor's hash chains the keys; it must stay in the tree
        op = ctrl.prefetch(request_id, list(new_tokens[:n]), anchor.last_hash(), self._prefix_keys(anchor))
        self.ongoing_prefetch[request_id] = _Prefetch(anchor, op)
        return True

    def _grant(self, pf: _Prefetch) -> None:
        """Host pages for a queried prefetch's hits. Host pages are evicted only for pages storage has, and only
        when that makes room; otherwise the prefetch takes what fits, or is revoked. A namespace past its host
        quota takes only what the quota leaves (cache/quota.py)."""
        assert self.controller is not None and self.host_pool is not None
        op = pf.op
        threshold = self.controller.prefetch_threshold
        want = self.quota.room(pf.anchor, len(op.hash_value) * self.page_size)
        if self.agree.active:  # decided on what every rank has room for: the same grant everywhere
            avail = self._host_room(want) if want >= threshold else 0
            take = want if avail >= want else self._page_align(avail)
            host = self.host_pool.alloc(take) if take >= threshold else None
        else:
            host = self.host_pool.alloc(want) if want >= threshold else None
        if host is None and want >= threshold and not self.agree.active:
            short = want - self.host_pool.available_size()
            if self.host_evictable() >= short:
                self.evict_host(short)
                host = self.host_pool.alloc(want)
            fit = self._page_align(self.host_pool.available_size())
            if host is None and fit >= threshold:
                host = self.host_pool.alloc(fit)
        if host is None:
            op.revoked = True
            return
        self.controller.grant_prefetch(op, host)

    def host_evictable(self) -> int:
        """Host tokens :meth:`evict_host` could free now (whole unlocked host-only subtrees)."""
        ok: dict[int, bool] = {}
        total = 0
        for n in reversed(list(self.nodes())):  # children before parents
            e = n.value is None and n.lock_ref == 0 and n.host_ref == 0 and all(ok[c.id] for c in n.children.values())
            ok[n.id] = e
            if e and n.host_value is not None:
                total += len(n.host_value)
        return total

    def check_prefetch_progress(self, request_id: Any) -> bool:
        """True when the request may be scheduled: no prefetch, or it has ended and its pages joined the tree."""
        pf = self.ongoing_prefetch.get(request_id)
        if pf is None:
            return True
        op, ctrl = pf.op, self.controller
        assert ctrl is not None
        may_stop = ctrl.prefetch_may_stop(op)
        cut = False
        if not may_stop and self.config.hicache_storage_prefetch_policy == "cost_aware":
            tokens = len(op.hash_value) * self.page_size if pf.queried else len(op.token_ids)
            cut = self.cost.cut(tokens, time.monotonic() - op.start_time)
        stop = self.agree.all(may_stop or cut)
        if not stop and not op.granted and not op.revoked:
            self._agree_queried([pf])
            if pf.queried:
                self._grant(pf)
        if op.revoked:
            self._end_prefetch(request_id, pf)
            self.metrics.add("prefetch_revoked", 1)
            return True
        if not stop:
            return False
        if cut and not op.io_done.is_set():
            self.metrics.add("prefetch_cut_cost", 1)
        if op.io_done.is_set() and op.host_indices is not None and op.completed_tokens == len(op.host_indices):
            self.cost.record_load(op.completed_tokens, op.last_progress - op.start_time)
        completed, hashes = ctrl.terminate_prefetch(op)
        if self.agree.active:  # every rank keeps what every rank fetched; a rank that fetched more frees the rest
            agreed = self.agree.min([completed])[0]
            if agreed < completed and op.host_indices is not None:
                self.host_pool.free(op.host_indices[agreed:completed])
            completed, hashes = agreed, hashes[: agreed // self.page_size]
        if op.host_indices is not None:
            if completed < len(op.host_indices) and not op.io_done.is_set():
                self.metrics.add("prefetch_terminated_early", 1)
            if completed:
                host = op.host_indices[:completed]
                matched = self._insert_host(pf.anchor, op.token_ids[:completed], host, hashes)
                if matched:
                    self.host_pool.free(host[:matched])  # already in the tree: drop the duplicates
                self.metrics.add("prefetched_tokens", completed - matched)
        self._end_prefetch(request_id, pf)
        return True

    def _advance_prefetches(self) -> None:
        """Grant host pages to prefetches whose storage query finished; end the revoked ones."""
        self._agree_queried(list(self.ongoing_prefetch.values()))
        for rid, pf in list(self.ongoing_prefetch.items()):
            if not pf.op.granted and not pf.op.revoked and pf.queried:
                self._grant(pf)
            if pf.op.revoked:
                self._end_prefetch(rid, pf)
                self.metrics.add("prefetch_revoked", 1)

    def _end_prefetch(self, request_id: Any, pf: _Prefetch) -> None:
        assert self.controller is not None
        self.dec_lock_ref(pf.anchor)
        del self.ongoing_prefetch[request_id]
        self.controller.end_prefetch(pf.op)

    def release_aborted_request(self, request_id: Any) -> None:
        """Stop a request's prefetch and hand its pages back."""
        pf = self.ongoing_prefetch.get(request_id)
        if pf is None:
            return
        completed = pf.op.mark_terminate()
        if completed and pf.op.host_indices is not None:
            assert self.host_pool is not None
            self.host_pool.free(pf.op.host_indices[:completed])  # the worker returns the rest
        self._end_prefetch(request_id, pf)

    def _insert_host(self, anchor: TreeNode, tokens, host_indices: torch.Tensor, hashes: list[str]) -> int:
        """Attach fetched pages below ``anchor`` as host-only nodes; return how many were already in the tree."""
        node, key, matched = anchor, list(tokens), 0
        while matched < len(key):
            child, n = self._descend(node, key, matched)
            if child is None:
                break
            node, matched = child, matched + n
        if matched < len(key):
            new = self._attach(node, key[matched:])
            new.host_value = host_indices[matched:].clone()
            new.hash_value = list(hashes[matched // self.page_size :])
        return matched

    def _prefix_keys(self, node: Optional[TreeNode]) -> Optional[list[str]]:
        """The storage keys from the root down to ``node`` (hicache_storage_pass_prefix_keys), else None."""
        if not self.config.pass_prefix_keys:
            return None
        chain: list[list[str]] = []
        while node is not None and node is not self.root and node.seed is None:  # a namespace's seed is no page
            chain.append(node.hash_value or [])
            node = node.parent
        return [k for keys in reversed(chain) for k in keys]
