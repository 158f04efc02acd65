"""Proactive restore: fetch a prompt's pages from storage into the host tier before the request comes.

An agent that pauses for a tool call knows its next turn's prompt begins with what it sent so far; an operator
(or the agent framework) asks for it back while the tool runs (``POST /hicache/prefetch``, or
:meth:`~hicache_core.cache.hiradix.HiRadixCache.restore`). The pages come as a storage prefetch does, waiting
for all of them whatever the prefetch policy (nobody waits on a restore), and join the tree as host-only nodes: the
next turn is a host hit. A request that arrives while its restore is in flight joins it instead of starting a
prefetch of its own, then fetches only what the restore did not cover.

Every restore ends in one state (:data:`STATES`): ``success`` (pages landed on host; ``restored_tokens`` says how
many), ``cached`` (already on device or host: nothing to fetch), ``miss`` (storage holds none of it), ``failure``
(storage said it had pages and none came), ``declined`` (no storage tier, too few pages to be worth it, no host
room, or too many restores in flight: ``detail`` says which), ``cancelled`` (by its owner), ``expired`` (its TTL
passed first); ``running`` until then. Ended restores are kept :data:`KEEP_ENDED_S` seconds for their owner to read.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import attrs

from hicache_core.cache.prefetch import StoragePrefetcher
from hicache_core.cache.radix import RadixTree

STATES = ("running", "success", "cached", "miss", "failure", "declined", "cancelled", "expired")
DEFAULT_TTL_S = 60.0
MAX_TTL_S = 3600.0  # a longer TTL is clipped to this (and the answer says so)
MAX_RUNNING = 64  # restores in flight at once; more are declined
KEEP_ENDED_S = 300.0

_WHY_DECLINED = {
    "below_threshold": "storage holds fewer pages than the prefetch threshold",
    "rate_limited": "storage prefetches in flight fill the host tier's prefetch capacity",
    "no_host_room": "the host tier (or the namespace's host quota) has no room",
}


@attrs.define
class Restore:
    op_id: str
    tokens: list[int]
    seed: Optional[str]
    ttl: float
    deadline: float
    state: str = "running"
    detail: str = ""
    cached_tokens: int = 0  # of the prompt, on device or host when the restore began
    restored_tokens: int = 0  # brought to host from storage
    started: float = attrs.field(factory=time.monotonic)
    ended: Optional[float] = None
    found_pages: int = -1

    @property
    def key(self) -> tuple[Optional[str], str]:
        """Restores are the namespace's (its tenant's): two tenants' ``op_id``s never meet."""
        return (self.seed, self.op_id)

    @property
    def rid(self) -> tuple[str, Optional[str], str]:
        return ("restore", self.seed, self.op_id)

    def as_dict(self) -> dict[str, Any]:
        return {
            "operation_id": self.op_id,
            "state": self.state,
            "detail": self.detail,
            "prompt_tokens": len(self.tokens),
            "cached_tokens": self.cached_tokens,
            "restored_tokens": self.restored_tokens,
            "ttl_seconds": self.ttl,
            "elapsed_seconds": round((self.ended or time.monotonic()) - self.started, 6),
        }


