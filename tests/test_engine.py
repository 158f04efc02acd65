"""End to end on the reference engine: every cache configuration produces the no-cache tokens, with real tiers."""

import argparse
import json
import os
import time
from pathlib import Path

import pytest
import torch

from hicache_core.bench import multiturn
from hicache_core.config import HiCacheConfig
from hicache_core.engine import Engine, ModelConfig, Request, TinyLlama
from hicache_core.engine.request import PHASES
from hicache_core.errors import ConfigError

SMALL = [
    "--num-clients",
    "4",
    "--num-rounds",
    "3",
    "--request-length",
    "96",
    "--question-length",
    "32",
    "--output-length",
    "6",
    "--request-rate",
    "200",
    "--device-tokens",
    "256",
    "--max-running",
    "2",
    "--hidden-size",
    "64",
    "--intermediate-size",
    "128",
    "--num-layers",
    "2",
    "--num-heads",
    "4",
    "--num-kv-heads",
    "2",
    "--head-dim",
    "16",
    "--vocab-size",
    "512",
    "--page-size",
    "16",
    "--hicache-ratio",
    "1.5",
    "--no-progress",
]


def parse(argv):
    p = argparse.ArgumentParser()
    multiturn.add_arguments(p)
    return p.parse_args(argv)


@pytest.mark.parametrize(
    "layout, policy",
    [("layer_first", "wait_complete"), ("page_first", "timeout"), ("page_first_direct", "best_effort")],
)
def test_every_configuration_matches_no_cache(tmp_path, layout, policy, capsys):
    args = parse(
        SMALL
        + [
            "--no-warm",
            "--report-dir",
            str(tmp_path / "report"),
            "--hicache-mem-layout",
            layout,
            "--hicache-storage-prefetch-policy",
            policy,
            "--hicache-storage-backend-extra-config",
            json.dumps({"storage_dir": str(tmp_path / "s"), "prefetch_threshold": 16}),
        ]
    )
    assert multiturn.run(args) == 0
    report = json.loads(Path(tmp_path / "report" / "report.json").read_text())
    assert all(report["summary"]["outputs_identical"].values())
    by = {c["config"]: c for c in report["configs"]}
    assert set(by) == {"none", "radix", "hicache", "hicache+storage"}
    assert by["none"]["cache_hit_rate"] == 0
    assert by["hicache"]["hit_tokens"]["host"] > 0
    assert by["hicache+storage"]["backuped_tokens"] > 0
    for c in report["configs"]:  # tiers add up per round
        for r in c["rounds"]:
            assert sum(r["cached"].values()) <= r["prompt_tokens"]
    assert (tmp_path / "report" / "report.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "same tokens" in out and "where rounds 2+ TTFT goes" in out


@pytest.mark.parametrize("layout, policy", [("layer_first", "wait_complete"), ("page_first_direct", "timeout")])
def test_storage_serves_what_device_and_host_cannot_hold(tmp_path, layout, policy):
    """Round 3's working set (4 x ~172 tokens) exceeds device (256) + host (256, ratio 1), and one request runs at
    a time, so a fetched prefix is never lost to eviction while its request waits for device room: part of every
    later round must come back from storage (ratio 1.5 holds 640 tokens: borderline, and timing-dependent)."""
    args = parse(
        SMALL
        + [
            "--no-warm",
            "--configs",
            "hicache+storage",
            "--hicache-ratio",
            "1",
            "--max-running",
            "1",
            "--report-dir",
            str(tmp_path / "report"),
            "--hicache-mem-layout",
            layout,
            "--hicache-storage-prefetch-policy",
            policy,
            "--hicache-storage-backend-extra-config",
            json.dumps({"storage_dir": str(tmp_path / "s"), "prefetch_threshold": 16}),
        ]
    )
    assert multiturn.run(args) == 0  # and the tokens are the no-cache run's
    run = {c["config"]: c for c in json.loads(Path(tmp_path / "report" / "report.json").read_text())["configs"]}[
        "hicache+storage"
    ]
    assert run["hit_tokens"]["storage"] > 0 and run["backuped_tokens"] > 0
    for rr in run["rounds"]:  # the phases of each round's mean TTFT add up to it
        assert abs(sum(rr["ttft_phases_ms"].values()) - rr["ttft_mean_ms"]) < 1e-3, rr
    assert run["prefetch_outcomes"].get("hit", 0) + run["prefetch_outcomes"].get("partial", 0) > 0


def test_warm_restart_in_a_second_process(tmp_path, capsys):
    args = parse(
        SMALL
        + [
            "--configs",
            "hicache+storage",
            "--report-dir",
            str(tmp_path / "r"),
            "--storage-dir",
            str(tmp_path / "store"),
            "--warm",
        ]
    )
    assert multiturn.run(args) == 0
    summary = json.loads(Path(tmp_path / "r" / "report.json").read_text())["summary"]
    assert summary["warm_outputs_identical"]
    warm = json.loads(Path(tmp_path / "r" / "report.json").read_text())["warm"]
    assert warm["hit_tokens"]["storage"] > 0 and warm["rounds"][0]["cached"]["storage"] > 0
    # the restart read the store cold: its page files were dropped from the page cache first
    pages = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert 0 < warm["page_cache_dropped_files"] <= len(pages)
    assert "dropped from the page cache first" in capsys.readouterr().out
    assert os.path.isdir(tmp_path / "store")  # a given directory is kept


def test_all_miss_reports_what_a_miss_costs_against_recompute(tmp_path, capsys):
    args = parse(
        SMALL + ["--no-warm", "--all-miss", "--configs", "radix,hicache+storage", "--report-dir", str(tmp_path)]
    )
    args.hicache_storage_backend_extra_config = json.dumps({"storage_dir": str(tmp_path / "s")})
    assert multiturn.run(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    for c in report["configs"]:  # no prompt is seen twice: nothing hits anywhere
        assert sum(c["hit_tokens"].values()) == 0, c["config"]
    assert set(report["summary"]["ttft_speedup_vs_recompute"]) == {"radix", "hicache+storage"}
    assert "what a miss costs" in capsys.readouterr().out


def test_engine_decodes_like_a_full_recompute():
    """Prefix reuse changes nothing: generating after a cached prefix equals generating from scratch."""
    model = TinyLlama(
        ModelConfig(
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            vocab_size=256,
        )
    )
    cfg = HiCacheConfig(page_size=8, hicache_io_backend="direct")
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 256, (50,), generator=g).tolist()
    plain = Engine(model, cfg, "none", device_tokens=128)
    ref = plain.generate([Request("a", prompt, 12)])[0].output
    cached = Engine(model, cfg, "hicache", device_tokens=128)
    first = cached.generate([Request("b", prompt, 12)])[0]
    second = cached.generate([Request("c", prompt + first.output + [5, 6, 7], 4)])[0]
    assert first.output == ref
    assert second.cached["device"] + second.cached["host"] >= 48
    again = plain.generate([Request("d", prompt + first.output + [5, 6, 7], 4)])[0].output
    assert second.output == again
    cached.close()


def test_ttft_phases_sum_to_ttft_and_show_the_prefetch_wait():
    """A second engine on a slow store (every read 0.3 s): the request waits for its prefetch (wait_complete), is
    served from storage, and its phases -- queued, prefetch wait, load, compute -- add up to its TTFT."""
    model = TinyLlama(
        ModelConfig(
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            vocab_size=256,
        )
    )
    extra = {"store": f"phases-{os.getpid()}", "prefetch_threshold": 8, "read_latency_s": 0.3}
    cfg = HiCacheConfig(
        page_size=8,
        hicache_io_backend="direct",
        hicache_storage_backend="memory",
        hicache_storage_backend_extra_config=extra,
        hicache_storage_prefetch_policy="wait_complete",
    )
    prompt = list(range(3, 67))
    writer = Engine(model, cfg, "hicache+storage", device_tokens=256)
    first = writer.generate([Request("w", prompt, 4)])[0]
    writer.flush()
    writer.close()
    assert first.prefetch == "miss"  # storage was asked (a query is not slowed: only reads are); it held nothing
    reader = Engine(model, cfg, "hicache+storage", device_tokens=256)
    try:
        late = time.perf_counter() + 0.05
        r, queued = reader.generate([Request("r", prompt, 4), Request("q", list(range(100, 140)), 4, arrival=late)])
    finally:
        reader.close()
    assert r.prefetch == "hit" and r.cached["storage"] == 56 and r.output == first.output
    assert r.phases["prefetch_wait"] >= 0.25 and r.phases["compute"] > 0 and r.phases["load"] >= 0
    for req in (first, r, queued):
        assert set(req.phases) == set(PHASES)
        assert abs(sum(req.phases.values()) - req.ttft) < 1e-6, (req.phases, req.ttft)


def test_bad_engine_input():
    model = TinyLlama(
        ModelConfig(
            hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, vocab_size=64
        )
    )
    from hicache_core.errors import ConfigError

    with pytest.raises(ConfigError, match="choose one of none, radix"):
        Engine(model, HiCacheConfig(page_size=8), "l4")
    with pytest.raises(ConfigError, match="needs 136 device tokens; the device pool holds 64"):
        Engine(model, HiCacheConfig(page_size=8), "none", device_tokens=64).generate(
            [Request("x", list(range(128)), 4)]
        )
    with pytest.raises(ConfigError, match="--configs: unknown gpu"):
        multiturn.run(parse(SMALL + ["--configs", "gpu"]))


def test_repeat_reports_spread_cpu_and_warm_restarts(tmp_path, capsys):
    args = parse(
        SMALL
        + [
            "--configs",
            "radix,hicache+storage",
            "--repeat",
            "2",
            "--report-dir",
            str(tmp_path / "r"),
            "--storage-dir",
            str(tmp_path / "store"),
            "--warm",
        ]
    )
    assert multiturn.run(args) == 0
    report = json.loads(Path(tmp_path / "r" / "report.json").read_text())
    rep = report["summary"]["repeats"]
    assert rep["n"] == 2 and len(report["repeats"]) == 1
    assert len(rep["speedup_storage_vs_radix"]["values"]) == 2 and len(rep["warm_round1_speedup"]["values"]) == 2
    for key in ("ttft_rounds2plus_ms", "ttft_round1_ms"):
        sp = rep[key]["hicache+storage"]
        assert len(sp["values"]) == 2 and sp["min"] <= sp["median"] <= sp["max"]
    for runs, i in ((report["configs"], 0), (report["repeats"][0]["configs"], 1)):
        for c in runs:  # each repeat's round 1, configuration by configuration
            assert rep["ttft_round1_ms"][c["config"]]["values"][i] == c["rounds"][0]["ttft_mean_ms"]
    assert all(c["cpu"]["own_cores"] > 0 for c in report["configs"])
    assert report["warm"]["cpu"]["own_cores"] > 0
    assert sorted(os.listdir(tmp_path / "store")) == ["repeat-1", "repeat-2"]  # each repeat starts cold
    assert "over 2 repeats" in capsys.readouterr().out


def test_untrustworthy_figures_are_flagged():
    from hicache_core.bench.report import summarize

    def run(config, storage=0, contended=False):
        return {
            "config": config,
            "label": config,
            "outputs": [[1]],
            "ttft_mean_rounds2plus_ms": 10.0,
            "rounds": [{"ttft_mean_ms": 10.0}],
            "hit_tokens": {"device": 0, "host": 0, "storage": storage},
            "cpu": {"contended": contended, "others_cores": 1.3 if contended else 0.0},
        }

    quiet = summarize([run("none"), run("radix"), run("hicache+storage")], run("hicache+storage", storage=64))
    assert quiet["warnings"] == []
    noisy = summarize([run("none"), run("radix", contended=True), run("hicache+storage")], run("hicache+storage"))
    assert any("0 tokens from storage" in w for w in noisy["warnings"])
    assert any("radix: other processes used 1.3 CPU cores" in w for w in noisy["warnings"])


def test_cpu_meter_sees_another_process_burning_a_core():
    import subprocess
    import sys
    import time

    from hicache_core.bench.measure import CpuMeter

    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        with CpuMeter() as m:
            time.sleep(1.5)
    finally:
        hog.kill()
        hog.wait()
    r = m.result()
    assert r["others_cores"] is not None and r["others_cores"] > 0.5 and r["contended"], r
    assert r["own_cores"] < 0.5


def test_tensor_parallel_ranks_give_the_single_rank_tokens_in_every_configuration(tmp_path):
    """TP=2: two rank processes (gloo), heads, KV and MLP sharded, each rank with its own pools and storage keys,
    cache decisions agreed -- the same greedy tokens as one rank, every configuration, the same hits on both."""
    from hicache_core.bench.multiturn import CONFIGS, Progress, Workload, base_config, run_config
    from hicache_core.engine.checkpoint import model_from_args

    extra = json.dumps({"prefetch_threshold": 16})
    outs = {}
    for tp in (1, 2):
        args = parse(SMALL + ["--tp-size", str(tp), "--hicache-storage-backend-extra-config", extra])
        base = base_config(args, str(tmp_path / f"store-tp{tp}"))
        work = Workload(args)
        model = model_from_args(args)
        outs[tp] = {c: run_config(c, args, work, model, base, args.num_rounds, Progress(0, False)) for c in CONFIGS}
    for c in CONFIGS:
        assert outs[2][c]["outputs"] == outs[1][c]["outputs"] == outs[1]["none"]["outputs"], c
        r0, r1 = outs[2][c]["per_rank_hit_tokens"]
        assert r0 == r1 == outs[2][c]["hit_tokens"], c
    assert outs[2]["hicache+storage"]["hit_tokens"]["host"] + outs[2]["hicache+storage"]["hit_tokens"]["storage"] > 0
    assert (
        os.path.isdir(tmp_path / "store-tp2") and len(os.listdir(tmp_path / "store-tp2")) == 2
    )  # a namespace per rank


def test_tensor_parallel_warm_restart_and_bad_sizes(tmp_path, capsys):
    args = parse(
        SMALL
        + [
            "--configs",
            "hicache+storage",
            "--tp-size",
            "2",
            "--report-dir",
            str(tmp_path / "r"),
            "--storage-dir",
            str(tmp_path / "store"),
            "--warm",
        ]
    )
    assert multiturn.run(args) == 0
    summary = json.loads(Path(tmp_path / "r" / "report.json").read_text())["summary"]
    assert summary["warm_outputs_identical"] and summary["warm_storage_tokens"] > 0
    assert "hit tokens per rank" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="attention heads .4. must divide evenly"):
        multiturn.run(parse(SMALL + ["--tp-size", "3"]))
