"""A minimal serving engine that embeds HiCache the way a real one does: the integration example.

One scheduler loop, owner of the cache:

1. ``poll()`` applies finished background work.
2. Admission: ``match_prefix``; with storage, start a prefetch of the rest and keep the request waiting until the
   prefetch policy lets it go (``check_prefetch_progress``); lock the prefix; ``init_load_back`` the host-only part;
   reserve device pages (evicting under pressure).
3. ``ready_to_load_host_cache()`` starts the loads; prefill reads layer N as soon as layer N has landed.
4. Greedy decode of the running batch.
5. A finished request is ``insert``-ed (write policies take it from there) and unlocked.

Modes: ``none`` (no prefix cache), ``radix`` (device-only radix cache), ``hicache`` (device + host),
``hicache+storage`` (device + host + an L3 backend).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Optional

import attrs
import torch

from hicache_core.cache import HiRadixCache
from hicache_core.config import HiCacheConfig, resolve_layout
from hicache_core.engine.model import TinyLlama
from hicache_core.errors import ConfigError
from hicache_core.memory import DevicePool, HostPool, host_pool_tokens
from hicache_core.metrics import CacheMetrics
from hicache_core.registry import create_backend, make_storage_config, resolve

logger = logging.getLogger(__name__)
MODES = ("none", "radix", "hicache", "hicache+storage")
_EMPTY = torch.empty(0, dtype=torch.int64)


@attrs.define(eq=False)
class Request:
    rid: str
    prompt: list[int]
    max_new_tokens: int
    output: list[int] = attrs.field(factory=list)
    arrival: float = 0.0
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    cached: dict = attrs.field(factory=lambda: {"device": 0, "host": 0, "storage": 0})
    # scheduler state
    prefix: torch.Tensor = _EMPTY  # tree-owned slots of the cached prefix (locked while running)
    own: torch.Tensor = _EMPTY  # pages this request reserved for the tokens it computes
    used: int = 0  # own slots holding KV
    lock_node: object = None
    prefetch_started: bool = False
    before_storage: int = 0

    @property
    def ttft(self) -> float:
        return (self.first_token_time or 0.0) - self.arrival

    def slots(self) -> torch.Tensor:
        return torch.cat([self.prefix, self.own[: self.used]])


class Engine:
    """Runs requests to completion with one of the cache modes; device pool in tokens."""

    def __init__(
        self,
        model: TinyLlama,
        config: HiCacheConfig,
        mode: str = "hicache+storage",
        device_tokens: int = 1024,
        max_running: int = 4,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"engine mode {mode!r}: choose one of {', '.join(MODES)}")
        if mode == "hicache+storage" and not config.hicache_storage_backend:
            raise ConfigError("mode hicache+storage needs --hicache-storage-backend")
        self.model, self.mode, self.max_running = model, mode, max_running
        ps = config.page_size
        device_tokens -= device_tokens % ps
        spec = model.config.kv_spec()
        backend_name = config.hicache_storage_backend if mode == "hicache+storage" else None
        if backend_name:
            resolved = resolve(backend_name, config.hicache_storage_backend_extra_config)
            config = resolve_layout(config, backend_page_first_only=resolved.page_first_only, backend_name=backend_name)
        self.config = config.replace(model_name=config.model_name or model.config.name)
        self.page_size = ps
        self.pool = DevicePool(spec, device_tokens, ps, model.device)
        self.metrics = CacheMetrics(enable_prometheus=config.enable_metrics, labels={"mode": mode})
        self.cache: Optional[HiRadixCache] = None
        host = storage = None
        if mode in ("hicache", "hicache+storage"):
            host = HostPool(spec, host_pool_tokens(self.config, device_tokens, spec), ps, self.config.hicache_mem_layout)
        if backend_name:
            storage = create_backend(backend_name, make_storage_config(self.config, spec), host)
        if mode != "none":
            self.cache = HiRadixCache(self.config, self.pool, host, storage, self.metrics)
        self.host_pool = host

    # --- admission ---------------------------------------------------------------------------------------------------
    def _admit(self, r: Request) -> str:
        """'ok', 'wait' (prefetch in flight) or 'full' (no device room now)."""
        c, ps = self.cache, self.page_size
        if c is None:
            return self._reserve(r, 0)
        m = c.match_prefix(r.prompt)
        if c.storage_enabled:
            if not r.prefetch_started:
                r.prefetch_started = True
                r.before_storage = m.matched_length
                c.prefetch_from_storage(r.rid, m.last_node, r.prompt[m.matched_length :])
            if not c.check_prefetch_progress(r.rid):
                return "wait"
            m = c.match_prefix(r.prompt)
        storage_hit = max(0, m.matched_length - r.before_storage) if c.storage_enabled else 0
        node = m.last_device_node
        c.inc_lock_ref(node)
        loaded = _EMPTY
        if m.host_hit_length:
            loaded, loaded_node = c.init_load_back(m.last_node)
            if len(loaded):
                c.inc_lock_ref(loaded_node)
                c.dec_lock_ref(node)
                node = loaded_node
        prefix = torch.cat([m.device_indices, loaded])
        storage = min(storage_hit, len(loaded))  # fetched pages are host-only nodes, loaded like any host hit
        tiers = {"device": len(m.device_indices), "host": len(loaded) - storage, "storage": storage}
        if len(prefix) >= len(r.prompt):  # keep at least one token to compute: redo the last page
            prefix = prefix[: len(r.prompt) - 1 - (len(r.prompt) - 1) % ps]
            trim = sum(tiers.values()) - len(prefix)
            for tier in ("storage", "host", "device"):
                cut = min(trim, tiers[tier])
                tiers[tier] -= cut
                trim -= cut
        r.prefix, r.lock_node, r.cached = prefix, node, tiers
        state = self._reserve(r, len(prefix))
        if state != "ok":
            c.dec_lock_ref(node)
            r.prefix, r.lock_node = _EMPTY, None
        return state

    def _reserve(self, r: Request, prefix_len: int) -> str:
        ps = self.page_size
        need = len(r.prompt) - prefix_len + r.max_new_tokens
        need += -need % ps
        if need > self.pool.size:
            raise ConfigError(f"request {r.rid} needs {need} device tokens; the device pool holds {self.pool.size}")
        own = self.cache.alloc_device(need) if self.cache else self.pool.alloc(need)
        if own is None:
            return "full"
        r.own, r.used = own, 0
        return "ok"

    # --- finishing ---------------------------------------------------------------------------------------------------
    def _finish(self, r: Request) -> None:
        r.finish_time = time.perf_counter()
        c, ps = self.cache, self.page_size
        if c is None:
            self.pool.free(r.own)
            return
        tokens = (r.prompt + r.output[:-1])[: len(r.prefix) + r.used]
        slots = r.slots()
        aligned = len(tokens) - len(tokens) % ps
        already = c.insert(tokens[:aligned], slots[:aligned])
        p = len(r.prefix)
        if already > p:
            self.pool.free(r.own[: already - p])  # the tree had these already: our copies go
        self.pool.free(r.own[aligned - p :])
        c.dec_lock_ref(r.lock_node)
        total = len(r.prompt)
        self.metrics.record_request(total, r.cached["device"], r.cached["host"], r.cached["storage"])

    # --- the loop ----------------------------------------------------------------------------------------------------
    def generate(self, requests: list[Request], on_finish: Optional[Callable[[Request], None]] = None) -> list[Request]:
        """Run the requests to completion, greedy. A request with ``arrival`` set (``time.perf_counter()`` clock)
        joins the queue at that time; one without arrives now."""
        now = time.perf_counter()
        for r in requests:
            r.arrival = r.arrival or now
        future = deque(sorted(requests, key=lambda r: r.arrival))
        waiting: deque[Request] = deque()
        running: list[Request] = []
        done: list[Request] = []
        while future or waiting or running:
            now = time.perf_counter()
            while future and future[0].arrival <= now:
                waiting.append(future.popleft())
            if self.cache:
                self.cache.poll()
            admitted = self._admit_waiting(waiting, running)
            if admitted:
                if self.cache:
                    self.cache.ready_to_load_host_cache()
                self._prefill(admitted)
                running += admitted
            decoding = [r for r in running if len(r.output) < r.max_new_tokens and r not in admitted]
            if decoding:
                self._decode(decoding)
            for r in [r for r in running if len(r.output) >= r.max_new_tokens]:
                running.remove(r)
                self._finish(r)
                done.append(r)
                if on_finish:
                    on_finish(r)
            if not admitted and not decoding:
                # idle: every waiting request waits for its prefetch, or nothing has arrived yet
                nxt = future[0].arrival - time.perf_counter() if future and not waiting else 0.0005
                time.sleep(max(0.0, min(nxt, 0.05)))
        if self.cache:
            self.cache.poll()
        return done

    def _admit_waiting(self, waiting: deque, running: list) -> list[Request]:
        admitted: list[Request] = []
        for _ in range(len(waiting)):
            if len(running) + len(admitted) >= self.max_running:
                break
            r = waiting.popleft()
            state = self._admit(r)
            if state == "ok":
                admitted.append(r)
                continue
            waiting.append(r)  # keeps arrival order among the waiting
            if state == "full":
                break
        return admitted

    def _prefill(self, batch: list[Request]) -> None:
        seqs = []
        for r in batch:
            p = len(r.prefix)
            new = torch.tensor(r.prompt[p:], dtype=torch.int64)
            r.used = len(new)
            seqs.append((new, r.own[: len(new)], r.slots()))
        logits = self.model.forward(self.pool, seqs)
        now = time.perf_counter()
        for r, tok in zip(batch, logits.argmax(-1).tolist()):
            r.output.append(tok)
            r.first_token_time = now

    def _decode(self, batch: list[Request]) -> None:
        seqs = []
        for r in batch:
            slot = r.own[r.used : r.used + 1]
            r.used += 1
            seqs.append((torch.tensor([r.output[-1]]), slot, r.slots()))
        logits = self.model.forward(self.pool, seqs)
        for r, tok in zip(batch, logits.argmax(-1).tolist()):
            r.output.append(tok)

    def flush(self) -> None:
        if self.cache:
            self.cache.flush()

    def close(self) -> None:
        if self.cache:
            self.cache.close()
