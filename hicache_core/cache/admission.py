"""What :meth:`~hicache_core.cache.hiradix.HiRadixCache.admit` answers for one request."""

from __future__ import annotations

from typing import Any, Optional

import attrs
import torch

from hicache_core.cache.node import TreeNode
from hicache_core.cache.radix import EMPTY

READY, WAIT, FULL = "ready", "wait", "full"


@attrs.define(eq=False)
class Admission:
    """What :meth:`HiRadixCache.admit` decided for one request.

    ``prefix`` holds the device slots of the cached prefix (tree-owned, pinned until release); ``own`` holds fresh
    slots for the tokens the engine computes (``len(tokens) - len(prefix) + extra_tokens``, page-rounded);
    ``cached`` splits the prefix by the tier it came from."""

    rid: Any
    status: str
    prefix: torch.Tensor = EMPTY
    own: torch.Tensor = EMPTY
    cached: dict[str, int] = attrs.field(factory=lambda: {"device": 0, "host": 0, "storage": 0})
    node: Optional[TreeNode] = None
    salt: Optional[str] = None  # the request's cache_salt
    extra_key: Optional[str] = None  # and extra_key: prefixes are shared only among requests with both the same
    seed: Optional[str] = None  # their namespace_seed (None: the shared, unseeded namespace)
    prefetch: Optional[str] = None  # how its storage prefetch ended (cache/prefetch.py's OUTCOMES); None: no storage

    @property
    def ready(self) -> bool:
        return self.status == READY

    def slots(self, computed: int) -> torch.Tensor:
        """Device slots of the first ``len(prefix) + computed`` tokens."""
        return torch.cat([self.prefix, self.own[:computed]])


def trim_tiers(tiers: dict[str, int], cut: int) -> None:
    """Take ``cut`` tokens off the deepest tiers first (storage pages sit past host pages past device pages)."""
    for tier in ("storage", "host", "device"):
        n = min(cut, tiers[tier])
        tiers[tier] -= n
        cut -= n
