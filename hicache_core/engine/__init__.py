"""A minimal paged-attention engine (tiny llama-style model) that embeds HiCache: the integration example,
the end-to-end test bed and the benchmark's workload."""

from hicache_core.engine.engine import MODES, Engine, Request
from hicache_core.engine.model import TinyLlama
from hicache_core.engine.model_config import ModelConfig

__all__ = ["MODES", "Engine", "ModelConfig", "Request", "TinyLlama"]
