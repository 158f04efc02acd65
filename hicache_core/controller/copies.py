"""Device <-> host copies, and the storage tier's controller while one is attached.

The owner thread (the one that owns the tree, usually the engine's scheduler) calls everything here except the
jobs. Two :class:`~hicache_core.controller.operations.Worker` threads run the copies: write (device -> host) and load
(host -> device, layer by layer); the storage tier's workers belong to its
:class:`~hicache_core.controller.storage.StorageController` (``io``). Jobs never touch the tree or the
allocators: they finish acks, flags and the host-memory release queue, and the owner collects what finished
through :meth:`HiCacheController.finished_writes`, :meth:`finished_loads`, ``io.finished_backups`` and
:meth:`poll`. The cache only edits the tree."""

from __future__ import annotations

import logging
import queue
import time
from typing import Optional

import torch

from hicache_core.config import HiCacheConfig
from hicache_core.controller.operations import TransferAck, Worker
from hicache_core.controller.policy import PrefetchCost
from hicache_core.controller.storage import StorageController
from hicache_core.metrics import CacheMetrics
from hicache_core.storage import StorageV1
from hicache_core.transfer import HostDeviceTransfer

logger = logging.getLogger(__name__)


class HiCacheController:
    """Moves pages between tiers for a :class:`~hicache_core.cache.HiRadixCache`."""

    def __init__(
        self,
        config: HiCacheConfig,
        device_pool,
        host_pool,
        storage: Optional[StorageV1] = None,
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
        self._write_worker = Worker("hicache-write", device_pool.device, low_priority=True)  # nobody waits for it
        self._load_worker = Worker("hicache-load", device_pool.device)
        self._workers = [self._write_worker, self._load_worker]
        self._write_acks: list[TransferAck] = []
        self._load_acks: list[TransferAck] = []
        self._load_queue: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self._current_load: Optional[TransferAck] = None
        device_pool.set_layer_waiter(self._wait_layer)

        self.io: Optional[StorageController] = None  # the storage tier, while a backend is attached
        self.cost = PrefetchCost()  # what cost_aware weighs loads against; the engine's prefill rate outlives attaches
        self.prefetch_capacity = int(0.8 * max(host_pool.size - device_pool.size, host_pool.size // 2))
        self._release_queue: queue.Queue[torch.Tensor] = queue.Queue()  # host slots storage workers hand back
        if storage is not None:
            self.attach_storage(storage, config)

    def attach_storage(self, storage: StorageV1, config: HiCacheConfig) -> StorageController:
        """Start the storage tier on ``storage`` under ``config``'s prefetch policy (a runtime attach brings its own
        threshold, timeouts and policy)."""
        if self.io is not None:
            raise RuntimeError("a storage backend is attached already; detach it first")
        self.config = config
        self.io = StorageController(
            config,
            self.host_pool,
            storage,
            self.metrics,
            capacity=self.prefetch_capacity,
            cost=self.cost,
            give_back=self._release_queue.put,
        )
        return self.io

    def detach_storage(self) -> None:
        """Stop the storage tier (the owner made sure no prefetch or backup is in flight) and close the backend."""
        assert self.io is not None
        self.io.stop()
        self.io = None

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

    # --- owner-side housekeeping --------------------------------------------------------------------------------------
    def poll(self) -> None:
        """Free host pages the storage workers handed back and forget detached prefetches that finished."""
        if self.io is not None:
            self.io.poll()
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
        if self.io is not None:
            self.io.wait_idle(deadline)

    # --- lifecycle ---------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the workers and close the backend, each bounded: calls still waiting on the backend are abandoned."""
        if self.io is not None:
            self.io.stop(interrupt=True)
        for w in self._workers:
            w.stop()
        self.device_pool.set_layer_waiter(None)
