"""``hicache bench toolgap``: agent sessions that pause for tool calls while other clients churn the cache.

Each agent sends its whole history every turn. Between turns it waits on a tool; meanwhile churn clients send
unique prompts that overflow the device and host tiers (every unretained page leaves both; a storage tier keeps
what was backed up). Then the tool answers and the agent's next turn comes. Every configuration replays the same
turns on the same store layout, and reports the TTFT of the turns after a gap:

* ``l3`` -- device + host + storage (file), no hints: the post-gap turn loads its prefix from storage.
* ``restore`` -- the same, and once the tool is about to answer (``--restore-lead`` seconds before the next turn)
  the agent framework asks for its history back (``restore``, ``POST /hicache/prefetch``): the turn is a host hit.
* ``retention`` -- the same, and each agent turn carries a retention hint (``--retention-seconds``, its session):
  its prefix is kept on host through the churn.
* ``radix`` -- the device-only radix cache (what the churn leaves: recompute).

The store's files are dropped from the OS page cache before each post-gap turn (a store not in this machine's
memory, as a shared 3FS or Mooncake is; ``--keep-page-cache`` keeps them). Tokens must equal the first
configuration's (float64).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from typing import Any

from hicache_core.bench.common import drop_page_cache, pct, print_table
from hicache_core.bench.measure import warm_up
from hicache_core.bench.multiturn_args import add_engine_arguments
from hicache_core.bench.report import agreement, print_phases, strict_tokens
from hicache_core.errors import ConfigError
from hicache_core.parse import arg_float, arg_int

CONFIGS = {
    "l3": ("hicache+storage", "L1+L2+L3, no hints"),
    "restore": ("hicache+storage", "L1+L2+L3 + restore"),
    "retention": ("hicache+storage", "L1+L2+L3 + retention"),
    "radix": ("radix", "device-only radix"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload")
    w.add_argument("--agents", type=arg_int(1, 1024), default=3, help="agent sessions (default %(default)s)")
    w.add_argument("--turns", type=arg_int(2, 100), default=3, help="turns per agent (default %(default)s)")
    w.add_argument("--context-length", type=arg_int(1), default=1024, help="first prompt (default %(default)s)")
    w.add_argument("--turn-length", type=arg_int(1), default=64, help="tool result per turn (default %(default)s)")
    w.add_argument("--output-length", type=arg_int(1), default=16, help="tokens per reply (default %(default)s)")
    w.add_argument("--churn-length", type=arg_int(1), default=2048, help="each churn prompt (default %(default)s)")
    w.add_argument(
        "--churn-clients",
        type=arg_int(0),
        default=None,
        help="churn prompts per gap (default: enough for 1.25x the device and host tiers)",
    )
    w.add_argument(
        "--restore-lead",
        type=arg_float(0),
        default=0.5,
        help="seconds between the restore request and the next turn: the end of the tool call (default %(default)s)",
    )
    w.add_argument("--retention-seconds", type=arg_float(0, above=True), default=120.0, help="(default %(default)s)")
    w.add_argument("--seed", type=arg_int(0), default=0, help="prompts and weights (default %(default)s)")
    w.add_argument("--keep-page-cache", action="store_true", help="do not drop the store's files from the page cache")
    w.add_argument("--json", action="store_true", help="print the JSON report")
    w.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    add_engine_arguments(p)
    p.set_defaults(
        configs="l3,restore,retention,radix",  # of CONFIGS; the first is the tokens' reference
        page_size=32,
        device_tokens=4096,
        hicache_ratio=3.0,
        hicache_io_backend="direct",
        hicache_storage_backend="file",
        hicache_storage_prefetch_policy="wait_complete",
    )


class Agents:
    """The agents' conversations: first prompts and tool results from the seed, replies from the model."""

    def __init__(self, args: argparse.Namespace, vocab: int) -> None:
        rng = random.Random(args.seed)
        self.history = [[rng.randrange(vocab) for _ in range(args.context_length)] for _ in range(args.agents)]
        self.tools = [
            [[rng.randrange(vocab) for _ in range(args.turn_length)] for _ in range(args.agents)]
            for _ in range(args.turns)
        ]
        self.vocab = vocab


