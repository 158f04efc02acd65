"""Background work of the cache: device<->host copies, storage prefetch and backup.

The owner thread (the one that owns the tree, usually the engine's scheduler) calls everything here except the
worker loops. Workers never touch the tree or the allocators: they report through acks, flags and the
host-memory release queue, which the owner drains in :meth:`HiCacheController.drain_release_queue`.

* A **write** (device -> host, all layers) runs on the write worker; its :class:`TransferAck` completes later.
* A **load** (host -> device) is queued, then started by :meth:`start_loading` as one merged op on the load
  worker, layer by layer; the device pool's layer waiter blocks a reader of layer N until layer N has landed.
* **Prefetch** (storage -> host) and **backup** (host -> storage) run on their own threads.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

import torch

from hicache_core.config import HiCacheConfig
from hicache_core.keys import hash_chain
from hicache_core.metrics import CacheMetrics
from hicache_core.transfer import HostDeviceTransfer

logger = logging.getLogger(__name__)

STORAGE_BATCH_PAGES = 128  # pages per batch_exists / batch_get_v1 / batch_set_v1 call (SGLang's storage_batch_size)
_op_ids = itertools.count(1)


class TransferAck:
    """Completion of one device<->host op; ``layer_events`` lets a reader wait for one layer of a load."""

    def __init__(self, node_ids: list[int], num_layers: int = 1) -> None:
        self.node_ids = node_ids
        self.layer_events = [threading.Event() for _ in range(num_layers)]
        self.error: Optional[BaseException] = None

    def done(self) -> bool:
        return self.layer_events[-1].is_set()

    def wait(self, layer: Optional[int] = None, timeout: Optional[float] = None) -> None:
        ev = self.layer_events[-1 if layer is None else layer]
        if not ev.wait(timeout):
            raise TimeoutError("transfer did not finish in time")
        if self.error is not None:
            raise RuntimeError(f"KV transfer failed: {self.error}") from self.error

    def _finish(self, error: Optional[BaseException] = None) -> None:
        self.error = error
        for ev in self.layer_events:
            ev.set()


class _Worker:
    """One thread running submitted jobs in order (a CUDA stream of its own when the device is CUDA)."""

    def __init__(self, name: str, device: torch.device) -> None:
        self._q: queue.Queue = queue.Queue()
        self._device = device
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[Callable[[], None]], None]) -> None:
        """``job(sync)``: ``sync()`` waits until the copies issued so far have landed."""
        self._q.put(job)

    def _loop(self) -> None:
        stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        sync = stream.synchronize if stream is not None else (lambda: None)
        while True:
            job = self._q.get()
            if job is None:
                return
            if stream is not None:
                with torch.cuda.stream(stream):
                    job(sync)
            else:
                job(sync)

    def stop(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=30)


class PrefetchOperation:
    """Storage -> host for one request. The I/O thread fills pages in order and bumps ``completed_tokens``
    only after the bytes are in place; once terminated, no more progress is accepted."""

    def __init__(self, request_id: Any, host_indices: torch.Tensor, token_ids: list[int], last_hash: Optional[str]):
        self.id = next(_op_ids)
        self.request_id = request_id
        self.host_indices = host_indices
        self.token_ids = token_ids
        self.last_hash = last_hash
        self.hash_value: list[str] = []
        self.completed_tokens = 0
        self.start_time = time.monotonic()
        self.last_progress = self.start_time
        self.queried = threading.Event()  # existence query finished (hash_value final)
        self.io_done = threading.Event()  # the I/O thread is finished with every page of this op
        self.revoked = False  # too little in storage: every page already handed back
        self._terminated = False
        self._lock = threading.Lock()

    def increment(self, n: int) -> bool:
        with self._lock:
            if self._terminated:
                return False
            self.completed_tokens += n
            self.last_progress = time.monotonic()
            return True

    def mark_terminate(self) -> int:
        with self._lock:
            self._terminated = True
            return self.completed_tokens

    def is_terminated(self) -> bool:
        with self._lock:
            return self._terminated


class BackupOperation:
    def __init__(self, host_indices: torch.Tensor, hash_value: list[str], node_id: int) -> None:
        self.id = next(_op_ids)
        self.host_indices = host_indices
        self.hash_value = hash_value
        self.node_id = node_id
        self.completed_tokens = 0


class HiCacheController:
    """Moves pages between tiers for a :class:`~hicache_core.cache.HiRadixCache`."""

    def __init__(
        self,
        config: HiCacheConfig,
        device_pool,
        host_pool,
        storage=None,
        metrics: Optional[CacheMetrics] = None,
        *,
        force_kernel: bool = False,
    ) -> None:
        self.config = config
        self.device_pool, self.host_pool = device_pool, host_pool
        self.page_size = config.page_size
        self.metrics = metrics or CacheMetrics()
        self.transfer = HostDeviceTransfer(host_pool, device_pool, config.hicache_io_backend, force_kernel=force_kernel)
        self.layer_num = device_pool.layer_num
        self._write_worker = _Worker("hicache-write", device_pool.device)
        self._load_worker = _Worker("hicache-load", device_pool.device)
        self.ack_write_queue: list[TransferAck] = []
        self.ack_load_queue: list[TransferAck] = []
        self._load_queue: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self._current_load: Optional[TransferAck] = None
        device_pool.set_layer_waiter(self._wait_layer)

        self.storage = storage
        self.prefetch_threshold = max(config.prefetch_threshold, self.page_size)
        self.prefetch_capacity_limit = int(0.8 * max(host_pool.size - device_pool.size, host_pool.size // 2))
        self.prefetch_tokens_occupied = 0
        self.host_mem_release_queue: queue.Queue = queue.Queue()
        self.ack_backup_queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        if storage is not None:
            self.prefetch_queue: queue.Queue = queue.Queue()
            self.backup_queue: queue.Queue = queue.Queue()
            self._prefetch_thread = threading.Thread(target=self._prefetch_loop, name="hicache-prefetch", daemon=True)
            self._backup_thread = threading.Thread(target=self._backup_loop, name="hicache-backup", daemon=True)
            self._prefetch_thread.start()
            self._backup_thread.start()

    # --- device <-> host ---------------------------------------------------------------------------------------------
    def _wait_layer(self, layer: int) -> None:
        if self._current_load is not None:
            self._current_load.wait(layer)

    def write(self, device_indices: torch.Tensor, node_id: int) -> Optional[torch.Tensor]:
        """Start copying device pages to freshly allocated host pages; None if the host pool is full."""
        host_indices = self.host_pool.alloc(len(device_indices))
        if host_indices is None:
            return None
        ack = TransferAck([node_id])
        nbytes = len(device_indices) * self.host_pool.spec.size_per_token
        transfer, metrics = self.transfer, self.metrics
        dev_idx = device_indices.clone()

        def job(sync):
            t0 = time.perf_counter()
            try:
                transfer.backup_all_layers(dev_idx, host_indices)
                sync()
            except BaseException as e:  # report, never kill the worker
                logger.exception("device->host copy failed")
                ack._finish(e)
                return
            metrics.record_transfer("d2h", nbytes, time.perf_counter() - t0)
            ack._finish()

        self._write_worker.submit(job)
        self.ack_write_queue.append(ack)
        return host_indices

    def load(self, host_indices: torch.Tensor, node_id: int) -> Optional[torch.Tensor]:
        """Allocate device pages for a host span and queue the copy; None if the device pool is full."""
        device_indices = self.device_pool.alloc(len(host_indices))
        if device_indices is None:
            return None
        self._load_queue.append((host_indices, device_indices, node_id))
        return device_indices

    def start_loading(self) -> Optional[TransferAck]:
        """Start every queued load as one op, layer by layer. Readers of layer N wait only for layer N."""
        if not self._load_queue:
            return None
        ops, self._load_queue = self._load_queue, []
        host_idx = torch.cat([o[0] for o in ops])
        dev_idx = torch.cat([o[1] for o in ops])
        ack = TransferAck([o[2] for o in ops], self.layer_num)
        nbytes = len(host_idx) * self.host_pool.spec.size_per_token
        transfer, metrics, layers = self.transfer, self.metrics, self.layer_num

        def job(sync):
            t0 = time.perf_counter()
            try:
                for layer in range(layers):
                    transfer.load_layer(host_idx, dev_idx, layer)
                    sync()
                    ack.layer_events[layer].set()
            except BaseException as e:
                logger.exception("host->device copy failed")
                ack._finish(e)
                return
            metrics.record_transfer("h2d", nbytes, time.perf_counter() - t0)
            ack._finish()

        self._current_load = ack
        self._load_worker.submit(job)
        self.ack_load_queue.append(ack)
        return ack

    def evict_device(self, device_indices: torch.Tensor) -> None:
        self.device_pool.free(device_indices)

    def evict_host(self, host_indices: torch.Tensor) -> None:
        self.host_pool.free(host_indices)

    # --- storage -----------------------------------------------------------------------------------------------------
    def prefetch_rate_limited(self) -> bool:
        return self.prefetch_tokens_occupied >= self.prefetch_capacity_limit

    def prefetch(self, request_id: Any, host_indices: torch.Tensor, tokens: list[int], last_hash: Optional[str]) -> PrefetchOperation:
        op = PrefetchOperation(request_id, host_indices, tokens, last_hash)
        self.prefetch_queue.put(op)
        return op

    def terminate_prefetch(self, op: PrefetchOperation) -> tuple[int, list[str]]:
        completed = op.mark_terminate()
        return completed, op.hash_value[: completed // self.page_size]

    def write_storage(self, host_indices: torch.Tensor, hash_value: list[str], node_id: int) -> int:
        op = BackupOperation(host_indices, hash_value, node_id)
        self.backup_queue.put(op)
        return op.id

    def drain_release_queue(self) -> None:
        """Free host pages handed back by the storage threads (the owner thread is the only one to free)."""
        while True:
            try:
                idx = self.host_mem_release_queue.get_nowait()
            except queue.Empty:
                return
            if idx.numel():
                self.host_pool.free(idx)

    def _release(self, idx: torch.Tensor) -> None:
        if idx.numel():
            self.host_mem_release_queue.put(idx)

    def _storage_call(self, what: str, fn: Callable, *args):
        """Call the backend; an exception is a failure counted in metrics, never a crash of the thread."""
        try:
            return fn(*args)
        except Exception as e:
            logger.warning("storage %s failed: %s: %s", what, type(e).__name__, e)
            self.metrics.record_storage_error(f"{what}_exception")
            return None

    def _storage_batch(self, what: str, fn: Callable, keys: list[str], idx: torch.Tensor) -> int:
        """One batch_get_v1 / batch_set_v1: how many pages succeeded from the start, with its bytes, time and
        failures counted (``get_miss`` / ``set_failed``; exceptions as ``{what}_exception``)."""
        t0 = time.perf_counter()
        results = self._storage_call(what, fn, keys, idx)
        seconds = time.perf_counter() - t0
        ok = 0
        for r in results or []:
            if not r:
                break
            ok += 1
        if ok:
            nbytes = ok * self.page_size * self.host_pool.spec.size_per_token
            self.metrics.record_transfer(f"storage_{what}", nbytes, seconds)
        if ok < len(keys) and results is not None:
            self.metrics.record_storage_error("get_miss" if what == "get" else "set_failed")
        return ok

    def _storage_hit_query(self, op: PrefetchOperation) -> list[str]:
        hashes = hash_chain(op.token_ids, self.page_size, op.last_hash)
        hit: list[str] = []
        for start in range(0, len(hashes), STORAGE_BATCH_PAGES):
            batch = hashes[start : start + STORAGE_BATCH_PAGES]
            n = self._storage_call("exists", self.storage.batch_exists, batch)
            n = max(0, min(int(n or 0), len(batch)))
            hit += batch[:n]
            if n < len(batch) or op.is_terminated():
                break
        return hit

    def _page_transfer(self, op: PrefetchOperation) -> None:
        ps = self.page_size
        for start in range(0, len(op.hash_value), STORAGE_BATCH_PAGES):
            if op.is_terminated() or self._stop.is_set():
                return
            keys = op.hash_value[start : start + STORAGE_BATCH_PAGES]
            idx = op.host_indices[start * ps : (start + len(keys)) * ps]
            ok = self._storage_batch("get", self.storage.batch_get_v1, keys, idx)
            if not op.increment(ok * ps) or ok < len(keys):
                return

    def _prefetch_loop(self) -> None:
        while True:
            op = self.prefetch_queue.get()
            if op is None:
                return
            try:
                hit = [] if op.is_terminated() else self._storage_hit_query(op)
                if len(hit) * self.page_size < self.prefetch_threshold:
                    op.revoked = True
                    op.queried.set()
                    self._release(op.host_indices)
                    continue
                n = len(hit) * self.page_size
                self._release(op.host_indices[n:])
                op.host_indices = op.host_indices[:n]
                op.hash_value = hit
                op.queried.set()
                self._page_transfer(op)
                # pages past what was completed go back once no I/O can touch them any more
                completed = op.mark_terminate()
                self._release(op.host_indices[completed:])
            except Exception:  # pragma: no cover - defensive: the loop must survive
                logger.exception("prefetch thread error")
            finally:
                op.queried.set()
                op.io_done.set()

    def _backup_loop(self) -> None:
        ps = self.page_size
        while True:
            op = self.backup_queue.get()
            if op is None:
                return
            try:
                for start in range(0, len(op.hash_value), STORAGE_BATCH_PAGES):
                    keys = op.hash_value[start : start + STORAGE_BATCH_PAGES]
                    idx = op.host_indices[start * ps : (start + len(keys)) * ps]
                    ok = self._storage_batch("set", self.storage.batch_set_v1, keys, idx)
                    op.completed_tokens += ok * ps
                    if ok < len(keys):
                        break
            finally:
                self.ack_backup_queue.put(op)

    # --- lifecycle ---------------------------------------------------------------------------------------------------
    def wait_transfers(self, timeout: float = 60.0) -> None:
        """Block until every device<->host op submitted so far has finished."""
        for ack in list(self.ack_write_queue) + list(self.ack_load_queue):
            ack.wait(timeout=timeout)

    def close(self) -> None:
        self._stop.set()
        self._write_worker.stop()
        self._load_worker.stop()
        if self.storage is not None:
            self.prefetch_queue.put(None)
            self.backup_queue.put(None)
            self._prefetch_thread.join(timeout=30)
            self._backup_thread.join(timeout=30)
            self.storage.close()
        self.device_pool.set_layer_waiter(None)
