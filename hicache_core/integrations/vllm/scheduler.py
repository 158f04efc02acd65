"""The scheduler half of :class:`~hicache_core.integrations.vllm.HiCacheConnector` (it runs in vLLM's EngineCore):
page keys per request, the hit hicache can supply beyond vLLM's own prefix cache (host tier, then storage), and
the per-step plan of loads, saves and backups for the workers. Reads vLLM's request and scheduler-output objects
by attribute only."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Optional

import attrs

from hicache_core.config import HiCacheConfig
from hicache_core.integrations.vllm.events import TierEvents
from hicache_core.integrations.vllm.plan import HostIndex, LoadJob, StepPlan, StoredKeys
from hicache_core.keys import hash_chain, namespace_seed

logger = logging.getLogger(__name__)


@attrs.define
class Tracked:
    """One request the scheduler half follows."""

    request: Any
    seed: Optional[str]
    keys: list[str] = attrs.field(factory=list)
    blocks: list[int] = attrs.field(factory=list)
    hit: Optional[tuple[int, list[int], int]] = None  # (first page, host slots, storage pages) of the last match
    loading: Optional[list[int]] = None  # host slots pinned by its load, until the workers report it loaded
    done: bool = False  # finished while loading: forgotten once the workers report the load
    no_storage: bool = False  # a load from storage failed: vLLM recomputes it, and storage is not asked again


def request_seed(request: Any) -> tuple[bool, Optional[str]]:
    """(cacheable, chain seed). Multimodal inputs and prompt embeddings change KV beyond token ids: not cached.
    A LoRA adapter (name and path) and the request's cache_salt seed the chain, as vLLM folds them into its hashes."""
    if getattr(request, "mm_features", None) or getattr(request, "prompt_embeds", None) is not None:
        return False, None
    lora = getattr(request, "lora_request", None)
    extra = None if lora is None else f"lora:{getattr(lora, 'lora_name', '')}:{getattr(lora, 'lora_path', '')}"
    return True, namespace_seed(extra, getattr(request, "cache_salt", None))


