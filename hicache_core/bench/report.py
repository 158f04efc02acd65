"""The multi-turn benchmark's report: tables, JSON and chart, with spread over ``--repeat`` runs and warnings
for figures that cannot be trusted (a warm restart that served nothing from storage, a contended CPU)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any, Optional

from hicache_core.bench.common import print_table
from hicache_core.bench.measure import CONTENDED_CORES, spread
from hicache_core.bench.variants import lossy, lossy_warning, print_l3_bytes
from hicache_core.config import PREFETCH_POLICIES


def chart(report: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'hicache-core[bench]'): no chart"
    runs = [r for r in report["configs"] if r.get("rounds")]  # not a reference that only gave tokens
    phased = [r for r in runs if r.get("ttft_phases_rounds2plus_ms")]
    fig, axes = plt.subplots(1, 3 if phased else 2, figsize=(18 if phased else 12, 4.5))
    a, b = axes[0], axes[1]
    for run in runs:
        a.plot(
            [r["round"] for r in run["rounds"]],
            [r["ttft_mean_ms"] for r in run["rounds"]],
            marker="o",
            label=run["label"],
        )
    if report.get("warm"):
        a.scatter(
            [1],
            [report["warm"]["rounds"][0]["ttft_mean_ms"]],
            marker="*",
            s=160,
            color="k",
            label="warm restart, round 1",
            zorder=5,
        )
    a.set_xticks(range(1, len(runs[0]["rounds"]) + 1))
    a.set_xlabel("round")
    a.set_ylabel("mean TTFT (ms)")
    a.set_yscale("log")
    a.set_title("Time to first token by round")
    a.legend()
    names = [run["label"] for run in runs]
    bottom = [0.0] * len(runs)
    for tier, color in (("device", "#4c72b0"), ("host", "#55a868"), ("storage", "#c44e52")):
        vals = [run["hit_tokens"][tier] / max(run["prompt_tokens"], 1) for run in runs]
        b.bar(names, vals, bottom=bottom, color=color, label=tier)
        bottom = [x + y for x, y in zip(bottom, vals)]
    b.set_ylabel("share of prompt tokens served from cache")
    b.set_title("Cache hits by tier")
    b.legend()
    b.tick_params(axis="x", labelrotation=15)
    if phased:
        c = axes[2]
        bottom = [0.0] * len(phased)
        colors = {"queued": "#8172b3", "prefetch_wait": "#c44e52", "load": "#55a868", "compute": "#4c72b0"}
        for phase, color in colors.items():
            vals = [r["ttft_phases_rounds2plus_ms"][phase] for r in phased]
            c.bar([r["label"] for r in phased], vals, bottom=bottom, color=color, label=phase.replace("_", " "))
            bottom = [x + y for x, y in zip(bottom, vals)]
        c.set_ylabel("mean TTFT, rounds 2+ (ms)")
        c.set_title("Where TTFT goes")
        c.legend()
        c.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def print_phases(results: list[dict], key: str, what: str) -> None:
    """Where each configuration's TTFT went (``r[key]``: mean ms per phase) and how its storage prefetches ended."""
    phased = [r for r in results if r.get(key)]
    if not phased:
        return
    print(f"\nwhere {what} goes (mean ms; the phases sum to it) and how storage prefetches ended:")
    for r in phased:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted((r.get("prefetch_outcomes") or {}).items()))
        print(
            f"  {r['label']:<20} "
            + "  ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in r[key].items())
            + (f"   prefetch: {outcomes}" if outcomes else "")
        )


def _requests(outputs: Any) -> list:
    """The token lists of every request in a run's outputs (nested by round and client)."""
    if isinstance(outputs, list) and outputs and isinstance(outputs[0], list):
        return [leaf for o in outputs for leaf in _requests(o)]
    return [outputs]


def agreement(outputs: Any, reference: Any) -> tuple[int, int]:
    """How many requests generated exactly the reference's tokens, of how many."""
    mine, ref = _requests(outputs), _requests(reference)
    return sum(a == b for a, b in zip(mine, ref)), len(ref)


def strict_tokens(args: argparse.Namespace) -> bool:
    """float64 activations make tokens independent of what was cached: every configuration must equal the
    reference. float32's may differ in near ties: the report then counts agreement instead of failing."""
    return getattr(args, "compute_dtype", "float64") == "float64"


