"""``memory``: the in-memory reference backend. Process-local, thread-safe; the conformance kit's first customer
and the simplest complete example of the contract (v0 and v1)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Optional

import attrs
import torch

from hicache_core.storage.base import HiCacheStorage
from hicache_core.storage.options import number, option, parse_options, size, text


class _Store:
    def __init__(self) -> None:
        self.pages: dict[str, bytes] = {}
        self.bytes = 0
        self.lock = threading.Lock()


@attrs.frozen(kw_only=True)
class MemoryOptions:
    store: str = option("default", text, "instances naming the same store share its pages (within a process)")
    capacity_bytes: int = option(0, size, "bytes the store may hold (0 = unlimited); when full, new pages are refused")
    read_gbps: float = option(0.0, number(0.0), "simulate a slower store: reads move at most this many GB/s (0 = off)")
    read_latency_s: float = option(0.0, number(0.0), "simulate a remote store: each read call takes at least this long")


_STORES: dict[str, _Store] = {}
_STORES_LOCK = threading.Lock()


class MemoryStorage(HiCacheStorage):
    """Pages as immutable ``bytes`` in a dict. Extra config: ``store`` (instances naming the same store share it,
    within one process; default ``"default"``), ``capacity_bytes`` (0 = unlimited; when full, new pages are
    refused rather than old ones dropped, so a reader never loses a page mid-prefetch); ``read_gbps`` and
    ``read_latency_s`` make reads as slow as a remote store would be (benchmarks of the prefetch policies)."""

    def __init__(self, storage_config, extra_config=None) -> None:
        super().__init__(storage_config, extra_config)
        opts = parse_options(MemoryOptions, self.extra_config, "memory backend")
        self.capacity_bytes = opts.capacity_bytes
        self.read_gbps, self.read_latency_s = opts.read_gbps, opts.read_latency_s
        name = self.store_name = opts.store
        with _STORES_LOCK:
            store = _STORES.setdefault(name, _Store())
        self._store = store
        self._pages = store.pages
        self._lock = store.lock
        self._stats = {"get_pages": 0, "get_misses": 0, "set_pages": 0, "set_skipped": 0, "set_refused": 0}

    def _put(self, key: str, data: bytes) -> bool:
        with self._lock:
            if key in self._pages:
                self._stats["set_skipped"] += 1
                return True
            if self.capacity_bytes and self._store.bytes + len(data) > self.capacity_bytes:
                self._stats["set_refused"] += 1
                return False
            self._pages[key] = data
            self._store.bytes += len(data)
            self._stats["set_pages"] += 1
            return True

    def _take(self, key: str) -> Optional[bytes]:
        with self._lock:
            data = self._pages.get(key)
            self._stats["get_pages" if data is not None else "get_misses"] += 1
            return data

    def _throttle(self, started: float, nbytes: int) -> None:
        """Make a read call last as long as the simulated store would take (read_latency_s, read_gbps)."""
        if self.read_gbps or self.read_latency_s:
            due = self.read_latency_s + (nbytes / (self.read_gbps * 1e9) if self.read_gbps else 0.0)
            left = due - (time.perf_counter() - started)
            if left > 0:
                time.sleep(left)

    # v0
    def get(self, key, target_location=None):
        t0 = time.perf_counter()
        data = self._take(self.namespace.key(key))
        self._throttle(t0, len(data) if data else 0)
        if data is None:
            return None
        page = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if target_location is not None and target_location.numel() * target_location.element_size() == len(data):
            target_location.view(-1).view(torch.uint8).copy_(page)
            return target_location
        return page

    def set(self, key, value) -> bool:
        return self._put(self.namespace.key(key), value.contiguous().view(-1).view(torch.uint8).numpy().tobytes())

    def exists(self, key) -> bool:
        with self._lock:
            return self.namespace.key(key) in self._pages

    # v1
    def batch_get_v1(self, keys, host_indices):
        t0 = time.perf_counter()
        views = self.mem_pool_host.page_memoryviews(host_indices)
        out = []
        for key, segs in zip(keys, views):
            data = self._take(self.namespace.key(key))
            if data is None or len(data) != self.mem_pool_host.page_bytes:
                out.append(False)
                continue
            pos = 0
            for seg in segs:
                seg[:] = data[pos : pos + len(seg)]
                pos += len(seg)
            out.append(True)
        self._throttle(t0, sum(out) * self.mem_pool_host.page_bytes)
        return out

    def batch_set_v1(self, keys, host_indices):
        views = self.mem_pool_host.page_memoryviews(host_indices)
        return [self._put(self.namespace.key(k), b"".join(segs)) for k, segs in zip(keys, views)]

    # blobs (the L3 codec's values)
    def batch_set_blobs(self, keys, blobs):
        return [self._put(self.namespace.key(k), bytes(b)) for k, b in zip(keys, blobs)]

    def batch_get_blobs(self, keys, max_bytes):
        t0 = time.perf_counter()
        out = [self._take(self.namespace.key(k)) for k in keys]
        out = [b if b is not None and len(b) <= max_bytes else None for b in out]
        self._throttle(t0, sum(len(b) for b in out if b is not None))
        return out

    def clear(self) -> None:
        """Remove this namespace's pages (other namespaces sharing the store keep theirs)."""
        prefix = self.namespace.tag + "-"
        with self._lock:
            for key in [k for k in self._pages if k.startswith(prefix)]:
                self._store.bytes -= len(self._pages.pop(key))

    def describe(self) -> str:
        return f"in-process store {self.store_name!r} (gone when the process exits)"

    def get_stats(self):
        with self._lock:
            return dict(self._stats, store_pages=len(self._pages), store_bytes=self._store.bytes)

    # --- certification hook (hicache certify, the conformance kit) -------------------------------------------------
    @contextlib.contextmanager
    def failing_writes(self) -> Iterator[None]:
        """Inside the block the store counts as full: new pages are refused."""
        old = self.capacity_bytes
        self.capacity_bytes = max(1, self._store.bytes)
        try:
            yield
        finally:
            self.capacity_bytes = old
