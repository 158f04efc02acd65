"""``kv_connector_module_path`` for vLLM: ``{"kv_connector": "HiCacheConnector", "kv_connector_module_path":
"hicache_core.vllm", "kv_role": "kv_both", ...}`` (see :mod:`hicache_core.integrations.vllm.connector`)."""

from hicache_core.integrations.vllm.connector import HiCacheConnector, HiCacheStepMeta, HiCacheWorkerMeta

__all__ = ["HiCacheConnector", "HiCacheStepMeta", "HiCacheWorkerMeta"]
