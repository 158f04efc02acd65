"""Counters per tier and outcome, as a stats dict and (with ``--enable-metrics``) Prometheus text.

Tiers: ``device`` (L1), ``host`` (L2), ``storage`` (L3). Background threads update storage counters, so every
update takes a lock. Names follow SGLang's where one exists (``prefetched_tokens``, ``backuped_tokens``).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any, Optional

TIERS = ("device", "host", "storage")
MAX_SALTS = 1024  # salts counted apart; the rest count as "other"
DIRECTIONS = ("h2d", "d2h", "storage_get", "storage_set")


class CacheMetrics:
    """Thread-safe counters. ``stats()`` returns a plain dict; ``prometheus_text()`` the exposition format."""

    def __init__(self, enable_prometheus: bool = False, labels: Optional[dict[str, str]] = None) -> None:
        self._lock = threading.Lock()
        self.labels = dict(labels or {})
        self.reset()
        self._prom = _Prometheus(self.labels) if enable_prometheus else None

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.prompt_tokens = 0
            self.hit_tokens = dict.fromkeys(TIERS, 0)
            self.evicted_tokens = dict.fromkeys(TIERS, 0)
            self.prefetched_tokens = 0
            self.prefetch_revoked = 0
            self.prefetch_terminated_early = 0
            self.prefetch_skipped_cost = 0  # cost_aware: recomputing was expected to be faster than loading
            self.prefetch_cut_cost = 0  # cost_aware: stopped waiting once recomputing would have been done
            self.backuped_tokens = 0
            self.storage_held_back_tokens = 0  # host copies kept out of storage by --hicache-storage-admission
            self.loaded_back_tokens = 0
            self.storage_errors: dict[str, int] = defaultdict(int)
            self.prefetch_outcomes: dict[str, int] = defaultdict(int)  # cache/prefetch.py's OUTCOMES
            # how restores ended (cache/restore.py's STATES) and retention hints were answered (cache/retention.py)
            self.restores: dict[str, int] = defaultdict(int)
            self.retention: dict[str, int] = defaultdict(int)
            self.transfer_bytes = dict.fromkeys(DIRECTIONS, 0)
            self.transfer_seconds = dict.fromkeys(DIRECTIONS, 0.0)
            # bytes that crossed to (set) and from (get) the store: the L3 codec's output, else the pages' bytes;
            # and the codec's time encoding (set) and decoding (get)
            self.storage_stored_bytes = {"set": 0, "get": 0}
            self.codec_seconds = {"set": 0.0, "get": 0.0}
            self.per_salt: dict[str, dict[str, Any]] = {}

    # --- updates ---------------------------------------------------------------------------------------------------
    def record_request(
        self, prompt_tokens: int, device: int, host: int, storage: int, salt: Optional[str] = None
    ) -> None:
        label = None if salt is None else salt_label(salt, self.per_salt)
        with self._lock:
            self.requests += 1
            self.prompt_tokens += prompt_tokens
            for tier, n in zip(TIERS, (device, host, storage)):
                self.hit_tokens[tier] += n
            if label is not None:
                s = self.per_salt.setdefault(
                    label, {"requests": 0, "prompt_tokens": 0, "hit_tokens": dict.fromkeys(TIERS, 0)}
                )
                s["requests"] += 1
                s["prompt_tokens"] += prompt_tokens
                for tier, n in zip(TIERS, (device, host, storage)):
                    s["hit_tokens"][tier] += n
        if self._prom:
            self._prom.request(prompt_tokens, device, host, storage, label)

    def record_transfer(self, direction: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.transfer_bytes[direction] += nbytes
            self.transfer_seconds[direction] += seconds
        if self._prom:
            self._prom.transfer(direction, nbytes, seconds)

    def record_stored(self, direction: str, nbytes: int, codec_seconds: float = 0.0) -> None:
        """Bytes that reached the store (``set``) or came from it (``get``), and the codec's time on them."""
        with self._lock:
            self.storage_stored_bytes[direction] += nbytes
            self.codec_seconds[direction] += codec_seconds
        if self._prom:
            self._prom.count("storage_stored_bytes", nbytes, direction=direction)

    def record_evicted(self, tier: str, tokens: int) -> None:
        with self._lock:
            self.evicted_tokens[tier] += tokens
        if self._prom:
            self._prom.count("evicted_tokens", tokens, tier=tier)

    def record_storage_error(self, kind: str) -> None:
        """kind: exception, timeout, short_read, failed_write, corrupt, ..."""
        with self._lock:
            self.storage_errors[kind] += 1
        if self._prom:
            self._prom.count("storage_errors", 1, kind=kind)

    def record_prefetch_outcome(self, outcome: str) -> None:
        """How one request's storage prefetch ended: hit, partial, miss, cut, timed_out, ... (cache/prefetch.py)."""
        with self._lock:
            self.prefetch_outcomes[outcome] += 1
        if self._prom:
            self._prom.count("prefetch_outcomes", 1, outcome=outcome)

    def record_fleet(self, what: str, outcome: str) -> None:
        """A restore ended (``what="restores"``) or a retention hint was answered (``"retention"``)."""
        with self._lock:
            getattr(self, what)[outcome] += 1
        if self._prom:
            self._prom.count(what, 1, outcome=outcome)

    def add(self, name: str, n: int) -> None:
        """Bump a scalar counter: prefetched_tokens, backuped_tokens, loaded_back_tokens, prefetch_revoked, ..."""
        with self._lock:
            setattr(self, name, getattr(self, name) + n)
        if self._prom:
            self._prom.count(name, n)

    # --- reads -----------------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            hits = sum(self.hit_tokens.values())
            return {
                "requests": self.requests,
                "prompt_tokens": self.prompt_tokens,
                "hit_tokens": dict(self.hit_tokens),
                "cache_hit_rate": hits / self.prompt_tokens if self.prompt_tokens else 0.0,
                "evicted_tokens": dict(self.evicted_tokens),
                "prefetched_tokens": self.prefetched_tokens,
                "prefetch_revoked": self.prefetch_revoked,
                "prefetch_terminated_early": self.prefetch_terminated_early,
                "prefetch_skipped_cost": self.prefetch_skipped_cost,
                "prefetch_cut_cost": self.prefetch_cut_cost,
                "backuped_tokens": self.backuped_tokens,
                "storage_held_back_tokens": self.storage_held_back_tokens,
                "loaded_back_tokens": self.loaded_back_tokens,
                "storage_errors": dict(self.storage_errors),
                "prefetch_outcomes": dict(self.prefetch_outcomes),
                "restores": dict(self.restores),
                "retention": dict(self.retention),
                "per_salt": {k: {**v, "hit_tokens": dict(v["hit_tokens"])} for k, v in self.per_salt.items()},
                "transfer_bytes": dict(self.transfer_bytes),
                "transfer_seconds": dict(self.transfer_seconds),
                "storage_stored_bytes": dict(self.storage_stored_bytes),
                "codec_seconds": dict(self.codec_seconds),
                "transfer_gbps": {
                    d: (self.transfer_bytes[d] / self.transfer_seconds[d] / 1e9 if self.transfer_seconds[d] else 0.0)
                    for d in DIRECTIONS
                },
            }

    def prometheus_text(self) -> str:
        if self._prom is None:
            raise RuntimeError("Prometheus metrics are off; construct with enable_prometheus=True (--enable-metrics)")
        return self._prom.text()


