"""What a running server holds: the model, tokenizer, engine, scheduler and metrics, built from the flags.

Cache tiers follow SGLang's flags: ``--disable-radix-cache`` no prefix cache; the device radix cache by default;
``--enable-hierarchical-cache`` adds the host tier; a ``--hicache-storage-backend`` then adds storage (it needs the
host tier, as in SGLang). A backend can also be attached and detached at runtime while the engine is idle.
"""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from typing import Any, Optional

import attrs

from hicache_core.cache import HiRadixCache
from hicache_core.cache.build import tiers_from_flags
from hicache_core.cache.retention import RetentionHint
from hicache_core.cache.retention import tenant_label as retention_tenant_label
from hicache_core.config import HiCacheConfig
from hicache_core.engine import Engine, Request, TinyLlama
from hicache_core.engine.engine import warm_up
from hicache_core.errors import ConfigError
from hicache_core.serve.metrics import ServerMetrics
from hicache_core.serve.protocol import BadRequest, Params, check_fits
from hicache_core.serve.scheduler import Scheduler, Stream
from hicache_core.serve.tenants import TenantLimits, tenant

logger = logging.getLogger(__name__)


def engine_mode(args: argparse.Namespace) -> str:
    return tiers_from_flags(
        disable_radix_cache=args.disable_radix_cache,
        enable_hierarchical_cache=args.enable_hierarchical_cache,
        storage_backend=args.hicache_storage_backend,
    )


def load_model(args: argparse.Namespace) -> tuple[TinyLlama, Any]:
    from hicache_core.engine.checkpoint import model_from_args
    from hicache_core.engine.tokenizer import load_tokenizer

    return model_from_args(args), load_tokenizer(args.model_path)


