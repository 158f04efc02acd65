"""hicache's background threads run torch ops on one thread, and the engine's thread keeps its count (a second
OpenMP team spinning beside the forward pass made it 50% slower on 2 cores)."""

import threading

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