class Restorer:
    """The restores of one cache; owner thread only. ``match(tokens, seed)`` is the cache's prefix match."""

    def __init__(self, tree: RadixTree, prefetcher: Optional[StoragePrefetcher], agree: Any, metrics: Any) -> None:
        self.tree, self.prefetcher, self.agree, self.metrics = tree, prefetcher, agree, metrics
        self.ops: dict[tuple[Optional[str], str], Restore] = {}

    def running(self) -> list[Restore]:
        return [r for r in self.ops.values() if r.state == "running"]

    def start(self, op_id: str, tokens: list[int], seed: Optional[str], ttl: float, storage: bool) -> Restore:
        """Begin restoring ``tokens`` (in the namespace ``seed``) for ``ttl`` seconds. The same ``op_id`` again
        answers the restore it names."""
        self._prune()
        if (seed, op_id) in self.ops:
            return self.ops[(seed, op_id)]
        now = time.monotonic()
        r = Restore(op_id, list(tokens), seed, ttl, now + ttl, started=now)
        self.ops[r.key] = r
        m = self.tree.match_prefix(tokens, seed)
        want = self.tree._page_align(len(tokens))
        r.cached_tokens = m.matched_length
        if want == 0:
            return self._end(r, "declined", f"the prompt is shorter than one page ({self.tree.page_size} tokens)")
        if m.matched_length >= want:
            return self._end(r, "cached", f"all {want} tokens in whole pages are on device or host")
        if not storage or self.prefetcher is None:
            return self._end(r, "declined", "no storage tier is attached: there is nothing to restore from")
        if len(self.running()) > MAX_RUNNING:
            return self._end(r, "declined", f"{MAX_RUNNING} restores are in flight; retry later")
        if not self.prefetcher.start(r.rid, m.last_node, tokens[m.matched_length : want], proactive=True):
            outcome = self.prefetcher.outcome(r.rid) or "local"
            if outcome == "local":
                return self._end(r, "cached", "nothing past the cached prefix fills a page")
            return self._end(r, "declined", _WHY_DECLINED.get(outcome, outcome))
        return r

    def poll(self) -> None:
        """Advance the running restores: end those whose pages have all landed (or never will), expire the late.
        Every rank calls this at the same point with the same restores (the checks agree across ranks)."""
        pf = self.prefetcher
        if pf is None:
            return
        now = time.monotonic()
        for r in self.running():
            ongoing = pf.ongoing.get(r.rid)
            if ongoing is not None:
                r.found_pages = max(r.found_pages, ongoing.found)
                if self.agree.any(now > r.deadline):
                    pf.abort(r.rid)
                    self._finish(r, "expired", f"its TTL ({r.ttl:g} s) passed before storage delivered")
                    continue
                if not pf.check(r.rid, complete=True):
                    continue
            self._settle(r, pf.outcome(r.rid) or "miss")

    def _settle(self, r: Restore, outcome: str) -> None:
        if outcome in ("hit", "partial"):
            self._finish(r, "success", "every page storage held is on host" if outcome == "hit" else "partial")
        elif outcome == "miss" and r.found_pages > 0:
            self._finish(r, "failure", f"storage listed {r.found_pages} pages and none could be read")
        elif outcome == "miss":
            self._finish(r, "miss", "storage holds none of the prompt's pages past the cached prefix")
        elif outcome == "timed_out":
            self._finish(r, "failure", "storage stopped answering (the prefetch stalled)")
        else:
            self._finish(r, "declined", _WHY_DECLINED.get(outcome, outcome))

    def _finish(self, r: Restore, state: str, detail: str) -> None:
        m = self.tree.match_prefix(r.tokens, r.seed)
        r.restored_tokens = max(0, m.matched_length - r.cached_tokens)
        if state == "success" and r.restored_tokens < self.tree._page_align(len(r.tokens)) - r.cached_tokens:
            detail = f"{r.restored_tokens} of {len(r.tokens) - r.cached_tokens} tokens were in storage"
        self._end(r, state, detail)

    def _end(self, r: Restore, state: str, detail: str) -> Restore:
        r.state, r.detail, r.ended = state, detail, time.monotonic()
        self.metrics.record_fleet("restores", state)
        return r

    def cancel(self, op_id: str, seed: Optional[str] = None) -> Optional[Restore]:
        r = self.ops.get((seed, op_id))
        if r is not None and r.state == "running":
            if self.prefetcher is not None:
                self.prefetcher.abort(r.rid)
            self._finish(r, "cancelled", "cancelled by its owner")
        return r

    def joinable(self, tokens, seed: Optional[str], matched: int) -> Optional[Restore]:
        """A running restore fetching pages this prompt needs next (same namespace, same tokens past ``matched``)."""
        for r in self.running():
            n = self.tree._page_align(min(len(r.tokens), len(tokens)))
            if r.seed == seed and n > matched and r.tokens[matched:n] == list(tokens[matched:n]):
                return r
        return None

    def _prune(self) -> None:
        now = time.monotonic()
        for op_id in [k for k, r in self.ops.items() if r.ended is not None and now - r.ended > KEEP_ENDED_S]:
            del self.ops[op_id]

    def close(self) -> None:
        for r in self.running():
            self.cancel(r.op_id, r.seed)
