"""``hicache bench multiturn``: simulated clients in multi-turn conversations on the reference engine.

Each client starts with a random prompt; every round it sends its whole history, gets a reply, and appends the
reply and a new question. Requests of a round arrive at ``--request-rate`` in random client order. The same
workload runs under each configuration -- no prefix cache, device-only radix cache, HiCache device+host,
HiCache device+host+storage -- with the same (deliberately small) device pool, and every configuration must
produce the same tokens as the no-cache run. ``--warm`` (default on) then starts a second engine *process* on the
first one's storage and replays round 1, as a restarted server would.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

from hicache_core.bench.common import Progress, drop_page_cache
from hicache_core.bench.common import pct as _pct
from hicache_core.bench.measure import CpuMeter, warm_up
from hicache_core.bench.multiturn_args import CONFIGS, LABELS
from hicache_core.bench.multiturn_args import add_arguments as add_arguments  # the CLI finds it here
from hicache_core.bench.report import report
from hicache_core.bench.variants import storage_variants, variant_config
from hicache_core.config import HiCacheConfig
from hicache_core.engine.checkpoint import config_from_args, model_from_args
from hicache_core.errors import ConfigError, HiCacheError


class Workload:
    """Deterministic conversations: prompts and questions come from the seed (random token ids, or English text
    cut by ``tokenizer`` to the same lengths); replies from the model."""

    def __init__(self, args: argparse.Namespace, tokenizer: Any = None) -> None:
        rng = random.Random(args.seed)
        if tokenizer is None:
            first = lambda n: [rng.randrange(args.vocab_size) for _ in range(n)]  # noqa: E731
            ask = first
        else:
            from hicache_core.bench import prompts

            first = lambda n: prompts.first_prompt(tokenizer, rng, n)  # noqa: E731
            ask = lambda n: prompts.question(tokenizer, rng, n)  # noqa: E731
        self.first = [first(args.request_length) for _ in range(args.num_clients)]
        self.questions = [[ask(args.question_length) for _ in range(args.num_clients)] for _ in range(args.num_rounds)]
        self.orders, self.gaps = [], []
        for _ in range(args.num_rounds):
            order = list(range(args.num_clients))
            if args.ready_queue_policy == "random":
                rng.shuffle(order)
            self.orders.append(order)
            if args.distribution == "poisson":
                self.gaps.append([rng.expovariate(args.request_rate) for _ in order])
            else:
                self.gaps.append([1.0 / args.request_rate for _ in order])
        self.all_miss = bool(getattr(args, "all_miss", False))
        if self.all_miss:  # drawn after the rest, so the conversations above stay the seed's
            grow = args.question_length + args.output_length
            self.fresh = [
                [first(args.request_length + r * grow) for _ in range(args.num_clients)] for r in range(args.num_rounds)
            ]

    def prompt(self, history: list[list[int]], client: int, rnd: int) -> list[int]:
        """What ``client`` sends in round ``rnd``: its history so far, or (``--all-miss``) a prompt never seen."""
        return list(self.fresh[rnd][client] if self.all_miss else history[client])


def run_config(
    name: str,
    args: argparse.Namespace,
    work: Workload,
    model,
    base: HiCacheConfig,
    rounds: int,
    progress: Progress,
    tp: Any = None,
) -> dict[str, Any]:
    from hicache_core.engine import Engine, Request
    from hicache_core.engine.request import PHASES

    # "hicache+storage@cost_aware": one prefetch policy of --prefetch-policies; "@seen_twice": one admission of
    # --storage-admissions; "@zstd": one codec of --storage-codecs
    mode, _, variant = name.partition("@")
    label = LABELS[mode] + (f", {variant}" if variant else "")
    if variant:
        base = variant_config(base, variant)
    if args.tp_size > 1 and tp is None:  # one process per rank; rank 0's figures, every rank's hits
        from hicache_core.engine.tp import run_tp

        plain = argparse.Namespace(**{k: v for k, v in vars(args).items() if not callable(v)})  # picklable
        with CpuMeter() as meter:  # every rank's CPU is this process's children's: not "others"
            result = run_tp(args.tp_size, _config_on_rank, name, plain, work, base, rounds)
        assert isinstance(result, dict)
        result["cpu"] = meter.result()
        for _ in range(rounds * args.num_clients):
            progress.step(label)
        return result
    engine = Engine(model, base, mode, device_tokens=args.device_tokens, max_running=args.max_running, tp=tp)
    meter = CpuMeter().__enter__()
    history = [list(p) for p in work.first]
    per_round: list[dict[str, Any]] = []
    outputs: list[list[list[int]]] = []
    t_start = time.perf_counter()
    out_tokens = in_tokens = 0
    try:
        for rnd in range(rounds):
            start = time.perf_counter() + 0.01
            reqs, at = [], start
            for client, gap in zip(work.orders[rnd], work.gaps[rnd]):
                reqs.append(
                    Request(f"{name}-{rnd}-{client}", work.prompt(history, client, rnd), args.output_length, arrival=at)
                )
                at += gap
            engine.generate(reqs, on_finish=lambda r: progress.step(label))
            by_client = {int(r.rid.rsplit("-", 1)[1]): r for r in reqs}
            for client, r in by_client.items():
                history[client] += r.output + work.questions[rnd][client]
                in_tokens += len(r.prompt)
                out_tokens += len(r.output)
            ttfts = [r.ttft for r in reqs]
            per_round.append(
                {
                    "round": rnd + 1,
                    "ttft_mean_ms": statistics.mean(ttfts) * 1e3,
                    "ttft_p50_ms": _pct(ttfts, 0.5) * 1e3,
                    "ttft_p90_ms": _pct(ttfts, 0.9) * 1e3,
                    "cached": {t: sum(r.cached[t] for r in reqs) for t in ("device", "host", "storage")},
                    "prompt_tokens": sum(len(r.prompt) for r in reqs),
                    # where the mean TTFT went (the phases sum to it) and how the prefetches ended
                    "ttft_phases_ms": {p: statistics.mean(r.phases[p] for r in reqs) * 1e3 for p in PHASES},
                    "prefetch": dict(Counter(r.prefetch for r in reqs if r.prefetch)),
                }
            )
            outputs.append([by_client[c].output for c in sorted(by_client)])
        engine.flush()
        wall = time.perf_counter() - t_start
        meter.__exit__()
        stats = engine.metrics.stats()
    finally:
        engine.close()
    later: list[float] = [r["ttft_mean_ms"] for r in per_round[1:]]
    return {
        "config": name,
        "label": label,
        "rounds": per_round,
        "ttft_mean_rounds2plus_ms": statistics.mean(later) if later else None,
        "hit_tokens": stats["hit_tokens"],
        "prompt_tokens": stats["prompt_tokens"] or in_tokens,
        "cache_hit_rate": stats["cache_hit_rate"],
        "transfer_bytes": stats["transfer_bytes"],
        "transfer_gbps": stats["transfer_gbps"],
        "prefetched_tokens": stats["prefetched_tokens"],
        "backuped_tokens": stats["backuped_tokens"],
        "storage_held_back_tokens": stats["storage_held_back_tokens"],
        "storage_stored_bytes": stats["storage_stored_bytes"],
        "codec_seconds": stats["codec_seconds"],
        "l3_bytes_per_storage_hit": stats["storage_stored_bytes"]["set"] / stats["hit_tokens"]["storage"]
        if stats["hit_tokens"]["storage"]
        else None,
        "storage_errors": stats["storage_errors"],
        "ttft_phases_rounds2plus_ms": {
            p: statistics.mean(r["ttft_phases_ms"][p] for r in per_round[1:]) for p in PHASES
        }
        if len(per_round) > 1
        else None,
        "prefetch_outcomes": stats["prefetch_outcomes"],
        "prefetch_skipped_cost": stats["prefetch_skipped_cost"],
        "prefetch_cut_cost": stats["prefetch_cut_cost"],
        "wall_s": wall,
        "throughput_req_s": rounds * args.num_clients / wall,
        "throughput_in_tok_s": in_tokens / wall,
        "throughput_out_tok_s": out_tokens / wall,
        "cpu": meter.result(),
        "outputs": outputs,
    }


def _config_on_rank(
    ctx: Any, name: str, args: argparse.Namespace, work: Workload, base: HiCacheConfig, rounds: int
) -> dict[str, Any]:
    from hicache_core.engine.tp import shard

    model = shard(model_from_args(args), ctx)
    warm_up(model, args.page_size)
    result = run_config(name, args, work, model, base, rounds, Progress(0, False), tp=ctx)
    result["per_rank_hit_tokens"] = ctx.gather(result["hit_tokens"])
    return result


def base_config(args: argparse.Namespace, storage_dir: str) -> HiCacheConfig:
    cfg = HiCacheConfig.from_args(args)
    extra = dict(cfg.hicache_storage_backend_extra_config)
    extra.setdefault("prefetch_threshold", 64)
    if cfg.hicache_storage_backend == "file":
        extra.setdefault("storage_dir", storage_dir)
    return cfg.replace(hicache_storage_backend_extra_config=extra, enable_hierarchical_cache=True)


def _tokenizer(args: argparse.Namespace) -> Any:
    if not args.model_path:
        return None
    from hicache_core.engine.tokenizer import load_tokenizer

    return load_tokenizer(args.model_path)


def _replies(tokenizer: Any, reference: dict) -> list[str]:
    """Client 0's reply in each round of the reference run, as text (every configuration must give the same)."""
    return [tokenizer.decode(r[0]) for r in reference["outputs"]]


