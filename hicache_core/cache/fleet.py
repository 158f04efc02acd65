"""The cache's door to the fleet: KV events for routers, proactive restore, soft retention of sessions.

:class:`FleetDoor` is a part :class:`~hicache_core.cache.hiradix.HiRadixCache` owns (``cache.fleet``; its owner
thread calls it as it calls ``admit``): what a router, an agent framework or an operator asks of one cache beyond
serving requests. It owns the parts doing the work, :class:`~hicache_core.cache.restore.Restorer` (``restorer``) and
:class:`~hicache_core.cache.retention.Retention` (``retention``), and sees of its cache only :class:`FleetOwner`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Optional, Protocol

from hicache_core.cache.restore import DEFAULT_TTL_S, MAX_TTL_S, Restore, Restorer
from hicache_core.cache.retention import Retention, RetentionAnswer, RetentionHint, grant_key
from hicache_core.events import EventBatch
from hicache_core.keys import namespace_seed

if TYPE_CHECKING:
    from hicache_core.cache.agree import Solo
    from hicache_core.cache.host_tier import HostTier
    from hicache_core.cache.node import TreeNode
    from hicache_core.cache.prefetch import StoragePrefetcher
    from hicache_core.cache.radix import MatchResult, RadixTree
    from hicache_core.config import HiCacheConfig
    from hicache_core.events import KVEvents
    from hicache_core.metrics import CacheMetrics


class FleetOwner(Protocol):
    """What the fleet door asks of the cache that owns it."""

    @property
    def storage_enabled(self) -> bool: ...
    def match_prefix(self, tokens: Sequence[int], seed: Optional[str] = None) -> MatchResult: ...
    def rehash(self) -> None: ...


class FleetDoor:
    def __init__(
        self,
        owner: FleetOwner,
        tree: RadixTree,
        host: Optional[HostTier],
        prefetcher: Optional[StoragePrefetcher],
        events: KVEvents,
        metrics: CacheMetrics,
        agree: Solo,
        config: HiCacheConfig,
        capacity_tokens: int,
    ) -> None:
        self._owner, self._host, self._events, self._metrics, self._agree = owner, host, events, metrics, agree
        self.restorer = Restorer(tree, prefetcher, agree, metrics)
        self.retention = Retention(tree, config, capacity_tokens)

    # --- what the cache tells it -----------------------------------------------------------------------------------
    def joinable(self, tokens: Sequence[int], seed: Optional[str], matched: int) -> Optional[Restore]:
        """The running restore that is fetching what a request admitted now needs (None: none is)."""
        return self.restorer.joinable(tokens, seed, matched)

    def hit(self, node: TreeNode) -> None:
        """A request's prefix ended at ``node``: the sessions whose prefix it is stay retained longer."""
        self.retention.touch(node)

    def expire(self) -> None:
        """Retention grants past their time end (each step, first)."""
        self.retention.expire(self._agree)

    def advance(self) -> None:
        """The restores take their next steps (each step with a storage tier, after the requests' prefetches)."""
        self.restorer.poll()

    # --- KV events -------------------------------------------------------------------------------------------------
    def subscribe_events(self, fn: Callable[[EventBatch], None]) -> Callable[[], None]:
        """Call ``fn(batch)`` (on the owner thread, once per :meth:`poll` that has news) with the cache's KV events
        (:mod:`hicache_core.events`): pages stored in and removed from each tier. A
        :class:`~hicache_core.events.publisher.ZmqPublisher` puts them on the wire as vLLM does. Returns a function
        that unsubscribes. Pages cached before the first subscriber are not replayed."""
        if not self._events.active and not self._owner.storage_enabled:
            self._owner.rehash()  # event ids are page keys: nodes made while nothing needed them have none
        return self._events.subscribe(fn)

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
        self._events.name_namespace(seed, salt, extra_key)
        return self.restorer.start(op_id, list(tokens), seed, float(ttl), self._owner.storage_enabled), note

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
        m = self._owner.match_prefix(tokens, seed)
        answer, nodes = self.retention.retain(grant_key(seed, hint.session_id or key), m.last_node, hint)
        self._metrics.record_fleet("retention", answer.status)
        if self._host is not None:
            for n in nodes:
                if n.value is not None and not n.backuped:
                    self._host.write_backup(n)
        return answer

    def release_retention(
        self, session_id: Any, salt: Optional[str] = None, extra_key: Optional[str] = None
    ) -> RetentionAnswer:
        """The session (of this namespace: its tenant) is over: its prefix is evicted like any other from now on."""
        return self.retention.release(grant_key(namespace_seed(extra_key, salt), session_id))

    def sessions(self, salt: Optional[str] = None, extra_key: Optional[str] = None) -> list[dict[str, Any]]:
        """The retained prefixes of this namespace (its tenant) alone."""
        return self.retention.describe(namespace_seed(extra_key, salt))