def summarize(results: list[dict], warm: Optional[dict]) -> dict[str, Any]:
    """One repetition's headline figures, its token checks and its warnings."""
    reference = results[0]["outputs"]
    by = {r["config"]: r for r in results}
    s: dict[str, Any] = {"outputs_identical": {r["config"]: r["outputs"] == reference for r in results}, "warnings": []}
    s["requests_with_reference_tokens"] = {r["config"]: agreement(r["outputs"], reference) for r in results}
    if results[0].get("replies_text"):  # --model-path: what the real model answered (client 0, each round)
        s["replies_text"] = results[0]["replies_text"]
    if "radix" in by and "hicache+storage" in by and by["hicache+storage"]["ttft_mean_rounds2plus_ms"]:
        s["ttft_rounds2plus_speedup_storage_vs_radix"] = (
            by["radix"]["ttft_mean_rounds2plus_ms"] / by["hicache+storage"]["ttft_mean_rounds2plus_ms"]
        )
    if "none" in by and by["none"].get("rounds"):  # recompute: the baseline every cache is measured against
        mean_all = lambda r: statistics.mean(x["ttft_mean_ms"] for x in r["rounds"])  # noqa: E731
        s["ttft_speedup_vs_recompute"] = {
            r["config"]: mean_all(by["none"]) / mean_all(r)
            for r in results
            if r["config"] != "none" and r.get("rounds")
        }
    local = (by.get("pd-local") or {}).get("ttft_mean_rounds2plus_ms")
    if local:
        s["ttft_rounds2plus_speedup_vs_pd_local"] = {
            r["config"]: local / r["ttft_mean_rounds2plus_ms"]
            for r in results
            if r["config"] != "pd-local" and r.get("ttft_mean_rounds2plus_ms")
        }
    if warm:
        cold = by["hicache+storage"]["rounds"][0]["ttft_mean_ms"]
        s["warm_round1_ttft_ms"] = warm["rounds"][0]["ttft_mean_ms"]
        s["cold_round1_ttft_ms"] = cold
        s["warm_round1_speedup"] = cold / warm["rounds"][0]["ttft_mean_ms"]
        s["warm_outputs_identical"] = warm["outputs"][0] == reference[0]
        s["warm_storage_tokens"] = warm["hit_tokens"]["storage"]
        if not warm["hit_tokens"]["storage"]:
            s["warnings"].append(
                "the warm restart served 0 tokens from storage: its round 1 says nothing about "
                "restarts (was the storage emptied, or written elsewhere?)"
            )
    for r in results + ([warm] if warm else []):
        cpu = r.get("cpu") or {}
        if cpu.get("contended"):
            name = "warm restart" if r is warm else r["label"]
            s["warnings"].append(
                f"{name}: other processes used {cpu['others_cores']:.1f} CPU cores during the run "
                f"(more than {CONTENDED_CORES}): its timings are contended"
            )
    return s


def report(args: argparse.Namespace, reps: list[tuple[list[dict], Optional[dict]]], kind: str = "multiturn") -> int:
    """Print and write the report; 0 when every configuration of every repetition matched the reference (the
    first result: for ``kind="pd"`` a single-process run that gives only tokens)."""
    summaries = [summarize(results, warm) for results, warm in reps]
    results, warm = reps[0]
    summary = dict(summaries[0])
    summary["warnings"] = [
        f"repeat {i + 1}: {w}" if len(reps) > 1 else w for i, s in enumerate(summaries) for w in s["warnings"]
    ]
    if len(reps) > 1:
        summary["repeats"] = {
            "n": len(reps),
            "ttft_rounds2plus_ms": {
                r["config"]: spread([rr[i].get("ttft_mean_rounds2plus_ms") for rr, _ in reps])
                for i, r in enumerate(results)
            },
            # round 1 (nothing cached yet) queues behind arrivals a little faster than service: one run's round 1
            # swings +-25%, so configurations are compared on its median over repeats
            "ttft_round1_ms": {
                r["config"]: spread([(rr[i].get("rounds") or [{}])[0].get("ttft_mean_ms") for rr, _ in reps])
                for i, r in enumerate(results)
            },
            "speedup_vs_pd_local": {
                c: spread([s.get("ttft_rounds2plus_speedup_vs_pd_local", {}).get(c) for s in summaries])
                for c in summary.get("ttft_rounds2plus_speedup_vs_pd_local", {})
            },
            "speedup_storage_vs_radix": spread([s.get("ttft_rounds2plus_speedup_storage_vs_radix") for s in summaries]),
            "warm_round1_speedup": spread([s.get("warm_round1_speedup") for s in summaries]),
        }
    same = {c: all(s["outputs_identical"][c] for s in summaries) for c in summary["outputs_identical"]}
    summary["outputs_identical"] = same
    warm_ok = lossy("hicache+storage", args) or all(s.get("warm_outputs_identical", True) for s in summaries)
    ok = all(v for c, v in same.items() if not lossy(c, args)) and warm_ok
    if (line := lossy_warning(summary, args)) is not None:
        summary["warnings"].append(line)
    if not ok and not strict_tokens(args):  # float32: near ties may flip; say how often, do not fail
        agree = {c: f"{a}/{n}" for c, (a, n) in summary["requests_with_reference_tokens"].items()}
        summary["warnings"].append(
            "--compute-dtype float32: tokens are not bit-stable across batch shapes; requests with the reference's "
            "tokens: " + ", ".join(f"{c} {v}" for c, v in agree.items())
        )
        ok = True
    strip = lambda r: {k: v for k, v in r.items() if k != "outputs"}  # noqa: E731
    out = {
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "summary": summary,
        "configs": [strip(r) for r in results],
        "warm": strip(warm) if warm else None,
        "repeats": [{"configs": [strip(r) for r in rr], "warm": strip(w) if w else None} for rr, w in reps[1:]],
    }
    os.makedirs(args.report_dir, exist_ok=True)
    json_path = os.path.join(args.report_dir, "report.json")
    png_path = os.path.join(args.report_dir, "report.png")
    with open(json_path, "w") as f:
        json.dump(out, f, indent=2, default=str)
    chart_note = chart(out, png_path)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0 if ok else 1
    _print(args, results, warm, summary, same, kind)
    print(f"\nreport: {json_path}" + (f", chart: {png_path}" if not chart_note else f" ({chart_note})"))
    for w in summary["warnings"]:
        print(f"WARNING: {w}", file=sys.stderr)
    if not ok:
        print("ERROR: a configuration produced different tokens from the reference run", file=sys.stderr)
    return 0 if ok else 1