def _warm_child(args: argparse.Namespace) -> int:
    """Round 1 only, hicache+storage, on storage someone else filled: a restarted server (by default with the
    store's files out of the page cache, so its reads come from the disk)."""
    work = Workload(args, _tokenizer(args))
    base = base_config(args, args.storage_dir)
    model = model_from_args(args)
    warm_up(model, args.page_size)  # a restarted server has warmed up before its first request is timed
    dropped = 0 if args.keep_page_cache else drop_page_cache(args.storage_dir)
    result = run_config("hicache+storage", args, work, model, base, 1, Progress(0, False))
    result["page_cache_dropped_files"] = dropped
    with open(args.child_out, "w") as f:
        json.dump(result, f)
    return 0


def _run_warm(args: argparse.Namespace, storage_dir: str) -> dict[str, Any]:
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    argv = [
        sys.executable,
        "-m",
        "hicache_core.cli",
        "bench",
        "multiturn",
        "--warm-child",
        "--child-out",
        out,
        "--storage-dir",
        storage_dir,
    ]
    skip = {
        "warm_child",
        "child_out",
        "storage_dir",
        "warm",
        "json",
        "no_progress",
        "report_dir",
        "configs",
        "func",
        "command",
        "bench",
        "verbose",
        "repeat",
        "base_url",
    }
    for k, v in vars(args).items():
        if k in skip or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        else:
            argv += [flag, json.dumps(v) if isinstance(v, dict) else str(v)]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise HiCacheError(f"the warm engine process failed: {r.stderr.strip()[-800:]}")
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


