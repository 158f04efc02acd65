"""Engines that embed hicache from outside, one module each, each importing its engine lazily:
``sglang`` (:class:`~hicache_core.integrations.sglang.HiCacheForSGLang`: hicache's backends inside SGLang, and
SGLang's host pools under hicache's backends). SGLang's own backend classes run inside hicache through the
registry (``hicache_core/storage/foreign.py``), which sits below this layer."""
