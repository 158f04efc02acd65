"""``hicache bench fleet``: ``hicache serve`` processes of different TP sizes on one store, against each on its own.

A fleet serves shared prefixes (system prompts, documents) from whichever server a request lands on. Each of
``--prefixes`` prefixes is first asked of one server; in each later wave it is asked of the next server, with a new
question after it. After every wave each server flushes (its backups land in the store, its device and host tiers
are emptied), so what a server finds of a prefix it has never computed can only come from the store.

Two runs of the same requests on fresh processes: ``separate`` (each server its own store directory: a server finds
only what it wrote itself) and ``shared`` (one directory, pages stored by KV head group, ``"head_group"``, so a TP=2
server reads what a TP=1 server wrote and the reverse). The report gives the storage hit rate of the waves after the
first (storage-hit tokens over prompt tokens), the bytes the store holds at the end, and TTFT; the two runs'
tokens must be the same (a page read from another TP size's writes gives the recompute's tokens). The servers are
all the reference engine; SGLang's and vLLM's pages are not yet in a format ours can share (issue #39).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import statistics
import tempfile
from typing import Any

from hicache_core.bench.common import dump_json, print_table
from hicache_core.bench.http import TIERS, HttpCall, http_get, http_post
from hicache_core.bench.pd_instances import Instances, add_instance_hicache_args, hicache_flags
from hicache_core.errors import ConfigError, HiCacheError
from hicache_core.extra_config import parse_extra_config
from hicache_core.parse import arg_int

MODES = ("separate", "shared")


def add_arguments(p: argparse.ArgumentParser) -> None:
    f = p.add_argument_group("fleet (each server a `hicache serve` process on 127.0.0.1 with the random tiny model)")
    f.add_argument("--servers", default="1,2", help="the TP size of each server, comma separated (default %(default)s)")
    f.add_argument("--prefixes", type=arg_int(1, 1000), default=4, help="shared prefixes (default %(default)s)")
    f.add_argument("--prefix-length", type=arg_int(1, 1 << 20), default=512, help="tokens (default %(default)s)")
    f.add_argument("--question-length", type=arg_int(1, 1 << 20), default=32, help="tokens after a prefix")
    f.add_argument("--output-length", type=arg_int(1, 4096), default=4, help="tokens generated per request")
    f.add_argument("--head-group", type=arg_int(1, 4096), default=1, help="KV heads per stored object (shared run)")
    f.add_argument("--device-tokens", type=arg_int(1, 1 << 30), default=2048, help="each server's device pool")
    f.add_argument("--seed", type=arg_int(0), default=0, help="prompts and the servers' weights (default 0)")
    f.add_argument("--start-timeout", type=arg_int(1, 3600), default=180, help="seconds a server may take to start")
    f.add_argument("--storage-dir", default=None, help="where the stores go (default: a temp dir, removed after)")
    f.add_argument("--report-dir", default="hicache-report", help="where fleet.json goes (default %(default)s)")
    f.add_argument("--json", action="store_true", help="print the JSON report instead of a table")
    add_instance_hicache_args(p, page_size=64, hicache_ratio=2.0)


def _servers(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise ConfigError(f"--servers {text!r}: give two or more TP sizes, comma separated (e.g. 1,2)")
    return sizes


def _prompts(args: argparse.Namespace, vocab: int, waves: int) -> list[list[list[int]]]:
    """prompts[wave][prefix]: the prefix, then that wave's question."""
    rng = random.Random(args.seed)
    draw = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    prefixes = [draw(args.prefix_length) for _ in range(args.prefixes)]
    return [[p + draw(args.question_length) for p in prefixes] for _ in range(waves)]


def _store_bytes(dirs: set[str]) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for root in dirs for d, _, fs in os.walk(root) for f in fs)


