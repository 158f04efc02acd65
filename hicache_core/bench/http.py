"""``hicache bench multiturn --base-url URL``: the same conversations, sent to running servers over HTTP.

Each ``--base-url [LABEL=]URL`` is one configuration: a server speaking SGLang's native API (``hicache serve``,
or SGLang itself). Requests go to ``POST /generate`` with ``input_ids``, greedy, ``ignore_eos`` and
``stream: true``; TTFT is the time from sending to the first streamed chunk, as SGLang's bench_multiturn measures
it. Each server's cache is flushed first (``/flush_cache``); hits per tier come from each response's
``meta_info.cached_tokens_details`` (``cached_tokens`` alone counts as device hits when a server gives no split).
The first server is the reference the others' tokens must match.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Optional

from hicache_core.errors import ConfigError, HiCacheError

TIERS = ("device", "host", "storage")


def parse_base_urls(values: list[str]) -> list[tuple[Optional[str], str]]:
    out = []
    for v in values:
        label, _, url = v.rpartition("=") if "=" in v.split("://", 1)[0] else (None, "", v)
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--base-url {v!r}: give http://HOST:PORT, optionally as LABEL=http://HOST:PORT")
        out.append((label or None, url.rstrip("/")))
    return out


def http_get(url: str, timeout: float = 30) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read().decode() or "null")
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise HiCacheError(f"{url}: {getattr(e, 'reason', e)} (is the server running?)") from None


def http_post(url: str, body: dict, timeout: float = 600) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        raise HiCacheError(f"{url}: {getattr(e, 'reason', e)} (is the server running?)") from None


class HttpCall:
    """One streamed /generate request."""

    def __init__(self, url: str, ids: list[int], args: argparse.Namespace) -> None:
        self.url, self.ids, self.args = url, ids, args
        self.output: list[int] = []
        self.meta: dict = {}
        self.ttft = 0.0
        self.error: Optional[str] = None

    def run(self) -> None:
        body = {
            "input_ids": self.ids,
            "stream": True,
            "sampling_params": {"max_new_tokens": self.args.output_length, "temperature": 0, "ignore_eos": True},
        }
        req = urllib.request.Request(
            self.url + "/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                for raw in r:
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    if not self.ttft:
                        self.ttft = time.perf_counter() - t0
                    chunk = json.loads(line[5:])
                    self.output = chunk.get("output_ids", self.output)
                    self.meta = chunk.get("meta_info", self.meta)
        except urllib.error.HTTPError as e:
            self.error = f"HTTP {e.code}: {e.read().decode(errors='replace')[:300]}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            self.error = f"{type(e).__name__}: {e}"

    def cached(self) -> dict[str, int]:
        details = self.meta.get("cached_tokens_details")
        if isinstance(details, dict):
            return {t: int(details.get(t, 0) or 0) for t in TIERS}
        return {"device": int(self.meta.get("cached_tokens", 0) or 0), "host": 0, "storage": 0}


def counter_delta(after: Any, before: Any) -> Any:
    """What a server's counters moved during the run (dicts of numbers, recursively)."""
    if isinstance(after, dict):
        return {k: counter_delta(v, before.get(k) if isinstance(before, dict) else None) for k, v in after.items()}
    if isinstance(after, (int, float)) and isinstance(before, (int, float)) and not isinstance(after, bool):
        return after - before
    return after


def server_config(url: str) -> tuple[str, dict]:
    """The server's cache configuration (``mode`` from hicache serve; SGLang servers read as 'server')."""
    info = http_get(url + "/get_server_info")
    if not isinstance(info, dict):
        return "server", {}
    return str(info.get("mode") or "server"), info


def send_round(work: Any, rnd: int, make_call: Any, progress: Any, label: str) -> list[tuple[int, Any]]:
    """Round ``rnd``'s requests, each sent on a thread of its own at its arrival time; (client, call) once all
    have answered. ``make_call(client)`` builds an object with ``run()``."""
    calls, threads = [], []
    at = time.perf_counter()
    for client, gap in zip(work.orders[rnd], work.gaps[rnd]):
        time.sleep(max(0.0, at - time.perf_counter()))
        call = make_call(client)
        t = threading.Thread(target=run_and_count, args=(call, progress, label), daemon=True)
        t.start()
        calls.append((client, call))
        threads.append(t)
        at += gap
    for t in threads:
        t.join()
    return calls


