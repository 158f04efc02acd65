"""A minimal serving engine that embeds HiCache the way a real one does: the integration example.

One scheduler loop, owner of the cache:

1. ``cache.poll()`` applies finished background work.
2. Admission: ``cache.admit(rid, prompt, max_new_tokens)`` answers ``ready`` (prefix pinned, its host part
   queued to load, slots reserved for the rest), ``wait`` (a storage prefetch is in flight) or ``full``.
3. ``cache.ready_to_load_host_cache()`` starts the loads; prefill reads layer N as soon as layer N has landed.
4. Greedy decode of the running batch.
5. A finished request goes back through ``cache.release(admission, tokens, computed)``.

Modes: ``none`` (no prefix cache), ``radix`` (device-only radix cache), ``hicache`` (device + host),
``hicache+storage`` (device + host + an L3 backend).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Optional

import attrs
import torch

from hicache_core.cache import Admission, HiRadixCache, build_cache
from hicache_core.config import HiCacheConfig
from hicache_core.engine.model import TinyLlama
from hicache_core.errors import ConfigError
from hicache_core.memory import DevicePool
from hicache_core.metrics import CacheMetrics

logger = logging.getLogger(__name__)
MODES = ("none", "radix", "hicache", "hicache+storage")


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
    admission: Optional[Admission] = None  # slots: the cached prefix, then its own for computed tokens
    used: int = 0  # own slots holding KV
    eos: frozenset = frozenset()  # token ids that end the request (unless ignore_eos)
    # called on the scheduler's thread after each new token; returning True ends the request (a stop string)
    on_token: Optional[Callable[[Request], Optional[bool]]] = None
    finish_reason: Optional[str] = None  # "length", "stop" (eos or a stop condition), "abort"
    params: Any = None  # what the server built it from (tensor-parallel followers rebuild it from these)

    @property
    def ttft(self) -> float:
        return (self.first_token_time or 0.0) - self.arrival

    @property
    def cached_tokens(self) -> int:
        return sum(self.cached.values())

    def slots(self) -> torch.Tensor:
        assert self.admission is not None
        return self.admission.slots(self.used)

    def _emit(self, tok: int) -> None:
        self.output.append(tok)
        if tok in self.eos:
            self.finish_reason = "stop"
        elif len(self.output) >= self.max_new_tokens:
            self.finish_reason = "length"
        if self.on_token is not None and self.on_token(self) and self.finish_reason is None:
            self.finish_reason = "stop"


class Engine:
    """Runs requests to completion with one of the cache modes; device pool in tokens."""

    def __init__(
        self,
        model: TinyLlama,
        config: HiCacheConfig,
        mode: str = "hicache+storage",
        device_tokens: int = 1024,
        max_running: int = 4,
        tp: Any = None,
    ) -> None:
        """``tp``: this rank's :class:`~hicache_core.engine.tp.TPContext` when ``model`` is a rank's shard."""
        if mode not in MODES:
            raise ConfigError(f"engine mode {mode!r}: choose one of {', '.join(MODES)}")
        self.model, self.mode, self.max_running, self.tp = model, mode, max_running, tp
        config = config.replace(model_name=config.model_name or model.config.name)
        self.page_size = config.page_size
        self.metrics = CacheMetrics(enable_prometheus=config.enable_metrics, labels={"mode": mode})
        self.cache: Optional[HiRadixCache] = None
        spec = model.config.kv_spec()
        if mode == "none":
            self.pool = DevicePool(spec, device_tokens - device_tokens % self.page_size, self.page_size, model.device)
        else:
            agree = None
            if tp is not None:
                from hicache_core.cache.agree import RankAgreement

                agree = RankAgreement(tp.cache_group)
            self.cache = build_cache(config, spec, device_tokens, tiers=mode, device=model.device, metrics=self.metrics,
                                     tp_rank=tp.rank if tp else 0, tp_size=tp.size if tp else 1, agree=agree)
            self.pool = self.cache.device_pool
            config = self.cache.config
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    # --- admission ---------------------------------------------------------------------------------------------------
    def _admit(self, r: Request) -> str:
        """'ready', 'wait' (prefetch in flight) or 'full' (no device room now)."""
        need = len(r.prompt) + r.max_new_tokens
        need += -need % self.page_size
        if need > self.pool.size:
            raise ConfigError(f"request {r.rid} needs {need} device tokens; the device pool holds {self.pool.size}")
        if self.cache is None:  # no prefix cache: every token is computed
            own = self.pool.alloc(need)
            if own is None:
                return "full"
            r.admission = Admission(r.rid, "ready", own=own)
            self.metrics.record_request(len(r.prompt), 0, 0, 0)
            return "ready"
        adm = self.cache.admit(r.rid, r.prompt, r.max_new_tokens)
        if adm.ready:
            r.admission, r.cached = adm, adm.cached
        return adm.status

    def _finish(self, r: Request) -> None:
        r.finish_time = time.perf_counter()
        assert r.admission is not None
        if self.cache is None:
            self.pool.free(r.admission.own)
            return
        self.cache.release(r.admission, r.prompt + r.output[:-1], r.used)

    # --- the loop ----------------------------------------------------------------------------------------------------
    def generate(self, requests: list[Request], on_finish: Optional[Callable[[Request], None]] = None) -> list[Request]:
        """Run the requests to completion, greedy. A request with ``arrival`` set (``time.perf_counter()`` clock)
        joins the queue at that time; one without arrives now."""
        now = time.perf_counter()
        for r in requests:
            r.arrival = r.arrival or now
        future = deque(sorted(requests, key=lambda r: r.arrival))
        done: list[Request] = []
        while future or self.busy():  # the same on every rank (arrivals and cache decisions are agreed)
            now = time.perf_counter()
            n = 0
            while n < len(future) and future[n].arrival <= now:
                n += 1
            if self.tp is not None:  # every rank admits the same requests: rank 0's clock decides
                n = self.tp.arrivals(n)
            for _ in range(n):
                self.waiting.append(future.popleft())
            finished, worked = self.step()
            for r in finished:
                done.append(r)
                if on_finish:
                    on_finish(r)
            if not worked:
                # idle: every waiting request waits for its prefetch, or nothing has arrived yet
                nxt = future[0].arrival - time.perf_counter() if future and not self.waiting else 0.0005
                time.sleep(max(0.0, min(nxt, 0.05)))
        if self.cache:
            self.cache.poll()
        return done

    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> tuple[list[Request], bool]:
        """One scheduler iteration over ``waiting`` and ``running``: admit, prefill the admitted, decode the rest,
        release the finished. Returns (finished requests, whether any forward pass ran)."""
        if self.cache:
            self.cache.poll()
        admitted = self._admit_waiting(self.waiting, self.running)
        if admitted:
            if self.cache:
                self.cache.ready_to_load_host_cache()
            self._prefill(admitted)
            self.running += admitted
        decoding = [r for r in self.running if r.finish_reason is None and r not in admitted]
        if decoding:
            self._decode(decoding)
        finished = [r for r in self.running if r.finish_reason is not None]
        for r in finished:
            self.running.remove(r)
            self._finish(r)
        return finished, bool(admitted or decoding)

    def abort(self, r: Request) -> bool:
        """End ``r`` now wherever it is (a client gone): its pages go back, what it computed joins the tree.
        Returns False when it had already finished."""
        if r in self.running:
            self.running.remove(r)
            r.finish_reason = "abort"
            self._finish(r)
            return True
        if r in self.waiting:
            self.waiting.remove(r)
            r.finish_reason, r.finish_time = "abort", time.perf_counter()
            if self.cache:
                self.cache.abort(r.rid)  # its storage prefetch, if one is in flight
            return True
        return False

    def _admit_waiting(self, waiting: deque, running: list) -> list[Request]:
        admitted: list[Request] = []
        for _ in range(len(waiting)):
            if len(running) + len(admitted) >= self.max_running:
                break
            r = waiting.popleft()
            state = self._admit(r)
            if state == "ready":
                admitted.append(r)
                continue
            waiting.append(r)  # keeps arrival order among the waiting
            if state == "full":
                break
        return admitted

    def _prefill(self, batch: list[Request]) -> None:
        seqs = []
        for r in batch:
            assert r.admission is not None
            new = torch.tensor(r.prompt[len(r.admission.prefix) :], dtype=torch.int64)
            r.used = len(new)
            seqs.append((new, r.admission.own[: len(new)], r.slots()))
        logits = self.model.forward(self.pool, seqs)
        now = time.perf_counter()
        for r, tok in zip(batch, logits.argmax(-1).tolist()):
            r.first_token_time = now
            r._emit(tok)

    def _decode(self, batch: list[Request]) -> None:
        seqs = []
        for r in batch:
            assert r.admission is not None
            slot = r.admission.own[r.used : r.used + 1]
            r.used += 1
            seqs.append((torch.tensor([r.output[-1]]), slot, r.slots()))
        logits = self.model.forward(self.pool, seqs)
        for r, tok in zip(batch, logits.argmax(-1).tolist()):
            r._emit(tok)

    def flush(self) -> None:
        if self.cache:
            self.cache.flush()

    def close(self) -> None:
        if self.cache:
            self.cache.close()
