"""The radix tree over token ids and HiRadixCache, which spans device, host and storage."""

from hicache_core.cache.hiradix import LOAD_BACK_THRESHOLD, HiRadixCache, MatchResult
from hicache_core.cache.node import TreeNode

__all__ = ["LOAD_BACK_THRESHOLD", "HiRadixCache", "MatchResult", "TreeNode"]
