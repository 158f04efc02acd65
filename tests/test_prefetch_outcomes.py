"""How each request's storage prefetch ended: every outcome of cache/prefetch.py's OUTCOMES, reached through a real
cache on the memory store, carried by the admission and counted in the metrics."""

import time

import pytest
from cache_helpers import PS, make_cache, run_request, seq, stored_elsewhere

from hicache_core.cache.prefetch import OUTCOMES


def outcome_of(cache, tokens, rid="r") -> dict:
    got = run_request(cache, tokens, rid=rid)
    counted = cache.metrics.stats()["prefetch_outcomes"]
    assert sum(counted.values()) >= 1 and set(counted) <= set(OUTCOMES), counted
    return got


@pytest.mark.parametrize(
    "stored_pages, asked_pages, options, outcome, from_storage",
    [
        (6, 6, {}, "hit", 6),
        (3, 6, {}, "partial", 3),
        (0, 6, {}, "miss", 0),
        (6, 6, {"prefetch_threshold": 8 * PS}, "below_threshold", 0),  # asked for fewer pages than the threshold
        (2, 6, {"prefetch_threshold": 4 * PS}, "below_threshold", 0),  # storage holds fewer
    ],
)
def test_outcomes_by_what_storage_holds(stored_pages, asked_pages, options, outcome, from_storage):
    tokens = seq(1, asked_pages)
    store = stored_elsewhere(seq(1, stored_pages)) if stored_pages else "empty-store"
    cache = make_cache(storage="memory", store=store, prefetch="wait_complete", extra=options)
    try:
        got = outcome_of(cache, tokens)
        assert got["prefetch"] == outcome and got["storage"] == from_storage * PS
        assert cache.metrics.stats()["prefetch_outcomes"] == {outcome: 1}
        again = run_request(cache, tokens, rid="again")  # now all on the device: nothing past it to fetch
        assert again["prefetch"] == "local" and again["device"] == asked_pages * PS
    finally:
        cache.close()


def test_no_host_room():
    tokens = seq(2, 6)
    store = stored_elsewhere(tokens)
    room = {"prefetch_threshold": 2 * PS}
    cache = make_cache(storage="memory", store=store, host_pages=1, prefetch="wait_complete", extra=room)
    try:
        got = outcome_of(cache, tokens)
        assert got["prefetch"] == "no_host_room" and got["storage"] == 0
    finally:
        cache.close()


def test_best_effort_goes_on_without_waiting():
    tokens = seq(6, 6)
    store = stored_elsewhere(tokens)
    cache = make_cache(storage="memory", store=store, prefetch="best_effort", extra={"read_latency_s": 1.0})
    try:
        got = outcome_of(cache, tokens)
        assert got["prefetch"] == "not_ready" and got["storage"] == 0
    finally:
        cache.close()


def test_timed_out_and_the_cost_policy_outcomes():
    tokens = seq(3, 6)
    store = stored_elsewhere(tokens)
    slow = {"read_latency_s": 1.5, "prefetch_timeout_base": 0.1, "prefetch_timeout_per_ki_token": 0.0}
    cache = make_cache(storage="memory", store=store, prefetch="timeout", extra=slow)
    try:
        t0 = time.monotonic()
        got = outcome_of(cache, tokens)
        assert got["prefetch"] == "timed_out" and time.monotonic() - t0 < 1.2
    finally:
        cache.close()
    cache = make_cache(storage="memory", store=store, prefetch="cost_aware", extra={"read_latency_s": 1.5})
    try:
        cache.record_prefill(6 * PS, 0.05)  # recomputing takes 50 ms; the read 1.5 s: waited that long, then cut
        assert outcome_of(cache, tokens)["prefetch"] == "cut"
        cache.controller.cost.record_load(6 * PS, 2.0)  # a measured load: slower than recomputing, so skipped
        assert outcome_of(cache, seq(4, 6), rid="r2")["prefetch"] == "skipped_cost"
        assert cache.metrics.stats()["prefetch_outcomes"] == {"cut": 1, "skipped_cost": 1}
    finally:
        cache.close()


def test_no_storage_no_outcome():
    cache = make_cache()
    try:
        assert run_request(cache, seq(5, 3))["prefetch"] is None
        assert cache.metrics.stats()["prefetch_outcomes"] == {}
    finally:
        cache.close()
