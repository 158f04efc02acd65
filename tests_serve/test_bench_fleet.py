"""`hicache bench fleet` end to end: real `hicache serve` processes at TP=1 and TP=2 (two rank processes) on one file
store with pages stored by KV head, against a store each. Every prefix after its first wave is a storage hit on the
shared store (the other TP size wrote it), a miss on the separate ones, the shared store holds each prefix once,
and the tokens are the same either way."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def fleet(tmp_path, *flags):
    return subprocess.run(
        [sys.executable, "-m", "hicache_core.cli", "bench", "fleet", "--report-dir", str(tmp_path), *flags],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


def test_tp1_and_tp2_servers_share_one_store(tmp_path):
    out = fleet(tmp_path, "--prefixes", "3", "--prefix-length", "256", "--page-size", "32")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(Path(tmp_path / "fleet.json").read_text())
    by = {r["mode"]: r for r in report["results"]}
    assert report["summary"]["tokens_identical"]
    assert by["separate"]["storage_hit_tokens_later_waves"] == 0
    # each later-wave prompt: its 256-token prefix (8 pages) from the store, its question computed
    assert by["shared"]["storage_hit_tokens_later_waves"] == 3 * 256
    assert report["summary"]["bytes_stored_ratio_separate_over_shared"] > 1.5
    assert "fewer bytes stored" in out.stdout


def test_bad_fleet_flags_say_what_to_give(tmp_path):
    out = fleet(tmp_path, "--servers", "2")
    assert out.returncode == 2 and "--servers '2': give two or more TP sizes" in out.stderr
    out = fleet(tmp_path, "--hicache-storage-backend", "memory")
    assert out.returncode == 2 and "measures the file backend" in out.stderr
