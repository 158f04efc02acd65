"""``hicache_core.sglang`` is the module path SGLang configurations name (``"module_path": "hicache_core.sglang"``);
the integration lives in :mod:`hicache_core.integrations.sglang`."""

from hicache_core.integrations.sglang import HiCacheForSGLang, through_sglang
from hicache_core.integrations.sglang_pools import SGLangHostPool

__all__ = ["HiCacheForSGLang", "SGLangHostPool", "through_sglang"]
