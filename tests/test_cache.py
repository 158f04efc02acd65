"""HiRadixCache: scripted tier scenarios, write policies, prefetch policies, faulty storage, metrics."""

import threading
import time
import uuid

import pytest
import torch
from cache_helpers import (
    kv_matches,
    locks_balanced,
    make_cache,
    owned_pages_ok,
    run_request,
    seq,
    stored_elsewhere,
    write_kv,
)


def test_match_insert_split_and_prefix_length():
    c = make_cache(host_pages=0)
    a = seq(1, 3)
    b = a[:8] + seq(2, 2)
    assert run_request(c, a)["computed"] == 12
    r = run_request(c, b)
    assert r["device"] == 8 and r["computed"] == 8
    m = c.match_prefix(a + [5])
    assert len(m.device_indices) == 12 and m.host_hit_length == 0
    assert kv_matches(c.device_pool, m.device_indices, a)
    owned_pages_ok(c)
    locks_balanced(c)


def test_device_only_eviction_drops_lru_leaves():
    c = make_cache(device_pages=4, host_pages=0)
    run_request(c, seq(1, 2))
    run_request(c, seq(2, 2))
    run_request(c, seq(3, 2))  # needs room: the least recently used sequence goes
    assert len(c.match_prefix(seq(1, 2)).device_indices) == 0
    assert len(c.match_prefix(seq(3, 2)).device_indices) == 8
    owned_pages_ok(c)


def test_evicted_to_host_loads_back_identical():
    c = make_cache(device_pages=6, host_pages=16)
    seqs = [seq(i, 3) for i in range(4)]
    for s in seqs:
        run_request(c, s)
    c.flush()
    # the device pool holds 6 pages: the first sequences now live on host only
    m = c.match_prefix(seqs[0])
    assert len(m.device_indices) == 0 and m.host_hit_length == 12
    r = run_request(c, seqs[0])  # asserts the loaded bytes equal what was inserted
    assert r["host"] == 12 and r["computed"] == 0
    c.flush()
    owned_pages_ok(c)
    locks_balanced(c)
    assert c.metrics.stats()["loaded_back_tokens"] == 12
    c.close()


@pytest.mark.parametrize("policy", ["best_effort", "wait_complete", "timeout"])
def test_evicted_from_host_comes_back_from_storage(policy):
    store = uuid.uuid4().hex
    c = make_cache(device_pages=5, host_pages=8, storage="memory", store=store, prefetch=policy)
    seqs = [seq(i, 4) for i in range(5)]
    for s in seqs:
        run_request(c, s)
        c.flush()
    assert c.match_prefix(seqs[0]).matched_length == 0  # gone from device and host
    if policy == "best_effort":  # best effort takes what has landed when asked: wait for the I/O here
        m = c.match_prefix(seqs[0])
        assert c.prefetch_from_storage("x", m.last_node, seqs[0])
        op = c.ongoing_prefetch["x"].op
        deadline = time.monotonic() + 10
        while not op.io_done.is_set():  # poll() grants the host pages once storage has answered
            assert time.monotonic() < deadline
            c.poll()
            time.sleep(0.002)
        assert c.check_prefetch_progress("x")
        r = run_request(c, seqs[0])
        assert r["host"] == 16
    else:
        r = run_request(c, seqs[0])
        assert r["storage"] == 16 and r["host"] == 16 and r["computed"] == 0
    c.flush()
    owned_pages_ok(c)
    locks_balanced(c)
    st = c.metrics.stats()
    assert st["prefetched_tokens"] == 16 and st["backuped_tokens"] >= 5 * 16
    c.close()


def test_second_instance_reads_first_instances_pages():
    store = uuid.uuid4().hex
    a = make_cache(storage="memory", store=store, prefetch="wait_complete")
    s = seq(7, 5)
    run_request(a, s)
    a.flush()
    b = make_cache(storage="memory", store=store, prefetch="wait_complete")
    r = run_request(b, s + [1, 2, 3, 4])
    assert r["storage"] == 20 and r["computed"] == 4
    # another model's namespace sees nothing
    other = make_cache(storage="memory", store=store, prefetch="wait_complete", model="another")
    assert run_request(other, s)["storage"] == 0
    for c in (a, b, other):
        c.close()


