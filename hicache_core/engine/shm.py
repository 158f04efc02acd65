"""All-reduce between the tensor-parallel ranks of one host through shared memory, for the CPU (gloo) path.

gloo's all-reduce goes through loopback TCP: about 0.7 ms for a decode step's ``(batch, hidden)`` tensor on a
2-core VM, eight of them per step for a 4-layer model, plus the cache's agreements -- a TP=2 decode step took 31-40
ms where one process took 20. Here each rank copies its part into its slot of a shared file, raises its sequence
number, waits (spinning briefly, then yielding, then napping) until every rank has raised theirs, and sums the
slots in rank order, so every rank gets bit-identical results (about 0.08 ms). Two buffers alternate, so a rank
that is ahead never overwrites a slot another is still reading. A tensor larger than a slot goes through gloo.

It relies on x86's ordering of stores (a slot's bytes are visible before the sequence number that follows them),
so it is used on x86-64 only; ``HICACHE_TP_SHM=0`` turns it off. A rank that dies is noticed (its pid is gone)
rather than waited on forever.
"""

from __future__ import annotations

import mmap
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HEADER = 4096  # sequence numbers, then pids
SLOT_BYTES = 4 << 20  # per rank and buffer: a (1024, 512) float64 all-reduce fits
SPINS = 2000  # ~0.1 ms of spinning, then yielding the core
YIELDS = 20000  # then napping
NAP_S = 50e-6
TIMEOUT_S = 1800.0  # as gloo's default: a live rank that does not answer for this long is a bug


def supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and os.environ.get("HICACHE_TP_SHM", "1") != "0"


class ShmComm:
    """The ranks' shared slots; every rank makes the same calls in the same order (as with any collective)."""

    def __init__(self, path: str, rank: int, size: int, barrier: Any, slot_bytes: int = SLOT_BYTES) -> None:
        """``barrier()``: wait for every rank (rank 0 has made the file by then)."""
        self.rank, self.size, self.slot = rank, size, slot_bytes
        total = HEADER + 2 * size * slot_bytes
        if rank == 0:
            with open(path, "wb") as f:
                f.truncate(total)
        barrier()
        fd = os.open(path, os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, total)
        finally:
            os.close(fd)
        self._seqs = np.frombuffer(self._mm, dtype=np.int64, count=size, offset=0)
        self._pids = np.frombuffer(self._mm, dtype=np.int64, count=size, offset=8 * size)
        self._pids[rank] = os.getpid()
        self._buf = [
            torch.from_numpy(np.frombuffer(self._mm, dtype=np.uint8, count=size * slot_bytes, offset=off)).view(
                size, slot_bytes
            )
            for off in (HEADER, HEADER + size * slot_bytes)
        ]
        self._seq = 0
        barrier()  # every pid is written

    def fits(self, t: torch.Tensor) -> bool:
        return t.numel() * t.element_size() <= self.slot

    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Publish ``t``; every rank's tensor once all have published."""
        self._seq += 1
        seq, buf = self._seq, self._buf[self._seq % 2]
        n = t.numel() * t.element_size()
        buf[self.rank, :n].view(t.dtype).view(t.shape).copy_(t)
        self._seqs[self.rank] = seq
        for r in range(self.size):
            if self._seqs[r] < seq:
                self._wait(r, seq)
        return [buf[r, :n].view(t.dtype).view(t.shape) for r in range(self.size)]

    def _wait(self, r: int, seq: int) -> None:
        """Spin briefly (a peer on another core arrives within microseconds), then sleep in short naps: on a
        machine with more runnable processes than cores the peer may be waiting for this very core, and spinning
        would starve it and everything else."""
        spins, start = 0, time.monotonic()
        while self._seqs[r] < seq:
            spins += 1
            if spins > SPINS:
                os.sched_yield()  # let a peer waiting for this core run
                if spins > YIELDS:
                    time.sleep(NAP_S)
                if spins % 256 == 0:
                    self._check_alive(r, start)

    def _check_alive(self, r: int, start: float) -> None:
        pid = int(self._pids[r])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise RuntimeError(f"tensor-parallel rank {r} (pid {pid}) has died") from None
        except PermissionError:
            pass
        if time.monotonic() - start > TIMEOUT_S:
            raise RuntimeError(f"tensor-parallel rank {r} did not reach the collective in {TIMEOUT_S:.0f} s")

    def all_reduce_sum(self, t: torch.Tensor) -> None:
        """In place: the sum over ranks, added in rank order (the same bits on every rank)."""
        parts = self._exchange(t.contiguous())
        out = parts[0].clone()
        for p in parts[1:]:
            out += p
        t.copy_(out)

    def min(self, values: list[int]) -> list[int]:
        parts = self._exchange(torch.tensor(values, dtype=torch.int64))
        return [int(x) for x in torch.stack(parts).min(0).values.tolist()]

    def close(self) -> None:
        self._buf.clear()
        del self._seqs, self._pids
        try:
            self._mm.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with the process
            pass


def open_comm(workdir: str, rank: int, size: int, barrier: Any) -> Any:
    """A :class:`ShmComm` for the ranks started in ``workdir`` (None where unsupported)."""
    if size < 2 or not supported():
        return None
    return ShmComm(str(Path(workdir) / "tp-shm"), rank, size, barrier)