def run_config(name: str, args: argparse.Namespace, model: Any, storage_dir: str) -> dict[str, Any]:
    from hicache_core.bench.multiturn import base_config
    from hicache_core.cache import HiRadixCache
    from hicache_core.cache.retention import RetentionHint
    from hicache_core.engine import Engine, Request
    from hicache_core.engine.request import PHASES

    mode = CONFIGS[name][0]
    base = base_config(args, storage_dir)
    engine = Engine(model, base, mode, device_tokens=args.device_tokens, max_running=args.max_running)
    cache = engine.cache
    host = cache.host_pool.size if isinstance(cache, HiRadixCache) and cache.host_pool is not None else 0
    n_churn = args.churn_clients
    if n_churn is None:
        n_churn = math.ceil(1.25 * (args.device_tokens + host) / args.churn_length)
    agents = Agents(args, model.config.vocab_size)
    churn_rng = random.Random(args.seed + 1)
    post: list[Request] = []
    outputs: list[list[int]] = []
    restores: Counter = Counter()
    answers: Counter = Counter()
    try:
        for turn in range(args.turns):
            if turn:  # the tool gap: others churn the tiers, the tool answers, the next turn comes
                unique = [[churn_rng.randrange(agents.vocab) for _ in range(args.churn_length)] for _ in range(n_churn)]
                churn = [Request(f"{name}-churn{turn}-{i}", p, 1) for i, p in enumerate(unique)]
                engine.generate(churn)
                if name == "restore":
                    assert isinstance(cache, HiRadixCache)
                    for a, hist in enumerate(agents.history):
                        cache.fleet.restore(f"agent{a}-turn{turn}", hist, ttl=60)
                end = time.perf_counter() + args.restore_lead
                while time.perf_counter() < end:  # every configuration idles the same: the tool's last moments
                    engine.idle()
                    time.sleep(0.002)
                if name == "restore":
                    for a in range(args.agents):
                        restores[cache.fleet.restore_status(f"agent{a}-turn{turn}").state] += 1  # type: ignore[union-attr]
                if not args.keep_page_cache and os.path.isdir(storage_dir):
                    drop_page_cache(storage_dir)
            reqs = []
            for a in range(args.agents):
                prompt = agents.history[a] + agents.tools[turn][a]
                r = Request(f"{name}-a{a}-t{turn}", prompt, args.output_length)
                if name == "retention":
                    r.retention = RetentionHint(args.retention_seconds, 1, session_id=f"agent{a}")
                reqs.append(r)
            engine.generate(reqs)
            for a, r in enumerate(reqs):
                agents.history[a] = r.prompt + r.output
                outputs.append(list(r.output))
                if r.retention_answer is not None:
                    answers[r.retention_answer["status"]] += 1
            if turn:
                post += reqs
        engine.flush()
        stats = engine.metrics.stats()
    finally:
        engine.close()
    ttft = [r.ttft * 1e3 for r in post]
    prompt_tokens = sum(len(r.prompt) for r in post)
    hits = {t: sum(r.cached[t] for r in post) for t in ("device", "host", "storage")}
    return {
        "config": name,
        "label": CONFIGS[name][1],
        "post_gap_turns": len(post),
        "churn_prompts_per_gap": n_churn,
        "ttft_mean_ms": statistics.mean(ttft),
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p90_ms": pct(ttft, 90),
        "prompt_tokens": prompt_tokens,
        "hit_tokens": hits,
        "hit_rate": sum(hits.values()) / prompt_tokens,
        "ttft_phases_ms": {p: statistics.mean(r.phases[p] for r in post) * 1e3 for p in PHASES},
        "prefetch_outcomes": stats.get("prefetch_outcomes", {}),
        "restores": dict(restores),
        "retention_answers": dict(answers),
        "outputs": outputs,
    }


def run(args: argparse.Namespace) -> int:
    from hicache_core.engine.checkpoint import model_from_args

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad or not configs:
        raise ConfigError(f"--configs: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(CONFIGS)}")
    model = model_from_args(args)
    warm_up(model, args.page_size)
    tmp = tempfile.mkdtemp(prefix="hicache-toolgap-")
    results = []
    try:
        for c in configs:
            if not args.no_progress:
                sys.stderr.write(f"{CONFIGS[c][1]}: {args.agents} agents x {args.turns} turns...\n")
            results.append(run_config(c, args, model, os.path.join(tmp, c)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report(args, results)


def report(args: argparse.Namespace, results: list[dict]) -> int:
    import json

    ref = results[0]
    for r in results:
        r["same_tokens"] = agreement(r["outputs"], ref["outputs"])
        r["x_vs_first"] = ref["ttft_mean_ms"] / r["ttft_mean_ms"] if r["ttft_mean_ms"] else None
    ok = all(r["outputs"] == ref["outputs"] for r in results) or not strict_tokens(args)
    out = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "configs": results}
    if args.json:
        print(json.dumps({**out, "configs": [{k: v for k, v in r.items() if k != "outputs"} for r in results]}))
        return 0 if ok else 1
    print(
        f"\nhicache bench toolgap: {args.agents} agents x {args.turns} turns, {results[0]['churn_prompts_per_gap']} "
        f"churn prompts of {args.churn_length} tokens per gap; TTFT of the {results[0]['post_gap_turns']} turns after "
        f"a gap\n"
    )
    rows = [
        {
            "config": r["label"],
            "mean": r["ttft_mean_ms"],
            "p50": r["ttft_p50_ms"],
            "p90": r["ttft_p90_ms"],
            "x": r["x_vs_first"] or 0.0,
            "dev": r["hit_tokens"]["device"],
            "host": r["hit_tokens"]["host"],
            "sto": r["hit_tokens"]["storage"],
            "hints": ", ".join(f"{k} {v}" for k, v in {**r["restores"], **r["retention_answers"]}.items()) or "-",
            "same": "yes" if r["outputs"] == ref["outputs"] else "{}/{}".format(*r["same_tokens"]),
        }
        for r in results
    ]
    print_table(
        rows,
        "config=configuration:s; mean=post-gap TTFT ms:.1f; p50=p50:.1f; p90=p90:.1f; x=x vs first:.2f; "
        "dev=device tok:d; host=host tok:d; sto=storage tok:d; hints=restores / retention:s; "
        "same=same tokens:s",
    )
    print_phases(results, "ttft_phases_ms", "post-gap TTFT")
    if not ok:
        print("ERROR: a configuration produced different tokens from the first", file=sys.stderr)
    return 0 if ok else 1
