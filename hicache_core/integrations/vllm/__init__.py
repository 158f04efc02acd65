"""hicache inside vLLM: :class:`HiCacheConnector` (in :mod:`.connector`, which imports vLLM) and the vLLM-free
parts it is built from (settings, the scheduler's plan, the worker's copies)."""