def test_prefix_shorter_than_threshold_is_not_prefetched():
    store = uuid.uuid4().hex
    c = make_cache(storage="memory", store=store, extra={"prefetch_threshold": 64})
    m = c.match_prefix(seq(1, 4))
    assert not c.prefetch_from_storage("r", m.last_node, seq(1, 4))
    c.close()


def test_nothing_in_storage_revokes_and_returns_pages():
    c = make_cache(storage="memory", store=uuid.uuid4().hex, prefetch="wait_complete")
    free = c.host_pool.available_size()
    m = c.match_prefix(seq(9, 4))
    assert c.prefetch_from_storage("r", m.last_node, seq(9, 4))
    deadline = time.monotonic() + 10
    while not c.check_prefetch_progress("r"):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    c.poll()
    assert c.host_pool.available_size() == free and not c.ongoing_prefetch
    assert c.metrics.stats()["prefetch_revoked"] == 1
    c.close()


def test_prefetch_for_a_prompt_stored_nowhere_leaves_host_pages_alone():
    """Storage is asked before any host page is taken: a miss evicts nothing (SGLang #19320)."""
    # write_back: inserting the new prompt copies nothing to host, so only the prefetch could touch host pages
    c = make_cache(
        device_pages=6,
        host_pages=6,
        storage="memory",
        store=uuid.uuid4().hex,
        prefetch="wait_complete",
        write_policy="write_back",
    )
    for i in range(3):  # fill the host tier: three sequences demoted from device
        run_request(c, seq(i, 2))
    c.flush()
    c.evict(10**6)
    c.flush()
    _, host_before = c.total_size()
    free_before = c.host_pool.available_size()
    assert host_before == 24 and free_before == 0  # the host pool is full: a prefetch would need to evict
    revoked = c.metrics.stats()["prefetch_revoked"]
    r = run_request(c, seq(9, 4))  # stored nowhere
    assert r["storage"] == 0 and r["computed"] == 16
    c.flush()
    assert c.metrics.stats()["prefetch_revoked"] == revoked + 1
    for i in range(3):  # every host page is still there
        assert c.match_prefix(seq(i, 2)).matched_length == 8
    assert c.metrics.stats()["evicted_tokens"].get("host", 0) == 0
    c.close()


def test_prefetch_evicts_host_pages_only_for_real_hits():
    """A prefetch for pages storage has may evict colder host pages, and only as many as it needs."""
    store = stored_elsewhere(seq(8, 3))
    c = make_cache(device_pages=6, host_pages=6, storage="memory", store=store, prefetch="wait_complete")
    for i in range(3):
        run_request(c, seq(i, 2))
    c.flush()
    c.evict(10**6)
    c.flush()
    assert c.host_pool.available_size() == 0
    r = run_request(c, seq(8, 3))
    assert r["storage"] == 12
    evicted = c.metrics.stats()["evicted_tokens"]["host"]
    assert 12 <= evicted < 12 + 8  # room for 3 pages, in whole nodes of 2 pages: not one node more
    assert sum(c.match_prefix(seq(i, 2)).matched_length == 8 for i in range(3)) == 1
    c.flush()
    owned_pages_ok(c)
    locks_balanced(c)
    c.close()


class FaultyStorage:
    """Wraps a real backend handle; gets fail partway, raise, or hang."""

    def __init__(self, inner, mode: str, good_pages: int = 3, hang_s: float = 1.5):
        self.inner, self.mode, self.good_pages, self.hang_s = inner, mode, good_pages, hang_s
        self.released = threading.Event()

    def batch_exists(self, keys):
        return self.inner.batch_exists(keys)

    def batch_set_v1(self, keys, idx):
        return self.inner.batch_set_v1(keys, idx)

    def batch_get_v1(self, keys, idx):
        if self.mode == "raise":
            raise OSError("connection reset by peer")
        if self.mode == "hang":
            time.sleep(self.hang_s)
            self.released.set()
            return self.inner.batch_get_v1(keys, idx)
        if self.mode == "corrupt_then_fail":  # the backend reports the bad pages as misses, as the contract says
            res = self.inner.batch_get_v1(keys, idx)
            return res[: self.good_pages] + [False] * (len(keys) - self.good_pages)
        raise AssertionError(self.mode)

    def close(self):
        self.inner.close()


