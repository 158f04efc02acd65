"""``hicache bench``: benchmarks that report ratios against a baseline measured in the same run.

``BENCHMARKS`` maps a subcommand to (add_arguments, run, help); modules import lazily so the CLI stays fast.
"""

from __future__ import annotations

import argparse
import importlib


def _lazy(module: str, what: str):
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        importlib.import_module(f"hicache_core.bench.{module}").add_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(f"hicache_core.bench.{module}").run(args)

    return add_arguments, run, what


BENCHMARKS: dict = {
    "transfer": _lazy("transfer", "device<->host page movement per layout x io backend x direction"),
    "multiturn": _lazy("multiturn", "multi-turn chat on the reference engine under every cache configuration"),
    "storage": _lazy("storage", "storage backend set/get/exists beside its plugin's raw baseline"),
    "tree": _lazy("tree", "radix tree cost per request (match_prefix, insert) beside the KV load time"),
    "fingerprint": _lazy("fingerprint", "the model fingerprint's cost at start per GB, beside reading the weights"),
    "vllm": _lazy(
        "vllm", "multi-turn chat against real vllm serve: alone, with HiCacheConnector, with ExampleConnector"
    ),
    "trace": _lazy(
        "trace", "replay a Mooncake-format trace (JSONL) beside recompute: hit rate against ideal, TTFT p50/p90/p99"
    ),
    "prefill": _lazy(
        "prefill", "the reference engine's prefill per compute dtype beside vllm serve on the same checkpoint"
    ),
    "toolgap": _lazy(
        "toolgap", "agent sessions pausing for tool calls amid churn: post-gap TTFT with restore, retention, neither"
    ),
    "pd": _lazy("pd", "prefill/decode disaggregation: hicache serve instances sharing one store, beside none"),
    "fleet": _lazy("fleet", "hicache serve processes of different TP sizes on one store, beside a store each"),
}
