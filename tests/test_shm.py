"""The shared-memory all-reduce of tensor-parallel CPU ranks (engine/shm.py): in two real rank processes its sums
are gloo's to the bit and its MIN is gloo's; a tensor past a slot goes through gloo; a dead peer is an error, not a
hang."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hicache_core.engine.shm import ShmComm, supported
from hicache_core.engine.tp import run_tp

pytestmark = pytest.mark.skipif(not supported(), reason="the shared-memory all-reduce runs on x86-64 only")


def _on_rank(ctx):
    import torch.distributed as dist

    assert ctx.comm is not None, "CPU ranks on x86-64 get the shared-memory exchange"
    g = torch.Generator().manual_seed(ctx.rank)
    out = []
    for shape in [(1, 512), (4, 512), (37, 3, 64), (1024, 512)]:
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        mine, ref = x.clone(), x.clone()
        ctx.comm.all_reduce_sum(mine)
        dist.all_reduce(ref)
        out.append(bool(torch.equal(mine, ref)))
    big = torch.zeros(1025, 512, dtype=torch.float64)
    out.append(not ctx.comm.fits(big))
    mins = ctx.comm.min([ctx.rank, 5 - ctx.rank, -ctx.rank])
    return {"equal_to_gloo": out, "min": mins}


def test_sums_and_mins_equal_gloos_in_real_ranks():
    got = run_tp(2, _on_rank)
    assert got == {"equal_to_gloo": [True] * 5, "min": [0, 4, -1]}


def test_a_dead_peer_is_an_error_not_a_hang(tmp_path):
    comm = ShmComm(str(tmp_path / "shm"), 0, 2, barrier=lambda: None, slot_bytes=4096)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    comm._pids[1] = gone.pid  # rank 1 "was" that process
    with pytest.raises(RuntimeError, match=f"rank 1 \\(pid {gone.pid}\\) has died"):
        comm.all_reduce_sum(torch.ones(4, dtype=torch.float64))
    comm.close()
