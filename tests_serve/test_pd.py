"""Prefill/decode disaggregation end to end: `hicache bench pd` starts real `hicache serve` instances (prefill and
decode processes) that hand KV over through a real file store, and routes a multi-turn workload through them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SMALL = [
    "--num-clients",
    "3",
    "--num-rounds",
    "2",
    "--request-length",
    "160",
    "--question-length",
    "32",
    "--output-length",
    "48",
    "--request-rate",
    "50",
    "--device-tokens",
    "512",
    "--max-running",
    "2",
    "--hicache-ratio",
    "1",
    "--no-progress",
]


def bench_pd(tmp_path, *flags):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "hicache_core.cli",
            "bench",
            "pd",
            *SMALL,
            "--report-dir",
            str(tmp_path / "report"),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(Path(tmp_path / "report" / "report.json").read_text())
    return {c["config"]: c for c in report["configs"]}, report["summary"], out.stdout


def test_prefill_instances_share_the_store(tmp_path):
    runs, summary, stdout = bench_pd(tmp_path, "--mode", "prefill-share", "--configs", "pd-shared")
    assert all(summary["outputs_identical"].values())  # == the single-process run's tokens
    shared = runs["pd-shared"]
    # rounds alternate: prefill-2 serves round 2 having seen nothing itself; everything it hits it loads from the
    # store prefill-1 filled in round 1 (without a store it could hit nothing at all)
    hits = shared["per_instance_hit_tokens"]
    assert hits["prefill-2"]["storage"] > 0 and hits["prefill-2"]["device"] == hits["prefill-2"]["host"] == 0
    assert shared["rounds"][1]["prefill"] == "prefill-2" and shared["rounds"][1]["cached"]["storage"] > 0
    assert shared["decode_storage_tokens"] > 0  # decode loaded the prompts prefill handed over
    assert "prefill-2 0/0/" in stdout


def test_decode_offload_feeds_the_next_turns_prefill(tmp_path):
    # the prefill's own tiers hold every prompt it saw: all it finds in storage, decode put there
    runs, summary, stdout = bench_pd(
        tmp_path,
        "--mode",
        "decode-offload",
        "--configs",
        "pd-shared,pd-offload",
        "--device-tokens",
        "1024",
        "--hicache-ratio",
        "2",
    )
    assert all(summary["outputs_identical"].values())
    shared, offload = runs["pd-shared"], runs["pd-offload"]
    assert shared["hit_tokens"]["storage"] == 0
    assert offload["hit_tokens"]["storage"] > 0  # pages of replies decode generated and offloaded
    assert offload["cache_hit_rate"] > shared["cache_hit_rate"]
    assert offload["backuped_tokens_by_instance"]["decode"] > 0
    assert shared["backuped_tokens_by_instance"]["decode"] == 0  # without offload decode only reads


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--disaggregation-mode", "prefill", "--enable-hierarchical-cache"], "storage tier they share"),
        (["--disaggregation-decode-enable-offload-kvcache"], "for a decode instance"),
        (
            [
                "--disaggregation-mode",
                "decode",
                "--enable-hierarchical-cache",
                "--hicache-storage-backend",
                "file",
                "--disaggregation-decode-enable-offload-kvcache",
                "--hicache-write-policy",
                "write_back",
            ],
            "write_through",
        ),
    ],
)
def test_bad_role_flags_fail_before_serving(flags, message):
    out = subprocess.run(
        [sys.executable, "-m", "hicache_core.cli", "serve", "--port", "0", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_prefill_server_answers_with_one_token_whatever_max_new_tokens_says(tmp_path):
    from conftest import serve

    store = json.dumps({"storage_dir": str(tmp_path / "store"), "prefetch_threshold": 32})
    with serve(
        tmp_path,
        "--disaggregation-mode",
        "prefill",
        "--enable-hierarchical-cache",
        "--page-size",
        "32",
        "--max-total-tokens",
        "256",
        "--hicache-storage-backend",
        "file",
        "--hicache-storage-backend-extra-config",
        store,
    ) as server:
        assert server.get("/get_server_info")["disaggregation_mode"] == "prefill"
        out = server.generate({"input_ids": list(range(100)), "sampling_params": {"max_new_tokens": 1000}})
        assert len(out["output_ids"]) == 1 and out["meta_info"]["finish_reason"]["type"] == "length"
        # answered only once the prompt's 3 whole pages were in the store
        assert len(list((tmp_path / "store").rglob("*.page"))) == 3
