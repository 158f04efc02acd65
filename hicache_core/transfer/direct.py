"""``direct`` io: copies of whole runs of pages between strided byte views.

Every pool, whatever its layout, is one strided view ``[kv, page, layer, token, byte]`` of its raw bytes (the
layout only changes the strides: ``token_strides()``). Page-granular allocation makes a transfer a list of *runs*
(pages consecutive on both sides); each run is one copy between two such views -- K and V and, for all-layer
copies, every layer in the same call.

On CPU a copy is a list of contiguous pieces (a page's layer, or in ``page_first`` one token's layer), in the
source's address order, handed to the streaming C copier (``native.py``/``ntcopy.c``) on a small thread pool
(the GIL is released while copying); where the copier cannot be built, numpy ``copyto`` on byte views, one memcpy
per piece. No OpenMP team per call either way. The caller copies a share itself; the pool's threads copy the rest
on the caller's other CPUs (``_helper_cpus``). (Measured in bench transfer, paired against a contiguous copy on 2
cores, 192 scattered pages of 32 layers: torch ``copy_`` of whole pages 0.62-0.90x, numpy 0.74-1.00x, the
streaming copier with its helpers kept off the caller's CPU 0.92-1.26x, ``page_first`` 0.80-0.96x, in 11 runs; on
an AMX Xeon VM, with no software prefetch inside a piece (ntcopy.c), every row 0.87-1.43x in 3 runs, MLA
layer_first per-layer loads 1.11-1.12x.)
The pools' CPU memory sits on huge pages (``memory/buffer.py``). With a CUDA device pool the copies are torch
``copy_`` calls on the current stream.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import functools
import logging
import os
import threading
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided

from hicache_core.errors import ConfigError
from hicache_core.threads import background_thread, is_low_priority
from hicache_core.transfer import native

logger = logging.getLogger(__name__)


def _allowed_cpus() -> list[int]:
    """The CPUs the calling thread may run on (its affinity mask: a container's or taskset's limit), in order."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _thread_count() -> int:
    env = os.environ.get("HICACHE_DIRECT_THREADS", "")
    if env.strip().isdigit() and int(env) >= 1:
        return min(int(env), 8)
    if env:
        logger.warning("hicache: $HICACHE_DIRECT_THREADS=%r is not a whole number >= 1; using one per CPU", env)
    return max(1, min(len(_allowed_cpus()), 8))


