"""`hicache bench multiturn --base-url` drives running servers with the in-process bench's workload and report."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, serve

COMMON = ["--max-total-tokens", "512", "--page-size", "32", "--hicache-ratio", "3", "--max-running-requests", "4"]


def test_bench_multiturn_over_http_compares_servers(tmp_path):
    extra = json.dumps({"storage_dir": str(tmp_path / "store"), "prefetch_threshold": 64})
    with (
        serve(tmp_path, *COMMON) as radix,
        serve(
            tmp_path,
            *COMMON,
            "--enable-hierarchical-cache",
            "--hicache-storage-backend",
            "file",
            "--hicache-storage-backend-extra-config",
            extra,
            "--hicache-storage-prefetch-policy",
            "wait_complete",
        ) as stored,
    ):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "hicache_core.cli",
                "bench",
                "multiturn",
                "--base-url",
                radix.url,
                "--base-url",
                f"mine={stored.url}",
                "--num-clients",
                "4",
                "--num-rounds",
                "3",
                "--request-length",
                "256",
                "--question-length",
                "32",
                "--output-length",
                "4",
                "--request-rate",
                "inf",
                "--json",
                "--no-progress",
                "--report-dir",
                str(tmp_path / "rep"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO,
        )
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads(r.stdout)
    radix_run, stored_run = report["configs"]
    assert (radix_run["label"], radix_run["config"]) == ("device-only radix", "radix")
    assert (stored_run["label"], stored_run["config"]) == ("mine", "hicache+storage")
    assert report["summary"]["outputs_identical"] == {"radix": True, "hicache+storage": True}
    assert stored_run["hit_tokens"]["host"] + stored_run["hit_tokens"]["storage"] > 0, stored_run["hit_tokens"]
    assert stored_run["backuped_tokens"] > 0 and len(stored_run["rounds"]) == 3
    assert report["summary"]["ttft_rounds2plus_speedup_storage_vs_radix"] > 0


def test_bench_base_url_errors_are_clear(tmp_path):
    for url, says in (("localhost:1", "give http://HOST:PORT"), ("http://127.0.0.1:9", "is the server running?")):
        r = subprocess.run(
            [sys.executable, "-m", "hicache_core.cli", "bench", "multiturn", "--base-url", url, "--no-progress"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