def _print(
    args: argparse.Namespace, results: list[dict], warm: Optional[dict], summary: dict, same: dict, kind: str
) -> None:
    where = (
        f"servers {', '.join(r['url'] for r in results)}"
        if getattr(args, "base_url", None)
        else f"device pool {args.device_tokens} tokens, page {args.page_size}, host ratio {args.hicache_ratio}, "
        f"storage {args.hicache_storage_backend} ({args.hicache_storage_prefetch_policy})"
    )
    if kind == "pd":
        where = f"--mode {args.mode}, `hicache serve` instances; each with a " + where
        if not all(same.values()):
            print("tokens: some configuration differs from the single-process run (see 'same tokens')")
        results = [r for r in results if r.get("rounds")]  # the single-process reference gave tokens only
    print(
        f"\nhicache bench {kind}: {args.num_clients} clients x {args.num_rounds} rounds, first prompt "
        f"{args.request_length} tokens, +{args.question_length} per round, {args.output_length} generated; "
        f"{where}\n"
    )
    rows = []
    for r in results:
        cpu = (r.get("cpu") or {}).get("others_cores")
        row = {
            "config": r["label"],
            "r2": r["ttft_mean_rounds2plus_ms"] or 0.0,
            "hit": r["cache_hit_rate"] * 100,
            "dev": r["hit_tokens"]["device"],
            "host": r["hit_tokens"]["host"],
            "sto": r["hit_tokens"]["storage"],
            "rps": r["throughput_req_s"],
            "mb": sum(r["transfer_bytes"].values()) / 2**20,
            "same": "yes" if same[r["config"]] else "NO",
            "cpu": "-" if cpu is None else f"{cpu:.2f}",
        }
        for rr in r["rounds"]:
            row[f"t{rr['round']}"] = rr["ttft_mean_ms"]
        rows.append(row)
    cols = [("config", "configuration", "s")] + [
        (f"t{i}", f"TTFT r{i} ms", ".1f") for i in range(1, args.num_rounds + 1)
    ]
    cols += [
        ("r2", "r2+ mean", ".1f"),
        ("hit", "hit %", ".1f"),
        ("dev", "device tok", "d"),
        ("host", "host tok", "d"),
        ("sto", "storage tok", "d"),
        ("mb", "MiB moved", ".1f"),
        ("rps", "req/s", ".2f"),
        ("cpu", "others' CPU", "s"),
        ("same", "same tokens", "s"),
    ]
    print_table(rows, cols)
    print("\nTTFT p50 / p90 per round (ms):")
    for r in results:
        print(
            f"  {r['label']:<20} "
            + "  ".join(f"r{x['round']} {x['ttft_p50_ms']:.0f}/{x['ttft_p90_ms']:.0f}" for x in r["rounds"])
        )
    vs = summary.get("ttft_speedup_vs_recompute") or {}
    if vs:
        labels = {r["config"]: r["label"] for r in results}
        if getattr(args, "all_miss", False):
            print("\nall-miss (no prompt seen twice): mean TTFT over every round against no cache, what a miss costs:")
            for c, x in vs.items():
                print(f"  {labels[c]:<20} {(1 / x - 1) * 100:+.1f}% ({x:.2f}x)")
        else:
            print(
                "\nmean TTFT over every round against recompute (no cache): "
                + ", ".join(f"{labels[c]} {x:.2f}x" for c, x in vs.items())
            )
    print_phases(results, "ttft_phases_rounds2plus_ms", "rounds 2+ TTFT")
    ranks = [r for r in results if r.get("per_rank_hit_tokens")]
    if ranks:
        print(
            f"\nhit tokens per rank (device/host/storage), "
            f"{len(ranks[0]['per_rank_hit_tokens'])} tensor-parallel ranks:"
        )
        for r in ranks:
            print(
                f"  {r['label']:<20} "
                + "  ".join(
                    f"rank {i} {h['device']}/{h['host']}/{h['storage']}" for i, h in enumerate(r["per_rank_hit_tokens"])
                )
            )
    for r in results:
        if "@" in r["config"] and r["config"].partition("@")[2] in PREFETCH_POLICIES:
            print(
                f"  {r['label']}: {r.get('prefetch_skipped_cost', 0)} prefetches skipped (recompute expected faster), "
                f"{r.get('prefetch_cut_cost', 0)} cut (waited as long as recomputing takes), "
                f"{r['hit_tokens']['storage']} tokens from storage"
            )
    print_l3_bytes(results)
    inst = [r for r in results if r.get("per_instance_hit_tokens")]
    if inst:
        print("\nprefill hit tokens per instance (device/host/storage); decode loaded from storage:")
        for r in inst:
            print(
                f"  {r['label']:<28} "
                + "  ".join(
                    f"{n} {h['device']}/{h['host']}/{h['storage']}" for n, h in r["per_instance_hit_tokens"].items()
                )
                + f"  decode {r['decode_storage_tokens']}"
            )
    for c, x in (summary.get("ttft_rounds2plus_speedup_vs_pd_local") or {}).items():
        label = next(r["label"] for r in results if r["config"] == c)
        print(f"rounds 2+: {label} has {x:.1f}x lower mean TTFT than PD without a shared store")
    if summary.get("replies_text"):
        print(f"\nclient 0's replies ({results[0]['label']}; every configuration with 'same tokens' gave these):")
        for i, text in enumerate(summary["replies_text"]):
            print(f"  r{i + 1}: {text.strip()[:160]!r}")
    if "ttft_rounds2plus_speedup_storage_vs_radix" in summary:
        print(
            f"\nrounds 2+: HiCache with storage has {summary['ttft_rounds2plus_speedup_storage_vs_radix']:.1f}x lower "
            "mean TTFT than the device-only radix cache" + (" (over HTTP)" if args.base_url else " (same device pool)")
        )
    if warm:
        print(
            f"warm restart: round 1 mean TTFT {summary['warm_round1_ttft_ms']:.1f} ms vs cold "
            f"{summary['cold_round1_ttft_ms']:.1f} ms ({summary['warm_round1_speedup']:.1f}x), "
            f"{summary['warm_storage_tokens']} tokens from storage; "
            f"tokens {'identical' if summary['warm_outputs_identical'] else 'DIFFER'}; "
            + (
                f"{warm['page_cache_dropped_files']} store files dropped from the page cache first"
                if warm.get("page_cache_dropped_files")
                else "the store's page cache kept (or none to drop)"
            )
        )
    rep = summary.get("repeats")
    if rep:
        print(f"\nover {rep['n']} repeats (median, min-max):")
        for r in results:
            sp, r1 = rep["ttft_rounds2plus_ms"][r["config"]], rep["ttft_round1_ms"][r["config"]]
            parts = [
                f"{what} {s['median']:.1f} ms ({s['min']:.1f}-{s['max']:.1f})"
                for what, s in (("r2+ mean TTFT", sp), ("r1", r1))
                if s["median"] is not None
            ]
            if parts:
                print(f"  {r['label']:<20} " + "   ".join(parts))
        for c, sp in rep.get("speedup_vs_pd_local", {}).items():
            if sp["median"] is not None:
                print(f"  {c} vs pd-local, rounds 2+: {sp['median']:.1f}x ({sp['min']:.1f}-{sp['max']:.1f})")
        for key, what in (
            ("speedup_storage_vs_radix", "storage vs radix, rounds 2+"),
            ("warm_round1_speedup", "warm restart vs cold, round 1"),
        ):
            sp = rep[key]
            if sp["median"] is not None:
                print(f"  {what}: {sp['median']:.1f}x ({sp['min']:.1f}-{sp['max']:.1f})")