def run_and_count(call: Any, progress: Any, label: str) -> None:
    call.run()
    progress.step(label)


def run_server(
    label: str, mode: str, url: str, args: argparse.Namespace, work: Any, progress: Any, pct: Any
) -> dict[str, Any]:
    vocab = (http_get(url + "/get_model_info") or {}).get("vocab_size")
    if isinstance(vocab, int) and vocab < args.vocab_size:
        raise ConfigError(f"{url} has a vocabulary of {vocab} tokens; run with --vocab-size {vocab}")
    before = (http_get(url + "/get_server_info") or {}).get("cache_stats") or {}
    status, text = http_post(url + "/flush_cache", {})
    if status != 200:
        raise HiCacheError(f"{url}/flush_cache answered {status}: {text[:200]} (is the server idle?)")
    history = [list(p) for p in work.first]
    per_round, outputs = [], []
    totals = dict.fromkeys(TIERS, 0)
    in_tokens = out_tokens = 0
    t_start = time.perf_counter()
    for rnd in range(args.num_rounds):
        calls = send_round(
            work, rnd, lambda client: HttpCall(url, work.prompt(history, client, rnd), args), progress, label
        )
        failed = [c.error for _, c in calls if c.error]
        if failed:
            raise HiCacheError(f"{label} ({url}): {len(failed)} requests failed, e.g. {failed[0]}")
        by_client = dict(calls)
        cached = {tier: sum(c.cached()[tier] for _, c in calls) for tier in TIERS}
        for tier in TIERS:
            totals[tier] += cached[tier]
        for client, c in by_client.items():
            in_tokens += len(c.ids)
            out_tokens += len(c.output)
            history[client] += c.output + work.questions[rnd][client]
        ttfts = [c.ttft for _, c in calls]
        per_round.append(
            {
                "round": rnd + 1,
                "ttft_mean_ms": statistics.mean(ttfts) * 1e3,
                "ttft_p50_ms": pct(ttfts, 0.5) * 1e3,
                "ttft_p90_ms": pct(ttfts, 0.9) * 1e3,
                "cached": cached,
                "prompt_tokens": sum(len(c.ids) for _, c in calls),
            }
        )
        phases = [p for p in (c.meta.get("ttft_phases") for _, c in calls) if isinstance(p, dict)]
        if phases and len(phases) == len(calls):  # hicache serve says where each TTFT went (server-side)
            per_round[-1]["ttft_phases_ms"] = {k: statistics.mean(p[k] for p in phases) * 1e3 for k in phases[0]}
        outputs.append([by_client[c].output for c in sorted(by_client)])
    wall = time.perf_counter() - t_start
    later = [r["ttft_mean_ms"] for r in per_round[1:]]
    phased = [r["ttft_phases_ms"] for r in per_round[1:] if "ttft_phases_ms" in r]
    stats = counter_delta((http_get(url + "/get_server_info") or {}).get("cache_stats") or {}, before)
    return {
        "config": mode,
        "label": label,
        "url": url,
        "rounds": per_round,
        "ttft_mean_rounds2plus_ms": statistics.mean(later) if later else None,
        "hit_tokens": totals,
        "prompt_tokens": in_tokens,
        "cache_hit_rate": sum(totals.values()) / in_tokens if in_tokens else 0.0,
        "transfer_bytes": stats.get("transfer_bytes", {}),
        "transfer_gbps": stats.get("transfer_gbps", {}),
        "prefetched_tokens": stats.get("prefetched_tokens", 0),
        "backuped_tokens": stats.get("backuped_tokens", 0),
        "storage_errors": stats.get("storage_errors", {}),
        "prefetch_outcomes": stats.get("prefetch_outcomes", {}),
        "ttft_phases_rounds2plus_ms": {k: statistics.mean(p[k] for p in phased) for k in phased[0]}
        if phased and len(phased) == len(later)
        else None,
        "wall_s": wall,
        "throughput_req_s": args.num_rounds * args.num_clients / wall,
        "throughput_in_tok_s": in_tokens / wall,
        "throughput_out_tok_s": out_tokens / wall,
        "outputs": outputs,
    }
