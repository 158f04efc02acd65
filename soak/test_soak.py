"""Soak: thousands of requests through tiny pools while the backend misbehaves in turn every way
``hicache certify`` knows, each served byte checked against what computing it gives (a no-cache run). At the end
every page is free again; along the way resident memory and the thread count stay flat.

Run with ``tox -e soak`` (``HICACHE_SOAK_REQUESTS`` sets the count, default 3000 per backend).
"""

from __future__ import annotations

import gc
import os
import random
import threading

import pytest
import torch

from hicache_core.config import HiCacheConfig
from hicache_core.faults import FAULTS, FaultyBackend, RunResult, drain, make_prompts, run_requests, small_cache
from hicache_core.memory import KVSpec
from hicache_core.storage.hooks import CorruptsStoredPages

SPEC = KVSpec(layer_num=2, head_num=2, head_dim=16, dtype=torch.float32)
PS = 16
REQUESTS = int(os.environ.get("HICACHE_SOAK_REQUESTS", "3000"))
CHUNK = 250


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.parametrize("backend, extra", [("memory", {"store": "soak"}), ("file", {"storage_dir": "{tmp}"})])
def test_soak(backend, extra, tmp_path):
    extra = {k: (v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v) for k, v in extra.items()}
    config = HiCacheConfig(
        page_size=PS,
        hicache_io_backend="direct",
        hicache_storage_backend=backend,
        hicache_storage_prefetch_policy="wait_complete",
        model_name="soak",
        hicache_storage_backend_extra_config={**extra, "io_timeout_s": 0.2, "prefetch_threshold": PS},
    )
    rng = random.Random(1)
    prompts = make_prompts(rng, families=12, pages=5, page_size=PS)
    cache = small_cache(config, SPEC, device_pages=10, host_pages=20)
    handle = cache.storage
    modes = [m for m in FAULTS if m not in ("restart", "corrupt")] + ["none"]
    if isinstance(handle.raw, CorruptsStoredPages):
        modes.append("corrupt")
    result, injected, samples = RunResult(), 0, []
    threads_at_start = threading.active_count()
    for chunk in range(REQUESTS // CHUNK):
        mode = modes[chunk % len(modes)]
        faulty = cache.operator.wrap_storage(
            lambda _: FaultyBackend(handle, mode, 0.0 if mode == "none" else 0.1, rng, hang_s=0.4)
        )
        run_requests(cache, prompts, CHUNK, rng, result)
        injected += faulty.injected
        gc.collect()
        samples.append(rss_mib())
    cache.operator.wrap_storage(lambda _: handle)
    assert result.wrong_kv == 0, f"{result.wrong_kv} requests were served wrong KV"
    assert result.requests >= REQUESTS * 0.9 and injected > REQUESTS // 50
    assert result.storage_tokens > 0
    threads = threading.active_count()
    drain(cache, result)
    assert result.leaked_pages == 0, f"{result.leaked_pages} pages did not come back"
    warm = samples[len(samples) // 3]  # after the pools, the store and the allocator's arenas have warmed up
    growth = samples[-1] - warm
    print(
        f"{backend}: {result.requests} requests, {injected} faults, {result.storage_tokens} storage tokens, "
        f"RSS {samples[0]:.0f} -> {warm:.0f} -> {samples[-1]:.0f} MiB, threads {threads_at_start} -> {threads}"
    )
    assert growth < max(16.0, 0.05 * warm), f"RSS grew {growth:.1f} MiB over {REQUESTS} requests: {samples}"
    assert threads <= threads_at_start + 8, f"threads grew from {threads_at_start} to {threads}"
