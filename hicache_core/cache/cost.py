"""Cost-aware prefetch (``--hicache-storage-prefetch-policy cost_aware``): load from storage only when that beats
recomputing.

Per request, the expected time to fetch ``n`` tokens from storage is ``latency + n / load_rate``, fitted (least
squares) on the recent prefetches that ran to completion (query and reads, as the request would wait for them);
the expected time to recompute them is ``n / prefill_rate``, from the engine's own prefills
(:meth:`~hicache_core.cache.hiradix.HiRadixCache.record_prefill`). A prefetch whose load would take longer is
skipped; one already running is cut (the request goes ahead with what landed) once it has taken longer than
recomputing all of it would. Until both rates are measured it behaves like ``wait_complete``; one skip in
``EXPLORE_EVERY`` runs anyway, so a store that got faster is noticed.
"""

from __future__ import annotations

import collections
from typing import Optional

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

    def load_model(self) -> Optional[tuple[float, float]]:
        """(latency s, seconds per token) fitted on the recent loads; None before any."""
        if not self._loads:
            return None
        n = len(self._loads)
        mx = sum(t for t, _ in self._loads) / n
        my = sum(s for _, s in self._loads) / n
        var = sum((t - mx) ** 2 for t, _ in self._loads)
        if var > 0:
            slope = sum((t - mx) * (s - my) for t, s in self._loads) / var
            if slope > 0:
                latency = my - slope * mx
                if latency >= 0:
                    return latency, slope
        return 0.0, my / mx  # one size seen (or a noisy fit): proportional

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
