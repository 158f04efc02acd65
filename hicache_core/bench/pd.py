"""``hicache bench pd``: prefill/decode disaggregation across ``hicache serve`` processes that share one store.

The bench is the router (as SGLang's PD load balancer is): each request goes to a prefill instance, which answers
with the first token once the prompt's pages are in storage, then to a decode instance, which loads them from
storage and generates the reply. TTFT is the prefill's answer time; hits are the prefill's, per tier.

``--mode prefill-share``: two prefill instances and a decode. Rounds alternate between the prefill instances, so
every round after the first is prefilled by the instance that did not see the previous one: what it hits beyond its
own tiers, it hits in the store the other one filled.

``--mode decode-offload``: one prefill and one decode. With ``--disaggregation-decode-enable-offload-kvcache``
the decode writes each finished request's prompt *and generated* KV to storage, and the next turn's prefill hits
the reply too.

Every configuration runs the same conversations on fresh server processes and a fresh store; "no shared store"
(the prefill instances with device and host tiers only, a plain decode server that recomputes the prompt) is the
baseline. Every configuration's tokens must equal a single-process run of the same model (computed in this process
first, without any cache).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Optional

from hicache_core.bench.common import Progress, pct
from hicache_core.bench.http import TIERS, counter_delta, http_get, http_post, send_round
from hicache_core.bench.multiturn import Workload
from hicache_core.bench.multiturn_args import add_workload_arguments
from hicache_core.bench.options import add_output_arguments, int_option
from hicache_core.bench.pd_instances import Instances, add_instance_hicache_args, hicache_flags
from hicache_core.bench.report import report
from hicache_core.config import HiCacheConfig
from hicache_core.errors import ConfigError, HiCacheError

MODES = ("prefill-share", "decode-offload")
# name -> (label, prefill instances' role flags, decode's role flags); None: a plain server without a store
CONFIGS: dict[str, dict[str, tuple]] = {
    "prefill-share": {
        "pd-local": ("PD, no shared store", None, None),
        "pd-shared": ("PD, shared store", ("prefill",), ("decode",)),
    },
    "decode-offload": {
        "pd-local": ("PD, no shared store", None, None),
        "pd-shared": ("PD, shared store", ("prefill",), ("decode",)),
        "pd-offload": ("PD, store + decode offload", ("prefill",), ("decode", "offload")),
    },
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_workload_arguments(p, output_length=128)
    s = p.add_argument_group("instances (each a `hicache serve` process on 127.0.0.1 with the random tiny model)")
    modes = (
        "prefill-share: two prefill instances share the store; decode-offload: decode writes finished requests to "
        "the store for the next turn's prefill (default %(default)s)"
    )
    s.add_argument("--mode", choices=MODES, default="prefill-share", help=modes)
    s.add_argument(
        "--configs",
        default=None,
        help="configurations to run, comma separated (default: all of the mode's: prefill-share "
        "pd-local,pd-shared; decode-offload adds pd-offload)",
    )
    int_option(s, "--device-tokens", 1, 1 << 30, 2048, "each instance's device KV pool in tokens")
    int_option(s, "--max-running", 1, 100000, 4, "requests in one batch, per instance")
    int_option(s, "--tp --tp-size", 1, 64, 1, "tensor-parallel ranks of every instance", dest="tp_size")
    int_option(s, "--start-timeout", 1, 3600, 180, "seconds an instance may take to start")
    add_output_arguments(
        p,
        report="report.json and report.png go",
        progress="no progress bar on stderr",
        repeat="fresh instances and store each time",
        storage_dir="file backend directory",
    )
    add_instance_hicache_args(p, page_size=32, hicache_ratio=3.0)


# --- the router ---------------------------------------------------------------------------------------------------
class _PDCall:
    """One request: prefill (its answer is the first token), then decode (the whole reply)."""

    def __init__(self, prefill: str, decode: str, ids: list[int], output_length: int) -> None:
        self.prefill, self.decode, self.ids, self.n = prefill, decode, ids, output_length
        self.ttft = 0.0
        self.cached = dict.fromkeys(TIERS, 0)
        self.handed = 0  # prompt tokens decode loaded from storage
        self.output: list[int] = []
        self.error: Optional[str] = None

    def _generate(self, url: str, n: int) -> dict:
        body = {"input_ids": self.ids, "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}}
        status, text = http_post(url + "/generate", body)
        if status != 200:
            raise HiCacheError(f"{url} answered {status}: {text[:300]}")
        return json.loads(text)

    def run(self) -> None:
        t0 = time.perf_counter()
        try:
            first = self._generate(self.prefill, 1)
            self.ttft = time.perf_counter() - t0
            details = first["meta_info"].get("cached_tokens_details") or {}
            self.cached = {t: int(details.get(t, 0)) for t in TIERS}
            out = self._generate(self.decode, self.n)
            self.output = list(out["output_ids"])
            self.handed = int((out["meta_info"].get("cached_tokens_details") or {}).get("storage", 0))
            if first["output_ids"][:1] != self.output[:1]:
                self.error = (
                    f"decode's first token {self.output[:1]} is not prefill's {first['output_ids'][:1]}: "
                    "the instances do not run the same model"
                )
        except (HiCacheError, KeyError, ValueError, TypeError) as e:
            self.error = f"{type(e).__name__}: {e}"


def run_config(
    name: str, args: argparse.Namespace, work: Workload, storage_dir: str, workdir: str, progress: Progress
) -> dict[str, Any]:
    label, p_role, d_role = CONFIGS[args.mode][name]
    common = [
        "--seed",
        str(args.seed),
        "--max-total-tokens",
        str(args.device_tokens),
        "--max-running-requests",
        str(args.max_running),
        "--tp-size",
        str(args.tp_size),
    ]
    p_flags = common + hicache_flags(args, storage_dir, store=p_role is not None)
    d_flags = common + hicache_flags(args, storage_dir, store=d_role is not None)
    if p_role:
        p_flags += ["--disaggregation-mode", "prefill"]
    if d_role:
        d_flags += ["--disaggregation-mode", "decode"]
        if "offload" in d_role:
            d_flags.append("--disaggregation-decode-enable-offload-kvcache")
    prefills = ["prefill-1", "prefill-2"] if args.mode == "prefill-share" else ["prefill"]
    specs = [(p, p_flags) for p in prefills] + [("decode", d_flags)]
    with Instances(specs, workdir, args.start_timeout) as inst:
        before = {n: (http_get(u + "/get_server_info") or {}).get("cache_stats") or {} for n, u in inst.urls.items()}
        history = [list(p) for p in work.first]
        per_round: list[dict[str, Any]] = []
        outputs: list[list[list[int]]] = []
        per_instance = {p: dict.fromkeys(TIERS, 0) for p in prefills}
        handed = in_tokens = out_tokens = 0
        t_start = time.perf_counter()
        for rnd in range(args.num_rounds):
            prefill = prefills[rnd % len(prefills)]
            url = inst.urls[prefill]
            calls = send_round(
                work,
                rnd,
                lambda c, u=url: _PDCall(u, inst.urls["decode"], work.prompt(history, c, rnd), args.output_length),
                progress,
                label,
            )
            failed = [c.error for _, c in calls if c.error]
            if failed:
                inst.check_alive()
                raise HiCacheError(f"{label}: {len(failed)} requests failed, e.g. {failed[0]}")
            cached = {t: sum(c.cached[t] for _, c in calls) for t in TIERS}
            for t in TIERS:
                per_instance[prefill][t] += cached[t]
            by_client = dict(calls)
            for client, c in by_client.items():
                in_tokens += len(c.ids)
                out_tokens += len(c.output)
                handed += c.handed
                history[client] += c.output + work.questions[rnd][client]
            ttfts = [c.ttft for _, c in calls]
            per_round.append(
                {
                    "round": rnd + 1,
                    "prefill": prefill,
                    "ttft_mean_ms": statistics.mean(ttfts) * 1e3,
                    "ttft_p50_ms": pct(ttfts, 0.5) * 1e3,
                    "ttft_p90_ms": pct(ttfts, 0.9) * 1e3,
                    "cached": cached,
                    "prompt_tokens": sum(len(c.ids) for _, c in calls),
                }
            )
            outputs.append([by_client[c].output for c in sorted(by_client)])
        wall = time.perf_counter() - t_start
        stats = {
            n: counter_delta((http_get(u + "/get_server_info") or {}).get("cache_stats") or {}, before[n])
            for n, u in inst.urls.items()
        }
    totals = {t: sum(h[t] for h in per_instance.values()) for t in TIERS}
    later = [r["ttft_mean_ms"] for r in per_round[1:]]
    return {
        "config": name,
        "label": label,
        "rounds": per_round,
        "instances": {n: f for n, f in specs},
        "ttft_mean_rounds2plus_ms": statistics.mean(later) if later else None,
        "hit_tokens": totals,
        "prompt_tokens": in_tokens,
        "cache_hit_rate": sum(totals.values()) / in_tokens if in_tokens else 0.0,
        "per_instance_hit_tokens": per_instance,
        "decode_storage_tokens": handed,
        "transfer_bytes": _sum(stats, "transfer_bytes") or {},
        "transfer_gbps": {},
        "prefetched_tokens": _sum(stats, "prefetched_tokens"),
        "backuped_tokens": _sum(stats, "backuped_tokens"),
        "backuped_tokens_by_instance": {n: s.get("backuped_tokens", 0) for n, s in stats.items()},
        "storage_errors": _sum(stats, "storage_errors") or {},
        "wall_s": wall,
        "throughput_req_s": args.num_rounds * args.num_clients / wall,
        "throughput_in_tok_s": in_tokens / wall,
        "throughput_out_tok_s": out_tokens / wall,
        "outputs": outputs,
    }


def _sum(stats: dict[str, dict], key: str) -> Any:
    vals: list[Any] = [s.get(key) for s in stats.values() if s.get(key) is not None]
    if vals and isinstance(vals[0], dict):
        out: dict = {}
        for v in vals:
            for k, x in v.items():
                if isinstance(x, (int, float)):
                    out[k] = out.get(k, 0) + x
        return out
    return sum(v for v in vals if isinstance(v, (int, float)))


def _longest(args: argparse.Namespace) -> int:
    return args.request_length + (args.num_rounds - 1) * (args.output_length + args.question_length)


def single_process(args: argparse.Namespace, work: Workload) -> dict[str, Any]:
    """The reference: the same model in this process, no cache, the same conversations."""
    from hicache_core.engine import Engine, ModelConfig, Request, TinyLlama

    pool = args.max_running * (_longest(args) + args.output_length + args.page_size)
    engine = Engine(
        TinyLlama(ModelConfig(seed=args.seed)),
        HiCacheConfig(page_size=args.page_size),
        "none",
        device_tokens=pool,
        max_running=args.max_running,
    )
    history = [list(p) for p in work.first]
    outputs = []
    for rnd in range(args.num_rounds):
        reqs = [
            Request(f"ref-{rnd}-{c}", work.prompt(history, c, rnd), args.output_length) for c in range(args.num_clients)
        ]
        engine.generate(reqs)
        for c, r in enumerate(reqs):
            history[c] += r.output + work.questions[rnd][c]
        outputs.append([r.output for r in reqs])
    engine.close()
    return {"config": "single", "label": "single process (reference)", "outputs": outputs}


def run(args: argparse.Namespace) -> int:
    from hicache_core.engine import ModelConfig

    args.vocab_size = ModelConfig(seed=args.seed).vocab_size  # the instances' model (hicache serve's default)
    HiCacheConfig.from_args(args)  # bad --hicache-* flags fail here, before any process starts
    longest = _longest(args)
    if longest + args.output_length > args.device_tokens:
        raise ConfigError(
            f"the last round's prompt ({longest} tokens) plus its reply ({args.output_length}) does not "
            f"fit an instance's device pool (--device-tokens {args.device_tokens}): raise it or "
            "shorten the conversation"
        )
    work = Workload(args)
    names = list(CONFIGS[args.mode])
    if args.configs:
        names = [c.strip() for c in args.configs.split(",") if c.strip()]
        bad = [c for c in names if c not in CONFIGS[args.mode]]
        if bad or not names:
            raise ConfigError(
                f"--configs: {', '.join(bad) or 'none given'}; --mode {args.mode} runs {', '.join(CONFIGS[args.mode])}"
            )
    tmp = None
    storage_dir = args.storage_dir
    if storage_dir is None:
        tmp = storage_dir = tempfile.mkdtemp(prefix="hicache-bench-pd-")
    if not args.no_progress:
        sys.stderr.write("single-process reference run...\n")
    reference = single_process(args, work)
    progress = Progress(args.repeat * len(names) * args.num_rounds * args.num_clients, not args.no_progress)
    reps: list[tuple[list[dict], Optional[dict]]] = []
    try:
        for i in range(args.repeat):
            results = []
            for name in names:
                sdir = os.path.join(storage_dir, f"repeat-{i + 1}-{name}")
                os.makedirs(sdir, exist_ok=True)
                workdir = tempfile.mkdtemp(prefix="hicache-pd-logs-")
                try:
                    results.append(run_config(name, args, work, sdir, workdir, progress))
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
            reps.append(([reference] + results, None))
        progress.close()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return report(args, reps, kind="pd")