def salt_label(label: str, known: dict) -> str:
    """A salt's label (the cache passes a digest, never the salt: it may be a secret), or ``other`` past
    :data:`MAX_SALTS` distinct salts."""
    return label if label in known or len(known) < MAX_SALTS else "other"


class _Prometheus:
    """prometheus_client objects on a private registry (several caches in one process must not collide)."""

    def __init__(self, labels: dict[str, str]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.base = labels
        names = list(labels)
        self.prompt = Counter("hicache_prompt_tokens", "prompt tokens seen", names, registry=self.registry)
        self.cached = Counter(
            "hicache_cached_tokens",
            "prompt tokens served from cache, by tier",
            names + ["cache_source"],
            registry=self.registry,
        )
        self.bytes = Counter(
            "hicache_transfer_bytes", "bytes moved, by direction", names + ["direction"], registry=self.registry
        )
        self.seconds = Counter(
            "hicache_transfer_seconds",
            "seconds spent moving bytes, by direction",
            names + ["direction"],
            registry=self.registry,
        )
        self.bandwidth = Histogram(
            "hicache_transfer_gbps",
            "bandwidth of each transfer, by direction",
            names + ["direction"],
            buckets=(0.1, 0.5, 1, 5, 10, 50, 100),
            registry=self.registry,
        )
        self.counters: dict[str, Any] = {}
        self._names = names
        self._Counter = Counter

    def _c(self, name: str, extra: tuple[str, ...] = ()):
        c = self.counters.get(name)
        if c is None:
            c = self._Counter(
                f"hicache_{name}", name.replace("_", " "), self._names + list(extra), registry=self.registry
            )
            self.counters[name] = c
        return c

    def request(self, prompt: int, device: int, host: int, storage: int, salt: Optional[str] = None) -> None:
        self.prompt.labels(**self.base).inc(prompt)
        for tier, n in zip(TIERS, (device, host, storage)):
            self.cached.labels(**self.base, cache_source=tier).inc(n)
        if salt is not None:
            self.count("salt_prompt_tokens", prompt, salt=salt)
            for tier, n in zip(TIERS, (device, host, storage)):
                self.count("salt_cached_tokens", n, salt=salt, cache_source=tier)

    def transfer(self, direction: str, nbytes: int, seconds: float) -> None:
        self.bytes.labels(**self.base, direction=direction).inc(nbytes)
        self.seconds.labels(**self.base, direction=direction).inc(seconds)
        if seconds > 0:
            self.bandwidth.labels(**self.base, direction=direction).observe(nbytes / seconds / 1e9)

    def count(self, name: str, n: int, **extra: str) -> None:
        self._c(name, tuple(extra)).labels(**self.base, **extra).inc(n)

    def text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()