_THREADS = _thread_count()
# layers a layer-wise load moves per call between CPU pools: a few layers at once read a page-first pool's tokens
# in longer contiguous pieces and cut the calls per run; layer N is usable a few layers later. Measured on 2 cores
# (bench transfer, 32 layers): layer_first 1 -> 4 layers per call 0.65x -> 0.97x of a contiguous copy (MLA);
# page_first 1 -> 4 -> 8 layers 0.48x -> 0.60x -> 0.66x (MLA), 0.71x -> 0.79x -> 0.79x (MHA).
_GROUP_ENV = os.environ.get("HICACHE_DIRECT_LAYER_GROUP")
CPU_LAYER_GROUP = {"page_first": 8, "default": 4}
_POOLS: dict[bool, cf.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _executor() -> cf.ThreadPoolExecutor:
    """The copier threads: a low-priority pool for a low-priority caller (a write-through nobody waits for must not
    borrow full-priority threads), the other one for loads."""
    low = is_low_priority()
    with _POOLS_LOCK:
        if low not in _POOLS:
            _POOLS[low] = cf.ThreadPoolExecutor(
                _THREADS,
                thread_name_prefix="hicache-direct-low" if low else "hicache-direct",
                initializer=background_thread,
                initargs=(low,),
            )
        return _POOLS[low]


def _getcpu_fn():
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        fn = ctypes.CDLL(None).sched_getcpu
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_int, []
    return fn


_GETCPU = _getcpu_fn()
_PINNED = threading.local()


def _helper_cpus() -> frozenset[int] | None:
    """Where the copier threads may run for this call: any CPU of the caller's but the one it runs on now. Linux
    wakes a thread on its waker's CPU when that looks cheap; on this project's 2-core VM, after an idle spell, the
    helper then shared the caller's CPU while the other idled, and the two halves of a copy ran one after the other
    (measured: caller's half 2450 us, helper's 1220 us; both 1970 us when on two CPUs)."""
    if _GETCPU is None:
        return None
    allowed = _allowed_cpus()
    others = frozenset(allowed) - {_GETCPU()}
    return others if others and len(others) < len(allowed) else None


def _run_pinned(cpus: frozenset[int] | None, task) -> None:
    if cpus is not None and getattr(_PINNED, "cpus", None) != cpus:  # a syscall only when the set changes
        try:
            os.sched_setaffinity(0, cpus)
        except OSError:  # not allowed here: not tried again for the same set on every call
            pass
        _PINNED.cpus = cpus
    task()


def _in_parallel(tasks: list) -> None:
    """Run ``tasks``: the first in the calling thread, the others on copier threads kept off the caller's CPU."""
    if len(tasks) == 1:
        tasks[0]()
        return
    cpus = _helper_cpus()
    futures = [_executor().submit(_run_pinned, cpus, t) for t in tasks[1:]]
    try:
        tasks[0]()
    finally:
        for f in futures:
            f.result()


def page_runs(src_indices: torch.Tensor, dst_indices: torch.Tensor, page_size: int) -> np.ndarray:
    """Runs of pages consecutive on both sides, as rows (src_page, dst_page, n_pages)."""
    if src_indices.numel() != dst_indices.numel():
        raise ValueError(f"index lengths differ: {src_indices.numel()} vs {dst_indices.numel()}")
    if src_indices.numel() % page_size:
        raise ValueError(f"{src_indices.numel()} indices are not whole pages of {page_size}")
    s = src_indices.cpu().numpy()[::page_size]
    d = dst_indices.cpu().numpy()[::page_size]
    if (s % page_size).any() or (d % page_size).any():
        raise ValueError("indices do not start on page boundaries")
    s, d = s // page_size, d // page_size
    if len(s) == 0:
        return np.zeros((0, 3), dtype=np.int64)
    brk = np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1
    starts = np.concatenate(([0], brk))
    lengths = np.diff(np.concatenate((starts, [len(s)])))
    return np.stack([s[starts], d[starts], lengths], axis=1)


def byte_view(pool) -> Any:
    """The pool as ``[kv, page, layer, token, byte]``: numpy for CPU memory, torch for CUDA memory (cached)."""
    cached = getattr(pool, "_hicache_byte_view", None)
    if cached is not None:
        return cached
    spec = pool.spec
    sp, st, sl, skv = pool.token_strides()
    shape = (spec.num_kv, pool.size // pool.page_size, spec.layer_num, pool.page_size, spec.item_bytes)
    strides = (skv, sp, sl, st, 1)
    raw = pool.raw if hasattr(pool, "raw") else pool.kv_buffer.reshape(-1).view(torch.uint8)
    view: np.ndarray | torch.Tensor
    if raw.device.type == "cpu":
        view = as_strided(raw.numpy(), shape=shape, strides=strides)
    else:
        view = torch.as_strided(raw, shape, strides)
    pool._hicache_byte_view = view
    return view


_RUNS: list = [None, None]  # the last (key, runs): a per-layer load asks for the same runs once per layer


def _runs(src_indices: torch.Tensor, dst_indices: torch.Tensor, page_size: int) -> np.ndarray:
    key = (
        src_indices.data_ptr(),
        src_indices._version,
        src_indices.numel(),
        dst_indices.data_ptr(),
        dst_indices._version,
        dst_indices.numel(),
        page_size,
        src_indices.device,
        dst_indices.device,
    )
    last_key, last_runs = _RUNS
    if key == last_key and last_runs is not None and last_runs[1] is src_indices and last_runs[2] is dst_indices:
        return last_runs[0]
    runs = page_runs(src_indices, dst_indices, page_size)
    _RUNS[:] = [key, (runs, src_indices, dst_indices)]
    return runs


STREAM_MIN_BYTES = 4 << 20  # below this a transfer stays in the cache (what is loaded is read at once)


def _pieces(dst: np.ndarray, src: np.ndarray, runs: np.ndarray, layers: slice):
    """Byte offsets of every contiguous piece the copy ``dst[:, pages, layers] = src[:, pages, layers]`` is made
    of, in both views, and the piece length. Inner dimensions merge while both sides are contiguous across them.
    The pieces come in the source's address order (pages sorted, dimensions by source stride). Measured on 2
    cores: MLA layer_first pieces page by page, hopping across layers, streamed at 26 GB/s where address order
    made 42; small pieces (a ``page_first`` row's tokens) read in order made 17-18 GB/s, written in order 13-14."""
    nkv, _, nlayer, ps, item = src.shape
    l0, l1, step = layers.indices(nlayer)
    if step != 1 or l1 <= l0:
        raise ValueError(f"layers {layers} are not a non-empty range of 0..{nlayer - 1}")
    for name, view, col in (("source", src, 0), ("destination", dst, 1)):
        if len(runs) and (runs[:, col].min() < 0 or (runs[:, col] + runs[:, 2]).max() > view.shape[1]):
            raise ValueError(f"{name} pages out of range 0..{view.shape[1] - 1}")
    runs = runs[np.argsort(runs[:, 0], kind="stable")]
    counts = runs[:, 2]
    within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    pages = (np.repeat(runs[:, 0], counts) + within, np.repeat(runs[:, 1], counts) + within)
    piece = item
    # (src stride, src offsets, dst offsets) of each dimension enumerated
    dims = [(src.strides[1], pages[0] * src.strides[1], pages[1] * dst.strides[1])]
    merging = True
    for size, ss, ds in ((ps, src.strides[3], dst.strides[3]), (l1 - l0, src.strides[2], dst.strides[2])):
        if merging and ss == piece and ds == piece:
            piece *= size
        else:
            merging = False
            ar = np.arange(size, dtype=np.int64)
            dims.append((ss, ar * ss, ar * ds))
    ar = np.arange(nkv, dtype=np.int64)
    dims.append((src.strides[0], ar * src.strides[0], ar * dst.strides[0]))
    src_off = np.full(1, l0 * src.strides[2], np.int64)
    dst_off = np.full(1, l0 * dst.strides[2], np.int64)
    for _, so, do in sorted(dims, key=lambda d: -d[0]):  # the largest source stride outermost
        src_off = (src_off[:, None] + so[None, :]).ravel()
        dst_off = (dst_off[:, None] + do[None, :]).ravel()
    return dst_off, src_off, piece


def _copy_native(lib, dst: np.ndarray, src: np.ndarray, runs: np.ndarray, layers: slice) -> None:
    dst_off, src_off, piece = _pieces(dst, src, runs, layers)
    count = len(src_off)
    # streamed only in whole cache lines: pieces of another size (fp8 KV with its scales, 68-byte heads: 544-byte
    # pieces in page_first) share lines with their neighbours, and streaming them ran at 0.24-0.35x of a contiguous
    # copy where memcpy runs at 0.50-0.59x (bench transfer, 2 cores)
    stream = int(count * piece >= STREAM_MIN_BYTES and piece % 64 == 0)
    dptr, sptr = dst.ctypes.data, src.ctypes.data

    def work(lo: int, hi: int) -> None:  # ctypes drops the GIL for the call
        if hi > lo:
            lib.hc_copy_pieces(dptr, sptr, dst_off[lo:].ctypes.data, src_off[lo:].ctypes.data, hi - lo, piece, stream)

    parts = min(_THREADS, max(1, count * piece // (1 << 20)))  # a thread for each MiB, up to the pool's size
    bounds = [count * i // parts for i in range(parts + 1)]
    _in_parallel([functools.partial(work, bounds[i], bounds[i + 1]) for i in range(parts)])


def _copy(dst_pool, src_pool, runs: np.ndarray, layer: int | slice | None) -> None:
    dst, src = byte_view(dst_pool), byte_view(src_pool)
    if isinstance(dst, np.ndarray) and isinstance(src, np.ndarray) and len(runs):
        lib = native.copier()
        if lib is not None:
            layers = layer if isinstance(layer, slice) else slice(None) if layer is None else slice(layer, layer + 1)
            _copy_native(lib, dst, src, runs, layers)
            return
    layer_sel = slice(None) if layer is None else layer
    rows = runs.tolist()
    if isinstance(dst, np.ndarray) and isinstance(src, np.ndarray):
        if layer is None:  # whole pages

            def work(part):
                for s, d, n in part:
                    np.copyto(dst[:, d : d + n], src[:, s : s + n])
        else:

            def work(part):
                for s, d, n in part:
                    np.copyto(dst[:, d : d + n, layer], src[:, s : s + n, layer])

        parts = min(_THREADS, len(rows))
        _in_parallel([functools.partial(work, rows[i::parts]) for i in range(parts)])
        return
    # CUDA: torch views on both sides (host side a pinned CPU tensor view)
    dst_t = dst if isinstance(dst, torch.Tensor) else torch.from_numpy(dst)
    src_t = src if isinstance(src, torch.Tensor) else torch.from_numpy(src)
    for s, d, n in rows:
        dst_t[:, d : d + n, layer_sel].copy_(src_t[:, s : s + n, layer_sel], non_blocking=True)


def load_layer(host, device, host_indices, device_indices, layer: int) -> None:
    _copy(device, host, _runs(host_indices, device_indices, host.page_size), layer)


def load_layers(host, device, host_indices, device_indices, first: int, end: int) -> None:
    """Layers ``first`` to ``end - 1`` in one pass over the runs."""
    _copy(device, host, _runs(host_indices, device_indices, host.page_size), slice(first, end))


def layer_group(host, device) -> int:
    """Layers a layer-wise load should move per call: several between CPU pools (``$HICACHE_DIRECT_LAYER_GROUP``
    overrides), one to a GPU (the copies are queued on its stream anyway, and its compute should start on layer 0
    at once)."""
    if device.device.type != "cpu":
        return 1
    if _GROUP_ENV:
        if not _GROUP_ENV.strip().isdigit() or int(_GROUP_ENV) < 1:
            raise ConfigError(f"$HICACHE_DIRECT_LAYER_GROUP={_GROUP_ENV!r}: give a whole number of layers >= 1")
        return int(_GROUP_ENV)
    return CPU_LAYER_GROUP.get(host.layout, CPU_LAYER_GROUP["default"])


def load_all_layers(host, device, host_indices, device_indices) -> None:
    _copy(device, host, page_runs(host_indices, device_indices, host.page_size), None)


def backup_all_layers(device, host, device_indices, host_indices) -> None:
    _copy(host, device, page_runs(device_indices, host_indices, host.page_size), None)
