"""``hicache bench trace FILE``: replay a Mooncake-format trace (JSONL) against the reference engine or servers.

A record is ``{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}`` (the Mooncake
FAST'25 traces, and SGLang's ``bench_serving --dataset-name mooncake``): ``hash_ids`` name the prompt's blocks of
512 tokens, and two requests with the same id at the same place share that block *and everything before it*.
Each id becomes a fixed block of token ids (drawn from the id and ``--seed``), so shared ids are shared prefixes.
``--block-tokens`` shrinks every block (and the lengths with it) for a CPU-sized replay; ``--time-scale`` stretches
or compresses the arrival times; ``--max-requests`` takes the first N records.

Every configuration replays the same requests at the same times; the first (``none``: recompute, no cache) is the
reference whose tokens every other must equal. Reported per configuration: hit rate beside the trace's *ideal*
rate (an infinite cache: each request's leading blocks already seen by an earlier request, less its last token),
hits per tier, TTFT mean/p50/p90/p99, where TTFT went (queued, prefetch wait, load, compute) and the prefetch
outcomes. ``--base-url`` sends the requests to running servers (SGLang's ``/generate``) instead.

``hicache bench trace --generate conversation|agent --output FILE`` writes a synthetic trace of that format
(the published files cannot be downloaded everywhere): ``conversation`` -- sessions of turns, each turn the whole
history plus a new question, minutes of think time apart; ``agent`` -- sessions sharing a long system prompt (tool
definitions), many short turns adding tool output, seconds apart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from hicache_core.bench.common import Progress, print_table
from hicache_core.bench.common import pct as _pct
from hicache_core.bench.measure import warm_up
from hicache_core.bench.multiturn_args import CONFIGS, LABELS, add_engine_arguments
from hicache_core.bench.options import add_output_arguments
from hicache_core.bench.report import agreement, print_phases, strict_tokens
from hicache_core.bench.trace_format import SHAPES, TRACE_BLOCK, generate, ideal_hits, load, prompt_of, scaled
from hicache_core.bench.variants import lossy, print_l3_bytes
from hicache_core.errors import ConfigError, HiCacheError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", help="the trace: JSONL, one request per line (not with --generate)")
    t = p.add_argument_group("trace")
    t.add_argument(
        "--block-tokens",
        type=int,
        default=TRACE_BLOCK,
        help="tokens per hash id; lengths scale with it (default %(default)s: the trace's own)",
    )
    t.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival gaps by this (default 1)")
    t.add_argument("--max-requests", type=int, default=None, help="replay only the first N records")
    t.add_argument("--max-output", type=int, default=None, help="cap each request's generated tokens")
    t.add_argument("--seed", type=int, default=0, help="seeds the block contents and the model (default 0)")
    g = p.add_argument_group("generate a synthetic trace instead of replaying one")
    g.add_argument("--generate", choices=SHAPES, default=None, help="write a trace of this shape to --output")
    g.add_argument("--output", default=None, help="where --generate writes the trace")
    g.add_argument("--sessions", type=int, default=8, help="sessions in a generated trace (default 8)")
    g.add_argument("--turns", type=int, default=6, help="turns per generated session (default 6)")
    add_output_arguments(p, report="trace.json goes", base_url="replay against running servers (SGLang's /generate)")
    add_engine_arguments(p)


# --- replay -------------------------------------------------------------------------------------------------------
class Replay:
    """The requests of a trace, as every configuration replays them."""

    def __init__(self, args: argparse.Namespace, records: list[dict], vocab: int) -> None:
        block = args.block_tokens
        blocks: dict[int, list[int]] = {}
        self.prompts = [prompt_of(r, block, vocab, args.seed, blocks) for r in records]
        self.outputs = [
            min(scaled(r["output_length"], block), args.max_output or 1 << 30) if r["output_length"] else 1
            for r in records
        ]
        t0 = records[0]["timestamp"]
        self.offsets = [(r["timestamp"] - t0) / 1e3 * args.time_scale for r in records]
        self.ideal = ideal_hits(records, block)


def run_engine_config(name: str, args: argparse.Namespace, replay: Replay, model: Any, base: Any) -> dict[str, Any]:
    from hicache_core.bench.variants import variant_config
    from hicache_core.engine import Engine, Request
    from hicache_core.engine.request import PHASES

    mode, _, variant = name.partition(
        "@"
    )  # "hicache+storage@seen_twice": one of --storage-admissions, "@zstd" of --storage-codecs
    if variant:
        base = variant_config(base, variant)
    engine = Engine(model, base, mode, device_tokens=args.device_tokens, max_running=args.max_running)
    start = time.perf_counter() + 0.05
    reqs = [
        Request(f"{name}-{i}", prompt, out, arrival=start + off)
        for i, (prompt, out, off) in enumerate(zip(replay.prompts, replay.outputs, replay.offsets))
    ]
    try:
        engine.generate(reqs)
        engine.flush()
        stats = engine.metrics.stats()
    finally:
        engine.close()
    label = LABELS[mode] + (f", {variant}" if variant else "")
    result = _figures(name, label, [r.ttft for r in reqs], [dict(r.cached) for r in reqs], replay)
    result["transfer_bytes"] = stats["transfer_bytes"]
    result["storage_held_back_tokens"] = stats["storage_held_back_tokens"]
    result["storage_stored_bytes"] = stats["storage_stored_bytes"]
    result["codec_seconds"] = stats["codec_seconds"]
    hits = result["hit_tokens"]["storage"]
    result["l3_bytes_per_storage_hit"] = stats["storage_stored_bytes"]["set"] / hits if hits else None
    result["ttft_phases_ms"] = {p: statistics.mean(r.phases[p] for r in reqs) * 1e3 for p in PHASES}
    result["prefetch_outcomes"] = stats["prefetch_outcomes"]
    result["outputs"] = [r.output for r in reqs]
    return result


def run_server_config(label: str, url: str, replay: Replay, progress: Progress) -> dict[str, Any]:
    from hicache_core.bench.http import HttpCall, http_post, run_and_count

    status, text = http_post(url + "/flush_cache", {})
    if status != 200:
        raise HiCacheError(f"{url}/flush_cache answered {status}: {text[:200]} (is the server idle?)")
    calls = [HttpCall(url, p, argparse.Namespace(output_length=o)) for p, o in zip(replay.prompts, replay.outputs)]
    threads = []
    start = time.perf_counter() + 0.05
    for call, off in zip(calls, replay.offsets):
        time.sleep(max(0.0, start + off - time.perf_counter()))
        th = threading.Thread(target=run_and_count, args=(call, progress, label), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    failed = [c.error for c in calls if c.error]
    if failed:
        raise HiCacheError(f"{label} ({url}): {len(failed)} requests failed, e.g. {failed[0]}")
    result = _figures(label, label, [c.ttft for c in calls], [c.cached() for c in calls], replay)
    phases = [p for p in (c.meta.get("ttft_phases") for c in calls) if isinstance(p, dict)]
    if phases and len(phases) == len(calls):  # hicache serve says where each TTFT went; SGLang does not
        result["ttft_phases_ms"] = {k: statistics.mean(p[k] for p in phases) * 1e3 for k in phases[0]}
    result["url"] = url
    result["outputs"] = [c.output for c in calls]
    return result


def _figures(config: str, label: str, ttfts: list[float], cached: list[dict], replay: Replay) -> dict[str, Any]:
    prompt = sum(len(p) for p in replay.prompts)
    tiers = {t: sum(c.get(t, 0) for c in cached) for t in ("device", "host", "storage")}
    return {
        "config": config,
        "label": label,
        "requests": len(ttfts),
        "prompt_tokens": prompt,
        "hit_tokens": tiers,
        "hit_rate": sum(tiers.values()) / prompt,
        "ideal_hit_rate": sum(replay.ideal) / prompt,
        "ttft_mean_ms": statistics.mean(ttfts) * 1e3,
        "ttft_p50_ms": _pct(ttfts, 0.5) * 1e3,
        "ttft_p90_ms": _pct(ttfts, 0.9) * 1e3,
        "ttft_p99_ms": _pct(ttfts, 0.99) * 1e3,
    }


def run(args: argparse.Namespace) -> int:
    if args.generate:
        return _write_generated(args)
    if not args.file:
        raise ConfigError("give a trace FILE to replay (JSONL, Mooncake format), or --generate SHAPE --output FILE")
    if args.block_tokens < 1 or args.time_scale < 0 or (args.max_requests is not None and args.max_requests < 1):
        raise ConfigError("--block-tokens and --max-requests must be at least 1, --time-scale at least 0")
    if args.tp_size > 1 or args.prefetch_policies:
        raise ConfigError("bench trace runs one engine process per configuration: drop --tp and --prefetch-policies")
    records = load(args.file, args.max_requests)
    progress = Progress(0, False)
    if args.base_url:
        from hicache_core.bench.http import http_get, parse_base_urls

        servers = parse_base_urls(args.base_url)
        vocab = (http_get(servers[0][1] + "/get_model_info") or {}).get("vocab_size") or args.vocab_size
        replay = Replay(args, records, min(int(vocab), args.vocab_size))
        progress = Progress(len(servers) * len(records), not args.no_progress)
        results = [run_server_config(label or url, url, replay, progress) for label, url in servers]
    else:
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        bad = [c for c in configs if c not in CONFIGS]
        if bad:
            raise ConfigError(f"--configs: unknown {', '.join(bad)}; choose from {', '.join(CONFIGS)}")
        if "none" not in configs:
            configs.insert(0, "none")  # recompute: the baseline, and the tokens every other must match
        from hicache_core.bench.kinds import model_kinds
        from hicache_core.bench.multiturn import base_config
        from hicache_core.bench.variants import storage_variants

        configs += storage_variants(args, configs)
        from hicache_core.engine.checkpoint import model_from_args

        kinds = model_kinds(args)
        if len(kinds) > 1:
            raise ConfigError("bench trace replays one model: give --model-kind one kind")
        args.model_kind = kinds[0]
        model = model_from_args(args)
        replay = Replay(args, records, model.config.vocab_size)
        warm_up(model, args.page_size)
        tmp = args.storage_dir = tempfile.mkdtemp(prefix="hicache-trace-")
        try:
            results = []
            for c in configs:
                if not args.no_progress:
                    sys.stderr.write(f"{c}: replaying {len(records)} requests...\n")
                results.append(run_engine_config(c, args, replay, model, base_config(args, os.path.join(tmp, c))))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    progress.close()
    return _report(args, results)


def _write_generated(args: argparse.Namespace) -> int:
    if not args.output:
        raise ConfigError("--generate writes a trace: give --output FILE")
    if args.sessions < 1 or args.turns < 1:
        raise ConfigError("--sessions and --turns must be at least 1")
    records = generate(args.generate, args.sessions, args.turns, args.seed)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    ideal = ideal_hits(records, TRACE_BLOCK)
    total = sum(r["input_length"] for r in records)
    print(f"wrote {len(records)} requests ({args.generate}) to {args.output}; ideal hit rate {sum(ideal) / total:.1%}")
    return 0


def _report(args: argparse.Namespace, results: list[dict]) -> int:
    reference = results[0]["outputs"]
    for r in results:
        r["outputs_identical"] = r["outputs"] == reference
        r["requests_with_reference_tokens"] = agreement(r["outputs"], reference)
    base = results[0]["ttft_mean_ms"]
    for r in results:
        r["ttft_speedup_vs_reference"] = base / r["ttft_mean_ms"] if r["ttft_mean_ms"] else None
    out = {
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "configs": [{k: v for k, v in r.items() if k != "outputs"} for r in results],
    }
    os.makedirs(args.report_dir, exist_ok=True)
    path = os.path.join(args.report_dir, "trace.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2, default=str)
    # float32 and the fp8 codec: counted, not required
    ok = all(r["outputs_identical"] for r in results if not lossy(r["config"], args)) or not strict_tokens(args)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0 if ok else 1
    print(
        f"\nhicache bench trace {args.file}: {results[0]['requests']} requests, {results[0]['prompt_tokens']} prompt "
        f"tokens ({args.block_tokens} per hash id), ideal hit rate {results[0]['ideal_hit_rate']:.1%}\n"
    )
    rows = [
        {
            "config": r["label"],
            "hit": r["hit_rate"] * 100,
            "ideal": r["hit_rate"] / r["ideal_hit_rate"] * 100 if r["ideal_hit_rate"] else 0.0,
            "dev": r["hit_tokens"]["device"],
            "host": r["hit_tokens"]["host"],
            "sto": r["hit_tokens"]["storage"],
            "mean": r["ttft_mean_ms"],
            "p50": r["ttft_p50_ms"],
            "p90": r["ttft_p90_ms"],
            "p99": r["ttft_p99_ms"],
            "x": r["ttft_speedup_vs_reference"] or 0.0,
            "same": "yes" if r["outputs_identical"] else "{}/{}".format(*r["requests_with_reference_tokens"]),
        }
        for r in results
    ]
    print_table(
        rows,
        "config=configuration:s; hit=hit %:.1f; ideal=% of ideal:.1f; dev=device tok:d; host=host tok:d; "
        "sto=storage tok:d; mean=TTFT mean ms:.1f; p50=p50:.1f; p90=p90:.1f; p99=p99:.1f; "
        "x=x vs first:.2f; same=same tokens:s",
    )
    print_phases(results, "ttft_phases_ms", "TTFT")
    print_l3_bytes(results)
    print(f"\nreport: {path}")
    if not ok:
        print("ERROR: a configuration produced different tokens from the reference run", file=sys.stderr)
    elif not all(r["outputs_identical"] for r in results):
        print(
            "note: --compute-dtype float32 tokens may differ from the reference's in near ties ('same tokens' "
            "counts the requests that agree)",
            file=sys.stderr,
        )
    return 0 if ok else 1
