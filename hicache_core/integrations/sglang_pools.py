"""SGLang's host pools as hicache backends see them: which kinds hicache serves, what a page of each kind is, and
the namespace fields that keep pages of one kind from ever being read by a pool of another.

Every kind is read through SGLang's own host-pool API only (``get_page_buffer_meta``, ``get_data_page``,
``set_from_flat_data_page``, ``get_dummy_flat_data_page``). What is stored, per kind:

=============================================  =============================================================
``MHATokenToKVPoolHost``                        K and V of every layer (the flat page: all K, then all V)
``MLATokenToKVPoolHost``                        the latent (kv_lora_rank + rope) of every layer
``AsymmetricMHATokenToKVPoolHost``              K run then V run (K and V head dims differ; SGLang has no
                                                flat page for it, so the page is its two zero-copy runs)
``MHATokenToKOnlyPoolHost``                     K of every layer (a sparse index-K side pool)
``MambaPoolHost``                               one state slot: temporal (SSM) state, then each conv state,
                                                every Mamba layer; a request's state, not a page of tokens
=============================================  =============================================================

A kind hicache does not know (MXFP8 with its UE8M0 scales, which SGLang 0.5.23 itself keeps out of L3; HiSparse;
DeepSeek V4's compressed pools; anything new) is refused at registration, naming its class.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Optional

import attrs
import torch

from hicache_core.errors import BackendLoadError
from hicache_core.memory import KVSpec

# SGLang's host-pool classes hicache serves, by their exact names (a subclass may change the bytes: MXFP8 and
# HiSparse subclass the MHA pool), to the page format the namespace carries ("": hicache's own page format)
KNOWN = {
    "MHATokenToKVPoolHost": "",
    "MLATokenToKVPoolHost": "",
    "AsymmetricMHATokenToKVPoolHost": "sglang/mha-asym",
    "MHATokenToKOnlyPoolHost": "sglang/k-only",
    "MambaPoolHost": "sglang/mamba",
}
WHY_NOT = {
    "MHATokenToKVPoolMXFP8Host": "its UE8M0 scales live outside the pages SGLang 0.5.23 exposes (it raises on "
    "every flat-page and zero-copy call), so its L3 pages would be fp8 payload without scales",
}


@attrs.frozen
class PageSpec:
    """What backends read of a pool's spec: the flat page's dtype."""

    dtype: torch.dtype

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def kind_of(pool: Any) -> str:
    """The pool's class name when hicache serves it; else a BackendLoadError that names the class."""
    name = type(pool).__name__
    if name in KNOWN and type(pool).__module__.startswith("sglang."):
        return name
    why = WHY_NOT.get(name, "hicache does not know the bytes of its pages")
    raise BackendLoadError(
        f"SGLang host pool {type(pool).__module__}.{name}: hicache does not serve this kind of pool ({why}); "
        f"it serves {', '.join(sorted(KNOWN))}. Run without --enable-hierarchical-cache storage for this model, "
        "or use another storage backend"
    )


def namespace_fields(pool: Any, kind: str, *, is_mla: bool) -> dict:
    """The StorageNamespace fields for pages of ``pool``: geometry, dtype and the page format, so a pool of another
    kind, shape or dtype never reads them."""
    if kind == "MambaPoolHost":
        if getattr(pool, "slot_state_device_tensors", ()):
            raise BackendLoadError(
                "SGLang host pool MambaPoolHost carries registered slot side states, which SGLang's zero-copy "
                "page API leaves out of a slot: hicache cannot store its state whole"
            )
        shapes = ";".join(
            [f"temporal={str(pool.temporal_dtype).removeprefix('torch.')}{list(pool.temporal_state_shape)}"]
            + [f"conv={str(pool.conv_dtype).removeprefix('torch.')}{list(s)}" for s in pool.conv_state_shapes]
        )
        return dict(
            dtype="uint8",
            layer_num=pool.num_mamba_layers,
            head_num=1,
            head_dim=1,
            is_mla=False,
            page_format=f"sglang/mamba/{shapes}",
        )
    fmt = KNOWN[kind]
    if kind == "AsymmetricMHATokenToKVPoolHost":
        fmt = f"{fmt}/k{pool.head_dim}-v{pool.v_head_dim}"
    if is_mla:
        head_num, head_dim = 1, pool.kv_lora_rank + pool.qk_rope_head_dim
    else:
        head_num, head_dim = pool.head_num, pool.head_dim
    return dict(
        dtype=str(pool.dtype).removeprefix("torch."),
        layer_num=pool.layer_num,
        head_num=head_num,
        head_dim=head_dim,
        is_mla=is_mla,
        page_format=fmt,
    )


