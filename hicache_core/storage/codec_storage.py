"""The L3 codec between the controller and a backend: pages leave the host pool encoded (:mod:`codec`) and come
back decoded, through the backend's blob methods (``batch_set_blobs`` / ``batch_get_blobs``: variable-length
values under page keys; see :class:`~hicache_core.storage.base.HiCacheStorage`).

**When the codec pays** (``"codec_when": "pays"``, the default): a storage hit waits for the store's read and then
the decode, so a codec is worth its cost only where ``stored/B + raw/D < raw/B`` -- B the store's read bandwidth,
D the decoder's, both measured here (B fitted as latency + bytes/B on the recent reads; the first two write
batches are read back once, so B is a read's from the start). Pages are written encoded while that holds and raw
(a 16-byte header, then the page) while it does not; one batch in :data:`EXPLORE_EVERY` is encoded anyway, so a
store that got slower, or KV that compresses better, is noticed. Encoding runs on the backup thread: on a machine
with few cores it takes CPU from the engine's prefill, which this rule does not weigh (see ``bench multiturn``).
The decode runs inside the backend call the prefetch policy times, so ``cost_aware`` prefetch sees its cost too.
``"always"`` encodes every page.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Optional

import numpy as np
import torch

from hicache_core.fit import fit_latency
from hicache_core.storage.adapter import Delegate
from hicache_core.storage.base import ExtraInfo, call_with_extra
from hicache_core.storage.codec import HEADER_BYTES, RAW, CodecError, PageCodec, join, nbytes

logger = logging.getLogger(__name__)

EXPLORE_EVERY = 16
PROBES = 2  # write batches read back to measure the store's reads before the first prefetch does
SAMPLES = 32
EWMA = 0.3


class CodecCost:
    """What the codec measured: the stored/raw ratio, the decoder's rate and the store's bandwidth."""

    def __init__(self, when: str) -> None:
        self.when = when
        self.ratio: Optional[float] = None  # raw bytes per stored byte, of the pages the method shrank
        self.decode_rate: Optional[float] = None  # raw bytes/s
        self._reads: collections.deque[tuple[int, float]] = collections.deque(maxlen=SAMPLES)
        self._writes: collections.deque[tuple[int, float]] = collections.deque(maxlen=SAMPLES)
        self._batches = 0
        self._lock = threading.Lock()

    def _ewma(self, old: Optional[float], new: float) -> float:
        return new if old is None else (1 - EWMA) * old + EWMA * new

    def record_encoded(self, raw: int, stored: int) -> None:
        if raw and stored:
            with self._lock:
                self.ratio = self._ewma(self.ratio, raw / stored)

    def record_decode(self, raw: int, seconds: float) -> None:
        if raw and seconds > 0:
            with self._lock:
                self.decode_rate = self._ewma(self.decode_rate, raw / seconds)

    def record_io(self, read: bool, stored: int, seconds: float) -> None:
        if stored and seconds > 0:
            with self._lock:
                (self._reads if read else self._writes).append((stored, seconds))

    def store_rate(self) -> Optional[float]:
        with self._lock:
            fit = fit_latency(self._reads) or fit_latency(self._writes)  # bytes, seconds
        return None if fit is None else 1 / fit[1] if fit[1] > 0 else float("inf")

    def pays(self) -> bool:
        """Whether reading a page encoded and decoding it is expected to be faster than reading it raw."""
        rate = self.store_rate()
        if self.ratio is None or self.decode_rate is None or rate is None:
            return True  # not measured yet: encode, and measure
        return 1 / (self.ratio * rate) + 1 / self.decode_rate < 1 / rate

    def encode_batch(self) -> bool:
        """Whether this batch's pages are written encoded."""
        if self.when == "always":
            return True
        self._batches += 1
        return self.pays() or self._batches % EXPLORE_EVERY == 0

    def stats(self) -> dict[str, Any]:
        return {
            "when": self.when,
            "ratio": self.ratio,
            "decode_gbps": None if self.decode_rate is None else self.decode_rate / 1e9,
            "store_gbps": None if (r := self.store_rate()) is None else r / 1e9,
            "pays": self.pays(),
        }


