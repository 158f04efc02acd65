"""``hicache_core.sglang`` is the module path SGLang configurations name (``"module_path": "hicache_core.sglang"``);
the integration lives in :mod:`hicache_core.integrations.sglang`."""

from hicache_core.integrations.sglang import HiCacheForSGLang, SGLangHostPool, through_sglang

__all__ = ["HiCacheForSGLang", "SGLangHostPool", "through_sglang"]
