"""Pure radix mechanics over token ids at page granularity: walk, split, insert, lock, and one eviction helper.

Nothing here knows about tiers, storage or threads. :class:`RadixTree` is SGLang's device-only RadixAttention
cache; :class:`~hicache_core.cache.hiradix.HiRadixCache` owns one and lets its tiers listen to it (``on_hit``,
``on_new``, ``on_evicted``).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterator
from typing import Any, Optional

import attrs
import torch

from hicache_core.cache.node import TreeNode
from hicache_core.cache.policies import EVICTION_KEYS
from hicache_core.events import CPU, GPU, KVEvents

EMPTY = torch.empty(0, dtype=torch.int64)


def _ignore(node: TreeNode) -> None:
    pass


@attrs.frozen
class MatchResult:
    device_indices: torch.Tensor  # device slots of the device-resident part (may be the tree's own: read only)
    last_device_node: TreeNode  # deepest node whose KV is on device
    last_node: TreeNode  # deepest matched node (device or host-only): the anchor for prefetch and load back
    host_hit_length: int  # tokens past the device part that are on host only

    @property
    def matched_length(self) -> int:
        return len(self.device_indices) + self.host_hit_length


class RadixTree:
    """Keys are whole pages of token ids; ``node.value`` holds device slots (None once demoted off device)."""

    def __init__(self, device_pool, page_size: int, eviction_policy: str = "lru", host_pool: Any = None) -> None:
        self.device_pool = device_pool
        self.host_pool = host_pool  # where host_value slots go back when a host-only leaf is dropped
        self.page_size = page_size
        self._evict_key = EVICTION_KEYS[eviction_policy]
        self.on_hit: Callable[[TreeNode], None] = _ignore  # a node was inserted (again): write policies count hits
        self.on_new: Callable[[TreeNode], None] = _ignore  # a node was just made by insert (its storage keys)
        # a node was cut in two (upper, the rest): a tier whose work on the node is in flight covers the upper too
        self.on_split: Callable[[TreeNode, TreeNode], None] = lambda upper, child: None
        self.on_evicted: Callable[[str, int], None] = lambda tier, tokens: None  # metrics
        self.events: Optional[KVEvents] = None  # what each tier holds, for routers (hicache_core/events)
        # node id -> eviction rank of retained nodes (cache/retention.py): rank 0 (unretained) goes first
        self.retained: Callable[[], dict[int, int]] = dict
        self.reset()

    def reset(self) -> None:
        self.root = TreeNode()
        self.root.value = EMPTY
        self.root.host_value = EMPTY
        self.root.hash_value = []
        self.root.lock_ref = 1

    # --- namespaces: one subtree per cache_salt / extra_key, so requests of different ones share no node --------
    def namespace_root(self, seed: Optional[str]) -> TreeNode:
        """Where the prefixes of the namespace ``seed`` (:func:`~hicache_core.keys.namespace_seed`) start: the
        root for none, else an empty node under the root (made on first use) whose hash is the seed, so the
        namespace's storage keys chain on it. It holds a lock of its own and goes when its last child does."""
        if seed is None:
            return self.root
        node = self.root.children.get(("ns", seed))
        if node is None:
            node = TreeNode([], self.root)
            node.seed, node.value, node.host_value = seed, EMPTY, EMPTY
            node.hash_value, node.lock_ref = [seed], 1
            self.root.children[("ns", seed)] = node
        return node

    # --- walking -----------------------------------------------------------------------------------------------------
    def _page_align(self, n: int) -> int:
        return n - n % self.page_size

    def _match_len(self, a: list, b: list) -> int:
        """Length of the common prefix of two keys, in whole pages. One C-level comparison when they agree (the
        common case on a hit); else a binary search over pages for the first that differs."""
        ps = self.page_size
        n = min(len(a), len(b))
        n -= n % ps
        if a[:n] == b[:n]:
            return n
        lo, hi = 0, n // ps  # the first lo pages agree; a page before hi differs
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if a[lo * ps : mid * ps] == b[lo * ps : mid * ps]:
                lo = mid
            else:
                hi = mid
        return lo * ps

    def _descend(self, node: TreeNode, key: list, at: int = 0) -> tuple[Optional[TreeNode], int]:
        """The child of ``node`` that shares whole leading pages with ``key[at:]`` (split so it ends at the shared
        part), and how many tokens they share; (None, 0) when no child starts with that page."""
        ps = self.page_size
        child = node.children.get(tuple(key[at : at + ps]))
        if child is None:
            return None, 0
        m = len(child.key)
        part = key[at : at + m] if at or m < len(key) else key
        if part == child.key:  # the whole node matches: one comparison
            return child, m
        n = self._match_len(child.key, part)
        if n < m:
            child = self._split(child, n)
        return child, n

    def _split(self, child: TreeNode, split_len: int) -> TreeNode:
        """Cut ``child`` after ``split_len`` tokens; return the new upper node."""
        ps = self.page_size
        upper = TreeNode(child.key[:split_len], child.parent)
        upper.lock_ref = child.lock_ref
        upper.hit_count = child.hit_count
        upper.held_back = child.held_back
        upper.last_access_time = child.last_access_time
        upper.creation_time = child.creation_time
        if child.value is not None:
            upper.value, child.value = child.value[:split_len], child.value[split_len:]
        if child.host_value is not None:
            upper.host_value, child.host_value = child.host_value[:split_len], child.host_value[split_len:]
        if child.hash_value is not None:
            upper.hash_value, child.hash_value = (
                child.hash_value[: split_len // ps],
                child.hash_value[split_len // ps :],
            )
        child.key = child.key[split_len:]
        child.parent = upper
        assert upper.parent is not None
        upper.children[tuple(child.key[:ps])] = child
        upper.parent.children[tuple(upper.key[:ps])] = upper
        self.on_split(upper, child)
        return upper

    def _attach(self, parent: TreeNode, key: list) -> TreeNode:
        node = TreeNode(key, parent)
        parent.children[tuple(key[: self.page_size])] = node
        return node

    def _delete_leaf(self, node: TreeNode) -> None:
        parent = node.parent
        assert parent is not None
        del parent.children[tuple(node.key[: self.page_size])]
        if parent.seed is not None:
            self._drop_idle_namespace(parent)

    def _drop_idle_namespace(self, node: TreeNode) -> None:
        """A namespace root with no prefix left and nobody anchored on it (its own lock only) leaves the tree."""
        if not node.children and node.lock_ref == 1 and self.root.children.get(("ns", node.seed)) is node:
            del self.root.children[("ns", node.seed)]

    def drop_idle_namespaces(self) -> None:
        """Sweep namespace roots a request matched under but never filled (it was aborted or found no room)."""
        for node in [n for n in self.root.children.values() if n.seed is not None]:
            self._drop_idle_namespace(node)

    def nodes(self) -> Iterator[TreeNode]:
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    # --- locks -------------------------------------------------------------------------------------------------------
    def inc_lock_ref(self, node: TreeNode) -> None:
        """Pin ``node`` and its ancestors: in the tree, and on device while they are there."""
        while node is not self.root:
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref <= 0:
                raise RuntimeError(f"lock of {node} released more often than taken")
            node.lock_ref -= 1
            node = node.parent  # type: ignore[assignment]

    # --- match / insert ----------------------------------------------------------------------------------------------
    def match_prefix(self, tokens, seed: Optional[str] = None) -> MatchResult:
        """The longest cached prefix of ``tokens`` (whole pages) in the namespace ``seed``: device slots, then
        the host-only length."""
        n_all = self._page_align(len(tokens))
        key = tokens if type(tokens) is list else list(tokens)  # compared in slices, never stored
        node, values, now, at = self.namespace_root(seed), [], time.monotonic(), 0
        while at < n_all:
            child, n = self._descend(node, key, at)
            if child is None:
                break
            child.last_access_time = now
            if child.value is not None:
                values.append(child.value)
            node, at = child, at + n
        last_node, host_hit, x = node, 0, node
        while x.value is None:
            assert x.host_value is not None and x.parent is not None
            host_hit += len(x.host_value)
            x = x.parent
        device = (values[0] if len(values) == 1 else torch.cat(values)) if values else EMPTY
        return MatchResult(device, x, last_node, host_hit)

    def insert(self, tokens, device_indices: torch.Tensor, seed: Optional[str] = None) -> int:
        """Insert a computed sequence (in the namespace ``seed``); return how many leading tokens were already on
        device (the caller frees its own copies of those beyond what it matched). Demoted nodes on the path take
        the new device slots."""
        n_all = self._page_align(len(tokens))
        key = tokens if type(tokens) is list else list(tokens)  # a node keeps a slice (a copy), never this
        node, prefix, now, at = self.namespace_root(seed), 0, time.monotonic(), 0
        while at < n_all:
            child, n = self._descend(node, key, at)
            if child is None:
                break
            child.last_access_time = now
            if child.value is None:
                child.value = device_indices[at : at + n].clone()
                self.announce(child, GPU)
            else:
                prefix += n
            child.hit_count += 1
            self.on_hit(child)
            node, at = child, at + n
        if at < n_all:
            new = self._attach(node, key[at:n_all])
            new.value = device_indices[at:n_all].clone()
            self.on_new(new)
            self.announce(new, GPU)
            new.hit_count += 1
            self.on_hit(new)
        return prefix

    # --- eviction ----------------------------------------------------------------------------------------------------
    def evict_leaves(
        self,
        num_tokens: int,
        candidate: Callable[[TreeNode], bool],
        evict_one: Callable[[TreeNode], int],
        nodes: Optional[Iterator[TreeNode]] = None,
    ) -> int:
        """The one eviction loop: pop ``candidate`` nodes (checked again when popped) in eviction-policy order and
        ``evict_one`` each (returns tokens freed) until ``num_tokens`` are freed; a parent that becomes a
        candidate joins the heap. ``nodes``: where to look (default: the whole tree)."""
        rank = self.retained()
        key = self._evict_key if not rank else lambda n: (rank.get(n.id, 0), self._evict_key(n))
        heap = [(key(n), n.id, n) for n in (self.nodes() if nodes is None else nodes) if candidate(n)]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, x = heapq.heappop(heap)
            if not candidate(x):
                continue
            freed += evict_one(x)
            p = x.parent
            if p is not None and p is not self.root and candidate(p):
                heapq.heappush(heap, (key(p), p.id, p))
        self.drop_idle_namespaces()
        return freed

    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` device slots if possible, dropping unlocked leaves."""
        return self.evict_leaves(
            num_tokens, lambda n: not n.children and n.lock_ref == 0, lambda x: self._drop_leaf(x, "device")
        )

    def _drop_leaf(self, x: TreeNode, tier: str) -> int:
        """Free a leaf's slots in ``tier`` (``device``: its value; ``host``: its host value) and delete it."""
        attr, pool = ("value", self.device_pool) if tier == "device" else ("host_value", self.host_pool)
        idx = getattr(x, attr)
        assert idx is not None and pool is not None
        pool.free(idx)
        setattr(x, attr, None)
        self.withdraw(x, GPU if tier == "device" else CPU, "evicted")
        self._delete_leaf(x)
        self.on_evicted(tier, len(idx))
        return len(idx)

    @staticmethod
    def host_leaf(n: TreeNode) -> bool:
        """A host-only leaf nobody holds: its host pages may go."""
        return n.value is None and not n.children and n.host_ref == 0 and n.lock_ref == 0

    def drop_host_leaf(self, x: TreeNode) -> int:
        return self._drop_leaf(x, "host")

    def storage_keys_above(self, node: Optional[TreeNode]) -> list[str]:
        """The storage keys of every page from the namespace's root down to ``node`` (a namespace's seed is no
        page)."""
        chain: list[list[str]] = []
        while node is not None and node is not self.root and node.seed is None:
            chain.append(node.hash_value or [])
            node = node.parent
        return [k for keys in reversed(chain) for k in keys]

    # --- events -----------------------------------------------------------------------------------------------------
    def seed_of(self, node: TreeNode) -> Optional[str]:
        """The namespace seed ``node`` lives under (None for the unseeded prefixes)."""
        while node.parent is not None and node.parent is not self.root:
            node = node.parent
        return node.seed

    def announce(self, node: TreeNode, medium: str) -> None:
        """Tell event subscribers that ``node``'s pages are now in ``medium``."""
        ev = self.events
        if ev is not None and ev.active and node.hash_value and node.parent is not None:
            ev.stored(node.hash_value, node.parent.last_hash(), node.key, medium, self.seed_of(node))

    def withdraw(self, node: TreeNode, medium: str, reason: str) -> None:
        ev = self.events
        if ev is not None and ev.active and node.hash_value:
            ev.removed(node.hash_value, medium, reason)

    # --- introspection -----------------------------------------------------------------------------------------------
    def total_size(self) -> tuple[int, int]:
        """(device tokens, host tokens) held by the tree."""
        d = h = 0
        for n in self.nodes():
            d += len(n.value) if n.value is not None else 0
            h += len(n.host_value) if n.host_value is not None else 0
        return d, h

    def pretty(self) -> str:
        lines: list[str] = []

        def walk(n: TreeNode, depth: int) -> None:
            for c in n.children.values():
                lines.append("  " * depth + repr(c))
                walk(c, depth + 1)

        walk(self.root, 0)
        return "\n".join(lines)
