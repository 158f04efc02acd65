"""Page-granular slot allocator shared by the device and host pools.

Allocation and free are in whole pages from an aligned range, so every ``page_size`` run of allocated token
indices is one contiguous, page-aligned slot range: storage I/O and run coalescing rely on it.
"""

from __future__ import annotations

from typing import Optional

import torch


class PageAllocator:
    """Hands out token indices in whole pages; catches double frees and foreign indices."""

    def __init__(self, num_tokens: int, page_size: int) -> None:
        if num_tokens % page_size:
            raise ValueError(f"pool size {num_tokens} is not a multiple of page_size {page_size}")
        self.page_size = page_size
        self.num_pages = num_tokens // page_size
        self._in_use = torch.zeros(self.num_pages, dtype=torch.bool)
        self.clear()

    def clear(self) -> None:
        self._free_pages = torch.arange(self.num_pages, dtype=torch.int64)
        self._in_use.zero_()

    @property
    def size(self) -> int:
        return self.num_pages * self.page_size

    def available_size(self) -> int:
        """Free token slots."""
        return len(self._free_pages) * self.page_size

    def pages_to_indices(self, pages: torch.Tensor) -> torch.Tensor:
        ps = self.page_size
        return (pages[:, None] * ps + torch.arange(ps, dtype=torch.int64)).reshape(-1)

    def alloc(self, num_tokens: int) -> Optional[torch.Tensor]:
        """Token indices for ``num_tokens`` (a multiple of page_size), or None when too few pages are free."""
        if num_tokens % self.page_size:
            raise ValueError(f"allocation of {num_tokens} tokens is not a multiple of page_size {self.page_size}")
        n = num_tokens // self.page_size
        if n > len(self._free_pages):
            return None
        pages, self._free_pages = self._free_pages[:n], self._free_pages[n:]
        self._in_use[pages] = True
        return self.pages_to_indices(pages)

    def free(self, indices: torch.Tensor) -> None:
        if indices.numel() == 0:
            return
        indices = indices.to("cpu", torch.int64)
        if indices.numel() % self.page_size:
            raise ValueError(f"free of {indices.numel()} slots is not whole pages of {self.page_size}")
        pages = indices[:: self.page_size] // self.page_size
        if not bool(self._in_use[pages].all()):
            raise RuntimeError(f"double free or foreign slots: pages {pages[~self._in_use[pages]].tolist()[:8]}")
        self._in_use[pages] = False
        self._free_pages = torch.cat([self._free_pages, pages])

    def used_pages(self) -> torch.Tensor:
        return torch.nonzero(self._in_use).flatten()
