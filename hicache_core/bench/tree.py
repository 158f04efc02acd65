"""``hicache bench tree``: the radix tree's own cost -- match_prefix and insert per request -- beside the time to
load the same prompt's KV from host in the same run, so the overhead reads as a fraction of the transfer."""

from __future__ import annotations

import argparse
import random
import time

import torch

from hicache_core.bench.common import dump_json, print_table, time_best
from hicache_core.cache import build_cache
from hicache_core.config import MAX_PAGE_SIZE, HiCacheConfig
from hicache_core.memory import DevicePool, HostPool, KVSpec
from hicache_core.parse import arg_int
from hicache_core.transfer import HostDeviceTransfer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-tokens", type=arg_int(1, 1 << 24), default=4096)
    p.add_argument("--page-size", type=arg_int(1, MAX_PAGE_SIZE), default=64)
    p.add_argument("--requests", type=arg_int(1, 1 << 20), default=200, help="distinct prompts in the tree (default 200)")
    p.add_argument("--shared-prefix", type=arg_int(0, 1 << 24), default=1024, help="tokens every prompt shares (a system prompt)")
    p.add_argument("--num-layers", type=arg_int(1, 4096), default=32, help="layers of the KV loaded for comparison")
    p.add_argument("--num-kv-heads", type=arg_int(1, 4096), default=8)
    p.add_argument("--head-dim", type=arg_int(1, 65536), default=128)
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    ps, n_tok = args.page_size, args.prompt_tokens
    rng = random.Random(0)
    shared = [rng.randrange(32000) for _ in range(args.shared_prefix)]
    prompts = [shared + [rng.randrange(32000) for _ in range(n_tok - len(shared))] for _ in range(args.requests)]
    cfg = HiCacheConfig(page_size=ps)
    tiny = KVSpec(layer_num=1, head_num=1, head_dim=1, dtype=torch.float32)  # the tree only needs slot indices
    cache = build_cache(cfg, tiny, (args.requests + 1) * n_tok, tiers="radix", device="cpu")
    dev = cache.device_pool
    slots = [dev.alloc(n_tok) for _ in prompts]
    t0 = time.perf_counter()
    for p, s in zip(prompts, slots):
        cache.insert(p, s)
    insert_us = (time.perf_counter() - t0) / len(prompts) * 1e6
    order = list(range(len(prompts)))
    rng.shuffle(order)
    t0 = time.perf_counter()
    for i in order:
        m = cache.match_prefix(prompts[i])
        assert len(m.device_indices) == n_tok
    match_us = (time.perf_counter() - t0) / len(prompts) * 1e6
    t0 = time.perf_counter()
    for i in order:  # a second insert of a cached prompt: the common case after every turn
        cache.insert(prompts[i], slots[i])
    reinsert_us = (time.perf_counter() - t0) / len(prompts) * 1e6

    spec = KVSpec(layer_num=args.num_layers, head_num=args.num_kv_heads, head_dim=args.head_dim)
    host = HostPool(spec, n_tok, ps, "layer_first", pin_memory=False)
    device = DevicePool(spec, n_tok, ps, "cpu")
    host.raw.fill_(1)
    mover = HostDeviceTransfer(host, device, "direct")
    idx = torch.arange(n_tok)
    load_s = time_best(lambda: mover.load_all_layers(idx, idx), 3)
    load_us = load_s * 1e6
    rows = [
        {"op": "match_prefix (hit, 4K prompt)", "us": match_us, "vs_load": match_us / load_us},
        {"op": "insert (new prompt)", "us": insert_us, "vs_load": insert_us / load_us},
        {"op": "insert (already cached)", "us": reinsert_us, "vs_load": reinsert_us / load_us},
        {"op": f"load {n_tok} tokens host->device (direct)", "us": load_us, "vs_load": 1.0},
    ]
    if args.json:
        dump_json({"prompt_tokens": n_tok, "page_size": ps, "requests": args.requests, "results": rows})
        return 0
    print(f"hicache bench tree: {args.requests} prompts of {n_tok} tokens (page {ps}), {args.shared_prefix} shared; "
          f"KV {args.num_layers}x{args.num_kv_heads}x{args.head_dim} bf16 = {n_tok * spec.size_per_token / 2**20:.0f} MiB per prompt")
    print_table(rows, [("op", "operation", "s"), ("us", "us/call", ".1f"), ("vs_load", "x load time", ".4f")])
    return 0
