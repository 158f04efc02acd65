"""A radix-tree node: one span of whole pages of token ids, with where its KV lives in each tier."""

from __future__ import annotations

import itertools
import time
from typing import Optional

import torch

_ids = itertools.count()


class TreeNode:
    """``value``: device slot indices (None once evicted from device); ``host_value``: host slot indices (None when
    not on host); ``hash_value``: one storage key per page (when storage is on). ``lock_ref`` pins the node and its
    ancestors in the tree and on device; ``host_ref`` keeps the host copy while a storage backup reads it."""

    __slots__ = (
        "children",
        "parent",
        "key",
        "value",
        "host_value",
        "hash_value",
        "lock_ref",
        "host_ref",
        "hit_count",
        "last_access_time",
        "creation_time",
        "id",
        "seed",
        "held_back",
    )

    def __init__(self, key: Optional[list] = None, parent: Optional[TreeNode] = None) -> None:
        self.children: dict[tuple, TreeNode] = {}
        self.parent = parent
        self.key: list = key if key is not None else []
        self.value: Optional[torch.Tensor] = None
        self.host_value: Optional[torch.Tensor] = None
        self.hash_value: Optional[list[str]] = None
        self.lock_ref = 0
        self.host_ref = 0
        self.hit_count = 0
        self.last_access_time = self.creation_time = time.monotonic()
        self.id = next(_ids)
        # set on a namespace's root (keys.namespace_seed of a cache_salt / extra_key): the empty node every prefix
        # of that namespace hangs from
        self.seed: Optional[str] = None
        # its host copy was kept out of storage by --hicache-storage-admission seen_twice: a second ask backs it up
        self.held_back = False

    @property
    def backuped(self) -> bool:
        return self.host_value is not None

    def protect_host(self) -> None:
        self.host_ref += 1

    def release_host(self) -> None:
        if self.host_ref <= 0:
            raise RuntimeError(f"host lock of node {self.id} released more often than taken")
        self.host_ref -= 1

    def last_hash(self) -> Optional[str]:
        return self.hash_value[-1] if self.hash_value else None

    def __repr__(self) -> str:
        tiers = ("D" if self.value is not None else "") + ("H" if self.host_value is not None else "")
        return (
            f"TreeNode(id={self.id}, len={len(self.key)}, {tiers or '-'}, lock={self.lock_ref}, "
            f"host_ref={self.host_ref})"
        )
