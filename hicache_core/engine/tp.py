"""Tensor parallelism for the reference engine: N rank processes, heads and KV sharded, trees kept identical.

:func:`run_tp` starts ``size`` processes (``torch.multiprocessing`` spawn) joined by ``torch.distributed`` --
gloo on loopback on CPU, nccl when each rank has a CUDA device -- and runs a function on each. On a rank,
:func:`shard` cuts the full model into that rank's part, Megatron style: its query and KV heads (column-parallel
q/k/v), the matching rows of o_proj, a slice of the MLP (column-parallel gate/up, row-parallel down), the two
row-parallel outputs summed by an all-reduce; embeddings, norms and the LM head stay whole, so every rank gets the
same logits and the same greedy tokens. Each rank's KV pool holds only its heads; each rank has its own host pool
and its own storage keys (the tp rank is in the namespace; MLA pages are shared and written by rank 0).

Ranks make the same scheduling decisions: rank 0 decides which requests have arrived and broadcasts it
(:meth:`TPContext.arrivals`); every cache decision that rests on a rank-local outcome is agreed through
:class:`~hicache_core.cache.agree.RankAgreement` on a gloo group of its own. All collectives are issued from each
rank's main thread.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import attrs
import torch

from hicache_core.engine.model import TinyLlama
from hicache_core.engine.model_config import COMPUTE, ModelConfig
from hicache_core.errors import ConfigError


@attrs.define
class TPContext:
    rank: int
    size: int
    group: Any = None  # the model's all-reduces (the default group)
    cache_group: Any = None  # rank agreement: a group of its own
    comm: Any = None  # the ranks' shared-memory all-reduce (engine/shm.py; CPU ranks on x86-64), else None

    def arrivals(self, n: int) -> int:
        """Rank 0's count of newly arrived requests, on every rank."""
        import torch.distributed as dist

        t = torch.tensor([n], dtype=torch.int64)
        dist.broadcast(t, src=0, group=self.group)
        return int(t.item())

    def send_plan(self, plan: list, stop: bool) -> None:
        """Rank 0 (a server's scheduler): this iteration's inputs, to every other rank."""
        import torch.distributed as dist

        dist.broadcast_object_list([plan, stop], src=0, group=self.group)

    def recv_plan(self) -> tuple[list, bool]:
        import torch.distributed as dist

        box: list = [None, None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0], bool(box[1])

    def gather(self, obj: Any) -> list:
        import torch.distributed as dist

        out: list = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def check_divisible(c: ModelConfig, size: int) -> None:
    if c.is_mla and size > 1:
        raise ConfigError(
            f"--tp-size {size}: the reference engine runs MLA models at --tp-size 1 (their latent is one vector per "
            "token, not a set of heads to split)"
        )
    if c.has_mamba and size > 1:
        raise ConfigError(
            f"--tp-size {size}: the reference engine runs Mamba models at --tp-size 1 (each page holds a Mamba "
            "layer's whole state, not a shard of it)"
        )
    for what, n in (
        ("attention heads", c.num_heads),
        ("KV heads", c.num_kv_heads),
        ("MLP width (intermediate size)", c.intermediate_size),
    ):
        if n % size:
            raise ConfigError(f"--tp-size {size}: the model's {what} ({n}) must divide evenly by it")


def shard(model: TinyLlama, ctx: TPContext) -> TinyLlama:
    """This rank's part of ``model`` (see the module doc)."""
    c, r, n = model.config, ctx.rank, ctx.size
    check_divisible(c, n)
    hq, hk, d, inter = c.num_heads // n, c.num_kv_heads // n, c.head_dim, c.intermediate_size // n
    q, kv, m = (
        slice(r * hq * d, (r + 1) * hq * d),
        slice(r * hk * d, (r + 1) * hk * d),
        slice(r * inter, (r + 1) * inter),
    )
    cols = {"wq": q, "wk": kv, "wv": kv, "w_gate": m, "w_up": m}
    rows = {"wo": q, "w_down": m}
    layers = []
    for p in model.layers:
        out = {"attn_norm": p["attn_norm"], "mlp_norm": p["mlp_norm"]}
        for name, sl in cols.items():
            out[name] = p[name][:, sl].contiguous()
            if name + "_b" in p:
                out[name + "_b"] = p[name + "_b"][sl].contiguous()
        for name, sl in rows.items():
            out[name] = p[name][sl, :].contiguous()
            if name + "_b" in p and r == 0:  # a row-parallel bias is added once, before the sum
                out[name + "_b"] = p[name + "_b"]
        layers.append(out)
    # the shard keeps the whole model's name and weights' identity: its pages are the model's heads, and a store of
    # head-split pages (storage/head_split.py) is then shared by every TP size
    digest = c.content_digest or attrs.evolve(c, compute_dtype=COMPUTE).fingerprint
    config = attrs.evolve(
        c, num_heads=hq, num_kv_heads=hk, intermediate_size=inter, checkpoint=c.name, content_digest=digest
    )
    part = TinyLlama(
        config,
        model.device,
        weights={"embed": model.embed, "layers": layers, "final_norm": model.final_norm, "lm_head": model.lm_head},
    )
    part.tp_shard, part.tp_group, part.tp_comm = True, ctx.group, ctx.comm
    return part


def rank_entry(rank: int, size: int, workdir: str, fn: Callable, args: tuple) -> None:
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= size else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{workdir}/init", rank=rank, world_size=size)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    ctx = TPContext(rank, size, group=None, cache_group=dist.new_group(backend="gloo"))
    if backend == "gloo":  # loopback TCP costs ~0.7 ms per all-reduce; shared memory ~0.08 ms
        from hicache_core.engine.shm import open_comm

        ctx.comm = open_comm(workdir, rank, size, dist.barrier)
    try:
        result = fn(ctx, *args)
        if rank == 0:
            Path(workdir, "result.pkl").write_bytes(pickle.dumps(result))
    finally:
        if ctx.comm is not None:
            ctx.comm.close()
        dist.destroy_process_group()


def run_tp(size: int, fn: Callable, *args: Any) -> Optional[Any]:
    """``fn(ctx, *args)`` on ``size`` rank processes; rank 0's return value. ``fn`` must be a module-level function
    (it is pickled into the spawned processes); an exception on any rank is raised here."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="hicache-tp-") as d:
        try:
            mp.spawn(rank_entry, args=(size, d, fn, args), nprocs=size, join=True)
        except mp.ProcessRaisedException as e:
            last = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
            kind, _, message = last.partition(": ")
            if kind.endswith("ConfigError"):
                raise ConfigError(message) from None
            raise RuntimeError(f"a tensor-parallel rank failed: {last}") from None
        except mp.ProcessExitedException as e:
            raise RuntimeError(f"a tensor-parallel rank died: {e}") from None
        result = Path(d, "result.pkl")
        return pickle.loads(result.read_bytes()) if result.exists() else None
