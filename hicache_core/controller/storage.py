"""The storage tier's background work: prefetch (storage -> host), backup (host -> storage), and the quarantine of
host pages that a backend call past its deadline may still touch.

A :class:`StorageController` lives from an attach (at start or at run time) to its detach; the
:class:`~hicache_core.controller.HiCacheController` that owns it outlives it. Two
:class:`~hicache_core.controller.operations.Worker` threads run the jobs; the owner thread calls everything else.
Only this class edits a :class:`~hicache_core.controller.operations.PrefetchOperation` (the worker fills it; the
owner's decisions go through the methods below); the cache edits the tree.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

import torch

from hicache_core.config import HiCacheConfig
from hicache_core.controller.operations import BackupOperation, PrefetchOperation, Worker, extra_for
from hicache_core.controller.policy import PrefetchCost, PrefetchPolicy
from hicache_core.keys import hash_chain
from hicache_core.metrics import CacheMetrics
from hicache_core.storage import StorageV1
from hicache_core.storage.guard import Call, GuardedStorage, Outcome

logger = logging.getLogger(__name__)

STORAGE_BATCH_PAGES = 128  # pages per batch_exists / batch_get_v1 / batch_set_v1 call (SGLang's storage_batch_size)


class StorageController:
    """Prefetch and backup over one guarded backend, under the prefetch policy of the config it was attached with.

    ``give_back(idx)`` returns host slots to the owner's release queue (freed on the owner thread); it outlives
    this object, so slots an abandoned call returns after a detach still come back."""

    def __init__(
        self,
        config: HiCacheConfig,
        host_pool: Any,
        storage: StorageV1,
        metrics: CacheMetrics,
        *,
        capacity: int,
        cost: PrefetchCost,
        give_back: Callable[[torch.Tensor], None],
    ) -> None:
        self.config = config
        self.host_pool = host_pool
        self.page_size = config.page_size
        self.metrics = metrics
        self.storage = storage
        self.guard = GuardedStorage(storage, metrics, timeout_s=config.io_timeout_s)
        bind = getattr(storage, "bind_metrics", None)  # the L3 codec counts the bytes that reach the store
        self._codec = callable(bind)
        if callable(bind):
            bind(metrics)
        self.policy = PrefetchPolicy.from_config(config, capacity, cost)
        self._give_back_to = give_back
        self._prefetch_worker = Worker("hicache-prefetch", torch.device("cpu"))
        self._backup_worker = Worker("hicache-backup", torch.device("cpu"))
        self._detached: list[PrefetchOperation] = []  # ended prefetches whose worker still holds granted pages
        self._backup_acks: queue.Queue[BackupOperation] = queue.Queue()
        self._backups_in_flight = 0
        self._held_lock = threading.Lock()
        self._backups_held = 0  # abandoned past the deadline: acked only once the backend call returns
        self._quarantined_tokens = 0  # host slots an abandoned call may still write: freed when it returns
        self._stop = threading.Event()

    # --- prefetch: the owner's side ----------------------------------------------------------------------------------
    def prefetch(
        self, request_id: Any, tokens: list[int], last_hash: Optional[str], prefix_keys=None
    ) -> PrefetchOperation:
        """Start a prefetch: the worker asks storage which pages exist; no host page is taken yet."""
        op = PrefetchOperation(request_id, tokens, last_hash, prefix_keys)
        self.policy.occupied += len(tokens)
        self._prefetch_worker.submit(lambda _: self._query(op))
        return op

    def keep_hits(self, op: PrefetchOperation, pages: int) -> None:
        """Keep only the first ``pages`` pages storage said it holds (what every tensor-parallel rank found)."""
        op.hash_value = op.hash_value[:pages]

    def grant_prefetch(self, op: PrefetchOperation, host_indices: torch.Tensor) -> None:
        """Give a queried prefetch host pages for its first ``len(host_indices)`` hit tokens; the worker fills them."""
        op.host_indices = host_indices
        op.hash_value = op.hash_value[: len(host_indices) // self.page_size]
        self._prefetch_worker.submit(lambda _: self._fetch(op))

    def revoke_prefetch(self, op: PrefetchOperation) -> None:
        """Too little in storage, or no host room: no page will be granted."""
        op.revoked = True

    def prefetch_may_stop(self, op: PrefetchOperation) -> Optional[str]:
        """The prefetch policy: why the request may stop waiting for this prefetch now (``done``,
        ``best_effort``, ``stalled``, ``timeout``), or None while it waits. (A stall is counted.)"""
        why = self.policy.may_stop(op)
        if why == "stalled":
            self.metrics.record_storage_error("prefetch_stalled")
        return why

    def terminate_prefetch(self, op: PrefetchOperation) -> tuple[int, list[str]]:
        """Stop accepting progress; (tokens completed, their page hashes). Pages past those are the worker's to
        hand back."""
        completed = op.mark_terminate()
        self.policy.finished(op)
        return completed, op.hash_value[: completed // self.page_size]

    def abort_prefetch(self, op: PrefetchOperation) -> int:
        """Stop ``op`` for a request that went away; returns the tokens already in place (the owner frees those
        slots, the worker hands back the rest)."""
        return op.mark_terminate()

    def end_prefetch(self, op: PrefetchOperation) -> None:
        """The owner is done with ``op``: release its occupancy; track it while its worker still holds pages."""
        self.policy.occupied -= len(op.token_ids)
        if op.granted and not op.io_done.is_set():
            self._detached.append(op)

    # --- backup ------------------------------------------------------------------------------------------------------
    def write_storage(
        self,
        host_indices: torch.Tensor,
        hash_value: list[str],
        node_id: int,
        prefix_keys=None,
        extra: Optional[dict] = None,
    ) -> None:
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

    # --- owner-side housekeeping -------------------------------------------------------------------------------------
    def poll(self) -> None:
        """Forget detached prefetches that finished."""
        self._detached = [op for op in self._detached if not op.io_done.is_set()]

    def wait_idle(self, deadline: float) -> None:
        """Block until every detached prefetch submitted so far has finished (or ``deadline`` passes)."""
        for op in list(self._detached):
            op.io_done.wait(max(0.0, deadline - time.monotonic()))

    def stop(self, interrupt: bool = False) -> None:
        """Stop the workers and close the backend; ``interrupt`` first abandons calls still waiting on it."""
        self._stop.set()
        if interrupt:
            self.guard.interrupt()
        for w in (self._prefetch_worker, self._backup_worker):
            w.stop()
        self.guard.close()

    # --- worker jobs -------------------------------------------------------------------------------------------------
    def _give_back(self, idx: torch.Tensor) -> None:
        if idx.numel():
            self._give_back_to(idx)

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
            if not self._codec:
                self.metrics.record_stored(what, nbytes)
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
                    n = self.guard.batch_exists(batch, extra_for(op.prefix_keys, hashes, start)).ok
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
                out = self._storage_batch(
                    "get",
                    self.guard.batch_get_v1,
                    keys,
                    op.host_indices[lo:hi],
                    extra_for(op.prefix_keys, op.hash_value, start),
                )
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
                out = self._storage_batch(
                    "set", self.guard.batch_set_v1, keys, idx, extra_for(op.prefix_keys, op.hash_value, start, op.extra)
                )
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
