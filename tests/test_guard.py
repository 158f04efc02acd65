"""The guard between controller and backend: results that break the contract, calls past their deadline.

Each case ran against the unguarded controller first and broke it: the backup thread died for good on a bool
result, host pages leaked, a long result list made a node with more key tokens than host slots, a hung get made
every later prefetch wait the stall limit and ``close()`` wait 30 s.
"""

from __future__ import annotations

import threading
import time

import pytest
from cache_helpers import PS, locks_balanced, make_cache, owned_pages_ok, run_request, seq, stored_elsewhere

from hicache_core.storage.guard import GuardedStorage, page_flags


class Evil:
    """A real backend handle with one of its methods replaced by a misbehaving one."""

    def __init__(self, inner, **methods):
        self.inner = inner
        self.calls = 0
        for name, fn in methods.items():
            setattr(self, name, fn)

    def batch_exists(self, keys):
        return self.inner.batch_exists(keys)

    def batch_get_v1(self, keys, idx):
        return self.inner.batch_get_v1(keys, idx)

    def batch_set_v1(self, keys, idx):
        return self.inner.batch_set_v1(keys, idx)

    def clear(self):
        self.inner.clear()

    def get_stats(self):
        return None

    def close(self):
        self.inner.close()


def swap(cache, **methods) -> Evil:
    evil = Evil(cache.controller.io.guard.backend, **methods)
    cache.controller.io.guard.backend = evil
    return evil


def errors(cache) -> dict:
    return cache.metrics.stats()["storage_errors"]


def check_clean(cache) -> None:
    cache.flush(timeout=10)
    cache.poll()
    owned_pages_ok(cache)
    locks_balanced(cache)


@pytest.mark.parametrize(
    "bad",
    [True, None, 1, "ok", [True], [True] * 50, [1.0] * 3, [True, None, True]],
    ids=["bool", "none", "int", "str", "short", "long", "floats", "none-inside"],
)
def test_bad_set_results_fail_the_batch_and_writes_go_on(bad):
    c = make_cache(storage="memory", host_pages=32)
    real = c.controller.io.guard.backend.batch_set_v1
    state = {"bad": True}

    def batch_set_v1(keys, idx):
        if state["bad"]:
            real(keys, idx)
            return bad
        return real(keys, idx)

    swap(c, batch_set_v1=batch_set_v1)
    run_request(c, seq(1, 3))
    check_clean(c)  # flush() returns: the backup finished (as a failure), no host page stays pinned
    assert sum(v for k, v in errors(c).items() if k.startswith("set_invalid")) >= 1
    state["bad"] = False
    run_request(c, seq(2, 3))  # the backup thread lives on: later writes land
    check_clean(c)
    assert c.metrics.stats()["backuped_tokens"] >= 3 * PS
    c.close()


@pytest.mark.parametrize(
    "kind", ["get-bool", "get-long", "get-short", "exists-bool", "exists-str", "exists-big", "exists-negative"]
)
def test_bad_prefetch_results_leak_nothing_and_serve_nothing_wrong(kind):
    s = seq(3, 6)
    c = make_cache(storage="memory", store=stored_elsewhere(s), prefetch="wait_complete")
    free = c.host_pool.available_size()
    real_get = c.controller.io.guard.backend.batch_get_v1
    if kind.startswith("get"):

        def batch_get_v1(keys, idx):
            res = real_get(keys, idx)
            return {"get-bool": True, "get-long": res + [True] * len(res), "get-short": res[:-1]}[kind]

        swap(c, batch_get_v1=batch_get_v1)
    else:
        value = {"exists-bool": True, "exists-str": "6", "exists-big": 10**6, "exists-negative": -1}[kind]
        swap(c, batch_exists=lambda keys: value)
    r = run_request(c, s)  # asserts every served byte is right
    assert r["storage"] == 0 and r["computed"] == 24
    check_clean(c)  # no node with more key tokens than host slots, no leaked host page
    assert c.host_pool.available_size() <= free
    assert sum(v for k, v in errors(c).items() if k.endswith("invalid_result")) >= 1
    c.close()