class ServerState:
    def __init__(self, args: argparse.Namespace, config: HiCacheConfig, tp: Any = None) -> None:
        """``tp``: this rank's :class:`~hicache_core.engine.tp.TPContext` (serve/tp.py): the model is its shard."""
        self.args = args
        self.model, self.tokenizer = load_model(args)
        self.mode = engine_mode(args)
        if tp is not None:
            from hicache_core.engine.tp import shard

            self.model = shard(self.model, tp)
        if tp is None:  # first-call costs paid before the first request, not by it
            warm_up(self.model, config.page_size)
        self.engine = Engine(
            self.model,
            config,
            self.mode,
            device_tokens=args.max_total_tokens,
            max_running=args.max_running_requests,
            tp=tp,
            disaggregation_mode=args.disaggregation_mode,
            offload_kvcache=args.disaggregation_decode_enable_offload_kvcache,
        )
        self.config = self.engine.config
        self.model_name = args.served_model_name or self.model.config.name
        self.metrics = ServerMetrics(self)
        self.limits = TenantLimits(args)
        self.scheduler = Scheduler(self.engine, on_finish=self._finished, tp=tp)
        self.scheduler.target = self
        self.created = int(time.time())
        self.context = min(self.engine.pool.size, self.model.config.max_position_embeddings)
        self._publish_events(getattr(args, "kv_events_config", None), tp)

    def _publish_events(self, text: Optional[str], tp: Any) -> None:
        """``--kv-events-config``: rank 0 publishes the cache's KV events over ZMQ as vLLM does."""
        if not text:
            return
        from hicache_core.events.publisher import KVEventsConfig, ZmqPublisher

        cfg = KVEventsConfig.from_json(text)
        if not cfg.enabled or (tp is not None and tp.rank != 0):
            return
        cache = self.engine.cache
        if not isinstance(cache, HiRadixCache):
            raise ConfigError("--kv-events-config needs a prefix cache: drop --disable-radix-cache")
        publisher = ZmqPublisher(cfg, data_parallel_rank=0)
        cache.fleet.subscribe_events(publisher)
        logger.info("kv events: publishing on %s (replay: %s)", publisher.endpoint, publisher.replay_endpoint)

    # --- the fleet: proactive restore, session retention (serve/fleet.py) -------------------------------------------
    def _cache(self) -> HiRadixCache:
        cache = self.engine.cache
        if not isinstance(cache, HiRadixCache):
            raise BadRequest("this server runs without a prefix cache (--disable-radix-cache)")
        return cache

    def restore(self, op_id: str, ids: list[int], ttl: Optional[float], salt: Any, extra_key: Any) -> dict:
        cache = self._cache()
        who = tenant(salt, extra_key)
        if (who, op_id) not in cache.fleet.restorer.ops:  # joining one's own running restore is never refused
            ps = self.engine.page_size
            need = max(0, len(ids) // ps * ps - cache.match_prefix(ids, who).matched_length)
            host = cache.host_pool.size if cache.host_pool is not None else 0
            self.limits.check_restore(cache.fleet.restorer.running(), who, need, host)
        r, note = cache.fleet.restore(op_id, ids, ttl, salt, extra_key)
        return {**r.as_dict(), "notes": [note] if note else []}

    def restore_status(self, op_id: str, salt: Any, extra_key: Any) -> Optional[dict]:
        r = self._cache().fleet.restore_status(op_id, salt, extra_key)
        return None if r is None else r.as_dict()

    def cancel_restore(self, op_id: str, salt: Any, extra_key: Any) -> Optional[dict]:
        r = self._cache().fleet.cancel_restore(op_id, salt, extra_key)
        return None if r is None else r.as_dict()

    def sessions(self, salt: Any, extra_key: Any, all_tenants: bool = False) -> list[dict]:
        """The caller's tenant's retained prefixes; an operator's ``all_tenants`` lists every tenant's."""
        cache = self._cache()
        return cache.fleet.retention.describe() if all_tenants else cache.fleet.sessions(salt, extra_key)

    def close_session(self, session_id: str, salt: Any, extra_key: Any, tenant_label: Optional[str] = None) -> dict:
        """Release the caller's tenant's session; an operator names another tenant by its label (as listed)."""
        cache = self._cache()
        if tenant_label is not None:
            for key in list(cache.fleet.retention.grants):
                if key[1] == session_id and retention_tenant_label(key[0]) == tenant_label:
                    return cache.fleet.retention.release(key).as_dict()
            return {"status": "rejected", "reason": f"no retention is held for session {session_id!r}"}
        answer = cache.fleet.release_retention(session_id, salt, extra_key).as_dict()
        if answer["status"] != "released":  # the same words whether another tenant holds it or nobody does
            answer["reason"] = f"no retention is held for session {session_id!r}"
        return answer

    # --- requests -----------------------------------------------------------------------------------------------------
    def new_request(self, ids: list[int], params: Params, rid: Optional[str] = None) -> Request:
        if not ids:
            raise BadRequest("the prompt is empty: it encodes to no tokens; send at least one")
        why = (
            "the device pool"
            if self.engine.pool.size <= self.model.config.max_position_embeddings
            else "the model's max_position_embeddings"
        )
        # a prefill instance generates one token whatever max_new_tokens says (decode generates the rest)
        check_fits(
            ids, attrs.evolve(params, max_new_tokens=1) if self.engine.role == "prefill" else params, self.context, why
        )
        eos = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.tokenizer.eos_ids)
        r = Request(
            rid or uuid.uuid4().hex,
            list(ids),
            params.max_new_tokens,
            eos=eos,
            params=params,
            salt=params.cache_salt,
            extra_key=params.extra_key,
        )
        if params.retention_seconds is not None:
            r.retention = RetentionHint(params.retention_seconds, params.retention_priority, params.session_id)
        if params.stop:
            stops, tok = params.stop, self.tokenizer

            def on_token(req: Request) -> bool:
                text = tok.decode(req.output)
                return any(s in text for s in stops)

            r.on_token = on_token
        return r

    def submit(self, requests: list[Request], loop: Any) -> list[Stream]:
        """Hand ``requests`` (one tenant's: one body's) to the scheduler, or none of them (the tenant is at its limit,
        the scheduler has stopped)."""
        if not self.scheduler.alive:
            raise BadRequest(f"the scheduler has stopped ({self.scheduler.last_error or 'shutting down'})", 503)
        if requests:
            self.limits.take(tenant(requests[0].salt, requests[0].extra_key), len(requests))
        return [self.scheduler.submit(r, loop) for r in requests]

    def _finished(self, r: Request) -> None:
        """The scheduler's finish hook (finished, aborted or failed): its tenant's slot back, then metrics."""
        self.limits.give_back(tenant(r.salt, r.extra_key))
        self.metrics.finished(r)

    def text_of(self, r: Request, stop: Optional[list[str]] = None) -> str:
        """The output text; with a stop string matched, cut before it (as SGLang and OpenAI do)."""
        ids = r.output
        if ids and ids[-1] in r.eos:
            ids = ids[:-1]
        text = self.tokenizer.decode(ids)
        for s in stop or []:
            at = text.find(s)
            if at >= 0:
                text = text[:at]
        return text

    # --- storage at runtime ------------------------------------------------------------------------------------------
    def storage_info(self) -> dict:
        cache = self.engine.cache
        cfg = self.engine.config
        attached = cache.storage_enabled
        return {
            "hicache_storage_backend": cfg.hicache_storage_backend if attached else None,
            "hicache_storage_backend_extra_config": cfg.hicache_storage_backend_extra_config if attached else None,
            "hicache_storage_prefetch_policy": cfg.hicache_storage_prefetch_policy,
            "host_tier": cache.host_pool is not None,
        }

    def flush_cache(self) -> None:
        """Empty the device and host tiers (storage keeps its pages), as SGLang's /flush_cache does."""
        self.engine.cache.operator.empty_local_tiers()

    def attach(self, body: dict) -> dict:
        """PUT /hicache/storage-backend: SGLang's body (backend, extra config JSON string, prefetch policy)."""
        allowed = {
            "hicache_storage_backend",
            "hicache_storage_backend_extra_config_json",
            "hicache_storage_backend_extra_config",
            "hicache_storage_prefetch_policy",
        }
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise BadRequest(f"unknown field(s) {', '.join(unknown)}; the body takes {', '.join(sorted(allowed))}")
        name = body.get("hicache_storage_backend")
        if not isinstance(name, str) or not name:
            raise BadRequest("hicache_storage_backend (the backend's name) is required")
        extra = body.get("hicache_storage_backend_extra_config_json", body.get("hicache_storage_backend_extra_config"))
        if isinstance(extra, dict):
            import json

            extra = json.dumps(extra)
        if extra is not None and not isinstance(extra, str):
            raise BadRequest("hicache_storage_backend_extra_config_json must be a JSON string")
        if self.engine.cache.host_pool is None:
            raise BadRequest("attaching a storage backend needs the host tier: start with --enable-hierarchical-cache")
        changes: dict[str, Any] = {"hicache_storage_backend": name, "hicache_storage_backend_extra_config": extra}
        if body.get("hicache_storage_prefetch_policy") is not None:
            changes["hicache_storage_prefetch_policy"] = body["hicache_storage_prefetch_policy"]
        config = self.engine.config.replace(**changes)  # validates like the flags do (ConfigError: 400)
        self.engine.attach_storage(config)
        self.mode = self.engine.mode
        return self.storage_info()

    def detach(self) -> dict:
        if not self.engine.cache.storage_enabled:
            raise BadRequest("no storage backend is attached")
        self.engine.detach_storage()
        self.mode = self.engine.mode
        return self.storage_info()

    def close(self) -> None:
        self.scheduler.stop()
        self.engine.close()
