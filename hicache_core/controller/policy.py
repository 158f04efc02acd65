"""The storage prefetch policy: one object that decides when a prefetch starts, when its request may stop
waiting, and (``cost_aware``) when loading is not worth it. The controller owns it and builds it anew on every
attach, from the attached config; the cache only asks it.

``best_effort``: never wait. ``wait_complete``: wait for every page, with a stall guard (no progress for
max(10 s, 4x base) ends it). ``timeout``: wait at most base + per-page budget. ``cost_aware``: as
``wait_complete``, but a prefetch is skipped when loading is expected to take longer than recomputing, and cut
once it has taken as long as recomputing all of it would.

Cost model (:class:`PrefetchCost`): per request, the expected time to fetch ``n`` tokens from storage is
``latency + n / load_rate``, fitted (least squares) on the recent prefetches that ran to completion (query and
reads, as the request would wait for them); the expected time to recompute them is ``n / prefill_rate``, from the
engine's own prefills (:meth:`~hicache_core.cache.hiradix.HiRadixCache.record_prefill`). Until both rates are
measured it behaves like ``wait_complete``; one skip in ``EXPLORE_EVERY`` runs anyway, so a store that got faster
is noticed.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Optional

import attrs

from hicache_core.config import HiCacheConfig
from hicache_core.controller.operations import PrefetchOperation
from hicache_core.fit import fit_latency

logger = logging.getLogger(__name__)

EXPLORE_EVERY = 16
SAMPLES = 32
EWMA = 0.3


class PrefetchCost:
    def __init__(self) -> None:
        self.prefill_rate: Optional[float] = None  # tokens/s the engine computes prompts at
        self._loads: collections.deque[tuple[int, float]] = collections.deque(maxlen=SAMPLES)  # (tokens, seconds)
        self._skipped = 0

    # --- measurements --------------------------------------------------------------------------------------------
    def record_prefill(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        rate = tokens / seconds
        self.prefill_rate = rate if self.prefill_rate is None else (1 - EWMA) * self.prefill_rate + EWMA * rate

    def record_load(self, tokens: int, seconds: float) -> None:
        """A prefetch that fetched every page it found: ``tokens`` in ``seconds`` from its start."""
        if tokens > 0 and seconds > 0:
            self._loads.append((tokens, seconds))

    def forget_loads(self) -> None:
        self._loads.clear()
        self._skipped = 0

    def load_model(self) -> Optional[tuple[float, float]]:
        """(latency s, seconds per token) fitted on the recent loads; None before any."""
        return fit_latency(self._loads)

    # --- decisions -----------------------------------------------------------------------------------------------
    def load_s(self, tokens: int) -> Optional[float]:
        m = self.load_model()
        return None if m is None else m[0] + m[1] * tokens

    def recompute_s(self, tokens: int) -> Optional[float]:
        return None if not self.prefill_rate else tokens / self.prefill_rate

    def skip(self, tokens: int) -> bool:
        """Whether recomputing ``tokens`` is expected to be faster than loading them."""
        load, compute = self.load_s(tokens), self.recompute_s(tokens)
        if load is None or compute is None or load <= compute:
            self._skipped = 0
            return False
        self._skipped += 1
        if self._skipped >= EXPLORE_EVERY:  # now and then load anyway: the store may have got faster
            self._skipped = 0
            return False
        return True

    def cut(self, tokens: int, waited_s: float) -> bool:
        """Whether a prefetch of ``tokens`` that has run ``waited_s`` should stop: recomputing would be done."""
        compute = self.recompute_s(tokens)
        return compute is not None and waited_s > compute


@attrs.define
class PrefetchPolicy:
    """What ``--hicache-storage-prefetch-policy`` and the prefetch knobs of the extra config decide."""

    name: str
    page_size: int
    threshold: int  # tokens: shorter prompt tails are not worth a storage round trip
    capacity: int  # tokens of prefetches in flight at once (the rate limit)
    timeout_base: float
    timeout_per_page: float
    stall_limit: float  # wait_complete / cost_aware: no progress for this long ends the wait
    cost: PrefetchCost
    occupied: int = 0  # tokens of prefetches in flight

    @classmethod
    def from_config(cls, config: HiCacheConfig, capacity: int, cost: PrefetchCost) -> PrefetchPolicy:
        """The policy ``config`` names. ``cost`` is the controller's, which outlives attaches: the engine's prefill
        rate stays; load samples belonged to the backend attached before and start afresh."""
        ps = config.page_size
        cost.forget_loads()
        return cls(
            config.hicache_storage_prefetch_policy,
            ps,
            max(config.prefetch_threshold, ps),
            capacity,
            config.prefetch_timeout_base,
            ps / 1024 * config.prefetch_timeout_per_ki_token,
            max(10.0, 4 * config.prefetch_timeout_base),
            cost,
        )

    @property
    def cost_aware(self) -> bool:
        return self.name == "cost_aware"

    def refuses(self, tokens: int) -> Optional[str]:
        """Why a prefetch of ``tokens`` (page-aligned) does not start, or None: ``below_threshold``, or
        ``rate_limited`` while prefetches in flight fill the capacity. The cost check is :meth:`too_costly`, which
        tensor-parallel ranks agree on."""
        if tokens < self.threshold:
            return "below_threshold"
        if self.occupied >= self.capacity:
            return "rate_limited"
        return None

    def too_costly(self, tokens: int) -> bool:
        """``cost_aware``: recomputing ``tokens`` is expected to be faster than loading them."""
        return self.cost_aware and self.cost.skip(tokens)

    def may_stop(self, op: PrefetchOperation, now: Optional[float] = None) -> Optional[str]:
        """Why the request may stop waiting for ``op`` now (``done``, ``best_effort``, ``stalled``, ``timeout``),
        or None while it should wait."""
        if op.io_done.is_set():
            return "done"
        if self.name == "best_effort":
            return "best_effort"
        now = time.monotonic() if now is None else now
        if self.name in ("wait_complete", "cost_aware"):  # cost_aware: :meth:`cut` may end it sooner
            if now - op.last_progress > self.stall_limit:
                logger.warning(
                    "prefetch for %r made no progress for %.0f s: giving up on the rest",
                    op.request_id,
                    now - op.last_progress,
                )
                return "stalled"
            return None
        return (
            "timeout" if now - op.start_time > self.timeout_base + len(op.hash_value) * self.timeout_per_page else None
        )

    def cut(self, op: PrefetchOperation, queried: bool, now: Optional[float] = None) -> bool:
        """``cost_aware``: stop waiting once ``op`` has taken as long as recomputing its tokens would."""
        if not self.cost_aware:
            return False
        tokens = len(op.hash_value) * self.page_size if queried else len(op.token_ids)
        return self.cost.cut(tokens, (time.monotonic() if now is None else now) - op.start_time)

    def finished(self, op: PrefetchOperation) -> None:
        """``op`` has ended: one that fetched every page it was granted is a load-time sample."""
        if op.io_done.is_set() and op.host_indices is not None and op.completed_tokens == len(op.host_indices):
            self.cost.record_load(op.completed_tokens, op.last_progress - op.start_time)
