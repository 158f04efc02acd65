"""Storage -> host: prefetching a request's pages past its local hit.

Storage is asked first (the prefetch worker's ``batch_exists``); host pages are granted only for pages storage
holds; when the request may stop waiting (the controller's prefetch policy), what landed joins the tree as
host-only nodes. The policy decides; this part applies its decisions to the tree, agreed between ranks.

Each request's prefetch ends with one outcome (:data:`OUTCOMES`), which the request's admission carries and the
metrics count: ``hit`` (every page asked for came), ``partial``, ``miss`` (storage held none, or none came),
``skipped_cost`` (cost_aware: recomputing was expected to be faster), ``cut`` (cost_aware: stopped waiting once
recomputing would have been done), ``timed_out`` (the timeout policy, or a stall), ``below_threshold`` (fewer
pages than ``prefetch_threshold``, asked or found), ``no_host_room`` (the host tier, or the namespace's host quota,
had no room), ``rate_limited`` (prefetches in flight filled the policy's capacity), ``local`` (nothing past the
local hit to fetch), ``not_ready`` (best_effort: the request went on before any page had landed).
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import torch

from hicache_core.cache.agree import Solo
from hicache_core.cache.host_tier import HostTier
from hicache_core.cache.node import TreeNode
from hicache_core.cache.quota import HostQuota
from hicache_core.cache.radix import RadixTree
from hicache_core.controller import HiCacheController, StorageController
from hicache_core.controller.operations import PrefetchOperation
from hicache_core.events import CPU
from hicache_core.metrics import CacheMetrics

OUTCOMES = (
    "hit",
    "partial",
    "miss",
    "skipped_cost",
    "cut",
    "timed_out",
    "below_threshold",
    "no_host_room",
    "rate_limited",
    "local",
    "not_ready",
)


@attrs.define
class _Prefetch:
    anchor: TreeNode
    op: PrefetchOperation
    queried: bool = False  # storage has answered (on every rank), and op.hash_value holds the pages all found
    found: int = -1  # pages storage said it holds (every rank), before the host grant trimmed them


class StoragePrefetcher:
    """The prefetches in flight, one per request, while a storage tier is attached (``controller.io``)."""

    def __init__(
        self,
        tree: RadixTree,
        host: HostTier,
        controller: HiCacheController,
        metrics: CacheMetrics,
        agree: Solo,
        quota: HostQuota,
    ) -> None:
        self.tree, self.host, self.controller, self.metrics, self.agree, self.quota = (
            tree,
            host,
            controller,
            metrics,
            agree,
            quota,
        )
        self.page_size = tree.page_size
        self.ongoing: dict[Any, _Prefetch] = {}
        self.outcomes: dict[Any, str] = {}  # request -> how its prefetch ended, until its admission takes it

    def outcome(self, request_id: Any) -> Optional[str]:
        """How the request's prefetch ended (:data:`OUTCOMES`), once; None when none was tried."""
        return self.outcomes.pop(request_id, None)

    def _record(self, request_id: Any, outcome: str) -> None:
        self.outcomes[request_id] = outcome
        self.metrics.record_prefetch_outcome(outcome)

    @property
    def io(self) -> StorageController:
        assert self.controller.io is not None, "no storage tier is attached"
        return self.controller.io

    def _agree_queried(self, pfs: list[_Prefetch]) -> None:
        """Mark prefetches whose storage query has answered everywhere; keep the pages every rank found."""
        pending = [pf for pf in pfs if not pf.queried and not pf.op.granted and not pf.op.revoked]
        if not self.agree.active:
            for pf in pending:
                pf.queried = pf.op.queried.is_set()
            return
        local = [
            [int(pf.op.queried.is_set()), len(pf.op.hash_value) if pf.op.queried.is_set() else 0] for pf in pending
        ]
        agreed = self.agree.min([x for pair in local for x in pair])
        for i, pf in enumerate(pending):
            if agreed[2 * i]:
                pf.queried = True
                self.io.keep_hits(pf.op, agreed[2 * i + 1])

    # --- storage -> host ---------------------------------------------------------------------------------------------
    def start(self, request_id: Any, anchor: TreeNode, new_tokens, proactive: bool = False) -> bool:
        """Start fetching pages past the local hit (``anchor`` = match's last_node) from storage. Storage is asked
        first; host pages are taken only once it has said which pages it holds. ``proactive``: a restore ahead of
        its request (cache/restore.py), which nobody waits on: the cost_aware policy does not weigh it."""
        io = self.controller.io
        if io is None or request_id in self.ongoing:
            return False
        n = self.tree._page_align(len(new_tokens))
        if n == 0:
            self._record(request_id, "local")
            return False
        refused = io.policy.refuses(n)
        if refused:
            self._record(request_id, refused)
            return False
        if io.policy.cost_aware and not proactive and self.agree.all(io.policy.too_costly(n)):
            self.metrics.add("prefetch_skipped_cost", 1)  # recomputing is expected to be faster
            self._record(request_id, "skipped_cost")
            return False
        self.tree.inc_lock_ref(anchor)  # the anchor's hash chains the keys; it must stay in the tree
        prefix = self.tree.storage_keys_above(anchor) if io.config.pass_prefix_keys else None
        op = io.prefetch(request_id, list(new_tokens[:n]), anchor.last_hash(), prefix)
        self.ongoing[request_id] = _Prefetch(anchor, op)
        return True

    def _grant(self, pf: _Prefetch) -> None:
        """Host pages for a queried prefetch's hits. Host pages are evicted only for pages storage has, and only
        when that makes room; otherwise the prefetch takes what fits, or is revoked. A namespace past its host
        quota takes only what the quota leaves (cache/quota.py)."""
        op, io, pool = pf.op, self.io, self.host.pool
        threshold = io.policy.threshold
        pf.found = len(op.hash_value)
        want = self.quota.room(pf.anchor, len(op.hash_value) * self.page_size)
        if self.agree.active:  # decided on what every rank has room for: the same grant everywhere
            avail = self.host.room(want) if want >= threshold else 0
            take = want if avail >= want else self.tree._page_align(avail)
            host = pool.alloc(take) if take >= threshold else None
        else:
            host = pool.alloc(want) if want >= threshold else None
        if host is None and want >= threshold and not self.agree.active:
            short = want - pool.available_size()
            if self.host.evictable() >= short:
                self.host.evict(short)
                host = pool.alloc(want)
            fit = self.tree._page_align(pool.available_size())
            if host is None and fit >= threshold:
                host = pool.alloc(fit)
        if host is None:
            io.revoke_prefetch(op)
            return
        io.grant_prefetch(op, host)

    def check(self, request_id: Any, complete: bool = False) -> bool:
        """True when the request may be scheduled: no prefetch, or it has ended and its pages joined the tree.
        ``complete``: wait for every page whatever the policy says (a restore)."""
        pf = self.ongoing.get(request_id)
        if pf is None:
            return True
        op, io = pf.op, self.io
        if complete:
            why, cut = ("done" if op.io_done.is_set() else None), False
        else:
            why = io.prefetch_may_stop(op)
            cut = why is None and io.policy.cut(op, pf.queried)
        stop = self.agree.all(why is not None or cut)
        if not stop and not op.granted and not op.revoked:
            self._agree_queried([pf])
            if pf.queried:
                self._grant(pf)
        if op.revoked:
            self._end_revoked(request_id, pf)
            return True
        if not stop:
            return False
        if cut and not op.io_done.is_set():
            self.metrics.add("prefetch_cut_cost", 1)
        completed, hashes = io.terminate_prefetch(op)
        pool = self.host.pool
        if self.agree.active:  # every rank keeps what every rank fetched; a rank that fetched more frees the rest
            agreed = self.agree.min([completed])[0]
            if agreed < completed and op.host_indices is not None:
                pool.free(op.host_indices[agreed:completed])
            completed, hashes = agreed, hashes[: agreed // self.page_size]
        if op.host_indices is not None:
            if completed < len(op.host_indices) and not op.io_done.is_set():
                self.metrics.add("prefetch_terminated_early", 1)
            if completed:
                host = op.host_indices[:completed]
                matched = self._insert_host(pf.anchor, op.token_ids[:completed], host, hashes)
                if matched:
                    pool.free(host[:matched])  # already in the tree: drop the duplicates
                self.metrics.add("prefetched_tokens", completed - matched)
        if cut:
            outcome = "cut"
        elif why in ("timeout", "stalled") and not op.io_done.is_set():
            outcome = "timed_out"
        elif completed == 0 and not op.io_done.is_set():
            outcome = "not_ready"  # best_effort: the request went on before any page had landed
        elif completed == 0:
            outcome = "miss"
        else:
            outcome = "hit" if completed >= len(op.token_ids) else "partial"
        self._record(request_id, outcome)
        self._end(request_id, pf)
        return True

    def advance(self) -> None:
        """Grant host pages to prefetches whose storage query finished; end the revoked ones."""
        self._agree_queried(list(self.ongoing.values()))
        for rid, pf in list(self.ongoing.items()):
            if not pf.op.granted and not pf.op.revoked and pf.queried:
                self._grant(pf)
            if pf.op.revoked:
                self._end_revoked(rid, pf)

    def _end_revoked(self, request_id: Any, pf: _Prefetch) -> None:
        """No host page was ever granted: storage held none, fewer than the threshold, or the host had no room."""
        self._end(request_id, pf)
        self.metrics.add("prefetch_revoked", 1)
        if pf.found <= 0:
            outcome = "miss"
        elif pf.found * self.page_size < self.io.policy.threshold:
            outcome = "below_threshold"
        else:
            outcome = "no_host_room"
        self._record(request_id, outcome)

    def _end(self, request_id: Any, pf: _Prefetch) -> None:
        self.tree.dec_lock_ref(pf.anchor)
        del self.ongoing[request_id]
        self.io.end_prefetch(pf.op)

    def abort(self, request_id: Any) -> None:
        """Stop a request's prefetch and hand its pages back."""
        self.outcomes.pop(request_id, None)
        pf = self.ongoing.get(request_id)
        if pf is None:
            return
        completed = self.io.abort_prefetch(pf.op)
        if completed and pf.op.host_indices is not None:
            self.host.pool.free(pf.op.host_indices[:completed])  # the worker returns the rest
        self._end(request_id, pf)

    def _insert_host(self, anchor: TreeNode, tokens, host_indices: torch.Tensor, hashes: list[str]) -> int:
        """Attach fetched pages below ``anchor`` as host-only nodes; return how many were already in the tree."""
        tree = self.tree
        node, key, matched = anchor, list(tokens), 0
        while matched < len(key):
            child, n = tree._descend(node, key, matched)
            if child is None:
                break
            node, matched = child, matched + n
        if matched < len(key):
            new = tree._attach(node, key[matched:])
            new.host_value = host_indices[matched:].clone()
            new.hash_value = list(hashes[matched // self.page_size :])
            tree.announce(new, CPU)
        return matched