class CodecStorage(Delegate):
    """v1 on top of a backend's blob methods, every page through a :class:`PageCodec`."""

    def __init__(self, inner: Any, codec: str, when: str, level: int) -> None:
        super().__init__(inner)
        self.codec_name, self.level = codec, level
        self.cost = CodecCost(when)
        self.codec: Optional[PageCodec] = None
        self.metrics: Any = None
        self._counts = dict.fromkeys(("pages_encoded", "pages_raw", "decode_failed"), 0)
        self._lock = threading.Lock()
        self._reads_timed = False  # once reads time the decoder, writes stop decoding a sample page
        self._probes = 0

    def register_mem_pool_host(self, mem_pool_host) -> None:
        super().register_mem_pool_host(mem_pool_host)
        self.codec = PageCodec(self.codec_name, mem_pool_host.dtype, self.level)

    def bind_metrics(self, metrics: Any) -> None:
        """The cache's metrics, where bytes that reached the store and the codec's time are counted."""
        self.metrics = metrics

    def _record(self, direction: str, stored: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.record_stored(direction, stored, seconds)

    def get_stats(self) -> Optional[dict]:
        own = self.inner.get_stats() if callable(getattr(self.inner, "get_stats", None)) else None
        with self._lock:
            counts = dict(self._counts)
        return {**(own or {}), "codec": {"name": self.codec_name, **counts, **self.cost.stats()}}

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    # --- v1 ------------------------------------------------------------------------------------------------------
    def batch_exists(self, keys: list[str], extra_info: Optional[ExtraInfo] = None) -> int:
        return call_with_extra(self.inner.batch_exists, keys, extra=extra_info)

    def _page(self, segments: list[memoryview]) -> np.ndarray:
        if len(segments) == 1:
            return np.frombuffer(segments[0], np.uint8)
        return np.concatenate([np.frombuffer(s, np.uint8) for s in segments])

    def _encode(self, pages) -> list[bytes]:
        """One blob per page (flat uint8 arrays), encoded or raw as the cost rule says for this batch."""
        codec = self.codec
        assert codec is not None, "register_mem_pool_host() first"
        encode = self.cost.encode_batch()
        blobs, timed, encoded = [], self._reads_timed, 0
        for page in pages:
            parts = codec.encode(page) if encode else codec.raw(page)
            if parts[0][4] != RAW:  # the method shrank it (the header's method byte)
                self.cost.record_encoded(page.size, nbytes(parts) - HEADER_BYTES)
                encoded += 1
                if not timed:  # the decoder's rate, until reads measure it: one page a batch
                    self._time_decode(parts, page.size)
                    timed = True
            blobs.append(join(parts))
        self._count("pages_encoded", encoded)
        self._count("pages_raw", len(blobs) - encoded)
        return blobs

    def _store(self, keys, blobs: list[bytes], t0: float, extra_info: Optional[ExtraInfo]) -> list[bool]:
        t1 = time.perf_counter()
        ok = call_with_extra(self.inner.batch_set_blobs, keys, blobs, extra=extra_info)
        t2 = time.perf_counter()
        stored = sum(len(b) for b, good in zip(blobs, ok) if good)
        self.cost.record_io(False, stored, t2 - t1)
        self._record("set", stored, t1 - t0)
        if self._probes < PROBES and not self._reads_timed and isinstance(ok, list) and all(ok):
            self._probe(keys, extra_info)
        return ok

    def batch_set_v1(self, keys, host_indices, extra_info: Optional[ExtraInfo] = None) -> list[bool]:
        t0 = time.perf_counter()
        blobs = self._encode(self._page(segs) for segs in self.mem_pool_host.page_memoryviews(host_indices))
        return self._store(keys, blobs, t0, extra_info)

    def _probe(self, keys: list[str], extra_info: Optional[ExtraInfo]) -> None:
        """Read back a batch just written: the store's read bandwidth, before the first prefetch measures it (a
        store's writes are no guide to its reads: the file backend's create-and-rename is several times slower)."""
        self._probes += 1
        t = time.perf_counter()
        blobs = call_with_extra(
            self.inner.batch_get_blobs, keys, self.mem_pool_host.page_bytes + HEADER_BYTES, extra=extra_info
        )
        got = sum(len(memoryview(b).cast("B")) for b in blobs or [] if b is not None)
        self.cost.record_io(True, got, time.perf_counter() - t)

    def _time_decode(self, parts: list, size: int) -> None:
        assert self.codec is not None
        out = np.empty(size, np.uint8)
        t = time.perf_counter()
        self.codec.decode(join(parts), out)
        self.cost.record_decode(size, time.perf_counter() - t)

    def batch_get_v1(self, keys, host_indices, extra_info: Optional[ExtraInfo] = None) -> list[bool]:
        pool = self.mem_pool_host
        t0 = time.perf_counter()
        blobs = call_with_extra(self.inner.batch_get_blobs, keys, pool.page_bytes + HEADER_BYTES, extra=extra_info)
        t1 = time.perf_counter()
        if not isinstance(blobs, (list, tuple)) or len(blobs) != len(keys):
            raise ValueError(f"batch_get_blobs returned {type(blobs).__name__} for {len(keys)} keys")
        ok, decoded, stored, decode_s = [], 0, 0, 0.0
        for key, blob, segs in zip(keys, blobs, pool.page_memoryviews(host_indices)):
            if blob is None:
                ok.append(False)
                continue
            mv = memoryview(blob).cast("B")
            stored += len(mv)
            direct = len(segs) == 1
            out = np.frombuffer(segs[0], np.uint8) if direct else np.empty(pool.page_bytes, np.uint8)
            t = time.perf_counter()
            if not self._decode(key, mv, out):
                ok.append(False)
                continue
            if not direct:
                pos = 0
                for s in segs:
                    s[:] = out[pos : pos + len(s)].data
                    pos += len(s)
            if mv[4] != RAW:
                decoded += pool.page_bytes
                decode_s += time.perf_counter() - t
            ok.append(True)
        t2 = time.perf_counter()
        self.cost.record_io(True, stored, t1 - t0)
        if decoded:
            self.cost.record_decode(decoded, decode_s)
            self._reads_timed = True
        self._record("get", stored, t2 - t1)
        return ok

    def _decode(self, key: str, blob: memoryview, out: np.ndarray) -> bool:
        """``blob`` decoded into ``out``; a blob that does not decode is logged and counted, and is a miss."""
        assert self.codec is not None, "register_mem_pool_host() first"
        try:
            self.codec.decode(blob, out)
        except CodecError as e:
            logger.warning("codec %s: the page stored under %s does not decode (%s): a miss", self.codec.name, key, e)
            self._count("decode_failed")
            return False
        return True

    # --- v0: flat pages through the same codec (SGLang's v0 calls reach HiCacheForSGLang's backend so); without
    # these, the raw backend's v0 methods would hand out or overwrite the encoded blob as if it were the page
    def get(self, key: str, target_location=None):
        size = self.mem_pool_host.page_bytes
        blob = self.inner.batch_get_blobs([key], size + HEADER_BYTES)[0]
        out = np.empty(size, np.uint8)
        if blob is None or not self._decode(key, memoryview(blob).cast("B"), out):
            return None
        page = torch.from_numpy(out)
        if target_location is not None and target_location.numel() * target_location.element_size() == size:
            target_location.view(-1).view(torch.uint8).copy_(page)
            return target_location
        return page

    def set(self, key: str, value) -> bool:
        page = value.contiguous().view(-1).view(torch.uint8).numpy()
        if page.size != self.mem_pool_host.page_bytes:
            raise ValueError(f"a flat page is {self.mem_pool_host.page_bytes} bytes, not {page.size}")
        ok = self._store([key], self._encode([page]), time.perf_counter(), None)
        return bool(ok[0])

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_get(self, keys: list[str], target_locations=None) -> list:
        return [self.get(k, t) for k, t in zip(keys, target_locations or [None] * len(keys))]

    def batch_set(self, keys: list[str], values) -> bool:
        return all(self.set(k, v) for k, v in zip(keys, values))
