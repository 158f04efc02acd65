"""Two real rank processes (torch.distributed, gloo on loopback), each with its own cache and backend."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.distributed as dist

from hicache_core.cache import build_cache
from hicache_core.cache.agree import RankAgreement
from hicache_core.config import HiCacheConfig
from hicache_core.faults import FaultyBackend, RunResult, drain, make_prompts, run_requests
from hicache_core.memory import KVSpec

PS = 16


def tree_fingerprint(cache) -> list:
    """Everything about the tree that must be the same on every rank (ids and slot numbers aside)."""
    out = []
    for n in cache.nodes():
        path, x = [], n
        while x is not None and x is not cache.root:
            path.append(x.key[0])
            x = x.parent
        out.append(
            [
                path[::-1],
                len(n.key),
                n.value is not None,
                n.host_value is not None,
                list(n.hash_value or []),
                n.lock_ref,
                n.host_ref,
            ]
        )
    return sorted(out, key=json.dumps)


def rank_main(
    rank: int, size: int, init_file: str, out_dir: str, store_dir: str, fault: str, mla: bool, requests: int
) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    group = dist.new_group(backend="gloo")  # the cache's own group: nothing else uses it
    spec = (
        KVSpec(layer_num=2, head_num=1, head_dim=16, dtype=torch.float32, is_mla=True)
        if mla
        else KVSpec(layer_num=2, head_num=2 // size or 1, head_dim=8, dtype=torch.float32)
    )
    cfg = HiCacheConfig(
        page_size=PS,
        hicache_io_backend="direct",
        hicache_storage_backend="file",
        hicache_storage_prefetch_policy="wait_complete",
        model_name="tp-test",
        hicache_storage_backend_extra_config={"storage_dir": store_dir, "prefetch_threshold": PS, "io_timeout_s": 0.3},
    )
    agree = RankAgreement(group)
    cache = build_cache(
        cfg,
        spec,
        12 * PS,
        tiers="hicache+storage",
        device="cpu",
        host_tokens=24 * PS,
        pin_memory=False,
        tp_rank=rank,
        tp_size=size,
        agree=agree,
    )
    if fault != "none" and rank == 1:  # one rank's backend fails or stalls for some pages; the other's does not
        cache.operator.wrap_storage(lambda backend: FaultyBackend(backend, fault, 0.3, random.Random(7), hang_s=0.6))
    rng = random.Random(42)  # the same requests on every rank
    prompts = make_prompts(rng, families=12, pages=3, page_size=PS)
    result = RunResult()
    run_requests(cache, prompts, requests, rng, result)
    cache.flush()
    fingerprint = tree_fingerprint(cache)
    every = [None] * size
    dist.all_gather_object(every, fingerprint)
    stats = cache.operator.storage_stats() or {}
    drain(cache, result)
    Path(out_dir, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "same_tree": all(f == every[0] for f in every),
                "nodes": len(fingerprint),
                "wrong_kv": result.wrong_kv,
                "leaked": result.leaked_pages,
                "storage_tokens": result.storage_tokens,
                "requests": result.requests,
                "collectives": agree.collectives,
                "errors": result.storage_errors,
                "set_pages": stats.get("set_pages", 0),
                "get_pages": stats.get("get_pages", 0),
            }
        )
    )
    dist.destroy_process_group()


def run_ranks(tmp_path: Path, *, fault: str = "none", mla: bool = False, requests: int = 60, size: int = 2) -> list:
    import torch.multiprocessing as mp

    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    out = tmp_path / f"out-{fault}-{mla}"
    out.mkdir()
    mp.spawn(
        rank_main,
        args=(size, str(tmp_path / f"init-{fault}-{mla}"), str(out), str(store), fault, mla, requests),
        nprocs=size,
        join=True,
    )
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(size)]
