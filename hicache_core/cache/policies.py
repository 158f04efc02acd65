"""Eviction order: the heap key of a node under each ``--radix-eviction-policy`` (smallest goes first)."""

from __future__ import annotations

from collections.abc import Callable

from hicache_core.cache.node import TreeNode

EVICTION_KEYS: dict[str, Callable[[TreeNode], tuple]] = {
    "lru": lambda n: (n.last_access_time,),
    "lfu": lambda n: (n.hit_count, n.last_access_time),
    "fifo": lambda n: (n.creation_time,),
}