@pytest.mark.parametrize(
    "mode, policy",
    [
        ("raise", "wait_complete"),
        ("corrupt_then_fail", "wait_complete"),
        ("hang", "timeout"),
        ("hang", "wait_complete"),
    ],
)
def test_faulty_backend_mid_prefetch_leaks_nothing_serves_nothing_wrong(mode, policy):
    s = seq(3, 6)
    store = stored_elsewhere(s)
    c = make_cache(storage="memory", store=store, prefetch=policy, extra={"prefetch_timeout_base": 0.2})
    c.controller.io.policy.stall_limit = 0.5
    faulty = FaultyStorage(c.controller.io.guard.backend, mode)
    c.controller.io.guard.backend = faulty
    free_before = c.host_pool.available_size()
    r = run_request(c, s)  # asserts every served byte is right
    expected_storage = {"raise": 0, "corrupt_then_fail": 12, "hang": 0}[mode]
    assert r["storage"] == expected_storage and r["computed"] == 24 - expected_storage
    if mode == "hang":
        assert faulty.released.wait(5)
        c.controller.io.guard.backend = faulty.inner
    time.sleep(0.1)
    c.flush()
    c.poll()
    owned_pages_ok(c)  # the pages the hung I/O held came back
    locks_balanced(c)
    assert c.host_pool.available_size() <= free_before
    if mode == "raise":
        assert c.metrics.stats()["storage_errors"].get("get_exception", 0) >= 1
    c.close()


def test_aborted_request_returns_prefetch_pages():
    store = stored_elsewhere(seq(4, 6))
    c = make_cache(storage="memory", store=store, prefetch="wait_complete")
    faulty = FaultyStorage(c.controller.io.guard.backend, "hang", hang_s=0.5)
    c.controller.io.guard.backend = faulty
    m = c.match_prefix(seq(4, 6))
    assert c.prefetch_from_storage("r", m.last_node, seq(4, 6))
    c.release_aborted_request("r")
    faulty.released.wait(5)
    time.sleep(0.2)
    c.poll()
    owned_pages_ok(c)
    locks_balanced(c)
    c.close()


# --- write policies -------------------------------------------------------------------------------------------------
def test_request_cancelled_before_its_loads_started_leaks_nothing():
    """admit() queued a host->device load; the engine cancels before its forward pass (no
    ready_to_load_host_cache): the load still runs, its pins and pages come back."""
    c = make_cache(device_pages=6, host_pages=12)
    free = c.device_pool.available_size()
    run_request(c, seq(1, 3))
    c.flush()
    c.evict(10**6)  # device -> host
    adm = c.admit("x", seq(1, 3) + [5])
    assert adm.ready and adm.cached["host"] == 12
    c.release(adm, seq(1, 3) + [5], 0)
    c.flush()
    locks_balanced(c)
    owned_pages_ok(c)
    c.evict(10**6)
    assert c.device_pool.available_size() == free
    c.close()


def test_write_through_copies_on_insert():
    c = make_cache(write_policy="write_through")
    run_request(c, seq(1, 2))
    c.flush()
    assert c.total_size() == (8, 8)
    c.close()


def test_write_through_selective_copies_on_second_hit():
    c = make_cache(write_policy="write_through_selective")
    s = seq(1, 2)
    run_request(c, s)
    c.flush()
    assert c.total_size() == (8, 0)
    run_request(c, s)
    c.flush()
    assert c.total_size() == (8, 8)
    c.close()


def test_write_back_copies_on_eviction_only():
    c = make_cache(device_pages=6, write_policy="write_back")
    run_request(c, seq(1, 3))
    c.flush()
    assert c.total_size() == (12, 0)
    run_request(c, seq(2, 3))
    run_request(c, seq(3, 3))  # evicts seq 1: written to host now, not before
    c.flush()
    m = c.match_prefix(seq(1, 3))
    assert len(m.device_indices) == 0 and m.host_hit_length == 12
    r = run_request(c, seq(1, 3))
    assert r["host"] == 12
    c.flush()
    owned_pages_ok(c)
    c.close()