def served(pool: Any, *, is_mla: bool) -> tuple[SGLangHostPool, dict]:
    """An SGLang pool of a kind hicache serves, wrapped for backends, and its namespace fields (refused by class
    otherwise). MHA and MLA pools carry their KVSpec; other kinds a PageSpec of their flat page's dtype."""
    kind = kind_of(pool)
    fields = namespace_fields(pool, kind, is_mla=is_mla)
    spec = kv_spec_of(pool, is_mla) if kind in ("MHATokenToKVPoolHost", "MLATokenToKVPoolHost") else None
    return SGLangHostPool(pool, spec, kind=kind), fields


def kv_spec_of(pool: Any, is_mla: bool) -> KVSpec:
    """The KV geometry of an SGLang anchor pool (MHA: head_num x head_dim; MLA: kv_lora_rank + qk_rope_head_dim)."""
    if getattr(pool, "spec", None) is not None:
        return pool.spec
    if is_mla:
        head_dim = pool.kv_lora_rank + pool.qk_rope_head_dim
        return KVSpec(layer_num=pool.layer_num, head_num=1, head_dim=head_dim, dtype=pool.dtype, is_mla=True)
    return KVSpec(layer_num=pool.layer_num, head_num=pool.head_num, head_dim=pool.head_dim, dtype=pool.dtype)


def _runs(view: torch.Tensor) -> list[tuple[int, int]]:
    """The contiguous byte runs of a strided view, in its logical (flat) order: (pointer, bytes) each."""
    item = view.element_size()
    dims = list(zip(view.shape, view.stride()))
    inner, expect = 1, 1
    while dims and (dims[-1][1] == expect or dims[-1][0] == 1):  # the trailing dims that are one run
        n, s = dims.pop()
        inner *= n
        expect *= n
    run = inner * item
    runs = [(view.data_ptr(), run)]
    for n, s in reversed(dims):  # expand outer dims, outermost first in the final order
        runs = [(p + i * s * item, size) for i in range(n) for p, size in runs]
    return runs