class SchedulerHalf:
    """``exists(keys) -> int`` asks storage how many of ``keys`` it holds from the start (None: no storage)."""

    def __init__(self, config: HiCacheConfig, block_size: int, host_pages: int, exists: Optional[Callable]) -> None:
        self.config, self.bs = config, block_size
        self.index = HostIndex(host_pages)
        self.stored = StoredKeys()
        self.unreadable = StoredKeys(limit=1 << 16)  # keys storage claimed and then failed to deliver
        self.exists = exists
        self.tracked: dict[str, Tracked] = {}
        self._pending_loads: list[LoadJob] = []
        self._selective_backups: list[tuple[int, str]] = []
        self.stats = dict.fromkeys(("host_hit_pages", "storage_hit_pages", "saved_pages", "backup_pages"), 0)
        self.events = TierEvents(block_size)  # the host tier's and storage's changes, for vLLM's KV events

    # --- keys ----------------------------------------------------------------------------------------------------
    def _track(self, request: Any) -> Optional[Tracked]:
        t = self.tracked.get(request.request_id)
        if t is None:
            cacheable, seed = request_seed(request)
            if not cacheable:
                return None
            t = self.tracked[request.request_id] = Tracked(request, seed)
        t.request = request
        return t

    def _keys(self, t: Tracked, pages: int) -> list[str]:
        """The first ``pages`` page keys of the request (computed once, extended as it grows)."""
        if len(t.keys) < pages:
            tokens = list(t.request.all_token_ids[: pages * self.bs])
            start = len(t.keys)
            prior = t.keys[-1] if t.keys else t.seed
            t.keys.extend(hash_chain(tokens[start * self.bs :], self.bs, prior))
        return t.keys[:pages]

    # --- admission: how much hicache can load ---------------------------------------------------------------------
    def match(self, request: Any, num_computed: int) -> tuple[int, bool]:
        """(tokens hicache will load beyond ``num_computed``, load asynchronously). At least one token of the prompt
        is always left to compute; only whole pages count."""
        t = self._track(request)
        if t is None:
            return 0, False
        usable = (len(request.all_token_ids) - 1) // self.bs
        first = num_computed // self.bs
        if usable <= first:
            return 0, False
        keys = self._keys(t, usable)
        slots = self.index.run(keys[first:])
        stored = 0
        rest = keys[first + len(slots) :]
        for i, k in enumerate(rest):
            if k in self.unreadable:
                rest = rest[:i]
                break
        wanted = rest and not t.no_storage and len(rest) * self.bs >= self.config.prefetch_threshold
        if wanted and self.exists is not None:
            if t.hit is not None and t.hit[0] == first and len(t.hit[1]) == len(slots):
                stored = t.hit[2]  # asked already for this request: the answer stands until it is scheduled
            else:
                stored = self.exists(rest)
        t.hit = (first, slots, stored)
        pages = len(slots) + stored
        tokens = (first + pages) * self.bs - num_computed
        return (tokens, True) if pages and tokens > 0 else (0, False)

    def after_alloc(self, request: Any, block_ids: list[int], num_external: int) -> None:
        t = self._track(request)
        if t is None:
            return
        t.blocks = list(block_ids)
        if num_external <= 0 or t.hit is None:
            return
        first, slots, stored = t.hit
        t.hit = None
        pages = min(len(slots) + stored, num_external // self.bs, len(t.blocks) - first)
        if pages <= 0:
            return
        keys = t.keys[first : first + pages]
        host = slots[:pages]
        self.index.pin(host)
        self.index.touch(keys[: len(host)])
        t.loading = host
        page_slots = host + [-1] * (pages - len(host))
        page_keys: list[Optional[str]] = [None] * len(host) + keys[len(host) :]
        self._pending_loads.append(LoadJob(request.request_id, t.blocks[first : first + pages], page_slots, page_keys))
        self.stored.add(keys[len(host) :])
        self.stats["host_hit_pages"] += len(host)
        self.stats["storage_hit_pages"] += pages - len(host)
        if self.config.hicache_write_policy == "write_through_selective":
            self._selective_backups.extend((s, k) for s, k in zip(host, keys) if k not in self.stored)
            self.stored.add(keys[: len(host)])

    # --- each step ---------------------------------------------------------------------------------------------------
    def build(self, out: Any) -> StepPlan:
        new_blocks: dict[str, tuple[list[int], bool]] = {}
        for nr in out.scheduled_new_reqs:
            new_blocks[nr.req_id] = (list(nr.block_ids[0]), True)
        cached = out.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            ids = cached.new_block_ids[i]
            if ids is not None:
                new_blocks[rid] = (list(ids[0]), rid in cached.resumed_req_ids)
        saves: list[tuple[int, int]] = []
        before: list[tuple[int, str]] = []
        after: list[tuple[int, str]] = list(self._selective_backups)
        self._selective_backups = []
        policy = self.config.hicache_write_policy
        placed: list[int] = []  # slots this step writes: not evicted again within the step (a backup would read a
        # slot before the forward fills it, or after another page overwrote it)
        for rid, n in out.num_scheduled_tokens.items():
            t = self.tracked.get(rid)
            if t is None:
                continue
            blocks, replace = new_blocks.get(rid, ([], False))
            t.blocks = blocks if replace else t.blocks + blocks
            req = t.request
            full = min((req.num_computed_tokens + n) // self.bs, len(req.all_token_ids) // self.bs, len(t.blocks))
            for p, key in enumerate(self._keys(t, full)):
                if key in self.index:
                    continue
                slot, evicted = self.index.place(key)
                if slot is None:
                    break  # every slot pinned (loads, this step's saves): this page is not kept
                self.index.pin([slot])
                placed.append(slot)
                saves.append((t.blocks[p], slot))
                self.stats["saved_pages"] += 1
                self.events.stored(key, req, p, "CPU")
                if evicted is not None:
                    self.events.removed(evicted[0], "CPU")
                if evicted is not None and policy == "write_back" and evicted[0] not in self.stored:
                    before.append((evicted[1], evicted[0]))
                    self.stored.add([evicted[0]])
                if policy == "write_through" and key not in self.stored:
                    after.append((slot, key))
                    self.stored.add([key])
        self.index.unpin(placed)
        if self.exists is None:
            before, after = [], []
        for _, key in before + after:  # reported when planned; a backup that fails is reported removed
            self.events.stored_again(key, "STORAGE")
        self.stats["backup_pages"] += len(before) + len(after)
        loads, self._pending_loads = self._pending_loads, []
        return StepPlan(loads, saves, before, after)

    def loaded(self, req_ids: set[str]) -> None:
        """The workers finished these requests' loads: their host slots may be reused."""
        for rid in req_ids:
            t = self.tracked.get(rid)
            if t is not None and t.loading is not None:
                self.index.unpin(t.loading)
                t.loading = None
            if t is not None and t.done:
                del self.tracked[rid]

    def forget_stored(self, keys: list[str]) -> None:
        """Backups that failed: storage does not hold these after all."""
        self.stored.discard(keys)
        for key in keys:
            self.events.removed(key, "STORAGE")

    def load_failed(self, req_ids: list[str], keys: list[str]) -> None:
        """Loads from storage that failed: vLLM recomputes these requests, which must not be offered storage again
        (a backend that claims pages it cannot deliver would otherwise loop them forever), nor these keys."""
        for rid in req_ids:
            t = self.tracked.get(rid)
            if t is not None:
                t.no_storage = True
        self.stored.discard(keys)
        self.unreadable.add(keys)

    def finished(self, req_id: str) -> None:
        t = self.tracked.get(req_id)
        if t is None:
            return
        if t.loading is not None:  # finished (aborted) while loading: the workers still report the load
            t.done = True
        else:
            del self.tracked[req_id]
