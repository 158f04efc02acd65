"""What operators and the upper rooms (serve, certify, faults) ask of the cache besides requests: storage attached
and detached at run time (SGLang's ``/hicache/storage-backend``), emptying the local tiers (``/flush_cache``), the
backend's stats, and a wrapper put around the backend (fault injection). A part
:class:`~hicache_core.cache.hiradix.HiRadixCache` owns (``cache.operator``), seeing of it only
:class:`OperatorOwner`; the owner thread calls these while no request is in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional, Protocol

from hicache_core.config import HiCacheConfig
from hicache_core.errors import ConfigError
from hicache_core.storage import StorageV1

if TYPE_CHECKING:
    from hicache_core.cache.fleet import FleetDoor
    from hicache_core.cache.host_tier import HostTier
    from hicache_core.controller import HiCacheController
    from hicache_core.events import KVEvents


class OperatorOwner(Protocol):
    """What the operator door asks of the cache that owns it (``config`` it replaces when storage comes or goes)."""

    config: HiCacheConfig
    controller: Optional[HiCacheController]
    host: Optional[HostTier]
    events: KVEvents
    fleet: FleetDoor

    @property
    def storage_enabled(self) -> bool: ...
    @property
    def device_pool(self) -> Any: ...
    @property
    def host_pool(self) -> Any: ...
    def admissions_in_flight(self) -> int: ...
    def flush(self, timeout: float = 60.0) -> None: ...
    def evict(self, num_tokens: int) -> int: ...
    def poll(self) -> None: ...
    def rehash(self) -> None: ...


class OperatorDoor:
    def __init__(self, owner: OperatorOwner) -> None:
        self._c = owner

    # --- storage at runtime (SGLang's attach/detach; the owner calls these only while no request is in flight) ---
    def attach_storage(self, backend: StorageV1, config: HiCacheConfig) -> None:
        """Start the storage tier on ``backend`` (built for this cache's host pool) with ``config``."""
        c = self._c
        if c.controller is None:
            raise ConfigError("attaching a storage backend needs the host tier (--enable-hierarchical-cache)")
        if c.storage_enabled:
            raise ConfigError(
                f"storage backend {c.config.hicache_storage_backend!r} is attached already; detach it first"
            )
        c.flush()
        c.rehash()  # nodes made before storage get their keys, chained from the root
        c.controller.attach_storage(backend, config)
        c.config = config

    def detach_storage(self) -> None:
        """Wait for the backups in flight, then stop the storage tier and close its backend."""
        c = self._c
        if not c.storage_enabled or c.controller is None:
            raise ConfigError("no storage backend is attached")
        c.fleet.restorer.close()
        busy = c.admissions_in_flight()
        if busy:
            raise ConfigError(f"{busy} storage prefetches are in flight; retry when idle")
        c.flush()
        c.controller.detach_storage()
        c.events.storage_detached()
        c.events.flush()
        c.config = c.config.replace(hicache_storage_backend=None, hicache_storage_backend_extra_config=None)

    # --- what upper rooms (serve, certify, faults) need, without reaching past the door -----------------------------
    def empty_local_tiers(self, timeout: float = 60.0) -> None:
        """Drop every unpinned page from device and host (storage keeps its pages), as SGLang's /flush_cache: the
        copies and backups in flight land first, and since write_back copies an evicted page to host first, it
        repeats until nothing more is freed. Their removal events say ``flushed``."""
        c = self._c
        with c.events.reason("flushed"):
            for _ in range(8):
                c.flush(timeout)
                freed = c.evict(c.device_pool.size)
                if c.host is not None:
                    c.flush(timeout)
                    freed += c.host.evict(c.host_pool.size)
                if not freed:
                    break
        c.poll()

    def storage_stats(self) -> Optional[dict]:
        """The attached backend's ``get_stats()`` as a dict (bounded by its deadline); None without storage or
        when it has none."""
        io = self._c.controller.io if self._c.controller is not None else None
        if io is None:
            return None
        raw = io.guard.call_bounded("get_stats", getattr(io.guard.backend, "get_stats", lambda: None))
        return raw if isinstance(raw, dict) else getattr(raw, "__dict__", None)

    def wrap_storage(self, wrap: Callable[[Any], Any]) -> Any:
        """Put ``wrap(backend)`` between the controller and the backend it calls now (fault injection by certify,
        the soak and tests; ``wrap_storage(lambda w: w.inner)`` takes a wrapper out again); returns what it put."""
        io = self._c.controller.io if self._c.controller is not None else None
        if io is None:
            raise ConfigError("no storage backend is attached")
        io.guard.backend = wrap(io.guard.backend)
        return io.guard.backend
