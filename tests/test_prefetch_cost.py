"""The cost_aware prefetch policy: storage loads weighed against recomputing, through a real cache and store."""

import time

from cache_helpers import PS, make_cache, run_request, seq, stored_elsewhere

from hicache_core.controller.policy import EXPLORE_EVERY, PrefetchCost


def test_the_model_fits_latency_and_bandwidth_and_decides():
    cost = PrefetchCost()
    assert not cost.skip(1000) and not cost.cut(1000, 99.0)  # nothing measured: behaves like wait_complete
    for tokens in (100, 200, 400, 800):
        cost.record_load(tokens, 0.05 + tokens * 1e-4)  # 50 ms per call + 10k tokens/s
    latency, per_token = cost.load_model()
    assert abs(latency - 0.05) < 1e-9 and abs(per_token - 1e-4) < 1e-12
    cost.record_prefill(5000, 1.0)  # recompute: 5k tokens/s
    assert cost.skip(100)  # 60 ms to load vs 20 ms to recompute
    assert not cost.skip(1000)  # 150 ms to load vs 200 ms to recompute
    assert cost.cut(100, 0.03) and not cost.cut(100, 0.01)
    skipped = sum(cost.skip(100) for _ in range(3 * EXPLORE_EVERY))
    assert skipped == 3 * (EXPLORE_EVERY - 1)  # one in EXPLORE_EVERY loads anyway, to notice a faster store


def test_a_prefetch_that_would_be_slower_than_recomputing_is_skipped():
    tokens = seq(1, 6)
    store = stored_elsewhere(tokens)
    cache = make_cache(storage="memory", store=store, prefetch="cost_aware")
    try:
        cache.record_prefill(10**6, 1.0)  # this engine recomputes a million tokens a second
        cache.controller.cost.record_load(6 * PS, 2.0)  # and this store took 2 s for as many
        got = run_request(cache, tokens)
        assert got["storage"] == 0 and got["computed"] == 6 * PS
        assert cache.metrics.stats()["prefetch_skipped_cost"] == 1
    finally:
        cache.close()


def test_a_prefetch_is_cut_once_recomputing_would_be_done_and_used_when_it_pays(tmp_path):
    tokens = seq(2, 6)
    store = stored_elsewhere(tokens)
    slow = make_cache(storage="memory", store=store, prefetch="cost_aware", extra={"read_latency_s": 1.5})
    try:
        slow.record_prefill(6 * PS, 0.05)  # recomputing the prompt takes 50 ms; a read takes 1.5 s
        t0 = time.monotonic()
        got = run_request(slow, tokens)
        assert time.monotonic() - t0 < 1.2  # did not wait for the read
        assert got["storage"] == 0 and slow.metrics.stats()["prefetch_cut_cost"] == 1
    finally:
        slow.close()
    fast = make_cache(storage="memory", store=store, prefetch="cost_aware")
    try:
        fast.record_prefill(1, 10.0)  # recomputing is slow here: the store serves the prompt
        got = run_request(fast, tokens)
        stats = fast.metrics.stats()
        assert got["storage"] == 6 * PS and stats["prefetch_skipped_cost"] == stats["prefetch_cut_cost"] == 0
        load = fast.controller.cost.load_model()
        assert load is not None  # the completed prefetch was measured
    finally:
        fast.close()
