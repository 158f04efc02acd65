"""Large CPU buffers backed by transparent huge pages where the kernel offers them.

KV moves between pools in pieces as small as one token of one layer (``page_first``: 2 KiB at a 64 KiB stride).
With 4 KiB pages nearly every such piece is a TLB miss and the hardware prefetcher stops at each page boundary;
2 MiB pages remove most of both. Linux's default THP mode is ``madvise``, so a buffer has to ask: we map it
anonymously and ``madvise(MADV_HUGEPAGE)`` it. Anywhere that is not possible (not Linux, pinned memory for CUDA,
``HICACHE_HUGE_PAGES=0``), it is a plain ``torch.empty``. Either way the memory starts zeroed only when asked.

A pool's buffer is *prefaulted*: every page touched once when it is made, as pinned memory is by CUDA. Otherwise
the first write into each page faults, and that lands on the serving path: on this project's VM a fresh page cost
about 15x the copy into it (1-2.7 s a GiB), which made the vLLM connector's first saves into its host pool 6-9% of
vLLM's forward pass. ``HICACHE_PREFAULT=0`` leaves pages to fault on first use (a faster start, a slower first lap).
"""

from __future__ import annotations

import mmap
import os

import torch

HUGE = 2 << 20  # below this a buffer gains nothing from huge pages


def cpu_buffer(nbytes: int, zero: bool = False, prefault: bool = False) -> torch.Tensor:
    """A uint8 CPU tensor of ``nbytes`` (zeroed when ``zero``), on huge pages where possible; ``prefault``: every
    page touched now (see the module doc)."""
    buf = _allocate(nbytes, zero)
    if prefault and nbytes and os.environ.get("HICACHE_PREFAULT", "1") != "0":
        # one byte of each 4 KiB page (writing what is there keeps an uninitialised buffer as it was)
        touch = buf[::PAGE]
        touch.copy_(touch.clone())
    return buf


PAGE = 4096


def _allocate(nbytes: int, zero: bool) -> torch.Tensor:
    if nbytes >= HUGE and hasattr(mmap, "MADV_HUGEPAGE") and os.environ.get("HICACHE_HUGE_PAGES", "1") != "0":
        try:
            mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            mm.madvise(mmap.MADV_HUGEPAGE)
        except (OSError, ValueError):
            pass
        else:
            return torch.frombuffer(mm, dtype=torch.uint8)  # the tensor keeps the mapping alive; zero-filled
    return torch.zeros(nbytes, dtype=torch.uint8) if zero else torch.empty(nbytes, dtype=torch.uint8)
