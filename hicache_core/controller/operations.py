"""The units of background work the controller runs: worker threads, and the operations they complete.

A :class:`Worker` is one thread running jobs in order; :class:`TransferAck` completes a device<->host copy
(per layer for loads); :class:`PrefetchOperation` and :class:`BackupOperation` carry one storage read or write
between the owner thread and the storage workers.
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

from hicache_core.storage.base import ExtraInfo
from hicache_core.threads import background_thread

logger = logging.getLogger(__name__)

_op_ids = itertools.count(1)
Job = Callable[[Callable[[], None]], None]


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

    def layers_loaded(self, first: int, end: int) -> None:
        """Layers ``first`` to ``end - 1`` are on the device: their readers may go."""
        for ev in self.layer_events[first:end]:
            ev.set()

    def _finish(self, error: Optional[BaseException] = None) -> None:
        self.error = error
        for ev in self.layer_events:
            ev.set()


class Worker:
    """One thread running submitted jobs in order (on a CUDA stream of its own when the device is CUDA).
    A job that raises is logged; the thread lives on."""

    def __init__(self, name: str, device: torch.device, low_priority: bool = False) -> None:
        self.name = name
        self._low_priority = low_priority
        self._q: queue.Queue[Optional[Job]] = queue.Queue()
        self._device = device
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """``job(sync)``: ``sync()`` waits until the copies issued so far have landed."""
        self._q.put(job)

    def _loop(self) -> None:
        background_thread(self._low_priority)
        stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        sync: Callable[[], None] = stream.synchronize if stream is not None else (lambda: None)
        while True:
            job = self._q.get()
            if job is None:
                return
            try:
                if stream is not None:
                    with torch.cuda.stream(stream):
                        job(sync)
                else:
                    job(sync)
            except Exception:
                logger.exception("%s: job failed", self.name)

    def stop(self, timeout: float = 30.0) -> None:
        self._q.put(None)
        self._thread.join(timeout=timeout)


class PrefetchOperation:
    """Storage -> host for one request. The prefetch worker first asks storage which pages exist
    (``queried``, ``hash_value``); only then does the owner grant host pages (``host_indices``) for the hits and
    the worker fills them in order, bumping ``completed_tokens`` only after the bytes are in place. Once
    terminated, no more progress is accepted."""

    def __init__(
        self, request_id: Any, token_ids: list[int], last_hash: Optional[str], prefix_keys: Optional[list[str]] = None
    ) -> None:
        self.id = next(_op_ids)
        self.prefix_keys = prefix_keys  # storage keys before the first page (hicache_storage_pass_prefix_keys)
        self.request_id = request_id
        self.token_ids = token_ids
        self.last_hash = last_hash
        self.hash_value: list[str] = []
        self.host_indices: Optional[torch.Tensor] = None  # granted by the owner after the query
        self.completed_tokens = 0
        self.start_time = time.monotonic()
        self.last_progress = self.start_time
        self.queried = threading.Event()  # existence query finished (hash_value final)
        self.io_done = threading.Event()  # the worker is finished with every granted page
        self.revoked = False  # too little in storage (or no host room): no pages were ever granted
        self._terminated = False
        self._lock = threading.Lock()

    @property
    def granted(self) -> bool:
        return self.host_indices is not None

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
    def __init__(
        self,
        host_indices: torch.Tensor,
        hash_value: list[str],
        node_id: int,
        prefix_keys: Optional[list[str]] = None,
        extra: Optional[dict] = None,
    ) -> None:
        self.id = next(_op_ids)
        self.prefix_keys = prefix_keys
        self.extra = extra  # the extra_info dict every batch of the backup carries (a namespace's quota)
        self.host_indices = host_indices
        self.hash_value = hash_value
        self.node_id = node_id
        self.completed_tokens = 0
        self.held = False  # a call past its deadline may still read the pages: acked when it returns


def extra_for(
    prefix_keys: Optional[list[str]], hashes: list[str], start: int, extra: Optional[dict] = None
) -> Optional[ExtraInfo]:
    """The extra info of a batch starting at page ``start`` of ``hashes``: the prefix keys plus the pages before
    it (when prefix keys are passed) and ``extra`` as its extra_info; None when neither is there."""
    if prefix_keys is None and extra is None:
        return None
    return ExtraInfo(prefix_keys=None if prefix_keys is None else prefix_keys + hashes[:start], extra_info=extra)
