"""hicache's background threads run torch ops on one thread, and the engine's thread keeps its count (a second
OpenMP team spinning beside the forward pass made it 50% slower on 2 cores)."""

import threading

import pytest
import torch

from hicache_core.controller.operations import Worker
from hicache_core.threads import background_thread


def test_a_background_thread_computes_on_one_thread_and_the_caller_keeps_its_count():
    before = torch.get_num_threads()
    seen = []

    def work():
        background_thread()
        seen.append(torch.get_num_threads())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == [1]
    assert torch.get_num_threads() == before


def test_the_controllers_worker_thread_is_a_background_thread():
    stream = Worker("t", torch.device("cpu"))
    seen = []
    done = threading.Event()

    def job(sync):
        seen.append(torch.get_num_threads())
        done.set()

    stream.submit(job)
    assert done.wait(5)
    assert seen == [1]
    stream.stop()


def test_work_nobody_waits_for_runs_at_low_priority_and_its_copier_threads_too():
    import os

    from hicache_core.memory import DevicePool, HostPool, KVSpec
    from hicache_core.threads import LOW_PRIORITY, is_low_priority
    from hicache_core.transfer import direct

    spec = KVSpec(layer_num=2, head_num=2, head_dim=64, dtype=torch.bfloat16)
    tokens = 4096  # 4 MiB: the copy is split over the copier threads
    host = HostPool(spec, tokens, 16, "layer_first", pin_memory=False)
    dev = DevicePool(spec, tokens, 16, torch.device("cpu"))
    seen = {}
    done = threading.Event()
    copier_nice = []
    real = direct._executor

    def spy():  # the pool a copy from this thread draws its helpers from, and how nice they are
        pool = real()
        copier_nice.append(pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result())
        return pool

    def job(sync):
        seen["low"], seen["torch"] = is_low_priority(), torch.get_num_threads()
        direct._executor = spy
        try:
            idx = torch.arange(tokens)
            direct.backup_all_layers(dev, host, idx, idx.reshape(-1, 16).flip(0).reshape(-1))
        finally:
            direct._executor = real
        done.set()

    for name, low in (("writer", True), ("loader", False)):  # each draws on a pool of its own priority
        seen.clear()
        done.clear()
        worker = Worker(name, torch.device("cpu"), low_priority=low)
        worker.submit(job)
        assert done.wait(10)
        worker.stop()
        assert seen == {"low": low, "torch": 1}
    assert not is_low_priority()  # the test's own thread is untouched
    if direct._THREADS > 1:
        assert len(copier_nice) == 2 and copier_nice[0] >= LOW_PRIORITY > copier_nice[1], copier_nice


def test_copier_threads_keep_off_the_callers_cpu(monkeypatch):
    """Linux may wake a copier thread on its waker's CPU and leave it there: the two halves of a copy then ran one
    after the other on one CPU while the other idled. Helpers are kept to the caller's other CPUs."""
    import os

    from hicache_core.transfer import direct

    allowed = direct._allowed_cpus()
    if len(allowed) < 2 or direct._GETCPU is None:
        pytest.fail(f"needs Linux and 2 CPUs to place threads on (this process may use {allowed})")
    here, getcpu = allowed[0], direct._GETCPU
    monkeypatch.setattr(direct, "_GETCPU", lambda: here)  # the caller "runs" on the first CPU
    seen = []

    def where():
        seen.append((frozenset(os.sched_getaffinity(0)), getcpu()))

    direct._in_parallel([lambda: None] + [where] * 3)
    assert len(seen) == 3
    for mask, cpu in seen:
        assert mask == frozenset(allowed) - {here} and cpu != here
    # a caller that may run on one CPU only leaves its helpers where they were allowed before
    monkeypatch.setattr(direct, "_allowed_cpus", lambda: [here])
    assert direct._helper_cpus() is None
    assert set(os.sched_getaffinity(0)) == set(allowed)  # the caller's own mask is never touched


def test_copier_thread_count_comes_from_the_environment(monkeypatch, caplog):
    from hicache_core.transfer import direct

    monkeypatch.setenv("HICACHE_DIRECT_THREADS", "3")
    assert direct._thread_count() == 3
    monkeypatch.setenv("HICACHE_DIRECT_THREADS", "99")
    assert direct._thread_count() == 8
    monkeypatch.setenv("HICACHE_DIRECT_THREADS", "two")
    with caplog.at_level("WARNING"):
        assert direct._thread_count() == max(1, min(len(direct._allowed_cpus()), 8))
    assert "HICACHE_DIRECT_THREADS='two'" in caplog.text