def test_hung_get_is_abandoned_quarantined_then_released():
    s1, s2, s3 = seq(4, 6), seq(5, 6), seq(6, 6)
    store = stored_elsewhere(s1)
    writer = make_cache(storage="memory", store=store)
    run_request(writer, s2)
    run_request(writer, s3, rid="w3")
    writer.flush()
    writer.close()
    c = make_cache(storage="memory", store=store, prefetch="wait_complete", extra={"io_timeout_s": 0.3})
    c.controller.io.policy.stall_limit = 30  # only the deadline may end the wait
    release = threading.Event()
    real_get = c.controller.io.guard.backend.batch_get_v1
    late = {}

    def batch_get_v1(keys, idx):
        release.wait(20)
        late["result"] = real_get(keys, idx)  # lands after the deadline, into quarantined pages
        return late["result"]

    evil = swap(c, batch_get_v1=batch_get_v1)
    t0 = time.monotonic()
    r = run_request(c, s1)
    first = time.monotonic() - t0
    assert r["storage"] == 0 and r["computed"] == 24
    assert first < 3, f"the request waited {first:.1f} s for a hung backend (deadline 0.3 s)"
    assert c.controller.io.quarantined_tokens() == 24  # the hung call's target pages are out of reuse
    # a second hung call: with two calls out the backend counts as hung and calls fail at once
    r = run_request(c, s2, rid="r2")
    assert r["storage"] == 0
    t0 = time.monotonic()
    r = run_request(c, s3, rid="r3")
    assert time.monotonic() - t0 < 1.0 and r["storage"] == 0
    assert errors(c).get("backend_hung", 0) >= 1
    assert errors(c).get("get_deadline", 0) == 2
    assert c.controller.io.guard.abandoned_calls() == 2
    # every page owned by a node or free, except the quarantined ones
    c.poll()
    assert 24 < c.controller.io.quarantined_tokens() <= 48  # the second hung call holds what it was granted
    release.set()  # the backend finally returns: its pages come back, nothing was served from them
    deadline = time.monotonic() + 10
    while c.controller.io.quarantined_tokens() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert late.get("result") is not None
    c.controller.io.guard.backend = evil.inner
    check_clean(c)
    assert c.controller.io.guard.abandoned_calls() == 0
    r = run_request(c, s1, rid="r4")  # and the backend serves again
    assert r["device"] + r["host"] == 24
    c.close()


def test_a_backend_that_answers_again_is_used_again_while_its_hung_calls_stay_out():
    # a mooncake client whose master died mid-call may never return those calls; its plugin rebuilds the client,
    # and the guard must not keep the backend shut for the old client's sake
    seqs = [seq(40 + i, 6) for i in range(4)]
    store = stored_elsewhere(seqs[0])
    for s in seqs[1:]:  # each by a writer of its own, gone before the reader starts
        writer = make_cache(storage="memory", store=store)
        run_request(writer, s)
        writer.flush()
        writer.close()
    # host room for three quarantined calls and the request after them: on a loaded machine a background backup
    # can take the first probe while reads still hang, and that probe's read hangs too
    c = make_cache(storage="memory", store=store, prefetch="wait_complete", host_pages=48, extra={"io_timeout_s": 0.3})
    c.controller.io.policy.stall_limit = 30
    never, hanging = threading.Event(), {"on": True}
    real_get = c.controller.io.guard.backend.batch_get_v1

    def batch_get_v1(keys, idx):
        if hanging["on"]:
            never.wait(30)
        return real_get(keys, idx)

    evil = swap(c, batch_get_v1=batch_get_v1)
    try:
        run_request(c, seqs[0])
        run_request(c, seqs[1], rid="r1")  # two calls out: hung
        assert run_request(c, seqs[2], rid="r2")["storage"] == 0 and errors(c).get("backend_hung", 0) >= 1
        hanging["on"] = False  # the client was rebuilt: new calls answer
        guard = c.controller.io.guard
        time.sleep(max(0.0, guard._probe_at - time.monotonic()) + 0.05)  # a probe is due
        got = run_request(c, seqs[3], rid="r3")
        assert got["storage"] == 24, (got, errors(c))  # the probe answered: the backend serves again
        assert c.controller.io.guard.abandoned_calls() >= 2  # the old calls are still out...
        assert c.controller.io.quarantined_tokens() >= 24  # ...and what they target stays out of reuse
    finally:
        never.set()
    deadline = time.monotonic() + 10
    while c.controller.io.quarantined_tokens() and time.monotonic() < deadline:
        time.sleep(0.01)
    c.controller.io.guard.backend = evil.inner
    check_clean(c)
    c.close()