class SGLangHostPool:
    """An SGLang host pool of a kind hicache serves, seen through the interface hicache backends use.

    A page's segments are handed out in the page's flat byte order (SGLang's ``get_data_page(i, flat=True)``):
    SGLang lists an MHA layer_first page as ``[k_l0, v_l0, k_l1, ...]`` while its flat page is all K, then all V,
    and a Mamba slot spans buffers that sit anywhere in memory. The order is found once on page 0 by content (a
    random pattern put in through SGLang's flat page, each segment found in it) and proved to tile the page; a pool
    whose zero-copy segments are not its flat page is refused. Where SGLang gives no zero-copy segments for the
    layout (K-only layer_first) they are the contiguous runs of its page view; where it gives no flat page
    (asymmetric K/V) the page is its segments in SGLang's order."""

    def __init__(self, pool: Any, spec: Any = None, *, kind: Optional[str] = None) -> None:
        self.pool = pool
        self.kind = kind or type(pool).__name__
        self.layout, self.page_size, self.size = pool.layout, pool.page_size, pool.size
        page0 = self._flat_page0()
        self.has_flat = page0 is not None
        self.dtype = page0.dtype if page0 is not None else pool.dtype
        self.spec = spec if spec is not None else PageSpec(self.dtype)
        self._by_view = False
        try:
            ptrs, sizes = pool.get_page_buffer_meta(torch.arange(self.page_size))
        except (ValueError, NotImplementedError, AssertionError) as e:
            if not self.has_flat:
                raise BackendLoadError(
                    f"SGLang host pool {self.kind} ({self.layout}) has neither flat pages nor segments: {e}"
                ) from e
            self._by_view = True
            ptrs, sizes = map(list, zip(*_runs(pool.get_data_page(0, flat=False))))
        self.segments_per_page = len(ptrs)
        self.page_bytes = sum(sizes)
        self._order = list(range(len(ptrs)))
        if page0 is not None and not self._by_view:
            self._order = self._flat_order(page0, ptrs, sizes)
        self._reordered = self._order != list(range(len(ptrs)))
        self.buffers = self._buffers(ptrs)
        self.raw = torch.frombuffer(_view(*self.buffers[0]), dtype=torch.uint8)  # the first (most: only) buffer

    def _flat_page0(self) -> Optional[torch.Tensor]:
        """A copy of SGLang's flat page 0, or None for a pool without flat pages (asymmetric K/V)."""
        try:
            return self.pool.get_data_page(0, flat=True).clone()
        except NotImplementedError:
            return None

    def _flat_order(self, saved: torch.Tensor, ptrs: list[int], sizes: list[int]) -> list[int]:
        """The segments' order in the flat page, found by content on page 0 (its bytes ``saved``, put back)."""
        nbytes = saved.numel() * saved.element_size()
        if nbytes != self.page_bytes:
            raise BackendLoadError(
                f"SGLang's host pool {self.kind}: its flat page has {nbytes} bytes but get_page_buffer_meta "
                f"describes {self.page_bytes}; hicache cannot serve it"
            )
        pattern = os.urandom(nbytes)
        try:
            self.pool.set_from_flat_data_page(
                0, torch.frombuffer(bytearray(pattern), dtype=torch.uint8).view(saved.dtype)
            )
            found = [pattern.find(bytes(_view(p, s))) for p, s in zip(ptrs, sizes)]
        finally:
            self.pool.set_from_flat_data_page(0, saved)
        order = sorted(range(len(ptrs)), key=lambda i: found[i])
        at = 0
        for i in order:
            if found[i] != at:
                raise BackendLoadError(
                    f"SGLang's host pool {self.kind} ({self.layout}): its page segments are not its flat page; "
                    "hicache cannot store its pages in one byte order"
                )
            at += sizes[i]
        return order

    def _buffers(self, ptrs: list[int]) -> list[tuple[int, int]]:
        """The host buffers a page's segments lie in, (pointer, bytes) each: what a backend registers for zero
        copy (one for most pools; K and V for the asymmetric pool; temporal and conv for Mamba)."""
        spans = []
        for t in _tensors(self.pool):  # views of one buffer (per-layer refs) overlap it: merged below
            start = t.untyped_storage().data_ptr()
            n = t.untyped_storage().nbytes()
            if any(start <= p < start + n for p in ptrs):
                spans.append((start, start + n))
        if not spans:
            raise BackendLoadError(f"SGLang host pool {self.kind}: none of its buffers holds its page 0")
        merged: list[list[int]] = []
        for a, b in sorted(spans):
            if merged and a < merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        return [(a, b - a) for a, b in merged]

    # --- what backends call ---------------------------------------------------------------------------------------
    def get_page_buffer_meta(self, host_indices) -> tuple[list[int], list[int]]:
        """Pointers and sizes of each page's segments, in the page byte order (see the class docstring)."""
        if self._by_view:
            idx = host_indices.tolist() if isinstance(host_indices, torch.Tensor) else list(host_indices)
            runs = [r for t in idx[:: self.page_size] for r in _runs(self.pool.get_data_page(int(t), flat=False))]
            return [p for p, _ in runs], [s for _, s in runs]
        ptrs, sizes = self.pool.get_page_buffer_meta(host_indices)
        if not self._reordered:
            return ptrs, sizes
        n, order = self.segments_per_page, self._order
        if len(ptrs) % n:
            raise ValueError(f"SGLang's host pool gave {len(ptrs)} segments, not a multiple of {n} per page")
        out_p = [ptrs[base + i] for base in range(0, len(ptrs), n) for i in order]
        out_s = [sizes[base + i] for base in range(0, len(sizes), n) for i in order]
        return out_p, out_s

    def page_memoryviews(self, host_indices) -> list[list[memoryview]]:
        """Writable views of each page's segments, in the page byte order, from SGLang's pointers (host memory)."""
        ptrs, sizes = self.get_page_buffer_meta(host_indices)
        n = self.segments_per_page
        views = [_view(p, s) for p, s in zip(ptrs, sizes)]
        return [views[i : i + n] for i in range(0, len(views), n)]

    def get_flat_page(self, index: int) -> torch.Tensor:
        if self.has_flat:
            return self.pool.get_data_page(index, flat=True).clone()
        segs = self.page_memoryviews(torch.arange(index, index + self.page_size))[0]
        return torch.frombuffer(bytearray(b"".join(bytes(s) for s in segs)), dtype=torch.uint8).view(self.dtype)

    def set_flat_page(self, index: int, data: torch.Tensor) -> None:
        if self.has_flat:
            self.pool.set_from_flat_data_page(index, data)
            return
        flat = data.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        at = 0
        for seg in self.page_memoryviews(torch.arange(index, index + self.page_size))[0]:
            seg[:] = flat[at : at + len(seg)]
            at += len(seg)

    def dummy_flat_page(self) -> torch.Tensor:
        if self.has_flat:
            return self.pool.get_dummy_flat_data_page()
        return torch.zeros(self.page_bytes // self.spec.itemsize, dtype=self.dtype)


def _view(ptr: int, size: int) -> memoryview:
    return memoryview((ctypes.c_char * size).from_address(ptr)).cast("B")


def _tensors(pool: Any) -> list[torch.Tensor]:
    """The host tensors a pool holds as attributes (alone, or in a list or tuple)."""
    out = []
    for v in vars(pool).values():
        for t in v if isinstance(v, (list, tuple)) else (v,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel():
                out.append(t)
    return out
