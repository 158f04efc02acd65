"""``GET /metrics``: Prometheus text with SGLang's names where SGLang has one, ours per tier and outcome.

Request-level series (``sglang:time_to_first_token_seconds``, ``sglang:e2e_request_latency_seconds``,
``sglang:generation_tokens_total`` ...) are recorded as requests finish; cache series are read from the cache's
counters at scrape time (``sglang:cached_tokens_total{cache_source=device|host|storage}``,
``sglang:cache_hit_rate``, ``sglang:prefetched_tokens_total``, ``sglang:backuped_tokens_total``), with every
counter of ours as ``hicache_*`` and the storage backend's ``get_stats()`` fields as
``hicache_storage_backend_stat{field=...}``. Where each TTFT went: ``hicache_ttft_phase_seconds{phase=queued|
prefetch_wait|load|compute}``; how each storage prefetch ended: ``hicache_prefetch_outcomes_total{outcome=...}``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol

from hicache_core.engine import Request

if TYPE_CHECKING:
    from hicache_core.engine import Engine
    from hicache_core.serve.scheduler import Scheduler


class Served(Protocol):
    """What the metrics read of the server (serve/state.py's ServerState): the model's name, the engine and its
    scheduler."""

    model_name: str
    engine: Engine
    scheduler: Scheduler


LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


class ServerMetrics:
    def __init__(self, state: Served) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.state = state
        self.registry = CollectorRegistry()
        m = ["model_name"]
        self.labels = {"model_name": state.model_name}
        self.ttft = Histogram(
            "sglang:time_to_first_token_seconds",
            "time to first token",
            m,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "sglang:e2e_request_latency_seconds",
            "request latency, arrival to finish",
            m,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "sglang:inter_token_latency_seconds",
            "mean time between output tokens, per request",
            m,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=self.registry,
        )
        self.phase = Histogram(
            "hicache_ttft_phase_seconds",
            "time to first token by phase: queued, prefetch_wait, load, compute (they sum to the TTFT)",
            m + ["phase"],
            buckets=(0.001,) + LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt = Counter("sglang:prompt_tokens", "prompt tokens of finished requests", m, registry=self.registry)
        self.generated = Counter("sglang:generation_tokens", "generated tokens", m, registry=self.registry)
        self.requests = Counter(
            "sglang:num_requests", "finished requests, by finish reason", m + ["finish_reason"], registry=self.registry
        )
        self.registry.register(_Live(self))

    def finished(self, r: Request) -> None:
        """Called on the scheduler thread as a request finishes."""
        lab = self.labels
        self.requests.labels(finish_reason=r.finish_reason or "unknown", **lab).inc()
        if r.first_token_time is None:
            return
        self.ttft.labels(**lab).observe(max(0.0, r.ttft))
        for phase, seconds in r.phases.items():
            self.phase.labels(phase=phase, **lab).observe(seconds)
        if r.finish_time is not None:
            self.e2e.labels(**lab).observe(max(0.0, r.finish_time - r.arrival))
            if len(r.output) > 1:
                self.itl.labels(**lab).observe(max(0.0, (r.finish_time - r.first_token_time) / (len(r.output) - 1)))
        self.prompt.labels(**lab).inc(len(r.prompt))
        self.generated.labels(**lab).inc(len(r.output))

    def text(self) -> str:
        from prometheus_client import generate_latest

        out = generate_latest(self.registry).decode()
        metrics = self.state.engine.metrics
        if metrics._prom is not None:
            out += metrics.prometheus_text()
        return out


class _Live:
    """Gauges and cache counters read at scrape time."""

    def __init__(self, m: ServerMetrics) -> None:
        self.m = m

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        state, lab = self.m.state, self.m.labels
        names, values = list(lab), list(lab.values())
        running, waiting = state.scheduler.counts()
        pool = state.engine.pool
        stats = state.engine.metrics.stats()

        def gauge(name: str, help_: str, v: float) -> Any:
            g = GaugeMetricFamily(name, help_, labels=names)
            g.add_metric(values, v)
            return g

        yield gauge("sglang:num_running_reqs", "requests in the running batch", running)
        yield gauge("sglang:num_queue_reqs", "requests waiting (incl. for a storage prefetch)", waiting)
        yield gauge(
            "sglang:token_usage", "fraction of the device KV pool in use", 1 - pool.available_size() / pool.size
        )
        host = state.engine.cache.host_pool
        if host is not None:
            yield gauge(
                "hicache:host_token_usage", "fraction of the host KV pool in use", 1 - host.available_size() / host.size
            )
        yield gauge("sglang:cache_hit_rate", "prompt tokens served from cache / prompt tokens", stats["cache_hit_rate"])
        c = CounterMetricFamily(
            "sglang:cached_tokens", "prompt tokens served from cache, by tier", labels=names + ["cache_source"]
        )
        for tier, n in stats["hit_tokens"].items():
            c.add_metric(values + [tier], n)
        yield c
        for key, help_ in (
            ("prefetched_tokens", "tokens prefetched from storage to host"),
            ("backuped_tokens", "tokens backed up from host to storage"),
        ):
            c = CounterMetricFamily(f"sglang:{key}", help_, labels=names)
            c.add_metric(values, stats[key])
            yield c
        cache = state.engine.cache
        if cache.storage_enabled:
            fields = cache.operator.storage_stats() or {}
            g = GaugeMetricFamily(
                "hicache_storage_backend_stat",
                "the storage backend's get_stats() fields",
                labels=names + ["backend", "field"],
            )
            for k, v in sorted(fields.items()):
                num = _number(v)
                if num is not None:
                    g.add_metric(values + [str(state.engine.config.hicache_storage_backend), str(k)], num)
            yield g
