"""Background work of the cache: device<->host copies, storage prefetch and backup.

The owner thread (the one that owns the tree, usually the engine's scheduler) calls everything here except the
jobs. Four :class:`~hicache_core.operations.Worker` threads run the jobs: write (device -> host), load (host -> device, layer by layer),
prefetch (storage -> host) and backup (host -> storage). Jobs never touch the tree or the allocators: they finish
acks, flags and the host-memory release queue, and the owner collects what finished through
:meth:`HiCacheController.finished_writes`, :meth:`finished_loads`, :meth:`finished_backups` and :meth:`poll`.

The controller owns each operation's whole life and its accounting (prefetch occupancy, detached prefetches
whose I/O still runs, acks in flight); the cache only edits the tree."""

from __future__ import annotations

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
from hicache_core.operations import BackupOperation, PrefetchOperation, TransferAck, Worker, extra_for
from hicache_core.storage import StorageV1
from hicache_core.storage.guard import Call, GuardedStorage, Outcome
from hicache_core.transfer import HostDeviceTransfer

logger = logging.getLogger(__name__)

STORAGE_BATCH_PAGES = 128  # pages per batch_exists / batch_get_v1 / batch_set_v1 call (SGLang's storage_batch_size)


class HiCacheController:
    """Moves pages between tiers for a :class:`~hicache_core.cache.HiRadixCache`."""

    def __init__(self, config: HiCacheConfig, device_pool, host_pool, storage: Optional[StorageV1] = None,
                 metrics: Optional[CacheMetrics] = None, *, force_kernel: bool = False) -> None:
        self.config = config
        self.device_pool, self.host_pool = device_pool, host_pool
        self.page_size = config.page_size
        self.metrics = metrics or CacheMetrics()
        self.transfer = HostDeviceTransfer(host_pool, device_pool, config.hicache_io_backend, force_kernel=force_kernel)
        self.layer_num = device_pool.layer_num
        self._write_worker = Worker("hicache-write", device_pool.device)
        self._load_worker = Worker("hicache-load", device_pool.device)
        self._workers = [self._write_worker, self._load_worker]
        self._write_acks: list[TransferAck] = []
        self._load_acks: list[TransferAck] = []
        self._load_queue: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self._current_load: Optional[TransferAck] = None
        device_pool.set_layer_waiter(self._wait_layer)

        self.storage: Optional[StorageV1] = None
        self.guard: Optional[GuardedStorage] = None
        self.prefetch_capacity_limit = int(0.8 * max(host_pool.size - device_pool.size, host_pool.size // 2))
        self.prefetch_tokens_occupied = 0
        self._detached: list[PrefetchOperation] = []  # ended prefetches whose worker still holds granted pages
        self._release_queue: queue.Queue[torch.Tensor] = queue.Queue()
        self._backup_acks: queue.Queue[BackupOperation] = queue.Queue()
        self._backups_in_flight = 0
        self._held_lock = threading.Lock()
        self._backups_held = 0  # abandoned past the deadline: acked only once the backend call returns
        self._quarantined_tokens = 0  # host slots an abandoned call may still write: freed when it returns
        self._stop = threading.Event()
        if storage is not None:
            self.attach_storage(storage, config)

    def attach_storage(self, storage: StorageV1, config: HiCacheConfig) -> None:
        """Start the storage tier: the guarded backend, its prefetch and backup workers, and the prefetch policy's
        knobs from ``config`` (a runtime attach brings its own)."""
        if self.guard is not None:
            raise RuntimeError("a storage backend is attached already; detach it first")
        self.config = config
        self.storage = storage
        self.guard = GuardedStorage(storage, self.metrics, timeout_s=config.io_timeout_s)
        self.prefetch_policy = config.hicache_storage_prefetch_policy
        self.prefetch_threshold = max(config.prefetch_threshold, self.page_size)
        self.prefetch_timeout_base = config.prefetch_timeout_base
        self.prefetch_timeout_per_page = self.page_size / 1024 * config.prefetch_timeout_per_ki_token
        self.prefetch_stall_limit = max(10.0, 4 * config.prefetch_timeout_base)
        self._prefetch_worker = Worker("hicache-prefetch", torch.device("cpu"))
        self._backup_worker = Worker("hicache-backup", torch.device("cpu"))
        self._workers += [self._prefetch_worker, self._backup_worker]

    def detach_storage(self) -> None:
        """Stop the storage tier (the owner made sure no prefetch or backup is in flight) and close the backend."""
        for w in (self._prefetch_worker, self._backup_worker):
            w.stop()
            self._workers.remove(w)
        self._guard.close()
        self.storage = self.guard = None

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
        dev_idx = device_indices.clone()

        def job(sync):
            t0 = time.perf_counter()
            try:
                self.transfer.backup_all_layers(dev_idx, host_indices)
                sync()
            except BaseException as e:  # report through the ack, never kill the worker
                logger.exception("device->host copy failed")
                ack._finish(e)
                return
            self.metrics.record_transfer("d2h", nbytes, time.perf_counter() - t0)
            ack._finish()

        self._write_worker.submit(job)
        self._write_acks.append(ack)
        return host_indices

    def load(self, host_indices: torch.Tensor, node_id: int) -> Optional[torch.Tensor]:
        """Allocate device pages for a host span and queue the copy; None if the device pool is full."""
        device_indices = self.device_pool.alloc(len(host_indices))
        if device_indices is None:
            return None
        self._load_queue.append((host_indices, device_indices, node_id))
        return device_indices

    def start_loading(self) -> Optional[TransferAck]:
        """Start every queued load as one op, layer by layer (a few at a time between CPU pools: layer_groups)."""
        if not self._load_queue:
            return None
        ops, self._load_queue = self._load_queue, []
        host_idx = torch.cat([o[0] for o in ops])
        dev_idx = torch.cat([o[1] for o in ops])
        ack = TransferAck([o[2] for o in ops], self.layer_num)
        nbytes = len(host_idx) * self.host_pool.spec.size_per_token

        def job(sync):
            t0 = time.perf_counter()
            try:
                for first, end in self.transfer.layer_groups():
                    self.transfer.load_layers(host_idx, dev_idx, first, end)
                    sync()
                    ack.layers_loaded(first, end)
            except BaseException as e:
                logger.exception("host->device copy failed")
                ack._finish(e)
                return
            self.metrics.record_transfer("h2d", nbytes, time.perf_counter() - t0)
            ack._finish()

        self._current_load = ack
        self._load_worker.submit(job)
        self._load_acks.append(ack)
        return ack

    @staticmethod
    def _finished(acks: list[TransferAck], block: bool) -> list[int]:
        """Node ids of the leading finished acks, removed from ``acks``; raises if a copy failed (a host copy that
        did not land is never served)."""
        done = 0
        for ack in acks:
            if block:
                ack.wait()
            elif not ack.done():
                break
            done += 1
        finished, acks[:done] = acks[:done], []
        out: list[int] = []
        for ack in finished:
            ack.wait()
            out += ack.node_ids
        return out

    def finished_writes(self, block: bool = False) -> list[int]:
        """Nodes whose device->host copy has landed since the last call, in submission order."""
        return self._finished(self._write_acks, block)

    def finished_loads(self) -> list[int]:
        """Nodes whose host->device load has landed since the last call."""
        return self._finished(self._load_acks, False)

    def writes_in_flight(self) -> bool:
        return bool(self._write_acks)

    # --- storage: prefetch -------------------------------------------------------------------------------------------
    def prefetch_rate_limited(self) -> bool:
        return self.prefetch_tokens_occupied >= self.prefetch_capacity_limit

    def prefetch(self, request_id: Any, tokens: list[int], last_hash: Optional[str], prefix_keys=None) -> PrefetchOperation:
        """Start a prefetch: the worker asks storage which pages exist; no host page is taken yet."""
        op = PrefetchOperation(request_id, tokens, last_hash, prefix_keys)
        self.prefetch_tokens_occupied += len(tokens)
        self._prefetch_worker.submit(lambda _: self._query(op))
        return op

    def grant_prefetch(self, op: PrefetchOperation, host_indices: torch.Tensor) -> None:
        """Give a queried prefetch host pages for its first ``len(host_indices)`` hit tokens; the worker fills them."""
        op.host_indices = host_indices
        op.hash_value = op.hash_value[: len(host_indices) // self.page_size]
        self._prefetch_worker.submit(lambda _: self._fetch(op))

    def prefetch_may_stop(self, op: PrefetchOperation) -> bool:
        """The prefetch policy: may the request stop waiting for this prefetch now?"""
        if op.io_done.is_set() or self.prefetch_policy == "best_effort":
            return True
        now = time.monotonic()
        if self.prefetch_policy in ("wait_complete", "cost_aware"):  # cost_aware: the cache may cut it sooner
            if now - op.last_progress > self.prefetch_stall_limit:
                logger.warning("prefetch for %r made no progress for %.0f s: giving up on the rest", op.request_id,
                               now - op.last_progress)
                self.metrics.record_storage_error("prefetch_stalled")
                return True
            return False
        budget = self.prefetch_timeout_base + len(op.hash_value) * self.prefetch_timeout_per_page
        return now - op.start_time > budget

    def terminate_prefetch(self, op: PrefetchOperation) -> tuple[int, list[str]]:
        """Stop accepting progress; (tokens completed, their page hashes). Pages past those are the worker's to
        hand back."""
        completed = op.mark_terminate()
        return completed, op.hash_value[: completed // self.page_size]

    def end_prefetch(self, op: PrefetchOperation) -> None:
        """The owner is done with ``op``: release its occupancy; track it while its worker still holds pages."""
        self.prefetch_tokens_occupied -= len(op.token_ids)
        if op.granted and not op.io_done.is_set():
            self._detached.append(op)

    # --- storage: backup ---------------------------------------------------------------------------------------------
    def write_storage(self, host_indices: torch.Tensor, hash_value: list[str], node_id: int, prefix_keys=None,
                      extra: Optional[dict] = None) -> None:
        """Back host pages up to storage; the node is reported by :meth:`finished_backups` when done."""
        op = BackupOperation(host_indices, hash_value, node_id, prefix_keys, extra)
        self._backups_in_flight += 1
        self._backup_worker.submit(lambda _: self._backup(op))

    def finished_backups(self) -> list[BackupOperation]:
        out = []
        while True:
            try:
                out.append(self._backup_acks.get_nowait())
            except queue.Empty:
                break
        self._backups_in_flight -= len(out)
        held = sum(1 for op in out if op.held)
        if held:
            with self._held_lock:
                self._backups_held -= held
        return out

    def backups_in_flight(self) -> int:
        """Backups still running, not counting those abandoned past the deadline (whose host pages stay protected
        until their call returns, but which nobody should wait for)."""
        with self._held_lock:
            return self._backups_in_flight - self._backups_held

    def quarantined_tokens(self) -> int:
        """Host slots held back from reuse because a backend call past its deadline may still write them."""
        with self._held_lock:
            return self._quarantined_tokens

    # --- owner-side housekeeping ----------------------------------------------------------------------------------------
    def poll(self) -> None:
        """Free host pages the workers handed back and forget detached prefetches that finished."""
        self._detached = [op for op in self._detached if not op.io_done.is_set()]
        while True:
            try:
                idx = self._release_queue.get_nowait()
            except queue.Empty:
                return
            self.host_pool.free(idx)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Block until every device<->host copy and every detached prefetch submitted so far has finished."""
        deadline = time.monotonic() + timeout
        for ack in list(self._write_acks) + list(self._load_acks):
            ack.wait(timeout=max(0.0, deadline - time.monotonic()))
        for op in list(self._detached):
            op.io_done.wait(max(0.0, deadline - time.monotonic()))

    # --- worker jobs -------------------------------------------------------------------------------------------------
    @property
    def _guard(self) -> GuardedStorage:
        """The guarded backend, for the storage jobs (which run only when there is one)."""
        assert self.guard is not None
        return self.guard

    def _give_back(self, idx: torch.Tensor) -> None:
        if idx.numel():
            self._release_queue.put(idx)

    def _quarantine(self, call: Call, idx: torch.Tensor) -> None:
        """Keep ``idx`` out of reuse until the abandoned ``call`` returns, then hand it back."""
        n = int(idx.numel())
        with self._held_lock:
            self._quarantined_tokens += n

        def returned(_: Call) -> None:
            with self._held_lock:
                self._quarantined_tokens -= n
            self._give_back(idx)

        call.on_done(returned)

    def _storage_batch(self, what: str, fn: Callable, keys: list[str], idx: torch.Tensor, extra: Any) -> Outcome:
        """One guarded batch_get_v1 / batch_set_v1, with its bytes, time and misses counted (``get_miss`` /
        ``set_failed``; the guard counts exceptions, deadlines and invalid results)."""
        t0 = time.perf_counter()
        out: Outcome = fn(keys, idx, extra)
        seconds = time.perf_counter() - t0
        if out.ok:
            nbytes = out.ok * self.page_size * self.host_pool.spec.size_per_token
            self.metrics.record_transfer(f"storage_{what}", nbytes, seconds)
        if out.ok < len(keys) and out.answered:
            self.metrics.record_storage_error("get_miss" if what == "get" else "set_failed")
        return out

    def _query(self, op: PrefetchOperation) -> None:
        hit: list[str] = []
        try:
            if not op.is_terminated():
                hashes = hash_chain(op.token_ids, self.page_size, op.last_hash)
                for start in range(0, len(hashes), STORAGE_BATCH_PAGES):
                    batch = hashes[start : start + STORAGE_BATCH_PAGES]
                    n = self._guard.batch_exists(batch, extra_for(op.prefix_keys, hashes, start)).ok
                    hit += batch[:n]
                    if n < len(batch) or op.is_terminated():
                        break
        finally:
            op.hash_value = hit
            op.last_progress = time.monotonic()
            op.queried.set()

    def _fetch(self, op: PrefetchOperation) -> None:
        ps = self.page_size
        assert op.host_indices is not None
        held = (0, 0)  # token range of the granted pages an abandoned call still targets
        try:
            for start in range(0, len(op.hash_value), STORAGE_BATCH_PAGES):
                if op.is_terminated() or self._stop.is_set():
                    break
                keys = op.hash_value[start : start + STORAGE_BATCH_PAGES]
                lo, hi = start * ps, (start + len(keys)) * ps
                out = self._storage_batch("get", self._guard.batch_get_v1, keys, op.host_indices[lo:hi],
                                          extra_for(op.prefix_keys, op.hash_value, start))
                if out.abandoned is not None:
                    self._quarantine(out.abandoned, op.host_indices[lo:hi])
                    held = (lo, hi)
                    break
                if not op.increment(out.ok * ps) or out.ok < len(keys):
                    break
        finally:
            completed = op.mark_terminate()  # pages past what completed go back: no I/O touches them any more
            if held[1]:
                self._give_back(op.host_indices[completed : held[0]])
                self._give_back(op.host_indices[held[1] :])
            else:
                self._give_back(op.host_indices[completed:])
            op.io_done.set()

    def _backup(self, op: BackupOperation) -> None:
        ps = self.page_size
        abandoned: Optional[Call] = None
        try:
            for start in range(0, len(op.hash_value), STORAGE_BATCH_PAGES):
                keys = op.hash_value[start : start + STORAGE_BATCH_PAGES]
                idx = op.host_indices[start * ps : (start + len(keys)) * ps]
                out = self._storage_batch("set", self._guard.batch_set_v1, keys, idx,
                                          extra_for(op.prefix_keys, op.hash_value, start, op.extra))
                op.completed_tokens += out.ok * ps
                abandoned = out.abandoned
                if out.ok < len(keys):
                    break
        finally:
            if abandoned is None:
                self._backup_acks.put(op)
            else:  # the backend may still be reading the node's host pages: ack (unprotect) once it returns
                op.held = True
                with self._held_lock:
                    self._backups_held += 1
                abandoned.on_done(lambda _: self._backup_acks.put(op))

    # --- lifecycle ---------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the workers and close the backend, each bounded: calls still waiting on the backend are abandoned."""
        self._stop.set()
        if self.guard is not None:
            self.guard.interrupt()
        for w in self._workers:
            w.stop()
        if self.guard is not None:
            self.guard.close()
        self.device_pool.set_layer_waiter(None)
