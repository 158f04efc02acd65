"""The cache an engine without prefix caching holds (engine mode ``none``): the same door as
:class:`~hicache_core.cache.hiradix.HiRadixCache`, nothing shared. Every prompt token is computed; a request's
slots come straight from the device pool and go back on release. Engines call it exactly as they call the real
one, so they carry no ``if cache`` branches."""

from __future__ import annotations

from typing import Any, Optional

from hicache_core.cache.admission import FULL, READY, Admission
from hicache_core.cache.agree import Solo
from hicache_core.config import HiCacheConfig
from hicache_core.memory import DevicePool
from hicache_core.metrics import CacheMetrics


class NoOperator:
    """The operator door of a cache that keeps nothing: nothing to empty, no backend."""

    def empty_local_tiers(self, timeout: float = 60.0) -> None:
        pass

    def storage_stats(self) -> Optional[dict]:
        return None


class NoPrefixCache:
    operator = NoOperator()
    host_pool = None
    controller = None
    storage_enabled = False
    storage = None

    def __init__(self, config: HiCacheConfig, device_pool: DevicePool, metrics: Optional[CacheMetrics] = None) -> None:
        self.config, self.device_pool, self.page_size = config, device_pool, config.page_size
        self.metrics = metrics or CacheMetrics(enable_prometheus=config.enable_metrics)
        self.agree = Solo()
        self.ongoing_write_through: dict = {}
        self.ongoing_backup: dict = {}

    def admit(
        self, rid: Any, tokens, extra_tokens: int = 0, salt: Optional[str] = None, extra_key: Optional[str] = None
    ) -> Admission:
        need = len(tokens) + extra_tokens
        own = self.device_pool.alloc(need + -need % self.page_size)
        if own is None:
            return Admission(rid, FULL, salt=salt, extra_key=extra_key)
        self.metrics.record_request(len(tokens), 0, 0, 0)
        return Admission(rid, READY, own=own, salt=salt, extra_key=extra_key)

    def release(self, admission: Admission, tokens, computed: int) -> None:
        if not admission.ready:
            raise ValueError(f"request {admission.rid!r}: release() takes a ready admission, not {admission.status!r}")
        self.device_pool.free(admission.own)
        admission.status = "released"

    # nothing runs in the background, nothing is kept: the rest of the door has nothing to do
    def abort(self, rid: Any) -> None:
        pass

    def poll(self) -> None:
        pass

    def ready_to_load_host_cache(self) -> None:
        return None

    def record_prefill(self, tokens: int, seconds: float) -> None:
        pass

    def backup_in_flight(self, tokens, seed: Optional[str] = None) -> bool:
        return False

    def busy(self) -> bool:
        return False

    def flush(self, timeout: float = 60.0) -> None:
        pass

    def close(self, drain_timeout: Optional[float] = None) -> None:
        pass
