"""What operators and the upper rooms (serve, certify, faults) ask of the cache besides requests: storage attached
and detached at run time (SGLang's ``/hicache/storage-backend``), emptying the local tiers (``/flush_cache``), the
backend's stats, and a wrapper put around the backend (fault injection). Part of
:class:`~hicache_core.cache.hiradix.HiRadixCache`; the owner thread calls these while no request is in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

from hicache_core.config import HiCacheConfig
from hicache_core.errors import ConfigError
from hicache_core.storage import StorageV1

if TYPE_CHECKING:
    from hicache_core.cache.host_tier import HostTier
    from hicache_core.cache.restore import Restorer
    from hicache_core.controller import HiCacheController
    from hicache_core.events import KVEvents


class OperatorDoor:
    if TYPE_CHECKING:  # what it uses of the cache it is part of
        controller: Optional[HiCacheController]
        config: HiCacheConfig
        host: Optional[HostTier]
        events: KVEvents
        restorer: Restorer
        _admitting: dict

        @property
        def storage_enabled(self) -> bool: ...
        @property
        def ongoing_prefetch(self) -> dict: ...
        @property
        def device_pool(self) -> Any: ...
        @property
        def host_pool(self) -> Any: ...
        def flush(self, timeout: float = 60.0) -> None: ...
        def evict(self, num_tokens: int) -> int: ...
        def poll(self) -> None: ...
        def _rehash(self) -> None: ...

    # --- storage at runtime (SGLang's attach/detach; the owner calls these only while no request is in flight) ---
    def attach_storage(self, backend: StorageV1, config: HiCacheConfig) -> None:
        """Start the storage tier on ``backend`` (built for this cache's host pool) with ``config``."""
        if self.controller is None:
            raise ConfigError("attaching a storage backend needs the host tier (--enable-hierarchical-cache)")
        if self.storage_enabled:
            raise ConfigError(
                f"storage backend {self.config.hicache_storage_backend!r} is attached already; detach it first"
            )
        self.flush()
        self._rehash()  # nodes made before storage get their keys, chained from the root
        self.controller.attach_storage(backend, config)
        self.config = config

    def detach_storage(self) -> None:
        """Wait for the backups in flight, then stop the storage tier and close its backend."""
        if not self.storage_enabled or self.controller is None:
            raise ConfigError("no storage backend is attached")
        self.restorer.close()
        if self.ongoing_prefetch or self._admitting:
            raise ConfigError(f"{len(self.ongoing_prefetch)} storage prefetches are in flight; retry when idle")
        self.flush()
        self.controller.detach_storage()
        self.events.storage_detached()
        self.events.flush()
        self.config = self.config.replace(hicache_storage_backend=None, hicache_storage_backend_extra_config=None)

    # --- what upper rooms (serve, certify, faults) need, without reaching past the door -----------------------------
    def empty_local_tiers(self, timeout: float = 60.0) -> None:
        """Drop every unpinned page from device and host (storage keeps its pages), as SGLang's /flush_cache: the
        copies and backups in flight land first, and since write_back copies an evicted page to host first, it
        repeats until nothing more is freed. Their removal events say ``flushed``."""
        with self.events.reason("flushed"):
            for _ in range(8):
                self.flush(timeout)
                freed = self.evict(self.device_pool.size)
                if self.host is not None:
                    self.flush(timeout)
                    freed += self.host.evict(self.host_pool.size)
                if not freed:
                    break
        self.poll()

    def storage_stats(self) -> Optional[dict]:
        """The attached backend's ``get_stats()`` as a dict (bounded by its deadline); None without storage or
        when it has none."""
        io = self.controller.io if self.controller is not None else None
        if io is None:
            return None
        raw = io.guard.call_bounded("get_stats", getattr(io.guard.backend, "get_stats", lambda: None))
        return raw if isinstance(raw, dict) else getattr(raw, "__dict__", None)

    def wrap_storage(self, wrap: Callable[[Any], Any]) -> Any:
        """Put ``wrap(backend)`` between the controller and the backend it calls now (fault injection by certify,
        the soak and tests; ``wrap_storage(lambda w: w.inner)`` takes a wrapper out again); returns what it put."""
        io = self.controller.io if self.controller is not None else None
        if io is None:
            raise ConfigError("no storage backend is attached")
        io.guard.backend = wrap(io.guard.backend)
        return io.guard.backend
