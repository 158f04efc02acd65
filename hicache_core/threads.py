"""Background threads that leave the CPU's cores to the model.

torch runs an op in a thread with that thread's own OpenMP team, as many threads as cores. A copy or a checksum
in one of hicache's background threads (device<->host copies, storage I/O, guarded backend calls) then brings a
second team, whose threads spin after each op while the engine's forward pass wants every core for its matmuls:
on 2 cores the reference engine's forward ran 50% slower beside the host tier's copies (cProfile: the same 128
forward calls, 3.19 s against 2.09 s). A background thread runs its torch ops on one thread: it moves memory,
where more threads gain little, and it must not slow the compute it serves.

The direct mover's own pool (transfer/direct.py) runs no torch ops: its copies are the C copier's or numpy's, each
call one thread's memcpy with the GIL released.
"""

from __future__ import annotations

import torch


def background_thread() -> None:
    """Call first thing in a background thread (or as a ThreadPoolExecutor's ``initializer``): this thread's torch
    ops run on one thread. The engine's own thread keeps its count."""
    torch.set_num_threads(1)
