"""Large CPU buffers backed by transparent huge pages where the kernel offers them.

KV moves between pools in pieces as small as one token of one layer (``page_first``: 2 KiB at a 64 KiB stride).
With 4 KiB pages nearly every such piece is a TLB miss and the hardware prefetcher stops at each page boundary;
2 MiB pages remove most of both. Linux's default THP mode is ``madvise``, so a buffer has to ask: we map it
anonymously and ``madvise(MADV_HUGEPAGE)`` it. Anywhere that is not possible (not Linux, pinned memory for CUDA,
``HICACHE_HUGE_PAGES=0``), it is a plain ``torch.empty``. Either way the memory starts zeroed only when asked.
"""

from __future__ import annotations

import mmap
import os

import torch

HUGE = 2 << 20  # below this a buffer gains nothing from huge pages


def cpu_buffer(nbytes: int, zero: bool = False) -> torch.Tensor:
    """A uint8 CPU tensor of ``nbytes`` (zeroed when ``zero``), on huge pages where possible."""
    if nbytes >= HUGE and hasattr(mmap, "MADV_HUGEPAGE") and os.environ.get("HICACHE_HUGE_PAGES", "1") != "0":
        try:
            mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            mm.madvise(mmap.MADV_HUGEPAGE)
        except (OSError, ValueError):
            pass
        else:
            return torch.frombuffer(mm, dtype=torch.uint8)  # the tensor keeps the mapping alive; zero-filled
    return torch.zeros(nbytes, dtype=torch.uint8) if zero else torch.empty(nbytes, dtype=torch.uint8)