def _run(mode: str, args: argparse.Namespace, sizes: list[int], root: str, prompts: Any) -> dict[str, Any]:
    names = [f"tp{t}-{i}" for i, t in enumerate(sizes)]
    dirs = {n: os.path.join(root, mode if mode == "shared" else f"{mode}-{n}") for n in names}
    specs = []
    for name, tp in zip(names, sizes):
        one = copy.copy(args)
        extra = parse_extra_config(args.hicache_storage_backend_extra_config)
        if mode == "shared":
            extra["head_group"] = args.head_group
        one.hicache_storage_backend_extra_config = json.dumps(extra)
        flags = hicache_flags(one, dirs[name], store=True)
        specs.append(
            (
                name,
                ["--seed", str(args.seed), "--max-total-tokens", str(args.device_tokens)]
                + ["--tp-size", str(tp), *flags],
            )
        )
    workdir = tempfile.mkdtemp(prefix=f"hicache-fleet-{mode}-")
    try:
        with Instances(specs, workdir, args.start_timeout) as inst:
            if prompts[0] is None:
                vocab = int((http_get(inst.urls[names[0]] + "/get_model_info") or {}).get("vocab_size") or 0)
                if vocab < 4:
                    raise HiCacheError(f"{inst.urls[names[0]]} reports no usable vocab_size")
                prompts[0] = _prompts(args, vocab, len(names))
            waves = []
            for w, wave_prompts in enumerate(prompts[0]):
                calls = []
                for p, ids in enumerate(wave_prompts):  # one at a time: a server's TTFT is its own
                    name = names[(p + w) % len(names)]
                    call = HttpCall(inst.urls[name], ids, args)
                    call.run()
                    if call.error:
                        raise HiCacheError(f"{mode}: {name}: {call.error}")
                    calls.append((name, call))
                for url in inst.urls.values():  # backups into the store, local tiers emptied
                    status, text = http_post(url + "/flush_cache", {})
                    if status != 200:
                        raise HiCacheError(f"{url}/flush_cache answered {status}: {text[:200]}")
                waves.append(calls)
            inst.check_alive()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    later = [c for calls in waves[1:] for _, c in calls]
    storage = sum(c.cached()["storage"] for c in later)
    prompt_tokens = sum(len(c.ids) for c in later)
    return {
        "mode": mode,
        "servers": dict(zip(names, sizes)),
        "storage_hit_rate_later_waves": storage / prompt_tokens if prompt_tokens else 0.0,
        "storage_hit_tokens_later_waves": storage,
        "hit_tokens": {t: sum(c.cached()[t] for calls in waves for _, c in calls) for t in TIERS},
        "bytes_stored": _store_bytes(set(dirs.values())),
        "ttft_first_wave_ms": statistics.mean(c.ttft for _, c in waves[0]) * 1e3,
        "ttft_later_waves_ms": statistics.mean(c.ttft for c in later) * 1e3,
        "outputs": [[c.output for _, c in calls] for calls in waves],
    }


def run(args: argparse.Namespace) -> int:
    sizes = _servers(args.servers)
    if args.hicache_storage_backend != "file":
        raise ConfigError("hicache bench fleet measures the file backend (it counts the store's bytes on disk)")
    root = args.storage_dir or tempfile.mkdtemp(prefix="hicache-fleet-")
    prompts: list[Any] = [None]  # drawn once the first server says its vocabulary
    try:
        results = [_run(mode, args, sizes, root, prompts) for mode in MODES]
    finally:
        if not args.storage_dir:
            shutil.rmtree(root, ignore_errors=True)
    same = results[0]["outputs"] == results[1]["outputs"]
    sep, shared = results
    summary = {
        "tokens_identical": same,
        "bytes_stored_ratio_separate_over_shared": sep["bytes_stored"] / shared["bytes_stored"]
        if shared["bytes_stored"]
        else None,
        "ttft_later_waves_gain": sep["ttft_later_waves_ms"] / shared["ttft_later_waves_ms"],
    }
    report = {"args": {k: v for k, v in vars(args).items() if not callable(v)}, "results": results, "summary": summary}
    os.makedirs(args.report_dir, exist_ok=True)
    path = os.path.join(args.report_dir, "fleet.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    if args.json:
        dump_json(report)
        return 0 if same else 1
    print(
        f"hicache bench fleet: servers at TP {', '.join(map(str, sizes))}, {args.prefixes} prefixes of "
        f"{args.prefix_length} tokens, each asked of every server in turn (one wave per server), flushed between"
    )
    rows = [
        {
            "mode": r["mode"],
            "rate": 100 * r["storage_hit_rate_later_waves"],
            "sto": r["storage_hit_tokens_later_waves"],
            "mib": r["bytes_stored"] / 2**20,
            "t1": r["ttft_first_wave_ms"],
            "t2": r["ttft_later_waves_ms"],
        }
        for r in results
    ]
    print_table(
        rows,
        "mode=store:s; rate=storage hit % (waves 2+):.1f; sto=storage tok:d; mib=MiB stored:.2f; "
        "t1=TTFT wave 1 ms:.1f; t2=TTFT waves 2+ ms:.1f",
    )
    ratio = summary["bytes_stored_ratio_separate_over_shared"]
    print(
        f"\nshared store: {ratio:.2f}x fewer bytes stored than separate ones, waves 2+ TTFT "
        f"{summary['ttft_later_waves_gain']:.2f}x lower; tokens {'identical' if same else 'DIFFER'}"
        if ratio
        else f"\ntokens {'identical' if same else 'DIFFER'}"
    )
    print(f"report: {path}")
    return 0 if same else 1
