"""``hicache bench tree``: the radix tree's own cost -- match_prefix and insert per request -- beside the time to
load the same prompt's KV from host in the same run, so the overhead reads as a fraction of the transfer; and
beside SGLang's RadixCache on the same prompts where sglang is importable. Garbage collection is off while timing
(as ``timeit`` does), for both."""

from __future__ import annotations

import argparse
import gc
import random
import statistics
from typing import Optional

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
    p.add_argument(
        "--requests", type=arg_int(1, 1 << 20), default=200, help="distinct prompts in the tree (default 200)"
    )
    p.add_argument(
        "--shared-prefix", type=arg_int(0, 1 << 24), default=1024, help="tokens every prompt shares (a system prompt)"
    )
    p.add_argument("--num-layers", type=arg_int(1, 4096), default=32, help="layers of the KV loaded for comparison")
    p.add_argument("--num-kv-heads", type=arg_int(1, 4096), default=8)
    p.add_argument("--head-dim", type=arg_int(1, 65536), default=128)
    p.add_argument(
        "--rounds",
        type=arg_int(1, 100),
        default=3,
        help="alternating rounds of ours and SGLang's; medians are reported (default 3)",
    )
    p.add_argument("--json", action="store_true")


def _ours(prompts: list[list[int]], ps: int, order: list[int]) -> dict[str, float]:
    """Microseconds per call: insert of a new prompt, match_prefix on a full hit, insert of a cached prompt."""
    n_tok = len(prompts[0])
    tiny = KVSpec(layer_num=1, head_num=1, head_dim=1, dtype=torch.float32)  # the tree only needs slot indices
    cache = build_cache(HiCacheConfig(page_size=ps), tiny, (len(prompts) + 1) * n_tok, tiers="radix", device="cpu")
    slots = [cache.device_pool.alloc(n_tok) for _ in prompts]

    def fill() -> None:  # a fresh tree each time (the first run pays the allocator's first touches; median of 3)
        cache.tree.reset()
        for p, s in zip(prompts, slots):
            cache.insert(p, s)

    def match() -> None:
        for i in order:
            cache.match_prefix(prompts[i])

    def reinsert() -> None:
        for i in order:  # a second insert of a cached prompt: the common case after every turn
            cache.insert(prompts[i], slots[i])

    insert = time_best(fill, 3)
    assert len(cache.match_prefix(prompts[0]).device_indices) == n_tok
    n = len(prompts)
    return {
        "insert": insert / n * 1e6,
        "match": time_best(match, 3) / n * 1e6,
        "reinsert": time_best(reinsert, 3) / n * 1e6,
    }


def _sglang(prompts: list[list[int]], ps: int, order: list[int]) -> dict[str, float] | None:
    """The same, on SGLang's RadixCache (its keys prebuilt as the arrays its scheduler holds); None without sglang.
    Its match_prefix returns only lengths: "match+gather" adds the concatenation of the device indices ours
    returns."""
    try:
        from array import array

        from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
        from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
    except Exception:  # not installed, or an sglang that does not import here
        return None
    n_tok = len(prompts[0])
    tree = RadixCache.create_simulated(page_size=ps)
    keys = [array("q", p) for p in prompts]
    values = [torch.arange(i * n_tok, (i + 1) * n_tok, dtype=torch.int64) for i in range(len(prompts))]

    def match(gather: bool) -> None:
        for i in order:
            m = tree.match_prefix(MatchPrefixParams(key=RadixKey(keys[i])))
            if gather:
                tree.path_device_indices(m.last_device_node)

    def reinsert() -> None:
        for i in order:
            tree.insert(InsertParams(key=RadixKey(keys[i]), value=values[i]))

    def fill() -> None:
        tree.reset()
        for k, v in zip(keys, values):
            tree.insert(InsertParams(key=RadixKey(k), value=v))

    insert = time_best(fill, 3)
    n = len(prompts)
    return {
        "insert": insert / n * 1e6,
        "match": time_best(lambda: match(False), 3) / n * 1e6,
        "match_gather": time_best(lambda: match(True), 3) / n * 1e6,
        "reinsert": time_best(reinsert, 3) / n * 1e6,
    }


