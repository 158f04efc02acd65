"""Per-namespace host quota: a ``cache_salt`` / ``extra_key`` namespace holds at most ``--hicache-salt-host-pages``
host pages, so one tenant cannot flush every other tenant's prefixes out of the host tier. When a namespace wants
more, its own least recently used host-only pages go first; when they cannot (its pages back device-resident
prefixes), its new pages are not kept on host -- nobody else's are evicted for it. The unseeded, shared namespace
is not capped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

from hicache_core.cache.node import TreeNode
from hicache_core.cache.radix import RadixTree


class HostQuota:
    def __init__(self, tree: RadixTree, cap_pages: int, page_size: int) -> None:
        self.tree, self.cap, self.page_size = tree, cap_pages * page_size, page_size

    def namespace_of(self, node: TreeNode) -> Optional[TreeNode]:
        """The namespace root ``node`` hangs from (None: the shared namespace)."""
        while node.parent is not None and node.parent is not self.tree.root:
            node = node.parent
        return node if node.seed is not None else None

    @staticmethod
    def _subtree(ns: TreeNode) -> Iterator[TreeNode]:
        stack = list(ns.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def used(self, ns: TreeNode) -> int:
        """Host tokens the namespace holds."""
        return sum(len(n.host_value) for n in self._subtree(ns) if n.host_value is not None)

    def room(self, node: TreeNode, want: int) -> int:
        """How many of ``want`` host tokens ``node``'s namespace may take now (whole pages), after evicting its own
        host-only leaves toward its cap."""
        ns = self.namespace_of(node) if self.cap else None
        if ns is None:
            return want
        over = self.used(ns) + want - self.cap
        if over > 0:
            tree = self.tree
            tree.evict_leaves(over, tree.host_leaf, tree.drop_host_leaf, nodes=self._subtree(ns))
            over = self.used(ns) + want - self.cap
        allowed = want - max(0, over)
        return max(0, allowed - allowed % self.page_size)
