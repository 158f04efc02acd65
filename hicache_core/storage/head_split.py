"""Pages stored by KV head groups (``"head_group": N`` in the extra config), so servers at any TP size share them.

Without it, a tensor-parallel rank stores its own head shard of each page under a namespace that names its rank
and the TP size: a TP=1 server and a TP=2 server of the same model never read each other's pages. With it, each
page goes to the store as one object per group of ``N`` KV heads, keyed by the page key and the group's first global
head (``<page>.h<g>``), under a namespace that names the model's total KV heads and ``N`` but no rank. A rank holding
heads ``[first, first + local)`` writes and reads only its own groups: a TP=1 writer serves TP=2 readers (each takes
its half) and TP=2 writers serve a TP=1 reader (it takes both halves). A page counts as stored, found or read only
when every one of the rank's groups is; a group missing or of another length is a miss, never a partial page.

Any TP size whose ranks hold whole groups can read (``N`` divides the heads per rank). The cost is one object per
group instead of one per page, and a copy of each group between the host page and the object (``hicache bench
storage`` with ``"head_group"`` in its extra config measures it); it works through the backends' blob methods
(file, memory, mooncake), as the L3 codec does.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from hicache_core.errors import ConfigError
from hicache_core.storage.adapter import Delegate
from hicache_core.storage.base import ExtraInfo, call_with_extra


def check_head_group(group: int, local_heads: int, tp_size: Optional[int] = None) -> None:
    """ConfigError unless ``group`` KV heads per object tile this rank's ``local_heads``."""
    if group < 1 or local_heads % group:
        at = f" at --tp-size {tp_size}" if tp_size else ""
        raise ConfigError(
            f'"head_group": {group} must divide the KV heads each rank holds ({local_heads}{at}): '
            "a rank reads and writes whole groups; give a divisor, e.g. 1"
        )


class HeadSplitStorage(Delegate):
    """v1 on top of a backend's blob methods: one object per group of ``group`` KV heads of each page."""

    def __init__(self, inner: Any, first_head: int, group: int) -> None:
        super().__init__(inner)
        self.first, self.group = first_head, group
        self.objects = 0
        self.blob_bytes = 0

    def register_mem_pool_host(self, mem_pool_host) -> None:
        if not callable(getattr(mem_pool_host, "page_view", None)):
            raise ConfigError(
                f'"head_group" needs hicache\'s own host pool (one with page_view), not {type(mem_pool_host).__name__}'
            )
        super().register_mem_pool_host(mem_pool_host)
        heads = mem_pool_host.spec.head_num
        check_head_group(self.group, heads)
        self.objects = heads // self.group
        self.blob_bytes = mem_pool_host.page_bytes // self.objects

    def _keys(self, keys: list[str]) -> list[str]:
        return [f"{k}.h{self.first + j * self.group}" for k in keys for j in range(self.objects)]

    def _groups(self, host_indices) -> list[list[torch.Tensor]]:
        """Byte views into the host pool of each page's head groups, page by page."""
        pool, ps, g = self.mem_pool_host, self.mem_pool_host.page_size, self.group
        starts = (host_indices.tolist() if isinstance(host_indices, torch.Tensor) else list(host_indices))[::ps]
        out = []
        for start in starts:
            view = pool.page_view(int(start))  # (..., heads, head_dim) in the pool's page byte order
            out.append([view[..., j * g : (j + 1) * g, :].view(torch.uint8) for j in range(self.objects)])
        return out

    def batch_exists(self, keys: list[str], extra_info: Optional[ExtraInfo] = None) -> int:
        found = call_with_extra(self.inner.batch_exists, self._keys(keys), extra=extra_info)
        return int(found) // self.objects

    def batch_set_v1(self, keys, host_indices, extra_info: Optional[ExtraInfo] = None) -> list[bool]:
        blobs = [piece.contiguous().view(-1).numpy() for page in self._groups(host_indices) for piece in page]
        ok = call_with_extra(self.inner.batch_set_blobs, self._keys(keys), blobs, extra=extra_info)
        n = self.objects
        return [all(ok[i * n : (i + 1) * n]) for i in range(len(keys))]

    def batch_get_v1(self, keys, host_indices, extra_info: Optional[ExtraInfo] = None) -> list[bool]:
        names = self._keys(keys)
        blobs = call_with_extra(self.inner.batch_get_blobs, names, self.blob_bytes, extra=extra_info)
        if not isinstance(blobs, (list, tuple)) or len(blobs) != len(names):
            raise ValueError(f"batch_get_blobs returned {type(blobs).__name__} for {len(names)} keys")
        out, n = [], self.objects
        for i, page in enumerate(self._groups(host_indices)):
            got = blobs[i * n : (i + 1) * n]
            whole = all(b is not None and len(memoryview(b).cast("B")) == self.blob_bytes for b in got)
            if whole:
                for piece, blob in zip(page, got):
                    dst = piece.numpy()
                    np.copyto(dst, np.frombuffer(blob, np.uint8).reshape(dst.shape))
            out.append(whole)
        return out

    # v0 (flat pages): a head-split store has no whole-page objects to hand out
    def get(self, key: str, target_location=None):
        raise NotImplementedError('a "head_group" store keeps pages by head group: use the v1 calls')

    def set(self, key: str, value) -> bool:
        raise NotImplementedError('a "head_group" store keeps pages by head group: use the v1 calls')

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1