def run(args: argparse.Namespace) -> int:
    ps, n_tok = args.page_size, args.prompt_tokens
    rng = random.Random(0)
    shared = [rng.randrange(32000) for _ in range(args.shared_prefix)]
    prompts = [shared + [rng.randrange(32000) for _ in range(n_tok - len(shared))] for _ in range(args.requests)]
    order = list(range(len(prompts)))
    rng.shuffle(order)
    gc.collect()
    gc.disable()  # as timeit does: a collection pass lands on whichever call allocates at the time
    runs: list[tuple[dict, Optional[dict]]] = []
    try:
        for _ in range(args.rounds):  # alternating, so a slow spell of this machine hits both sides
            runs.append((_ours(prompts, ps, order), _sglang(prompts, ps, order)))
    finally:
        gc.enable()
    ours = {k: statistics.median(o[k] for o, _ in runs) for k in runs[0][0]}
    theirs = None
    if runs[0][1] is not None:
        theirs = {k: statistics.median(t[k] for _, t in runs if t) for k in runs[0][1]}

    spec = KVSpec(layer_num=args.num_layers, head_num=args.num_kv_heads, head_dim=args.head_dim)
    host = HostPool(spec, n_tok, ps, "layer_first", pin_memory=False)
    device = DevicePool(spec, n_tok, ps, "cpu")
    host.raw.fill_(1)
    mover = HostDeviceTransfer(host, device, "direct")
    idx = torch.arange(n_tok)
    load_us = time_best(lambda: mover.load_all_layers(idx, idx), 3) * 1e6
    rows = []
    for op, key, sg_key in (
        (f"match_prefix (hit, {n_tok} tokens, with indices)", "match", "match_gather"),
        ("insert (new prompt)", "insert", "insert"),
        ("insert (already cached)", "reinsert", "reinsert"),
    ):
        row = {"op": op, "us": ours[key], "vs_load": ours[key] / load_us}
        if theirs is not None:
            row["sglang_us"] = theirs[sg_key]
            row["speedup"] = theirs[sg_key] / ours[key]
        rows.append(row)
    both = ours["match"] + ours["insert"]
    row = {"op": "match + insert: a request's tree cost", "us": both, "vs_load": both / load_us}
    if theirs is not None:
        row["sglang_us"] = theirs["match_gather"] + theirs["insert"]
        row["speedup"] = row["sglang_us"] / both
    rows.append(row)
    if theirs is not None:
        rows.append(
            {
                "op": "  sglang match_prefix without indices",
                "us": None,
                "vs_load": None,
                "sglang_us": theirs["match"],
                "speedup": theirs["match"] / ours["match"],
            }
        )
    rows.append({"op": f"load {n_tok} tokens host->device (direct)", "us": load_us, "vs_load": 1.0})
    if args.json:
        dump_json(
            {
                "prompt_tokens": n_tok,
                "page_size": ps,
                "requests": args.requests,
                "sglang": theirs is not None,
                "results": rows,
            }
        )
        return 0
    print(
        f"hicache bench tree: {args.requests} prompts of {n_tok} tokens (page {ps}), {args.shared_prefix} shared; "
        f"KV {args.num_layers}x{args.num_kv_heads}x{args.head_dim} bf16 = {n_tok * spec.size_per_token / 2**20:.0f} "
        "MiB per prompt"
    )
    cols = [("op", "operation", "s"), ("us", "us/call", ".1f"), ("vs_load", "x load time", ".4f")]
    if theirs is not None:
        cols += [("sglang_us", "SGLang RadixCache us", ".1f"), ("speedup", "ours vs SGLang", ".2f")]
    print_table(rows, cols)
    if theirs is None:
        print("(SGLang's RadixCache is not importable here: install sglang to time it beside ours)")
    return 0
