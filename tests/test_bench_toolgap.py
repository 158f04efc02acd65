"""``hicache bench toolgap`` end to end on small shapes: the churn empties the device and host tiers, a restore
makes the post-gap turn a host hit, retention keeps it there, and every configuration gives the same tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from core_helpers import REPO


def test_toolgap_restore_and_retention_turn_storage_loads_into_host_hits(tmp_path):
    cmd = [sys.executable, "-m", "hicache_core.cli", "bench", "toolgap", "--json", "--no-progress"]
    cmd += ["--agents", "2", "--turns", "2", "--context-length", "256", "--churn-length", "512"]
    cmd += ["--device-tokens", "1024", "--hidden-size", "64", "--intermediate-size", "128", "--num-layers", "2"]
    cmd += ["--num-heads", "2", "--num-kv-heads", "1", "--head-dim", "32", "--restore-lead", "0.2"]
    r = subprocess.run(
        cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO))
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    by = {c["config"]: c for c in json.loads(r.stdout)["configs"]}
    assert list(by) == ["l3", "restore", "retention", "radix"]
    whole = by["l3"]["hit_tokens"]["storage"]
    assert whole > 0 and by["l3"]["hit_tokens"]["host"] == 0  # the churn left the agents' pages in storage only
    assert by["restore"]["restores"] == {"success": 2}
    assert by["restore"]["hit_tokens"]["host"] >= whole and by["restore"]["hit_tokens"]["storage"] == 0
    assert by["retention"]["retention_answers"] == {"accepted": 4}
    assert by["retention"]["hit_tokens"]["host"] + by["retention"]["hit_tokens"]["device"] >= whole
    assert by["radix"]["hit_rate"] == 0
    assert all(c["same_tokens"][0] == c["same_tokens"][1] for c in by.values())
