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

Prefill/decode disaggregation (``disaggregation_mode``): KV goes from a prefill instance to a decode instance
through the storage tier they share. A ``prefill`` engine computes each prompt and its first token, writes the
prompt's pages through to storage and reports the request finished once they have landed there (or after
``HANDOFF_TIMEOUT_S``; decode then recomputes what is missing). A ``decode`` engine admits the same prompt with
``wait_complete`` prefetch from the first page, so it loads what prefill wrote and computes only the last partial
page; with ``offload_kvcache`` it also writes each finished request's prompt and generated tokens to storage,
where the next turn's prefill finds them. Without it, decode only reads storage.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Optional

import torch

from hicache_core.cache import HiRadixCache, NoPrefixCache, build_cache
from hicache_core.config import HiCacheConfig
from hicache_core.engine.mamba import check_fits
from hicache_core.engine.model import TinyLlama
from hicache_core.engine.request import Request, role_config
from hicache_core.errors import ConfigError
from hicache_core.keys import namespace_seed
from hicache_core.memory import DevicePool
from hicache_core.metrics import CacheMetrics

logger = logging.getLogger(__name__)
MODES = ("none", "radix", "hicache", "hicache+storage")
HANDOFF_TIMEOUT_S = 30.0  # a prefill request whose pages have not reached storage by then is answered anyway


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
        disaggregation_mode: str = "null",
        offload_kvcache: bool = False,
    ) -> None:
        """``tp``: this rank's :class:`~hicache_core.engine.tp.TPContext` when ``model`` is a rank's shard.
        ``disaggregation_mode``/``offload_kvcache``: a prefill or decode instance (see the module's docstring)."""
        if mode not in MODES:
            raise ConfigError(f"engine mode {mode!r}: choose one of {', '.join(MODES)}")
        self.model, self.mode, self.max_running, self.tp = model, mode, max_running, tp
        config = config.replace(
            model_name=config.model_name or model.config.name,
            hicache_model_fingerprint=config.hicache_model_fingerprint or model.config.fingerprint,
        )
        self.role = disaggregation_mode
        config = role_config(config, mode, disaggregation_mode, offload_kvcache)
        self.handing_off: list[tuple[Request, float]] = []  # prefill: (request, deadline)
        self.page_size = config.page_size
        self.metrics = CacheMetrics(enable_prometheus=config.enable_metrics, labels={"mode": mode})
        self.cache: HiRadixCache | NoPrefixCache
        spec = model.config.kv_spec()
        check_fits(model.config, self.page_size)  # a Mamba layer's state rides in its pages (engine/mamba.py)
        if mode == "none":  # no prefix cache: every token is computed
            pool = DevicePool(spec, device_tokens - device_tokens % self.page_size, self.page_size, model.device)
            self.cache = NoPrefixCache(config, pool, self.metrics)
        else:
            agree = None
            if tp is not None:
                from hicache_core.cache.agree import RankAgreement

                agree = RankAgreement(tp.cache_group, comm=tp.comm)
            self.cache = build_cache(
                config,
                spec,
                device_tokens,
                tiers=mode,
                device=model.device,
                metrics=self.metrics,
                tp_rank=tp.rank if tp else 0,
                tp_size=tp.size if tp else 1,
                agree=agree,
                storage_writes=disaggregation_mode != "decode" or offload_kvcache,
            )
            config = self.cache.config
        self.pool = self.cache.device_pool
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    # --- admission ---------------------------------------------------------------------------------------------------
    def _admit(self, r: Request) -> str:
        """'ready', 'wait' (prefetch in flight) or 'full' (no device room now)."""
        if self.role == "prefill":  # a prefill instance answers with the first token; decode generates the rest
            r.max_new_tokens = min(r.max_new_tokens, 1)
        need = len(r.prompt) + r.max_new_tokens
        need += -need % self.page_size
        if need > self.pool.size:
            raise ConfigError(f"request {r.rid} needs {need} device tokens; the device pool holds {self.pool.size}")
        adm = self.cache.admit(r.rid, r.prompt, r.max_new_tokens, salt=r.salt, extra_key=r.extra_key)
        now = time.perf_counter()
        if adm.status == "wait":
            r.wait_since = r.wait_since or now
        elif r.wait_since is not None:
            r.phases["prefetch_wait"] += now - r.wait_since
            r.wait_since = None
        if adm.ready:
            r.admission, r.cached, r.prefetch = adm, adm.cached, adm.prefetch
        return adm.status

    def _finish(self, r: Request) -> None:
        r.finish_time = time.perf_counter()
        assert r.admission is not None
        tokens = r.prompt + r.output[:-1]
        self.cache.release(r.admission, tokens, r.used)
        if r.retention is not None:
            if isinstance(self.cache, HiRadixCache):
                answer = self.cache.fleet.retain(r.rid, tokens, r.retention, r.salt, r.extra_key)
                r.retention_answer = answer.as_dict()
            else:
                r.retention_answer = {"status": "rejected", "reason": "this engine runs without a prefix cache"}

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
        self.cache.poll()
        return done

    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.handing_off)

    def in_flight(self) -> list[Request]:
        """Every request not yet reported finished: running, waiting, and (prefill) handing its KV to storage."""
        return list(self.running) + list(self.waiting) + [r for r, _ in self.handing_off]

    def step(self) -> tuple[list[Request], bool]:
        """One scheduler iteration over ``waiting`` and ``running``: admit, prefill the admitted, decode the rest,
        release the finished. Returns (finished requests, whether any forward pass ran)."""
        self.cache.poll()
        admitted = self._admit_waiting(self.waiting, self.running)
        if admitted:
            start = time.perf_counter()
            self.cache.ready_to_load_host_cache()
            self._prefill(admitted, start)
            self.running += admitted
        decoding = [r for r in self.running if r.finish_reason is None and r not in admitted]
        if decoding:
            self._decode(decoding)
        finished = [r for r in self.running if r.finish_reason is not None]
        for r in finished:
            self.running.remove(r)
            self._finish(r)
        if self.role == "prefill":
            finished = self._handed_off(finished)
        return finished, bool(admitted or decoding)

    def _handed_off(self, finished: list[Request]) -> list[Request]:
        """Prefill: hold each finished request until its prompt's pages are in storage (decode reads them next)."""
        deadline = time.monotonic() + HANDOFF_TIMEOUT_S
        self.handing_off += [(r, deadline) for r in finished if r.finish_reason != "abort"]
        done = [r for r in finished if r.finish_reason == "abort"]
        if not self.handing_off:
            return done
        now = time.monotonic()
        pending = [
            self.cache.backup_in_flight(r.prompt, namespace_seed(r.extra_key, r.salt)) for r, _ in self.handing_off
        ]
        late = [now > d for _, d in self.handing_off]
        agree = self.cache.agree
        if agree.active:  # tensor parallel: a page is stored once it is stored everywhere; rank 0's clock decides
            n = len(pending)
            agreed = agree.min(
                [int(not x) for x in pending] + [int(not late[i] if self.tp.rank == 0 else 1) for i in range(n)]
            )
            pending, late = [not x for x in agreed[:n]], [not x for x in agreed[n:]]
        keep = []
        for item, busy, over in zip(self.handing_off, pending, late):
            if busy and not over:
                keep.append(item)
                continue
            if busy:
                logger.warning(
                    "prefill: request %s's pages were not in storage after %.0f s; answering anyway "
                    "(decode recomputes what it cannot load)",
                    item[0].rid,
                    HANDOFF_TIMEOUT_S,
                )
            done.append(item[0])
        self.handing_off = keep
        return done

    def abort(self, r: Request) -> bool:
        """End ``r`` now wherever it is (a client gone): its pages go back, what it computed joins the tree.
        Returns False when it had already finished."""
        held = [item for item in self.handing_off if item[0] is r]
        if held:  # prefill: computed and released; its backup carries on, nobody waits for it
            self.handing_off.remove(held[0])
            return True
        if r in self.running:
            self.running.remove(r)
            r.finish_reason = "abort"
            self._finish(r)
            return True
        if r in self.waiting:
            self.waiting.remove(r)
            r.finish_reason, r.finish_time = "abort", time.perf_counter()
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

    def _prefill(self, batch: list[Request], start: float) -> None:
        """Prefill ``batch``, admitted at ``start`` (its host loads started since): first tokens, TTFT phases."""
        seqs = []
        for r in batch:
            assert r.admission is not None
            new = torch.tensor(r.prompt[len(r.admission.prefix) :], dtype=torch.int64)
            r.used = len(new)
            seqs.append((new, r.admission.own[: len(new)], r.slots()))
        t0 = time.perf_counter()
        blocked = self.pool.layer_wait_s
        logits = self.model.forward(self.pool, seqs)
        now = time.perf_counter()
        load = (t0 - start) + (self.pool.layer_wait_s - blocked)
        self.cache.record_prefill(  # what a storage load is weighed against (cost_aware prefetch)
            sum(len(s[0]) for s in seqs), now - t0 - (self.pool.layer_wait_s - blocked)
        )
        for r, tok in zip(batch, logits.argmax(-1).tolist()):
            r.first_token_time = now
            ph = r.phases
            ph["queued"] = max(0.0, start - r.arrival - ph["prefetch_wait"])
            ph["load"] = load
            ph["compute"] = max(0.0, now - start - load)
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

    # --- what a server asks of the engine (serve's scheduler and its TP followers) ----------------------------------
    def submit(self, r: Request) -> None:
        """Queue ``r``; the next :meth:`step` admits it when it fits. A request with no prompt has nothing to
        condition on (and would wait forever for a first prefill): refused here, whoever built it."""
        if not r.prompt:
            raise ValueError(f"request {r.rid!r} has an empty prompt: give at least one token")
        self.waiting.append(r)

    def forget(self, r: Request) -> None:
        """Drop ``r`` from the queues without touching the cache (after a failed step whose abort failed too)."""
        self.running = [x for x in self.running if x is not r]
        if r in self.waiting:
            self.waiting.remove(r)

    def idle(self) -> None:
        """Nothing to step: apply what finished in the background (backups land while no request runs)."""
        self.cache.poll()

    def attach_storage(self, config: HiCacheConfig) -> None:
        """Attach the storage backend ``config`` names at run time (SGLang's PUT /hicache/storage-backend)."""
        from hicache_core.cache.build import attach_backend

        if not isinstance(self.cache, HiRadixCache) or self.cache.host_pool is None:
            raise ConfigError("attaching a storage backend needs the host tier: start with --enable-hierarchical-cache")
        tp = self.tp
        attach_backend(self.cache, config, tp_rank=tp.rank if tp else 0, tp_size=tp.size if tp else 1)
        self.config, self.mode = self.cache.config, "hicache+storage"

    def detach_storage(self) -> None:
        """Wait for the backups in flight, then stop the storage tier and close its backend."""
        if not isinstance(self.cache, HiRadixCache) or not self.cache.storage_enabled:
            raise ConfigError("no storage backend is attached")
        self.cache.operator.detach_storage()
        self.config, self.mode = self.cache.config, "hicache"

    def flush(self) -> None:
        self.cache.flush()

    def close(self) -> None:
        self.cache.close()


def warm_up(model: Any, page_size: int) -> None:
    """One short request through a cache-less engine: the process's first-call costs, paid untimed."""
    engine = Engine(model, HiCacheConfig(page_size=page_size), "none", device_tokens=8 * page_size, max_running=2)
    try:
        engine.generate([Request("warm-up", list(range(min(2 * page_size, model.config.vocab_size))), 2)])
    finally:
        engine.close()