def test_selective_parent_with_host_children_is_kept_on_eviction():
    """A device-only node whose children live on host must not be dropped (its children would be orphaned)."""
    c = make_cache(device_pages=6, write_policy="write_through_selective")
    base = seq(1, 1)
    a, b = base + seq(2, 1), base + seq(3, 1)
    for _ in range(2):
        run_request(c, a)
    c.flush()
    run_request(c, b)
    c.evict(100)
    c.flush()
    assert c.match_prefix(a).matched_length == 8
    owned_pages_ok(c)
    c.close()


def test_locked_nodes_are_never_evicted():
    c = make_cache(device_pages=4)
    run_request(c, seq(1, 2))
    m = c.match_prefix(seq(1, 2))
    c.inc_lock_ref(m.last_device_node)
    c.flush()
    c.evict(100)
    c.evict_host(100)
    assert len(c.match_prefix(seq(1, 2)).device_indices) == 8
    c.dec_lock_ref(m.last_device_node)
    c.close()


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo"])
def test_eviction_policies(policy):
    c = make_cache(device_pages=7, host_pages=0, eviction=policy)  # three sequences and one page to compute in
    a, b, d = seq(1, 2), seq(2, 2), seq(3, 2)
    run_request(c, a)
    run_request(c, b)
    run_request(c, a)  # a: older creation, more hits, more recent use
    run_request(c, b)
    run_request(c, a)
    run_request(c, d)
    time.sleep(0.001)
    run_request(c, seq(4, 2))  # one sequence must go
    survivors = {name for name, s in (("a", a), ("b", b), ("d", d)) if len(c.match_prefix(s).device_indices)}
    expected_gone = {"lru": "b", "lfu": "d", "fifo": "a"}[policy]
    assert expected_gone not in survivors and len(survivors) == 2


def test_metrics_prometheus_text():
    c = make_cache(device_pages=4, storage="memory", store=uuid.uuid4().hex)
    c.metrics._prom = __import__("hicache_core.metrics", fromlist=["_Prometheus"])._Prometheus(
        {"storage_backend": "memory"}
    )
    c.metrics.record_request(100, 40, 20, 10)
    for i in range(3):
        run_request(c, seq(i, 2))
    c.flush()
    text = c.metrics.prometheus_text()
    assert 'hicache_cached_tokens_total{cache_source="device",storage_backend="memory"} 40.0' in text
    assert "hicache_transfer_bytes_total" in text and 'direction="d2h"' in text
    st = c.metrics.stats()
    # the three requests above were misses, counted by admit()
    assert st["hit_tokens"] == {"device": 40, "host": 20, "storage": 10} and st["prompt_tokens"] == 100 + 3 * 9
    assert st["cache_hit_rate"] == 70 / 127
    assert st["transfer_bytes"]["d2h"] > 0 and st["evicted_tokens"]["device"] > 0
    c.close()


def test_layer_wait_blocks_until_layer_lands():
    c = make_cache(device_pages=4, host_pages=8)
    s = seq(1, 3)
    run_request(c, s)
    c.flush()
    c.evict(100)
    m = c.match_prefix(s)
    idx, _ = c.init_load_back(m.last_node)
    ack = c.ready_to_load_host_cache()
    c.device_pool.wait_layer(1)
    assert ack.layer_events[1].is_set() and ack.layer_events[0].is_set()
    assert kv_matches(c.device_pool, idx, s)
    c.flush()
    c.close()


def test_write_kv_helper_detects_wrong_bytes():
    c = make_cache(host_pages=0)
    idx = c.alloc_device(8)
    write_kv(c.device_pool, idx, seq(1, 2))
    assert kv_matches(c.device_pool, idx, seq(1, 2))
    assert not kv_matches(c.device_pool, idx, seq(2, 2))
    assert not kv_matches(c.device_pool, idx.flip(0), seq(1, 2))
    torch.manual_seed(0)
