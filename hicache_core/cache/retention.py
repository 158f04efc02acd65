"""Soft retention: a session's prefix outlives churn while it pauses (an agent waiting on a tool call).

A request may carry a hint -- ``retention_seconds``, a ``priority`` and a ``session_id`` -- asking the cache to keep
the prefix it just wrote. The hint is granted, clipped or rejected, and always answered (:class:`RetentionAnswer`):

* ``seconds`` past ``--hicache-retention-max-seconds`` are clipped to it; ``priority`` to ``[0, MAX_PRIORITY]``.
* Every retained prefix together may hold at most ``--hicache-retention-ratio`` of the host tier (of the device
  tier without one), and one tenant's (a namespace: ``cache_salt`` and ``extra_key``) at most
  ``--hicache-retention-tenant-ratio``. A prefix that does not fit is retained only as far as its leading nodes fit
  (clipped), or not at all (rejected).
* Grants belong to their tenant: a grant's key is ``(tenant, session)``, so two tenants' ``session_id``s never
  meet, and one tenant cannot release, replace or list another's.

Retention is soft, never a pin: eviction (device and host) takes unretained pages first, then retained ones by
priority (lowest first) and the eviction policy; a retained page is never lost to make room while an unretained
one could go instead. A device page of a retained prefix without a host copy is written to host rather than
dropped, and granting a hint writes the prefix to host (and so, with a storage tier, to storage). A grant lasts
``seconds`` from its last use: any request that hits the prefix refreshes it. Closing the session releases it;
a later hint of the same session replaces its grant (the conversation moved on).
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import attrs

from hicache_core.cache.node import TreeNode
from hicache_core.cache.radix import RadixTree

MAX_PRIORITY = 100
MAX_GRANTS = 4096


@attrs.frozen
class RetentionHint:
    seconds: float
    priority: int = 0
    session_id: Optional[str] = None


@attrs.frozen
class RetentionAnswer:
    status: str  # accepted | clipped | rejected | released
    seconds: float = 0.0
    priority: int = 0
    tokens: int = 0  # prompt tokens retained
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define(eq=False)
class Grant:
    key: Any
    node: TreeNode
    seconds: float
    priority: int
    until: float
    tokens: int


class Retention:
    """The grants of one cache; owner thread only."""

    def __init__(self, tree: RadixTree, config: Any, tier_tokens: int) -> None:
        self.tree = tree
        self.budget = int(config.hicache_retention_ratio * tier_tokens)
        tenant_ratio = getattr(config, "hicache_retention_tenant_ratio", None)
        self.tenant_budget = self.budget if tenant_ratio is None else min(self.budget, int(tenant_ratio * tier_tokens))
        self.max_seconds = float(config.hicache_retention_max_seconds)
        self.grants: dict[Any, Grant] = {}
        tree.retained = self.ranks

    def _path(self, node: TreeNode) -> list[TreeNode]:
        """``node`` and its ancestors up to its namespace's root (excluded), deepest first."""
        out = []
        while node.parent is not None and node is not self.tree.root and node.seed is None:
            out.append(node)
            node = node.parent
        return out

    def active(self) -> list[Grant]:
        return list(self.grants.values())

    def expire(self, agree: Any) -> None:
        """Drop the grants whose time is up (the cache's ``poll``). Tensor-parallel ranks drop a grant once every
        rank's clock says so: eviction order must be the same on every rank."""
        if not self.grants:
            return
        now = time.monotonic()
        keys = list(self.grants)
        late = [int(self.grants[k].until < now) for k in keys]
        if agree.active:
            late = agree.min(late)
        for key, gone in zip(keys, late):
            if gone:
                del self.grants[key]

    def retained_tokens(self, skip: Any = None, tenant: Any = ...) -> tuple[set[int], int]:
        """Node ids and tokens retained by every grant but ``skip`` (only ``tenant``'s grants, when given)."""
        seen: set[int] = set()
        total = 0
        for g in self.active():
            if g.key == skip or (tenant is not ... and tenant_of(g.key) != tenant):
                continue
            for n in self._path(g.node):
                if n.id not in seen:
                    seen.add(n.id)
                    total += len(n.key)
        return seen, total

    def retain(self, key: Any, node: TreeNode, hint: RetentionHint) -> tuple[RetentionAnswer, list[TreeNode]]:
        """Grant ``hint`` for the prefix ending at ``node`` under ``key`` (its session, or its request); returns
        the answer and the nodes now retained (deepest first)."""
        if not isinstance(hint.seconds, (int, float)) or not math.isfinite(hint.seconds) or hint.seconds <= 0:
            return RetentionAnswer("rejected", reason="retention_seconds must be a number > 0"), []
        if self.budget <= 0 or self.max_seconds <= 0:
            return RetentionAnswer("rejected", reason="retention is off on this server (--hicache-retention-ratio)"), []
        notes = []
        seconds = float(hint.seconds)
        if seconds > self.max_seconds:
            seconds = self.max_seconds
            notes.append(f"retention_seconds clipped to {self.max_seconds:g} (--hicache-retention-max-seconds)")
        priority = min(max(int(hint.priority), 0), MAX_PRIORITY)
        if priority != hint.priority:
            notes.append(f"priority clipped to {priority} (0..{MAX_PRIORITY})")
        path = self._path(node)
        if not path:
            return RetentionAnswer("rejected", reason="nothing of the prompt is cached in whole pages"), []
        if key not in self.grants and len(self.active()) >= MAX_GRANTS:
            return RetentionAnswer("rejected", reason=f"{MAX_GRANTS} prefixes are retained already"), []
        seen, used = self.retained_tokens(skip=key)
        mine_seen, mine = self.retained_tokens(skip=key, tenant=tenant_of(key))
        keep: list[TreeNode] = []
        want = sum(len(n.key) for n in path)
        full = ""
        for n in reversed(path):  # from the top: a retained prefix is a prefix
            extra = 0 if n.id in seen else len(n.key)
            extra_mine = 0 if n.id in mine_seen else len(n.key)
            room = min(self.budget - used, self.tenant_budget - mine)
            if extra > self.budget - used or extra_mine > self.tenant_budget - mine:
                full = (
                    f"the retention budget ({self.budget} tokens, --hicache-retention-ratio)"
                    if extra > self.budget - used
                    else f"this tenant's retention budget ({self.tenant_budget} tokens, "
                    "--hicache-retention-tenant-ratio)"
                )
                room = self.tree._page_align(min(room, len(n.key)))
                if room > 0:  # the pages that fit: the node's upper part
                    keep.append(self.tree._split(n, room))
                break
            used += extra
            mine += extra_mine
            keep.append(n)
        if not keep:
            self.grants.pop(key, None)
            return RetentionAnswer("rejected", reason=f"{full} is full"), []
        tokens = sum(len(n.key) for n in keep)
        if tokens < want:
            notes.append(f"{tokens} of {want} tokens retained: {full} is full")
        now = time.monotonic()
        self.grants[key] = Grant(key, keep[-1], seconds, priority, now + seconds, tokens)
        status = "clipped" if notes else "accepted"
        return RetentionAnswer(status, seconds, priority, tokens, "; ".join(notes)), keep[::-1]

    def touch(self, node: TreeNode) -> None:
        """A request matched up to ``node``: grants on that path (above or below it) last ``seconds`` from now."""
        if not self.grants:
            return
        path_ids = {n.id for n in self._path(node)}
        now = time.monotonic()
        for g in self.active():
            if g.node.id in path_ids or any(n is node for n in self._path(g.node)):
                g.until = now + g.seconds

    def release(self, key: Any) -> RetentionAnswer:
        g = self.grants.pop(key, None)
        if g is None:
            return RetentionAnswer("rejected", reason=f"no retention is held for {key!r}")
        return RetentionAnswer("released", 0.0, g.priority, g.tokens)

    def ranks(self) -> dict[int, int]:
        """Node id -> eviction rank for retained nodes (1 + the highest priority retaining it); others rank 0 and
        go first."""
        out: dict[int, int] = {}
        for g in self.active():
            for n in self._path(g.node):
                out[n.id] = max(out.get(n.id, 0), 1 + g.priority)
        return out

    def describe(self, tenant: Any = ...) -> list[dict[str, Any]]:
        """The grants (of ``tenant`` alone, when given): each one's session (or request), tenant, tokens, priority
        and time left."""
        now = time.monotonic()
        return [
            {
                "key": session_of(g.key),
                "tenant": tenant_label(tenant_of(g.key)),
                "tokens": g.tokens,
                "priority": g.priority,
                "seconds": g.seconds,
                "remaining_seconds": round(g.until - now, 3),
            }
            for g in self.active()
            if tenant is ... or tenant_of(g.key) == tenant
        ]


def grant_key(tenant: Optional[str], session: Any) -> tuple[Optional[str], Any]:
    """A grant's key: the tenant (its namespace seed; None for unsalted requests) and the session (or request)."""
    return (tenant, session)


def tenant_of(key: Any) -> Optional[str]:
    return key[0] if isinstance(key, tuple) and len(key) == 2 else None


def session_of(key: Any) -> Any:
    return key[1] if isinstance(key, tuple) and len(key) == 2 else key


def tenant_label(tenant: Optional[str]) -> str:
    """How a tenant is named to operators: a prefix of its namespace seed (never the salt), or ``default``."""
    return "default" if tenant is None else tenant[:16]