def run(args: argparse.Namespace) -> int:
    if args.warm_child:
        return _warm_child(args)
    if args.base_url:
        return _run_servers(args)
    from hicache_core.bench.kinds import model_kinds, run_kinds

    kinds = model_kinds(args)
    if len(kinds) > 1:
        return run_kinds(args, kinds, run)
    args.model_kind = kinds[0]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        raise ConfigError(f"--configs: unknown {', '.join(bad)}; choose from {', '.join(CONFIGS)}")
    if "none" not in configs:
        configs.insert(0, "none")  # the reference every other configuration must match
    if args.prefetch_policies:
        from hicache_core.config import PREFETCH_POLICIES

        policies = [x.strip() for x in args.prefetch_policies.split(",") if x.strip()]
        wrong = [x for x in policies if x not in PREFETCH_POLICIES]
        if wrong or not policies:
            raise ConfigError(
                f"--prefetch-policies: {', '.join(wrong) or 'none given'}; choose from {', '.join(PREFETCH_POLICIES)}"
            )
        configs = [c for c in configs if c != "hicache+storage"] + [f"hicache+storage@{x}" for x in policies]
    configs += storage_variants(args, configs)
    if args.tp_size > 1:
        from hicache_core.engine.tp import check_divisible

        check_divisible(config_from_args(args), args.tp_size)
    tmp = None
    storage_dir = args.storage_dir
    if storage_dir is None:
        tmp = storage_dir = tempfile.mkdtemp(prefix="hicache-bench-")
    reps: list[tuple[list[dict], dict | None]] = []
    try:
        tokenizer = _tokenizer(args)
        work = Workload(args, tokenizer)
        model = model_from_args(args)
        warm_up(model, args.page_size)
        progress = Progress(args.repeat * len(configs) * args.num_rounds * args.num_clients, not args.no_progress)
        for i in range(args.repeat):
            sdir = storage_dir if args.repeat == 1 else os.path.join(storage_dir, f"repeat-{i + 1}")
            base = base_config(args, sdir)
            results = [run_config(c, args, work, model, base, args.num_rounds, progress) for c in configs]
            warm = None
            if args.warm and "hicache+storage" in configs:
                if not args.no_progress:
                    sys.stderr.write("warm restart: a second engine process on the same storage...\n")
                warm = _run_warm(args, sdir)
            if tokenizer is not None:
                results[0]["replies_text"] = _replies(tokenizer, results[0])
            reps.append((results, warm))
        progress.close()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return report(args, reps)


def _run_servers(args: argparse.Namespace) -> int:
    from hicache_core.bench.http import parse_base_urls, run_server, server_config

    servers = []
    for label, url in parse_base_urls(args.base_url):
        mode, _ = server_config(url)
        servers.append((label or LABELS.get(mode, mode), mode, url))
    tokenizer = _tokenizer(args)  # prompts as text the servers' model reads, when they serve --model-path's
    work = Workload(args, tokenizer)
    if args.repeat > 1:
        sys.stderr.write(
            "note: servers keep their caches between repeats: repeat 2 on replays conversations they have seen "
            "(restart them between runs to repeat a cold start)\n"
        )
    progress = Progress(args.repeat * len(servers) * args.num_rounds * args.num_clients, not args.no_progress)
    reps: list[tuple[list[dict], dict | None]] = []
    for _ in range(args.repeat):
        results = [run_server(label, mode, url, args, work, progress, _pct) for label, mode, url in servers]
        if tokenizer is not None:
            results[0]["replies_text"] = _replies(tokenizer, results[0])
        reps.append((results, None))
    progress.close()
    return report(args, reps)
