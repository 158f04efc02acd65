"""The L2 host pool: paged KV in host memory (pinned when CUDA is present) in one of three layouts.

Shapes (MHA; MLA drops the leading K|V axis and has one head of the latent width):

==================  ==========================================
layer_first         (2, layer_num, size, head_num, head_dim)
page_first          (2, size, layer_num, head_num, head_dim)
page_first_direct   (2, page_num, layer_num, page_size, head_num, head_dim)
==================  ==========================================

The buffer is one raw byte tensor; typed views sit on top. Storage sees a page as *segments*: byte ranges of the
raw buffer that, concatenated, are the page's flat byte order (v0 pages and v1 zero-copy agree on it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from hicache_core.config import MEM_LAYOUTS, HiCacheConfig
from hicache_core.errors import ConfigError
from hicache_core.memory.allocator import PageAllocator
from hicache_core.memory.buffer import cpu_buffer
from hicache_core.memory.spec import KVSpec, require_host_memory

logger = logging.getLogger(__name__)


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo, or free physical pages where that file does not exist."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def host_pool_tokens(config: HiCacheConfig, device_tokens: int, spec: KVSpec) -> int:
    """Host pool size in tokens: ``--hicache-size`` GB when > 0, else ``--hicache-ratio`` x device tokens,
    rounded up to whole pages. Refuses sizes this machine cannot hold, with the numbers."""
    ps = config.page_size
    if config.hicache_size > 0:
        tokens = int(config.hicache_size * 1e9 // spec.size_per_token)
        source = f"--hicache-size {config.hicache_size} GB"
    else:
        tokens = int(device_tokens * config.hicache_ratio)
        source = f"--hicache-ratio {config.hicache_ratio} x {device_tokens} device tokens"
    tokens = -(-tokens // ps) * ps
    if tokens <= 0:
        raise ConfigError(f"host pool from {source} holds no page; raise --hicache-ratio or --hicache-size")
    if tokens <= device_tokens:
        logger.warning(
            "host pool (%d tokens) is not larger than the device pool (%d tokens): the host tier adds little",
            tokens,
            device_tokens,
        )
    need = tokens * spec.size_per_token
    avail = available_memory_bytes()
    reserve = min(10 << 30, avail // 8)
    if need > avail - reserve:
        raise ConfigError(
            f"host pool from {source} needs {need / 2**30:.2f} GiB but this machine has "
            f"{avail / 2**30:.2f} GiB available (keeping {reserve / 2**30:.2f} GiB free); "
            "lower --hicache-size or --hicache-ratio"
        )
    return tokens


class HostPool:
    """Paged host KV buffer plus its page allocator and the page accessors storage backends use."""

    def __init__(
        self,
        spec: KVSpec,
        num_tokens: int,
        page_size: int,
        layout: str = "layer_first",
        pin_memory: Optional[bool] = None,
    ) -> None:
        if layout not in MEM_LAYOUTS:
            raise ConfigError(f"--hicache-mem-layout: invalid value {layout!r}; choose one of {', '.join(MEM_LAYOUTS)}")
        if num_tokens <= 0 or num_tokens % page_size:
            raise ConfigError(f"host pool size {num_tokens} must be a positive multiple of page_size {page_size}")
        self.spec, self.layout, self.page_size, self.size = spec, layout, page_size, num_tokens
        self.page_num = num_tokens // page_size
        self.dtype = spec.dtype
        self.layer_num = spec.layer_num
        self.is_mla = spec.is_mla
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        self.pinned = pin_memory
        total = num_tokens * spec.size_per_token
        require_host_memory(total, f"the host pool ({num_tokens} tokens x {spec.size_per_token} bytes)")
        if pin_memory:
            self.raw = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        else:
            self.raw = cpu_buffer(total, prefault=True)
        self.raw_np: np.ndarray = self.raw.numpy()
        L, ps, H, D = spec.layer_num, page_size, spec.head_num, spec.head_dim
        shapes = {
            "layer_first": (L, num_tokens, H, D),
            "page_first": (num_tokens, L, H, D),
            "page_first_direct": (self.page_num, L, ps, H, D),
        }
        shape = shapes[layout] if spec.is_mla else (2, *shapes[layout])
        self.kv_buffer = self.raw.view(spec.dtype).view(shape)
        self.allocator = PageAllocator(num_tokens, page_size)
        self._build_segments()

    # --- page geometry ------------------------------------------------------------------------------------------
    def _build_segments(self) -> None:
        s, ps, L = self.spec, self.page_size, self.spec.layer_num
        half = L * self.size * s.item_bytes  # bytes from K to V
        kvs = range(s.num_kv)
        if self.layout == "layer_first":
            base = [kv * half + layer * self.size * s.item_bytes for kv in kvs for layer in range(L)]
            seg_len, step = ps * s.item_bytes, ps * s.item_bytes
        else:  # page_first / page_first_direct: a page's K (and V) is one contiguous run
            base = [kv * half for kv in kvs]
            seg_len, step = ps * L * s.item_bytes, ps * L * s.item_bytes
        self._seg_base = np.asarray(base, dtype=np.int64)
        self._seg_step = step
        self.segment_bytes = seg_len
        self.page_bytes = seg_len * len(base)
        self._flat_shape: tuple[int, ...] = {
            "layer_first": (L, ps, s.head_num, s.head_dim),
            "page_first": (ps, L, s.head_num, s.head_dim),
            "page_first_direct": (L, ps, s.head_num, s.head_dim),
        }[self.layout]
        if not s.is_mla:
            self._flat_shape = (2, *self._flat_shape)

    def token_strides(self) -> tuple[int, int, int, int]:
        """Byte strides (page, token-in-page, layer, K->V) that place token t of layer l at
        ``(t // page_size) * page + (t % page_size) * token + l * layer + kv * kv_stride`` in :attr:`raw`."""
        s, ps, L = self.spec, self.page_size, self.spec.layer_num
        item, half = s.item_bytes, L * self.size * s.item_bytes
        return {
            "layer_first": (ps * item, item, self.size * item, half),
            "page_first": (ps * L * item, L * item, item, half),
            "page_first_direct": (L * ps * item, item, ps * item, half),
        }[self.layout]

    @property
    def segments_per_page(self) -> int:
        return len(self._seg_base)

    def _pages(self, host_indices: torch.Tensor | Sequence[int]) -> np.ndarray:
        idx = np.asarray(host_indices.cpu() if isinstance(host_indices, torch.Tensor) else host_indices, np.int64)
        if idx.size % self.page_size:
            raise ValueError(f"{idx.size} host indices are not whole pages of {self.page_size}")
        return idx[:: self.page_size] // self.page_size

    def segment_offsets(self, host_indices) -> np.ndarray:
        """Byte offsets in :attr:`raw` of every segment of every page, shape (pages, segments_per_page)."""
        pages = self._pages(host_indices)
        return self._seg_base[None, :] + pages[:, None] * self._seg_step

    def get_page_buffer_meta(self, host_indices) -> tuple[list[int], list[int]]:
        """Pointers and sizes of each page's segments, page by page (MHA page layouts: ``[k0, v0, k1, v1, ...]``)."""
        offs = self.segment_offsets(host_indices).reshape(-1)
        base = self.raw.data_ptr()
        return (offs + base).tolist(), [self.segment_bytes] * len(offs)

    def page_memoryviews(self, host_indices) -> list[list[memoryview]]:
        """Writable memoryviews of each page's segments, for ``os.preadv`` / ``os.pwritev`` without copies."""
        mv = memoryview(self.raw_np)  # type: ignore[arg-type]  # numpy arrays export the buffer protocol
        n = self.segment_bytes
        return [[mv[o : o + n] for o in row] for row in self.segment_offsets(host_indices).tolist()]

    def page_view(self, index: int) -> torch.Tensor:
        """One page (``index``: its first token slot) as a view into the pool, heads and head_dim last: (2, L, ps,
        H, D) for layer_first and page_first_direct, (2, ps, L, H, D) for page_first (MLA: no leading 2)."""
        return self._page_view(index)

    # --- flat pages (the v0 storage interface) --------------------------------------------------------------------
    def _page_view(self, index: int) -> torch.Tensor:
        t, ps = int(index), self.page_size
        if t % ps:
            raise ValueError(f"host index {t} is not the start of a page (page_size {ps})")
        kv = self.kv_buffer
        lead: tuple[slice, ...] = () if self.is_mla else (slice(None),)
        if self.layout == "layer_first":
            return kv[lead + (slice(None), slice(t, t + ps))]
        if self.layout == "page_first":
            return kv[lead + (slice(t, t + ps),)]
        return kv[lead + (t // ps,)]

    def get_flat_page(self, index: int) -> torch.Tensor:
        """A copy of one page (``index`` = its first token slot) as a flat tensor in the page byte order: never a
        view, so a backend that keeps the tensor keeps the bytes, not a window on a page that will be reused."""
        view = self._page_view(index)
        return view.flatten().clone() if view.is_contiguous() else view.flatten()

    def set_flat_page(self, index: int, data: torch.Tensor) -> None:
        if data.numel() != self.page_bytes // self.spec.itemsize or data.dtype != self.dtype:
            raise ValueError(
                f"page data has {data.numel()} x {data.dtype}; "
                f"expected {self.page_bytes // self.spec.itemsize} x {self.dtype}"
            )
        self._page_view(index).copy_(data.view(self._flat_shape))

    def dummy_flat_page(self) -> torch.Tensor:
        """A landing buffer for one v0 page."""
        return torch.zeros(self.page_bytes // self.spec.itemsize, dtype=self.dtype)

    # --- SGLang's names for the same, so SGLang's storage backends run on this pool ----------------------------------
    @property
    def size_per_token(self) -> int:
        return self.spec.size_per_token

    def get_size_per_token(self) -> int:
        return self.spec.size_per_token

    def get_ksize_per_token(self) -> int:
        """Bytes of one token's K over every layer (MLA: its whole latent): what SGLang's backends size a page's
        K object by."""
        return self.spec.size_per_token // self.spec.num_kv

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        """SGLang's accessor: the page at ``index``, flat (a copy) or as the layout's page view."""
        return self.get_flat_page(index) if flat else self._page_view(index)

    def set_from_flat_data_page(self, index: int, data: torch.Tensor) -> None:
        self.set_flat_page(index, data)

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return self.dummy_flat_page()

    # --- allocation ----------------------------------------------------------------------------------------------
    def alloc(self, num_tokens: int) -> Optional[torch.Tensor]:
        return self.allocator.alloc(num_tokens)

    def free(self, indices: torch.Tensor) -> None:
        self.allocator.free(indices)

    def available_size(self) -> int:
        return self.allocator.available_size()

    def clear(self) -> None:
        self.allocator.clear()

    def __repr__(self) -> str:
        return (
            f"HostPool(layout={self.layout}, tokens={self.size}, page_size={self.page_size}, "
            f"{self.size * self.spec.size_per_token / 2**20:.1f} MiB, pinned={self.pinned})"
        )
