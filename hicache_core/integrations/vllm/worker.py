"""The worker half of the vLLM connector: the bytes. It holds the host tier (a hicache :class:`HostPool` whose page
is one vLLM block of every layer) and the storage backend, and does what each step's plan says: copies blocks into
host slots layer by layer during the forward, loads pages into a waiting request's blocks in the background, and
backs pages up to storage through staging pages of its own (a storage call past its deadline keeps its staging
pages, never a host slot the scheduler may reuse).

A block is copied whole between vLLM's cache and the host tier, as two halves that land in the host page's K and V
runs: the host tier holds vLLM's bytes, so a host hit costs a copy. With a :class:`BlockOrder` (the ``hicache``
page order, vLLM's CPU attention) the pages are converted at the storage boundary, off the forward's thread: a
backup's staging pages are unpacked from vLLM's kernel order into hicache's (K|V, token, head, dim) on the writer
thread, and pages read from storage are packed back on the loader thread, so storage holds the pages our engine
and SGLang hold. Without one (the ``vllm`` page order) storage holds vLLM's bytes. Tensors are found by their
block dimension, so the same code moves CPU ``[blocks, heads, tokens, 2*dim]`` and CUDA ``[2, blocks, tokens,
heads, dim]`` caches."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

import torch

from hicache_core.integrations.vllm.block_order import BlockOrder
from hicache_core.integrations.vllm.plan import LoadJob, StepPlan
from hicache_core.integrations.vllm.settings import Geometry
from hicache_core.memory import HostPool
from hicache_core.threads import background_thread

logger = logging.getLogger(__name__)


def block_view(kv: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``kv`` with its block dimension first (a view: writes reach vLLM's cache)."""
    dims = [d for d, n in enumerate(kv.shape) if n == num_blocks]
    if not dims:
        raise ValueError(f"a KV cache tensor of shape {tuple(kv.shape)} has no dimension of {num_blocks} blocks")
    return kv.movedim(dims[0], 0)


