"""Rank agreement: tensor-parallel ranks keep identical trees although each has its own pools and backend.

With TP, every rank runs its own cache over its shard of the KV heads, and the ranks must make the same cache
decisions or their trees -- and with them the prefixes they serve -- drift apart. Every decision that rests on a
rank-local outcome is therefore agreed by an all-reduce MIN (SGLang's rule) before it is applied:

* device->host copies, host->device loads: how many of the oldest have finished (a copy counts once it has
  landed on every rank);
* storage backups: which of those in flight have finished everywhere (only then is a node's host copy released);
* storage prefetch: whether its query has answered everywhere and how many pages every rank found; whether it
  may stop waiting; how many tokens every rank fetched (a rank that fetched more frees the rest);
* host room: what every rank has free, so evictions and grants are the same everywhere (pages come back to the
  host pool from worker threads at different times on each rank);
* ``flush``: whether anything is still running anywhere.

Device frees and everything else on the tree are made by the owner thread in the same order on every rank.
All collectives are issued by the owner thread, on the group the engine gives (a gloo group of its own is best:
nothing else may use it concurrently); a call from another thread is a bug and raises.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import torch


class Solo:
    """One rank: nothing to agree with."""

    active = False

    def min(self, values: list[int]) -> list[int]:
        return list(values)

    def all(self, flag: bool) -> bool:
        return bool(flag)

    def any(self, flag: bool) -> bool:
        return bool(flag)


class RankAgreement(Solo):
    """All-reduce MIN over a ``torch.distributed`` group, from one thread only."""

    active = True

    def __init__(self, group: Any = None, comm: Any = None) -> None:
        """``comm``: the ranks' shared-memory exchange (engine/shm.py), used instead of the group when given."""
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("rank agreement needs torch.distributed initialized (init_process_group)")
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self._owner: Optional[int] = None
        self.collectives = 0  # how many were issued (tests, metrics)
        self.comm = comm

    def min(self, values: list[int]) -> list[int]:
        me = threading.get_ident()
        if self._owner is None:
            self._owner = me
        elif self._owner != me:
            raise RuntimeError(
                "rank agreement called from a second thread: collectives on one group must come from "
                "the thread that owns the cache"
            )
        if not values:
            values = [0]  # every rank issues the collective, even with nothing to agree on
            empty = True
        else:
            empty = False
        self.collectives += 1
        if self.comm is not None:
            out = self.comm.min(values)
            return [] if empty else out
        t = torch.tensor(values, dtype=torch.int64)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MIN, group=self.group)
        return [] if empty else [int(x) for x in t.tolist()]

    def all(self, flag: bool) -> bool:
        return bool(self.min([int(bool(flag))])[0])

    def any(self, flag: bool) -> bool:
        return not self.min([int(not flag)])[0]


def agreed_prefix(agree: Solo, landed: list[int], new: list[int]) -> list[int]:
    """The oldest finished copies that have finished on every rank (all of them with one rank): ``new`` joins
    ``landed``; what every rank has is taken off its front and returned."""
    landed += new
    n = agree.min([len(landed)])[0] if agree.active else len(landed)
    out = landed[:n]
    del landed[:n]
    return out
