"""The cache's door to the fleet: KV events for routers, proactive restore, soft retention of sessions.

:class:`FleetDoor` is part of :class:`~hicache_core.cache.hiradix.HiRadixCache` (its owner thread calls these as
it calls ``admit``): what a router, an agent framework or an operator asks of one cache beyond serving requests.
The parts doing the work: :class:`~hicache_core.events.KVEvents`, :class:`~hicache_core.cache.restore.Restorer`
and :class:`~hicache_core.cache.retention.Retention`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Optional

from hicache_core.cache.restore import DEFAULT_TTL_S, MAX_TTL_S, Restore
from hicache_core.cache.retention import RetentionAnswer, RetentionHint, grant_key
from hicache_core.events import EventBatch
from hicache_core.keys import namespace_seed

if TYPE_CHECKING:
    from hicache_core.cache.host_tier import HostTier
    from hicache_core.cache.radix import MatchResult
    from hicache_core.cache.restore import Restorer
    from hicache_core.cache.retention import Retention
    from hicache_core.events import KVEvents
    from hicache_core.metrics import CacheMetrics


class FleetDoor:
    if TYPE_CHECKING:  # what it uses of the cache it is part of
        host: Optional[HostTier]
        metrics: CacheMetrics
        events: KVEvents
        restorer: Restorer
        retention: Retention

        @property
        def storage_enabled(self) -> bool: ...
        def match_prefix(self, tokens: Sequence[int], seed: Optional[str] = None) -> MatchResult: ...
        def _rehash(self) -> None: ...

    # --- KV events -------------------------------------------------------------------------------------------------
    def subscribe_events(self, fn: Callable[[EventBatch], None]) -> Callable[[], None]:
        """Call ``fn(batch)`` (on the owner thread, once per :meth:`poll` that has news) with the cache's KV events
        (:mod:`hicache_core.events`): pages stored in and removed from each tier. A
        :class:`~hicache_core.events.publisher.ZmqPublisher` puts them on the wire as vLLM does. Returns a function
        that unsubscribes. Pages cached before the first subscriber are not replayed."""
        if not self.events.active and not self.storage_enabled:
            self._rehash()  # event ids are page keys: nodes made while nothing needed them have none
        return self.events.subscribe(fn)

    # --- proactive restore -----------------------------------------------------------------------------------------
    def restore(
        self,
        op_id: str,
        tokens: Sequence[int],
        ttl: Optional[float] = None,
        salt: Optional[str] = None,
        extra_key: Optional[str] = None,
    ) -> tuple[Restore, str]:
        """Start fetching ``tokens``' pages from storage to host ahead of the request that will need them
        (cache/restore.py). Returns the restore and a note on its TTL (``""``, or how it was clipped)."""
        note = ""
        if ttl is None:
            ttl = DEFAULT_TTL_S
        if ttl > MAX_TTL_S:
            ttl, note = MAX_TTL_S, f"ttl clipped to {MAX_TTL_S:g} s"
        seed = namespace_seed(extra_key, salt)
        self.events.name_namespace(seed, salt, extra_key)
        return self.restorer.start(op_id, list(tokens), seed, float(ttl), self.storage_enabled), note

    def restore_status(
        self, op_id: str, salt: Optional[str] = None, extra_key: Optional[str] = None
    ) -> Optional[Restore]:
        """The restore ``op_id`` of this namespace (a tenant sees only its own: another's is None, as unknown)."""
        return self.restorer.ops.get((namespace_seed(extra_key, salt), op_id))

    def cancel_restore(
        self, op_id: str, salt: Optional[str] = None, extra_key: Optional[str] = None
    ) -> Optional[Restore]:
        return self.restorer.cancel(op_id, namespace_seed(extra_key, salt))

    # --- soft retention --------------------------------------------------------------------------------------------
    def retain(
        self,
        key: Any,
        tokens: Sequence[int],
        hint: RetentionHint,
        salt: Optional[str] = None,
        extra_key: Optional[str] = None,
    ) -> RetentionAnswer:
        """Keep the cached prefix of ``tokens`` through churn for ``hint.seconds`` (cache/retention.py), under
        ``hint.session_id`` (or ``key``, the request, without one). The prefix gets a host copy now, so device
        eviction demotes it rather than drops it (and a storage tier backs it up)."""
        seed = namespace_seed(extra_key, salt)
        m = self.match_prefix(tokens, seed)
        answer, nodes = self.retention.retain(grant_key(seed, hint.session_id or key), m.last_node, hint)
        self.metrics.record_fleet("retention", answer.status)
        if self.host is not None:
            for n in nodes:
                if n.value is not None and not n.backuped:
                    self.host.write_backup(n)
        return answer

    def release_retention(
        self, session_id: Any, salt: Optional[str] = None, extra_key: Optional[str] = None
    ) -> RetentionAnswer:
        """The session (of this namespace: its tenant) is over: its prefix is evicted like any other from now on."""
        return self.retention.release(grant_key(namespace_seed(extra_key, salt), session_id))

    def sessions(self, salt: Optional[str] = None, extra_key: Optional[str] = None) -> list[dict[str, Any]]:
        """The retained prefixes of this namespace (its tenant) alone."""
        return self.retention.describe(namespace_seed(extra_key, salt))
