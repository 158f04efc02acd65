"""Background threads that leave the CPU's cores to the model.

torch runs an op in a thread with that thread's own OpenMP team, as many threads as cores. A copy or a checksum
in one of hicache's background threads (device<->host copies, storage I/O, guarded backend calls) then brings a
second team, whose threads spin after each op while the engine's forward pass wants every core for its matmuls:
on 2 cores the reference engine's forward ran 50% slower beside the host tier's copies (cProfile: the same 128
forward calls, 3.19 s against 2.09 s). A background thread runs its torch ops on one thread: it moves memory,
where more threads gain little, and it must not slow the compute it serves.

The direct mover's own pool (transfer/direct.py) runs no torch ops: its copies are the C copier's or numpy's, each
call one thread's memcpy with the GIL released.

Work nobody waits for (the device->host write-through copies) also runs at a lower CPU priority (``LOW_PRIORITY``, a
nice value of this thread alone), and so do the copier threads it borrows: on a busy CPU the forward pass goes
first, on an idle one the copy runs at full speed. Not storage backups: they call into a backend's own threads,
which would inherit the low priority from whichever thread made them first, prefetch reads included. (Measured:
the multi-turn benchmark's round 1, where nothing can hit, over 8 repeats: device-only radix median 319 ms, HiCache
L1+L2 319 ms, no cache 317 ms.)
"""

from __future__ import annotations

import os
import threading

import torch

LOW_PRIORITY = 10  # nice value for threads whose work nobody waits for


def background_thread(low_priority: bool = False) -> None:
    """Call first thing in a background thread (or as a ThreadPoolExecutor's ``initializer``): this thread's torch
    ops run on one thread (the engine's own thread keeps its count); with ``low_priority``, its nice value is
    ``LOW_PRIORITY`` where the OS sets one per thread (Linux)."""
    torch.set_num_threads(1)
    if not hasattr(os, "setpriority"):
        return
    try:
        # a thread inherits its creator's nice value: without low_priority, take the main thread's back (where
        # the OS lets an unprivileged process lower it again)
        nice = LOW_PRIORITY if low_priority else os.getpriority(os.PRIO_PROCESS, os.getpid())
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError:
        pass


def is_low_priority() -> bool:
    """Whether the calling thread was started with ``background_thread(low_priority=True)``."""
    if not hasattr(os, "getpriority"):
        return False
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) >= LOW_PRIORITY
    except OSError:
        return False
