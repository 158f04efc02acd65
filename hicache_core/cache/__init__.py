"""The radix tree over token ids (``radix``), its tiers (``tiers``), and HiRadixCache with the front door
engines call (``hiradix``); :func:`build_cache` makes one from a config."""

from hicache_core.cache.build import build_cache
from hicache_core.cache.hiradix import LOAD_BACK_THRESHOLD, Admission, HiRadixCache
from hicache_core.cache.node import TreeNode
from hicache_core.cache.none import NoPrefixCache
from hicache_core.cache.radix import MatchResult, RadixTree

__all__ = [
    "LOAD_BACK_THRESHOLD",
    "Admission",
    "HiRadixCache",
    "MatchResult",
    "NoPrefixCache",
    "RadixTree",
    "TreeNode",
    "build_cache",
]
