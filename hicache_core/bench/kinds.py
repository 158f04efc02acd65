"""``hicache bench multiturn --model-kind llama,swa,hybrid,mla,mamba``: the whole benchmark once per attention kind
of the random model, each in a report directory of its own, then one table of what each kind's cache gained."""

from __future__ import annotations

import argparse
import copy
import json
import os
from collections.abc import Callable
from typing import Any

from hicache_core.engine.model_config import MODEL_KINDS
from hicache_core.errors import ConfigError


def model_kinds(args: argparse.Namespace) -> list[str]:
    """The kinds ``--model-kind`` names (ConfigError for an unknown one, or for any but llama with a checkpoint,
    whose config.json says its own attention)."""
    kinds = [k.strip() for k in str(getattr(args, "model_kind", "llama")).split(",") if k.strip()]
    bad = [k for k in kinds if k not in MODEL_KINDS]
    if bad or not kinds:
        raise ConfigError(f"--model-kind: {', '.join(bad) or 'none given'}; choose from {', '.join(MODEL_KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise ConfigError(f"--model-kind names a kind twice: {','.join(kinds)}")
    if args.model_path and kinds != ["llama"]:
        raise ConfigError(
            "--model-kind is the random model's: a --model-path checkpoint's config.json says its own attention "
            "(sliding_window, layer_types)"
        )
    return kinds


def _gain(configs: list[dict], name: str) -> float | None:
    """Rounds 2+ mean TTFT of no cache over ``name``'s."""
    by = {c["config"]: c for c in configs}
    base, got = (by.get(k, {}).get("ttft_mean_rounds2plus_ms") for k in ("none", name))
    return base / got if base and got else None


def run_kinds(args: argparse.Namespace, kinds: list[str], run: Callable[[argparse.Namespace], int]) -> int:
    """Run the benchmark for each kind (``run`` with that kind and a report directory of its own), then print and
    write (``<report-dir>/kinds.json``) each kind's rounds-2+ gain over no cache. Nonzero when any kind's run
    was (a configuration's tokens differed from its no-cache reference)."""
    rc = 0
    rows: list[dict[str, Any]] = []
    for kind in kinds:
        one = copy.copy(args)
        one.model_kind, one.report_dir = kind, os.path.join(args.report_dir, kind)
        if not args.json:
            print(f"\n=== --model-kind {kind} ===")
        rc = max(rc, run(one))
        with open(os.path.join(one.report_dir, "report.json")) as f:
            report = json.load(f)
        configs = report["configs"]
        rows.append(
            {
                "kind": kind,
                "tokens_identical": all(report["summary"]["outputs_identical"].values()),
                "rounds2plus_gain_vs_none": {c["config"]: _gain(configs, c["config"]) for c in configs[1:]},
            }
        )
    os.makedirs(args.report_dir, exist_ok=True)
    path = os.path.join(args.report_dir, "kinds.json")
    with open(path, "w") as f:
        json.dump({"sliding_window": args.sliding_window, "kinds": rows}, f, indent=2)
    if args.json:
        print(json.dumps(rows, indent=2))
        return rc
    names = list(rows[0]["rounds2plus_gain_vs_none"])
    print(f"\nrounds 2+ mean TTFT gain over no cache, per model kind (windows of {args.sliding_window} tokens):")
    print(f"{'kind':<8} " + " ".join(f"{n:>18}" for n in names) + "  tokens")
    for row in rows:
        gains = [row["rounds2plus_gain_vs_none"][n] for n in names]
        cells = " ".join(f"{g:>17.2f}x" if g else f"{'-':>18}" for g in gains)
        print(f"{row['kind']:<8} {cells}  {'identical' if row['tokens_identical'] else 'DIFFER'}")
    print(f"kinds: {path}")
    return rc