class WorkerHalf:
    """``storage``: a guarded backend (``batch_get_v1`` / ``batch_set_v1`` giving an Outcome) or None."""

    def __init__(
        self, geometry: Geometry, host_pages: int, staging_pages: int, order: Optional[BlockOrder] = None
    ) -> None:
        self.g, self.order = geometry, order
        self.host_pages, self.staging_pages = host_pages, staging_pages
        ps = geometry.block_size
        self.pool = HostPool(geometry.spec, (host_pages + staging_pages) * ps, ps, "page_first_direct")
        x = ps * geometry.kv_heads * geometry.head_size
        self.host = self.pool.kv_buffer.view(2, host_pages + staging_pages, len(geometry.layer_names), x)
        self.half = x
        self.storage: Any = None
        self.views: list[torch.Tensor] = []
        self.layer_index = {name: i for i, name in enumerate(geometry.layer_names)}
        self._free_staging = list(range(host_pages + staging_pages - 1, host_pages - 1, -1))
        self._lock = threading.Lock()
        self._loads: dict[str, tuple[Future, list[int]]] = {}
        self._loader = ThreadPoolExecutor(2, thread_name_prefix="hicache-vllm-load", initializer=background_thread)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="hicache-vllm-backup", initializer=background_thread)
        self._failed_keys: list[str] = []  # backups that failed
        self._unread: list[tuple[str, list[str]]] = []  # (request, keys) of storage reads that failed
        self._plan: Optional[StepPlan] = None
        self._saved_layers: set[int] = set()
        self.stats = dict.fromkeys(
            ("loaded_pages", "load_failed_pages", "saved_pages", "backup_pages", "backup_failed"), 0
        )

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.g.layer_names if n not in kv_caches]
        if missing:
            raise ValueError(f"vLLM registered no KV cache for layers {missing[:3]}")
        views = [block_view(kv_caches[n], self.g.num_blocks) for n in self.g.layer_names]
        for n, v in zip(self.g.layer_names, views):
            if v[0].numel() * v.element_size() != self.g.block_bytes:
                raise ValueError(
                    f"layer {n}: a block holds {v[0].numel() * v.element_size()} bytes, expected {self.g.block_bytes}"
                )
        for n, v in zip(self.g.layer_names, views):
            try:
                v[0].view(2, self.half)
            except RuntimeError:
                raise ValueError(
                    f"layer {n}: a block of shape {tuple(v[0].shape)} and strides {v[0].stride()} is not two "
                    "contiguous halves; the connector copies whole blocks"
                ) from None
        g = self.g
        want = (g.kv_heads, g.block_size, 2 * g.head_size)
        if self.order is not None and (tuple(views[0].shape[1:]) != want or self.order.numel != 2 * self.half):
            raise ValueError(
                f"the hicache page order converts CPU blocks of shape {want}; vLLM's are {tuple(views[0].shape[1:])}: "
                'set "hicache_page_order": "vllm" in kv_connector_extra_config'
            )
        self.views = views

    # --- copies ------------------------------------------------------------------------------------------------------
    def _block(self, layer: int, block: int) -> torch.Tensor:
        """One vLLM block of one layer as (2, half) -- a view, so a write lands in vLLM's cache."""
        return self.views[layer][block].view(2, self.half)

    def _to_host(self, layer: int, blocks: list[int], slots: list[int]) -> None:
        # one contiguous copy per block and half: an advanced-index assignment moved the bytes element by element
        # (6% of vLLM's forward on SmolLM2, most of the connector's all-miss overhead)
        for b, s in zip(blocks, slots):
            self.host[:, s, layer].copy_(self._block(layer, b).view(self.host.dtype))

    def _to_blocks(self, blocks: list[int], slots: list[int]) -> None:
        for layer, v in enumerate(self.views):
            for b, s in zip(blocks, slots):
                self._block(layer, b).copy_(self.host[:, s, layer].view(v.dtype))

    def _reorder(self, slots: list[int], unpack: bool) -> None:
        """Host pages ``slots`` (staging pages the caller owns) converted in place: from vLLM's block order into
        hicache's (``unpack``) or back. Nothing to do without a block order."""
        order = self.order
        if order is None or not slots:
            return
        src, dst = torch.empty(2, self.half, dtype=self.host.dtype), torch.empty(2, self.half, dtype=self.host.dtype)
        for s in slots:
            for layer in range(len(self.g.layer_names)):
                page = self.host[:, s, layer]
                src.copy_(page)
                (order.unpack if unpack else order.pack)(src, dst)
                page.copy_(dst)

    def _copy_slots(self, src: list[int], dst: list[int]) -> None:
        for a, b in zip(src, dst):  # a slot's K (and V) of every layer is one contiguous run
            self.host[:, b].copy_(self.host[:, a])

    def _tokens(self, slots: list[int]) -> torch.Tensor:
        ps = self.g.block_size
        return (torch.tensor(slots, dtype=torch.int64)[:, None] * ps + torch.arange(ps)).reshape(-1)

    # --- staging pages -----------------------------------------------------------------------------------------------
    def _take_staging(self, n: int) -> Optional[list[int]]:
        with self._lock:
            if len(self._free_staging) < n:
                return None
            return [self._free_staging.pop() for _ in range(n)]

    def _give_staging(self, slots: list[int], outcome: Any = None) -> None:
        """Back to the free list, or when the call that used them is abandoned, once it returns."""
        abandoned = getattr(outcome, "abandoned", None)
        if abandoned is not None:
            abandoned.on_done(lambda _call: self._give_staging(slots))
            return
        with self._lock:
            self._free_staging.extend(slots)

    # --- the step ----------------------------------------------------------------------------------------------------
    def bind(self, plan: StepPlan) -> None:
        """A new step: pages the step will overwrite go to storage first (write_back)."""
        self._plan = plan
        self._saved_layers = set()
        if plan.backups_before:
            self._backup(plan.backups_before)

    def save_layer(self, layer_name: str) -> None:
        plan = self._plan
        layer = self.layer_index.get(layer_name)
        if plan is None or not plan.saves or layer is None or layer in self._saved_layers:
            return
        self._to_host(layer, [b for b, _ in plan.saves], [s for _, s in plan.saves])
        self._saved_layers.add(layer)

    def after_forward(self) -> None:
        """Every layer's saves are in (layers the forward did not report are copied now); then write-through."""
        plan = self._plan
        if plan is None:
            return
        if plan.saves:
            for layer in range(len(self.views)):
                if layer not in self._saved_layers:
                    self._to_host(layer, [b for b, _ in plan.saves], [s for _, s in plan.saves])
            self.stats["saved_pages"] += len(plan.saves)
        if plan.backups_after:
            self._backup(plan.backups_after)
        self._plan = None

    def start_loads(self, plan: StepPlan) -> None:
        for job in plan.loads:
            self._loads[job.req_id] = (self._loader.submit(self._load, job), job.blocks)

    # --- storage -----------------------------------------------------------------------------------------------------
    def _backup(self, pairs: list[tuple[int, str]]) -> None:
        if self.storage is None:
            return
        staging = self._take_staging(len(pairs))
        if staging is None:
            self._failed_keys.extend(k for _, k in pairs)
            self.stats["backup_failed"] += len(pairs)
            return
        self._copy_slots([s for s, _ in pairs], staging)
        self._writer.submit(self._write, [k for _, k in pairs], staging)

    def _write(self, keys: list[str], staging: list[int]) -> None:
        self._reorder(staging, unpack=True)
        outcome = self.storage.batch_set_v1(keys, self._tokens(staging))
        self._give_staging(staging, outcome)
        self.stats["backup_pages"] += outcome.ok
        if outcome.ok < len(keys):
            with self._lock:
                self._failed_keys.extend(keys[outcome.ok :])
            self.stats["backup_failed"] += len(keys) - outcome.ok

    def _load(self, job: LoadJob) -> list[int]:
        """Fill the request's blocks; returns the blocks that could not be loaded (vLLM recomputes from there)."""
        host = [s for s in job.slots if s >= 0]
        keys = [k for k in job.keys if k is not None]
        slots, staging, outcome = list(host), None, None
        if keys:
            staging = self._take_staging(len(keys)) if self.storage is not None else None
            if staging is not None:
                outcome = self.storage.batch_get_v1(keys, self._tokens(staging))
                self._reorder(staging[: outcome.ok], unpack=False)
                slots += staging[: outcome.ok]
            got = 0 if outcome is None else outcome.ok
            if got < len(keys):
                with self._lock:
                    self._unread.append((job.req_id, keys[got:]))
        try:
            if slots:
                self._to_blocks(job.blocks[: len(slots)], slots)
        finally:
            if staging is not None:
                self._give_staging(staging, outcome)
        self.stats["loaded_pages"] += len(slots)
        self.stats["load_failed_pages"] += len(job.blocks) - len(slots)
        return job.blocks[len(slots) :]

    # --- reports -----------------------------------------------------------------------------------------------------
    def finished_loads(self) -> tuple[set[str], set[int]]:
        """(requests whose loads ended, blocks that failed to load)."""
        done, bad = set(), set()
        for rid, (fut, blocks) in list(self._loads.items()):
            if not fut.done():
                continue
            del self._loads[rid]
            done.add(rid)
            try:
                bad.update(fut.result())
            except Exception as e:  # a copy failed: nothing of it is trusted
                logger.warning("hicache vLLM connector: loading request %s failed: %s", rid, e)
                bad.update(blocks)
        return done, bad

    def take_failures(self) -> tuple[list[str], list[tuple[str, list[str]]]]:
        """(keys whose backup failed, (request, keys) of failed storage reads) since the last call."""
        with self._lock:
            out = self._failed_keys, self._unread
            self._failed_keys, self._unread = [], []
        return out

    def close(self) -> None:
        self._loader.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        if self.storage is not None:
            self.storage.close()