def test_hung_backup_keeps_its_host_pages_until_the_call_returns():
    c = make_cache(storage="memory", host_pages=16, extra={"io_timeout_s": 0.2})
    release = threading.Event()
    real_set = c.controller.io.guard.backend.batch_set_v1
    seen = {}

    def batch_set_v1(keys, idx):
        release.wait(20)
        seen["bytes"] = [c.host_pool.get_flat_page(int(i)).clone() for i in idx[::PS]]
        return real_set(keys, idx)

    swap(c, batch_set_v1=batch_set_v1)
    run_request(c, seq(8, 3))
    c.flush(timeout=5)  # does not wait for the abandoned backup
    assert errors(c).get("set_deadline", 0) == 1
    node = max(c.nodes(), key=lambda n: len(n.key))
    assert node.host_value is not None and node.host_ref > 0  # protected: the late write may still read it
    before = [c.host_pool.get_flat_page(int(i)).clone() for i in node.host_value[::PS]]
    assert c.evict_host(10**6) == 0  # nothing may reuse those pages
    release.set()
    deadline = time.monotonic() + 10
    while node.host_ref and time.monotonic() < deadline:
        c.poll()
        time.sleep(0.01)
    assert node.host_ref == 0
    assert all((a == b).all() for a, b in zip(seen["bytes"], before))  # the late write read the node's own bytes
    check_clean(c)
    c.close()


def test_close_is_bounded_with_a_hung_backend():
    s = seq(9, 6)
    c = make_cache(storage="memory", store=stored_elsewhere(s), prefetch="wait_complete", extra={"io_timeout_s": 5})
    hang = threading.Event()

    def batch_get_v1(keys, idx):
        hang.wait(60)
        return [False] * len(keys)

    def close():
        hang.wait(60)

    swap(c, batch_get_v1=batch_get_v1, close=close)
    m = c.match_prefix(s)
    assert c.prefetch_from_storage("r", m.last_node, s)
    time.sleep(0.3)  # the get is in flight and hangs
    t0 = time.monotonic()
    c.close()
    took = time.monotonic() - t0
    hang.set()
    assert took < 7, f"close() took {took:.1f} s with a hung backend (deadline 5 s)"


def test_page_flags_contract():
    import numpy as np

    assert page_flags([True, False], 2) == [True, False]
    assert page_flags((1, 0), 2) == [True, False]
    assert page_flags(list(np.array([True, False])), 2) == [True, False]
    for bad in (True, [True], [True, 2], [None, True], "11", {0: True, 1: True}):
        assert page_flags(bad, 2) is None


def test_guard_without_deadline_and_exceptions_counted():
    from hicache_core.metrics import CacheMetrics

    class Raises:
        def batch_exists(self, keys):
            raise RuntimeError("boom")

        def close(self):
            pass

    m = CacheMetrics()
    g = GuardedStorage(Raises(), m, timeout_s=0)
    assert g.batch_exists(["a"]).ok == 0
    assert g.batch_exists(["a"]).ok == 0
    assert m.stats()["storage_errors"] == {"exists_exception": 2}
    g.close()


def test_check_with_a_hung_backend_fails_within_the_deadline(monkeypatch):
    """`hicache check` goes through the same guard: a read that never returns is a failed check, not a hang."""
    import subprocess
    import sys
    from pathlib import Path

    fixtures = Path(__file__).parent / "certify_fixtures"
    extra = (
        '{"backend_name": "hung", "module_path": "hung_store", "class_name": "HungStore", "interface_v1": 0, '
        '"io_timeout_s": 1}'
    )
    t0 = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hicache_core.cli",
            "check",
            "--hicache-storage-backend",
            "dynamic",
            "--hicache-storage-backend-extra-config",
            extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "PYTHONPATH": str(fixtures)},
    )
    took = time.monotonic() - t0
    assert r.returncode == 1 and "get did not return within 1 s" in r.stdout and "check FAILED" in r.stdout, r.stdout
    assert "Traceback" not in r.stderr
    assert took < 30, f"check took {took:.0f} s against a 1 s deadline"


def test_guard_threads_hold_no_tensors_and_leave_on_close():
    """A tensor whose last reference died on a guard thread while the interpreter finalized aborted the process
    (std::terminate from torch's noexcept dealloc; `hicache check` exited -6 about one run in eight). The thread
    drops the arguments before the caller wakes, the caller takes the result, and close() joins the threads."""
    import gc
    import weakref

    import torch

    from hicache_core.metrics import CacheMetrics

    made: list = []

    class Store:
        def batch_get_v1(self, keys, idx):
            made.append(weakref.ref(idx))
            return [True] * len(keys)

        def batch_exists(self, keys):
            return len(keys)

        def close(self):
            pass

    guard = GuardedStorage(Store(), CacheMetrics(), timeout_s=5)
    idx = torch.arange(4)
    assert guard.batch_get_v1(["a", "b"], idx).ok == 2
    del idx
    gc.collect()
    assert made[0]() is None, "a guard thread still holds the call's tensor"
    assert guard.batch_exists(["a"]).ok == 1
    guard.close()
    alive = [t.name for t in threading.enumerate() if t.name.startswith("hicache-storage-call")]
    assert alive == []
